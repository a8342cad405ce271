"""The renewal tick: what a systemd timer run and the daemon both call.

Each due token is decided by the pure policy, re-minted with the same
identity if due, and written back with its new version in the batch's
transaction.  One token's failure never stops the others; failures keep
their attempt count and next try (exponential backoff with jitter) in the
store, so restarts and other replicas agree.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from producer.claims import build_claims
from repository.policy import Expire, Policy, Refuse, Renew, Wait, decide, next_check
from repository.renewal_store import Expired, Failed, Outcome, RenewalStore, Renewed, Waiting
from repository.store import SqlTokenStore
from tokenlife.clock import Clock, SystemClock
from tokenlife.config import Config
from tokenlife.errors import TokenlifeError
from tokenlife.interfaces import KeySource
from tokenlife.model import TokenRecord
from tokenlife.users import lookup

log = logging.getLogger(__name__)

RETRY_BASE = 60  # first retry after a minute ...
RETRY_CAP = 3600  # ... doubling up to an hour, but always well before exp


class RenewalListener(Protocol):
    """Told about freshly renewed tokens (delivery hooks in here)."""

    def renewed(self, records: list[TokenRecord]) -> None: ...


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
    """Backoff with jitter, never waiting past half the time the token has left."""
    delay = min(RETRY_CAP, RETRY_BASE * 2 ** min(attempts, 10))
    delay = int(delay * (0.5 + rand() / 2))
    if until_exp > 0:
        delay = min(delay, max(10, until_exp // 2))
    return max(1, delay)


class Renewer:
    def __init__(
        self,
        config: Config,
        key_source: KeySource,
        store: SqlTokenStore,
        clock: Clock | None = None,
        listeners: list[RenewalListener] | None = None,
        actor: str = "renewer",
    ) -> None:
        self.config = config
        self.key_source = key_source
        self.store = RenewalStore(store)
        self.clock = clock or SystemClock()
        self.policy = Policy.from_config(config.token)
        self.listeners = listeners or []
        self.actor = actor

    def tick(self, user: str | None = None, force: bool = False) -> Summary:
        now = int(self.clock.now())
        summary = Summary()
        key: list[Any] = []  # loaded at the first renewal, once per tick

        def handle(record: TokenRecord) -> Outcome:
            decision = decide(record, self.policy, now, force)
            if isinstance(decision, Wait):
                return Waiting(decision.until)
            if isinstance(decision, Expire | Refuse):
                return Expired(decision.reason)
            assert isinstance(decision, Renew)
            try:
                if not key:
                    key.append(self.key_source.load())
                info = lookup(record.user)
                if info.uid != record.uid:
                    return Expired(f"user {record.user} now has uid {info.uid}")
                token = key[0].sign(build_claims(info, now, decision.new_exp))
            except TokenlifeError as exc:
                delay = retry_delay(record.attempts, record.exp - now)
                return Failed(str(exc), now + delay)
            fresh = _renewed(record, now, decision.new_exp, token)
            return Renewed(token, now, decision.new_exp, next_check(fresh, self.policy))

        renewed: list[TokenRecord] = []
        for record, outcome in self.store.process(now, handle, self.actor, user, force):
            if isinstance(outcome, Renewed):
                summary.renewed += 1
                renewed.append(_renewed(record, outcome.iat, outcome.exp, outcome.token))
                log.info(
                    "renewed token %s of %s to v%d, exp %d",
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
        for listener in self.listeners:
            try:
                listener.renewed(renewed)
            except TokenlifeError as exc:
                log.warning("after renewal: %s", exc)
        return summary


def _renewed(record: TokenRecord, iat: int, exp: int, token: str) -> TokenRecord:
    from dataclasses import replace

    return replace(record, iat=iat, exp=exp, version=record.version + 1, token=token)
