"""The pull service and its client, with a fake munge: policy, protocol, limits, files.

The real munged is in tests/integration/test_pull.py; here munge is a fake
that keeps munged's rules (uid from the credential, replay refused once
decoded, expiry and foreign keys by flag), so every branch is reached fast.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import client_engine.pull as client
import producer.pull as pull_server
from client_engine.tokens import Refused
from producer.pull import (
    MESSAGES,
    RESULTS,
    HostResolver,
    PullLimits,
    PullPolicy,
    PullServer,
    Refusal,
    counts_line,
    parse_address,
)
from tests.conftest import require
from tokenlife import munge as pmunge
from tokenlife.munge import Credential, MungeError

ALICE_UID, BOB_UID = 4001, 4002
TOKEN = "aaa.bbb.ccc"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(sun: str, iat: int | None = None, ttl: int = 600) -> str:
    now = int(time.time())
    iat = now if iat is None else iat
    claims = {"iat": iat, "exp": iat + ttl, "sun": sun}
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}.{b64(os.urandom(32))}"


class FakeMunge:
    """munged's rules, in memory: one realm; credentials are JSON, not secret."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.encoded: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def make(
        self,
        payload: bytes,
        uid: int,
        origin: str = "10.0.0.1",
        error: int | None = None,
        restrict: int | None = None,
    ) -> str:
        body = {"p": payload.decode("latin-1"), "uid": uid, "origin": origin, "err": error}
        body["restrict"] = restrict
        body["n"] = os.urandom(4).hex()
        return "FAKE:" + b64(json.dumps(body).encode()) + ":"

    @staticmethod
    def read(cred: str | bytes) -> dict[str, Any]:
        text = cred.decode() if isinstance(cred, bytes) else cred
        if not (text.startswith("FAKE:") and text.endswith(":")):
            raise MungeError(pmunge.EMUNGE_BAD_CRED, "Failed to match armor prefix")
        raw = text[5:-1]
        data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        return data

    def decode(self, credential: str | bytes) -> Credential:
        data = self.read(credential)
        key = credential if isinstance(credential, str) else credential.decode()
        if data["err"] is not None:
            whose = data["uid"] if data["err"] in pmunge.DECODED_BUT_REFUSED else None
            raise MungeError(data["err"], pmunge.strerror(data["err"]) if _lib() else "x", whose)
        with self.lock:
            if key in self.seen:
                raise MungeError(pmunge.EMUNGE_CRED_REPLAYED, "Replayed credential", data["uid"])
            self.seen.add(key)
        return Credential(data["p"].encode("latin-1"), data["uid"], 100, data["origin"], 0, 60)

    def encode(
        self, payload: bytes, *, uid_restriction: int | None = None, ttl: int | None = None
    ) -> str:
        with self.lock:
            self.encoded.append({"payload": payload, "restrict": uid_restriction, "ttl": ttl})
        return self.make(payload, 0, restrict=uid_restriction)


def _lib() -> bool:
    return pmunge.available()


def request(nonce: bytes = b"abc123") -> bytes:
    return b"tokenlife-pull 1 " + nonce


@pytest.fixture
def users(monkeypatch: pytest.MonkeyPatch) -> None:
    names = {0: "root", ALICE_UID: "alice", BOB_UID: "bob", 4003: "slurm"}

    def getpwuid(uid: int) -> Any:
        if uid not in names:
            raise KeyError(uid)
        return pwd.struct_passwd((names[uid], "x", uid, uid, "", "/", "/bin/sh"))

    monkeypatch.setattr("producer.pull.pwd.getpwuid", getpwuid)


class Calls:
    def __init__(self, tokens: dict[str, str | Refusal | None] | None = None) -> None:
        self.tokens = tokens if tokens is not None else {"alice": TOKEN}
        self.lookups: list[tuple[int, str, str]] = []
        self.audits: list[tuple[str, str, str]] = []

    def lookup(self, uid: int, user: str, host: str) -> str | Refusal | None:
        self.lookups.append((uid, user, host))
        return self.tokens.get(user)

    def audit(self, user: str, host: str, result: str) -> None:
        self.audits.append((user, host, result))


@pytest.fixture
def fake() -> FakeMunge:
    return FakeMunge()


@pytest.fixture
def calls() -> Calls:
    return Calls()


def make_server(
    fake: FakeMunge,
    calls: Calls,
    policy: PullPolicy | None = None,
    limits: PullLimits | None = None,
    hosts: dict[str, str] | None = None,
) -> PullServer:
    names = hosts or {"10.0.0.1": "node01", "10.0.0.2": "node02", "10.0.0.9": "login1"}
    return PullServer(
        "127.0.0.1:0",
        calls.lookup,
        policy,
        calls.audit,
        munge=fake,
        limits=limits,
        resolve_host=lambda addr: names.get(addr, addr),
    )


@pytest.fixture
def server(fake: FakeMunge, calls: Calls, users: None) -> Iterator[PullServer]:
    srv = make_server(fake, calls)
    try:
        yield srv
    finally:
        srv.close()


def answer(srv: PullServer, cred: str, peer: str = "10.0.0.1") -> tuple[str, str]:
    reply, result = srv.answer(cred.encode(), peer)
    return reply.decode(), result


