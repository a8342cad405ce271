"""Delivery claims: one replica at a time per (user, node), leases that lapse, stale results.

The ledger's claims (repository/delivery_store.py) run on a real SQLite file
and a real PostgreSQL database (``store_url``); the cycle's use of them
(transfer/cycle.py: leases kept, work given back, stale pushes) on SQLite
with the local transport, two DeliveryCycles standing for two replicas, and
a transport that holds a push at a gate the test opens.  Clocks are fake:
leases lapse because the test moves the time, never by waiting.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, func, select, text

from repository.models import DeliveryRow
from repository.rows import to_dt
from repository.store import SqlTokenStore
from tests.conftest import require_root
from tests.integration.harness.postgres import PostgresServer
from tokenlife.errors import TransportError
from tokenlife.records import DeliveryResult, DeliveryTask, TokenFile, TokenRecord
from tokenlife.testing.fakes import FakeClock
from tokenlife.testing.store_contract import record
from transfer import nodefs
from transfer.cycle import DeliveryCycle, DeliverySummary, gone_from_here
from transfer.transports import LocalTransport

NOW = 1_800_000_000
LEASE = 60
BASE = Path("/run/tokenlife")
UIDS = {"tlalice": 1001, "tlbob": 1002} | {f"tl{u}": 2000 + u for u in range(5)}
NODES = {"tlalice": {"n1", "n2", "n3"}, "tlbob": {"n1", "n4", "n5"}}


@pytest.fixture
def store(store_url: str) -> Iterator[SqlTokenStore]:
    made = SqlTokenStore(store_url)
    yield made
    made.close()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    name = f"tl_{secrets.token_hex(6)}"
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqlTokenStore]:
    require_root()  # the local transport hands files to their users
    made = SqlTokenStore(f"sqlite:///{tmp_path}/store/tokenlife.db")
    yield made
    made.close()


def seed(store: SqlTokenStore, needs: dict[str, set[str]] = NODES) -> dict[str, TokenRecord]:
    """A current token per user, and a record per (user, node) owed it."""
    tokens = {}
    for user in needs:
        tokens[user] = record(user, uid=UIDS[user], gid=UIDS[user], first_issued=NOW - 100)
        store.save(tokens[user], "minted", "test")
    store.deliveries.sync_needs(needs, UIDS, NOW - 10, None)
    return tokens


def pairs(tasks: list[DeliveryTask]) -> set[tuple[str, str]]:
    return {(t.delivery.user, t.delivery.node) for t in tasks}


def done(tasks: list[DeliveryTask]) -> list[DeliveryResult]:
    """Every task delivered (what the transport would have said)."""
    results = []
    for t in tasks:
        d = t.delivery
        if t.token is None:
            results.append(DeliveryResult(d.user, d.node, True, removed=True))
        else:
            token = t.token
            results.append(
                DeliveryResult(
                    d.user, d.node, True, token.token_id, token.version, outcome=nodefs.INSTALLED
                )
            )
    return results


def claimed(store: SqlTokenStore) -> dict[tuple[str, str], str]:
    with store.transaction(read_only=True) as s:
        rows = s.execute(
            select(DeliveryRow.user, DeliveryRow.node, DeliveryRow.claimed_by).where(
                DeliveryRow.claimed_by.is_not(None)
            )
        ).all()
    return {(u, n): str(c) for u, n, c in rows}


def delivered_events(store: SqlTokenStore) -> Counter[tuple[str, str, str]]:
    return Counter(
        (str(e["user"]), str(e["reason"]), str(e["actor"]))
        for e in store.events()
        if e["event"] == "delivered"
    )


# -- the ledger, on SQLite and PostgreSQL -------------------------------------------------


def test_a_claim_holds_its_records_until_its_lease_ends(store: SqlTokenStore) -> None:
    seed(store)
    ledger = store.deliveries
    a = ledger.claim(NOW, "a", LEASE, 100)
    assert pairs(a.tasks) == {(u, n) for u, nodes in NODES.items() for n in nodes}
    assert not a.more
    assert ledger.claim(NOW, "b", LEASE, 100).tasks == []
    assert ledger.claim(NOW + LEASE - 1, "b", LEASE, 100).tasks == []  # still a's
    b = ledger.claim(NOW + LEASE, "b", LEASE, 100)  # a's lease ended: a died
    assert pairs(b.tasks) == pairs(a.tasks)
    assert set(claimed(store).values()) == {"b"}


def test_replicas_claiming_in_turn_take_disjoint_batches(store: SqlTokenStore) -> None:
    seed(store)
    ledger = store.deliveries
    a1 = ledger.claim(NOW, "a", LEASE, 4)
    b1 = ledger.claim(NOW, "b", LEASE, 4)
    assert (len(a1.tasks), a1.more, len(b1.tasks), b1.more) == (4, True, 2, False)
    assert not pairs(a1.tasks) & pairs(b1.tasks)
    a2 = ledger.claim(NOW, "a", LEASE, 4, after=a1.after)  # a walks on: b has the rest
    assert (a2.tasks, a2.more) == ([], False)
    assert Counter(claimed(store).values()) == {"a": 4, "b": 2}


def test_an_outcome_counts_only_while_its_claim_holds(store: SqlTokenStore) -> None:
    seed(store)
    ledger = store.deliveries
    a = ledger.claim(NOW, "a", LEASE, 100)
    b = ledger.claim(NOW + LEASE, "b", LEASE, 100)  # took over a's lapsed claim
    assert ledger.record(done(b.tasks), NOW + LEASE, "replica-b", "b") == []
    late = done(a.tasks)  # a comes back from a long pause with its results
    assert ledger.record(late, NOW + LEASE + 1, "replica-a", "a") == late  # all dropped
    events = delivered_events(store)
    assert len(events) == len(a.tasks) and set(events.values()) == {1}
    assert {actor for _, _, actor in events} == {"replica-b"}
    assert claimed(store) == {}
    assert ledger.claim(NOW + 2 * LEASE, "c", LEASE, 100).tasks == []  # nothing owed


def test_extending_a_claim_keeps_it(store: SqlTokenStore) -> None:
    seed(store)
    ledger = store.deliveries
    ledger.claim(NOW, "a", LEASE, 100)
    assert ledger.extend("a", NOW + 100 + LEASE) == 6
    assert ledger.claim(NOW + LEASE + 1, "b", LEASE, 100).tasks == []
    assert len(ledger.claim(NOW + 100 + LEASE, "b", LEASE, 100).tasks) == 6


def test_released_records_go_back_at_once(store: SqlTokenStore) -> None:
    seed(store)
    ledger = store.deliveries
    a = ledger.claim(NOW, "a", LEASE, 100)
    back = a.tasks[:2]
    ledger.release("b", back)  # not b's to give back
    assert ledger.claim(NOW, "c", LEASE, 100).tasks == []
    ledger.release("a", back)
    assert pairs(ledger.claim(NOW, "c", LEASE, 100).tasks) == pairs(back)


def test_a_revoke_while_the_token_is_on_its_way_still_removes_it(store: SqlTokenStore) -> None:
    seed(store)
    ledger = store.deliveries
    a = ledger.claim(NOW, "a", LEASE, 100)
    assert ledger.request_removal("tlalice", NOW + 1) == 3  # during the push
    ledger.record(done(a.tasks), NOW + 2, "replica-a", "a")
    rows = {d.node: d for d in ledger.deliveries("tlalice")}
    assert {d.status for d in rows.values()} == {"removing"}
    owed = ledger.claim(NOW + 2, "b", LEASE, 100)
    assert pairs(owed.tasks) == {("tlalice", n) for n in NODES["tlalice"]}
    assert {t.token for t in owed.tasks} == {None}  # removals
    ledger.record(done(owed.tasks), NOW + 3, "replica-b", "b")
    assert ledger.deliveries("tlalice") == []


def test_work_that_comes_back_during_a_removal_is_owed_anew(store: SqlTokenStore) -> None:
    seed(store)
    ledger = store.deliveries
    ledger.record(done(ledger.claim(NOW, "a", LEASE, 100).tasks), NOW, "replica-a", "a")
    ledger.request_removal("tlalice", NOW + 1)
    removals = ledger.claim(NOW + 1, "a", LEASE, 100)
    assert len(removals.tasks) == 3
    # A job starts on n1 again while the removals run.
    ledger.sync_needs({"tlalice": {"n1"}}, UIDS, NOW + 2, None)
    ledger.record(done(removals.tasks), NOW + 3, "replica-a", "a")
    assert [(d.node, d.status, d.version) for d in ledger.deliveries("tlalice")] == [
        ("n1", "pending", 0)
    ]
    again = ledger.claim(NOW + 3, "b", LEASE, 100)
    assert [(t.delivery.node, t.token is not None) for t in again.tasks] == [("n1", True)]


def test_postgresql_skips_records_another_replica_is_claiming(pg_url: str) -> None:
    store = SqlTokenStore(pg_url)
    other = create_engine(pg_url)
    try:
        seed(store)
        with other.connect() as conn, conn.begin():
            # Another replica's claim transaction, between its SELECT and COMMIT.
            locked = conn.execute(
                text("SELECT id FROM deliveries WHERE \"user\" = 'tlalice' FOR UPDATE")
            ).all()
            assert len(locked) == 3
            got: list[DeliveryTask] = []
            claiming = threading.Thread(
                target=lambda: got.extend(store.deliveries.claim(NOW, "b", LEASE, 100).tasks)
            )
            claiming.start()
            claiming.join(timeout=60)
            assert not claiming.is_alive(), "the claim waited for the other replica's locks"
            assert pairs(got) == {("tlbob", n) for n in NODES["tlbob"]}
        assert pairs(store.deliveries.claim(NOW, "c", LEASE, 100).tasks) == {
            ("tlalice", n) for n in NODES["tlalice"]
        }
    finally:
        other.dispose()
        store.close()


def test_postgresql_replicas_recording_the_same_new_jobs_do_not_fail(pg_url: str) -> None:
    """Both replicas see a new job: the one that adds its record second adds nothing."""
    store = SqlTokenStore(pg_url)
    other = create_engine(pg_url)
    try:
        seed(store, {"tlalice": {"n1"}})

        def first(_conn: object, _cursor: object, statement: str, *_: object) -> None:
            if statement.startswith("INSERT INTO deliveries"):
                with other.begin() as conn:  # the other replica commits n2 first
                    conn.execute(
                        text(
                            'INSERT INTO deliveries ("user", uid, node, token_id, version, '
                            "status, attempts, last_error, next_attempt, last_seen, updated) "
                            "VALUES ('tlalice', 1001, 'n2', '', 0, 'pending', 0, '', "
                            ":t, :t, :t)"
                        ),
                        {"t": to_dt(NOW)},
                    )

        event.listen(store.engine, "before_cursor_execute", first)
        store.deliveries.sync_needs({"tlalice": {"n1", "n2"}}, UIDS, NOW, None)
        event.remove(store.engine, "before_cursor_execute", first)
        assert sorted(d.node for d in store.deliveries.deliveries("tlalice")) == ["n1", "n2"]
    finally:
        other.dispose()
        store.close()


# -- the cycle, on SQLite: two DeliveryCycles are two replicas -----------------------------


class GateTransport(LocalTransport):
    """The local transport; pushes to ``held`` nodes wait at the gate until it opens."""

    def __init__(self, root: Path, held: set[str]) -> None:
        super().__init__(BASE, root)
        self.held = held
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def put(self, node: str, tf: TokenFile) -> str:
        if node in self.held:
            self.waiting.set()
            if not self.gate.wait(timeout=60):
                raise TransportError(f"{node}: the test never opened the gate")
        return super().put(node, tf)


def node_token(root: Path, node: str, uid: int) -> str:
    return (root / node / str(BASE).lstrip("/") / str(uid) / "slurm_jwt").read_text()


def cycle_of(
    store: SqlTokenStore,
    transport: LocalTransport,
    clock: FakeClock,
    name: str,
    concurrency: int = 32,
    lease: int = LEASE,
    batch: int = 256,
) -> DeliveryCycle:
    return DeliveryCycle(
        store,
        transport,
        None,
        600,
        concurrency,
        clock=clock,
        actor=f"replica-{name}",
        replica=name,
        lease=lease,
        batch=batch,
    )


def in_thread(cycle: DeliveryCycle) -> tuple[threading.Thread, list[DeliverySummary]]:
    out: list[DeliverySummary] = []
    thread = threading.Thread(target=lambda: out.append(cycle.run()))
    thread.start()
    return thread, out


def test_a_lone_cycle_claims_in_batches_and_leaves_nothing_claimed(
    sqlite_store: SqlTokenStore, tmp_path: Path
) -> None:
    needs = {"tlalice": {f"n{i:02d}" for i in range(7)}, "tlbob": {"n01", "n02", "n03"}}
    tokens = seed(sqlite_store, needs)
    clock = FakeClock(NOW)
    cycle = cycle_of(sqlite_store, LocalTransport(BASE, tmp_path), clock, "a", batch=3)
    summary = cycle.run()
    assert (summary.delivered, summary.failed, summary.unfinished, summary.dropped) == (10, 0, 0, 0)
    assert claimed(sqlite_store) == {}
    assert Counter(delivered_events(sqlite_store).values()) == {1: 10}
    for user, nodes in needs.items():
        for node in nodes:
            assert node_token(tmp_path, node, UIDS[user]) == tokens[user].token
    assert cycle.run().line() == "delivered 0, unchanged 0, removed 0, failed 0"


def test_a_stale_replica_never_puts_an_older_token_over_a_newer_one(
    sqlite_store: SqlTokenStore, tmp_path: Path
) -> None:
    """Replica a claims alice's token for n1 and stalls past its lease; b takes the
    claim over and delivers the newer token; a's late push and result change nothing."""
    old = seed(sqlite_store, {"tlalice": {"n1"}})["tlalice"]
    clock = FakeClock(NOW)
    slow = GateTransport(tmp_path, {"n1"})
    a = cycle_of(sqlite_store, slow, clock, "a", lease=LEASE)
    thread, out = in_thread(a)
    assert slow.waiting.wait(timeout=60)  # a holds the claim, the old token in hand

    newer = replace(old, token_id="renewed", version=2, iat=NOW, exp=NOW + 3600)
    sqlite_store.save(replace(newer, token=old.token + "x"), "minted", "test")
    clock.advance(LEASE)  # a's lease has ended
    b = cycle_of(sqlite_store, LocalTransport(BASE, tmp_path), clock, "b", lease=LEASE)
    assert b.run().delivered == 1
    assert node_token(tmp_path, "n1", 1001) == old.token + "x"

    slow.gate.set()  # a wakes up and pushes the old token
    thread.join(timeout=60)
    (summary,) = out
    assert (summary.delivered, summary.unchanged, summary.dropped) == (0, 0, 1)
    assert node_token(tmp_path, "n1", 1001) == old.token + "x"  # the newer one stays
    (row,) = sqlite_store.deliveries.deliveries("tlalice")
    assert (row.token_id, row.version) == ("renewed", 2)
    assert list(delivered_events(sqlite_store)) == [("tlalice", "node n1", "replica-b")]


