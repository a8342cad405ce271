"""Schema upgrades: a store made by an older release opens with its data intact."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, inspect, text

from repository.migrate import HEAD, current, migrate
from repository.store import SqlTokenStore


def test_upgrade_from_0001_keeps_tokens(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    engine = create_engine(url)
    migrate(engine, "0001")
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO tokens (token_id, user, uid, gid, first_issued, iat, exp, "
                "renew_until, "
                "lifetime, key_id, version, state, token) VALUES ('abc', 'alice', 1000, 1000, "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00', '2026-01-03 00:00:00', "
                "'2026-01-08 00:00:00', 172800, 'k', 3, 'active', 'a.b.c')"
            )
        )
    engine.dispose()
    (tmp_path / "old.db").chmod(0o600)  # the upgrade note: a readable store is refused now
    store = SqlTokenStore(url)
    record = store.current("alice")
    assert record is not None and (record.version, record.token, record.attempts) == (3, "a.b.c", 0)
    with store.engine.connect() as c:
        assert current(c) == HEAD
    columns = {col["name"] for col in inspect(store.engine).get_columns("tokens")}
    assert {"next_check", "attempts", "last_error"} <= columns
    indexes = {ix["name"] for ix in inspect(store.engine).get_indexes("tokens")}
    assert "ix_tokens_state_next_check" in indexes


def test_models_match_migrations(tmp_path: Path) -> None:
    """What the ORM declares is what the migrations build (no drift)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from repository.models import Base

    engine = create_engine(f"sqlite:///{tmp_path}/db")
    migrate(engine)
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diff == []
