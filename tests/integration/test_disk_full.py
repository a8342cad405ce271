"""R8: a full disk under the store, the spool or the token directory.

Each case runs the real CLI with that directory on a tiny tmpfs filled to the
last block: one line on stderr, a documented status, no partial or temporary
file left, and the same command works once space is back.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_engine import wrappers
from tests.conftest import require_root, require_tool, run_cli, run_engine, write_cli_site

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
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


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
