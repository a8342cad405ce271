"""A login burst: 1,000 users logging in within 10 s, side by side with ``scontrol token``.

A class of users logging in at once (a course starting, a login node back
from maintenance) is one of the bursts the mint service must take.  Each
login here is a real PAM session opened by ``pamtester SERVICE USER
open_session`` through the shipped session line (``pam_tokenlife.so``, built
from producer/pam, ``required`` so that a failed login shows), against one
running ``tokenlife serve``; the logins start on a fixed schedule, LOGINS
evenly spread over SECONDS, each from its own process, as sshd forks one per
login.  The baseline is the same schedule of ``scontrol token username=U``
against one real slurmctld (tests/integration/harness/slurm.py): how Slurm
itself hands a token to each of those users.

Rows (each a fresh burst on the same schedule):

  scontrol token            LOGINS ``scontrol token username=U lifespan=3600`` (root, munge)
  module, first logins      every user's first login: the service mints LOGINS tokens
  module, logins again      the same users again: each login reuses the user's token
  pam_exec, first logins    (--pam-exec) the commented-out line: a Python start per login

Reported per row: failures (non-zero exit, or no valid token file for the
user afterwards), logins that fell back to ``tokenlife pam --no-service``
(the module's fallback: the service did not answer in time), latency
percentiles (ms, from each process's start to its exit), how late the last
start was against its schedule (the load generator's own lag), and the token
host's CPU per login (the service, or slurmctld with its munged).

Users: LOGINS synthetic accounts (tlburst0000 ...) exist only inside a
private mount namespace this script re-executes itself in, where /etc/passwd,
/etc/group and /etc/pam.d are bind-mounted copies: the host's user database
is never touched, and slurmctld (started in the namespace) sees them too.

Targets (issue 17): 0 failures, p99 <= 100 ms for the module rows.

Run as root:  .venv/bin/python bench/bench_login_burst.py [--logins 1000] [--seconds 10]
              [--pam-exec] [--no-scontrol]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.harness import pam_module  # noqa: E402
from tests.integration.harness.slurm import SlurmCluster  # noqa: E402

NS_ENV = "TOKENLIFE_BENCH_BURST_NS"
FIRST_UID = 40000  # tlburst0000's uid; a free range on this host is checked
GROUP = "tlburst"
TOKENLIFE = Path(sys.executable).parent / "tokenlife"


@dataclass
class Row:
    name: str
    latencies: list[float] = field(default_factory=list)  # ms
    failures: int = 0
    fallbacks: int = 0
    lag: float = 0.0  # ms: the latest start behind its schedule
    wall: float = 0.0  # s: first start to last end
    host_cpu: float | None = None  # ms of token-host CPU per login
    notes: list[str] = field(default_factory=list)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cpu_ms(pids: list[int]) -> float:
    """utime + stime of ``pids`` and their reaped children, in ms."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total * 1000 / tick


# -- the namespace and its users ------------------------------------------------------------


def enter_namespace() -> None:
    """Re-execute this script in a private mount namespace (once)."""
    if os.environ.get(NS_ENV) == "1":
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root: it needs a mount namespace, PAM and a Slurm cluster")
    env = {**os.environ, NS_ENV: "1"}
    argv = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, *sys.argv]
    os.execvpe("unshare", argv, env)


def users(count: int) -> list[str]:
    return [f"tlburst{i:04d}" for i in range(count)]


def bind_copy(target: Path, copy: Path) -> None:
    subprocess.run(["mount", "--bind", str(copy), str(target)], check=True)


def install_users(work: Path, names: list[str]) -> None:
    """/etc/passwd and /etc/group with ``names`` added, seen in this namespace only."""
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    taken = {int(line.split(":")[2]) for line in passwd.splitlines() if line.count(":") >= 6}
    taken |= {int(line.split(":")[2]) for line in group.splitlines() if line.count(":") >= 3}
    wanted = set(range(FIRST_UID, FIRST_UID + len(names) + 1))
    if taken & wanted:
        raise SystemExit(f"uids/gids {FIRST_UID}..{FIRST_UID + len(names)} are not all free")
    gid = FIRST_UID + len(names)
    lines = [
        f"{n}:x:{FIRST_UID + i}:{gid}:burst {i}:/nonexistent:/bin/sh" for i, n in enumerate(names)
    ]
    (work / "passwd").write_text(passwd + "\n".join(lines) + "\n")
    (work / "group").write_text(group + f"{GROUP}:x:{gid}:\n")
    for name in ("passwd", "group"):
        (work / name).chmod(0o644)
        bind_copy(Path("/etc") / name, work / name)


