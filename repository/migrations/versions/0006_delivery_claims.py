"""Delivery claims: which replica works on a delivery record, and until when.

Revision ID: 0006
Revises: 0005

Several hosts may run the delivery cycle against one PostgreSQL store.  Each
claims the records it is about to push (repository/delivery_store.py):
``claimed_by`` names the claim (the replica and its cycle), ``claimed_until``
ends its lease, after which another replica may take the record over.  Both
are NULL on a free record, so every record already stored starts free.

Two nullable columns are added in place (SQLite's ALTER TABLE ADD COLUMN, no
table rebuild) and a partial index holds only the claimed records, which a
replica looks up to record, extend and release its claims.  The definitions
are written out here, not imported, so that this revision builds the same
schema whatever later code says.
"""

import sqlalchemy as sa
from alembic import op

from repository.models import UTCDateTime

revision = "0006"
down_revision = "0005"

_CLAIMED = "claimed_by IS NOT NULL"


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("claimed_by", sa.String(128), nullable=True))
    op.add_column("deliveries", sa.Column("claimed_until", UTCDateTime, nullable=True))
    op.create_index(
        "ix_deliveries_claimed_by",
        "deliveries",
        ["claimed_by"],
        sqlite_where=sa.text(_CLAIMED),
        postgresql_where=sa.text(_CLAIMED),
    )
