"""R5, the standing attack proof: every place that verifies or accepts a token refuses
forged, confused, tampered, foreign, expired and misplaced tokens in one clean line.

Three places take a token from somewhere they do not fully control:

* the signing keys' ``verify`` (``HS256Key`` on jwtlite, ``RS256Key`` on PyJWT), which
  says whether a token was made with today's key; what it lets through Slurm may not;
* ``tokenlife-engine`` (``token``, ``env``, ``exec``) on a worker node, which hands a
  delivered file or an inherited ``SLURM_JWT`` to a job: it does not verify signatures
  (the node has no key, Slurm does), so what it guards is the file and the claims;
* ``Minter.reusable``, which hands a stored token back at login instead of minting.

Each refusal must be TokenInvalid (the keys), ``tokenlife-engine: ...`` on one stderr
line (token, exec) or one ``print`` line (env), never a traceback, never the refused
token echoed back.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pwd
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.hashes import SHA256

from producer.keys import HS256Key, RS256Key
from producer.mint import Minter
from producer.spool import SpoolStore
from repository.store import SqlTokenStore
from tests.conftest import require_root, run_engine
from tokenlife.config import Config
from tokenlife.errors import TokenInvalid
from tokenlife.jwtlite import b64url, b64url_decode
from tokenlife.records import TokenRecord
from tokenlife.testing.fakes import FakeClock
from tokenlife.users import lookup

# -- forging ---------------------------------------------------------------------------------


def segment(value: dict[str, Any] | bytes) -> str:
    """One base64url part of a compact JWT: a JSON object (compact, as PyJWT) or raw bytes."""
    raw = value if isinstance(value, bytes) else json.dumps(value, separators=(",", ":")).encode()
    return b64url(raw)


def hmac_signed(header: dict[str, Any] | bytes, claims: dict[str, Any], secret: bytes) -> str:
    """A token whose signature is HMAC-SHA256 of its first two parts, whatever its header says."""
    signing_input = f"{segment(header)}.{segment(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def hmac512_signed(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{segment(header)}.{segment(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha512).digest()
    return f"{signing_input}.{b64url(mac)}"


def rsa_signed(header: dict[str, Any], claims: dict[str, Any], key: rsa.RSAPrivateKey) -> str:
    """A token with a genuine RS256 signature by ``key``, whatever its header says."""
    signing_input = f"{segment(header)}.{segment(claims)}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), SHA256())
    return f"{signing_input}.{b64url(signature)}"


def parts(token: str) -> tuple[str, str, str]:
    header, payload, signature = token.split(".")
    return header, payload, signature


def with_signature(token: str, signature: str) -> str:
    header, payload, _ = parts(token)
    return f"{header}.{payload}.{signature}"


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def flip(text: str, index: int, bit: int = 1) -> str:
    """``text`` with the base64url character at ``index`` changed in one bit of its value."""
    index %= len(text)
    char = _B64URL[_B64URL.index(text[index]) ^ bit]
    return text[:index] + char + text[index + 1 :]


def claims_for(sun: str = "alice", ttl: int = 3600) -> dict[str, Any]:
    now = int(time.time())
    return {"iat": now, "exp": now + ttl, "sun": sun, "uid": 1001, "gid": 1001}


def tampered_payload(token: str, **changes: Any) -> str:
    """The token with its payload re-encoded with ``changes``, signature kept."""
    header, payload, signature = parts(token)
    claims = {**json.loads(b64url_decode(payload)), **changes}
    return f"{header}.{segment(claims)}.{signature}"


# -- the keys under attack -------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """Today's keys (``hs``, ``rs``) and the attacker's or yesterday's (``hs_other``, ...)."""

    hs_secret: bytes
    hs: HS256Key
    hs_other: HS256Key
    rs_private: rsa.RSAPrivateKey
    rs: RS256Key
    rs_other_private: rsa.RSAPrivateKey
    rs_other: RS256Key

    def public_pem(self, fmt: serialization.PublicFormat) -> bytes:
        return self.rs_private.public_key().public_bytes(serialization.Encoding.PEM, fmt)

    @property
    def rs_header(self) -> dict[str, str]:
        return {"alg": "RS256", "kid": self.rs.kid, "typ": "JWT"}


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def keys() -> Keys:
    secret = secrets.token_bytes(32)
    rs_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rs_other_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Keys(
        hs_secret=secret,
        hs=HS256Key(secret),
        hs_other=HS256Key(secrets.token_bytes(32)),
        rs_private=rs_private,
        rs=RS256Key(_pem(rs_private)),
        rs_other_private=rs_other_private,
        rs_other=RS256Key(_pem(rs_other_private)),
    )


