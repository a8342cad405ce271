"""pam_tokenlife.so, the native session module, through the real PAM stack (pamtester).

The module is built from producer/pam by its Makefile and loaded by absolute
path from a PAM service file per test.  Three kinds of peer:

- the real ``tokenlife serve`` (the service writes the login file), and the
  real ``tokenlife pam --no-service`` as the fallback when nobody answers;
- a scripted socket (``FakeService``) that answers what a test says: OK,
  refusals, trouble, silence, garbage, a flood; it records each request;
- a recording fallback program that logs its argv, environment, descriptors
  and ids, so the tests see exactly what the module hands a child process.

Needs root (PAM, the test users), make, a C compiler and libpam's headers.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_tool, tokenlife_bin
from tests.integration import test_pam
from tests.integration.harness import pam_module
from tests.integration.test_pam import Site, check_token_file, pamtester

# The PAM site's fixtures, shared with test_pam.py.
users = test_pam.users
alice = test_pam.alice
bob = test_pam.bob
site = test_pam.site
service = test_pam.service

pytestmark = pytest.mark.pam


@pytest.fixture(scope="module")
def module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("make", "cc")
    require(pam_module.HEADER.exists(), "needs libpam's headers (Debian package libpam0g-dev)")
    return pam_module.build(tmp_path_factory.mktemp("pam-module"))


def module_service(site: Site, module: Path, *options: str, control: str = "required") -> str:
    """A PAM service whose session stack is the module with ``options``."""
    name = f"tokenlife-test-{secrets.token_hex(6)}"
    path = Path("/etc/pam.d") / name
    site.services.append(path)
    path.write_text(
        "auth     required pam_permit.so\n"
        "account  required pam_permit.so\n"
        f"session  {control} {module} {' '.join(options)}\n"
    )
    return name


# --- a recording fallback program ------------------------------------------------

RECORDER = """#!/usr/bin/python3 -I
import json, os, sys, time
out = {RECORD!r}
fds = []
for fd in range(3, 1024):
    try:
        os.fstat(fd)
    except OSError:
        continue
    fds.append(fd)
info = {{
    "argv": sys.argv[1:],
    "env": dict(os.environ),
    "fds": fds,
    "stdin": os.readlink("/proc/self/fd/0"),
    "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
    "pid": os.getpid(),
}}
with open(out, "a") as f:
    f.write(json.dumps(info) + "\\n")
