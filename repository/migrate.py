"""Bring a store's schema to the newest version (Alembic, run in-process)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).parent / "migrations"
HEAD = "0006"


def _alembic_config(connection: Connection) -> object:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(connection: Connection, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection), revision)  # type: ignore[arg-type]


def current(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade to ``revision``; replicas on PostgreSQL take turns (advisory lock)."""
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # SQLite rebuilds a table to alter it (Alembic batch mode); with
            # foreign keys enforced, dropping the old copy of a referenced
            # table fails.  The pragma only works outside a transaction, so
            # it goes to the driver directly (no BEGIN from SQLAlchemy).
            _raw_sqlite(connection, "PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                if not sqlite:
                    connection.execute(text("SELECT pg_advisory_xact_lock(74657)"))  # 'tl'
                if revision == "head" and current(connection) == HEAD:
                    return  # the common case: nothing to do, no Alembic script loading
                upgrade(connection, revision)
        finally:
            if sqlite:
                _raw_sqlite(connection, "PRAGMA foreign_keys=ON")


def _raw_sqlite(connection: Connection, statement: str) -> None:
    raw = connection.connection.driver_connection
    assert raw is not None
    raw.execute(statement)
