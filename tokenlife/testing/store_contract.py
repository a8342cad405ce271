"""The token store contract: what every ``[store]`` backend (a Repository) must do.

A backend proves itself with a subclass that overrides one fixture, ``open_store``:
a factory ``(spool_dir: Path | None = None) -> store``, every store it makes on the
same fresh, empty database, and closed after the test::

    class TestMyStore(StoreContract):
        @pytest.fixture
        def open_store(self, tmp_path: Path) -> Iterator[StoreFactory]:
            made: list[MyStore] = []
            def make(spool_dir: Path | None = None) -> MyStore:
                made.append(MyStore(f"my://{tmp_path}/db", spool_dir))
                return made[-1]
            yield make
            for store in made:
                store.close()

tokenlife runs it against SQLite and PostgreSQL (tests/integration/test_store_contract.py).
``pytest.register_assert_rewrite("tokenlife.testing")`` in a conftest.py details failures.
The tests use only the Repository interface (tokenlife.interfaces) and realistic
records: real HS256 JWTs with Slurm's claims, ids above 2^31, times in 2100.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import jwt
import pytest

from producer.spool import SpoolStore
from tokenlife.errors import StoreError
from tokenlife.interfaces import Repository
from tokenlife.records import ACTIVE, EXPIRED, TokenRecord

HOUR, DAY = 3600, 86400
NOW = 1_767_225_600 + 17  # 2026-01-01T00:00:17Z
Y2100 = 4_102_444_800  # 2100-01-01T00:00:00Z
MAX_ID = 4_294_967_294  # the largest valid uid/gid (2^32 - 2; -1 means "none")
SIGNING_KEY = secrets.token_bytes(32)

#: changes that break a record's invariants; a store refuses a record with any of them
BAD_CHANGES: dict[str, dict[str, object]] = {
    "exp_after_renew_until": {"exp": NOW + 7 * DAY + 1, "renew_until": NOW + 7 * DAY},
    "zero_lifetime": {"lifetime": 0},
    "iat_after_exp": {"iat": NOW + 2 * DAY + 1, "exp": NOW + 2 * DAY},
    "unknown_state": {"state": "bogus"},
    "negative_lifetime": {"lifetime": -3600},
}


class StoreFactory(Protocol):
    """Makes a store on the test's database; ``spool_dir``: the login path's spool."""

    def __call__(self, spool_dir: Path | None = None) -> Repository: ...


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


def _bad_spool_case(name: str) -> dict[str, object]:
    good = record(name)
    if name == "aaf":  # a field of the wrong type
        return {**good.to_spool(), "exp": "tomorrow", "event": "minted", "actor": "pam"}
    # exp past renew_until: breaks ck_tokens_exp_within_renew_until
    return {**good.to_spool(), "exp": good.renew_until + 1, "event": "minted", "actor": "pam"}


class StoreContract:
    @pytest.fixture
    def open_store(self) -> StoreFactory:
        raise NotImplementedError("a subclass provides open_store: (spool_dir=None) -> store")

    @pytest.fixture
    def store(self, open_store: StoreFactory) -> Repository:
        return open_store()

    @pytest.fixture
    def odd_local_tz(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """Run the test with a local time zone of UTC+5:45."""
        monkeypatch.setenv("TZ", "Asia/Kathmandu")
        time.tzset()
        yield
        monkeypatch.undo()
        time.tzset()

    # -- save, current, records ---------------------------------------------------

    def test_save_then_current_returns_the_record_with_its_token(self, store: Repository) -> None:
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

    def test_extreme_values_round_trip_exactly(self, store: Repository) -> None:
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
    def test_times_do_not_depend_on_the_local_time_zone(self, store: Repository) -> None:
        """Epoch seconds in, the same epoch seconds out, whatever TZ says (UTC+5:45 here)."""
        minted = record(first_issued=NOW, lifetime=2 * DAY, renew_for=7 * DAY)
        store.save(minted, "minted", "root")
        assert same(store.current(minted.user), minted)
        assert store.events()[0]["at"] == minted.iat

    def test_a_new_save_supersedes_the_users_previous_token(self, store: Repository) -> None:
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

    @pytest.mark.parametrize("change", BAD_CHANGES.values(), ids=BAD_CHANGES)
    def test_a_record_breaking_its_invariants_is_refused(
        self, store: Repository, change: dict[str, object]
    ) -> None:
        """A clean one-line StoreError without the token; nothing written or superseded."""
        good = record("tlalice")
        store.save(good, "minted", "root")
        bad = dataclasses.replace(record("tlalice", first_issued=NOW + HOUR), **change)  # type: ignore[arg-type]

        with pytest.raises(StoreError) as caught:
            store.save(bad, "minted", "root", "should not be stored")
        message = str(caught.value)
        assert "\n" not in message
        assert bad.token not in message
        assert same(store.current("tlalice"), good)
        assert store.records() == [good]
        assert [e["token_id"] for e in store.events()] == [good.token_id]

    # -- audit events -------------------------------------------------------------

    def test_save_audits_one_event_without_the_token(self, store: Repository) -> None:
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

        # A save that replaces the user's active token audits that too.
        assert [(e["event"], e["actor"]) for e in store.events("tlalice")] == [
            ("minted", "root"),
            ("superseded", "renewer@tokenhost1"),
            ("renewed", "renewer@tokenhost1"),
        ]
        superseded = store.events("tlalice")[1]
        assert (superseded["token_id"], superseded["version"]) == (alice.token_id, 1)
        assert superseded["reason"] == f"by {renewed.token_id}"
        assert store.events("tlalice")[2]["version"] == 2
        assert store.events("tlalice")[2]["reason"] == "due: 1h before exp"
        assert [e["token_id"] for e in store.events("tlbob")] == [bob.token_id]
        assert store.events("nobody") == []
        dump = json.dumps(store.events())
        for token in (alice.token, bob.token, renewed.token):
            assert token not in dump
            assert token.split(".")[2] not in dump  # not even the signature

    # -- the login path's spool ---------------------------------------------------

    def test_ingest_spool_is_idempotent(self, open_store: StoreFactory, tmp_path: Path) -> None:
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

    def test_malformed_spool_files_are_skipped(
        self, open_store: StoreFactory, tmp_path: Path
    ) -> None:
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

    @pytest.mark.parametrize("bad", ["aaf", "aag"], ids=["wrong_type", "breaks_constraint"])
    def test_invalid_spool_records_are_skipped(
        self, open_store: StoreFactory, tmp_path: Path, bad: str
    ) -> None:
        spool_dir = tmp_path / "spool"
        alice = record("tlalice")
        SpoolStore(spool_dir).save(alice, "minted", "pam")
        (spool_dir / f"{bad}.json").write_text(json.dumps(_bad_spool_case(bad)))

        store = open_store(spool_dir)
        assert store.records() == [alice]
        assert store.ingest_spool() == 0

    # -- several stores on one database -------------------------------------------

    def test_two_stores_on_one_database_see_each_others_writes(
        self, open_store: StoreFactory
    ) -> None:
        host1, host2 = open_store(), open_store()
        first = record("tlalice")
        host1.save(first, "minted", "host1")
        assert same(host2.current("tlalice"), first)

        second = record("tlalice", first_issued=NOW + HOUR)
        host2.save(second, "minted", "host2")
        assert same(host1.current("tlalice"), second)
        assert [r.state for r in host1.records("tlalice")] == [EXPIRED, ACTIVE]
        assert [(e["event"], e["actor"]) for e in host1.events()] == [
            ("minted", "host1"),
            ("superseded", "host2"),
            ("minted", "host2"),
        ]
