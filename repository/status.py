"""A snapshot of the store for ``tokenlife status`` and the metrics endpoint.

Everything is counted by the database (GROUP BY, ORDER BY ... LIMIT 1): a
snapshot costs a handful of statements in one read-only transaction, however
many tokens are stored, and never reads a token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Boolean, ColumnElement, func, literal_column, select
from sqlalchemy.orm import Session

from repository.delivery_store import DELIVERED, FAILED, PENDING, REMOVING
from repository.models import DeliveryRow, EventRow, TokenRow
from repository.rows import to_dt, to_epoch
from tokenlife.interfaces import Repository
from tokenlife.records import ACTIVE, EXPIRED, REVOKED

#: how far back ``events`` counts
WINDOW = 86400
TOKEN_STATES = (ACTIVE, EXPIRED, REVOKED)
DELIVERY_STATES = (DELIVERED, PENDING, FAILED, REMOVING)
#: the delivery states counted per node (the troubles; bounded by the node count)
NODE_STATES = (PENDING, FAILED)
#: longest ``last_error`` kept per node
ERROR_CHARS = 200


@dataclass(frozen=True)
class Deadline:
    """An active token's limit: whose, which, when, and how long from the snapshot."""

    user: str
    token_id: str
    at: int
    seconds_left: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "token_id": self.token_id,
            "at": self.at,
            "seconds_left": self.seconds_left,
        }


@dataclass(frozen=True)
class NodeTrouble:
    """One node's pending and failed deliveries, and its longest-standing failure."""

    pending: int = 0
    failed: int = 0
    #: the ``last_error`` of the failed delivery updated longest ago (one line)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"pending": self.pending, "failed": self.failed, "error": self.error}


@dataclass(frozen=True)
class Snapshot:
    now: int
    #: tokens per state (every state present, 0 if none)
    tokens: dict[str, int]
    #: the active token that expires first (``exp``), or None
    soonest_exp: Deadline | None
    #: the active token whose renew-until comes first: its user logs in again then
    soonest_renew_until: Deadline | None
    #: audit events of the last 24 h per kind (renewed, failed, minted, ...)
    events: dict[str, int]
    #: when a token was last renewed (any time), or None
    last_renewal: int | None
    #: delivery records per status (every status present)
    deliveries: dict[str, int]
    #: nodes with pending or failed deliveries
    nodes: dict[str, NodeTrouble] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.now,
            "tokens": dict(self.tokens),
            "soonest_exp": self.soonest_exp.as_dict() if self.soonest_exp else None,
            "soonest_renew_until": (
                self.soonest_renew_until.as_dict() if self.soonest_renew_until else None
            ),
            "events_24h": dict(self.events),
            "last_renewal": self.last_renewal,
            "deliveries": dict(self.deliveries),
            "nodes": {node: t.as_dict() for node, t in sorted(self.nodes.items())},
        }


def snapshot(store: Repository, now: int) -> Snapshot:
    """Counts and limits as of ``now`` (epoch seconds); StoreError if the store fails."""
    with store.transaction(read_only=True) as s:
        tokens = dict.fromkeys(TOKEN_STATES, 0)
        for state, count in s.execute(
            select(TokenRow.state, func.count()).group_by(TokenRow.state)
        ).all():
            tokens[state] = int(count)

        # No index leads to the soonest exp: read the table in order.  SQLite
        # would otherwise fetch every active row through the state index, one
        # random read each (8 times slower at 1,000,000 tokens); PostgreSQL's
        # planner chooses a sequential scan by itself.
        active: ColumnElement[bool] = TokenRow.state == ACTIVE
        if s.get_bind().dialect.name == "sqlite":
            active = func.likelihood(active, literal_column("0.9"), type_=Boolean)
        deadlines: list[Deadline | None] = []
        for column in (TokenRow.exp, TokenRow.renew_until):
            row = s.execute(
                select(TokenRow.user, TokenRow.token_id, column)
                .where(active)
                .order_by(column, TokenRow.id)
                .limit(1)
            ).first()
            if row is None:
                deadlines.append(None)
            else:
                at = to_epoch(row[2])
                deadlines.append(Deadline(row[0], row[1], at, at - now))

        events: dict[str, int] = {}
        for kind, count in s.execute(
            select(EventRow.event, func.count())
            .where(EventRow.at > to_dt(now - WINDOW))
            .group_by(EventRow.event)
        ).all():
            events[kind] = int(count)

        # Newest first along ix_events_at, stopping at the first renewal.
        last = s.scalar(
            select(EventRow.at)
            .where(EventRow.event == "renewed")
            .order_by(EventRow.at.desc())
            .limit(1)
        )

        deliveries = dict.fromkeys(DELIVERY_STATES, 0)
        for status, count in s.execute(
            select(DeliveryRow.status, func.count()).group_by(DeliveryRow.status)
        ).all():
            deliveries[status] = int(count)

        counts: dict[str, dict[str, int]] = {}
        if deliveries[PENDING] or deliveries[FAILED]:
            for node, status, count in s.execute(
                select(DeliveryRow.node, DeliveryRow.status, func.count())
                .where(DeliveryRow.status.in_(NODE_STATES))
                .group_by(DeliveryRow.node, DeliveryRow.status)
            ).all():
                counts.setdefault(node, {})[status] = int(count)
        errors: dict[str, str] = {}
        if deliveries[FAILED]:
            errors = _oldest_failures(s)

    nodes = {
        node: NodeTrouble(by.get(PENDING, 0), by.get(FAILED, 0), errors.get(node, ""))
        for node, by in counts.items()
    }
    return Snapshot(
        now=now,
        tokens=tokens,
        soonest_exp=deadlines[0],
        soonest_renew_until=deadlines[1],
        events=events,
        last_renewal=None if last is None else to_epoch(last),
        deliveries=deliveries,
        nodes=nodes,
    )


def _oldest_failures(s: Session) -> dict[str, str]:
    """Per node, the first line of the failed delivery's error that was updated first."""
    ranked = (
        select(
            DeliveryRow.node,
            DeliveryRow.last_error,
            func.row_number()
            .over(partition_by=DeliveryRow.node, order_by=(DeliveryRow.updated, DeliveryRow.id))
            .label("rank"),
        )
        .where(DeliveryRow.status == FAILED)
        .subquery()
    )
    rows = s.execute(select(ranked.c.node, ranked.c.last_error).where(ranked.c.rank == 1))
    return {node: one_line(error) for node, error in rows.all()}


def one_line(text: str, limit: int = ERROR_CHARS) -> str:
    """The first line of ``text``, cut to ``limit`` characters."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"
