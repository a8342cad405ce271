"""SSH connections to the worker nodes: pooled, strict about host keys.

One paramiko connection (and SFTP session) per node, opened on first use
and kept with keepalives, so a renewal cycle costs a few round trips per
node instead of a handshake.  Host keys come only from the configured
known_hosts file: an unknown host is refused, a changed key is refused with
both fingerprints, and nothing is ever added to the file.

The pool holds at most ``max_connections`` connections: each costs a socket,
a paramiko thread and about 100 KB of memory here, and a node an sshd session.
At the limit, opening one more first closes the connection used least
recently that nobody is using.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from tokenlife.config import SshConfig
from tokenlife.errors import TransportError
from tokenlife.fsutil import read_private_file
from transfer.sftpfs import SftpFS

log = logging.getLogger(__name__)

KEEPALIVE = 30  # seconds; idle pooled connections survive NAT and firewalls
#: how often each connection's paramiko thread wakes when nothing arrives
#: (paramiko: every 0.1 s, to notice a close; a thousand pooled connections then
#: cost a third of a CPU doing nothing, and contend for the GIL with the pushes).
#: A close shuts the socket down, which wakes the thread at once.
IDLE_POLL = 2.0
#: paramiko's log channel for a connection the pool is closing on purpose.  A
#: node may answer the shutdown with a reset, which paramiko's thread logs at
#: ERROR ("Socket exception: Connection reset by peer"): no error of ours, so
#: what it says from then on goes to this channel, which logs only CRITICAL.
CLOSING_LOG = "tokenlife.ssh.closing"
logging.getLogger(CLOSING_LOG).setLevel(logging.CRITICAL)


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class Target:
    hostname: str
    port: int
    user: str


class _Conn:
    def __init__(self, client: paramiko.SSHClient, sftp: paramiko.SFTPClient, uid: int) -> None:
        self.client = client
        self.sftp = sftp
        self.uid = uid  # who we are on the node
        self.lock = threading.Lock()  # one operation per connection at a time
        self.users = 0  # callers holding it (the pool's guard counts them): never evicted then
        #: what transfer.nodefs checked over this connection (directories, sweeps):
        #: a new connection checks again
        self.seen: set[str] = set()

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        self.sftp.close()
        transport = self.client.get_transport()
        if transport is not None:
            transport.set_log_channel(CLOSING_LOG)
            # Wake paramiko's thread from its recv (it polls only every
            # IDLE_POLL) and let it end before the socket is closed: a
            # descriptor closed under a thread still waiting on it is reused
            # by the next connection, whose bytes that thread would then read.
            with contextlib.suppress(OSError):
                transport.sock.shutdown(socket.SHUT_RDWR)
            if transport is not threading.current_thread():
                transport.join(IDLE_POLL + 1)
        self.client.close()


class SshPool:
    def __init__(self, config: SshConfig) -> None:
        self.config = config
        # least recently used first: the order evictions go in
        self._conns: OrderedDict[str, _Conn] = OrderedDict()
        self._opening = 0  # connections being opened: they count against the limit
        self._guard = threading.Lock()
        self._pkey: paramiko.PKey | None = None
        self._ssh_config: paramiko.SSHConfig | None = None
        self._targets: dict[str, Target] = {}  # ssh_config lookups, linear in its blocks
        self._known: tuple[tuple[int, int, int], paramiko.HostKeys] | None = None

    # -- configuration, loaded once -----------------------------------------

    def _identity(self) -> paramiko.PKey:
        if self._pkey is None:
            # The same rules as for the signing key: no group/world access,
            # owned by the caller or by root.  A root-owned key serves both
            # the daemon (the tokenlife account reads it through the unit's
            # CAP_DAC_OVERRIDE, as it reads Slurm's key) and root's own
            # `tokenlife push`; only root can change it.
            path = self.config.identity_file
            read_private_file(path, identity_owners(), "SSH identity file")
            try:
                self._pkey = paramiko.PKey.from_path(str(path))
            except (paramiko.SSHException, ValueError, OSError) as exc:
                raise TransportError(
                    f"{self.config.identity_file}: not a usable unencrypted SSH private key"
                ) from exc
        return self._pkey

    def _trust(self, client: paramiko.SSHClient) -> None:
        # Parsed once per pool, not per connection (paramiko's parse is
        # quadratic in the file: ~150 ms per connect with 1000 hosts), and
        # again only when the file changes, so a long-running serve sees an
        # administrator's edit.  Used as "system" host keys: paramiko never
        # writes those back anywhere, and connections only read them.
        path = self.config.known_hosts
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            with self._guard:
                if self._known is None or self._known[0] != stamp:
                    keys = paramiko.HostKeys()
                    keys.load(str(path))
                    self._known = (stamp, keys)
                known = self._known[1]
        except (OSError, paramiko.SSHException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise TransportError(f"cannot read known_hosts file {path}: {reason}") from exc
        # paramiko has no public setter for a parsed HostKeys; connect() only reads it.
        client._system_host_keys = known  # type: ignore[attr-defined]

    def target(self, node: str) -> Target:
        found = self._targets.get(node)
        if found is None:
            found = self._targets[node] = self._lookup(node)
        return found

    def _lookup(self, node: str) -> Target:
        hostname, port, user = node, self.config.port, self.config.user
        if self.config.ssh_config is not None:
            if self._ssh_config is None:
                self._ssh_config = _load_ssh_config(self.config.ssh_config)
            found = self._ssh_config.lookup(node)
            hostname = str(found.get("hostname", node))
            port = int(found.get("port", port))
            user = str(found.get("user", user))
        return Target(hostname, port, user)

    # -- connections ----------------------------------------------------------

    def _connect(self, node: str) -> _Conn:
        target = self.target(node)
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        self._trust(client)
        try:
            client.connect(
                target.hostname,
                port=target.port,
                username=target.user,
                pkey=self._identity(),
                timeout=self.config.connect_timeout,
                banner_timeout=self.config.connect_timeout,
                auth_timeout=self.config.connect_timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise TransportError(
                f"{node}: host key mismatch: the node offers {exc.key.get_name()} "
                f"{fingerprint(exc.key)}, known_hosts has {fingerprint(exc.expected_key)}; "
                "refusing to connect"
            ) from exc
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise TransportError(
                    f"{node}: host key of {_display(target)} is not in "
                    f"{self.config.known_hosts} (looked up as {known_hosts_name(target)}); "
                    "refusing to connect"
                ) from exc
            raise TransportError(f"{node}: ssh: {exc}") from exc
        except (OSError, EOFError) as exc:
            client.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise TransportError(f"{node}: cannot connect to {_display(target)}: {reason}") from exc
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(KEEPALIVE)
        transport.sock.settimeout(IDLE_POLL)
        try:
            sftp = client.open_sftp()
        except (paramiko.SSHException, OSError) as exc:
            client.close()
            raise TransportError(f"{node}: cannot start SFTP: {exc}") from exc
        # A node that stops answering mid-session (hung, frozen, its link
        # gone without a reset) fails its own delivery after this, instead of
        # holding a worker and the whole cycle forever.
        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(operation_timeout(self.config.connect_timeout))
        own_uid = 0 if target.user == "root" else (sftp.lstat(".").st_uid or 0)
        return _Conn(client, sftp, own_uid)

    @contextmanager
    def fs(self, node: str) -> Iterator[SftpFS]:
        """The node's files over its pooled connection (opened or re-opened here)."""
        conn = self._acquire(node)
        try:
            with conn.lock:
                try:
                    yield SftpFS(conn.sftp, own_uid=conn.uid, seen=conn.seen)
                except (OSError, EOFError, paramiko.SSHException) as exc:
                    # The connection broke under us: drop it; the caller retries.
                    self._forget(node, conn)
                    raise TransportError(f"{node}: connection lost: {exc}") from exc
        finally:
            with self._guard:
                conn.users -= 1

    def _acquire(self, node: str) -> _Conn:
        """The node's live connection, marked in use (opened, within the limit, if need be)."""
        with self._guard:
            conn = self._conns.get(node)
            if conn is not None:
                conn.users += 1
                self._conns.move_to_end(node)
        if conn is not None:
            if conn.alive():
                return conn
            with self._guard:
                conn.users -= 1
            self._forget(node, conn)
        self._make_room()
        try:
            new = self._connect(node)
        finally:
            with self._guard:
                self._opening -= 1
        with self._guard:
            # Two callers may open the same node at once: the first one kept wins.
            kept = self._conns.get(node)
            if kept is None or not kept.alive():
                self._conns[node] = kept = new
            kept.users += 1
            self._conns.move_to_end(node)
        if kept is not new:
            new.close()
        elif len(self._conns) > self.config.max_connections:
            self._make_room(opening=False)  # no idle one to close before: now, maybe
        return kept

    def _make_room(self, opening: bool = True) -> None:
        """Close least recently used idle connections until one more fits.

        ``opening``: a connection is about to be opened (it counts until it is
        in the pool).  Connections in use are never closed: with the limit at
        least ``concurrency`` (the configuration checks), an idle one is there.
        """
        victims = []
        with self._guard:
            self._opening += opening
            excess = len(self._conns) + self._opening - self.config.max_connections
            if excess > 0:
                for name, conn in self._conns.items():
                    if conn.users == 0:
                        victims.append(name)
                        if len(victims) == excess:
                            break
            closing = [self._conns.pop(name) for name in victims]
        for conn in closing:
            conn.close()

    def _forget(self, node: str, conn: _Conn) -> None:
        """Close ``conn`` and take it out of the pool (if it is still the node's)."""
        with self._guard:
            if self._conns.get(node) is conn:
                del self._conns[node]
        conn.close()

    def connected(self) -> list[str]:
        with self._guard:
            return sorted(self._conns)

    def close(self) -> None:
        with self._guard:
            conns, self._conns = list(self._conns.values()), OrderedDict()
        for conn in conns:
            conn.close()