def assert_refused(key: HS256Key | RS256Key, token: str) -> str:
    """``key.verify`` raises TokenInvalid (nothing else), in one line, without the token."""
    with pytest.raises(TokenInvalid) as info:
        key.verify(token)
    message = str(info.value)
    assert message and "\n" not in message and "Traceback" not in message, message
    signature = token.rsplit(".", 1)[-1]
    if len(signature) >= 16:
        assert signature not in message, message
    return message


# Each case: (id, the key asked, the token offered).  The key is today's "hs" or "rs".
Forge = Callable[[Keys], str]

HEADER_HS = {"alg": "HS256", "typ": "JWT"}
NONE_CASES: list[tuple[str, Forge]] = [
    ("alg-none-no-signature", lambda k: f"{segment({'alg': 'none'})}.{segment(claims_for())}."),
    (
        "alg-none-two-parts",
        lambda k: f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(claims_for())}",
    ),
    (
        "alg-none-with-signature",
        lambda k: hmac_signed({"alg": "none", "typ": "JWT"}, claims_for(), k.hs_secret),
    ),
    (
        "alg-None-capitalised",
        lambda k: hmac_signed({"alg": "None", "typ": "JWT"}, claims_for(), k.hs_secret),
    ),
    (
        "alg-none-random-signature",
        lambda k: f"{segment({'alg': 'none'})}.{segment(claims_for())}.{b64url(os.urandom(32))}",
    ),
    (
        "alg-HS512",
        lambda k: hmac512_signed({"alg": "HS512", "typ": "JWT"}, claims_for(), k.hs_secret),
    ),
    ("alg-hs256-lowercase", lambda k: hmac_signed({"alg": "hs256"}, claims_for(), k.hs_secret)),
    ("alg-missing", lambda k: hmac_signed({"typ": "JWT"}, claims_for(), k.hs_secret)),
    ("alg-null", lambda k: hmac_signed({"alg": None}, claims_for(), k.hs_secret)),
    ("alg-list", lambda k: hmac_signed({"alg": ["HS256"]}, claims_for(), k.hs_secret)),
    ("header-not-json", lambda k: hmac_signed(b"alg=HS256", claims_for(), k.hs_secret)),
    ("header-json-array", lambda k: hmac_signed(b'["HS256"]', claims_for(), k.hs_secret)),
    ("header-not-base64url", lambda k: "eyJ!!!.e30." + b64url(os.urandom(32))),
    ("payload-not-json", lambda k: _hmac_raw_payload(k.hs_secret, b"sun=alice")),
]


def _hmac_raw_payload(secret: bytes, payload: bytes) -> str:
    signing_input = f"{segment(HEADER_HS)}.{b64url(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


@pytest.mark.parametrize("forge", [c[1] for c in NONE_CASES], ids=[c[0] for c in NONE_CASES])
@pytest.mark.parametrize("which", ["hs", "rs"])
def test_bad_alg_and_header_refused(keys: Keys, which: str, forge: Forge) -> None:
    assert_refused(getattr(keys, which), forge(keys))


# HS/RS confusion: the public half of the RS256 key used as an HMAC secret.
CONFUSION_CASES: list[tuple[str, Forge]] = [
    (
        "hs256-secret-is-public-pem-spki",
        lambda k: hmac_signed(
            {"alg": "HS256", "kid": k.rs.kid, "typ": "JWT"},
            claims_for(),
            k.public_pem(serialization.PublicFormat.SubjectPublicKeyInfo),
        ),
    ),
    (
        "hs256-secret-is-public-pem-pkcs1",
        lambda k: hmac_signed(
            {"alg": "HS256", "typ": "JWT"},
            claims_for(),
            k.public_pem(serialization.PublicFormat.PKCS1),
        ),
    ),
    (
        "hs256-secret-is-jwks",
        lambda k: hmac_signed(
            {"alg": "HS256", "kid": k.rs.kid}, claims_for(), json.dumps(k.rs.jwks()).encode()
        ),
    ),
    (
        "hs256-secret-is-jwk-n",
        lambda k: hmac_signed(
            {"alg": "HS256", "kid": k.rs.kid}, claims_for(), k.rs.public_jwk()["n"].encode()
        ),
    ),
    (
        "header-says-rs256-signature-is-hmac-of-pem",
        lambda k: hmac_signed(
            k.rs_header,
            claims_for(),
            k.public_pem(serialization.PublicFormat.SubjectPublicKeyInfo),
        ),
    ),
]


