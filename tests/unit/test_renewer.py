"""The renewal tick on a real SQLite store with an injected clock (no sleeping)."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import replace
from pathlib import Path

import jwt

from producer.mint import Minter
from repository.renewer import Renewer, retry_delay
from repository.store import SqlTokenStore
from tests.conftest import run_cli, write_cli_site
from tokenlife.config import Config, TokenConfig
from tokenlife.records import TokenRecord
from tokenlife.testing.fakes import FakeClock, StaticKeySource

KEY = secrets.token_bytes(32)
USER = "nobody" if os.geteuid() == 0 else os.environ.get("USER", "nobody")


def setup(tmp_path: Path, lifetime: int = 4000, renew_until: int = 20000):  # type: ignore[no-untyped-def]
    clock = FakeClock()
    config = Config(
        token=replace(
            TokenConfig(),
            lifetime=lifetime,
            renew_until=renew_until,
            renew_before=600,
            renew_fraction=0.25,
        )
    )
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db.sqlite")
    key = StaticKeySource(KEY)
    minter = Minter(config, key, store, clock)
    renewer = Renewer(config, key, store, clock)
    return clock, store, key, minter, renewer


def test_full_life(tmp_path: Path) -> None:
    clock, store, _, minter, renewer = setup(tmp_path)
    t0 = int(clock.now())
    first, _ = minter.mint(USER, os.geteuid())
    s = renewer.tick()
    assert (s.renewed, s.waiting) == (0, 1)  # filed for its window
    assert (
        renewer.tick().line() == "renewed 0, waiting 0, expired 0, failed 0"
    )  # not due: not even looked at
    clock.advance(3000 - 1)  # due at exp - max(600, 1000)
    assert renewer.tick().renewed == 0
    clock.advance(1)
    s = renewer.tick()
    assert s.renewed == 1
    current = store.current(USER)
    assert current is not None and current.version == 2 and current.token_id == first.token_id
    assert (current.iat, current.exp) == (t0 + 3000, t0 + 7000)
    claims = jwt.decode(
        current.token, KEY, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False}
    )
    assert (claims["iat"], claims["exp"], claims["sun"]) == (t0 + 3000, t0 + 7000, USER)
    versions = [current.version]
    for _ in range(40):
        clock.advance(500)
        renewer.tick()
        record = store.records(USER)[0]
        assert record.exp <= record.renew_until == t0 + 20000
        versions.append(record.version)
    final = store.records(USER)[0]
    assert final.state == "expired" and final.exp == t0 + 20000
    events = [e["event"] for e in store.events(USER)]
    assert events[0] == "minted" and events[-1] == "expired"
    assert events.count("renewed") == final.version - 1 >= 4
    assert all(e["reason"] != current.token for e in store.events(USER))


def test_force_renews_everything_once(tmp_path: Path) -> None:
    clock, store, _, minter, renewer = setup(tmp_path)
    minter.mint(USER, os.geteuid())
    clock.advance(10)
    s = renewer.tick(force=True)
    assert s.renewed == 1 and store.records(USER)[0].version == 2


def test_failure_kept_in_store_and_retried(tmp_path: Path) -> None:
    clock, store, key, minter, renewer = setup(tmp_path)
    minter.mint(USER, os.geteuid())
    clock.advance(3000)
    key.broken = True
    s = renewer.tick()
    assert (s.failed, s.errors) == (1, [f"{USER}: key file /k does not exist"])
    record = store.records(USER)[0]
    assert record.attempts == 1 and record.version == 1
    assert renewer.tick().failed == 0  # backing off: not retried at once
    key.broken = False
    clock.advance(1000)  # retry comes well before exp (at most half the time left)
    assert renewer.tick().renewed == 1
    assert store.records(USER)[0].attempts == 0


def test_one_failure_does_not_stop_the_others(tmp_path: Path) -> None:
    clock, store, _, minter, renewer = setup(tmp_path)
    minter.mint(USER, os.geteuid())
    now = int(clock.now())
    ghost = TokenRecord(
        "ghost0000000000a",
        "tl_gone_user",
        99999,
        99999,
        now,
        now,
        now + 4000,
        now + 20000,
        4000,
        token="x.y.z",
    )
    store.save(ghost, "minted", "test")
    clock.advance(3000)
    s = renewer.tick()
    assert (s.renewed, s.failed) == (1, 1)
    assert s.errors == ["tl_gone_user: unknown user 'tl_gone_user'"]


def test_retry_delay() -> None:
    assert retry_delay(0, 10**6, lambda: 1.0) == 60
    assert retry_delay(3, 10**6, lambda: 1.0) == 480
    assert retry_delay(20, 10**6, lambda: 1.0) == 3600
    assert retry_delay(20, 10**6, lambda: 0.0) == 1800
    assert retry_delay(5, 100, lambda: 1.0) == 50  # half the time left
    assert retry_delay(5, -5, lambda: 1.0) == 60  # already expired: its jobs fail now
    assert retry_delay(0, -5, lambda: 0.5) == 45  # jitter still spreads the retries


def test_cli_renew_and_revoke(tmp_path: Path) -> None:
    cfg = write_cli_site(tmp_path, KEY, '[token]\nlifetime = "1h"\nrenew_until = "1d"\n')
    assert run_cli("-c", str(cfg), "mint", USER).returncode == 0
    before = next((tmp_path / "run").glob("*/slurm_jwt")).read_text()
    # Tokens have one-second resolution: a renewal within the second of
    # issue would gain nothing (same exp) and is skipped by the policy.
    time.sleep(1.1)
    result = run_cli("-c", str(cfg), "renew", "--now")
    assert (result.returncode, result.stdout) == (0, "renewed 1, waiting 0, expired 0, failed 0\n")
    after = next((tmp_path / "run").glob("*/slurm_jwt")).read_text()
    assert after != before  # the login token file follows the renewal
    result = run_cli("-c", str(cfg), "revoke", USER)
    assert result.returncode == 0 and "revoked 1 token(s)" in result.stdout
    assert not list((tmp_path / "run").glob("*/slurm_jwt"))
    assert run_cli("-c", str(cfg), "renew", "--now").stdout.startswith("renewed 0,")
    again = run_cli("-c", str(cfg), "revoke", USER)
    assert (again.returncode, again.stderr) == (
        1,
        f"tokenlife-revoke: {USER} has no active token\n",
    )
