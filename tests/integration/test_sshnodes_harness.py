"""The SSH worker-node harness itself (``harness/sshnodes.py``): real sshd per node.

Checks what the delivery tests rely on: strict host keys from the harness's
``known_hosts``, the client key as the only way in, SFTP writes landing in one
node's private ``/run/tokenlife`` only, a changed host key being refused, a
stopped node refusing connections and coming back, many nodes starting fast,
and nothing left running after ``stop()`` (even after a failed start).
"""

from __future__ import annotations

import io
import os
import secrets
import socket
import stat
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import pytest

from tests.conftest import require_root, require_tool
from tests.integration.harness.sshnodes import SshNode, SshNodes, SshNodesError, free_port

TOOLS = ("sshd", "ssh-keygen", "unshare", "nsenter")


def _require_nodes() -> None:
    require_root()
    require_tool(*TOOLS)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshNodes]:
    _require_nodes()
    harness = SshNodes(tmp_path_factory.mktemp("sshnodes"), 3)
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


def _client(nodes: SshNodes, name: str) -> paramiko.SSHClient:
    """Connect as the delivery code will: strict known_hosts, the client key only."""
    node = nodes[name]
    client = paramiko.SSHClient()
    client.load_system_host_keys(str(nodes.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        node.address,
        port=node.port,
        username="root",
        key_filename=str(nodes.client_key),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    return client


def _harness_processes(workdir: Path) -> list[int]:
    """Pids of processes whose command line mentions ``workdir`` (sshd -f ...)."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(workdir).encode() in cmdline:
            found.append(int(pid))
    return found


class _SpyNodes(SshNodes):
    """Remembers the pids of the namespace holders it started."""

    holders: list[int]

    def _start_holders(self, nodes: list[SshNode]) -> None:
        super()._start_holders(nodes)
        self.holders = [*getattr(self, "holders", []), *(node.pid for node in nodes)]


def test_every_node_accepts_the_client_key_with_strict_host_keys(nodes: SshNodes) -> None:
    namespaces = set()
    for node in nodes:
        assert node.address == f"127.0.0.{1 + int(node.name[4:])}"
        client = _client(nodes, node.name)
        try:
            _, out, _ = client.exec_command("readlink /proc/self/ns/mnt")
            namespaces.add(out.read().decode().strip())
            sftp = client.open_sftp()
            attrs = sftp.stat("/run/tokenlife")
            assert attrs.st_mode is not None and stat.S_ISDIR(attrs.st_mode)
            assert (stat.S_IMODE(attrs.st_mode), attrs.st_uid) == (0o755, 0)
            sftp.close()
        finally:
            client.close()
    assert len(namespaces) == 3, namespaces  # one mount namespace per node
    assert os.readlink("/proc/self/ns/mnt") not in namespaces


def test_only_the_client_key_gets_in(nodes: SshNodes) -> None:
    other = paramiko.RSAKey.generate(2048)
    client = paramiko.SSHClient()
    client.load_system_host_keys(str(nodes.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    node = nodes["node01"]
    try:
        with pytest.raises(paramiko.AuthenticationException):
            client.connect(
                node.address, port=node.port, username="root", pkey=other,
                look_for_keys=False, allow_agent=False, timeout=10,
            )  # fmt: skip
        with pytest.raises(paramiko.AuthenticationException):
            client.connect(
                node.address, port=node.port, username="root", password="x",
                look_for_keys=False, allow_agent=False, timeout=10,
            )  # fmt: skip
    finally:
        client.close()


def test_sftp_write_lands_in_that_node_only(nodes: SshNodes) -> None:
    name = f"harness-{secrets.token_hex(4)}"
    data = secrets.token_bytes(64)
    client = _client(nodes, "node01")
    try:
        sftp = client.open_sftp()
        sftp.mkdir(f"/run/tokenlife/{name}", 0o700)
        sftp.chown(f"/run/tokenlife/{name}", 4242, 4243)
        tmp, final = f"/run/tokenlife/{name}/.tmp", f"/run/tokenlife/{name}/slurm_jwt"
        sftp.putfo(io.BytesIO(data), tmp)
        sftp.chmod(tmp, 0o600)
        sftp.chown(tmp, 4242, 4243)
        sftp.posix_rename(tmp, final)
        sftp.close()
    finally:
        client.close()
    node01, node02 = nodes["node01"], nodes["node02"]
    assert node01.read(final) == data
    st = node01.stat(final)
    assert (st.kind, st.mode, st.uid, st.gid, st.size) == ("file", 0o600, 4242, 4243, 64)
    assert node01.stat(f"/run/tokenlife/{name}").mode == 0o700
    assert node01.listdir(f"/run/tokenlife/{name}") == ["slurm_jwt"]
    assert node01.run(["stat", "-c", "%a %u:%g", final]).stdout.split() == ["600", "4242:4243"]
    assert not node02.exists(f"/run/tokenlife/{name}")
    assert node02.run(["ls", "-A", "/run/tokenlife"]).stdout == ""
    assert not Path(f"/run/tokenlife/{name}").exists()  # this host's own directory


def test_openssh_client_uses_the_generated_ssh_config(nodes: SshNodes) -> None:
    require_tool("ssh")
    result = subprocess.run(
        ["ssh", "-F", str(nodes.ssh_config), "node02", "grep tokenlife /proc/mounts"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + nodes.logs("node02")
    assert result.stdout.startswith("tokenlife-node02 /run/tokenlife tmpfs")


def test_a_changed_host_key_is_refused(nodes: SshNodes) -> None:
    old = nodes["node03"].host_key_line
    try:
        # Running sshd re-executes per connection and so already offers the new key.
        new = nodes.regenerate_host_key("node03", restart=False)
        assert new != old
        with pytest.raises(paramiko.BadHostKeyException):
            _client(nodes, "node03").close()
        nodes.regenerate_host_key("node03")  # and again, restarting sshd
        with pytest.raises(paramiko.BadHostKeyException):
            _client(nodes, "node03").close()
        _client(nodes, "node02").close()  # the other nodes are unaffected
    finally:
        nodes.write_known_hosts()
    _client(nodes, "node03").close()


def test_a_stopped_node_refuses_connections_and_comes_back(nodes: SshNodes) -> None:
    node = nodes["node02"]
    marker = f"/run/tokenlife/down-{secrets.token_hex(4)}"
    node.run(["sh", "-c", f"echo kept > {marker}"])
    nodes.stop_node("node02")
    try:
        assert not node.running
        with pytest.raises(ConnectionRefusedError), socket.socket() as sock:
            sock.connect((node.address, node.port))
        with pytest.raises(paramiko.ssh_exception.NoValidConnectionsError):
            _client(nodes, "node02")
        assert node.read(marker) == b"kept\n"  # an outage: the files stay
        _client(nodes, "node01").close()
    finally:
        nodes.start_node("node02")
    client = _client(nodes, "node02")
    try:
        assert client.open_sftp().stat(marker).st_size == 5
    finally:
        client.close()
    nodes.reboot_node("node02")  # a reboot: the tmpfs is new and empty
    assert node.listdir("/run/tokenlife") == []
    _client(nodes, "node02").close()


def test_fifty_nodes_start_quickly_and_all_accept(tmp_path: Path) -> None:
    _require_nodes()
    with SshNodes(tmp_path, 50) as many:
        assert many.start_seconds is not None and many.start_seconds < 15, many.start_seconds
        assert many.names[0] == "node01" and many.names[-1] == "node50"
        assert many["node50"].address == "127.0.0.51"

        def check(name: str) -> str:
            with many.connect(name) as client:
                return client.open_sftp().normalize("/run/tokenlife")

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(check, many.names)) == {"/run/tokenlife"}
    assert _harness_processes(tmp_path) == []


def test_a_failed_start_leaves_nothing_running(tmp_path: Path) -> None:
    _require_nodes()
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.3", port))  # node02's address and port
        taken.listen()
        harness = _SpyNodes(tmp_path, 3, port=port)
        try:
            with pytest.raises(SshNodesError, match="node02: sshd exited"):
                harness.start()
            assert _harness_processes(tmp_path) == []
            assert len(harness.holders) == 3
            assert not [pid for pid in harness.holders if Path(f"/proc/{pid}").exists()]
        finally:
            harness.stop()
    assert all(not node.running for node in harness)
    assert "Address already in use" in harness.logs("node02")


def test_an_auto_port_taken_meanwhile_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require_nodes()
    from tests.integration.harness import sshnodes

    with socket.socket() as taken:
        taken.bind(("127.0.0.2", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1], free_port()])
        monkeypatch.setattr(sshnodes, "free_port", lambda: next(ports))
        with SshNodes(tmp_path, 2) as two:
            assert two.port != taken.getsockname()[1]
            assert "Address already in use" in two.logs("node01")
            two.connect("node01").close()
