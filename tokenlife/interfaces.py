"""One small Protocol per external system; backends live in the parts."""

from __future__ import annotations

from typing import Protocol

from tokenlife.model import TokenRecord


class SigningKey(Protocol):
    """A loaded key that signs claims into a compact JWT.  Never printable."""

    algorithm: str
    key_id: str  # a fingerprint, safe to log

    def sign(self, claims: dict[str, object]) -> str: ...


class KeySource(Protocol):
    def load(self) -> SigningKey:
        """Load the current signing key; raise KeySourceError with the reason."""
        ...

    def describe(self) -> str:
        """One line for `config check`: where the key comes from."""
        ...


class TokenStore(Protocol):
    def current(self, user: str) -> TokenRecord | None:
        """The user's newest active token record, if any."""
        ...

    def save(self, record: TokenRecord, event: str, actor: str, reason: str = "") -> None:
        """Store ``record`` as the user's current token and audit ``event``."""
        ...

    def records(self, user: str | None = None) -> list[TokenRecord]: ...