def install_pam_services(work: Path, lines: dict[str, str]) -> None:
    """/etc/pam.d with one service per ``lines`` entry, in this namespace only."""
    copy = work / "pam.d"
    shutil.copytree("/etc/pam.d", copy, symlinks=True)
    for name, session in lines.items():
        (copy / name).write_text(
            "auth     required pam_permit.so\naccount  required pam_permit.so\n"
            f"session  {session}\n"
        )
    subprocess.run(["mount", "--bind", str(copy), "/etc/pam.d"], check=True)


# -- a burst ------------------------------------------------------------------------------


def burst(
    name: str,
    argv_of: Callable[[str], list[str]],
    names: list[str],
    seconds: float,
    env: dict[str, str] | None = None,
) -> Row:
    """Start ``argv_of(user)`` for every user on the schedule; time each to its exit."""
    row = Row(name)
    lock = threading.Lock()
    step = seconds / len(names)
    starts: list[float] = []
    ends: list[float] = []

    def one(i: int, user: str, t0: float) -> None:
        delay = t0 + i * step - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        start = time.monotonic()
        proc = subprocess.run(
            argv_of(user), env=env, capture_output=True, stdin=subprocess.DEVNULL, check=False
        )
        end = time.monotonic()
        with lock:
            row.latencies.append((end - start) * 1000)
            row.lag = max(row.lag, (start - (t0 + i * step)) * 1000)
            starts.append(start)
            ends.append(end)
            if proc.returncode != 0:
                row.failures += 1
                if len(row.notes) < 3:
                    row.notes.append(f"{user}: exit {proc.returncode}: {proc.stderr[-200:]!r}")

    # Enough threads that a slow login never delays the next start.
    with ThreadPoolExecutor(max_workers=min(len(names), 400)) as pool:
        t0 = time.monotonic() + 0.5
        for f in [pool.submit(one, i, u, t0) for i, u in enumerate(names)]:
            f.result()
    row.wall = max(ends) - min(starts)
    return row


def token_ok(path: Path, user: str) -> bool:
    try:
        text = path.read_text().strip()
        part = text.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (OSError, IndexError, ValueError):
        return False
    return claims.get("sun") == user and claims.get("exp", 0) > time.time()


def check_logins(row: Row, run_dir: Path, spool: Path, names: list[str], before: int) -> None:
    """Failures: users without a valid login file; fallbacks: spool records written."""
    import pwd

    missing = [
        u for u in names if not token_ok(run_dir / str(pwd.getpwnam(u).pw_uid) / "slurm_jwt", u)
    ]
    if missing and not row.failures:
        row.notes.append(f"{len(missing)} users without a valid token file, e.g. {missing[0]}")
    row.failures = max(row.failures, len(missing))
    row.fallbacks = count_spool(spool) - before


def count_spool(spool: Path) -> int:
    return sum(1 for p in spool.rglob("*") if p.is_file()) if spool.exists() else 0


# -- the pieces ---------------------------------------------------------------------------


def write_config(work: Path, key: Path, run_dir: Path) -> Path:
    cfg = work / "tokenlife.toml"
    cfg.write_text(
        f'[key]\npath = "{key}"\n'
        f'[store]\nurl = "sqlite:///{work}/store.db"\nspool_dir = "{work}/spool"\n'
        f'[login]\ntoken_dir = "{run_dir}"\n'
        f'[producer]\nsocket = "{work}/mint.sock"\n'
        '[serve]\ndeliver = false\nmetrics = ""\n'
    )
    return cfg


