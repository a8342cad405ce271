"""Prometheus metrics of ``tokenlife serve`` (``[serve] metrics = "ADDRESS:PORT"``).

Four kinds of figures, one collector, its own registry (never the global one):

* the store's state, read on a scrape from ``repository.status.snapshot``
  (SQL aggregates only) and kept for ``ttl`` seconds, or five times as long
  as reading it took if that is longer, never past the end of a tick: a
  burst of scrapes costs one read, a big store is read at most a fifth of
  the time; when the store cannot be read, ``tokenlife_store_up`` is 0 and
  the store's figures are left out (a scrape never fails);
* the store's audit events, counted as they are committed, by any writer,
  since this daemon started (``EventTally``);
* what this daemon did, counted after each tick (``TickStats``: renewals,
  deliveries, the service accounts' tokens and files), its build
  (``tokenlife_build_info``) and its process (``process_*``);
* with ``[pull] listen`` set, the pull service's requests by result since the
  daemon started (``tokenlife_pull_requests_total``, every result at 0 from
  the start) and whether it serves (``tokenlife_pull_up``).

Counters start at 0 when the daemon starts (Prometheus' ``increase()`` and
``rate()`` take a restart for a reset) and survive a reload.

No label or value ever holds a token, a key or a command line.  The endpoint
is a small threaded WSGI server on a daemon thread; see docs/commands.md
("Metrics") for every metric.  (About 450 lines: one collector, its
counters and the small server that serves it belong together.)
"""

from __future__ import annotations

import ipaddress
import logging
import platform
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tokenlife.errors import TokenlifeError

if TYPE_CHECKING:
    from repository.renewer import Summary
    from repository.services import KeeperSummary
    from repository.status import Snapshot
    from tokenlife.interfaces import Repository
    from transfer.cycle import DeliverySummary
    from transfer.service_delivery import ServiceSummary

log = logging.getLogger("tokenlife.metrics")  # the name operators grep for

#: seconds a store snapshot serves scrapes before the next one is taken
SNAPSHOT_TTL = 2.0
#: the delivery outcomes counted by ``tokenlife_delivery_results_total``
#: (dropped: done, but another replica held the claim by then: not recorded)
RESULTS = ("delivered", "unchanged", "removed", "failed", "dropped")
#: the service accounts' upkeep per tick (``tokenlife_service_tokens_total``):
#: a new token minted, the current one kept, or a mint that failed
SERVICE_TOKEN_RESULTS = ("minted", "kept", "failed")
#: their token files' delivery (``tokenlife_service_file_results_total``)
SERVICE_FILE_RESULTS = ("delivered", "unchanged", "failed")
LAST_TICK = "tokenlife_last_tick_success_timestamp_seconds"
#: the audit trail's kinds: exported at 0 before the first one (``increase()``
#: needs a series to exist before it grows); other kinds appear when they occur
EVENT_KINDS = (
    "minted",
    "renewed",
    "failed",
    "expired",
    "superseded",
    "ignored",
    "rotated",
    "revoked",
    "delivered",
    "removed",
    "purged",
)
#: how long an audit event id that is missing (its transaction not yet
#: committed, or rolled back) keeps being looked for
SETTLE = 900.0


def build_labels() -> dict[str, str]:
    """``tokenlife_build_info``'s labels: the installed package, its interpreter and SQLAlchemy."""
    from importlib.metadata import PackageNotFoundError, version

    import sqlalchemy

    from tokenlife import __version__

    try:
        installed = version("tokenlife")
    except PackageNotFoundError:  # run from a source tree that is not installed
        installed = __version__
    return {
        "version": installed,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "sqlalchemy": sqlalchemy.__version__,
    }


