"""One delivery cycle: bring every node that needs a user's token up to date.

1. Ask the job source who works where, and record it in the store (a
   complete view also queues removals for work that ended ``remove_after``
   ago).  If the job source fails, the cycle still pushes what is owed.
2. Ask the store what is owed: a newer token, or a removal.
3. Do it, nodes in parallel, each on its own: one slow or unreachable node
   never delays the others.  Failures keep their attempt count and next try
   (exponential backoff with jitter) in the store.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenlife.backoff import backoff
from tokenlife.clock import Clock, SystemClock
from tokenlife.errors import TokenlifeError, UserDbError, UserError
from tokenlife.interfaces import JobSource, Repository, Transport
from tokenlife.records import DeliveryResult as Result
from tokenlife.records import DeliveryTask as Task
from tokenlife.records import TokenFile
from tokenlife.users import uid_of
from transfer import nodefs

log = logging.getLogger(__name__)

RETRY_BASE = 30  # first retry after 30 s, doubling ...
RETRY_CAP = 1800  # ... up to 30 min
#: a time after every next attempt (9999-12-31): ``due`` then owes every retry
ANY_TIME = 253402214400


def retry_delay(attempts: int, rand: Callable[[], float] = random.random) -> int:
    return max(1, backoff(attempts, RETRY_BASE, RETRY_CAP, rand))


@dataclass
class DeliverySummary:
    delivered: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0
    unfinished: int = 0  # still running when the deadline passed
    errors: list[str] = field(default_factory=list)
    jobs_error: str = ""
    #: the store failed to record the job source's answer (the cycle went on)
    store_error: str = ""

    def line(self) -> str:
        text = (
            f"delivered {self.delivered}, unchanged {self.unchanged}, removed {self.removed}, "
            f"failed {self.failed}"
        )
        return text + (f", unfinished {self.unfinished}" if self.unfinished else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "failed": self.failed,
            "unfinished": self.unfinished,
            "errors": self.errors,
            "jobs_error": self.jobs_error,
            "store_error": self.store_error,
        }


class DeliveryCycle:
    def __init__(
        self,
        store: Repository,
        transport: Transport,
        jobs: JobSource | None,
        remove_after: int,
        concurrency: int = 32,
        clock: Clock | None = None,
        actor: str = "transfer",
        uids: Callable[[str], int | None] = uid_of,
    ) -> None:
        self.store = store.deliveries
        self.transport = transport
        self.jobs = jobs
        self.remove_after = remove_after
        self.concurrency = max(1, concurrency)
        self.clock = clock or SystemClock()
        self.actor = actor
        self.uids = uids

    def run(
        self,
        user: str | None = None,
        node: str | None = None,
        complete: bool = True,
        deadline: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> DeliverySummary:
        """One cycle.  ``complete``: the job source sees every job (so ended
        work may be removed); ``deadline`` (monotonic): stop waiting then."""
        summary = DeliverySummary()
        now = int(self.clock.now())
        if self.jobs is not None:
            try:
                needs = self.jobs.needs()
                uids, unsure = self._uids(needs)
            except TokenlifeError as exc:
                # Without a view of the jobs nothing is removed; owed tokens still go.
                summary.jobs_error = str(exc)
                log.warning("job source failed: %s", exc)
            else:
                # A job source that had to skip a job (``partial``) sees not
                # every job: nothing is removed on its word.
                partial = bool(getattr(self.jobs, "partial", False))
                grace = self.remove_after if complete and not partial else None
                try:
                    self.store.sync_needs(needs, uids, now, grace, unsure)
                except TokenlifeError as exc:
                    # No job source's fault (the store is down, or a concurrent
                    # pusher recorded the same node first): what is owed still
                    # goes, and the next cycle records the jobs again.
                    summary.store_error = f"recording the jobs failed: {exc}"
        # An explicit node is tried now, whatever its backoff: the one asking
        # has just fixed it, or wants to know at once whether it works.
        tasks = self.store.due(now if node is None else ANY_TIME, user, node)
        if summary.store_error:  # said here, once the store answered again
            log.warning("%s", summary.store_error)
        results = _parallel(tasks, self._do, self.concurrency, deadline, progress)
        finished = [r for r in results if r is not None]
        summary.unfinished = len(tasks) - len(finished)
        for result in results:
            if result is None:
                continue
            if not result.ok:
                summary.failed += 1
                summary.errors.append(result.error)
            elif result.removed:
                summary.removed += 1
            elif result.outcome == nodefs.INSTALLED:
                summary.delivered += 1
            else:
                summary.unchanged += 1
        self.store.record(finished, int(self.clock.now()), self.actor)
        return summary

    def _uids(self, needs: dict[str, set[str]]) -> tuple[dict[str, int], set[str]]:
        """Each user's uid, and the users the user database could not answer for.

        Only a definite "no such user" leaves a user out for good (its nodes
        are cleaned once their work is gone); a failed lookup keeps what the
        user's nodes hold until the next cycle asks again.
        """
        uids, unsure = {}, set()
        for name in needs:
            try:
                uid = self.uids(name)
            except UserDbError as exc:
                log.warning("user %s of a running job: %s; trying again next cycle", name, exc)
                unsure.add(name)
                continue
            except UserError:
                uid = None
            except Exception as exc:  # one user's lookup must not stop the others
                log.warning("user %s of a running job: lookup failed: %r", name, exc)
                unsure.add(name)
                continue
            if uid is None:
                log.warning("user %s of a running job is unknown here: no token", name)
            else:
                uids[name] = uid
        return uids, unsure

    def _do(self, task: Task) -> Result:
        d = task.delivery
        try:
            if task.token is None:
                self.transport.remove(d.node, d.uid)
                log.info("removed the token of %s from %s", d.user, d.node)
                return Result(d.user, d.node, True, removed=True)
            # The node's record names another token: equal metadata there is
            # no proof it holds this one (the same iat: a login and a renewal
            # in one second), so the file is written.
            tf = TokenFile.of(task.token, node_holds_other=bool(d.token_id))
            outcome = self.transport.put(d.node, tf)
            if outcome == nodefs.INSTALLED:
                log.info(
                    "delivered token %s v%d of %s to %s", tf.token_id, tf.version, d.user, d.node
                )
            elif outcome == nodefs.NEWER_THERE:
                log.info("%s already has a newer token of %s", d.node, d.user)
            return Result(
                d.user, d.node, True, token_id=tf.token_id, version=tf.version, outcome=outcome
            )
        except TokenlifeError as exc:
            retry = int(self.clock.now()) + retry_delay(d.attempts)
            log.warning("delivery to %s failed: %s", d.node, exc)
            return Result(d.user, d.node, False, error=str(exc), retry_at=retry)


def _parallel(
    tasks: list[Task],
    work: Callable[[Task], Result],
    concurrency: int,
    deadline: float | None,
    progress: Callable[[int, int], None] | None,
) -> list[Result | None]:
    """Run ``work`` on daemon threads (a deadline must not wait for them)."""
    results: list[Result | None] = [None] * len(tasks)
    if not tasks:
        return results
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(tasks)):
        todo.put(i)
    done: queue.Queue[int] = queue.Queue()

    def worker() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = work(tasks[i])
            except Exception as exc:  # a bug must not lose the other nodes
                log.exception("delivery to %s crashed", tasks[i].delivery.node)
                results[i] = Result(
                    tasks[i].delivery.user, tasks[i].delivery.node, False, error=repr(exc)
                )
            done.put(i)

    for _ in range(min(concurrency, len(tasks))):
        threading.Thread(target=worker, daemon=True).start()
    for count in range(1, len(tasks) + 1):
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            done.get(timeout=timeout)
        except queue.Empty:
            break
        if progress is not None:
            progress(count, len(tasks))
    return list(results)
