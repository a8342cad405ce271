"""The node-side delivery contract, for every NodeFS: the local file system and
SFTP on a real OpenSSH node.

Each test gets a fresh node view and the base directory /run/tokenlife-like
path ``BASE`` on it; it checks the files there (content, mode, owner, iat as
mtime) through the node's own file system, not through the code under test.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from tests.conftest import require_root, require_tool
from tests.integration.harness.sshnodes import SshNodes
from tokenlife.errors import TransportError
from tokenlife.interfaces import NodeFS
from tokenlife.records import TokenFile
from transfer import nodefs
from transfer.localfs import LocalFS
from transfer.nodefs import INSTALLED, NEWER_THERE, UNCHANGED
from transfer.sftpfs import SftpFS

BASE = "/run/tokenlife"
UID, GID = 4242, 4343


@dataclass
class Node:
    """A node under test: a NodeFS factory and the node's real files (``root``)."""

    connect: Callable[[], NodeFS]
    root: Path  # where the node's "/" is, seen from the test

    def path(self, node_path: str) -> Path:
        return self.root / node_path.lstrip("/")


@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshNodes]:
    require_root()
    require_tool("sshd", "unshare", "nsenter", "ssh-keygen")
    with SshNodes(tmp_path_factory.mktemp("ssh"), 1) as nodes:
        yield nodes


