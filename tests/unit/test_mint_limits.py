"""Nobody mints more than the configuration allows, and privilege is a uid (issue 12, 3 and 8).

Asking for a longer lifetime or renew-until than ``[token]`` gives is refused
for everyone, root included (the CLI once minted a token valid for 366 days,
the socket one valid until the year 9949); system accounts get no token for
themselves; a second passwd name for SlurmUser's uid is SlurmUser.
"""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from producer.mint import Minter
from repository.store import SqlTokenStore
from tests.conftest import require_root, run_cli, write_cli_site
from tokenlife.config import Config, PamConfig, ProducerConfig, TokenConfig
from tokenlife.errors import PermissionDenied, UsageError
from tokenlife.testing.fakes import FakeClock, StaticKeySource

KEY = secrets.token_bytes(32)
DAY = 86400


def minter(tmp_path: Path, **producer: object) -> Minter:
    config = Config(
        token=replace(TokenConfig(), lifetime=2 * DAY, renew_until=7 * DAY),
        producer=replace(ProducerConfig(), **producer),  # type: ignore[arg-type]
    )
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db.sqlite")
    return Minter(config, StaticKeySource(KEY), store, FakeClock())


@pytest.mark.parametrize(
    ("lifetime", "renew_until", "error", "match"),
    [
        (2 * DAY + 1, None, PermissionDenied, r"lifetime 172801s is longer than the configured"),
        (None, 7 * DAY + 1, PermissionDenied, r"renew-until 604801s is longer than"),
        (250_000_000_000, 250_000_000_000, PermissionDenied, r"longer than the configured"),
        (0, None, UsageError, r"lifetime must be a positive number of seconds"),
        (-5, None, UsageError, r"positive"),
        (10**20, None, PermissionDenied, r"longer than"),
        (True, None, UsageError, r"positive"),
    ],
)
def test_nobody_gets_more_than_configured(
    tmp_path: Path, lifetime: int | None, renew_until: int | None, error: type, match: str
) -> None:
    m = minter(tmp_path)
    with pytest.raises(error, match=match):
        m.mint("nobody", 0, lifetime, renew_until)  # root asking, for another user
    assert m.store.records() == []  # nothing written for a refused request


def test_less_than_configured_is_fine(tmp_path: Path) -> None:
    record, _ = minter(tmp_path).mint("nobody", 0, lifetime=3600, renew_until=DAY)
    assert (record.exp - record.iat, record.renew_until - record.iat) == (3600, DAY)


def test_cli_refuses_a_longer_lifetime_in_one_line(tmp_path: Path) -> None:
    require_root()
    cfg = write_cli_site(tmp_path, KEY, '[token]\nlifetime = "1h"\nrenew_until = "1d"\n')
    proc = run_cli("-c", str(cfg), "mint", "nobody", "--lifetime", "366d", "--renew-until", "366d")
    assert proc.returncode == 5
    assert proc.stderr.splitlines() == [
        "tokenlife-mint: lifetime 31622400s is longer than the configured token.lifetime "
        "(3600s); ask for less, or raise it in the configuration"
    ]
    assert run_cli("-c", str(cfg), "list").stdout.count("\n") == 1  # the header only


@pytest.fixture
def alias_of_slurm(tmp_path: Path) -> Iterator[str]:
    """A second passwd name for SlurmUser's uid (useradd -o -u <uid>)."""
    require_root()
    slurm = pwd.getpwnam("slurm")
    name = f"tla{secrets.token_hex(3)}"
    subprocess.run(
        ["useradd", "-o", "-u", str(slurm.pw_uid), "-g", str(slurm.pw_gid), "-M", name],
        check=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)


def test_privilege_is_decided_by_uid_not_by_name(tmp_path: Path, alias_of_slurm: str) -> None:
    m = minter(tmp_path)  # allow_privileged_users = false
    with pytest.raises(PermissionDenied, match=rf"privileged user '{alias_of_slurm}'"):
        m.mint(alias_of_slurm, 0)
    with pytest.raises(PermissionDenied, match="privileged user 'slurm'"):
        m.mint("slurm", 0)
    allowed = minter(tmp_path / "b", allow_privileged_users=True)
    (tmp_path / "b").mkdir()
    record, _ = allowed.mint(alias_of_slurm, 0)
    assert record.uid == pwd.getpwnam("slurm").pw_uid


def test_system_accounts_get_no_token_for_themselves(tmp_path: Path) -> None:
    """pam.min_uid holds on the socket and the CLI too, not only at login."""
    m = minter(tmp_path)
    daemon = pwd.getpwnam("daemon")  # uid 1, below the default min_uid 1000
    with pytest.raises(PermissionDenied, match=r"system account: below pam.min_uid \(1000\)"):
        m.mint("daemon", daemon.pw_uid)
    m.config = replace(m.config, pam=PamConfig(min_uid=0))
    record, _ = m.mint("daemon", daemon.pw_uid)
    assert record.uid == daemon.pw_uid
    if os.geteuid() == 0:
        m.config = replace(m.config, pam=PamConfig(min_uid=1000))
        record, _ = m.mint("daemon", 0)  # root may still mint for it
        assert record.user == "daemon"
