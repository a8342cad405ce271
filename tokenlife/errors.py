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


class UserDbError(UserError):
    """The user database failed (NSS, LDAP, sssd; out of file descriptors): it
    did not say the user is unknown, so nothing may be removed on its word."""


class PermissionDenied(TokenlifeError):
    """The caller may not do this (mint for another user, mint for root)."""

    exit_code = 5


class StoreError(TokenlifeError):
    """The token store failed (database unreachable, schema too new)."""

    exit_code = 6


class TransportError(TokenlifeError):
    """Delivery to a node failed."""

    exit_code = 7


class TokenInvalid(TokenlifeError):
    """A token that is malformed, badly signed, expired or for someone else."""

    exit_code = 9


#: The exit status table: (status, its errors, meaning).  docs/commands.md's
#: "Exit status" and ``tokenlife --help`` show exactly this (tests/unit/test_cli_errors.py).
EXIT_STATUS: tuple[tuple[int, tuple[type[TokenlifeError], ...], str], ...] = (
    (0, (), "success"),
    (1, (TokenlifeError,), "an operation failed"),
    (2, (UsageError, ConfigError), "bad command line or configuration"),
    (3, (KeySourceError, InsecureKeyFile), "the signing key cannot be loaded or is unsafe"),
    (4, (UserError, UserDbError), "invalid or unknown user name, or the user database failed"),
    (5, (PermissionDenied,), "not allowed (minting for others, privileged users)"),
    (6, (StoreError,), "the token store failed"),
    (7, (TransportError,), "delivery failed"),
    (9, (TokenInvalid,), "malformed, badly signed, expired or foreign token"),
    (130, (), "interrupted"),
)


def exit_status_line() -> str:
    """The table in one line, for --help: ``0 success, 1 an operation failed, ...``."""
    short = {2: "usage/config", 3: "key", 4: "user", 5: "permission", 6: "store"}
    short |= {7: "transport", 9: "token invalid", 1: "failed", 0: "ok", 130: "interrupted"}
    return ", ".join(f"{status} {short[status]}" for status, _, _ in EXIT_STATUS)
