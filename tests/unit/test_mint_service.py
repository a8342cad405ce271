"""The mint service answers every request, and no caller holds up the others.

A real ``MintService`` with a real ``Minter`` on SQLite, served by
``producer.service.listen`` in a thread, asked over its real Unix socket.
Requests from other uids come from small client processes run under
``setpriv`` (``Agent``); tests/integration/test_mint_socket_attacks.py uses
the same helpers for the floods.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from producer.bounded_server import BoundedUnixServer, ConnectionLimits
from producer.client import ask
from producer.mint import Minter
from producer.service import MintService, RateLimit, RateLimiter, listen
from repository.store import SqlTokenStore
from tests.conftest import require_root, require_tool
from tokenlife.config import Config, PamConfig
from tokenlife.records import TokenRecord
from tokenlife.testing.fakes import FakeClock, StaticKeySource

KEY = secrets.token_bytes(32)
NOBODY = "nobody"


# --- a running service ------------------------------------------------------------


@dataclass
class Running:
    root: Path
    path: Path
    server: BoundedUnixServer
    service: MintService
    store: SqlTokenStore

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        answer = ask(str(self.path), request, timeout=60)
        assert answer is not None, "the mint service did not answer"
        return answer

    def raw(self, data: bytes) -> bytes:
        """Send ``data`` as root and return all the reply bytes."""
        return raw_exchange(self.path, data)

    def pam(self, user: str) -> bytes:
        """The login path's request, in its line reply mode."""
        return self.raw(b'{"op":"pam","reply":"line","user":"%s"}\n' % user.encode())


def raw_exchange(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


@contextlib.contextmanager
def running(
    limits: ConnectionLimits | None = None,
    rate: RateLimit | None = None,
    clock: Callable[[], float] = time.monotonic,
    minter_class: type[Minter] = Minter,
    config: Config | None = None,
) -> Iterator[Running]:
    """Serve a mint service in a thread, as ``tokenlife serve`` does."""
    # World-traversable (pytest's tmp dirs are root-only): other uids connect.
    root = Path(tempfile.mkdtemp(prefix="tokenlife-mintsvc-"))
    root.chmod(0o755)
    config = config or Config()
    store = SqlTokenStore(f"sqlite:///{root}/db.sqlite")
    minter = minter_class(config, StaticKeySource(KEY), store, login_dir=root / "run")
    service = MintService(config, minter, rate=rate, clock=clock)
    path = root / "sock" / "mint.sock"
    server = listen(path, service, limits)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield Running(root, path, server, service, store)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)
        store.close()
        shutil.rmtree(root, ignore_errors=True)


