"""Renewal throughput and the idle tick, side by side with a limit measured in the same run.

Three tables, on a fresh SQLite file and a fresh database on a throwaway
PostgreSQL 15 (``tests/integration/harness/postgres.py``: needs root and
Debian's ``postgresql-15``):

  renew     N due tokens renewed by one ``Renewer.tick()`` (FakeClock, synthetic
            users: no /etc/passwd entries needed), next to the *limit*: PyJWT
            ``jwt.encode`` of the very same claims for the N rows plus one bulk
            UPDATE of the same rows (token, iat, exp, version + 1) in one
            transaction through the bare driver (sqlite3 / psycopg), no
            framework around it.  The claims are built before the limit's clock
            starts; tokenlife's tick also selects the due rows, decides each one
            by the policy, writes next_check and one audit event per token.
            Target: tokenlife >= 0.6x the limit's rate on each backend.
  replicas  the same N due tokens on PostgreSQL renewed by one replica, then (a
            fresh copy) by two replica processes ticking at once; every token
            must be renewed exactly once (counted from the audit events).
            Target: two replicas >= 1.6x one.
  idle      a tick with 10k, 100k, 1M stored tokens, none due: median and max
            of several ticks (ms), with the query plan of the tick's SELECT.
            Target: <= 50 ms, flat in the number of tokens.

Each tokenlife run and each limit run gets its own freshly seeded database
(Core bulk insert of the same rows, not through the Renewer; then what
autovacuum would have done: ANALYZE, and VACUUM on PostgreSQL); engines and
connections are opened before the clock starts, so only the work is timed.
Runs are repeated (``--repeat``, limit and tokenlife alternating) and the
medians compared: on a shared machine one run can be off by 20%.

Rows are laid out as logins fill a store: ids follow issue time, so a batch
of the most overdue tokens is a run of neighbouring rows.  ``--layout
scattered`` makes the renewal order unrelated to the row order (each batch
touches a thousand random pages: SQLite then pays for it at every commit).

Run as root:   .venv/bin/python bench/bench_renew.py            (N = 100,000; idle to 1M)
Quick check:   .venv/bin/python bench/bench_renew.py --quick    (N = 10,000; idle to 100k; 1 run)
Options: --n, --repeat, --idle 10000,100000,1000000, --ticks, --only renew,replicas,idle,
         --backends sqlite,postgresql, --layout issued|scattered
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jwt  # noqa: E402
import psycopg  # noqa: E402
from sqlalchemy import event, func, insert, select, text  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from producer.keys import HS256Key  # noqa: E402
from repository.models import EventRow, TokenRow  # noqa: E402
from repository.renewer import Renewer, Summary  # noqa: E402
from repository.store import SqlTokenStore  # noqa: E402
from tests.integration.harness.postgres import PostgresServer  # noqa: E402
from tokenlife.config import Config  # noqa: E402
from tokenlife.slurm_jwt import build_claims  # noqa: E402
from tokenlife.testing.fakes import FakeClock  # noqa: E402
from tokenlife.users import UserInfo  # noqa: E402

KEY = secrets.token_bytes(32)
NOW = 1_800_000_000
DAY = 86400
LIFETIME = 2 * DAY  # the defaults: lifetime 2d, renew-until 7d, renewal window the last quarter
RENEW_FOR = 7 * DAY
WINDOW = LIFETIME // 4  # Policy.margin(2d) with the default config
FIRST_UID = 100_000
SEED_CHUNK = 20_000


# -- synthetic users, keys and rows ---------------------------------------------------------


def user_name(i: int) -> str:
    return f"u{i:07d}"


def synthetic_user(name: str) -> UserInfo:
    """The user database of the benchmark: every ``uNNNNNNN`` exists, uid from the number."""
    uid = FIRST_UID + int(name[1:])
    return UserInfo(name, uid, uid, f"user {name}", f"/home/{name}", "/bin/bash", (uid, 100))


class BenchKey:
    def load(self) -> HS256Key:
        return HS256Key(KEY)

    def describe(self) -> str:
        return "benchmark key"


def dt(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


SAMPLE_TOKEN = jwt.encode(
    build_claims(synthetic_user(user_name(0)), NOW, NOW + LIFETIME), KEY, algorithm="HS256"
)


#: "issued" or "scattered" (see the module docstring)
LAYOUT = "issued"


def age(i: int, total: int) -> int:
    """Seconds, within the last hour, since token ``i`` of ``total`` became due / was issued."""
    if LAYOUT == "scattered":
        return (i * 2_654_435_761) % 3600
    return (total - 1 - i) * 3600 // total


def token_rows(start: int, count: int, due: bool, total: int) -> Iterator[dict[str, Any]]:
    """Rows ``start .. start+count-1`` of ``total`` (id = i + 1), one token per user.

    Due rows entered their renewal window within the last hour; the others
    were issued within the last hour and are due in about 35 hours.
    """
    for i in range(start, start + count):
        if due:
            first, iat = NOW - 3 * DAY, NOW - LIFETIME + WINDOW - age(i, total)
        else:
            first = iat = NOW - age(i, total)
        exp = iat + LIFETIME
        uid = FIRST_UID + i
        yield {
            "id": i + 1,
            "token_id": f"{i:016x}{secrets.token_hex(8)}",
            "user": user_name(i),
            "uid": uid,
            "gid": uid,
            "first_issued": dt(first),
            "iat": dt(iat),
            "exp": dt(exp),
            "renew_until": dt(first + RENEW_FOR),
            "lifetime": LIFETIME,
            "key_id": "sha256:old",
            "version": 1,
            "state": "active",
            "token": SAMPLE_TOKEN,
            "next_check": dt(exp - WINDOW),
            "attempts": 0,
            "last_error": "",
        }


def seed(engine: Engine, start: int, count: int, due: bool, total: int) -> None:
    """Core bulk insert (not through the Renewer), in chunks; ANALYZE afterwards."""
    rows = token_rows(start, count, due, total)
    while True:
        chunk = [row for _, row in zip(range(SEED_CHUNK), rows, strict=False)]
        if not chunk:
            break
        with engine.begin() as conn:
            conn.execute(insert(TokenRow), chunk)
    settle(engine)


def settle(engine: Engine) -> None:
    """What autovacuum would have done to a table this old: statistics, hint
    bits, visibility map.  Otherwise it starts in the middle of the timing."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE tokens")
            )
        else:
            conn.execute(text("ANALYZE"))
            conn.commit()


