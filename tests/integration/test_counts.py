"""The counts that ``tokenlife status`` and the metrics show, kept by the database
(migration 0005, repository/counts.py), on SQLite and a real PostgreSQL (SQLite
keeps the token counts only; its event counts come from the index, and are
checked the same way).

Tokens per state and the last 24 hours' audit events per kind are exact
after every way a token enters or leaves a state or an event is written or
removed (mint, supersede, renewal, expiry, failure, revoke, purge, purge of
old events, an administrator's INSERT, DELETE or TRUNCATE, a rolled-back
transaction); at windows that cut a 10-minute bucket anywhere; right after
an upgrade of a store that already holds tokens and events (also while an
older writer keeps writing); and under concurrent writers on PostgreSQL:
minters, two renewer replicas (SKIP LOCKED), a revoker, a purger and two
folders at once.  Each check compares the kept counts with a recount of
the table itself, and with the figures the scenario expects."""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, text

from repository.counts import (
    BUCKET,
    KEEP,
    PG_TRIGGERS,
    TRIGGERS,
    compact,
    event_counts,
    fold,
    recount_events,
    recount_tokens,
    token_counts,
)
from repository.migrate import HEAD, current, migrate
from repository.models import EventCountRow, TokenCountRow
from repository.rows import audit
from repository.status import WINDOW, snapshot
from repository.store import SqlTokenStore, make_engine
from tests.integration.harness.bigstore import DAY, fill
from tokenlife.records import Expired, Failed, Outcome, Renewed, TokenRecord, Waiting

NOW = 1_800_000_000  # a multiple of BUCKET: NOW - WINDOW starts a bucket
LIFETIME = 3600
#: windows a status may ask for: on a bucket's edge, just after, inside, ...
SINCES = (NOW - WINDOW, NOW - WINDOW + 1, NOW - WINDOW + 599, NOW - 3601, NOW - 1, NOW + 1000)


def token(user: str, token_id: str, iat: int = NOW, renew_until: int = NOW + DAY) -> TokenRecord:
    exp = min(iat + LIFETIME, renew_until)
    return TokenRecord(
        token_id, user, 1000, 1000, iat, iat, exp, renew_until, LIFETIME, "k", token="a.b.c"
    )


def counts(active: int, expired: int, revoked: int) -> dict[str, int]:
    return {"active": active, "expired": expired, "revoked": revoked}


def kept_and_counted(store: SqlTokenStore) -> tuple[dict[str, int], dict[str, int]]:
    with store.transaction(read_only=True) as s:
        return token_counts(s), recount_tokens(s)


def assert_counts(store: SqlTokenStore, expected: dict[str, int]) -> None:
    kept, counted = kept_and_counted(store)
    assert counted == expected  # the scenario did what it says ...
    assert kept == expected  # ... and the kept counts say the same
    assert snapshot(store, NOW).tokens == expected  # which is what status shows


def assert_events(store: SqlTokenStore, expected: dict[str, int]) -> None:
    """The last 24 hours' events are ``expected``; every window in SINCES is exact."""
    with store.transaction(read_only=True) as s:
        assert recount_events(s, NOW - WINDOW) == expected
        for since in SINCES:
            assert event_counts(s, since) == recount_events(s, since), since
    assert snapshot(store, NOW).events == expected


def count_rows(store: SqlTokenStore, table: Any = TokenCountRow) -> tuple[int, int]:
    """(rows in a kept counts table, its greatest id): the id moves on at every append."""
    with store.transaction(read_only=True) as s:
        n, top = s.execute(select(func.count(), func.max(table.id))).one()
        return int(n), int(top or 0)


def postgresql(store: SqlTokenStore) -> bool:
    store._open()
    return store.engine.dialect.name == "postgresql"


def execute(store: SqlTokenStore, statement: str) -> None:
    with store.transaction() as s:
        s.execute(text(statement))


def event(store: SqlTokenStore, at: int, kind: str, user: str = "x") -> None:
    with store.transaction() as s:
        audit(s, at, kind, user, None, None, "test", "")


def renewed(record: TokenRecord, next_check: int) -> Renewed:
    return Renewed("n.e.w", record.iat, record.exp, next_check, "k")


@pytest.fixture
def store(store_url: str) -> Iterator[SqlTokenStore]:
    s = SqlTokenStore(store_url)
    try:
        yield s
    finally:
        s.close()