def frozen() -> float:
    """A clock that never moves: a spent rate-limit bucket stays spent."""
    return 1000.0


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def uid_of(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def two_users() -> tuple[str, str]:
    """Two ordinary accounts besides nobody (created if missing; needs root)."""
    from tests.integration.harness.users import ALICE, BOB, ensure_user

    return ensure_user(ALICE).pw_name, ensure_user(BOB).pw_name


# --- a client process as another uid ----------------------------------------------

AGENT = r"""
import json, socket, sys, time

mode, path = sys.argv[1], sys.argv[2]


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)  # blocking: waits while the listen backlog is full
    s.settimeout(60)
    return s


def read_rest(s, data=b""):
    s.settimeout(30)
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    return data.decode(errors="replace")


def poll(s):
    # None: nothing yet; else the reply ("" if closed without one)
    s.setblocking(False)
    try:
        data = s.recv(65536)
    except BlockingIOError:
        return None
    except OSError as exc:
        return "error: " + type(exc).__name__
    return read_rest(s, data) if data else ""


def counts(replies):
    out = {}
    for text in replies.values():
        out[text] = out.get(text, 0) + 1
    return out


if mode == "ask":  # the requests of argv[3], one connection each, one after another
    out = []
    for request in json.loads(sys.argv[3]):
        s = connect()
        try:
            s.sendall(json.dumps(request).encode() + b"\n")
        except OSError:  # refused before it was sent: the refusal is there to read
            pass
        out.append(read_rest(s))
        s.close()
    print(json.dumps(out))
elif mode == "hold":  # argv[3] idle connections; each stdin line asks for a report
    conns = [connect() for _ in range(int(sys.argv[3]))]
    replies = {}
    for _ in sys.stdin:
        for i, s in enumerate(conns):
            if i not in replies and (got := poll(s)) is not None:
                replies[i] = got
        print(json.dumps({"pending": len(conns) - len(replies), "replies": counts(replies)}),
              flush=True)
elif mode == "trickle":  # argv[3] connections sending a byte each 0.1 s for argv[4] s
    conns = [connect() for _ in range(int(sys.argv[3]))]
    replies = {}
    for s in conns:
        try:
            s.sendall(b'{"op": "mint",')
        except OSError:
            pass
    end = time.monotonic() + float(sys.argv[4])
    while len(replies) < len(conns) and time.monotonic() < end:
        time.sleep(0.1)
        for i, s in enumerate(conns):
            if i in replies:
                continue
            if (got := poll(s)) is not None:
                replies[i] = got
                continue
            try:
                s.send(b" ")
            except BlockingIOError:
                pass
            except OSError as exc:
                replies[i] = poll(s) or "error: " + type(exc).__name__
    print(json.dumps({"uncut": len(conns) - len(replies), "replies": counts(replies)}))
"""


def as_user(name: str) -> list[str]:
    pw = pwd.getpwnam(name)
    return [
        "setpriv",
        f"--reuid={pw.pw_uid}",
        f"--regid={pw.pw_gid}",
        "--clear-groups",
        sys.executable,
        "-I",
        "-c",
        AGENT,
    ]


def asks(user: str, path: Path, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``requests`` sent by ``user``, one after another; their JSON replies."""
    proc = subprocess.run(
        [*as_user(user), "ask", str(path), json.dumps(requests)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(text) for text in json.loads(proc.stdout)]


class Agent:
    """A long-running client process as ``user`` (modes ``hold`` and ``trickle``)."""

    def __init__(self, user: str, mode: str, path: Path, *args: object) -> None:
        self.proc = subprocess.Popen(
            [*as_user(user), mode, str(path), *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def report(self) -> dict[str, Any]:
        """(hold) How many connections still wait, and what the others got."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"agent died: {self.proc.stderr.read() if self.proc.stderr else ''}"
        return dict(json.loads(line))

    def wait_report(self, cond: Callable[[dict[str, Any]], bool], timeout: float = 90) -> Any:
        deadline = time.monotonic() + timeout
        while not cond(got := self.report()):
            assert time.monotonic() < deadline, f"timed out; last report {got}"
            time.sleep(0.1)
        return got

    def result(self, timeout: float = 180) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return dict(json.loads(out))

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.communicate(timeout=30)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def errors(replies: dict[str, int]) -> dict[str, int]:
    """The error messages of JSON replies, with how often each came."""
    out: dict[str, int] = {}
    for text, n in replies.items():
        key = json.loads(text)["error"] if text.startswith("{") else text
        out[key] = out.get(key, 0) + n
    return out


# --- every request gets an answer ------------------------------------------------

MALFORMED = {
    "float lifetime (was an OverflowError)": b'{"op":"mint","user":"nobody","lifetime":1e20}',
    "huge lifetime": b'{"op":"mint","user":"nobody","lifetime":%d}' % 10**30,
    "NaN lifetime": b'{"op":"mint","user":"nobody","lifetime":NaN}',
    "string lifetime": b'{"op":"mint","user":"nobody","lifetime":"3600"}',
    "bool lifetime": b'{"op":"mint","user":"nobody","lifetime":true}',
    "zero lifetime": b'{"op":"mint","user":"nobody","lifetime":0}',
    "float renew_until": b'{"op":"mint","user":"nobody","renew_until":1.5}',
    "negative renew_until": b'{"op":"mint","user":"nobody","renew_until":-1}',
    "string print": b'{"op":"mint","user":"nobody","print":"yes"}',
    "int reuse": b'{"op":"mint","user":"nobody","reuse":1}',
    "int user": b'{"op":"mint","user":42}',
    "list user": b'{"op":"mint","user":["nobody"]}',
    "no user": b'{"op":"mint"}',
    "int op": b'{"op":7,"user":"nobody"}',
    "long op": b'{"op":"%s","user":"nobody"}' % (b"x" * 100),
    "bad reply mode": b'{"op":"mint","user":"nobody","reply":"xml"}',
    "a list": b"[]",
    "null": b"null",
    "not JSON": b"mint nobody please",
    "not UTF-8": b"\xff\xfe\xfd",
    "deep nesting": b"[" * 3000 + b"]" * 1000,
}


@pytest.mark.parametrize("request_line", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_get_a_clean_usage_error(request_line: bytes) -> None:
    require_root()
    with running() as svc:
        reply = svc.raw(request_line + b"\n")
        answer = json.loads(reply)
        assert answer["ok"] is False and answer["code"] == 2, answer
        assert answer["error"] != "internal error"
        # ... and nothing was minted, and the service still serves.
        assert svc.store.records() == []
        assert svc.ask({"op": "mint", "user": NOBODY})["ok"]


def test_overlong_user_name_is_refused_as_a_user_error() -> None:
    require_root()
    with running() as svc:
        answer = svc.ask({"op": "mint", "user": "a" * 1000})
        assert (answer["ok"], answer["code"]) == (False, 4)
        assert "longer than 32 characters" in answer["error"]


class Exploding(Minter):
    """A minter with a bug for one user (what 1e20 used to find)."""

    SECRET = "eyJzZWNyZXQtdG9rZW4"

    def mint(self, user_name: Any, *args: Any, **kwargs: Any) -> tuple[TokenRecord, bool]:
        if getattr(user_name, "name", user_name) == NOBODY:  # a name, or the pam path's entry
            raise OverflowError(f"cannot convert float infinity to integer {self.SECRET}")
        return super().mint(user_name, *args, **kwargs)


def test_an_unexpected_error_is_an_internal_error_reply(caplog: pytest.LogCaptureFixture) -> None:
    require_root()
    alice, _ = two_users()
    caplog.set_level(logging.DEBUG, logger="producer")
    with running(minter_class=Exploding) as svc:
        answer = svc.ask({"op": "mint", "user": NOBODY})
        assert answer == {"ok": False, "error": "internal error", "code": 1}
        assert svc.pam(NOBODY).startswith(b"ERR 0 internal error")
        # The service keeps serving.
        assert svc.ask({"op": "mint", "user": alice})["ok"]
        assert svc.pam(alice) == b"OK\n"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "mint request from uid 0 failed: internal error (OverflowError)"
    ] * 2
    assert all(r.exc_info is None for r in warnings)
    traced = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert len(traced) == 2
    for record in caplog.records:
        if record.levelno > logging.DEBUG:
            assert Exploding.SECRET not in record.getMessage()


def test_requests_over_the_size_limit_get_an_error_reply() -> None:
    require_root()
    with running() as svc:
        too_long = json.loads(svc.raw(b"x" * 5000))
        assert too_long == {"ok": False, "error": "request longer than 4096 bytes", "code": 2}
        # A much longer one, still being sent while the service answers.
        assert b"request longer than 4096 bytes" in svc.raw(b"x" * 200_000 + b"\n")
        # Exactly at the limit is fine.
        request = json.dumps({"op": "mint", "user": NOBODY}).encode()
        reply = json.loads(svc.raw(request.ljust(4096) + b"\n"))
        assert reply["ok"], reply
        # The reply is out before the server has closed its side: wait for it.
        wait_for(lambda: svc.server.open_connections() == {}, "the connections to end", 10)


# --- who may be refused, and how they hear it ---------------------------------------


def test_refusals_are_in_the_callers_reply_format() -> None:
    service = MintService(Config(), None)  # type: ignore[arg-type]
    pam_head = b'{"op":"pam","reply":"line","user":"alice"}\n'
    assert service.refuse("mint service busy", 1, pam_head) == b"ERR 0 mint service busy\n"
    assert json.loads(service.refuse("mint service busy", 1, b'{"op":"mint"')) == {
        "ok": False,
        "error": "mint service busy",
        "code": 1,
    }
    required = MintService(Config(pam=replace(PamConfig(), required=True)), None)  # type: ignore[arg-type]
    assert required.refuse("busy", 1, pam_head) == b"ERR 1 busy\n"


def test_rate_limiter_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(burst=5, every=10.0), clock.now)
    assert [limiter.take(1000) for _ in range(5)] == [0.0] * 5
    assert limiter.take(1000) == pytest.approx(10.0)
    assert limiter.take(1001) == 0.0  # another uid has its own bucket
    clock.advance(4)
    assert limiter.take(1000) == pytest.approx(6.0)
    clock.advance(6)
    assert limiter.take(1000) == 0.0
    assert limiter.take(1000) == pytest.approx(10.0)
    clock.advance(3600)  # refills to the burst, not beyond
    assert [limiter.take(1000) for _ in range(6)][-2:] == [0.0, pytest.approx(10.0)]


def test_repeated_self_mint_reuses_the_current_token() -> None:
    require_root()
    me = uid_of(NOBODY)
    with running() as svc:
        handle = svc.service.handle
        first = handle({"op": "mint", "user": NOBODY}, me)
        again = handle({"op": "mint", "user": NOBODY, "reuse": False}, me)
        assert first["minted"] and not again["minted"]
        assert again["record"]["token_id"] == first["record"]["token_id"]
        # Asking for shorter limits is asking for another token.
        shorter = handle({"op": "mint", "user": NOBODY, "lifetime": 3600}, me)
        assert shorter["minted"]
        assert shorter["record"]["token_id"] != first["record"]["token_id"]
        assert shorter["record"]["exp"] - shorter["record"]["iat"] == 3600
        # root keeps its explicit choice (default: a fresh token).
        by_root = handle({"op": "mint", "user": NOBODY}, 0)
        assert by_root["minted"]
        assert len(svc.store.records(NOBODY)) == 3


def test_root_is_not_rate_limited() -> None:
    require_root()
    alice, _ = two_users()
    with running(rate=RateLimit(burst=1, every=3600.0), clock=frozen) as svc:
        for _ in range(10):
            assert svc.pam(alice) == b"OK\n"
        assert all(svc.ask({"op": "mint", "user": alice})["ok"] for _ in range(3))


# --- no file I/O under the global lock ---------------------------------------------


class StuckFiles(Minter):
    """nobody's login directory hangs whoever writes in it (until ``gate`` opens)."""

    gate = threading.Event()
    entered = threading.Event()

    def write_login(self, record: TokenRecord) -> None:
        if record.user == NOBODY:
            self.entered.set()
            self.gate.wait(120)
        super().write_login(record)


def test_one_users_stuck_login_file_does_not_hold_up_another_login() -> None:
    require_root()
    alice, bob = two_users()
    StuckFiles.gate.clear()
    StuckFiles.entered.clear()
    with running(minter_class=StuckFiles) as svc:
        stuck: list[bytes] = []
        first = threading.Thread(target=lambda: stuck.append(svc.pam(NOBODY)), daemon=True)
        first.start()
        try:
            assert StuckFiles.entered.wait(60)
            others: list[Any] = []
            second = threading.Thread(
                target=lambda: others.extend(
                    [svc.pam(alice), svc.ask({"op": "mint", "user": bob})]
                ),
                daemon=True,
            )
            second.start()
            second.join(60)
            # Served while nobody's file write is still stuck.
            assert not second.is_alive(), "another user's login waited for nobody's file"
            assert others[0] == b"OK\n" and others[1]["ok"]
            assert (svc.root / "run" / str(uid_of(alice)) / "slurm_jwt").exists()
            assert first.is_alive() and StuckFiles.gate.is_set() is False
        finally:
            StuckFiles.gate.set()
        first.join(60)
        assert stuck == [b"OK\n"]
        token = (svc.root / "run" / str(uid_of(NOBODY)) / "slurm_jwt").read_text()
        current = svc.store.current(NOBODY)
        assert current is not None and current.token == token


# --- a flood from one uid, seen from another (as nobody, via setpriv) -----------------


def test_a_self_mint_flood_is_rate_limited_and_others_are_served() -> None:
    require_root()
    require_tool("setpriv")
    alice, bob = two_users()
    with running(clock=frozen) as svc:
        replies = asks(NOBODY, svc.path, [{"op": "mint", "user": NOBODY, "print": True}] * 8)
        served, refused = replies[:5], replies[5:]
        assert all(r["ok"] for r in served), served
        # One token: the first mint, then the same token again.
        assert [r["minted"] for r in served] == [True] + [False] * 4
        assert len({r["token"] for r in served}) == 1
        assert (
            refused
            == [
                {
                    "ok": False,
                    "error": "too many requests; try again in 10s",
                    "code": 5,
                    "required": False,
                }
            ]
            * 3
        )
        assert len(svc.store.records(NOBODY)) == 1
        # Another user, and root's PAM op, are served all the same.
        assert asks(alice, svc.path, [{"op": "mint", "user": alice}])[0]["ok"]
        assert svc.pam(bob) == b"OK\n"