@pytest.fixture(params=["local", "ssh"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    require_root()  # handing files to other users needs root, as on a real node
    if request.param == "local":
        root = tmp_path / "node"
        (root / "run").mkdir(parents=True)
        yield Node(lambda: LocalFS(str(root)), root)
        return
    nodes: SshNodes = request.getfixturevalue("ssh_nodes")
    nodes.reboot_node("node01")  # a fresh, empty /run/tokenlife
    clients: list[paramiko.SSHClient] = []

    def connect() -> NodeFS:
        clients.append(nodes.connect("node01"))
        return SftpFS(clients[-1].open_sftp(), own_uid=0)

    try:
        yield Node(connect, nodes["node01"].path("/"))
    finally:
        for client in clients:
            client.close()


def token(version: int, iat: int, uid: int = UID, size: int = 40) -> TokenFile:
    body = f"h.{version}-{iat}".ljust(size, "x") + ".s"
    return TokenFile("u", uid, GID, "tid", version, iat, iat + 3600, body)


def check_file(node: Node, tf: TokenFile) -> None:
    path = node.path(f"{BASE}/{tf.uid}/slurm_jwt")
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (tf.uid, tf.gid)
    assert int(st.st_mtime) == tf.iat
    assert path.read_bytes() == tf.data()
    directory = path.parent.lstat()
    assert stat.S_IMODE(directory.st_mode) == 0o700
    assert (directory.st_uid, directory.st_gid) == (tf.uid, tf.gid)


def leftovers(node: Node, uid: int = UID) -> list[str]:
    names = os.listdir(node.path(BASE)) + os.listdir(node.path(f"{BASE}/{uid}"))
    return sorted(n for n in names if n.startswith("."))


def test_first_delivery_creates_the_directories(node: Node) -> None:
    tf = token(1, 1_800_000_000)
    assert nodefs.install(node.connect(), BASE, tf) == INSTALLED
    check_file(node, tf)
    assert stat.S_IMODE(node.path(BASE).lstat().st_mode) == 0o755
    assert leftovers(node) == []


def test_newer_replaces_and_the_same_is_left_alone(node: Node) -> None:
    fs = node.connect()
    old, new = token(1, 1_800_000_000), token(2, 1_800_000_100, size=60)
    assert nodefs.install(fs, BASE, old) == INSTALLED
    before = node.path(f"{BASE}/{UID}/slurm_jwt").stat().st_ino
    assert nodefs.install(fs, BASE, old) == UNCHANGED
    assert node.path(f"{BASE}/{UID}/slurm_jwt").stat().st_ino == before  # not rewritten
    assert nodefs.install(fs, BASE, new) == INSTALLED
    check_file(node, new)
    assert leftovers(node) == []


def test_an_older_token_never_replaces_a_newer_one(node: Node) -> None:
    fs = node.connect()
    new, late = token(5, 1_800_000_500), token(4, 1_800_000_400)
    assert nodefs.install(fs, BASE, new) == INSTALLED
    assert nodefs.install(fs, BASE, late) == NEWER_THERE
    check_file(node, new)
    assert leftovers(node) == []


def test_wrong_directory_owner_and_mode_are_repaired(node: Node) -> None:
    user_dir = node.path(f"{BASE}/{UID}")
    user_dir.mkdir(parents=True, mode=0o777)
    user_dir.chmod(0o777)
    tf = token(1, 1_800_000_000)
    assert nodefs.install(node.connect(), BASE, tf) == INSTALLED
    check_file(node, tf)


def test_a_symlink_in_place_of_the_user_directory_is_refused(node: Node, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    node.path(BASE).mkdir(parents=True, exist_ok=True)
    node.path(f"{BASE}/{UID}").symlink_to(elsewhere)
    with pytest.raises(TransportError, match="is not a directory"):
        nodefs.install(node.connect(), BASE, token(1, 1_800_000_000))
    assert list(elsewhere.iterdir()) == []


def test_a_symlink_in_place_of_the_file_is_replaced_not_followed(
    node: Node, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    user_dir = node.path(f"{BASE}/{UID}")
    user_dir.mkdir(parents=True, mode=0o700)
    os.chown(user_dir, UID, GID)
    (user_dir / "slurm_jwt").symlink_to(victim)
    tf = token(1, 1_800_000_000)
    assert nodefs.install(node.connect(), BASE, tf) == INSTALLED
    check_file(node, tf)
    assert victim.read_text() == "keep" and victim.stat().st_uid == 0


def test_a_base_directory_users_can_write_is_refused(node: Node) -> None:
    node.path(BASE).mkdir(parents=True, exist_ok=True)
    node.path(BASE).chmod(0o777)
    with pytest.raises(TransportError, match="not group/world-writable"):
        nodefs.install(node.connect(), BASE, token(1, 1_800_000_000))
    assert not node.path(f"{BASE}/{UID}").exists()


def test_remove_deletes_the_file_and_the_empty_directory(node: Node) -> None:
    fs = node.connect()
    nodefs.install(fs, BASE, token(1, 1_800_000_000))
    nodefs.install(fs, BASE, token(1, 1_800_000_000, uid=UID + 1))
    assert nodefs.remove(fs, BASE, UID) is True
    assert not node.path(f"{BASE}/{UID}").exists()
    assert node.path(f"{BASE}/{UID + 1}/slurm_jwt").exists()
    assert nodefs.remove(fs, BASE, UID) is False


def test_a_stale_lock_is_broken(node: Node) -> None:
    fs = node.connect()
    tf = token(1, 1_800_000_000)
    nodefs.install(fs, BASE, token(0, 1_700_000_000))
    lock = node.path(f"{BASE}/.lock.{UID}")
    lock.write_bytes(b"")
    os.utime(lock, (1, 1))  # left by a pusher that died long ago
    assert nodefs.install(fs, BASE, tf) == INSTALLED
    check_file(node, tf)
    assert not lock.exists()


def test_racing_pushers_leave_the_newest(node: Node) -> None:
    """Two pushers, one holding older versions, hammer one node at once."""
    versions = [token(v, 1_800_000_000 + v) for v in range(1, 31)]
    errors: list[BaseException] = []

    def push(mine: list[TokenFile]) -> None:
        fs = node.connect()
        try:
            for _ in range(3):
                for tf in mine:
                    nodefs.install(fs, BASE, tf)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    newest_first = threading.Thread(target=push, args=(versions[::-1],))
    oldest_first = threading.Thread(target=push, args=(versions[:-1],))
    newest_first.start()
    oldest_first.start()
    newest_first.join()
    oldest_first.join()
    assert errors == []
    check_file(node, versions[-1])
    assert leftovers(node) == []
