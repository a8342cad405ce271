"""Delivery over SSH to real OpenSSH worker nodes (each with its own host key and
its own /run/tokenlife), driven by the delivery cycle with a fake clock."""

from __future__ import annotations

import logging
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paramiko.sftp
import pytest

from producer.mint import Minter
from repository.delivery_store import DeliveryStore
from repository.store import SqlTokenStore
from tests.conftest import require_root, require_tool
from tests.integration.harness.sshnodes import SshNodes
from tokenlife.config import Config, DeliveryConfig, SshConfig, TokenConfig
from tokenlife.records import TokenRecord
from tokenlife.testing.fakes import FakeClock, FakeJobs, StaticKeySource
from transfer.cycle import DeliveryCycle
from transfer.ssh import CLOSING_LOG, IDLE_POLL
from transfer.transports import SshTransport

NODES = ("node01", "node02", "node03")
KEY = secrets.token_bytes(32)


@dataclass
class Site:
    nodes: SshNodes
    clock: FakeClock
    store: SqlTokenStore
    transport: SshTransport
    cycle: DeliveryCycle
    minter: Minter
    user: str

    def mint(self) -> TokenRecord:
        return self.minter.mint(self.user, 0)[0]

    def check(self, node: str, record: TokenRecord) -> None:
        path = f"/run/tokenlife/{record.uid}/slurm_jwt"
        on_node = self.nodes[node]
        assert on_node.read_text(path) == record.token
        st = on_node.stat(path)
        assert (stat.S_IMODE(st.mode), st.uid, st.gid) == (0o600, record.uid, record.gid)
        directory = on_node.stat(f"/run/tokenlife/{record.uid}")
        assert (stat.S_IMODE(directory.mode), directory.uid) == (0o700, record.uid)


@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshNodes]:
    require_root()
    require_tool("sshd", "unshare", "nsenter", "ssh-keygen")
    with SshNodes(tmp_path_factory.mktemp("ssh"), len(NODES)) as nodes:
        yield nodes


@pytest.fixture
def site(ssh_nodes: SshNodes, tmp_path: Path, test_users: tuple[str, str]) -> Iterator[Site]:
    for name in NODES:
        ssh_nodes.reboot_node(name)  # empty /run/tokenlife everywhere
    ssh_nodes.write_known_hosts()
    delivery = DeliveryConfig(
        transport="ssh",
        ssh=SshConfig(
            identity_file=ssh_nodes.client_key,
            known_hosts=ssh_nodes.known_hosts,
            ssh_config=ssh_nodes.ssh_config,
            connect_timeout=5,
        ),
    )
    clock = FakeClock()
    config = Config(
        token=replace(TokenConfig(), lifetime=4000, renew_until=20000), delivery=delivery
    )
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
    transport = SshTransport(delivery)
    alice = test_users[0]
    cycle = DeliveryCycle(
        store, transport, FakeJobs({alice: set(NODES)}), remove_after=600, clock=clock
    )
    try:
        yield Site(
            ssh_nodes,
            clock,
            store,
            transport,
            cycle,
            Minter(config, StaticKeySource(KEY), store, clock),
            alice,
        )
    finally:
        transport.close()


def test_every_node_gets_the_token_over_pooled_connections(site: Site) -> None:
    record = site.mint()
    summary = site.cycle.run()
    assert (summary.delivered, summary.failed) == (3, 0), summary.errors
    for node in NODES:
        site.check(node, record)
    assert site.transport.pool.connected() == sorted(NODES)

    site.clock.advance(100)
    newer = site.mint()  # a new login: a newer token
    assert site.cycle.run().delivered == 3
    for node in NODES:
        site.check(node, newer)
        # One SSH login per node for both cycles: the connection was kept.
        assert site.nodes.logs(node, lines=400).count("Accepted publickey") == 1


def test_a_changed_host_key_is_refused_and_nothing_written(site: Site) -> None:
    record = site.mint()
    site.nodes.regenerate_host_key("node02")  # known_hosts keeps the old key
    summary = site.cycle.run()
    assert (summary.delivered, summary.failed) == (2, 1)
    (error,) = summary.errors
    assert error.startswith("node02: host key mismatch: the node offers ssh-ed25519 SHA256:")
    assert error.count("SHA256:") == 2 and "refusing to connect" in error
    assert not site.nodes["node02"].exists(f"/run/tokenlife/{record.uid}")
    site.check("node01", record)
    site.check("node03", record)


