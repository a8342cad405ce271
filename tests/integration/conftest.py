"""Session-wide real components for the integration tests."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, require, require_root, require_tool
from tests.integration.harness.slurm import SlurmCluster, SlurmFacts, slurm_facts
from tests.integration.harness.sysroot import SLURM_24_11, RootBuildError, ensure_root
from tests.integration.harness.users import ALICE, BOB, ensure_user

SLURM_TOOLS = ("slurmctld", "slurmd", "slurmrestd", "scontrol", "squeue", "munged")
# The Slurm releases the Slurm tests run against: the host's (Debian 12), and
# Debian 13's in a debootstrap root (built once, cached; harness/sysroot.py).
HOST_SLURM = "22.05"
SLURM_VERSIONS = (HOST_SLURM, SLURM_24_11.slurm_series)
# Tools the host needs to enter a system root (building one needs debootstrap too).
ROOT_TOOLS = ("unshare", "nsenter", "chroot", "mount")


@dataclass(frozen=True)
class SlurmTarget:
    """One Slurm release to test: pass ``system_root`` to :class:`SlurmCluster`."""

    version: str
    system_root: Path | None  # None: the host's own Slurm
    facts: SlurmFacts

    def check(self, cluster: SlurmCluster) -> None:
        """Fail loudly if the cluster runs another release than the one asked for."""
        assert cluster.version == self.version, (cluster.version, self.version)


def require_host_slurm() -> None:
    """The host's Slurm with its JWT plugin (what tests/run-all.sh installs)."""
    require_root()
    require_tool(*SLURM_TOOLS)
    require(
        Path("/usr/lib/x86_64-linux-gnu/slurm-wlm/auth_jwt.so").exists()
        or bool(list(Path("/usr/lib").glob("*/slurm-wlm/auth_jwt.so"))),
        "needs slurm-wlm-jwt-plugin",
    )


@pytest.fixture(scope="session")
def slurm_24_11_root() -> Path:
    """Debian 13's Slurm 24.11 in a system root: built on first use (~1 min), then cached."""
    require_root()
    require_tool(*ROOT_TOOLS)
    try:
        return ensure_root(SLURM_24_11)
    except RootBuildError as err:  # e.g. no mirror reachable: a missing component
        require(False, f"cannot build the Slurm 24.11 root: {err}")
        raise


def slurm_target_for(request: pytest.FixtureRequest, version: str) -> SlurmTarget:
    """The :class:`SlurmTarget` of ``version``, its requirements checked (a root built)."""
    if version == HOST_SLURM:
        require_host_slurm()
        return SlurmTarget(version, None, slurm_facts(version))
    if version == SLURM_24_11.slurm_series:
        root: Path = request.getfixturevalue("slurm_24_11_root")
        return SlurmTarget(version, root, slurm_facts(version))
    raise ValueError(f"unknown Slurm release {version!r}: known {SLURM_VERSIONS}")


@pytest.fixture(scope="module", params=SLURM_VERSIONS, ids=lambda v: f"slurm{v}")
def slurm_target(request: pytest.FixtureRequest) -> SlurmTarget:
    """Each Slurm release in turn (module scope: one cluster per release and module)."""
    return slurm_target_for(request, str(request.param))


@dataclass
class SlurmSite:
    """A running cluster that trusts ``hs_key`` (HS256) and ``rsa_key`` (RS256, via jwks).

    Its jobs run the shipped TaskProlog with the cluster's ``tokenlife-engine``,
    configured by ``engine_config``, reading tokens from ``engine_dir``.
    """

    cluster: SlurmCluster
    work: Path
    hs_key: Path
    rsa_key: Path
    engine_config: Path
    engine_dir: Path

    @property
    def facts(self) -> SlurmFacts:
        return self.cluster.facts

    def config(
        self, name: str, extra: str = "", key: Path | None = None, rs256: bool = False
    ) -> Path:
        """A tokenlife config with its state under ``work/name``."""
        base = self.work / name
        base.mkdir(mode=0o755, exist_ok=True)
        key = key or (self.rsa_key if rs256 else self.hs_key)
        algorithm = "RS256" if rs256 else "HS256"
        path = base / "tokenlife.toml"
        path.write_text(
            f'[key]\npath = "{key}"\nalgorithm = "{algorithm}"\n'
            f'[store]\nurl = "sqlite:///{base}/db.sqlite"\nspool_dir = "{base}/spool"\n'
            f'[login]\ntoken_dir = "{base}/run"\n'
            f'[producer]\nsocket = "{base}/mint.sock"\n' + extra
        )
        return path


def write_hs_key(path: Path) -> Path:
    path.write_bytes(secrets.token_bytes(32))
    path.chmod(0o600)
    return path


def write_rsa_key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return path


@pytest.fixture(scope="session")
def test_users() -> tuple[str, str]:
    require_root()
    ensure_user(ALICE)
    ensure_user(BOB)
    return ALICE, BOB


@pytest.fixture(scope="module")
def slurm(test_users: tuple[str, str], slurm_target: SlurmTarget) -> Iterator[SlurmSite]:
    work = Path(tempfile.mkdtemp(prefix="tl-slurm-"))
    work.chmod(0o755)
    try:
        hs_key = write_hs_key(work / "jwt_hs256.key")
        rsa_key = write_rsa_key(work / "jwt_rs256.pem")
        # The JWKS slurmctld trusts comes from tokenlife itself (`tokenlife jwks`).
        from tests.conftest import run_cli

        site_cfg = work / "jwks.toml"
        site_cfg.write_text(f'[key]\npath = "{rsa_key}"\nalgorithm = "RS256"\n')
        result = run_cli("-c", str(site_cfg), "jwks")
        assert result.returncode == 0, result.stderr
        jwks = work / "jwks.json"
        jwks.write_text(result.stdout)
        engine_dir, jobs = work / "engine-run", work / "jobs"
        engine_dir.mkdir(mode=0o755)
        jobs.mkdir()
        jobs.chmod(0o1777)
        engine_config = work / "engine.toml"
        engine_config.write_text(f'[engine]\ntoken_dir = "{engine_dir}"\n')
        engine_config.chmod(0o644)
        task_prolog = work / "taskprolog.sh"
        cluster = SlurmCluster(
            work / "cluster",
            hs_key,
            jwks=jwks,
            task_prolog=task_prolog,
            system_root=slurm_target.system_root,
        )
        write_task_prolog(task_prolog, cluster.engine, engine_config)
        cluster.start()
        try:
            slurm_target.check(cluster)
            cluster.start_rest()
            yield SlurmSite(cluster, work, hs_key, rsa_key, engine_config, engine_dir)
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_task_prolog(path: Path, engine: Path, config: Path) -> Path:
    """The shipped TaskProlog (systemd/slurm/taskprolog.sh) with ``engine`` and ``config``."""
    shipped = "ENGINE=/usr/local/bin/tokenlife-engine"
    text = (REPO / "systemd" / "slurm" / "taskprolog.sh").read_text()
    assert shipped in text, f"taskprolog.sh no longer says {shipped!r}"
    path.write_text(text.replace(shipped, f"ENGINE={engine}\nexport TOKENLIFE_CONFIG={config}", 1))
    path.chmod(0o755)
    return path
