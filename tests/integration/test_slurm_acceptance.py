"""Tokens minted by tokenlife against a real Slurm 22.05 (slurmctld + slurmrestd).

Clients run as an ordinary user who cannot reach munge, with SLURM_JWT set,
so JWT is the only way they can authenticate.
"""

from __future__ import annotations

import pwd
import time
from pathlib import Path

import jwt
import pytest

from producer.keys import FileKeySource
from producer.mint import Minter
from producer.spool import SpoolStore
from tests.conftest import run_cli
from tests.integration.conftest import SlurmSite, write_hs_key, write_rsa_key
from tokenlife import config as configmod
from tokenlife.testing.fakes import FakeClock

pytestmark = pytest.mark.slurm
REST_DIAG = "/slurm/v0.0.38/diag"


def mint(cfg: Path, user: str, *extra: str) -> str:
    result = run_cli("-c", str(cfg), "mint", user, "--local", "--print", *extra)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2
    return token


def squeue_as(site: SlurmSite, user: str, token: str | None) -> tuple[int, str]:
    env = {} if token is None else {"SLURM_JWT": token}
    proc = site.cluster.run_as(user, ["squeue", "--noheader"], env=env)
    return proc.returncode, proc.stderr


def assert_accepted(site: SlurmSite, user: str, token: str) -> None:
    rc, err = squeue_as(site, user, token)
    assert rc == 0, f"squeue refused the token: {err}\n{site.cluster.logs()}"
    status, body = site.cluster.rest_get(REST_DIAG, user, token)
    assert status == 200 and body.get("errors") == [], body


def assert_rejected(site: SlurmSite, user: str, token: str) -> None:
    rc, err = squeue_as(site, user, token)
    assert rc != 0 and "Zero Bytes were transmitted or received" in err
    status, body = site.cluster.rest_get(REST_DIAG, user, token)
    assert status == 500 and body.get("errors"), body


def test_jwt_is_the_only_way_in(slurm: SlurmSite, test_users: tuple[str, str]) -> None:
    alice, _ = test_users
    rc, err = squeue_as(slurm, alice, None)
    assert rc != 0 and "munge" in err.lower(), "the test user must not reach munge"


def test_hs256_token_accepted(slurm: SlurmSite, test_users: tuple[str, str]) -> None:
    alice, _ = test_users
    assert_accepted(slurm, alice, mint(slurm.config("hs"), alice))
    ping = slurm.cluster.run_as(
        alice, ["scontrol", "ping"], env={"SLURM_JWT": mint(slurm.config("hs"), alice)}
    )
    assert "is UP" in ping.stdout, ping.stdout + ping.stderr


def test_token_file_accepted(slurm: SlurmSite, test_users: tuple[str, str]) -> None:
    """The login token file, read by its owner the way users do, works as is."""
    alice, _ = test_users
    cfg = slurm.config("file")
    mint(cfg, alice)
    path = configmod.load(cfg).login.token_dir / str(pwd.getpwnam(alice).pw_uid) / "slurm_jwt"
    read = slurm.cluster.run_as(alice, ["cat", str(path)])
    assert read.returncode == 0, read.stderr
    assert_accepted(slurm, alice, read.stdout)


def test_rs256_token_accepted(slurm: SlurmSite, test_users: tuple[str, str]) -> None:
    alice, _ = test_users
    assert_accepted(slurm, alice, mint(slurm.config("rs", rs256=True), alice))


def test_wrong_hs256_key_rejected(slurm: SlurmSite, test_users: tuple[str, str]) -> None:
    alice, _ = test_users
    other = write_hs_key(slurm.work / "other.key")
    assert_rejected(slurm, alice, mint(slurm.config("wrong-hs", key=other), alice))