def test_the_triggers_exist_at_head(store: SqlTokenStore) -> None:
    """A later migration that rebuilds ``tokens`` or ``events`` (SQLite: batch
    mode) must make them again."""
    store._open()
    with store.engine.connect() as c:
        assert current(c) == HEAD
        if c.dialect.name == "sqlite":
            query = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
            expected = set(TRIGGERS)
        else:
            query = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
            expected = {*TRIGGERS, *PG_TRIGGERS}
        assert set(c.exec_driver_sql(query).scalars()) == expected


def test_counts_are_exact_after_every_change(store: SqlTokenStore) -> None:
    renewals = store.renewals
    assert_counts(store, counts(0, 0, 0))
    assert_events(store, {})

    # Mints; u0..u2's first tokens already past their renew-until (never renewed).
    for i in range(10):
        early = i < 3
        iat, until = (NOW - 2 * LIFETIME, NOW - 100) if early else (NOW, NOW + DAY)
        store.save(token(f"u{i}", f"t{i}a", iat, until), "minted", "test")
    assert_counts(store, counts(10, 0, 0))
    assert_events(store, {"minted": 10})

    # A new token supersedes the user's previous one.
    for i in range(3):
        store.save(token(f"u{i}", f"t{i}b", NOW), "minted", "test")
    assert_counts(store, counts(10, 3, 0))
    assert_events(store, {"minted": 13, "superseded": 3})

    # A renewal changes no state: it appends no token count (its events, yes).
    compact(store, NOW)
    before = count_rows(store)
    done = renewals.process(NOW, lambda r: renewed(r, NOW + 1800), "test")
    assert len(done) == 10 and all(isinstance(o, Renewed) for _, o in done)
    assert [r.version for r in store.records() if r.state == "active"] == [2] * 10
    assert count_rows(store) == before
    assert_counts(store, counts(10, 3, 0))
    assert_events(store, {"minted": 13, "renewed": 10, "superseded": 3})

    # The renewer's bulk writes: two expire, one fails, the others wait.
    def mixed(record: TokenRecord) -> Outcome:
        if record.user in ("u3", "u4"):
            return Expired("past renew-until")
        if record.user == "u5":
            return Failed("signing failed", NOW + 60)
        return Waiting(NOW + 5000)

    done = renewals.process(NOW + 2000, mixed, "test")
    assert sorted(type(o).__name__ for _, o in done).count("Expired") == 2
    assert_counts(store, counts(8, 5, 0))
    day = {"expired": 2, "failed": 1, "minted": 13, "renewed": 10, "superseded": 3}
    assert_events(store, day)
    # The run folded what it appended: a row per state, per bucket and kind
    # (minted in two: NOW - 2 h and NOW; SQLite keeps no event rows).
    assert count_rows(store)[0] <= 3
    assert count_rows(store, EventCountRow)[0] == (6 if postgresql(store) else 0)

    # Revoke.
    assert renewals.set_state("u6", "revoked", "revoked", "admin", "", NOW) == 1
    assert_counts(store, counts(7, 5, 1))
    assert_events(store, day | {"revoked": 1})

    # Purge: the three superseded tokens are past their renew-until; events
    # before NOW - 1 h go too (the three first mints at NOW - 2 h, and one of
    # four days ago).
    event(store, NOW - 4 * DAY, "delivered")
    purged, dropped = store.purge(NOW, NOW - 3600, "test", NOW)
    assert sorted(r.token_id for r in purged) == ["t0a", "t1a", "t2a"] and dropped == 4
    assert_counts(store, counts(7, 2, 1))
    day |= {"minted": 10, "revoked": 1, "purged": 3}
    assert_events(store, day)
    assert count_rows(store)[0] <= 3  # the purge folded its appends

    # Whoever writes: an administrator's SQL, an event dated in the past
    # (as the spool's are), or in the last bucket.
    execute(store, "DELETE FROM tokens WHERE \"user\" = 'u8'")
    execute(store, "UPDATE tokens SET state = state")  # no change of state
    execute(store, "UPDATE tokens SET state = 'revoked' WHERE \"user\" = 'u9'")
    assert_counts(store, counts(5, 2, 2))
    event(store, NOW - WINDOW + 30, "delivered")  # in the bucket a 24 h window cuts
    event(store, NOW - 5, "delivered")
    execute(store, "DELETE FROM events WHERE event = 'failed'")
    execute(store, "UPDATE events SET event = 'removed' WHERE event = 'expired'")
    day = {k: n for k, n in day.items() if k not in ("failed", "expired")}
    assert_events(store, day | {"delivered": 2, "removed": 2})

    # A transaction that rolls back takes its counts with it.
    with pytest.raises(RuntimeError), store.transaction() as s:
        s.execute(text("UPDATE tokens SET state = 'revoked' WHERE state = 'active'"))
        s.execute(text("DELETE FROM tokens WHERE state = 'expired'"))
        s.execute(text("DELETE FROM events"))
        assert token_counts(s) == counts(0, 0, 7)  # seen inside it
        assert event_counts(s, NOW - WINDOW) == {}
        raise RuntimeError("roll back")
    assert_counts(store, counts(5, 2, 2))
    assert_events(store, day | {"delivered": 2, "removed": 2})

    # Everything gone at once.
    for table in ("tokens", "events"):
        if store.engine.dialect.name == "postgresql":
            execute(store, f"TRUNCATE {table}")
        else:
            execute(store, f"DELETE FROM {table}")
    assert_counts(store, counts(0, 0, 0))
    assert_events(store, {})
    store.save(token("u0", "t0c"), "minted", "test")
    assert_counts(store, counts(1, 0, 0))
    assert_events(store, {"minted": 1})