def start_service(cfg: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen([str(TOKENLIFE), "-c", str(cfg), "serve"], stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"tokenlife serve did not start: {log.read_text()[-500:]}")
        time.sleep(0.05)
    return proc


def table(rows: list[Row], logins: int, seconds: float, base: Row | None) -> str:
    header = ["row", "logins", "fail", "fallback", "p50", "p95", "p99", "max", "lag", "wall s",
              "host ms", "p99 vs scontrol"]  # fmt: skip
    lines = [header]
    for r in rows:
        ratio = (
            ""
            if base is None or r is base
            else f"{pct(r.latencies, 0.99) / pct(base.latencies, 0.99):.2f}x"
        )
        lines.append([
            r.name, str(len(r.latencies)), str(r.failures), str(r.fallbacks),
            *(f"{pct(r.latencies, q):.0f}" for q in (0.5, 0.95, 0.99, 1.0)),
            f"{r.lag:.0f}", f"{r.wall:.1f}",
            "" if r.host_cpu is None else f"{r.host_cpu:.2f}", ratio,
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [f"{logins} logins over {seconds:g} s, latency in ms (process start to exit), "
           f"load {os.getloadavg()[0]:.2f} at the end"]  # fmt: skip
    for n, line in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pam-exec", action="store_true", help="add the pam_exec rows")
    parser.add_argument("--no-scontrol", action="store_true", help="skip the baseline")
    args = parser.parse_args()
    enter_namespace()
    names = users(args.logins)
    work = Path(tempfile.mkdtemp(prefix="tl-bench-burst-"))
    work.chmod(0o755)
    rows: list[Row] = []
    base: Row | None = None
    service: subprocess.Popen[bytes] | None = None
    cleanup = [work]
    try:
        install_users(work, names)
        key = work / "jwt_hs256.key"
        key.write_bytes(secrets.token_bytes(32))
        key.chmod(0o600)
        module = pam_module.build(work / "pam")
        sock, spool = work / "mint.sock", work / "spool"
        # Login files live on tmpfs in production (/run/tokenlife/login), so here too.
        run_dir = Path(tempfile.mkdtemp(prefix="tl-bench-burst-run-", dir="/dev/shm"))
        cleanup.append(run_dir)
        install_pam_services(work, {
            "tl-burst-module": f"required {module} socket={sock} fallback={TOKENLIFE} "
                               f"config={work / 'tokenlife.toml'}",
            "tl-burst-exec": f"required pam_exec.so quiet seteuid {TOKENLIFE} "
                             f"-c {work / 'tokenlife.toml'} pam --socket {sock}",
        })  # fmt: skip
        if not args.no_scontrol:
            with SlurmCluster(work / "slurm", key) as cluster:
                env = {**os.environ, **cluster.env()}
                # slurmctld and its munged (setpriv execs them: the pids are theirs)
                daemons = [cluster._procs[n].pid for n in ("slurmctld", "munged")]
                before = cpu_ms(daemons)
                base = burst(
                    "scontrol token (baseline)",
                    lambda u: ["scontrol", "token", f"username={u}", "lifespan=3600"],
                    names,
                    args.seconds,
                    env,
                )
                base.host_cpu = (cpu_ms(daemons) - before) / args.logins
                rows.append(base)
        cfg = write_config(work, key, run_dir)
        service = start_service(cfg, sock, work / "serve.log")
        cases = [
            ("module, first logins", "tl-burst-module"),
            ("module, logins again", "tl-burst-module"),
        ]
        if args.pam_exec:
            cases.append(("pam_exec, logins again", "tl-burst-exec"))
        for label, pam_service in cases:
            spooled = count_spool(spool)
            used = cpu_ms([service.pid])
            row = burst(label, lambda u, s=pam_service: ["pamtester", s, u, "open_session"],
                        names, args.seconds)  # fmt: skip
            row.host_cpu = (cpu_ms([service.pid]) - used) / args.logins
            check_logins(row, run_dir, spool, names, spooled)
            rows.append(row)
        print(table(rows, args.logins, args.seconds, base))
        for r in rows:
            for note in r.notes:
                print(f"  {r.name}: {note}")
        bad = [r for r in rows if r is not base and r.failures]
        return 1 if bad else 0
    finally:
        if service is not None:
            service.terminate()
            service.wait(20)
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
