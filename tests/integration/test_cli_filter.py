"""The shipped cli_filter (systemd/slurm/cli_filter.lua) on real Slurm, 22.05 and 24.11.

Each release gets its own cluster with ``CliFilterPlugins=cli_filter/lua``
and the shipped script beside its slurm.conf, its ENGINE line pointing at
the cluster's ``tokenlife-engine``.  The test user submits with munge (as
on a real cluster), so the token the filter looks at is only the delivered
file, ``<engine.token_dir>/<uid>/slurm_jwt``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from producer.keys import HS256Key
from tests.integration.conftest import SlurmTarget, write_hs_key
from tests.integration.harness.slurm import SlurmCluster
from tests.integration.harness.users import ALICE
from tokenlife.slurm_jwt import SlurmJwt
from tokenlife.users import lookup

pytestmark = pytest.mark.slurm

SHIPPED = Path(__file__).resolve().parents[2] / "systemd" / "slurm" / "cli_filter.lua"
ENGINE_LINE = 'local ENGINE = "/usr/local/bin/tokenlife-engine"'


@dataclass
class Site:
    cluster: SlurmCluster
    key: bytes
    token_dir: Path
    config: Path

    def filter_script(self, refuse: bool = False) -> None:
        text = SHIPPED.read_text()
        assert ENGINE_LINE in text
        text = text.replace(ENGINE_LINE, f'local ENGINE = "{self.cluster.engine}"')
        if refuse:
            assert "local REFUSE = false" in text
            text = text.replace("local REFUSE = false", "local REFUSE = true")
        path = self.cluster.conf_path.parent / "cli_filter.lua"
        path.write_text(text)
        path.chmod(0o644)

    def deliver(self, user: str, renewable: int | None, ttl: int = 600) -> None:
        """A token for ``user`` in the node's token dir, renewable for ``renewable`` s
        (None: no token at all)."""
        pw = pwd.getpwnam(user)
        home = self.token_dir / str(pw.pw_uid)
        shutil.rmtree(home, ignore_errors=True)
        if renewable is None:
            return
        home.mkdir(mode=0o700)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        now = int(time.time())
        exp = min(now + ttl, now + renewable)
        token = SlurmJwt().make(
            HS256Key(self.key), lookup(user), now, exp, renew_until=now + renewable, version=1
        )
        path = home / "slurm_jwt"
        path.write_text(token)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        path.chmod(0o600)

    def submit(self, user: str, *options: str) -> tuple[int, str, int]:
        """sbatch as ``user``: (exit status, stderr, jobs of the user afterwards)."""
        env = {"TOKENLIFE_CONFIG": str(self.config)}
        proc = self.cluster.run_as(user, ["sbatch", *options, "--wrap", "sleep 60"], env=env)
        jobs = self.cluster.root_run(["squeue", "-h", "-u", user, "-o", "%i"]).stdout.split()
        return proc.returncode, proc.stderr, len(jobs)


@pytest.fixture(scope="module")
def site(test_users: tuple[str, str], slurm_target: SlurmTarget) -> Iterator[Site]:
    work = Path(tempfile.mkdtemp(prefix="tl-cli-filter-"))
    work.chmod(0o755)
    try:
        key = write_hs_key(work / "jwt_hs256.key")
        token_dir = work / "run"
        token_dir.mkdir(mode=0o755)
        config = work / "engine.toml"
        config.write_text(f'[engine]\ntoken_dir = "{token_dir}"\n')
        config.chmod(0o644)
        cluster = SlurmCluster(
            work / "cluster",
            key,
            extra_conf="CliFilterPlugins=cli_filter/lua\n",
            open_munge=True,
            system_root=slurm_target.system_root,
        )
        cluster.start()
        try:
            slurm_target.check(cluster)
            yield Site(cluster, key.read_bytes(), token_dir, config)
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def clean(site: Site) -> Iterator[Site]:
    site.filter_script()
    yield site
    site.cluster.root_run(["scancel", "-u", ALICE], check=False)


def test_a_job_that_fits_the_token_is_submitted_silently(clean: Site) -> None:
    clean.deliver(ALICE, renewable=3600)

    status, stderr, jobs = clean.submit(ALICE, "--time=30")

    assert status == 0, stderr
    assert "tokenlife" not in stderr
    assert jobs == 1


@pytest.mark.parametrize("limit", ["--time=2:00:00", "--time=1-0", "--time=UNLIMITED"])
def test_a_job_that_outlives_the_token_is_warned_about(clean: Site, limit: str) -> None:
    clean.deliver(ALICE, renewable=3600)

    status, stderr, jobs = clean.submit(ALICE, limit)

    assert status == 0, stderr
    warnings = [line for line in stderr.splitlines() if "tokenlife: warning: " in line]
    assert len(warnings) == 1, stderr
    assert f"token for {ALICE} will not last" in warnings[0]
    assert "log in again" in warnings[0]
    assert jobs == 1


def test_without_a_time_limit_nothing_is_checked(clean: Site) -> None:
    clean.deliver(ALICE, renewable=3600)

    status, stderr, jobs = clean.submit(ALICE)

    assert status == 0, stderr
    assert "tokenlife" not in stderr
    assert jobs == 1


def test_a_user_without_a_token_is_told(clean: Site) -> None:
    clean.deliver(ALICE, renewable=None)

    status, stderr, jobs = clean.submit(ALICE, "--time=10")

    assert status == 0, stderr
    assert "tokenlife: warning: no valid token: " in stderr
    assert jobs == 1


def test_the_refusing_variant_refuses(clean: Site) -> None:
    clean.filter_script(refuse=True)
    clean.deliver(ALICE, renewable=3600)

    refused = clean.submit(ALICE, "--time=2:00:00")
    accepted = clean.submit(ALICE, "--time=30")

    assert refused[0] != 0
    assert f"tokenlife: token for {ALICE} will not last" in refused[1]
    assert accepted[0] == 0, accepted[1]
    assert accepted[2] == 1, "only the job that fits was submitted"


def test_srun_is_not_checked(clean: Site) -> None:
    clean.deliver(ALICE, renewable=60)
    env = {"TOKENLIFE_CONFIG": str(clean.config)}

    proc = clean.cluster.run_as(ALICE, ["srun", "--time=2:00:00", "true"], env=env, timeout=60)

    assert proc.returncode == 0, proc.stderr
    assert "tokenlife" not in proc.stderr
