"""Migration 0004, the indexes of ``tokenlife status`` and the metrics scrape, on
SQLite and a real PostgreSQL: existing stores get them on upgrade, the ORM
declares what the migrations build, and every lookup of a snapshot goes
through its index (EXPLAIN on a store big enough for the planner to choose:
a plan, not a timing; bench/bench_status.py has the timings)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, func, inspect, select, text

from repository.migrate import HEAD, current, migrate
from repository.models import Base, EventRow, TokenRow
from repository.rows import to_dt
from repository.status import WINDOW, snapshot
from repository.store import SqlTokenStore, make_engine
from tests.integration.harness.bigstore import INDEXES, fill

NOW = 1_800_000_000
#: (what identifies a snapshot's statement, the index its plan must use: one
#: name, or several separated by "|" where the planner may fairly choose)
LOOKUPS = (
    ("WHERE state = 'active' AND exp < renew_until", "ix_tokens_renewable_exp"),
    ("WHERE state = 'active' AND exp >= renew_until", "ix_tokens_at_limit_exp"),
    ("tokens.renew_until, tokens.lifetime, tokens.id FROM tokens", "ix_tokens_state_renew_until"),
    ("WITH RECURSIVE kinds", "ix_events_event_at"),
    # The last renewal: (event, at) gives it at once; PostgreSQL may also walk
    # ix_events_at backwards, filtering on the kind, when its statistics say
    # renewals are most events (they are, in the filled store): a few entries.
    ("ORDER BY events.at DESC", "ix_events_event_at|ix_events_at"),
    ("SELECT deliveries.node, deliveries.status, count(*)", "ix_deliveries_status_node"),
)


def test_upgrade_from_0003_adds_the_indexes(store_url: str) -> None:
    engine = make_engine(store_url)
    migrate(engine, "0003")
    with engine.begin() as c:
        c.execute(
            text(
                'INSERT INTO tokens (token_id, "user", uid, gid, first_issued, iat, exp, '
                "renew_until, lifetime, key_id, version, state, token, next_check) VALUES "
                "('abc', 'alice', 1000, 1000, '2027-01-15 00:00:00', '2027-01-15 00:00:00', "
                "'2027-01-17 00:00:00', '2027-01-22 00:00:00', 172800, 'k', 1, 'active', "
                "'a.b.c', '2027-01-16 12:00:00')"
            )
        )
        c.execute(
            text(
                'INSERT INTO events (at, event, "user", token_id, version, actor, reason) '
                "VALUES ('2027-01-15 00:00:00', 'minted', 'alice', 'abc', 1, 'pam', '')"
            )
        )
    engine.dispose()

    store = SqlTokenStore(store_url)
    store._open()  # opening upgrades
    try:
        with store.engine.connect() as c:
            assert current(c) == HEAD
        inspector = inspect(store.engine)
        names = {
            ix["name"]
            for table in ("tokens", "events", "deliveries")
            for ix in inspector.get_indexes(table)
        }
        assert set(INDEXES) <= names
        renewable = next(
            ix for ix in inspector.get_indexes("tokens") if ix["name"] == "ix_tokens_renewable_exp"
        )
        where = str(next(iter(renewable.get("dialect_options", {}).values()), ""))
        assert "renew_until" in where  # partial: only tokens renewal can still extend

        now = 1_800_000_000  # 2027-01-15 08:00 UTC
        snap = snapshot(store, now)
        assert snap.tokens["active"] == 1 and snap.events == {"minted": 1}
        assert snap.soonest_renewable is not None
        assert (snap.soonest_renewable.user, snap.soonest_renewable.lifetime) == ("alice", 172800)
        assert snap.soonest_renewable.at == 1_800_000_000 - 8 * 3600 + 2 * 86400
    finally:
        store.engine.dispose()


def test_models_match_migrations(store_url: str) -> None:
    """What the ORM declares is what the migrations build, on both backends."""
    engine = make_engine(store_url)
    try:
        migrate(engine)
        with engine.connect() as c:
            assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []
    finally:
        engine.dispose()


@pytest.fixture
def big_store(store_url: str) -> Iterator[SqlTokenStore]:
    store = SqlTokenStore(store_url)
    store._open()
    fill(store.engine, 50_000, NOW)
    try:
        yield store
    finally:
        store.engine.dispose()


def explain(store: SqlTokenStore, statement: str, params: Any) -> str:
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params).all()
            return "\n".join(str(r[-1]) for r in rows)
        rows = conn.exec_driver_sql(f"EXPLAIN {statement}", params).all()
        return "\n".join(str(r[0]) for r in rows)


def test_a_snapshot_looks_up_along_the_indexes(big_store: SqlTokenStore) -> None:
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        sent.append((" ".join(statement.split()), params))

    event.listen(big_store.engine, "before_cursor_execute", capture)
    try:
        snap = snapshot(big_store, NOW)
    finally:
        event.remove(big_store.engine, "before_cursor_execute", capture)
    assert snap.soonest_exp and snap.soonest_renew_until and snap.soonest_renewable
    assert snap.nodes and snap.last_renewal
    # The counts along the indexes are the plain GROUP BY's.
    with big_store.engine.connect() as c:
        rows = c.execute(select(TokenRow.state, func.count()).group_by(TokenRow.state))
        states = {state: n for state, n in rows}
        since = to_dt(NOW - WINDOW)
        kinds = c.execute(
            select(EventRow.event, func.count()).where(EventRow.at > since).group_by(EventRow.event)
        )
    assert snap.tokens == states and sum(states.values()) == 50_000
    assert snap.events == {kind: n for kind, n in kinds} and len(snap.events) > 5

    # The tokens per state are the sums of token_counts (migration 0005):
    # no statement of a snapshot counts tokens.
    assert [s for s, _ in sent if "FROM token_counts" in s]
    assert not [s for s, _ in sent if re.search(r"count\(\*\).* FROM tokens\b", s)], sent

    for marker, index in LOOKUPS:
        found = [(s, p) for s, p in sent if marker in s]
        assert len(found) == 1, f"no single statement with {marker!r}: {[s for s, _ in sent]}"
        plan = explain(big_store, *found[0])
        assert any(name in plan for name in index.split("|")), f"{marker!r}: not {index}:\n{plan}"
        # Read in index order (SQLite: "SCAN t USING INDEX" from its first
        # entry, LIMIT 1 stops there): no sort, no scan of a table's rows.
        assert "TEMP B-TREE FOR ORDER BY" not in plan and "Seq Scan" not in plan, plan
        assert not re.search(r"^\s*SCAN (tokens|events|deliveries)$", plan, re.M), plan