def expected_claims(start: int, count: int) -> list[tuple[int, dict[str, Any]]]:
    """(id, claims) of the renewal of each due row: what tokenlife signs too."""
    out = []
    for row in token_rows(start, count, due=True, total=count):
        exp = min(NOW + LIFETIME, int(row["renew_until"].timestamp()))
        out.append((row["id"], build_claims(synthetic_user(row["user"]), NOW, exp)))
    return out


# -- backends ---------------------------------------------------------------------------------


class Backends:
    """Fresh databases on demand: SQLite files in a temp dir, databases on one PG cluster."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.tmp = Path(tempfile.mkdtemp(prefix="tl-bench-renew-"))
        self.pg: PostgresServer | None = None
        self.count = 0
        if "postgresql" in names:
            self.pg = PostgresServer()
            self.pg.start()

    def fresh(self, backend: str) -> str:
        self.count += 1
        if backend == "sqlite":
            return f"sqlite:///{self.tmp}/db{self.count}.sqlite"
        assert self.pg is not None
        return self.pg.create_database(f"bench_{self.count}")

    def drop(self, url: str) -> None:
        if url.startswith("sqlite"):
            path = Path(url.split("///", 1)[1])
            for extra in ("", "-wal", "-shm"):
                path.with_name(path.name + extra).unlink(missing_ok=True)
        elif self.pg is not None:
            self.pg.drop_database(url.rsplit("/", 1)[1])

    def close(self) -> None:
        if self.pg is not None:
            self.pg.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def open_store(url: str) -> SqlTokenStore:
    store = SqlTokenStore(url)
    store._open()  # engine + migrations before any clock starts
    return store


def renewer_for(store: SqlTokenStore) -> Renewer:
    return Renewer(Config(), BenchKey(), store, clock=FakeClock(NOW), users=synthetic_user)


def count_events(store: SqlTokenStore, name: str) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.scalar(select(func.count()).select_from(EventRow).where(EventRow.event == name))
            or 0
        )


def check_renewed(store: SqlTokenStore, n: int) -> None:
    """Every token renewed exactly once: version 2 everywhere, n 'renewed' events."""
    with store.engine.connect() as conn:
        versions = dict(
            conn.execute(select(TokenRow.version, func.count()).group_by(TokenRow.version)).all()
        )
    events = count_events(store, "renewed")
    if versions != {2: n} or events != n:
        raise SystemExit(f"renewal check failed: versions {versions}, {events} renewed events")


# -- the limit ---------------------------------------------------------------------------------


def limit_sqlite(path: str, todo: list[tuple[int, dict[str, Any]]]) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")  # as the store's connections
    iat = dt(NOW).replace(tzinfo=None).isoformat(" ", "microseconds")
    start = time.perf_counter()
    params = [
        (
            jwt.encode(claims, KEY, algorithm="HS256"),
            dt(claims["exp"]).replace(tzinfo=None).isoformat(" ", "microseconds"),
            iat,
            row_id,
        )
        for row_id, claims in todo
    ]
    conn.execute("BEGIN")
    conn.executemany(
        "UPDATE tokens SET token = ?, exp = ?, iat = ?, version = version + 1 WHERE id = ?",
        params,
    )
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def limit_postgresql(url: str, todo: list[tuple[int, dict[str, Any]]]) -> float:
    """One UPDATE ... FROM unnest(arrays sent in binary): PostgreSQL's cheapest bulk update."""
    conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
    iat = dt(NOW).replace(tzinfo=None)
    start = time.perf_counter()
    ids, tokens, exps = [], [], []
    for row_id, claims in todo:
        ids.append(row_id)
        tokens.append(jwt.encode(claims, KEY, algorithm="HS256"))
        exps.append(dt(claims["exp"]).replace(tzinfo=None))
    with conn.transaction():
        conn.execute(
            "UPDATE tokens AS t SET token = v.token, exp = v.exp, iat = %s,"
            " version = t.version + 1"
            " FROM unnest(%b::int[], %b::text[], %b::timestamp[]) AS v(id, token, exp)"
            " WHERE t.id = v.id",
            (iat, ids, tokens, exps),
        )
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def measure_limit(backends: Backends, backend: str, n: int) -> float:
    url = backends.fresh(backend)
    store = open_store(url)
    seed(store.engine, 0, n, due=True, total=n)
    todo = expected_claims(0, n)
    store.engine.dispose()
    if backend == "sqlite":
        elapsed = limit_sqlite(url.split("///", 1)[1], todo)
    else:
        elapsed = limit_postgresql(url, todo)
    backends.drop(url)
    return elapsed


