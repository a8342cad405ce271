"""``tokenlife serve``: the mint socket plus the renewal tick on a schedule.

A tick: renewal, then new chains for ``[[service]]`` accounts that need
one, then delivery (users' nodes, then the services' token files).

APScheduler only decides *when*; the work is the same ``Renewer.tick`` the
systemd timer runs.  Signals (handlers only set flags or poke the
scheduler): ALRM ticks now, HUP reloads the configuration (a bad file keeps
the old one), TERM/INT let the running batch finish (for STOP_GRACE seconds
at most: a wedged tick never keeps the daemon from stopping) and exit 0.
Under systemd's watchdog, WATCHDOG=1 is sent while the socket serves and no
tick has run longer than STUCK_AFTER.

With ``serve.metrics`` set, Prometheus metrics are served on that address
(tokenlife.app.metrics); a port that cannot be bound is logged and the daemon
runs on without them: renewal matters more than its figures.

With ``pull.listen`` set, the pull service (tokenlife.app.pull_service)
serves beside the mint socket.  Its address is a promise to the nodes, like
the mint socket's path to PAM: if it cannot be bound (or libmunge cannot be
loaded) the daemon refuses to start, in one line, rather than run on while
every pull-only node goes without tokens.  A reload adjusts it (see
PullService.apply); a pull service that stopped serving stops the watchdog
pings.  With ``delivery.transport = "none"`` nothing is pushed: a tick
renews, and for the ``jobs`` policy asks the job source who works where.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenlife import config as configmod
from tokenlife.app.metrics import Metrics
from tokenlife.errors import TokenlifeError

if TYPE_CHECKING:
    from repository.services import ServiceKeeper
    from tokenlife.app.pull_service import PullService
    from transfer.service_delivery import ServiceDelivery

log = logging.getLogger("tokenlife.daemon")  # the name operators grep for

#: a tick running longer than this is stuck: the watchdog stops being fed
STUCK_AFTER = 900
#: on SIGTERM, how long the running tick may take to finish its batch
STOP_GRACE = 60


class Daemon:
    def __init__(self, config_path: Path | None, socket: Path | None = None) -> None:
        self.config_path = config_path
        self.socket_override = socket
        self.stop = threading.Event()
        self._lock = threading.Lock()  # one tick at a time, reloads between ticks
        self.again = threading.Event()  # a tick was asked for while one ran
        self.tick_started: float | None = None  # monotonic start of the running tick
        self.keeper: ServiceKeeper | None = None  # [[service]] accounts' new chains
        self.services: ServiceDelivery | None = None  # ... and their token files
        self.actor = f"serve@{os.uname().nodename}"
        from tokenlife.app.pull_service import PullService

        # Built once: it outlives reloads (its counts, its audit queue), and reaches
        # the store and the job source of the configuration in force through getters.
        self.pull: PullService = PullService(
            lambda: self.site.store, lambda: self.site.jobs, self.actor
        )

    def _build(self) -> None:
        from tokenlife.app import fdlimit
        from tokenlife.app.site import Site

        config = configmod.load(self.config_path)
        fdlimit.ensure(config)  # pooled node connections and pull clients, each a descriptor
        site = Site.from_config(config, actor=self.actor)
        site.key_source.load()  # fail at start (or reload), not at the first login
        if config.services:
            from repository.services import check_services

            # An unknown or refused [[service]] account fails the start (or the
            # reload), like the rest of a bad configuration.
            for warning in check_services(config):
                log.warning("%s", warning)
        cycle = None
        if config.serve.deliver and site.pushes:
            jobs = site.jobs
            if config.pull.listen and config.pull.policy == "jobs":
                from tokenlife.app.pull_service import ObservedJobs

                jobs = ObservedJobs(jobs, self.pull.feed)  # the cycle's answer feeds the policy
            cycle = site.cycle(jobs)
        old, self.site = getattr(self, "site", None), site
        self.config, self.minter, self.renewer, self.cycle = (
            config,
            site.minter,
            site.renewer,
            cycle,
        )
        self.keeper = site.keeper if config.services else None
        self.services = site.service_delivery() if config.services and cycle else None
        if old is not None:
            old.close()

    def tick(self) -> None:
        # An ALRM that arrives while a tick runs must not be lost (APScheduler
        # skips a run while the previous one is busy): run once more then.
        while True:
            self.again.clear()
            self._tick()
            if not self.again.is_set() or self.stop.is_set():
                return

    def _tick(self) -> None:
        with self._lock:
            started, ok = time.monotonic(), False
            self.tick_started = started
            try:
                ok = self._tick_once()
            finally:  # an unexpected error (APScheduler logs it) is a failed tick too
                self.tick_started = None
                self.metrics.stats.tick_done(ok, time.monotonic() - started)

    def healthy(self) -> bool:
        """What the systemd watchdog is told: the socket serves and no tick is stuck.

        A tick that has run longer than STUCK_AFTER (a wedged store or node
        that no timeout caught) stops the WATCHDOG=1 pings: systemd then
        restarts the daemon, and the tick's open batch rolls back.  So does a
        configured pull service that does not serve (its thread died, or a
        reload could not bind it again).
        """
        started = self.tick_started
        if started is not None and time.monotonic() - started > STUCK_AFTER:
            return False
        if not self.pull.alive():
            return False
        return any(t.name == "mint-socket" for t in threading.enumerate())

    def _tick_once(self) -> bool:
        """Renewal, then delivery; False if either failed as a whole."""
        stats = self.metrics.stats
        try:
            self.site.store.ingest_spool()
            summary = self.renewer.tick()
        except TokenlifeError as exc:
            log.error("tick failed: %s", exc)
            return False
        stats.renewal(summary)
        self.pull.forget()  # a pull after the tick reads the renewed tokens
        level = logging.WARNING if summary.failed else logging.INFO
        log.log(level, "tick: %s", summary.line())
        if self.keeper is not None:  # each service on its own: this never raises
            kept = self.keeper.keep()
            stats.service_upkeep(kept)
            log.log(logging.WARNING if kept.failed else logging.INFO, "tick: %s", kept.line())
        if self.cycle is None:
            if self.pull.wants_jobs:
                self._watch_jobs()
            return True
        ok = True
        try:
            delivery = self.cycle.run()
        except TokenlifeError as exc:
            log.error("delivery failed: %s", exc)
            ok = False
        else:
            stats.delivery(delivery)
            level = logging.WARNING if delivery.failed or delivery.jobs_error else logging.INFO
            log.log(level, "delivery: %s", delivery.line())
        if self.services is not None:  # each host on its own: this never raises
            files = self.services.run()
            stats.service_delivery(files)
            level = logging.WARNING if files.failed else logging.INFO
            log.log(level, "delivery: %s", files.line())
        return ok

    def _watch_jobs(self) -> None:
        """No delivery cycle asks the job source: ask it for the ``jobs`` policy."""
        try:
            needs = self.site.jobs.needs()
        except TokenlifeError as exc:
            log.warning("job source failed: %s", exc)
            self.metrics.stats.job_source(False)
            return
        self.pull.feed(needs)
        self.metrics.stats.job_source(True)

    def _open_store(self) -> None:
        """Open (and migrate) the store before pulls are answered from it: a
        first pull must not wait for an upgrade.  A store that is down now is
        the first tick's to report (the pulls answer ``error`` meanwhile)."""
        with contextlib.suppress(TokenlifeError), self.site.store.transaction(read_only=True):
            pass

    def reload(self) -> None:
        with self._lock:
            try:
                self._build()
            except TokenlifeError as exc:
                log.error("reload failed, keeping the running configuration: %s", exc)
                return
        self.service.minter = self.minter
        self.service.config = self.config
        self.pull.apply(self.config)
        if self.config.serve.metrics != self.metrics_address:
            log.warning(
                "serve.metrics changed to %r: takes effect when the daemon restarts",
                self.config.serve.metrics,
            )
        log.info("configuration reloaded")

    def run(self) -> int:
        from apscheduler.schedulers.background import BackgroundScheduler

        from producer.service import MintService, listen

        self._build()
        self.pull.bind(self.config)  # TokenlifeError: the daemon does not start
        if self.pull.server is not None:
            self._open_store()
            self.pull.serve()
        # The store and the renewal policy are looked up per scrape: a reload replaces them.
        self.metrics = Metrics(
            lambda: self.site.store,
            self.config.serve.interval,
            lambda lifetime: self.renewer.policy.margin(lifetime),
            pull=self.pull.figures,
        )
        self.metrics_address = self.config.serve.metrics
        self.metrics.start(self.metrics_address)
        self.service = MintService(self.config, self.minter)
        server = listen(self.socket_override or self.config.producer.socket, self.service)
        threading.Thread(target=server.serve_forever, name="mint-socket", daemon=True).start()
        scheduler = BackgroundScheduler(timezone="UTC")
        job = scheduler.add_job(
            self.tick,
            "interval",
            seconds=self.config.serve.interval,
            id="tick",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now().astimezone(),
        )
        scheduler.start()

        def tick_now(*_: Any) -> None:
            self.again.set()
            job.modify(next_run_time=datetime.now().astimezone())

        signal.signal(signal.SIGALRM, tick_now)
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self.reload).start())
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        notify("READY=1")
        pulls = f", pull {self.pull.server.address}" if self.pull.server else ""
        log.warning(
            "serving: socket %s, tick every %ds, metrics %s%s",
            server.server_address,
            self.config.serve.interval,
            self.metrics.server.url if self.metrics.server else "off",
            pulls,
        )
        watchdog = int(os.environ.get("WATCHDOG_USEC", "0") or 0) > 0
        stuck = False
        while not self.stop.wait(1.0):
            if not watchdog:
                continue
            if self.healthy():
                notify("WATCHDOG=1")
                stuck = False
            elif not stuck:
                if self.pull.alive():
                    log.error("a tick has run for over %ds: no more watchdog pings", STUCK_AFTER)
                else:
                    log.error("the pull service does not serve: no more watchdog pings")
                stuck = True
        notify("STOPPING=1")
        server.shutdown()
        server.server_close()
        self.pull.close()
        scheduler.shutdown(wait=False)
        # The running tick may finish its batch, for a while: a wedged one
        # must not keep the daemon from stopping (its batch rolls back).
        finished = self._lock.acquire(timeout=STOP_GRACE)
        self.metrics.close()
        if not finished:
            log.error("a tick still runs after %ds: stopping without it", STOP_GRACE)
            logging.shutdown()
            os._exit(0)
        self._lock.release()
        self.site.close()
        return 0


def notify(state: str) -> None:
    """sd_notify without a dependency: one datagram to $NOTIFY_SOCKET."""
    import socket

    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
