"""HS256 JSON Web Tokens with the standard library only.

The login path (pam_exec) and the TaskProlog run for every login and task:
importing PyJWT costs ~160 ms because it pulls in ``cryptography``, while
HS256 is one HMAC-SHA256 over base64url text.  This module encodes exactly
what PyJWT would (compact JSON, header {"alg","typ"}), which the unit tests
check against PyJWT, and decodes payloads without verification for the
engine, which only needs ``exp`` and ``sun`` of a token it was handed.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
from typing import Any

from tokenlife.errors import TokenInvalid
from tokenlife.slurm_jwt import MAX_TOKEN, json_object

_HS256_HEADER = b'{"alg":"HS256","typ":"JWT"}'


def b64url(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").translate(_TO_URL).decode()


def b64url_decode(text: str) -> bytes:
    try:
        raw = text.encode("ascii").translate(_FROM_URL)
    except UnicodeEncodeError:
        raise TokenInvalid("token is not base64url") from None
    try:
        return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4), strict_mode=True)
    except binascii.Error as exc:
        raise TokenInvalid("token is not base64url") from exc


_TO_URL = bytes.maketrans(b"+/", b"-_")
_FROM_URL = bytes.maketrans(b"-_", b"+/")


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def encode_hs256(claims: dict[str, Any], key: bytes) -> str:
    signing_input = f"{b64url(_HS256_HEADER)}.{b64url(_compact(claims))}"
    mac = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def split(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Header, payload and signature text of a compact JWT (no verification)."""
    token = token.strip()
    if len(token) > MAX_TOKEN:
        raise TokenInvalid(f"token is not a JWT (longer than {MAX_TOKEN} characters)")
    if not token.isascii():
        raise TokenInvalid("token is not a JWT (characters other than ASCII)")
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise TokenInvalid("token is not a JWT (expected three dot-separated parts)")
    try:
        header = json_object(b64url_decode(parts[0]))
        payload = json_object(b64url_decode(parts[1]))
    except TokenInvalid:
        raise
    except ValueError as exc:  # also not UTF-8, nested too deep, not an object
        raise TokenInvalid(f"token header or payload is not a JSON object ({exc})") from None
    return header, payload, parts[2]


def verify_hs256(token: str, key: bytes) -> dict[str, Any]:
    """The payload of a token signed with ``key``; raise TokenInvalid otherwise."""
    header, payload, signature = split(token)
    if header.get("alg") != "HS256":
        raise TokenInvalid("token is not HS256")
    signing_input = token.strip().rsplit(".", 1)[0].encode("ascii")
    expected = hmac.new(key, signing_input, hashlib.sha256).digest()
    # Compared as text, canonical base64url: the unused low bits of the last
    # character must not give one signature many spellings.
    if not hmac.compare_digest(b64url(expected), signature):
        raise TokenInvalid("token signature does not match the signing key")
    return payload