time.sleep({SLEEP})
sys.exit({STATUS})
"""


class Recorder:
    """A fallback program that records every run (one JSON line each)."""

    def __init__(self, root: Path, status: int = 0, sleep: float = 0) -> None:
        self.record = root / f"fallback-{secrets.token_hex(4)}.jsonl"
        self.path = root / f"fallback-{secrets.token_hex(4)}"
        self.path.write_text(RECORDER.format(RECORD=str(self.record), SLEEP=sleep, STATUS=status))
        self.path.chmod(0o755)

    def runs(self) -> list[dict[str, object]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]


# --- a scripted mint service ------------------------------------------------------


class FakeService:
    """A Unix socket that answers each connection with ``reply(request)``.

    ``reply`` returns the bytes to send, or None to say nothing and hold the
    connection open until the test ends (a wedged service).
    """

    def __init__(self, path: Path, reply: Callable[[bytes], bytes | None]) -> None:
        self.path = path
        self.reply = reply
        self.requests: list[bytes] = []
        self._held: list[socket.socket] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(64)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            conn.settimeout(10)
            data = b""
            try:
                while not data.endswith(b"\n") and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            self.requests.append(data)
            answer = self.reply(data)
            if answer is None:
                self._held.append(conn)
                continue
            with contextlib.suppress(OSError):
                conn.sendall(answer)
            conn.close()

    def close(self) -> None:
        self._server.close()
        for conn in self._held:
            conn.close()


@pytest.fixture
def fake(site: Site) -> Iterator[Callable[[Callable[[bytes], bytes | None]], FakeService]]:
    made: list[FakeService] = []

    def start(reply: Callable[[bytes], bytes | None]) -> FakeService:
        made.append(FakeService(site.root / f"fake-{secrets.token_hex(4)}.sock", reply))
        return made[-1]

    yield start
    for one in made:
        one.close()


def expected_request(user: pwd.struct_passwd) -> dict[str, str]:
    return {"op": "pam", "reply": "line", "user": user.pw_name}


# --- with the real service and the real fallback ---------------------------------------


def test_the_service_mints_and_no_process_is_started(
    site: Site,
    module: Path,
    alice: pwd.struct_passwd,
    service: Callable[[], Path],
) -> None:
    sock = service()
    recorder = Recorder(site.root)
    name = module_service(site, module, f"socket={sock}", f"fallback={recorder.path}")

    first = pamtester(name, alice, "open_session")
    token = site.token_file(alice).read_bytes()
    time.sleep(1.1)  # a new mint would carry a new iat
    second = pamtester(name, alice, "open_session", "close_session")

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert check_token_file(site, alice).encode() == token
    assert site.token_file(alice).read_bytes() == token, "the second login reuses the token"
    assert site.files(site.spool) == [], "the service stored it, not a login process"
    assert recorder.runs() == []
    records = json.loads(site.cli("list", "--json", "--user", alice.pw_name).stdout)
    assert [r["state"] for r in records] == ["active"]
    assert token.decode() not in first.stdout + first.stderr + second.stdout + second.stderr


def test_without_the_service_the_real_fallback_mints(
    site: Site, module: Path, alice: pwd.struct_passwd
) -> None:
    name = module_service(
        site,
        module,
        f"socket={site.no_service}",
        f"config={site.config}",
        f"fallback={tokenlife_bin()}",
    )

    proc = pamtester(name, alice, "open_session")

    assert proc.returncode == 0, proc.stderr
    token = check_token_file(site, alice)
    record = json.loads((site.spool / f"{alice.pw_name}.json").read_bytes())
    assert record["token"] == token
    assert record["actor"] == "pam"


def test_the_fallback_fails_the_login_only_when_required(
    site: Site, module: Path, alice: pwd.struct_passwd
) -> None:
    """A key the fallback cannot use: no token either way; the login fails
    only with ``[pam] required = true`` (the fallback's exit status 1)."""
    missing = site.root / "missing.key"
    common = (f"socket={site.no_service}", f"config={site.config}", f"fallback={tokenlife_bin()}")

    site.write_config(key={"path": str(missing)})
    relaxed = pamtester(module_service(site, module, *common), alice, "open_session")
    site.write_config(key={"path": str(missing)}, pam={"required": True})
    strict = pamtester(module_service(site, module, *common), alice, "open_session")

    assert relaxed.returncode == 0, relaxed.stderr
    assert strict.returncode != 0
    assert site.files(site.login) == []
    assert site.files(site.spool) == []


def test_many_logins_at_once_all_get_their_token(
    site: Site,
    module: Path,
    alice: pwd.struct_passwd,
    bob: pwd.struct_passwd,
    service: Callable[[], Path],
) -> None:
    sock = service()
    recorder = Recorder(site.root)
    name = module_service(site, module, f"socket={sock}", f"fallback={recorder.path}")
    procs = [
        subprocess.Popen(
            ["pamtester", name, user.pw_name, "open_session"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for user in [alice, bob] * 15
    ]

    codes = [proc.wait(timeout=120) for proc in procs]
    for proc in procs:
        assert proc.stdout and proc.stderr
        proc.stdout.close()
        proc.stderr.close()

    assert codes == [0] * len(procs)
    check_token_file(site, alice)
    check_token_file(site, bob)
    assert recorder.runs() == [], "the service answered every login"
    records = json.loads(site.cli("list", "--json").stdout)
    assert sorted(r["user"] for r in records) == sorted([alice.pw_name, bob.pw_name])


# --- the protocol, against a scripted service --------------------------------------

# reply -> (PAM result ok?, fallback run?)
REPLIES: dict[str, tuple[bytes, bool, bool]] = {
    "ok": (b"OK\n", True, False),
    "ok-without-newline": (b"OK", True, False),
    "refused": (b"ERR 0 user tlx is below pam.min_uid\n", True, False),
    "refused-required": (b"ERR 1 no such user\n", False, False),
    "busy": (b"ERR 0 mint service busy, try again\n", True, True),
    "store-down-required": (b"ERR 1 token store failed: connection refused\n", True, True),
    "closed-silently": (b"", True, True),
    "garbage": (b"\x00\xff HELLO\n", True, True),
    "bad-required-flag": (b"ERR 7 x\n", True, True),
    "flood": (b"A" * 1_000_000, True, True),
}


@pytest.mark.parametrize("case", REPLIES.keys())
def test_each_reply_of_the_service(
    site: Site,
    module: Path,
    alice: pwd.struct_passwd,
    fake: Callable[[Callable[[bytes], bytes | None]], FakeService],
    case: str,
) -> None:
    reply, ok, fallback = REPLIES[case]
    server = fake(lambda request: reply)
    recorder = Recorder(site.root)
    name = module_service(site, module, f"socket={server.path}", f"fallback={recorder.path}")

    proc = pamtester(name, alice, "open_session")

    assert (proc.returncode == 0) is ok, proc.stderr
    assert len(recorder.runs()) == int(fallback)
    assert [json.loads(r) for r in server.requests] == [expected_request(alice)]


def test_a_wedged_service_is_given_up_after_the_timeout(
    site: Site,
    module: Path,
    alice: pwd.struct_passwd,
    fake: Callable[[Callable[[bytes], bytes | None]], FakeService],
) -> None:
    server = fake(lambda request: None)  # reads the request, never answers
    recorder = Recorder(site.root)
    name = module_service(
        site, module, f"socket={server.path}", "timeout=1", f"fallback={recorder.path}"
    )

    proc = pamtester(name, alice, "open_session")

    assert proc.returncode == 0, proc.stderr
    assert len(server.requests) == 1
    assert len(recorder.runs()) == 1, "the login got its token from the fallback"


def test_the_fallback_runs_in_a_clean_process(
    site: Site, module: Path, alice: pwd.struct_passwd
) -> None:
    recorder = Recorder(site.root)
    name = module_service(
        site,
        module,
        f"socket={site.no_service}",
        f"config={site.config}",
        f"fallback={recorder.path}",
    )

    # The login process holds a descriptor open (sshd holds its sockets).
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.run(
            ["pamtester", name, alice.pw_name, "open_session"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            stdin=subprocess.DEVNULL,
            pass_fds=(write_end,),
        )
    finally:
        os.close(write_end)
    os.close(read_end)

    assert proc.returncode == 0, proc.stderr
    [run] = recorder.runs()
    assert run["argv"] == ["-c", str(site.config), "pam", "--no-service"]
    env = run["env"]
    assert isinstance(env, dict)
    assert env["PAM_TYPE"] == "open_session"
    assert env["PAM_USER"] == alice.pw_name
    assert env["PAM_SERVICE"] == name
    assert set(env) <= {
        "PAM_TYPE",
        "PAM_USER",
        "PAM_SERVICE",
        "PAM_RHOST",
        "PAM_TTY",
        "PAM_RUSER",
        "PATH",
        "LC_CTYPE",
    }  # LC_CTYPE: python's own coercion
    assert run["fds"] == [], "no descriptor of the login process leaks into the child"
    assert run["stdin"] == "/dev/null"
    assert run["ids"] == [0, 0, 0, 0]


def test_a_hanging_fallback_is_killed(site: Site, module: Path, alice: pwd.struct_passwd) -> None:
    recorder = Recorder(site.root, sleep=120)
    name = module_service(
        site,
        module,
        f"socket={site.no_service}",
        f"fallback={recorder.path}",
        "fallback_timeout=1",
    )

    proc = pamtester(name, alice, "open_session")

    assert proc.returncode == 0, proc.stderr
    [run] = recorder.runs()
    assert not Path(f"/proc/{run['pid']}").exists(), "the hung fallback was killed and reaped"


@pytest.mark.parametrize(("status", "ok"), [(0, True), (1, False), (3, True), (127, True)])
def test_the_fallbacks_exit_status(
    site: Site, module: Path, alice: pwd.struct_passwd, status: int, ok: bool
) -> None:
    """1 is the fallback's "required, and no token"; any other failure never
    fails a login."""
    recorder = Recorder(site.root, status=status)
    name = module_service(site, module, f"socket={site.no_service}", f"fallback={recorder.path}")

    proc = pamtester(name, alice, "open_session")

    assert (proc.returncode == 0) is ok, proc.stderr
    assert len(recorder.runs()) == 1


# --- hostile input ----------------------------------------------------------------

PORTABLE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
HOSTILE_NAMES = {
    "path": "../../etc/passwd",
    "space": "al ice",
    "json": 'x","op":"mint',
    "too-long": "a" * 33,
    "very-long": "b" * 5000,
    "option": "-rf",
    "newline": "alice\nbob",
    "empty-ish": ".",
}


@pytest.mark.parametrize("case", HOSTILE_NAMES.keys())
def test_a_hostile_user_name_never_reaches_the_service(
    site: Site,
    module: Path,
    users: object,
    fake: Callable[[Callable[[bytes], bytes | None]], FakeService],
    case: str,
) -> None:
    """Only names of the portable characters (1-32) are asked for; any other
    goes whole, never cut, to the fallback, which refuses it."""
    user = HOSTILE_NAMES[case]
    server = fake(lambda request: b"OK\n")
    recorder = Recorder(site.root)
    name = module_service(site, module, f"socket={server.path}", f"fallback={recorder.path}")

    proc = subprocess.run(
        ["pamtester", name, user, "open_session"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )

    assert proc.returncode == 0, proc.stderr
    if set(user) <= PORTABLE and len(user) <= 32:  # the service decides: it checks the name
        assert len(server.requests) == 1
        assert recorder.runs() == []
        return
    assert server.requests == []
    [run] = recorder.runs()
    env = run["env"]
    assert isinstance(env, dict)
    assert env["PAM_USER"] == user


def test_a_hostile_user_name_gets_nothing_from_the_real_fallback(
    site: Site, module: Path, users: object
) -> None:
    name = module_service(
        site,
        module,
        f"socket={site.no_service}",
        f"config={site.config}",
        f"fallback={tokenlife_bin()}",
    )
    for user in ("../../etc/passwd", "a" * 40, "root\n"):
        proc = subprocess.run(
            ["pamtester", name, user, "open_session"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, proc.stderr
    assert site.files(site.login) == []
    assert site.files(site.spool) == []


BAD_OPTIONS = {
    "unknown": "colour=blue",
    "timeout-zero": "timeout=0",
    "timeout-text": "timeout=soon",
    "timeout-huge": "timeout=99999999999999999999",
    "relative-socket": "socket=mint.sock",
    "relative-fallback": "fallback=tokenlife",
    "long-socket": "socket=/" + "s" * 200,
}


@pytest.mark.parametrize("case", BAD_OPTIONS.keys())
def test_a_bad_pam_line_never_locks_anyone_out(
    site: Site,
    module: Path,
    alice: pwd.struct_passwd,
    fake: Callable[[Callable[[bytes], bytes | None]], FakeService],
    case: str,
) -> None:
    server = fake(lambda request: b"OK\n")
    recorder = Recorder(site.root)
    name = module_service(
        site, module, f"socket={server.path}", f"fallback={recorder.path}", BAD_OPTIONS[case]
    )

    proc = pamtester(name, alice, "open_session")

    assert proc.returncode == 0, proc.stderr
    assert server.requests == [], "a line the module cannot read does nothing"
    assert recorder.runs() == []


def test_no_fallback_and_no_service_is_a_login_without_a_token(
    site: Site, module: Path, alice: pwd.struct_passwd
) -> None:
    name = module_service(site, module, f"socket={site.no_service}", "fallback=none")

    proc = pamtester(name, alice, "open_session")

    assert proc.returncode == 0, proc.stderr
    assert site.files(site.login) == []


def test_close_session_and_other_stacks_do_nothing(
    site: Site,
    module: Path,
    alice: pwd.struct_passwd,
    fake: Callable[[Callable[[bytes], bytes | None]], FakeService],
) -> None:
    server = fake(lambda request: b"OK\n")
    recorder = Recorder(site.root)
    name = module_service(site, module, f"socket={server.path}", f"fallback={recorder.path}")

    proc = pamtester(name, alice, "close_session")

    assert proc.returncode == 0, proc.stderr
    assert server.requests == []
    assert recorder.runs() == []


def test_the_built_module_exports_only_the_session_entry_points(module: Path) -> None:
    mode = module.stat().st_mode
    assert stat.S_IMODE(mode) == 0o644
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(module)], capture_output=True, text=True, check=True
    ).stdout
    functions = sorted(line.split()[-1] for line in out.splitlines() if " T " in line)
    assert functions == ["pam_sm_close_session", "pam_sm_open_session"]
    assert os.access(module, os.R_OK)


def test_the_fallback_never_asks_the_service_again(
    site: Site,
    alice: pwd.struct_passwd,
    fake: Callable[[Callable[[bytes], bytes | None]], FakeService],
) -> None:
    """``tokenlife pam --no-service`` (what the module runs) mints at once: a
    service that already failed the module is not given a second 5 s."""
    server = fake(lambda request: None)
    env = {"PATH": "/usr/bin:/bin", "PAM_TYPE": "open_session", "PAM_USER": alice.pw_name}
    argv = [tokenlife_bin(), "-c", str(site.config), "pam", "--socket", str(server.path)]

    proc = subprocess.run(
        [*argv, "--no-service"], capture_output=True, text=True, env=env, timeout=60, check=False
    )

    assert proc.returncode == 0, proc.stderr
    assert server.requests == []
    check_token_file(site, alice)
    assert (site.spool / f"{alice.pw_name}.json").exists()
