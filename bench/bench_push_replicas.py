r"""Delivery replicas in a rotation storm: one replica, two replicas, and what claims cost.

Every user's token has been renewed and every (user, node) pair is owed the
new version: by default 1,000 users, each with work on 10 of 100 nodes, so
10,000 deliveries.  Nodes are directories on this host (the ``local``
transport: ``<root>/<node>/run/tokenlife/<uid>/slurm_jwt``) with the real
install protocol (temporary file, fsync, owner, per-user lock, version check,
atomic rename), on a tmpfs by default (``--nodes-on disk`` for the work
directory's disk: then every "node" shares one journal, which real nodes do
not), so what is measured is the cycle and the store, not sshd.  The store is
a fresh database on a throwaway PostgreSQL 15
(``tests/integration/harness/postgres.py``; needs root and Debian's
``postgresql-15``), seeded by Core bulk inserts, then VACUUM ANALYZEd (what
autovacuum would have done).  Each replica is its own OS process
(``DeliveryCycle.run()`` with the default batch, a fixed clock, no job
source: what the store owes), started and connected before the clock runs
and released together.  Both tables are made with 32 threads per replica
(``delivery.ssh.concurrency``'s default), then with 2: on this transport a
push is CPU work, and one process's 32 threads on a few cores lose much of
their CPU to contention for CPython's GIL, which a second process escapes
(the "cpu s" column shows it); with 2 threads that effect is small.

Two tables:

  replicas  1 replica, then (a fresh copy) 2 replicas at once.  When 30% of
            the pairs are recorded, the users whose deliveries are claimed
            right then are renewed again, so their nodes are owed the next
            version while the replicas still push this one.  Columns: wall
            time from the first replica's start to the last one's end;
            pushes per second; the ratio of that rate over one replica's
            (target for 2: >= 1.7x); each replica's pushes; the users
            renewed mid-storm; double deliveries (a (user, node, version)
            pushed more than once: must be 0); older over newer (a node file
            ending older than a version some replica installed there: must
            be 0); missed (a node not holding its user's newest token after
            the storm and one catch-up cycle: must be 0); "cpu s / store":
            each replica's CPU seconds (its ``time.process_time()`` from "go"
            to its end: all its threads, user + system) and the PostgreSQL
            server's, in the median run; the 1-minute load average before and
            after each run; "machine busy": the machine's share of busy CPU
            time in each run, from "go" to the last replica's end (/proc/stat:
            user + nice + system + irq + softirq over all ticks; guest time is
            already counted in user): near 100% the machine's CPUs, not the
            software, were the limit, and a note under the table says so.
            With --replica-cpu, "cpu/wall": each replica's CPU seconds over
            its own wall time in the median run, and "held" when every
            replica of every run stayed within its cap (+5%: period edges).
  claims    what claiming costs a lone replica: the same storm (no renewal
            in it) by one DeliveryCycle, next to the previous cycle's way (one
            ``due()`` read, the pushes on as many threads, one ``record()``
            without claims), on PostgreSQL and SQLite.  Target: <= 1.1x.

Runs are repeated (``--repeat``), the modes alternating, and the medians
shown: on a shared 2-core machine one run can be off by 20%.

Replicas as hosts of their own (``--replica-cpu FRACTION``, e.g. 0.3): on a
cluster each replica is its own host and the nodes are other machines; here
replicas, nodes (SSH mode: 1,000 sshds), PostgreSQL and this bench share the
CPUs, so over SSH one replica already saturates a 2-CPU machine and a second
cannot be faster: the "vs 1" ratio then measures the box, not the software.
With the option each measured replica (not the catch-up cycle after the
storm, which is not timed) is put, right after it starts and before it is
released, into a cgroup of its own (tl-bench-replica-<pid>-<n>, cgroup v2's
cpu.max if /sys/fs/cgroup has the cpu controller, else v1's
/sys/fs/cgroup/cpu) whose CPU bandwidth quota is FRACTION of a CPU (FRACTION
x 10 ms per 10 ms period, longer below 0.1 as a quota is at least 1 ms: a
short period, so that a capped replica is slowed evenly rather than stopped
for long stretches with its transactions open);
the groups are removed at the end, also on an error, Ctrl-C or SIGTERM.  The
quota bounds CPU time, not parallelism: a replica may spend its share on both
CPUs at once.  How to read it: the emulation holds when "cpu/wall" says held
(each replica got no more than its share) and "machine busy" stays clearly
below 100% with 2 replicas (so each replica could get its whole share: the
cap, not the machine, was the limit); then "vs 1" is what a second host of
that size adds.  Choose FRACTION so that 2 x FRACTION plus what the nodes and
PostgreSQL need fits in the machine (e.g. 0.3 on 2 CPUs); "cpu/wall" well
below FRACTION means the cap was not reached (the replica waited on others).

SSH mode (``--transport ssh``): the same storm over SSH to real OpenSSH nodes
(``tests/integration/harness/sshnodes.py``: one sshd per node on 127.0.x.y,
each with its own host key and a private tmpfs on /run/tokenlife; needs
sshd, unshare, nsenter), 1,000 of them by default (``--nodes``), so each node
holds 10 users.  They are started once, before any clock runs, with sshd at
LogLevel INFO and internal-sftp at ERROR (Debian's defaults).  The storm's
node names (n0000 ...) reach them through an ssh_config of this bench (Host
n0000 / HostName 127.0.0.2 / Port P; the harness's known_hosts lists the
nodes by address and port, so it serves as it is), and the bench seeds and
checks their files through a directory of symlinks to each node's
``/proc/HOLDER/root``; every node's /run/tokenlife is emptied before each
run.  Each replica is a new process with an ``SshTransport`` (as ``tokenlife
push`` builds it: delivery.ssh.identity_file, known_hosts, ssh_config,
concurrency, max_connections) whose pool starts empty: it connects to every
node it pushes to.  Each replica raises its open-files limit as serve and
push do (tokenlife/app/fdlimit.py).  Defaults there: 32 threads only (2
threads over SSH just wait), the replicas table only (``--only
replicas,claims`` for both), and ``--max-connections`` at
delivery.ssh.max_connections' default (4096: no bound at 1,000 nodes); a
list, e.g. 4096,256, makes rows per bound.  Below the node count each
replica closes idle connections and reconnects as it goes: the storm walks
the records in id order, user by user, so a node comes round again only
after every other node, and almost every push reconnects.  Both tables then
have a "max conn" column, and a third table shows, per replica, what the
issue asks to bound: peak open file descriptors, peak threads and peak RSS
(VmHWM), sampled from /proc every 100 ms by this process (and each
replica's own count at its end); its connections opened (``SshPool._connect``
calls, and the distinct nodes they went to); the nodes' peak of established
SSH connections (sshd sessions, from /proc/net/tcp); and the machine's
MemAvailable before the run and its lowest during it.  Replicas, sshds and
PostgreSQL share this machine's CPUs.

Run as root:  .venv/bin/python bench/bench_push_replicas.py
Quick check:  .venv/bin/python bench/bench_push_replicas.py --users 200 --repeat 1
SSH mode:     .venv/bin/python bench/bench_push_replicas.py --transport ssh
              (... --max-connections 4096,256 adds the rows of a bound below 1,000 nodes)
Quick check:  .venv/bin/python bench/bench_push_replicas.py --transport ssh \
                  --nodes 50 --users 50 --repeat 1
Capped:       .venv/bin/python bench/bench_push_replicas.py --transport ssh --replica-cpu 0.3
Options: --users, --per-user, --nodes (100; ssh: 1000), --repeat, --concurrency 32,2
         (threads per replica: each in turn; ssh: 32), --only replicas,claims (ssh:
         replicas), --nodes-on tmpfs|disk (local only), --transport local|ssh,
         --max-connections 4096 (ssh only; a list: each in turn), --replica-cpu
         FRACTION (each measured replica capped at FRACTION of a CPU; default: no cap)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import func, insert, select, update  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from repository.models import DeliveryRow, EventRow, TokenRow  # noqa: E402
from repository.rows import to_delivery, to_dt, to_record  # noqa: E402
from repository.store import SqlTokenStore  # noqa: E402
from tests.integration.harness.deliver_worker import (  # noqa: E402
    REMOTE_DIR,
    Storm,
    node_file,
    node_name,
    open_store,
    outcome,
    renew,
    seed,
)
from tests.integration.harness.postgres import PostgresServer  # noqa: E402
from tests.integration.harness.sshnodes import SshNodes  # noqa: E402
from tokenlife.app import fdlimit  # noqa: E402
from tokenlife.config import Config, DeliveryConfig, SshConfig  # noqa: E402
from tokenlife.records import ACTIVE, DeliveryResult, DeliveryTask, TokenFile  # noqa: E402
from tokenlife.testing.fakes import FakeClock  # noqa: E402
from transfer.cycle import BATCH, DeliveryCycle  # noqa: E402
from transfer.transports import LocalTransport, SshTransport  # noqa: E402

NOW = 1_800_000_000
CONCURRENCY = 32  # delivery.ssh.concurrency's default
MAX_CONNECTIONS = SshConfig().max_connections  # delivery.ssh.max_connections' default
RENEW_WHEN = 0.3  # users with deliveries in flight are renewed once this share is recorded
SAMPLE_EVERY = 0.1  # seconds between two looks at the replicas' /proc (ssh mode)
CGROUP = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 10_000  # --replica-cpu's quota period (the kernel's default: 100 ms)
MIN_QUOTA_US = 1_000  # the kernel's least CPU quota: below it, a longer period
CAP_SLACK = 1.05  # a capped replica's cpu/wall may pass its cap by this (period edges)
SATURATED = 0.9  # a run with the machine this busy: its CPUs were the limit


# -- the replica process ---------------------------------------------------------------------


class TracingTransport(LocalTransport):
    """The local transport, noting every push: (user, node, version, outcome)."""

    def __init__(self, remote_dir: Path, root: Path) -> None:
        super().__init__(remote_dir, root)
        self.trace: list[tuple[str, str, int, str]] = []

    def put(self, node: str, tf: TokenFile) -> str:
        result = super().put(node, tf)
        self.trace.append((tf.user, node, tf.version, result))  # list.append: atomic
        return result


class TracingSshTransport(SshTransport):
    """The SSH transport (as ``tokenlife push`` builds it), noting every push as
    TracingTransport does, and every connection its pool opens."""

    def __init__(self, config: DeliveryConfig) -> None:
        super().__init__(config)
        self.trace: list[tuple[str, str, int, str]] = []
        self.connects: list[str] = []  # the node of each SshPool._connect call
        connect = self.pool._connect

        def counted(node: str) -> Any:
            self.connects.append(node)
            return connect(node)

        self.pool._connect = counted  # type: ignore[method-assign]

    def put(self, node: str, tf: TokenFile) -> str:
        result = super().put(node, tf)
        self.trace.append((tf.user, node, tf.version, result))
        return result


def usage(pid: int | str) -> dict[str, int] | None:
    """A process's open file descriptors, threads and peak RSS (VmHWM, kB), from
    /proc; None once it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmHWM" not in fields:  # a zombie
        return None
    return {
        "fds": fds,
        "threads": int(fields["Threads"]),
        "hwm_kb": int(fields["VmHWM"].split()[0]),
    }


