"""NodeFS over SFTP (paramiko), for the ``ssh`` transport.

Owner and mtime are set on the open handle (FSETSTAT), never by path, and
the final step is OpenSSH's ``posix-rename@openssh.com`` (atomic replace).

Every request is a round trip that a pushing thread waits for, and a warm
push is little else: a new file is opened with its mode in the OPEN request
(no moment with the server's default 0644), and its mode, owner and mtime
then go in one FSETSTAT after the data (a write moves the mtime); the write,
that FSETSTAT, the fsync and the close are sent together and waited for once.
"""

from __future__ import annotations

import errno
from typing import Any

import paramiko
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_EXTENDED,
    CMD_FSETSTAT,
    CMD_HANDLE,
    CMD_OPEN,
    CMD_WRITE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_WRITE,
    SFTPError,
    int64,
)
from paramiko.sftp_attr import SFTPAttributes

from tokenlife.interfaces import FileInfo, Owner

#: SSH_FXF_CREAT | SSH_FXF_EXCL | SSH_FXF_WRITE
_CREATE_EXCL = SFTP_FLAG_CREATE | SFTP_FLAG_EXCL | SFTP_FLAG_WRITE
#: bytes per WRITE request (paramiko's own size; a token is far smaller)
_CHUNK = 32768
#: paramiko's mark for a request no file object waits on
_NO_FILE = type(None)
#: exclusive opens tried when the path vanished between the failure and lstat
_EXCL_ATTEMPTS = 3


class SftpFS:
    def __init__(
        self, sftp: paramiko.SFTPClient, own_uid: int = 0, seen: set[str] | None = None
    ) -> None:
        self.sftp = sftp
        self.own_uid = own_uid
        #: what transfer.nodefs checked over this connection (kept by the pool)
        self.seen: set[str] = seen if seen is not None else set()

    def lstat(self, path: str) -> FileInfo | None:
        try:
            a = self.sftp.lstat(path)
        except FileNotFoundError:
            return None
        return FileInfo(
            a.st_mode or 0, a.st_uid or 0, a.st_gid or 0, a.st_size or 0, int(a.st_mtime or 0)
        )

    def mkdir(self, path: str, mode: int, owner: Owner) -> None:
        try:
            self.sftp.mkdir(path, mode)
        except OSError as exc:
            if self.lstat(path) is None:
                raise exc
        self.fix_dir(path, mode, owner)

    def fix_dir(self, path: str, mode: int, owner: Owner) -> None:
        # By path: SFTP has no directory handles to set attributes on.  The
        # directories are ours (made here, checked with lstat just before).
        if owner is not None:
            self.sftp.chown(path, *owner)
        self.sftp.chmod(path, mode)

    def create(self, path: str, data: bytes, mode: int, owner: Owner, mtime: int | None) -> bool:
        handle = self._open_exclusive(path, mode)
        if handle is None:
            return False
        attrs = None
        if owner is not None or mtime is not None:
            # The mode again (a umask on the server may have narrowed the
            # open's), the owner and the mtime: one request, on the handle.
            attrs = SFTPAttributes()
            attrs.st_mode = mode
            if owner is not None:
                attrs.st_uid, attrs.st_gid = owner
            if mtime is not None:
                attrs.st_atime = attrs.st_mtime = mtime
        try:
            self._fill(handle, data, attrs)
        except BaseException:
            self.remove(path)
            raise
        return True

    def _open_exclusive(self, path: str, mode: int) -> Any:
        """The new file's handle, or None if ``path`` exists.

        SFTP has no EEXIST: OpenSSH answers an exclusive open of an existing
        file with the generic SSH_FX_FAILURE (paramiko: OSError, errno None),
        so a failure is "exists" only if lstat then finds the path.  When
        another pusher removed it in between (released its lock), the open
        lost a race, not the node: it is tried again.  A failure with nothing
        there every time (read-only file system, quota) is raised.
        """
        attempt = 1
        while True:
            try:
                return self._open(path, mode)
            except OSError as exc:
                if self.lstat(path) is not None:
                    return None
                if exc.errno is not None or attempt >= _EXCL_ATTEMPTS:
                    raise  # a specific answer (no such directory, denied), or for good
            attempt += 1

    def _open(self, path: str, mode: int) -> bytes:
        """The handle of ``path``, made exclusively with ``mode`` in the request
        (paramiko's ``open`` sends no attributes: 0666 less the server's umask)."""
        attrs = SFTPAttributes()
        attrs.st_mode = mode
        kind, msg = _request(self.sftp, CMD_OPEN, path, _CREATE_EXCL, attrs)
        if kind != CMD_HANDLE:
            raise SFTPError("Expected handle")
        handle: bytes = msg.get_binary()
        return handle

    def _fill(self, handle: bytes, data: bytes, attrs: SFTPAttributes | None) -> None:
        """Write ``data``, set ``attrs``, sync and close, all on the handle.

        The requests go out together and their answers come back in order
        (the server does them one after the other): one wait instead of four.
        Every answer is checked, and the handle is closed whatever failed.
        """
        sftp: Any = self.sftp
        sent = [
            (
                CMD_WRITE,
                sftp._async_request(_NO_FILE, CMD_WRITE, handle, int64(at), data[at : at + _CHUNK]),
            )
            for at in range(0, len(data), _CHUNK)
        ]
        if attrs is not None:
            sent.append((CMD_FSETSTAT, sftp._async_request(_NO_FILE, CMD_FSETSTAT, handle, attrs)))
        if data:
            fsync = sftp._async_request(_NO_FILE, CMD_EXTENDED, "fsync@openssh.com", handle)
            sent.append((CMD_EXTENDED, fsync))
        sent.append((CMD_CLOSE, sftp._async_request(_NO_FILE, CMD_CLOSE, handle)))
        failure: BaseException | None = None
        for kind, num in sent:
            try:
                sftp._read_response(num)
            except (SFTPError, OSError) as exc:
                # fsync@openssh.com: a server without it just skips the sync
                if kind != CMD_EXTENDED and failure is None:
                    failure = exc
        if failure is not None:
            raise failure

    def rename(self, src: str, dst: str) -> None:
        self.sftp.posix_rename(src, dst)

    def remove(self, path: str) -> bool:
        try:
            self.sftp.remove(path)
        except FileNotFoundError:
            return False
        return True

    def listdir(self, path: str) -> list[str]:
        return self.sftp.listdir(path)

    def read(self, path: str, limit: int) -> bytes:
        # By path (SFTP opens follow symlinks): install_file reads only what
        # lstat found to be a regular file, in a directory only root can write.
        with self.sftp.open(path, "rb") as handle:
            data: bytes = handle.read(limit)
        return data

    def rmdir(self, path: str) -> bool:
        try:
            self.sftp.rmdir(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTEMPTY, None):
                return False  # None: SFTP's generic "failure" (not empty)
            raise
        return True


def _request(sftp: paramiko.SFTPClient, kind: int, *args: Any) -> Any:
    """One request and its answer (paramiko's own; it has no public call for these)."""
    request: Any = sftp._request  # type: ignore[attr-defined]
    return request(kind, *args)
