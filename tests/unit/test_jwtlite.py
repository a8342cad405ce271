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
