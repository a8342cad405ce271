"""Commands run by an ordinary user on a host set up as the docs say (issue 16, item 3.5).

The state directory is private to the service (0700), the key is 0600, the
mint socket may be out of reach: every command must then end with one line
saying why and the status of docs/commands.md's table, never
"unexpected error: PermissionError".  The commands really run as the test
user ``tlalice`` (``setpriv``), so the kernel does the refusing.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool, run_cli, tokenlife_bin

Completed = subprocess.CompletedProcess[str]


@dataclass
class Host:
    root: Path
    user: pwd.struct_passwd

    @property
    def config(self) -> Path:
        return self.root / "tokenlife.toml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "mint.sock"

    def write(self, key_table: str = "") -> None:
        key = key_table or f'path = "{self.root}/jwt.key"'
        self.config.write_text(
            f"[key]\n{key}\n"
            f'[store]\nurl = "sqlite:///{self.state}/tokenlife.db"\n'
            f'spool_dir = "{self.state}/spool"\n'
            f'[login]\ntoken_dir = "{self.root}/run"\n'
            f'[producer]\nsocket = "{self.socket}"\n'
            f'[delivery]\ntransport = "local"\njobs = "static"\nroot = "{self.root}/nodes"\n'
            f'[serve]\nmetrics = ""\n'
        )
        self.config.chmod(0o644)

    def as_user(self, *args: str) -> Completed:
        """``tokenlife -c CONFIG ARGS`` as the unprivileged test user."""
        cmd = [
            "setpriv",
            f"--reuid={self.user.pw_uid}",
            f"--regid={self.user.pw_gid}",
            "--init-groups",
            tokenlife_bin(),
            "-c",
            str(self.config),
            *args,
        ]
        env = {"PATH": os.environ["PATH"], "HOME": self.user.pw_dir, "LANG": "C.UTF-8"}
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def host() -> Iterator[Host]:
    """A host installed as docs/guide.md says: the service's state 0700, the key 0600."""
    require_root()
    require_tool("setpriv")
    from tests.integration.harness.users import ALICE, ensure_user

    root = Path(tempfile.mkdtemp(prefix="tl-admin-"))
    try:
        root.chmod(0o755)  # users may traverse it, as /var/lib and /etc
        (root / "run").mkdir(mode=0o755)
        (root / "nodes").mkdir(mode=0o755)
        key = root / "jwt.key"
        key.write_bytes(secrets.token_bytes(32))
        key.chmod(0o600)
        h = Host(root, ensure_user(ALICE))
        h.write()
        h.state.mkdir(mode=0o700)
        (h.state / "spool").mkdir(mode=0o700)
        # The store exists (the daemon made it); one token is in it.
        assert run_cli("-c", str(h.config), "mint", "nobody").returncode == 0
        yield h
    finally:
        shutil.rmtree(root, ignore_errors=True)


def one_line(proc: Completed, command: str) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {proc.stderr!r}"
    assert lines[0].startswith(f"tokenlife-{command}: "), lines[0]
    assert "unexpected error" not in lines[0] and "Errno" not in lines[0], lines[0]
    return lines[0]


#: command line -> (exit status, what its one line must name)
STORE_COMMANDS = {
    "status": ("status",),
    "list": ("list",),
    "renew": ("renew",),
    "purge": ("purge",),
    "revoke": ("revoke", "tlalice"),
    "push": ("push",),
    "push-node": ("push", "--node", "n1"),
}


@pytest.mark.parametrize("case", STORE_COMMANDS)
def test_a_store_the_user_cannot_read_is_exit_6_in_one_line(host: Host, case: str) -> None:
    args = STORE_COMMANDS[case]

    proc = host.as_user(*args)

    line = one_line(proc, args[0])
    assert proc.returncode == 6, line
    assert proc.stdout == ""
    assert line == (
        f"tokenlife-{args[0]}: cannot open the token store: {host.state}/tokenlife.db: "
        f"Permission denied (uid {host.user.pw_uid})"
    )


def test_mint_without_the_service_and_without_the_key_is_exit_3(host: Host) -> None:
    proc = host.as_user("mint", host.user.pw_name)

    line = one_line(proc, "mint")
    assert proc.returncode == 3, line
    assert line == (
        f"tokenlife-mint: key file {host.root}/jwt.key is not readable by uid {host.user.pw_uid}"
    )


