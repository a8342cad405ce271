"""The token store contract, run against SQLite and a real PostgreSQL 15.

Every test here goes through ``repository.store.SqlTokenStore``'s public
interface (current, save, records, events, ingest_spool) and runs once per
backend (``store_url``): a fresh SQLite file, and a fresh database on one
throwaway PostgreSQL cluster per session (``postgres``). The cluster runs in
the Pacific/Chatham time zone (UTC+12:45/+13:45) and some tests run with a
local time zone of Asia/Kathmandu (UTC+5:45), so any time-zone slip shows.

"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import jwt
import pytest
import sqlalchemy
from sqlalchemy.exc import SQLAlchemyError

from producer.spool import SpoolStore
from repository.store import SqlTokenStore
from tests.integration.harness.postgres import PostgresServer, free_port
from tokenlife.errors import StoreError
from tokenlife.records import ACTIVE, EXPIRED, TokenRecord

HOUR, DAY = 3600, 86400
NOW = 1_767_225_600 + 17  # 2026-01-01T00:00:17Z
Y2100 = 4_102_444_800  # 2100-01-01T00:00:00Z
MAX_ID = 4_294_967_294  # the largest valid uid/gid (2^32 - 2; -1 means "none")
SIGNING_KEY = secrets.token_bytes(32)
StoreFactory = Callable[..., SqlTokenStore]


@pytest.fixture
def open_store(store_url: str) -> Iterator[StoreFactory]:
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


@pytest.fixture
def store(open_store: StoreFactory) -> SqlTokenStore:
    return open_store()


@pytest.fixture
def odd_local_tz(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the test with a local time zone of UTC+5:45."""
    monkeypatch.setenv("TZ", "Asia/Kathmandu")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# -- records ------------------------------------------------------------------


def record(
    user: str = "tlalice",
    *,
    uid: int = 1001,
    gid: int = 1001,
    first_issued: int = NOW,
    iat: int | None = None,
    lifetime: int = 2 * DAY,
    renew_for: int = 7 * DAY,
    **over: object,
) -> TokenRecord:
    """A realistic minted record: a real HS256 JWT with Slurm's claims."""
    iat = first_issued if iat is None else iat
    renew_until = first_issued + renew_for
    exp = min(iat + lifetime, renew_until)
    token = jwt.encode(
        {"sun": user, "iat": iat, "exp": exp, "uid": uid, "gid": gid},
        SIGNING_KEY,
        algorithm="HS256",
    )
    fields: dict[str, object] = {
        "token_id": secrets.token_hex(8),
        "user": user,
        "uid": uid,
        "gid": gid,
        "first_issued": first_issued,
        "iat": iat,
        "exp": exp,
        "renew_until": renew_until,
        "lifetime": lifetime,
        "key_id": "sha256:" + secrets.token_hex(8),
        "token": token,
        **over,
    }
    return TokenRecord(**fields)  # type: ignore[arg-type]


def same(a: TokenRecord | None, b: TokenRecord) -> bool:
    """Equal including the token (TokenRecord's __eq__ leaves the token out)."""
    return a is not None and a == b and a.token == b.token


# -- save, current, records ---------------------------------------------------


def test_save_then_current_returns_the_record_with_its_token(store: SqlTokenStore) -> None:
    minted = record()
    assert store.current(minted.user) is None
    store.save(minted, "minted", "root", "tokenlife mint")
    assert same(store.current(minted.user), minted)
    listed = store.records()
    assert listed == [minted]
    assert listed[0].token == minted.token
    assert store.records(minted.user) == [minted]
    assert store.records("tlbob") == []
    assert store.current("tlbob") is None


