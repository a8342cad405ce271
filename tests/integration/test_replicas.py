"""Renewer replicas and crashes, with renewers as real separate OS processes.

* Replicas: two renewer processes (``harness/renew_worker.py``), released
  together through a stdin barrier, renew one PostgreSQL store of 10,000 due
  tokens at once.  Every token must be renewed exactly once (one ``renewed``
  audit event each, version 2), both replicas must have done part of the
  work (else nothing concurrent was tested), and nothing may be left due.
* Crash safety, on SQLite and PostgreSQL: a renewer is SIGKILLed mid-run at a
  deterministic point (the worker parks itself there: inside a batch before
  it is written, or inside the COMMIT of a fully written batch).  Every token
  must then be either untouched (version 1, its old token) or renewed
  (version 2, a new token whose signature and claims match the row), with
  exactly one ``renewed`` event per renewed token; the next tick (a new
  process) finishes the rest.

Tokens are seeded with one Core bulk insert, for synthetic users that the
workers' injected user database knows (no /etc/passwd entries).  The clock
is fixed (FakeClock): nothing here asserts on time.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import secrets
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from sqlalchemy import create_engine, func, insert, select, text

from producer.keys import FileKeySource, HS256Key
from repository.models import TokenRow
from repository.renewal_store import RenewalStore
from repository.renewer import Renewer
from repository.rows import to_dt
from repository.store import SqlTokenStore
from tests.integration.harness.line_worker import DEADLINE, LineWorker, wait_for_backends_gone
from tests.integration.harness.postgres import PostgresServer
from tests.integration.harness.renew_worker import TOKEN, synthetic_user, user_name
from tokenlife.config import Config, KeyConfig
from tokenlife.slurm_jwt import build_claims
from tokenlife.testing.fakes import FakeClock

NOW = 1_800_000_000
OLD_IAT = NOW - 3000
OLD_EXP = NOW + 600  # due since NOW - 300 (900 s before exp)
RENEW_UNTIL = OLD_IAT + TOKEN.renew_until
NEW_EXP = NOW + TOKEN.lifetime
#: the renewer's batch (rows claimed per transaction), whatever it is tuned to
BATCH = int(inspect.signature(RenewalStore.process).parameters["batch"].default)
REPLICA_TOKENS = max(10_000, 10 * BATCH)  # many batches each, or one replica takes all
CRASH_TOKENS = 3 * BATCH  # three batches: the victim parks in the 2nd (lookup) or 3rd (commit)
HANG_AFTER = BATCH + BATCH // 2  # halfway through the second batch
WORKER = "tests.integration.harness.renew_worker"


# -- fixtures -------------------------------------------------------------------


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, bytes]:
    """An HS256 key in a 0600 file (the workers load it as production does)."""
    secret = secrets.token_bytes(32)
    path = tmp_path / "jwt_hs256.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    return path, secret


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    name = f"tl_{secrets.token_hex(6)}"
    url = postgres.create_database(name)
    try:
        yield url
    finally:
        postgres.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store/tokenlife.db"
    return str(request.getfixturevalue("pg_url"))


# -- seeding and inspecting the store ---------------------------------------------


def seed(url: str, count: int, secret: bytes) -> dict[str, str]:
    """``count`` due version-1 tokens, one per synthetic user; token_id -> old token."""
    signer = HS256Key(secret)
    rows: list[dict[str, Any]] = []
    for i in range(count):
        name = user_name(i)
        info = synthetic_user(name)
        rows.append(
            {
                "token_id": secrets.token_hex(16),
                "user": name,
                "uid": info.uid,
                "gid": info.gid,
                "first_issued": to_dt(OLD_IAT),
                "iat": to_dt(OLD_IAT),
                "exp": to_dt(OLD_EXP),
                "renew_until": to_dt(RENEW_UNTIL),
                "lifetime": TOKEN.lifetime,
                "key_id": signer.key_id,
                "version": 1,
                "state": "active",
                "token": signer.sign(build_claims(info, OLD_IAT, OLD_EXP)),
                "next_check": to_dt(NOW - 300),
                "attempts": 0,
                "last_error": "",
            }
        )
    store = SqlTokenStore(url)
    store.current("nobody")  # creates the schema
    try:
        with store.engine.begin() as conn:
            conn.execute(insert(TokenRow), rows)
    finally:
        store.engine.dispose()
    return {row["token_id"]: row["token"] for row in rows}


class Snapshot:
    """Rows, renewal events and the number still due, read in one go."""

    def __init__(self, url: str) -> None:
        store = SqlTokenStore(url)
        try:
            self.records = {r.token_id: r for r in store.records()}
            events = store.events()
            self.renewals = [e for e in events if e["event"] == "renewed"]
            self.others = [e for e in events if e["event"] != "renewed"]
            with store.engine.connect() as conn:
                self.due = conn.scalar(
                    select(func.count())
                    .select_from(TokenRow)
                    .where(TokenRow.state == "active", TokenRow.next_check <= to_dt(NOW))
                )
        finally:
            store.engine.dispose()

    def renewed_ids(self) -> Counter[str]:
        return Counter(str(e["token_id"]) for e in self.renewals)

    def versions(self) -> Counter[int]:
        return Counter(r.version for r in self.records.values())


def check_consistent(snap: Snapshot, old: dict[str, str], secret: bytes) -> int:
    """Every token old-and-untouched or renewed-once-and-valid; returns how many renewed."""
    assert set(snap.records) == set(old)
    assert snap.others == []  # no failed/expired events
    per_token = snap.renewed_ids()
    renewed = 0
    for token_id, record in snap.records.items():
        info = synthetic_user(record.user)
        assert record.state == "active"
        assert (record.uid, record.gid, record.renew_until) == (info.uid, info.gid, RENEW_UNTIL)
        if record.version == 1:
            assert record.token == old[token_id], f"{token_id}: v1 with a changed token"
            assert (record.iat, record.exp) == (OLD_IAT, OLD_EXP)
            assert per_token[token_id] == 0, f"{token_id}: renewal event but still v1"
            continue
        assert record.version == 2, f"{token_id}: version {record.version}"
        assert record.token != old[token_id]
        claims = jwt.decode(
            record.token,
            secret,
            algorithms=["HS256"],
            options={"verify_exp": False, "verify_iat": False},
        )
        assert (claims["iat"], claims["exp"]) == (record.iat, record.exp) == (NOW, NEW_EXP)
        assert (claims["sun"], claims["uid"], claims["gid"]) == (info.name, info.uid, info.gid)
        assert per_token[token_id] == 1, f"{token_id}: {per_token[token_id]} renewal events"
        renewed += 1
    assert len(snap.renewals) == renewed
    assert {e["version"] for e in snap.renewals} <= {2}
    return renewed


def tick_in_process(url: str, key_path: Path) -> tuple[int, int, int, int]:
    """One more tick at NOW (a fresh Renewer, as after a restart)."""
    store = SqlTokenStore(url)
    try:
        config = Config(key=KeyConfig(path=key_path), token=TOKEN)
        renewer = Renewer(
            config,
            FileKeySource(config.key),
            store,
            clock=FakeClock(NOW),
            actor="check",
            users=synthetic_user,
        )
        s = renewer.tick()
        return s.renewed, s.waiting, s.expired, s.failed
    finally:
        store.engine.dispose()


# -- worker processes ----------------------------------------------------------------


class Worker(LineWorker):
    """One renew_worker process: job on stdin, then ``ready``, barrier, summary."""

    def __init__(self, tmp_path: Path, job: dict[str, Any]) -> None:
        super().__init__(WORKER, tmp_path, job)

    def go(self) -> None:
        self.send("go")

    def summary(self) -> dict[str, Any]:
        result = self.result()
        assert self.proc.wait(timeout=DEADLINE) == 0, self.stderr()
        return result


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.close()


def start(workers: list[Worker], tmp_path: Path, job: dict[str, Any]) -> Worker:
    worker = Worker(tmp_path, job)
    workers.append(worker)
    return worker


def versions_now(url: str) -> Counter[int]:
    """How many rows are at which version, read without waiting for any lock.

    A plain engine, not SqlTokenStore: the store begins every SQLite
    transaction with BEGIN IMMEDIATE, which would queue behind the victim.
    """
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(TokenRow.version, func.count()).group_by(TokenRow.version))
            return Counter({int(version): int(n) for version, n in rows})
    finally:
        engine.dispose()


def assert_parked_in_transaction(url: str, application_name: str, due: int) -> None:
    """The kill will land with the victim's batch transaction open (what the test is about)."""
    if url.startswith("sqlite"):  # the store's BEGIN IMMEDIATE: it holds the write lock
        db = url.split("///", 1)[1]
        with (
            contextlib.closing(sqlite3.connect(db, timeout=0)) as conn,
            pytest.raises(sqlite3.OperationalError, match="locked"),
        ):
            conn.execute("BEGIN IMMEDIATE")
        return
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            state = conn.scalar(
                text("SELECT state FROM pg_stat_activity WHERE application_name = :n"),
                {"n": application_name},
            )
            assert state == "idle in transaction"
            lockable = conn.scalar(
                select(func.count()).select_from(
                    select(TokenRow.id)
                    .where(TokenRow.state == "active", TokenRow.next_check <= to_dt(NOW))
                    .with_for_update(skip_locked=True)
                    .subquery()
                )
            )
            assert lockable is not None and lockable < due  # the open batch's rows are locked
    finally:
        engine.dispose()


