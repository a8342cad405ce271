"""What the kept counts of migration 0005 cost the writes, side by side with 0004.

Each figure is measured on fresh stores of one backend (a SQLite file, a
database on a throwaway PostgreSQL 15: ``tests/integration/harness/postgres.py``,
needs root and Debian's ``postgresql-15``), one per schema:

  0004        no counts kept (the code before 0005: a renewal run folds nothing)
  0005        the triggers of 0005 append to token_counts and event_counts,
              the run folds them
  hot row     PostgreSQL only, the design 0005 did not take: the same
              triggers updating one counter row per state in place (built
              by this benchmark on a 0004 store)

and the workloads, each timed alone (medians of ``--repeat`` runs, the
schemas alternating):

  renew       N due tokens renewed by one ``Renewer.tick()`` (as
              bench_renew.py): no state changes, so no token trigger fires;
              on PostgreSQL each batch's INSERT of its audit events fires the
              events' statement trigger once (SQLite has none on events)
  expire      N tokens past their renew-until expired by one tick: one
              change of state each, in the renewer's bulk UPDATE
  mint        M ``store.save`` of a new token for a user who has one (a
              mint at login: the old token superseded, the new one stored),
              one after the other
  mint xP     the same M mints by P processes at once (PostgreSQL), released
              together: where one counter row per state makes every mint
              wait for the previous one's commit

Rates are per second; the ratio is 0005 (or hot row) over 0004.  The
harness's PostgreSQL runs without durability (no fsync) unless ``--durable``:
with it each commit waits for the disk, as in production, and so does every
mint queued behind a counter row's lock.

Run as root:   .venv/bin/python bench/bench_count_writes.py        (N = 100,000, M = 3,000)
Quick check:   .venv/bin/python bench/bench_count_writes.py --quick
Options: --n, --mints, --procs, --repeat, --backends sqlite,postgresql, --durable
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_renew  # noqa: E402
from bench_renew import DAY, NOW, Backends, dt, renewer_for, token_rows  # noqa: E402
from sqlalchemy import insert, text, update  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

import repository.renewal_store  # noqa: E402
import repository.store  # noqa: E402
from repository.counts import compact, event_counts, recount_events, recount_tokens, token_counts  # noqa: E402
from repository.migrate import HEAD, migrate  # noqa: E402
from repository.models import TokenRow  # noqa: E402
from repository.store import SqlTokenStore, make_engine  # noqa: E402
from tests.integration.harness.postgres import PostgresServer  # noqa: E402
from tokenlife.records import TokenRecord  # noqa: E402

BASELINE = "0004"
HOT = "hot row"

# The design 0005 did not take: one row per state, updated in place.
_HOT_DDL = (
    "CREATE TABLE hot_counts (state varchar(16) PRIMARY KEY, n bigint NOT NULL)",
    "INSERT INTO hot_counts VALUES ('active', 0), ('expired', 0), ('revoked', 0)",
    "UPDATE hot_counts h SET n = c.n FROM "
    "(SELECT state, count(*) AS n FROM tokens GROUP BY state) c WHERE h.state = c.state",
    """CREATE FUNCTION hot_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE hot_counts SET n = n - 1 WHERE state = OLD.state;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        UPDATE hot_counts SET n = n + 1 WHERE state = NEW.state;
    END IF;
    RETURN NULL;
