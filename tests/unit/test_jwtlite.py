"""The stdlib HS256 encoder must produce exactly what PyJWT produces."""

import jwt
import pytest

from tokenlife import jwtlite
from tokenlife.errors import TokenInvalid

KEY = bytes(range(32))
CLAIMS = {
    "iat": 1,
    "exp": 2,
    "sun": "alice",
    "uid": 1000,
    "gid": 1000,
    "id": {"gecos": "Älice,,,", "dir": "/home/alice", "shell": "/bin/bash", "gids": [1000, 27]},
}


def test_same_bytes_as_pyjwt() -> None:
    ours = jwtlite.encode_hs256(CLAIMS, KEY)
    assert ours == jwt.encode(CLAIMS, KEY, algorithm="HS256")
    decoded = jwt.decode(ours, KEY, algorithms=["HS256"], options={"verify_exp": False})
    assert decoded == CLAIMS


def test_verify_and_split() -> None:
    token = jwtlite.encode_hs256(CLAIMS, KEY)
    assert jwtlite.verify_hs256(token, KEY) == CLAIMS
    header, payload, _ = jwtlite.split(token + "\n")
    assert header == {"alg": "HS256", "typ": "JWT"}
    assert payload["sun"] == "alice"


def test_wrong_key_refused() -> None:
    token = jwtlite.encode_hs256(CLAIMS, KEY)
    with pytest.raises(TokenInvalid, match="signature does not match"):
        jwtlite.verify_hs256(token, b"x" * 32)


@pytest.mark.parametrize("bad", ["", "a.b", "a.b.c.d", "!!.??.xx", "e30.e30."])
def test_garbage_refused(bad: str) -> None:
    with pytest.raises(TokenInvalid):
        jwtlite.split(bad)


def test_alg_none_refused() -> None:
    token = jwt.encode({"sun": "alice"}, None, algorithm="none") + "c2ln"
    with pytest.raises(TokenInvalid, match="not HS256"):
        jwtlite.verify_hs256(token, KEY)


@pytest.mark.parametrize("signature", ["é", "sïg", "\u2603" * 43, "ab\udcffcd"])
def test_non_ascii_signature_is_invalid(signature: str) -> None:
    """Not UnicodeEncodeError: a signature with other characters is just a bad token."""
    head, body, _ = jwtlite.encode_hs256(CLAIMS, KEY).split(".")
    with pytest.raises(TokenInvalid):
        jwtlite.verify_hs256(f"{head}.{body}.{signature}", KEY)


@pytest.mark.parametrize("part", [0, 1])
def test_non_ascii_header_or_payload_is_invalid(part: int) -> None:
    parts = jwtlite.encode_hs256(CLAIMS, KEY).split(".")
    parts[part] = "é" + parts[part]
    with pytest.raises(TokenInvalid):
        jwtlite.verify_hs256(".".join(parts), KEY)


def _b64(data: bytes) -> str:
    return jwtlite.b64url(data)


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
        b'{"x":' + b"[" * 40 + b"]" * 40 + b"}",
    ],
)
def test_deeply_nested_payload_is_invalid_not_a_recursion_error(payload: bytes) -> None:
    token = f"{_b64(b'{}')}.{_b64(payload)}.{_b64(b'sig')}"
    with pytest.raises(TokenInvalid, match="nested deeper"):
        jwtlite.split(token)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    claims = {"sun": "alice", "gecos": "[[[[{{{{" * 20 + '\\"]]]]"', "exp": 1}
    token = jwtlite.encode_hs256(claims, KEY)
    assert jwtlite.verify_hs256(token, KEY) == claims


def test_oversized_token_is_invalid() -> None:
    token = jwtlite.encode_hs256({"sun": "alice", "pad": "p" * 70000}, KEY)
    with pytest.raises(TokenInvalid, match="longer than"):
        jwtlite.verify_hs256(token, KEY)