# The cycle as it was before claims (release 0.x, transfer/cycle.py and
# repository/delivery_store.py at that time): one read of everything owed, the
# pushes on as many threads, one bulk record.  The store work is copied here
# word for word, so the baseline does not move with today's code.


def previous_due(store: SqlTokenStore, now: int) -> list[DeliveryTask]:
    with store.transaction(read_only=True) as s:
        query = (
            select(DeliveryRow, TokenRow)
            .outerjoin(TokenRow, (TokenRow.user == DeliveryRow.user) & (TokenRow.state == ACTIVE))
            .order_by(DeliveryRow.node, DeliveryRow.user)
        )
        query = query.where(DeliveryRow.next_attempt <= to_dt(now))
        tasks = []
        for row, token in s.execute(query).all():
            record = to_delivery(row)
            if row.status == "removing" or token is None:
                if row.status == "removing" or row.version > 0:
                    tasks.append(DeliveryTask(record, None))
            elif (token.token_id, token.version) != (row.token_id, row.version):
                tasks.append(DeliveryTask(record, to_record(token)))
        return tasks


def previous_record(
    store: SqlTokenStore, results: list[DeliveryResult], now: int, actor: str
) -> None:
    """The previous record() for the outcomes of a storm (all delivered: no
    removals, no failures, which it handled row by row)."""
    delivered: dict[tuple[str, str, int], list[str]] = {}
    events: list[dict[str, object]] = []
    at = to_dt(now)
    for r in results:
        assert r.ok and not r.removed, r
        delivered.setdefault((r.user, r.token_id, r.version), []).append(r.node)
        events.append(
            {
                "at": at,
                "event": "delivered",
                "user": r.user,
                "token_id": r.token_id,
                "version": r.version,
                "actor": actor,
                "reason": f"node {r.node}",
            }
        )
    with store.transaction() as s:
        for (user, token_id, version), nodes in delivered.items():
            for chunk in [nodes[i : i + 500] for i in range(0, len(nodes), 500)]:
                s.execute(
                    update(DeliveryRow)
                    .where((DeliveryRow.user == user) & DeliveryRow.node.in_(chunk))
                    .values(
                        token_id=token_id,
                        version=version,
                        status="delivered",
                        attempts=0,
                        last_error="",
                        updated=at,
                        next_attempt=at,
                    )
                )
        if events:
            s.execute(insert(EventRow), events)


