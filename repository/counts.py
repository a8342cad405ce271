"""Exact counts without counting rows: tokens per state, and the last 24 hours'
audit events per kind, for ``tokenlife status`` and the metrics.

With a million tokens, counting them by state in an index took about 130 ms
on PostgreSQL (no cheap count there: each entry's visibility is checked)
and 20 ms on SQLite, growing with the store; counting a day's events by
kind on PostgreSQL grew with the day (about 175 ms for a million events,
what a million tokens' renewals and deliveries write).  So the database
keeps the counts itself, with the triggers of migration 0005:

* ``token_counts`` (both backends): a token inserted appends ``(state,
  +1)``, one deleted ``(state, -1)``, one whose state changes both (row
  triggers; a renewal changes no state and fires nothing); TRUNCATE empties
  the table.  A state's tokens are the sum of its rows;
* ``event_counts`` (PostgreSQL): the events a statement inserts (or
  deletes) append ``(bucket, event, n)`` per 10-minute bucket and kind
  (``-n`` for deletions): one statement trigger over its transition table,
  so a renewal batch of a thousand events appends a row or two.  The events
  after ``since`` are the sums of the buckets wholly after it, plus the
  events of the one bucket it cuts, counted along ix_events_event_at (at
  most 10 minutes of them).  SQLite counts the whole window in that index
  instead (it reads an entry without checking its visibility: 1.7 ms for
  143,000 events, about 45 ms for a million), as a trigger on ``events``
  (SQLite has row triggers only, each firing about 7 microseconds) cost its
  renewals 11% of their rate (0.89x), and with it bench_renew.py's target;
* ``fold`` merges the rows of a group into one, and drops buckets older than
  ``KEEP`` (nothing reads them), at the end of every renewal run and purge.

Why triggers rather than code in each writer: the rows are written in the
same transaction as the change, commit and roll back with it, and no path
can forget them: the mint, the supersede, the renewer's bulk writes,
revoke, purge, the delivery cycle's events, an older replica during an
upgrade, an administrator's psql.  Exact, never an estimate
(``pg_class.reltuples`` would be cheap and wrong by thousands).

Why rows to add up rather than one counter per state: every mint would
update the row ``active``, so concurrent mints and the renewers' expiry
batches (replicas, SKIP LOCKED) would queue behind one row lock until each
other's commit (with fsync on, one commit at a time), and they would lock
two counter rows in varying orders (a mint: active, expired, active; a
purge: any), which deadlocks.  Appending takes no lock on an existing row:
writers never wait on each other here (bench/bench_count_writes.py measures
both designs).  Folding is one statement on PostgreSQL (``WITH gone AS
(DELETE ... RETURNING) INSERT ...``): what it removes is exactly what it
adds back, whatever commits meanwhile, and two replicas folding at once
only make the second wait and skip what the first took.  SQLite has one
writer at a time: there it is a few statements in one write transaction.

What it costs the writes: ``sudo .venv/bin/python bench/bench_count_writes.py``
(add ``--durable --backends postgresql`` for a PostgreSQL that fsyncs its
commits) times each workload on fresh stores at 0004 and 0005 and, on
PostgreSQL, with one counter row per state updated in place; rates at 0005
(and with that counter row) over 0004, medians of 3 runs on 2 CPUs shared
with another engineer's test runs (so within about 10%; two runs each):

    workload                  SQLite       PostgreSQL    PostgreSQL, fsync
    renew 100,000 due tokens  1.01, 1.22   0.90, 1.08    0.97   (row: 0.99)
    expire 100,000 tokens     0.53, 0.61   0.69, 0.86    0.67   (row: 0.44)
    3,000 mints, one by one   0.92, 1.00   0.91, 0.90    0.86   (row: 0.97)
    3,000 mints, 8 at once    -            0.73, 0.82    1.00   (row: 0.60)

A renewal changes no state; on PostgreSQL its batch's events cost one
statement trigger, 0.1 to 0.3 ms of a batch of 1,000 (under 1%, below the
noise above).  An expiry pays its trigger (SQLite's cost about 15
microseconds a firing; still 17,000 expiries a second).  A mint pays three
token triggers and two events statements (about 0.3 ms of 3 ms).  With
fsync, one counter row per state makes concurrent mints wait for each
other's commits (0.60x); appended rows do not (1.00x).

How fast ``status`` and a scrape read a million tokens: repository/status.py.
Folding needs a renewal run now and then (the daemon or the timer); without
one the rows pile up, the counts stay exact and a status reads more rows.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session, aliased

from repository.models import EventCountRow, EventRow, TokenCountRow, TokenRow
from repository.rows import to_dt
from tokenlife.errors import StoreError
from tokenlife.interfaces import Repository
from tokenlife.records import ACTIVE, EXPIRED, REVOKED

log = logging.getLogger(__name__)

TOKEN_STATES = (ACTIVE, EXPIRED, REVOKED)
#: seconds per event bucket (migration 0005 has the same)
BUCKET = 600
#: buckets older than this (seconds before a fold's ``now``) are dropped: a
#: status reads the last 24 hours
KEEP = 2 * 86400
#: the triggers of migration 0005 on both backends
TRIGGERS = ("tokens_count_insert", "tokens_count_update", "tokens_count_delete")
#: and those on PostgreSQL only
PG_TRIGGERS = (
    "tokens_count_truncate",
    "events_count_insert",
    "events_count_delete",
    "events_count_update_old",
    "events_count_update_new",
    "events_count_truncate",
)


# -- reading --------------------------------------------------------------------------------


def token_counts(s: Session) -> dict[str, int]:
    """Tokens per state (every state present, 0 if none)."""
    counts = dict.fromkeys(TOKEN_STATES, 0)
    for state, n in s.execute(
        select(TokenCountRow.state, func.sum(TokenCountRow.n)).group_by(TokenCountRow.state)
    ).all():
        counts[state] = int(n)
    return counts


def event_counts(s: Session, since: int) -> dict[str, int]:
    """Events after ``since`` (epoch seconds) per kind, kinds in order, none at 0."""
    if s.get_bind().dialect.name != "postgresql":
        return dict(_counted(s, since))  # SQLite: the whole window in the index
    first = since // BUCKET + 1  # the first bucket wholly after ``since``
    counts: dict[str, int] = {}
    for kind, n in s.execute(
        select(EventCountRow.event, func.sum(EventCountRow.n))
        .where(EventCountRow.bucket >= first)
        .group_by(EventCountRow.event)
    ).all():
        counts[str(kind)] = int(n)
    for kind, n in _counted(s, since, first * BUCKET):
        counts[kind] = counts.get(kind, 0) + n
    return {kind: n for kind, n in sorted(counts.items()) if n}


def _counted(s: Session, since: int, before: int | None = None) -> list[tuple[str, int]]:
    """Events with ``since < at (< before)`` per kind, kinds in order: the kinds by
    skipping along ix_events_event_at (a few lookups), then one index range each,
    never a row."""
    kinds = select(func.min(EventRow.event).label("event")).cte("kinds", recursive=True)
    after = select(func.min(EventRow.event)).where(EventRow.event > kinds.c.event)
    kinds = kinds.union_all(select(after.scalar_subquery()).where(kinds.c.event.is_not(None)))
    inner = aliased(EventRow)
    window = [inner.event == kinds.c.event, inner.at > to_dt(since)]
    if before is not None:
        window.append(inner.at < to_dt(before))
    count = select(func.count()).select_from(inner).where(*window).scalar_subquery()
    rows = s.execute(select(kinds.c.event, count).where(kinds.c.event.is_not(None))).all()
    return [(str(kind), int(n)) for kind, n in rows if n]


def recount_tokens(s: Session) -> dict[str, int]:
    """Tokens per state counted in ``tokens`` itself (linear in the tokens): a check."""
    counts = dict.fromkeys(TOKEN_STATES, 0)
    query = select(TokenRow.state, func.count()).group_by(TokenRow.state)
    for state, n in s.execute(query).all():
        counts[state] = int(n)
    return counts


def recount_events(s: Session, since: int) -> dict[str, int]:
    """Events after ``since`` per kind counted in ``events`` itself: a check."""
    query = (
        select(EventRow.event, func.count())
        .where(EventRow.at > to_dt(since))
        .group_by(EventRow.event)
    )
    return {str(kind): int(n) for kind, n in sorted(s.execute(query).all())}


# -- folding --------------------------------------------------------------------------------

_PG_FOLD_TOKENS = """
WITH gone AS (DELETE FROM token_counts RETURNING state, n)
INSERT INTO token_counts (state, n)
SELECT state, sum(n) FROM gone GROUP BY state HAVING sum(n) <> 0
"""
_PG_FOLD_EVENTS = """
WITH twice AS (
    SELECT bucket, event FROM event_counts GROUP BY bucket, event HAVING count(*) > 1
), gone AS (
    DELETE FROM event_counts AS c USING twice
    WHERE c.bucket = twice.bucket AND c.event = twice.event
    RETURNING c.bucket, c.event, c.n
)
INSERT INTO event_counts (bucket, event, n)
SELECT bucket, event, sum(n) FROM gone GROUP BY bucket, event HAVING sum(n) <> 0
"""


def fold(s: Session, now: int) -> int:
    """Merge each group's rows into one, drop the buckets older than ``KEEP``,
    in the session's (write) transaction; returns how many rows there were."""
    tokens = int(s.scalar(select(func.count()).select_from(TokenCountRow)) or 0)
    if s.get_bind().dialect.name != "postgresql":
        if tokens > len(TOKEN_STATES):
            _fold_tokens_here(s)
        return tokens  # SQLite keeps no event counts
    if tokens > len(TOKEN_STATES):
        s.connection().exec_driver_sql(_PG_FOLD_TOKENS)
    events = int(s.scalar(select(func.count()).select_from(EventCountRow)) or 0)
    groups = select(EventCountRow.bucket, EventCountRow.event).distinct().subquery()
    if events > int(s.scalar(select(func.count()).select_from(groups)) or 0):
        s.connection().exec_driver_sql(_PG_FOLD_EVENTS)
    s.execute(delete(EventCountRow).where(EventCountRow.bucket < (now - KEEP) // BUCKET))
    return tokens + events


def _fold_tokens_here(s: Session) -> None:
    """SQLite: the fold's transaction is the only writer (BEGIN IMMEDIATE), so the
    sums it reads are those of the rows it deletes."""
    t = TokenCountRow
    sums = s.execute(select(t.state, func.sum(t.n)).group_by(t.state)).all()
    s.execute(delete(t))
    rows = [{"state": state, "n": int(n)} for state, n in sums if n]
    if rows:
        s.execute(insert(t), rows)


def compact(store: Repository, now: int) -> int:
    """``fold`` in a transaction of its own; a failure is logged, not raised.

    The counts are exact either way: folding only keeps the sums short.
    """
    try:
        with store.transaction() as s:
            return fold(s, now)
    except StoreError as exc:
        log.warning("cannot fold the kept counts (they stay exact): %s", exc)
        return 0