def test_windows_cut_buckets_exactly(store: SqlTokenStore) -> None:
    """Events on, just before and just after bucket edges, windows starting anywhere."""
    edge = NOW - WINDOW + 7 * BUCKET
    for at in (edge - 1, edge, edge + 1, edge + BUCKET - 1, edge + BUCKET, NOW, NOW + 3600):
        event(store, at, "renewed")
        event(store, at, "delivered" if at % 2 else "failed")
    sinces = {*range(edge - 2, edge + 3), *range(edge + BUCKET - 3, edge + BUCKET + 3)}
    with store.transaction(read_only=True) as s:
        for since in sorted(sinces | {edge + 300, NOW - 1, NOW, NOW + 3599, NOW + 3600}):
            assert event_counts(s, since) == recount_events(s, since), since
        assert event_counts(s, edge - 1) == {"delivered": 2, "failed": 4, "renewed": 6}
        assert event_counts(s, edge + BUCKET) == {"failed": 2, "renewed": 2}


def test_folding_keeps_the_sums(store: SqlTokenStore) -> None:
    for i in range(20):
        store.save(token(f"u{i % 4}", f"t{i}", NOW - i * 100), "minted", "test")
    execute(store, "UPDATE tokens SET state = 'revoked' WHERE \"user\" = 'u0' AND state = 'active'")
    event(store, NOW - KEEP - 2 * BUCKET, "delivered")  # older than folds keep
    pg = postgresql(store)
    tokens, events = count_rows(store)[0], count_rows(store, EventCountRow)[0]
    assert tokens > 20 and events == (21 + 16 if pg else 0)
    expected = counts(3, 16, 1)
    assert_counts(store, expected)
    day = {"minted": 20, "superseded": 16}
    assert_events(store, day)
    with store.transaction() as s:
        assert fold(s, NOW) == tokens + events
    # A row per state; per bucket and kind: the mints of NOW - 1900 .. NOW are
    # in 5 buckets, the supersedes in 4 (the first mint superseded nothing).
    assert count_rows(store)[0] == 3
    assert count_rows(store, EventCountRow)[0] == (9 if pg else 0)
    assert_counts(store, expected)
    assert_events(store, day)
    # Folded: nothing more to do.
    with store.transaction() as s:
        assert fold(s, NOW) == 3 + (9 if pg else 0)
    # A state that sums to 0 leaves no row; nor do buckets older than KEEP
    # (a fold KEEP later: all but NOW's).
    execute(store, "DELETE FROM tokens WHERE state = 'revoked'")
    compact(store, NOW + KEEP)
    assert count_rows(store)[0] == 2
    assert count_rows(store, EventCountRow)[0] == (1 if pg else 0)
    assert_counts(store, counts(3, 16, 0))
    with store.transaction(read_only=True) as s:
        for since in (NOW - 1, NOW + KEEP - WINDOW):
            assert event_counts(s, since) == recount_events(s, since)
        assert event_counts(s, NOW - 1) == {"minted": 1}


