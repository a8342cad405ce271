"""Service accounts (``[[service]]``): a valid token at all times, like k5start's keytab.

A user's chain ends at its renew-until and the user logs in again; a
service never logs in.  So after each renewal pass the keeper looks at each
service's current token and mints a new chain (the store supersedes the old
one) when there is none, when it has expired, or when its chain will end
before another renewal could extend it: ``renew_until - now`` at most the
renewal margin the renewer uses for that token.  Between those, the normal
renewer renews the token like any other.  The first token, too, is minted
here: no login needed.

Also here, in the store's terms: the audit events of service file deliveries
(transfer/service_delivery.py writes the files) and what ``tokenlife status``
shows of each service.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from repository.policy import Policy
from tokenlife.clock import Clock, SystemClock
from tokenlife.config import Config, ServiceConfig
from tokenlife.errors import TokenlifeError
from tokenlife.interfaces import Repository, TokenStore
from tokenlife.records import ACTIVE, TokenRecord

if TYPE_CHECKING:
    from producer.mint import Minter

log = logging.getLogger(__name__)

#: the audit event of a service file written on a host (as for users' nodes)
DELIVERED = "delivered"


@dataclass
class KeeperSummary:
    minted: int = 0
    kept: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"services: minted {self.minted}, kept {self.kept}, failed {self.failed}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "minted": self.minted,
            "kept": self.kept,
            "failed": self.failed,
            "errors": self.errors,
        }


class ServiceKeeper:
    """Mints each service's first token, and a new chain before the old one ends."""

    def __init__(
        self,
        config: Config,
        minter: Minter,
        store: TokenStore,
        clock: Clock | None = None,
        actor: str = "service",
    ) -> None:
        self.services = config.services
        self.minter = minter
        self.store = store
        self.clock = clock or SystemClock()
        self.policy = Policy.from_config(config.token)
        self.actor = actor

    def margin(self, record: TokenRecord) -> int:
        """How long before its chain's end a new one is started: the renewal margin
        (at least a second: a token is no longer valid at its ``exp``)."""
        return max(1, self.policy.margin(record.lifetime))

    def why_new(self, entry: ServiceConfig, current: TokenRecord | None, now: int) -> str | None:
        """Why ``entry`` needs a new chain now (the audit trail's reason), or None."""
        if current is None:
            return "service account: no active token"
        if current.exp <= now:
            return f"service account: token {current.token_id} expired"
        left = current.renew_until - now
        if left <= self.margin(current):
            return f"service account: the chain of {current.token_id} ends in {left}s"
        if (
            current.lifetime > entry.lifetime
            or current.renew_until - current.first_issued > entry.renew_until
        ):
            return f"service account: the chain of {current.token_id} outlives the entry's limits"
        return None

    def keep(self, user: str | None = None) -> KeeperSummary:
        """One pass over the services (``user``: only that one's); each on its own."""
        summary = KeeperSummary()
        for entry in self.services:
            if user is not None and entry.user != user:
                continue
            try:
                now = int(self.clock.now())
                why = self.why_new(entry, self.store.current(entry.user), now)
                if why is None:
                    summary.kept += 1
                    continue
                self.minter.mint_service(
                    entry.user,
                    entry.lifetime,
                    entry.renew_until,
                    entry.allow_privileged,
                    reason=why,
                    actor=self.actor,
                )
                summary.minted += 1
            except Exception as exc:  # one service's trouble never stops the others
                summary.failed += 1
                if isinstance(exc, TokenlifeError):
                    why = str(exc)
                else:
                    log.debug("unexpected error", exc_info=exc)
                    why = f"unexpected error: {type(exc).__name__}: {exc}"
                summary.errors.append(f"{entry.name}: {why}")
                log.warning("%s: cannot mint a new token: %s", entry.name, why)
        return summary


