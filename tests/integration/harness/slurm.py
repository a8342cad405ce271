"""A real single-node Slurm 22.05 cluster on loopback, for integration tests.

No systemd: every daemon is a child of this process, run in the foreground
(``-D``/``-F``) so it is reaped and stopped reliably, with pid files, state and
logs under ``workdir``. A private munged serves a socket in a 0750 munge:slurm
directory: root and the Slurm daemons can use munge, ordinary users cannot, so
their clients must authenticate with JWT. Needs root and the Debian packages
slurmctld, slurmd, slurmrestd, slurm-client, slurm-wlm-jwt-plugin and munge.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

SLURM_USER = "slurm"
PARTITION = "debug"
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
Completed = subprocess.CompletedProcess[str]


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
    ) -> None:
        self.workdir = workdir.resolve()
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
        self.conf_path = self.workdir / "etc" / "slurm.conf"
        self.munge_socket = self.workdir / "munge-socket" / "munge.socket"
        self.log_dir = self.workdir / "log"
        self.rest_port: int | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        conf = str(self.conf_path)
        try:
            self._prepare()
            self._spawn(
                "munged", [*setpriv("munge"), "/usr/sbin/munged", "-F", *self._munge_args()]
            )
            self._wait("munged socket", self.munge_socket.exists, 10)
            self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", conf])
            slurmd = ["/usr/sbin/slurmd", "-D", "-f", conf, "-N", self.node_name]
            self._spawn("slurmd", [*self.slurmd_prefix, *slurmd])
            self._wait("slurmctld up and node idle", self._ready, 30)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            ctld = self._procs.get("slurmctld")
            if ctld is not None and ctld.poll() is None:
                # Cancel jobs first so no job or slurmstepd outlives the cluster.
                with contextlib.suppress(subprocess.SubprocessError):
                    self.root_run(["scancel", f"--partition={PARTITION}"], check=False)
                    _poll(lambda: not self.root_run(["squeue", "-h"], check=False).stdout, 10)
            # A step keeps its socket in the spool until its slurmstepd exits.
            spool = self.workdir / "spool"
            _poll(lambda: not spool.is_dir() or not any(p.is_socket() for p in spool.iterdir()), 10)
        finally:
            for name in ("slurmrestd", "slurmd", "slurmctld", "munged"):
                self._terminate(name)

    def restart_slurmctld(self) -> None:
        """Copy the key files again and restart slurmctld: it reads them only at start."""
        self._terminate("slurmctld")
        self._install_keys()
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", str(self.conf_path)])
        self._wait("slurmctld up after restart", self._ready, 30)

    def start_rest(self, plugins: str = "openapi/v0.0.38") -> str:
        """Start slurmrestd on a free loopback port; returns ``rest_url``."""
        # It refuses root and SlurmUser; its default plugin set needs slurmdbd.
        self.rest_port = free_port()
        nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        argv = [*nobody, "/usr/sbin/slurmrestd", "-f", str(self.conf_path)]
        argv += ["-a", "rest_auth/jwt", "-s", plugins, f"127.0.0.1:{self.rest_port}"]
        self._spawn("slurmrestd", argv, {"SLURM_JWT": "daemon"})
        self._wait("slurmrestd port", self._rest_listening, 15)
        return self.rest_url

    @property
    def rest_url(self) -> str:
        if self.rest_port is None:
            raise SlurmError("slurmrestd is not started (call start_rest())")
        return f"http://127.0.0.1:{self.rest_port}"

    def env(self) -> dict[str, str]:
        """Environment for Slurm clients pointed at this cluster."""
        return {"PATH": PATH, "LANG": "C.UTF-8", "SLURM_CONF": str(self.conf_path)}

    def root_run(self, argv: list[str], check: bool = True, timeout: float = 30) -> Completed:
        """Run a client as root: without SLURM_JWT it authenticates with munge."""
        proc = _run(argv, self.env(), "/", timeout)
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
        return _run([*setpriv(user), *argv], full, pw.pw_dir, timeout)

    def scontrol_token(self, user: str, lifespan: int) -> str:
        """A token minted by slurmctld itself (as root, over munge)."""
        argv = ["scontrol", "token", f"username={user}", f"lifespan={lifespan}"]
        out = self.root_run(argv).stdout
        for line in out.splitlines():
            if line.startswith("SLURM_JWT="):
                return line.removeprefix("SLURM_JWT=").strip()
        raise SlurmError("no SLURM_JWT= line in the output of scontrol token")

    def rest_get(self, path: str, user: str, token: str) -> tuple[int, dict[str, Any]]:
        """GET ``path`` from slurmrestd; returns (HTTP status, JSON body)."""
        headers = {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": token}
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
        }
        for name, (uid, gid, mode) in layout.items():
            (self.workdir / name).mkdir(exist_ok=True)
            os.chown(self.workdir / name, uid, gid)
            (self.workdir / name).chmod(mode)
        _write_private(self.workdir / "munge" / "key", os.urandom(128), munge)
        self._install_keys()
        (self.workdir / "etc" / "plugstack.conf").write_text("")
        self.conf_path.write_text(self._slurm_conf())

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
        return f"""\
ClusterName=tokenlife
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser={SLURM_USER}
SlurmctldPort={free_port("0.0.0.0")}
SlurmdPort={free_port("0.0.0.0")}
AuthInfo=socket={self.munge_socket}
AuthAltTypes=auth/jwt
AuthAltParameters={jwt}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The default batch_sched_delay=3 holds every new batch job for ~3 s.
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
PlugStackConfig={etc / "plugstack.conf"}
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

    def _munge_args(self) -> list[str]:
        files = [f"--{f}-file={self.workdir / 'munge' / f}" for f in ("key", "log", "pid", "seed")]
        return ["--force", f"--socket={self.munge_socket}", *files]

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        # <name>.out keeps what a daemon says before (or instead of) its log file.
        with open(self.log_dir / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                argv,
                env={**self.env(), **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
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
