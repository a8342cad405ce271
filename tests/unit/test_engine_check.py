"""``tokenlife-engine check``, tokenlife's claim (renew-until, version), and new chains at login."""

from __future__ import annotations

import os
import pwd
import secrets
import time
from dataclasses import replace
from pathlib import Path

import jwt
import pytest

from client_engine.check import BadTimeLimit, parse_time_limit, span
from producer.keys import HS256Key
from producer.mint import Minter
from repository.renewer import Renewer
from repository.store import SqlTokenStore
from tests.conftest import run_engine
from tests.unit.test_engine_cli import UID, USER, Node
from tokenlife.config import Config, TokenConfig
from tokenlife.slurm_jwt import SlurmJwt
from tokenlife.testing.fakes import FakeClock, StaticKeySource
from tokenlife.users import lookup

KEY = secrets.token_bytes(32)

# --- Slurm time limits --------------------------------------------------------------

LIMITS = {
    "30": 1800,
    "0": 0,
    "1:30": 90,
    "2:00:00": 7200,
    "1-0": 86400,
    "1-2": 93600,
    "1-2:03": 93780,
    "1-2:03:04": 93784,
    "UNLIMITED": None,
    "infinite": None,
    "-1": None,
}


@pytest.mark.parametrize(("text", "seconds"), LIMITS.items())
def test_slurm_time_limits(text: str, seconds: int | None) -> None:
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "abc", "1:2:3:4", "1-2:3:4:5", "-5", "1-", "٣٠", "1.5", "9999999999", "1:-2"]
)
def test_bad_time_limits(text: str) -> None:
    with pytest.raises(BadTimeLimit):
        parse_time_limit(text)


def test_span() -> None:
    assert [span(s) for s in (0, 40, 125, 7260, 3 * 86400 + 4 * 3600 + 5)] == [
        "0s",
        "40s",
        "2m 5s",
        "2h 1m",
        "3d 4h",
    ]


# --- the claim ----------------------------------------------------------------------


def test_the_claim_carries_renew_until_and_version() -> None:
    key = HS256Key(KEY)
    user = lookup(USER)
    token = SlurmJwt().make(key, user, 100, 200, renew_until=900, version=4)

    view = SlurmJwt().read(token)
    claims = jwt.decode(token, KEY, algorithms=["HS256"], options={"verify_exp": False})

    assert (view.renew_until, view.version) == (900, 4)
    assert claims["tokenlife"] == {"renew_until": 900, "version": 4}
    # Slurm's claims are as before.
    assert (claims["sun"], claims["iat"], claims["exp"]) == (USER, 100, 200)


@pytest.mark.parametrize(
    "ours", [None, "x", 5, [], {"renew_until": "900", "version": True}, {"renew_until": 1.5}]
)
def test_a_claim_of_the_wrong_shape_is_ignored(ours: object) -> None:
    claims: dict[str, object] = {"sun": USER, "iat": 1, "exp": 2}
    if ours is not None:
        claims["tokenlife"] = ours
    token = jwt.encode(claims, KEY, algorithm="HS256")

    view = SlurmJwt().read(token)

    assert (view.subject, view.exp, view.renew_until, view.version) == (USER, 2, None, None)


def test_mint_and_renewal_write_the_claim(tmp_path: Path) -> None:
    clock = FakeClock()
    config = Config(token=replace(TokenConfig(), lifetime=4000, renew_until=20000))
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db.sqlite")
    key = StaticKeySource(KEY)
    user = "nobody" if os.geteuid() == 0 else USER
    first, _ = Minter(config, key, store, clock).mint(user, os.geteuid())
    clock.advance(3500)
    assert Renewer(config, key, store, clock).tick().renewed == 1
    second = store.current(user)
    assert second is not None

    views = [SlurmJwt().read(r.token) for r in (first, second)]

    assert [(v.renew_until, v.version) for v in views] == [
        (first.renew_until, 1),
        (first.renew_until, 2),
    ]


# --- a new chain at login --------------------------------------------------------------


