"""Delivery records in the store: what each node holds of whose token.

The transfer cycle records what job sources say is needed (``sync_needs``),
asks what is owed (``due``) and records what happened (``record``); ``list``
reads them and ``revoke`` asks for removals.
"""

from __future__ import annotations

from sqlalchemy import delete, insert, select, update

from repository.models import DeliveryRow, EventRow, TokenRow
from repository.rows import to_delivery, to_dt, to_record
from tokenlife.interfaces import Repository
from tokenlife.records import ACTIVE, DeliveryRecord, DeliveryResult, DeliveryTask

PENDING, DELIVERED, FAILED, REMOVING = "pending", "delivered", "failed", "removing"


#: the names this module has always used for a delivery owed and its outcome
Task = DeliveryTask
Result = DeliveryResult


class DeliveryStore:
    def __init__(self, store: Repository) -> None:
        self.store = store

    def deliveries(self, user: str | None = None) -> list[DeliveryRecord]:
        with self.store.transaction(read_only=True) as s:
            query = select(DeliveryRow).order_by(DeliveryRow.user, DeliveryRow.node)
            if user:
                query = query.where(DeliveryRow.user == user)
            return [to_delivery(row) for row in s.scalars(query)]

    def request_removal(self, user: str, now: int) -> int:
        """Ask delivery to delete ``user``'s token file from every node at once."""
        with self.store.transaction() as s:
            result = s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.user == user, DeliveryRow.status != REMOVING)
                .values(status=REMOVING, attempts=0, next_attempt=to_dt(now), updated=to_dt(now))
            )
            return int(result.rowcount)

    def sync_needs(
        self,
        needs: dict[str, set[str]],
        uids: dict[str, int],
        now: int,
        grace: int | None,
        unsure: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        """Record that users have work on nodes (``last_seen = now``).

        With ``grace`` (a complete view of the cluster's jobs), nodes not seen
        for longer than that are queued for removal.  ``unsure``: users whose
        uid could not be looked up this time; the nodes they already have
        count as seen (nothing is removed on a failed lookup's word), no new
        ones are added.
        """
        with self.store.transaction() as s:
            rows = {
                (r.user, r.node): r
                for r in s.scalars(select(DeliveryRow).where(DeliveryRow.user.in_(list(needs))))
            }
            for user, nodes in needs.items():
                if user in unsure:
                    for node in nodes:
                        if (row := rows.get((user, node))) is not None:
                            row.last_seen = to_dt(now)
                    continue
                if user not in uids:
                    continue
                for node in nodes:
                    row = rows.get((user, node))
                    if row is None:
                        s.add(
                            DeliveryRow(
                                user=user,
                                uid=uids[user],
                                node=node,
                                token_id="",
                                version=0,
                                status=PENDING,
                                attempts=0,
                                last_error="",
                                next_attempt=to_dt(now),
                                last_seen=to_dt(now),
                                updated=to_dt(now),
                            )
                        )
                        continue
                    row.last_seen = to_dt(now)
                    if row.status == REMOVING:  # the work came back before the removal
                        row.status, row.attempts, row.next_attempt = PENDING, 0, to_dt(now)
            if grace is not None:
                s.execute(
                    update(DeliveryRow)
                    .where(
                        DeliveryRow.last_seen < to_dt(now - grace),
                        DeliveryRow.status != REMOVING,
                    )
                    .values(status=REMOVING, attempts=0, next_attempt=to_dt(now))
                )

    def due(self, now: int, user: str | None = None, node: str | None = None) -> list[Task]:
        """What nodes are owed: a newer token, or a removal (work or token gone)."""
        with self.store.transaction(read_only=True) as s:
            query = (
                select(DeliveryRow, TokenRow)
                .outerjoin(
                    TokenRow, (TokenRow.user == DeliveryRow.user) & (TokenRow.state == ACTIVE)
                )
                .order_by(DeliveryRow.node, DeliveryRow.user)
            )
            query = query.where(DeliveryRow.next_attempt <= to_dt(now))
            if user:
                query = query.where(DeliveryRow.user == user)
            if node:
                query = query.where(DeliveryRow.node == node)
            tasks = []
            for row, token in s.execute(query).all():
                record = to_delivery(row)
                if row.status == REMOVING or token is None:
                    if row.status == REMOVING or row.version > 0:
                        tasks.append(Task(record, None))  # nothing may stay behind
                elif (token.token_id, token.version) != (row.token_id, row.version):
                    tasks.append(Task(record, to_record(token)))
            return tasks

    def record(self, results: list[Result], now: int, actor: str) -> None:
        """Store a cycle's outcomes (one transaction) and audit deliveries/removals."""
        if not results:
            return
        # Bulk statements: one UPDATE per delivered token version and one
        # DELETE per user (node IN ...), one INSERT for all the audit events;
        # failures (rare) row by row, since each keeps its own backoff.
        delivered: dict[tuple[str, str, int], list[str]] = {}
        removed: dict[str, list[str]] = {}
        events: list[dict[str, object]] = []
        at = to_dt(now)
        for r in results:
            if not r.ok:
                continue
            if r.removed:
                removed.setdefault(r.user, []).append(r.node)
            else:
                delivered.setdefault((r.user, r.token_id, r.version), []).append(r.node)
            event = "removed" if r.removed else "delivered"
            token_id, version = (None, None) if r.removed else (r.token_id, r.version)
            events.append(
                {
                    "at": at,
                    "event": event,
                    "user": r.user,
                    "token_id": token_id,
                    "version": version,
                    "actor": actor,
                    "reason": f"node {r.node}",
                }
            )
        with self.store.transaction() as s:
            for user, nodes in removed.items():
                for chunk in _chunks(nodes):
                    s.execute(
                        delete(DeliveryRow).where(
                            (DeliveryRow.user == user) & DeliveryRow.node.in_(chunk)
                        )
                    )
            for (user, token_id, version), nodes in delivered.items():
                for chunk in _chunks(nodes):
                    s.execute(
                        update(DeliveryRow)
                        .where((DeliveryRow.user == user) & DeliveryRow.node.in_(chunk))
                        .values(
                            token_id=token_id,
                            version=version,
                            status=DELIVERED,
                            attempts=0,
                            last_error="",
                            updated=at,
                            next_attempt=at,
                        )
                    )
            if events:
                s.execute(insert(EventRow), events)
            for r in results:
                if r.ok:
                    continue
                where = (DeliveryRow.user == r.user) & (DeliveryRow.node == r.node)
                row = s.scalars(select(DeliveryRow).where(where)).first()
                if row is None:
                    continue
                if row.status != REMOVING:
                    row.status = FAILED
                row.attempts += 1
                row.last_error = r.error[:500]
                row.next_attempt = to_dt(r.retry_at)
                row.updated = at


def _chunks(items: list[str], size: int = 500) -> list[list[str]]:
    """Slices small enough for any backend's bound-parameter limit."""
    return [items[i : i + size] for i in range(0, len(items), size)]
