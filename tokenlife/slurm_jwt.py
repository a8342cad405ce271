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
from typing import TYPE_CHECKING, Any

from tokenlife.layout import FILE_NAME
from tokenlife.tokenview import TokenView

if TYPE_CHECKING:
    from tokenlife.interfaces import SigningKey
    from tokenlife.users import UserInfo

_TOKEN_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def build_claims(user: UserInfo, iat: int, exp: int) -> dict[str, Any]:
    return {
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


def read_claims(text: str) -> dict[str, Any]:
    """The payload of a compact JWT, unverified; ValueError (one line) if it is not one."""
    raw = text.encode("ascii", "replace")
    parts = raw.split(b".")
    if len(parts) != 3 or not all(parts) or not set(raw) <= _TOKEN_CHARS:
        raise ValueError("not a JSON Web Token")
    payload = parts[1] + b"=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(binascii.a2b_base64(payload.replace(b"-", b"+").replace(b"_", b"/")))
    except (binascii.Error, ValueError):
        raise ValueError("not a JSON Web Token (unreadable payload)") from None
    if not isinstance(claims, dict):
        raise ValueError("not a JSON Web Token (payload is not an object)")
    return claims


class SlurmJwt:
    """A Slurm JWT (HS256 with ``jwt_key=``, or RS256 with ``jwks=``)."""

    name = "slurm_jwt"
    file_name = FILE_NAME

    def make(self, key: SigningKey, user: UserInfo, iat: int, exp: int) -> str:
        return key.sign(build_claims(user, iat, exp))

    def verify(self, key: SigningKey, token: str) -> dict[str, Any]:
        return key.verify(token)

    def read(self, text: str) -> TokenView:
        claims = read_claims(text)
        sun = claims.get("sun") or claims.get("username")  # Slurm's order
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(sun, str) or type(exp) is not int or type(iat) not in (int, type(None)):
            raise ValueError("token without a user name (sun) or expiry (exp)")
        return TokenView(sun, exp, iat or 0)
