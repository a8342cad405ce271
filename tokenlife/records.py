"""Plain frozen records passed between the parts (never ORM objects).

One place for each shape: a stored token, what a node holds, the file a
node receives, a renewal's outcome, a delivery owed and its result.  The
store's row conversions (repository/rows.py) and the spool's JSON are built
from the field lists here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
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
        """Everything but the token (and the store's attempt count), for --json and logs."""
        return {name: getattr(self, name) for name in PUBLIC_FIELDS}

    def to_spool(self) -> dict[str, Any]:
        return {**self.public(), "token": self.token}

    @classmethod
    def from_spool(cls, data: dict[str, Any]) -> TokenRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


#: TokenRecord's fields shown to people and written to JSON: all but attempts and token
PUBLIC_FIELDS = tuple(f.name for f in fields(TokenRecord) if f.name not in ("attempts", "token"))


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


@dataclass(frozen=True)
class TokenFile:
    """What a node receives: one user's token, and how to tell newer from older."""

    user: str
    uid: int
    gid: int
    token_id: str
    version: int
    iat: int
    exp: int
    token: str = field(repr=False)
    #: the pusher knows the node holds another token (its delivery record says
    #: so): a file there with this token's iat and size may be that other one
    #: (a new login and a renewal in the same second), so it is rewritten
    node_holds_other: bool = False

    @classmethod
    def of(cls, record: TokenRecord, node_holds_other: bool = False) -> TokenFile:
        return cls(
            record.user,
            record.uid,
            record.gid,
            record.token_id,
            record.version,
            record.iat,
            record.exp,
            record.token,
            node_holds_other,
        )

    def data(self) -> bytes:
        # No trailing newline: Slurm rejects a token with one.
        return self.token.encode("ascii")

    @property
    def order(self) -> int:
        """What orders a user's tokens on a node: every renewal, rotation or
        new login has a later ``iat``.  The node file's mtime carries it."""
        return self.iat


@dataclass(frozen=True)
class ServiceFile:
    """What a service account's host receives (``[[service]]``): its token at
    ``path``, owned by ``owner``:``group`` with ``mode``."""

    path: str
    owner: int
    group: int
    mode: int
    token: TokenFile


# -- what happens to a token in a renewal run: the policy decides, the store records --------


@dataclass(frozen=True, slots=True)
class Renewed:
    token: str = field(repr=False)
    iat: int
    exp: int
    next_check: int
    key_id: str
    event: str = "renewed"  # or "rotated"


@dataclass(frozen=True, slots=True)
class Waiting:
    """Not due: look again at ``until``."""

    until: int


@dataclass(frozen=True, slots=True)
class Expired:
    """Ends here (past renew-until, revoked, the user changed): no renewal."""

    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    error: str
    retry_at: int


Outcome = Renewed | Waiting | Expired | Failed


# -- what a delivery cycle owes a node, and what came of it -----------------------------------


@dataclass(frozen=True)
class DeliveryTask:
    """One thing owed to one node: the user's current token, or a removal (token None)."""

    delivery: DeliveryRecord
    token: TokenRecord | None


@dataclass(frozen=True)
class DeliveryResult:
    user: str
    node: str
    ok: bool
    #: what the node now holds (ok put), or None for a removal
    token_id: str = ""
    version: int = 0
    removed: bool = False
    error: str = ""
    retry_at: int = 0
    outcome: str = ""  # the transport's word for a put (installed, unchanged, ...)


#: before every record in DeliveryLedger.claim's walk (no node name is empty)
CLAIM_START: tuple[str, int] = ("", 0)


@dataclass(frozen=True)
class DeliveryClaim:
    """Deliveries one replica claimed in one go: no other replica works on them
    until the claim's lease ends or the replica records or releases them."""

    tasks: list[DeliveryTask]
    #: where the walk over the records (by node, then id) stopped: the cycle's
    #: next claim starts after it
    after: tuple[str, int]
    #: the batch was full: more may be owed
    more: bool