def test_a_login_starts_a_new_chain_once_the_old_one_is_a_lifetime_old(tmp_path: Path) -> None:
    """Reuse keeps a login from minting while the chain is young; after one
    lifetime a login starts a new chain (later renew-until), as kinit would."""
    clock = FakeClock()
    config = Config(
        token=replace(
            TokenConfig(), lifetime=4000, renew_until=20000, renew_before=600, renew_fraction=0.25
        )
    )
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db.sqlite")
    key = StaticKeySource(KEY)
    minter = Minter(config, key, store, clock)
    renewer = Renewer(config, key, store, clock)
    user = "nobody" if os.geteuid() == 0 else USER
    first, _ = minter.mint(user, os.geteuid(), reuse=True)
    clock.advance(3000)
    assert renewer.tick().renewed == 1  # exp is now t0 + 7000

    young, minted_young = minter.mint(user, os.geteuid(), reuse=True)
    clock.advance(1000)  # the chain is 4000 s (one lifetime) old; the token is good till 7000
    old, minted_old = minter.mint(user, os.geteuid(), reuse=True)

    assert (young.token_id, minted_young) == (first.token_id, False)
    assert minted_old and old.token_id != first.token_id
    assert old.renew_until == first.renew_until + 4000


# --- the command ------------------------------------------------------------------------


def token_for(ttl: int, renew_until: int | None, version: int | None = 3) -> str:
    now = int(time.time())
    user = pwd.getpwuid(UID).pw_name
    return SlurmJwt().make(
        HS256Key(KEY), lookup(user), now, now + ttl, renew_until=renew_until, version=version
    )


def test_check_a_fresh_token(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.deliver(token_for(3600, int(time.time()) + 5 * 86400))

    plain = run_engine(node.config, "check")
    fits = run_engine(node.config, "check", "--time-limit", "2-00:00:00")
    quiet = run_engine(node.config, "check", "-q", "--time-limit=600")

    assert (plain.returncode, fits.returncode, quiet.returncode) == (0, 0, 0), plain.stderr
    assert plain.stdout.startswith(f"tokenlife-engine: token for {USER} valid until ")
    assert "renewable until" in plain.stdout and plain.stdout.count("\n") == 1
    assert quiet.stdout == quiet.stderr == ""


def test_check_a_token_near_its_renew_until(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.deliver(token_for(3600, int(time.time()) + 2 * 3600))

    short = run_engine(node.config, "check", "--time-limit", "60")
    long = run_engine(node.config, "check", "--time-limit", "3:00:00")
    unlimited = run_engine(node.config, "check", "--time-limit", "UNLIMITED")

    assert short.returncode == 0, short.stderr
    assert (long.returncode, unlimited.returncode) == (3, 3)
    assert long.stdout == ""
    assert long.stderr.startswith(f"tokenlife-engine: token for {USER} will not last 3h: ")
    assert "log in again" in long.stderr and long.stderr.count("\n") == 1


def test_check_a_token_without_the_claim_counts_its_exp(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.deliver(token_for(3600, None, None))

    within = run_engine(node.config, "check", "--time-limit", "30")
    beyond = run_engine(node.config, "check", "--time-limit", "2:00:00")

    assert within.returncode == 0, within.stderr
    assert beyond.returncode == 3
    assert "does not say its renew-until" in beyond.stderr


@pytest.mark.parametrize("state", ["expired", "missing", "foreign", "garbage"])
def test_check_without_a_valid_token(tmp_path: Path, state: str) -> None:
    node = Node(tmp_path)
    if state == "expired":
        node.deliver(token_for(-10, int(time.time()) + 86400))
    elif state == "foreign":
        node.deliver(token_for(3600, int(time.time()) + 86400), mode=0o644)
    elif state == "garbage":
        node.deliver("not-a-token")

    proc = run_engine(node.config, "check", "--time-limit", "10")

    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("tokenlife-engine: no valid token: ")
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [["--time-limit"], ["--time-limit", "soon"], ["--bogus"]])
def test_check_usage_errors(tmp_path: Path, args: list[str]) -> None:
    node = Node(tmp_path)
    node.deliver(token_for(3600, int(time.time()) + 86400))

    proc = run_engine(node.config, "check", *args)

    assert proc.returncode == 2
    assert proc.stderr.startswith("tokenlife-engine: ") and proc.stderr.count("\n") == 1
