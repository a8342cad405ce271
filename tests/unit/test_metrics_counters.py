"""``tokenlife_events_total`` and ``tokenlife_build_info``: counters that
Prometheus can ``increase()``, across restarts, reloads, purges and (on
PostgreSQL) transactions that commit out of id order."""

from __future__ import annotations

import importlib.metadata
import platform
import secrets
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest
from sqlalchemy import insert

from repository.models import EventRow
from repository.rows import to_dt
from repository.store import SqlTokenStore
from tests.integration.harness.postgres import PostgresServer
from tests.unit.test_metrics import parse
from tokenlife.app.metrics import EVENT_KINDS, EventTally, Metrics, build_labels


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_tally_counts_each_event_once_from_the_first_read() -> None:
    tally = EventTally()
    assert tally.counts == dict.fromkeys(EVENT_KINDS, 0)
    tally.update(10, ())  # the daemon starts: 10 events were there before it
    assert tally.floor == 10
    tally.update(12, [(11, "minted"), (12, "renewed")])
    tally.update(13, [(11, "minted"), (12, "renewed"), (13, "renewed")])  # re-read: no double
    assert (tally.counts["minted"], tally.counts["renewed"], tally.floor) == (1, 2, 13)
    tally.update(14, [(14, "new-kind")])
    assert tally.counts["new-kind"] == 1


def test_a_missing_id_holds_the_floor_until_it_commits_or_settles() -> None:
    clock = Clock()
    tally = EventTally(settle=60, clock=clock)
    tally.update(0, ())
    # 1 and 2 are still in an open transaction; 3 committed first.
    tally.update(3, [(3, "minted")])
    assert tally.floor == 0 and tally.counts["minted"] == 1
    clock.now += 30
    tally.update(3, [(1, "renewed"), (3, "minted")])  # 1 commits
    assert (tally.floor, tally.counts["renewed"], tally.counts["minted"]) == (1, 1, 1)
    clock.now += 31  # 2 missing for over a minute: rolled back, given up
    tally.update(4, [(3, "minted"), (4, "revoked")])
    assert tally.floor == 4
    assert (tally.counts["renewed"], tally.counts["minted"], tally.counts["revoked"]) == (1, 1, 1)


def test_a_rolled_back_batch_is_given_up_at_once_and_nothing_counted_twice() -> None:
    clock = Clock()
    tally = EventTally(settle=60, clock=clock)
    tally.update(0, ())
    # ids 1-1000: a renewal batch that will roll back; 1001-1010 commit.
    committed = [(i, "renewed") for i in range(1001, 1011)]
    for _ in range(5):  # scrapes re-read them while the gap holds the floor
        tally.update(1010, committed)
        clock.now += 10
    assert (tally.floor, tally.counts["renewed"]) == (0, 10)
    clock.now += 20
    tally.update(1011, [*committed, (1011, "minted")])
    assert (tally.floor, tally.counts["renewed"], tally.counts["minted"]) == (1011, 10, 1)


def test_ids_that_go_back_restart_the_count_and_never_lower_it() -> None:
    tally = EventTally()
    tally.update(100, ())
    tally.update(101, [(101, "purged")])
    tally.update(5, [])  # every event purged (SQLite then reuses ids), or another store
    assert tally.floor == 5 and tally.counts["purged"] == 1
    tally.update(6, [(6, "purged")])
    assert tally.counts["purged"] == 2


@pytest.fixture
def store(store_url: str) -> Iterator[SqlTokenStore]:
    s = SqlTokenStore(store_url)
    try:
        yield s
    finally:
        if s._sessions is not None:
            s.engine.dispose()


def add_events(store: SqlTokenStore, *kinds: str) -> None:
    with store.transaction() as s:
        for kind in kinds:
            s.execute(
                insert(EventRow).values(
                    at=to_dt(1_800_000_000), event=kind, user="alice", actor="test", reason=""
                )
            )


def events_total(metrics: Metrics) -> dict[str, float]:
    metrics.stats.tick_done(True, 0.0)  # the next scrape reads the store again
    samples = parse(generate_latest(metrics.registry).decode())
    return {
        labels[0][1]: value
        for (name, labels), value in samples.items()
        if name == "tokenlife_events_total"
    }


def test_events_total_counts_every_writer_from_the_daemons_start(store: SqlTokenStore) -> None:
    add_events(store, "minted", "minted")  # before the daemon
    metrics = Metrics(lambda: store, 300)
    metrics.collector.begin()
    assert events_total(metrics) == dict.fromkeys(EVENT_KINDS, 0)
    add_events(store, "renewed", "renewed", "revoked")  # the daemon, the CLI, another replica
    counted = events_total(metrics)
    assert (counted["minted"], counted["renewed"], counted["revoked"]) == (0, 2, 1)

    # A purge of the whole trail never lowers a counter.
    store.purge(0, 2_000_000_000, "test", 1_800_000_000)
    assert events_total(metrics)["renewed"] == 2
    add_events(store, "renewed")
    assert events_total(metrics)["renewed"] == 3

    # A reload onto the same store keeps counting, and a restart starts at 0.
    again = SqlTokenStore(store.url)
    try:
        metrics.collector.store = lambda: again
        add_events(again, "renewed")
        assert events_total(metrics)["renewed"] == 4
        restarted = Metrics(lambda: again, 300)
        restarted.collector.begin()
        assert events_total(restarted)["renewed"] == 0
    finally:
        again.close()


def test_out_of_order_commits_are_counted_once(postgres: PostgresServer) -> None:
    """PostgreSQL: an event committed after a later id was read is still counted.

    (SQLite commits in id order: one writer at a time.)
    """
    name = f"tl_{secrets.token_hex(6)}"
    url = postgres.create_database(name)
    early, late = SqlTokenStore(url), SqlTokenStore(url)
    try:
        metrics = Metrics(lambda: late, 300)
        metrics.collector.begin()
        with early.transaction() as slow:  # takes its id first, commits last
            slow.execute(
                insert(EventRow).values(
                    at=to_dt(1_800_000_000), event="renewed", user="bob", actor="a", reason=""
                )
            )
            add_events(late, "minted")
            assert events_total(metrics)["minted"] == 1
            assert events_total(metrics)["renewed"] == 0
        counted = events_total(metrics)
        assert (counted["minted"], counted["renewed"]) == (1, 1)
        assert events_total(metrics)["renewed"] == 1  # and only once
    finally:
        early.close()
        late.close()
        postgres.drop_database(name)


def test_build_info_is_the_installed_package() -> None:
    labels = build_labels()
    assert labels["version"] == importlib.metadata.version("tokenlife")
    assert labels["python"] == platform.python_version()
    assert set(labels) == {"version", "python", "implementation", "sqlalchemy"}