class EventTally:
    """Audit events committed to the store since the first read, by kind (any writer).

    Each read returns the events with an id above ``floor``.  PostgreSQL
    hands ids out at insert and transactions commit in any order, so an id
    below one already seen may still come (its transaction is open) or never
    (it rolled back).  A gap above the floor holds it: the ids counted above
    are remembered, so none is counted twice, and ``settle`` seconds after
    the gap was first seen every id missing then is given up.  SQLite
    commits in id order: its floor just follows.
    """

    def __init__(self, settle: float = SETTLE, clock: Callable[[], float] = time.monotonic):
        self.settle = settle
        self.clock = clock
        self.counts: dict[str, int] = dict.fromkeys(EVENT_KINDS, 0)
        #: every id up to here is counted or given up; None: nothing read yet
        self.floor: int | None = None
        self._top = 0  # the greatest id seen
        self._seen: set[int] = set()  # counted ids above the floor
        self._gap: tuple[float, int] | None = None  # since when ids up to this one are missing

    def update(self, last_id: int, events: Sequence[tuple[int, str]]) -> None:
        """Count ``events`` (id, kind: those above ``floor``); ``last_id``: the newest id."""
        if self.floor is None or last_id < self.floor:
            # The first read counts from the newest event on; ids that went
            # back (every event purged, another store) start over from there.
            self.floor = self._top = last_id
            self._seen.clear()
            self._gap = None
            return
        for event_id, kind in events:
            if event_id > self.floor and event_id not in self._seen:
                self._seen.add(event_id)
                self.counts[kind] = self.counts.get(kind, 0) + 1
                self._top = max(self._top, event_id)
        self._advance()
        now = self.clock()
        if self._gap is not None and self.floor >= self._gap[1]:
            self._gap = None  # filled
        if self._gap is not None and now - self._gap[0] >= self.settle:
            given_up = self._gap[1]  # rolled back (or open for longer than settle)
            self._seen = {i for i in self._seen if i > given_up}
            self.floor = max(self.floor, given_up)
            self._advance()
            self._gap = None
        if self._gap is None and self.floor < self._top:
            self._gap = (now, self._top)

    def _advance(self) -> None:
        assert self.floor is not None
        while self.floor + 1 in self._seen:
            self.floor += 1
            self._seen.discard(self.floor)


@dataclass
class TickStats:
    """What this daemon's ticks did since it started (thread-safe)."""

    interval: int = 0
    renewals: int = 0
    renewal_failures: int = 0
    expired: int = 0
    results: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    service_tokens: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(SERVICE_TOKEN_RESULTS, 0)
    )
    service_files: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(SERVICE_FILE_RESULTS, 0)
    )
    tick_failures: int = 0
    #: delivery cycles whose job source failed (squeue down, slurmctld unreachable)
    job_source_failures: int = 0
    #: 1 if the last cycle's job source answered, 0 if it failed, -1 before any cycle
    job_source_up: int = -1
    #: epoch seconds of the end of the last tick that completed, 0: none yet
    last_success: float = 0.0
    #: how long the last tick took (renewal plus delivery), failed or not
    last_duration: float = 0.0
    #: ticks ended, failed or not (a new one makes the collector's snapshot stale)
    ticks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def renewal(self, summary: Summary) -> None:
        with self.lock:
            self.renewals += summary.renewed
            self.renewal_failures += summary.failed
            self.expired += summary.expired

    def delivery(self, summary: DeliverySummary) -> None:
        with self.lock:
            for name in RESULTS:
                self.results[name] += int(getattr(summary, name))
            self.job_source_up = 0 if summary.jobs_error else 1
            self.job_source_failures += bool(summary.jobs_error)

    def service_upkeep(self, summary: KeeperSummary) -> None:
        with self.lock:
            for name in SERVICE_TOKEN_RESULTS:
                self.service_tokens[name] += int(getattr(summary, name))

    def service_delivery(self, summary: ServiceSummary) -> None:
        with self.lock:
            for name in SERVICE_FILE_RESULTS:
                self.service_files[name] += int(getattr(summary, name))

    def job_source(self, ok: bool) -> None:
        """The job source asked without a delivery cycle (``transport = "none"``)."""
        with self.lock:
            self.job_source_up = 1 if ok else 0
            self.job_source_failures += not ok

    def tick_done(self, ok: bool, duration: float, now: float | None = None) -> None:
        with self.lock:
            self.ticks += 1
            self.last_duration = duration
            if ok:
                self.last_success = time.time() if now is None else now
            else:
                self.tick_failures += 1

    def families(self) -> list[Metric]:
        with self.lock:
            families: list[Metric] = [
                _counter("renewals", "Tokens this daemon renewed.", self.renewals),
                _counter(
                    "renewal_failures",
                    "Renewal attempts that failed (retried with backoff).",
                    self.renewal_failures,
                ),
                _counter(
                    "tokens_expired",
                    "Tokens this daemon marked expired (past renew-until).",
                    self.expired,
                ),
                _counter(
                    "tick_failures",
                    "Ticks that failed as a whole (store or job source down, ...).",
                    self.tick_failures,
                ),
                _counter(
                    "job_source_failures",
                    "Delivery cycles whose job source failed (nothing removed then).",
                    self.job_source_failures,
                ),
            ]
            if self.job_source_up >= 0:
                families.append(
                    GaugeMetricFamily(
                        "tokenlife_job_source_up",
                        "1 if the last delivery cycle's job source answered, else 0.",
                        value=self.job_source_up,
                    )
                )
            families += [
                _by_result(
                    "delivery_results",
                    "Deliveries to nodes by result, per node and user, since the daemon started.",
                    RESULTS,
                    self.results,
                ),
                _by_result(
                    "service_tokens",
                    "Service accounts' tokens per tick by result: a new one minted, the current "
                    "one kept, or a mint that failed; since the daemon started.",
                    SERVICE_TOKEN_RESULTS,
                    self.service_tokens,
                ),
                _by_result(
                    "service_file_results",
                    "Service accounts' token files to their hosts by result, per service and "
                    "host, since the daemon started.",
                    SERVICE_FILE_RESULTS,
                    self.service_files,
                ),
            ]
            families.append(
                GaugeMetricFamily(
                    LAST_TICK,
                    "When the last tick (renewal, then delivery) completed; 0: none yet.",
                    value=self.last_success,
                )
            )
            families.append(
                GaugeMetricFamily(
                    "tokenlife_tick_duration_seconds",
                    "How long the last tick took.",
                    value=self.last_duration,
                )
            )
            families.append(
                GaugeMetricFamily(
                    "tokenlife_tick_interval_seconds",
                    "serve.interval: the time between ticks.",
                    value=self.interval,
                )
            )
            return families


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"tokenlife_{name}", documentation, value=value)