def test_a_deadline_gives_back_the_work_never_started(
    sqlite_store: SqlTokenStore, tmp_path: Path
) -> None:
    seed(sqlite_store, {"tlalice": {"n1", "n2", "n3"}})
    clock = FakeClock(NOW)
    slow = GateTransport(tmp_path, {"n1", "n2", "n3"})
    a = cycle_of(sqlite_store, slow, clock, "a", concurrency=1)
    try:
        summary = a.run(deadline=time.monotonic() + 0.5)
        assert summary.unfinished == 3
        # The push under way keeps its claim (it may still land); the others are free.
        (busy,) = claimed(sqlite_store)
        back = sqlite_store.deliveries.claim(NOW, "b", LEASE, 100)
        assert pairs(back.tasks) == {("tlalice", n) for n in ("n1", "n2", "n3")} - {busy}
    finally:
        slow.gate.set()


def test_no_push_starts_once_the_lease_runs_low(
    sqlite_store: SqlTokenStore, tmp_path: Path
) -> None:
    """a's first push hangs until two thirds of its lease are gone (its store
    unreachable, say, so the lease was never extended): the next push waits for
    the next cycle rather than risk running past the lease."""
    seed(sqlite_store, {"tlalice": {"n1"}})
    sqlite_store.deliveries.sync_needs({"tlalice": {"n2"}}, UIDS, NOW, None)  # after n1
    clock = FakeClock(NOW)
    slow = GateTransport(tmp_path, {"n1"})
    a = cycle_of(sqlite_store, slow, clock, "a", concurrency=1, lease=30)
    thread, out = in_thread(a)
    assert slow.waiting.wait(timeout=60)
    clock.advance(21)  # less than a third of the lease left
    slow.gate.set()
    thread.join(timeout=60)
    (summary,) = out
    assert (summary.delivered, summary.unfinished) == (1, 1)
    assert claimed(sqlite_store) == {}  # given back
    assert pairs(sqlite_store.deliveries.claim(NOW + 21, "b", LEASE, 100).tasks) == {
        ("tlalice", "n2")
    }


