"""The store under a thundering herd of renewals after the token host was down for a day.

The token host (the only renewer) comes back after 24 hours down: every token
of the store is due at once.  What is measured, on a fresh SQLite file and a
fresh database on a throwaway PostgreSQL 15 (``tests/integration/harness/
postgres.py``: needs root and Debian's ``postgresql-15``; loopback and a unix
socket only):

  herd      the first tick after the restart (``Renewer.tick()``, the call the
            daemon's scheduler makes) on N tokens (synthetic users injected
            with ``users=``, as bench/bench_renew.py does): the time to clear
            the herd, tokens per second, the longest write transaction of the
            tick (from its BEGIN to its COMMIT: on SQLite, the longest a mint
            can wait for the write lock if the lock is handed over fairly) and
            the machine's 1-minute load average before and after.  SQLite and
            PostgreSQL with one renewer; PostgreSQL with two replica processes
            ticking at once.
  logins    a stream of logins while the herd runs, by default in the
            renewer's own process, on the same store object, as ``tokenlife
            serve`` runs its mint service beside its tick (``--logins-in
            process``: in a process of their own, as a ``tokenlife mint`` run
            by hand during the herd would; on SQLite such a writer sleeps in
            SQLite's busy handler between tries and loses most of them to the
            tick's next batch); each one mints a token for a fresh synthetic user through the real
            ``producer.mint.Minter`` (as the mint service does for PAM: one
            mint at a time, ``reuse=True``) against the same store, at a fixed
            rate (``--rate``, 20 a second).  Latency is counted from the
            login's scheduled time, so a login queued behind a slow one pays
            for it.  Its p50, p99 and max during the herd, next to the same
            stream against the same store, idle, just before (the baseline).
  checks    nothing lost, exactly once, no failure, read back from the store
            (tokens and events tables): every renewable token renewed exactly
            once (one 'renewed' event, version + 1, the policy's exp), every
            token past renew-until expired and not renewed, the tick summaries
            with failed 0, every login's mint succeeded and its token stored,
            and a second tick finds nothing left to do.  Any failed check
            makes the bench exit 1.
  order     what the tick renewed first (it claims due tokens ordered by
            next_check, repository/renewal_store.py), from the order of the
            audit events: tokens whose exp had already passed should all come
            before those still valid.

The store is laid out as the outage leaves it (Core bulk insert, not through
the Renewer; counts folded and statistics gathered as the daemon and
autovacuum would have): lifetime 2 days, renew-until 7 days after the first
issue, the default renewal window (the last 12 hours).  Every token's
next_check is in the last 24 hours, spread evenly; 1 in 20 (5%) reached its
renew-until during the outage (its last renewal was capped there: it must end
expired, not renewed).  The others are renewable: as their next_check is
exp - 12 h, those due more than 12 hours ago (about half) have already expired
and must be renewed all the same (repository/policy.py); chains are 0 to 3
renewals old, so a quarter of the renewals are capped at renew-until.

Run as root:   .venv/bin/python bench/bench_renew_herd.py           (N = 100,000, 2 runs)
Quick check:   .venv/bin/python bench/bench_renew_herd.py --quick   (N = 10,000, 1 run)
Options: --n, --repeat, --rate, --baseline SECONDS, --backends sqlite,postgresql,
         --logins-in daemon|process
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import secrets
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_renew import (  # noqa: E402
    SAMPLE_TOKEN,
    Backends,
    open_store,
    settle,
    synthetic_user,
    table,
    user_name,
)
from sqlalchemy import event, insert, select  # noqa: E402
from sqlalchemy.engine import Connection, Engine  # noqa: E402

from producer.keys import HS256Key  # noqa: E402
from producer.mint import Minter  # noqa: E402
from repository.counts import compact  # noqa: E402
from repository.models import EventRow, TokenRow  # noqa: E402
from repository.policy import Policy  # noqa: E402
from repository.renewal_store import BATCH  # noqa: E402
from repository.renewer import Renewer, Summary  # noqa: E402
from repository.rows import to_dt  # noqa: E402
from repository.store import SqlTokenStore  # noqa: E402
from tokenlife.config import Config  # noqa: E402
from tokenlife.testing.fakes import FakeClock  # noqa: E402

HOUR = 3600
OUTAGE = 24 * HOUR  # how long the token host was down
LIFETIME = Config().token.lifetime  # 2 days
RENEW_FOR = Config().token.renew_until  # 7 days from the first issue
WINDOW = Policy.from_config(Config().token).margin(LIFETIME)  # 12 h: next_check = exp - WINDOW
CHAIN_STEP = LIFETIME - WINDOW  # 36 h between the renewals of a chain
PAST_EVERY = 20  # 1 token in 20 reached its renew-until during the outage
SEED_CHUNK = 20_000
LEAD_IN = 1.0  # seconds of logins before the herd starts (not counted in its latency)

RENEWED, EXPIRED_AT_RESTART, PAST = "renewed", "expired", "past"


class HerdKey:
    """The signing key of every process of a run (passed to them, not regenerated)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def load(self) -> HS256Key:
        return HS256Key(self.secret)

    def describe(self) -> str:
        return "benchmark key"


