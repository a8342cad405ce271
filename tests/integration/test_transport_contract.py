"""The node-side delivery contract, for every NodeFS: the local file system and
SFTP on a real OpenSSH node.

``TestNodeFS`` runs tokenlife.testing.transport_contract once per NodeFS: each
test gets a fresh node view and the base directory /run/tokenlife-like path
``BASE`` on it; it checks the files there (content, mode, owner, iat as mtime)
through the node's own file system, not through the code under test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from tests.conftest import require_root, require_tool
from tests.integration.harness.sshnodes import SshNodes
from tokenlife.interfaces import NodeFS
from tokenlife.testing.transport_contract import Node, RootedFiles, TransportContract
from transfer.localfs import LocalFS
from transfer.sftpfs import SftpFS


@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshNodes]:
    require_root()
    require_tool("sshd", "unshare", "nsenter", "ssh-keygen")
    with SshNodes(tmp_path_factory.mktemp("ssh"), 1) as nodes:
        yield nodes


class TestNodeFS(TransportContract):
    @pytest.fixture(params=["local", "ssh"])
    def node(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
        require_root()  # handing files to other users needs root, as on a real node
        if request.param == "local":
            root = tmp_path / "node"
            (root / "run").mkdir(parents=True)
            yield Node(lambda: LocalFS(str(root)), RootedFiles(root), outside="/outside")
            return
        nodes: SshNodes = request.getfixturevalue("ssh_nodes")
        nodes.reboot_node("node01")  # a fresh, empty /run/tokenlife
        clients: list[paramiko.SSHClient] = []

        def connect() -> NodeFS:
            clients.append(nodes.connect("node01"))
            return SftpFS(clients[-1].open_sftp(), own_uid=0)

        # The node's files through /proc/HOLDER/root; its /tmp is this host's.
        files = RootedFiles(nodes["node01"].path("/"), node_side_links=True)
        try:
            yield Node(connect, files, outside=f"{tmp_path}/outside")
        finally:
            for client in clients:
                client.close()
