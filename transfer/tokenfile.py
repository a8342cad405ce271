"""What a node receives: one user's token, and how to tell newer from older."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenlife.layout import FILE_NAME
from tokenlife.model import TokenRecord

__all__ = ["FILE_NAME", "TokenFile"]


@dataclass(frozen=True)
class TokenFile:
    user: str
    uid: int
    gid: int
    token_id: str
    version: int
    iat: int
    exp: int
    token: str = field(repr=False)

    @classmethod
    def of(cls, record: TokenRecord) -> TokenFile:
        return cls(
            user=record.user,
            uid=record.uid,
            gid=record.gid,
            token_id=record.token_id,
            version=record.version,
            iat=record.iat,
            exp=record.exp,
            token=record.token,
        )

    def data(self) -> bytes:
        # No trailing newline: Slurm rejects a token with one.
        return self.token.encode("ascii")

    @property
    def order(self) -> int:
        """What orders a user's tokens on a node: every renewal, rotation or
        new login has a later ``iat``.  The node file's mtime carries it."""
        return self.iat
