"""Conversions between table rows and the plain objects other parts see."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from repository.models import EventRow, TokenRow
from tokenlife.model import TokenRecord


def to_dt(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def to_epoch(value: datetime) -> int:
    return int(value.timestamp())


def to_record(row: TokenRow) -> TokenRecord:
    return TokenRecord(
        token_id=row.token_id,
        user=row.user,
        uid=row.uid,
        gid=row.gid,
        first_issued=to_epoch(row.first_issued),
        iat=to_epoch(row.iat),
        exp=to_epoch(row.exp),
        renew_until=to_epoch(row.renew_until),
        lifetime=row.lifetime,
        key_id=row.key_id,
        version=row.version,
        state=row.state,
        attempts=row.attempts,
        token=row.token,
    )


def audit(
    s: Session,
    at: int,
    event: str,
    user: str,
    token_id: str | None,
    version: int | None,
    actor: str,
    reason: str,
) -> None:
    """One audit event; never the token itself."""
    s.add(
        EventRow(
            at=to_dt(at),
            event=event,
            user=user,
            token_id=token_id,
            version=version,
            actor=actor,
            reason=reason,
        )
    )
