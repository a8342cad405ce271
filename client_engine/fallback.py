"""The pull fallback: when the delivered file cannot serve, ask the token host.

``token``, ``exec``, ``check``, ``env`` (the TaskProlog) and ``run`` use the
delivered file while it is valid and outside its mandatory window (``run``:
its advisory window); otherwise, when ``engine.pull`` names the service, they
pull through client_engine.pull.fetch_into, which keeps the token in the
user's directory (0600, atomic, never an older token over a newer one) and
makes all the tasks of a user on a node share one pull.  docs/pull.md, "On
the node", says it for administrators.

Cheap to import: the TaskProlog imports it before every task, so
client_engine.pull (ctypes, sockets) is loaded only when a pull is due.
"""

from __future__ import annotations

from client_engine.tokens import Refused, Token, delivered_path, load
from tokenlife.engine_settings import EngineSettings

#: the windows never take more than these shares of a token's lifetime
#: (a 10-minute token must not live its whole life "in the window")
ADVISORY_SHARE = 0.5
MANDATORY_SHARE = 0.2


def windows(token: Token, settings: EngineSettings) -> tuple[float, float]:
    """When the advisory and the mandatory windows start, for this token."""
    advisory, mandatory = float(settings.advisory_window), float(settings.mandatory_window)
    if 0 < token.iat < token.exp:
        lifetime = token.exp - token.iat
        advisory = min(advisory, ADVISORY_SHARE * lifetime)
        mandatory = min(mandatory, MANDATORY_SHARE * lifetime)
    return token.exp - advisory, token.exp - mandatory


def delivered(settings: EngineSettings, uid: int, user: str, now: float) -> Token | None:
    """The valid token of the delivered file, or None."""
    try:
        return load(delivered_path(settings.token_dir, uid), uid, user, now)
    except Refused:
        return None


def due(token: Token | None, settings: EngineSettings, now: float, advisory: bool = False) -> bool:
    """Whether a pull is due: no usable delivered token, or it is in its window."""
    if not settings.pull:
        return False
    if token is None:
        return True
    return now >= windows(token, settings)[0 if advisory else 1]


def server_uid(settings: EngineSettings) -> int | None:
    """The uid the pull service runs as (None: not checked); Refused if unknown here."""
    name = settings.pull_server_user
    if not name:
        return None
    if name.isdigit():
        return int(name)
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise Refused(
            f"engine.pull_server_user: no user {name!r} on this node "
            '(give the service\'s uid, or "" not to check)'
        ) from None


def pull_now(
    settings: EngineSettings,
    uid: int,
    user: str,
    current: Token | None,
    advisory: bool = False,
) -> Refused | None:
    """Pull into the user's directory; why it failed (one line: str() of it), or None.

    ``current`` is the delivered file's token as the caller read it (None:
    missing or unusable).  When another task's pull (or a push) has brought
    a fresh token meanwhile, nothing is pulled.  A failure that left a
    still-valid token in place is reported too: the caller decides whether
    to say it.  Never waits longer than ``engine.pull_timeout``, and never
    raises: a fallback must not cost the task the token it already has.
    """
    from client_engine.pull import fetch_into

    span = float(settings.advisory_window if advisory else settings.mandatory_window)
    if current is not None:
        span = current.exp - windows(current, settings)[0 if advisory else 1]
    try:
        _, failed = fetch_into(
            settings.token_dir,
            uid,
            user,
            settings.pull,
            settings.munge_socket or None,
            settings.pull_timeout,
            min_remaining=span,
            server_uid=server_uid(settings),
        )
    except Refused as exc:  # PullError too
        return exc
    except OSError as exc:  # writing the file: a full or read-only file system
        where = exc.filename or delivered_path(settings.token_dir, uid)
        return Refused(f"{where}: {exc.strerror or type(exc).__name__}")
    except Exception as exc:  # a bug: its type says where; its text might quote anything
        return Refused(f"pull: internal error ({type(exc).__name__})")
    return failed


def refresh(
    settings: EngineSettings, uid: int, user: str, now: float, advisory: bool = False
) -> Refused | None:
    """Pull if the delivered file cannot serve (see :func:`pull_now`); None if
    no pull was due or it worked."""
    current = delivered(settings, uid, user, now)
    if not due(current, settings, now, advisory):
        return None
    return pull_now(settings, uid, user, current, advisory)


def one_line(text: object) -> str:
    """``text`` safe for one TaskProlog or stderr line: a reply may hold anything."""
    return "".join(c if c.isprintable() else "?" for c in str(text))