# -- the answer to one request ------------------------------------------------------


def test_a_user_gets_their_own_token_restricted_to_their_uid(
    server: PullServer, fake: FakeMunge, calls: Calls
) -> None:
    reply, result = answer(server, fake.make(request(b"n0nce"), ALICE_UID))
    assert result == "ok" and reply.startswith("OK FAKE:") and reply.endswith("\n")
    sent = fake.read(reply[3:].strip())
    assert sent["p"] == f"tokenlife-pull 1 n0nce {TOKEN}"
    assert fake.encoded[-1]["restrict"] == ALICE_UID  # only alice's uid can decode it
    assert fake.encoded[-1]["ttl"] == PullLimits().reply_ttl
    assert calls.lookups == [(ALICE_UID, "alice", "node01")]
    assert calls.audits == [("alice", "node01", "ok")]
    assert server.counts()["ok"] == 1


def test_the_user_is_the_credentials_uid_never_a_claimed_name(
    server: PullServer, fake: FakeMunge, calls: Calls
) -> None:
    # bob cannot say "alice": a request naming anyone is malformed, and bob's
    # own request is answered with bob's (absent) token
    reply, result = answer(server, fake.make(b"tokenlife-pull 1 n0nce alice", BOB_UID))
    assert (result, reply) == ("bad_request", "ERR bad_request malformed request\n")
    reply, result = answer(server, fake.make(request(), BOB_UID))
    assert (result, reply) == ("no_token", f"ERR no_token {MESSAGES['no_token']}\n")
    assert calls.lookups == [(BOB_UID, "bob", "node01")]
    assert all(user != "alice" for _, user, _ in calls.lookups)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"tokenlife-pull",
        b"tokenlife-pull 2 abc",  # a later version
        b"tokenlife-pull 1",
        b"tokenlife-pull 1 ",
        b"tokenlife-pull 1 a b",
        b"tokenlife-pull 1 " + b"a" * 65,
        b"tokenlife-pull 1 no/slash",
        b"tokenlife-pull 1 \xff\xfe",
        b"other 1 abc",
    ],
)
def test_malformed_payloads_are_bad_requests(
    server: PullServer, fake: FakeMunge, calls: Calls, payload: bytes
) -> None:
    reply, result = answer(server, fake.make(payload, ALICE_UID))
    assert result == "bad_request" and reply == "ERR bad_request malformed request\n"
    assert calls.lookups == []


@pytest.mark.parametrize(
    ("code", "result"),
    [
        (pmunge.EMUNGE_CRED_INVALID, "bad_credential"),  # another munge key
        (pmunge.EMUNGE_CRED_EXPIRED, "expired"),
        (pmunge.EMUNGE_CRED_REPLAYED, "replay"),
        (pmunge.EMUNGE_CRED_REWOUND, "bad_credential"),
        (pmunge.EMUNGE_CRED_UNAUTHORIZED, "bad_credential"),
        (pmunge.EMUNGE_BAD_CRED, "bad_credential"),
        (pmunge.EMUNGE_BAD_MAC, "bad_credential"),
        (pmunge.EMUNGE_SOCKET, "error"),  # our munged is down: not the caller's fault
        (pmunge.EMUNGE_TIMEOUT, "error"),
    ],
)
def test_munge_refusals_map_to_results(
    server: PullServer, fake: FakeMunge, calls: Calls, code: int, result: str
) -> None:
    reply, got = answer(server, fake.make(request(), ALICE_UID, error=code))
    assert got == result
    assert reply == f"ERR {result} {MESSAGES[result]}\n"
    assert calls.lookups == []
    assert server.counts()[result] == 1
    # whose it was is known only when munged decoded it
    user = "alice" if code in pmunge.DECODED_BUT_REFUSED else "-"
    assert calls.audits == [(user, "10.0.0.1", result)]


def test_a_replayed_credential_is_refused(server: PullServer, fake: FakeMunge) -> None:
    cred = fake.make(request(), ALICE_UID)
    assert answer(server, cred)[1] == "ok"
    assert answer(server, cred) == (f"ERR replay {MESSAGES['replay']}\n", "replay")


def test_garbage_is_a_bad_credential_and_the_reply_quotes_nothing(server: PullServer) -> None:
    reply, result = answer(server, "MUNGE:" + "A" * 100 + "secret-looking")
    assert result == "bad_credential"
    assert reply == "ERR bad_credential credential refused\n"


def test_a_uid_without_a_name_is_refused(server: PullServer, fake: FakeMunge) -> None:
    reply, result = answer(server, fake.make(request(), 4999))
    assert result == "refused_policy" and "4999" not in reply


