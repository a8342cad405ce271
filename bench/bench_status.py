"""``tokenlife status`` and a metrics scrape on a big store, with and without its indexes.

One store per backend (a SQLite file and a database on a throwaway PostgreSQL
15, ``tests/integration/harness/postgres.py``: needs root and Debian's
``postgresql-15``), filled in the database itself (INSERT ... SELECT over a
generated series: about 10 s for a million tokens) with:

  tokens      N (default 1,000,000), one per user: 94% active, 5% expired,
              1% revoked; issued over the last 36 hours in no particular
              row order (``exp`` unrelated to ``id``)
  events      N audit events over the last 7 days (about a seventh in the
              last 24 hours): renewed, delivered, minted, ... in id order
  deliveries  N / 10 records on 1,000 nodes, 1% failed, 2% pending

Then, side by side in the same run, on the same data:

  indexed     the schema as migrated (head, with 0004's indexes)
  baseline    the same store with 0004's indexes dropped (what a store
              before 0004 has), ANALYZE-d again

and for each, the median and max of ``--runs`` timings (ms) of

  status      ``repository.status.snapshot``: what ``tokenlife status``
              reads (its counts, soonest limits, the last 24 hours' events)
  scrape      one scrape of the daemon's registry (``generate_latest``),
              the snapshot cache bypassed, so each scrape reads the store

and the query plan (EXPLAIN) of the soonest renewable exp.  Target: status
and scrape <= 50 ms with the indexes.  The data are generated, not renewed
through tokenlife: this measures reading, not writing (bench_renew.py does).

Run as root:   .venv/bin/python bench/bench_status.py            (N = 1,000,000)
Quick check:   .venv/bin/python bench/bench_status.py --quick    (N = 100,000)
Options: --n, --runs, --backends sqlite,postgresql
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prometheus_client import generate_latest  # noqa: E402
from sqlalchemy import event  # noqa: E402
from sqlalchemy.engine import Connection  # noqa: E402

from repository.models import RENEWABLE  # noqa: E402
from repository.status import exp_query, snapshot  # noqa: E402
from repository.store import SqlTokenStore  # noqa: E402
from tests.integration.harness.bigstore import drop_indexes, fill  # noqa: E402
from tests.integration.harness.postgres import PostgresServer  # noqa: E402
from tokenlife.app.metrics import Metrics  # noqa: E402

NOW = 1_800_000_000


# -- measuring ---------------------------------------------------------------------------------


def timings(fn: Callable[[], Any], runs: int) -> list[float]:
    """``runs`` timed calls (ms), after one warm-up call."""
    fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def scraper(store: SqlTokenStore) -> Callable[[], bytes]:
    """One scrape of the daemon's registry; every call reads the store (no cache)."""
    metrics = Metrics(lambda: store, 300)
    metrics.collector.begin()
    stats = metrics.stats

    def scrape() -> bytes:
        stats.tick_done(True, 0.1)  # a tick ended: the cached snapshot is stale
        return generate_latest(metrics.registry)

    return scrape