@pytest.fixture
def closed_socket(host: Host) -> Iterator[Path]:
    """A mint socket that listens but that the user may not connect to (0600 root)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(host.socket))
    sock.listen(1)
    host.socket.chmod(0o600)
    try:
        yield host.socket
    finally:
        sock.close()


def test_mint_with_a_socket_the_user_may_not_use_names_the_socket(
    host: Host, closed_socket: Path
) -> None:
    proc = host.as_user("mint", host.user.pw_name)

    line = one_line(proc, "mint")
    assert proc.returncode == 3, line
    assert line == (
        f"tokenlife-mint: the mint service at {closed_socket} refused uid "
        f"{host.user.pw_uid} (Permission denied), and minting here needs the key: "
        f"key file {host.root}/jwt.key is not readable by uid {host.user.pw_uid}"
    )


def test_config_check_reports_what_the_user_cannot_read(host: Host) -> None:
    proc = host.as_user("config", "check")

    assert proc.returncode == 1
    assert proc.stderr == ""
    problems = [line for line in proc.stdout.splitlines() if line.startswith("problem: ")]
    uid = host.user.pw_uid
    assert problems == [
        f"problem: key: key file {host.root}/jwt.key is not readable by uid {uid}",
        f"problem: store: cannot check the token store {host.state}/tokenlife.db: "
        f"Permission denied (uid {uid})",
    ]


def test_an_aws_key_cache_the_user_cannot_reach_is_exit_3(host: Host) -> None:
    """The cache lives in the service's 0700 state directory: not even its
    existence can be checked.  (No AWS is asked: the endpoint is closed.)"""
    cache = host.state / "aws-key.cache"
    host.write(
        'source = "aws"\nsecret_id = "tokenlife/test"\nregion = "us-east-1"\n'
        f'endpoint_url = "http://127.0.0.1:9"\ncache_path = "{cache}"\n'
    )
    uid = host.user.pw_uid
    expected = f"AWS key cache {cache} is not readable by uid {uid} (Permission denied)"

    proc = host.as_user("config", "check")
    assert proc.returncode == 1, proc.stderr
    assert f"problem: key: {expected}" in proc.stdout.splitlines()

    proc = host.as_user("mint", host.user.pw_name)
    assert one_line(proc, "mint") == f"tokenlife-mint: {expected}"
    assert proc.returncode == 3


def test_serve_without_the_key_is_exit_3(host: Host) -> None:
    proc = host.as_user("serve")

    line = one_line(proc, "serve")
    assert proc.returncode == 3, line
    assert "is not readable by uid" in line


def test_serve_where_the_user_may_not_make_the_socket_names_it(host: Host) -> None:
    """A key the user may read (its own), a socket directory it may not write."""
    key = host.root / "jwt.key"
    os.chown(key, host.user.pw_uid, host.user.pw_gid)

    proc = host.as_user("serve")

    line = one_line(proc, "serve")
    assert proc.returncode == 1, line
    assert line == (
        f"tokenlife-serve: cannot serve: {host.socket}: Permission denied (uid {host.user.pw_uid})"
    )


def test_an_unreadable_config_is_exit_2(host: Host) -> None:
    host.config.chmod(0o600)

    for command in ("status", "list", "mint"):
        args = (command, host.user.pw_name) if command == "mint" else (command,)
        proc = host.as_user(*args)
        assert one_line(proc, command) == f"tokenlife-{command}: {host.config}: permission denied"
        assert proc.returncode == 2


def test_a_spool_the_user_may_not_read_is_left_with_a_warning(host: Host) -> None:
    """A store the user may use (its own), the spool root's: ``list`` works,
    and says why the spool waits."""
    own = host.root / "own"
    own.mkdir(mode=0o700)
    os.chown(own, host.user.pw_uid, host.user.pw_gid)
    spool = host.root / "spool"
    spool.mkdir(mode=0o700)  # root's, in a directory everyone may traverse
    host.config.write_text(
        host.config.read_text()
        .replace(f"{host.state}/tokenlife.db", f"{own}/tokenlife.db")
        .replace(f"{host.state}/spool", str(spool))
    )

    proc = host.as_user("list")

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("USER ")
    assert proc.stderr.endswith(
        f"WARNING repository.store: cannot ingest the spool {spool}: Permission denied "
        f"(uid {host.user.pw_uid}); its records wait for an account that can\n"
    )
