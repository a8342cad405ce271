"""The renewer's view of the store: claim due rows in batches, apply outcomes in bulk.

A batch is one transaction: one SELECT claims up to ``batch`` rows (only the
columns the policy needs, never the old token), the renewer decides and signs
each one, then repository.bulk_writes writes the outcomes: one statement per
outcome kind and one for the audit events.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any
from typing import cast as typing_cast

from sqlalchemy import BigInteger, ColumnElement, Integer, Table, cast, extract, func, select

from repository.bulk_writes import Writer, decide, writer_for
from repository.counts import compact
from repository.models import TokenRow
from repository.rows import audit, to_dt
from tokenlife.interfaces import Repository
from tokenlife.records import ACTIVE, Outcome, TokenRecord

#: rows claimed (and locked, on PostgreSQL) per transaction
BATCH = 1000


class RenewalStore:
    """The renewer's view of SqlTokenStore: claim due rows, apply outcomes."""

    def __init__(self, store: Repository) -> None:
        self.store = store
        self._writers: dict[str, Writer] = {}

    def process(
        self,
        now: int,
        handle: Callable[[TokenRecord], Outcome],
        actor: str,
        user: str | None = None,
        force: bool = False,
        not_key: str | None = None,
        batch: int = BATCH,
    ) -> list[tuple[TokenRecord, Outcome]]:
        """Hand every due token to ``handle`` in batches, one transaction each.

        On PostgreSQL rows are claimed with FOR UPDATE SKIP LOCKED, so
        replicas share the work without waiting on each other; a crash rolls
        the open batch back, leaving those tokens at their old version.
        ``force`` hands over every active token; ``not_key`` every active
        token not signed by that key id (key rotation).  The records handed
        over carry no ``token``: the old secret is never read.  Last, the
        run folds the kept counts (repository/counts.py).
        """
        results: list[tuple[TokenRecord, Outcome]] = []
        after = 0  # forced runs walk the table once by id
        walk = force or not_key is not None
        while True:
            with self.store.transaction() as s:
                dialect = s.get_bind().dialect
                query = select(*_claim_columns(dialect.name)).where(_c.state == ACTIVE)
                if user:
                    query = query.where(_c.user == user)
                if not_key is not None:
                    query = query.where(_c.key_id != not_key)
                if walk:
                    query = query.where(_c.id > after).order_by(_c.id)
                else:
                    # The index (state, next_check) serves the filter and the order.
                    query = query.where(_c.next_check <= to_dt(now)).order_by(_c.next_check)
                query = query.limit(batch)
                if dialect.name == "postgresql":
                    query = query.with_for_update(skip_locked=True)
                rows = s.execute(query).all()
                if rows:
                    after = max(after, max(row[0] for row in rows))
                    writer = self._writers.get(dialect.name)
                    if writer is None:
                        writer = self._writers[dialect.name] = writer_for(dialect)
                    writes = decide(rows, handle, writer.time, results)
                    writer.write(s, writes, now, actor)
            if len(rows) < batch:
                break
        # Fold what the batches appended to the kept counts (a transaction of
        # its own; a failure is logged, the counts stay exact regardless).
        compact(self.store, now)
        return results

    def set_state(
        self, user: str, state: str, event: str, actor: str, reason: str, now: int
    ) -> int:
        """Mark the user's active tokens ``state`` (revoke); returns how many."""
        with self.store.transaction() as s:
            rows = list(
                s.scalars(select(TokenRow).where(TokenRow.user == user, TokenRow.state == ACTIVE))
            )
            for row in rows:
                row.state = state
                audit(s, now, event, user, row.token_id, row.version, actor, reason)
            return len(rows)


# -- claiming -------------------------------------------------------------------------------

_tokens = typing_cast(Table, TokenRow.__table__)
_c = _tokens.c


def _epoch(column: Any, dialect: str) -> ColumnElement[int]:
    """Epoch seconds of a stored UTC timestamp, computed by the database.

    Both backends store naive UTC (see UTCDateTime), which their epoch
    functions read as UTC whatever the session's time zone; truncated to the
    second like ``rows.to_epoch``.  Cheaper than parsing datetimes in Python.
    """
    if dialect == "postgresql":
        return cast(func.floor(extract("epoch", column)), BigInteger)
    if dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 38):
        return func.unixepoch(column, type_=Integer)  # ten times cheaper than STRFTIME
    return extract("epoch", column)  # SQLite: CAST(STRFTIME('%s', col) AS INTEGER)


def _claim_columns(dialect: str) -> tuple[Any, ...]:
    """The id, then TokenRecord's fields in order, up to ``attempts`` (not the token)."""
    return (
        _c.id,
        _c.token_id,
        _c.user,
        _c.uid,
        _c.gid,
        _epoch(_c.first_issued, dialect),
        _epoch(_c.iat, dialect),
        _epoch(_c.exp, dialect),
        _epoch(_c.renew_until, dialect),
        _c.lifetime,
        _c.key_id,
        _c.version,
        _c.state,
        _c.attempts,
    )
