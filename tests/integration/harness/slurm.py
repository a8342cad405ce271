"""A real single-node Slurm cluster on loopback, for integration tests.

Two releases: the host's Slurm 22.05 (Debian 12), and any Slurm installed in a
Debian system root (``system_root=``, Slurm 24.11 from Debian 13, built and
cached by :mod:`tests.integration.harness.sysroot`).

No systemd: every daemon is a child of this process, run in the foreground
(``-D``/``-F``) so it is reaped and stopped reliably, with pid files, state and
logs under ``workdir``. A private munged serves a socket in a 0750 munge:slurm
directory: root and the Slurm daemons can use munge, ordinary users cannot, so
their clients must authenticate with JWT. Needs root and the Debian packages
slurmctld, slurmd, slurmrestd, slurm-client, slurm-wlm-jwt-plugin and munge.

With a system root, a *holder* process (``unshare --mount --propagation
private``) owns a mount namespace in which the root gets ``/proc``, ``/dev``,
``/sys`` (read-only), the host's ``/etc/passwd`` and ``/etc/group`` (same users
and uids: create users before the cluster starts, a later ``useradd`` replaces
the file and the root keeps the old one), an ``/etc/hosts`` where this host's
name is 127.0.0.1, and, at their own paths, the temporary directory (workdirs),
``/home`` and this checkout. Every daemon and client of that cluster is
``nsenter --target HOLDER --mount -- chroot ROOT ...``: a 22.05 client cannot
talk to a newer slurmctld, and job tasks run inside the root too (hence
:attr:`SlurmCluster.engine`). The network namespace is the host's. The mounts
exist only in that namespace and vanish with it; :meth:`SlurmCluster.stop`
kills every process in it.

What differs between releases is in :class:`SlurmFacts`, measured here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.integration.harness.procfs import exe, kill_namespaces, mnt_ns
from tests.integration.harness.sysroot import slurm_version

SLURM_USER = "slurm"
PARTITION = "debug"
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
Completed = subprocess.CompletedProcess[str]
# The checkout (…/tests/integration/harness/slurm.py): jobs in a system root
# run its client_engine, so the root sees it at the same path.
REPO = Path(__file__).resolve().parents[3]

# The holder: mount what the root shares with the host, then keep the namespace.
_HOLDER_SCRIPT = """\
set -e
root=$1; hosts=$2; shift 2
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
mount -o remount,bind,ro "$root/sys"
mount --bind "$hosts" "$root/etc/hosts"
for f in /etc/passwd /etc/group; do mount --bind "$f" "$root$f"; done
for d in "$@"; do mkdir -p "$root$d"; mount --rbind "$d" "$root$d"; done
exec sleep infinity
"""

# tokenlife-engine for jobs in a system root: this checkout's client_engine
# (standard library only) on the root's own Python; the venv's is for the host.
_ENGINE_LAUNCHER = """\
#!/usr/bin/python3 -IB
# tokenlife-engine of {repo}, for jobs of the Slurm cluster in {root}.
import sys

sys.path.insert(0, {repo_str!r})
from client_engine.cli import main

sys.exit(main())
"""


@dataclass(frozen=True)
class SlurmFacts:
    """How one Slurm release behaves where tests look, measured on the real daemons.

    Tests assert these per release instead of hard-coding 22.05's answers.
    """

    version: str  # major.minor, as SlurmCluster.version
    rest_api: str  # the OpenAPI version the tests use: /slurm/<rest_api>/...
    rest_plugins: str  # slurmrestd -s without slurmdbd (the default set needs it)
    bad_token_http: int  # REST status for a bad, expired or foreign token
    bearer_accepted: bool  # `Authorization: Bearer <token>` works
    bearer_refused_http: int | None  # its status where it does not (None: it does)
    user_name_required: bool  # REST needs X-SLURM-USER-NAME beside the token (else 401)
    bad_token_cli_error: str  # in squeue's stderr for a bad token
    munge_socket_option: str  # slurm.conf key for a private munge socket
    cgroup_conf: bool  # slurmd needs cgroup.conf (CgroupPlugin=disabled)
    # sbatch by one user holding another's token: refused with this error, or
    # (None) accepted, the job then belongs to the token's user.
    foreign_token_sbatch_error: str | None
    rest_unserved: tuple[str, ...]  # OpenAPI versions answered 404

    def rest(self, endpoint: str) -> str:
        """The REST path of ``endpoint`` (e.g. "diag") in this release's API."""
        return f"/slurm/{self.rest_api}/{endpoint.lstrip('/')}"