# -- the store the outage leaves ------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """One seeded token, as the bench expects the herd to leave it."""

    k: int
    exp: int  # before the herd
    renew_until: int
    next_check: int

    def kind(self, now: int) -> str:
        """PAST (must expire), EXPIRED_AT_RESTART or RENEWED (both must be renewed)."""
        if now >= self.renew_until:
            return PAST
        return EXPIRED_AT_RESTART if self.exp <= now else RENEWED

    def new_exp(self, now: int) -> int:
        return min(now + LIFETIME, self.renew_until)


def token(k: int, n: int, now: int) -> tuple[Token, int, int]:
    """Token ``k`` of ``n``: (its times, iat, first_issued); next_check in the last 24 h."""
    next_check = now - OUTAGE + 1 + k * (OUTAGE - 1) // n
    if k % PAST_EVERY == PAST_EVERY - 1:
        # Its last renewal was capped at renew-until, which passed during the outage.
        renew_until = exp = next_check
        iat = exp - CHAIN_STEP
        first = renew_until - RENEW_FOR
    else:
        exp = next_check + WINDOW
        iat = exp - LIFETIME
        first = iat - (k % 4) * CHAIN_STEP  # a chain 0 to 3 renewals old
        renew_until = first + RENEW_FOR
    return Token(k, exp, renew_until, next_check), iat, first


def layout(n: int, now: int) -> list[Token]:
    return [token(k, n, now)[0] for k in range(n)]


def token_id(k: int, salt: str) -> str:
    """32 characters: seeded tokens are told from minted ones (16) by length."""
    return f"{k:016x}{salt}"


def rows(n: int, now: int, salt: str) -> Iterator[dict[str, Any]]:
    for k in range(n):
        t, iat, first = token(k, n, now)
        uid = synthetic_user(user_name(k)).uid
        yield {  # no id: the table's own sequence numbers them, in this order
            "token_id": token_id(k, salt),
            "user": user_name(k),
            "uid": uid,
            "gid": uid,
            "first_issued": to_dt(first),
            "iat": to_dt(iat),
            "exp": to_dt(t.exp),
            "renew_until": to_dt(t.renew_until),
            "lifetime": LIFETIME,
            "key_id": "sha256:before-the-outage",
            "version": 1,
            "state": "active",
            "token": SAMPLE_TOKEN,
            "next_check": to_dt(t.next_check),
            "attempts": 0,
            "last_error": "",
        }


def seed(store: SqlTokenStore, n: int, now: int, salt: str) -> None:
    """Core bulk insert in chunks; then what the daemon and autovacuum would have done."""
    engine = store.engine
    source = rows(n, now, salt)
    while chunk := [row for _, row in zip(range(SEED_CHUNK), source, strict=False)]:
        with engine.begin() as conn:
            conn.execute(insert(TokenRow), chunk)
    compact(store, now - OUTAGE)  # the renewer folded the kept counts before it went down
    settle(engine)


