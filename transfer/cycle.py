"""One delivery cycle: bring every node that needs a user's token up to date.

1. Ask the job source who works where, and record it in the store (a
   complete view also queues removals for work that ended ``remove_after``
   ago).  If the job source fails, the cycle still pushes what is owed.
2. Claim what is owed (a newer token, or a removal) in batches, as the
   workers need more: a claim is this replica's alone until its lease ends
   (repository/delivery_store.py), so several replicas on one store share the
   work and never push the same delivery at once.
3. Do it, nodes in parallel, each on its own: one slow or unreachable node
   never delays the others.  Outcomes are recorded in bulk as they come in;
   failures keep their attempt count and next try (exponential backoff with
   jitter) in the store.

While work is claimed the cycle extends its leases every third of a lease,
and it starts a push only while a third of its lease is left: a replica that
cannot reach the store stops taking work before its claims can lapse.  A
replica that dies holds its claims no longer than one lease; another replica
then takes them over, and the node-side order (transfer/nodefs.py: never an
older token over a newer one) holds whoever pushes last.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenlife.backoff import backoff
from tokenlife.clock import Clock, SystemClock
from tokenlife.errors import TokenlifeError, UserDbError, UserError
from tokenlife.interfaces import DeliveryLedger, JobSource, Repository, Transport
from tokenlife.records import CLAIM_START, TokenFile
from tokenlife.records import DeliveryResult as Result
from tokenlife.records import DeliveryTask as Task
from tokenlife.users import uid_of
from transfer import nodefs

log = logging.getLogger(__name__)

RETRY_BASE = 30  # first retry after 30 s, doubling ...
RETRY_CAP = 1800  # ... up to 30 min
#: a time after every next attempt (9999-12-31): ``due`` then owes every retry
ANY_TIME = 253402214400
#: how long a claim holds a delivery without being extended: a dead replica's
#: work waits this long for another replica (seconds)
LEASE = 120
#: deliveries claimed per batch: small enough that replicas share a storm
#: evenly, large enough that claiming costs little per delivery
BATCH = 256


def replica_name() -> str:
    """This process's name in claims: host and pid (unique while it runs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def gone_from_here(claim: str) -> bool:
    """Whether ``claim`` is a default-named replica's of this host that no longer runs.

    Its claims need not wait for their lease: a daemon restarted after a
    crash takes its predecessor's work over at once.  A pid that runs again
    (reused) counts as running: that claim waits for its lease.
    """
    replica, _, _ = claim.rpartition("/")
    host, _, pid = replica.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it runs, as another user
        return False
    return False


def retry_delay(attempts: int, rand: Callable[[], float] = random.random) -> int:
    return max(1, backoff(attempts, RETRY_BASE, RETRY_CAP, rand))


@dataclass
class DeliverySummary:
    delivered: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0
    #: claimed but not done: still running when the deadline passed, or given
    #: back unstarted (the deadline, or too little of the lease left)
    unfinished: int = 0
    #: done, but another replica had taken the claim over meanwhile (its lease
    #: lapsed): that replica's outcome is the one recorded
    dropped: int = 0
    errors: list[str] = field(default_factory=list)
    jobs_error: str = ""
    #: the store failed to record the job source's answer (the cycle went on)
    store_error: str = ""

    def line(self) -> str:
        text = (
            f"delivered {self.delivered}, unchanged {self.unchanged}, removed {self.removed}, "
            f"failed {self.failed}"
        )
        text += f", unfinished {self.unfinished}" if self.unfinished else ""
        return text + (f", dropped {self.dropped}" if self.dropped else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "failed": self.failed,
            "unfinished": self.unfinished,
            "dropped": self.dropped,
            "errors": self.errors,
            "jobs_error": self.jobs_error,
            "store_error": self.store_error,
        }

    def count(self, result: Result) -> None:
        if not result.ok:
            self.failed += 1
            self.errors.append(result.error)
        elif result.removed:
            self.removed += 1
        elif result.outcome == nodefs.INSTALLED:
            self.delivered += 1
        else:
            self.unchanged += 1


