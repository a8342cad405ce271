"""A renewal batch's writes, in bulk: one statement per outcome kind, one for the events.

On PostgreSQL each is a single statement over arrays (``unnest``, sent in
binary); elsewhere (SQLite) one driver-level executemany of a Core statement
compiled once.  No ORM unit of work and no per-row SQLAlchemy parameter
processing: at 100,000 renewals a tick, that bookkeeping cost several times
the signing itself (bench/bench_renew.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any
from typing import cast as typing_cast

from sqlalchemy import ColumnElement, Table, bindparam, insert, literal_column
from sqlalchemy import update as sql_update
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert, Update

from repository.models import EventRow, TokenRow
from repository.rows import to_dt
from tokenlife.records import EXPIRED, Expired, Outcome, Renewed, TokenRecord, Waiting

_tokens = typing_cast(Table, TokenRow.__table__)
_c = _tokens.c

# -- deciding -------------------------------------------------------------------------------


@dataclass
class Writes:
    """What a batch writes, as rows of parameters per outcome kind."""

    renew: list[tuple[Any, ...]] = field(default_factory=list)  # _RENEW_PARAMS
    wait: list[tuple[Any, ...]] = field(default_factory=list)  # _WAIT_PARAMS
    expire: list[tuple[Any, ...]] = field(default_factory=list)  # _EXPIRE_PARAMS
    fail: list[tuple[Any, ...]] = field(default_factory=list)  # _FAIL_PARAMS
    events: list[tuple[Any, ...]] = field(default_factory=list)  # _EVENT_PARAMS


_RENEW_PARAMS = ("b_id", "b_token", "b_iat", "b_exp", "b_key_id", "b_next")
_WAIT_PARAMS = ("b_id", "b_next")
_EXPIRE_PARAMS = ("b_id",)
_FAIL_PARAMS = ("b_id", "b_error", "b_next")
_EVENT_PARAMS = ("event", "user", "token_id", "version", "reason")  # + at, actor


def decide(
    rows: Sequence[Sequence[Any]],
    handle: Callable[[TokenRecord], Outcome],
    time: Callable[[int], Any],
    results: list[tuple[TokenRecord, Outcome]],
) -> Writes:
    """Hand each claimed row to ``handle``; gather the writes of its outcome."""
    writes = Writes()
    renew, wait, expire, fail, events = (
        writes.renew,
        writes.wait,
        writes.expire,
        writes.fail,
        writes.events,
    )
    for row in rows:
        record = TokenRecord(*row[1:])
        outcome = handle(record)
        results.append((record, outcome))
        if isinstance(outcome, Renewed):
            renew.append(
                (
                    row[0],
                    outcome.token,
                    time(outcome.iat),
                    time(outcome.exp),
                    outcome.key_id,
                    time(outcome.next_check),
                )
            )
            # One audit event per change; never the token itself.
            events.append((outcome.event, record.user, record.token_id, record.version + 1, ""))
        elif isinstance(outcome, Waiting):
            wait.append((row[0], time(outcome.until)))
        elif isinstance(outcome, Expired):
            expire.append((row[0],))
            events.append(("expired", record.user, record.token_id, record.version, outcome.reason))
        else:
            error = outcome.error[:500]
            fail.append((row[0], error, time(outcome.retry_at)))
            events.append(("failed", record.user, record.token_id, record.version, error))
    return writes


# -- writing --------------------------------------------------------------------------------


class Writer:
    """Writes a batch's outcomes in bulk, in the session's transaction."""

    def __init__(self, dialect: Dialect) -> None:
        # What the driver gets for a UTCDateTime (a naive UTC datetime, or
        # SQLite's text): the column type's own conversion for this dialect,
        # memoised, as most renewals of a batch share their iat, exp and next_check.
        column_type = _c.next_check.type
        self._convert = column_type.dialect_impl(dialect).bind_processor(dialect) or _same
        self._times: dict[int, Any] = {}

    def time(self, epoch: int) -> Any:
        value = self._times.get(epoch)
        if value is None:
            if len(self._times) >= 100_000:
                self._times.clear()
            value = self._times[epoch] = self._convert(to_dt(epoch))
        return value

    def write(self, s: Session, writes: Writes, now: int, actor: str) -> None:
        raise NotImplementedError


def _same(value: Any) -> Any:
    return value


def writer_for(dialect: Dialect) -> Writer:
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        return _ArrayWriter(dialect)
    return _ManyWriter(dialect)


_ONE: ColumnElement[int] = literal_column("1")
_ZERO: ColumnElement[int] = literal_column("0")
_EMPTY: ColumnElement[str] = literal_column("''")
_BY_ID = _c.id == bindparam("b_id")
_RENEW = (
    sql_update(_tokens)
    .where(_BY_ID)
    .values(
        token=bindparam("b_token"),
        iat=bindparam("b_iat"),
        exp=bindparam("b_exp"),
        version=_c.version + _ONE,
        key_id=bindparam("b_key_id"),
        next_check=bindparam("b_next"),
        attempts=_ZERO,
        last_error=_EMPTY,
    )
)
_WAIT = sql_update(_tokens).where(_BY_ID).values(next_check=bindparam("b_next"))
_EXPIRE = sql_update(_tokens).where(_BY_ID).values(state=literal_column(f"'{EXPIRED}'"))
_FAIL = (
    sql_update(_tokens)
    .where(_BY_ID)
    .values(
        attempts=_c.attempts + _ONE, last_error=bindparam("b_error"), next_check=bindparam("b_next")
    )
)
_EVENT_COLUMNS = ("at", "actor", *_EVENT_PARAMS)
_EVENT = (
    insert(typing_cast(Table, EventRow.__table__))
    .values({name: bindparam(name) for name in _EVENT_COLUMNS})
    .inline()
)


class _Executemany:
    """A Core statement compiled once for a dialect, run as the driver's executemany.

    Parameter rows go to the driver as they are (no per-row SQLAlchemy
    processing), reordered for positional paramstyles or named otherwise.
    """

    def __init__(self, statement: Update | Insert, names: tuple[str, ...], dialect: Dialect):
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self.shape: Callable[[tuple[Any, ...]], Any] | None = None
        order = compiled.positiontup if compiled.positional else None
        if order is None:  # named paramstyles
            self.shape = lambda row: dict(zip(names, row, strict=True))
        elif tuple(order) != names:
            if sorted(order) != sorted(names):
                raise AssertionError(f"{order} are not the parameters {names}")
            self.shape = itemgetter(*(names.index(name) for name in order))

    def run(self, s: Session, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            params = rows if self.shape is None else [self.shape(row) for row in rows]
            s.connection().exec_driver_sql(self.sql, params)


class _ManyWriter(Writer):
    """Any backend (SQLite): one executemany per outcome kind and for the events."""

    def __init__(self, dialect: Dialect) -> None:
        super().__init__(dialect)
        self.renew = _Executemany(_RENEW, _RENEW_PARAMS, dialect)
        self.wait = _Executemany(_WAIT, _WAIT_PARAMS, dialect)
        self.expire = _Executemany(_EXPIRE, _EXPIRE_PARAMS, dialect)
        self.fail = _Executemany(_FAIL, _FAIL_PARAMS, dialect)
        self.event = _Executemany(_EVENT, _EVENT_COLUMNS, dialect)

    def write(self, s: Session, writes: Writes, now: int, actor: str) -> None:
        self.renew.run(s, writes.renew)
        self.wait.run(s, writes.wait)
        self.expire.run(s, writes.expire)
        self.fail.run(s, writes.fail)
        head = (self.time(now), actor)
        self.event.run(s, [head + event for event in writes.events])


# PostgreSQL: one statement per outcome kind over arrays of the batch's
# parameters (%(name)b: psycopg sends them in binary, which costs a fraction
# of a microsecond per element; text arrays would cost ten).  Written out
# because Core has no UPDATE ... FROM unnest; the names are those of
# repository/models.py, and the same outcomes as _RENEW .. _EVENT above.
_PG_RENEW = """
UPDATE tokens AS t
SET token = v.token, iat = v.iat, exp = v.exp, version = t.version + 1, key_id = v.key_id,
    next_check = v.next_check, attempts = 0, last_error = ''
