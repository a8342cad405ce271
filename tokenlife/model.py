"""Plain frozen records passed between the parts (never ORM objects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ACTIVE, EXPIRED, REVOKED = "active", "expired", "revoked"


@dataclass(frozen=True)
class TokenRecord:
    """One user's current token and its Kerberos-style limits (epoch seconds).

    ``token`` is the secret: it is left out of repr/str so a record can be
    logged or shown in a traceback without leaking it.
    """

    token_id: str
    user: str
    uid: int
    gid: int
    first_issued: int
    iat: int
    exp: int
    renew_until: int
    lifetime: int
    key_id: str = ""
    version: int = 1
    state: str = ACTIVE
    #: failed renewal attempts since the last success (the store keeps it)
    attempts: int = field(default=0, compare=False)
    token: str = field(default="", repr=False, compare=False)

    def public(self) -> dict[str, Any]:
        """Everything but the token, for --json output and logs."""
        return {
            "token_id": self.token_id,
            "user": self.user,
            "uid": self.uid,
            "gid": self.gid,
            "first_issued": self.first_issued,
            "iat": self.iat,
            "exp": self.exp,
            "renew_until": self.renew_until,
            "lifetime": self.lifetime,
            "key_id": self.key_id,
            "version": self.version,
            "state": self.state,
        }

    def to_spool(self) -> dict[str, Any]:
        return {**self.public(), "token": self.token}

    @classmethod
    def from_spool(cls, data: dict[str, Any]) -> TokenRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class DeliveryRecord:
    """What one worker node holds of a user's token, and what is owed to it."""

    user: str
    uid: int
    node: str
    token_id: str  # "" until the first delivery
    version: int  # 0 until the first delivery
    status: str  # pending, delivered, failed, removing
    attempts: int
    last_error: str
    next_attempt: int
    last_seen: int
    updated: int

    def public(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def holds(self, record: TokenRecord) -> bool:
        """Whether the node has exactly this token version."""
        return self.token_id == record.token_id and self.version == record.version
