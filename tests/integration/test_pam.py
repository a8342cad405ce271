"""``tokenlife pam`` through the real PAM stack: pamtester + pam_exec.so.

Each test writes its own service file ``/etc/pam.d/tokenlife-test-<random>``
whose session stack runs ``tokenlife -c CONFIG pam --socket SOCK`` through
pam_exec (removed again at teardown), and opens sessions for the test users
with Debian's ``pamtester``.  Two roads are covered: the fallback (no mint
service: the login process mints itself and leaves a spool record) and the
fast path (``tokenlife serve`` answers on its Unix socket).  Needs root.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.conftest import require, require_root, require_tool, run_cli, tokenlife_bin

pytestmark = pytest.mark.pam

Completed = subprocess.CompletedProcess[str]


# --- prerequisites and users --------------------------------------------------


def _require_pam() -> None:
    require_root()
    require_tool("pamtester", "setpriv")
    found = any(glob.glob(f"{lib}/*/security/pam_exec.so") for lib in ("/lib", "/usr/lib"))
    require(found, "needs pam_exec.so (Debian package libpam-modules)")


@pytest.fixture
def users() -> tuple[pwd.struct_passwd, pwd.struct_passwd]:
    _require_pam()
    from tests.integration.harness.users import ALICE, BOB, ensure_user

    return ensure_user(ALICE), ensure_user(BOB)


@pytest.fixture
def alice(users: tuple[pwd.struct_passwd, pwd.struct_passwd]) -> pwd.struct_passwd:
    return users[0]


@pytest.fixture
def bob(users: tuple[pwd.struct_passwd, pwd.struct_passwd]) -> pwd.struct_passwd:
    return users[1]


def as_user(user: pwd.struct_passwd, *argv: str) -> Completed:
    cmd = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, check=False, timeout=30)


def id_groups(user: pwd.struct_passwd) -> set[int]:
    out = subprocess.run(
        ["id", "-G", user.pw_name], capture_output=True, text=True, check=True
    ).stdout
    return {int(g) for g in out.split()}


# --- a site: key, config, directories, PAM service ----------------------------


@dataclass
class Site:
    """A tokenlife install in a world-traversable temp dir (test users read their files)."""

    root: Path
    key_file: Path
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: list[Path] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        return self.key_file.read_bytes()

    @property
    def config(self) -> Path:
        return self.root / "tokenlife.toml"

    @property
    def login(self) -> Path:
        return self.root / "login"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def pam_log(self) -> Path:
        return self.root / "pam-exec.log"

    @property
    def no_service(self) -> Path:
        """A socket path nobody listens on: the PAM entry must fall back."""
        return self.root / "no-service.sock"

    def pam_output(self) -> str:
        """What ``tokenlife pam`` wrote (stdout and stderr), without pam_exec's
        ``*** <date>`` header lines."""
        if not self.pam_log.exists():
            return ""
        lines = self.pam_log.read_text().splitlines(keepends=True)
        return "".join(line for line in lines if not line.startswith("*** "))

    def token_file(self, user: pwd.struct_passwd) -> Path:
        return self.login / str(user.pw_uid) / "slurm_jwt"

    def write_config(self, **tables: dict[str, Any]) -> Path:
        """Write the config; ``tables`` are merged over the site's defaults."""
        data: dict[str, dict[str, Any]] = {
            "key": {"source": "file", "path": str(self.key_file)},
            "store": {
                "url": f"sqlite:///{self.root}/state/tokenlife.db",
                "spool_dir": str(self.spool),
            },
            "login": {"token_dir": str(self.login)},
            "producer": {"socket": str(self.root / "mint.sock")},
        }
        for name, values in {**self.settings, **tables}.items():
            data.setdefault(name, {}).update(values)
        lines: list[str] = []
        for name, values in data.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        self.config.write_text("\n".join(lines) + "\n")
        return self.config

    def pam_service(self, socket: Path, args: str = "-c {config} pam --socket {socket}") -> str:
        """A PAM service whose session stack runs ``tokenlife pam`` (control: required)."""
        name = f"tokenlife-test-{secrets.token_hex(6)}"
        command = f"{tokenlife_bin()} " + args.format(config=self.config, socket=socket)
        path = Path("/etc/pam.d") / name
        self.services.append(path)
        path.write_text(
            "auth     required pam_permit.so\n"
            "account  required pam_permit.so\n"
            f"session  required pam_exec.so quiet log={self.pam_log} {command}\n"
        )
        return name

    def files(self, directory: Path) -> list[str]:
        if not directory.exists():
            return []
        return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())

    def cli(self, *args: str) -> Completed:
        return run_cli("-c", str(self.config), *args)


