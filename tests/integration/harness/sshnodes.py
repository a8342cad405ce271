"""Many real OpenSSH worker nodes on one machine, for delivery tests and benchmarks.

Each node is a real ``sshd -D -e`` listening on its own loopback address
(``node01`` on 127.0.0.2, ``node02`` on 127.0.0.3, ...; all on one port), with
its own ed25519 host key, inside its own mount namespace that has a private,
fresh tmpfs on ``/run/tokenlife``: every tool (sshd's SFTP server, ``nsenter``,
the test) sees real paths, and the nodes are told apart.

Per node there are two processes, both children of this one:

* a *holder*, ``unshare --mount --propagation private sh -c 'mount -t tmpfs ...;
  exec sleep infinity'``: it owns the namespace and so the node's files;
* the node's ``sshd``, started into the holder's namespace with
  ``nsenter --target HOLDER --mount``.

That gives two ways down: :meth:`SshNodes.stop_node` stops sshd and every
process it started but keeps the holder, so the node is unreachable (connection
refused) and its files stay as they were (still inspectable), and
:meth:`SshNodes.start_node` brings sshd back over the same files: an outage.
:meth:`SshNodes.reboot_node` also replaces the holder: the node comes back with
an empty tmpfs, like a real reboot. :meth:`SshNodes.stop` ends everything; it
kills every process in the nodes' namespaces (sshd's session children call
``setsid``, so process groups would miss them), and the namespaces and their
tmpfs go with the last process. It is safe after a failed or partial start.

Inspect a node from outside with :meth:`SshNode.read`, :meth:`SshNode.stat`,
:meth:`SshNode.listdir` (through ``/proc/HOLDER/root``, which resolves paths
in the node's namespace) or run any command there with :meth:`SshNode.run`
(``nsenter``). Caveat of the ``/proc`` path: an *absolute* symlink met on the
way resolves in this host's namespace, so ``stat`` does not follow the last
component and ``read`` refuses a symlink; use ``run`` for exact semantics.

Names are ``node01`` ... ``node99``, ``node100`` ... (the first is always
``node01``). Keys live in ``workdir`` and are reused by a later ``start()`` on
the same directory; :meth:`SshNodes.regenerate_host_key` replaces one node's.

Logins: root (``PermitRootLogin prohibit-password``) with the harness's client
key only (the one ``AuthorizedKeysFile`` serves every account), no passwords,
no PAM. ``known_hosts`` lists every node's key under
``[127.0.0.2]:PORT`` and ``[node01]:PORT`` (plain names on port 22), and
``ssh_config`` maps ``Host node01`` to its ``HostName`` and ``Port`` (``ssh -F
ssh_config node01`` works too). SFTP is sshd's ``internal-sftp``, which logs
its operations (``-l INFO``) in the node's log.

Side effects on the host: ``/run/sshd`` (sshd's privilege-separation
directory) and the mount point ``/run/tokenlife`` are created if missing and
left in place (another harness may be using them as mount points). Node
addresses are fixed, so two harnesses at once need different ports: the default
port is a free one chosen at start, retried on a clash. Needs root, sshd,
ssh-keygen, unshare, nsenter. No pytest here: usable from scripts
(``with SshNodes(Path(d), 100) as nodes: ...``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import paramiko

from tests.integration.harness.procfs import exe, kill_namespaces, mnt_ns, pids

SSHD = "/usr/sbin/sshd"  # absolute: sshd re-executes itself for every connection
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
REMOTE_DIR = "/run/tokenlife"
FIRST_ADDRESS = "127.0.0.2"
CLIENT_USER = "root"
Completed = subprocess.CompletedProcess[str]

# The holder: mount the node's private tmpfs, then just keep the namespace.
_HOLDER_SCRIPT = 'mount -t tmpfs -o "$2" "$3" "$1" || exit 1; exec sleep infinity'


class SshNodesError(RuntimeError):
    """A node failed to start or stop, or a command inside a node failed."""


class _PortInUse(SshNodesError):
    """An sshd could not bind its address and port."""


@dataclass(frozen=True)
class NodeStat:
    """``lstat`` of a path inside a node."""

    mode: int  # permission bits only (stat.S_IMODE)
    uid: int
    gid: int
    size: int
    mtime: float
    kind: str  # "file" | "dir" | "symlink" | "other"


def free_port() -> int:
    """A TCP port nobody listens on, on any address (racy: start() retries)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def _listening() -> dict[tuple[str, int], set[int]]:
    """Socket inodes of every listening IPv4 TCP socket, by (address, port)."""
    found: dict[tuple[str, int], set[int]] = {}
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            addr = socket.inet_ntoa(int(hex_addr, 16).to_bytes(4, sys.byteorder))
            found.setdefault((addr, int(hex_port, 16)), set()).add(int(fields[9]))
    return found


