"""Shared test fixtures.

``require(condition, reason)`` is how a test asks for a real component
(root, sshd, Slurm, PostgreSQL, pamtester, moto): outside CI a missing one
skips with the reason; with CI=true it fails, so a green CI run always means
every real-component test ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing real component in CI: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def require_tool(*names: str) -> None:
    for name in names:
        require(shutil.which(name) is not None, f"needs {name} on PATH")


def tokenlife_bin() -> str:
    """The installed console script next to this interpreter."""
    path = Path(sys.executable).parent / "tokenlife"
    assert path.exists(), f"{path} missing: install the project (pip install -e .)"
    return str(path)


def run_cli(
    *args: str, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "TOKENLIFE_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(
        [tokenlife_bin(), *args],
        capture_output=True,
        text=True,
        env=full_env,
        input=input,
        timeout=120,
    )


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli


def write_cli_site(root: Path, key: bytes, extra: str = "") -> Path:
    """A key file and a config keeping all state under ``root``; returns the config."""
    key_path = root / "k"
    key_path.write_bytes(key)
    key_path.chmod(0o600)
    cfg = root / "c.toml"
    cfg.write_text(
        f'[key]\npath = "{key_path}"\n[store]\nurl = "sqlite:///{root}/db"\n'
        f'spool_dir = "{root}/spool"\n[login]\ntoken_dir = "{root}/run"\n'
        f'[producer]\nsocket = "{root}/none.sock"\n' + extra
    )
    return cfg
