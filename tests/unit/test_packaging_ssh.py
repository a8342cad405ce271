"""The SSH files as the install guide leaves them (docs/guide.md, step 3).

* The identity file may be owned by the account that runs tokenlife or by
  root: a root-owned key serves root's own ``tokenlife push`` and the services
  (which read it through their CAP_DAC_OVERRIDE; the install test checks that
  part in the installed package), and a key owned by anybody else is refused.
* known_hosts is searched for the ``HostName`` an ssh_config alias resolves
  to, as ``[HostName]:Port`` when the port is not 22: the form
  ``ssh-keyscan -p PORT HOSTNAME`` prints, plain or hashed.
"""

from __future__ import annotations

import os
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import require_root
from tokenlife.config import SshConfig
from tokenlife.errors import TokenlifeError
from transfer.ssh import SshPool, Target, identity_owners, known_hosts_name


def write_key(path: Path, owner: int) -> Path:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chown(path, owner, owner)
    return path


def public_line() -> str:
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def test_the_identity_file_may_belong_to_the_caller_or_root() -> None:
    assert identity_owners() == {os.geteuid(), 0}


def test_root_loads_its_own_key_and_refuses_one_owned_by_the_service_account(
    tmp_path: Path,
) -> None:
    require_root()
    own = write_key(tmp_path / "root_key", 0)
    assert SshPool(SshConfig(identity_file=own))._identity() is not None
    # As the earlier guide had it: chowned to the service account (any uid
    # but root's and the caller's).
    other = write_key(tmp_path / "other_key", 4242)
    with pytest.raises(TokenlifeError) as refused:
        SshPool(SshConfig(identity_file=other))._identity()
    assert "is owned by uid 4242, expected one of [0]" in str(refused.value)


def test_an_alias_is_looked_up_under_its_hostname_and_port(tmp_path: Path) -> None:
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        "Host node07\n    HostName 10.1.0.7\n    Port 2222\nHost node08\n    HostName 10.1.0.8\n"
    )
    pool = SshPool(SshConfig(ssh_config=ssh_config))
    assert known_hosts_name(pool.target("node07")) == "[10.1.0.7]:2222"
    assert known_hosts_name(pool.target("node08")) == "10.1.0.8"
    assert known_hosts_name(pool.target("node09")) == "node09"  # no alias: the name
    plain = SshPool(SshConfig(port=2200))
    assert known_hosts_name(plain.target("node09")) == "[node09]:2200"


@pytest.mark.parametrize("hashed", [False, True], ids=["plain", "hashed"])
def test_what_ssh_keyscan_prints_is_found_under_that_name(tmp_path: Path, hashed: bool) -> None:
    # What `ssh-keyscan [-H] -p 2222 10.1.0.7` prints, and where paramiko's
    # connect() looks (the same name known_hosts_name gives).
    name = known_hosts_name(Target("10.1.0.7", 2222, "root"))
    host = paramiko.HostKeys.hash_host(name) if hashed else name
    known = tmp_path / "known_hosts"
    known.write_text(f"{host} {public_line()}\n")
    keys = paramiko.HostKeys(str(known))
    assert keys.lookup(name) is not None
    assert keys.lookup("node07") is None and keys.lookup("[node07]:2222") is None