FROM unnest(%(b_id)b::integer[], %(b_token)b::text[], %(b_iat)b::timestamp[],
            %(b_exp)b::timestamp[], %(b_key_id)b::text[], %(b_next)b::timestamp[])
     AS v(id, token, iat, exp, key_id, next_check)
WHERE t.id = v.id
"""
_PG_WAIT = """
UPDATE tokens AS t SET next_check = v.next_check
FROM unnest(%(b_id)b::integer[], %(b_next)b::timestamp[]) AS v(id, next_check)
WHERE t.id = v.id
"""
_PG_EXPIRE = "UPDATE tokens SET state = 'expired' WHERE id = ANY(%(b_id)b::integer[])"
_PG_FAIL = """
UPDATE tokens AS t
SET attempts = t.attempts + 1, last_error = v.error, next_check = v.next_check
FROM unnest(%(b_id)b::integer[], %(b_error)b::text[], %(b_next)b::timestamp[])
     AS v(id, error, next_check)
WHERE t.id = v.id
"""
_PG_EVENTS = """
INSERT INTO events (at, actor, event, "user", token_id, version, reason)
SELECT %(at)b::timestamp, %(actor)b::text, v.*
FROM unnest(%(event)b::text[], %(user)b::text[], %(token_id)b::text[],
            %(version)b::integer[], %(reason)b::text[]) AS v
"""


class _ArrayWriter(Writer):
    """PostgreSQL (psycopg): one statement per outcome kind, parameters as arrays."""

    def write(self, s: Session, writes: Writes, now: int, actor: str) -> None:
        connection = s.connection()
        for sql, names, rows in (
            (_PG_RENEW, _RENEW_PARAMS, writes.renew),
            (_PG_WAIT, _WAIT_PARAMS, writes.wait),
            (_PG_EXPIRE, _EXPIRE_PARAMS, writes.expire),
            (_PG_FAIL, _FAIL_PARAMS, writes.fail),
        ):
            if rows:
                connection.exec_driver_sql(sql, _arrays(names, rows))
        if writes.events:
            params = _arrays(_EVENT_PARAMS, writes.events)
            params.update(at=self.time(now), actor=actor)
            connection.exec_driver_sql(_PG_EVENTS, params)


def _arrays(names: tuple[str, ...], rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Rows of parameters, transposed into one list per parameter."""
    return {name: list(column) for name, column in zip(names, zip(*rows, strict=True), strict=True)}