def statement_times(store: SqlTokenStore) -> list[tuple[float, str]]:
    """(ms, statement) of each statement of one ``status`` snapshot, slowest first."""
    times: list[tuple[float, str]] = []

    def before(conn: Any, *_: Any) -> None:
        conn.info["bench_started"] = time.perf_counter()

    def after(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        elapsed = (time.perf_counter() - conn.info.pop("bench_started")) * 1000
        times.append((elapsed, " ".join(statement.split())[:90]))

    event.listen(store.engine, "before_cursor_execute", before)
    event.listen(store.engine, "after_cursor_execute", after)
    try:
        snapshot(store, NOW)
    finally:
        event.remove(store.engine, "before_cursor_execute", before)
        event.remove(store.engine, "after_cursor_execute", after)
    return sorted(times, reverse=True)


def explain(conn: Connection) -> str:
    """The plan of the query for the soonest exp that renewal can still extend."""
    compiled = exp_query(RENEWABLE).compile(
        dialect=conn.dialect, compile_kwargs={"literal_binds": True}
    )
    if conn.dialect.name == "sqlite":
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").all()
        return "; ".join(str(r[-1]) for r in rows)
    rows = conn.exec_driver_sql(f"EXPLAIN {compiled}").all()
    return "; ".join(str(r[0]).strip() for r in rows)


@dataclass
class Result:
    status: list[float]
    scrape: list[float]
    plan: str

    def cells(self) -> list[str]:
        return [
            f"{statistics.median(self.status):.1f} ms",
            f"{max(self.status):.1f} ms",
            f"{statistics.median(self.scrape):.1f} ms",
            f"{max(self.scrape):.1f} ms",
        ]


def measure(store: SqlTokenStore, runs: int, profile: bool) -> Result:
    status = timings(lambda: snapshot(store, NOW), runs)
    scrape = timings(scraper(store), runs)
    with store.engine.connect() as conn:
        plan = explain(conn)
    if profile:
        for ms, statement in statement_times(store):
            print(f"    {ms:8.2f} ms  {statement}", file=sys.stderr)
    return Result(status, scrape, plan)


# -- output ------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def step(label: str, fn: Callable[..., Any], *args: Any) -> Any:
    print(f"  {label} ...", end="", flush=True, file=sys.stderr)
    start = time.perf_counter()
    result = fn(*args)
    print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return result


def run(backend: str, url: str, args: argparse.Namespace) -> tuple[Result, Result]:
    """(baseline, indexed) on one backend."""
    store = SqlTokenStore(url)
    store._open()  # migrations before anything is timed
    try:
        step(f"{backend}: fill", fill, store.engine, args.n, NOW)
        indexed = step(f"{backend}: indexed", measure, store, args.runs, args.profile)
        step(f"{backend}: drop 0004's indexes", drop_indexes, store.engine)
        baseline = step(f"{backend}: baseline", measure, store, args.runs, args.profile)
    finally:
        store.engine.dispose()
    return baseline, indexed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="stored tokens (and events)")
    parser.add_argument("--runs", type=int, default=15, help="timed calls per figure")
    parser.add_argument("--quick", action="store_true", help="N = 100,000, 5 runs")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--profile", action="store_true", help="each statement's time, on stderr")
    args = parser.parse_args()
    if args.quick:
        args.n, args.runs = 100_000, 5
    tmp = Path(tempfile.mkdtemp(prefix="tl-bench-status-"))
    pg: PostgresServer | None = None
    rows, plans = [], []
    try:
        print(
            f"tokenlife status benchmark: {args.n:,} tokens, {args.n:,} events, "
            f"{max(1, args.n // 10):,} delivery records, {args.runs} runs, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
        )
        for backend in args.backends.split(","):
            if backend == "sqlite":
                url = f"sqlite:///{tmp}/status.db"
            else:
                pg = PostgresServer()
                pg.start()
                url = pg.create_database("bench_status")
            baseline, indexed = run(backend, url, args)
            ok = all(statistics.median(t) <= 50 for t in (indexed.status, indexed.scrape))
            rows.append([backend, "without 0004", *baseline.cells(), ""])
            rows.append([backend, "with 0004", *indexed.cells(), "ok" if ok else "MISSED"])
            ratios = [
                statistics.median(b) / statistics.median(i)
                for b, i in ((baseline.status, indexed.status), (baseline.scrape, indexed.scrape))
            ]
            rows.append([backend, "speed-up", f"{ratios[0]:.0f}x", "", f"{ratios[1]:.0f}x", "", ""])
            plans.append(f"  {backend}, with 0004:    {indexed.plan}")
            plans.append(f"  {backend}, without 0004: {baseline.plan}")
        print()
        print(f"status and one scrape: median and max of {args.runs} calls (target: <= 50 ms)")
        header = ["backend", "schema", "status", "max", "scrape", "max", "target"]
        print(table(header, rows))
        print("query plan of the soonest renewable exp (TokenlifeRenewalOverdue's):")
        print("\n".join(plans))
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
