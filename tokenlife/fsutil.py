"""The only module that creates, chmods, chowns or renames secret files.

ruff bans os.chmod/os.chown/os.replace/os.rename elsewhere, so every
permission-sensitive step is reviewed here once.  Writes follow kstart's
sequence plus the fsyncs others forget: temp file in the target directory
(created 0600 by mkstemp), write, fsync, fchown/fchmod, rename over the
target, fsync the directory; the temp file is unlinked on any failure, so a
reader sees the old file or the new one, never a partial or open one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from tokenlife.errors import InsecureKeyFile, KeySourceError, TokenlifeError


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_secret(
    path: Path, data: bytes, uid: int | None = None, gid: int | None = None, mode: int = 0o600
) -> None:
    """Atomically replace ``path`` with ``data``, owned uid:gid, with ``mode``."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            if uid is not None or gid is not None:
                os.fchown(handle.fileno(), -1 if uid is None else uid, -1 if gid is None else gid)
            os.fchmod(handle.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def ensure_private_dir(path: Path, uid: int, gid: int, mode: int = 0o700) -> None:
    """Make ``path`` a real directory (not a symlink) owned uid:gid with ``mode``.

    The parent must already exist.  An existing directory with the wrong owner
    or mode is corrected through a descriptor, so a symlink swapped in between
    the check and the fix cannot redirect the chown.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise TokenlifeError(f"{path}: not a directory (or a symlink): {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def ensure_dir(path: Path, mode: int = 0o755) -> None:
    """Create ``path`` and its parents if missing (for root-owned trees)."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)


#: a key (or key cache, or SSH identity) is a few KiB; a bigger file is refused unread
MAX_PRIVATE_FILE = 1 << 20


def read_private_file(
    path: Path, allowed_owners: set[int], what: str = "key file", limit: int = MAX_PRIVATE_FILE
) -> bytes:
    """Read a secret file, refusing it as ssh does when others could touch it.

    The checks run on the opened descriptor (no symlinks followed), so the
    file checked is the file read.  It is opened without blocking (a FIFO
    would wait for a writer forever) and must be a regular file of at most
    ``limit`` bytes (/dev/zero would never end), both checked before reading.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise KeySourceError(f"{what} {path} does not exist") from exc
    except PermissionError as exc:
        raise KeySourceError(f"{what} {path} is not readable by uid {os.geteuid()}") from exc
    except OSError as exc:
        raise KeySourceError(f"{what} {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeySourceError(f"{what} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise InsecureKeyFile(
                f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: "
                "it must not be accessible by group or others (chmod 600)"
            )
        if st.st_uid not in allowed_owners:
            raise InsecureKeyFile(
                f"{what} {path} is owned by uid {st.st_uid}, "
                f"expected one of {sorted(allowed_owners)}"
            )
        if st.st_size > limit:
            raise KeySourceError(f"{what} {path} is larger than {_size(limit)}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, min(65536, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise KeySourceError(f"{what} {path} is larger than {_size(limit)}")
        return b"".join(chunks)
    except OSError as exc:
        raise KeySourceError(f"{what} {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit} bytes"


def remove_file(path: Path) -> bool:
    """Unlink ``path`` if present; True when something was removed, False if
    neither it nor its directory is there.

    Nothing is followed: the directory is opened with O_NOFOLLOW (a symlink
    there raises OSError, ENOTDIR or ELOOP) and the name unlinked inside it, so a symlink
    at ``path`` is removed itself, never its target.  A directory at ``path``
    is never removed: IsADirectoryError.  Other failures raise OSError.
    """
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            os.unlink(path.name, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EISDIR, errno.EPERM) and _is_dir(path.name, dir_fd):
                # unlink(2) of a directory: EISDIR on Linux, EPERM by POSIX
                raise IsADirectoryError(errno.EISDIR, "is a directory", str(path)) from None
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def _is_dir(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