SLURM_FACTS = {
    f.version: f
    for f in (
        SlurmFacts(
            version="22.05",
            rest_api="v0.0.38",
            rest_plugins="openapi/v0.0.38",
            bad_token_http=500,
            bearer_accepted=False,
            bearer_refused_http=401,
            user_name_required=True,
            bad_token_cli_error="Zero Bytes were transmitted or received",
            munge_socket_option="AuthInfo",
            cgroup_conf=False,
            foreign_token_sbatch_error="Invalid user id",
            rest_unserved=("v0.0.42",),
        ),
        SlurmFacts(
            version="24.11",
            rest_api="v0.0.42",
            rest_plugins="openapi/slurmctld",
            bad_token_http=511,
            bearer_accepted=True,
            bearer_refused_http=None,
            user_name_required=False,  # the token's sun is the user
            bad_token_cli_error="Protocol authentication error",
            munge_socket_option="AuthInfo",  # AuthParameters: "unrecognized key", fatal
            cgroup_conf=True,
            foreign_token_sbatch_error=None,
            rest_unserved=("v0.0.38",),
        ),
    )
}


def slurm_facts(version: str) -> SlurmFacts:
    """The measured facts of Slurm ``version`` ("22.05", "24.11", or a full "24.11.5")."""
    series = ".".join(version.split(".")[:2])
    try:
        return SLURM_FACTS[series]
    except KeyError:
        known = ", ".join(SLURM_FACTS)
        raise SlurmError(f"no measured facts for Slurm {version} (known: {known})") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (racy, but fine on a test machine)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def setpriv(user: str) -> list[str]:
    """argv prefix that runs a command as ``user`` with that user's groups only."""
    pw = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]


def _run(argv: list[str], env: dict[str, str], cwd: str, timeout: float) -> Completed:
    return subprocess.run(
        argv, env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True, check=False
    )


def _write_private(path: Path, data: bytes, owner: pwd.struct_passwd) -> None:
    """Write a key file readable by its owner only, never briefly by others."""
    path.unlink(missing_ok=True)
    with open(path, "xb", opener=lambda p, flags: os.open(p, flags, 0o400)) as fh:
        fh.write(data)
    os.chown(path, owner.pw_uid, owner.pw_gid)