def test_a_failed_fold_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    broken = SqlTokenStore("postgresql+psycopg://nobody:x@127.0.0.1:1/none")
    with caplog.at_level(logging.WARNING, logger="repository.counts"):
        assert compact(broken, NOW) == 0
    assert "cannot fold the kept counts (they stay exact)" in caplog.text


def test_upgrade_from_0004_counts_what_is_stored(store_url: str) -> None:
    engine = make_engine(store_url)
    migrate(engine, "0004")
    fill(engine, 7000, NOW)  # 94% active, 5% expired, 1% revoked; events over 7 days
    engine.dispose()

    store = SqlTokenStore(store_url)
    try:
        store._open()  # opening upgrades
        with store.engine.connect() as c:
            assert current(c) == HEAD
        assert_counts(store, counts(6580, 350, 70))
        assert count_rows(store)[0] == 3  # one row per state, as counted
        with store.transaction(read_only=True) as s:
            day = recount_events(s, NOW - WINDOW)
            assert 990 < sum(day.values()) <= 1000 and len(day) == 9  # a seventh, every kind
            for since in (*SINCES, NOW - 6 * DAY - 1, NOW - 7 * DAY - 1):
                assert event_counts(s, since) == recount_events(s, since), since
        assert_events(store, day)
        # And from there on, the triggers: u10's token (active) is superseded.
        store.save(token("u10", "fresh"), "minted", "test")
        assert_counts(store, counts(6580, 351, 70))
        assert_events(store, day | {k: day[k] + 1 for k in ("minted", "superseded")})
    finally:
        store.close()