# -- the tests -----------------------------------------------------------------------


def test_two_replicas_renew_every_token_exactly_once(
    pg_url: str, key: tuple[Path, bytes], tmp_path: Path, workers: list[Worker]
) -> None:
    key_path, secret = key
    old = seed(pg_url, REPLICA_TOKENS, secret)
    job = {"url": pg_url, "key_file": str(key_path), "now": NOW}
    replicas = [start(workers, tmp_path, {**job, "actor": f"replica-{n}"}) for n in "ab"]
    for replica in replicas:
        replica.expect("ready")  # both imported, connected and migrated
    for replica in replicas:
        replica.go()
    summaries = {r.name: r.summary() for r in replicas}

    for summary in summaries.values():
        assert (summary["expired"], summary["failed"], summary["errors"]) == (0, 0, [])
    split = {name: s["renewed"] for name, s in summaries.items()}
    assert sum(split.values()) == REPLICA_TOKENS, split
    # Both took part: had one finished before the other started, the late
    # one would have found nothing due and the test would prove nothing.
    assert all(n > 0 for n in split.values()), split

    snap = Snapshot(pg_url)
    assert check_consistent(snap, old, secret) == REPLICA_TOKENS
    assert snap.versions() == {2: REPLICA_TOKENS}
    assert snap.due == 0
    # The audit trail agrees with each replica's own count.
    assert Counter(str(e["actor"]) for e in snap.renewals) == split
    actors = [e["actor"] for e in snap.renewals]  # in the order they were written
    switches = sum(a != b for a, b in itertools.pairwise(actors))
    print(f"\nreplica split {split}; the event log switches replica {switches} times")
    assert tick_in_process(pg_url, key_path) == (0, 0, 0, 0)  # nothing due, nothing looked at


