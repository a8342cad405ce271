"""Bring a store's schema to the newest version (Alembic, run in-process)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).parent / "migrations"
HEAD = "0002"


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
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(74657)"))  # 'tl'
        if revision == "head" and current(connection) == HEAD:
            return  # the common case: nothing to do, no Alembic script loading
        upgrade(connection, revision)
