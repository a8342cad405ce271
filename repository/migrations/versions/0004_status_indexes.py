"""Indexes for ``tokenlife status`` and the metrics scrape.

Revision ID: 0004
Revises: 0003

Without them a snapshot of a store with 1,000,000 tokens read every active
token twice (the soonest exp and renew-until), every delivery record per
node, and fetched each event of the last 24 hours by row.  Building them
takes a few seconds per million rows, with writes to the table waiting
(PostgreSQL's CONCURRENTLY cannot run in the migration's transaction).
"""

import sqlalchemy as sa
from alembic import op

from repository.models import AT_LIMIT, RENEWABLE

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    # The soonest exp of an active token, in two halves: those renewal can
    # still extend (the alert "renewal overdue" reads this one alone) and
    # those at their renew-until.  One index on (state, exp) would leave the
    # planners walking past the second kind, row by row, to find the first.
    for name, condition in (
        ("ix_tokens_renewable_exp", RENEWABLE),
        ("ix_tokens_at_limit_exp", AT_LIMIT),
    ):
        op.create_index(
            name,
            "tokens",
            ["exp"],
            sqlite_where=sa.text(condition),
            postgresql_where=sa.text(condition),
        )
    # The soonest renew-until; and tokens per state counted in the index.
    op.create_index("ix_tokens_state_renew_until", "tokens", ["state", "renew_until"])
    # Events per kind since a time, the last renewal: one range per kind.
    op.create_index("ix_events_event_at", "events", ["event", "at"])
    # Pending and failed records per node, records per status.
    op.create_index("ix_deliveries_status_node", "deliveries", ["status", "node"])
