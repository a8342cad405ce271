"""transfer.ssh's ssh_config: paramiko's answers, without a user lookup per Host block.

paramiko's SSHConfig asks getpass.getuser() for every block of the file at
every lookup, Match lines or not: with one Host block per node, a push to N
nodes cost N squared user-database lookups (bench_push.py at 1,000 nodes: most
of a 75 s cold push).
"""

from __future__ import annotations

from pathlib import Path

import paramiko
import paramiko.config
import pytest

from transfer.ssh import _load_ssh_config

NODES = 400


def write_config(path: Path) -> list[str]:
    names = [f"node{i:04d}" for i in range(NODES)]
    blocks = [f"Host {n}\n  HostName 10.0.{i // 250}.{i % 250 + 1}\n" for i, n in enumerate(names)]
    blocks.insert(7, "Match host node0007\n  Port 2300\n")  # a Match block still applies
    blocks.append("Host node01*\n  User admin\n")  # patterns, and the defaults after them
    blocks.append("Host *\n  User root\n  Port 2222\n")
    path.write_text("".join(blocks))
    return names


def test_lookups_give_what_paramiko_gives(tmp_path: Path) -> None:
    path = tmp_path / "ssh_config"
    names = write_config(path)
    ours, theirs = _load_ssh_config(path), paramiko.SSHConfig.from_path(str(path))
    for name in [*names[:20], names[-1], "elsewhere"]:
        assert ours.lookup(name) == theirs.lookup(name), name
    assert ours.lookup("node0007")["port"] == "2300"
    assert ours.lookup("node0100")["user"] == "admin"
    assert ours.lookup("node0300") == {"hostname": "10.0.1.51", "user": "root", "port": "2222"}


def test_a_lookup_asks_the_user_database_for_match_blocks_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ssh_config"
    write_config(path)
    calls = 0
    real = paramiko.config.getpass.getuser

    def counting() -> str:
        nonlocal calls
        calls += 1
        return real()

    monkeypatch.setattr(paramiko.config.getpass, "getuser", counting)
    paramiko.SSHConfig.from_path(str(path)).lookup("node0300")
    assert calls > NODES  # paramiko alone: once per block and pass
    calls = 0
    _load_ssh_config(path).lookup("node0300")
    assert 0 < calls <= 3  # the one Match block, once in each pass of the lookup
