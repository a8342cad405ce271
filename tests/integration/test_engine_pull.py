"""The engine's pull fallback against a real munged and a real pull service.

Two munged instances share one key: ``home`` serves the PullServer (the token
host, run in this process as root), ``node01`` is the worker node.  Every
engine command runs as a real test user (setpriv), exactly as a task runs it,
so munge vouches for the user's uid; the service's store is a dict holding
that user's current token.  Nothing but loopback is used.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from producer.pull import PullPolicy, PullServer, Refusal
from tests.conftest import REPO, require, require_root, require_tool
from tests.integration.harness.munge import MungeDaemon, MungeRealm, have_munge
from tests.integration.harness.users import ALICE, BOB, ensure_user

ENGINE = [sys.executable, "-m", "client_engine.cli"]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(sun: str, ttl: int = 3600, age: int = 0) -> str:
    """Issued ``age`` seconds ago, expiring ``ttl`` seconds from now."""
    now = int(time.time())
    claims = {"iat": now - age, "exp": now + ttl, "sun": sun}
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}.{b64(os.urandom(32))}"


def iat_of(token: str) -> int:
    payload = token.split(".")[1]
    return int(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["iat"])


@dataclass
class Realm:
    home: MungeDaemon
    node: MungeDaemon
    root: Path


@pytest.fixture(scope="module")
def realm() -> Iterator[Realm]:
    require_root()
    require(have_munge(), "needs munge (munged, libmunge2) and the munge account")
    require_tool("setpriv")
    ensure_user(ALICE)
    ensure_user(BOB)
    with MungeRealm("tl-engine-pull-") as r:
        home = r.start("home")
        yield Realm(home, r.start("node01", home.key, origin="127.0.0.11"), r.root)


@dataclass
class Service:
    server: PullServer
    tokens: dict[str, str]
    lookups: list[str] = field(default_factory=list)

    def requests(self) -> int:
        return sum(self.server.counts().values())


@pytest.fixture
def service(realm: Realm) -> Iterator[Service]:
    service = Service(None, {ALICE: make_token(ALICE)})  # type: ignore[arg-type]

    def lookup(uid: int, user: str, host: str) -> str | Refusal | None:
        service.lookups.append(user)
        return service.tokens.get(user)

    service.server = PullServer(
        "127.0.0.1:0",
        lookup,
        PullPolicy(privileged_uids=frozenset({0})),
        munge_socket=str(realm.home.socket),
    ).start()
    try:
        yield service
    finally:
        service.server.close()


class Node:
    """A worker node's token directory and its engine configuration."""

    def __init__(
        self, realm: Realm, name: str, pull: str, timeout: float = 5, extra: str = ""
    ) -> None:
        self.base = realm.root / name
        self.base.mkdir(mode=0o755)
        self.token_dir = self.base / "run"
        self.config = self.base / "tokenlife.toml"
        self.config.write_text(
            f'[engine]\ntoken_dir = "{self.token_dir}"\npull = "{pull}"\n'
            f'pull_timeout = {timeout}\npull_server_user = "root"\n'  # the service runs as root
            f'munge_socket = "{realm.node.socket}"\nwrapper_dir = ""\n{extra}'
        )
        self.config.chmod(0o644)

    def user_dir(self, user: str, create: bool = True) -> Path:
        pw = pwd.getpwnam(user)
        path = self.token_dir / str(pw.pw_uid)
        if create:
            self.token_dir.mkdir(mode=0o755, exist_ok=True)
            path.mkdir(mode=0o700, exist_ok=True)
            os.chown(path, pw.pw_uid, pw.pw_gid)
        return path

    def file(self, user: str) -> Path:
        return self.user_dir(user) / "slurm_jwt"

    def deliver(self, user: str, token: str) -> str:
        path = self.file(user)
        path.write_text(token)
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        path.chmod(0o600)
        return token

    def argv(self, user: str, *args: str) -> list[str]:
        if user == "root":
            return [*ENGINE, *args]
        pw = pwd.getpwnam(user)
        ids = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
        return [*ids, *ENGINE, *args]

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": "/usr/bin:/bin",
            "PYTHONDONTWRITEBYTECODE": "1",
            "TOKENLIFE_CONFIG": str(self.config),
            **extra,
        }

    def run(
        self, user: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(user, *args),
            capture_output=True,
            text=True,
            cwd=REPO,
            env=self.env(**(env or {})),
            timeout=60,  # a hang guard, not a measurement
            check=False,
        )