def test_upgrade_while_an_older_writer_writes(store_url: str) -> None:
    """A replica still running 0004's code keeps minting and expiring tokens,
    and auditing it, through the upgrade: nothing is missed or counted twice."""
    engine = make_engine(store_url)
    migrate(engine, "0004")
    stop = threading.Event()
    writes: list[float] = []
    errors: list[BaseException] = []

    def old_writer() -> None:
        writer = make_engine(store_url)
        try:
            for i in itertools.count():
                if stop.is_set():
                    return
                with writer.begin() as c:
                    c.execute(
                        text(
                            'INSERT INTO tokens (token_id, "user", uid, gid, first_issued, iat, '
                            "exp, renew_until, lifetime, key_id, version, state, token, "
                            "next_check) VALUES (:id, :user, 1000, 1000, '2027-01-15 00:00:00', "
                            "'2027-01-15 00:00:00', '2027-01-15 01:00:00', '2027-01-16 00:00:00', "
                            "3600, 'k', 1, 'active', 'a.b.c', '2027-01-15 00:00:00')"
                        ),
                        {"id": f"old{i}", "user": f"w{i}"},
                    )
                    c.execute(
                        text(
                            'INSERT INTO events (at, event, "user", token_id, version, actor, '
                            "reason) VALUES ('2027-01-15 00:00:00', 'minted', :user, :id, 1, "
                            "'old', '')"
                        ),
                        {"id": f"old{i}", "user": f"w{i}"},
                    )
                    if i % 3 == 0:
                        c.execute(
                            text("UPDATE tokens SET state = 'expired' WHERE token_id = :id"),
                            {"id": f"old{i // 2}"},
                        )
                writes.append(time.monotonic())
        except BaseException as exc:
            errors.append(exc)
        finally:
            writer.dispose()

    thread = threading.Thread(target=old_writer)
    thread.start()
    try:
        while len(writes) < 50 and thread.is_alive():
            time.sleep(0.01)
        started = time.monotonic()
        migrate(engine)  # what the new release's first command does
        finished = time.monotonic()
        deadline = time.monotonic() + 30
        while not [t for t in writes if t > finished + 0.2] and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
        engine.dispose()
    assert not errors, errors
    assert [t for t in writes if t < started] and [t for t in writes if t > finished]

    store = SqlTokenStore(store_url)
    try:
        kept, counted = kept_and_counted(store)
        assert kept == counted
        assert counted["active"] > 0 and counted["expired"] > 0
        assert sum(counted.values()) == len(writes)
        assert_events(store, {"minted": len(writes)})  # at 2027-01-15 00:00, NOW - 8 h
    finally:
        store.close()


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_concurrent_writers_keep_the_counts_exact(store_url: str) -> None:
    """Minters (each superseding its users' tokens), two renewer replicas
    expiring and renewing with SKIP LOCKED, a revoker, a purger (of tokens and
    old events) and two folders, each with its own engine, all at once; then
    the kept counts equal a recount."""
    seeded = 2000
    setup = SqlTokenStore(store_url)
    setup._open()
    fill(setup.engine, seeded, NOW)
    setup.close()

    stop = threading.Event()
    errors: list[BaseException] = []
    done: dict[str, int] = {}
    lock = threading.Lock()

    def tally(name: str, n: int = 1) -> None:
        with lock:
            done[name] = done.get(name, 0) + n

    def worker(name: str, step: Callable[[SqlTokenStore, random.Random], None]) -> Any:
        def run() -> None:
            store = SqlTokenStore(store_url)
            rng = random.Random(name)
            try:
                while not stop.is_set():
                    step(store, rng)
            except BaseException as exc:
                errors.append(exc)
                stop.set()
            finally:
                store.close()

        return threading.Thread(target=run, name=name)

    serial = itertools.count()

    def mint(store: SqlTokenStore, rng: random.Random) -> None:
        # Users of their own (m0..m39): purge never deletes what a mint supersedes.
        store.save(token(f"m{rng.randrange(40)}", f"m{next(serial)}"), "minted", "test")
        tally("minted")

    def renew(store: SqlTokenStore, rng: random.Random) -> None:
        def handle(record: TokenRecord) -> Outcome:
            if rng.random() < 0.15:
                tally("expired")
                return Expired("test")
            return renewed(record, NOW - 1)  # due again at the next run

        store.renewals.process(NOW, handle, "test", batch=50)

    def revoke(store: SqlTokenStore, rng: random.Random) -> None:
        # Fill's users with i % 7 == 0 are never purged (renew-until 5.5 days on);
        # the minters' users too.
        user = (
            f"u{7 * rng.randrange(seeded // 7)}" if rng.random() < 0.5 else f"m{rng.randrange(40)}"
        )
        tally("revoked", store.renewals.set_state(user, "revoked", "revoked", "test", "", NOW))

    befores = itertools.count(NOW - 12 * 3600, 1800)

    def purge(store: SqlTokenStore, rng: random.Random) -> None:
        before = next(befores)
        if before > NOW + DAY:
            time.sleep(0.01)
            return
        purged, dropped = store.purge(before, before - 3 * DAY, "test", NOW)
        tally("purged", len(purged))
        tally("dropped", dropped)

    def folder(store: SqlTokenStore, rng: random.Random) -> None:
        with store.transaction() as s:
            rows = s.scalar(select(func.count()).select_from(TokenCountRow))
            fold(s, NOW)
        tally("folded", int(rows or 0) > 3)

    threads = [
        *(worker(f"minter{i}", mint) for i in range(3)),
        *(worker(f"renewer{i}", renew) for i in range(2)),
        worker("revoker", revoke),
        worker("purger", purge),
        *(worker(f"folder{i}", folder) for i in range(2)),
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    wanted = {
        "minted": 300,
        "expired": 300,
        "revoked": 30,
        "purged": 100,
        "dropped": 500,
        "folded": 20,
    }
    while not stop.is_set() and time.monotonic() < deadline:
        with lock:
            if all(done.get(k, 0) >= n for k, n in wanted.items()):
                break
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert all(done.get(k, 0) >= n for k, n in wanted.items()), done

    store = SqlTokenStore(store_url)
    try:
        kept, counted = kept_and_counted(store)
        assert kept == counted, done
        assert min(counted.values()) > 0
        assert sum(counted.values()) == seeded + done["minted"] - done["purged"]
        with store.transaction(read_only=True) as s:
            day = recount_events(s, NOW - WINDOW)
            # (and the fill's own events of the last 24 h)
            assert day["renewed"] > 1000 and day["purged"] >= done["purged"]
            assert day["minted"] >= done["minted"]
            for since in SINCES:
                assert event_counts(s, since) == recount_events(s, since), since
        compact(store, NOW)
        assert count_rows(store)[0] <= 3
        assert kept_and_counted(store) == (counted, counted)
        assert_events(store, day)
    finally:
        store.close()