# -- tokenlife ---------------------------------------------------------------------------------


def measure_tokenlife(backends: Backends, backend: str, n: int) -> float:
    url = backends.fresh(backend)
    store = open_store(url)
    seed(store.engine, 0, n, due=True, total=n)
    renewer = renewer_for(store)
    start = time.perf_counter()
    summary = renewer.tick()
    elapsed = time.perf_counter() - start
    if summary.renewed != n:
        raise SystemExit(f"tokenlife renewed {summary.line()}, expected {n}")
    check_renewed(store, n)
    store.engine.dispose()
    backends.drop(url)
    return elapsed


@dataclass
class RenewRow:
    backend: str
    n: int
    tokenlife: list[float]
    limit: list[float]

    def cells(self) -> list[str]:
        tl, limit = statistics.median(self.tokenlife), statistics.median(self.limit)
        ratio = limit / tl
        runs = " ".join(f"{lim / t:.2f}" for t, lim in zip(self.tokenlife, self.limit, strict=True))
        return [
            self.backend,
            f"{self.n:,}",
            f"{tl:.2f} s",
            f"{self.n / tl:,.0f}/s",
            f"{limit:.2f} s",
            f"{self.n / limit:,.0f}/s",
            f"{ratio:.2f}x",
            runs,
            "ok" if ratio >= 0.6 else "MISSED (>= 0.6x)",
        ]


