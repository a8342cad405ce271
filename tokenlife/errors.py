"""The one error tree of tokenlife.

Every error a user can cause or meet is a TokenlifeError with a one-line
message and the exit status its command ends with.  The CLI prints
``tokenlife-<cmd>: <message>`` and exits with ``exit_code``; nothing else
reaches the user unless --debug is given.  Messages never contain a token or
a key: they name files, users and keys of the configuration instead.
"""

from __future__ import annotations


class TokenlifeError(Exception):
    """Base of every expected failure; ``exit_code`` is the process status."""

    exit_code = 1


class UsageError(TokenlifeError):
    """Bad command-line usage (argparse's own errors use the same status)."""

    exit_code = 2


class ConfigError(TokenlifeError):
    """Bad configuration: message is ``file: key: reason``."""

    exit_code = 2


class KeySourceError(TokenlifeError):
    """The signing key cannot be loaded (missing, unreadable, too short, AWS down)."""

    exit_code = 3


class InsecureKeyFile(KeySourceError):
    """A key or secret file that others could read, write or own."""


class UserError(TokenlifeError):
    """An invalid user name, or one the user database does not know."""

    exit_code = 4


class PermissionDenied(TokenlifeError):
    """The caller may not do this (mint for another user, mint for root)."""

    exit_code = 5


class StoreError(TokenlifeError):
    """The token store failed (database unreachable, schema too new)."""

    exit_code = 6


class TransportError(TokenlifeError):
    """Delivery to a node failed."""

    exit_code = 7


class RenewalRefused(TokenlifeError):
    """A renewal that would reach past renew-until, or of a revoked token."""

    exit_code = 8


class TokenInvalid(TokenlifeError):
    """A token that is malformed, badly signed, expired or for someone else."""

    exit_code = 9


#: Exit status table, documented in docs/commands.md (EXIT STATUS).
EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        TokenlifeError,
        UsageError,
        ConfigError,
        KeySourceError,
        UserError,
        PermissionDenied,
        StoreError,
        TransportError,
        RenewalRefused,
        TokenInvalid,
    )
}
