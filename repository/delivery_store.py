"""Delivery records in the store: what each node holds of whose token.

The transfer cycle records what job sources say is needed (``sync_needs``),
claims what is owed (``claim``) and records what happened (``record``);
``list`` reads them and ``revoke`` asks for removals.

Claims let several delivery replicas share one store.  A claim marks the
records a replica is about to push with its name and a lease end
(``claimed_by``, ``claimed_until``) in one short transaction: on PostgreSQL
the candidate rows are locked with FOR UPDATE SKIP LOCKED, so replicas
claiming at once take disjoint rows without waiting; on SQLite the write
lock taken at BEGIN makes the claim a single writer's.  No transaction stays
open while the push runs.  A record another live lease holds is never
claimed; a lapsed lease (its replica died) is.  Results are recorded only for
the records the claim still holds, and free them: a result whose record was
taken over meanwhile is dropped, the other replica's word counts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import fields
from typing import Any, TypeVar
from typing import cast as typing_cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    Table,
    and_,
    any_,
    bindparam,
    case,
    delete,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from repository.models import DeliveryRow, EventRow, TokenRow, UTCDateTime
from repository.rows import TIMES, to_delivery, to_dt, to_epoch, to_record
from tokenlife.interfaces import Repository
from tokenlife.records import (
    ACTIVE,
    DeliveryClaim,
    DeliveryRecord,
    DeliveryResult,
    DeliveryTask,
    TokenRecord,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

PENDING, DELIVERED, FAILED, REMOVING = "pending", "delivered", "failed", "removing"


#: the names this module has always used for a delivery owed and its outcome
Task = DeliveryTask
Result = DeliveryResult

_table = typing_cast(Table, DeliveryRow.__table__)
_d = _table.c

#: the outer join of a record to its user's current token (none: NULL columns)
_CURRENT = (TokenRow.user == DeliveryRow.user) & (TokenRow.state == ACTIVE)
#: what makes a record owed: a removal, or a token other than the one the node holds
_OWED = or_(
    DeliveryRow.status == REMOVING,
    and_(TokenRow.id.is_(None), DeliveryRow.version > 0),
    and_(
        TokenRow.id.is_not(None),
        or_(TokenRow.token_id != DeliveryRow.token_id, TokenRow.version != DeliveryRow.version),
    ),
)
#: the values that free a claimed record
_FREE: dict[str, Any] = {"claimed_by": None, "claimed_until": None}
#: bulk statements that need not refresh objects in the session (none are loaded)
_NO_SYNC = {"synchronize_session": False}


class DeliveryStore:
    def __init__(self, store: Repository) -> None:
        self.store = store

    def deliveries(self, user: str | None = None) -> list[DeliveryRecord]:
        with self.store.transaction(read_only=True) as s:
            query = select(DeliveryRow).order_by(DeliveryRow.user, DeliveryRow.node)
            if user:
                query = query.where(DeliveryRow.user == user)
            return [to_delivery(row) for row in s.scalars(query)]

    def request_removal(self, user: str, now: int) -> int:
        """Ask delivery to delete ``user``'s token file from every node at once."""
        with self.store.transaction() as s:
            result = s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.user == user, DeliveryRow.status != REMOVING)
                .values(status=REMOVING, attempts=0, next_attempt=to_dt(now), updated=to_dt(now))
            )
            return int(result.rowcount)

    def sync_needs(
        self,
        needs: dict[str, set[str]],
        uids: dict[str, int],
        now: int,
        grace: int | None,
        unsure: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        """Record that users have work on nodes (``last_seen = now``).

        With ``grace`` (a complete view of the cluster's jobs), nodes not seen
        for longer than that are queued for removal.  ``unsure``: users whose
        uid could not be looked up this time; the nodes they already have
        count as seen (nothing is removed on a failed lookup's word), no new
        ones are added.
        """
        with self.store.transaction() as s:
            rows = {
                (r.user, r.node): r
                for r in s.scalars(select(DeliveryRow).where(DeliveryRow.user.in_(list(needs))))
            }
            added: list[dict[str, Any]] = []
            for user, nodes in needs.items():
                if user in unsure:
                    for node in nodes:
                        if (row := rows.get((user, node))) is not None:
                            row.last_seen = to_dt(now)
                    continue
                if user not in uids:
                    continue
                for node in nodes:
                    row = rows.get((user, node))
                    if row is None:
                        added.append(
                            {
                                "user": user,
                                "uid": uids[user],
                                "node": node,
                                "token_id": "",
                                "version": 0,
                                "status": PENDING,
                                "attempts": 0,
                                "last_error": "",
                                "next_attempt": to_dt(now),
                                "last_seen": to_dt(now),
                                "updated": to_dt(now),
                            }
                        )
                        continue
                    row.last_seen = to_dt(now)
                    if row.status == REMOVING:  # the work came back before the removal
                        row.status, row.attempts, row.next_attempt = PENDING, 0, to_dt(now)
            if added:
                # Replicas record the same jobs: a record another one added
                # since the SELECT above is left as it is, not an error.
                s.execute(_insert_new(s.get_bind().dialect.name), added)
            if grace is not None:
                s.execute(
                    update(DeliveryRow)
                    .where(
                        DeliveryRow.last_seen < to_dt(now - grace),
                        DeliveryRow.status != REMOVING,
                    )
                    .values(status=REMOVING, attempts=0, next_attempt=to_dt(now))
                )

    def due(self, now: int, user: str | None = None, node: str | None = None) -> list[Task]:
        """What nodes are owed: a newer token, or a removal (work or token gone).

        A view (nothing is claimed): ``claim`` is what a delivery cycle uses.
        """
        with self.store.transaction(read_only=True) as s:
            query = (
                select(DeliveryRow, TokenRow)
                .outerjoin(TokenRow, _CURRENT)
                .where(DeliveryRow.next_attempt <= to_dt(now), _OWED)
                .order_by(DeliveryRow.node, DeliveryRow.user)
            )
            query = _only(query, user, node)
            return [
                _task(row, None if token is None else to_record(token))
                for row, token in s.execute(query).all()
            ]

    def claim(
        self,
        now: int,
        claim: str,
        lease: int,
        limit: int,
        after: tuple[str, int] = ("", 0),
        user: str | None = None,
        node: str | None = None,
        due_by: int | None = None,
    ) -> DeliveryClaim:
        """Claim up to ``limit`` owed records that no live lease holds (one transaction).

        Walks the records by node, then id, from ``after`` (where the cycle's
        previous claim stopped), so a cycle looks at each record once however
        many batches it takes.  Node order keeps a node's deliveries together:
        one connection serves them all (a pool smaller than the node count
        does not reconnect for each), and replicas claiming at once take
        different runs of nodes.
        """
        due = now if due_by is None else due_by
        with self.store.transaction() as s:
            # Plain rows, not ORM objects, and the tokens apart (one per user,
            # a batch has few users): claiming is the cycle's hot path.
            query = (
                select(_table)
                .outerjoin(TokenRow, _CURRENT)
                .where(
                    tuple_(_d.node, _d.id) > tuple_(literal(after[0]), literal(after[1])),
                    _d.next_attempt <= to_dt(due),
                    _free(now),
                    _OWED,
                )
                .order_by(_d.node, _d.id)
                .limit(limit)
            )
            query = _only(query, user, node)
            if s.get_bind().dialect.name == "postgresql":
                # Rows another replica is claiming right now are skipped, not
                # waited for; a row it claimed since this query's snapshot is
                # re-checked once locked, and its lease excludes it.
                query = query.with_for_update(skip_locked=True, of=_table)
            rows = s.execute(query).all()
            ids = [row.id for row in rows]
            _set(s, ids, claimed_by=claim, claimed_until=to_dt(now + lease))
            tokens = _current_tokens(s, {row.user for row in rows})
            tasks = [_task(row, tokens.get(row.user)) for row in rows]
        last = (rows[-1].node, rows[-1].id) if rows else after
        return DeliveryClaim(tasks, last, len(rows) == limit)

    def extend(self, claim: str, until: int) -> int:
        """Move the lease of every record ``claim`` holds to ``until``."""
        with self.store.transaction() as s:
            held = sorted(_held(s, claim).values())
            _set(s, held, claimed_until=to_dt(until))
            return len(held)

    def release(self, claim: str, tasks: list[Task]) -> None:
        """Free the records of ``tasks`` that ``claim`` still holds (never pushed)."""
        if not tasks:
            return
        with self.store.transaction() as s:
            held = _held(s, claim)
            keys = {(t.delivery.user, t.delivery.node) for t in tasks}
            _set(s, sorted(i for key, i in held.items() if key in keys), **_FREE)

    def holders(self, now: int) -> list[str]:
        """The claims whose lease runs at ``now`` (few: one per replica's cycle)."""
        with self.store.transaction(read_only=True) as s:
            query = (
                select(DeliveryRow.claimed_by)
                .where(DeliveryRow.claimed_by.is_not(None), DeliveryRow.claimed_until > to_dt(now))
                .distinct()
            )
            return sorted(str(c) for c in s.scalars(query))

    def forget(self, claims: list[str]) -> int:
        """Free every record these claims hold (their replicas are known to be gone)."""
        with self.store.transaction() as s:
            ids = sorted(i for claim in claims for i in _held(s, claim).values())
            _set(s, ids, **_FREE)
            return len(ids)

    def record(
        self, results: list[Result], now: int, actor: str, claim: str | None = None
    ) -> list[Result]:
        """Store a cycle's outcomes (one transaction) and audit deliveries/removals.

        With ``claim``: only the outcomes whose record ``claim`` still holds
        (a lapsed lease another replica took over has its own outcome to
        record); the others are returned, not stored.  Every stored outcome
        frees its record.  An outcome whose record is gone is not stored.
        """
        if not results:
            return []
        with self.store.transaction() as s:
            ids = _held(s, claim) if claim is not None else _ids(s, results)
            _write(s, [r for r in results if (r.user, r.node) in ids], ids, now, actor)
        dropped = [r for r in results if (r.user, r.node) not in ids] if claim else []
        if dropped:
            first = ", ".join(f"{r.user} on {r.node}" for r in dropped[:5])
            log.warning(
                "%d outcome(s) not recorded: another replica took over their claim "
                "(the lease lapsed): %s%s",
                len(dropped),
                first,
                ", ..." if len(dropped) > 5 else "",
            )
        return dropped


#: a delivered token, row by row (executemany: SQLite, in process, needs no more)
_DELIVERED = (
    update(_table)
    .where(_d.id == bindparam("row_id"))
    .values(
        token_id=bindparam("new_token_id"),
        version=bindparam("new_version"),
        # A removal asked for while the token was on its way (revoke) stays
        # asked for, due at once.
        status=case((_d.status == REMOVING, REMOVING), else_=DELIVERED),
        attempts=0,
        last_error="",
        updated=bindparam("at"),
        next_attempt=bindparam("at"),
        **_FREE,
    )
)
#: the same on PostgreSQL, for a whole batch from arrays
_PG_DELIVERED = text(
    "UPDATE deliveries SET token_id = given.token_id, version = given.version, "
    "status = CASE WHEN deliveries.status = 'removing' THEN 'removing' ELSE 'delivered' END, "
    "attempts = 0, last_error = '', updated = :at, next_attempt = :at, "
    "claimed_by = NULL, claimed_until = NULL "
    "FROM unnest(CAST(:ids AS integer[]), CAST(:token_ids AS varchar[]), "
    "CAST(:versions AS integer[])) AS given(id, token_id, version) "
    "WHERE deliveries.id = given.id"
).bindparams(bindparam("at", type_=UTCDateTime()))

_events_table = typing_cast(Table, EventRow.__table__)
_EVENT_FIELDS = ("at", "event", "user", "token_id", "version", "actor", "reason")
#: the audit events of a batch on PostgreSQL, from arrays
_PG_EVENTS = text(
    'INSERT INTO events (at, event, "user", token_id, version, actor, reason) '
    "SELECT * FROM unnest(CAST(:at AS timestamp[]), CAST(:event AS varchar[]), "
    "CAST(:user AS varchar[]), CAST(:token_id AS varchar[]), CAST(:version AS integer[]), "
    "CAST(:actor AS varchar[]), CAST(:reason AS text[]))"
).bindparams(bindparam("at", type_=ARRAY(UTCDateTime())))

#: a failed push keeps its own backoff; a removal stays a removal
_FAILED = (
    update(_table)
    .where(_d.id == bindparam("row_id"))
    .values(
        status=case((_d.status == REMOVING, REMOVING), else_=FAILED),
        attempts=_d.attempts + 1,
        last_error=bindparam("error"),
        next_attempt=bindparam("retry_at"),
        updated=bindparam("at"),
        **_FREE,
    )
)


def _write(
    s: Session, results: list[Result], ids: dict[tuple[str, str], int], now: int, actor: str
) -> None:
    """The outcomes in a few bulk statements, by row id (in id order: the
    order every writer locks rows in): delivered rows, removed rows, failed
    rows, and one INSERT for all the audit events."""
    at = to_dt(now)
    results = sorted(results, key=lambda r: ids[(r.user, r.node)])
    delivered = [
        {"row_id": ids[(r.user, r.node)], "new_token_id": r.token_id, "new_version": r.version}
        for r in results
        if r.ok and not r.removed
    ]
    if delivered:
        _delivered(s, delivered, at)
    _removed(s, [ids[(r.user, r.node)] for r in results if r.ok and r.removed], at)
    failed = [
        {
            "row_id": ids[(r.user, r.node)],
            "error": r.error[:500],
            "retry_at": to_dt(r.retry_at),
            "at": at,
        }
        for r in results
        if not r.ok
    ]
    if failed:
        s.connection().execute(_FAILED, failed)
    _events(s, [_event(r, at, actor) for r in results if r.ok])


def _delivered(s: Session, rows: list[dict[str, Any]], at: Any) -> None:
    """The delivered records' new token: on PostgreSQL one UPDATE for them all,
    from arrays (a statement per row costs the server three times as much, a
    VALUES list with a parameter per field costs the client five times)."""
    if s.get_bind().dialect.name != "postgresql":
        s.connection().execute(_DELIVERED, [{**row, "at": at} for row in rows])
        return
    s.execute(
        _PG_DELIVERED,
        {
            "at": at,
            "ids": [r["row_id"] for r in rows],
            "token_ids": [r["new_token_id"] for r in rows],
            "versions": [r["new_version"] for r in rows],
        },
    )


def _events(s: Session, events: list[dict[str, Any]]) -> None:
    """The audit events: on PostgreSQL one INSERT from arrays (the event count
    trigger of migration 0005 then runs once, not once a row)."""
    if not events:
        return
    if s.get_bind().dialect.name != "postgresql":
        s.connection().execute(insert(_events_table), events)
        return
    s.execute(_PG_EVENTS, {name: [e[name] for e in events] for name in _EVENT_FIELDS})


def _event(r: Result, at: Any, actor: str) -> dict[str, object]:
    return {
        "at": at,
        "event": "removed" if r.removed else "delivered",
        "user": r.user,
        "token_id": None if r.removed else r.token_id,
        "version": None if r.removed else r.version,
        "actor": actor,
        "reason": f"node {r.node}",
    }


def _removed(s: Session, ids: list[int], at: Any) -> None:
    """The user's file is gone from these records' nodes: the records go, but
    one whose work came back meanwhile (pending again) stays, owed the token anew."""
    for chunk in _chunks(ids):
        s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.id.in_(chunk), DeliveryRow.status == PENDING)
            .values(token_id="", version=0, attempts=0, next_attempt=at, updated=at, **_FREE)
            .execution_options(**_NO_SYNC)
        )
        s.execute(
            delete(DeliveryRow)
            .where(DeliveryRow.id.in_(chunk), DeliveryRow.status != PENDING)
            .execution_options(**_NO_SYNC)
        )