def test_the_cycle_extends_its_claims_while_a_push_runs(
    sqlite_store: SqlTokenStore, tmp_path: Path
) -> None:
    """With a 3 s lease the cycle extends its claims every second (real time)."""
    seed(sqlite_store, {"tlalice": {"n1"}})
    clock = FakeClock(NOW)
    slow = GateTransport(tmp_path, {"n1"})
    a = cycle_of(sqlite_store, slow, clock, "a", lease=3)
    thread, out = in_thread(a)
    try:
        assert slow.waiting.wait(timeout=60)
        clock.advance(10)  # without an extension the lease would have ended
        until = to_dt(NOW + 10 + 3)
        deadline = time.monotonic() + 30
        while lease_end(sqlite_store) != until:
            assert time.monotonic() < deadline, "the claim was never extended"
            time.sleep(0.05)
        assert sqlite_store.deliveries.claim(NOW + 10, "b", 3, 100).tasks == []
    finally:
        slow.gate.set()
        thread.join(timeout=60)
    assert out[0].delivered == 1


def lease_end(store: SqlTokenStore) -> object:
    with store.transaction(read_only=True) as s:
        return s.scalar(select(func.max(DeliveryRow.claimed_until)))


def test_a_dead_replica_of_this_host_is_taken_over_at_once(
    sqlite_store: SqlTokenStore, tmp_path: Path
) -> None:
    """A restarted daemon need not wait for its crashed predecessor's lease."""
    seed(sqlite_store, {"tlalice": {"n1", "n2", "n3", "n4"}})
    done_proc = subprocess.Popen(["true"])
    done_proc.wait()  # its pid runs no more
    host = socket.gethostname()
    dead = f"{host}:{done_proc.pid}/0badc0de"
    alive = f"{host}:{os.getppid()}/0badc0de"
    elsewhere = f"tokenhost2.example:{done_proc.pid}/0badc0de"
    named = "tokenhost3/0badc0de"  # a replica name set by hand: only its lease counts
    ledger = sqlite_store.deliveries
    for claim in (dead, alive, elsewhere, named):
        assert len(ledger.claim(NOW, claim, LEASE, 1).tasks) == 1
    assert [gone_from_here(c) for c in (dead, alive, elsewhere, named)] == [
        True,
        False,
        False,
        False,
    ]
    assert not gone_from_here(f"{host}:{os.getpid()}/0badc0de")  # this process: running

    cycle = cycle_of(sqlite_store, LocalTransport(BASE, tmp_path), FakeClock(NOW), "b")
    assert cycle.run().delivered == 1  # the dead one's, at once
    assert sorted(claimed(sqlite_store).values()) == sorted([alive, elsewhere, named])


