"""The client of the mint service (``tokenlife mint`` asks it first)."""

from __future__ import annotations

import _socket
import json
from typing import Any


def ask(socket_path: str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any] | None:
    """Send one request; None when no service listens (the caller falls back)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except OSError:
            return None
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        answer = json.loads(b"".join(chunks) or b"null")
        return answer if isinstance(answer, dict) else None
    finally:
        sock.close()