#: (serving, requests by result since the daemon started), or None: no pull service
PullFigures = Callable[[], "tuple[bool, dict[str, int]] | None"]


def _by_result(
    name: str, documentation: str, results: Sequence[str], counts: dict[str, int]
) -> CounterMetricFamily:
    """A counter family with one sample per result (every one, 0 if none yet)."""
    family = CounterMetricFamily(f"tokenlife_{name}", documentation, labels=["result"])
    for result in results:
        family.add_metric([result], counts.get(result, 0))
    return family


def _pull_families(figures: tuple[bool, dict[str, int]] | None) -> list[Metric]:
    if figures is None:
        return []
    from producer.pull import RESULTS as PULL_RESULTS

    serving, counts = figures
    up = GaugeMetricFamily(
        "tokenlife_pull_up",
        "1 if the pull service ([pull] listen) serves, else 0.",
        value=int(serving),
    )
    requests = _by_result(
        "pull_requests",
        "Requests to the pull service by result, since the daemon started.",
        PULL_RESULTS,
        counts,
    )
    return [up, requests]


class Collector:
    """The store's figures (cached snapshot) plus the daemon's ``TickStats``."""

    def __init__(
        self,
        store: Callable[[], Repository],
        stats: TickStats,
        ttl: float = SNAPSHOT_TTL,
        clock: Callable[[], float] = time.time,
        margin: Callable[[int], int] | None = None,
        pull: PullFigures | None = None,
    ) -> None:
        self.store = store  # a getter: a reload swaps the daemon's store
        self.stats = stats
        self.pull = pull
        #: a lifetime's renewal margin (the renewer's policy); default: the default policy
        self.margin = margin or _default_margin
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()  # one snapshot at a time; the others wait for it
        self._taken = float("-inf")  # monotonic time of the cached snapshot
        self._tick = -1  # stats.ticks when it was taken: a tick since changed the store
        self._cost = 0.0  # seconds the last snapshot took
        self._cached: Snapshot | None = None
        self._up = True  # the last snapshot's outcome, to log changes only
        self.events = EventTally()
        self._store_url: object = None  # a reload onto another store restarts the tally
        self.build = build_labels()

    def begin(self) -> None:
        """Count audit events from now on (the daemon's start), if the store answers."""
        from repository.status import last_event_id

        with self._lock:
            try:
                store = self.store()
                last = last_event_id(store)
            except Exception:  # the first scrape says why, and starts the count
                return
            self._store_url = getattr(store, "url", None)
            self.events.update(last, ())

    def snapshot(self) -> Snapshot | None:
        """The cached snapshot, a fresh one, or None if the store cannot be read."""
        from repository.status import snapshot

        with self._lock:
            tick = self.stats.ticks
            keep = max(self.ttl, 5 * self._cost)
            if tick == self._tick and time.monotonic() - self._taken < keep:
                return self._cached
            started = time.monotonic()
            try:
                store = self.store()
                url = getattr(store, "url", None)
                if url != self._store_url:
                    self._store_url, self.events.floor = url, None
                snap = snapshot(
                    store, int(self.clock()), window=False, events_after=self.events.floor
                )
                self.events.update(snap.last_event_id, snap.new_events)
                self._cached = snap
            except Exception as exc:  # a scrape must never fail, whatever broke
                self._cached = None
                if self._up:
                    reason = str(exc) if isinstance(exc, TokenlifeError) else type(exc).__name__
                    log.warning("metrics: cannot read the token store: %s", reason)
            else:
                if not self._up:
                    log.warning("metrics: the token store can be read again")
            self._up = self._cached is not None
            self._taken, self._tick = time.monotonic(), tick
            self._cost = self._taken - started
            return self._cached

    def describe(self) -> Iterator[Metric]:
        """The families without samples (registration must not touch the store)."""
        own = self._own_families(self.stats.families())
        pull = _pull_families((False, {})) if self.pull is not None else []
        for family in (*_store_families(None, self.margin), *own, *pull):
            family.samples = []
            yield family

    def collect(self) -> Iterator[Metric]:
        # The daemon's own figures first: a tick that ends between the two
        # reads then makes the snapshot stale (it is keyed on stats.ticks), so
        # a scrape never shows a finished tick beside the store as it was
        # mid-tick (renewed but not yet delivered).
        ticks = self.stats.families()
        snap = self.snapshot()
        yield from _store_families(snap, self.margin)
        yield from self._own_families(ticks)
        if self.pull is not None:
            yield from _pull_families(self.pull())

    def _own_families(self, ticks: list[Metric]) -> list[Metric]:
        build = GaugeMetricFamily(
            "tokenlife_build_info",
            "tokenlife's version and what runs it; always 1.",
            labels=list(self.build),
        )
        build.add_metric(list(self.build.values()), 1)
        events = CounterMetricFamily(
            "tokenlife_events",
            "Audit events committed to the store by any writer since this daemon started.",
            labels=["event"],
        )
        with self._lock:
            counts = sorted(self.events.counts.items())
        for kind, count in counts:
            events.add_metric([kind], count)
        return [build, events, *ticks]


