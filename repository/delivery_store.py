"""Delivery records in the store: what each node holds of whose token.

The transfer part drives deliveries; the repository only reads them (for
``list``) and asks for removals (``revoke``).
"""

from __future__ import annotations

from sqlalchemy import select, update

from repository.models import DeliveryRow
from repository.rows import to_dt, to_epoch
from repository.store import SqlTokenStore
from tokenlife.model import DeliveryRecord

REMOVING = "removing"


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


class DeliveryStore:
    def __init__(self, store: SqlTokenStore) -> None:
        self.store = store

    def deliveries(self, user: str | None = None) -> list[DeliveryRecord]:
        with self.store._session() as s:
            query = select(DeliveryRow).order_by(DeliveryRow.user, DeliveryRow.node)
            if user:
                query = query.where(DeliveryRow.user == user)
            return [to_delivery(row) for row in s.scalars(query)]

    def request_removal(self, user: str, now: int) -> int:
        """Ask delivery to delete ``user``'s token file from every node at once."""
        with self.store._session() as s:
            result = s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.user == user, DeliveryRow.status != REMOVING)
                .values(status=REMOVING, attempts=0, next_attempt=to_dt(now), updated=to_dt(now))
            )
            return int(result.rowcount)  # type: ignore[attr-defined]
