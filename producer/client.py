"""The client of the mint service (``tokenlife mint`` asks it first)."""

from __future__ import annotations

import _socket
import errno
import json
from typing import Any

from tokenlife.errors import TokenlifeError

#: connect() errors that mean "no service listens here": the caller mints itself
_NOBODY = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.EACCES})


def ask(socket_path: str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any] | None:
    """Send one request; None when no service listens (the caller falls back).

    A service that listens but is full (its accept queue) or breaks off is a
    TokenlifeError: minting locally would only fail for want of the key.
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except OSError as exc:
            if exc.errno in _NOBODY:
                return None
            raise TokenlifeError(f"mint service at {socket_path}: {exc.strerror or exc}") from exc
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            raise TokenlifeError(f"mint service at {socket_path}: {exc.strerror or exc}") from exc
        try:
            answer = json.loads(b"".join(chunks) or b"null")
        except ValueError as exc:
            raise TokenlifeError(f"mint service at {socket_path}: unreadable answer") from exc
        return answer if isinstance(answer, dict) else None
    finally:
        sock.close()
