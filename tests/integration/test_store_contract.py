"""The token store contract, run against SQLite and a real PostgreSQL 15.

``TestSqlStore`` runs tokenlife.testing.store_contract (every test that goes
through the store's public interface: current, save, records, events,
ingest_spool) against ``repository.store.SqlTokenStore`` once per backend
(``store_url``): a fresh SQLite file, and a fresh database on one throwaway
PostgreSQL cluster per session (``postgres``). The cluster runs in the
Pacific/Chatham time zone (UTC+12:45/+13:45) and some tests run with a local
time zone of Asia/Kathmandu (UTC+5:45), so any time-zone slip shows. The
SQL-specific tests (named constraints, UTC columns, connection failures) are
here too.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.exc import SQLAlchemyError

from repository.store import SqlTokenStore
from tests.integration.harness.postgres import PostgresServer, free_port
from tokenlife.errors import StoreError
from tokenlife.testing.store_contract import (
    DAY,
    HOUR,
    NOW,
    StoreContract,
    StoreFactory,
    record,
    same,
)

# -- named constraints --------------------------------------------------------

VIOLATIONS = {
    "ck_tokens_exp_within_renew_until": {"exp": NOW + 7 * DAY + 1, "renew_until": NOW + 7 * DAY},
    "ck_tokens_lifetime_positive": {"lifetime": 0},
    "ck_tokens_iat_before_exp": {"iat": NOW + 2 * DAY + 1, "exp": NOW + 2 * DAY},
    "ck_tokens_state": {"state": "bogus"},
}


class TestSqlStore(StoreContract):
    @pytest.fixture
    def open_store(self, store_url: str) -> Iterator[StoreFactory]:
        """Make SqlTokenStores on ``store_url`` (each its own engine); disposed after."""
        made: list[SqlTokenStore] = []

        def make(spool_dir: Path | None = None) -> SqlTokenStore:
            store = SqlTokenStore(store_url, spool_dir)
            made.append(store)
            return store

        yield make
        for store in made:
            engine = getattr(store, "engine", None)
            if engine is not None:
                engine.dispose()

    @pytest.mark.usefixtures("odd_local_tz")
    def test_timestamps_are_stored_as_utc(self, store: SqlTokenStore, store_url: str) -> None:
        minted = record(first_issued=NOW, lifetime=2 * DAY, renew_for=7 * DAY)
        store.save(minted, "minted", "root")
        assert same(store.current(minted.user), minted)
        assert store.events()[0]["at"] == minted.iat

        # Another reader of the database (psql, another host) sees UTC wall-clock times.
        engine = sqlalchemy.create_engine(store_url)
        try:
            with engine.connect() as conn:
                row = conn.execute(
                    sqlalchemy.text(
                        "SELECT CAST(iat AS VARCHAR), CAST(exp AS VARCHAR),"
                        " CAST(renew_until AS VARCHAR) FROM tokens"
                    )
                ).one()
        finally:
            engine.dispose()
        expected = [
            datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")
            for t in (minted.iat, minted.exp, minted.renew_until)
        ]
        assert [str(v)[:19] for v in row] == expected

    @pytest.mark.parametrize(
        ("constraint", "change"),
        [*VIOLATIONS.items(), ("ck_tokens_lifetime_positive", {"lifetime": -3600})],
        ids=[*VIOLATIONS, "negative_lifetime"],
    )
    def test_named_constraints_refuse_bad_records(
        self, store: SqlTokenStore, constraint: str, change: dict[str, object]
    ) -> None:
        good = record("tlalice")
        store.save(good, "minted", "root")
        bad = dataclasses.replace(record("tlalice", first_issued=NOW + HOUR), **change)  # type: ignore[arg-type]

        with pytest.raises(StoreError) as caught:
            store.save(bad, "minted", "root", "should not be stored")
        assert not isinstance(caught.value, SQLAlchemyError)
        message = str(caught.value)
        assert constraint in message
        assert "\n" not in message
        assert bad.token not in message
        # Nothing was written, and the good token was not superseded.
        assert same(store.current("tlalice"), good)
        assert store.records() == [good]
        assert [e["token_id"] for e in store.events()] == [good.token_id]

    def test_each_store_on_one_database_has_its_own_engine(
        self, open_store: Callable[[], SqlTokenStore]
    ) -> None:
        """With the contract's test_two_stores_on_one_database_see_each_others_writes:
        the stores share nothing but the database."""
        host1, host2 = open_store(), open_store()
        host1.save(record("tlalice"), "minted", "host1")
        assert host2.current("tlalice") is not None
        assert host1.engine is not host2.engine


# -- failures -----------------------------------------------------------------

PASSWORD = "s3cret-" + secrets.token_hex(8)


@pytest.mark.parametrize("operation", ["current", "save", "records", "events"])
def test_unreachable_postgresql_raises_a_clean_store_error(operation: str) -> None:
    port = free_port()  # nobody listens there
    store = SqlTokenStore(f"postgresql+psycopg://tokenlife:{PASSWORD}@127.0.0.1:{port}/tokens")
    calls: dict[str, Callable[[], object]] = {
        "current": lambda: store.current("tlalice"),
        "save": lambda: store.save(record(), "minted", "root"),
        "records": store.records,
        "events": store.events,
    }
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        calls[operation]()
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "\n" not in message
    assert PASSWORD not in message and PASSWORD not in repr(caught.value)
    assert str(port) in message or "connect" in message


def test_wrong_password_raises_a_clean_store_error(postgres: PostgresServer) -> None:
    name = f"tl_{secrets.token_hex(6)}"
    url = postgres.create_database(name)
    try:
        bad_url = url.replace(postgres.app_password, PASSWORD)
        with pytest.raises(StoreError) as caught:
            SqlTokenStore(bad_url).current("tlalice")
        message = str(caught.value)
        assert "\n" not in message
        assert "password authentication failed" in message
        assert PASSWORD not in message and postgres.app_password not in message
    finally:
        postgres.drop_database(name)


def test_unusable_sqlite_path_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError) as caught:
        SqlTokenStore(f"sqlite:///{blocker}/sub/tokenlife.db").current("tlalice")
    assert "\n" not in str(caught.value)


def test_malformed_url_raises_store_error() -> None:
    with pytest.raises(StoreError) as caught:
        SqlTokenStore(f"postgresql+psycopg://tokenlife:{PASSWORD}@127.0.0.1:port/x").current("a")
    assert PASSWORD not in str(caught.value)