def owner_and_mode(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, st.st_mode & 0o7777


# -- token, exec, check ----------------------------------------------------------------


def test_token_without_a_delivered_file_pulls_and_keeps_it_for_the_user(
    realm: Realm, service: Service
) -> None:
    node = Node(realm, "first", service.server.address)
    alice = pwd.getpwnam(ALICE)
    node.user_dir(ALICE)
    done = node.run(ALICE, "token")
    assert done.returncode == 0, done.stderr
    assert done.stdout == service.tokens[ALICE] + "\n" and done.stderr == ""
    path = node.file(ALICE)
    assert owner_and_mode(path) == (alice.pw_uid, 0o600)
    assert path.read_text() == service.tokens[ALICE]
    assert int(path.stat().st_mtime) == iat_of(service.tokens[ALICE])  # push's order: mtime = iat
    assert service.lookups == [ALICE]  # munge vouched for alice
    again = node.run(ALICE, "token")  # the kept file serves now: no second pull
    assert again.stdout == done.stdout and service.requests() == 1


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["exec", "--", "/bin/sh", "-c", 'printf "%s\\n" "$SLURM_JWT"'], "token"),
        (["check", "--time-limit", "10"], "line"),
    ],
    ids=["exec", "check"],
)
def test_exec_and_check_pull_too(
    realm: Realm, service: Service, args: list[str], shown: str
) -> None:
    node = Node(realm, f"cmd-{args[0]}", service.server.address)
    node.user_dir(ALICE)
    done = node.run(ALICE, *args)
    assert done.returncode == 0, done.stderr
    if shown == "token":
        assert done.stdout == service.tokens[ALICE] + "\n"
    else:
        assert done.stdout.startswith(f"tokenlife-engine: token for {ALICE} valid until")
    assert node.file(ALICE).read_text() == service.tokens[ALICE]
    assert service.server.counts()["ok"] == 1


def test_a_valid_delivered_file_outside_the_window_is_used_without_asking(
    realm: Realm, service: Service
) -> None:
    node = Node(realm, "delivered", service.server.address)
    delivered = node.deliver(ALICE, make_token(ALICE, ttl=3000, age=600))  # 10 min > window
    done = node.run(ALICE, "token")
    assert done.returncode == 0, done.stderr
    assert done.stdout == delivered + "\n"
    assert service.requests() == 0


def test_a_file_in_its_mandatory_window_is_replaced_by_a_newer_pull(
    realm: Realm, service: Service
) -> None:
    node = Node(realm, "window", service.server.address)
    old = node.deliver(ALICE, make_token(ALICE, ttl=300, age=3300))  # 5 min left: in the window
    done = node.run(ALICE, "token")
    assert done.returncode == 0, done.stderr
    assert done.stdout == service.tokens[ALICE] + "\n" != old + "\n"
    assert node.file(ALICE).read_text() == service.tokens[ALICE]
    assert service.server.counts()["ok"] == 1


# -- the TaskProlog ----------------------------------------------------------------------


def job_env(user: str) -> dict[str, str]:
    pw = pwd.getpwnam(user)
    return {"SLURM_JOB_UID": str(pw.pw_uid), "SLURM_JOB_USER": user, "SLURM_STEP_ID": "0"}


def test_env_on_a_pull_only_node_exports_the_pulled_token(realm: Realm, service: Service) -> None:
    node = Node(realm, "taskprolog", service.server.address)
    node.user_dir(ALICE)
    node.user_dir(BOB)
    done = node.run(ALICE, "env", env=job_env(ALICE))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [
        f"export SLURM_JWT_FILE={node.file(ALICE)}",
        f"export SLURM_JWT={service.tokens[ALICE]}",
    ]
    # bob has no token on the token host: the task runs, told why in one line
    done = node.run(BOB, "env", env=job_env(BOB))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        f"print tokenlife-engine: no token for this job: {node.file(BOB)}: no token delivered "
        f"to this node; pull from {service.server.address}: no current token for this user\n"
    )
    assert service.server.counts()["ok"] == 1 and service.server.counts()["no_token"] == 1