def _poll(cond: Callable[[], bool], timeout: float) -> bool:
    """Call ``cond`` until it is true (-> True) or ``timeout`` runs out (-> False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class SlurmError(RuntimeError):
    """The cluster failed to start, or a harness command failed."""


class SlurmCluster:
    """One slurmctld, one slurmd, optionally slurmrestd: ``with SlurmCluster(...) as c:``.

    ``system_root`` runs a root's Slurm (e.g. 24.11) instead of the host's.
    """

    def __init__(
        self,
        workdir: Path,
        jwt_key: Path,
        jwks: Path | None = None,
        task_prolog: Path | None = None,
        epilog: Path | None = None,
        prolog_slurmctld: Path | None = None,
        extra_conf: str = "",
        node_name: str | None = None,
        slurmd_prefix: list[str] | None = None,
        open_munge: bool = False,
        system_root: Path | None = None,
        munge_threads: int | None = None,
    ) -> None:
        self.workdir = workdir.resolve()
        self.munge_threads = munge_threads  # munged's --num-threads (None: its default, 2)
        self.jwt_key, self.jwks = jwt_key, jwks
        self.hooks = {"TaskProlog": task_prolog, "Epilog": epilog}
        self.hooks["PrologSlurmctld"] = prolog_slurmctld
        self.extra_conf = extra_conf  # appended last: a repeated key overrides ours
        # slurmctld only runs where SlurmctldHost names this very host.
        self.host = socket.gethostname().split(".")[0]
        self.node_name = node_name or self.host
        # e.g. ``nsenter --target PID --mount --``: slurmd and its jobs then see
        # that namespace's files (an SshNodes node's /run/tokenlife).
        self.slurmd_prefix = slurmd_prefix or []
        # Ordinary users reach munge only when open_munge is set (as on a real
        # cluster, where srun needs it); otherwise JWT is their only way in.
        self.open_munge = open_munge
        self.system_root = system_root.resolve() if system_root is not None else None
        if self.system_root is not None and self.slurmd_prefix:
            raise ValueError("slurmd_prefix and system_root cannot be combined")
        self.conf_path = self.workdir / "etc" / "slurm.conf"
        self.munge_socket = self.workdir / "munge-socket" / "munge.socket"
        self.log_dir = self.workdir / "log"
        self.rest_port: int | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._holder: subprocess.Popen[bytes] | None = None
        self._ns: str | None = None  # the holder's mount namespace, once it is set up

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what this cluster is ---------------------------------------------------------

    @functools.cached_property
    def version(self) -> str:
        """Major.minor of the Slurm that runs, from its own ``slurmctld -V`` ("24.11")."""
        return ".".join(slurm_version(self.system_root).split(".")[:2])

    @property
    def facts(self) -> SlurmFacts:
        return slurm_facts(self.version)

    @property
    def engine(self) -> Path:
        """The ``tokenlife-engine`` this cluster's jobs (TaskProlog, scripts) must run.

        Host Slurm: the venv's. System root: a launcher in the workdir (written
        by :meth:`start`) that runs this checkout on the root's Python.
        """
        if self.system_root is None:
            return Path(sys.executable).with_name("tokenlife-engine")
        return self.workdir / "bin" / "tokenlife-engine"

    def job_path(self) -> str:
        """PATH for this cluster's jobs: :attr:`engine` first."""
        return f"{self.engine.parent}:{PATH}"

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        conf = str(self.conf_path)
        try:
            self._prepare()
            if self.system_root is not None:
                self._start_holder()
            self._spawn(
                "munged", [*setpriv("munge"), "/usr/sbin/munged", "-F", *self._munge_args()]
            )
            self._wait("munged socket", self.munge_socket.exists, 10)
            self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", conf])
            slurmd = ["/usr/sbin/slurmd", "-D", "-f", conf, "-N", self.node_name]
            self._spawn("slurmd", slurmd, prefix=self.slurmd_prefix)
            self._wait("slurmctld up and node idle", self._ready, 30)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            ctld = self._procs.get("slurmctld")
            if ctld is not None and ctld.poll() is None:
                # Cancel jobs first so no job or slurmstepd outlives the cluster.
                with contextlib.suppress(subprocess.SubprocessError, SlurmError):
                    self.root_run(["scancel", f"--partition={PARTITION}"], check=False)
                    _poll(lambda: not self.root_run(["squeue", "-h"], check=False).stdout, 10)
            # A step keeps its socket in the spool until its slurmstepd exits.
            spool = self.workdir / "spool"
            _poll(lambda: not spool.is_dir() or not any(p.is_socket() for p in spool.iterdir()), 10)
        finally:
            try:
                for name in ("slurmrestd", "slurmd", "slurmctld", "munged"):
                    self._terminate(name)
            finally:
                self._stop_holder()

    def restart_slurmctld(self) -> None:
        """Copy the key files again and restart slurmctld: it reads them only at start."""
        self._terminate("slurmctld")
        self._install_keys()
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", str(self.conf_path)])
        self._wait("slurmctld up after restart", self._ready, 30)

    def start_rest(self, plugins: str | None = None) -> str:
        """Start slurmrestd on a free loopback port; returns ``rest_url``.

        ``plugins`` defaults to the release's set that works without slurmdbd.
        """
        # It refuses root and SlurmUser; its default plugin set needs slurmdbd.
        self.rest_port = free_port()
        nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        argv = [*nobody, "/usr/sbin/slurmrestd", "-f", str(self.conf_path)]
        argv += ["-a", "rest_auth/jwt", "-s", plugins or self.facts.rest_plugins]
        argv.append(f"127.0.0.1:{self.rest_port}")
        self._spawn("slurmrestd", argv, {"SLURM_JWT": "daemon"})
        self._wait("slurmrestd port", self._rest_listening, 15)
        return self.rest_url

    @property
    def rest_url(self) -> str:
        if self.rest_port is None:
            raise SlurmError("slurmrestd is not started (call start_rest())")
        return f"http://127.0.0.1:{self.rest_port}"

    # -- clients ------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment for Slurm clients pointed at this cluster."""
        return {"PATH": PATH, "LANG": "C.UTF-8", "SLURM_CONF": str(self.conf_path)}

    def command(self, argv: list[str], cwd: str = "/") -> list[str]:
        """``argv`` as run on this cluster's side: inside the system root if there is one.

        With a root, ``cwd`` is set in there (``env -C``): pass the subprocess no cwd.
        """
        if self.system_root is None:
            return argv
        enter = ["nsenter", f"--target={self._holder_pid()}", "--mount", "--"]
        chdir = ["/usr/bin/env", "-C", cwd] if cwd != "/" else []
        return [*enter, "chroot", str(self.system_root), *chdir, *argv]

    def root_run(self, argv: list[str], check: bool = True, timeout: float = 30) -> Completed:
        """Run a client as root: without SLURM_JWT it authenticates with munge."""
        proc = _run(self.command(argv), self.env(), "/", timeout)
        if check and proc.returncode != 0:
            raise SlurmError(f"{argv} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def run_as(
        self, user: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 30
    ) -> Completed:
        """Run ``argv`` as ``user`` in its home, with a clean environment plus ``env``."""
        pw = pwd.getpwnam(user)
        full = {**self.env(), "HOME": pw.pw_dir, "USER": user, "LOGNAME": user}
        full.update({"SHELL": pw.pw_shell, **(env or {})})
        if self.system_root is None:
            return _run([*setpriv(user), *argv], full, pw.pw_dir, timeout)
        return _run(self.command([*setpriv(user), *argv], cwd=pw.pw_dir), full, "/", timeout)

    def scontrol_token(self, user: str, lifespan: int) -> str:
        """A token minted by slurmctld itself (as root, over munge)."""
        argv = ["scontrol", "token", f"username={user}", f"lifespan={lifespan}"]
        out = self.root_run(argv).stdout
        for line in out.splitlines():
            if line.startswith("SLURM_JWT="):
                return line.removeprefix("SLURM_JWT=").strip()
        raise SlurmError("no SLURM_JWT= line in the output of scontrol token")

    def rest_get(
        self, path: str, user: str | None, token: str, bearer: bool = False
    ) -> tuple[int, dict[str, Any]]:
        """GET ``path`` from slurmrestd; returns (HTTP status, JSON body).

        The token goes in ``X-SLURM-USER-TOKEN``, or with ``bearer`` in
        ``Authorization: Bearer``; ``user`` (if not None) in ``X-SLURM-USER-NAME``.
        """
        headers = {} if user is None else {"X-SLURM-USER-NAME": user}
        if bearer:
            headers["Authorization"] = f"Bearer {token}"
        else:
            headers["X-SLURM-USER-TOKEN"] = token
        req = urllib.request.Request(self.rest_url + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, body = int(resp.status), resp.read()
        except urllib.error.HTTPError as err:  # 4xx/5xx carry a JSON body too
            status, body = err.code, err.read()
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            data = {"raw": body.decode(errors="replace")}
        return status, data if isinstance(data, dict) else {"data": data}

    def logs(self, lines: int = 60) -> str:
        """The tail of every daemon log, for printing when a test fails."""
        parts = []
        for path in sorted(self.log_dir.glob("*")) if self.log_dir.is_dir() else []:
            # In -D mode a daemon's stderr (.out) repeats its log file: show
            # the .out only while there is no log (early fatal errors).
            log = path.with_suffix(".log")
            if path.suffix == ".out" and log.exists() and log.stat().st_size:
                continue
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"==> {path.name} <==\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- internals ----------------------------------------------------------------------

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._make_traversable()
        slurm, munge = pwd.getpwnam(SLURM_USER), pwd.getpwnam("munge")
        layout = {  # name: (uid, gid, mode)
            "etc": (0, 0, 0o755),
            "munge": (munge.pw_uid, munge.pw_gid, 0o700),
            # Group slurm lets slurmctld in, others stay out; munged wants
            # this directory world-executable, hence its --force.
            "munge-socket": (munge.pw_uid, slurm.pw_gid, 0o755 if self.open_munge else 0o750),
            "state": (slurm.pw_uid, slurm.pw_gid, 0o700),
            "spool": (0, 0, 0o755),
            "log": (slurm.pw_uid, slurm.pw_gid, 0o755),
            "run": (slurm.pw_uid, slurm.pw_gid, 0o755),
            "bin": (0, 0, 0o755),
        }
        for name, (uid, gid, mode) in layout.items():
            (self.workdir / name).mkdir(exist_ok=True)
            os.chown(self.workdir / name, uid, gid)
            (self.workdir / name).chmod(mode)
        _write_private(self.workdir / "munge" / "key", os.urandom(128), munge)
        self._install_keys()
        (self.workdir / "etc" / "plugstack.conf").write_text("")
        if self.facts.cgroup_conf:  # slurmd reads it beside slurm.conf
            (self.workdir / "etc" / "cgroup.conf").write_text("CgroupPlugin=disabled\n")
        self.conf_path.write_text(self._slurm_conf())
        if self.system_root is not None:
            # This host's name is loopback in the root, whatever the host says:
            # the daemons bind to what it resolves to (see _slurm_conf).
            names = " ".join(dict.fromkeys(["localhost", socket.gethostname(), self.host]))
            (self.workdir / "etc" / "hosts").write_text(f"127.0.0.1\t{names}\n::1\tlocalhost\n")
            self.engine.write_text(
                _ENGINE_LAUNCHER.format(repo=REPO, repo_str=str(REPO), root=self.system_root)
            )
            self.engine.chmod(0o755)

    def _make_traversable(self) -> None:
        # munged, slurmctld, slurmrestd (nobody) and job users all reach files
        # under workdir, but pytest and mktemp make 0700 directories.
        tmp = Path(tempfile.gettempdir()).resolve()
        self.workdir.chmod(0o755)
        for d in self.workdir.parents:
            mode = d.stat().st_mode
            if mode & stat.S_IXOTH:
                continue
            if d != tmp and tmp not in d.parents:
                raise SlurmError(f"{d} is not traversable by others: put the workdir in {tmp}")
            d.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)

    def _install_keys(self) -> None:
        # slurmctld (as SlurmUser) reads them; nobody else may.
        slurm = pwd.getpwnam(SLURM_USER)
        for src, name in ((self.jwt_key, "jwt.key"), (self.jwks, "jwks.json")):
            if src is not None:
                _write_private(self.workdir / "etc" / name, src.read_bytes(), slurm)

    def _slurm_conf(self) -> str:
        w, etc = self.workdir, self.workdir / "etc"
        jwt = f"jwt_key={etc / 'jwt.key'}" + (f",jwks={etc / 'jwks.json'}" if self.jwks else "")
        # A little below MemTotal: declaring more than slurmd finds drains the node.
        mem_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 * 9 // 10
        hooks = "".join(f"{k}={v}\n" for k, v in self.hooks.items() if v is not None)
        # The daemons (and srun) listen on any address unless told to bind to
        # what the host name resolves to: do that where it is loopback.
        comm = "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny\n" if self._loopback() else ""
        return f"""\
ClusterName=tokenlife
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser={SLURM_USER}
SlurmctldPort={free_port("0.0.0.0")}
SlurmdPort={free_port("0.0.0.0")}
{self.facts.munge_socket_option}=socket={self.munge_socket}
AuthAltTypes=auth/jwt
AuthAltParameters={jwt}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The default batch_sched_delay=3 holds every new batch job for ~3 s.
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
{comm}PlugStackConfig={etc / "plugstack.conf"}
StateSaveLocation={w / "state"}
SlurmdSpoolDir={w / "spool"}
SlurmctldPidFile={w / "run" / "slurmctld.pid"}
SlurmdPidFile={w / "run" / "slurmd.pid"}
SlurmctldLogFile={w / "log" / "slurmctld.log"}
SlurmdLogFile={w / "log" / "slurmd.log"}
{hooks}NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory={mem_mb}
PartitionName={PARTITION} Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP
{self.extra_conf}
"""

    def _loopback(self) -> bool:
        """Whether this host's name resolves to 127.0.0.1 where the daemons run."""
        if self.system_root is not None:
            return True  # the root's /etc/hosts is ours
        try:
            return socket.gethostbyname(self.host) == "127.0.0.1"
        except OSError:
            return False

    def _munge_args(self) -> list[str]:
        files = [f"--{f}-file={self.workdir / 'munge' / f}" for f in ("key", "log", "pid", "seed")]
        threads = [f"--num-threads={self.munge_threads}"] if self.munge_threads else []
        return ["--force", f"--socket={self.munge_socket}", *threads, *files]

    def _spawn(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        # <name>.out keeps what a daemon says before (or instead of) its log file.
        with open(self.log_dir / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                [*(prefix or []), *self.command(argv)],
                env={**self.env(), **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,  # a test's Ctrl-C must not hit the daemons first
            )

    def _terminate(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _holder_pid(self) -> int:
        if self._holder is None or self._ns is None or self._holder.poll() is not None:
            raise SlurmError("the system root's namespace is not up (not started, or stopped)")
        return self._holder.pid

    def _start_holder(self) -> None:
        """Start the namespace holder of the system root and wait until its mounts are made."""
        assert self.system_root is not None
        for tool in ("unshare", "nsenter", "chroot", "mount", "sleep"):
            if shutil.which(tool, path=PATH) is None:
                raise SlurmError(f"{tool} is not on PATH")
        shared = [Path(tempfile.gettempdir()).resolve(), REPO, Path("/home")]
        shared = [d for d in shared if d.is_dir()]
        # A directory inside another one already comes with it (rbind).
        shared = [d for d in shared if not any(o != d and o in d.parents for o in shared)]
        argv = ["unshare", "--mount", "--propagation", "private", "--"]
        argv += ["/bin/sh", "-c", _HOLDER_SCRIPT, "holder", str(self.system_root)]
        argv.append(str(self.workdir / "etc" / "hosts"))
        argv += [str(d) for d in dict.fromkeys(shared)]
        with open(self.log_dir / "holder.out", "ab") as out:
            self._holder = subprocess.Popen(
                argv,
                env={"PATH": PATH, "LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
            )
        sleep = os.path.realpath(shutil.which("sleep", path=PATH) or "/bin/sleep")
        host_ns = mnt_ns("self")
        holder = self._holder

        def ready() -> bool:
            if holder.poll() is not None:
                raise SlurmError(
                    f"the namespace holder exited ({holder.returncode})\n{self.logs()}"
                )
            if exe(holder.pid) != sleep:  # it execs sleep once every mount is made
                return False
            ns = mnt_ns(holder.pid)
            if ns is None or ns == host_ns:
                raise SlurmError("the namespace holder has no private mount namespace")
            self._ns = ns
            return True

        if not _poll(ready, 15):
            raise SlurmError(f"timed out waiting for the namespace holder\n{self.logs()}")

    def _stop_holder(self) -> None:
        """SIGKILL every process left in the root's namespace, then the holder: the mounts go."""
        holder, ns = self._holder, self._ns
        if holder is None:
            return
        try:
            if ns is not None and ns != mnt_ns("self"):
                left = kill_namespaces({ns}, {holder.pid, os.getpid()})
                if left:
                    raise SlurmError(f"processes {left} in the root's namespace do not die")
        finally:
            if holder.poll() is None:
                holder.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                holder.wait(10)
            self._holder, self._ns = None, None

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        dead: dict[str, int | None] = {}

        def done() -> bool:
            dead.update({n: p.returncode for n, p in self._procs.items() if p.poll() is not None})
            return bool(dead) or ready()

        if not _poll(done, timeout):
            raise SlurmError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")
        if dead:
            raise SlurmError(f"daemon exited while waiting for {what}: {dead}\n{self.logs()}")

    def _ready(self) -> bool:
        ping = self.root_run(["scontrol", "ping"], check=False, timeout=10).stdout
        node = ["sinfo", "-h", "-n", self.node_name, "-o", "%T"]
        return "is UP" in ping and self.root_run(node, check=False).stdout.strip() == "idle"

    def _rest_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.rest_port or 0), timeout=1):
                return True
        except OSError:
            return False
