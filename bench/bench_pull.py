"""1,000 near-simultaneous pulls, side by side with 1,000 ``scontrol token`` on one slurmctld.

A big ``srun`` starts tasks on many nodes at once, and each node without a
current token pulls one: this measures the pull service under that burst,
against the way Slurm itself hands out tokens (``scontrol token``: slurmctld
mints after a munge round trip of its own).  Everything runs on this machine,
as the test user ``tlalice`` (a pull by root is refused):

* one real Slurm cluster (tests/integration/harness/slurm.py); its munged also
  serves the pull server, as on a controller that is the token host, and runs
  10 threads (``--munge-threads``), as Slurm's high-throughput guide suggests
  for a busy controller (munged's default is 2);
* NODES more munged daemons with the cluster's key and their own origin
  addresses: the nodes' munged, on which clients make and open credentials
  (``scontrol`` clients use them too, through a slurm.conf copy each);
* every pull connects from its own loopback address (127.0.4.1, ...), as a
  thousand nodes would, so the per-peer limit is not what is measured.

Each row releases COUNT calls at one instant (every client process or thread
is started and waiting first) and reports each call's latency, failures, the
wall time from the first start to the last end, calls per second, and the
token host's CPU per call (slurmctld and its munged; the pull server and the
same munged).  The clients share this machine's CPUs with the token host,
which a real cluster's nodes do not: see the service row.

  scontrol token, processes        the baseline: COUNT ``scontrol token`` processes
  pull, processes                  COUNT ``python -m client_engine.pull`` processes
                                   from a regular install (a Python start each)
  pull, in flight                  COUNT whole pulls from threads already running
                                   in PROCS processes (encode, connect, reply, decode)
  pull, service                    the same, with each request credential made
                                   before the release and each reply opened after
                                   it, and the connections driven by one selector
                                   loop per process (each connects and sends at
                                   once, as the engine does): what the token host
                                   itself takes, with the least client CPU
  pull_into, 1 user x COUNT tasks  COUNT tasks of one user on one node (processes):
                                   the per-user lock makes them one pull

Run as root on a machine with the Slurm packages:
    .venv/bin/python bench/bench_pull.py [--count 1000] [--nodes 8] [--procs 8] [--repeat 1]

With --repeat N every row but the last runs N times, the rows alternating so
that the machine's noise hits them alike, and the table shows medians (and
each run's p99 below it).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from producer.pull import PullPolicy, PullServer  # noqa: E402
from tests.integration.harness.munge import MungeRealm  # noqa: E402
from tests.integration.harness.slurm import SlurmCluster  # noqa: E402
from tests.integration.harness.users import ensure_user  # noqa: E402

USER = "tlalice"

# Runs as the user: prepares COUNT calls, says "ready", waits for the start
# time on stdin, releases them all at once, prints one JSON line.
RUNNER = r"""
import json, os, subprocess, sys, threading, time
spec = json.loads(sys.argv[1])
count, mode = spec["count"], spec["mode"]
results = [None] * count
go = threading.Event()
prepared = threading.Barrier(count + 1)
if mode != "processes":
    sys.path.insert(0, spec["repo"])
    from client_engine.pull import _Munge, pull
    host, port = spec["address"].rsplit(":", 1)

def process(i):
    argv = [a.replace("{SOURCE}", spec["sources"][i]) for a in spec["argv"]]
    prepared.wait()
    go.wait()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, env=spec["env"], capture_output=True, text=True, timeout=120)
        ok = p.returncode == 0 and spec["expect"] in p.stdout
    except Exception:
        ok = False
    results[i] = [(time.perf_counter() - t0) * 1000, ok, t0, time.perf_counter()]

def whole(i):
    source = spec["sources"][i]
    prepared.wait()
    go.wait()
    t0 = time.perf_counter()
    try:
        ok = pull(spec["address"], spec["socket"], 60, source=source) == spec["expect"]
    except Exception:
        ok = False
    results[i] = [(time.perf_counter() - t0) * 1000, ok, t0, time.perf_counter()]