# -- replicas ----------------------------------------------------------------------------------


def _replica(url: str, barrier: Any, results: Any) -> None:
    store = open_store(url)
    renewer = renewer_for(store)
    barrier.wait()
    start, cpu = time.time(), time.process_time()
    summary: Summary = renewer.tick()
    end, cpu = time.time(), time.process_time() - cpu
    results.put((start, end, summary.renewed, summary.failed, cpu))
    store.engine.dispose()


def measure_replicas(backends: Backends, n: int, replicas: int) -> tuple[float, list[int]]:
    """Wall time from the common start until the last replica is done; per-replica counts."""
    url = backends.fresh("postgresql")
    store = open_store(url)
    seed(store.engine, 0, n, due=True, total=n)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(replicas)
    results = ctx.Queue()
    procs = [ctx.Process(target=_replica, args=(url, barrier, results)) for _ in range(replicas)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=3600) for _ in procs]
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise SystemExit("a replica failed")
    if sum(r[2] for r in got) != n or any(r[3] for r in got):
        raise SystemExit(f"replicas renewed {[r[2] for r in got]}, failed {[r[3] for r in got]}")
    check_renewed(store, n)  # each token exactly once
    store.engine.dispose()
    backends.drop(url)
    cpu = ", ".join(f"{r[4]:.2f}" for r in got)
    print(f" [replica cpu {cpu} s]", end="", file=sys.stderr)
    return max(r[1] for r in got) - min(r[0] for r in got), [r[2] for r in got]


# -- idle tick ---------------------------------------------------------------------------------


