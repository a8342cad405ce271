"""What a node can tell of a token without the key (TokenKind.read's answer).

No imports: every task's TaskProlog builds one.
"""


class TokenView:
    """For whom a token is, and from when until when it is valid (epoch seconds).

    ``renew_until`` and ``version`` are what tokenlife writes into its tokens
    (the ``tokenlife`` claim): the end of the token's renewable life and its
    number in the chain.  None for a token without them (minted elsewhere, or
    by a release before they were added).
    """

    __slots__ = ("exp", "iat", "renew_until", "subject", "version")

    def __init__(
        self,
        subject: str,
        exp: int,
        iat: int,
        renew_until: int | None = None,
        version: int | None = None,
    ) -> None:
        self.subject, self.exp, self.iat = subject, exp, iat
        self.renew_until, self.version = renew_until, version

    def _key(self) -> tuple[str, int, int, int | None, int | None]:
        return (self.subject, self.exp, self.iat, self.renew_until, self.version)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenView):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"TokenView(subject={self.subject!r}, exp={self.exp}, iat={self.iat}, "
            f"renew_until={self.renew_until}, version={self.version})"
        )
