"""Upgrading a store made by the first release, on SQLite and a real PostgreSQL."""

from __future__ import annotations

from sqlalchemy import inspect, text

from repository.migrate import HEAD, current, migrate
from repository.store import SqlTokenStore, make_engine
from tokenlife.records import DeliveryResult, TokenRecord


def test_upgrade_from_0001_keeps_tokens_and_the_audit_trail(store_url: str) -> None:
    engine = make_engine(store_url)
    migrate(engine, "0001")
    with engine.begin() as c:
        c.execute(
            text(
                'INSERT INTO tokens (token_id, "user", uid, gid, first_issued, iat, exp, '
                "renew_until, lifetime, key_id, version, state, token) VALUES "
                "('abc', 'alice', 1000, 1000, '2026-01-01 00:00:00', '2026-01-01 00:00:00', "
                "'2026-01-03 00:00:00', '2026-01-08 00:00:00', 172800, 'k', 3, 'active', 'a.b.c')"
            )
        )
        for event in ("minted", "renewed"):
            c.execute(
                text(
                    'INSERT INTO events (at, event, "user", token_id, version, actor, reason) '
                    "VALUES ('2026-01-01 00:00:00', :event, 'alice', 'abc', 3, 'pam', '')"
                ),
                {"event": event},
            )
    engine.dispose()

    store = SqlTokenStore(store_url)
    try:
        check_upgraded(store)
    finally:
        store.engine.dispose()


def check_upgraded(store: SqlTokenStore) -> None:
    record = store.current("alice")
    assert record is not None
    assert (record.version, record.token, record.attempts, record.exp) == (
        3,
        "a.b.c",
        0,
        1767398400,  # 2026-01-03T00:00:00Z
    )
    with store.engine.connect() as c:
        assert current(c) == HEAD
    inspector = inspect(store.engine)
    assert {"next_check", "attempts", "last_error"} <= {
        col["name"] for col in inspector.get_columns("tokens")
    }
    assert "deliveries" in inspector.get_table_names()
    assert {"claimed_by", "claimed_until"} <= {
        col["name"] for col in inspector.get_columns("deliveries")
    }
    assert inspector.get_foreign_keys("events") == []
    old_trail = store.events("alice")
    assert [(e["event"], e["token_id"]) for e in old_trail] == [
        ("minted", "abc"),
        ("renewed", "abc"),
    ]

    # New events continue after the copied ones (PostgreSQL's id sequence moved on).
    store.save(
        TokenRecord(
            "def",
            "alice",
            1000,
            1000,
            1_800_000_000,
            1_800_000_000,
            1_800_003_600,
            1_800_086_400,
            3600,
            token="d.e.f",
        ),
        "minted",
        "test",
    )
    trail = store.events("alice")
    assert len(trail) == 4 and trail[-1]["token_id"] == "def"
    assert (trail[-2]["event"], trail[-2]["token_id"]) == ("superseded", "abc")

    # Purging the old token keeps its history.
    purged, _ = store.purge(1_800_000_000, None, "test", 1_800_000_000)
    assert [r.token_id for r in purged] == ["abc"]
    assert [e["event"] for e in store.events("alice") if e["token_id"] == "abc"] == [
        "minted",
        "renewed",
        "superseded",
        "purged",
    ]


def test_upgrade_from_0005_leaves_every_delivery_free_to_claim(store_url: str) -> None:
    """0006 adds the claim columns in place: stored records keep their ids and
    state, no replica holds them, and the token count triggers of 0005 stay."""
    engine = make_engine(store_url)
    migrate(engine, "0005")
    with engine.begin() as c:
        c.execute(
            text(
                'INSERT INTO tokens (token_id, "user", uid, gid, first_issued, iat, exp, '
                "renew_until, lifetime, key_id, version, state, token, next_check, attempts, "
                "last_error) VALUES ('abc', 'alice', 1000, 1000, '2026-01-01 00:00:00', "
                "'2026-01-01 00:00:00', '2026-01-03 00:00:00', '2026-01-08 00:00:00', 172800, "
                "'k', 2, 'active', 'a.b.c', '2026-01-02 00:00:00', 0, '')"
            )
        )
        for node, version in (("n1", 1), ("n2", 2)):  # n1 is owed version 2
            c.execute(
                text(
                    'INSERT INTO deliveries ("user", uid, node, token_id, version, status, '
                    "attempts, last_error, next_attempt, last_seen, updated) VALUES "
                    "('alice', 1000, :node, 'abc', :version, 'delivered', 0, '', "
                    "'2026-01-01 00:00:00', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
                ),
                {"node": node, "version": version},
            )
    engine.dispose()

    store = SqlTokenStore(store_url)
    try:
        now = 1767225600  # 2026-01-01T00:00:00Z
        claim = store.deliveries.claim(now, "replica-a", 60, 100)
        assert [(t.delivery.node, t.delivery.version) for t in claim.tasks] == [("n1", 1)]
        assert store.deliveries.claim(now, "replica-b", 60, 100).tasks == []  # a holds it
        token = claim.tasks[0].token
        assert token is not None and token.version == 2
        done = DeliveryResult("alice", "n1", True, token.token_id, token.version)
        assert store.deliveries.record([done], now, "test", "replica-a") == []
        assert {(d.node, d.version) for d in store.deliveries.deliveries()} == {
            ("n1", 2),
            ("n2", 2),
        }
        with store.engine.connect() as c:
            assert current(c) == HEAD
            assert c.scalar(text("SELECT sum(n) FROM token_counts")) == 1  # triggers kept
        indexes = {ix["name"] for ix in inspect(store.engine).get_indexes("deliveries")}
        assert "ix_deliveries_claimed_by" in indexes
    finally:
        store.close()
