"""repository.status.snapshot on real stores (SQLite, and PostgreSQL where it is
installed), and ``tokenlife status`` as a command."""

from __future__ import annotations

import json
import re
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from repository.delivery_store import DeliveryStore, Result
from repository.renewal_store import RenewalStore
from repository.renewer import Renewer
from repository.status import Snapshot, one_line, snapshot
from repository.store import SqlTokenStore
from tests.conftest import run_cli, write_cli_site
from tokenlife.config import Config, TokenConfig
from tokenlife.records import TokenRecord
from tokenlife.testing.fakes import FakeClock, StaticKeySource
from tokenlife.users import UserInfo

T0 = 1_800_000_000
KEY = secrets.token_bytes(32)
UIDS = {"alice": 2001, "bob": 2002, "carol": 2003, "dave": 2004}


def users(name: str) -> UserInfo:
    uid = UIDS[name]
    return UserInfo(name, uid, uid, "", f"/home/{name}", "/bin/sh", (uid,))


def record(user: str, iat: int, lifetime: int, renew_until: int) -> TokenRecord:
    return TokenRecord(
        token_id=secrets.token_hex(8),
        user=user,
        uid=UIDS[user],
        gid=UIDS[user],
        first_issued=iat,
        iat=iat,
        exp=min(iat + lifetime, renew_until),
        renew_until=renew_until,
        lifetime=lifetime,
        token=f"secret-token-of-{user}-{secrets.token_hex(8)}",
    )


@pytest.fixture
def store(store_url: str) -> Iterator[SqlTokenStore]:
    s = SqlTokenStore(store_url)
    try:
        yield s
    finally:
        if s._sessions is not None:
            s.engine.dispose()


def fill(store: SqlTokenStore, t0: int = T0) -> dict[str, TokenRecord]:
    """Tokens in every state, renewals and a failure, deliveries in every status, at t0."""
    config = Config(token=replace(TokenConfig(), lifetime=3600, renew_until=86400))
    day = 86400
    alice = record("alice", t0 - 1000, 3600, t0 + day)  # renewed below
    bob = record("bob", t0 - 3000, 3600, t0 + day)  # exp t0+600: the soonest; fails below
    carol_old = record("carol", t0 - 2 * day, 3600, t0 - day + 100)  # minted outside the 24 h
    carol = record("carol", t0 - 500, 3600, t0 + 5000)  # the soonest renew-until
    dave = record("dave", t0 - 100, 3600, t0 + day)  # revoked below
    for r in (alice, bob, carol_old, carol, dave):
        store.save(r, "minted", "test")  # carol's new token expires the old one
    RenewalStore(store).set_state("dave", "revoked", "revoked", "test", "", t0 - 50)

    key = StaticKeySource(KEY)
    renewer = Renewer(config, key, store, FakeClock(t0 - 10), users=users)
    assert renewer.tick("alice", force=True).renewed == 1
    key.broken = True
    assert renewer.tick("bob", force=True).failed == 1

    deliveries = DeliveryStore(store)
    deliveries.sync_needs(
        {"alice": {"n1", "n2", "n3"}, "bob": {"n2"}, "dave": {"n4"}}, UIDS, t0 - 60, None
    )
    # n2's older failure is bob's: its error is the one shown for n2.
    deliveries.record(
        [Result("bob", "n2", ok=False, error="timed out\nafter 10 s", retry_at=t0)], t0 - 40, "t"
    )
    deliveries.record(
        [
            Result("alice", "n1", ok=True, token_id=alice.token_id, version=2),
            Result("alice", "n2", ok=False, error="Connection refused", retry_at=t0),
        ],
        t0 - 20,
        "t",
    )
    assert deliveries.request_removal("dave", t0 - 10) == 1
    return {"alice": alice, "bob": bob, "carol": carol, "dave": dave}