def test_claims_walk_the_records_node_by_node(store: SqlTokenStore) -> None:
    """A node's deliveries come together (one connection serves them all), and a
    walk in batches sees every record once, whatever order they were made in."""
    needs = {f"tl{u}": {f"n{(u * 3 + k) % 7}" for k in range(3)} for u in range(5)}
    seed(store, needs)
    ledger = store.deliveries
    seen: list[tuple[str, str]] = []
    after = ("", 0)
    while True:
        got = ledger.claim(NOW, "a", LEASE, 4, after=after)
        seen += [(t.delivery.node, t.delivery.user) for t in got.tasks]
        after = got.after
        if not got.more:
            break
    assert len(seen) == len(set(seen)) == 15
    assert [node for node, _ in seen] == sorted(node for node, _ in seen)


def test_one_worker_does_a_nodes_deliveries_in_turn(
    sqlite_store: SqlTokenStore, tmp_path: Path
) -> None:
    """32 threads, 4 nodes with 5 users each: each node's pushes come one after
    another from one thread, never two at once on one node (its connection)."""
    needs = {f"tl{u}": {f"n{k}" for k in range(4)} for u in range(5)}
    tokens = seed(sqlite_store, needs)
    busy: dict[str, int] = {}
    overlap: list[str] = []
    threads: dict[str, set[int]] = {}
    guard = threading.Lock()

    class Watching(LocalTransport):
        def put(self, node: str, tf: TokenFile) -> str:
            with guard:
                busy[node] = busy.get(node, 0) + 1
                if busy[node] > 1:
                    overlap.append(node)
                threads.setdefault(node, set()).add(threading.get_ident())
            try:
                time.sleep(0.005)
                return super().put(node, tf)
            finally:
                with guard:
                    busy[node] -= 1

    summary = cycle_of(sqlite_store, Watching(BASE, tmp_path), FakeClock(NOW), "a").run()
    assert (summary.delivered, summary.failed) == (20, 0)
    assert overlap == []
    assert all(len(ids) == 1 for ids in threads.values()), threads
    for user, token in tokens.items():
        for node in needs[user]:
            assert node_token(tmp_path, node, token.uid) == token.token