def test_an_unknown_host_is_refused(site: Site) -> None:
    site.mint()
    lines = site.nodes.known_hosts.read_text().splitlines()
    site.nodes.known_hosts.write_text("".join(f"{x}\n" for x in lines if "127.0.0.3]" not in x))
    summary = site.cycle.run()
    assert summary.failed == 1
    assert "node02: host key of root@127.0.0.3:" in summary.errors[0]
    assert "is not in" in summary.errors[0]


def test_a_down_node_catches_up_within_two_cycles_of_coming_back(site: Site) -> None:
    record = site.mint()
    site.nodes.stop_node("node03")
    summary = site.cycle.run()
    assert (summary.delivered, summary.failed) == (2, 1)
    assert "node03: cannot connect" in summary.errors[0]
    site.check("node01", record)
    (failed,) = [d for d in DeliveryStore(site.store).deliveries() if d.status == "failed"]
    assert failed.node == "node03" and failed.attempts == 1

    site.nodes.start_node("node03")
    site.clock.advance(30)  # the first retry comes after at most 30 s
    delivered = site.cycle.run().delivered + site.cycle.run().delivered
    assert delivered == 1
    site.check("node03", record)


def test_a_pooled_connection_that_died_is_replaced(site: Site) -> None:
    record = site.mint()
    assert site.cycle.run().delivered == 3
    site.nodes.restart_node("node01")  # drops the pooled connection
    site.clock.advance(100)
    newer = site.mint()
    summary = site.cycle.run()
    assert (summary.delivered, summary.failed) == (3, 0), summary.errors
    site.check("node01", newer)
    assert newer.token != record.token


def test_ended_work_is_removed_from_its_node(site: Site) -> None:
    record = site.mint()
    site.cycle.run()
    assert isinstance(site.cycle.jobs, FakeJobs)
    site.cycle.jobs.current = {site.user: {"node01"}}
    site.clock.advance(601)
    assert site.cycle.run().removed == 2
    assert not site.nodes["node02"].exists(f"/run/tokenlife/{record.uid}/slurm_jwt")
    site.check("node01", record)


def test_a_pool_at_its_limit_closes_idle_sessions_and_still_delivers_everywhere(
    site: Site,
) -> None:
    """delivery.ssh.max_connections = 1 for three real nodes: each push first
    closes the other node's session (sshd sees the client leave), and every
    node still gets every token."""
    ssh = replace(site.transport.pool.config, max_connections=1, concurrency=1)
    transport = SshTransport(DeliveryConfig(transport="ssh", ssh=ssh))
    open_at_connect: list[int] = []
    opened: list[Any] = []
    connect = transport.pool._connect

    def counted(node: str) -> object:
        open_at_connect.append(len(transport.pool.connected()))
        conn = connect(node)
        opened.append((conn, conn.client.get_transport()))
        return conn

    transport.pool._connect = counted  # type: ignore[method-assign,assignment]
    cycle = replace_transport(site, transport)

    def seen(what: str) -> int:  # the nodes' logs run on across this module's tests
        return sum(site.nodes.logs(n, lines=1000).count(what) for n in NODES)

    logins_before, leaves_before = seen("Accepted publickey"), seen("Close session:")
    try:
        for round_ in range(2):
            site.clock.advance(100)
            record = site.mint()
            summary = cycle.run()
            assert (summary.delivered, summary.failed) == (3, 0), summary.errors
            for node in NODES:
                site.check(node, record)
            assert len(transport.pool.connected()) == 1, round_
        # a connection is opened only once the previous one is closed
        assert open_at_connect == [0] * len(open_at_connect) and len(open_at_connect) >= 5
        logins = seen("Accepted publickey") - logins_before
        leaves = seen("Close session:") - leaves_before
        assert logins == len(open_at_connect)
        assert leaves >= logins - 1  # every session but the pooled one was closed by us
        # ... and paramiko's thread of each closed one ended with it, well before
        # its idle poll (transfer.ssh.IDLE_POLL) would have noticed
        pooled = list(transport.pool._conns.values())
        closed = [t for c, t in opened if c not in pooled]
        deadline = time.monotonic() + IDLE_POLL / 2
        while any(t.is_alive() for t in closed) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(closed) == len(opened) - 1 and not any(t.is_alive() for t in closed)
        # what paramiko says about a connection closed on purpose is no error of ours
        assert {t.log_name for t in closed} == {CLOSING_LOG}
        assert logging.getLogger(CLOSING_LOG).getEffectiveLevel() > logging.ERROR
        assert {t.log_name for c, t in opened if c in pooled} == {"paramiko.transport"}
    finally:
        transport.close()


