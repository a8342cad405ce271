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

from tests.conftest import require, require_root, require_tool
from tests.integration.harness.slurm import SlurmCluster
from tests.integration.harness.users import ALICE, BOB, ensure_user

SLURM_TOOLS = ("slurmctld", "slurmd", "slurmrestd", "scontrol", "squeue", "munged")


@dataclass
class SlurmSite:
    """A running cluster that trusts ``hs_key`` (HS256) and ``rsa_key`` (RS256, via jwks)."""

    cluster: SlurmCluster
    work: Path
    hs_key: Path
    rsa_key: Path

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


@pytest.fixture(scope="session")
def slurm(test_users: tuple[str, str]) -> Iterator[SlurmSite]:
    require_root()
    require_tool(*SLURM_TOOLS)
    require(
        Path("/usr/lib/x86_64-linux-gnu/slurm-wlm/auth_jwt.so").exists()
        or bool(list(Path("/usr/lib").glob("*/slurm-wlm/auth_jwt.so"))),
        "needs slurm-wlm-jwt-plugin",
    )
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
        cluster = SlurmCluster(work / "cluster", hs_key, jwks=jwks)
        cluster.start()
        try:
            cluster.start_rest()
            yield SlurmSite(cluster, work, hs_key, rsa_key)
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
