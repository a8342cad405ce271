"""Reading delivered tokens on a worker node, as the job's user.

Standard library only, and cheap to import: every task of every job runs
``tokenlife-engine env`` through this module.  The signature is not verified
here (the node has no key, and Slurm checks it anyway); what is checked is
what decides whether handing the token out makes sense: the file is a regular
file owned by the user and private to them (like ssh with its keys), the
payload names this user, and ``exp`` is still ahead.

The token kind (tokenlife.slurm_jwt) reads the payload with the standard
library: PyJWT and ``cryptography`` would cost more than the whole TaskProlog
budget, to verify a signature the node cannot check.
"""

from __future__ import annotations

import os
import stat

from tokenlife.layout import FILE_NAME
from tokenlife.slurm_jwt import SlurmJwt

#: the kind of token delivered to nodes (the only kind so far)
KIND = SlurmJwt()

#: per-job copies kept by ``tokenlife-engine run``: job.<jobid>.<pid>
JOB_COPY_PREFIX = "job."
#: a token is a few hundred bytes; anything much bigger is not one
MAX_SIZE = 16384


class Refused(Exception):
    """This token cannot be handed out; the message says why in one line."""


class Token:
    """A token read from ``source`` (a path, or ``SLURM_JWT``)."""

    __slots__ = ("exp", "iat", "renew_until", "source", "sun", "value", "version")

    def __init__(
        self,
        value: str,
        sun: str,
        exp: int,
        iat: int,
        source: str,
        renew_until: int | None = None,
        version: int | None = None,
    ) -> None:
        self.value, self.sun, self.exp, self.iat, self.source = value, sun, exp, iat, source
        #: the end of the token's renewable life and its number in the chain,
        #: when the token says (tokenlife's claim); None otherwise
        self.renew_until, self.version = renew_until, version

    def __repr__(self) -> str:  # never the token itself
        return f"Token(sun={self.sun!r}, exp={self.exp}, source={self.source!r})"

    def valid_at(self, now: float) -> bool:
        # Slurm refuses exp < now, with no leeway: exp == now still works.
        return now <= self.exp


def user_dir(token_dir: str, uid: int) -> str:
    return f"{token_dir.rstrip('/')}/{uid}"


def delivered_path(token_dir: str, uid: int) -> str:
    return f"{user_dir(token_dir, uid)}/{FILE_NAME}"


def parse(value: str, source: str) -> Token:
    """The claims that matter, from the token text (the kind reads it); Refused if unreadable."""
    try:
        view = KIND.read(value)
    except (ValueError, RecursionError) as exc:  # the kind refuses deep nesting: belt and braces
        raise Refused(f"{source}: {exc}") from None
    return Token(value, view.subject, view.exp, view.iat, source, view.renew_until, view.version)


def read_file(path: str, uid: int) -> str:
    """The token text in ``path``: a private regular file owned by ``uid``, never a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Refused(f"{path}: no token delivered to this node") from None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the last component is a symlink
            raise Refused(f"{path}: is a symlink, refused") from None
        raise Refused(f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{path}: not a regular file, refused")
        if st.st_uid != uid:
            raise Refused(f"{path}: owned by uid {st.st_uid}, not {uid}, refused")
        if st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            raise Refused(f"{path}: mode {mode:04o} lets others in (want 0600), refused")
        data = os.read(fd, MAX_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SIZE:
        raise Refused(f"{path}: too big for a token")
    # Slurm rejects a token with a trailing newline or a leading space.
    return data.strip().decode("ascii", "replace")


def load(path: str, uid: int, user: str, now: float) -> Token:
    """A token from ``path`` that ``user`` may use right now, or Refused."""
    return check(parse(read_file(path, uid), path), user, now)


def check(token: Token, user: str, now: float) -> Token:
    if token.sun != user:
        raise Refused(f"{token.source}: token is for another user ({token.sun}), refused")
    if not token.valid_at(now):
        raise Refused(f"{token.source}: token expired {int(now - token.exp)}s ago")
    return token


def freshest(
    paths: list[str], env_token: str | None, uid: int, user: str, now: float
) -> tuple[Token | None, list[str]]:
    """The valid token that lives longest, among files and an inherited SLURM_JWT.

    Returns it (or None) and why each other candidate was refused.
    """
    best: Token | None = None
    reasons: list[str] = []
    seen: set[str] = set()
    candidates: list[tuple[str, str | None]] = [(p, None) for p in paths]
    if env_token:
        candidates.append(("SLURM_JWT", env_token.strip()))
    for source, text in candidates:
        if source in seen:
            continue
        seen.add(source)
        try:
            token = check(parse(text, source), user, now) if text else load(source, uid, user, now)
        except Refused as exc:
            reasons.append(str(exc))
            continue
        except Exception as exc:  # one unreadable candidate must never hide a good one
            reasons.append(f"{source}: unreadable ({type(exc).__name__})")
            continue
        if best is None or (token.exp, token.iat) > (best.exp, best.iat):
            best = token
    return best, reasons