@pytest.mark.parametrize("point", ["lookup", "commit"])
def test_sigkill_mid_batch_loses_nothing(
    store_url: str, point: str, key: tuple[Path, bytes], tmp_path: Path, workers: list[Worker]
) -> None:
    key_path, secret = key
    old = seed(store_url, CRASH_TOKENS, secret)
    postgres = store_url.startswith("postgresql")
    app_name = f"tl_crash_{secrets.token_hex(4)}"
    url = f"{store_url}?application_name={app_name}" if postgres else store_url
    job = {"url": url, "key_file": str(key_path), "now": NOW}
    # "lookup" parks halfway through the second batch; "commit" in the
    # second COMMIT after that point: the third batch's, fully written.
    hang = {"hang": point, "hang_after": HANG_AFTER, "hang_commits": 2}
    victim = start(workers, tmp_path, {**job, "actor": "victim", **hang})
    victim.expect("ready")
    victim.go()
    victim.expect("parked")  # inside a batch: earlier ones are committed, this one is open

    before = versions_now(store_url)
    assert 0 < before[2] < CRASH_TOKENS, before
    assert_parked_in_transaction(store_url, app_name, before[1])
    victim.kill()
    if postgres:
        wait_for_backends_gone(store_url, app_name)
    else:
        db = store_url.split("///", 1)[1]
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]

    after = Snapshot(store_url)
    renewed = check_consistent(after, old, secret)
    assert 0 < renewed < CRASH_TOKENS
    assert after.due == CRASH_TOKENS - renewed
    print(f"\n{point} crash: {renewed} of {CRASH_TOKENS} renewed before the kill")

    restarted = start(workers, tmp_path, {**job, "actor": "restarted"})
    restarted.expect("ready")
    restarted.go()
    summary = restarted.summary()
    assert (summary["renewed"], summary["failed"], summary["expired"]) == (
        CRASH_TOKENS - renewed,
        0,
        0,
    )

    done = Snapshot(store_url)
    assert check_consistent(done, old, secret) == CRASH_TOKENS
    assert done.versions() == {2: CRASH_TOKENS} and done.due == 0
    assert Counter(str(e["actor"]) for e in done.renewals) == {
        "victim": renewed,
        "restarted": CRASH_TOKENS - renewed,
    }
    assert tick_in_process(store_url, key_path) == (0, 0, 0, 0)
