"""A Unix stream server for one-line requests that no local user can exhaust.

Each connection carries one request line and gets one reply line.  What a
caller can hold is bounded: connections in all (``max_connections``), per
peer uid (``max_per_uid``; root is not counted against it), a share kept for
root (``root_reserve``: ordinary users together never take the last slots,
so logins, which PAM sends as root, get through while users crowd the
socket), the time for the whole request line (``read_timeout``: a client
that trickles bytes is cut off like an idle one) and its size
(``max_request``).  A connection over a limit gets a one-line refusal from
the accepting thread and is closed at once: no thread waits for it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)
_UCRED = struct.Struct("3i")


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return int(uid)


@dataclass(frozen=True)
class ConnectionLimits:
    #: connections open at once, all callers together
    max_connections: int = 64
    #: connections open at once from one uid other than root
    max_per_uid: int = 8
    #: slots only root may take (ordinary users together get at most
    #: ``max_connections - root_reserve``)
    root_reserve: int = 16
    #: seconds to receive the whole request line, from accept
    read_timeout: float = 5.0
    #: bytes in the request line, without its newline
    max_request: int = 4096
    #: seconds to hand over the reply
    write_timeout: float = 5.0


class LineService(Protocol):
    def answer(self, line: bytes, caller: int) -> bytes:
        """The reply line (with its newline) to one request line; never raises."""
        ...

    def refuse(self, error: str, code: int, head: bytes) -> bytes:
        """The reply line to a connection refused before its request was read;
        ``head`` is what the caller sent so far (it may tell the reply format)."""
        ...


class _Cut(Exception):
    def __init__(self, error: str, head: bytes) -> None:
        super().__init__(error)
        self.error, self.head = error, head


class BoundedUnixServer(socketserver.UnixStreamServer):
    #: logins arriving together wait in the kernel's backlog, not in threads
    request_queue_size = 128

    def __init__(
        self, path: str, service: LineService, limits: ConnectionLimits | None = None
    ) -> None:
        self.service = service
        self.limits = limits or ConnectionLimits()
        self._lock = threading.Lock()
        self._open: dict[int, int] = {}  # uid -> connections being served
        self._warned: dict[int, float] = {}  # uid -> when its refusals were last logged
        super().__init__(path, socketserver.BaseRequestHandler)

    def open_connections(self) -> dict[int, int]:
        """Connections being served now, by peer uid."""
        with self._lock:
            return dict(self._open)

    # -- admission ------------------------------------------------------------

    def _admit(self, uid: int) -> tuple[str, int] | None:
        """Count the connection in, or say why not: (error, exit code)."""
        lim = self.limits
        with self._lock:
            total = sum(self._open.values())
            if uid != 0 and self._open.get(uid, 0) >= lim.max_per_uid:
                return (
                    f"too many connections from uid {uid} (at most {lim.max_per_uid} "
                    "at a time); try again later",
                    5,
                )
            users = total - self._open.get(0, 0)
            if total >= lim.max_connections or (
                uid != 0 and users >= lim.max_connections - lim.root_reserve
            ):
                return f"mint service busy ({total} connections open); try again later", 1
            self._open[uid] = self._open.get(uid, 0) + 1
        return None

    def _release(self, uid: int) -> None:
        with self._lock:
            left = self._open[uid] - 1
            if left:
                self._open[uid] = left
            else:
                del self._open[uid]

    def get_request(self) -> tuple[Any, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # Out of descriptors: the listening socket stays readable, so
                # retrying at once would spin; the caller skips this round.
                log.warning("mint socket: cannot accept: %s", exc.strerror)
                time.sleep(0.1)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        sock: socket.socket = request
        try:
            uid = peer_uid(sock)
        except OSError:
            sock.close()
            return
        refused = self._admit(uid)
        if refused is None:
            worker = threading.Thread(
                target=self._serve, args=(sock, uid), name=f"mint-conn-{uid}", daemon=True
            )
            try:
                worker.start()
                return
            except RuntimeError:  # the system has no thread for us
                self._release(uid)
                refused = "mint service busy (no thread available); try again later", 1
        self._log_refusal(uid, refused[0])
        head = b""
        with contextlib.suppress(OSError):
            head = sock.recv(self.limits.max_request, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        self._finish(sock, self.service.refuse(refused[0], refused[1], head), wait=False)

    def _log_refusal(self, uid: int, error: str) -> None:
        """One warning per uid a minute (a flood must not flood the log too)."""
        now = time.monotonic()
        with self._lock:
            quiet = now - self._warned.get(uid, -60.0) < 60.0
            if not quiet:
                if len(self._warned) > 1024:
                    self._warned.clear()
                self._warned[uid] = now
        if quiet:
            log.debug("mint socket: refused a connection from uid %d: %s", uid, error)
        else:
            log.warning("mint socket: refusing connections from uid %d: %s", uid, error)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("mint socket: a connection failed", exc_info=log.isEnabledFor(logging.DEBUG))

    # -- one connection -------------------------------------------------------

    def _serve(self, sock: socket.socket, uid: int) -> None:
        try:
            try:
                line = self._read_line(sock)
            except _Cut as cut:
                log.info("mint socket: uid %d: %s", uid, cut.error)
                reply = self.service.refuse(cut.error, 2, cut.head)
            else:
                reply = self.service.answer(line, uid)
            self._finish(sock, reply, wait=True)
        except Exception:
            log.warning("mint socket: connection from uid %d failed", uid)
            log.debug("mint socket: connection from uid %d failed", uid, exc_info=True)
            sock.close()
        finally:
            self._release(uid)

    def _read_line(self, sock: socket.socket) -> bytes:
        """The request line (without its newline), read within the time limit.

        The deadline is for the whole line: trickling bytes does not extend it.
        """
        lim = self.limits
        deadline = time.monotonic() + lim.read_timeout
        buf = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Cut(f"request not received within {lim.read_timeout:g} s", bytes(buf))
            sock.settimeout(left)
            try:
                chunk = sock.recv(lim.max_request + 1 - len(buf))
            except TimeoutError:
                continue
            if not chunk:  # the caller closed its side: what came is the request
                return bytes(buf)
            buf += chunk
            end = buf.find(b"\n")
            if end >= 0:
                return bytes(buf[:end])
            if len(buf) > lim.max_request:
                raise _Cut(f"request longer than {lim.max_request} bytes", bytes(buf))

    def _finish(self, sock: socket.socket, reply: bytes, wait: bool) -> None:
        """Send the reply, then close without leaving the caller a reset."""
        try:
            if wait:
                sock.settimeout(self.limits.write_timeout)
                sock.sendall(reply)
            else:  # the accepting thread never blocks on a caller
                sock.send(reply, socket.MSG_DONTWAIT)
            sock.shutdown(socket.SHUT_WR)
            # Closing with unread bytes would turn the caller's end-of-reply
            # into ECONNRESET: read what it sent (bounded, without waiting).
            sock.setblocking(False)
            for _ in range(16):
                if not sock.recv(65536):
                    break
        except OSError:
            pass
        finally:
            sock.close()
