"""The node-side delivery contract: what every NodeFS (a way to reach nodes) must do.

A transport proves itself with a subclass that overrides one fixture, ``node``: a
fresh :class:`Node`, i.e. a factory of the NodeFS under test, :class:`NodeFiles` to
check and tamper with the same node's files behind its back (:class:`RootedFiles`
when this host sees them under a directory), and a scratch path off ``BASE``::

    class TestMyFS(TransportContract):
        @pytest.fixture
        def node(self, tmp_path: Path) -> Node:
            root = tmp_path / "node"   # the node's "/", fresh per test
            (root / "run").mkdir(parents=True)
            return Node(lambda: MyFS(root), RootedFiles(root), outside="/scratch")

It needs root (files go to uid 4242).  Each test delivers through transfer.nodefs
to ``BASE`` and checks content, mode, owner and iat as mtime through NodeFiles;
the ``test_service_file_*`` tests do the same for a service account's file
(``nodefs.install_file``) in ``BASE/svc``.
tokenlife runs it on LocalFS and on SFTP to a real OpenSSH node
(tests/integration/test_transport_contract.py).
``pytest.register_assert_rewrite("tokenlife.testing")`` in a conftest.py details failures.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import pytest

from tokenlife.errors import TransportError
from tokenlife.interfaces import NodeFS
from tokenlife.records import ServiceFile, TokenFile
from tokenlife.slurm_jwt import SlurmJwt
from transfer import nodefs
from transfer.nodefs import INSTALLED, NEWER_THERE, UNCHANGED

BASE = "/run/tokenlife"
UID, GID = 4242, 4343


class NodeFiles(Protocol):
    """The node's own file system by absolute node path, not through the code under test."""

    def lstat(self, path: str) -> os.stat_result:
        """``os.lstat`` on the node (FileNotFoundError if absent)."""
        ...

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists on the node, following symlinks (``Path.exists``)."""
        ...

    def read_bytes(self, path: str) -> bytes: ...

    def listdir(self, path: str) -> list[str]: ...

    def mkdir(self, path: str, mode: int) -> None:
        """Make the directory (and missing parents, 0755) if absent, then set ``mode``."""
        ...

    def chmod(self, path: str, mode: int) -> None: ...

    def chown(self, path: str, uid: int, gid: int) -> None: ...

    def write_bytes(self, path: str, data: bytes) -> None: ...

    def utime(self, path: str, atime: float, mtime: float) -> None: ...

    def symlink(self, path: str, target: str) -> None:
        """Make ``path`` a symlink that the NodeFS under test resolves to node path ``target``."""
        ...


class RootedFiles:
    """NodeFiles for a node whose "/" this host sees at ``root`` (a directory, a
    container's root file system, /proc/PID/root of a mount namespace).

    Symlinks hold host paths (under ``root``), right for a NodeFS working on this
    host under a prefix (LocalFS(root)); ``node_side_links`` makes them hold node
    paths, for a NodeFS that follows them on the node (sshd in the node's namespace).
    """

    def __init__(self, root: Path, node_side_links: bool = False) -> None:
        self.root = root
        self.node_side_links = node_side_links

    def host(self, path: str) -> Path:
        """This host's path of the node's absolute ``path``."""
        if not path.startswith("/"):
            raise ValueError(f"not an absolute node path: {path!r}")
        return self.root / path.lstrip("/")

    @contextmanager
    def _fd(self, path: str) -> Iterator[int]:
        fd = os.open(self.host(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def lstat(self, path: str) -> os.stat_result:
        return self.host(path).lstat()

    def exists(self, path: str) -> bool:
        return self.host(path).exists()

    def read_bytes(self, path: str) -> bytes:
        return self.host(path).read_bytes()

    def listdir(self, path: str) -> list[str]:
        return os.listdir(self.host(path))

    def mkdir(self, path: str, mode: int) -> None:
        self.host(path).mkdir(mode=mode, parents=True, exist_ok=True)
        self.chmod(path, mode)

    def chmod(self, path: str, mode: int) -> None:
        with self._fd(path) as fd:
            os.fchmod(fd, mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self._fd(path) as fd:
            os.fchown(fd, uid, gid)

    def write_bytes(self, path: str, data: bytes) -> None:
        self.host(path).write_bytes(data)

    def utime(self, path: str, atime: float, mtime: float) -> None:
        os.utime(self.host(path), (atime, mtime))

    def symlink(self, path: str, target: str) -> None:
        text = target if self.node_side_links else str(self.host(target))
        self.host(path).symlink_to(text)


@dataclass(frozen=True)
class Node:
    """A node under test, fresh per test: ``BASE`` absent or empty (root's, 0755)."""

    #: a new NodeFS (connection) to the node under test at every call
    connect: Callable[[], NodeFS]
    #: the same node's files, seen and changed behind the NodeFS's back
    files: NodeFiles
    #: a node path off ``BASE`` the tests may create things under (symlink targets)
    outside: str


def token(version: int, iat: int, uid: int = UID, size: int = 40) -> TokenFile:
    body = f"h.{version}-{iat}".ljust(size, "x") + ".s"
    return TokenFile("u", uid, GID, "tid", version, iat, iat + 3600, body)


def check_file(node: Node, tf: TokenFile) -> None:
    path = f"{BASE}/{tf.uid}/slurm_jwt"
    st = node.files.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (tf.uid, tf.gid)
    assert int(st.st_mtime) == tf.iat
    assert node.files.read_bytes(path) == tf.data()
    directory = node.files.lstat(f"{BASE}/{tf.uid}")
    assert stat.S_IMODE(directory.st_mode) == 0o700
    assert (directory.st_uid, directory.st_gid) == (tf.uid, tf.gid)


def leftovers(node: Node, uid: int = UID) -> list[str]:
    names = node.files.listdir(BASE) + node.files.listdir(f"{BASE}/{uid}")
    return sorted(n for n in names if n.startswith("."))


class TransportContract:
    @pytest.fixture
    def node(self) -> Node:
        raise NotImplementedError("a subclass provides the node under test (a Node)")

    def test_first_delivery_creates_the_directories(self, node: Node) -> None:
        tf = token(1, 1_800_000_000)
        assert nodefs.install(node.connect(), BASE, tf) == INSTALLED
        check_file(node, tf)
        assert stat.S_IMODE(node.files.lstat(BASE).st_mode) == 0o755
        assert leftovers(node) == []

    def test_newer_replaces_and_the_same_is_left_alone(self, node: Node) -> None:
        fs = node.connect()
        old, new = token(1, 1_800_000_000), token(2, 1_800_000_100, size=60)
        assert nodefs.install(fs, BASE, old) == INSTALLED
        before = node.files.lstat(f"{BASE}/{UID}/slurm_jwt").st_ino
        assert nodefs.install(fs, BASE, old) == UNCHANGED
        assert node.files.lstat(f"{BASE}/{UID}/slurm_jwt").st_ino == before  # not rewritten
        assert nodefs.install(fs, BASE, new) == INSTALLED
        check_file(node, new)
        assert leftovers(node) == []

    def test_an_older_token_never_replaces_a_newer_one(self, node: Node) -> None:
        fs = node.connect()
        new, late = token(5, 1_800_000_500), token(4, 1_800_000_400)
        assert nodefs.install(fs, BASE, new) == INSTALLED
        assert nodefs.install(fs, BASE, late) == NEWER_THERE
        check_file(node, new)
        assert leftovers(node) == []

    def test_wrong_directory_owner_and_mode_are_repaired(self, node: Node) -> None:
        node.files.mkdir(f"{BASE}/{UID}", 0o777)
        tf = token(1, 1_800_000_000)
        assert nodefs.install(node.connect(), BASE, tf) == INSTALLED
        check_file(node, tf)

    def test_a_symlink_in_place_of_the_user_directory_is_refused(self, node: Node) -> None:
        elsewhere = f"{node.outside}/elsewhere"
        node.files.mkdir(elsewhere, 0o755)
        node.files.mkdir(BASE, 0o755)
        node.files.symlink(f"{BASE}/{UID}", elsewhere)
        with pytest.raises(TransportError, match="is not a directory"):
            nodefs.install(node.connect(), BASE, token(1, 1_800_000_000))
        assert node.files.listdir(elsewhere) == []

    def test_a_symlink_in_place_of_the_file_is_replaced_not_followed(self, node: Node) -> None:
        victim = f"{node.outside}/victim"
        node.files.mkdir(node.outside, 0o755)
        node.files.write_bytes(victim, b"keep")
        user_dir = f"{BASE}/{UID}"
        node.files.mkdir(user_dir, 0o700)
        node.files.chown(user_dir, UID, GID)
        node.files.symlink(f"{user_dir}/slurm_jwt", victim)
        tf = token(1, 1_800_000_000)
        assert nodefs.install(node.connect(), BASE, tf) == INSTALLED
        check_file(node, tf)
        assert node.files.read_bytes(victim) == b"keep" and node.files.lstat(victim).st_uid == 0

    def test_a_base_directory_users_can_write_is_refused(self, node: Node) -> None:
        node.files.mkdir(BASE, 0o777)
        with pytest.raises(TransportError, match="not group/world-writable"):
            nodefs.install(node.connect(), BASE, token(1, 1_800_000_000))
        assert not node.files.exists(f"{BASE}/{UID}")

    def test_remove_deletes_the_file_and_the_empty_directory(self, node: Node) -> None:
        fs = node.connect()
        nodefs.install(fs, BASE, token(1, 1_800_000_000))
        nodefs.install(fs, BASE, token(1, 1_800_000_000, uid=UID + 1))
        assert nodefs.remove(fs, BASE, UID) is True
        assert not node.files.exists(f"{BASE}/{UID}")
        assert node.files.exists(f"{BASE}/{UID + 1}/slurm_jwt")
        assert nodefs.remove(fs, BASE, UID) is False

    def test_a_stale_lock_is_broken(self, node: Node) -> None:
        fs = node.connect()
        tf = token(1, 1_800_000_000)
        nodefs.install(fs, BASE, token(0, 1_700_000_000))
        lock = f"{BASE}/.lock.{UID}"
        node.files.write_bytes(lock, b"")
        node.files.utime(lock, 1, 1)  # left by a pusher that died long ago
        assert nodefs.install(fs, BASE, tf) == INSTALLED
        check_file(node, tf)
        assert not node.files.exists(lock)

    def test_racing_pushers_leave_the_newest(self, node: Node) -> None:
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

    # -- a service account's token at a path of its own (nodefs.install_file) ------------

    def test_service_file_is_installed_with_its_owner_group_and_mode(self, node: Node) -> None:
        node.files.mkdir(SERVICE_DIR, 0o755)
        sf = service_file(1, 1_800_000_000, mode=0o640)
        assert nodefs.install_file(node.connect(), sf, SlurmJwt().read) == INSTALLED
        check_service_file(node, sf)
        assert node.files.listdir(SERVICE_DIR) == ["jwt"]  # no temporary file, no lock

    def test_service_file_same_is_left_alone_older_never_over_newer(self, node: Node) -> None:
        node.files.mkdir(SERVICE_DIR, 0o755)
        fs = node.connect()
        v1, v2 = service_file(1, 1_800_000_000), service_file(2, 1_800_000_100)
        assert nodefs.install_file(fs, v2, SlurmJwt().read) == INSTALLED
        inode = node.files.lstat(SERVICE_PATH).st_ino
        assert nodefs.install_file(fs, v2, SlurmJwt().read) == UNCHANGED
        assert nodefs.install_file(fs, v1, SlurmJwt().read) == NEWER_THERE
        assert node.files.lstat(SERVICE_PATH).st_ino == inode
        check_service_file(node, v2)
        # A new chain minted in the second its predecessor was renewed: a later exp.
        chain = service_file(1, 1_800_000_100, exp=1_800_003_700 + 60)
        assert nodefs.install_file(fs, chain, SlurmJwt().read) == INSTALLED
        check_service_file(node, chain)
        # The same token with another mode (changed by hand) is written again.
        node.files.chmod(SERVICE_PATH, 0o644)
        assert nodefs.install_file(fs, chain, SlurmJwt().read) == INSTALLED
        check_service_file(node, chain)
        assert node.files.listdir(SERVICE_DIR) == ["jwt"]

    def test_service_file_replaces_what_is_not_a_newer_token(self, node: Node) -> None:
        node.files.mkdir(SERVICE_DIR, 0o755)
        fs = node.connect()
        for junk in (b"not a token", b"\xff" * 10, b""):
            node.files.write_bytes(SERVICE_PATH, junk)
            sf = service_file(1, 1_800_000_000)
            assert nodefs.install_file(fs, sf, SlurmJwt().read) == INSTALLED
            check_service_file(node, sf)
        # Another user's newer token is no reason to keep it.
        other = service_file(9, 1_900_000_000, user="someone-else")
        node.files.write_bytes(SERVICE_PATH, other.token.data())
        assert nodefs.install_file(fs, sf, SlurmJwt().read) == INSTALLED
        check_service_file(node, sf)

    def test_service_file_symlink_is_replaced_not_followed(self, node: Node) -> None:
        victim = f"{node.outside}/victim"
        node.files.mkdir(node.outside, 0o755)
        node.files.write_bytes(victim, b"keep")
        node.files.mkdir(SERVICE_DIR, 0o755)
        node.files.symlink(SERVICE_PATH, victim)
        sf = service_file(1, 1_800_000_000)
        assert nodefs.install_file(node.connect(), sf, SlurmJwt().read) == INSTALLED
        check_service_file(node, sf)
        assert node.files.read_bytes(victim) == b"keep" and node.files.lstat(victim).st_uid == 0

    def test_service_file_directory_must_be_roots_alone(self, node: Node) -> None:
        fs = node.connect()
        sf = service_file(1, 1_800_000_000)
        with pytest.raises(TransportError, match=f"^{SERVICE_DIR} does not exist$"):
            nodefs.install_file(fs, sf, SlurmJwt().read)
        node.files.mkdir(SERVICE_DIR, 0o775)
        with pytest.raises(TransportError, match="must be owned by root and not group/world"):
            nodefs.install_file(fs, sf, SlurmJwt().read)
        node.files.chmod(SERVICE_DIR, 0o755)
        node.files.chown(SERVICE_DIR, UID, GID)
        with pytest.raises(TransportError, match="must be owned by root and not group/world"):
            nodefs.install_file(fs, sf, SlurmJwt().read)
        assert node.files.listdir(SERVICE_DIR) == []
        elsewhere = f"{node.outside}/elsewhere"
        node.files.mkdir(elsewhere, 0o755)
        link = f"{BASE}/linked/jwt"
        node.files.symlink(f"{BASE}/linked", elsewhere)
        with pytest.raises(TransportError, match=f"^{BASE}/linked is not a directory$"):
            nodefs.install_file(fs, replace(sf, path=link), SlurmJwt().read)
        assert node.files.listdir(elsewhere) == []
        node.files.mkdir(SERVICE_PATH, 0o755)
        node.files.chown(SERVICE_DIR, 0, 0)
        with pytest.raises(TransportError, match=f"^{SERVICE_PATH} is a directory$"):
            nodefs.install_file(fs, sf, SlurmJwt().read)


SERVICE_DIR = f"{BASE}/svc"
SERVICE_PATH = f"{SERVICE_DIR}/jwt"


def service_file(
    version: int, iat: int, exp: int | None = None, mode: int = 0o600, user: str = "svc"
) -> ServiceFile:
    """A token that reads like one of ours (SlurmJwt.read: never verified here)."""
    exp = exp or iat + 3600
    claims = {"sun": user, "iat": iat, "exp": exp}
    claims["tokenlife"] = {"renew_until": iat + 86400, "version": version}

    def part(data: object) -> str:
        raw = json.dumps(data, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    text = f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"
    tf = TokenFile(user, 4444, 4444, f"t{version}", version, iat, exp, text)
    return ServiceFile(SERVICE_PATH, UID, GID, mode, tf)


def check_service_file(node: Node, sf: ServiceFile) -> None:
    st = node.files.lstat(sf.path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == sf.mode
    assert (st.st_uid, st.st_gid) == (sf.owner, sf.group)
    assert node.files.read_bytes(sf.path) == sf.token.data()
