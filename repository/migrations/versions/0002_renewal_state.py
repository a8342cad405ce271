"""Renewal bookkeeping: next_check (indexed with state), attempts, last_error.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from repository.models import UTCDateTime

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("next_check", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_error", sa.Text, nullable=False, server_default=""))
    # Existing tokens are looked at by the first tick, which sets the real time.
    op.execute("UPDATE tokens SET next_check = iat")
    with op.batch_alter_table("tokens") as batch:
        batch.alter_column("next_check", nullable=False)
    op.create_index("ix_tokens_state_next_check", "tokens", ["state", "next_check"])