def test_snapshot_counts_and_limits(store: SqlTokenStore) -> None:
    tokens = fill(store)
    snap = snapshot(store, T0)
    assert snap.now == T0
    assert snap.tokens == {"active": 3, "expired": 1, "revoked": 1}
    assert snap.soonest_exp is not None
    assert (snap.soonest_exp.user, snap.soonest_exp.token_id) == ("bob", tokens["bob"].token_id)
    assert (snap.soonest_exp.at, snap.soonest_exp.seconds_left) == (T0 + 600, 600)
    assert snap.soonest_renew_until is not None
    assert (snap.soonest_renew_until.user, snap.soonest_renew_until.seconds_left) == (
        "carol",
        5000,
    )
    # carol's first mint is two days old; deliveries and removals are audited too.
    assert snap.events == {
        "minted": 4,
        "superseded": 1,  # carol's old token, by her new one
        "revoked": 1,
        "renewed": 1,
        "failed": 1,
        "delivered": 1,
    }
    assert snap.last_renewal == T0 - 10
    assert snap.deliveries == {"delivered": 1, "pending": 1, "failed": 2, "removing": 1}
    assert {n: (t.pending, t.failed, t.error) for n, t in snap.nodes.items()} == {
        "n2": (0, 2, "timed out"),
        "n3": (1, 0, ""),
    }
    data = snap.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["nodes"]["n2"] == {"pending": 0, "failed": 2, "error": "timed out"}
    assert data["soonest_exp"]["token_id"] == tokens["bob"].token_id
    text = json.dumps(data) + repr(snap)
    assert all(r.token not in text for r in tokens.values())

    later = snapshot(store, T0 + 700)  # bob's token is past its exp, still active
    assert later.soonest_exp is not None and later.soonest_exp.seconds_left == -100


def test_snapshot_of_an_empty_store(tmp_path: Path) -> None:
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
    try:
        snap = snapshot(store, T0)
    finally:
        store.engine.dispose()
    assert snap == Snapshot(
        now=T0,
        tokens={"active": 0, "expired": 0, "revoked": 0},
        soonest_exp=None,
        soonest_renew_until=None,
        events={},
        last_renewal=None,
        deliveries={"delivered": 0, "pending": 0, "failed": 0, "removing": 0},
        nodes={},
    )


def test_one_line() -> None:
    assert one_line("  ssh: connect failed\nTraceback ...\n") == "ssh: connect failed"
    assert one_line("") == ""
    assert one_line("x" * 300, 10) == "x" * 9 + "…"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_command(tmp_path: Path) -> None:
    port = closed_port()
    cfg = write_cli_site(tmp_path, KEY, f'[serve]\nmetrics = "127.0.0.1:{port}"\n')
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
    try:
        fill(store, int(time.time()))
    finally:
        store.engine.dispose()
    url = f"http://127.0.0.1:{port}/metrics"

    result = run_cli("-c", str(cfg), "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "tokens      3 active, 1 expired, 1 revoked"
    assert re.fullmatch(
        r"soonest     bob: expires in (10m|9m5\ds) \(\d{4}-\d\d-\d\d [\d:]{8} UTC\)", lines[1]
    )
    assert lines[2].startswith("renew-until carol: renewable for 1h23m (")
    assert re.fullmatch(
        r"last 24h    1 renewed, 1 failed, 1 delivered, 4 minted, 1 revoked, 1 superseded; "
        r"last renewal 1\ds ago",
        lines[3],
    )
    assert lines[4] == (
        "deliveries  1 delivered, 1 pending (n3), 2 failed (n2: timed out), 1 removing"
    )
    assert lines[5].startswith(f"daemon      not reachable at {url} (")
    assert result.stderr == ""

    result = run_cli("-c", str(cfg), "status", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["tokens"] == {"active": 3, "expired": 1, "revoked": 1}
    assert data["nodes"]["n3"] == {"pending": 1, "failed": 0, "error": ""}
    assert data["daemon"]["url"] == url and data["daemon"]["reachable"] is False
    assert data["daemon"]["last_tick_success"] is None

    cfg.write_text(cfg.read_text().replace(f"127.0.0.1:{port}", ""))
    result = run_cli("-c", str(cfg), "status", "--json")
    assert json.loads(result.stdout)["daemon"] is None
    assert run_cli("-c", str(cfg), "status").stdout.splitlines()[-1] == (
        "daemon      not asked: serve.metrics is off"
    )


def test_status_of_an_unreadable_store(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    cfg = write_cli_site(tmp_path, KEY, '[serve]\nmetrics = ""\n')
    cfg.write_text(cfg.read_text().replace(f"{tmp_path}/db", f"{tmp_path}/file/db"))
    result = run_cli("-c", str(cfg), "status")
    assert result.returncode == 6
    assert result.stdout == ""
    assert result.stderr.startswith("tokenlife-status: cannot open the token store: ")
    assert len(result.stderr.splitlines()) == 1
