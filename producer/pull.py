"""The pull service: worker nodes fetch their users' current tokens, proven by munge.

Push (transfer/) writes tokens onto nodes over SSH; pull lets a node ask.  The
trust model is Slurm's own: a caller proves its uid, gid and host with a
MUNGE credential made on its node, exactly as ``srun`` proves them to slurmd,
and the token comes back inside a MUNGE credential that only that uid can
decode (docs/pull.md).

Wire format (one TCP connection per pull, one line each way, ASCII)::

    request:  <munge credential>\\n
              (its payload: b"tokenlife-pull 1 <nonce>", nothing secret;
              the nonce is 1-64 letters or digits chosen by the caller)
    reply:    OK <munge credential>\\n
              (payload b"tokenlife-pull 1 <nonce> <token>", encoded with
              MUNGE_OPT_UID_RESTRICTION = the caller's uid)
          or  ERR <result> <one line>\\n
              (result: one of RESULTS; the line names no user, host or token)

Who is asking is what munged says about the credential (its uid, and the
address of the munged that made it), never anything the caller writes: there
is no user name in the request, so asking for someone else's token cannot
even be expressed.  munged refuses a credential from another key
(EMUNGE_CRED_INVALID), an expired one (EMUNGE_CRED_EXPIRED) and, because it
remembers what it decoded, a replayed one (EMUNGE_CRED_REPLAYED).

Everything is bounded (PullLimits): the request's size and the time to send
it (a slow client is cut off at the deadline, however it trickles), the
connections open at once in all and from one peer address, and the work
threads.  One thread multiplexes every connection with a selector, so a slow
or silent client holds a socket and a few bytes, never a thread; the munge
calls and the lookup run in a small pool.  At ``max_connections`` the server
stops accepting: newcomers wait in the kernel's listen backlog rather than
being turned away.  The server runs in threads of its own and never calls
into the daemon but through ``lookup``, ``has_work`` and ``audit``, which
must be thread-safe and quick (the daemon's renewal tick is never waited on).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import logging
import pwd
import queue
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tokenlife.munge import (
    EMUNGE_CRED_EXPIRED,
    EMUNGE_CRED_REPLAYED,
    LOCAL_TROUBLE,
    Credential,
    Munge,
    MungeError,
)

log = logging.getLogger(__name__)

PROTOCOL = b"tokenlife-pull"
VERSION = b"1"
#: every result the server counts (PullServer.counts()); the ERR line carries it
RESULTS = (
    "ok",
    "no_token",
    "refused_policy",
    "bad_credential",
    "replay",
    "expired",
    "busy",
    "error",
    "bad_request",
    "timeout",
)
POLICIES = ("own", "jobs")
#: where libmunge looks for munged when no socket is given (munge's --socket default)
DEFAULT_MUNGE_SOCKET = "/run/munge/munge.socket.2"
#: a Slurm JWT is well under a kilobyte; tokenlife's engine refuses more than this
MAX_TOKEN = 16384
#: one word of printable ASCII: a regular expression, since a loop over the
#: bytes of a JWT costs tens of microseconds of every pull
_TOKEN_WORD = re.compile(rb"[!-~]+")
_NONCE_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")

#: the one line each result's ERR reply says (the same for everyone: nothing leaks)
MESSAGES = {
    "no_token": "no current token for this user",
    "refused_policy": "refused by policy",
    "bad_credential": "credential refused",
    "replay": "credential refused: replayed",
    "expired": "credential refused: expired",
    "busy": "busy; try again",
    "error": "internal error",
    "bad_request": "malformed request",
    "timeout": "request not received in time",
}


@dataclass(frozen=True)
class Refusal:
    """What ``lookup`` (or the policy) returns to refuse a pull.

    ``reason`` goes to the log and the audit trail, never to the wire: the
    caller is told only ``refused by policy`` (or ``privileged account``,
    ``no work of this user on this host``, which the policy itself decides).
    """

    reason: str
    wire: str = "refused by policy"


#: (uid, user, origin host) -> the user's current token, None if there is none, or a Refusal
Lookup = Callable[[int, str, str], "str | Refusal | None"]
#: (user, host) -> whether the user has work (a running job) on that host
HasWork = Callable[[str, str], bool]
#: (user, host, result): one call per pull that got as far as a request line
Audit = Callable[[str, str, str], None]


class Codec(Protocol):
    """What the server needs of munge (tokenlife.munge.Munge; fakes in unit tests)."""

    def decode(self, credential: str | bytes) -> Credential: ...

    def encode(
        self, payload: bytes, *, uid_restriction: int | None = None, ttl: int | None = None
    ) -> str: ...


@dataclass(frozen=True)
class PullPolicy:
    """Who may pull from where.

    ``own``: a user may pull their own token from any host of the munge realm.
    ``jobs``: only from hosts where ``has_work(user, host)`` says the user has
    work, or from ``login_hosts``.  In both, the uids in ``privileged_uids``
    (root, SlurmUser: their tokens act as anyone over slurmrestd) get nothing
    unless ``allow_privileged``.
    """

    mode: str = "own"
    has_work: HasWork | None = None
    login_hosts: frozenset[str] = frozenset()
    privileged_uids: frozenset[int] = frozenset({0})
    allow_privileged: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POLICIES:
            raise ValueError(f"pull policy must be one of {', '.join(POLICIES)}, not {self.mode!r}")
        if self.mode == "jobs" and self.has_work is None:
            raise ValueError("pull policy 'jobs' needs has_work")
        hosts = frozenset(host_key(h) for h in self.login_hosts)
        object.__setattr__(self, "login_hosts", hosts)

    def check(self, uid: int, user: str, host: str) -> Refusal | None:
        """None if ``user`` (``uid``) may pull from ``host``; else why not.

        Exceptions from ``has_work`` propagate: the server counts them as
        errors and refuses (it never guesses "yes").
        """
        if uid in self.privileged_uids and not self.allow_privileged:
            return Refusal(f"privileged account {user} (uid {uid})", "privileged account")
        if self.mode == "own":
            return None
        key = host_key(host)
        if not key:
            return Refusal("origin host unknown", "origin host unknown")
        if key in self.login_hosts:
            return None
        assert self.has_work is not None
        if self.has_work(user, key):
            return None
        return Refusal(f"{user} has no work on {key}", "no work of this user on this host")


def host_key(host: str) -> str:
    """How hosts are compared: lowercase, without a domain (an address stays whole)."""
    host = host.strip().lower().rstrip(".")
    if not host or ":" in host or host.replace(".", "").isdigit():
        return host
    return host.split(".", 1)[0]


class HostResolver:
    """The origin address munged vouches for -> a host name (reverse DNS, short form).

    Cached for ``ttl`` seconds (at most ``max_entries`` addresses); an
    address without a name stays the address, so ``login_hosts`` may list
    addresses.  "0.0.0.0" (munged could not tell its own address) is "".
    """

    def __init__(
        self,
        ttl: float = 300.0,
        max_entries: int = 4096,
        reverse: Callable[[str], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl, self.max_entries, self.clock = ttl, max_entries, clock
        self.reverse = reverse or (lambda addr: socket.gethostbyaddr(addr)[0])
        self._cache: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, address: str) -> str:
        if address in ("", "0.0.0.0"):  # noqa: S104 - not a bind: munge's "unknown"
            return ""
        now = self.clock()
        with self._lock:
            hit = self._cache.get(address)
            if hit is not None and hit[1] > now:
                return hit[0]
        try:
            name = host_key(self.reverse(address))
        except (OSError, UnicodeError):
            name = address
        with self._lock:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            self._cache[address] = (name, now + self.ttl)
        return name


@dataclass(frozen=True)
class PullLimits:
    #: bytes in the request line, without its newline
    max_request: int = 4096
    #: seconds to receive the whole request line, from accept (slow loris: cut)
    read_timeout: float = 5.0
    #: a request whose work has not started this long after accept is answered
    #: "busy" without any work (its caller has given up or is about to)
    request_timeout: float = 8.0
    #: seconds to hand over the reply
    write_timeout: float = 5.0
    #: connections open at once; at the limit, newcomers wait in the listen backlog
    max_connections: int = 256
    #: connections open at once from one peer address; more get "busy" at once
    max_per_peer: int = 16
    #: threads running munge and lookup
    workers: int = 8
    #: the listen backlog (the kernel caps it at net.core.somaxconn)
    backlog: int = 1024
    #: seconds the reply credential stays valid
    reply_ttl: int = 60

    def __post_init__(self) -> None:
        for name in ("max_request", "max_connections", "max_per_peer", "workers", "backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"pull limit {name} must be at least 1")
        for name in ("read_timeout", "request_timeout", "write_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"pull limit {name} must be positive")
        if self.reply_ttl < 1:
            raise ValueError("pull limit reply_ttl must be at least 1")


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError if not."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address as [ADDR]:PORT")
    return host, int(port)


@dataclass
class _Conn:
    sock: socket.socket
    peer: str
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    out: bytes = b""
    state: str = "read"  # read -> work -> write -> closed
    seq: int = 0
    registered: bool = False  # with the selector (for reading, or for the rest of a reply)
    fd: int = -1  # its key in the table of open connections


class PullServer:
    """Serves pulls on ``address`` (HOST:PORT) in threads of its own.

    ``server = PullServer(...); server.start()`` ... ``server.close()``.
    ``counts()`` is a copy of the results so far (every name of RESULTS).
    """

    def __init__(
        self,
        address: str,
        lookup: Lookup,
        policy: PullPolicy | None = None,
        audit: Audit | None = None,
        munge: Codec | None = None,
        munge_socket: str | None = None,
        limits: PullLimits | None = None,
        resolve_host: Callable[[str], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lookup = lookup
        self.policy = policy or PullPolicy()
        self.audit = audit
        self.munge: Codec = munge if munge is not None else Munge(munge_socket)
        self.limits = limits or PullLimits()
        self.resolve_host = resolve_host or HostResolver()
        self.clock = clock
        self._counts = dict.fromkeys(RESULTS, 0)
        self._count_lock = threading.Lock()
        self._warned: dict[str, float] = {}
        self._names: dict[int, tuple[str | None, float]] = {}
        host, port = parse_address(address)
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, sockaddr = infos[0]
        self._listener = socket.socket(family, kind, proto)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(sockaddr)
            self._listener.listen(self.limits.backlog)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        bound = self._listener.getsockname()
        self.address = (
            f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else (f"{bound[0]}:{bound[1]}")
        )
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._done: collections.deque[tuple[_Conn, bytes]] = collections.deque()
        self._conns: dict[int, _Conn] = {}
        self._per_peer: dict[str, int] = {}
        self._deadlines: list[tuple[float, int, _Conn]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()  # the tables: the I/O thread and workers share them
        self._accepting = False
        self._paused = False  # at max_connections: the listener is not watched
        self._resume_at: float | None = None
        self._stop = threading.Event()
        self._closed = False
        self._jobs: queue.SimpleQueue[tuple[_Conn, bytes, float] | None] = queue.SimpleQueue()
        self._wake_pending = False
        self._workers = [
            threading.Thread(target=self._worker, name=f"pull-worker-{i}", daemon=True)
            for i in range(self.limits.workers)
        ]
        self._thread = threading.Thread(target=self._loop, name="pull-server", daemon=True)

    # -- life ------------------------------------------------------------------

    def start(self) -> PullServer:
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._accept_on()
        for worker in self._workers:
            worker.start()
        self._thread.start()
        log.info("pull service listening on %s (policy %s)", self.address, self.policy.mode)
        return self

    def close(self) -> None:
        """Stop serving: open connections are dropped, running work finishes.

        Idempotent; the daemon calls it on shutdown (and before it binds a new
        address on reload)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake()
        deadline = time.monotonic() + 10  # a wedged lookup must not hold up a stop
        if self._thread.is_alive():
            self._thread.join(10)
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            if worker.is_alive():
                worker.join(max(0.0, deadline - time.monotonic()))
        for conn in list(self._conns.values()):
            self._release(conn)
        with contextlib.suppress(OSError):
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._selector.close()

    def __enter__(self) -> PullServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def alive(self) -> bool:
        """The serving thread runs (the daemon's watchdog may ask)."""
        return self._thread.is_alive()

    def counts(self) -> dict[str, int]:
        with self._count_lock:
            return dict(self._counts)

    def open_connections(self) -> int:
        return len(self._conns)

    def _count(self, result: str) -> None:
        with self._count_lock:
            self._counts[result] += 1

    # -- one request (any worker thread) ---------------------------------------

    def answer(self, line: bytes, peer: str) -> tuple[bytes, str]:
        """The reply line to one request line, and its result; never raises."""
        user, host = "-", peer
        try:
            try:
                cred = self.munge.decode(line.strip())
            except MungeError as exc:
                result = _munge_result(exc.code)
                if exc.uid is not None:
                    user = self._user_name(exc.uid) or f"uid {exc.uid}"
                if result == "error":
                    log.error("pull: munge cannot decode: %s", exc)
                else:
                    self._warn(f"refused:{peer}", "pull from %s refused: %s", peer, exc.message)
                return self._finish(_err(result), result, user, host)
            nonce = _request_nonce(cred.payload)
            # munged's word for the caller's host; "0.0.0.0": that munged could
            # not tell its own address (the audit then shows the peer's)
            origin = "" if cred.origin in ("", "0.0.0.0") else cred.origin  # noqa: S104
            where = (self.resolve_host(origin) or origin) if origin else ""
            host = where or peer
            name = self._user_name(cred.uid)
            user = name or f"uid {cred.uid}"
            if nonce is None:
                return self._finish(_err("bad_request"), "bad_request", user, host)
            if name is None:
                log.info("pull refused: uid %d has no user name", cred.uid)
                return self._finish(_err("refused_policy"), "refused_policy", user, host)
            found: str | Refusal | None = None
            refusal = self.policy.check(cred.uid, name, where)
            if refusal is None:
                found = self.lookup(cred.uid, name, where)
                if isinstance(found, Refusal):
                    refusal = found
            if refusal is not None:
                log.info("pull by %s from %s refused: %s", user, host, refusal.reason)
                line_out = _err("refused_policy", _one_line(refusal.wire))
                return self._finish(line_out, "refused_policy", user, host)
            if not isinstance(found, str):  # None: the user holds no current token
                return self._finish(_err("no_token"), "no_token", user, host)
            token = _checked_token(found)
            payload = b" ".join((PROTOCOL, VERSION, nonce, token))
            reply = self.munge.encode(payload, uid_restriction=cred.uid, ttl=self.limits.reply_ttl)
            return self._finish(f"OK {reply}\n".encode("ascii"), "ok", user, host)
        except Exception as exc:
            # Neither the message nor the traceback at warning level: either
            # may quote a token; the type says where to look further.
            log.warning(
                "pull by %s from %s failed: internal error (%s)", user, host, type(exc).__name__
            )
            log.debug("pull failed", exc_info=True)
            return self._finish(_err("error"), "error", user, host)

    def _user_name(self, uid: int) -> str | None:
        """The name of ``uid``, remembered for a minute: NSS reads /etc/passwd (or
        asks sssd) at every call, and a burst of pulls asks for the same few users."""
        now = self.clock()
        hit = self._names.get(uid)
        if hit is not None and hit[1] > now:
            return hit[0]
        name = _user_name(uid)
        if len(self._names) >= 4096:
            self._names.clear()
        self._names[uid] = (name, now + 60.0)
        return name

    def _finish(self, reply: bytes, result: str, user: str, host: str) -> tuple[bytes, str]:
        self._count(result)
        if self.audit is not None:
            try:
                self.audit(user, host, result)
            except Exception:
                debug = log.isEnabledFor(logging.DEBUG)
                log.warning("pull: the audit trail failed", exc_info=debug)
        return reply, result

    def _worker(self) -> None:
        while (job := self._jobs.get()) is not None:
            conn, line, started_by = job
            if self.clock() > started_by:
                reply: bytes = _err("busy")
                self._count("busy")
            else:
                reply = self.answer(line, conn.peer)[0]
            # A reply fits the socket's buffer: sent and closed right here, in
            # parallel with the other workers; the I/O thread gets the rare rest.
            try:
                sent = conn.sock.send(reply)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = len(reply)  # the caller is gone: nothing left to send
            if sent == len(reply):
                self._release(conn)
                continue
            self._done.append((conn, reply[sent:]))
            self._poke()

    def _poke(self) -> None:
        """Wake the I/O thread, once for a batch: it clears the flag after
        reading the wake-up bytes and before it looks at the queue and the
        tables, so nothing is ever left waiting."""
        if not self._wake_pending:
            self._wake_pending = True
            self._wake()

    def _release(self, conn: _Conn) -> None:
        """Forget a connection and close it (any thread; never registered by then)."""
        with self._lock:
            if conn.state == "closed":
                return
            conn.state = "closed"
            self._conns.pop(conn.fd, None)
            left = self._per_peer.get(conn.peer, 1) - 1
            if left > 0:
                self._per_peer[conn.peer] = left
            else:
                self._per_peer.pop(conn.peer, None)
            resume = self._paused and len(self._conns) < self.limits.max_connections
        # closed after the fd left the table: its number may be reused at once
        _close_quietly(conn.sock)
        if resume and threading.current_thread() is not self._thread:
            self._poke()  # the I/O thread takes up accepting again

    # -- the I/O thread --------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _accept_on(self) -> None:
        if not self._accepting:
            self._selector.register(self._listener, selectors.EVENT_READ, None)
            self._accepting = True
            self._paused = False

    def _accept_off(self) -> None:
        if self._accepting:
            self._selector.unregister(self._listener)
            self._accepting = False
            self._paused = True

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._step()
        except Exception:
            log.exception("pull service stopped: its I/O thread failed")

    def _step(self) -> None:
        now = self.clock()
        timeout = 1.0
        if self._deadlines:
            timeout = min(timeout, max(0.0, self._deadlines[0][0] - now))
        if self._resume_at is not None:
            timeout = min(timeout, max(0.0, self._resume_at - now))
        for key, mask in self._selector.select(timeout):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
                # cleared after the drain and before the look at what woke us
                # (below): a poke after this point leaves a byte to wake on
                self._wake_pending = False
            else:
                conn: _Conn = key.data
                if mask & selectors.EVENT_READ:
                    self._read(conn)
                elif mask & selectors.EVENT_WRITE:
                    self._write(conn)
        while self._done:
            conn, rest = self._done.popleft()
            if conn.state == "work":
                self._reply(conn, rest)
        now = self.clock()
        if self._resume_at is not None and now >= self._resume_at:
            self._resume_at = None
        if (
            self._paused
            and self._resume_at is None
            and len(self._conns) < self.limits.max_connections
        ):
            self._accept_on()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, seq, conn = heapq.heappop(self._deadlines)
            if conn.seq != seq or conn.state == "closed":
                continue  # an older deadline of a connection that moved on
            if conn.state == "read":
                self._count("timeout")
                self._warn(
                    f"timeout:{conn.peer}",
                    "pull: %s sent no request in %gs: dropped",
                    conn.peer,
                    self.limits.read_timeout,
                )
                self._send_now(conn, _err("timeout"))
                self._close(conn)
            elif conn.state == "write":
                self._close(conn)

    def _set_deadline(self, conn: _Conn, deadline: float) -> None:
        conn.seq = next(self._seq)
        conn.deadline = deadline
        heapq.heappush(self._deadlines, (deadline, conn.seq, conn))

    def _accept(self) -> None:
        lim = self.limits
        for _ in range(64):  # then let the others have a turn
            if len(self._conns) >= lim.max_connections:
                self._accept_off()  # the rest wait in the backlog
                return
            try:
                sock, addr = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the listener stays readable, so
                    # accepting again at once would spin; pause a moment.
                    self._warn("accept", "pull: cannot accept: %s", exc.strerror)
                    self._accept_off()
                    self._resume_at = self.clock() + 0.1
                    return
                continue  # ECONNABORTED and the like: that caller is gone
            sock.setblocking(False)
            peer = str(addr[0])
            conn = _Conn(sock, peer, 0.0, fd=sock.fileno())
            with self._lock:
                admitted = self._per_peer.get(peer, 0) < lim.max_per_peer
                if admitted:
                    self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
                    self._conns[conn.fd] = conn
            if not admitted:
                self._count("busy")
                self._warn(f"busy:{peer}", "pull: too many connections from %s", peer)
                self._send_now_sock(sock, _err("busy"))
                _close_quietly(sock)
                continue
            self._set_deadline(conn, self.clock() + lim.read_timeout)
            # A client sends its line right after connecting: under load it is
            # usually there already, and read without a trip through epoll.
            self._read(conn)

    def _read(self, conn: _Conn) -> None:
        lim = self.limits
        try:
            chunk = conn.sock.recv(lim.max_request + 1 - len(conn.buf))
        except (BlockingIOError, InterruptedError):
            if not conn.registered:
                self._selector.register(conn.sock, selectors.EVENT_READ, conn)
                conn.registered = True
            return
        except OSError:
            self._close(conn)
            return
        if not chunk:  # the caller closed its side: what came is the request
            if not conn.buf:
                self._close(conn)
                return
            self._dispatch(conn, bytes(conn.buf))
            return
        conn.buf += chunk
        end = conn.buf.find(b"\n")
        if end >= 0:
            self._dispatch(conn, bytes(conn.buf[:end]))
        elif len(conn.buf) > lim.max_request:
            self._count("bad_request")
            self._warn(
                f"long:{conn.peer}",
                "pull: %s sent more than %d bytes: dropped",
                conn.peer,
                lim.max_request,
            )
            self._send_now(conn, _err("bad_request", "request too long"))
            self._close(conn)
        elif not conn.registered:
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            conn.registered = True

    def _dispatch(self, conn: _Conn, line: bytes) -> None:
        if conn.registered:
            self._selector.unregister(conn.sock)
            conn.registered = False
        conn.state = "work"
        conn.buf = bytearray()
        conn.seq = -1  # no deadline while the work runs; the worker checks it
        started_by = conn.deadline - self.limits.read_timeout + self.limits.request_timeout
        self._jobs.put((conn, line, started_by))

    def _reply(self, conn: _Conn, rest: bytes) -> None:
        """The part of a reply the worker could not send at once."""
        conn.state = "write"
        conn.out = rest
        self._write(conn)
        if conn.state == "write":
            self._set_deadline(conn, self.clock() + self.limits.write_timeout)
            self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
            conn.registered = True

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            # The whole request was read, so closing sends a plain FIN after the reply.
            self._close(conn)

    def _send_now(self, conn: _Conn, data: bytes) -> None:
        self._send_now_sock(conn.sock, data)

    @staticmethod
    def _send_now_sock(sock: socket.socket, data: bytes) -> None:
        """Best effort, never blocking: a refusal the caller may or may not read."""
        with contextlib.suppress(OSError):
            sock.send(data)
            sock.shutdown(socket.SHUT_WR)

    def _close(self, conn: _Conn) -> None:
        """(I/O thread) stop watching a connection, then release it."""
        if conn.registered:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
            conn.registered = False
        self._release(conn)

    def _warn(self, key: str, message: str, *args: object) -> None:
        """At most one warning a minute per kind and peer: a flood must not flood the log."""
        now = self.clock()
        last = self._warned.get(key)
        if last is not None and now - last < 60.0:
            log.debug(message, *args)
            return
        if len(self._warned) > 4096:
            self._warned.clear()
        self._warned[key] = now
        log.warning(message, *args)


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _err(result: str, message: str | None = None) -> bytes:
    return f"ERR {result} {message or MESSAGES[result]}\n".encode("ascii")