def _default_margin(lifetime: int) -> int:
    from repository.policy import Policy

    return Policy().margin(lifetime)


def _store_families(snap: Snapshot | None, margin: Callable[[int], int]) -> list[Metric]:
    up = GaugeMetricFamily(
        "tokenlife_store_up", "1 if the token store could be read at the last scrape, else 0."
    )
    up.add_metric([], 0 if snap is None else 1)
    tokens = GaugeMetricFamily("tokenlife_tokens", "Stored tokens by state.", labels=["state"])
    soonest = GaugeMetricFamily(
        "tokenlife_token_soonest_expiry_seconds",
        "Seconds until the soonest-expiring active token expires (negative: already past).",
    )
    renew_until = GaugeMetricFamily(
        "tokenlife_token_soonest_renew_until_seconds",
        "Seconds until the soonest renew-until of an active token (its user must log in again).",
    )
    renewable = GaugeMetricFamily(
        "tokenlife_token_soonest_renewable_expiry_seconds",
        "Seconds until the soonest exp of an active token below its renew-until.",
    )
    renewable_margin = GaugeMetricFamily(
        "tokenlife_token_soonest_renewable_margin_seconds",
        "That token's renewal window: it is due for renewal this long before its exp.",
    )
    last_renewal = GaugeMetricFamily(
        "tokenlife_last_renewal_timestamp_seconds",
        "When a token was last renewed, by any writer (the store's audit trail).",
    )
    deliveries = GaugeMetricFamily(
        "tokenlife_deliveries", "Delivery records by status.", labels=["status"]
    )
    nodes = GaugeMetricFamily(
        "tokenlife_node_deliveries",
        "Pending and failed delivery records per node.",
        labels=["node", "status"],
    )
    families: list[Metric] = [
        up,
        tokens,
        soonest,
        renew_until,
        renewable,
        renewable_margin,
        last_renewal,
        deliveries,
        nodes,
    ]
    if snap is None:
        return families
    for state, count in snap.tokens.items():
        tokens.add_metric([state], count)
    if snap.soonest_exp is not None:
        soonest.add_metric([], snap.soonest_exp.seconds_left)
    if snap.soonest_renew_until is not None:
        renew_until.add_metric([], snap.soonest_renew_until.seconds_left)
    if snap.soonest_renewable is not None:
        renewable.add_metric([], snap.soonest_renewable.seconds_left)
        renewable_margin.add_metric([], margin(snap.soonest_renewable.lifetime))
    if snap.last_renewal is not None:
        last_renewal.add_metric([], snap.last_renewal)
    for status, count in snap.deliveries.items():
        deliveries.add_metric([status], count)
    for node, trouble in sorted(snap.nodes.items()):
        nodes.add_metric([node, "pending"], trouble.pending)
        nodes.add_metric([node, "failed"], trouble.failed)
    return families


