"""R8: a full disk under the store, the spool or the token directory.

Each case runs the real CLI with that directory on a tiny tmpfs filled to the
last block: one line on stderr, a documented status, no partial or temporary
file left, and the same command works once space is back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_engine import wrappers
from repository.pull_audit import PullAudit
from repository.store import SqlTokenStore
from tests.conftest import require_root, require_tool, run_cli, run_engine, write_cli_site
from tokenlife.testing.store_contract import record

KEY = secrets.token_bytes(32)


@pytest.fixture
def full(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, filled up; removing ``filler`` frees it."""
    require_root()
    require_tool("mount", "umount")
    mount = tmp_path / "full"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mount)],
                   check=True)  # fmt: skip
    try:
        fill(mount)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path) -> None:
    """Fill ``mount`` to its last block with ``filler``."""
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"\0" * 4096)
    with contextlib.suppress(OSError):
        while True:  # the last few bytes too
            os.write(fd, b"\0")
    os.close(fd)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def free(full: Path) -> None:
    (full / "filler").unlink()


def test_login_token_directory_full(tmp_path: Path, full: Path) -> None:
    cfg = write_cli_site(tmp_path, KEY)
    cfg.write_text(cfg.read_text().replace(f'"{tmp_path}/run"', f'"{full}/login"'))
    proc = run_cli("-c", str(cfg), "mint", "nobody")
    lines = proc.stderr.splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "No space left on device" in lines[0] or "cannot write" in lines[0]
    assert not [name for name in files_under(full) if name.endswith(".tmp")]
    free(full)
    again = run_cli("-c", str(cfg), "mint", "nobody")
    assert again.returncode == 0, again.stderr
    token_files = [n for n in files_under(full) if n.endswith("slurm_jwt")]
    assert len(token_files) == 1 and not [n for n in files_under(full) if n.endswith(".tmp")]


def test_store_on_a_full_disk(tmp_path: Path, full: Path) -> None:
    cfg = write_cli_site(tmp_path, KEY)
    cfg.write_text(cfg.read_text().replace(f"sqlite:///{tmp_path}/db", f"sqlite:///{full}/db"))
    proc = run_cli("-c", str(cfg), "mint", "nobody")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 6 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("tokenlife-mint: ") and "full" in lines[0].lower()
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("slurm_jwt"))
    free(full)
    again = run_cli("-c", str(cfg), "mint", "nobody")
    assert again.returncode == 0, again.stderr
    listed = run_cli("-c", str(cfg), "list")
    assert listed.returncode == 0 and "nobody" in listed.stdout


def test_spool_on_a_full_disk(tmp_path: Path, full: Path) -> None:
    """The PAM fallback cannot record its token: the login goes on (pam.required is
    false), one line says why, no partial spool file stays; with space, it records."""
    cfg = write_cli_site(tmp_path, KEY)
    spool = full / "spool"
    cfg.write_text(cfg.read_text().replace(f'"{tmp_path}/spool"', f'"{spool}"'))
    env = {"PAM_TYPE": "open_session", "PAM_USER": "nobody", "TOKENLIFE_CONFIG": str(cfg)}
    proc = run_cli("pam", "--socket", str(tmp_path / "none.sock"), env=env)
    assert proc.returncode == 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenlife-pam: nobody: "), proc.stderr
    assert not [n for n in files_under(full) if n.startswith("spool/")]
    free(full)
    again = run_cli("pam", "--socket", str(tmp_path / "none.sock"), env=env)
    assert again.returncode == 0 and again.stderr == ""
    assert [p.name for p in spool.iterdir()] == ["nobody.json"]
    assert os.stat(spool / "nobody.json").st_mode & 0o077 == 0


def test_slurm_wrappers_on_a_full_disk(tmp_path: Path, full: Path) -> None:
    """install-wrappers stops with one line; the half-written set is never used."""
    target = full / "wrappers"
    config = tmp_path / "engine.toml"
    config.write_text(f'[engine]\nwrapper_dir = "{target}"\n')
    proc = run_engine(config, "install-wrappers")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc
    assert "No space left on device" in lines[0], lines
    assert not [name for name in files_under(full) if name.endswith(".tmp")]
    # No marker: the TaskProlog refuses the directory (and says why).
    assert "no Slurm wrappers there" in str(wrappers.problem(str(target), os.getuid()))
    free(full)
    proc = run_engine(config, "install-wrappers")
    assert proc.returncode == 0, proc
    assert wrappers.problem(str(target), os.getuid()) is None


def test_pull_audit_on_a_full_disk(full: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The pull service's audit trail on a store whose disk is full: every pull
    is still audited into the queue at once (the server never waits), the queue
    keeps its bound by dropping the oldest, one warning says how many, and once
    there is space the events still queued are written."""
    free(full)
    store = SqlTokenStore(f"sqlite:///{full}/db")
    store.save(record("tlalice"), "minted", "test")  # the schema, made while there is room
    fill(full)
    trail = PullAudit(lambda: store, "pull-test", flush_every=3600, max_queued=50)
    caplog.set_level(logging.WARNING, logger="repository.pull_audit")
    for i in range(80):
        trail(f"u{i:03d}", "node01", "ok")
    assert not trail.flush()  # disk full: nothing written, the events stay queued
    for i in range(80, 120):  # pulls go on meanwhile
        trail(f"u{i:03d}", "node01", "ok")
    assert len(trail._queue) == 50
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "cannot write 50 pull audit event(s)" in warnings[0]
    assert "full" in warnings[0].lower() and "30 dropped" in warnings[0]
    assert [e["event"] for e in store.events()] == ["minted"]  # nothing half-written
    free(full)
    assert trail.flush()
    written = [e for e in store.events() if e["event"] == "pull_ok"]
    assert [e["user"] for e in written] == [f"u{i:03d}" for i in range(70, 120)]
    assert {e["reason"] for e in written} == {"from node01"}
    assert any("the store takes events again" in r.getMessage() for r in caplog.records)
