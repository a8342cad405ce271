"""An exclusive create over SFTP that loses a race is "exists", never a node failure.

SFTP has no EEXIST: OpenSSH answers an exclusive open of an existing file with
the generic SSH_FX_FAILURE, which paramiko raises as ``OSError("Failure")``
(errno None).  When another pusher removes the file (releases its lock)
between that failed open and the ``lstat`` that tells "exists" from a real
failure, the create must retry instead of failing the delivery.

The in-memory SFTP server below answers as paramiko does against OpenSSH, and
lets a test run "the other pusher" at exactly that moment, so the race that
tests/integration/test_transport_contract.py hits 1 run in 3-15 happens here
every time.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from paramiko.sftp_attr import SFTPAttributes

from tokenlife.interfaces import Owner
from tokenlife.records import TokenFile
from transfer import nodefs
from transfer.localfs import LocalFS
from transfer.sftpfs import SftpFS as RealSftpFS

BASE = "/run/tokenlife"
LOCK = f"{BASE}/.lock.4242"


@dataclass
class _Attrs:
    st_mode: int
    st_uid: int = 0
    st_gid: int = 0
    st_size: int = 0
    st_mtime: int = 0
    data: bytearray = field(default_factory=bytearray)


class _Handle:
    def __init__(self, server: FakeSftp, path: str) -> None:
        self.server, self.path, self.handle = server, path, b"h"

    def _attrs(self) -> _Attrs:
        return self.server.files[self.path]

    def chmod(self, mode: int) -> None:
        self._attrs().st_mode = stat.S_IFREG | mode

    def chown(self, uid: int, gid: int) -> None:
        self._attrs().st_uid, self._attrs().st_gid = uid, gid

    def write(self, data: bytes) -> None:
        self._attrs().data += data
        self._attrs().st_size = len(self._attrs().data)

    def flush(self) -> None:
        pass

    def utime(self, times: tuple[int, int]) -> None:
        self._attrs().st_mtime = times[1]

    def close(self) -> None:
        pass


class FakeSftp:
    """The parts of paramiko.SFTPClient that SftpFS uses, in memory, with
    OpenSSH's answers; ``on_failed_open`` runs right after an exclusive open
    failed because the file existed (another pusher acting at that moment)."""

    def __init__(self) -> None:
        self.files: dict[str, _Attrs] = {"/run": _Attrs(stat.S_IFDIR | 0o755)}
        self.on_failed_open: Callable[[str], None] | None = None
        self.opens: list[str] = []
        self.broken: set[str] = set()  # paths whose open fails with FX_FAILURE for good

    def _missing(self, path: str) -> OSError:
        return OSError(errno.ENOENT, "No such file")  # paramiko: FileNotFoundError

    def lstat(self, path: str) -> _Attrs:
        if path not in self.files:
            raise self._missing(path)
        return self.files[path]

    def mkdir(self, path: str, mode: int) -> None:
        if path in self.files:
            raise OSError("Failure")
        self.files[path] = _Attrs(stat.S_IFDIR | mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.lstat(path).st_uid, self.lstat(path).st_gid = uid, gid

    def chmod(self, path: str, mode: int) -> None:
        attrs = self.lstat(path)
        attrs.st_mode = stat.S_IFMT(attrs.st_mode) | mode

    def open(self, path: str, mode: str) -> _Handle:
        assert mode == "wx"
        self.opens.append(path)
        if path in self.broken:
            raise OSError("Failure")  # e.g. a read-only file system: nothing is there
        if path in self.files:
            if self.on_failed_open is not None:
                hook, self.on_failed_open = self.on_failed_open, None
                hook(path)
            raise OSError("Failure")  # OpenSSH maps EEXIST to SSH_FX_FAILURE
        self.files[path] = _Attrs(stat.S_IFREG | 0o644)
        return _Handle(self, path)

    def posix_rename(self, src: str, dst: str) -> None:
        self.files[dst] = self.files.pop(src)

    def remove(self, path: str) -> None:
        if path not in self.files:
            raise self._missing(path)
        del self.files[path]

    def listdir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix) :].split("/")[0] for p in self.files if p.startswith(prefix)})

    def rmdir(self, path: str) -> None:
        if any(p.startswith(path + "/") for p in self.files):
            raise OSError("Failure")
        self.remove(path)

    def _request(self, *args: Any) -> None:  # fsync@openssh.com
        pass


class SftpFS(RealSftpFS):
    """SftpFS with its raw requests (OPEN with attributes; write, FSETSTAT, fsync
    and close sent together) made through the fake's paramiko-style calls."""

    def _open(self, path: str, mode: int) -> Any:
        handle = self.sftp.open(path, "wx")
        handle.chmod(mode)  # the OPEN request carries the mode
        return handle

    def _fill(self, handle: Any, data: bytes, attrs: SFTPAttributes | None) -> None:
        if data:
            handle.write(data)
        if attrs is not None:
            handle.chmod(attrs.st_mode)
            if attrs.st_uid is not None and attrs.st_gid is not None:
                handle.chown(attrs.st_uid, attrs.st_gid)
            if attrs.st_mtime is not None:
                handle.utime((attrs.st_atime, attrs.st_mtime))
        handle.close()


