"""A real single-node Slurm 22.05 cluster on loopback, for integration tests.

No systemd: every daemon is a child of this process, run in the foreground
(``-D``/``-F``) so it is reaped and can be stopped reliably, with its pid file,
state and logs under ``workdir``. A private munged serves a socket in a
0750 munge:slurm directory: root and the Slurm daemons can use munge,
ordinary users cannot, so their clients must authenticate with JWT.
Needs root and the Debian packages slurmctld, slurmd, slurmrestd,
slurm-client, slurm-wlm-jwt-plugin and munge.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
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
from typing import IO, Any

SLURM_USER = "slurm"
PARTITION = "debug"
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (racy, but fine on a test machine)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def setpriv(user: str) -> list[str]:
    """argv prefix that runs a command as ``user`` with its own groups only."""
    pw = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]


def _poll(cond: Callable[[], bool], timeout: float) -> bool:
    """Call ``cond`` until it is true (-> True) or ``timeout`` runs out (-> False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class SlurmError(RuntimeError):
    """The cluster failed to start or a harness command failed."""


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
    ) -> None:
        self.workdir = workdir.resolve()
        self.jwt_key_source, self.jwks_source = jwt_key, jwks
        self.hooks = {
            "TaskProlog": task_prolog,
            "Epilog": epilog,
            "PrologSlurmctld": prolog_slurmctld,
        }
        self.extra_conf = extra_conf
        # slurmctld only runs where SlurmctldHost names this very host.
        self.host = socket.gethostname().split(".")[0]
        self.node_name = node_name or self.host
        self.conf_path = self.workdir / "etc" / "slurm.conf"
        self.munge_socket = self.workdir / "munge-socket" / "munge.socket"
        self.log_dir = self.workdir / "log"
        self.rest_port: int | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._prepare()
            self._spawn(
                "munged", [*setpriv("munge"), "/usr/sbin/munged", "-F", *self._munged_args()]
            )
            self._wait("munged socket", self.munge_socket.exists, 10)
            self._start_slurmctld()
            self._spawn(
                "slurmd",
                ["/usr/sbin/slurmd", "-D", "-f", str(self.conf_path), "-N", self.node_name],
            )
            self._wait("node idle", self._ready, 30)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            # Cancel jobs first so no job or slurmstepd outlives the cluster.
            self.root_run(["scancel", f"--partition={PARTITION}"], check=False, timeout=10)
            _poll(lambda: not self.root_run(["squeue", "-h"], check=False).stdout.strip(), 10)
        spool = self.workdir / "spool"
        # A step's socket stays in the spool until its slurmstepd exits.
        _poll(lambda: not spool.is_dir() or not any(p.is_socket() for p in spool.iterdir()), 10)
        for name in ("slurmrestd", "slurmd", "slurmctld", "munged"):
            self._terminate(name)

    def restart_slurmctld(self) -> None:
        """Re-copy the key files and restart slurmctld: it reads them only at start."""
        self._terminate("slurmctld")
        self._install_keys()
        self._start_slurmctld()
        self._wait("slurmctld up after restart", self._ready, 30)

    def start_rest(self, plugins: str = "openapi/v0.0.38") -> str:
        # slurmrestd refuses root and SlurmUser; without slurmdbd only the
        # explicitly named openapi plugins load.
        self.rest_port = free_port()
        argv = [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/sbin/slurmrestd",
            "-f",
            str(self.conf_path),
            "-a",
            "rest_auth/jwt",
            "-s",
            plugins,
            f"127.0.0.1:{self.rest_port}",
        ]
        self._spawn("slurmrestd", argv, {"SLURM_JWT": "daemon"})
        self._wait("slurmrestd port", self._rest_listening, 15)
        return self.rest_url

    @property
    def rest_url(self) -> str:
        if self.rest_port is None:
            raise SlurmError("slurmrestd is not started (call start_rest())")
        return f"http://127.0.0.1:{self.rest_port}"

    # -- clients -------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment for Slurm clients pointed at this cluster."""
        return {"PATH": PATH, "LANG": "C.UTF-8", "SLURM_CONF": str(self.conf_path)}

    def root_run(
        self, argv: list[str], check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a client as root: it authenticates with munge (no SLURM_JWT)."""
        proc = subprocess.run(
            argv, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise SlurmError(f"{argv} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def run_as(
        self, user: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as an unprivileged ``user`` in its home, clean environment plus ``env``."""
        pw = pwd.getpwnam(user)
        full = {
            **self.env(),
            "HOME": pw.pw_dir,
            "USER": user,
            "LOGNAME": user,
            "SHELL": pw.pw_shell,
        }
        full.update(env or {})
        return subprocess.run(
            [*setpriv(user), *argv],
            env=full,
            cwd=pw.pw_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def scontrol_token(self, user: str, lifespan: int) -> str:
        out = self.root_run(
            ["scontrol", "token", f"username={user}", f"lifespan={lifespan}"]
        ).stdout
        for line in out.splitlines():
            if line.startswith("SLURM_JWT="):
                return line.removeprefix("SLURM_JWT=").strip()
        raise SlurmError(f"no SLURM_JWT in scontrol token output: {out!r}")

    def rest_get(self, path: str, user: str, token: str) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            self.rest_url + path, headers={"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": token}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, body = int(resp.status), resp.read()
        except urllib.error.HTTPError as err:  # 4xx/5xx still carry a JSON body
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
            # In -D mode a daemon's stderr repeats its log file: show the
            # .out only when there is no log yet (early fatal errors).
            log = path.with_suffix(".log")
            if path.suffix == ".out" and log.exists() and log.stat().st_size:
                continue
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"==> {path.name} <==\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- internals -----------------------------------------------------------

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._make_traversable()
        slurm, munge = pwd.getpwnam(SLURM_USER), pwd.getpwnam("munge")
        # (directory, owner uid, group gid, mode)
        layout = [
            ("etc", 0, 0, 0o755),
            ("munge", munge.pw_uid, munge.pw_gid, 0o700),
            # Group slurm lets slurmctld in; others stay out. munged wants
            # the socket dir world-executable, hence its --force.
            ("munge-socket", munge.pw_uid, slurm.pw_gid, 0o750),
            ("state", slurm.pw_uid, slurm.pw_gid, 0o700),
            ("spool", 0, 0, 0o755),
            ("log", slurm.pw_uid, slurm.pw_gid, 0o755),
            ("run", slurm.pw_uid, slurm.pw_gid, 0o755),
        ]
        for name, uid, gid, mode in layout:
            d = self.workdir / name
            d.mkdir(exist_ok=True)
            os.chown(d, uid, gid)
            d.chmod(mode)
        key = self.workdir / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        self._install_keys()
        (self.workdir / "etc" / "plugstack.conf").write_text("")
        self.conf_path.write_text(self._slurm_conf())

    def _make_traversable(self) -> None:
        # munged, slurmctld, slurmrestd (nobody) and job users all need to
        # reach files under workdir; pytest and mktemp make 0700 dirs.
        tmp = Path(tempfile.gettempdir()).resolve()
        self.workdir.chmod(0o755)
        for d in self.workdir.parents:
            mode = d.stat().st_mode
            if mode & stat.S_IXOTH:
                continue
            if d != tmp and tmp not in d.parents:
                raise SlurmError(
                    f"{d} is not traversable by other users; put the workdir under {tmp}"
                )
            d.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)

    def _install_keys(self) -> None:
        slurm = pwd.getpwnam(SLURM_USER)
        for src, name in ((self.jwt_key_source, "jwt.key"), (self.jwks_source, "jwks.json")):
            if src is None:
                continue
            dst = self.workdir / "etc" / name
            dst.unlink(missing_ok=True)
            shutil.copyfile(src, dst)
            os.chown(dst, slurm.pw_uid, slurm.pw_gid)
            dst.chmod(0o400)

    def _slurm_conf(self) -> str:
        w, etc = self.workdir, self.workdir / "etc"
        jwt = f"jwt_key={etc / 'jwt.key'}" + (
            f",jwks={etc / 'jwks.json'}" if self.jwks_source else ""
        )
        cpus = os.cpu_count() or 1
        # A little below MemTotal: declaring more than slurmd finds drains the node.
        mem_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 * 9 // 10
        hooks = "".join(f"{k}={v}\n" for k, v in self.hooks.items() if v is not None)
        return f"""\
ClusterName=tokenlife
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser={SLURM_USER}
SlurmctldPort={free_port("0.0.0.0")}
SlurmdPort={free_port("0.0.0.0")}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
AuthAltTypes=auth/jwt
AuthAltParameters={jwt}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PlugStackConfig={etc / "plugstack.conf"}
StateSaveLocation={w / "state"}
SlurmdSpoolDir={w / "spool"}
SlurmctldPidFile={w / "run" / "slurmctld.pid"}
SlurmdPidFile={w / "run" / "slurmd.pid"}
SlurmctldLogFile={w / "log" / "slurmctld.log"}
SlurmdLogFile={w / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
SchedulerParameters=batch_sched_delay=0
{hooks}{self.extra_conf}
NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP
"""

    def _munged_args(self) -> list[str]:
        m = self.workdir / "munge"
        return [
            "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={m / 'munge.key'}",
            f"--log-file={m / 'munged.log'}",
            f"--pid-file={m / 'munged.pid'}",
            f"--seed-file={m / 'munged.seed'}",
        ]

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", str(self.conf_path)])

    def _spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> None:
        # stdout/stderr catch what a daemon says before its log file is open.
        out: IO[bytes] = open(self.log_dir / f"{name}.out", "ab")  # noqa: SIM115 (kept by the child)
        with out:
            self._procs[name] = subprocess.Popen(
                argv,
                env={**self.env(), **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
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
            raise SlurmError(f"waiting for {what}: daemon exited {dead}\n{self.logs()}")

    def _ready(self) -> bool:
        ping = self.root_run(["scontrol", "ping"], check=False, timeout=10).stdout
        if "is UP" not in ping:
            return False
        state = self.root_run(["sinfo", "-h", "-n", self.node_name, "-o", "%T"], check=False).stdout
        return state.strip() == "idle"

    def _rest_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.rest_port or 0), timeout=1):
                return True
        except OSError:
            return False
