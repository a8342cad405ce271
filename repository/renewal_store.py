"""The renewer's view of the store: claim due rows in batches, apply outcomes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from repository.models import TokenRow
from repository.rows import audit, to_dt, to_record
from repository.store import SqlTokenStore
from tokenlife.model import ACTIVE, EXPIRED, TokenRecord


@dataclass(frozen=True)
class Renewed:
    token: str
    iat: int
    exp: int
    next_check: int
    key_id: str
    event: str = "renewed"  # or "rotated"


@dataclass(frozen=True)
class Waiting:
    until: int


@dataclass(frozen=True)
class Expired:
    reason: str


@dataclass(frozen=True)
class Failed:
    error: str
    retry_at: int


Outcome = Renewed | Waiting | Expired | Failed


def _apply(s: Session, row: TokenRow, outcome: Outcome, now: int, actor: str) -> None:
    if isinstance(outcome, Renewed):
        row.token, row.iat, row.exp = outcome.token, to_dt(outcome.iat), to_dt(outcome.exp)
        row.version += 1
        row.key_id = outcome.key_id
        row.next_check, row.attempts, row.last_error = to_dt(outcome.next_check), 0, ""
        event, reason = outcome.event, ""
    elif isinstance(outcome, Waiting):
        row.next_check = to_dt(outcome.until)
        return
    elif isinstance(outcome, Expired):
        row.state, event, reason = EXPIRED, "expired", outcome.reason
    else:
        row.attempts += 1
        row.last_error = outcome.error[:500]
        row.next_check = to_dt(outcome.retry_at)
        event, reason = "failed", outcome.error[:500]
    audit(s, now, event, row.user, row.token_id, row.version, actor, reason)


class RenewalStore:
    """The renewer's view of SqlTokenStore: claim due rows, apply outcomes."""

    def __init__(self, store: SqlTokenStore) -> None:
        self.store = store

    def process(
        self,
        now: int,
        handle: Callable[[TokenRecord], Outcome],
        actor: str,
        user: str | None = None,
        force: bool = False,
        batch: int = 100,
        not_key: str | None = None,
    ) -> list[tuple[TokenRecord, Outcome]]:
        """Hand every due token to ``handle`` in batches, one transaction each.

        On PostgreSQL rows are claimed with FOR UPDATE SKIP LOCKED, so
        replicas share the work without waiting on each other; a crash rolls
        the open batch back, leaving those tokens at their old version.
        ``force`` hands over every active token; ``not_key`` every active
        token not signed by that key id (key rotation).
        """
        results: list[tuple[TokenRecord, Outcome]] = []
        after = 0  # forced runs walk the table once by id
        while True:
            with self.store._session() as s:
                query = select(TokenRow).where(TokenRow.state == ACTIVE)
                if user:
                    query = query.where(TokenRow.user == user)
                if not_key is not None:
                    query = query.where(TokenRow.key_id != not_key)
                if force or not_key is not None:
                    query = query.where(TokenRow.id > after).order_by(TokenRow.id)
                else:
                    query = query.where(TokenRow.next_check <= to_dt(now)).order_by(
                        TokenRow.next_check
                    )
                query = query.limit(batch)
                if s.get_bind().dialect.name == "postgresql":
                    query = query.with_for_update(skip_locked=True)
                rows = list(s.scalars(query))
                for row in rows:
                    record = to_record(row)
                    outcome = handle(record)
                    _apply(s, row, outcome, now, actor)
                    results.append((record, outcome))
                    after = max(after, row.id)
            if len(rows) < batch:
                return results

    def set_state(
        self, user: str, state: str, event: str, actor: str, reason: str, now: int
    ) -> int:
        """Mark the user's active tokens ``state`` (revoke); returns how many."""
        with self.store._session() as s:
            rows = list(
                s.scalars(select(TokenRow).where(TokenRow.user == user, TokenRow.state == ACTIVE))
            )
            for row in rows:
                row.state = state
                audit(s, now, event, user, row.token_id, row.version, actor, reason)
            return len(rows)