def _one_line(text: str) -> str:
    clean = "".join(c if " " <= c <= "~" else " " for c in text).strip()
    return clean[:120] or "refused by policy"


def _munge_result(code: int) -> str:
    if code == EMUNGE_CRED_REPLAYED:
        return "replay"
    if code == EMUNGE_CRED_EXPIRED:
        return "expired"
    if code in LOCAL_TROUBLE or code < 0:
        return "error"
    # another key (EMUNGE_CRED_INVALID), garbage, restricted to another uid,
    # made on a host whose clock is far ahead (EMUNGE_CRED_REWOUND): the
    # caller's credential is wrong, not the server
    return "bad_credential"


def _request_nonce(payload: bytes) -> bytes | None:
    parts = payload.split(b" ")
    if len(parts) != 3 or parts[0] != PROTOCOL or parts[1] != VERSION:
        return None
    nonce = parts[2]
    if not 1 <= len(nonce) <= 64 or not set(nonce) <= _NONCE_CHARS:
        return None
    return nonce


def _checked_token(value: str) -> bytes:
    """The token as the reply carries it: one word of printable ASCII."""
    token = value.strip().encode("ascii")
    if len(token) > MAX_TOKEN or not _TOKEN_WORD.fullmatch(token):
        raise ValueError("lookup returned something that is not a token")
    return token


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def counts_line(counts: dict[str, int]) -> str:
    """A one-line summary for logs and ``status``: ``ok 12, no_token 1, ...`` (nonzero only)."""
    shown = [f"{name} {counts[name]}" for name in RESULTS if counts.get(name)]
    return ", ".join(shown) or "no pulls"


__all__ = [
    "DEFAULT_MUNGE_SOCKET",
    "MESSAGES",
    "POLICIES",
    "RESULTS",
    "Audit",
    "Codec",
    "HasWork",
    "HostResolver",
    "Lookup",
    "PullLimits",
    "PullPolicy",
    "PullServer",
    "Refusal",
    "counts_line",
    "host_key",
    "parse_address",
]
