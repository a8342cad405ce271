"""Shared test fixtures.

``require(condition, reason)`` is how a test asks for a real component
(root, sshd, Slurm, PostgreSQL, pamtester, moto): outside CI a missing one
skips with the reason; with CI=true it fails, so a green CI run always means
every real-component test ran.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness.postgres import PG_BIN, PostgresServer

# The shipped contract suites (tokenlife/testing) explain a failed assert as
# a test module's would: pytest rewrites their asserts too.
pytest.register_assert_rewrite("tokenlife.testing")

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing real component in CI: {reason}")
    pytest.skip(reason)


def wait_for(
    condition: Callable[[], object],
    what: str,
    timeout: float = 10.0,
    *,
    every: float = 0.01,
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll ``condition`` every ``every`` seconds until it holds; after
    ``timeout`` seconds fail, naming ``what`` (and ``detail()``: a daemon's logs, say)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            more = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{more}")
        time.sleep(every)


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


def run_engine(
    config: Path,
    *args: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``tokenlife-engine ARGS`` with ``config`` and only ``env`` (plus PATH) in its environment."""
    full = {"PATH": os.environ["PATH"], "TOKENLIFE_CONFIG": str(config), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "client_engine.cli", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=30,
        preexec_fn=preexec_fn,
        check=False,
    )


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


# Real PostgreSQL for unit and integration tests alike: one server per session.
@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    require_root()
    for tool in ("initdb", "pg_ctl", "postgres"):
        require((PG_BIN / tool).exists(), f"needs PostgreSQL 15 ({PG_BIN / tool})")
    require_tool("setpriv")
    # A server time zone far from UTC: the store must not depend on it.
    server = PostgresServer(settings={"timezone": "'Pacific/Chatham'"})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty store: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store/tokenlife.db"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"tl_{secrets.token_hex(6)}"
    url = server.create_database(name)
    try:
        yield url
    finally:
        server.drop_database(name)