def test_extreme_values_round_trip_exactly(store: SqlTokenStore) -> None:
    """Ids above 2^31, timestamps in 2100, a 32-character user, a long key id."""
    long_user = "u" * 31 + "9"  # POSIX/useradd allow 32 characters
    far = record(
        long_user,
        uid=MAX_ID,
        gid=MAX_ID,
        first_issued=Y2100 - 3 * DAY + 59,
        renew_for=3 * DAY - 59,  # renew_until exactly 2100-01-01T00:00:00Z
        key_id="kid:" + "A" * 43,  # an RFC 7638 thumbprint, as RS256 keys use
    )
    assert far.renew_until == Y2100
    store.save(far, "minted", "root")
    got = store.current(long_user)
    assert same(got, far)
    assert got is not None
    assert (got.uid, got.gid) == (MAX_ID, MAX_ID)
    assert (got.first_issued, got.iat, got.exp, got.renew_until) == (
        far.first_issued,
        far.iat,
        far.exp,
        far.renew_until,
    )
    past_2100 = record("tlbob", first_issued=Y2100 + 1, lifetime=1, renew_for=1)
    store.save(past_2100, "minted", "root")
    assert same(store.current("tlbob"), past_2100)


@pytest.mark.usefixtures("odd_local_tz")
def test_timestamps_are_stored_as_utc(store: SqlTokenStore, store_url: str) -> None:
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


def test_a_new_save_supersedes_the_users_previous_token(store: SqlTokenStore) -> None:
    alice1 = record("tlalice")
    bob1 = record("tlbob", uid=1002, gid=1002)
    store.save(alice1, "minted", "pam")
    store.save(bob1, "minted", "pam")
    alice2 = record("tlalice", first_issued=NOW + HOUR)
    store.save(alice2, "minted", "pam", "new login")

    assert same(store.current("tlalice"), alice2)
    assert store.records("tlalice") == [dataclasses.replace(alice1, state=EXPIRED), alice2]
    assert [r.state for r in store.records("tlalice")] == [EXPIRED, ACTIVE]
    # Users are isolated: bob's token is untouched by alice's new one.
    assert same(store.current("tlbob"), bob1)
    assert store.records("tlbob") == [bob1]
    assert [(r.user, r.state) for r in store.records()] == [
        ("tlalice", EXPIRED),
        ("tlalice", ACTIVE),
        ("tlbob", ACTIVE),
    ]


# -- named constraints --------------------------------------------------------

VIOLATIONS = {
    "ck_tokens_exp_within_renew_until": {"exp": NOW + 7 * DAY + 1, "renew_until": NOW + 7 * DAY},
    "ck_tokens_lifetime_positive": {"lifetime": 0},
    "ck_tokens_iat_before_exp": {"iat": NOW + 2 * DAY + 1, "exp": NOW + 2 * DAY},
    "ck_tokens_state": {"state": "bogus"},
}