def _socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets ``pid`` has open."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    return inodes


def _end(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL one of our children and reap it."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _poll(cond: Callable[[], bool], timeout: float, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def _keygen(keys: Sequence[tuple[Path, str]]) -> None:
    """Make fresh ed25519 key pairs (path, comment) with ssh-keygen, in parallel."""
    procs: list[tuple[Path, subprocess.Popen[bytes]]] = []
    try:
        for path, comment in keys:
            path.unlink(missing_ok=True)  # else ssh-keygen asks before overwriting
            Path(f"{path}.pub").unlink(missing_ok=True)
            argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
            procs.append((path, _popen(argv, subprocess.PIPE)))
        failed = []
        for path, proc in procs:
            out, _ = proc.communicate(timeout=60)
            if proc.returncode != 0:
                failed.append(f"{path}: {out.decode(errors='replace').strip()}")
        if failed:
            raise SshNodesError("ssh-keygen failed:\n" + "\n".join(failed))
    finally:
        for _path, proc in procs:
            _end(proc)


def _popen(argv: list[str], out: IO[bytes] | int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        env={"PATH": PATH, "LANG": "C.UTF-8"},
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd="/",
        start_new_session=True,  # a test's Ctrl-C must not reach the nodes first
    )


class SshNode:
    """One worker node: its addresses, files and processes (made by :class:`SshNodes`)."""

    def __init__(self, name: str, address: str, port: int, directory: Path, remote_dir: str):
        self.name = name
        self.address = address
        self.port = port
        self.dir = directory
        self.remote_dir = remote_dir
        self.host_key = directory / "ssh_host_ed25519_key"  # private; ".pub" beside it
        self.sshd_config = directory / "sshd_config"
        self.log = directory / "sshd.log"  # holder and sshd output, appended across restarts
        self._holder: subprocess.Popen[bytes] | None = None
        self._sshd: subprocess.Popen[bytes] | None = None
        self._ns: str | None = None  # the holder's mount namespace, once it is set up

    def __repr__(self) -> str:
        return f"SshNode({self.name!r}, {self.address}:{self.port}, running={self.running})"

    # -- state ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether sshd is up (it may still be starting)."""
        return self._sshd is not None and self._sshd.poll() is None

    @property
    def pid(self) -> int:
        """The holder's pid: ``nsenter --target PID --mount`` enters the node."""
        if self._holder is None or self._ns is None or self._holder.poll() is not None:
            raise SshNodesError(f"{self.name} has no namespace (not started, or stopped)")
        return self._holder.pid

    @property
    def sshd_pid(self) -> int | None:
        return self._sshd.pid if self.running and self._sshd is not None else None

    @property
    def host_key_line(self) -> str:
        """``ssh-ed25519 AAAA...`` of the node's current host key."""
        return " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])

    def known_hosts_names(self) -> list[str]:
        """The names a client looks this node up under (OpenSSH and paramiko form)."""
        if self.port == 22:
            return [self.address, self.name]
        return [f"[{self.address}]:{self.port}", f"[{self.name}]:{self.port}"]

    # -- inspection ---------------------------------------------------------------

    @property
    def root(self) -> Path:
        """This host's view of the node's ``/`` (``/proc/HOLDER/root``)."""
        return Path(f"/proc/{self.pid}/root")

    def path(self, path: str) -> Path:
        """The host path of the node's absolute ``path``."""
        if not path.startswith("/"):
            raise ValueError(f"not an absolute path: {path!r}")
        return self.root / path.lstrip("/")

    def read(self, path: str) -> bytes:
        """The bytes of a regular file in the node (a symlink is refused: ELOOP)."""
        fd = os.open(self.path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            return fh.read()

    def read_text(self, path: str) -> str:
        return self.read(path).decode()

    def stat(self, path: str) -> NodeStat:
        """``lstat`` a path in the node (FileNotFoundError if absent)."""
        st = os.lstat(self.path(path))
        kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}
        return NodeStat(
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
            mtime=st.st_mtime,
            kind=kinds.get(stat.S_IFMT(st.st_mode), "other"),
        )

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists in the node (a dangling symlink counts)."""
        return os.path.lexists(self.path(path))

    def listdir(self, path: str) -> list[str]:
        """The sorted entry names of a directory in the node."""
        return sorted(os.listdir(self.path(path)))

    def run(
        self, argv: Sequence[str], check: bool = True, input: str | None = None, timeout: float = 30
    ) -> Completed:
        """Run ``argv`` as root inside the node's mount namespace (works while sshd is down)."""
        full = ["nsenter", f"--target={self.pid}", "--mount", "--", *argv]
        proc = subprocess.run(
            full,
            env={"PATH": PATH, "LANG": "C.UTF-8"},
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
        )
        if check and proc.returncode != 0:
            raise SshNodesError(
                f"{self.name}: {list(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join(text)


class SshNodes:
    """``count`` OpenSSH nodes: ``start()``/``stop()`` or ``with SshNodes(dir, 3) as nodes:``.

    ``nodes["node01"]`` (or ``nodes[0]``) is an :class:`SshNode`; iterate for all.
    Client side: ``client_key`` (private, 0600; ``.pub`` beside it), ``user``
    (root), ``known_hosts``, ``ssh_config``, ``port`` (shared by all nodes).
    """

    def __init__(
        self,
        workdir: Path,
        count: int,
        port: int | None = None,
        first_address: str = FIRST_ADDRESS,
        remote_dir: str = REMOTE_DIR,
        tmpfs_options: str = "mode=0755,nosuid,nodev,size=64m",
        sshd_options: Mapping[str, str] | None = None,
        log_level: str = "VERBOSE",
        sftp_log_level: str = "INFO",
        start_timeout: float = 20,
    ) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.workdir = workdir.resolve()
        if any(c.isspace() or c in "\"'\\#" for c in str(self.workdir)):
            # sshd_config and ssh_config quoting differ between OpenSSH and paramiko.
            raise ValueError(f"workdir must have no blanks or quotes: {self.workdir}")
        self.fixed_port = port
        self.port = port or 0  # chosen by start() when not fixed
        self.remote_dir = remote_dir
        self.tmpfs_options = tmpfs_options
        # Written first in every sshd_config: for sshd the first value of a key wins.
        self.sshd_options = dict(sshd_options or {})
        self.log_level, self.sftp_log_level = log_level, sftp_log_level
        self.start_timeout = start_timeout
        self.user = CLIENT_USER
        self.client_key = self.workdir / "client" / "id_ed25519"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.known_hosts = self.workdir / "known_hosts"
        self.ssh_config = self.workdir / "ssh_config"
        self.start_seconds: float | None = None  # how long the last start() took
        first = ipaddress.IPv4Address(first_address)
        self.nodes: dict[str, SshNode] = {}
        for i in range(count):
            name = f"node{i + 1:02d}"
            address = first + i
            if not address.is_loopback:
                raise ValueError(f"{address} is not a loopback address: fewer nodes")
            node_dir = self.workdir / "nodes" / name
            self.nodes[name] = SshNode(name, str(address), self.port, node_dir, remote_dir)
        self._sleep_exe = os.path.realpath(shutil.which("sleep", path=PATH) or "/bin/sleep")

    # -- container protocol ------------------------------------------------------------

    def __getitem__(self, key: str | int) -> SshNode:
        if isinstance(key, int):
            return list(self.nodes.values())[key]
        return self.nodes[key]

    def __iter__(self) -> Iterator[SshNode]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def names(self) -> list[str]:
        return list(self.nodes)

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start every node and wait until each accepts TCP connections."""
        if any(node._holder is not None for node in self):
            raise SshNodesError("already started: stop() first")
        began = time.monotonic()
        try:
            self._prepare()
            self._start_holders(list(self))
            for attempt in range(1, 4):
                if self.fixed_port is None:
                    self._set_port(free_port())
                self._write_client_files()
                for node in self:
                    self._write_sshd_config(node)
                try:
                    self._start_sshds(list(self))
                    break
                except _PortInUse:
                    # The port was free when chosen; someone may have taken it since.
                    if self.fixed_port is not None or attempt == 3:
                        raise
                    self._kill(list(self), keep_holders=True)  # another port, same nodes
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Kill every process of every node; the namespaces and their tmpfs go too."""
        self._kill(list(self), keep_holders=False)

    def stop_node(self, name: str) -> None:
        """Take ``name`` off the network: sshd and its sessions end, its files stay."""
        self._kill([self[name]], keep_holders=True)

    def cut_sshd(self, name: str) -> None:
        """Take ``name``'s sshd off (listener and sessions): pushes fail, while
        everything else in the node (a slurmd, its jobs) runs on. :meth:`start_node`
        brings sshd back."""
        node = self[name]
        _end(node._sshd)
        node._sshd = None
        if node._ns is None:
            return

        def sshd(pid: int) -> bool:  # sessions too (OpenSSH 9.8+ runs them as sshd-session)
            return os.path.basename(exe(pid) or "").startswith("sshd")

        deadline = time.monotonic() + 15
        while left := [p for p in pids() if mnt_ns(p) == node._ns and sshd(p)]:
            if time.monotonic() > deadline:
                raise SshNodesError(f"sshd sessions {left} of {name} do not die")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def start_node(self, name: str) -> None:
        """Bring ``name`` back (after :meth:`stop_node` or :meth:`reboot_node`)."""
        node = self[name]
        if node.running:
            return
        try:
            if node._ns is None or node._holder is None or node._holder.poll() is not None:
                self._kill([node], keep_holders=False)
                self._start_holders([node])  # a fresh, empty tmpfs
            self._write_sshd_config(node)
            self._start_sshds([node])
        except BaseException:
            self._kill([node], keep_holders=False)
            raise

    def restart_node(self, name: str) -> None:
        """Restart sshd only (files kept)."""
        self.stop_node(name)
        self.start_node(name)

    def reboot_node(self, name: str) -> None:
        """Stop everything of ``name`` and start it again with an empty tmpfs."""
        self._kill([self[name]], keep_holders=False)
        self.start_node(name)

    def regenerate_host_key(
        self, name: str, restart: bool = True, update_known_hosts: bool = False
    ) -> str:
        """Give ``name`` a new host key; returns its ``ssh-ed25519 AAAA...`` line.

        ``known_hosts`` keeps the old key unless ``update_known_hosts``: a client
        then sees a host-key mismatch. With ``restart`` (default) sshd restarts,
        files kept; without, OpenSSH 9.2's per-connection re-exec still loads the
        new key for every new connection.
        """
        node = self[name]
        was_running = node.running
        if restart and was_running:
            self.stop_node(name)
        _keygen([(node.host_key, f"{name} host key")])
        if update_known_hosts:
            self.write_known_hosts()
        if restart and was_running:
            self.start_node(name)
        return node.host_key_line

    # -- client side -------------------------------------------------------------------

    def write_known_hosts(self) -> None:
        """(Re)write ``known_hosts`` from every node's current host key."""
        lines = [f"{','.join(n.known_hosts_names())} {n.host_key_line}\n" for n in self]
        self.known_hosts.write_text("".join(lines))

    def connect(self, name: str, timeout: float = 10) -> paramiko.SSHClient:
        """A paramiko client logged in to ``name`` as root, strict host keys (close it)."""
        node = self[name]
        client = paramiko.SSHClient()
        client.load_system_host_keys(str(self.known_hosts))  # never written back
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                node.address,
                port=node.port,
                username=self.user,
                key_filename=str(self.client_key),
                look_for_keys=False,
                allow_agent=False,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
            )
        except BaseException:
            client.close()
            raise
        return client

    def logs(self, *names: str, lines: int = 40) -> str:
        """The tail of the named nodes' logs (default: every node with a log)."""
        parts = []
        for node in [self[n] for n in names] if names else list(self):
            tail = node.tail(lines)
            if tail:
                parts.append(f"==> {node.name} ({node.address}:{node.port}) <==\n{tail}")
        return "\n".join(parts)

    # -- internals ---------------------------------------------------------------------

    def _prepare(self) -> None:
        for tool in ("ssh-keygen", "unshare", "nsenter", "mount", "sleep"):
            if shutil.which(tool, path=PATH) is None:
                raise SshNodesError(f"{tool} is not on PATH")
        if not Path(SSHD).exists():
            raise SshNodesError(f"{SSHD} is missing (install openssh-server)")
        # sshd's privilege-separation chroot, and the mount point of every node's tmpfs.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        Path(self.remote_dir).mkdir(mode=0o755, parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_key.parent.mkdir(mode=0o700, exist_ok=True)
        for node in self:
            node.dir.mkdir(parents=True, exist_ok=True)
        # Keys persist in the workdir: a second start() reuses them.
        keys = [(n.host_key, f"{n.name} host key") for n in self if not n.host_key.exists()]
        if not self.client_key.exists():
            keys.append((self.client_key, "tokenlife test client"))
        _keygen(keys)
        pub = Path(f"{self.client_key}.pub").read_text()
        self.authorized_keys.write_text(pub)
        self.authorized_keys.chmod(0o600)

    def _set_port(self, port: int) -> None:
        self.port = port
        for node in self:
            node.port = port

    def _write_client_files(self) -> None:
        self.write_known_hosts()
        hosts = "".join(
            f"Host {n.name}\n    HostName {n.address}\n    Port {n.port}\n" for n in self
        )
        self.ssh_config.write_text(
            "# Written by the SshNodes test harness.\n"
            f"{hosts}"
            "Host *\n"
            f"    User {self.user}\n"
            f"    IdentityFile {self.client_key}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.known_hosts}\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    BatchMode yes\n"
        )

    def _write_sshd_config(self, node: SshNode) -> None:
        extra = "".join(f"{key} {value}\n" for key, value in self.sshd_options.items())
        node.sshd_config.write_text(
            f"# {node.name}, written by the SshNodes test harness.\n"
            f"{extra}"
            f"ListenAddress {node.address}:{node.port}\n"
            "AddressFamily inet\n"
            f"HostKey {node.host_key}\n"
            "PidFile none\n"
            f"LogLevel {self.log_level}\n"
            "UsePAM no\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            # StrictModes checks every directory above the key file up to "/":
            # a workdir under /tmp (1777, pytest's tmp_path) always fails it.
            # The file itself is root's, 0600.
            "StrictModes no\n"
            f"Subsystem sftp internal-sftp -l {self.sftp_log_level}\n"
            # Pooled connections run many SFTP channels; benchmarks open many at once.
            "MaxSessions 100\n"
            "MaxStartups 200\n"
            "UseDNS no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "X11Forwarding no\n"
            "AllowTcpForwarding no\n"
            "AllowAgentForwarding no\n"
            "PermitUserEnvironment no\n"
            "LoginGraceTime 30\n"
        )

    def _start_holders(self, nodes: list[SshNode]) -> None:
        host_ns = mnt_ns("self")
        for node in nodes:
            with open(node.log, "ab") as log:
                log.write(f"=== harness: {time.strftime('%H:%M:%S')} new namespace\n".encode())
                log.flush()
                argv = ["unshare", "--mount", "--propagation", "private", "--"]
                argv += ["/bin/sh", "-c", _HOLDER_SCRIPT, "holder", self.remote_dir]
                argv += [self.tmpfs_options, f"tokenlife-{node.name}"]
                node._holder = _popen(argv, log)
        pending = list(nodes)

        def ready() -> bool:
            for node in list(pending):
                assert node._holder is not None
                if node._holder.poll() is not None:
                    raise SshNodesError(
                        f"{node.name}: the namespace holder exited ({node._holder.returncode})"
                        f"\n{self.logs(node.name)}"
                    )
                # It execs sleep only after its tmpfs is mounted.
                if exe(node._holder.pid) == self._sleep_exe:
                    ns = mnt_ns(node._holder.pid)
                    if ns is None or ns == host_ns:
                        raise SshNodesError(f"{node.name}: no private mount namespace")
                    node._ns = ns
                    pending.remove(node)
            return not pending

        if not _poll(ready, self.start_timeout):
            names = ", ".join(n.name for n in pending)
            raise SshNodesError(f"timed out waiting for the namespaces of {names}")

    def _start_sshds(self, nodes: list[SshNode]) -> None:
        for node in nodes:
            with open(node.log, "ab") as log:
                # The readiness probe connects and hangs up at once: sshd logs
                # "kex_exchange_identification: Connection closed" for it.
                log.write(
                    f"=== harness: {time.strftime('%H:%M:%S')} sshd on "
                    f"{node.address}:{node.port} (one probe connection follows)\n".encode()
                )
                log.flush()
                argv = ["nsenter", f"--target={node.pid}", "--mount", "--"]
                node._sshd = _popen([*argv, SSHD, "-D", "-e", "-f", str(node.sshd_config)], log)
        pending = list(nodes)

        def ready() -> bool:
            listening = _listening()
            for node in list(pending):
                assert node._sshd is not None
                if node._sshd.poll() is not None:
                    said = node.tail(40).rpartition("=== harness:")[2]  # this sshd's lines
                    error = _PortInUse if "Address already in use" in said else SshNodesError
                    raise error(
                        f"{node.name}: sshd exited ({node._sshd.returncode})\n"
                        f"{self.logs(node.name)}"
                    )
                # Whoever else listens there (a clash) must not pass for our sshd.
                ours = listening.get((node.address, node.port), set())
                if not ours & _socket_inodes(node._sshd.pid):
                    continue
                with socket.socket() as sock:
                    sock.settimeout(1)
                    try:
                        sock.connect((node.address, node.port))
                    except OSError:
                        continue
                pending.remove(node)
            return not pending

        if not _poll(ready, self.start_timeout):
            names = ", ".join(n.name for n in pending[:10])
            raise SshNodesError(
                f"timed out after {self.start_timeout}s waiting for sshd on {names}\n"
                f"{self.logs(*[n.name for n in pending[:3]])}"
            )

    def _kill(self, nodes: list[SshNode], keep_holders: bool) -> None:
        """SIGKILL every process in the nodes' namespaces (but the holders if kept)."""
        host_ns = mnt_ns("self")
        targets = {n._ns for n in nodes if n._ns is not None and n._ns != host_ns}
        # While a holder lives its namespace does too, so its inode number cannot
        # be reused by some other namespace meanwhile: holders go last.
        spare = {n._holder.pid for n in nodes if n._holder is not None} | {os.getpid()}
        try:
            for node in nodes:
                _end(node._sshd)
                node._sshd = None
            left = kill_namespaces(targets, spare)
            if left:
                raise SshNodesError(f"processes {left} in the node namespaces do not die")
        finally:
            if not keep_holders:
                for node in nodes:
                    _end(node._holder)
                    node._holder, node._ns = None, None
