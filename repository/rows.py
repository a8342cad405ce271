"""Conversions between table rows and the plain objects other parts see."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from repository.models import DeliveryRow, EventRow, TokenRow
from tokenlife.records import DeliveryRecord, TokenRecord


def to_dt(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def to_epoch(value: datetime) -> int:
    return int(value.timestamp())


#: TokenRecord's fields that the tables keep as timestamps (epoch seconds in records)
TIMES = frozenset({"first_issued", "iat", "exp", "renew_until"})
_FIELDS = tuple(f.name for f in fields(TokenRecord))


def to_record(row: TokenRow) -> TokenRecord:
    values: dict[str, Any] = {name: getattr(row, name) for name in _FIELDS}
    values.update((name, to_epoch(values[name])) for name in TIMES)
    return TokenRecord(**values)


def to_row(record: TokenRecord, next_check: int) -> TokenRow:
    """A new row for ``record``, to be looked at by the renewer at ``next_check``."""
    values: dict[str, Any] = {name: getattr(record, name) for name in _FIELDS}
    values.update(attempts=0, last_error="", next_check=next_check)
    times = TIMES | {"next_check"}
    return TokenRow(**{k: to_dt(v) if k in times else v for k, v in values.items()})


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
