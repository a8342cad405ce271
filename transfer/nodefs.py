"""Installing a token file on a node, written once for every transport.

A transport only supplies file operations (``NodeFS``: the local file system,
or SFTP on a remote node); the protocol that makes a delivery safe is here:

* the file is written under a temporary name in the user's directory,
  created exclusively with mode 0600, handed to the user through the open
  handle (never a path a user could swap for a symlink), then renamed over
  the old one: readers see the old token or the new one, never a mix, and
  there is no moment when anyone else can read it;
* the token's ``iat`` is stored as the file's mtime, and the rename happens
  only under a per-user lock in the root-owned base directory and only if
  the file there is older: two pushers, or a slow retry arriving late,
  never put an older token over a newer one.
"""

from __future__ import annotations

import logging
import secrets
import stat
import time

from tokenlife.errors import TransportError
from tokenlife.interfaces import FileInfo, NodeFS
from tokenlife.layout import FILE_NAME
from tokenlife.records import TokenFile

log = logging.getLogger(__name__)

#: a lock older than this was left by a pusher that died: break it
LOCK_STALE = 60.0
#: how long to wait for another pusher's lock
LOCK_WAIT = 10.0
#: fresh temporary names tried when one exists (it never should: they are random)
TEMP_ATTEMPTS = 3

INSTALLED, UNCHANGED, NEWER_THERE = "installed", "unchanged", "newer-there"


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def user_dir(base: str, uid: int) -> str:
    return _join(base, str(uid))


def file_path(base: str, uid: int) -> str:
    return _join(base, str(uid), FILE_NAME)


def install(fs: NodeFS, base: str, tf: TokenFile) -> str:
    """Put ``tf`` at <base>/<uid>/slurm_jwt unless a newer token is there.

    Returns INSTALLED, UNCHANGED (this very token is there) or NEWER_THERE.
    Raises OSError or TransportError; nothing half-written stays behind.
    """
    _ensure_dirs(fs, base, tf.uid, tf.gid)
    target = file_path(base, tf.uid)
    current = fs.lstat(target)
    if _same(current, tf) or (current is not None and current.mtime > tf.order):
        # Owed but already there: what a crash between the install and its
        # record leaves, so this is where a killed pusher's temp files go too.
        assert current is not None
        _sweep(fs, user_dir(base, tf.uid), older_than=current.mtime)
        return UNCHANGED if _same(current, tf) else NEWER_THERE
    temp = _create_temp(fs, base, tf)
    renamed = False
    try:
        with _Lock(fs, base, tf.uid):
            current = fs.lstat(target)  # again, now that nobody else can change it
            if current is not None and current.is_file and current.mtime > tf.order:
                return NEWER_THERE
            if _same(current, tf):
                return UNCHANGED  # another pusher put this very token there meanwhile
            fs.rename(temp, target)
            renamed = True
            _sweep(fs, user_dir(base, tf.uid), older_than=tf.order)
            return INSTALLED
    finally:
        if not renamed:
            fs.remove(temp)


def _create_temp(fs: NodeFS, base: str, tf: TokenFile) -> str:
    """A new temporary file holding ``tf``; a name that exists is never reused."""
    for _ in range(TEMP_ATTEMPTS):
        # The token's iat in the name: a sweep can tell, without a race with
        # the file's own mtime (set only after it is written), whose it is.
        name = f".{FILE_NAME}.{tf.order}.{secrets.token_hex(6)}.tmp"
        temp = _join(user_dir(base, tf.uid), name)
        if fs.create(temp, tf.data(), 0o600, (tf.uid, tf.gid), tf.order):
            return temp
        log.warning("temporary file %s exists; trying another name", temp)
    raise TransportError(f"temporary files in {user_dir(base, tf.uid)} keep existing")


def remove(fs: NodeFS, base: str, uid: int) -> bool:
    """Delete the user's token file (and directory, if empty); True if one was there."""
    if fs.lstat(user_dir(base, uid)) is None:
        return False
    with _Lock(fs, base, uid):
        removed = fs.remove(file_path(base, uid))
        _sweep(fs, user_dir(base, uid), older_than=None)
    fs.rmdir(user_dir(base, uid))  # fails harmlessly if the user left files there
    return removed


def _sweep(fs: NodeFS, directory: str, older_than: int | None) -> None:
    """Delete temporary files a killed pusher left (each a whole token).

    Those of the token on the node or an older one (the iat is in their
    name): a pusher still busy with one of those finds, under the lock, this
    token or a newer one there and does not rename, so no lock is needed;
    one with a newer token keeps its file.  On removal, all of them (under
    the lock).
    """
    prefix = f".{FILE_NAME}."
    try:
        names = fs.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        iat, _, _ = name[len(prefix) : -len(".tmp")].partition(".")
        old = iat.isascii() and iat.isdigit() and older_than is not None and int(iat) <= older_than
        if older_than is not None and not old:
            continue
        path = _join(directory, name)
        log.info("removing %s, left by a pusher that died", path)
        try:
            fs.remove(path)
        except OSError as exc:  # the user's directory: whatever is there, never fail for it
            log.warning("cannot remove %s: %s", path, exc.strerror or exc)


def _same(current: FileInfo | None, tf: TokenFile) -> bool:
    """The file already holds this token: same iat, size, owner and mode."""
    return (
        current is not None
        and current.is_file
        and current.mtime == tf.order
        and current.size == len(tf.data())
        and (current.uid, current.gid) == (tf.uid, tf.gid)
        and stat.S_IMODE(current.mode) == 0o600
    )


def _ensure_dirs(fs: NodeFS, base: str, uid: int, gid: int) -> None:
    info = fs.lstat(base)
    if info is None:
        fs.mkdir(base, 0o755, None)
    elif not info.is_dir:
        raise TransportError(f"{base} is not a directory")
    elif info.uid != fs.own_uid or stat.S_IMODE(info.mode) & 0o022:
        # The per-user locks live here: users must not be able to touch them.
        raise TransportError(
            f"{base} must be owned by uid {fs.own_uid} and not group/world-writable"
        )
    path = user_dir(base, uid)
    info = fs.lstat(path)
    if info is None:
        fs.mkdir(path, 0o700, (uid, gid))
    elif not info.is_dir:
        raise TransportError(f"{path} is not a directory")
    elif (info.uid, info.gid, stat.S_IMODE(info.mode)) != (uid, gid, 0o700):
        fs.fix_dir(path, 0o700, (uid, gid))


class _Lock:
    """<base>/.lock.<uid>, created exclusively; broken when older than LOCK_STALE."""

    def __init__(self, fs: NodeFS, base: str, uid: int) -> None:
        self.fs = fs
        self.path = _join(base, f".lock.{uid}")

    def __enter__(self) -> None:
        deadline = time.monotonic() + LOCK_WAIT
        delay = 0.005
        while not self.fs.create(self.path, b"", 0o600, None, None):
            held = self.fs.lstat(self.path)
            if held is not None and time.time() - held.mtime > LOCK_STALE:
                log.warning("breaking stale lock %s", self.path)
                self.fs.remove(self.path)
                continue
            if time.monotonic() > deadline:
                raise TransportError(f"{self.path} is held by another pusher")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def __exit__(self, *exc: object) -> None:
        self.fs.remove(self.path)