def _task(row: Any, token: TokenRecord | None) -> Task:
    """The task of an owed record (a row of ``deliveries``): the current token,
    or None (remove the file)."""
    record = to_delivery(row)
    if row.status == REMOVING or token is None:
        return Task(record, None)  # nothing may stay behind
    return Task(record, token)


def _current_tokens(s: Session, users: set[str]) -> dict[str, TokenRecord]:
    """Each user's current token (the newest active one)."""
    found: dict[str, TokenRecord] = {}
    for chunk in _chunks(sorted(users)):
        query = (
            select(*_TOKEN_COLUMNS)
            .where(TokenRow.user.in_(chunk), TokenRow.state == ACTIVE)
            .order_by(TokenRow.id)
        )
        for row in s.execute(query):
            values = dict(row._mapping)
            values.update((name, to_epoch(values[name])) for name in TIMES)
            found[row.user] = TokenRecord(**values)
    return found


#: the columns a TokenRecord is made of (plain rows: cheaper than ORM objects)
_TOKEN_COLUMNS = [getattr(TokenRow, f.name) for f in fields(TokenRecord)]


def _only(query: Any, user: str | None, node: str | None) -> Any:
    if user:
        query = query.where(DeliveryRow.user == user)
    if node:
        query = query.where(DeliveryRow.node == node)
    return query


