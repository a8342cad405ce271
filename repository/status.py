"""A snapshot of the store for ``tokenlife status`` and the metrics endpoint.

Everything is read in one read-only transaction, and no token is read.  The
tokens per state, and on PostgreSQL the last 24 hours' events per kind, are
sums of rows that the database's own triggers keep exact in the transaction
of every write (migration 0005; repository/counts.py says why triggers, and
why rows to add up rather than one counter per state): a few rows whatever
the size of the store, plus at most 10 minutes of events counted along
ix_events_event_at.  SQLite counts the day's events in that index itself:
it reads an entry without checking its visibility, which PostgreSQL must
do (1.7 ms for 143,000 entries against 28 ms).  The limits, the last
renewal and the figures per node cost a lookup each along the indexes of
migration 0004.  Only ``tokenlife status`` counts events: the metrics
count them as they come.

``sudo .venv/bin/python bench/bench_status.py`` fills a store with 1,000,000
tokens, 1,000,000 audit events over 7 days and 100,000 delivery records,
and times a snapshot and a scrape at migration 0004 (with the code before
0005: both counts counted in the indexes) and, in the same run, after the
upgrade to 0005 (medians of 15 calls, 2 CPUs shared with other work):

    backend     schema   status   scrape   upgrade 0004 -> 0005
    SQLite      0004     40.2 ms  33.7 ms
                0005     19.9 ms  12.2 ms  0.07 s
    PostgreSQL  0004    126.5 ms  84.6 ms
                0005     19.5 ms  16.4 ms  0.58 s

With ``--events 7000000`` (a million events in the last 24 hours, what a
million tokens' renewals write): PostgreSQL 285.8 ms / 175.5 ms at 0004,
19.6 ms / 19.8 ms at 0005; SQLite 81.6 ms / 34.2 ms at 0004, 59.5 ms /
12.8 ms at 0005 (its status then counts the day's events in the index:
about 45 ms).

The pulls of the last 24 hours by result come out of the same counts: each
result is an audit event kind of its own (repository/pull_audit.py), so
they cost no query, and a busy pull service counts like any other writer of
events (a million pulls a day: as above).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from repository.counts import event_counts, token_counts
from repository.delivery_store import DELIVERED, FAILED, PENDING, REMOVING
from repository.models import AT_LIMIT, RENEWABLE, DeliveryRow, EventRow, TokenRow
from repository.pull_audit import pulls
from repository.rows import to_epoch
from tokenlife.interfaces import Repository
from tokenlife.records import ACTIVE

if TYPE_CHECKING:
    from typing import TypeAlias

    from sqlalchemy import Select

    Soonest: TypeAlias = Select[str, str, datetime, int, int]  # SQLAlchemy 2.1's typing

#: how far back ``events`` counts
WINDOW = 86400
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
    #: the token's lifetime (its renewal window follows from it)
    lifetime: int = 0

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
    #: the newest audit event's id (0: none), and the events after ``events_after``
    #: as (id, kind), for the metrics' running count (not shown by ``status``)
    last_event_id: int = 0
    new_events: tuple[tuple[int, str], ...] = ()
    #: the active token below its renew-until that expires first: renewal can
    #: still push its exp back, so once inside its renewal window it is overdue
    soonest_renewable: Deadline | None = None

    @property
    def pulls(self) -> dict[str, int]:
        """Pulls of the last 24 h by result (the audited ones, each present), from ``events``."""
        return pulls(self.events)

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.now,
            "tokens": dict(self.tokens),
            "soonest_exp": self.soonest_exp.as_dict() if self.soonest_exp else None,
            "soonest_renew_until": (
                self.soonest_renew_until.as_dict() if self.soonest_renew_until else None
            ),
            "soonest_renewable_exp": (
                self.soonest_renewable.as_dict() if self.soonest_renewable else None
            ),
            "events_24h": dict(self.events),
            "pulls_24h": self.pulls,
            "last_renewal": self.last_renewal,
            "deliveries": dict(self.deliveries),
            "nodes": {node: t.as_dict() for node, t in sorted(self.nodes.items())},
        }


def snapshot(
    store: Repository, now: int, *, window: bool = True, events_after: int | None = None
) -> Snapshot:
    """Counts and limits as of ``now`` (epoch seconds); StoreError if the store fails.

    ``window``: count the events of the last 24 hours (``tokenlife status``;
    the metrics count events as they come instead).  ``events_after``: also
    return the events with a greater id (``new_events``), for that count.
    """
    with store.transaction(read_only=True) as s:
        tokens = token_counts(s)
        renewable = _soonest(s, exp_query(RENEWABLE), now)
        at_limit = _soonest(s, exp_query(AT_LIMIT), now)
        soonest_exp = min(
            (d for d in (renewable, at_limit) if d is not None), key=_order, default=None
        )
        soonest_renew_until = _soonest(s, renew_until_query(), now)
        events = event_counts(s, now - WINDOW) if window else {}
        # Along ix_events_event_at: the last entry of its "renewed" range.
        last = s.scalar(
            select(EventRow.at)
            .where(EventRow.event == "renewed")
            .order_by(EventRow.at.desc())
            .limit(1)
        )
        last_event_id = int(s.scalar(select(func.max(EventRow.id))) or 0)
        new_events: tuple[tuple[int, str], ...] = ()
        if events_after is not None:
            new_events = tuple(
                (int(i), str(kind))
                for i, kind in s.execute(
                    select(EventRow.id, EventRow.event)
                    .where(EventRow.id > events_after)
                    .order_by(EventRow.id)
                ).all()
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
        soonest_exp=None if soonest_exp is None else soonest_exp[0],
        soonest_renew_until=None if soonest_renew_until is None else soonest_renew_until[0],
        events=events,
        last_renewal=None if last is None else to_epoch(last),
        deliveries=deliveries,
        nodes=nodes,
        last_event_id=last_event_id,
        new_events=new_events,
        soonest_renewable=None if renewable is None else renewable[0],
    )


def last_event_id(store: Repository) -> int:
    """The newest audit event's id (0: none): where a count of new events starts."""
    with store.transaction(read_only=True) as s:
        return int(s.scalar(select(func.max(EventRow.id))) or 0)


def exp_query(condition: str) -> Soonest:
    """The active token with the smallest exp among those of a partial index's
    ``condition`` (RENEWABLE or AT_LIMIT): that index's first entry."""
    return (
        select(TokenRow.user, TokenRow.token_id, TokenRow.exp, TokenRow.lifetime, TokenRow.id)
        .where(text(condition))  # as the index says it (SQLite matches it word for word)
        .order_by(TokenRow.exp, TokenRow.id)
        .limit(1)
    )


def renew_until_query() -> Soonest:
    """The active token whose renew-until comes first: ix_tokens_state_renew_until's."""
    return (
        select(
            TokenRow.user, TokenRow.token_id, TokenRow.renew_until, TokenRow.lifetime, TokenRow.id
        )
        .where(TokenRow.state == ACTIVE)
        .order_by(TokenRow.renew_until, TokenRow.id)
        .limit(1)
    )


def _soonest(s: Session, query: Soonest, now: int) -> tuple[Deadline, int] | None:
    """The query's token as a Deadline, and its row id (the tie-breaker)."""
    row = s.execute(query).first()
    if row is None:
        return None
    at = to_epoch(row[2])
    return Deadline(row[0], row[1], at, at - now, int(row[3])), int(row[4])


def _order(found: tuple[Deadline, int]) -> tuple[int, int]:
    return found[0].at, found[1]


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