def previous_cycle(cycle: DeliveryCycle, store: SqlTokenStore, concurrency: int) -> dict[str, Any]:
    now = int(cycle.clock.now())
    tasks = previous_due(store, now)
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(cycle._do, tasks))
    previous_record(store, results, int(cycle.clock.now()), cycle.actor)
    return {"delivered": sum(r.ok for r in results), "failed": sum(not r.ok for r in results)}


def worker() -> int:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    job = json.loads(sys.stdin.readline())
    store = SqlTokenStore(job["url"])
    store.current("nobody")  # engine and migrations before the clock runs
    transport: TracingTransport | TracingSshTransport
    if job.get("ssh") is None:
        transport = TracingTransport(Path(REMOTE_DIR), Path(job["root"]))
    else:
        ssh = job["ssh"]
        delivery = DeliveryConfig(
            transport="ssh",
            remote_dir=Path(REMOTE_DIR),
            ssh=SshConfig(
                identity_file=Path(ssh["identity_file"]),
                known_hosts=Path(ssh["known_hosts"]),
                ssh_config=Path(ssh["ssh_config"]),
                concurrency=job["concurrency"],
                max_connections=ssh["max_connections"],
            ),
        )
        fdlimit.ensure(Config(delivery=delivery))  # as serve and push do
        transport = TracingSshTransport(delivery)  # its pool empty: a cold start
    cycle = DeliveryCycle(
        store,
        transport,
        None,
        600,
        job["concurrency"],
        clock=FakeClock(job["now"]),
        actor=job["actor"],
    )
    print("ready", file=out, flush=True)
    if sys.stdin.readline().strip() != "go":
        return 2
    start, cpu = time.time(), time.process_time()
    if job["previous"]:
        summary = previous_cycle(cycle, store, job["concurrency"])
    else:
        summary = cycle.run().as_dict()
    end, cpu = time.time(), time.process_time() - cpu
    result = {**summary, "start": start, "end": end, "cpu": cpu, "trace": transport.trace}
    if isinstance(transport, TracingSshTransport):
        # At its end, every connection still pooled: its peak, unless the pool shrank.
        result["connects"] = len(transport.connects)
        result["connected_nodes"] = len(set(transport.connects))
        result["usage"] = usage("self")
    print(json.dumps(result), file=out, flush=True)
    store.close()
    return 0