def test_lookup_refusal_is_generic_on_the_wire(
    fake: FakeMunge, users: None, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls({"alice": Refusal("token revoked by admin carol")})
    srv = make_server(fake, calls)
    try:
        caplog.set_level("INFO", "producer.pull")
        reply, result = answer(srv, fake.make(request(), ALICE_UID))
    finally:
        srv.close()
    assert result == "refused_policy" and reply == "ERR refused_policy refused by policy\n"
    assert "token revoked by admin carol" in caplog.text  # the log has the reason


def test_lookup_failure_is_an_error_that_leaks_nothing(
    fake: FakeMunge, users: None, caplog: pytest.LogCaptureFixture
) -> None:
    def lookup(uid: int, user: str, host: str) -> str | None:
        raise RuntimeError(f"database said {TOKEN}")

    srv = PullServer("127.0.0.1:0", lookup, munge=fake, resolve_host=lambda a: a)
    try:
        reply, result = srv.answer(fake.make(request(), ALICE_UID).encode(), "10.0.0.1")
    finally:
        srv.close()
    assert (reply, result) == (b"ERR error internal error\n", "error")
    assert TOKEN not in caplog.text and "RuntimeError" in caplog.text


@pytest.mark.parametrize("bad", ["", "two words", "x" * 20000, "tab\there", "é", "del\x7f", "a\nb"])
def test_lookup_returning_a_non_token_is_an_error(fake: FakeMunge, users: None, bad: str) -> None:
    srv = make_server(fake, Calls({"alice": bad}))
    try:
        assert answer(srv, fake.make(request(), ALICE_UID))[1] == "error"
    finally:
        srv.close()


def test_an_audit_that_fails_does_not_fail_the_pull(fake: FakeMunge, users: None) -> None:
    def audit(user: str, host: str, result: str) -> None:
        raise OSError("audit store down")

    srv = PullServer(
        "127.0.0.1:0", lambda *a: TOKEN, audit=audit, munge=fake, resolve_host=lambda a: a
    )
    try:
        assert srv.answer(fake.make(request(), ALICE_UID).encode(), "p")[1] == "ok"
    finally:
        srv.close()


def test_encode_failure_is_an_error(fake: FakeMunge, calls: Calls, users: None) -> None:
    def broken(payload: bytes, **kw: Any) -> str:
        raise MungeError(pmunge.EMUNGE_SOCKET, "munged is down")

    fake.encode = broken  # type: ignore[method-assign]
    srv = make_server(fake, calls)
    try:
        assert answer(srv, fake.make(request(), ALICE_UID))[1] == "error"
        assert calls.audits[-1] == ("alice", "node01", "error")
    finally:
        srv.close()


# -- the policy ------------------------------------------------------------------------


def test_privileged_users_get_nothing_unless_allowed(
    fake: FakeMunge, calls: Calls, users: None
) -> None:
    calls.tokens.update({"root": TOKEN, "slurm": TOKEN})
    policy = PullPolicy(privileged_uids=frozenset({0, 4003}))
    srv = make_server(fake, calls, policy)
    try:
        for uid in (0, 4003):
            reply, result = answer(srv, fake.make(request(), uid))
            assert (result, reply) == ("refused_policy", "ERR refused_policy privileged account\n")
        assert calls.lookups == []  # refused before the store is asked
    finally:
        srv.close()
    policy = PullPolicy(privileged_uids=frozenset({0}), allow_privileged=True)
    allowed = make_server(fake, calls, policy)
    try:
        assert answer(allowed, fake.make(request(), 0))[1] == "ok"
    finally:
        allowed.close()


def test_jobs_policy_needs_work_on_the_origin_host_or_a_login_host(
    fake: FakeMunge, calls: Calls, users: None
) -> None:
    asked: list[tuple[str, str]] = []

    def has_work(user: str, host: str) -> bool:
        asked.append((user, host))
        return (user, host) == ("alice", "node01")

    policy = PullPolicy("jobs", has_work, login_hosts=frozenset({"LOGIN1.example.org"}))
    srv = make_server(fake, calls, policy)
    try:
        assert answer(srv, fake.make(request(), ALICE_UID, origin="10.0.0.1"))[1] == "ok"
        reply, result = answer(srv, fake.make(request(), ALICE_UID, origin="10.0.0.2"))
        assert result == "refused_policy"
        assert reply == "ERR refused_policy no work of this user on this host\n"
        assert answer(srv, fake.make(request(), ALICE_UID, origin="10.0.0.9"))[1] == "ok"
        reply, result = answer(srv, fake.make(request(), ALICE_UID, origin="0.0.0.0"))
        assert result == "refused_policy" and "origin host unknown" in reply
        assert asked == [("alice", "node01"), ("alice", "node02")]
        assert [c[2] for c in calls.audits] == ["ok", "refused_policy", "ok", "refused_policy"]
    finally:
        srv.close()


def test_jobs_policy_fails_closed_when_has_work_fails(
    fake: FakeMunge, calls: Calls, users: None
) -> None:
    def has_work(user: str, host: str) -> bool:
        raise TimeoutError("squeue hangs")

    srv = make_server(fake, calls, PullPolicy("jobs", has_work))
    try:
        assert answer(srv, fake.make(request(), ALICE_UID))[1] == "error"
        assert calls.lookups == []
    finally:
        srv.close()


def test_policy_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="one of own, jobs"):
        PullPolicy("nodes")
    with pytest.raises(ValueError, match="needs has_work"):
        PullPolicy("jobs")
    assert PullPolicy("own").check(ALICE_UID, "alice", "") is None
    assert PullPolicy().check(0, "root", "x") is not None  # root is privileged by default