def test_fifty_tasks_of_one_user_cost_one_pull(realm: Realm, service: Service) -> None:
    node = Node(realm, "many", service.server.address)
    node.user_dir(ALICE)
    procs = [
        subprocess.Popen(
            node.argv(ALICE, "token"),
            cwd=REPO,
            env=node.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(50)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 50, {o[1] for o in outs}
    assert {o[0] for o in outs} == {service.tokens[ALICE] + "\n"}
    assert service.server.counts()["ok"] == 1 and service.requests() == 1


# -- failures --------------------------------------------------------------------------------


@pytest.fixture
def dead_address() -> Iterator[str]:
    """A bound port nobody listens on: every connection is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_with_the_service_down_token_fails_in_one_line_and_a_valid_file_is_kept(
    realm: Realm, dead_address: str
) -> None:
    node = Node(realm, "down", dead_address, timeout=1)
    node.user_dir(ALICE)
    done = node.run(ALICE, "token")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"tokenlife-engine: {node.file(ALICE)}: no token delivered")
    assert f"pull from {dead_address}: " in done.stderr

    node = Node(realm, "down-kept", dead_address, timeout=1)
    kept = node.deliver(ALICE, make_token(ALICE, ttl=200, age=3400))  # valid, in the window
    done = node.run(ALICE, "token")
    assert (done.returncode, done.stdout) == (0, kept + "\n")
    assert done.stderr.startswith(f"tokenlife-engine: warning: pull from {dead_address}: ")
    assert done.stderr.count("\n") == 1 and "using a token that expires in" in done.stderr
    assert node.file(ALICE).read_text() == kept


# -- the Prolog: root pulls for the job's user ------------------------------------------------


def test_pull_as_root_for_the_jobs_user_creates_the_directory(
    realm: Realm, service: Service
) -> None:
    node = Node(realm, "prolog", service.server.address)
    alice = pwd.getpwnam(ALICE)
    job = {"SLURM_JOB_UID": str(alice.pw_uid), "SLURM_JOB_USER": ALICE}
    done = node.run("root", "pull", env=job)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"tokenlife-engine: {node.file(ALICE)}: token for {ALICE}")
    assert owner_and_mode(node.user_dir(ALICE, create=False)) == (alice.pw_uid, 0o700)
    assert owner_and_mode(node.file(ALICE)) == (alice.pw_uid, 0o600)
    assert node.file(ALICE).read_text() == service.tokens[ALICE]
    assert service.lookups == [ALICE]  # the request was alice's, not root's
    # a user without a token: one line, exit 1; root without a user: usage
    bob = pwd.getpwnam(BOB)
    done = node.run("root", "pull", "--user", BOB)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "no current token for this user" in done.stderr
    assert owner_and_mode(node.user_dir(BOB, create=False)) == (bob.pw_uid, 0o700)
    assert node.run("root", "pull").returncode == 2


def test_the_shipped_prolog_pulls_for_the_job_and_always_exits_0(
    realm: Realm, service: Service
) -> None:
    node = Node(realm, "prolog-script", service.server.address)
    engine = Path(sys.executable).parent / "tokenlife-engine"
    log = node.base / "prolog.log"
    text = (REPO / "systemd" / "slurm" / "prolog.sh").read_text()
    for old, new in (
        ("ENGINE=/usr/local/bin/tokenlife-engine", f"ENGINE={engine}"),
        ("LOG=/var/log/tokenlife/pull-prolog.log", f"LOG={log}"),
    ):
        assert f"{old}\n" in text
        text = text.replace(old, new, 1)
    script = node.base / "prolog.sh"
    script.write_text(text)
    for user in (ALICE, BOB):  # bob has no token: logged, still 0
        pw = pwd.getpwnam(user)
        env = node.env(SLURM_JOB_ID="42", SLURM_JOB_UID=str(pw.pw_uid), SLURM_JOB_USER=user)
        done = subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    assert node.file(ALICE).read_text() == service.tokens[ALICE]
    assert log.read_text() == (
        f"job 42: tokenlife-engine: pull from {service.server.address}: "
        "no current token for this user\n"
    )


# -- run -----------------------------------------------------------------------------------

WAIT_FOR_TOKEN = r"""
i=0
while [ "$i" -lt 600 ]; do
    if [ "$(cat "$SLURM_JWT_FILE" 2>/dev/null)" = "$EXPECT" ]; then echo got it; exit 0; fi
    sleep 0.05; i=$((i + 1))
done
exit 1
"""


def test_run_starts_with_a_pulled_token_when_none_was_delivered(
    realm: Realm, service: Service
) -> None:
    node = Node(realm, "run-start", service.server.address)
    node.user_dir(ALICE)
    done = node.run(ALICE, "run", "--", "/bin/sh", "-c", 'cat "$SLURM_JWT_FILE"')
    assert done.returncode == 0, done.stderr
    assert done.stdout == service.tokens[ALICE]  # there before the command started
    assert service.server.counts()["ok"] == 1


def test_run_pulls_in_its_advisory_window_when_no_push_came(realm: Realm, service: Service) -> None:
    node = Node(realm, "run-window", service.server.address)
    # 8 s of life, 2 s gone: the advisory window (half the life) opens in 2 s
    node.deliver(ALICE, make_token(ALICE, ttl=6, age=2))
    service.tokens[ALICE] = make_token(ALICE)  # issued after it: it may replace it
    env = {"EXPECT": service.tokens[ALICE]}
    done = node.run(ALICE, "run", "--", "/bin/sh", "-c", WAIT_FOR_TOKEN, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "got it\n"
    assert node.file(ALICE).read_text() == service.tokens[ALICE]
    assert service.server.counts()["ok"] == 1 and service.requests() == 1
