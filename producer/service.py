"""The mint service: a Unix socket where local callers ask for tokens.

Like ``scontrol token`` asking slurmctld, a caller is identified by the
kernel (SO_PEERCRED), not by anything it says: an ordinary user can mint
only for itself, root (pam_exec) and the configured admins for anyone.  The
service keeps the key and the store warm, so a login costs one round trip.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Any

from producer.mint import Minter
from tokenlife.config import Config
from tokenlife.errors import TokenlifeError
from tokenlife.fsutil import ensure_dir
from tokenlife.users import lookup

log = logging.getLogger(__name__)
_UCRED = struct.Struct("3i")


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return int(uid)


class MintService:
    def __init__(self, config: Config, minter: Minter) -> None:
        self.config = config
        self.minter = minter
        self._lock = threading.Lock()  # one mint at a time: the store is shared

    def handle(self, request: Any, caller: int) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("user"), str):
            return {"ok": False, "error": "malformed request", "code": 2}
        op = request.get("op")
        try:
            if op == "pam":
                return self._pam(request["user"], caller)
            if op == "mint":
                return self._mint(request, caller)
        except TokenlifeError as exc:
            return {
                "ok": False,
                "error": str(exc),
                "code": exc.exit_code,
                "required": self.config.pam.required,
            }
        return {"ok": False, "error": f"unknown operation {op!r}", "code": 2}

    def _pam(self, user: str, caller: int) -> dict[str, Any]:
        if caller != 0:
            return {"ok": False, "error": "only root may use the pam operation", "code": 5}
        if lookup(user).uid < self.config.pam.min_uid:
            return {"ok": True, "skipped": "uid below pam.min_uid"}
        with self._lock:
            record, minted = self.minter.mint(user, 0, reuse=True, actor="pam")
        return {"ok": True, "minted": minted, "record": record.public()}

    def _mint(self, request: dict[str, Any], caller: int) -> dict[str, Any]:
        lifetime = _positive(request.get("lifetime"))
        renew_until = _positive(request.get("renew_until"))
        with self._lock:
            record, minted = self.minter.mint(
                request["user"],
                caller,
                lifetime,
                renew_until,
                reuse=bool(request.get("reuse")),
                actor="service",
            )
        answer: dict[str, Any] = {"ok": True, "minted": minted, "record": record.public()}
        if request.get("print"):
            # authorize() already allowed this caller to hold this user's token
            answer["token"] = record.token
        return answer


def _positive(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TokenlifeError("durations must be positive integers of seconds")
    return value


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        caller = peer_uid(self.request)
        line = self.rfile.readline(65536)
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        answer = self.server.service.handle(request, caller)
        if not answer.get("ok"):
            log.info("mint request from uid %d refused: %s", caller, answer.get("error"))
        if isinstance(request, dict) and request.get("reply") == "line":
            # The login path's lean client parses this without json.
            if answer.get("ok"):
                reply = "OK"
            else:
                reply = f"ERR {int(bool(answer.get('required')))} {answer.get('error')}"
            self.wfile.write(reply.encode() + b"\n")
        else:
            self.wfile.write(json.dumps(answer).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, service: MintService) -> None:
        self.service = service
        super().__init__(path, _Handler)


def listen(path: Path, service: MintService) -> _Server:
    """Bind the socket (replacing a stale one) world-connectable: the kernel says who calls."""
    ensure_dir(path.parent, 0o755)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = _Server(str(path), service)
    os.chmod(path, 0o666)  # noqa: TID251, S103 - a socket, not a secret: access is by peer uid
    return server
