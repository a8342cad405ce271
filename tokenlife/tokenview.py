"""What a node can tell of a token without the key (TokenKind.read's answer).

No imports: every task's TaskProlog builds one.
"""


class TokenView:
    """For whom a token is, and from when until when it is valid (epoch seconds)."""

    __slots__ = ("exp", "iat", "subject")

    def __init__(self, subject: str, exp: int, iat: int) -> None:
        self.subject, self.exp, self.iat = subject, exp, iat

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenView):
            return NotImplemented
        return (self.subject, self.exp, self.iat) == (other.subject, other.exp, other.iat)

    def __hash__(self) -> int:
        return hash((self.subject, self.exp, self.iat))

    def __repr__(self) -> str:
        return f"TokenView(subject={self.subject!r}, exp={self.exp}, iat={self.iat})"