# -- the renewer's process -------------------------------------------------------------------


class TxTimer:
    """Each write transaction's BEGIN (after the lock is taken) and COMMIT, monotonic."""

    def __init__(self, engine: Engine) -> None:
        self.spans: list[tuple[float, float]] = []
        self._open: float | None = None
        # After the store's own "begin" listener: on SQLite, BEGIN IMMEDIATE has the lock.
        event.listen(engine, "begin", self._begin)
        event.listen(engine, "commit", self._end)
        event.listen(engine, "rollback", self._end)

    def _begin(self, _conn: Connection) -> None:
        self._open = time.monotonic()

    def _end(self, _conn: Connection) -> None:
        if self._open is not None:
            self.spans.append((self._open, time.monotonic()))
            self._open = None


@dataclass
class TickResult:
    start: float
    end: float
    summary: dict[str, Any]
    spans: list[tuple[float, float]]  # the last one is the fold of the kept counts
    cpu: float


def _renewer(
    url: str,
    secret: bytes,
    now: int,
    ready: Any,
    go: Any,
    results: Any,
    logins: tuple[Any, ...] | None = None,
) -> None:
    """One renewer's tick; ``logins``: _logins' arguments after the secret, to run
    the login stream in a thread of this process, on this store (the daemon's way)."""
    store = open_store(url)
    renewer = Renewer(Config(), HerdKey(secret), store, clock=FakeClock(now), users=synthetic_user)
    timer = TxTimer(store.engine)
    stream = None
    if logins is not None:
        stream = threading.Thread(target=_logins, args=(url, secret, *logins, store))
        stream.start()
    ready.put(os.getpid())
    go.wait()
    start, cpu = time.monotonic(), time.process_time()
    summary: Summary = renewer.tick()
    end, cpu = time.monotonic(), time.process_time() - cpu
    # the logins' mints are this process's too: their share of CPU is not the tick's
    results.put(TickResult(start, end, summary.as_dict(), timer.spans, cpu))
    if stream is not None:
        stream.join()
    store.engine.dispose()


# -- the logins' process ---------------------------------------------------------------------


@dataclass
class Login:
    scheduled: float  # monotonic
    started: float
    done: float
    token_id: str  # "" if the mint failed
    error: str = ""

    @property
    def latency(self) -> float:
        return self.done - self.scheduled


def _logins(
    url: str,
    secret: bytes,
    first: int,
    rate: float,
    commands: Any,
    stop: Any,
    until: Any,
    results: Any,
    shared: SqlTokenStore | None = None,
) -> None:
    """Mint for fresh users at ``rate`` a second from each command until ``stop``
    (every login scheduled up to ``until``, a monotonic time, is made); on
    ``shared``, the renewer's store, or a store of its own."""
    store = shared or open_store(url)
    minter = Minter(Config(), HerdKey(secret), store)
    next_user = first

    def login(scheduled: float) -> Login:
        nonlocal next_user
        info = synthetic_user(user_name(next_user))
        next_user += 1
        started = time.monotonic()
        try:
            # What the mint service does for PAM: one mint at a time, reuse if good.
            record, _ = minter.mint(info, 0, reuse=True, actor="pam", write_login=False)
        except Exception as exc:  # a failure is counted; never the token
            first_line = (str(exc).splitlines() or [""])[0][:200]
            return Login(
                scheduled, started, time.monotonic(), "", f"{type(exc).__name__}: {first_line}"
            )
        return Login(scheduled, started, time.monotonic(), record.token_id)

    warm = login(time.monotonic())  # connections, key, first statements: not timed
    results.put([warm])
    while commands.get() is not None:
        out: list[Login] = []
        begin = time.monotonic()
        i = 0
        while True:
            scheduled = begin + i / rate
            delay = scheduled - time.monotonic()
            # Logins scheduled before the stop are all made, a backlog too:
            # the slowest ones are those still queued when the herd ends.
            if (delay <= 0 or stop.wait(delay)) and stop.is_set() and scheduled > until.value:
                break
            out.append(login(scheduled))
            i += 1
        results.put(out)
    if shared is None:
        store.engine.dispose()