class CpuCap:
    """--replica-cpu: each replica process in a cgroup of its own whose CPU
    bandwidth quota is ``fraction`` of a CPU, as if it were a host of its own.

    cgroup v2 (cpu.max) when /sys/fs/cgroup has the cpu controller, else v1's cpu
    controller at /sys/fs/cgroup/cpu (cpu.cfs_period_us, cpu.cfs_quota_us).  A
    process goes in through cgroup.procs, which moves all its threads (and its
    children to come).  Every group made is remembered until removed; close()
    ends the replicas still in one (this bench's own, by their Popen) and
    removes them all.
    """

    def __init__(self, fraction: float) -> None:
        cpus = os.cpu_count() or 1
        if not 0 < fraction <= cpus:
            raise SystemExit(
                f"--replica-cpu: {fraction} is not in (0, {cpus}] (this machine's CPUs)"
            )
        self.fraction = fraction
        self.period = max(CPU_PERIOD_US, math.ceil(MIN_QUOTA_US / fraction))
        self.quota = round(fraction * self.period)
        controllers = CGROUP / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            self.version, self.root = 2, CGROUP
            subtree = CGROUP / "cgroup.subtree_control"
            if "cpu" not in subtree.read_text().split():
                try:
                    subtree.write_text("+cpu")
                except OSError as e:
                    raise SystemExit(
                        f"--replica-cpu: cannot enable the cpu controller in {subtree}: {e}"
                    ) from None
        elif (CGROUP / "cpu" / "cpu.cfs_quota_us").exists():
            self.version, self.root = 1, CGROUP / "cpu"
        else:
            raise SystemExit(
                "--replica-cpu: no cgroup cpu controller (neither cgroup v2 with cpu in "
                f"{controllers} nor v1's {CGROUP / 'cpu'})"
            )
        self.made = 0
        self.groups: dict[Path, subprocess.Popen[str] | None] = {}
        try:  # fail now, before any node or store starts: make one group, remove it
            self._make(None)
        finally:
            self.close()

    def describe(self) -> str:
        return (
            f"each replica capped at {self.fraction:.2f} CPU (cgroup v{self.version} cpu quota "
            f"{self.quota}/{self.period} us: a host of its own)"
        )

    def _make(self, proc: subprocess.Popen[str] | None) -> Path:
        group = self.root / f"tl-bench-replica-{os.getpid()}-{self.made}"
        self.made += 1
        self.groups[group] = proc  # before it exists: close() removes it whatever happens
        try:
            group.mkdir()
            if self.version == 2:
                (group / "cpu.max").write_text(f"{self.quota} {self.period}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(self.period))
                (group / "cpu.cfs_quota_us").write_text(str(self.quota))
        except OSError as e:
            raise SystemExit(f"--replica-cpu: cannot make the cgroup {group}: {e}") from None
        return group

    def place(self, proc: subprocess.Popen[str]) -> Path:
        """A new group, with ``proc`` (all its threads) in it."""
        group = self._make(proc)
        try:
            (group / "cgroup.procs").write_text(str(proc.pid))
        except OSError as e:
            raise SystemExit(f"--replica-cpu: cannot put {proc.pid} in {group}: {e}") from None
        return group

    def verify(self, pid: int, group: Path) -> int:
        """Check that every thread of ``pid`` is in ``group`` (/proc/PID/task/*/cgroup);
        the number of threads."""
        want = "/" + str(group.relative_to(self.root))
        tasks = os.listdir(f"/proc/{pid}/task")
        for task in tasks:
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                for line in Path(f"/proc/{pid}/task/{task}/cgroup").read_text().splitlines():
                    hierarchy, controllers, path = line.split(":", 2)
                    if self.version == 2:
                        ours = hierarchy == "0" and not controllers
                    else:
                        ours = "cpu" in controllers.split(",")
                    if ours and path != want:
                        raise SystemExit(
                            f"--replica-cpu: thread {task} of replica {pid} is in {path}, "
                            f"not {want}"
                        )
        return len(tasks)

    def throttled(self, group: Path) -> float:
        """The share of the group's periods in which its quota ran out (cpu.stat)."""
        stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
        periods = int(stat.get("nr_periods", 0))
        return int(stat.get("nr_throttled", 0)) / periods if periods else 0.0

    def remove(self, group: Path) -> None:
        """Remove a group, once its replica (ended here if still running) has exited."""
        proc = self.groups.pop(group, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
        for _ in range(50):
            try:
                group.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY: its last task not yet gone
                time.sleep(0.1)
        print(f"--replica-cpu: could not remove the cgroup {group}", file=sys.stderr)

    def close(self) -> None:
        for group in list(self.groups):
            self.remove(group)


def cpu_ticks() -> tuple[int, int]:
    """The machine's busy and total CPU ticks so far (/proc/stat's cpu line): busy =
    user + nice + system + irq + softirq; total = those + idle + iowait + steal
    (guest and guest_nice are already counted in user and nice)."""
    with open("/proc/stat") as fh:
        fields = [int(n) for n in fh.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


class Replica:
    def __init__(self, job: dict[str, Any], cap: CpuCap | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        # Capped from its start (its imports and connections run under the cap too,
        # not timed): every thread it makes is born in its group.
        self.group = None if cap is None else cap.place(self.proc)
        self._send(json.dumps(job))

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _line(self) -> str:
        stream: IO[str] | None = self.proc.stdout
        assert stream is not None
        line = stream.readline()
        if not line:
            raise SystemExit(f"a replica died (exit {self.proc.wait()})")
        return line.rstrip("\n")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> None:
        if self._line() != "ready":
            raise SystemExit("a replica did not start")

    def go(self) -> None:
        self._send("go")

    def result(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._line())
        if self.proc.wait() != 0:
            raise SystemExit("a replica failed")
        return result


# -- one run -------------------------------------------------------------------------------------


@dataclass
class Run:
    wall: float
    pushes: int
    split: list[int]
    doubles: int
    older_over_newer: int
    missed: int
    load: tuple[float, float]
    cpu: list[float] = field(default_factory=list)
    renewed: int = 0  # users renewed mid-storm
    store_cpu: float = 0.0  # the PostgreSQL server's CPU seconds (0 on SQLite)
    # ssh mode: per replica, failed pushes, connections opened, peaks
    failed: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connects: list[int] = field(default_factory=list)
    connected_nodes: list[int] = field(default_factory=list)  # distinct nodes connected to
    fds: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    hwm_kb: list[int] = field(default_factory=list)
    sessions: int = 0  # the nodes' peak of established SSH connections
    mem_avail: tuple[int, int] = (0, 0)  # MemAvailable (kB) before the run, its lowest in it
    walls: list[float] = field(default_factory=list)  # each replica's own, "go" to its end
    busy: float = 0.0  # the machine's busy share of its CPU time, "go" to the last end
    throttled: list[float] = field(default_factory=list)  # --replica-cpu: share of periods

    def cpu_share(self) -> list[float]:
        """Each replica's CPU seconds over its own wall time (in CPUs)."""
        return [c / w if w > 0 else 0.0 for c, w in zip(self.cpu, self.walls, strict=True)]


# -- ssh mode: real sshd nodes under the storm's node names -------------------------------------


class SshSite:
    """``count`` OpenSSH nodes (SshNodes), reachable as the storm's n0000 ...

    ``links/n0000`` is a symlink to node01's ``/proc/HOLDER/root``, so the
    storm's seed(), outcome() and node_file() reach each node's own files.
    """

    def __init__(self, work: Path, count: int) -> None:
        self.nodes = SshNodes(work / "ssh", count, log_level="INFO", sftp_log_level="ERROR")
        self.links = work / "node-roots"
        self.ssh_config = work / "storm_ssh_config"
        self.names = [node_name(i) for i in range(count)]

    def start(self) -> None:
        self.nodes.start()
        self.ssh_config.write_text(
            "# bench_push_replicas: the storm's node names to the SshNodes nodes\n"
            + "".join(
                f"Host {name}\n    HostName {node.address}\n    Port {node.port}\n"
                for name, node in zip(self.names, self.nodes, strict=True)
            )
        )
        self.links.mkdir()
        for name, node in zip(self.names, self.nodes, strict=True):
            (self.links / name).symlink_to(node.root)

    def clear(self) -> None:
        """Empty every node's /run/tokenlife (through its own root, not a link's)."""
        for node in self.nodes:
            base = node.path(REMOTE_DIR)
            for entry in os.scandir(base):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)

    def job(self, max_connections: int) -> dict[str, Any]:
        """The worker's delivery.ssh settings."""
        return {
            "identity_file": str(self.nodes.client_key),
            "known_hosts": str(self.nodes.known_hosts),
            "ssh_config": str(self.ssh_config),
            "max_connections": max_connections,
        }

    def sessions(self) -> int:
        """Established TCP connections to the nodes' sshd (their shared port)."""
        port = f"{self.nodes.port:04X}"
        count = 0
        with open("/proc/net/tcp") as fh:
            next(fh)
            for line in fh:
                fields = line.split(maxsplit=4)
                if fields[3] == "01" and fields[1].endswith(f":{port}"):
                    count += 1
        return count

    def stop(self) -> None:
        self.nodes.stop()


def mem_available() -> int:
    """The machine's MemAvailable, kB."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


class Sampler:
    """While a run lasts, every SAMPLE_EVERY s: each replica's open fds, threads and
    VmHWM (peaks kept), the nodes' established SSH connections (every 5th look:
    /proc/net/tcp lists them all) and the machine's MemAvailable (lowest kept)."""

    def __init__(self, pids: list[int], site: SshSite) -> None:
        self.pids, self.site = pids, site
        self.fds = [0] * len(pids)
        self.threads = [0] * len(pids)
        self.hwm_kb = [0] * len(pids)
        self.sessions = 0
        self.avail = self.lowest = mem_available()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def note(self, i: int, seen: dict[str, int] | None) -> None:
        if seen is not None:
            self.fds[i] = max(self.fds[i], seen["fds"])
            self.threads[i] = max(self.threads[i], seen["threads"])
            self.hwm_kb[i] = max(self.hwm_kb[i], seen["hwm_kb"])

    def _loop(self) -> None:
        looks = 0
        while True:
            for i, pid in enumerate(self.pids):
                self.note(i, usage(pid))
            if looks % 5 == 0:
                self.sessions = max(self.sessions, self.site.sessions())
            self.lowest = min(self.lowest, mem_available())
            looks += 1
            if self._stop.wait(SAMPLE_EVERY):
                return


class Bench:
    def __init__(
        self,
        work: Path,
        nodes: Path,
        storm: Storm,
        site: SshSite | None = None,
        cap: CpuCap | None = None,
    ) -> None:
        self.work = work
        self.nodes = nodes
        self.storm = storm
        self.site = site  # ssh mode: the sshd nodes
        self.cap = cap  # --replica-cpu: each measured replica in a capped cgroup
        self.concurrency = CONCURRENCY  # of the runs to come
        self.max_connections = MAX_CONNECTIONS  # of the runs to come (ssh mode)
        self.pg = PostgresServer(parent=work)
        self.pg.start()
        self.rounds = 0
        self.renewed = 0  # users renewed mid-storm in the last run

    def fresh(self, backend: str) -> tuple[str, Path]:
        self.rounds += 1
        root = self.nodes / f"nodes-{self.rounds}"
        if self.site is not None:
            self.site.clear()
            root = self.site.links
        if backend == "sqlite":
            url = f"sqlite:///{self.work}/store-{self.rounds}/tokenlife.db"
        else:
            url = self.pg.create_database(f"push_{self.rounds}")
        seed(url, self.storm, root)
        if backend == "postgresql":  # what autovacuum would have done
            with self.pg.admin(f"push_{self.rounds}") as conn:
                conn.execute("VACUUM ANALYZE")
        return url, root

    def drop(self, backend: str, url: str, root: Path) -> None:
        if self.site is None:  # ssh mode: the next fresh() empties the nodes
            shutil.rmtree(root, ignore_errors=True)
        if backend == "postgresql":
            self.pg.drop_database(make_url(url).database or "")
        else:
            shutil.rmtree(Path(make_url(url).database or "").parent, ignore_errors=True)

    def run(self, backend: str, replicas: int, previous: bool, race: bool) -> Run:
        url, root = self.fresh(backend)
        try:
            return self._run(url, root, replicas, previous, race)
        finally:
            self.drop(backend, url, root)

    def store_cpu(self) -> float:
        """CPU seconds the PostgreSQL server's processes have used so far
        (this server's: their working directory is its data directory)."""
        total = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/cwd") != str(self.pg.data_dir):
                    continue
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                # utime, stime, and those of its children gone (backends that
                # ended are the postmaster's)
                total += sum(int(n) for n in stat[11:15])
        return total / os.sysconf("SC_CLK_TCK")

    def _run(self, url: str, root: Path, replicas: int, previous: bool, race: bool) -> Run:
        job = {
            "url": url,
            "root": str(root),
            "now": NOW,
            "concurrency": self.concurrency,
            "previous": previous,
        }
        if self.site is not None:
            job["ssh"] = self.site.job(self.max_connections)
        procs = [Replica({**job, "actor": f"replica-{i}"}, self.cap) for i in range(replicas)]
        for proc in procs:
            proc.ready()
            if self.cap is not None:
                assert proc.group is not None
                self.cap.verify(proc.pid, proc.group)
        load = os.getloadavg()[0]
        store_cpu = self.store_cpu()
        stop = threading.Event()
        self.renewed = 0
        renewer = threading.Thread(target=self._renew_midway, args=(url, stop), daemon=True)
        sampler = None
        if self.site is not None:
            sampler = Sampler([proc.pid for proc in procs], self.site)
            sampler.start()
        if race:
            renewer.start()
        busy_before, total_before = cpu_ticks()
        try:
            for proc in procs:
                proc.go()
            results = [proc.result() for proc in procs]
            busy, total = cpu_ticks()
        finally:  # also on an error or SIGTERM: no renewal tries a store that is gone
            stop.set()
            if race:
                renewer.join()
            if sampler is not None:
                sampler.stop()
        busy, total = busy - busy_before, total - total_before
        throttled = []
        if self.cap is not None:
            for proc in procs:
                assert proc.group is not None
                throttled.append(self.cap.throttled(proc.group))
                self.cap.remove(proc.group)
        after = os.getloadavg()[0]
        store_cpu = self.store_cpu() - store_cpu
        wall = max(r["end"] for r in results) - min(r["start"] for r in results)
        traces = [tuple(t) for r in results for t in r["trace"]]
        pushes = Counter((u, n, v) for u, n, v, _ in traces)
        doubles = sum(c - 1 for c in pushes.values())
        installed: dict[tuple[str, str], int] = {}
        for u, n, v, how in traces:
            if how == "installed":
                installed[(u, n)] = max(v, installed.get((u, n), 0))
        older = sum(
            1
            for (u, n), v in installed.items()
            if _version(node_file(root, REMOTE_DIR, n, u).read_text()) < v
        )
        # One catch-up cycle (what the next tick does); then every node holds the newest.
        # Not timed, so never capped (--replica-cpu): it only has to finish.
        catch_up = Replica({**job, "actor": "catch-up", "previous": False})
        catch_up.ready()
        catch_up.go()
        catch_up.result()
        seen = outcome(url, self.storm, root)
        run = Run(
            wall,
            len(traces),
            [len(r["trace"]) for r in results],
            doubles,
            older,
            len(seen.wrong_files) + seen.owed,
            (load, after),
            [r["cpu"] for r in results],
            self.renewed,
            store_cpu,
            walls=[r["end"] - r["start"] for r in results],
            busy=busy / total if total else 0.0,
            throttled=throttled,
        )
        if sampler is not None:
            for i, r in enumerate(results):
                sampler.note(i, r["usage"])  # its own count at its end
            run.failed = [r["failed"] for r in results]
            run.errors = [e for r in results for e in r["errors"]]
            run.connects = [r["connects"] for r in results]
            run.connected_nodes = [r["connected_nodes"] for r in results]
            run.fds, run.threads, run.hwm_kb = sampler.fds, sampler.threads, sampler.hwm_kb
            run.sessions = sampler.sessions
            run.mem_avail = (sampler.avail, sampler.lowest)
        return run

    def _renew_midway(self, url: str, stop: threading.Event) -> None:
        """Once RENEW_WHEN of the pairs are recorded, renew the users whose
        deliveries are claimed (on their way) right then: their nodes are owed
        the next version while the replicas still push this one."""
        store = open_store(url)
        target = RENEW_WHEN * len(self.storm.pairs())
        try:
            while not stop.is_set():
                with store.engine.connect() as conn:
                    done = conn.scalar(select(func.count()).select_from(EventRow)) or 0
                    if done >= target:
                        users = conn.scalars(
                            select(DeliveryRow.user)
                            .where(DeliveryRow.claimed_by.is_not(None))
                            .distinct()
                        ).all()
                        renew(url, self.storm, list(users), 3)
                        self.renewed = len(users)
                        return
                time.sleep(0.05)
        finally:
            store.close()

    def close(self) -> None:
        self.pg.stop()


def _version(text: str) -> int:
    return int(text.rsplit(".v", 1)[1])


# -- tables -------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def timed(label: str, bench: Bench, backend: str, replicas: int, previous: bool, race: bool) -> Run:
    """One run (``Bench.run``), with a progress line on stderr."""
    label = f"{label} (concurrency {bench.concurrency})"
    if bench.site is not None:
        label = f"{label[:-1]}, max_connections {bench.max_connections})"
    print(f"  {label} ...", end="", flush=True, file=sys.stderr)
    start = time.perf_counter()
    result = bench.run(backend, replicas, previous, race)
    cpu = "+".join(f"{c:.2f}" for c in result.cpu)
    ssh = ""
    if bench.site is not None:
        ssh = (
            f", failed {'+'.join(map(str, result.failed))}, "
            f"connects {'+'.join(map(str, result.connects))}, "
            f"peak fds {'+'.join(map(str, result.fds))}, sshd sessions {result.sessions}"
        )
    capped = ""
    if bench.cap is not None:
        capped = (
            f", cpu/wall {each(result.cpu_share(), '{:.2f}', '+')} (cap {bench.cap.fraction:.2f}), "
            f"throttled in {each(result.throttled, '{:.0%}', '+')} of periods"
        )
    print(
        f" {time.perf_counter() - start:.1f} s (cycle {result.wall:.2f} s, cpu {cpu} s, "
        f"store cpu {result.store_cpu:.2f} s, machine busy {result.busy:.0%}{capped}{ssh})",
        file=sys.stderr,
    )
    for error in result.errors[:3]:
        print(f"    failed: {error}", file=sys.stderr)
    return result


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.wall)[len(runs) // 2]


def each(values: Sequence[float], fmt: str = "{}", sep: str = "/") -> str:
    """Per-replica values: ``a/b``."""
    return sep.join(fmt.format(v) for v in values)


def cap_held(bench: Bench, runs: list[Run]) -> bool:
    """Whether every replica of these runs stayed within --replica-cpu (+ CAP_SLACK)."""
    assert bench.cap is not None
    limit = bench.cap.fraction * CAP_SLACK
    return all(share <= limit for r in runs for share in r.cpu_share())


def replicas_rows(
    bench: Bench, repeat: int
) -> tuple[list[list[str]], list[list[str]], list[float]]:
    """The replicas table's rows, (ssh mode) the resources table's, and the
    machine's busy share in every run."""
    runs: dict[int, list[Run]] = {1: [], 2: []}
    for i in range(repeat):
        for n in (1, 2):
            label = f"run {i + 1}: {n} replica(s)"
            runs[n].append(timed(label, bench, "postgresql", n, previous=False, race=True))
    # Rates, not wall times: the mid-storm renewal adds a few hundred pushes,
    # more with two replicas (more deliveries on their way at that moment).
    one = statistics.median(r.pushes / r.wall for r in runs[1])
    rows, usage_rows = [], []
    bound = [] if bench.site is None else [str(bench.max_connections)]

    def capped(these: list[Run], last: Run) -> list[str]:
        """The "cpu/wall" column (--replica-cpu only)."""
        if bench.cap is None:
            return []
        held = "held" if cap_held(bench, these) else "EXCEEDED"
        return [f"{each(last.cpu_share(), '{:.2f}')} {held}"]

    for n in (1, 2):
        wall = statistics.median(r.wall for r in runs[n])
        rate = statistics.median(r.pushes / r.wall for r in runs[n])
        last = median_run(runs[n])
        ratio = rate / one
        target = "" if n == 1 else ("ok" if ratio >= 1.7 else "MISSED (>= 1.7x)")
        rows.append(
            [
                str(bench.concurrency),
                *bound,
                str(n),
                f"{wall:.2f} s",
                f"{rate:,.0f}/s",
                f"{ratio:.2f}x",
                "/".join(str(s) for s in last.split),
                str(last.renewed),
                str(sum(r.doubles for r in runs[n])),
                str(sum(r.older_over_newer for r in runs[n])),
                str(sum(r.missed for r in runs[n])),
                "+".join(f"{c:.1f}" for c in last.cpu) + f" / {last.store_cpu:.1f}",
                *capped(runs[n], last),
                " ".join(f"{r.load[0]:.2f}->{r.load[1]:.2f}" for r in runs[n]),
                " ".join(f"{r.busy:.0%}" for r in runs[n]),
                target,
            ]
        )
        if bench.site is not None:
            before, lowest = last.mem_avail
            usage_rows.append(
                [
                    str(bench.concurrency),
                    *bound,
                    str(n),
                    str(sum(sum(r.failed) for r in runs[n])),
                    f"{each(last.connects)} ({each(last.connected_nodes)})",
                    each(last.fds),
                    each(last.threads),
                    each([kb // 1024 for kb in last.hwm_kb], "{} MiB"),
                    str(last.sessions),
                    f"{before / 2**20:.1f} -> {lowest / 2**20:.1f} GiB",
                ]
            )
    return rows, usage_rows, [r.busy for n in (1, 2) for r in runs[n]]


REPLICAS_HEADER = ["threads", "replicas", "wall", "pushes", "vs 1", "split", "renewed"]
REPLICAS_HEADER += ["doubles", "older>newer", "missed", "cpu s / store", "load (1 min) per run"]
REPLICAS_HEADER += ["machine busy per run", "target"]
USAGE_HEADER = ["threads", "max conn", "replicas", "failed", "connects", "peak fds"]
USAGE_HEADER += ["peak threads", "peak RSS (VmHWM)", "sshd sessions", "MemAvailable"]


def claims_rows(bench: Bench, repeat: int) -> list[list[str]]:
    rows = []
    bound = [] if bench.site is None else [str(bench.max_connections)]
    for backend in ("postgresql", "sqlite"):
        walls: dict[bool, list[float]] = {True: [], False: []}
        for i in range(repeat):
            for previous in (True, False):
                label = f"run {i + 1}: {backend} {'previous' if previous else 'claims'}"
                run = timed(label, bench, backend, 1, previous, race=False)
                if run.doubles or run.missed or run.older_over_newer:
                    raise SystemExit(f"{label}: {run}")
                walls[previous].append(run.wall)
        before, now = statistics.median(walls[True]), statistics.median(walls[False])
        ratio = now / before
        rows.append(
            [
                str(bench.concurrency),
                *bound,
                backend,
                f"{before:.2f} s",
                f"{now:.2f} s",
                f"{ratio:.2f}x",
                "ok" if ratio <= 1.1 else "MISSED (<= 1.1x)",
            ]
        )
    return rows


CLAIMS_HEADER = ["threads", "backend", "previous cycle", "with claims", "ratio", "target"]


def with_bound(header: list[str]) -> list[str]:
    """A header with ssh mode's "max conn" column after "threads"."""
    return [header[0], "max conn", *header[1:]]


def with_cap(header: list[str], cap: CpuCap) -> list[str]:
    """A header with --replica-cpu's "cpu/wall" column after "cpu s / store"."""
    at = header.index("cpu s / store") + 1
    return [*header[:at], f"cpu/wall (cap {cap.fraction:.2f})", *header[at:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--per-user", type=int, default=10)
    parser.add_argument("--nodes", type=int, help="default 100; ssh: 1000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--concurrency", help=f"threads per replica (default {CONCURRENCY},2; ssh: {CONCURRENCY})"
    )
    parser.add_argument("--only", help="default replicas,claims; ssh: replicas")
    parser.add_argument("--nodes-on", choices=("tmpfs", "disk"), help="local only; default tmpfs")
    parser.add_argument("--transport", choices=("local", "ssh"), default="local")
    parser.add_argument(
        "--max-connections",
        help=f"ssh only: delivery.ssh.max_connections, each in turn (default {MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--replica-cpu",
        type=float,
        metavar="FRACTION",
        help="cap each measured replica at FRACTION of a CPU (a cgroup quota: a host of its "
        "own); default: no cap",
    )
    args = parser.parse_args()
    if args.worker:
        sys.exit(worker())
    ssh = args.transport == "ssh"
    if ssh and args.nodes_on is not None:
        raise SystemExit("--nodes-on is for the local transport (each sshd node has its tmpfs)")
    if not ssh and args.max_connections is not None:
        raise SystemExit("--max-connections is for --transport ssh")
    args.nodes = args.nodes or (1000 if ssh else 100)
    args.concurrency = args.concurrency or (str(CONCURRENCY) if ssh else f"{CONCURRENCY},2")
    args.only = args.only or ("replicas" if ssh else "replicas,claims")
    args.nodes_on = args.nodes_on or "tmpfs"
    bounds = [int(n) for n in (args.max_connections or str(MAX_CONNECTIONS)).split(",")]
    if os.geteuid() != 0:
        raise SystemExit("run as root (PostgreSQL harness, file owners)")
    storm = Storm(args.users, args.per_user, args.nodes, NOW)
    threads = [int(n) for n in args.concurrency.split(",")]
    if ssh and min(bounds) < max(threads):  # as the configuration refuses it
        raise SystemExit("delivery.ssh.max_connections must be at least its concurrency")
    # Checked (a group made and removed) before anything starts.
    cap = None if args.replica_cpu is None else CpuCap(args.replica_cpu)
    if ssh or cap is not None:
        # A kill must still stop the nodes and remove the cgroups (finally below).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="tl-bench-push-replicas-"))
    os.chmod(work, 0o755)  # the postgres user reaches its data directory through it
    site = None
    if ssh:
        nodes = work
    else:
        nodes = work if args.nodes_on == "disk" else Path(tempfile.mkdtemp(dir="/dev/shm"))
    only = set(args.only.split(","))
    bench = None
    try:
        if ssh:
            site = SshSite(work, args.nodes)
            site.start()
        bench = Bench(work, nodes, storm, site, cap)
        where = f"local transport on {args.nodes_on}"
        if site is not None:
            where = (
                f"ssh transport to {args.nodes} sshd nodes (started in "
                f"{site.nodes.start_seconds or 0:.1f} s, not timed)"
            )
        print(
            f"rotation storm: {args.users:,} users x {args.per_user} of {args.nodes} nodes = "
            f"{len(storm.pairs()):,} deliveries; {where}; "
            f"batch {BATCH}; {os.cpu_count()} CPUs; medians of {args.repeat} run(s)"
        )
        if cap is not None:
            print(cap.describe())
        tables: dict[str, list[list[str]]] = {"replicas": [], "claims": [], "usage": []}
        busy: list[float] = []  # the machine's, in every replicas run
        for n in threads:
            bench.concurrency = n
            for bound in bounds if ssh else [MAX_CONNECTIONS]:
                bench.max_connections = bound
                if "replicas" in only:
                    rows, usage_rows, run_busy = replicas_rows(bench, args.repeat)
                    busy += run_busy
                    tables["replicas"] += rows
                    tables["usage"] += usage_rows
                if "claims" in only:
                    tables["claims"] += claims_rows(bench, args.repeat)
        replicas_header, claims_header = REPLICAS_HEADER, CLAIMS_HEADER
        if ssh:
            replicas_header, claims_header = with_bound(replicas_header), with_bound(claims_header)
        if cap is not None:
            replicas_header = with_cap(replicas_header, cap)
        if tables["replicas"]:
            print()
            print("replicas (PostgreSQL; the users whose deliveries are on their way when 30% are")
            print("recorded are renewed again: their nodes are owed the next version mid-storm)")
            print(table(replicas_header, tables["replicas"]))
            if max(busy) >= SATURATED:
                print(
                    f"note: the machine was up to {max(busy):.0%} busy: replicas, nodes and the "
                    "store competed for its CPUs, so a ratio there measures this machine"
                )
                if cap is not None:
                    print(
                        "and the cap was not the only limit (the emulation does not hold): "
                        "lower --replica-cpu"
                    )
        if tables["usage"]:
            print()
            print("each replica's peaks (a/b: replica 0/1), from /proc every 100 ms; connects =")
            print("SshPool._connect calls (to how many nodes); sshd sessions = the nodes' peak of")
            print("established SSH connections; MemAvailable = the machine's before the run ->")
            print("its lowest in it")
            print(table(USAGE_HEADER, tables["usage"]))
        if tables["claims"]:
            print()
            print("claims: a lone replica, next to the previous cycle (no claims)")
            print(table(claims_header, tables["claims"]))
    finally:
        try:
            if cap is not None:
                cap.close()  # replicas still running ended, their cgroups removed
            if bench is not None:
                bench.close()
        finally:
            if site is not None:
                site.stop()
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(nodes, ignore_errors=True)


if __name__ == "__main__":
    main()
