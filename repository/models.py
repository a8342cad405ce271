"""SQLAlchemy models of the token store (schema: see repository/migrations)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC: SQLite drops time zones."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


#: Active tokens that renewal can still extend, and those at their renew-until
#: (exp = renew_until: they run out by design).  Conditions of partial indexes,
#: which a query must repeat word for word (SQLite matches terms, not meaning).
RENEWABLE = "state = 'active' AND exp < renew_until"
AT_LIMIT = "state = 'active' AND exp >= renew_until"
#: Delivery rows a replica holds (the partial index of claimed rows).
CLAIMED = "claimed_by IS NOT NULL"
#: the longest claim name: a replica's name (host:pid) and a per-cycle suffix
CLAIM_LENGTH = 128


class Base(DeclarativeBase):
    pass


class TokenRow(Base):
    """A user's token.  ``token`` is the secret the transfer agent delivers."""

    __tablename__ = "tokens"
    __table_args__ = (
        CheckConstraint("exp <= renew_until", name="ck_tokens_exp_within_renew_until"),
        CheckConstraint("iat <= exp", name="ck_tokens_iat_before_exp"),
        CheckConstraint("lifetime > 0", name="ck_tokens_lifetime_positive"),
        CheckConstraint("state IN ('active', 'expired', 'revoked')", name="ck_tokens_state"),
        Index("ix_tokens_user_state", "user", "state"),
        Index("ix_tokens_state_next_check", "state", "next_check"),
        # tokenlife status and the metrics scrape (repository/status.py)
        Index("ix_tokens_state_renew_until", "state", "renew_until"),
        Index(
            "ix_tokens_renewable_exp",
            "exp",
            sqlite_where=text(RENEWABLE),
            postgresql_where=text(RENEWABLE),
        ),
        Index(
            "ix_tokens_at_limit_exp",
            "exp",
            sqlite_where=text(AT_LIMIT),
            postgresql_where=text(AT_LIMIT),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_id: Mapped[str] = mapped_column(String(32), unique=True)
    user: Mapped[str] = mapped_column(String(32))
    uid: Mapped[int] = mapped_column(BigInteger)
    gid: Mapped[int] = mapped_column(BigInteger)
    first_issued: Mapped[datetime] = mapped_column(UTCDateTime)
    iat: Mapped[datetime] = mapped_column(UTCDateTime)
    exp: Mapped[datetime] = mapped_column(UTCDateTime)
    renew_until: Mapped[datetime] = mapped_column(UTCDateTime)
    lifetime: Mapped[int] = mapped_column(Integer)
    key_id: Mapped[str] = mapped_column(String(64), default="")
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), default="active")
    token: Mapped[str] = mapped_column(Text)
    # Renewal bookkeeping lives here, not in memory, so restarts and other
    # replicas agree: when to look at the token next, and how it failed.
    next_check: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")


class TokenCountRow(Base):
    """Tokens per state, kept by the database: what ``tokenlife status`` reads.

    Not one row per state but rows to add up: the triggers of migration 0005
    append ``(state, +1)`` or ``(state, -1)`` for each token that enters or
    leaves a state, in the transaction that moves it, and repository/counts.py
    folds them into one row per state now and then.  The tokens of a state
    are the sum of its rows.
    """

    __tablename__ = "token_counts"

    # 64 bits on PostgreSQL: every append takes an id; SQLite's INTEGER key
    # is 64 bits already (and BIGINT would not be its rowid).
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    state: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(BigInteger)


class EventCountRow(Base):
    """Audit events per kind and 10 minutes (``bucket``: epoch seconds // 600), kept
    by the database like TokenCountRow: rows to add up, appended by the triggers
    of migration 0005 on ``events``, folded by repository/counts.py."""

    __tablename__ = "event_counts"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    bucket: Mapped[int] = mapped_column(BigInteger)
    event: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(BigInteger)


class EventRow(Base):
    """Audit trail: what happened to which token, by whom, why.  Never the token.

    ``token_id`` is deliberately no foreign key: the trail outlives purged tokens.
    """

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_token_id", "token_id"),
        Index("ix_events_at", "at"),
        Index("ix_events_event_at", "event", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    event: Mapped[str] = mapped_column(String(16))
    user: Mapped[str] = mapped_column(String(32))
    token_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")


class DeliveryRow(Base):
    """Which token version a worker node holds for a user, and what is owed.

    One row per (user, node) while the user has work there (``last_seen`` is
    when a job source last said so); ``removing`` once the work is gone or
    the token was revoked, until the node's file is deleted and the row with it.
    ``claimed_by``/``claimed_until``: the delivery replica working on the row
    and the end of its lease (repository/delivery_store.py); NULL when free.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("user", "node", name="uq_deliveries_user_node"),
        CheckConstraint(
            "status IN ('pending', 'delivered', 'failed', 'removing')",
            name="ck_deliveries_status",
        ),
        CheckConstraint("attempts >= 0", name="ck_deliveries_attempts"),
        CheckConstraint("version >= 0", name="ck_deliveries_version"),
        Index("ix_deliveries_next_attempt", "next_attempt"),
        Index("ix_deliveries_node", "node"),
        Index("ix_deliveries_status_node", "status", "node"),
        # The rows a replica holds (recording, extending, releasing its claims):
        # only claimed rows are in it, so it stays small and costs a lone
        # replica little (migration 0006).
        Index(
            "ix_deliveries_claimed_by",
            "claimed_by",
            sqlite_where=text(CLAIMED),
            postgresql_where=text(CLAIMED),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(32))
    uid: Mapped[int] = mapped_column(BigInteger)
    node: Mapped[str] = mapped_column(String(255))
    #: the token id and version the node holds ("" and 0: nothing yet)
    token_id: Mapped[str] = mapped_column(String(32), default="")
    version: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    next_attempt: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    updated: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(CLAIM_LENGTH), nullable=True)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
