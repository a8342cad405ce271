"""The Slurm JWT, tokenlife's first token kind: claims, file name, reading it back.

Claims as Slurm and AWS PCS read them: ``sun`` is what Slurm 22.05
authenticates; ``uid``/``gid``/``id`` serve newer Slurm and PCS.  Reading a
token back (on worker nodes, before every task) uses ``binascii`` and
``json`` only: the signature is not checked there (the node has no key, and
Slurm checks it anyway), so PyJWT and ``cryptography`` would only cost time.
"""

from __future__ import annotations

import binascii
import json

from tokenlife.layout import FILE_NAME
from tokenlife.tokenview import TokenView

# typing costs milliseconds at run time, on every task's TaskProlog: only the
# type checker reads the annotations.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from tokenlife.interfaces import SigningKey
    from tokenlife.users import UserInfo

_TOKEN_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
#: a token is a few hundred bytes (a few KiB for a user in hundreds of groups);
#: anything longer is not one, and is not parsed
MAX_TOKEN = 65536
#: claims nest three deep; json.loads recurses once per level, so a payload of
#: "[[[[..." must be refused before it is parsed, not by RecursionError
MAX_DEPTH = 32
#: JSON strings (skipped: brackets inside them do not nest) and brackets;
#: compiled only when needed (the TaskProlog path never needs it)
_JSON_NESTING = rb'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]'


#: tokenlife's own claim: {"renew_until": epoch, "version": n}.  Slurm reads
#: only exp and sun (or username) and ignores the rest (DESIGN.md).
CLAIM = "tokenlife"


def build_claims(
    user: UserInfo,
    iat: int,
    exp: int,
    renew_until: int | None = None,
    version: int | None = None,
) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iat": iat,
        "exp": exp,
        "sun": user.name,
        "uid": user.uid,
        "gid": user.gid,
        "id": {
            "gecos": user.gecos,
            "dir": user.dir,
            "shell": user.shell,
            "gids": list(user.gids),
        },
    }
    ours = {
        name: value
        for name, value in (("renew_until", renew_until), ("version", version))
        if value is not None
    }
    if ours:
        claims[CLAIM] = ours
    return claims


def _int_or_none(value: object) -> int | None:
    return value if type(value) is int else None


def json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` (a JWT's decoded header or payload) as a JSON object.

    ValueError with a short reason if it is not JSON, not an object, or
    nested deeper than MAX_DEPTH (checked before parsing, without recursion).
    """
    # Brackets bound the depth: only a payload with many of them is scanned.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        import re

        depth = 0
        for match in re.finditer(_JSON_NESTING, raw, re.DOTALL):
            token = match.group()
            if token in (b"[", b"{"):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
            elif token in (b"]", b"}"):
                depth -= 1
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: cannot happen after the scan
        raise ValueError("unreadable payload") from None
    if not isinstance(value, dict):
        raise ValueError("payload is not an object")
    return value


def read_claims(text: str) -> dict[str, Any]:
    """The payload of a compact JWT, unverified; ValueError (one line) if it is not one."""
    if len(text) > MAX_TOKEN:
        raise ValueError(f"not a JSON Web Token (longer than {MAX_TOKEN} characters)")
    raw = text.encode("ascii", "replace")
    parts = raw.split(b".")
    if len(parts) != 3 or not all(parts) or not set(raw) <= _TOKEN_CHARS:
        raise ValueError("not a JSON Web Token")
    payload = parts[1] + b"=" * (-len(parts[1]) % 4)
    try:
        decoded = binascii.a2b_base64(payload.replace(b"-", b"+").replace(b"_", b"/"))
        return json_object(decoded)
    except binascii.Error:
        raise ValueError("not a JSON Web Token (unreadable payload)") from None
    except ValueError as exc:
        raise ValueError(f"not a JSON Web Token ({exc})") from None


class SlurmJwt:
    """A Slurm JWT (HS256 with ``jwt_key=``, or RS256 with ``jwks=``)."""

    name = "slurm_jwt"
    file_name = FILE_NAME

    def make(
        self,
        key: SigningKey,
        user: UserInfo,
        iat: int,
        exp: int,
        renew_until: int | None = None,
        version: int | None = None,
    ) -> str:
        return key.sign(build_claims(user, iat, exp, renew_until, version))

    def verify(self, key: SigningKey, token: str) -> dict[str, Any]:
        return key.verify(token)

    def read(self, text: str) -> TokenView:
        claims = read_claims(text)
        sun = claims.get("sun") or claims.get("username")  # Slurm's order
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(sun, str) or type(exp) is not int or type(iat) not in (int, type(None)):
            raise ValueError("token without a user name (sun) or expiry (exp)")
        ours = claims.get(CLAIM)
        if isinstance(ours, dict):
            renew_until = _int_or_none(ours.get("renew_until"))
            version = _int_or_none(ours.get("version"))
            return TokenView(sun, exp, iat or 0, renew_until, version)
        return TokenView(sun, exp, iat or 0)