class DeliveryCycle:
    """Delivery cycles of one replica.

    ``replica`` names it in claims (default: host and pid); ``lease``: how
    long a claim holds without being extended; ``batch``: deliveries claimed
    at a time.
    """

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
        replica: str | None = None,
        lease: int = LEASE,
        batch: int = BATCH,
    ) -> None:
        self.store = store.deliveries
        self.transport = transport
        self.jobs = jobs
        self.remove_after = remove_after
        self.concurrency = max(1, concurrency)
        self.clock = clock or SystemClock()
        self.actor = actor
        self.uids = uids
        self.replica = replica or replica_name()
        self.lease = max(3, lease)
        self.batch = max(1, batch)

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
            self._sync(summary, now, complete)
        self._take_over(now)
        # An explicit node is tried now, whatever its backoff: the one asking
        # has just fixed it, or wants to know at once whether it works.
        due_by = now if node is None else ANY_TIME
        work = _Claimed(self, user, node, due_by, summary)
        work.run(deadline, progress)
        return summary

    def _take_over(self, now: int) -> None:
        """Free the claims of replicas of this host that died (a crash, a kill -9)."""
        gone = [c for c in self.store.holders(now) if gone_from_here(c)]
        if gone:
            count = self.store.forget(gone)
            log.warning(
                "taking over %d deliveries claimed by %s (no longer running)",
                count,
                ", ".join(c.rpartition("/")[0] for c in gone),
            )

    def _sync(self, summary: DeliverySummary, now: int, complete: bool) -> None:
        """Record what the job source says (removals only on a complete view)."""
        assert self.jobs is not None
        try:
            needs = self.jobs.needs()
            uids, unsure = self._uids(needs)
        except TokenlifeError as exc:
            # Without a view of the jobs nothing is removed; owed tokens still go.
            summary.jobs_error = str(exc)
            log.warning("job source failed: %s", exc)
            return
        # A job source that had to skip a job (``partial``) sees not
        # every job: nothing is removed on its word.
        partial = bool(getattr(self.jobs, "partial", False))
        grace = self.remove_after if complete and not partial else None
        try:
            self.store.sync_needs(needs, uids, now, grace, unsure)
        except TokenlifeError as exc:
            # No job source's fault (the store is down, or a deadlock with a
            # replica recording the same jobs): what is owed still goes, and
            # the next cycle records the jobs again.
            summary.store_error = f"recording the jobs failed: {exc}"

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


