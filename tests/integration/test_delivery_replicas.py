"""Delivery replicas as real separate OS processes on one store, pushing to local nodes.

Each replica is ``harness/deliver_worker.py``: a DeliveryCycle with the local
transport (node N's files under ``<root>/<N>``), no job source (what the
store owes), a fixed clock set by each ``go NOW`` line.  The store holds a
rotation storm (``deliver_worker.Storm``): every (user, node) pair's node
holds version 1 of the user's token, the store version 2.

* Sharing: two replicas released together deliver every pair exactly once
  (one ``delivered`` audit event each, from the replica that pushed it), both
  do part of the work, and every node file ends holding its user's token:
  on PostgreSQL (row locks, SKIP LOCKED) and on SQLite (one writer).
* Crash: a replica SIGKILLed while it holds claims (parked in a push at a
  deterministic point) loses nothing.  One named for another host: another
  replica leaves its claims alone while their lease runs, and once it has
  ended delivers them all.  One of this host (the default name, host:pid):
  the next cycle here sees it no longer runs and takes its work over at once.
* Stale replica: one that stalls in a push past its lease, while the token
  is renewed and another replica delivers the newer one, cannot put its
  older token over the newer one, and its result is not recorded.

Nothing waits for a lease in real time: the replicas' clocks jump past it.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root
from tests.integration.harness.deliver_worker import Outcome, Storm, outcome, renew, seed
from tests.integration.harness.line_worker import LineWorker, wait_for_backends_gone
from tests.integration.harness.postgres import PostgresServer
from transfer import nodefs

NOW = 1_800_000_000
LEASE = 60
WORKER = "tests.integration.harness.deliver_worker"


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    name = f"tl_{secrets.token_hex(6)}"
    url = postgres.create_database(name)
    try:
        yield url
    finally:
        postgres.drop_database(name)


@pytest.fixture
def nodes(tmp_path: Path) -> Path:
    require_root()  # the local transport hands each file to its user
    root = tmp_path / "nodes"
    root.mkdir()
    return root


class Worker(LineWorker):
    """One deliver_worker process: job on stdin, ``ready``, then ``go NOW`` -> summary."""

    def __init__(self, tmp_path: Path, job: dict[str, Any]) -> None:
        super().__init__(WORKER, tmp_path, job)

    @property
    def claim_prefix(self) -> str:
        """How this replica's claims start: DeliveryCycle's default name, host:pid."""
        return f"{socket.gethostname()}:{self.proc.pid}/"

    def go(self, now: int) -> None:
        self.send(f"go {now}")

    def summary(self) -> dict[str, Any]:
        return self.result()

    def close(self, goodbye: str | None = "quit") -> None:
        super().close(goodbye)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.close()


def start(workers: list[Worker], tmp_path: Path, job: dict[str, Any]) -> Worker:
    worker = Worker(tmp_path, job)
    workers.append(worker)
    worker.expect("ready")  # imported, connected, migrated
    return worker


def age_node_locks(root: Path, seconds: int) -> None:
    """Time passes on the nodes: their lock files (nodefs) get ``seconds`` older."""
    assert seconds > nodefs.LOCK_STALE  # a lease outlives a dead pusher's node lock
    for lock in root.glob("*/run/tokenlife/.lock.*"):
        mtime = lock.stat().st_mtime - seconds
        os.utime(lock, (mtime, mtime))


def check_done(seen: Outcome, storm: Storm) -> None:
    """Every pair delivered exactly once, nothing owed or claimed, every file current."""
    assert seen.events.keys() == set(storm.pairs())
    assert set(seen.events.values()) == {1}, "a pair was delivered more than once"
    assert (seen.owed, seen.claimed, seen.wrong_files) == (0, {}, {})


def run_together(replicas: list[Worker], now: int) -> dict[str, dict[str, Any]]:
    """Release the replicas together (they are all ``ready``); their summaries."""
    for replica in replicas:
        replica.go(now)
    return {r.name: r.summary() for r in replicas}


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_two_replicas_deliver_every_pair_exactly_once(
    backend: str, nodes: Path, tmp_path: Path, workers: list[Worker], request: pytest.FixtureRequest
) -> None:
    if backend == "postgresql":
        url = str(request.getfixturevalue("pg_url"))
        storm = Storm(users=300, per_user=8, nodes=40, now=NOW)  # 2,400 pairs
    else:
        url = f"sqlite:///{tmp_path}/store/tokenlife.db"
        storm = Storm(users=150, per_user=4, nodes=20, now=NOW)  # 600 pairs
    seed(url, storm, nodes)
    job = {"url": url, "root": str(nodes), "lease": LEASE, "batch": 32, "concurrency": 8}
    replicas = [start(workers, tmp_path, {**job, "actor": f"replica-{n}"}) for n in "ab"]

    summaries = run_together(replicas, NOW)

    for summary in summaries.values():
        assert (summary["failed"], summary["unchanged"], summary["dropped"]) == (0, 0, 0)
        assert (summary["unfinished"], summary["errors"]) == (0, [])
    split = {name: s["delivered"] for name, s in summaries.items()}
    assert sum(split.values()) == len(storm.pairs()), split
    # Both took part: had one finished before the other started, nothing
    # concurrent would have been tested.
    assert all(n > 0 for n in split.values()), split
    seen = outcome(url, storm, nodes)
    check_done(seen, storm)
    assert seen.actors == split  # the audit trail agrees with each replica's count
    print(f"\n{backend}: replica split {split}")


def start_victim(
    workers: list[Worker], tmp_path: Path, pg_url: str, nodes: Path, replica: str | None
) -> Worker:
    """A replica parked at its 30th push, halfway through its second batch of 20
    (earlier outcomes may be recorded; that batch is claimed and not), then killed."""
    app_name = f"tl_victim_{secrets.token_hex(4)}"
    job = {
        "url": f"{pg_url}?application_name={app_name}",
        "root": str(nodes),
        "lease": LEASE,
        "batch": 20,
        "actor": "victim",
        "replica": replica,
        "concurrency": 2,
        "hang": "park",
        "hang_after": 30,
    }
    victim = start(workers, tmp_path, job)
    victim.go(NOW)
    victim.expect("park")
    victim.kill()
    wait_for_backends_gone(pg_url, app_name)
    return victim


def test_a_replica_killed_on_another_host_loses_nothing(
    pg_url: str, nodes: Path, tmp_path: Path, workers: list[Worker]
) -> None:
    """Its claims hold until their lease ends, then another replica takes them over."""
    storm = Storm(users=100, per_user=4, nodes=20, now=NOW)  # 400 pairs
    seed(pg_url, storm, nodes)
    start_victim(workers, tmp_path, pg_url, nodes, "tokenhost2.example")

    held = outcome(pg_url, storm, nodes)
    assert held.claimed, "the victim held no claim when it died"
    assert all(c.startswith("tokenhost2.example/") for c in held.claimed.values())
    assert held.owed > len(held.claimed)  # its claims, and what nobody claimed yet
    recorded_by_victim = held.actors["victim"]

    # Another replica, while the dead one's lease still runs: everything but its claims.
    job = {"url": pg_url, "root": str(nodes), "lease": LEASE, "batch": 20, "concurrency": 8}
    other = start(workers, tmp_path, {**job, "actor": "other"})
    other.go(NOW)
    first = other.summary()
    assert (first["failed"], first["dropped"], first["unchanged"]) == (0, 0, 0)
    assert first["delivered"] == held.owed - len(held.claimed)
    still = outcome(pg_url, storm, nodes)
    assert still.claimed == held.claimed  # left alone
    assert still.owed == len(held.claimed)

    # Once the lease has ended, the same replica takes the dead one's work over.
    # The nodes' clocks moved on too: a node lock the victim died holding
    # (killed inside a push) is as old as the lease, so it is broken.
    age_node_locks(nodes, LEASE + 1)
    other.go(NOW + LEASE + 1)
    second = other.summary()
    assert (second["failed"], second["dropped"]) == (0, 0)
    # Some the victim may have pushed without recording: pushed again, or
    # found in place ("unchanged"); either way recorded once, below.
    assert second["delivered"] + second["unchanged"] == len(held.claimed)
    seen = outcome(pg_url, storm, nodes)
    check_done(seen, storm)
    # (The victim may have been killed before it recorded anything.)
    assert seen.actors == +Counter(
        {"victim": recorded_by_victim, "other": len(storm.pairs()) - recorded_by_victim}
    )
    print(
        f"\nvictim recorded {recorded_by_victim} and held {len(held.claimed)} claims; "
        f"taken over after the lease: {second['delivered']} delivered, "
        f"{second['unchanged']} unchanged"
    )


def test_a_replica_killed_on_this_host_is_taken_over_at_once(
    pg_url: str, nodes: Path, tmp_path: Path, workers: list[Worker]
) -> None:
    """A replica of this host that no longer runs (default name: host:pid) holds
    nothing: the next cycle here (a restarted daemon) does its work without
    waiting for the lease."""
    storm = Storm(users=100, per_user=4, nodes=20, now=NOW)  # 400 pairs
    seed(pg_url, storm, nodes)
    victim = start_victim(workers, tmp_path, pg_url, nodes, None)
    held = outcome(pg_url, storm, nodes)
    assert held.claimed and all(c.startswith(victim.claim_prefix) for c in held.claimed.values())

    age_node_locks(nodes, LEASE + 1)  # (not the lease's business: a node lock it left)
    job = {"url": pg_url, "root": str(nodes), "lease": LEASE, "batch": 20, "concurrency": 8}
    restarted = start(workers, tmp_path, {**job, "actor": "restarted"})
    restarted.go(NOW)  # the victim's lease still runs
    summary = restarted.summary()
    assert (summary["failed"], summary["dropped"]) == (0, 0)
    assert summary["delivered"] + summary["unchanged"] == held.owed
    check_done(outcome(pg_url, storm, nodes), storm)
    assert "taking over" in restarted.stderr() and str(victim.proc.pid) in restarted.stderr()


def test_a_stale_replica_cannot_put_an_older_token_over_a_newer_one(
    pg_url: str, nodes: Path, tmp_path: Path, workers: list[Worker]
) -> None:
    storm = Storm(users=20, per_user=3, nodes=10, now=NOW)  # 60 pairs
    seed(pg_url, storm, nodes)
    job = {"url": pg_url, "root": str(nodes), "lease": LEASE, "batch": 10}
    stale = start(
        workers,
        tmp_path,
        {**job, "actor": "stale", "concurrency": 1, "hang": "pause", "hang_after": 1},
    )
    stale.go(NOW)
    stale.expect("pause")  # 10 pairs claimed, version 2 in hand, the first push paused
    claims = outcome(pg_url, storm, nodes).claimed
    assert len(claims) == 10

    # Renewed meanwhile; another replica delivers version 3 everywhere once
    # the stalled one's lease has ended.
    users = sorted({user for user, _ in storm.pairs()})
    renew(pg_url, storm, users, 3)
    other = start(workers, tmp_path, {**job, "actor": "other", "concurrency": 8})
    other.go(NOW + LEASE + 1)
    summary = other.summary()
    assert (summary["delivered"], summary["failed"]) == (len(storm.pairs()), 0)

    stale.send("resume")  # it pushes its version 2 to the 10 nodes it had claimed
    late = stale.summary()
    assert (late["delivered"], late["unchanged"], late["failed"]) == (0, 0, 0)
    assert late["dropped"] == 10  # newer there, and the claims were taken over
    seen = outcome(pg_url, storm, nodes)
    check_done(seen, storm)  # every node file holds version 3
    assert seen.versions == Counter({3: len(storm.pairs())})
    assert seen.actors == {"other": len(storm.pairs())}