def tick_statement(store: SqlTokenStore, renewer: Renewer) -> tuple[str, Any]:
    """The SELECT a tick sends (captured from the driver), for EXPLAIN."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "tokens" in statement:
            seen.append((statement, params))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        renewer.tick()
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    return seen[0]


def explain(store: SqlTokenStore, statement: str, params: Any) -> str:
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
            return "; ".join(str(r[-1]) for r in rows)
        rows = conn.exec_driver_sql("EXPLAIN " + statement, params).all()
        return "; ".join(str(r[0]).strip() for r in rows)


def measure_idle(
    backends: Backends, backend: str, sizes: list[int], ticks: int
) -> list[tuple[int, float, float, str]]:
    url = backends.fresh(backend)
    store = open_store(url)
    renewer = renewer_for(store)
    out = []
    have = 0
    for size in sorted(sizes):
        seed(store.engine, have, size - have, due=False, total=max(sizes))
        have = size
        statement, params = tick_statement(store, renewer)  # also the warm-up tick
        samples = []
        for _ in range(ticks):
            start = time.perf_counter()
            summary = renewer.tick()
            samples.append((time.perf_counter() - start) * 1000)
            if summary.renewed or summary.waiting or summary.expired or summary.failed:
                raise SystemExit(f"idle tick did work: {summary.line()}")
        out.append(
            (size, statistics.median(samples), max(samples), explain(store, statement, params))
        )
    store.engine.dispose()
    return out


# -- output ------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def timed(label: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with a progress line on stderr."""
    print(f"  {label} ...", end="", flush=True, file=sys.stderr)
    start = time.perf_counter()
    result = fn(*args)
    print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="due tokens to renew")
    parser.add_argument("--repeat", type=int, default=3, help="runs of renew and replicas")
    parser.add_argument(
        "--idle", default="10000,100000,1000000", help="stored token counts for the idle tick"
    )
    parser.add_argument("--ticks", type=int, default=15, help="idle ticks timed per size")
    parser.add_argument("--quick", action="store_true", help="N = 10,000, idle up to 100k, 1 run")
    parser.add_argument("--only", default="renew,replicas,idle")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--layout", choices=["issued", "scattered"], default="issued")
    args = parser.parse_args()
    if args.quick:
        args.n, args.idle, args.repeat = 10_000, "10000,100000", 1
    global LAYOUT
    LAYOUT = args.layout
    only = set(args.only.split(","))
    names = args.backends.split(",")
    idle_sizes = [int(s) for s in args.idle.split(",")]
    n, repeat = args.n, args.repeat

    backends = Backends(names)
    try:
        print(
            f"tokenlife renewal benchmark: N = {n:,}, {repeat} run(s), layout {LAYOUT},"
            f" {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
        )
        if "renew" in only:
            rows = [RenewRow(backend, n, [], []) for backend in names]
            for run in range(1, repeat + 1):
                for row in rows:
                    label = f"run {run}, {row.backend}"
                    row.limit.append(
                        timed(f"{label}: limit", measure_limit, backends, row.backend, n)
                    )
                    row.tokenlife.append(
                        timed(f"{label}: tokenlife", measure_tokenlife, backends, row.backend, n)
                    )
            print()
            print("renew: one tick renewing N due tokens vs the limit (PyJWT + one bulk UPDATE),")
            print("medians of the runs")
            header = [
                "backend",
                "N",
                "tokenlife",
                "rate",
                "limit",
                "rate",
                "ratio",
                "runs",
                "target",
            ]
            print(table(header, [r.cells() for r in rows]))
        if "replicas" in only and "postgresql" in names:
            ones, twos, split = [], [], [0, 0]
            for run in range(1, repeat + 1):
                ones.append(timed(f"run {run}: 1 replica", measure_replicas, backends, n, 1)[0])
                two, split = timed(f"run {run}: 2 replicas", measure_replicas, backends, n, 2)
                twos.append(two)
            one, two = statistics.median(ones), statistics.median(twos)
            speedup = one / two
            runs = " ".join(f"{a / b:.2f}" for a, b in zip(ones, twos, strict=True))
            single = ["1", f"{n:,}", f"{one:.2f} s", f"{n / one:,.0f}/s", "1.00x", "", "", ""]
            double = ["2", f"{n:,}", f"{two:.2f} s", f"{n / two:,.0f}/s", f"{speedup:.2f}x", runs]
            double += ["/".join(f"{c:,}" for c in split)]
            double += ["ok" if speedup >= 1.6 else "MISSED (>= 1.6x)"]
            print()
            print("replicas: N due tokens on PostgreSQL, replica processes ticking at once,")
            print("medians of the runs (split: tokens renewed by each replica in the last run)")
            header = ["replicas", "N", "wall", "rate", "speed-up", "runs", "split", "target"]
            print(table(header, [single, double]))
        if "idle" in only:
            idle_rows, plans = [], []
            for backend in names:
                res = timed(
                    f"{backend}: idle ticks",
                    measure_idle,
                    backends,
                    backend,
                    idle_sizes,
                    args.ticks,
                )
                for size, median, worst, _plan in res:
                    ok = "ok" if median <= 50 else "MISSED (<= 50 ms)"
                    idle_rows.append(
                        [backend, f"{size:,}", f"{median:.2f} ms", f"{worst:.2f} ms", ok]
                    )
                plans.append(f"  {backend} ({res[-1][0]:,} tokens): {res[-1][3]}")
            print()
            print(f"idle: a tick with none due (median and max of {args.ticks} ticks)")
            print(table(["backend", "tokens", "median", "max", "target"], idle_rows))
            print("query plan of the tick's SELECT:")
            print("\n".join(plans))
    finally:
        backends.close()


if __name__ == "__main__":
    main()