class _Claimed:
    """One cycle's work: claims batches as the workers need them, pushes them on
    up to ``concurrency`` threads, records outcomes in bulk and keeps the leases."""

    def __init__(
        self,
        cycle: DeliveryCycle,
        user: str | None,
        node: str | None,
        due_by: int,
        summary: DeliverySummary,
    ) -> None:
        self.cycle = cycle
        self.ledger: DeliveryLedger = cycle.store
        self.user, self.node, self.due_by = user, node, due_by
        self.summary = summary
        #: this cycle's claims: a stale result of an earlier cycle of the same
        #: process (a thread left running past a deadline) is never taken for one
        self.claim = f"{cycle.replica[:100]}/{secrets.token_hex(4)}"
        self.tasks: list[Task] = []
        self.results: list[Result | None] = []
        #: a node's tasks of one batch, in order: one worker does them all, over
        #: the node's one connection, while the others work on other nodes
        self.todo: queue.Queue[list[int] | None] = queue.Queue()
        self.waiting = 0  # tasks queued, not yet started (the guard keeps it)
        self.guard = threading.Lock()
        self.done: queue.Queue[int] = queue.Queue()
        self.after, self.more = CLAIM_START, True
        self.threads = 0
        self.groups = 0  # node groups queued so far: no more threads than those
        #: when the oldest lease held ends (epoch seconds, the cycle's clock)
        self.until = 0.0
        self.pending: list[int] = []  # finished, not yet recorded
        self.skipped: list[int] = []  # not started: the lease was running out
        self.recorded = 0
        #: claim more when fewer tasks than this wait for a worker
        self.low = max(cycle.concurrency, cycle.batch // 2)

    def run(self, deadline: float | None, progress: Callable[[int, int], None] | None) -> None:
        try:
            self._claim()
            if self.summary.store_error:  # said here, once the store answered again
                log.warning("%s", self.summary.store_error)
            self._loop(deadline, progress)
            self._record()
        finally:
            left = self._stop()
        # Claims of work never started go back at once; those of pushes
        # still running past the deadline lapse with their lease.
        self.ledger.release(self.claim, [self.tasks[i] for i in left + self.skipped])
        self.summary.unfinished = len(self.tasks) - self.recorded

    def _loop(self, deadline: float | None, progress: Callable[[int, int], None] | None) -> None:
        third = self.cycle.lease / 3
        beat = time.monotonic() + third
        finished = 0
        while finished < len(self.tasks):
            wait = beat - time.monotonic()
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            try:
                i = self.done.get(timeout=max(0.0, wait))
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    return
            else:
                finished += 1
                if progress is not None:
                    progress(finished, len(self.tasks))
                if self.results[i] is not None:
                    self.pending.append(i)
                # Claim the next batch while the workers still have plenty to
                # do (recording and claiming take a few round trips), then record.
                if self.more and self.waiting < self.low:
                    self._claim()
                if len(self.pending) >= self.cycle.batch:
                    self._record()
            if time.monotonic() >= beat:
                self._extend()
                beat = time.monotonic() + third

    def _claim(self) -> None:
        now = int(self.cycle.clock.now())
        got = self.ledger.claim(
            now,
            self.claim,
            self.cycle.lease,
            self.cycle.batch,
            self.after,
            self.user,
            self.node,
            self.due_by,
        )
        self.after, self.more = got.after, got.more
        if got.tasks and not self.tasks:
            self.until = now + self.cycle.lease
        first = len(self.tasks)
        self.tasks.extend(got.tasks)
        self.results.extend([None] * len(got.tasks))
        groups: dict[str, list[int]] = {}  # the claim comes in node order
        for i in range(first, len(self.tasks)):
            groups.setdefault(self.tasks[i].delivery.node, []).append(i)
        with self.guard:
            self.waiting += len(got.tasks)
        for group in groups.values():
            self.todo.put(group)
        self.groups += len(groups)
        while self.threads < min(self.cycle.concurrency, self.groups):
            # Daemon threads: a deadline must not wait for them.
            threading.Thread(target=self._work, daemon=True).start()
            self.threads += 1

    def _extend(self) -> None:
        now = int(self.cycle.clock.now())
        try:
            self.ledger.extend(self.claim, now + self.cycle.lease)
        except TokenlifeError as exc:
            # Pushes under way go on; no new one starts once the lease runs low.
            log.warning("cannot extend the delivery claims: %s", exc)
            return
        self.until = now + self.cycle.lease

    def _record(self) -> None:
        if not self.pending:
            return
        results = [r for r in (self.results[i] for i in self.pending) if r is not None]
        self.pending = []
        now = int(self.cycle.clock.now())
        dropped = {id(r) for r in self.ledger.record(results, now, self.cycle.actor, self.claim)}
        for result in results:
            if id(result) in dropped:
                self.summary.dropped += 1
            else:
                self.summary.count(result)
        self.recorded += len(results)

    def _work(self) -> None:
        while (group := self.todo.get()) is not None:
            for i in group:
                with self.guard:
                    self.waiting -= 1
                if self.cycle.clock.now() > self.until - self.cycle.lease / 3:
                    self.skipped.append(i)  # another replica may take it before we finish
                else:
                    self.results[i] = self._one(self.tasks[i])
                self.done.put(i)

    def _one(self, task: Task) -> Result:
        try:
            return self.cycle._do(task)
        except Exception as exc:  # a bug must not lose the other nodes
            log.exception("delivery to %s crashed", task.delivery.node)
            return Result(task.delivery.user, task.delivery.node, False, error=repr(exc))

    def _stop(self) -> list[int]:
        """Stop the workers once they finish what they hold; the tasks none started."""
        left = []
        while True:
            try:
                group = self.todo.get_nowait()
            except queue.Empty:
                break
            if group is not None:
                left.extend(group)
        for _ in range(self.threads):
            self.todo.put(None)
        return left