def _free(now: int) -> ColumnElement[bool]:
    """Held by no claim, or by one whose lease has ended (its replica died)."""
    return or_(DeliveryRow.claimed_until.is_(None), DeliveryRow.claimed_until <= to_dt(now))


def _held(s: Session, claim: str) -> dict[tuple[str, str], int]:
    """The row ids of the records ``claim`` holds, by (user, node), locked in id order.

    Locked up front (PostgreSQL), so no replica takes a lapsed claim over
    between this and the writes; in one order, so a recording replica does
    not deadlock with another one's ``sync_needs`` (which updates in id
    order too).  SQLite: the write lock already serializes writers.
    """
    query = (
        select(DeliveryRow.id, DeliveryRow.user, DeliveryRow.node)
        .where(DeliveryRow.claimed_by == claim)
        .order_by(DeliveryRow.id)
    )
    if s.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return {(u, n): i for i, u, n in s.execute(query).all()}


def _ids(s: Session, results: list[Result]) -> dict[tuple[str, str], int]:
    """The row ids of the results' records (those that still exist), by (user, node)."""
    found: dict[tuple[str, str], int] = {}
    for user, nodes in _by_user((r.user, r.node) for r in results):
        for chunk in _chunks(nodes):
            query = select(DeliveryRow.id, DeliveryRow.node).where(
                DeliveryRow.user == user, DeliveryRow.node.in_(chunk)
            )
            found.update(((user, n), i) for i, n in s.execute(query).all())
    return found