@pytest.mark.parametrize(
    "forge", [c[1] for c in CONFUSION_CASES], ids=[c[0] for c in CONFUSION_CASES]
)
def test_hmac_with_the_public_key_refused_by_rs256(keys: Keys, forge: Forge) -> None:
    assert_refused(keys.rs, forge(keys))


def test_rs256_token_refused_by_hs256(keys: Keys) -> None:
    token = keys.rs.sign(claims_for())
    assert keys.rs.verify(token)["sun"] == "alice"  # a good RS256 token ...
    assert "not HS256" in assert_refused(keys.hs, token)  # ... is no HS256 token
    # and relabelled HS256, its RSA signature is no HMAC of today's key either
    relabelled = f"{segment(HEADER_HS)}.{parts(token)[1]}.{parts(token)[2]}"
    assert "does not match" in assert_refused(keys.hs, relabelled)


def test_another_hs256_key_refused(keys: Keys) -> None:
    assert "does not match" in assert_refused(keys.hs, keys.hs_other.sign(claims_for()))


def test_another_rs256_key_refused_even_with_todays_kid(keys: Keys) -> None:
    assert_refused(keys.rs, keys.rs_other.sign(claims_for()))  # its own kid
    assert_refused(keys.rs, rsa_signed(keys.rs_header, claims_for(), keys.rs_other_private))


# Found by this file and fixed: RS256Key.verify ignored the kid header (a token signed
# by today's RSA key with another kid, or none, verified; Slurm's jwks= refuses it), an
# HS256 signature's unused low bits were malleable, and a lone surrogate escaped as
# UnicodeEncodeError from the RS256 path.


def test_foreign_kid_on_rs256_refused(keys: Keys) -> None:
    header = {"alg": "RS256", "kid": "someone-elses-kid", "typ": "JWT"}
    assert_refused(keys.rs, rsa_signed(header, claims_for(), keys.rs_private))


def test_missing_kid_on_rs256_refused(keys: Keys) -> None:
    assert_refused(
        keys.rs, rsa_signed({"alg": "RS256", "typ": "JWT"}, claims_for(), keys.rs_private)
    )


def test_right_kid_is_what_verifies(keys: Keys) -> None:
    """The control for the two cases above: today's kid and key verify."""
    assert keys.rs.verify(rsa_signed(keys.rs_header, claims_for(), keys.rs_private))["sun"]


