"""The delivery cycle on a real SQLite store and the local transport, with a fake clock."""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from producer.mint import Minter
from repository.delivery_store import DeliveryStore
from repository.renewal_store import RenewalStore
from repository.renewer import Renewer
from repository.store import SqlTokenStore
from tests.conftest import require_root
from tokenlife.config import Config, TokenConfig
from tokenlife.errors import TransportError
from tokenlife.records import TokenFile
from tokenlife.testing.fakes import FakeClock, FakeJobs, StaticKeySource
from tokenlife.users import uid_of
from transfer.cycle import DeliveryCycle
from transfer.transports import LocalTransport

KEY = secrets.token_bytes(32)
USER = "nobody"
BASE = Path("/run/tokenlife")


class FlakyTransport(LocalTransport):
    """The local transport with nodes that can be switched off."""

    down: set[str]

    def put(self, node: str, tf: TokenFile) -> str:
        if node in self.down:
            raise TransportError(f"{node}: cannot connect to root@{node}:22: Connection refused")
        return super().put(node, tf)


@pytest.fixture
def site(tmp_path: Path):  # type: ignore[no-untyped-def]
    require_root()
    clock = FakeClock()
    config = Config(token=replace(TokenConfig(), lifetime=4000, renew_until=20000))
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
    transport = FlakyTransport(BASE, tmp_path / "nodes")
    transport.down = set()
    jobs = FakeJobs()
    cycle = DeliveryCycle(store, transport, jobs, remove_after=600, clock=clock)
    minter = Minter(config, StaticKeySource(KEY), store, clock)
    renewer = Renewer(config, StaticKeySource(KEY), store, clock)
    return clock, store, transport, jobs, cycle, minter, renewer, tmp_path / "nodes"


def node_file(nodes: Path, node: str) -> Path:
    return nodes / node / str(BASE).lstrip("/") / str(uid_of(USER)) / "slurm_jwt"


def test_tokens_follow_jobs_renewals_and_their_end(site) -> None:  # type: ignore[no-untyped-def]
    clock, store, _, jobs, cycle, minter, renewer, nodes = site
    record, _ = minter.mint(USER, 0)
    jobs.current = {USER: {"node01", "node02"}}
    summary = cycle.run()
    assert (summary.delivered, summary.failed) == (2, 0)
    for node in ("node01", "node02"):
        path = node_file(nodes, node)
        assert path.read_text() == record.token
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == uid_of(USER)
    assert not node_file(nodes, "node03").exists()
    assert cycle.run().delivered == 0  # nothing owed: nothing touched

    clock.advance(3500)  # into the renewal window
    assert renewer.tick().renewed == 1
    fresh = store.current(USER)
    assert fresh is not None and fresh.version == 2
    assert cycle.run().delivered == 2
    assert node_file(nodes, "node01").read_text() == fresh.token
    assert {(d.node, d.version) for d in DeliveryStore(store).deliveries()} == {
        ("node01", 2),
        ("node02", 2),
    }

    jobs.current = {USER: {"node01"}}  # the job on node02 ended
    clock.advance(60)
    assert cycle.run().removed == 0  # still inside remove_after
    clock.advance(600)
    assert cycle.run().removed == 1
    assert not node_file(nodes, "node02").exists() and node_file(nodes, "node01").exists()
    events = [(e["event"], e["reason"]) for e in store.events(USER)]
    assert events.count(("delivered", "node node01")) == 2
    assert ("removed", "node node02") in events


def test_a_down_node_does_not_stop_the_others_and_catches_up(site) -> None:  # type: ignore[no-untyped-def]
    clock, store, transport, jobs, cycle, minter, _, nodes = site
    record, _ = minter.mint(USER, 0)
    jobs.current = {USER: {"node01", "node02", "node03"}}
    transport.down = {"node02"}
    summary = cycle.run()
    assert (summary.delivered, summary.failed) == (2, 1)
    assert "node02: cannot connect" in summary.errors[0]
    (failed,) = [d for d in DeliveryStore(store).deliveries() if d.status == "failed"]
    assert failed.node == "node02" and failed.attempts == 1
    assert failed.next_attempt > clock.now()  # backoff, not at once
    assert cycle.run().failed == 0  # not retried before its time

    transport.down = set()
    clock.advance(60)  # past the first retry (at most 30 s)
    assert cycle.run().delivered == 1
    assert node_file(nodes, "node02").read_text() == record.token


def test_a_broken_job_source_removes_nothing(site) -> None:  # type: ignore[no-untyped-def]
    clock, _, _, jobs, cycle, minter, _, nodes = site
    minter.mint(USER, 0)
    jobs.current = {USER: {"node01"}}
    cycle.run()
    jobs.broken = True
    clock.advance(3600)
    summary = cycle.run()
    assert "Unable to contact slurm controller" in summary.jobs_error
    assert summary.removed == 0 and node_file(nodes, "node01").exists()


def test_revoke_removes_the_token_from_every_node(site) -> None:  # type: ignore[no-untyped-def]
    clock, store, _, jobs, cycle, minter, _, nodes = site
    minter.mint(USER, 0)
    jobs.current = {USER: {"node01", "node02"}}
    cycle.run()
    now = int(clock.now())
    RenewalStore(store).set_state(USER, "revoked", "revoked", "root", "", now)
    DeliveryStore(store).request_removal(USER, now)
    summary = cycle.run()  # the job still runs, yet the revoked token goes
    assert summary.removed == 2
    assert not node_file(nodes, "node01").exists() and not node_file(nodes, "node02").exists()
    assert cycle.run().removed == 0  # and nothing comes back without a new token
    assert not os.path.exists(node_file(nodes, "node01"))
