import errno
import os
import stat
from pathlib import Path

import pytest

from tokenlife.errors import InsecureKeyFile, KeySourceError
from tokenlife.fsutil import ensure_private_dir, read_private_file, write_secret


def test_write_secret_atomic_and_private(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_text("old")
    write_secret(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["secret"]  # no temp file left behind


def test_write_secret_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_secret(target, 123)  # type: ignore[arg-type]  # fails after the temp file exists
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["secret"]


def test_write_secret_replaces_symlink_not_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(victim)
    write_secret(link, b"token")
    assert victim.read_text() == "keep"
    assert not link.is_symlink() and link.read_bytes() == b"token"


def test_ensure_private_dir_fixes_mode(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o755)
    ensure_private_dir(d, os.getuid(), os.getgid())
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_ensure_private_dir_refuses_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "d").symlink_to(tmp_path / "real")
    with pytest.raises(Exception, match="symlink"):
        ensure_private_dir(tmp_path / "d", os.getuid(), os.getgid())


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644])
def test_read_private_refuses_group_world(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"x" * 32)
    key.chmod(mode)
    with pytest.raises(InsecureKeyFile, match=f"mode {mode:04o}: it must not be accessible"):
        read_private_file(key, {os.geteuid()})


def test_read_private_refuses_foreign_owner(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"x" * 32)
    key.chmod(0o600)
    with pytest.raises(InsecureKeyFile, match="is owned by uid"):
        read_private_file(key, {os.geteuid() + 1})


def test_read_private_refuses_symlink_and_missing(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"x" * 32)
    key.chmod(0o600)
    (tmp_path / "l").symlink_to(key)
    with pytest.raises(KeySourceError):
        read_private_file(tmp_path / "l", {os.geteuid()})
    with pytest.raises(KeySourceError, match="does not exist"):
        read_private_file(tmp_path / "nope", {os.geteuid()})
    assert read_private_file(key, {os.geteuid()}) == b"x" * 32


def test_read_private_refuses_a_fifo_without_waiting(tmp_path: Path) -> None:
    import signal

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("read_private_file blocked on a FIFO")

    fifo = tmp_path / "k"
    os.mkfifo(fifo, 0o600)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)  # a blocking open would hang the test: fail it instead
    try:
        with pytest.raises(KeySourceError, match=f"key file {fifo} is not a regular file"):
            read_private_file(fifo, {os.geteuid()})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_read_private_refuses_dev_zero_and_big_files(tmp_path: Path) -> None:
    with pytest.raises(KeySourceError, match="key file /dev/zero is not a regular file"):
        read_private_file(Path("/dev/zero"), {0, os.geteuid()})
    key = tmp_path / "k"
    key.write_bytes(b"x" * 4097)
    key.chmod(0o600)
    with pytest.raises(KeySourceError, match=f"key file {key} is larger than 4096 bytes"):
        read_private_file(key, {os.geteuid()}, limit=4096)
    assert read_private_file(key, {os.geteuid()}, limit=4097) == b"x" * 4097


def test_remove_file_never_removes_a_directory(tmp_path: Path) -> None:
    from tokenlife.fsutil import remove_file

    path = tmp_path / "slurm_jwt"
    path.mkdir()
    (path / "mine").write_text("keep")
    with pytest.raises(IsADirectoryError):
        remove_file(path)
    assert (path / "mine").read_text() == "keep"


def test_remove_file_follows_no_symlink(tmp_path: Path) -> None:
    from tokenlife.fsutil import remove_file

    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    assert remove_file(tmp_path / "link") is True
    assert target.read_text() == "keep" and not (tmp_path / "link").is_symlink()
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("keep")
    (tmp_path / "dirlink").symlink_to(tmp_path / "real")
    with pytest.raises(OSError) as raised:
        remove_file(tmp_path / "dirlink" / "f")
    assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert (tmp_path / "real" / "f").read_text() == "keep"
    assert remove_file(tmp_path / "gone" / "f") is False
    assert remove_file(tmp_path / "real" / "nope") is False
    assert remove_file(tmp_path / "real" / "f") is True
