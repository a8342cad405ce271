"""What the login path spools is ingested once, never over a newer token (issue 12, 4).

Once it was: ingested records stayed in the spool, so after ``purge`` the
next tick stored an old fallback token again, superseding the user's
current one without an audit event, and delivery then took the user's token
off the nodes.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from producer.spool import SpoolStore
from repository.store import SqlTokenStore
from tokenlife.records import TokenRecord

DAY = 86400
T0 = 1_800_000_000


def record(user: str, iat: int, token_id: str | None = None) -> TokenRecord:
    return TokenRecord(
        token_id or secrets.token_hex(8), user, 2001, 2001, iat, iat, iat + 2 * DAY,
        iat + 7 * DAY, 2 * DAY, key_id="k", token=f"h.{secrets.token_hex(8)}.s",
    )  # fmt: skip


def stores(tmp_path: Path) -> tuple[SpoolStore, SqlTokenStore]:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    return SpoolStore(spool_dir), SqlTokenStore(f"sqlite:///{tmp_path}/db", spool_dir)


def test_a_purged_token_never_comes_back(tmp_path: Path) -> None:
    spool, store = stores(tmp_path)
    old = record("alice", T0)
    spool.save(old, "minted", "pam")
    assert store.ingest_spool() == 1
    assert os.listdir(spool.directory) == []
    purged, _ = store.purge(before=T0 + 30 * DAY, events_before=None, actor="t", now=T0 + 30 * DAY)
    assert [r.token_id for r in purged] == [old.token_id]
    assert store.ingest_spool() == 0
    assert store.records("alice") == []


def test_a_purged_token_left_in_the_spool_by_a_crash_is_not_stored_again(tmp_path: Path) -> None:
    """The trail remembers it: a claimed record whose deletion a crash prevented."""
    spool, store = stores(tmp_path)
    old = record("alice", T0)
    store.save(old, "minted", "pam")
    store.purge(before=T0 + 30 * DAY, events_before=None, actor="t", now=T0 + 30 * DAY)
    spool.save(old, "minted", "pam")  # as if its deletion never happened
    assert store.ingest_spool() == 0
    assert store.records("alice") == []
    assert os.listdir(spool.directory) == []


def test_an_older_record_never_supersedes_a_newer_token(tmp_path: Path) -> None:
    spool, store = stores(tmp_path)
    newer = record("alice", T0 + 100)
    store.save(newer, "minted", "service")
    older = record("alice", T0)
    spool.save(older, "minted", "pam")
    assert store.ingest_spool() == 0
    current = store.current("alice")
    assert current is not None and current.token_id == newer.token_id
    (ignored,) = [e for e in store.events("alice") if e["event"] == "ignored"]
    assert ignored["token_id"] == older.token_id
    assert ignored["reason"] == f"older than the stored token {newer.token_id} v1"
    assert os.listdir(spool.directory) == []


def test_every_supersede_is_audited(tmp_path: Path) -> None:
    spool, store = stores(tmp_path)
    first, second = record("alice", T0), record("alice", T0 + 10)
    store.save(first, "minted", "service")
    spool.save(second, "minted", "pam")
    assert store.ingest_spool() == 1
    trail = [(e["event"], e["token_id"], e["reason"]) for e in store.events("alice")]
    assert trail == [
        ("minted", first.token_id, ""),
        ("superseded", first.token_id, f"by {second.token_id}"),
        ("minted", second.token_id, ""),
    ]


def test_a_login_during_ingestion_is_not_lost(tmp_path: Path) -> None:
    spool, store = stores(tmp_path)
    spool.save(record("alice", T0), "minted", "pam")
    claimed = spool.claim()
    assert len(claimed) == 1 and claimed[0][0].name.endswith(".claimed")
    fresh = record("alice", T0 + 5)
    spool.save(fresh, "minted", "pam")  # a login while the ingester holds the old one
    spool.done(claimed[0][0])
    assert store.ingest_spool() == 1
    current = store.current("alice")
    assert current is not None and current.token_id == fresh.token_id


def test_a_record_claimed_by_a_dead_ingester_is_taken_again(tmp_path: Path) -> None:
    spool, store = stores(tmp_path)
    lost = record("bob", T0)
    spool.save(lost, "minted", "pam")
    spool.claim()  # ... and the ingester died before storing it
    assert store.ingest_spool() == 1
    current = store.current("bob")
    assert current is not None and current.token_id == lost.token_id


def test_an_unreadable_record_is_set_aside_once(tmp_path: Path) -> None:
    spool, store = stores(tmp_path)
    (spool.directory / "carol.json").write_text("{not json")
    (spool.directory / "dave.json").write_text(json.dumps({"user": "dave"}))
    good = record("erin", T0)
    spool.save(good, "minted", "pam")
    assert store.ingest_spool() == 1
    left = sorted(os.listdir(spool.directory))
    assert [name.split(".")[0] for name in left] == ["carol", "dave"]
    assert all(name.endswith(".claimed.bad") for name in left)
    assert store.ingest_spool() == 0  # not read again
    assert sorted(os.listdir(spool.directory)) == left
