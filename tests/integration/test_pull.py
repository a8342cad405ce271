"""The pull path against real munged daemons, with real users.

Four munged instances play a munge realm and an outsider: ``home`` serves
the pull server (the token host), ``node01``/``node02``/``login01`` are worker
and login nodes (same key, their own origin addresses), ``foreign`` has
another key.  Clients run as the test users (setpriv), so munge vouches for
their real uids; nothing but loopback is used.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from producer.pull import PullLimits, PullPolicy, PullServer, Refusal, parse_address
from tests.conftest import REPO, require, require_root, require_tool
from tests.integration.harness.munge import MungeDaemon, MungeRealm, have_munge
from tests.integration.harness.users import ALICE, BOB, ensure_user
from tokenlife import munge as pmunge

HOSTS = {"127.0.0.11": "node01", "127.0.0.12": "node02", "127.0.0.14": "login01"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(sun: str, ttl: int = 3600) -> str:
    now = int(time.time())
    claims = {"iat": now, "exp": now + ttl, "sun": sun}
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}.{b64(os.urandom(32))}"


@dataclass
class Realm:
    home: MungeDaemon
    node01: MungeDaemon
    node02: MungeDaemon
    login01: MungeDaemon
    foreign: MungeDaemon
    root: Path


@pytest.fixture(scope="module")
def realm() -> Iterator[Realm]:
    require_root()
    require(have_munge(), "needs munge (munged, libmunge2) and the munge account")
    require_tool("setpriv")
    ensure_user(ALICE)
    ensure_user(BOB)
    with MungeRealm("tl-pull-") as r:
        home = r.start("home")
        yield Realm(
            home,
            r.start("node01", home.key, origin="127.0.0.11"),
            r.start("node02", home.key, origin="127.0.0.12"),
            r.start("login01", home.key, origin="127.0.0.14"),
            r.start("foreign", origin="127.0.0.13"),  # its own key
            r.root,
        )


@dataclass
class Service:
    server: PullServer
    tokens: dict[str, str | Refusal | None]
    lookups: list[tuple[int, str, str]] = field(default_factory=list)
    audits: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.server.address


def start_service(
    realm: Realm, policy: PullPolicy | None = None, limits: PullLimits | None = None
) -> Service:
    tokens: dict[str, str | Refusal | None] = {ALICE: make_token(ALICE)}
    service = Service(None, tokens)  # type: ignore[arg-type]

    def lookup(uid: int, user: str, host: str) -> str | Refusal | None:
        service.lookups.append((uid, user, host))
        return tokens.get(user)

    def audit(user: str, host: str, result: str) -> None:
        service.audits.append((user, host, result))

    slurm_uid = pwd.getpwnam("slurm").pw_uid if _exists("slurm") else 0
    service.server = PullServer(
        "127.0.0.1:0",
        lookup,
        policy or PullPolicy(privileged_uids=frozenset({0, slurm_uid})),
        audit,
        munge_socket=str(realm.home.socket),
        limits=limits,
        resolve_host=lambda addr: HOSTS.get(addr, addr),
    ).start()
    return service


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


@pytest.fixture
def service(realm: Realm) -> Iterator[Service]:
    s = start_service(realm)
    try:
        yield s
    finally:
        s.server.close()


def as_user(
    user: str, code: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` (with ``args`` in sys.argv[1:]) as ``user``, from this checkout."""
    pw = pwd.getpwnam(user)
    ids = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
    return subprocess.run(
        [*ids, sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "HOME": pw.pw_dir},
        timeout=timeout,
        check=False,
    )


PULL = """
import sys
from client_engine.pull import PullError, pull
try:
    print(pull(sys.argv[1], sys.argv[2], 10))
except PullError as exc:
    print(f"{exc.result}: {exc}", file=sys.stderr)
    sys.exit(1)
"""

# a request credential made by the caller (printed, not sent)
MAKE_REQUEST = """
import sys
from client_engine.pull import _Munge
ttl = int(sys.argv[3]) if len(sys.argv) > 3 else 60
print(_Munge.encode(b"tokenlife-pull 1 " + sys.argv[2].encode(), sys.argv[1], None, ttl).decode())
"""

# the raw reply line to a request the caller makes and sends
RAW_PULL = """
import sys, time
from client_engine.pull import _Munge, _exchange
host, port = sys.argv[1].rsplit(":", 1)
cred = _Munge.encode(b"tokenlife-pull 1 " + sys.argv[3].encode(), sys.argv[2], None, 60)
print(_exchange(host, int(port), cred, time.monotonic() + 10, None).decode())
"""

