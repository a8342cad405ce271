"""The login node's copy of a user's token: <token_dir>/<uid>/slurm_jwt."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tokenlife.fsutil import ensure_dir, ensure_private_dir, write_secret
from tokenlife.layout import FILE_NAME
from tokenlife.records import TokenRecord


def token_path(token_dir: Path, uid: int) -> Path:
    return token_dir / str(uid) / FILE_NAME


def write_login_token(token_dir: Path, record: TokenRecord) -> Path:
    """Write the token (no trailing newline: Slurm rejects one) owned by its user."""
    ensure_dir(token_dir, 0o755)
    user_dir = token_dir / str(record.uid)
    ensure_private_dir(user_dir, record.uid, record.gid, 0o700)
    path = user_dir / FILE_NAME
    data = record.token.encode("ascii")
    if not _already_there(path, data, record):
        write_secret(path, data, record.uid, record.gid, 0o600)
    return path


def _already_there(path: Path, data: bytes, record: TokenRecord) -> bool:
    """True if ``path`` is a regular file with exactly this token, owner and mode.

    A login that reuses its token then costs no write and no fsync.
    """
    # The user owns the directory: whatever is at ``path`` may be a symlink
    # or a FIFO put there to hang us (and every login behind us): never follow,
    # never block; only a regular file is read.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o600:
            return False
        if (st.st_uid, st.st_gid) != (record.uid, record.gid) or st.st_size != len(data):
            return False
        return os.read(fd, len(data) + 1) == data
    finally:
        os.close(fd)
