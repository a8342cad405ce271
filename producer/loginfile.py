"""The login node's copy of a user's token: <token_dir>/<uid>/slurm_jwt.

Several writers keep it: the mint service and the PAM fallback at login, the
renewal sink after each renewal.  Like delivery to the nodes, none of them
ever puts an older token over a newer one: a login that reuses the spool's
older version of a token renewed meanwhile leaves the renewed file alone.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

from tokenlife.fsutil import ensure_dir, ensure_private_dir, write_secret
from tokenlife.layout import FILE_NAME
from tokenlife.records import TokenRecord
from tokenlife.slurm_jwt import MAX_TOKEN, read_claims

log = logging.getLogger(__name__)

#: one lock per uid: the daemon's mint and renewal threads never interleave
#: their check and write on one file, and never wait on another user's
_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


def token_path(token_dir: Path, uid: int) -> Path:
    return token_dir / str(uid) / FILE_NAME


def write_login_token(token_dir: Path, record: TokenRecord) -> Path:
    """Write the token (no trailing newline: Slurm rejects one) owned by its user,
    unless the file already holds it or a newer token of the user (later iat)."""
    ensure_dir(token_dir, 0o755)
    user_dir = token_dir / str(record.uid)
    ensure_private_dir(user_dir, record.uid, record.gid, 0o700)
    path = user_dir / FILE_NAME
    data = record.token.encode("ascii")
    with _lock(record.uid):
        held = _held(path, record)
        if held is not None:
            content, tidy = held
            if content == data and tidy:
                return path  # a login reusing its token costs no write and no fsync
            if _newer(content, record):
                log.info("%s already holds a newer token of %s: left in place", path, record.user)
                return path
        write_secret(path, data, record.uid, record.gid, 0o600)
    return path


def _lock(uid: int) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


def _held(path: Path, record: TokenRecord) -> tuple[bytes, bool] | None:
    """What the regular file at ``path`` holds, and whether its owner and mode
    are already the record's; None if there is no regular file of a token's size.
    """
    # The user owns the directory: whatever is at ``path`` may be a symlink
    # or a FIFO put there to hang us (and every login behind us): never follow,
    # never block; only a regular file is read.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_TOKEN:
            return None
        tidy = stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (
            record.uid,
            record.gid,
        )
        return os.read(fd, MAX_TOKEN + 1), tidy
    except OSError:
        return None
    finally:
        os.close(fd)


def _newer(content: bytes, record: TokenRecord) -> bool:
    """Whether ``content`` is a token of the record's user issued after it.

    The signature is not checked: only the user (or root) can put a file in
    the user's directory, so a forged "newer" token only keeps its own
    maker's file from being refreshed.
    """
    try:
        claims = read_claims(content.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    iat = claims.get("iat")
    subject = claims.get("sun") or claims.get("username")
    return type(iat) is int and subject == record.user and iat > record.iat
