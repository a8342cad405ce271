"""Fakes for the seams, for unit tests of tokenlife and of its plugins."""

from __future__ import annotations

import secrets

from producer.keys import HS256Key
from tokenlife.errors import KeySourceError, TokenlifeError
from tokenlife.interfaces import Needs


class FakeClock:
    """A clock tests move by hand; sleep advances it instead of waiting."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds

    def advance(self, seconds: float) -> None:
        self.t += seconds


class StaticKeySource:
    """A KeySource that always loads one HS256 key; ``broken`` makes it fail like a lost file."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.key = HS256Key(secret if secret is not None else secrets.token_bytes(32))
        self.broken = False

    def load(self) -> HS256Key:
        if self.broken:
            raise KeySourceError("key file /k does not exist")
        return self.key

    def describe(self) -> str:
        return "test"


class FakeJobs:
    """A JobSource whose answer a test sets (``current``); ``broken`` fails like squeue."""

    def __init__(self, current: Needs | None = None) -> None:
        self.current: Needs = dict(current or {})
        self.broken = False

    def needs(self) -> Needs:
        if self.broken:
            raise TokenlifeError("squeue failed (exit 1): Unable to contact slurm controller")
        return {user: set(nodes) for user, nodes in self.current.items()}
