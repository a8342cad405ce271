"""Watching ``<token_dir>/<uid>/`` for deliveries: Linux inotify through ctypes.

Standard library only (``tokenlife-engine run`` must stay small and idle).
:func:`DeliveryWatch.open` returns None where inotify is missing or its
per-user limit (fs.inotify.max_user_instances, 128 by default) is used up;
the supervisor then polls the file instead.

What is watched: the user's directory, for the delivered file and the job's
copy (transfer replaces the file by renaming a temporary one over it:
IN_MOVED_TO).  While that directory does not exist (nothing delivered yet,
or the job's user dir was removed), ``token_dir`` is watched for its
creation instead; when neither exists nothing is watched (``active`` is
False) and :meth:`DeliveryWatch.arm` is tried again on every poll.
"""

from __future__ import annotations

import ctypes
import os
import struct

from client_engine.tokens import user_dir

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = 0o2000000

#: the user's directory: the delivered file and the copy, and the dir itself going away
USER_MASK = (
    IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)
#: token_dir, while the user's directory is missing: its creation
TOP_MASK = IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
_GONE = IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF
#: struct inotify_event without its name: wd, mask, cookie, len
_EVENT = struct.Struct("=iIII")

_libc: ctypes.CDLL | None = None
_libc_loaded = False


def libc() -> ctypes.CDLL | None:
    """The C library (for inotify, signalfd, prctl), or None where it cannot be loaded."""
    global _libc, _libc_loaded
    if not _libc_loaded:
        _libc_loaded = True
        for name in ("libc.so.6", None):
            try:
                _libc = ctypes.CDLL(name, use_errno=True)
            except OSError:
                continue
            break
    return _libc


class DeliveryWatch:
    """An inotify descriptor watching for a new delivery to one user's directory."""

    def __init__(self, lib: ctypes.CDLL, fd: int, token_dir: str, uid: int, names: list[str]):
        self._lib = lib
        self.fd = fd
        self._top = os.fsencode(token_dir.rstrip("/") or "/")
        self._dir = os.fsencode(user_dir(token_dir, uid))
        self._dir_name = str(uid).encode()
        self._names = frozenset(os.fsencode(name) for name in names)
        self._wd_dir = -1
        self._wd_top = -1
        self.arm()

    @classmethod
    def open(cls, token_dir: str, uid: int, names: list[str]) -> DeliveryWatch | None:
        """Watch for changes to ``names`` in the user's directory; None without inotify."""
        lib = libc()
        if lib is None or not hasattr(lib, "inotify_init1"):
            return None
        fd = int(lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            return None
        return cls(lib, fd, token_dir, uid, names)

    @property
    def active(self) -> bool:
        """Something is watched (else the caller polls, and calls arm() again)."""
        return self._wd_dir >= 0 or self._wd_top >= 0

    def _add(self, path: bytes, mask: int) -> int:
        return int(self._lib.inotify_add_watch(self.fd, path, ctypes.c_uint32(mask)))

    def _remove(self, wd: int) -> None:
        if wd >= 0:
            self._lib.inotify_rm_watch(self.fd, wd)  # its IN_IGNORED is skipped in drain

    def arm(self) -> None:
        """Watch the user's directory, or token_dir until that directory exists."""
        if self._wd_dir >= 0:
            return
        if self._wd_top < 0:
            # First, so that a creation between the two calls is not missed.
            self._wd_top = self._add(self._top, TOP_MASK)
        self._wd_dir = self._add(self._dir, USER_MASK)
        if self._wd_dir >= 0 and self._wd_top >= 0:
            self._remove(self._wd_top)  # token_dir changes with every job start: not wanted
            self._wd_top = -1

    def drain(self) -> bool:
        """Read the pending events; True if the delivered file or the copy may have changed."""
        changed = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = data[start : start + length].rstrip(b"\0")
                offset = start + length
                changed |= self._event(wd, mask, name)
        if self._wd_dir < 0:
            self.arm()
        return changed

    def _event(self, wd: int, mask: int, name: bytes) -> bool:
        if mask & IN_Q_OVERFLOW:
            return True
        if wd == self._wd_dir and wd >= 0:
            if mask & _GONE:  # the user's directory was removed or renamed away
                if mask & IN_MOVE_SELF:
                    self._remove(wd)
                self._wd_dir = -1
                return True
            return name in self._names
        if wd == self._wd_top and wd >= 0:
            if mask & _GONE:
                if mask & IN_MOVE_SELF:
                    self._remove(wd)
                self._wd_top = -1
                return True
            return name == self._dir_name
        return False  # a watch removed earlier

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