@pytest.fixture
def site(users: object, tmp_path: Path) -> Iterator[Site]:
    key_file = tmp_path / "jwt_hs256.key"
    key_file.write_bytes(secrets.token_bytes(32))
    key_file.chmod(0o600)
    # pytest's tmp dirs are 0700 root; the test users must reach their own files.
    root = Path(tempfile.mkdtemp(prefix="tokenlife-pam-"))
    root.chmod(0o755)
    site = Site(root, key_file)
    site.write_config()
    try:
        yield site
    finally:
        for service in site.services:
            service.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def pamtester(service: str, user: pwd.struct_passwd, *operations: str) -> Completed:
    return subprocess.run(
        ["pamtester", service, user.pw_name, *operations],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def open_session(site: Site, user: pwd.struct_passwd, socket: Path | None = None) -> Completed:
    service = site.pam_service(socket or site.no_service)
    return pamtester(service, user, "open_session")


def check_token_file(site: Site, user: pwd.struct_passwd) -> str:
    """The user's login token file is right in every detail; returns the token."""
    path = site.token_file(user)
    st = path.stat()
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid)
    parent = path.parent.stat()
    assert stat.S_IMODE(parent.st_mode) == 0o700
    assert (parent.st_uid, parent.st_gid) == (user.pw_uid, user.pw_gid)

    raw = path.read_bytes()
    token = raw.decode("ascii")
    assert token == token.strip(), "Slurm rejects a token with surrounding whitespace"
    assert token.count(".") == 2

    claims = jwt.decode(token, site.key, algorithms=["HS256"])
    now = time.time()
    assert claims["iat"] <= now + 5
    assert claims["exp"] > now
    assert claims["sun"] == user.pw_name
    assert claims["uid"] == user.pw_uid
    assert claims["gid"] == user.pw_gid
    ident = claims["id"]
    assert ident["dir"] == user.pw_dir
    assert ident["shell"] == user.pw_shell
    assert ident["gecos"] == user.pw_gecos
    gids = set(os.getgrouplist(user.pw_name, user.pw_gid))
    assert sorted(ident["gids"]) == sorted(gids)
    assert set(ident["gids"]) == id_groups(user)
    return token


# --- the fallback road: no service listening ------------------------------------


def test_open_session_writes_the_users_token(
    site: Site, alice: pwd.struct_passwd, bob: pwd.struct_passwd
) -> None:
    proc = open_session(site, alice)

    assert proc.returncode == 0, proc.stderr + site.pam_output()
    token = check_token_file(site, alice)
    assert site.files(site.login) == [f"{alice.pw_uid}/slurm_jwt"]
    # Owner and modes, seen from the users' side: alice reads it, bob cannot.
    assert as_user(alice, "cat", str(site.token_file(alice))).stdout == token
    denied = as_user(bob, "cat", str(site.token_file(alice)))
    assert denied.returncode != 0
    assert denied.stdout == ""
    # The token is never printed: not to pamtester, not in pam_exec's log.
    assert token not in proc.stdout + proc.stderr
    assert site.pam_output() == ""


def test_open_session_leaves_a_spool_record_without_the_key(
    site: Site, alice: pwd.struct_passwd
) -> None:
    assert open_session(site, alice).returncode == 0
    token = check_token_file(site, alice)

    record = site.spool / f"{alice.pw_name}.json"
    assert site.files(site.spool) == [record.name]
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    raw = record.read_bytes()
    data = json.loads(raw)
    assert data["user"] == alice.pw_name
    assert data["uid"] == alice.pw_uid
    assert data["token"] == token
    assert data["actor"] == "pam"
    key = site.key
    for encoded in (key, key.hex().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key)):
        assert encoded.rstrip(b"=") not in raw


