"""Service accounts' token files (``[[service]]``): the current token at ``path`` on
each of the entry's hosts.

One cycle looks up each entry (its user, the file's owner and group), takes
the user's current token from the store and hands it to the transport for
every host, hosts in parallel and each on its own: one failing host never
holds up the others, and is simply tried again by the next cycle (the
daemon's tick, or ``tokenlife push``).  On the host, transfer/nodefs.py
``install_file`` writes the file atomically, never over a newer token and
not at all when this very token is there already.  Each file written is
audited (``delivered``, reason ``node HOST: PATH``); each failure is one
line in the log, never with the token.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from producer.services import resolve
from repository.services import ServiceDelivered, record_deliveries
from tokenlife.clock import Clock, SystemClock
from tokenlife.config import Config, ServiceConfig
from tokenlife.errors import TokenlifeError
from tokenlife.interfaces import Repository, TokenKind, Transport
from tokenlife.records import ServiceFile, TokenFile
from tokenlife.slurm_jwt import SlurmJwt
from transfer import nodefs

log = logging.getLogger(__name__)


@dataclass
class ServiceSummary:
    delivered: int = 0
    unchanged: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"service files: delivered {self.delivered}, unchanged {self.unchanged}, "
            f"failed {self.failed}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "errors": self.errors,
        }


class _Task(NamedTuple):
    entry: ServiceConfig
    host: str
    file: ServiceFile


class _Done(NamedTuple):
    task: _Task
    outcome: str  # nodefs.INSTALLED, UNCHANGED, NEWER_THERE; "" if it failed
    error: str = ""


def _one_line(exc: BaseException) -> str:
    """The error in one line (a bug's in full at debug level)."""
    if isinstance(exc, TokenlifeError):
        text = str(exc)
    else:
        log.debug("unexpected error", exc_info=exc)
        text = f"unexpected error: {type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500]


class ServiceDelivery:
    def __init__(
        self,
        config: Config,
        store: Repository,
        transport: Transport,
        kind: TokenKind | None = None,
        concurrency: int = 32,
        clock: Clock | None = None,
        actor: str = "transfer",
    ) -> None:
        self.config = config
        self.store = store
        self.transport = transport
        self.kind: TokenKind = kind or SlurmJwt()
        self.concurrency = max(1, concurrency)
        self.clock = clock or SystemClock()
        self.actor = actor

    def run(self, user: str | None = None, node: str | None = None) -> ServiceSummary:
        """One cycle over the services (``user``, ``node``: only those)."""
        summary = ServiceSummary()
        tasks: list[_Task] = []
        now = int(self.clock.now())
        for entry in self.config.services:
            hosts = [h for h in entry.hosts if node is None or h == node]
            if (user is not None and entry.user != user) or not hosts:
                continue
            try:
                account = resolve(self.config, entry)
                record = self.store.current(entry.user)
                if record is None:
                    raise TokenlifeError("no active token yet (the daemon's tick mints it)")
                if record.exp <= now:
                    raise TokenlifeError(f"token {record.token_id} has expired: nothing to send")
            except Exception as exc:  # this service's trouble, not the others'
                why = _one_line(exc)
                summary.failed += len(hosts)
                summary.errors.append(f"{entry.name}: {why}")
                log.warning("%s: not delivered: %s", entry.name, why)
                continue
            sf = ServiceFile(
                entry.path, account.owner_uid, account.gid, entry.mode, TokenFile.of(record)
            )
            tasks.extend(_Task(entry, host, sf) for host in hosts)
        if not tasks:
            return summary
        with ThreadPoolExecutor(min(self.concurrency, len(tasks))) as pool:
            done = list(pool.map(self._do, tasks))
        written = []
        for result in done:
            entry, host, sf = result.task
            if result.error:
                summary.failed += 1
                summary.errors.append(f"{entry.name}: {result.error}")
            elif result.outcome == nodefs.INSTALLED:
                summary.delivered += 1
                tf = sf.token
                written.append(ServiceDelivered(entry.user, host, sf.path, tf.token_id, tf.version))
            else:
                summary.unchanged += 1
        try:
            record_deliveries(self.store, written, int(self.clock.now()), self.actor)
        except TokenlifeError as exc:  # the files are there; only their audit is missing
            summary.errors.append(f"recording service deliveries failed: {exc}")
            log.warning("recording service deliveries failed: %s", exc)
        return summary

    def _do(self, task: _Task) -> _Done:
        entry, host, sf = task
        put_file = getattr(self.transport, "put_file", None)
        try:
            if put_file is None:
                raise TokenlifeError(
                    f"delivery.transport {self.config.delivery.transport!r} cannot put "
                    "service files (no put_file)"
                )
            outcome = str(put_file(host, sf, self.kind.read))
        except Exception as exc:  # one host's failure never stops the others
            error = _one_line(exc)
            error = error if error.startswith(f"{host}: ") else f"{host}: {error}"
            log.warning("%s: delivery failed: %s", entry.name, error)
            return _Done(task, "", error)
        tf = sf.token
        if outcome == nodefs.INSTALLED:
            log.info(
                "%s: delivered token %s v%d to %s:%s",
                entry.name,
                tf.token_id,
                tf.version,
                host,
                sf.path,
            )
        elif outcome == nodefs.NEWER_THERE:
            log.info("%s: %s:%s already has a newer token", entry.name, host, sf.path)
        return _Done(task, outcome)