def service_loop():
    # One thread multiplexes every connection: a node's side of a pull costs
    # this machine next to nothing, so the CPU is the token host's, as on a
    # cluster.  Each latency runs from the release, so waiting here counts.
    import selectors, socket
    sel = selectors.DefaultSelector()
    t0 = time.perf_counter()
    left = 0
    for i in range(count):  # connect and send as the engine does, then wait for all
        sock = socket.socket()
        try:
            sock.bind((spec["sources"][i], 0))
            sock.connect((host, int(port)))
            sock.sendall(creds[i])
        except OSError:
            results[i] = [0.0, b"", t0, time.perf_counter()]
            sock.close()
            continue
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, (i, bytearray()))
        left += 1
    while left:
        ready = sel.select(60)
        if not ready:
            break
        for key, mask in ready:
            i, buf = key.data
            sock = key.fileobj
            try:
                chunk = sock.recv(65536)
                if chunk:
                    buf += chunk
                    continue
            except OSError:
                buf.clear()
            now = time.perf_counter()
            results[i] = [(now - t0) * 1000, bytes(buf).split(b"\n", 1)[0], t0, now]
            sel.unregister(sock)
            sock.close()
            left -= 1
    for i, r in enumerate(results):
        if r is None:
            results[i] = [60000.0, b"", t0, time.perf_counter()]

threading.stack_size(256 * 1024)
if mode == "service":  # each request credential made before the release
    creds = [_Munge.encode(b"tokenlife-pull 1 n%d" % i, spec["socket"], None, 300) + b"\n"
             for i in range(count)]
    threads = []
else:
    target = {"processes": process, "threads": whole}[mode]
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    prepared.wait()  # every call is ready and waits for go
print("ready", flush=True)
start_at = float(sys.stdin.readline())
time.sleep(max(0.0, start_at - time.time()))
def used():  # this runner's CPU and its children's (scontrol, python -m ...)
    import resource
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime

cpu0 = used()
go.set()
if mode == "service":
    service_loop()
for t in threads:
    t.join()
cpu = used() - cpu0
if mode == "service":  # open the replies now, outside the measured time
    for i, r in enumerate(results):
        ok = False
        if r[1].startswith(b"OK "):
            err, payload, _, _ = _Munge.decode(r[1][3:], spec["socket"])
            ok = err == 0 and payload == b"tokenlife-pull 1 n%d " % i + spec["expect"].encode()
        r[1] = ok
offset = time.time() - time.perf_counter()  # wall-clock anchors: runners' results merge
print(json.dumps({"cpu": cpu, "results": [(ms, ok, t0 + offset, t1 + offset)
                                           for ms, ok, t0, t1 in results]}))
"""

Result = tuple[float, bool, float, float]  # ms, ok, start, end


def install_like_production(work: Path) -> str:
    """A regular (not editable) install in a fresh venv of Debian's python: what
    a node runs.  The test venv is editable, and setuptools' editable finder
    costs ~15 ms at every start; the worker side needs no third-party package,
    so --no-deps is faithful."""
    venv = work / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = Path(sys.executable).parent / "pip"
    subprocess.run(
        [str(pip), "--python", str(venv / "bin/python"), "install", "-q", "--no-deps", str(REPO)],
        check=True,
        capture_output=True,
    )
    return str(venv / "bin" / "python")


def as_user(user: str) -> list[str]:
    pw = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_spread(
    specs: list[dict[str, Any]], host_pids: list[int]
) -> tuple[list[Result], float, float]:
    """One runner per spec (as USER), all released at the same instant.

    Returns every call's result, the token host's CPU seconds meanwhile, and
    the clients' (the runners and their children, from the release on).
    """
    procs = []
    for spec in specs:
        argv = [
            *as_user(USER),
            sys.executable,
            "-c",
            RUNNER,
            json.dumps({**spec, "repo": str(REPO)}),
        ]
        procs.append(
            subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
            )
        )
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("a runner failed to start")
    time.sleep(0.3)  # let the machine settle after the runners' start
    before = sum(cpu_seconds(p) for p in host_pids)
    start_at = time.time() + 0.2
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{start_at}\n")
        proc.stdin.flush()
    out: list[Result] = []
    clients = 0.0
    for proc in procs:
        stdout, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"a runner failed ({proc.returncode})")
        report = json.loads(stdout)
        out += [tuple(r) for r in report["results"]]
        clients += report["cpu"]
    return out, sum(cpu_seconds(p) for p in host_pids) - before, clients


def sources(count: int, first: int = 0) -> list[str]:
    """A loopback address per call: 127.0.4.1, 127.0.4.2, ... (a node each)."""
    return [f"127.0.{4 + (first + i) // 250}.{1 + (first + i) % 250}" for i in range(count)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(name: str, results: list[Result], host_cpu: float, clients: float) -> dict[str, Any]:
    ms = [r[0] for r in results]
    wall = max(r[3] for r in results) - min(r[2] for r in results)
    return {
        "name": name,
        "n": len(results),
        "fail": sum(1 for r in results if not r[1]),
        "p50": pct(ms, 0.50),
        "p99": pct(ms, 0.99),
        "max": max(ms),
        "wall": wall,
        "rate": len(results) / wall,
        "host_cpu_ms": host_cpu * 1000 / len(results),
        "client_cpu_ms": clients * 1000 / len(results),
    }


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians of a row's runs (failures: their sum), and every run's p99."""
    row = dict(runs[0])
    for key in ("p50", "p99", "max", "wall", "rate", "host_cpu_ms", "client_cpu_ms"):
        row[key] = statistics.median(r[key] for r in runs)
    row["fail"] = sum(r["fail"] for r in runs)
    row["n"] = sum(r["n"] for r in runs)
    row["p99s"] = [r["p99"] for r in runs]
    return row