def test_second_open_session_reuses_the_token(site: Site, alice: pwd.struct_passwd) -> None:
    service = site.pam_service(site.no_service)
    assert pamtester(service, alice, "open_session").returncode == 0
    first = site.token_file(alice).read_bytes()
    record = json.loads((site.spool / f"{alice.pw_name}.json").read_bytes())
    time.sleep(1.1)  # a new mint would carry a new iat

    assert pamtester(service, alice, "open_session").returncode == 0

    assert site.token_file(alice).read_bytes() == first
    again = json.loads((site.spool / f"{alice.pw_name}.json").read_bytes())
    assert again["token_id"] == record["token_id"]
    check_token_file(site, alice)


def test_a_token_file_spoiled_between_sessions_is_repaired(
    site: Site, alice: pwd.struct_passwd
) -> None:
    """The fallback's quick check (tokenlife.app.pamlite) finds the file wrong and
    hands the login to the full path, which puts the same token back right."""
    service = site.pam_service(site.no_service)
    assert pamtester(service, alice, "open_session").returncode == 0
    token = check_token_file(site, alice)
    site.token_file(alice).chmod(0o644)
    site.token_file(alice).parent.chmod(0o755)

    assert pamtester(service, alice, "open_session").returncode == 0

    assert check_token_file(site, alice) == token
    assert site.pam_output() == ""


def test_close_session_does_nothing(site: Site, alice: pwd.struct_passwd) -> None:
    service = site.pam_service(site.no_service)

    proc = pamtester(service, alice, "close_session")

    assert proc.returncode == 0, proc.stderr
    # Only pam_exec's own (empty) log appears: no token, no record, no database.
    assert site.files(site.root) == ["pam-exec.log", "tokenlife.toml"]
    assert site.pam_output() == ""


def test_close_session_leaves_the_token_alone(site: Site, alice: pwd.struct_passwd) -> None:
    service = site.pam_service(site.no_service)
    assert pamtester(service, alice, "open_session").returncode == 0
    before = {name: (site.login / name).read_bytes() for name in site.files(site.login)}

    assert pamtester(service, alice, "close_session").returncode == 0

    after = {name: (site.login / name).read_bytes() for name in site.files(site.login)}
    assert after == before


def test_users_below_min_uid_get_no_token(site: Site, alice: pwd.struct_passwd) -> None:
    site.write_config(pam={"min_uid": alice.pw_uid + 1})

    proc = open_session(site, alice)

    assert proc.returncode == 0, proc.stderr
    assert site.files(site.login) == []
    assert site.files(site.spool) == []


# --- PAM never breaks a login unless told to --------------------------------------

PAM_COMMAND_LINES = {
    "documented": "-c {config} pam --socket {socket}",
    "verbose": "-v -c {config} pam --socket {socket}",
    "debug": "--debug -c {config} pam --socket {socket}",
    "equals-forms": "--config={config} pam --socket={socket}",
}


@pytest.mark.parametrize("args", PAM_COMMAND_LINES.values(), ids=PAM_COMMAND_LINES.keys())
def test_pam_line_accepts_the_cli_forms(site: Site, alice: pwd.struct_passwd, args: str) -> None:
    """Every spelling ``tokenlife --help`` allows works in the PAM line: a
    harmless option must not lock users out (pam.required is false here)."""
    proc = pamtester(site.pam_service(site.no_service, args), alice, "open_session")

    assert proc.returncode == 0, site.pam_output()
    assert site.pam_output() == ""
    check_token_file(site, alice)


def _break_key(site: Site, how: str) -> str:
    """Point the config at a key that cannot be used; returns the expected reason."""
    bad = site.root / "bad.key"
    if how == "missing":
        reason = f"key file {bad} does not exist"
    elif how == "group-readable":
        bad.write_bytes(secrets.token_bytes(32))
        bad.chmod(0o640)
        reason = f"key file {bad} has mode 0640: it must not be accessible by group or others"
    else:
        bad.write_bytes(secrets.token_bytes(16))
        bad.chmod(0o600)
        reason = "HS256 key is 16 bytes; at least 32 are required"
    site.settings["key"] = {"path": str(bad)}
    return reason