def replace_transport(site: Site, transport: SshTransport) -> DeliveryCycle:
    """The site's cycle, one push at a time over ``transport``."""
    cycle = site.cycle
    return DeliveryCycle(
        site.store, transport, cycle.jobs, cycle.remove_after, concurrency=1, clock=site.clock
    )


def test_a_warm_install_is_a_dozen_requests_and_a_new_connection_sweeps(site: Site) -> None:
    """A warm push of a newer token costs 11 SFTP requests in 8 round trips (the
    OPEN carries the mode, one FSETSTAT sets mode, owner and mtime, the write,
    FSETSTAT, fsync and close go out together, and the directories are checked
    and swept once per connection); a temporary file that a killed pusher left
    is removed by the first install over a new connection, and a directory
    removed behind the pool's back is made again at once."""
    record = site.mint()
    assert site.cycle.run().delivered == 3
    requests: list[int] = []
    sftp: Any = site.transport.pool._conns["node01"].sftp
    real = sftp._async_request  # every request goes through it (writes directly)

    waits: list[int] = []  # how many requests were out each time an answer was awaited
    real_read = sftp._read_response

    def counted(fileobj: object, kind: int, *args: object) -> object:
        requests.append(kind)
        return real(fileobj, kind, *args)

    def awaited(num: object = None) -> object:
        waits.append(len(requests))
        return real_read(num)

    sftp._async_request, sftp._read_response = counted, awaited
    site.clock.advance(100)
    newer = site.mint()
    assert site.cycle.run(node="node01").delivered == 1
    site.check("node01", newer)
    assert len(requests) == 11, requests
    assert paramiko.sftp.CMD_OPENDIR not in requests
    # the temporary file's write, FSETSTAT, fsync and close go out together:
    # 8 waits for an answer, not 11
    sftp._async_request, sftp._read_response = real, real_read
    write = requests.index(paramiko.sftp.CMD_WRITE)
    assert requests[write : write + 4] == [
        paramiko.sftp.CMD_WRITE,
        paramiko.sftp.CMD_FSETSTAT,
        paramiko.sftp.CMD_EXTENDED,
        paramiko.sftp.CMD_CLOSE,
    ]
    assert len(set(waits)) == 8, waits

    # Root on the node (an epilog, say) removes the user's directory: the
    # next push over the same connection still delivers, and makes it again.
    shutil.rmtree(site.nodes["node01"].path(f"/run/tokenlife/{record.uid}"))
    site.clock.advance(100)
    again = site.mint()
    summary = site.cycle.run(node="node01")
    assert (summary.delivered, summary.failed) == (1, 0), summary.errors
    site.check("node01", again)

    # A pusher killed between its temporary file and the rename left this:
    user_dir = f"/run/tokenlife/{record.uid}"
    left = site.nodes["node01"].path(f"{user_dir}/.slurm_jwt.{newer.iat - 1}.0123456789ab.tmp")
    left.write_bytes(b"old")
    restarted = SshTransport(DeliveryConfig(transport="ssh", ssh=site.transport.pool.config))
    try:
        site.clock.advance(100)
        newest = site.mint()
        assert replace_transport(site, restarted).run(node="node01").delivered == 1
        site.check("node01", newest)
        assert site.nodes["node01"].listdir(user_dir) == ["slurm_jwt"]
    finally:
        restarted.close()
