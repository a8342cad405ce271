"""The renewal tick: what a systemd timer run and the daemon both call.

Each due token is decided by the pure policy, re-minted with the same
identity if due, and written back with its new version in the batch's
transaction.  One token's failure never stops the others; failures keep
their attempt count and next try (exponential backoff with jitter) in the
store, so restarts and other replicas agree.
"""

from __future__ import annotations

import gc
import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from repository.policy import Decision, Policy, Renew, decide, next_check, rotation
from tokenlife.backoff import backoff
from tokenlife.clock import Clock, SystemClock
from tokenlife.config import Config
from tokenlife.errors import TokenlifeError
from tokenlife.interfaces import KeySource, Repository, SigningKey, Sink, TokenKind
from tokenlife.records import Expired, Failed, Outcome, Renewed, TokenRecord, Waiting
from tokenlife.slurm_jwt import SlurmJwt
from tokenlife.users import UserInfo, lookup

log = logging.getLogger(__name__)

RETRY_BASE = 60  # first retry after a minute ...
RETRY_CAP = 3600  # ... doubling up to an hour, but always well before exp


@dataclass
class Summary:
    renewed: int = 0
    waiting: int = 0
    expired: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"renewed {self.renewed}, waiting {self.waiting}, expired {self.expired}, "
            f"failed {self.failed}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "renewed": self.renewed,
            "waiting": self.waiting,
            "expired": self.expired,
            "failed": self.failed,
            "errors": self.errors,
        }


def retry_delay(attempts: int, until_exp: int, rand: Callable[[], float] = random.random) -> int:
    """Backoff with jitter, never waiting past half the time the token has left.

    A token that has already expired (its jobs are failing now) is retried
    at least every RETRY_BASE seconds.
    """
    delay = backoff(attempts, RETRY_BASE, RETRY_CAP, rand)
    delay = min(delay, max(10, until_exp // 2)) if until_exp > 0 else min(delay, RETRY_BASE)
    return max(1, delay)


def _unexpected(exc: BaseException) -> str:
    """One line for an error nobody planned for (logged in full at debug level)."""
    log.debug("unexpected error", exc_info=exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"unexpected error: {type(exc).__name__}" + (f": {first}" if first else "")


class Renewer:
    def __init__(
        self,
        config: Config,
        key_source: KeySource,
        store: Repository,
        clock: Clock | None = None,
        sinks: list[Sink] | None = None,
        actor: str = "renewer",
        users: Callable[[str], UserInfo] = lookup,
        kind: TokenKind | None = None,
    ) -> None:
        self.config = config
        self.key_source = key_source
        self.repository = store
        self.store = store.renewals
        self.clock = clock or SystemClock()
        self.policy = Policy.from_config(config.token)
        self.sinks = sinks or []
        self.actor = actor
        self.users = users  # the user database (injectable for benchmarks)
        self.kind: TokenKind = kind or SlurmJwt()

    def tick(self, user: str | None = None, force: bool = False) -> Summary:
        """Renew what is due (``force``: everything renewable), expire what is past."""
        now = int(self.clock.now())
        return self._run(
            now,
            lambda r: decide(r, self.policy, now, force),
            self.key_source,
            "renewed",
            user=user,
            force=force,
        )

    def rotate(self, key_source: KeySource, user: str | None = None) -> Summary:
        """Re-mint every live token not yet signed by ``key_source``'s key.

        Idempotent: a second run (after a crash, say) only does what is left.
        """
        now = int(self.clock.now())
        key_id = key_source.load().key_id
        return self._run(
            now, lambda r: rotation(r, now), key_source, "rotated", user=user, not_key=key_id
        )

    def _run(
        self,
        now: int,
        decision_of: Callable[[TokenRecord], Decision],
        key_source: KeySource,
        event: str,
        user: str | None = None,
        force: bool = False,
        not_key: str | None = None,
    ) -> Summary:
        summary = Summary()
        key: list[SigningKey] = []  # loaded at the first renewal, once per run
        kind = self.kind
        infos: dict[str, UserInfo] = {}  # one user database lookup per user and run
        fresh: dict[str, TokenRecord] = {}  # renewed records, for the sinks

        def handle(record: TokenRecord) -> Outcome:
            decision = decision_of(record)
            if not isinstance(decision, Renew):
                return decision  # Waiting or Expired: the outcome itself
            try:
                if not key:
                    key.append(key_source.load())
                info = infos.get(record.user)
                if info is None:
                    info = infos[record.user] = self.users(record.user)
                if info.uid != record.uid:
                    return Expired(f"user {record.user} now has uid {info.uid}")
                token = kind.make(
                    key[0],
                    info,
                    now,
                    decision.new_exp,
                    renew_until=record.renew_until,
                    version=record.version + 1,
                )
            except Exception as exc:
                # One token's trouble (a user database error, a bug) is that
                # token's failure, backed off in the store: never the batch's.
                why = str(exc) if isinstance(exc, TokenlifeError) else _unexpected(exc)
                return Failed(why, now + retry_delay(record.attempts, record.exp - now))
            key_id = key[0].key_id
            new = fresh[record.token_id] = _renewed(record, now, decision.new_exp, token, key_id)
            return Renewed(
                token, now, decision.new_exp, next_check(new, self.policy), key_id, event
            )

        renewed: list[TokenRecord] = []
        with _gc_paused():
            results = self.store.process(now, handle, self.actor, user, force, not_key=not_key)
            self._account(results, fresh, renewed, summary, event)
        for sink in self.sinks:
            try:
                sink.renewed(renewed)
            except Exception as exc:  # a sink never undoes or stops a renewal
                why = str(exc) if isinstance(exc, TokenlifeError) else _unexpected(exc)
                log.warning("after renewal: %s: %s", type(sink).__name__, why)
        return summary

    @staticmethod
    def _account(
        results: list[tuple[TokenRecord, Outcome]],
        fresh: dict[str, TokenRecord],
        renewed: list[TokenRecord],
        summary: Summary,
        event: str,
    ) -> None:
        """Count and log each outcome; collect the renewed records for the sinks."""
        for record, outcome in results:
            if isinstance(outcome, Renewed):
                summary.renewed += 1
                renewed.append(fresh[record.token_id])
                log.info(
                    "%s token %s of %s to v%d, exp %d",
                    event,
                    record.token_id,
                    record.user,
                    record.version + 1,
                    outcome.exp,
                )
            elif isinstance(outcome, Waiting):
                summary.waiting += 1
            elif isinstance(outcome, Expired):
                summary.expired += 1
                log.info("token %s of %s expired: %s", record.token_id, record.user, outcome.reason)
            else:
                summary.failed += 1
                summary.errors.append(f"{record.user}: {outcome.error}")
                log.warning(
                    "renewing token %s of %s failed: %s",
                    record.token_id,
                    record.user,
                    outcome.error,
                )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a run decides and writes its tokens.

    Every token leaves several objects behind that live until the run ends
    (records, outcomes, results); the collector would scan them again and
    again for no cycle: about a quarter of the run's own Python time at
    100,000 tokens.  Collection resumes when the run ends, error or not, and
    before the sinks are called.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _renewed(record: TokenRecord, iat: int, exp: int, token: str, key_id: str) -> TokenRecord:
    # Positional construction: dataclasses.replace costs more than signing.
    return TokenRecord(
        record.token_id,
        record.user,
        record.uid,
        record.gid,
        record.first_issued,
        iat,
        exp,
        record.renew_until,
        record.lifetime,
        key_id,
        record.version + 1,
        record.state,
        0,
        token,
    )