def identity_owners() -> set[int]:
    """Who may own the SSH identity file for this process: itself and root."""
    return {os.geteuid(), 0}


def known_hosts_name(target: Target) -> str:
    """The name ``target``'s host key is looked up under in known_hosts.

    As OpenSSH without ``HostKeyAlias`` (and as paramiko's ``connect``): the
    ``HostName`` an ssh_config alias resolves to, not the alias, and in the
    ``[host]:port`` form when the port is not 22 -- what ``ssh-keyscan -p PORT
    HOST`` prints.
    """
    return target.hostname if target.port == 22 else f"[{target.hostname}]:{target.port}"


def operation_timeout(connect_timeout: int) -> float:
    """How long one SFTP request may wait for its answer: a token file is small."""
    return float(max(10, 3 * connect_timeout))


def _display(target: Target) -> str:
    return f"{target.user}@{target.hostname}:{target.port}"


class _SshConfig(paramiko.SSHConfig):
    """paramiko's SSHConfig without its cost per ``Host`` block.

    paramiko's ``_does_match`` asks the user database (``getpass.getuser``)
    for every block it looks at, even one without a ``Match`` line, so a
    lookup in an ssh_config of N hosts cost N user lookups, and a cycle over
    N nodes N squared: 75 s of a cold push to 1,000 nodes (bench_push.py).
    A block without ``Match`` lines matches through its ``Host`` patterns
    alone, as in paramiko; ``Match`` blocks are paramiko's own business.
    """

    def _does_match(self, match_list: list[Any], *args: Any) -> Any:
        return bool(match_list) and super()._does_match(match_list, *args)  # type: ignore[misc]


def _load_ssh_config(path: Path) -> paramiko.SSHConfig:
    try:
        return _SshConfig.from_path(str(path))
    except OSError as exc:
        raise TransportError(f"cannot read ssh_config {path}: {exc.strerror}") from exc
