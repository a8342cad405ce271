"""Tokens minted by tokenlife against real Slurm (slurmctld + slurmrestd), on
every release of ``SLURM_VERSIONS``: the host's 22.05 and 24.11 in a system root.

Clients run as an ordinary user who cannot reach munge, with SLURM_JWT set,
so JWT is the only way they can authenticate. Where the releases answer
differently, the tests assert the release's measured facts (``SlurmFacts``).
"""

from __future__ import annotations

import os
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
    # diag, not ping: 24.11 answers ping with 200 whatever the token.
    status, body = site.cluster.rest_get(site.facts.rest("diag"), user, token)
    assert status == 200 and body.get("errors") == [], body


def assert_rejected(site: SlurmSite, user: str, token: str) -> None:
    rc, err = squeue_as(site, user, token)
    assert rc != 0 and site.facts.bad_token_cli_error in err, err
    status, body = site.cluster.rest_get(site.facts.rest("diag"), user, token)
    assert status == site.facts.bad_token_http and body.get("errors"), (status, body)


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
    """bob's token never lets alice act as alice (REST: the name must match sun).

    22.05 refuses the job of alice's process with bob's token; 24.11 takes the
    user from the token alone, so the job is bob's: the token is the identity.
    """
    alice, bob = test_users
    bobs = mint(slurm.config("bob"), bob)
    status, body = slurm.cluster.rest_get(slurm.facts.rest("diag"), alice, bobs)
    assert status == slurm.facts.bad_token_http and body.get("errors"), (status, body)
    argv = ["sbatch", "--parsable", "--hold", f"--output={slurm.work}/jobs/%j", "--wrap", "true"]
    sbatch = slurm.cluster.run_as(alice, argv, env={"SLURM_JWT": bobs})
    error = slurm.facts.foreign_token_sbatch_error
    if error is not None:
        assert sbatch.returncode != 0 and error in sbatch.stderr, sbatch.stderr
        return
    assert sbatch.returncode == 0, sbatch.stderr
    job = sbatch.stdout.strip().split(";")[0]
    owner = slurm.cluster.root_run(["squeue", "-h", "-j", job, "-o", "%u"]).stdout.strip()
    slurm.cluster.root_run(["scancel", job])
    assert owner == bob, f"job {job} of alice's process with bob's token belongs to {owner!r}"


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


def test_bearer_header(slurm: SlurmSite, test_users: tuple[str, str]) -> None:
    """``Authorization: Bearer``: refused by 22.05 (401), accepted by 24.11.

    Where accepted, X-SLURM-USER-NAME may be left out, and if given must still
    match the token's ``sun``; a bad token is refused as in X-SLURM-USER-TOKEN.
    """
    alice, bob = test_users
    facts, diag = slurm.facts, slurm.facts.rest("diag")
    token = mint(slurm.config("hs"), alice)
    status, body = slurm.cluster.rest_get(diag, alice, token, bearer=True)
    if not facts.bearer_accepted:
        assert status == facts.bearer_refused_http, (status, body)
        return
    assert status == 200 and body.get("errors") == [], (status, body)
    status, body = slurm.cluster.rest_get(diag, None, token, bearer=True)
    assert status == 200 and body.get("errors") == [], (status, body)
    status, body = slurm.cluster.rest_get(diag, bob, token, bearer=True)
    assert status == facts.bad_token_http and body.get("errors"), (status, body)
    other = mint(slurm.config("wrong-hs", key=write_hs_key(slurm.work / "bearer.key")), alice)
    status, body = slurm.cluster.rest_get(diag, None, other, bearer=True)
    assert status == facts.bad_token_http and body.get("errors"), (status, body)


def test_rest_user_name_header(slurm: SlurmSite, test_users: tuple[str, str]) -> None:
    """X-SLURM-USER-TOKEN alone: 22.05 wants X-SLURM-USER-NAME too (401), 24.11 does not."""
    alice, _ = test_users
    token = mint(slurm.config("hs"), alice)
    status, body = slurm.cluster.rest_get(slurm.facts.rest("diag"), None, token)
    expected = 401 if slurm.facts.user_name_required else 200
    assert status == expected, (status, body)


def test_rest_api_versions(slurm: SlurmSite, test_users: tuple[str, str]) -> None:
    """The release serves the OpenAPI version the tests use, and not the other one."""
    alice, _ = test_users
    token = mint(slurm.config("hs"), alice)
    assert slurm.cluster.rest_get(slurm.facts.rest("diag"), alice, token)[0] == 200
    for api in slurm.facts.rest_unserved:
        status, body = slurm.cluster.rest_get(f"/slurm/{api}/diag", alice, token)
        assert status == 404, (api, status, body)


# The job reports where it runs and what the TaskProlog gave it; "name value" lines.
ENGINE_JOB = r"""#!/bin/sh
echo "debian $(cat /etc/debian_version)"
echo "engine $(command -v tokenlife-engine)"
echo "jwt_file ${SLURM_JWT_FILE:-none}"
echo "squeue $(SLURM_JWT=$(tokenlife-engine token) squeue -h -j "$SLURM_JOB_ID" -o %u 2>&1)"
"""


def test_job_task_prolog_runs_the_clusters_engine(
    slurm: SlurmSite, test_users: tuple[str, str]
) -> None:
    """A job's TaskProlog runs ``cluster.engine`` where the job runs (in 24.11's root
    too, on its Python): it finds the delivered token, which then works in the job."""
    alice, _ = test_users
    cluster, pw = slurm.cluster, pwd.getpwnam(alice)
    directory = slurm.engine_dir / str(pw.pw_uid)
    directory.mkdir(mode=0o700, exist_ok=True)
    token_file = directory / "slurm_jwt"
    token_file.write_text(mint(slurm.config("hs"), alice))
    token_file.chmod(0o600)
    for path in (directory, token_file):  # what transfer leaves on a node: the user's
        os.chown(path, pw.pw_uid, pw.pw_gid)
    script = slurm.work / "engine-job.sh"
    script.write_text(ENGINE_JOB)
    script.chmod(0o755)
    argv = ["sbatch", "--parsable", f"--output={slurm.work}/jobs/out-%j", str(script)]
    env = {
        "SLURM_JWT": mint(slurm.config("hs"), alice),  # alice cannot reach munge here
        "PATH": cluster.job_path(),
        "TOKENLIFE_CONFIG": str(slurm.engine_config),
    }
    submitted = cluster.run_as(alice, argv, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 60
    while cluster.root_run(["squeue", "-h", "-j", job], check=False).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} did not end\n{cluster.logs()}"
        time.sleep(0.2)
    output = (slurm.work / "jobs" / f"out-{job}").read_text()
    out = dict(line.partition(" ")[::2] for line in output.splitlines() if line.strip())
    inside = cluster.system_root is not None
    host_debian = Path("/etc/debian_version").read_text().strip()
    assert (out["debian"] != host_debian) == inside, output
    assert out["engine"] == str(cluster.engine), output
    assert out["jwt_file"] == str(token_file), output
    assert out["squeue"] == alice, output
