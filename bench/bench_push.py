"""Pushing a renewed ~1 KB token file to N SSH nodes: tokenlife next to pdcp and clush --copy.

One set of real OpenSSH nodes (``tests/integration/harness/sshnodes.py``: node01 ...
on 127.0.0.2 ..., each its own sshd with its own host key and a private tmpfs on
/run/tokenlife; needs root, sshd, unshare, nsenter) is started once, before any
clock runs, and every tool pushes to the same first N of them.  For each N and run:

  pdcp             ``pdcp -R ssh -p -f FANOUT -w node01,...,nodeNN SRC DEST`` (pdsh):
                   one ``ssh`` process per node running ``pdcp -z`` on the node.
                   PDSH_SSH_ARGS="-F <harness ssh_config> -x -l%u %h" (pdsh's
                   default is "-2 -a -x -l%u %h"; -2/-a are dropped, -F gives the
                   nodes' addresses, ports, key and known_hosts).
  clush --copy     ``clush -f FANOUT -w ... -o "-F <ssh_config>" -p --copy SRC --dest DEST``
                   (ClusterShell; one ``scp`` per node, which is SFTP in OpenSSH 9),
                   with its own clush.conf (CLUSTERSHELL_CFG_DIR, --conf), so
                   /etc/clustershell does not matter.
  tokenlife cold   the real delivery path, as ``tokenlife push`` does it: a fresh
                   SshTransport (no connection open) and a DeliveryCycle with a
                   static job source (user -> the N nodes) on a SQLite store: sync
                   the job view, ask the store what is owed, install on the nodes in
                   parallel, record the outcomes.  In this process: Python start-up,
                   imports, config and store opening are not in the time.
  tokenlife warm   the same transport and cycle again, the N connections still open
                   (checked: the very same connections before and after), after
                   the next renewal; only the cycle is timed.
  tokenlife CLI    ``tokenlife -c CONFIG push`` as a new process after the next
                   renewal: the whole cold cost (interpreter, imports, config, store,
                   connections, cycle), what a timer or PrologSlurmctld would pay.

The token is a real one for the test user tlalice (created if missing):
minted, then renewed (``Renewer.tick(force=True)``, i.e. ``tokenlife renew
--now``) before each push, so each push delivers a new version.  It is signed
RS256 with a 4096-bit key, which makes it about 1 KB (994 bytes; an HS256 token
would be ~300).  Every round starts on a fresh store: the first version is
pushed untimed by a separate transport (then closed), so each timed push, of
every tool, replaces an older file on every node.  pdcp and clush copy the
renewed token (the same bytes tokenlife pushes cold) from a local 0600 file.

Every run is checked on every node through the node's own file system: the
expected bytes, mode 0600 and, for tokenlife, the user's uid/gid; a run that
copied nothing raises.  Not the same work: tokenlife also creates or repairs
<remote_dir>/<uid> (0700, the user's), writes a temporary file exclusively,
hands it to the user through the open handle, fsyncs, sets the iat as mtime,
takes a per-user lock, compares versions and renames atomically, and stores
each node's outcome in the database; pdcp and clush -p write the file as root
in place (no chown, no fsync, no atomic replace) into a directory made
beforehand (/run/tokenlife/bench-pdcp/<uid>/, /run/tokenlife/bench-clush/<uid>/).

Parallelism: tokenlife uses the configuration's default, delivery.ssh.concurrency
= 32 threads (``--concurrency`` to change); pdcp and clush get a fanout of N
(``--fanout`` to fix one; pdsh's and clush's defaults are 32 and 64).  Each
pdcp/clush run is cold by nature: new ssh processes, new connections.  Each node
is its own sshd, so sshd's MaxStartups (the harness sets 200) never throttles:
a tool opens at most one connection per sshd at a time.  sshd logs at INFO and
internal-sftp at ERROR (Debian's defaults; the harness's tests use VERBOSE and
INFO).  Client and nodes share this machine's CPUs.  tokenlife parses
known_hosts once per pool (SshPool._trust), which here lists every started
node (the largest N).

The nodes share this host's file system but /run/tokenlife, so a command run
over ssh (pdcp's ``pdcp -z``) starts root's shell, and bash sources ~/.bashrc
when sshd starts it: on a development host that file may do real work (pyenv
init costs ~70 ms of CPU per session here).  A compute node's root has a plain
one, so the bench bind-mounts an empty file over it inside each node's mount
namespace (never on the host; ``--keep-shell-rc`` to leave it).  tokenlife and
scp use the SFTP subsystem (internal-sftp), which starts no shell.

Key exchange: OpenSSH 9's ssh and scp negotiate sntrup761x25519-sha512 (the
post-quantum hybrid) by default, paramiko curve25519-sha256; the former costs
tens of ms more CPU per connection on each side.  pdcp and clush run with
OpenSSH's default unless ``--kex curve25519-sha256`` gives them paramiko's, for
a like-for-like comparison of the tools rather than of the key exchanges.

The order of the tools rotates from run to run; the table shows medians of
``--repeat`` runs and the ratio to pdcp's median at the same N (lower is
faster).  CPU s is the busy CPU time of the whole machine during a run (the tool
and the sshds together, from /proc/stat): near CPUs x wall means CPU-bound.
Targets (at the largest N; reported, never asserted): tokenlife cold <= 1.0x
pdcp, warm <= 0.2x pdcp.

Run as root:   .venv/bin/python bench/bench_push.py            (N = 10, 50, 100; 3 runs)
Quick check:   .venv/bin/python bench/bench_push.py --quick    (N = 10, 50; 1 run)
Options: --nodes 10,50,100, --repeat 3, --concurrency 32, --fanout 0 (= N), --no-cli,
         --kex ALGORITHMS (KexAlgorithms for pdcp's ssh and clush's scp), --keep-shell-rc
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from producer.keys import RS256Key  # noqa: E402
from producer.mint import Minter  # noqa: E402
from repository.renewer import Renewer  # noqa: E402
from repository.store import SqlTokenStore  # noqa: E402
from tests.integration.harness.sshnodes import SshNodes  # noqa: E402
from tests.integration.harness.users import ALICE, ensure_user  # noqa: E402
from tokenlife.config import Config, DeliveryConfig, SshConfig  # noqa: E402
from tokenlife.records import TokenRecord  # noqa: E402
from tokenlife.testing.fakes import FakeClock  # noqa: E402
from transfer.cycle import DeliveryCycle, DeliverySummary  # noqa: E402
from transfer.jobs import StaticJobs  # noqa: E402
from transfer.nodefs import file_path  # noqa: E402
from transfer.transports import SshTransport  # noqa: E402

REMOTE_DIR = "/run/tokenlife"
DEFAULTS = Config()
CONCURRENCY = DEFAULTS.delivery.ssh.concurrency  # 32
TOOLS = ("pdcp", "clush --copy", "tokenlife cold", "tokenlife warm", "tokenlife CLI")
RENEW_STEP = 10  # seconds the fake clock moves before each mint/renewal
TIMEOUT = 600  # a tool run that takes longer than this has hung
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds
    cpu: float  # busy CPU seconds of the whole machine meanwhile (every CPU, every process)


def machine_cpu() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat: all but idle, iowait)."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


class Stopwatch:
    """``with Stopwatch() as w: ...`` then ``w.timing``."""

    def __enter__(self) -> Stopwatch:
        self._cpu, self._start = machine_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._start
        self.timing = Timing(wall, machine_cpu() - self._cpu)


# -- the token --------------------------------------------------------------------------------


class BenchKey:
    """A 4096-bit RS256 key: its tokens are about 1 KB."""

    def __init__(self) -> None:
        pem = rsa.generate_private_key(public_exponent=65537, key_size=4096).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.key = RS256Key(pem)

    def load(self) -> RS256Key:
        return self.key

    def describe(self) -> str:
        return "benchmark RS256 key (4096 bits)"


# -- the nodes, the key, the clock: once per benchmark ---------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="tl-bench-push-"))
        self.work.chmod(0o755)
        self.concurrency: int = args.concurrency
        self.fanout: int = args.fanout
        self.kex: str = args.kex
        self.plain_rc: bool = not args.keep_shell_rc
        self.hidden_rc: list[str] = []
        self.key = BenchKey()
        self.user = ensure_user(ALICE)
        # Behind the real time, so that `tokenlife push` (the system clock) finds
        # every delivery due; it moves RENEW_STEP per mint/renewal, so every
        # token has a later iat than anything already on the nodes.
        self.clock = FakeClock(float(int(time.time()) - 86400))
        self.nodes = SshNodes(
            self.work / "ssh", max(args.nodes), log_level="INFO", sftp_log_level="ERROR"
        )
        self.rounds = 0
        self.clush_dir = self.work / "clush"
        self.src = self.work / "slurm_jwt"

    def start(self) -> None:
        self.nodes.start()
        if self.plain_rc:
            self.hide_shell_rc()
        self.clush_dir.mkdir()
        (self.clush_dir / "clush.conf").write_text(
            "[Main]\nfanout: 64\nconnect_timeout: 15\ncommand_timeout: 0\ncolor: never\n"
            "fd_max: 8192\nhistory_size: 0\nnode_count: yes\nverbosity: 1\n"
        )

    def hide_shell_rc(self) -> None:
        """An empty ~/.bashrc for the nodes' ssh user, inside each node's namespace only."""
        empty = self.work / "empty-bashrc"
        empty.write_bytes(b"")
        empty.chmod(0o644)
        home = pwd.getpwnam(self.nodes.user).pw_dir
        for rc in (f"{home}/.bashrc",):
            if os.path.isfile(rc) and os.path.getsize(rc) > 0:
                for node in self.nodes:
                    node.run(["mount", "--bind", str(empty), rc])
                self.hidden_rc.append(rc)

    def close(self) -> None:
        try:
            self.nodes.stop()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def delivery(self, names: list[str]) -> DeliveryConfig:
        return DeliveryConfig(
            transport="ssh",
            remote_dir=Path(REMOTE_DIR),
            jobs="static",
            static=((ALICE, tuple(names)),),
            ssh=SshConfig(
                identity_file=self.nodes.client_key,
                known_hosts=self.nodes.known_hosts,
                ssh_config=self.nodes.ssh_config,
                concurrency=self.concurrency,
            ),
        )


# -- one round: a fresh store, N nodes holding the previous version ---------------------------


@dataclass
class Round:
    """One run at one N: its own store and cycle; the nodes hold version 1."""

    bench: Bench
    n: int
    names: list[str] = field(init=False)
    store: SqlTokenStore = field(init=False)
    db: Path = field(init=False)
    delivery: DeliveryConfig = field(init=False)
    renewer: Renewer = field(init=False)
    pushed: TokenRecord = field(init=False)  # the renewed token: pdcp, clush, tokenlife cold
    last_output: str = ""
    transport: SshTransport | None = None
    cycle: DeliveryCycle | None = None

    def __post_init__(self) -> None:
        b = self.bench
        b.rounds += 1
        self.names = b.nodes.names[: self.n]
        self.db = b.work / f"store-{b.rounds}.sqlite"
        self.store = SqlTokenStore(f"sqlite:///{self.db}")
        self.store._open()  # engine and migrations before any clock starts
        self.delivery = b.delivery(self.names)
        config = Config(delivery=self.delivery)
        self.renewer = Renewer(config, b.key, self.store, clock=b.clock, actor="bench")
        b.clock.advance(RENEW_STEP)
        first, _ = Minter(config, b.key, self.store, clock=b.clock).mint(ALICE, 0, actor="bench")
        # Version 1 everywhere, by a transport of its own (closed: the cold run opens anew).
        setup = SshTransport(self.delivery)
        try:
            summary = self.new_cycle(setup).run()
        finally:
            setup.close()
        self.expect_delivered(summary, "setup push")
        self.check_tokenlife(first)
        for tool in ("pdcp", "clush"):
            for node in self.names:
                path = b.nodes[node].path(self.copy_dest(tool))
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                path.write_bytes(first.token.encode())
                path.chmod(0o600)
        renewed = self.renew()
        fd = os.open(b.src, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(renewed.token.encode())
        self.pushed = renewed

    def new_cycle(self, transport: SshTransport) -> DeliveryCycle:
        d = self.delivery
        return DeliveryCycle(
            self.store,
            transport,
            StaticJobs(d.static),
            d.remove_after,
            d.ssh.concurrency,
            clock=self.bench.clock,
            actor="bench",
        )

    def renew(self) -> TokenRecord:
        self.bench.clock.advance(RENEW_STEP)
        summary = self.renewer.tick(ALICE, force=True)
        if summary.renewed != 1:
            raise SystemExit(f"renewal failed: {summary.line()}")
        record = self.store.current(ALICE)
        assert record is not None
        return record

    def expect_delivered(self, summary: DeliverySummary, what: str) -> None:
        if (summary.delivered, summary.failed, summary.unchanged) != (self.n, 0, 0):
            errors = "; ".join(summary.errors[:3])
            raise SystemExit(f"{what}: {summary.line()}, expected {self.n} delivered: {errors}")

    # -- checks, through the nodes' own file systems ----------------------------------------

    def check_tokenlife(self, record: TokenRecord) -> None:
        want = record.token.encode()
        path = file_path(REMOTE_DIR, record.uid)
        for name in self.names:
            node = self.bench.nodes[name]
            st = node.stat(path)
            got = node.read(path)
            if got != want or (st.mode, st.uid, st.gid) != (0o600, record.uid, record.gid):
                raise SystemExit(
                    f"{name}: {path} is not version {record.version} of the token "
                    f"(mode {st.mode:o}, owner {st.uid}:{st.gid}, {len(got)} bytes)"
                )

    def copy_dest(self, tool: str) -> str:
        return file_path(f"{REMOTE_DIR}/bench-{tool}", self.bench.user.pw_uid)

    def check_copy(self, tool: str) -> None:
        want = self.bench.src.read_bytes()
        path = self.copy_dest(tool)
        for name in self.names:
            node = self.bench.nodes[name]
            got, st = node.read(path), node.stat(path)
            if got != want or st.mode != 0o600:
                raise SystemExit(
                    f"{tool}: {name}: {path} does not hold the renewed token "
                    f"({len(got)} bytes, mode {st.mode:o})"
                )

    # -- the tools ---------------------------------------------------------------------------

    def fanout(self) -> int:
        return self.bench.fanout or self.n

    def run_tool(self, argv: list[str], env: dict[str, str], what: str) -> Timing:
        with Stopwatch() as watch:
            proc = subprocess.run(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
                cwd="/",
            )
        if proc.returncode != 0:
            out = (proc.stderr + proc.stdout).strip().splitlines()
            raise SystemExit(f"{what} failed (exit {proc.returncode}): " + " | ".join(out[:5]))
        self.last_output = proc.stdout
        return watch.timing

    def ssh_options(self) -> str:
        kex = f" -oKexAlgorithms={self.bench.kex}" if self.bench.kex else ""
        return f"-F {self.bench.nodes.ssh_config}{kex}"

    def pdcp(self) -> Timing:
        env = dict(os.environ)
        env["PDSH_SSH_ARGS"] = f"{self.ssh_options()} -x -l%u %h"
        env.pop("PDSH_SSH_ARGS_APPEND", None)
        argv = ["pdcp", "-R", "ssh", "-p", "-f", str(self.fanout()), "-w", ",".join(self.names)]
        timing = self.run_tool([*argv, str(self.bench.src), self.copy_dest("pdcp")], env, "pdcp")
        self.check_copy("pdcp")
        return timing

    def clush(self) -> Timing:
        env = dict(os.environ)
        env["CLUSTERSHELL_CFG_DIR"] = str(self.bench.clush_dir)
        argv = ["clush", "--conf", str(self.bench.clush_dir / "clush.conf")]
        argv += ["-f", str(self.fanout()), "-w", ",".join(self.names)]
        argv += ["-o", self.ssh_options(), "-p", "--copy", str(self.bench.src)]
        timing = self.run_tool([*argv, "--dest", self.copy_dest("clush")], env, "clush --copy")
        self.check_copy("clush")
        return timing

    def tokenlife_cold(self) -> Timing:
        with Stopwatch() as watch:
            self.transport = SshTransport(self.delivery)
            self.cycle = self.new_cycle(self.transport)
            summary = self.cycle.run()
        self.expect_delivered(summary, "tokenlife cold")
        self.check_tokenlife(self.pushed)
        return watch.timing

    def tokenlife_warm(self) -> Timing:
        assert self.transport is not None and self.cycle is not None
        pool = self.transport.pool
        before = dict(pool._conns)
        if sorted(before) != sorted(self.names):
            raise SystemExit(f"warm: {len(before)} pooled connections, expected {self.n}")
        record = self.renew()
        with Stopwatch() as watch:
            summary = self.cycle.run()
        self.expect_delivered(summary, "tokenlife warm")
        if any(pool._conns.get(name) is not conn for name, conn in before.items()):
            raise SystemExit("warm: a pooled connection was replaced during the push")
        self.check_tokenlife(record)
        return watch.timing

    def tokenlife_cli(self) -> Timing:
        b = self.bench
        record = self.renew()
        ssh = self.delivery.ssh
        nodes = ", ".join(f'"{n}"' for n in self.names)
        config = b.work / f"tokenlife-{b.rounds}.toml"
        config.write_text(
            f'[store]\nurl = "sqlite:///{self.db}"\nspool_dir = "{b.work}/no-spool"\n'
            f'[login]\ntoken_dir = "{b.work}/login"\n'
            f'[producer]\nsocket = "{b.work}/no-mint.sock"\n'
            f'[delivery]\ntransport = "ssh"\nremote_dir = "{REMOTE_DIR}"\njobs = "static"\n'
            f'[delivery.ssh]\nidentity_file = "{ssh.identity_file}"\n'
            f'known_hosts = "{ssh.known_hosts}"\nssh_config = "{ssh.ssh_config}"\n'
            f"concurrency = {ssh.concurrency}\n"
            f"[delivery.static]\n{ALICE} = [{nodes}]\n"
        )
        tokenlife = Path(sys.executable).parent / "tokenlife"
        env = {k: v for k, v in os.environ.items() if k != "TOKENLIFE_CONFIG"}
        argv = [str(tokenlife), "-c", str(config), "push"]
        timing = self.run_tool(argv, env, "tokenlife push")
        if not self.last_output.startswith(f"delivered {self.n}, unchanged 0, removed 0, failed 0"):
            raise SystemExit(f"tokenlife push: {self.last_output.strip()}")
        self.check_tokenlife(record)
        return timing

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.store.engine.dispose()


# -- output -----------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def timed(label: str, fn: Callable[..., Timing], *args: Any) -> Timing:
    """``fn(*args)`` (returns its own timing), with a progress line on stderr."""
    print(f"  {label} ...", end="", flush=True, file=sys.stderr)
    timing = fn(*args)
    print(f" {timing.wall:.3f} s (machine CPU {timing.cpu:.2f} s)", file=sys.stderr)
    return timing


TARGETS = {"tokenlife cold": 1.0, "tokenlife warm": 0.2}


def verdict(ratio: float, limit: float) -> str:
    """``ok (0.301x <= 1.0x)`` or ``MISSED (0.204x > 0.2x)``: three decimals, no rounding in."""
    if ratio <= limit:
        return f"ok ({ratio:.3f}x <= {limit:.1f}x)"
    return f"MISSED ({ratio:.3f}x > {limit:.1f}x)"


def wall(times: dict[tuple[int, str], list[Timing]], n: int, tool: str) -> float:
    return statistics.median(t.wall for t in times[n, tool])


def report(times: dict[tuple[int, str], list[Timing]], ns: list[int], tools: list[str]) -> None:
    rows = []
    for n in ns:
        pdcp = wall(times, n, "pdcp")
        for tool in tools:
            runs = times[n, tool]
            median = wall(times, n, tool)
            ratio = median / pdcp
            target = ""
            if tool in TARGETS and n == max(ns):
                limit = TARGETS[tool]
                target = verdict(ratio, limit)
            rows.append(
                [
                    str(n),
                    tool,
                    f"{median:.3f}",
                    f"{n / median:,.0f}",
                    f"{ratio:.2f}x",
                    f"{statistics.median(t.cpu for t in runs):.2f}",
                    " ".join(f"{t.wall:.3f}" for t in runs),
                    target,
                ]
            )
    header = ["N", "tool", "wall s", "files/s", "vs pdcp", "CPU s", "runs (wall s)"]
    print(table([*header, f"target at N={max(ns)}"], rows))
    top = max(ns)
    pdcp = wall(times, top, "pdcp")
    cold = wall(times, top, "tokenlife cold") / pdcp
    warm = wall(times, top, "tokenlife warm") / pdcp
    print()
    print(
        f"at N={top}: tokenlife cold {verdict(cold, TARGETS['tokenlife cold'])}, "
        f"warm {verdict(warm, TARGETS['tokenlife warm'])} (times pdcp's wall)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="10,50,100", help="node counts N, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per N (medians are shown)")
    parser.add_argument("--quick", action="store_true", help="N = 10,50 and one run")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=CONCURRENCY,
        help=f"tokenlife's delivery.ssh.concurrency (default: the config default, {CONCURRENCY})",
    )
    parser.add_argument(
        "--fanout", type=int, default=0, help="pdcp and clush fanout (default 0: N)"
    )
    parser.add_argument(
        "--no-cli", dest="cli", action="store_false", help="skip the `tokenlife push` process"
    )
    parser.add_argument(
        "--keep-shell-rc",
        action="store_true",
        help="leave the ssh user's ~/.bashrc visible on the nodes (see the module docstring)",
    )
    parser.add_argument(
        "--kex",
        default="",
        help="KexAlgorithms for pdcp's ssh and clush's scp (default: OpenSSH's own choice)",
    )
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.repeat = "10,50", 1
    args.nodes = sorted({int(n) for n in args.nodes.split(",")})
    if os.geteuid() != 0:
        raise SystemExit("run as root (sshd nodes, namespaces, test users)")
    for tool in ("pdcp", "clush", "sshd", "unshare", "nsenter", "ssh-keygen"):
        if shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None:
            raise SystemExit(f"{tool} is not installed")
    # A kill must still stop the nodes (finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tools = [t for t in TOOLS if args.cli or t != "tokenlife CLI"]
    ns: list[int] = args.nodes

    began = time.monotonic()
    with Stopwatch() as idle:
        time.sleep(1)
    idle_busy = idle.timing.cpu / (idle.timing.wall * (os.cpu_count() or 1))
    bench = Bench(args)
    try:
        bench.start()
        fanout = "N" if not args.fanout else str(args.fanout)
        print(
            f"tokenlife push benchmark: N = {', '.join(map(str, ns))}, {args.repeat} run(s), "
            f"{os.cpu_count()} CPUs, {idle_busy:.0%} busy in the second before the start"
        )
        print(
            f"{len(bench.nodes)} sshd nodes started in {bench.nodes.start_seconds or 0:.1f} s "
            f"(not timed); tokenlife concurrency {args.concurrency}, "
            f"pdcp/clush fanout {fanout}, pdcp/clush kex {args.kex or 'OpenSSH default'}"
        )
        if bench.hidden_rc:
            print(f"on the nodes, {', '.join(bench.hidden_rc)} is an empty file (--keep-shell-rc)")
        times: dict[tuple[int, str], list[Timing]] = {(n, t): [] for n in ns for t in tools}
        size = 0
        for n in ns:
            for run in range(args.repeat):
                print(f"N = {n}, run {run + 1}:", file=sys.stderr)
                rnd = Round(bench, n)
                size = len(rnd.pushed.token)
                try:
                    steps: list[list[tuple[str, Callable[[], Timing]]]] = [
                        [("pdcp", rnd.pdcp)],
                        [("clush --copy", rnd.clush)],
                        [
                            ("tokenlife cold", rnd.tokenlife_cold),
                            ("tokenlife warm", rnd.tokenlife_warm),
                        ]
                        + ([("tokenlife CLI", rnd.tokenlife_cli)] if args.cli else []),
                    ]
                    shift = run % len(steps)
                    for group in steps[shift:] + steps[:shift]:
                        for tool, fn in group:
                            times[n, tool].append(timed(tool, fn))
                finally:
                    rnd.close()
        print(f"token file: {size} bytes (RS256, 4096-bit key)")
        print()
        print("wall time to put the renewed token file on N nodes (median of the runs),")
        print("files/s = N / wall, vs pdcp = wall / pdcp's wall at the same N (lower is faster),")
        print("CPU s = busy CPU seconds of the whole machine during the run (tool and sshds)")
        report(times, ns, tools)
    finally:
        bench.close()
    print(f"benchmark took {time.monotonic() - began:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()
