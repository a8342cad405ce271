"""Counts kept by the database: tokens per state, audit events per kind and 10 minutes.

Revision ID: 0005
Revises: 0004

``tokenlife status`` and the metrics scrape counted the tokens per state in
an index (linear in the tokens: about 130 ms with a million on PostgreSQL),
and ``status`` the last 24 hours' events per kind (linear in that day's
events: about 175 ms for a million on PostgreSQL).  From here on, triggers
append what each write changes, in its own transaction, whoever writes (any
replica, any release, psql):

* ``token_counts``: ``(state, +1)`` for a token that enters a state,
  ``(state, -1)`` for one that leaves it (row triggers on ``tokens``);
* ``event_counts`` (PostgreSQL): ``(bucket, event, n)`` per 10 minutes
  (``bucket``: epoch seconds // 600) and kind of the events a statement
  inserts, ``-n`` for those it deletes (statement triggers on ``events``,
  over their transition tables).  SQLite keeps the table empty: it counts
  a day's events in an index fast enough, and its triggers cost per row.

repository/counts.py reads them, folds them, and says why it is done so.

The tables start with the rows already stored, counted with writes to
``tokens`` and ``events`` held off (PostgreSQL: SHARE ROW EXCLUSIVE, which
CREATE TRIGGER takes anyway; SQLite: the migration is the only writer), so
nothing is counted twice or missed.  Well under a second per million rows.

The trigger bodies are written out here, not imported, so that this
revision builds the same schema whatever later code says.  A later
migration that rebuilds ``tokens`` or ``events`` (SQLite's batch mode copies
a table and drops the old one, its triggers with it) must create them
again: tests/integration/test_counts.py fails otherwise.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


_PG_TOKENS = """
CREATE FUNCTION tokens_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO token_counts (state, n) VALUES (NEW.state, 1);
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO token_counts (state, n) VALUES (OLD.state, -1), (NEW.state, 1);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO token_counts (state, n) VALUES (OLD.state, -1);
    ELSE  -- TRUNCATE: no token left, whatever the rows said
        TRUNCATE token_counts;
    END IF;
    RETURN NULL;
END
$$
"""
# AFTER, not BEFORE: a row skipped or refused never counts.  The UPDATE
# trigger fires only for statements that set ``state`` (a renewal does not),
# and only for rows whose state really changes.
_PG_TOKEN_TRIGGERS = (
    "CREATE TRIGGER tokens_count_insert AFTER INSERT ON tokens "
    "FOR EACH ROW EXECUTE FUNCTION tokens_count()",
    "CREATE TRIGGER tokens_count_update AFTER UPDATE OF state ON tokens "
    "FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION tokens_count()",
    "CREATE TRIGGER tokens_count_delete AFTER DELETE ON tokens "
    "FOR EACH ROW EXECUTE FUNCTION tokens_count()",
    "CREATE TRIGGER tokens_count_truncate AFTER TRUNCATE ON tokens "
    "FOR EACH STATEMENT EXECUTE FUNCTION tokens_count()",
)

# Events: once per statement (a renewal batch inserts a thousand events in
# one), grouped; a trigger with transition tables serves one kind of write.
# The bucket of an event: floor(extract(epoch FROM at) / 600)::bigint (counts.BUCKET).
_PG_EVENT_FUNCTIONS = (
    """
CREATE FUNCTION events_count_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_counts (bucket, event, n)
    SELECT floor(extract(epoch FROM at) / 600)::bigint, event, count(*)
    FROM added GROUP BY 1, 2;
    RETURN NULL;
END
$$
""",
    """
CREATE FUNCTION events_count_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_counts (bucket, event, n)
    SELECT floor(extract(epoch FROM at) / 600)::bigint, event, -count(*)
    FROM removed GROUP BY 1, 2;
    RETURN NULL;
END
$$
""",
    """
CREATE FUNCTION events_count_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE event_counts;
    RETURN NULL;
END
$$
""",
)
_PG_EVENT_TRIGGERS = (
    "CREATE TRIGGER events_count_insert AFTER INSERT ON events "
    "REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION events_count_added()",
    "CREATE TRIGGER events_count_delete AFTER DELETE ON events "
    "REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION events_count_removed()",
    # Nothing updates an event; should anything, it leaves its old group and joins its new one.
    "CREATE TRIGGER events_count_update_old AFTER UPDATE ON events "
    "REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION events_count_removed()",
    "CREATE TRIGGER events_count_update_new AFTER UPDATE ON events "
    "REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION events_count_added()",
    "CREATE TRIGGER events_count_truncate AFTER TRUNCATE ON events "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_count_truncated()",
)

_PG_COUNT_EVENTS = (
    "INSERT INTO event_counts (bucket, event, n) "
    "SELECT floor(extract(epoch FROM at) / 600)::bigint, event, count(*) FROM events GROUP BY 1, 2"
)

# SQLite: row triggers (it has no others), and no TRUNCATE (DELETE without
# WHERE runs them).  Tokens only: SQLite counts a day's events in
# ix_events_event_at in a few milliseconds, and a trigger on ``events``
# would cost every renewal several microseconds (repository/counts.py).
_SQLITE_TRIGGERS = (
    "CREATE TRIGGER tokens_count_insert AFTER INSERT ON tokens BEGIN "
    "INSERT INTO token_counts (state, n) VALUES (NEW.state, 1); END",
    "CREATE TRIGGER tokens_count_update AFTER UPDATE OF state ON tokens "
    "WHEN OLD.state IS NOT NEW.state BEGIN "
    "INSERT INTO token_counts (state, n) VALUES (OLD.state, -1), (NEW.state, 1); END",
    "CREATE TRIGGER tokens_count_delete AFTER DELETE ON tokens BEGIN "
    "INSERT INTO token_counts (state, n) VALUES (OLD.state, -1); END",
)


def _id() -> sa.Column[int]:
    # 64 bits on PostgreSQL (every append takes an id); SQLite's INTEGER key is.
    wide = sa.BigInteger().with_variant(sa.Integer, "sqlite")
    return sa.Column("id", wide, primary_key=True, autoincrement=True)


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        # Writers of other hosts wait from here to the commit: the counts
        # below and the triggers see the same rows.
        op.execute("LOCK TABLE tokens, events IN SHARE ROW EXCLUSIVE MODE")
    op.create_table(
        "token_counts",
        _id(),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "event_counts",
        _id(),
        sa.Column("bucket", sa.BigInteger, nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    if postgresql:
        for statement in (
            _PG_TOKENS,
            *_PG_EVENT_FUNCTIONS,
            *_PG_TOKEN_TRIGGERS,
            *_PG_EVENT_TRIGGERS,
        ):
            op.execute(statement)
    else:
        for trigger in _SQLITE_TRIGGERS:
            op.execute(trigger)
    op.execute(
        "INSERT INTO token_counts (state, n) SELECT state, count(*) FROM tokens GROUP BY state"
    )
    if postgresql:
        op.execute(_PG_COUNT_EVENTS)
