"""NodeFS on this host's file system (the ``local`` transport, and tests).

Every change goes through a file descriptor opened without following
symlinks, so a user who owns the directory cannot redirect it.
"""

from __future__ import annotations

import contextlib
import errno
import os

from tokenlife.interfaces import FileInfo, Owner


class LocalFS:
    def __init__(self, prefix: str = "") -> None:
        #: node paths live under this directory ("" for the real paths)
        self.prefix = prefix.rstrip("/")
        self.own_uid = os.geteuid()

    def _p(self, path: str) -> str:
        return self.prefix + path

    def lstat(self, path: str) -> FileInfo | None:
        try:
            st = os.lstat(self._p(path))
        except FileNotFoundError:
            return None
        return FileInfo(st.st_mode, st.st_uid, st.st_gid, st.st_size, int(st.st_mtime))

    def mkdir(self, path: str, mode: int, owner: Owner) -> None:
        os.makedirs(os.path.dirname(self._p(path)), mode=0o755, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self._p(path), mode)
        self.fix_dir(path, mode, owner)

    def fix_dir(self, path: str, mode: int, owner: Owner) -> None:
        fd = os.open(self._p(path), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def create(self, path: str, data: bytes, mode: int, owner: Owner, mtime: int | None) -> bool:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self._p(path), flags, mode)
        except FileExistsError:
            return False
        try:
            os.fchmod(fd, mode)  # whatever the umask
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
        except BaseException:
            os.close(fd)
            os.unlink(self._p(path))
            raise
        os.close(fd)
        return True

    def rename(self, src: str, dst: str) -> None:
        os.rename(self._p(src), self._p(dst))

    def remove(self, path: str) -> bool:
        try:
            os.unlink(self._p(path))
        except FileNotFoundError:
            return False
        return True

    def listdir(self, path: str) -> list[str]:
        return os.listdir(self._p(path))

    def read(self, path: str, limit: int) -> bytes:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(self._p(path), flags)
        try:
            chunks, left = [], limit
            while left > 0:
                chunk = os.read(fd, left)
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def rmdir(self, path: str) -> bool:
        try:
            os.rmdir(self._p(path))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
        return True
