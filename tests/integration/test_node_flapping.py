"""R2: 10 % of real sshd nodes down, one flapping, while tokens keep changing.

20 OpenSSH nodes, two users with work on all of them, five rounds of new
tokens.  node05 and node15 are down throughout, node10's sshd restarts
before every cycle (its pooled connection dies each time).  After every
cycle every live node holds both users' current tokens; the down nodes
hold nothing partial; once they are back and their retry time has come,
two cycles bring them up to date.  No node ever holds a temporary file or a
lock after a cycle, and no node's token ever goes back to an older one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from producer.mint import Minter
from repository.store import SqlTokenStore
from tests.conftest import require_root, require_tool
from tests.integration.harness.sshnodes import SshNodes
from tokenlife.config import Config, DeliveryConfig, SshConfig, TokenConfig
from tokenlife.records import TokenRecord
from tokenlife.testing.fakes import FakeClock, FakeJobs, StaticKeySource
from transfer.cycle import RETRY_CAP, DeliveryCycle
from transfer.transports import SshTransport

COUNT = 20
DOWN = ("node05", "node15")
FLAPPING = "node10"
KEY = secrets.token_bytes(32)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshNodes]:
    require_root()
    require_tool("sshd", "unshare", "nsenter", "ssh-keygen")
    with SshNodes(tmp_path_factory.mktemp("flap"), COUNT) as started:
        started.write_known_hosts()
        yield started


def token_on(nodes: SshNodes, node: str, uid: int) -> str | None:
    path = f"/run/tokenlife/{uid}/slurm_jwt"
    return nodes[node].read_text(path) if nodes[node].exists(path) else None


def leftovers(nodes: SshNodes, node: str, uids: list[int]) -> list[str]:
    """Anything but a user directory and its token file: temp files, locks."""
    found = [n for n in nodes[node].listdir("/run/tokenlife") if n not in map(str, uids)]
    for uid in uids:
        if nodes[node].exists(f"/run/tokenlife/{uid}"):
            found += [n for n in nodes[node].listdir(f"/run/tokenlife/{uid}") if n != "slurm_jwt"]
    return found


def test_down_and_flapping_nodes_never_hold_back_the_others(
    nodes: SshNodes, tmp_path: Path, test_users: tuple[str, str]
) -> None:
    delivery = DeliveryConfig(
        transport="ssh",
        ssh=SshConfig(
            identity_file=nodes.client_key,
            known_hosts=nodes.known_hosts,
            ssh_config=nodes.ssh_config,
            connect_timeout=3,
            concurrency=8,
        ),
    )
    clock = FakeClock()
    config = Config(token=replace(TokenConfig(), lifetime=4000, renew_until=20000))
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
    transport = SshTransport(delivery)
    users = list(test_users)
    cycle = DeliveryCycle(
        store,
        transport,
        FakeJobs({user: set(nodes.names) for user in users}),
        remove_after=600,
        clock=clock,
    )
    minter = Minter(config, StaticKeySource(KEY), store, clock)
    for name in DOWN:
        nodes.stop_node(name)
    live = [name for name in nodes.names if name not in DOWN]
    seen: dict[tuple[str, str], int] = {}  # (node, user) -> iat last seen there
    try:
        current: dict[str, TokenRecord] = {}
        for round_ in range(5):
            clock.advance(60)
            for user in users:
                current[user] = minter.mint(user, 0)[0]  # a new login: a newer token
            nodes.restart_node(FLAPPING)
            summary = cycle.run()
            # every live node, the flapping one included, got both new tokens
            assert summary.delivered == len(live) * len(users), summary.errors
            # the down nodes fail (then wait out their backoff), nobody else
            assert all(e.split(":")[0] in DOWN for e in summary.errors)
            if round_ == 0:
                assert summary.failed == len(DOWN) * len(users)
            for name in live:
                for user in users:
                    assert token_on(nodes, name, current[user].uid) == current[user].token
                    seen[(name, user)] = current[user].iat
                assert leftovers(nodes, name, [current[u].uid for u in users]) == []

        for name in DOWN:
            nodes.start_node(name)
        caught_up = 0
        for _cycle in range(2):
            clock.advance(RETRY_CAP + 1)  # the longest backoff has run out
            caught_up += cycle.run().delivered
        assert caught_up == len(DOWN) * len(users)
        for name in nodes.names:
            for user in users:
                assert token_on(nodes, name, current[user].uid) == current[user].token
                # the file's mtime is its token's iat: what orders tokens on a node
                st = nodes[name].stat(f"/run/tokenlife/{current[user].uid}/slurm_jwt")
                assert int(st.mtime) == current[user].iat >= seen.get((name, user), 0)
            assert leftovers(nodes, name, [current[u].uid for u in users]) == []
        assert {d.status for d in store.deliveries.deliveries()} == {"delivered"}
    finally:
        transport.close()
        for name in DOWN:
            if not nodes[name].running:
                nodes.start_node(name)


def freeze(nodes: SshNodes, name: str, sig: signal.Signals) -> list[int]:
    """Send ``sig`` to every process of node ``name`` but its namespace holder."""
    holder = nodes[name].pid
    namespace = os.readlink(f"/proc/{holder}/ns/mnt")
    hit = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == holder:
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/ns/mnt") == namespace:
                os.kill(int(entry), sig)
                hit.append(int(entry))
    return hit


def test_a_node_that_hangs_mid_session_fails_alone(
    nodes: SshNodes, tmp_path: Path, test_users: tuple[str, str]
) -> None:
    """R7: node03's sshd and sftp-server freeze (SIGSTOP) with a pooled session open:
    its delivery fails after the SFTP operation timeout, every other node is served
    in the same cycle, and node03 catches up once it thaws."""
    for name in DOWN:
        if not nodes[name].running:
            nodes.start_node(name)
    delivery = DeliveryConfig(
        transport="ssh",
        ssh=SshConfig(
            identity_file=nodes.client_key,
            known_hosts=nodes.known_hosts,
            ssh_config=nodes.ssh_config,
            connect_timeout=2,
        ),
    )
    clock = FakeClock(1_900_000_000)
    config = Config(token=replace(TokenConfig(), lifetime=4000, renew_until=20000))
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
    transport = SshTransport(delivery)
    user = test_users[0]
    few = ["node02", "node03", "node04"]
    cycle = DeliveryCycle(store, transport, FakeJobs({user: set(few)}), 600, clock=clock)
    minter = Minter(config, StaticKeySource(KEY), store, clock)
    try:
        minter.mint(user, 0)
        assert cycle.run().delivered == 3  # sessions to all three are now pooled
        clock.advance(60)
        newer = minter.mint(user, 0)[0]
        frozen = freeze(nodes, "node03", signal.SIGSTOP)
        assert frozen
        try:
            summary = cycle.run()
        finally:
            freeze(nodes, "node03", signal.SIGCONT)
        assert (summary.delivered, summary.failed) == (2, 1), summary.errors
        assert summary.errors[0].startswith("node03: ")
        for name in ("node02", "node04"):
            assert token_on(nodes, name, newer.uid) == newer.token
        clock.advance(RETRY_CAP + 1)
        assert cycle.run().delivered == 1
        assert token_on(nodes, "node03", newer.uid) == newer.token
    finally:
        transport.close()
