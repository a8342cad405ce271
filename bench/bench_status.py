"""``tokenlife status`` and a metrics scrape on a big store, at migrations 0004 and 0005.

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

  0004        the store at migration 0004 and the code before 0005: the
              tokens per state and the last 24 hours' events per kind
              counted in the indexes (the baseline, as measured before)
  0005        the same store upgraded to 0005 (timed: what an upgrade costs),
              VACUUM ANALYZE-d again: both are the sums of rows the
              database's triggers keep (repository/counts.py)

and for each, the median and max of ``--runs`` timings (ms) of

  status      ``repository.status.snapshot``: what ``tokenlife status``
              reads (its counts, soonest limits, the last 24 hours' events)
  scrape      one scrape of the daemon's registry (``generate_latest``),
              the snapshot cache bypassed, so each scrape reads the store

and the query plan (EXPLAIN) of the soonest renewable exp.  Target: status
and scrape <= 50 ms at 0005.  ``--profile`` prints each statement's time
of one snapshot (stderr).  The data are generated, not written through
tokenlife: this measures reading; bench_count_writes.py measures what the
triggers cost the writes, bench_renew.py the renewals.

Run as root:   .venv/bin/python bench/bench_status.py            (N = 1,000,000)
Quick check:   .venv/bin/python bench/bench_status.py --quick    (N = 100,000)
Options: --n, --events (default N; 7000000 is a million a day), --runs,
         --backends sqlite,postgresql, --profile
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prometheus_client import generate_latest  # noqa: E402
from sqlalchemy import event, func, select  # noqa: E402
from sqlalchemy.engine import Connection  # noqa: E402
from sqlalchemy.orm import Session, aliased, sessionmaker  # noqa: E402

import repository.status  # noqa: E402
from repository.counts import TOKEN_STATES, recount_tokens  # noqa: E402
from repository.counts import event_counts as kept_event_counts  # noqa: E402
from repository.counts import token_counts as kept_token_counts  # noqa: E402
from repository.migrate import HEAD, migrate  # noqa: E402
from repository.models import RENEWABLE, EventRow, TokenRow  # noqa: E402
from repository.rows import to_dt  # noqa: E402
from repository.status import WINDOW, exp_query, snapshot  # noqa: E402
from repository.store import SqlTokenStore, make_engine  # noqa: E402
from tests.integration.harness.bigstore import analyze, fill  # noqa: E402
from tests.integration.harness.postgres import PostgresServer  # noqa: E402
from tokenlife.app.metrics import Metrics  # noqa: E402
from tokenlife.records import ACTIVE  # noqa: E402

NOW = 1_800_000_000
BASELINE = "0004"


# The code before 0005 (the baseline): both counts counted in the indexes.


def counted_in_index(s: Session) -> dict[str, int]:
    """Tokens per state: one range per state.  SQLite counts a whole table by its
    index pages (a fraction of the cost of counting a range entry by entry), so
    there the active tokens, usually most of them, are the total less the others."""
    counts = dict.fromkeys(TOKEN_STATES, 0)
    sqlite = s.get_bind().dialect.name == "sqlite"
    for state in TOKEN_STATES:
        if sqlite and state == ACTIVE:
            continue
        counts[state] = int(
            s.scalar(select(func.count()).select_from(TokenRow).where(TokenRow.state == state)) or 0
        )
    if sqlite:
        total = int(s.scalar(select(func.count()).select_from(TokenRow)) or 0)
        counts[ACTIVE] = total - sum(counts.values())
    return counts


def events_counted_in_index(s: Session, since: int) -> dict[str, int]:
    """Events after ``since`` per kind: the kinds by skipping along ix_events_event_at
    (a few lookups), then one index range each, never the rows themselves."""
    kinds = select(func.min(EventRow.event).label("event")).cte("kinds", recursive=True)
    after = select(func.min(EventRow.event)).where(EventRow.event > kinds.c.event)
    kinds = kinds.union_all(select(after.scalar_subquery()).where(kinds.c.event.is_not(None)))
    inner = aliased(EventRow)
    count = (
        select(func.count())
        .select_from(inner)
        .where(inner.event == kinds.c.event, inner.at > to_dt(since))
        .scalar_subquery()
    )
    rows = s.execute(select(kinds.c.event, count).where(kinds.c.event.is_not(None))).all()
    return {str(kind): int(n) for kind, n in rows if n}


@contextlib.contextmanager
def code_before_0005() -> Iterator[None]:
    repository.status.token_counts = counted_in_index
    repository.status.event_counts = events_counted_in_index
    try:
        yield
    finally:
        repository.status.token_counts = kept_token_counts
        repository.status.event_counts = kept_event_counts


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


def measure(store: SqlTokenStore, runs: int, profile: bool, label: str) -> Result:
    if profile:
        print(f"\n    {label}, one snapshot, statement by statement:", file=sys.stderr)
        for ms, statement in statement_times(store):
            print(f"    {ms:8.2f} ms  {statement}", file=sys.stderr)
    status = timings(lambda: snapshot(store, NOW), runs)
    scrape = timings(scraper(store), runs)
    with store.engine.connect() as conn:
        plan = explain(conn)
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


def run(backend: str, url: str, args: argparse.Namespace) -> tuple[Result, Result, float]:
    """(baseline at 0004, at 0005, seconds the upgrade took) on one backend."""
    engine = make_engine(url)
    migrate(engine, BASELINE)
    step(f"{backend}: fill at {BASELINE}", fill, engine, args.n, NOW, args.events)
    engine.dispose()
    # The store at 0004, read by the code before 0005 (``_open`` would upgrade it).
    store = SqlTokenStore(url)
    store.engine = make_engine(url)
    store._sessions = sessionmaker(store.engine, expire_on_commit=False)
    try:
        with code_before_0005():
            baseline = step(
                f"{backend}: {BASELINE}", measure, store, args.runs, args.profile, BASELINE
            )
    finally:
        store.close()
    store = SqlTokenStore(url)
    try:
        started = time.perf_counter()
        store._open()  # what the new release's first command does: the upgrade
        upgrade = time.perf_counter() - started
        print(f"  {backend}: upgrade {BASELINE} -> {HEAD} {upgrade:.2f} s", file=sys.stderr)
        step(f"{backend}: analyze", analyze, store.engine)
        with store.transaction(read_only=True) as s:
            since = NOW - WINDOW
            if kept_token_counts(s) != recount_tokens(s) or kept_event_counts(
                s, since
            ) != events_counted_in_index(s, since):
                raise SystemExit(f"{backend}: the kept counts disagree with a recount")
        kept = step(f"{backend}: {HEAD}", measure, store, args.runs, args.profile, HEAD)
    finally:
        store.close()
    return baseline, kept, upgrade


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="stored tokens (and events)")
    parser.add_argument("--events", type=int, help="audit events over 7 days (default: N)")
    parser.add_argument("--runs", type=int, default=15, help="timed calls per figure")
    parser.add_argument("--quick", action="store_true", help="N = 100,000, 5 runs")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--profile", action="store_true", help="each statement's time, on stderr")
    args = parser.parse_args()
    if args.quick:
        args.n, args.runs = 100_000, 5
    tmp = Path(tempfile.mkdtemp(prefix="tl-bench-status-"))
    pg: PostgresServer | None = None
    rows, plans, upgrades = [], [], []
    try:
        print(
            f"tokenlife status benchmark: {args.n:,} tokens, "
            f"{args.events or args.n:,} events over 7 days, "
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
            baseline, kept, upgrade = run(backend, url, args)
            ok = all(statistics.median(t) <= 50 for t in (kept.status, kept.scrape))
            rows.append([backend, f"{BASELINE}: counted in an index", *baseline.cells(), ""])
            rows.append([backend, f"{HEAD}: kept counts", *kept.cells(), "ok" if ok else "MISSED"])
            ratios = [
                statistics.median(b) / statistics.median(k)
                for b, k in ((baseline.status, kept.status), (baseline.scrape, kept.scrape))
            ]
            rows.append([backend, "speed-up", f"{ratios[0]:.1f}x", "", f"{ratios[1]:.1f}x", "", ""])
            upgrades.append(f"  {backend}: {upgrade:.2f} s")
            plans.append(f"  {backend}: {kept.plan}")
        print()
        print(f"status and one scrape: median and max of {args.runs} calls (target: <= 50 ms)")
        header = ["backend", "schema", "status", "max", "scrape", "max", "target"]
        print(table(header, rows))
        print(f"upgrade {BASELINE} -> {HEAD} of that store (triggers, first count):")
        print("\n".join(upgrades))
        print(f"query plan of the soonest renewable exp (TokenlifeRenewalOverdue's), at {HEAD}:")
        print("\n".join(plans))
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