BROKEN_KEYS = ("missing", "group-readable", "too-short")


@pytest.mark.parametrize("how", BROKEN_KEYS)
def test_unusable_key_does_not_break_the_login(
    site: Site, alice: pwd.struct_passwd, how: str
) -> None:
    reason = _break_key(site, how)
    site.write_config()

    proc = open_session(site, alice)

    assert proc.returncode == 0, proc.stderr
    assert site.files(site.login) == []
    assert site.files(site.spool) == []
    assert site.pam_output().startswith(f"tokenlife-pam: {alice.pw_name}: {reason}")
    assert len(site.pam_output().splitlines()) == 1


@pytest.mark.parametrize("how", BROKEN_KEYS)
def test_unusable_key_fails_the_login_when_required(
    site: Site, alice: pwd.struct_passwd, how: str
) -> None:
    reason = _break_key(site, how)
    site.write_config(pam={"required": True})

    proc = open_session(site, alice)

    assert proc.returncode != 0
    assert site.files(site.login) == []
    assert site.files(site.spool) == []
    assert site.pam_output().startswith(f"tokenlife-pam: {alice.pw_name}: {reason}")


def test_required_pam_still_lets_a_good_login_through(site: Site, alice: pwd.struct_passwd) -> None:
    site.write_config(pam={"required": True})

    assert open_session(site, alice).returncode == 0
    check_token_file(site, alice)


# --- the fast road: the mint service answers on its socket --------------------------


@pytest.fixture
def service(site: Site) -> Iterator[Callable[[], Path]]:
    """Start ``tokenlife serve`` on a socket in the site; returns the socket path."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> Path:
        sock = site.root / "mint.sock"
        log = site.root / "serve.log"
        site.write_config()
        with open(log, "w") as stderr:
            proc = subprocess.Popen(
                [tokenlife_bin(), "-c", str(site.config), "serve", "--socket", str(sock)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={k: v for k, v in os.environ.items() if k != "TOKENLIFE_CONFIG"},
            )
        procs.append(proc)
        deadline = time.monotonic() + 30
        while not sock.is_socket():
            if proc.poll() is not None:
                pytest.fail(f"tokenlife serve exited {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail("tokenlife serve did not create its socket within 30 s")
            time.sleep(0.05)
        return sock

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_fast_path_through_the_mint_service(
    site: Site, bob: pwd.struct_passwd, service: Callable[[], Path]
) -> None:
    sock = service()

    proc = open_session(site, bob, sock)

    assert proc.returncode == 0, proc.stderr + site.pam_output()
    assert site.pam_output() == ""
    token = check_token_file(site, bob)
    # The service minted it (into its store), not the login process (spool).
    assert site.files(site.spool) == []
    listed = site.cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    mine = [r for r in records if r["user"] == bob.pw_name]
    assert len(mine) == 1
    assert mine[0]["uid"] == bob.pw_uid
    assert mine[0]["state"] == "active"
    assert token not in listed.stdout


def test_fast_path_reuses_the_token(
    site: Site, bob: pwd.struct_passwd, service: Callable[[], Path]
) -> None:
    sock = service()
    name = site.pam_service(sock)
    assert pamtester(name, bob, "open_session").returncode == 0
    first = site.token_file(bob).read_bytes()
    time.sleep(1.1)

    assert pamtester(name, bob, "open_session").returncode == 0

    assert site.token_file(bob).read_bytes() == first
    records = json.loads(site.cli("list", "--json", "--user", bob.pw_name).stdout)
    assert len(records) == 1


def test_fast_path_skips_users_below_min_uid(
    site: Site, bob: pwd.struct_passwd, service: Callable[[], Path]
) -> None:
    site.settings["pam"] = {"min_uid": bob.pw_uid + 1}
    sock = service()

    assert open_session(site, bob, sock).returncode == 0

    assert site.files(site.login) == []
    assert json.loads(site.cli("list", "--json").stdout) == []