def split(count: int, parts: int) -> list[int]:
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=8, help="node munged daemons")
    parser.add_argument("--procs", type=int, default=8, help="client processes for threads")
    parser.add_argument(
        "--munge-threads",
        type=int,
        default=10,
        help="the token host's munged --num-threads (default 10, as Slurm's high-throughput "
        "guide suggests for a busy controller; 0: munged's own default, 2)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each row, alternating; medians shown"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: it starts a real Slurm cluster and munged daemons")
    alice = ensure_user(USER)
    work = Path(tempfile.mkdtemp(prefix="tl-bench-pull-"))
    work.chmod(0o755)
    key = work / "jwt_hs256.key"
    key.write_bytes(secrets.token_bytes(32))
    key.chmod(0o600)
    rows: list[dict[str, Any]] = []
    try:
        python = install_like_production(work)
        with (
            SlurmCluster(
                work / "slurm", key, open_munge=True, munge_threads=args.munge_threads or None
            ) as cluster,
            MungeRealm() as realm,
        ):
            munge_key = (cluster.workdir / "munge" / "key").read_bytes()
            nodes = [
                realm.start(f"node{i}", munge_key, origin=f"127.0.3.{i + 1}")
                for i in range(args.nodes)
            ]
            # scontrol on "node k" uses node k's munged, as pull clients do
            conf = cluster.conf_path.read_text()
            node_confs = []
            for i, node in enumerate(nodes):
                path = work / f"slurm-node{i}.conf"
                path.write_text(
                    re.sub(r"(?m)^AuthInfo=socket=.*$", f"AuthInfo=socket={node.socket}", conf)
                )
                path.chmod(0o644)
                node_confs.append(path)
            token = cluster.scontrol_token(USER, 3600)
            slurm_uid = pwd.getpwnam("slurm").pw_uid
            server = PullServer(
                "127.0.0.1:0",
                lambda uid, user, host: token if user == USER else None,
                PullPolicy(privileged_uids=frozenset({0, slurm_uid})),
                munge_socket=str(cluster.munge_socket),
                resolve_host=lambda addr: addr,
            ).start()
            munged = cluster._procs["munged"].pid
            ctld_pids = [cluster._procs["slurmctld"].pid, munged]
            pull_pids = [os.getpid(), munged]
            try:
                env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
                scontrol = ["scontrol", "token", "lifespan=3600"]
                pull_cli = [python, "-m", "client_engine.pull", "--timeout", "60"]
                # warm up: slurmctld, munged, the page cache, the installed .pyc files
                for i in range(5):
                    conf_env = {**env, "SLURM_CONF": str(node_confs[i % args.nodes])}
                    subprocess.run([*as_user(USER), *scontrol], env=conf_env, check=True,
                                   capture_output=True)  # fmt: skip
                    subprocess.run(
                        [*as_user(USER), *pull_cli, "--socket", str(nodes[0].socket),
                         server.address],
                        env=env, cwd="/", check=True, capture_output=True,
                    )  # fmt: skip

                def by_node(
                    argv_for: list[list[str]], envs: list[dict[str, str]], expect: str
                ) -> list[dict[str, Any]]:
                    out, first = [], 0
                    for k, n in enumerate(split(args.count, args.nodes)):
                        out.append({
                            "mode": "processes", "count": n, "argv": argv_for[k],
                            "env": envs[k], "expect": expect, "sources": sources(n, first),
                        })  # fmt: skip
                        first += n
                    return out

                def in_threads(mode: str) -> list[dict[str, Any]]:
                    out, first = [], 0
                    for k, n in enumerate(split(args.count, args.procs)):
                        out.append({
                            "mode": mode, "count": n, "address": server.address,
                            "socket": str(nodes[k % args.nodes].socket), "expect": token,
                            "sources": sources(n, first),
                        })  # fmt: skip
                        first += n
                    return out

                scontrol_envs = [{**env, "SLURM_CONF": str(c)} for c in node_confs]
                pull_argv = [
                    [*pull_cli, "--socket", str(n.socket), "--source", "{SOURCE}", server.address]
                    for n in nodes
                ]
                plan = [
                    ("scontrol token (baseline), processes",
                     by_node([scontrol] * args.nodes, scontrol_envs, "SLURM_JWT="), ctld_pids),
                    ("pull, processes", by_node(pull_argv, [env] * args.nodes, token), pull_pids),
                    ("pull, in flight (threads)", in_threads("threads"), pull_pids),
                    ("pull, service (sealed before/opened after)", in_threads("service"),
                     pull_pids),
                ]  # fmt: skip
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in plan}
                for round_ in range(args.repeat):  # the rows alternate: noise hits them alike
                    for name, specs, pids in plan:
                        before = server.counts()["ok"]
                        results, host_cpu, clients = run_spread(specs, pids)
                        runs[name].append(summarize(name, results, host_cpu, clients))
                        made = server.counts()["ok"] - before
                        print(
                            f"{name}: run {round_ + 1} done (pull server ok +{made})",
                            file=sys.stderr,
                        )
                rows += [median_row(runs[name]) for name, _, _ in plan]
                # a thousand tasks of one user on one node: one pull
                token_dir = work / "run"
                token_dir.mkdir(mode=0o755)
                user_dir = token_dir / str(alice.pw_uid)
                user_dir.mkdir(mode=0o700)
                os.chown(user_dir, alice.pw_uid, alice.pw_gid)
                into = [*pull_cli, "--socket", str(nodes[0].socket), "--token-dir",
                        str(token_dir), server.address]  # fmt: skip
                spec = {"mode": "processes", "count": args.count, "argv": into, "env": env,
                        "expect": "slurm_jwt", "sources": sources(args.count)}  # fmt: skip
                before = server.counts()["ok"]
                results, host_cpu, clients = run_spread([spec], pull_pids)
                name = "pull_into, 1 user x COUNT tasks, 1 node"
                rows.append(summarize(name, results, host_cpu, clients))
                rows[-1]["pulls"] = server.counts()["ok"] - before
                counts = server.counts()
            finally:
                server.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rows[0]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\n{args.count} near-simultaneous calls per row; {args.nodes} node munged daemons; "
        f"token host munged threads {args.munge_threads or 'default (2)'}; "
        f"{os.cpu_count()} CPUs shared by clients and token host; load average {load}"
    )
    print(
        "(latency in ms; wall: first start to last end; host: token host CPU ms per call;\n"
        " clients: the clients' CPU ms per call, on a cluster spent on the nodes)\n"
    )
    print(
        f"{'what':<44} {'n':>5} {'fail':>4} {'p50':>7} {'p99':>7} {'max':>7} {'wall s':>6} "
        f"{'per s':>6} {'vs ctl':>6} {'host':>5} {'clients':>7}"
    )
    for row in rows:
        name = str(row["name"]).replace("COUNT", str(args.count))
        ratio = row["rate"] / base["rate"]
        print(
            f"{name:<44} {row['n']:>5} {row['fail']:>4} {row['p50']:>7.1f} {row['p99']:>7.1f} "
            f"{row['max']:>7.1f} {row['wall']:>6.2f} {row['rate']:>6.0f} {ratio:>5.2f}x "
            f"{row['host_cpu_ms']:>5.2f} {row['client_cpu_ms']:>7.2f}"
        )
    if args.repeat > 1:
        print(f"\nmedians of {args.repeat} runs per row (n and fail: their sums); each run's p99:")
        for row in rows[:-1]:
            p99s = ", ".join(f"{v:.0f}" for v in row["p99s"])
            print(f"  {row['name']:<44} {p99s}")
    print(f"\npull_into: {rows[-1]['pulls']} pull(s) for {args.count} tasks")
    print(f"pull server counts: {counts}")
    print("targets: pull p99 <= 250 ms, 0 failures, throughput >= scontrol token's")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