# Signature and payload tampering, on both kinds of key.
TAMPER_CASES: list[tuple[str, Callable[[str], str]]] = [
    ("signature-minus-1-char", lambda t: t[:-1]),
    ("signature-minus-2-chars", lambda t: t[:-2]),
    ("signature-half", lambda t: with_signature(t, parts(t)[2][: len(parts(t)[2]) // 2])),
    ("signature-empty", lambda t: with_signature(t, "")),
    ("signature-dropped", lambda t: t.rsplit(".", 1)[0]),
    ("signature-first-char-flipped", lambda t: with_signature(t, flip(parts(t)[2], 0))),
    ("signature-middle-char-flipped", lambda t: with_signature(t, flip(parts(t)[2], 20, 32))),
    ("signature-extra-chars", lambda t: t + "AAAA"),
    ("signature-zeroed", lambda t: with_signature(t, "A" * len(parts(t)[2]))),
    ("signature-not-base64url", lambda t: with_signature(t, parts(t)[2][:-4] + "+/+/")),
    ("fourth-part", lambda t: t + "." + parts(t)[2]),
    ("payload-sun-root", lambda t: tampered_payload(t, sun="root")),
    ("payload-exp-extended", lambda t: tampered_payload(t, exp=2**31 - 1)),
    ("payload-uid-0", lambda t: tampered_payload(t, uid=0)),
    ("payload-claim-added", lambda t: tampered_payload(t, username="root")),
    ("header-kid-changed", lambda t: _retitled(t, kid="someone-elses-kid")),
    ("header-typ-changed", lambda t: _retitled(t, typ="at+jwt")),
    ("payload-replaced", lambda t: _swap_payload(t)),
    ("non-ascii", lambda t: t[:-3] + "é" + t[-2:]),
]


def _retitled(token: str, **changes: str) -> str:
    """The token with its header re-encoded with ``changes``, payload and signature kept."""
    header, payload, signature = parts(token)
    return f"{segment({**json.loads(b64url_decode(header)), **changes})}.{payload}.{signature}"


def _swap_payload(token: str) -> str:
    header, _, signature = parts(token)
    return f"{header}.{segment(claims_for('bob'))}.{signature}"


@pytest.mark.parametrize("tamper", [c[1] for c in TAMPER_CASES], ids=[c[0] for c in TAMPER_CASES])
@pytest.mark.parametrize("which", ["hs", "rs"])
def test_tampered_token_refused(keys: Keys, which: str, tamper: Callable[[str], str]) -> None:
    key = getattr(keys, which)
    token = key.sign(claims_for())
    assert key.verify(token)["sun"] == "alice"  # untouched, it verifies
    tampered = tamper(token)
    assert tampered != token
    assert_refused(key, tampered)


def test_hs256_noncanonical_signature_refused(keys: Keys) -> None:
    token = keys.hs.sign(claims_for())
    assert_refused(keys.hs, with_signature(token, flip(parts(token)[2], -1)))


def test_rs256_noncanonical_signature_refused(keys: Keys) -> None:
    token = keys.rs.sign(claims_for())
    assert_refused(keys.rs, with_signature(token, flip(parts(token)[2], -1)))


GARBAGE = ["", " ", "...", "a.b.c", "not a token", "é.é.é", "x" * 70000, "\x00.\x00.\x00"]


@pytest.mark.parametrize("garbage", GARBAGE, ids=[f"garbage{i}" for i in range(len(GARBAGE))])
@pytest.mark.parametrize("which", ["hs", "rs"])
def test_garbage_refused(keys: Keys, which: str, garbage: str) -> None:
    assert_refused(getattr(keys, which), garbage)


def test_hs256_lone_surrogate_refused(keys: Keys) -> None:
    assert_refused(keys.hs, keys.hs.sign(claims_for())[:-1] + "\udcff")


def test_rs256_lone_surrogate_refused(keys: Keys) -> None:
    assert_refused(keys.rs, keys.rs.sign(claims_for())[:-1] + "\udcff")


# -- Minter.reusable: a stored token is handed back only if today's key verifies it -----------


class FixedKeySource:
    def __init__(self, key: HS256Key | RS256Key) -> None:
        self.key = key

    def load(self) -> HS256Key | RS256Key:
        return self.key

    def describe(self) -> str:
        return "test"


def _ordinary_user() -> str:
    return "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


def _other_user(user: str) -> str:
    return next(p.pw_name for p in pwd.getpwall() if p.pw_name != user and p.pw_name.isascii())


def _stored_claims(user: str, clock: FakeClock) -> dict[str, Any]:
    info = lookup(user)
    now = int(clock.now())
    return {"iat": now, "exp": now + 86400, "sun": info.name, "uid": info.uid, "gid": info.gid}


# (id, today's key "hs"/"rs", the stored token, the stored key_id: "today" or "yesterday")
StoredForge = Callable[[Keys, dict[str, Any]], str]
REUSE_CASES: list[tuple[str, str, StoredForge, str]] = [
    ("yesterdays-key-honest-key-id", "hs", lambda k, c: k.hs_other.sign(c), "yesterday"),
    ("yesterdays-key-forged-key-id", "hs", lambda k, c: k.hs_other.sign(c), "today"),
    ("alg-none", "hs", lambda k, c: f"{segment({'alg': 'none'})}.{segment(c)}.", "today"),
    ("alg-none-signed", "hs", lambda k, c: hmac_signed({"alg": "none"}, c, k.hs_secret), "today"),
    ("alg-hs512", "hs", lambda k, c: hmac512_signed({"alg": "HS512"}, c, k.hs_secret), "today"),
    ("payload-tampered", "hs", lambda k, c: tampered_payload(k.hs.sign(c), exp=2**31 - 1), "today"),
    ("signature-truncated", "hs", lambda k, c: k.hs.sign(c)[:-2], "today"),
    (
        "another-users-token",
        "hs",
        lambda k, c: k.hs.sign({**c, "sun": _other_user(c["sun"])}),
        "today",
    ),
    ("rs256-token-for-hs-key", "hs", lambda k, c: k.rs.sign(c), "today"),
    ("garbage", "hs", lambda k, c: "not a token", "today"),
    ("empty", "hs", lambda k, c: "", "today"),
    (
        "hmac-of-public-pem",
        "rs",
        lambda k, c: hmac_signed(
            {"alg": "HS256", "kid": k.rs.kid},
            c,
            k.public_pem(serialization.PublicFormat.SubjectPublicKeyInfo),
        ),
        "today",
    ),
    (
        "other-rsa-key-todays-kid",
        "rs",
        lambda k, c: rsa_signed(k.rs_header, c, k.rs_other_private),
        "today",
    ),
    ("other-rsa-key-forged-key-id", "rs", lambda k, c: k.rs_other.sign(c), "today"),
    ("hs256-token-for-rs-key", "rs", lambda k, c: k.hs.sign(c), "today"),
]


@pytest.fixture(params=["sqlite", "spool"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        sql = SqlTokenStore(f"sqlite:///{tmp_path}/db.sqlite")
        yield sql
        sql.close()
    else:
        yield SpoolStore(tmp_path / "spool")


def _plant(store: Any, keys: Keys, which: str, forge: StoredForge, key_id: str) -> tuple[Any, ...]:
    """A record for an ordinary user holding the forged token; the minter of today's key."""
    key = getattr(keys, which)
    clock = FakeClock(start=time.time())
    user = _ordinary_user()
    info = lookup(user)
    claims = _stored_claims(user, clock)
    token = forge(keys, claims)
    now = int(clock.now())
    record = TokenRecord(
        token_id=secrets.token_hex(8),
        user=info.name,
        uid=info.uid,
        gid=info.gid,
        first_issued=now,
        iat=now,
        exp=now + 86400,
        renew_until=now + 7 * 86400,
        lifetime=86400,
        key_id=key.key_id if key_id == "today" else keys.hs_other.key_id,
        token=token,
    )
    store.save(record, "minted", "attacker")
    minter = Minter(Config(), FixedKeySource(key), store, clock)
    return minter, key, info, now, token


def _assert_not_reused(store: Any, keys: Keys, which: str, forge: StoredForge, key_id: str) -> None:
    minter, key, info, now, forged = _plant(store, keys, which, forge, key_id)
    assert minter.reusable(info, key, now) is None
    record, minted_now = minter.mint(info.name, 0, reuse=True)
    assert minted_now and record.token != forged
    assert key.verify(record.token)["sun"] == info.name


@pytest.mark.parametrize(
    ("which", "forge", "key_id"),
    [c[1:] for c in REUSE_CASES],
    ids=[c[0] for c in REUSE_CASES],
)
def test_reusable_never_hands_back_a_bad_token(
    store: Any, keys: Keys, which: str, forge: StoredForge, key_id: str
) -> None:
    _assert_not_reused(store, keys, which, forge, key_id)


def test_reusable_refuses_a_foreign_kid(store: Any, keys: Keys) -> None:
    def forge(k: Keys, c: dict[str, Any]) -> str:
        return rsa_signed({"alg": "RS256", "kid": "not-todays", "typ": "JWT"}, c, k.rs_private)

    _assert_not_reused(store, keys, "rs", forge, "today")


@pytest.mark.parametrize("which", ["hs", "rs"])
def test_reusable_control_an_honest_token_is_reused(store: Any, keys: Keys, which: str) -> None:
    """Without it, every refusal above could be the setup refusing everything."""
    minter, key, info, now, token = _plant(
        store, keys, which, lambda k, c: getattr(k, which).sign(c), "today"
    )
    record = minter.reusable(info, key, now)
    assert record is not None and record.token == token


# -- tokenlife-engine on a worker node: files and SLURM_JWT it must not hand out ------------

UID = os.getuid()
USER = pwd.getpwuid(UID).pw_name
OTHER_UID = 65534 if UID != 65534 else 1


def engine_token(sun: str = USER, ttl: int = 600) -> str:
    """A token as the engine sees one: it reads claims, it has no key to verify."""
    return hmac_signed(HEADER_HS, claims_for(sun, ttl), secrets.token_bytes(32))


class Node:
    """A worker node's token directory, and the real ``tokenlife-engine`` run on it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token_dir = root / "run"
        self.user_dir = self.token_dir / str(UID)
        self.user_dir.mkdir(parents=True, mode=0o700)
        self.file = self.user_dir / "slurm_jwt"
        self.config = root / "tokenlife.toml"
        self.config.write_text(
            f'[engine]\ntoken_dir = "{self.token_dir}"\nexport_jwt = "steps"\nwrapper_dir = ""\n'
        )

    def private_file(self, path: Path, token: str, mode: int = 0o600, uid: int = UID) -> Path:
        path.write_text(token + "\n")
        path.chmod(mode)
        if uid != UID:
            os.chown(path, uid, uid)
        return path

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_engine(self.config, *args, env=env)

    def assert_refused(self, reason: str, offered: str, env: dict[str, str] | None = None) -> None:
        """``token``, ``env`` (a step) and ``exec`` all refuse, each in one clean line."""
        env = env or {}
        token = self.run("token", env=env)
        assert (token.returncode, token.stdout) == (1, ""), token
        assert token.stderr.startswith("tokenlife-engine: ") and token.stderr.count("\n") == 1
        assert reason in token.stderr and "Traceback" not in token.stderr, token.stderr
        prolog = self.run("env", env={"SLURM_STEP_ID": "0", **env})
        assert (prolog.returncode, prolog.stderr) == (0, ""), prolog
        lines = prolog.stdout.splitlines()
        assert not [line for line in lines if line.startswith("export")], lines
        prints = [line for line in lines if line.startswith("print ")]
        assert len(prints) == 1 and reason in prints[0], lines
        marker = self.root / "ran"
        ran = self.run("exec", "--", "touch", str(marker), env=env)
        assert ran.returncode == 1 and not marker.exists(), ran
        assert reason in ran.stderr and ran.stderr.count("\n") == 1
        signature = parts(offered)[2]
        for output in (token.stdout, token.stderr, prolog.stdout, ran.stdout, ran.stderr):
            assert signature not in output, "the refused token was echoed back"


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def test_token_for_another_user_refused(node: Node) -> None:
    token = engine_token(sun="somebodyelse")
    node.private_file(node.file, token)
    node.assert_refused("another user (somebodyelse)", token)


@pytest.mark.parametrize("claim", ["sun", "username"])
def test_token_naming_another_user_in_any_claim_refused(node: Node, claim: str) -> None:
    claims = {"iat": int(time.time()), "exp": int(time.time()) + 600, claim: "somebodyelse"}
    token = hmac_signed(HEADER_HS, claims, secrets.token_bytes(32))
    node.private_file(node.file, token)
    node.assert_refused("another user (somebodyelse)", token)


@pytest.mark.parametrize("ago", [1, 5, 86400])
def test_expired_token_for_the_user_refused(node: Node, ago: int) -> None:
    token = engine_token(ttl=-ago)
    node.private_file(node.file, token)
    node.assert_refused("expired", token)


def test_file_owned_by_another_user_refused(node: Node) -> None:
    require_root()
    token = engine_token()  # the right sun: the owner alone decides
    node.private_file(node.file, token, uid=OTHER_UID)
    node.assert_refused(f"owned by uid {OTHER_UID}", token)


def test_another_users_own_file_refused(node: Node) -> None:
    require_root()
    other = pwd.getpwuid(OTHER_UID).pw_name
    token = engine_token(sun=other)
    node.private_file(node.file, token, uid=OTHER_UID)
    node.assert_refused(f"owned by uid {OTHER_UID}", token)


@pytest.mark.parametrize("target_owner", ["self", "other"])
def test_symlink_refused(node: Node, tmp_path: Path, target_owner: str) -> None:
    if target_owner == "other":
        require_root()
    token = engine_token()
    real = node.private_file(
        tmp_path / "elsewhere", token, uid=UID if target_owner == "self" else OTHER_UID
    )
    node.file.symlink_to(real)
    node.assert_refused("symlink", token)


def test_hardlink_to_another_users_file_refused(node: Node, tmp_path: Path) -> None:
    require_root()
    other_dir = node.token_dir / str(OTHER_UID)
    other_dir.mkdir(mode=0o700)
    token = engine_token()
    theirs = node.private_file(other_dir / "slurm_jwt", token, uid=OTHER_UID)
    os.link(theirs, node.file)
    assert node.file.stat().st_nlink == 2
    node.assert_refused(f"owned by uid {OTHER_UID}", token)


def test_hardlink_to_a_file_others_can_read_refused(node: Node, tmp_path: Path) -> None:
    token = engine_token()
    shared = node.private_file(tmp_path / "shared", token, mode=0o644)
    os.link(shared, node.file)
    node.assert_refused("mode 0644", token)


def test_user_dir_symlinked_to_another_users_dir_refused(node: Node) -> None:
    require_root()
    other_dir = node.token_dir / str(OTHER_UID)
    other_dir.mkdir(mode=0o700)
    token = engine_token()
    node.private_file(other_dir / "slurm_jwt", token, uid=OTHER_UID)
    node.user_dir.rmdir()
    node.user_dir.symlink_to(other_dir)
    node.assert_refused(f"owned by uid {OTHER_UID}", token)


def test_fifo_refused_without_blocking(node: Node) -> None:
    os.mkfifo(node.file, 0o600)
    started = time.monotonic()
    node.assert_refused("not a regular file", engine_token())
    assert time.monotonic() - started < 20  # nobody writes to it: it must not wait


def test_directory_refused(node: Node) -> None:
    node.file.mkdir(mode=0o700)
    node.assert_refused("not a regular file", engine_token())


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o666, 0o700])
def test_file_others_can_reach_refused(node: Node, mode: int) -> None:
    token = engine_token()
    node.private_file(node.file, token, mode=mode)
    if mode & 0o077:
        node.assert_refused(f"mode {mode:04o}", token)
    else:  # 0700 is private to the user: the control case
        assert node.run("token").stdout == token + "\n"


def test_inherited_slurm_jwt_of_another_user_refused(node: Node) -> None:
    theirs = engine_token(sun="somebodyelse", ttl=7200)
    node.assert_refused("no token delivered", theirs, env={"SLURM_JWT": theirs})
    # the TaskProlog drops it where it would be used
    prolog = node.run("env", env={"SLURM_JWT": theirs, "SLURM_STEP_ID": "0"})
    assert prolog.stdout.splitlines()[-1] == "unset SLURM_JWT", prolog.stdout
    assert parts(theirs)[2] not in prolog.stdout


def test_inherited_expired_slurm_jwt_of_the_user_refused(node: Node) -> None:
    stale = engine_token(ttl=-5)
    node.assert_refused("no token delivered", stale, env={"SLURM_JWT": stale})


def test_inherited_foreign_token_never_beats_the_delivered_one(node: Node) -> None:
    mine = engine_token(ttl=300)
    node.private_file(node.file, mine)
    theirs = engine_token(sun="somebodyelse", ttl=7200)  # lives longer: must not matter
    env = {"SLURM_JWT": theirs}
    assert node.run("token", env=env).stdout == mine + "\n"
    script = 'printf %s "$SLURM_JWT"'
    assert node.run("exec", "--", "sh", "-c", script, env=env).stdout == mine
    prolog = node.run("env", env={**env, "SLURM_STEP_ID": "0"}).stdout.splitlines()
    assert f"export SLURM_JWT={mine}" in prolog and theirs not in "\n".join(prolog)


def test_slurm_jwt_file_pointing_at_another_users_file_refused(node: Node, tmp_path: Path) -> None:
    require_root()
    theirs = node.private_file(tmp_path / "theirs", engine_token(), uid=OTHER_UID)
    proc = node.run("token", env={"SLURM_JWT_FILE": str(theirs)})
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"owned by uid {OTHER_UID}" in proc.stderr and proc.stderr.count("\n") == 1


def test_root_acting_for_a_job_refuses_roots_own_file(tmp_path: Path) -> None:
    """A root TaskProlog for nobody's job: a root-owned file there is not nobody's token."""
    require_root()
    node = Node(tmp_path)  # run/0/...: root's own directory
    job_dir = node.token_dir / "65534"
    job_dir.mkdir(mode=0o700)
    token = engine_token(sun="nobody")
    node.private_file(job_dir / "slurm_jwt", token)  # owned by root, sun nobody
    env = {"SLURM_JOB_UID": "65534", "SLURM_JOB_USER": "nobody"}
    node.assert_refused("owned by uid 0", token, env=env)