def _token(version: int = 1) -> TokenFile:
    return TokenFile("alice", 4242, 4343, "t1", version, 1_800_000_000 + version, 0, "a.b.c")


def _released(server: FakeSftp) -> Callable[[str], None]:
    return lambda path: server.files.pop(path)


def test_lock_released_between_the_failed_create_and_the_lstat() -> None:
    server = FakeSftp()
    fs = SftpFS(server, own_uid=0)  # type: ignore[arg-type]  # the fake answers as paramiko
    assert nodefs.install(fs, BASE, _token(1)) == nodefs.INSTALLED
    # Another pusher holds the lock, and releases it right after our exclusive
    # create failed, before our lstat looks.
    server.files[LOCK] = _Attrs(stat.S_IFREG | 0o600)
    server.on_failed_open = _released(server)
    assert nodefs.install(fs, BASE, _token(2)) == nodefs.INSTALLED
    assert server.on_failed_open is None, "the race was not exercised"
    assert bytes(server.files[f"{BASE}/4242/slurm_jwt"].data) == b"a.b.c"
    assert server.files[f"{BASE}/4242/slurm_jwt"].st_mtime == 1_800_000_002
    assert sorted(server.files) == ["/run", BASE, f"{BASE}/4242", f"{BASE}/4242/slurm_jwt"]


def test_create_that_lost_the_race_retries_and_creates() -> None:
    server = FakeSftp()
    server.files[LOCK] = _Attrs(stat.S_IFREG | 0o600)
    server.files[BASE] = _Attrs(stat.S_IFDIR | 0o755)
    server.on_failed_open = _released(server)
    fs = SftpFS(server, own_uid=0)  # type: ignore[arg-type]
    assert fs.create(LOCK, b"", 0o600, None, None) is True
    assert stat.S_IMODE(server.files[LOCK].st_mode) == 0o600


def test_create_that_lost_the_race_to_a_new_holder_says_exists() -> None:
    """Released, then taken by a third pusher before the retry: "exists", untouched."""
    server = FakeSftp()
    server.files[BASE] = _Attrs(stat.S_IFDIR | 0o755)
    server.files[LOCK] = _Attrs(stat.S_IFREG | 0o600)
    server.on_failed_open = _released(server)
    real_lstat = server.lstat

    def lstat(path: str) -> _Attrs:
        try:
            return real_lstat(path)
        finally:  # right after our lstat found nothing, the third pusher takes it
            server.files.setdefault(path, _Attrs(stat.S_IFREG | 0o600, st_uid=7))

    server.lstat = lstat  # type: ignore[method-assign]
    fs = SftpFS(server, own_uid=0)  # type: ignore[arg-type]
    assert fs.create(LOCK, b"", 0o600, None, None) is False
    assert server.files[LOCK].st_uid == 7


def test_a_real_failure_still_fails_after_a_few_tries() -> None:
    """FX_FAILURE with nothing there every time (a read-only file system) is an error."""
    server = FakeSftp()
    server.files[BASE] = _Attrs(stat.S_IFDIR | 0o755)
    server.broken.add(LOCK)
    fs = SftpFS(server, own_uid=0)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="Failure"):
        fs.create(LOCK, b"", 0o600, None, None)
    assert 1 < server.opens.count(LOCK) <= 5


def test_specific_errors_are_not_retried() -> None:
    server = FakeSftp()

    def open_(path: str, mode: str) -> _Handle:
        server.opens.append(path)
        raise OSError(errno.EACCES, "Permission denied")

    server.open = open_  # type: ignore[method-assign]
    fs = SftpFS(server, own_uid=0)  # type: ignore[arg-type]
    with pytest.raises(PermissionError):
        fs.create(LOCK, b"", 0o600, None, None)
    assert server.opens == [LOCK]


class _LosesTempRace(LocalFS):
    """A NodeFS whose first exclusive create of a temporary file says "exists"."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.temp_refusals = 0

    def create(self, path: str, data: bytes, mode: int, owner: Owner, mtime: int | None) -> bool:
        if path.endswith(".tmp") and self.temp_refusals == 0:
            self.temp_refusals += 1
            return False
        return super().create(path, data, mode, owner, mtime)


def test_temp_file_that_exists_is_tried_under_a_new_name(tmp_path: Any) -> None:
    (tmp_path / "run").mkdir()
    fs = _LosesTempRace(str(tmp_path))
    tf = TokenFile("me", fs.own_uid, 0, "t1", 1, 1_800_000_001, 0, "a.b.c")
    assert nodefs.install(fs, BASE, tf) == nodefs.INSTALLED
    assert fs.temp_refusals == 1
    user_dir = tmp_path / "run" / "tokenlife" / str(fs.own_uid)
    assert sorted(p.name for p in user_dir.iterdir()) == ["slurm_jwt"]
