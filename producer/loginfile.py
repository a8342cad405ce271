"""The login node's copy of a user's token: <token_dir>/<uid>/slurm_jwt."""

from __future__ import annotations

from pathlib import Path

from tokenlife.fsutil import ensure_dir, ensure_private_dir, write_secret
from tokenlife.model import TokenRecord

FILE_NAME = "slurm_jwt"


def token_path(token_dir: Path, uid: int) -> Path:
    return token_dir / str(uid) / FILE_NAME


def write_login_token(token_dir: Path, record: TokenRecord) -> Path:
    """Write the token (no trailing newline: Slurm rejects one) owned by its user."""
    ensure_dir(token_dir, 0o755)
    user_dir = token_dir / str(record.uid)
    ensure_private_dir(user_dir, record.uid, record.gid, 0o700)
    path = user_dir / FILE_NAME
    write_secret(path, record.token.encode("ascii"), record.uid, record.gid, 0o600)
    return path