@pytest.mark.parametrize(
    ("constraint", "change"),
    [*VIOLATIONS.items(), ("ck_tokens_lifetime_positive", {"lifetime": -3600})],
    ids=[*VIOLATIONS, "negative_lifetime"],
)
def test_named_constraints_refuse_bad_records(
    store: SqlTokenStore, constraint: str, change: dict[str, object]
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


# -- audit events -------------------------------------------------------------


def test_save_audits_one_event_without_the_token(store: SqlTokenStore) -> None:
    alice = record("tlalice")
    store.save(alice, "minted", "root", "tokenlife mint tlalice")
    events = store.events()
    assert events == [
        {
            "at": alice.iat,
            "event": "minted",
            "user": "tlalice",
            "token_id": alice.token_id,
            "version": 1,
            "actor": "root",
            "reason": "tokenlife mint tlalice",
        }
    ]
    bob = record("tlbob", uid=1002, gid=1002)
    store.save(bob, "minted", "pam")
    renewed = record("tlalice", first_issued=NOW, iat=NOW + DAY, version=2)
    store.save(renewed, "renewed", "renewer@tokenhost1", "due: 1h before exp")

    assert [(e["event"], e["actor"]) for e in store.events("tlalice")] == [
        ("minted", "root"),
        ("renewed", "renewer@tokenhost1"),
    ]
    assert store.events("tlalice")[1]["version"] == 2
    assert store.events("tlalice")[1]["reason"] == "due: 1h before exp"
    assert [e["token_id"] for e in store.events("tlbob")] == [bob.token_id]
    assert store.events("nobody") == []
    dump = json.dumps(store.events())
    for token in (alice.token, bob.token, renewed.token):
        assert token not in dump
        assert token.split(".")[2] not in dump  # not even the signature


# -- the login path's spool ---------------------------------------------------


def test_ingest_spool_is_idempotent(open_store: StoreFactory, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool = SpoolStore(spool_dir)
    alice = record("tlalice")
    spool.save(alice, "minted", "pam", "login on ln01")

    first = open_store(spool_dir)
    assert same(first.current("tlalice"), alice)  # ingested when the store opens
    assert first.ingest_spool() == 0
    bob = record("tlbob", uid=1002, gid=1002)
    spool.save(bob, "minted", "pam", "login on ln02")
    assert first.ingest_spool() == 1
    assert first.ingest_spool() == 0

    second = open_store(spool_dir)  # another process on the same store and spool
    assert second.ingest_spool() == 0
    assert second.records() == [alice, bob]
    assert [(e["user"], e["actor"], e["reason"]) for e in second.events()] == [
        ("tlalice", "pam", "login on ln01"),
        ("tlbob", "pam", "login on ln02"),
    ]


def test_malformed_spool_files_are_skipped(open_store: StoreFactory, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    alice = record("tlalice")
    SpoolStore(spool_dir).save(alice, "minted", "pam")
    # Sorted before the good record, so a bad file cannot hide the ones after it.
    (spool_dir / "aaa.json").write_text("{not json")
    (spool_dir / "aab.json").write_text(json.dumps({"user": "aab", "token": "x.y.z"}))
    (spool_dir / "aac.json").write_text("[1, 2, 3]")
    (spool_dir / "aad.json").write_text('"just a string"')
    (spool_dir / "aae.json").write_bytes(b"\xff\xfe\x00garbage")
    (spool_dir / "not-a-record.txt").write_text("ignored")

    store = open_store(spool_dir)
    assert store.records() == [alice]
    assert store.ingest_spool() == 0
    assert [e["user"] for e in store.events()] == ["tlalice"]


def _bad_spool_case(name: str) -> dict[str, object]:
    good = record(name)
    if name == "aaf":  # a field of the wrong type
        return {**good.to_spool(), "exp": "tomorrow", "event": "minted", "actor": "pam"}
    # exp past renew_until: breaks ck_tokens_exp_within_renew_until
    return {**good.to_spool(), "exp": good.renew_until + 1, "event": "minted", "actor": "pam"}


@pytest.mark.parametrize("bad", ["aaf", "aag"], ids=["wrong_type", "breaks_constraint"])
def test_invalid_spool_records_are_skipped(
    open_store: StoreFactory, tmp_path: Path, bad: str
) -> None:
    spool_dir = tmp_path / "spool"
    alice = record("tlalice")
    SpoolStore(spool_dir).save(alice, "minted", "pam")
    (spool_dir / f"{bad}.json").write_text(json.dumps(_bad_spool_case(bad)))

    store = open_store(spool_dir)
    assert store.records() == [alice]
    assert store.ingest_spool() == 0


# -- several stores on one database -------------------------------------------


def test_two_stores_on_one_database_see_each_others_writes(open_store: StoreFactory) -> None:
    host1, host2 = open_store(), open_store()
    first = record("tlalice")
    host1.save(first, "minted", "host1")
    assert same(host2.current("tlalice"), first)

    second = record("tlalice", first_issued=NOW + HOUR)
    host2.save(second, "minted", "host2")
    assert same(host1.current("tlalice"), second)
    assert [r.state for r in host1.records("tlalice")] == [EXPIRED, ACTIVE]
    assert [e["actor"] for e in host1.events()] == ["host1", "host2"]
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
