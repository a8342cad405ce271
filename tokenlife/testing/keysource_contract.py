"""The key-source contract: what every ``[key] source`` must do, as pytest tests.

A plugin proves itself with a subclass that builds its source twice, once
able to load its key and once not (say, the variable or file is missing)::

    class TestMySource(KeySourceContract):
        @pytest.fixture
        def source(self) -> KeySource: ...          # loads a working key
        @pytest.fixture
        def broken_source(self) -> KeySource: ...   # cannot load its key
        @pytest.fixture
        def secret(self) -> bytes: ...              # the key's raw bytes (never shown)

tokenlife runs it against its own sources (file HS256 and RS256, AWS).
"""

from __future__ import annotations

import time

import pytest

from tokenlife.errors import KeySourceError, TokenInvalid
from tokenlife.interfaces import KeySource, SigningKey
from tokenlife.slurm_jwt import SlurmJwt
from tokenlife.users import UserInfo

ALICE = UserInfo("alice", 1000, 1000, "Alice", "/home/alice", "/bin/bash", (1000, 100))


class KeySourceContract:
    @pytest.fixture
    def source(self) -> KeySource:
        raise NotImplementedError("a subclass provides the source under test")

    @pytest.fixture
    def broken_source(self) -> KeySource:
        raise NotImplementedError("a subclass provides a source that cannot load its key")

    @pytest.fixture
    def secret(self) -> bytes:
        raise NotImplementedError("a subclass provides the key's raw bytes")

    def test_a_loaded_key_verifies_what_it_signs(self, source: KeySource) -> None:
        key = source.load()
        now = int(time.time())
        token = SlurmJwt().make(key, ALICE, now, now + 60)
        claims = key.verify(token)
        assert (claims["sun"], claims["exp"], claims["uid"]) == ("alice", now + 60, 1000)
        assert SlurmJwt().read(token).subject == "alice"

    def test_another_keys_token_is_refused(self, source: KeySource) -> None:
        from producer.keys import HS256Key

        other: SigningKey = HS256Key(b"o" * 32)
        token = other.sign({"sun": "alice", "iat": 1, "exp": 2})
        with pytest.raises(TokenInvalid):
            source.load().verify(token)

    def test_the_key_id_is_stable_and_fit_for_a_log_line(self, source: KeySource) -> None:
        first, second = source.load(), source.load()
        assert first.key_id == second.key_id
        assert 0 < len(first.key_id) <= 64 and first.key_id.isprintable()
        assert first.algorithm in ("HS256", "RS256")

    def test_neither_key_nor_description_shows_the_secret(
        self, source: KeySource, secret: bytes
    ) -> None:
        key = source.load()
        shown = " ".join((repr(key), str(key), source.describe(), key.key_id))
        assert "\n" not in source.describe()
        for form in _forms(secret):
            assert form not in shown

    def test_a_source_that_cannot_load_says_why_in_one_line(
        self, broken_source: KeySource, secret: bytes
    ) -> None:
        with pytest.raises(KeySourceError) as caught:
            broken_source.load()
        message = str(caught.value)
        assert message and "\n" not in message
        for form in _forms(secret):
            assert form not in message


def _forms(secret: bytes) -> list[str]:
    """The ways a key could leak into text: raw, hex, base64 (at least 8 characters)."""
    import base64

    forms = [secret.hex(), base64.b64encode(secret).decode()[:16]]
    if secret.isascii():
        forms.append(secret.decode())
    return [form for form in forms if len(form) >= 8]
