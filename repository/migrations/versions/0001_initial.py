"""Initial schema: tokens and audit events (tokenlife 0.1 producer).

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

from repository.models import UTCDateTime

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("token_id", sa.String(32), nullable=False, unique=True),
        sa.Column("user", sa.String(32), nullable=False),
        sa.Column("uid", sa.BigInteger, nullable=False),
        sa.Column("gid", sa.BigInteger, nullable=False),
        sa.Column("first_issued", UTCDateTime, nullable=False),
        sa.Column("iat", UTCDateTime, nullable=False),
        sa.Column("exp", UTCDateTime, nullable=False),
        sa.Column("renew_until", UTCDateTime, nullable=False),
        sa.Column("lifetime", sa.Integer, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("token", sa.Text, nullable=False),
        sa.CheckConstraint("exp <= renew_until", name="ck_tokens_exp_within_renew_until"),
        sa.CheckConstraint("iat <= exp", name="ck_tokens_iat_before_exp"),
        sa.CheckConstraint("lifetime > 0", name="ck_tokens_lifetime_positive"),
        sa.CheckConstraint("state IN ('active', 'expired', 'revoked')", name="ck_tokens_state"),
    )
    op.create_index("ix_tokens_user_state", "tokens", ["user", "state"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("user", sa.String(32), nullable=False),
        sa.Column("token_id", sa.String(32), sa.ForeignKey("tokens.token_id"), nullable=True),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