def test_host_resolver_caches_and_shortens() -> None:
    seen: list[str] = []

    def reverse(addr: str) -> str:
        seen.append(addr)
        if addr == "10.0.0.7":
            raise socket.herror("no name")
        return "Node01.Cluster.Example."

    now = [0.0]
    resolve = HostResolver(ttl=10, reverse=reverse, clock=lambda: now[0])
    assert resolve("10.0.0.1") == "node01"
    assert resolve("10.0.0.1") == "node01"
    assert resolve("10.0.0.7") == "10.0.0.7"  # no name: the address itself
    assert resolve("0.0.0.0") == ""  # munged did not know its address
    now[0] = 11
    resolve("10.0.0.1")
    assert seen == ["10.0.0.1", "10.0.0.7", "10.0.0.1"]


def test_addresses_and_limits_are_checked() -> None:
    assert parse_address("host:1") == ("host", 1)
    assert parse_address("[::1]:9") == ("::1", 9)
    assert parse_address(":9") == ("", 9)
    for bad in ("host", "host:x", "::1:9", "h:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)
    with pytest.raises(ValueError, match="workers"):
        PullLimits(workers=0)
    with pytest.raises(ValueError, match="read_timeout"):
        PullLimits(read_timeout=0)
    assert counts_line({"ok": 2, "busy": 0, "replay": 1}) == "ok 2, replay 1"
    assert counts_line({}) == "no pulls"
    assert set(MESSAGES) == set(RESULTS) - {"ok"}


# -- the server on a socket: limits ------------------------------------------------------


def exchange(
    address: str,
    data: bytes,
    timeout: float = 5.0,
    source: str | None = None,
    half_close: bool = False,
) -> bytes:
    host, port = parse_address(address)
    bind = (source, 0) if source else None
    with socket.create_connection((host, port), timeout=timeout, source_address=bind) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := sock.recv(65536):
            buf += chunk
        return buf


@pytest.fixture
def running(fake: FakeMunge, calls: Calls, users: None) -> Iterator[PullServer]:
    limits = PullLimits(read_timeout=0.5, max_per_peer=4, max_connections=32)
    srv = make_server(fake, calls, limits=limits, hosts={"10.0.0.1": "node01"}).start()
    try:
        yield srv
    finally:
        srv.close()


def test_a_request_over_tcp(running: PullServer, fake: FakeMunge) -> None:
    reply = exchange(running.address, fake.make(request(), ALICE_UID).encode() + b"\n")
    assert reply.startswith(b"OK FAKE:") and reply.endswith(b"\n")
    # a caller that closes its side instead of sending a newline is served too
    reply = exchange(running.address, fake.make(request(), ALICE_UID).encode(), half_close=True)
    assert reply.startswith(b"OK ")


def test_an_oversized_request_is_dropped(running: PullServer, fake: FakeMunge) -> None:
    reply = exchange(running.address, b"M" * 5000)
    assert reply == b"ERR bad_request request too long\n"
    assert running.counts()["bad_request"] == 1
    assert exchange(running.address, fake.make(request(), ALICE_UID).encode() + b"\n")[:3] == b"OK "


def test_a_slow_loris_is_cut_at_the_deadline_however_it_trickles(
    running: PullServer, fake: FakeMunge
) -> None:
    host, port = parse_address(running.address)
    with socket.create_connection((host, port), timeout=5) as sock:
        start = time.monotonic()
        got = b""
        with pytest.raises(OSError):  # trickle until the server hangs up
            for _ in range(100):
                sock.sendall(b"M")
                time.sleep(0.05)
                got = sock.recv(100, socket.MSG_DONTWAIT)
                if got:
                    break
            raise OSError("done")
        elapsed = time.monotonic() - start
    assert got == b"ERR timeout request not received in time\n"
    assert 0.4 < elapsed < 1.5
    assert running.counts()["timeout"] == 1


def test_one_peer_cannot_hold_more_than_its_share(running: PullServer, fake: FakeMunge) -> None:
    host, port = parse_address(running.address)
    peer = ("127.0.0.2", 0)
    idle = [socket.create_connection((host, port), source_address=peer) for _ in range(4)]
    try:
        time.sleep(0.1)
        refused = exchange(running.address, b"x\n", source="127.0.0.2")
        assert refused == b"ERR busy busy; try again\n"
        # another peer is served meanwhile
        good = exchange(running.address, fake.make(request(), ALICE_UID).encode() + b"\n")
        assert good.startswith(b"OK ")
    finally:
        for s in idle:
            s.close()
    assert running.counts()["busy"] == 1


def test_at_max_connections_newcomers_wait_in_the_backlog(
    fake: FakeMunge, calls: Calls, users: None
) -> None:
    limits = PullLimits(read_timeout=0.6, max_connections=3, max_per_peer=10)
    srv = make_server(fake, calls, limits=limits).start()
    host, port = parse_address(srv.address)
    idle = [socket.create_connection((host, port)) for _ in range(3)]
    try:
        time.sleep(0.1)
        start = time.monotonic()
        reply = exchange(srv.address, fake.make(request(), ALICE_UID).encode() + b"\n")
        waited = time.monotonic() - start
        assert reply.startswith(b"OK ")  # waited, not turned away
        assert 0.3 < waited < 2.0  # until the idle ones were cut
        assert srv.counts()["busy"] == 0 and srv.counts()["timeout"] == 3
    finally:
        for s in idle:
            s.close()
        srv.close()


def test_a_stuck_lookup_does_not_stall_the_others(fake: FakeMunge, users: None) -> None:
    release = threading.Event()

    def lookup(uid: int, user: str, host: str) -> str:
        if user == "bob":
            release.wait(5)
        return TOKEN

    srv = PullServer(
        "127.0.0.1:0",
        lookup,
        munge=fake,
        limits=PullLimits(workers=2),
        resolve_host=lambda a: a,
    ).start()
    try:
        slow = threading.Thread(
            target=exchange, args=(srv.address, fake.make(request(), BOB_UID).encode() + b"\n")
        )
        slow.start()
        time.sleep(0.1)
        start = time.monotonic()
        for _ in range(5):
            reply = exchange(srv.address, fake.make(request(), ALICE_UID).encode() + b"\n")
            assert reply.startswith(b"OK ")
        assert time.monotonic() - start < 1.0
    finally:
        release.set()
        slow.join()
        srv.close()


def test_work_that_waited_too_long_is_answered_busy(fake: FakeMunge, users: None) -> None:
    gate = threading.Event()

    def lookup(uid: int, user: str, host: str) -> str:
        gate.wait(5)
        return TOKEN

    limits = PullLimits(workers=1, request_timeout=0.3)
    srv = PullServer(
        "127.0.0.1:0", lookup, munge=fake, limits=limits, resolve_host=lambda a: a
    ).start()
    replies: list[bytes] = []
    try:
        threads = [
            threading.Thread(
                target=lambda: replies.append(
                    exchange(srv.address, fake.make(request(), ALICE_UID).encode() + b"\n")
                )
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
            time.sleep(0.05)
        time.sleep(0.5)
        gate.set()
        for t in threads:
            t.join()
    finally:
        srv.close()
    assert sorted(r[:7] for r in replies) == [b"ERR bus", b"OK FAKE"]
    assert srv.counts()["busy"] == 1


def test_slow_loris_flood_from_other_hosts_does_not_slow_a_good_client(
    fake: FakeMunge, calls: Calls, users: None
) -> None:
    limits = PullLimits(read_timeout=1.0, max_per_peer=8, max_connections=64)
    srv = make_server(fake, calls, limits=limits).start()
    host, port = parse_address(srv.address)
    flood: list[socket.socket] = []
    try:
        for i in range(6):
            for _ in range(8):
                s = socket.create_connection((host, port), source_address=(f"127.0.1.{i + 1}", 0))
                s.sendall(b"MUNGE:")
                flood.append(s)
        times = []
        for _ in range(20):
            start = time.monotonic()
            reply = exchange(srv.address, fake.make(request(), ALICE_UID).encode() + b"\n")
            times.append(time.monotonic() - start)
            assert reply.startswith(b"OK ")
        assert max(times) < 0.25, times
    finally:
        for s in flood:
            s.close()
        srv.close()


def test_close_stops_serving(fake: FakeMunge, calls: Calls, users: None) -> None:
    srv = make_server(fake, calls).start()
    address = srv.address
    assert srv.alive()
    srv.close()
    assert not srv.alive()
    with pytest.raises(OSError):
        exchange(address, b"x\n", timeout=1)


# -- the client ------------------------------------------------------------------------


class FakeClientMunge:
    """client_engine.pull._Munge over a FakeMunge, as user ``uid``."""

    def __init__(self, fake: FakeMunge, uid: int) -> None:
        self.fake, self.uid = fake, uid
        self.restrictions: list[int | None] = []

    def encode(self, payload: bytes, sock: str | None, uid: int | None, ttl: int) -> bytes:
        self.restrictions.append(uid)
        return self.fake.make(payload, self.uid, restrict=uid).encode()

    def decode(self, cred: bytes, sock: str | None) -> tuple[int, bytes, int, str]:
        try:
            data = self.fake.read(cred)
        except MungeError as exc:
            return exc.code, b"", 0, exc.message
        if data["restrict"] is not None and data["restrict"] != self.uid:
            return pmunge.EMUNGE_CRED_UNAUTHORIZED, b"", 0, "Unauthorized credential"
        return 0, data["p"].encode("latin-1"), data["uid"], ""


@pytest.fixture
def as_alice(monkeypatch: pytest.MonkeyPatch, fake: FakeMunge) -> FakeClientMunge:
    side = FakeClientMunge(fake, ALICE_UID)
    monkeypatch.setattr(client, "_Munge", side)
    return side


def test_client_pulls_its_token(running: PullServer, as_alice: FakeClientMunge) -> None:
    assert client.pull(running.address, "/sock", 5) == TOKEN
    assert client.pull(running.address, server_uid=0) == TOKEN  # the fake server is uid 0
    assert as_alice.restrictions == [None, 0]


def test_client_refuses_a_reply_from_another_uid(
    running: PullServer, as_alice: FakeClientMunge
) -> None:
    with pytest.raises(client.PullError, match="made by uid 0, not the service's") as err:
        client.pull(running.address, server_uid=999)
    assert err.value.result == "bad_reply"


def test_client_reports_refusals_in_one_line(
    running: PullServer, fake: FakeMunge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "_Munge", FakeClientMunge(fake, BOB_UID))
    with pytest.raises(client.PullError) as err:
        client.pull(running.address)
    assert err.value.result == "no_token"
    assert str(err.value) == f"pull from {running.address}: no current token for this user"
    assert isinstance(err.value, Refused)  # the engine's one-line error


def test_client_refuses_a_reply_that_answers_another_request(
    monkeypatch: pytest.MonkeyPatch, fake: FakeMunge, as_alice: FakeClientMunge
) -> None:
    old = fake.make(b"tokenlife-pull 1 othernonce " + TOKEN.encode(), 0)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(f"OK {old}\n".encode())

    t = threading.Thread(target=serve)
    t.start()
    try:
        with pytest.raises(client.PullError, match="does not answer this request"):
            client.pull(f"127.0.0.1:{port}")
    finally:
        t.join()
        listener.close()


def test_client_retries_busy_and_tries_the_next_address(
    running: PullServer, as_alice: FakeClientMunge
) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    dead_port = dead.getsockname()[1]
    try:
        assert client.pull(f"127.0.0.1:{dead_port},{running.address}", timeout=5) == TOKEN
        with pytest.raises(client.PullError) as err:
            client.pull(f"127.0.0.1:{dead_port}", timeout=0.3)
        assert err.value.result == "unreachable"
    finally:
        dead.close()


def test_client_address_errors() -> None:
    for bad in ("", "host", "::1:5", ":5", "h:99999", " , "):
        with pytest.raises(client.PullError):
            client.pull(bad, timeout=0.1)
    assert client.parse_address("[::1]:5") == ("::1", 5)


def test_client_and_server_speak_one_protocol_through_one_binding() -> None:
    assert (client.PROTOCOL, client.VERSION) == (pull_server.PROTOCOL, pull_server.VERSION)
    assert client.Munge is pmunge.Munge and client.MungeError is pmunge.MungeError


def test_a_credential_never_shows_its_payload() -> None:
    cred = Credential(b"tokenlife-pull 1 n1 " + TOKEN.encode(), 1001, 1001, "10.0.0.1", 5, 60)
    assert TOKEN not in repr(cred) and "uid=1001" in repr(cred)
    assert cred == Credential(cred.payload, 1001, 1001, "10.0.0.1", 5, 60)
    assert cred != Credential(cred.payload, 1002, 1001, "10.0.0.1", 5, 60)


def test_munge_error_numbers_match_libmunge() -> None:
    require(pmunge.available(), "needs libmunge2 (Debian: munge)")
    expected = {
        pmunge.EMUNGE_SOCKET: "Socket communication error",
        pmunge.EMUNGE_BAD_CRED: "Invalid credential format",
        pmunge.EMUNGE_CRED_INVALID: "Invalid credential",
        pmunge.EMUNGE_CRED_EXPIRED: "Expired credential",
        pmunge.EMUNGE_CRED_REWOUND: "Rewound credential",
        pmunge.EMUNGE_CRED_REPLAYED: "Replayed credential",
        pmunge.EMUNGE_CRED_UNAUTHORIZED: "Unauthorized credential",
    }
    assert {code: pmunge.strerror(code) for code in expected} == expected


def test_munge_socket_that_is_not_there() -> None:
    require(pmunge.available(), "needs libmunge2 (Debian: munge)")
    with pytest.raises(MungeError) as err:
        pmunge.Munge("/nonexistent/munge.socket").encode(b"x")
    assert err.value.code == pmunge.EMUNGE_SOCKET
    with pytest.raises(MungeError) as err:
        pmunge.Munge("/nonexistent/munge.socket").decode("x" * 70000)
    assert err.value.code == pmunge.EMUNGE_BAD_CRED


# -- pull_into: the file, the lock, the order ------------------------------------------------

ME = os.getuid()
MY_NAME = pwd.getpwuid(ME).pw_name


class FakePull:
    def __init__(self, tokens: list[str] | None = None, delay: float = 0.0) -> None:
        self.tokens = tokens or []
        self.delay = delay
        self.calls = 0
        self.error: client.PullError | None = None
        self.lock = threading.Lock()

    def __call__(self, address: str, sock: str | None, timeout: float, **kw: Any) -> str:
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.tokens[min(self.calls, len(self.tokens)) - 1]


@pytest.fixture
def token_dir(tmp_path: Path) -> Path:
    (tmp_path / "run" / str(ME)).mkdir(parents=True, mode=0o700)
    return tmp_path / "run"


def into(token_dir: Path, **kw: Any) -> Any:
    return client.pull_into(str(token_dir), ME, MY_NAME, "127.0.0.1:1", **kw)


def test_pull_into_writes_a_private_file_stamped_with_iat(
    token_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    iat = int(time.time()) - 100
    fake = FakePull([make_token(MY_NAME, iat=iat)])
    monkeypatch.setattr(client, "pull", fake)
    token = into(token_dir)
    path = token_dir / str(ME) / "slurm_jwt"
    st = path.stat()
    assert (st.st_mode & 0o777, st.st_uid, int(st.st_mtime)) == (0o600, ME, iat)
    assert token.source == str(path) and token.iat == iat
    assert path.read_text() == fake.tokens[0]  # no newline: Slurm refuses one
    assert into(token_dir).value == fake.tokens[0] and fake.calls == 1  # still good: no pull


def test_pull_into_pulls_again_in_the_window_but_not_more_often_than_min_interval(
    token_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = int(time.time())
    first, second = make_token(MY_NAME, iat=now - 500, ttl=560), make_token(MY_NAME, iat=now)
    fake = FakePull([first, second])
    monkeypatch.setattr(client, "pull", fake)
    assert into(token_dir).value == first
    # 60 s left, 300 wanted: a pull, but within min_interval of the last one, none
    assert into(token_dir, min_remaining=300).value == first
    assert fake.calls == 1
    assert into(token_dir, min_remaining=300, min_interval=0).value == second
    assert fake.calls == 2


def test_after_a_pull_that_worked_a_short_token_waits_a_tenth_of_its_life_at_most(
    token_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 10-second token pulled in its window must not wait 30 s for the next:
    the pause after a good pull is a tenth of the lifetime (1 s here), and
    none once that token has expired; a failure still holds for min_interval."""
    now = int(time.time())
    first = make_token(MY_NAME, iat=now - 8, ttl=10)  # 2 s left
    second = make_token(MY_NAME, iat=now, ttl=10)
    fake = FakePull([first, second])
    monkeypatch.setattr(client, "pull", fake)
    assert into(token_dir, min_remaining=5).value == first
    assert into(token_dir, min_remaining=5).value == first and fake.calls == 1  # within 1 s
    time.sleep(1.1)
    assert into(token_dir, min_remaining=5).value == second and fake.calls == 2
    # An expired token after a good pull: no pause at all.
    path = token_dir / str(ME) / "slurm_jwt"
    path.unlink()
    fake.tokens = [make_token(MY_NAME, iat=now, ttl=600)] * 3
    assert into(token_dir).exp == now + 600 and fake.calls == 3


def test_pull_into_never_puts_an_older_token_over_a_newer_one(
    token_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = int(time.time())
    newer = make_token(MY_NAME, iat=now, ttl=100)
    path = token_dir / str(ME) / "slurm_jwt"
    path.write_text(newer)
    path.chmod(0o600)
    fake = FakePull([make_token(MY_NAME, iat=now - 50, ttl=600)])  # lives longer, issued before
    monkeypatch.setattr(client, "pull", fake)
    token = into(token_dir, min_remaining=300)
    assert fake.calls == 1 and token.value == newer and path.read_text() == newer


def test_pull_into_refuses_a_token_for_someone_else(
    token_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "pull", FakePull([make_token("somebody-else")]))
    with pytest.raises(Refused, match="another user"):
        into(token_dir)
    assert not (token_dir / str(ME) / "slurm_jwt").exists()


def test_pull_into_keeps_a_valid_file_when_the_pull_fails_and_caches_the_failure(
    token_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakePull()
    fake.error = client.PullError("no_token", "pull from x: no current token for this user")
    monkeypatch.setattr(client, "pull", fake)
    with pytest.raises(client.PullError, match="no current token"):
        into(token_dir)
    with pytest.raises(client.PullError, match="said no_token; next try in"):
        into(token_dir)
    assert fake.calls == 1  # the second caller read the first one's answer
    now = int(time.time())
    path = token_dir / str(ME) / "slurm_jwt"
    path.write_text(make_token(MY_NAME, iat=now, ttl=100))
    path.chmod(0o600)
    assert into(token_dir, min_remaining=300, min_interval=0).iat == now
    assert fake.calls == 2


def test_a_thousand_tasks_cost_one_pull(token_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakePull([make_token(MY_NAME)], delay=0.3)
    monkeypatch.setattr(client, "pull", fake)
    results: list[str] = []
    errors: list[BaseException] = []

    def task() -> None:
        try:
            results.append(into(token_dir).value)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=task) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 200 and set(results) == {fake.tokens[0]}
    assert fake.calls == 1


def test_pull_into_gives_up_waiting_for_a_stuck_lock(
    token_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    fd = os.open(token_dir / str(ME) / ".pull.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    monkeypatch.setattr(client, "pull", FakePull([make_token(MY_NAME)]))
    try:
        with pytest.raises(client.PullError, match="takes too long") as err:
            into(token_dir, timeout=0.2)
        assert err.value.result == "busy"
    finally:
        os.close(fd)


@pytest.mark.parametrize("problem", ["missing", "symlink", "group-writable", "file"])
def test_pull_into_refuses_an_unsafe_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, problem: str
) -> None:
    base = tmp_path / "run"
    base.mkdir()
    target = base / str(ME)
    if problem == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        target.symlink_to(tmp_path / "elsewhere")
    elif problem == "group-writable":
        target.mkdir()
        target.chmod(0o770)
    elif problem == "file":
        target.write_text("")
    monkeypatch.setattr(client, "pull", FakePull([make_token(MY_NAME)]))
    with pytest.raises(Refused):
        client.pull_into(str(base), ME, MY_NAME, "127.0.0.1:1")


def test_pull_into_refuses_a_symlinked_lock(
    token_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (token_dir / str(ME) / ".pull.lock").symlink_to(tmp_path / "victim")
    monkeypatch.setattr(client, "pull", FakePull([make_token(MY_NAME)]))
    with pytest.raises(Refused, match=r"\.pull\.lock"):
        into(token_dir)
    assert not (tmp_path / "victim").exists()


def test_client_main_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert client.main([]) == 2
    assert client.main(["--bogus", "x"]) == 2
    assert client.main(["--timeout", "x", "h:1"]) == 2
    assert client.main(["--timeout", "0.2", "127.0.0.1:1"]) == 1  # no munged, or no server
    assert capsys.readouterr().err.startswith("usage:")


def test_close_twice_and_before_start(fake: FakeMunge, calls: Calls, users: None) -> None:
    srv = make_server(fake, calls)
    srv.close()
    srv.close()
    started = make_server(fake, calls).start()
    started.close()
    started.close()
    assert not started.alive()


# -- what the daemon backs the service with -------------------------------------------------

from producer.pull_backing import StoreLookup, WorkView  # noqa: E402
from tokenlife.records import TokenRecord  # noqa: E402


def record(user: str = "alice", uid: int = ALICE_UID, exp_in: int = 600, **kw: Any) -> TokenRecord:
    now = int(time.time())
    fields = {"token_id": "t1", "user": user, "uid": uid, "gid": uid, "first_issued": now}
    fields |= {"iat": now, "exp": now + exp_in, "renew_until": now + 7200, "lifetime": 3600}
    return TokenRecord(**{**fields, **kw}, token=TOKEN)


class FakeStore:
    def __init__(self, records: dict[str, TokenRecord]) -> None:
        self.records, self.calls = records, 0

    def current(self, user: str) -> TokenRecord | None:
        self.calls += 1
        return self.records.get(user)


def test_store_lookup_hands_out_the_current_token_only() -> None:
    store = FakeStore(
        {
            "alice": record(),
            "bob": record("bob", BOB_UID, exp_in=-1),
            "carol": record("carol", 4005),
            "dave": record("dave", 4006, state="revoked"),
        }
    )
    lookup = StoreLookup(lambda: store, cache_ttl=60)  # type: ignore[arg-type,return-value]
    assert lookup(ALICE_UID, "alice", "node01") == TOKEN
    assert lookup(BOB_UID, "bob", "node01") is None  # expired
    refused = lookup(4999, "carol", "node01")  # the name now belongs to another uid
    assert isinstance(refused, Refusal) and "uid 4005, not 4999" in refused.reason
    assert lookup(4006, "dave", "n") is None
    assert lookup(4007, "erin", "n") is None
    calls = store.calls
    for _ in range(100):  # a big job's nodes: one query
        lookup(ALICE_UID, "alice", "node02")
    assert store.calls == calls
    lookup.forget()
    lookup(ALICE_UID, "alice", "node02")
    assert store.calls == calls + 1


def test_work_view_refreshes_on_a_miss_at_most_every_refresh_after() -> None:
    now = [1000.0]
    answers = [{"alice": {"node01.example.org"}}, {"alice": {"node01", "NODE02"}}]
    asked: list[int] = []

    def needs() -> dict[str, set[str]]:
        asked.append(1)
        return answers[min(len(asked), len(answers)) - 1]

    view = WorkView(needs, refresh_after=10, max_age=100, clock=lambda: now[0])
    assert view("alice", "node01") and len(asked) == 1  # no view yet: asked
    assert not view("alice", "node02") and len(asked) == 1  # asked 0 s ago: not again
    now[0] += 11
    assert view("alice", "node02.example.org") and len(asked) == 2  # a new job, seen now
    assert not view("bob", "node01") and len(asked) == 2
    view.update({"bob": {"node01"}})  # the delivery cycle's answer
    assert view("bob", "node01") and not view("alice", "node01")


def test_work_view_fails_closed_when_the_job_source_fails() -> None:
    now = [0.0]
    fail = [True]

    def needs() -> dict[str, set[str]]:
        if fail[0]:
            raise OSError("squeue: slurmctld down")
        return {"alice": {"node01"}}

    view = WorkView(needs, refresh_after=10, max_age=100, clock=lambda: now[0])
    with pytest.raises(OSError):
        view("alice", "node01")  # nothing known: the server counts an error, refuses
    fail[0] = False
    now[0] += 11
    assert view("alice", "node01")
    fail[0] = True
    now[0] += 50
    assert view("alice", "node01")  # the last answer is young enough
    assert not view("alice", "node09")
    now[0] += 100
    with pytest.raises(RuntimeError, match="has not answered"):
        view("alice", "node09")


def test_work_view_single_flight() -> None:
    gate = threading.Event()
    asked: list[int] = []

    def needs() -> dict[str, set[str]]:
        asked.append(1)
        gate.wait(5)
        return {"alice": {"node01"}}

    view = WorkView(needs, refresh_after=0.0)
    answers: list[bool] = []
    threads = [threading.Thread(target=lambda: answers.append(view("alice", "node01")))
               for _ in range(50)]  # fmt: skip
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join()
    assert answers == [True] * 50 and len(asked) == 1
