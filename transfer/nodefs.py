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

``install_file`` is the same protocol for a service account's token at a
path of the administrator's choosing (``[[service]]``): the temporary file
and the lock are in the file's own directory, which must be root's and
not writable by anyone else, and what is newer is read from the tokens
themselves (their ``iat``, ``exp`` and version), not from the file's mtime.
"""

from __future__ import annotations

import logging
import secrets
import stat
import time
from collections.abc import Callable

from tokenlife.errors import TransportError
from tokenlife.interfaces import FileInfo, NodeFS, Owner
from tokenlife.layout import FILE_NAME
from tokenlife.records import ServiceFile, TokenFile
from tokenlife.slurm_jwt import MAX_TOKEN
from tokenlife.tokenview import TokenView

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


def install(fs: NodeFS, base: str, tf: TokenFile, seen: set[str] | None = None) -> str:
    """Put ``tf`` at <base>/<uid>/slurm_jwt unless a newer token is there.

    Returns INSTALLED, UNCHANGED (this very token is there) or NEWER_THERE.
    Raises OSError or TransportError; nothing half-written stays behind.

    ``seen``: what this caller already checked over the same connection to
    the node, kept by it across calls (the SSH pool keeps one per
    connection): the base directory, the user's directory, and the look for
    a killed pusher's temporary files, each done once per connection rather
    than at every install (6 of an install's 17 SFTP requests).  Only root can change
    the base directory or take the user's directory away (``remove`` here
    forgets it); a pusher that dies takes its connection with it, so the
    next connection sweeps.  Any failure forgets everything seen.
    """
    known = seen if seen is not None else set()
    trusted = bool(known)
    try:
        return _install(fs, base, tf, known)
    except OSError:
        known.clear()  # whatever went wrong, check everything again
        if not trusted:
            raise
        # Something taken for granted may be what failed (root on the node
        # removed the user's directory): once more, checking everything.
        return _install(fs, base, tf, known)
    except BaseException:
        known.clear()
        raise


def _install(fs: NodeFS, base: str, tf: TokenFile, seen: set[str]) -> str:
    _ensure_dirs(fs, base, tf.uid, tf.gid, seen)
    target = file_path(base, tf.uid)
    current = fs.lstat(target)
    if _same(current, tf) or (current is not None and current.mtime > tf.order):
        # Owed but already there: what a crash between the install and its
        # record leaves, so this is where a killed pusher's temp files go too.
        assert current is not None
        _sweep(fs, user_dir(base, tf.uid), older_than=current.mtime)
        return UNCHANGED if _same(current, tf) else NEWER_THERE
    temp = _create_temp(fs, user_dir(base, tf.uid), FILE_NAME, tf, 0o600, (tf.uid, tf.gid))
    renamed = False
    try:
        with _Lock(fs, _join(base, f".lock.{tf.uid}")):
            current = fs.lstat(target)  # again, now that nobody else can change it
            if current is not None and current.is_file and current.mtime > tf.order:
                return NEWER_THERE
            if _same(current, tf):
                return UNCHANGED  # another pusher put this very token there meanwhile
            fs.rename(temp, target)
            renamed = True
            if f"swept {user_dir(base, tf.uid)}" not in seen:
                _sweep(fs, user_dir(base, tf.uid), older_than=tf.order)
                seen.add(f"swept {user_dir(base, tf.uid)}")
            return INSTALLED
    finally:
        if not renamed:
            fs.remove(temp)


def _create_temp(
    fs: NodeFS, directory: str, name: str, tf: TokenFile, mode: int, owner: Owner
) -> str:
    """A new temporary file holding ``tf``; a name that exists is never reused."""
    for _ in range(TEMP_ATTEMPTS):
        # The token's iat in the name: a sweep can tell, without a race with
        # the file's own mtime (set only after it is written), whose it is.
        temp = _join(directory, f".{name}.{tf.order}.{secrets.token_hex(6)}.tmp")
        if fs.create(temp, tf.data(), mode, owner, tf.order):
            return temp
        log.warning("temporary file %s exists; trying another name", temp)
    raise TransportError(f"temporary files in {directory} keep existing")


def remove(fs: NodeFS, base: str, uid: int, seen: set[str] | None = None) -> bool:
    """Delete the user's token file (and directory, if empty); True if one was there.

    ``seen``: as for ``install``, which must check the user's directory again.
    """
    if seen is not None:
        seen.discard(f"dir {user_dir(base, uid)}")
    if fs.lstat(user_dir(base, uid)) is None:
        return False
    with _Lock(fs, _join(base, f".lock.{uid}")):
        removed = fs.remove(file_path(base, uid))
        _sweep(fs, user_dir(base, uid), older_than=None)
    fs.rmdir(user_dir(base, uid))  # fails harmlessly if the user left files there
    return removed


def _sweep(fs: NodeFS, directory: str, older_than: int | None, name: str = FILE_NAME) -> None:
    """Delete temporary files a killed pusher left (each a whole token).

    Those of the token on the node or an older one (the iat is in their
    name): a pusher still busy with one of those finds, under the lock, this
    token or a newer one there and does not rename, so no lock is needed;
    one with a newer token keeps its file.  On removal, all of them (under
    the lock).
    """
    prefix = f".{name}."
    try:
        names = fs.listdir(directory)
    except OSError:
        return
    for entry in names:
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        iat, _, _ = entry[len(prefix) : -len(".tmp")].partition(".")
        old = iat.isascii() and iat.isdigit() and older_than is not None and int(iat) <= older_than
        if older_than is not None and not old:
            continue
        path = _join(directory, entry)
        log.info("removing %s, left by a pusher that died", path)
        try:
            fs.remove(path)
        except OSError as exc:  # the user's directory: whatever is there, never fail for it
            log.warning("cannot remove %s: %s", path, exc.strerror or exc)


def _same(current: FileInfo | None, tf: TokenFile) -> bool:
    """The file already holds this token: same iat, size, owner and mode (and
    the pusher does not know it to hold another one)."""
    return (
        not tf.node_holds_other
        and current is not None
        and current.is_file
        and current.mtime == tf.order
        and current.size == len(tf.data())
        and (current.uid, current.gid) == (tf.uid, tf.gid)
        and stat.S_IMODE(current.mode) == 0o600
    )


# -- a service account's token at a path of its own ([[service]]) ---------------------------


def install_file(fs: NodeFS, sf: ServiceFile, read: Callable[[str], TokenView]) -> str:
    """Put ``sf``'s token at ``sf.path`` unless a newer one of the same user is there.

    ``read`` is the token kind's reader (TokenKind.read).  Returns INSTALLED,
    UNCHANGED (this very token is there, with the owner, group and mode
    asked for) or NEWER_THERE.  The directory must exist, be a directory
    (not a symlink to one) owned by root (or the delivering account) and
    writable by nobody else; whatever is at the path that is not a
    directory (a symlink, an older token, garbage) is replaced by the rename,
    never followed.  Raises OSError or TransportError; nothing half-written
    stays behind.
    """
    directory, _, name = sf.path.rpartition("/")
    directory = directory or "/"
    info = fs.lstat(directory)
    if info is None:
        raise TransportError(f"{directory} does not exist")
    if not info.is_dir:
        raise TransportError(f"{directory} is not a directory")
    if info.uid not in (0, fs.own_uid) or stat.S_IMODE(info.mode) & 0o022:
        # The temporary file and the lock go there: nobody else may swap them.
        raise TransportError(f"{directory} must be owned by root and not group/world-writable")
    tf = sf.token
    outcome = _against(fs, sf, read)
    if outcome is not None:
        _sweep(fs, directory, tf.order, name)
        return outcome
    temp = _create_temp(fs, directory, name, tf, sf.mode, (sf.owner, sf.group))
    renamed = False
    try:
        with _Lock(fs, _join(directory, f".{name}.lock")):
            outcome = _against(fs, sf, read)  # again, now that no other pusher can change it
            if outcome is not None:
                return outcome
            fs.rename(temp, sf.path)
            renamed = True
            _sweep(fs, directory, tf.order, name)
            return INSTALLED
    finally:
        if not renamed:
            fs.remove(temp)


def _against(fs: NodeFS, sf: ServiceFile, read: Callable[[str], TokenView]) -> str | None:
    """UNCHANGED or NEWER_THERE if the file at ``sf.path`` makes writing pointless; None
    if it is to be (re)written: absent, not a regular file, not a token of this user,
    older, expired when ours was issued, or this token with another owner or mode."""
    current = fs.lstat(sf.path)
    if current is None:
        return None
    if current.is_dir:
        raise TransportError(f"{sf.path} is a directory")
    if not current.is_file or current.size > MAX_TOKEN:
        return None
    data = fs.read(sf.path, MAX_TOKEN)
    try:
        there = read(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    tf = sf.token
    if there.subject != tf.user or there.exp <= tf.iat:
        return None
    ours = (tf.iat, tf.exp, tf.version)
    theirs = (there.iat, there.exp, there.version or 0)
    if theirs > ours:
        return NEWER_THERE
    if theirs < ours or data != tf.data():
        return None
    same = (current.uid, current.gid, stat.S_IMODE(current.mode)) == (sf.owner, sf.group, sf.mode)
    return UNCHANGED if same else None


def _ensure_dirs(fs: NodeFS, base: str, uid: int, gid: int, seen: set[str]) -> None:
    if f"base {base}" not in seen:
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
        seen.add(f"base {base}")
    path = user_dir(base, uid)
    if f"dir {path}" in seen:
        return
    info = fs.lstat(path)
    if info is None:
        fs.mkdir(path, 0o700, (uid, gid))
    elif not info.is_dir:
        raise TransportError(f"{path} is not a directory")
    elif (info.uid, info.gid, stat.S_IMODE(info.mode)) != (uid, gid, 0o700):
        fs.fix_dir(path, 0o700, (uid, gid))
    seen.add(f"dir {path}")


class _Lock:
    """A lock file (<base>/.lock.<uid>, <dir>/.<name>.lock) in a directory only the
    pusher can write, created exclusively; broken when older than LOCK_STALE."""

    def __init__(self, fs: NodeFS, path: str) -> None:
        self.fs = fs
        self.path = path

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