def check_services(config: Config) -> list[str]:
    """Look every entry up (ConfigError, one line, for a name the user database
    does not know or a privileged account not allowed); returns the warnings:
    allowed privileged accounts, a renewal margin shorter than the daemon's tick."""
    from producer.services import privileged_warning, resolve
    from tokenlife.errors import ConfigError, UserDbError

    warnings = []
    policy = Policy.from_config(config.token)
    for number, entry in enumerate(config.services, 1):
        where = f"{config.path or '<config>'}: service[{number}]"
        try:
            account = resolve(config, entry)
        except UserDbError as exc:  # cannot tell now: the daemon's tick tries again
            warnings.append(f"{where}: {exc}")
            continue
        except TokenlifeError as exc:  # "owner: unknown user 'web'"
            key, _, reason = str(exc).partition(": ")
            raise ConfigError(f"{where}.{key}: {reason}") from None
        if account.privileged:
            warnings.append(privileged_warning(entry, account.uid))
        margin = max(1, policy.margin(entry.lifetime))
        if margin < config.serve.interval:
            warnings.append(
                f"{entry.name}: its token is renewed or replaced {margin}s before it expires, "
                f"less than serve.interval ({config.serve.interval}s): it may expire between ticks"
            )
    return warnings


# -- delivery audit and status ------------------------------------------------------------------


class ServiceDelivered(NamedTuple):
    """A service's token written to its file on a host."""

    user: str
    host: str
    path: str
    token_id: str
    version: int


def _reason(host: str, path: str) -> str:
    return f"node {host}: {path}"


def record_deliveries(
    store: Repository, delivered: Iterable[ServiceDelivered], now: int, actor: str
) -> None:
    """Audit each file written (``delivered``, reason ``node HOST: PATH``), in one transaction."""
    from repository.rows import audit

    items = list(delivered)
    if not items:
        return
    with store.transaction() as s:
        for d in items:
            audit(s, now, DELIVERED, d.user, d.token_id, d.version, actor, _reason(d.host, d.path))


def service_status(
    store: Repository, services: Iterable[ServiceConfig], now: int
) -> list[dict[str, Any]]:
    """Each service's current token (its id, version and times: never the token)
    and, per host, the last file written there (from the audit trail: time,
    token id, version, whether it is the current one), in one read-only
    transaction."""
    from sqlalchemy import select

    from repository.models import EventRow, TokenRow
    from repository.rows import to_epoch

    answer = []
    with store.transaction(read_only=True) as s:
        for entry in services:
            # Never the token itself: only what is shown.
            row = s.execute(
                select(TokenRow.token_id, TokenRow.version, TokenRow.exp, TokenRow.renew_until)
                .where(TokenRow.user == entry.user, TokenRow.state == ACTIVE)
                .order_by(TokenRow.id.desc())
                .limit(1)
            ).first()
            ids = list(s.scalars(select(TokenRow.token_id).where(TokenRow.user == entry.user)))
            last: dict[str, dict[str, Any]] = {}
            for start in range(0, len(ids), 500):  # any backend's parameter limit
                for event in s.scalars(
                    select(EventRow)
                    .where(
                        EventRow.event == DELIVERED, EventRow.token_id.in_(ids[start : start + 500])
                    )
                    .order_by(EventRow.id)
                ):
                    for host in entry.hosts:
                        if event.reason != _reason(host, entry.path):
                            continue
                        at = to_epoch(event.at)
                        if host in last and last[host]["at"] > at:
                            continue
                        last[host] = {
                            "at": at,
                            "token_id": event.token_id,
                            "version": event.version,
                            "current": row is not None
                            and (event.token_id, event.version) == (row[0], row[1]),
                        }
            token = None
            if row is not None:
                exp = to_epoch(row[2])
                token = {
                    "token_id": row[0],
                    "version": row[1],
                    "exp": exp,
                    "renew_until": to_epoch(row[3]),
                    "seconds_left": exp - now,
                }
            answer.append(
                {
                    "user": entry.user,
                    "path": entry.path,
                    "token": token,
                    "hosts": {host: last.get(host) for host in entry.hosts},
                }
            )
    return answer