DECODE = """
import sys
from client_engine.pull import _Munge
err, payload, uid, message = _Munge.decode(sys.argv[2].encode(), sys.argv[1])
print(err, uid, message, payload.decode(errors="replace"), sep="\\n")
"""


def send(address: str, line: str | bytes, source: str | None = None) -> str:
    host, port = parse_address(address)
    data = line.encode() if isinstance(line, str) else line
    bind = (source, 0) if source else None
    with socket.create_connection((host, port), timeout=10, source_address=bind) as sock:
        sock.sendall(data if data.endswith(b"\n") else data + b"\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply.decode()


# -- who gets what -------------------------------------------------------------------------


def test_a_user_pulls_their_own_token_and_only_their_uid_can_open_the_reply(
    realm: Realm, service: Service
) -> None:
    alice, bob = pwd.getpwnam(ALICE), pwd.getpwnam(BOB)
    node = str(realm.node01.socket)
    done = as_user(ALICE, PULL, service.address, node)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == service.tokens[ALICE]
    assert service.lookups == [(alice.pw_uid, ALICE, "node01")]
    assert service.audits == [(ALICE, "node01", "ok")]

    raw = as_user(ALICE, RAW_PULL, service.address, node, "n0nce")
    assert raw.returncode == 0, raw.stderr
    status, reply = raw.stdout.strip().split(" ", 1)
    assert status == "OK" and reply.startswith("MUNGE:")
    assert service.tokens[ALICE] not in raw.stdout  # sealed, not in the clear
    # bob, on the same node, cannot open it; nor can root
    by_bob = as_user(BOB, DECODE, node, reply).stdout.split("\n")
    assert int(by_bob[0]) == pmunge.EMUNGE_CRED_UNAUTHORIZED, by_bob
    assert f"UID={bob.pw_uid}" in by_bob[2]
    with pytest.raises(pmunge.MungeError) as err:
        pmunge.Munge(str(realm.node02.socket)).decode(reply)
    assert err.value.code == pmunge.EMUNGE_CRED_UNAUTHORIZED
    # alice can (on another node too: the realm shares one key)
    err_code, uid, _, payload = as_user(ALICE, DECODE, node, reply).stdout.split("\n")[:4]
    assert int(err_code) == 0 and int(uid) == os.geteuid()  # made by the service
    assert payload == f"tokenlife-pull 1 n0nce {service.tokens[ALICE]}"


def test_the_callers_uid_decides_whose_token_never_a_name(realm: Realm, service: Service) -> None:
    bob = pwd.getpwnam(BOB)
    node = str(realm.node01.socket)
    done = as_user(BOB, PULL, service.address, node)
    assert done.returncode == 1 and done.stderr.startswith("no_token:"), done.stderr
    # a request that names alice is not a request at all
    cred = as_user(BOB, MAKE_REQUEST, node, "n0nce " + ALICE).stdout.strip()
    assert send(service.address, cred) == "ERR bad_request malformed request\n"
    service.tokens[BOB] = make_token(BOB)
    done = as_user(BOB, PULL, service.address, node)
    assert done.stdout.strip() == service.tokens[BOB] != service.tokens[ALICE]
    assert {(uid, user) for uid, user, _ in service.lookups} == {(bob.pw_uid, BOB)}


def test_privileged_users_are_refused_unless_allowed(realm: Realm, service: Service) -> None:
    service.tokens["root"] = make_token("root")
    node = str(realm.node01.socket)
    cred = pmunge.Munge(node).encode(b"tokenlife-pull 1 n0nce")  # made by root
    assert send(service.address, cred) == "ERR refused_policy privileged account\n"
    if _exists("slurm"):
        service.tokens["slurm"] = make_token("slurm")
        done = as_user("slurm", PULL, service.address, node)
        assert done.returncode == 1 and "privileged account" in done.stderr
    assert service.lookups == []  # refused before the store is asked
    allowed = start_service(
        realm, PullPolicy(privileged_uids=frozenset({0}), allow_privileged=True)
    )
    allowed.tokens["root"] = service.tokens["root"]
    try:
        cred = pmunge.Munge(node).encode(b"tokenlife-pull 1 n0nce")
        assert send(allowed.address, cred).startswith("OK MUNGE:")
    finally:
        allowed.server.close()


def test_jobs_policy_serves_only_hosts_with_the_users_work_and_login_hosts(realm: Realm) -> None:
    work = {(ALICE, "node01")}
    policy = PullPolicy("jobs", lambda user, host: (user, host) in work, frozenset({"login01"}))
    s = start_service(realm, policy)
    try:
        s.tokens[BOB] = make_token(BOB)
        pulls = [
            (ALICE, realm.node01, 0),
            (ALICE, realm.node02, 1),
            (ALICE, realm.login01, 0),
            (BOB, realm.node01, 1),
        ]
        for user, node, status in pulls:
            done = as_user(user, PULL, s.address, str(node.socket))
            assert done.returncode == status, (user, node.origin, done.stderr)
            if status:
                assert done.stderr.startswith("refused_policy:")
                assert "no work of this user on this host" in done.stderr
        assert s.audits == [
            (ALICE, "node01", "ok"),
            (ALICE, "node02", "refused_policy"),
            (ALICE, "login01", "ok"),
            (BOB, "node01", "refused_policy"),
        ]
    finally:
        s.server.close()


# -- credentials munged refuses ------------------------------------------------------------


def test_a_replayed_request_is_refused(realm: Realm, service: Service) -> None:
    cred = as_user(ALICE, MAKE_REQUEST, str(realm.node01.socket), "n0nce").stdout.strip()
    assert send(service.address, cred).startswith("OK MUNGE:")
    assert send(service.address, cred) == "ERR replay credential refused: replayed\n"
    assert [a[2] for a in service.audits] == ["ok", "replay"]
    assert service.audits[1][0] == ALICE  # munged still says whose it was
    assert service.server.counts()["replay"] == 1


def test_a_credential_from_another_munge_key_is_refused(realm: Realm, service: Service) -> None:
    cred = as_user(ALICE, MAKE_REQUEST, str(realm.foreign.socket), "n0nce").stdout.strip()
    assert cred.startswith("MUNGE:")
    assert send(service.address, cred) == "ERR bad_credential credential refused\n"
    done = as_user(ALICE, PULL, service.address, str(realm.foreign.socket))
    assert done.returncode == 1 and done.stderr.startswith("bad_credential:")
    assert service.lookups == []
    assert service.server.counts()["bad_credential"] == 2


def test_an_expired_credential_is_refused(realm: Realm, service: Service) -> None:
    cred = as_user(ALICE, MAKE_REQUEST, str(realm.node01.socket), "n0nce", "1").stdout.strip()
    time.sleep(2.2)
    assert send(service.address, cred) == "ERR expired credential refused: expired\n"
    assert service.audits == [(ALICE, "127.0.0.1", "expired")]


FAKE_SERVICE = """
import socket, sys
from client_engine.pull import _Munge
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
conn.recv(65536)  # restricted to the service's uid: this process cannot read it
forged = _Munge.encode(b"tokenlife-pull 1 guess forged.token.x", sys.argv[1], int(sys.argv[2]), 60)
conn.sendall(b"OK " + forged + b"\\n")
conn.close()
"""

PULL_FROM_SERVICE_UID = PULL.replace(
    "pull(sys.argv[1], sys.argv[2], 10)",
    "pull(sys.argv[1], sys.argv[2], 10, server_uid=int(sys.argv[3]))",
)


def test_only_the_service_uid_can_read_requests_and_make_replies(
    realm: Realm, service: Service
) -> None:
    alice, bob = pwd.getpwnam(ALICE), pwd.getpwnam(BOB)
    node = str(realm.node01.socket)
    code = PULL_FROM_SERVICE_UID
    done = as_user(ALICE, code, service.address, node, "0")  # the service runs as root here
    assert done.returncode == 0, done.stderr
    # a request for another service uid: this service cannot decode it
    done = as_user(ALICE, code, service.address, node, str(bob.pw_uid))
    assert done.returncode == 1 and done.stderr.startswith("bad_credential:"), done.stderr
    # bob listens where the service should, and answers with a token sealed for alice
    ids = ["setpriv", f"--reuid={bob.pw_uid}", f"--regid={bob.pw_gid}", "--init-groups"]
    fake = subprocess.Popen(
        [*ids, sys.executable, "-c", FAKE_SERVICE, node, str(alice.pw_uid)],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None
        port = fake.stdout.readline().strip()
        done = as_user(ALICE, code, f"127.0.0.1:{port}", node, "0")
        assert done.returncode == 1, done.stdout
        assert done.stderr.startswith("bad_reply:")
        assert f"made by uid {bob.pw_uid}, not the service's" in done.stderr
    finally:
        fake.kill()
        fake.communicate()


# -- limits, with real munge --------------------------------------------------------------------

GOOD_CLIENT = """
import json, sys, time
from client_engine.pull import pull
times = []
for _ in range(int(sys.argv[3])):
    start = time.monotonic()
    pull(sys.argv[1], sys.argv[2], 10)
    times.append(time.monotonic() - start)
print(json.dumps(times))
"""


def test_slow_and_oversized_requests_are_dropped_while_others_are_served(realm: Realm) -> None:
    limits = PullLimits(read_timeout=1.0, max_per_peer=8, max_connections=128)
    s = start_service(realm, limits=limits)
    host, port = parse_address(s.address)
    stop = threading.Event()
    opened = [0]

    def loris(source: str) -> None:
        # 8 connections (the per-peer limit) that trickle a byte every 100 ms,
        # reconnecting as soon as the server cuts them
        conns: list[socket.socket] = []
        while not stop.is_set():
            while len(conns) < 8 and not stop.is_set():
                try:
                    conns.append(socket.create_connection((host, port), 2, (source, 0)))
                    opened[0] += 1
                except OSError:
                    break
            for c in list(conns):
                try:
                    c.send(b"M")
                except OSError:
                    conns.remove(c)
                    c.close()
            stop.wait(0.1)
        for c in conns:
            c.close()

    flood = [threading.Thread(target=loris, args=(f"127.0.2.{i}",)) for i in range(1, 9)]
    try:
        for t in flood:
            t.start()
        time.sleep(0.5)
        assert s.server.open_connections() >= 48
        done = as_user(ALICE, GOOD_CLIENT, s.address, str(realm.node01.socket), "30")
        assert done.returncode == 0, done.stderr
        times = json.loads(done.stdout)
        assert len(times) == 30 and max(times) < 0.5, times
        big = send(s.address, b"MUNGE:" + b"A" * 5000)
        assert big == "ERR bad_request request too long\n"
        time.sleep(1.2)  # at least one read deadline of the flood passes
    finally:
        stop.set()
        for t in flood:
            t.join()
        s.server.close()
    counts = s.server.counts()
    assert counts["ok"] == 30 and counts["bad_request"] == 1
    assert counts["timeout"] >= 48 and opened[0] >= 96, (counts, opened)


# -- pull_into: the user's file -------------------------------------------------------------------

PULL_INTO = """
import sys
from client_engine.pull import pull_into
import os, pwd
uid = os.getuid()
token = pull_into(sys.argv[1], uid, pwd.getpwuid(uid).pw_name, sys.argv[2], sys.argv[3], 20)
print(token.iat)
"""


def token_dir_for(realm: Realm, name: str, user: str) -> tuple[Path, Path]:
    base = realm.root / name
    base.mkdir(mode=0o755)
    pw = pwd.getpwnam(user)
    user_dir = base / str(pw.pw_uid)
    user_dir.mkdir(mode=0o700)
    os.chown(user_dir, pw.pw_uid, pw.pw_gid)
    return base, user_dir


def test_many_tasks_of_one_user_on_one_node_cost_one_pull(realm: Realm, service: Service) -> None:
    alice = pwd.getpwnam(ALICE)
    base, user_dir = token_dir_for(realm, "run-many", ALICE)
    ids = ["setpriv", f"--reuid={alice.pw_uid}", f"--regid={alice.pw_gid}", "--init-groups"]
    argv = [*ids, sys.executable, "-c", PULL_INTO, str(base), service.address]
    argv.append(str(realm.node01.socket))
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    procs = [
        subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(40)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert service.server.counts()["ok"] == 1  # forty tasks, one pull
    path = user_dir / "slurm_jwt"
    st = path.lstat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (alice.pw_uid, alice.pw_gid, 0o600)
    iat = {int(o[0]) for o in outs}
    assert len(iat) == 1 and int(st.st_mtime) == iat.pop()
    assert path.read_text() == service.tokens[ALICE]


def test_root_pulls_for_a_job_user_as_that_user(realm: Realm, service: Service) -> None:
    from client_engine.pull import pull_into

    alice = pwd.getpwnam(ALICE)
    base = realm.root / "run-prolog"  # not even there yet: root makes it
    token = pull_into(str(base), alice.pw_uid, ALICE, service.address, str(realm.node01.socket))
    assert token.value == service.tokens[ALICE]
    assert service.lookups == [(alice.pw_uid, ALICE, "node01")]  # munge said: alice
    d = (base / str(alice.pw_uid)).lstat()
    assert (d.st_uid, d.st_mode & 0o7777) == (alice.pw_uid, 0o700)
    f = (base / str(alice.pw_uid) / "slurm_jwt").lstat()
    assert (f.st_uid, f.st_mode & 0o7777) == (alice.pw_uid, 0o600)
    # bob has no token: the refusal comes back from the child in one line
    from client_engine.pull import PullError

    bob = pwd.getpwnam(BOB)
    with pytest.raises(PullError, match="no current token") as err:
        pull_into(str(base), bob.pw_uid, BOB, service.address, str(realm.node01.socket))
    assert err.value.result == "no_token"
