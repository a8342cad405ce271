"""The SQLite store holds every live token: it is private whatever the umask (issue 12, 7)."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from repository.store import SqlTokenStore
from tests.conftest import require_root, run_cli, write_cli_site
from tokenlife.errors import StoreError

KEY = secrets.token_bytes(32)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("loose_umask")
def test_a_store_made_under_umask_022_is_private(tmp_path: Path) -> None:
    require_root()  # the CLI mints for nobody
    cfg = write_cli_site(tmp_path, KEY)
    (tmp_path / "c.toml").write_text(
        cfg.read_text().replace(f"sqlite:///{tmp_path}/db", f"sqlite:///{tmp_path}/state/db")
    )
    proc = run_cli("-c", str(cfg), "mint", "nobody")
    assert proc.returncode == 0, proc.stderr
    db = tmp_path / "state" / "db"
    assert (mode(db.parent), mode(db)) == (0o700, 0o600)
    # While a store is open, SQLite's -wal and -shm exist: private too.
    store = SqlTokenStore(f"sqlite:///{db}")
    with store.transaction() as session:
        session.connection().exec_driver_sql("CREATE TABLE probe (x INTEGER)")
    wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
    assert (mode(wal), mode(shm)) == (0o600, 0o600)
    store.close()


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_a_store_others_can_read_is_refused(tmp_path: Path, suffix: str) -> None:
    db = tmp_path / "db"
    store = SqlTokenStore(f"sqlite:///{db}")
    assert store.records() == []  # created (private) and migrated
    store.close()
    target = Path(f"{db}{suffix}")
    target.touch()
    target.chmod(0o644)
    with pytest.raises(StoreError, match=rf"token store {target} has mode 0644: others could"):
        SqlTokenStore(f"sqlite:///{db}").records()


def test_cli_refuses_a_readable_store_with_the_store_status(tmp_path: Path) -> None:
    cfg = write_cli_site(tmp_path, KEY)
    db = tmp_path / "db"
    SqlTokenStore(f"sqlite:///{db}").records()
    db.chmod(0o640)
    proc = run_cli("-c", str(cfg), "list")
    assert proc.returncode == 6
    assert proc.stderr.splitlines() == [
        f"tokenlife-list: token store {db} has mode 0640: others could read every live "
        f"token (chmod 600 {db})"
    ]
    assert mode(db) == 0o640  # refused, not silently changed


def test_a_relative_sqlite_path_is_a_config_error(tmp_path: Path) -> None:
    cfg = write_cli_site(tmp_path, KEY)
    cfg.write_text(cfg.read_text().replace(f"sqlite:///{tmp_path}/db", "sqlite:///tokenlife.db"))
    proc = run_cli("-c", str(cfg), "list")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"tokenlife-list: {cfg}: store.url: the SQLite path must be absolute: "
        "sqlite:////var/lib/tokenlife/..."
    ]
    assert not (tmp_path / "tokenlife.db").exists()


def test_config_check_reports_a_readable_store(tmp_path: Path) -> None:
    cfg = write_cli_site(tmp_path, KEY)
    assert run_cli("-c", str(cfg), "config", "check").returncode == 0  # no store yet: fine
    db = tmp_path / "db"
    assert not db.exists()  # config check created nothing
    SqlTokenStore(f"sqlite:///{db}").records()
    assert run_cli("-c", str(cfg), "config", "check").returncode == 0
    db.chmod(0o644)
    proc = run_cli("-c", str(cfg), "config", "check")
    assert proc.returncode == 1
    assert f"problem: store: token store {db} has mode 0644: others could read" in proc.stdout
