"""A big store in seconds: tokens, audit events and delivery records generated
by the database itself (INSERT ... SELECT over a generated series), for the
status benchmark (bench/bench_status.py) and the query-plan tests.

The rows are what tokenlife would have written, not written through it:

  tokens      n, one per user ``u<i>``: 94% active, 5% expired, 1% revoked;
              issued over the 36 hours before ``now`` in no particular row
              order (``exp`` unrelated to ``id``); lifetime 2 days, renew-until
              7 days after a first issue up to 6 days earlier, so 2 in 7 are
              at their renew-until (``exp = renew_until``)
  events      n audit events (or ``events``) over the 7 days before ``now`` (a
              seventh in the last 24 hours), in id order: renewed, delivered,
              minted, ...
  deliveries  n / 10 records on 1,000 nodes, 1% failed, 2% pending
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

DAY = 86400
#: the indexes migration 0004 adds
INDEXES = (
    "ix_tokens_renewable_exp",
    "ix_tokens_at_limit_exp",
    "ix_tokens_state_renew_until",
    "ix_events_event_at",
    "ix_deliveries_status_node",
)
SAMPLE_TOKEN = "eyJhbGciOiJIUzI1NiJ9." + "x" * 200 + ".signature"


# Each dialect gets the same rows: ``ts`` turns an epoch expression into the
# column's storage (SQLAlchemy keeps SQLite datetimes as ISO text with
# microseconds, PostgreSQL as timestamp without time zone, UTC).


def _sqlite_ts(epoch: str) -> str:
    return f"(datetime({epoch}, 'unixepoch') || '.000000')"


def _pg_ts(epoch: str) -> str:
    return f"(to_timestamp({epoch}) AT TIME ZONE 'UTC')"


def _series(dialect: str, count: int) -> tuple[str, str]:
    """(WITH clause, FROM clause) yielding ``i`` = 0 .. count-1."""
    if dialect == "sqlite":
        step = f"SELECT i + 1 FROM n WHERE i < {count - 1}"
        return f"WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL {step}) ", "FROM n"
    return "", f"FROM generate_series(0::bigint, {count - 1}) AS i"


def fill(engine: Engine, n: int, now: int, events: int | None = None) -> None:
    """Add the rows above to an empty, migrated store (ids from 1), then ANALYZE."""
    m = n if events is None else events
    sqlite = engine.dialect.name == "sqlite"
    ts = _sqlite_ts if sqlite else _pg_ts
    fmt = "printf" if sqlite else "format"
    hexid = "printf('%016x', i)" if sqlite else "lpad(to_hex(i), 16, '0')"
    least = "min" if sqlite else "least"
    iat = f"({now} - (i * 7919) % 129600)"  # within the last 36 h, scattered over the rows
    first = f"({iat} - (i % 7) * {DAY})"
    renew_until = f"({first} + {7 * DAY})"
    exp = f"{least}({iat} + {2 * DAY}, {renew_until})"  # 2 in 7 at their renew-until
    with_, from_ = _series(engine.dialect.name, n)
    tokens = (
        f'{with_}INSERT INTO tokens (id, token_id, "user", uid, gid, first_issued, iat, exp, '
        "renew_until, lifetime, key_id, version, state, token, next_check, attempts, last_error) "
        f"SELECT i + 1, {hexid} || '0000000000000000', {fmt}('u%s', i), 100000 + i, 100000 + i, "
        f"{ts(first)}, {ts(iat)}, {ts(exp)}, {ts(renew_until)}, {2 * DAY}, "
        "'sha256:bench', 1, "
        "CASE WHEN i % 100 = 0 THEN 'revoked' WHEN i % 100 < 6 THEN 'expired' "
        f"ELSE 'active' END, '{SAMPLE_TOKEN}', {ts(f'{exp} - {DAY // 2}')}, 0, '' {from_}"
    )
    kinds = (
        "CASE WHEN i % 100 < 60 THEN 'renewed' WHEN i % 100 < 80 THEN 'delivered' "
        "WHEN i % 100 < 90 THEN 'minted' WHEN i % 100 < 93 THEN 'superseded' "
        "WHEN i % 100 < 95 THEN 'failed' WHEN i % 100 < 97 THEN 'expired' "
        "WHEN i % 100 < 98 THEN 'revoked' WHEN i % 100 < 99 THEN 'removed' ELSE 'purged' END"
    )
    at = f"({now - 7 * DAY} + i * {7 * DAY} / {m})"  # appended in time order
    with_e, from_e = _series(engine.dialect.name, m)
    audit = (
        f'{with_e}INSERT INTO events (id, at, event, "user", token_id, version, actor, reason) '
        f"SELECT i + 1, {ts(at)}, {kinds}, {fmt}('u%s', (i * 7) % {n}), {hexid}, 1, "
        f"'serve@bench', '' {from_e}"
    )
    d = max(1, n // 10)
    with_d, from_d = _series(engine.dialect.name, d)
    deliveries = (
        f'{with_d}INSERT INTO deliveries (id, "user", uid, node, token_id, version, status, '
        "attempts, last_error, next_attempt, last_seen, updated) "
        f"SELECT i + 1, {fmt}('u%s', i / 4), 100000 + i / 4, "
        f"{fmt}('node%s', (i * 37) % 1000), '', 1, "
        "CASE WHEN i % 100 = 0 THEN 'failed' WHEN i % 100 < 3 THEN 'pending' "
        f"ELSE 'delivered' END, 0, CASE WHEN i % 100 = 0 THEN 'Connection refused' ELSE '' END, "
        f"{ts(str(now))}, {ts(str(now))}, {ts(f'{now} - i % 3600')} {from_d}"
    )
    with engine.begin() as conn:
        # The driver's cursor, without parameters: psycopg would take ``%`` for one.
        cursor = conn.connection.cursor()
        for statement in (tokens, audit, deliveries):
            cursor.execute(statement)
        if not sqlite:
            for table in ("tokens", "events", "deliveries"):
                cursor.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT MAX(id) FROM {table}))"
                )
    analyze(engine)


def analyze(engine: Engine) -> None:
    """What autovacuum would have done: statistics (and PostgreSQL's visibility map)."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
        else:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
