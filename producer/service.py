"""The mint service: a Unix socket where local callers ask for tokens.

Like ``scontrol token`` asking slurmctld, a caller is identified by the
kernel (SO_PEERCRED), not by anything it says: an ordinary user can mint
only for itself, root (pam_exec) and the configured admins for anyone.  The
service keeps the key and the store warm, so a login costs one round trip.

No caller can starve the others (docs/producer.md, "Limits of the mint
socket"): connections, their read time and size are bounded by
producer.bounded_server; here, requests of each uid but root are
rate-limited, and a user's repeated self-mint reuses the token it holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.bounded_server import BoundedUnixServer, ConnectionLimits
from producer.mint import Minter
from tokenlife.config import Config
from tokenlife.errors import PermissionDenied, TokenlifeError, UsageError
from tokenlife.fsutil import ensure_dir
from tokenlife.users import lookup, validate_name

log = logging.getLogger(__name__)

#: the longest lifetime or renew-until a request may name (longer ones are
#: malformed, not merely more than configured)
MAX_SECONDS = 2**31 - 1


@dataclass(frozen=True)
class RateLimit:
    """A token bucket per caller uid: ``burst`` requests at once, then one
    every ``every`` seconds.  Root (PAM, the admin at the console) is exempt."""

    burst: int = 5
    every: float = 10.0


class RateLimiter:
    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.clock = limit, clock
        self._buckets: dict[int, tuple[float, float]] = {}  # uid -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, uid: int) -> float:
        """0 if ``uid`` may make a request now (and it is counted), else the
        seconds until it may."""
        burst, every = self.limit.burst, self.limit.every
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(uid, (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) / every)
            if tokens < 1.0:
                self._buckets[uid] = tokens, now
                return (1.0 - tokens) * every
            if len(self._buckets) > 4096:  # forget the callers back to a full bucket
                self._buckets = {
                    u: (t, a)
                    for u, (t, a) in self._buckets.items()
                    if t + (now - a) / every < burst
                }
            self._buckets[uid] = tokens - 1.0, now
            return 0.0


class MintService:
    def __init__(
        self,
        config: Config,
        minter: Minter,
        rate: RateLimit | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.minter = minter
        self.rate = RateLimiter(rate or RateLimit(), clock)
        self._lock = threading.Lock()  # one mint at a time: the store is shared

    # -- the socket's side (producer.bounded_server.LineService) ----------------

    def answer(self, line: bytes, caller: int) -> bytes:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            request = None
        answer = self.handle(request, caller)
        if not answer.get("ok"):
            log.info("mint request from uid %d refused: %s", caller, answer.get("error"))
        line_mode = isinstance(request, dict) and request.get("reply") == "line"
        return self._format(answer, line_mode)

    def refuse(self, error: str, code: int, head: bytes) -> bytes:
        # The login path's client sends its request at once; if it is here, the
        # refusal is in the form that client reads.
        line_mode = b'"reply":"line"' in head
        return self._format({"ok": False, "error": error, "code": code}, line_mode)

    def _format(self, answer: dict[str, Any], line_mode: bool) -> bytes:
        if not line_mode:
            return json.dumps(answer).encode() + b"\n"
        # The login path's lean client parses this without json.
        if answer.get("ok"):
            return b"OK\n"
        required = int(bool(answer.get("required", self.config.pam.required)))
        return f"ERR {required} {answer.get('error')}\n".encode()

    # -- requests ---------------------------------------------------------------

    def handle(self, request: Any, caller: int) -> dict[str, Any]:
        """The answer to one request; never raises."""
        try:
            return self._handle(request, caller)
        except TokenlifeError as exc:
            return {
                "ok": False,
                "error": str(exc),
                "code": exc.exit_code,
                "required": self.config.pam.required,
            }
        except Exception as exc:
            # Neither the message nor the traceback at warning: either may quote
            # the request or a record; the type is enough to look further.
            log.warning(
                "mint request from uid %d failed: internal error (%s)",
                caller,
                type(exc).__name__,
            )
            log.debug("mint request from uid %d failed", caller, exc_info=True)
            return {"ok": False, "error": "internal error", "code": 1}

    def _handle(self, request: Any, caller: int) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("user"), str):
            return {"ok": False, "error": "malformed request", "code": 2}
        op = request.get("op")
        if op not in ("pam", "mint"):
            shown = repr(op) if isinstance(op, str) and len(op) <= 32 else "of this kind"
            return {"ok": False, "error": f"unknown operation {shown}", "code": 2}
        if request.get("reply") not in (None, "line", "json"):
            raise UsageError('malformed request: reply must be "line" or "json"')
        user = validate_name(request["user"])
        lifetime = _seconds(request, "lifetime")
        renew_until = _seconds(request, "renew_until")
        show, reuse = _flag(request, "print"), _flag(request, "reuse")
        if caller != 0 and not self.minter.may_mint_for_others(caller):
            # root, the Slurm user and the admins are trusted with many mints
            wait = self.rate.take(caller)
            if wait:
                raise PermissionDenied(f"too many requests; try again in {math.ceil(wait)}s")
        if op == "pam":
            return self._pam(user, caller)
        return self._mint(user, caller, lifetime, renew_until, show, reuse)

    def _pam(self, user: str, caller: int) -> dict[str, Any]:
        if caller != 0:
            return {"ok": False, "error": "only root may use the pam operation", "code": 5}
        info = lookup(user)
        if info.uid < self.config.pam.min_uid:
            return {"ok": True, "skipped": "uid below pam.min_uid"}
        minter = self.minter  # a reload may swap it; write with the one that minted
        with self._lock:
            record, minted = minter.mint(info, 0, reuse=True, actor="pam", write_login=False)
        # The login file is in a directory the user owns: written outside the
        # lock, so one user's file system never holds up another user's login.
        minter.write_login(record)
        return {"ok": True, "minted": minted, "record": record.public()}

    def _mint(
        self,
        user: str,
        caller: int,
        lifetime: int | None,
        renew_until: int | None,
        show: bool,
        reuse: bool,
    ) -> dict[str, Any]:
        if lifetime is not None or renew_until is not None:
            reuse = False  # the stored token has the default limits, not these
        elif caller != 0 and lookup(user).uid == caller:
            # A user asking again for its own token gets the one it holds while
            # that is good: asking in a loop fills neither the store nor the
            # world with valid tokens.
            reuse = True
        minter = self.minter
        with self._lock:
            record, minted = minter.mint(
                user,
                caller,
                lifetime,
                renew_until,
                reuse=reuse,
                actor="service",
                write_login=False,
            )
        minter.write_login(record)
        answer: dict[str, Any] = {"ok": True, "minted": minted, "record": record.public()}
        if show:
            # authorize() already allowed this caller to hold this user's token
            answer["token"] = record.token
        return answer


def _seconds(request: dict[str, Any], name: str) -> int | None:
    value = request.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"malformed request: {name} must be a whole number of seconds")
    if not 0 < value <= MAX_SECONDS:
        raise UsageError(f"malformed request: {name} must be between 1 and {MAX_SECONDS} seconds")
    return value


def _flag(request: dict[str, Any], name: str) -> bool:
    value = request.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise UsageError(f"malformed request: {name} must be true or false")
    return value


def listen(
    path: Path, service: MintService, limits: ConnectionLimits | None = None
) -> BoundedUnixServer:
    """Bind the socket (replacing a stale one) world-connectable: the kernel says who calls."""
    ensure_dir(path.parent, 0o755)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = BoundedUnixServer(str(path), service, limits)
    os.chmod(path, 0o666)  # noqa: TID251, S103 - a socket, not a secret: access is by peer uid
    return server
