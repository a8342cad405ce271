"""Administration commands on a real SQLite store: rotate-key, purge, list, revoke."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import jwt
from sqlalchemy.orm import Session

from repository.delivery_store import DeliveryStore
from repository.models import DeliveryRow
from repository.rows import to_dt
from repository.store import SqlTokenStore
from tests.conftest import run_cli, write_cli_site
from tokenlife.records import TokenRecord

OLD_KEY = secrets.token_bytes(32)
NEW_KEY = secrets.token_bytes(32)
USER = "nobody" if os.geteuid() == 0 else os.environ.get("USER", "nobody")


def site(tmp_path: Path) -> tuple[Path, SqlTokenStore]:
    cfg = write_cli_site(tmp_path, OLD_KEY, '[token]\nlifetime = "1h"\nrenew_until = "1d"\n')
    cfg.write_text(cfg.read_text().replace("[store]\n", '[store]\npurge_after = "1h"\n', 1))
    return cfg, SqlTokenStore(f"sqlite:///{tmp_path}/db")


def login_file(tmp_path: Path) -> Path:
    return next((tmp_path / "run").glob("*/slurm_jwt"))


def new_key_file(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "new.key"
    path.write_bytes(NEW_KEY)
    path.chmod(mode)
    return path


def test_rotate_key_remints_under_the_new_key_once(tmp_path: Path) -> None:
    cfg, store = site(tmp_path)
    assert run_cli("-c", str(cfg), "mint", USER).returncode == 0
    before = store.current(USER)
    assert before is not None
    result = run_cli("-c", str(cfg), "rotate-key", "--key", str(new_key_file(tmp_path)))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("renewed 1,")
    after = store.current(USER)
    assert after is not None and after.token_id == before.token_id
    assert (after.version, after.renew_until) == (before.version + 1, before.renew_until)
    assert after.key_id != before.key_id
    claims = jwt.decode(login_file(tmp_path).read_text(), NEW_KEY, algorithms=["HS256"])
    assert claims["sun"] == USER and claims["exp"] == after.exp
    assert [e["event"] for e in store.events(USER)] == ["minted", "rotated"]
    # Idempotent: a second run finds nothing left under the old key.
    again = run_cli("-c", str(cfg), "rotate-key", "--key", str(new_key_file(tmp_path)))
    assert again.stdout.startswith("renewed 0,")
    assert store.current(USER) == after


def test_rotate_key_refuses_a_bad_new_key_and_changes_nothing(tmp_path: Path) -> None:
    cfg, store = site(tmp_path)
    assert run_cli("-c", str(cfg), "mint", USER).returncode == 0
    before = store.current(USER)
    token = login_file(tmp_path).read_text()
    loose = new_key_file(tmp_path, 0o644)
    result = run_cli("-c", str(cfg), "rotate-key", "--key", str(loose))
    assert result.returncode == 3 and result.stderr.count("\n") == 1
    assert "has mode 0644: it must not be accessible by group or others" in result.stderr
    assert store.current(USER) == before and login_file(tmp_path).read_text() == token


def old_record(token_id: str, renew_until: int, state: str = "active") -> TokenRecord:
    return TokenRecord(
        token_id=token_id,
        user=f"u{token_id}",
        uid=5000,
        gid=5000,
        first_issued=renew_until - 7200,
        iat=renew_until - 7200,
        exp=renew_until - 3600,
        renew_until=renew_until,
        lifetime=3600,
        state=state,
        token="a.b.c",
    )


def test_purge_deletes_past_renew_until_plus_grace_and_keeps_the_trail(tmp_path: Path) -> None:
    cfg, store = site(tmp_path)
    now = int(time.time())
    store.save(old_record("gone1", now - 2 * 3600), "minted", "test")
    store.save(old_record("gone2", now - 3 * 3600, "expired"), "minted", "test")
    store.save(old_record("grace", now - 1800), "minted", "test")  # inside the 1h grace
    store.save(old_record("live", now + 7200), "minted", "test")  # minted now

    dry = run_cli("-c", str(cfg), "purge", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert sorted(t["token_id"] for t in report["tokens"]) == ["gone1", "gone2"]
    assert "token" not in json.dumps(report["tokens"]).replace('"token_id"', "")
    assert len(store.records()) == 4

    done = run_cli("-c", str(cfg), "purge")
    assert done.returncode == 0 and done.stdout.endswith("purged 2 token(s)\n"), done.stdout
    assert sorted(r.token_id for r in store.records()) == ["grace", "live"]
    trail = [(e["token_id"], e["event"]) for e in store.events()]
    assert ("gone1", "minted") in trail and ("gone1", "purged") in trail
    assert run_cli("-c", str(cfg), "purge").stdout == "purged 0 token(s)\n"

    # Only on request does the audit trail go, and only what is older than asked.
    events = run_cli("-c", str(cfg), "purge", "--events-older-than", "1h")
    assert "and 3 audit event(s)" in events.stdout, events.stdout  # three old mints
    assert {e["token_id"] for e in store.events()} == {"live", "gone1", "gone2"}


def add_delivery(store: SqlTokenStore, record: TokenRecord, node: str, status: str) -> None:
    now = to_dt(int(time.time()))
    holds = status == "delivered"
    with Session(store.engine) as s, s.begin():
        s.add(
            DeliveryRow(
                user=record.user,
                uid=record.uid,
                node=node,
                token_id=record.token_id if holds else "",
                version=record.version if holds else 0,
                status=status,
                attempts=0 if holds else 2,
                last_error="" if holds else "connection refused",
                next_attempt=now,
                last_seen=now,
                updated=now,
            )
        )


def test_list_shows_delivery_status_and_revoke_queues_removal(tmp_path: Path) -> None:
    cfg, store = site(tmp_path)
    assert run_cli("-c", str(cfg), "mint", USER).returncode == 0
    record = store.current(USER)
    assert record is not None
    add_delivery(store, record, "node01", "delivered")
    add_delivery(store, record, "node02", "delivered")
    add_delivery(store, record, "node03", "failed")

    table = run_cli("-c", str(cfg), "list").stdout.splitlines()
    assert "NODES" in table[0]
    assert "2/3 current, 1 failed" in table[1] and record.token_id in table[1]
    listed = json.loads(run_cli("-c", str(cfg), "list", "--json").stdout)
    nodes = {d["node"]: d["status"] for d in listed[0]["delivery"]}
    assert nodes == {"node01": "delivered", "node02": "delivered", "node03": "failed"}
    assert record.token not in json.dumps(listed)

    result = run_cli("-c", str(cfg), "revoke", USER)
    assert "removal from 3 node(s) queued" in result.stdout, result.stdout
    assert {d.status for d in DeliveryStore(store).deliveries(USER)} == {"removing"}
    assert "revoked" in run_cli("-c", str(cfg), "list").stdout
