"""The pull service's audit trail: one event per pull, written in batches.

The pull server (producer/pull.py) calls its ``audit(user, host, result)``
from its worker threads for every request that reached it with a complete
line (``busy`` and ``timeout`` are counted by the server, not audited: a
flood must not flood the trail).  A transaction per pull would make each
pull wait for a commit, and on SQLite for the one write lock, which a
renewal batch may hold for seconds; so :class:`PullAudit` queues the events
and one thread writes them, at most ``flush_every`` seconds later, many to a
transaction.  A store that fails keeps them queued (at most ``max_queued``:
past that the oldest are dropped, and the log says how many, once a minute).

Each result is an event kind of its own (:data:`EVENTS`), so the counts per
kind that ``tokenlife status`` already reads (repository/counts.py: kept by
the database's triggers on PostgreSQL, counted in ix_events_event_at on
SQLite) are the pulls by result, without reading a row.  The kinds are short
forms because the column holds 16 characters.  An event names the user
munged vouched for ("-" when the credential could not be decoded, ``uid N``
for a uid without a name), the host as ``from HOST`` in its reason, never a
token.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from repository.rows import audit
from tokenlife.interfaces import Repository

log = logging.getLogger(__name__)

#: result (producer.pull.RESULTS) -> audit event kind; busy and timeout are not audited
EVENTS = {
    "ok": "pull_ok",
    "no_token": "pull_no_token",
    "refused_policy": "pull_refused",
    "bad_credential": "pull_bad_cred",
    "replay": "pull_replay",
    "expired": "pull_expired",
    "error": "pull_error",
    "bad_request": "pull_bad_request",
}
#: event kind -> result
RESULT_OF = {event: result for result, event in EVENTS.items()}
#: events written per transaction
BATCH = 2000

Pending = tuple[int, str, str, str]  # at, event, user, host


def pulls(events: dict[str, int]) -> dict[str, int]:
    """Pulls by result (every audited result, 0 if none) from events per kind."""
    return {result: events.get(event, 0) for result, event in EVENTS.items()}


class PullAudit:
    """``audit = PullAudit(store, actor).start()``; the server calls ``audit(user, host, result)``
    and ``close()`` writes what is left."""

    def __init__(
        self,
        store: Callable[[], Repository],
        actor: str,
        flush_every: float = 1.0,
        max_queued: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.actor = store, actor[:64]
        self.flush_every, self.max_queued, self.clock = flush_every, max_queued, clock
        self._queue: collections.deque[Pending] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pull-audit", daemon=True)
        self._failing = False
        self._dropped = 0  # since the last warning
        self._warned = float("-inf")

    def start(self) -> PullAudit:
        self._thread.start()
        return self

    def __call__(self, user: str, host: str, result: str) -> None:
        event = EVENTS.get(result)
        if event is None:
            return
        with self._lock:
            self._queue.append((int(self.clock()), event, user[:32], host))
            self._trim()

    def _trim(self) -> None:
        while len(self._queue) > self.max_queued:
            self._queue.popleft()
            self._dropped += 1

    def _run(self) -> None:
        while not self._stop.wait(self.flush_every):
            self.flush()

    def flush(self) -> bool:
        """Write what is queued; False if the store failed (it stays queued)."""
        with self._lock:
            batch = list(self._queue)
            self._queue.clear()
        written = 0
        try:
            while written < len(batch):
                chunk = batch[written : written + BATCH]
                with self.store().transaction() as s:
                    for at, event, user, host in chunk:
                        audit(s, at, event, user, None, None, self.actor, f"from {host}")
                written += len(chunk)
        except Exception as exc:  # the store's trouble must not end the trail's thread
            rest = batch[written:]
            with self._lock:
                self._queue.extendleft(reversed(rest))
                self._trim()
            self._report(f"cannot write {len(rest)} pull audit event(s): {_reason(exc)}")
            self._failing = True
            return False
        if self._failing:
            log.warning("pull audit: the store takes events again")
            self._failing = False
        if self._dropped:
            self._report("")
        return True

    def _report(self, problem: str) -> None:
        """At most one warning a minute: a store that is down for long must not flood the log."""
        now = time.monotonic()
        if now - self._warned < 60.0:
            return
        self._warned = now
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        lost = f"; {dropped} dropped (more than {self.max_queued} waited)" if dropped else ""
        log.warning("pull audit: %s%s", problem or "the queue overflowed", lost)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread and write what is left (a last try, for ``timeout`` at most)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.flush()


def _reason(exc: BaseException) -> str:
    from tokenlife.errors import TokenlifeError

    return str(exc) if isinstance(exc, TokenlifeError) else type(exc).__name__
