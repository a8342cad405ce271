"""Conversions between table rows and the plain objects other parts see."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from repository.models import DeliveryRow, EventRow, TokenRow
from tokenlife.records import DeliveryRecord, TokenRecord


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


def to_row(record: TokenRecord, next_check: int) -> TokenRow:
    """A new row for ``record``, to be looked at by the renewer at ``next_check``."""
    return TokenRow(
        token_id=record.token_id,
        user=record.user,
        uid=record.uid,
        gid=record.gid,
        first_issued=to_dt(record.first_issued),
        iat=to_dt(record.iat),
        exp=to_dt(record.exp),
        renew_until=to_dt(record.renew_until),
        lifetime=record.lifetime,
        key_id=record.key_id,
        version=record.version,
        state=record.state,
        token=record.token,
        next_check=to_dt(next_check),
        attempts=0,
        last_error="",
    )


def to_delivery(row: DeliveryRow) -> DeliveryRecord:
    return DeliveryRecord(
        user=row.user,
        uid=row.uid,
        node=row.node,
        token_id=row.token_id,
        version=row.version,
        status=row.status,
        attempts=row.attempts,
        last_error=row.last_error,
        next_attempt=to_epoch(row.next_attempt),
        last_seen=to_epoch(row.last_seen),
        updated=to_epoch(row.updated),
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