def test_foreign_rsa_key_with_known_kid_rejected(
    slurm: SlurmSite, test_users: tuple[str, str]
) -> None:
    alice, _ = test_users
    trusted_kid = FileKeySource(configmod.load(slurm.config("rs", rs256=True)).key).load().key_id
    stranger = write_rsa_key(slurm.work / "stranger.pem")
    cfg = slurm.config("stranger", key=stranger, rs256=True)
    # Same kid as the trusted key, different key: Slurm must not trust it.
    cfg.write_text(
        cfg.read_text().replace(
            'algorithm = "RS256"\n',
            f'algorithm = "RS256"\nkid = "{trusted_kid.removeprefix("kid:")}"\n',
            1,
        )
    )
    assert_rejected(slurm, alice, mint(cfg, alice))


def test_expired_token_rejected(
    slurm: SlurmSite, test_users: tuple[str, str], tmp_path: Path
) -> None:
    alice, _ = test_users
    config = configmod.load(slurm.config("expired"))
    past = FakeClock(start=time.time() - 10 * 86400)
    record, _ = Minter(config, FileKeySource(config.key), SpoolStore(tmp_path), past).mint(
        alice, 0, lifetime=60
    )
    assert_rejected(slurm, alice, record.token)


def test_token_for_another_user_rejected(slurm: SlurmSite, test_users: tuple[str, str]) -> None:
    """bob's token does not let alice act as alice, nor as bob (REST: name must match sun)."""
    alice, bob = test_users
    bobs = mint(slurm.config("bob"), bob)
    status, body = slurm.cluster.rest_get(REST_DIAG, alice, bobs)
    assert status == 500 and body.get("errors"), body
    sbatch = slurm.cluster.run_as(alice, ["sbatch", "--wrap", "true"], env={"SLURM_JWT": bobs})
    assert sbatch.returncode != 0 and "Invalid user id" in sbatch.stderr, sbatch.stderr


def test_scontrol_token_baseline_agrees(slurm: SlurmSite, test_users: tuple[str, str]) -> None:
    """Slurm's own token and ours authenticate the same user the same way."""
    alice, _ = test_users
    ours = mint(slurm.config("hs"), alice)
    theirs = slurm.cluster.scontrol_token(alice, 600)
    for token in (ours, theirs):
        assert_accepted(slurm, alice, token)


def login_token(cfg: Path, user: str) -> str:
    path = configmod.load(cfg).login.token_dir / str(pwd.getpwnam(user).pw_uid) / "slurm_jwt"
    return path.read_text()


def test_renewed_token_accepted(slurm: SlurmSite, test_users: tuple[str, str]) -> None:
    """`tokenlife renew` re-mints a token Slurm accepts, with a later exp, same identity."""
    alice, _ = test_users
    cfg = slurm.config("renew")
    first = mint(cfg, alice, "--lifetime", "10m")
    time.sleep(1.1)  # iat has one-second resolution: make the new one differ
    result = run_cli("-c", str(cfg), "renew", "--now", "--json")
    assert result.returncode == 0 and '"renewed": 1' in result.stdout, result.stdout + result.stderr
    renewed = login_token(cfg, alice)
    assert renewed != first
    old, new = (jwt.decode(t, options={"verify_signature": False}) for t in (first, renewed))
    assert new["sun"] == old["sun"] == alice and new["exp"] > old["exp"]
    assert_accepted(slurm, alice, renewed)


def test_rotated_token_accepted(slurm: SlurmSite, test_users: tuple[str, str]) -> None:
    """A token minted under a key Slurm does not trust, rotated to the key it does."""
    alice, bob = test_users
    staged = write_hs_key(slurm.work / "retired.key")
    cfg = slurm.config("rotate", key=staged)
    before = {user: mint(cfg, user) for user in (alice, bob)}
    assert_rejected(slurm, alice, before[alice])
    result = run_cli("-c", str(cfg), "rotate-key", "--key", str(slurm.hs_key), "--json")
    assert result.returncode == 0 and '"renewed": 2' in result.stdout, result.stdout + result.stderr
    for user in (alice, bob):
        rotated = login_token(cfg, user)
        assert rotated != before[user]
        assert_accepted(slurm, user, rotated)
    again = run_cli("-c", str(cfg), "rotate-key", "--key", str(slurm.hs_key), "--json")
    assert again.returncode == 0 and '"renewed": 0' in again.stdout, again.stdout