# -- the endpoint ---------------------------------------------------------------------------


def split_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` (as config.py checked it) -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def metrics_url(address: str) -> str:
    """Where a local client reaches the endpoint (a wildcard address: via loopback)."""
    host, port = split_address(address)
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    shown = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"http://{shown}:{port}/metrics"


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """No access log: a scrape every 15 s is not news."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """The HTTP endpoint: any path answers with the metrics in the text format."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        host, port = split_address(address)
        server = _Server6 if ipaddress.ip_address(host).version == 6 else _Server
        # OSError (address in use, not on this host) propagates: nothing was started.
        self.httpd = make_server(host, port, make_wsgi_app(registry), server, _Quiet)
        self.url = metrics_url(address)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class Metrics:
    """The daemon's metrics: the stats its ticks update, and the endpoint if enabled."""

    def __init__(
        self,
        store: Callable[[], Repository],
        interval: int,
        margin: Callable[[int], int] | None = None,
        pull: PullFigures | None = None,
    ) -> None:
        self.stats = TickStats(interval=interval)
        self.collector = Collector(store, self.stats, margin=margin, pull=pull)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)  # process_start_time_seconds: restarts
        self.server: MetricsServer | None = None

    def start(self, address: str) -> bool:
        """Serve on ``address`` ("": off).  A failure is logged; the daemon goes on without."""
        if not address:
            return False
        self.collector.begin()
        try:
            self.server = MetricsServer(address, self.registry)
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s: %s; serving without metrics",
                address,
                exc.strerror or exc,
            )
            return False
        log.info("metrics: serving on %s", self.server.url)
        return True

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def read_last_tick(url: str, timeout: float = 2.0) -> float:
    """``tokenlife_last_tick_success_timestamp_seconds`` from a running daemon.

    OSError (urllib's URLError too) if it does not answer, ValueError if the
    answer holds no such metric.  0.0: the daemon has not completed a tick yet.
    """
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    if not url.startswith("http://"):
        raise ValueError(f"not an http:// URL: {url}")
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http only)
        text = response.read(1 << 22).decode("utf-8", "replace")
    for family in text_string_to_metric_families(text):
        if family.name == LAST_TICK:
            for sample in family.samples:
                return float(sample.value)
    raise ValueError(f"no {LAST_TICK} in the answer")