END
$$""",
    "CREATE TRIGGER hot_insert AFTER INSERT ON tokens FOR EACH ROW EXECUTE FUNCTION hot_count()",
    "CREATE TRIGGER hot_update AFTER UPDATE OF state ON tokens FOR EACH ROW "
    "WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION hot_count()",
    "CREATE TRIGGER hot_delete AFTER DELETE ON tokens FOR EACH ROW EXECUTE FUNCTION hot_count()",
)


def _no_fold(_store: object, _now: int) -> int:
    return 0


@contextlib.contextmanager
def code_for(schema: str) -> Iterator[None]:
    """Below 0005 the code folds nothing (there is no token_counts to fold)."""
    if schema == HEAD:
        yield
        return
    saved = repository.renewal_store.compact, repository.store.compact
    repository.renewal_store.compact = repository.store.compact = _no_fold
    try:
        yield
    finally:
        repository.renewal_store.compact, repository.store.compact = saved


def store_at(url: str, schema: str, setup: bool = True) -> SqlTokenStore:
    """A store at ``schema`` (``setup``: a new one, built), opened without
    upgrading it (as the code of its time)."""
    store = SqlTokenStore(url)
    if schema == HEAD:
        store._open()
        return store
    store.engine = make_engine(url)
    if setup:
        migrate(store.engine, BASELINE)
    if setup and schema == HOT:
        with store.engine.begin() as conn:
            for statement in _HOT_DDL:
                conn.exec_driver_sql(statement)
    store._sessions = sessionmaker(store.engine, expire_on_commit=False)
    return store


def seed(store: SqlTokenStore, schema: str, count: int, past_limit: bool = False) -> None:
    """bench_renew's due rows (one active token per user), then what autovacuum
    would do; ``past_limit``: all past their renew-until (a tick expires them)."""
    bench_renew.seed(store.engine, 0, count, True, count)
    if past_limit:
        gone = dt(NOW - 60)
        with store.engine.begin() as conn:
            conn.execute(update(TokenRow).values(exp=gone, renew_until=gone, next_check=gone))
    if schema == HEAD:
        compact(store, NOW)
    vacuum(store)


def vacuum(store: SqlTokenStore) -> None:
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
        else:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()


# -- workloads: each returns (operations, seconds) ------------------------------------------


def tick(url: str, schema: str, n: int, expire: bool) -> tuple[int, float]:
    store = store_at(url, schema)
    try:
        with code_for(schema):
            seed(store, schema, n, past_limit=expire)
            renewer = renewer_for(store)
            start = time.perf_counter()
            summary = renewer.tick()
            seconds = time.perf_counter() - start
        done = summary.expired if expire else summary.renewed
        if done != n:
            raise SystemExit(f"{schema}: {summary.line()}, expected {n}")
        check(store, schema)
        return n, seconds
    finally:
        store.close()


def new_token(i: int, serial: int) -> TokenRecord:
    row = next(token_rows(i, 1, due=False, total=1))
    iat = NOW + serial
    return TokenRecord(
        f"{serial:016x}{i:016x}",
        row["user"],
        row["uid"],
        row["gid"],
        iat,
        iat,
        iat + DAY,
        iat + 7 * DAY,
        DAY,
        "k",
        token="a.b.c",
    )


def mint_some(url: str, schema: str, users: range, serial0: int) -> None:
    store = store_at(url, schema, setup=False)
    try:
        with code_for(schema):
            for k, i in enumerate(users):
                store.save(new_token(i, serial0 + k), "minted", "bench")
    finally:
        store.close()


def _minter(url: str, schema: str, users: range, serial0: int, barrier: Any) -> None:
    store = store_at(url, schema, setup=False)  # connected before the barrier
    try:
        store.current("u0000000")
        barrier.wait()
        with code_for(schema):
            for k, i in enumerate(users):
                store.save(new_token(i, serial0 + k), "minted", "bench")
    finally:
        store.close()


def mints(url: str, schema: str, m: int, procs: int) -> tuple[int, float]:
    store = store_at(url, schema)
    try:
        with store.engine.begin() as conn:
            rows = token_rows(0, m, due=False, total=m)  # ids from the sequence:
            conn.execute(
                insert(TokenRow), [{k: v for k, v in r.items() if k != "id"} for r in rows]
            )
        if schema == HEAD:
            compact(store, NOW)
        vacuum(store)
        if procs == 1:
            store.current("u0000000")  # connected
            start = time.perf_counter()
            mint_some(url, schema, range(m), m)
            seconds = time.perf_counter() - start
        else:
            ctx = multiprocessing.get_context("fork")
            barrier = ctx.Barrier(procs + 1)
            share = m // procs
            workers = [
                ctx.Process(
                    target=_minter,
                    args=(url, schema, range(p * share, (p + 1) * share), m + p * share, barrier),
                )
                for p in range(procs)
            ]
            for w in workers:
                w.start()
            barrier.wait()
            start = time.perf_counter()
            for w in workers:
                w.join()
            seconds = time.perf_counter() - start
            if any(w.exitcode for w in workers):
                raise SystemExit(f"{schema}: a minter failed")
            m = share * procs
        check(store, schema)
        return m, seconds
    finally:
        store.close()


def check(store: SqlTokenStore, schema: str) -> None:
    """The counts kept agree with a recount (0005 and the hot row)."""
    with store.transaction(read_only=True) as s:
        counted = recount_tokens(s)
        if schema == HEAD:
            kept = token_counts(s)
            since = NOW - DAY
            if event_counts(s, since) != recount_events(s, since):
                raise SystemExit(f"{schema}: event counts != recount")
        elif schema == HOT:
            kept = {k: int(v) for k, v in s.execute(text("SELECT state, n FROM hot_counts"))}
        else:
            return
    if kept != counted:
        raise SystemExit(f"{schema}: counts {kept} != recount {counted}")


# -- driving ---------------------------------------------------------------------------------


def rate(backends: Backends, backend: str, schema: str, run: Callable[[str], tuple[int, float]]):
    url = backends.fresh(backend)
    try:
        ops, seconds = run(url)
    finally:
        backends.drop(url)
    return ops / seconds


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="tokens renewed, expired")
    parser.add_argument("--mints", type=int, default=3_000, help="mints per run")
    parser.add_argument("--procs", type=int, default=8, help="minting processes at once")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="N = 10,000, M = 1,000, 1 run")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--durable", action="store_true", help="PostgreSQL with fsync")
    args = parser.parse_args()
    if args.quick:
        args.n, args.mints, args.repeat = 10_000, 1_000, 1
    names = args.backends.split(",")
    if args.durable and "postgresql" in names:
        on = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
        original = PostgresServer.__init__

        def durable(self: PostgresServer, *a: Any, **kw: Any) -> None:
            original(self, *a, settings=on, **kw)

        PostgresServer.__init__ = durable  # type: ignore[method-assign]
    backends = Backends(names)
    print(
        f"token counts, write cost: N = {args.n:,}, M = {args.mints:,} mints, "
        f"{args.procs} minting processes, {args.repeat} runs, {os.cpu_count()} CPUs, "
        f"PostgreSQL durability {'on' if args.durable else 'off'}, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    rows = []
    try:
        for backend in names:
            schemas = [BASELINE, HEAD] + ([HOT] if backend == "postgresql" else [])
            work: list[tuple[str, Callable[[str, str], tuple[int, float]]]] = [
                ("renew", lambda u, s: tick(u, s, args.n, expire=False)),
                ("expire", lambda u, s: tick(u, s, args.n, expire=True)),
                ("mint", lambda u, s: mints(u, s, args.mints, 1)),
            ]
            if backend == "postgresql":
                work.append(
                    (f"mint x{args.procs}", lambda u, s: mints(u, s, args.mints, args.procs))
                )
            for name, run in work:
                samples: dict[str, list[float]] = {s: [] for s in schemas}
                for _ in range(args.repeat):
                    for schema in schemas:
                        print(
                            f"  {backend} {name} {schema} ...", end="", flush=True, file=sys.stderr
                        )
                        r = rate(backends, backend, schema, lambda u, s=schema, w=run: w(u, s))
                        print(f" {r:,.0f}/s", file=sys.stderr)
                        samples[schema].append(r)
                base = statistics.median(samples[BASELINE])
                cells = [backend, name, f"{base:,.0f}/s"]
                for schema in schemas[1:]:
                    med = statistics.median(samples[schema])
                    cells += [f"{med:,.0f}/s", f"{med / base:.2f}x"]
                rows.append(cells + [""] * (7 - len(cells)))
    finally:
        backends.close()
    print()
    header = ["backend", "workload", BASELINE, HEAD, "ratio", HOT, "ratio"]
    print(f"operations per second, median of {args.repeat} (ratio: over {BASELINE})")
    print(table(header, rows))


if __name__ == "__main__":
    main()
