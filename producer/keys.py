"""Signing keys and the key-file source (Slurm's jwt_hs256.key, or an RSA PEM)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from tokenlife import jwtlite
from tokenlife.config import KeyConfig
from tokenlife.errors import KeySourceError
from tokenlife.fsutil import read_private_file
from tokenlife.users import uid_of

#: Slurm's docs create the key with 32 random bytes; less is refused.
MIN_HS256_BYTES = 32


class HS256Key:
    """Slurm's HS256 key: the raw bytes are the HMAC key."""

    algorithm = "HS256"

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_HS256_BYTES:
            raise KeySourceError(
                f"HS256 key is {len(secret)} bytes; at least {MIN_HS256_BYTES} are required"
            )
        self._secret = secret
        self.key_id = "sha256:" + hashlib.sha256(secret).hexdigest()[:16]

    def sign(self, claims: dict[str, Any]) -> str:
        return jwtlite.encode_hs256(claims, self._secret)

    def verify(self, token: str) -> dict[str, Any]:
        return jwtlite.verify_hs256(token, self._secret)

    def secret_bytes(self) -> bytes:
        """The raw key, for the AWS cache file only."""
        return self._secret

    def __repr__(self) -> str:
        return f"HS256Key({self.key_id})"


class RS256Key:
    """An RSA private key for Slurm's ``jwks=``; tokens carry its ``kid``."""

    algorithm = "RS256"

    def __init__(self, pem: bytes, kid: str | None = None) -> None:
        # cryptography is heavy to import: only RS256 sites pay for it.
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise KeySourceError("RS256 key is not an unencrypted PEM private key") from exc
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
            raise KeySourceError("RS256 key must be an RSA private key of at least 2048 bits")
        self._key = key
        self.kid = kid or self.thumbprint()
        self.key_id = f"kid:{self.kid}"

    def public_jwk(self) -> dict[str, str]:
        numbers = self._key.public_key().public_numbers()

        def b64int(value: int) -> str:
            return jwtlite.b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))

        return {"kty": "RSA", "e": b64int(numbers.e), "n": b64int(numbers.n)}

    def thumbprint(self) -> str:
        """RFC 7638 JWK thumbprint: a stable kid derived from the public key."""
        jwk = self.public_jwk()
        canonical = '{{"e":"{}","kty":"RSA","n":"{}"}}'.format(jwk["e"], jwk["n"])
        return jwtlite.b64url(hashlib.sha256(canonical.encode()).digest())

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWKS document for slurm.conf's ``AuthAltParameters=jwks=``."""
        return {"keys": [{**self.public_jwk(), "kid": self.kid, "alg": "RS256", "use": "sig"}]}

    def sign(self, claims: dict[str, Any]) -> str:
        import jwt

        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def verify(self, token: str) -> dict[str, Any]:
        import jwt

        from tokenlife.errors import TokenInvalid

        if not token.isascii():
            raise TokenInvalid("token does not verify: not ASCII")
        try:
            # Slurm's jwks= picks the key by kid: a token without today's kid
            # is not today's token, whatever key signed it.
            if jwt.get_unverified_header(token).get("kid") != self.kid:
                raise TokenInvalid("token does not verify: its kid is not this key's")
            payload: dict[str, Any] = jwt.decode(
                token, self._key.public_key(), algorithms=["RS256"], options={"verify_exp": False}
            )
        except jwt.InvalidTokenError as exc:
            raise TokenInvalid(f"token does not verify: {exc}") from exc
        return payload

    def __repr__(self) -> str:
        return f"RS256Key({self.key_id})"


def allowed_owners(config: KeyConfig) -> set[int]:
    """Who may own a key file: root, this process's user, and config's owners."""
    owners = {0, os.geteuid()}
    for name in config.owners:
        uid = uid_of(name)
        if uid is not None:
            owners.add(uid)
    return owners


class FileKeySource:
    """``key.source = "file"``: Slurm's key file, checked like ssh checks its keys."""

    def __init__(self, config: KeyConfig, prefer_cache: bool = False) -> None:
        self.config = config  # prefer_cache: a file is always local

    def describe(self) -> str:
        return f"file {self.config.path} ({self.config.algorithm})"

    def load(self) -> HS256Key | RS256Key:
        data = read_private_file(self.config.path, allowed_owners(self.config))
        if self.config.algorithm == "RS256":
            return RS256Key(data, self.config.kid)
        return HS256Key(data)