def _set(s: Session, ids: list[int], **values: Any) -> None:
    """UPDATE the rows ``ids`` to ``values`` (PostgreSQL: one array, not a
    parameter per id; elsewhere chunks of them)."""
    if ids and s.get_bind().dialect.name == "postgresql":
        s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.id == any_(bindparam("ids", ids, type_=ARRAY(Integer))))
            .values(**values)
            .execution_options(**_NO_SYNC)
        )
        return
    for chunk in _chunks(ids):
        s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.id.in_(chunk))
            .values(**values)
            .execution_options(**_NO_SYNC)
        )


def _by_user(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    grouped: dict[str, list[str]] = {}
    for user, node in pairs:
        grouped.setdefault(user, []).append(node)
    return list(grouped.items())


def _insert_new(dialect: str) -> Any:
    """INSERT of new records that leaves a record another replica added first."""
    if dialect == "postgresql":
        return postgresql.insert(DeliveryRow).on_conflict_do_nothing(
            index_elements=["user", "node"]
        )
    if dialect == "sqlite":
        return sqlite.insert(DeliveryRow).on_conflict_do_nothing(index_elements=["user", "node"])
    return insert(DeliveryRow)


def _chunks(items: list[T], size: int = 500) -> list[list[T]]:
    """Slices small enough for any backend's bound-parameter limit."""
    return [items[i : i + size] for i in range(0, len(items), size)]
