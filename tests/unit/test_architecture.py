"""The architecture holds: one-way layers (import-linter), and lean login/TaskProlog paths.

docs/architecture.md draws the layers; pyproject.toml's [tool.importlinter]
states them as contracts, which `lint-imports` checks in the test command.
These tests show that the contracts bite (a wrong import fails them) and
that the two paths run in every login and every task load nothing heavy.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.keys import HS256Key
from tests.conftest import REPO
from tokenlife.slurm_jwt import SlurmJwt
from tokenlife.users import lookup

PACKAGES = ("tokenlife", "producer", "repository", "transfer", "client_engine")
#: what the login and TaskProlog paths must never import (each costs 10-300 ms)
HEAVY = ("sqlalchemy", "paramiko", "boto3", "cryptography", "argparse")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def importlinter() -> dict[str, object]:
    with open(REPO / "pyproject.toml", "rb") as handle:
        config: dict[str, object] = tomllib.load(handle)["tool"]["importlinter"]
    return config


def test_the_ground_contract_names_every_ground_module() -> None:
    """A new module of tokenlife/ is under the ground contract from its first commit."""
    ground = {
        f"tokenlife.{path.stem}"
        for path in (REPO / "tokenlife").glob("*.py")
        if path.stem != "__init__"
    }
    (contract,) = [
        c
        for c in importlinter()["contracts"]  # type: ignore[attr-defined]
        if c["name"].startswith("The ground")
    ]
    assert set(contract["source_modules"]) == ground
    subpackages = {p.name for p in (REPO / "tokenlife").iterdir() if (p / "__init__.py").exists()}
    assert subpackages == {"app", "testing"}, "a new subpackage needs its place in the layers"


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the packages and pyproject.toml, to break on purpose."""
    root = tmp_path_factory.mktemp("tree")
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_are_kept(tree: Path) -> None:
    proc = lint(tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "wrong", "contract"),
    [
        ("tokenlife/errors.py", "import repository.store", "The ground imports no part"),
        ("client_engine/tokens.py", "import producer.mint", "The worker engine stands"),
        ("producer/mint.py", "import transfer.cycle", "The parts stack one way"),
        ("repository/store.py", "import tokenlife.app.site", "The parts stack one way"),
        ("producer/keys.py", "import producer.aws", "No import cycles"),
    ],
)
def test_a_wrong_import_breaks_a_contract(
    tree: Path, module: str, wrong: str, contract: str
) -> None:
    path = tree / module
    original = path.read_text()
    path.write_text(original + f"\n{wrong}  # noqa\n")
    try:
        proc = lint(tree)
    finally:
        path.write_text(original)
    assert proc.returncode != 0
    broken = proc.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, proc.stdout


# -- lean paths -----------------------------------------------------------------------------

DRIVER = """
import json, sys
before = [m for m in {heavy!r} if m in sys.modules]
from {module} import main
rc = main({argv!r})
sys.stdout.flush()
print(json.dumps({{"rc": rc, "before": before,
                  "loaded": [m for m in {heavy!r} if m in sys.modules]}}), file=sys.stderr)
"""


def run_driver(module: str, argv: list[str], env: dict[str, str]) -> tuple[dict[str, object], str]:
    code = DRIVER.format(heavy=HEAVY, module=module, argv=argv)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    report: dict[str, object] = json.loads(proc.stderr.strip().splitlines()[-1])
    return report, proc.stdout


@pytest.fixture
def mint_service(tmp_path: Path) -> Iterator[Path]:
    """A stand-in mint service that answers every login "OK" (the service path)."""
    path = tmp_path / "mint.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(b"OK\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join()
    server.close()


def me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def test_pam_service_path_loads_nothing_heavy(mint_service: Path) -> None:
    env = {"PAM_TYPE": "open_session", "PAM_USER": me()}
    report, _ = run_driver("tokenlife.app.cli", ["pam", "--socket", str(mint_service)], env)
    assert report == {"rc": 0, "before": [], "loaded": []}


def test_pam_fallback_path_mints_and_loads_nothing_heavy(tmp_path: Path) -> None:
    key = tmp_path / "jwt_hs256.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    config = tmp_path / "tokenlife.toml"
    config.write_text(
        f'[key]\npath = "{key}"\n'
        f'[producer]\nallow_privileged_users = true\nsocket = "{tmp_path}/none.sock"\n'
        f"[pam]\nmin_uid = 0\n"
        f'[store]\nspool_dir = "{tmp_path}/spool"\n'
        f'[login]\ntoken_dir = "{tmp_path}/login"\n'
    )
    env = {"PAM_TYPE": "open_session", "PAM_USER": me(), "TOKENLIFE_CONFIG": str(config)}
    argv = ["pam", "--socket", str(tmp_path / "none.sock")]
    report, _ = run_driver("tokenlife.app.cli", argv, env)
    assert report == {"rc": 0, "before": [], "loaded": []}
    # The fallback really minted: the spool holds the record, the login file the token.
    assert (tmp_path / "spool" / f"{me()}.json").exists()
    assert (tmp_path / "login" / str(os.getuid()) / "slurm_jwt").stat().st_size > 100


def test_engine_env_loads_nothing_heavy(tmp_path: Path) -> None:
    user = lookup(me())
    now = int(time.time())
    token = SlurmJwt().make(HS256Key(os.urandom(32)), user, now, now + 600)
    user_dir = tmp_path / "run" / str(user.uid)
    user_dir.mkdir(parents=True, mode=0o700)
    (user_dir / "slurm_jwt").write_text(token)
    (user_dir / "slurm_jwt").chmod(0o600)
    config = tmp_path / "tokenlife.toml"
    config.write_text(f'[engine]\ntoken_dir = "{tmp_path}/run"\n')
    env = {
        "TOKENLIFE_CONFIG": str(config),
        "SLURM_JOB_UID": str(user.uid),
        "SLURM_JOB_USER": user.name,
        "SLURM_STEP_ID": "0",
    }
    report, out = run_driver("client_engine.cli", ["env"], env)
    assert report == {"rc": 0, "before": [], "loaded": []}
    assert f"export SLURM_JWT={token}" in out.splitlines()


def test_the_engines_pull_path_loads_nothing_heavy() -> None:
    """client_engine.pull and the libmunge binding it shares with the pull
    service (tokenlife/munge.py): no dataclasses (inspect: 14 ms), threading
    or typing, at every task's start."""
    light = (*HEAVY, "dataclasses", "inspect", "threading", "typing", "producer")
    code = (
        f"import json, sys; before = set(sys.modules); import client_engine.pull; "
        f"print(json.dumps([m for m in {light!r} if m in set(sys.modules) - before]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(proc.stdout) == []
