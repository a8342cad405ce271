"""Delivery records; audit events outlive the tokens they name (for purge).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from repository.models import UTCDateTime

revision = "0003"
down_revision = "0002"

_EVENT_COLUMNS = 'id, at, event, "user", token_id, version, actor, reason'


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user", sa.String(32), nullable=False),
        sa.Column("uid", sa.BigInteger, nullable=False),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("token_id", sa.String(32), nullable=False, server_default=""),
        sa.Column("version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=False, server_default=""),
        sa.Column("next_attempt", UTCDateTime, nullable=False),
        sa.Column("last_seen", UTCDateTime, nullable=False),
        sa.Column("updated", UTCDateTime, nullable=False),
        sa.UniqueConstraint("user", "node", name="uq_deliveries_user_node"),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed', 'removing')",
            name="ck_deliveries_status",
        ),
        sa.CheckConstraint("attempts >= 0", name="ck_deliveries_attempts"),
        sa.CheckConstraint("version >= 0", name="ck_deliveries_version"),
    )
    op.create_index("ix_deliveries_next_attempt", "deliveries", ["next_attempt"])
    op.create_index("ix_deliveries_node", "deliveries", ["node"])

    # events.token_id referenced tokens.token_id, so a purged token would take
    # its audit trail with it.  The 0001 constraint has no portable name:
    # rebuild the table without it (same columns, same ids).
    op.create_table(
        "events_0003",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("user", sa.String(32), nullable=False),
        sa.Column("token_id", sa.String(32), nullable=True),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.execute(
        'INSERT INTO events_0003 (id, at, event, "user", token_id, version, actor, reason) '
        'SELECT id, at, event, "user", token_id, version, actor, reason FROM events'
    )
    op.drop_table("events")
    op.rename_table("events_0003", "events")
    op.create_index("ix_events_token_id", "events", ["token_id"])
    op.create_index("ix_events_at", "events", ["at"])
    if op.get_bind().dialect.name == "postgresql":
        # The copied ids came with the rows: move the id sequence past them.
        op.execute(
            "SELECT setval(pg_get_serial_sequence('events', 'id'), "
            "COALESCE((SELECT MAX(id) FROM events), 0) + 1, false)"
        )