# -- one herd --------------------------------------------------------------------------------


@dataclass
class Order:
    renewed: int = 0
    expired_first: int = 0  # renewals of tokens already expired at the restart
    valid_before: int = 0  # still-valid tokens renewed before the last already-expired one
    descents: int = 0  # consecutive renewals where the old exp goes down
    first_exp: float = 0.0  # hours from the restart to the old exp of the first renewed
    last_exp: float = 0.0
    last_expired_at: float = 0.0  # seconds into the herd: the batch of the last expired one


@dataclass
class Herd:
    run: int
    backend: str
    renewers: int
    n: int
    kinds: Counter[str]
    clear: float = 0.0
    split: list[int] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    batch_txn: float = 0.0
    fold_txn: float = 0.0
    txns: int = 0
    cpu: list[float] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)
    idle: list[Login] = field(default_factory=list)
    during: list[Login] = field(default_factory=list)
    logins: list[Login] = field(default_factory=list)  # all of them, warm-up and lead-in too
    order: Order = field(default_factory=Order)
    checks: dict[str, tuple[str, bool]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(good for _, good in self.checks.values())


def run_herd(
    backends: Backends, backend: str, renewers: int, n: int, run: int, args: argparse.Namespace
) -> Herd:
    url = backends.fresh(backend)
    store = open_store(url)
    now = int(time.time()) - 1  # the restart; every login mints after it
    salt = secrets.token_hex(8)
    secret = secrets.token_bytes(32)
    seed(store, n, now, salt)
    tokens = layout(n, now)
    herd = Herd(run, backend, renewers, n, Counter(t.kind(now) for t in tokens))

    ctx = multiprocessing.get_context("spawn")
    ready, go, ticks = ctx.Queue(), ctx.Event(), ctx.Queue()
    commands, stop, logins = ctx.Queue(), ctx.Event(), ctx.Queue()
    until = ctx.Value("d", 0.0)
    first_user = n  # the seeded users are 0 .. n-1: every login is a first login
    login_args = (first_user, args.rate, commands, stop, until, logins)
    in_daemon = args.logins_in == "daemon"
    procs = [
        ctx.Process(
            target=_renewer,
            args=(url, secret, now, ready, go, ticks, login_args if in_daemon and i == 0 else None),
        )
        for i in range(renewers)
    ]
    if not in_daemon:
        procs.append(ctx.Process(target=_logins, args=(url, secret, *login_args)))
    try:
        for proc in procs:
            proc.start()
        for _ in range(renewers):
            ready.get(timeout=120)
        herd.logins += logins.get(timeout=120)  # the warm-up login
        load_before = os.getloadavg()[0]

        # The baseline: the same stream against the same store, idle.
        commands.put("idle")
        time.sleep(args.baseline)
        until.value = time.monotonic()
        stop.set()
        herd.idle = logins.get(timeout=120)
        stop.clear()

        # The herd, with the logins going on.
        commands.put("herd")
        time.sleep(LEAD_IN)
        started = time.monotonic()
        go.set()
        results: list[TickResult] = [ticks.get(timeout=3600) for _ in range(renewers)]
        ended = max(r.end for r in results)
        until.value = ended
        stop.set()
        stream: list[Login] = logins.get(timeout=120)
        load_after = os.getloadavg()[0]
        commands.put(None)
        for proc in procs:
            proc.join(timeout=120)
        if any(proc.exitcode != 0 for proc in procs):
            raise SystemExit(f"a process failed: exit codes {[p.exitcode for p in procs]}")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()

    herd.logins += herd.idle + stream
    herd.during = [x for x in stream if started <= x.scheduled <= ended]
    herd.clear = ended - started
    herd.load = (load_before, load_after)
    herd.summaries = [r.summary for r in results]
    herd.split = [r.summary["renewed"] + r.summary["expired"] for r in results]
    herd.cpu = [r.cpu for r in results]
    batches = [span for r in results for span in r.spans[:-1]]
    herd.batch_txn = max((b - a for a, b in batches), default=0.0)
    herd.fold_txn = max(r.spans[-1][1] - r.spans[-1][0] for r in results if r.spans)
    herd.txns = sum(len(r.spans) for r in results)
    commits = sorted(b for _, b in batches)

    verify(store, herd, tokens, now, salt, commits, started, HerdKey(secret))
    store.engine.dispose()
    backends.drop(url)
    return herd


# -- checks ----------------------------------------------------------------------------------


def verify(
    store: SqlTokenStore,
    herd: Herd,
    tokens: list[Token],
    now: int,
    salt: str,
    commits: list[float],
    started: float,
    key: HerdKey,
) -> None:
    """Read the store back: counts per kind of token, events, the logins' tokens."""
    with store.engine.connect() as conn:
        stored = {
            tid: (state, version, int(exp.timestamp()), int(iat.timestamp()))
            for tid, state, version, exp, iat in conn.execute(
                select(
                    TokenRow.token_id, TokenRow.state, TokenRow.version, TokenRow.exp, TokenRow.iat
                )
            )
        }
        events = conn.execute(
            select(EventRow.event, EventRow.token_id, EventRow.version).order_by(EventRow.id)
        ).all()
    per_token: dict[str, Counter[str]] = {}
    sequence: list[tuple[int, str]] = []  # (k, event) of the tick's events, in id order
    for name, tid, _version in events:
        per_token.setdefault(tid or "", Counter())[name] += 1
        if tid and len(tid) == 32 and name in ("renewed", "expired"):
            sequence.append((int(tid[:16], 16), name))

    renewable = [t for t in tokens if t.kind(now) != PAST]
    past = [t for t in tokens if t.kind(now) == PAST]
    once = exact = 0
    for t in renewable:
        tid = token_id(t.k, salt)
        counted = per_token.get(tid, Counter())
        once += counted["renewed"] == 1 and counted["expired"] == 0 and counted["failed"] == 0
        state, version, exp, iat = stored[tid]
        exact += state == "active" and version == 2 and exp == t.new_exp(now) and iat == now
    gone = 0
    for t in past:
        tid = token_id(t.k, salt)
        counted = per_token.get(tid, Counter())
        state, version, _, _ = stored[tid]
        gone += (
            state == "expired"
            and version == 1
            and counted["renewed"] == 0
            and counted["expired"] == 1
        )
    renewed_events = sum(1 for k, name in sequence if name == "renewed")
    herd.checks["renewed once"] = (
        f"{once:,}/{len(renewable):,} ({renewed_events:,} events)",
        once == len(renewable) and renewed_events == len(renewable),
    )
    herd.checks["v+1, exp, iat"] = (f"{exact:,}/{len(renewable):,}", exact == len(renewable))
    herd.checks["past: expired"] = (f"{gone:,}/{len(past):,}", gone == len(past))
    total = Counter[str]()
    for summary in herd.summaries:
        total.update({k: v for k, v in summary.items() if isinstance(v, int)})
    herd.checks["summaries"] = (
        f"r {total['renewed']:,} e {total['expired']:,} f {total['failed']}",
        total["renewed"] == len(renewable)
        and total["expired"] == len(past)
        and total["failed"] == 0
        and total["waiting"] == 0,
    )
    minted = [x for x in herd.logins if x.token_id]
    kept = sum(
        1
        for x in minted
        if stored.get(x.token_id, ("", 0, 0, 0))[:2] == ("active", 1)
        and per_token.get(x.token_id, Counter())["minted"] == 1
    )
    herd.checks["logins stored"] = (
        f"{kept:,}/{len(herd.logins):,}",
        kept == len(herd.logins) and len(minted) == len(herd.logins),
    )
    # A second tick at the same time: nothing left due, nothing done twice.
    again = Renewer(Config(), key, store, clock=FakeClock(now), users=synthetic_user).tick()
    herd.checks["tick again"] = (
        "nothing" if again.as_dict() == Summary().as_dict() else again.line(),
        again.as_dict() == Summary().as_dict(),
    )
    herd.order = order_of_work(sequence, tokens, now, commits, started)
    if herd.renewers == 1:  # replicas interleave their batches: reported, not checked
        herd.checks["expired first"] = (
            f"{herd.order.valid_before:,} valid before",
            herd.order.valid_before == 0 and herd.order.descents == 0,
        )


def order_of_work(
    sequence: list[tuple[int, str]],
    tokens: list[Token],
    now: int,
    commits: list[float],
    started: float,
) -> Order:
    """What came first, from the order of the tick's audit events (their ids)."""
    order = Order()
    renewed = [(pos, tokens[k]) for pos, (k, name) in enumerate(sequence) if name == "renewed"]
    if not renewed:
        return order
    kinds = [t.kind(now) for _, t in renewed]
    order.renewed = len(renewed)
    order.expired_first = kinds.count(EXPIRED_AT_RESTART)
    last = max((i for i, kind in enumerate(kinds) if kind == EXPIRED_AT_RESTART), default=-1)
    order.valid_before = sum(1 for kind in kinds[:last] if kind == RENEWED)
    order.descents = sum(1 for (_, a), (_, b) in pairwise(renewed) if b.exp < a.exp)
    order.first_exp = (renewed[0][1].exp - now) / HOUR
    order.last_exp = (renewed[-1][1].exp - now) / HOUR
    if last >= 0 and commits:
        batch = min(renewed[last][0] // BATCH, len(commits) - 1)  # one event per claimed row
        order.last_expired_at = commits[batch] - started
    return order


# -- output ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    ranked = sorted(values)
    return ranked[max(0, math.ceil(q * len(ranked)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}" if seconds >= 0.1 else f"{seconds * 1000:.1f}"


def latency_cells(sample: list[Login]) -> list[str]:
    lat = [x.latency for x in sample if x.token_id]
    failed = sum(1 for x in sample if not x.token_id)
    if not lat:
        return [f"{len(sample)}", "-", "-", "-", f"{failed}"]
    return [
        f"{len(sample)}",
        ms(statistics.median(lat)),
        ms(percentile(lat, 0.99)),
        ms(max(lat)),
        f"{failed}",
    ]


def label(h: Herd) -> list[str]:
    return [str(h.run), h.backend, str(h.renewers)]


def report(herds: list[Herd], rate: float, logins_in: str = "daemon") -> None:
    print()
    print("herd: the first tick after 24 h down, all N due at once")
    print("(txn: BEGIN to COMMIT of the tick's write transactions, batches of 1,000 and the")
    print(" fold of the kept counts; load: 1-minute load average before and after)")
    header = ["run", "backend", "renewers", "due", "already expired", "past r-u"]
    header += ["clear", "tokens/s", "split", "batch txn max", "fold txn", "txns", "cpu", "load"]
    body = []
    for h in herds:
        body.append(
            [
                *label(h),
                f"{h.n:,}",
                f"{h.kinds[EXPIRED_AT_RESTART]:,}",
                f"{h.kinds[PAST]:,}",
                f"{h.clear:.2f} s",
                f"{h.n / h.clear:,.0f}/s",
                "/".join(f"{s:,}" for s in h.split),
                f"{h.batch_txn * 1000:,.0f} ms",
                f"{h.fold_txn * 1000:,.0f} ms",
                str(h.txns),
                "+".join(f"{c:.1f}" for c in h.cpu) + " s",
                f"{h.load[0]:.2f} -> {h.load[1]:.2f}",
            ]
        )
    print(table(header, body))

    print()
    print(f"logins: mint latency (ms) at {rate:g}/s from the scheduled time, through")
    where = "the renewer's process" if logins_in == "daemon" else "a process of their own"
    print(f"producer.mint.Minter in {where}; idle: the same stream just before;")
    print("longest mint: one Minter.mint call itself, without its wait in the queue")
    header = ["run", "backend", "renewers", "idle n", "p50", "p99", "max", "failed"]
    header += ["herd n", "p50", "p99", "max", "failed", "max/idle p99", "longest mint"]
    body = []
    for h in herds:
        idle, during = latency_cells(h.idle), latency_cells(h.during)
        worst = [x.latency for x in h.during if x.token_id]
        base = [x.latency for x in h.idle if x.token_id]
        ratio = f"{max(worst) / percentile(base, 0.99):.1f}x" if worst and base else "-"
        own = max((x.done - x.started for x in h.during), default=0.0)
        body.append([*label(h), *idle, *during, ratio, ms(own)])
    print(table(header, body))

    print()
    print("order: what the tick renewed first (audit event order); already expired: exp")
    print("passed before the restart; valid before: still-valid tokens renewed before the")
    print("last already-expired one; descents: consecutive renewals whose old exp goes down")
    header = ["run", "backend", "renewers", "renewed", "already expired", "valid before"]
    header += ["descents", "first old exp", "last old exp", "last expired done"]
    body = []
    for h in herds:
        o = h.order
        approx = "~" if h.renewers > 1 else ""
        body.append(
            [
                *label(h),
                f"{o.renewed:,}",
                f"{o.expired_first:,}",
                f"{o.valid_before:,}",
                f"{o.descents:,}",
                f"{o.first_exp:+.1f} h",
                f"{o.last_exp:+.1f} h",
                f"{approx}{o.last_expired_at:.2f} s of {h.clear:.2f} s",
            ]
        )
    print(table(header, body))

    print()
    print("checks: read back from the tokens and events tables")
    names = list(dict.fromkeys(name for h in herds for name in h.checks))
    header = ["run", "backend", "renewers", *names, "result"]
    body = []
    for h in herds:
        cells = [
            (h.checks[name][0] + ("" if h.checks[name][1] else " FAILED"))
            if name in h.checks
            else "-"
            for name in names
        ]
        body.append([*label(h), *cells, "ok" if h.ok else "FAILED"])
    print(table(header, body))
    errors = sorted({x.error for h in herds for x in h.logins if x.error})
    for error in errors[:5]:
        print(f"  login failure: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="tokens in the store, all due")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each herd")
    parser.add_argument("--rate", type=float, default=20.0, help="logins a second")
    parser.add_argument("--baseline", type=float, default=10.0, help="seconds of idle logins")
    parser.add_argument("--quick", action="store_true", help="N = 10,000, 1 run, 5 s baseline")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument(
        "--logins-in",
        choices=("daemon", "process"),
        default="daemon",
        help="logins in the (first) renewer's process, as tokenlife serve mints, "
        "or in a process of their own",
    )
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeat, args.baseline = 10_000, 1, 5.0
    names = args.backends.split(",")
    plan = [(b, 1) for b in names] + ([("postgresql", 2)] if "postgresql" in names else [])

    backends = Backends(names)
    herds: list[Herd] = []
    try:
        print(
            f"tokenlife renewal herd benchmark: N = {args.n:,} due at once after {OUTAGE // HOUR} h"
            f" down, logins at {args.rate:g}/s in the {args.logins_in}'s process,"
            f" {args.repeat} run(s), {os.cpu_count()} CPUs,"
            f" load average {os.getloadavg()[0]:.2f} at start",
            flush=True,
        )
        for run in range(1, args.repeat + 1):
            for backend, renewers in plan:
                what = f"run {run}, {backend}, {renewers} renewer(s)"
                print(f"  {what} ...", end="", flush=True, file=sys.stderr)
                begin = time.perf_counter()
                herd = run_herd(backends, backend, renewers, args.n, run, args)
                herds.append(herd)
                print(
                    f" {time.perf_counter() - begin:.1f} s (herd {herd.clear:.2f} s)",
                    file=sys.stderr,
                )
    finally:
        backends.close()
    report(herds, args.rate, args.logins_in)
    failed = [h for h in herds if not h.ok]
    if failed:
        print(f"\nFAILED: {len(failed)} of {len(herds)} herds failed a check")
        sys.exit(1)
    print(f"\nall checks passed ({len(herds)} herds)")


if __name__ == "__main__":
    main()
