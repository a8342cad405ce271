"""``tokenlife pam``: the pam_exec entry point, in the session stack.

Runs inside every login, so it is built for speed: it asks the mint service
over its Unix socket (one round trip, no heavy imports).  When no service
answers, it first checks whether the user's token is still good and in
place (tokenlife.app.pamlite, builtin modules only: the common login) and
only otherwise loads the config and mints itself, leaving a record in the
spool for the repository.  It never prints the token and never fails a
login unless ``pam.required`` is true (and the PAM line is ``required``).
Messages go to syslog (authpriv) and stderr, one line each.
"""

import os
import sys

# Not json, re or typing (nor __future__): together they cost more than the
# rest of a login (docs/producer.md, "Login cost").
DEFAULT_SOCKET = "/run/tokenlife/mint.sock"
#: how long a login waits for the mint service before minting itself
SERVICE_TIMEOUT = 5.0
#: refusals that say the service is in trouble, not the login: PAM mints itself
_SERVICE_TROUBLE = (
    "mint service busy",
    "internal error",
    "too many connections",
    "token store failed",  # the database is down: the spool takes the record
    "cannot open the token store",
)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

USAGE = "usage: tokenlife [-c CONFIG] [-v] [--debug] pam [--socket PATH] [--no-service]"


def _say(message: str) -> None:
    import syslog

    syslog.openlog("tokenlife-pam", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_WARNING, message)
    print(f"tokenlife-pam: {message}", file=sys.stderr)


def main(argv: list[str]) -> int:
    """``argv`` is the whole command line after the program name."""
    config_path, socket_path, ask = None, DEFAULT_SOCKET, True
    args = list(argv)
    while args:
        arg = args.pop(0)
        flag, eq, value = arg.partition("=")
        if flag in ("-c", "--config", "--socket"):
            if not eq:
                if not args:
                    _say(f"{flag} needs a value; {USAGE}")
                    return 0  # a bad PAM line must not lock everyone out
                value = args.pop(0)
            if flag == "--socket":
                socket_path = value
            else:
                config_path = value
        elif arg == "--no-service":
            ask = False  # pam_tokenlife.so asked already: it runs this when nobody answered
        elif arg in ("-h", "--help"):
            print(USAGE)
            return 0
        elif arg not in ("pam", "-v", "-vv", "--verbose", "--debug"):
            _say(f"ignoring unexpected argument {arg!r}; {USAGE}")
    if os.environ.get("PAM_TYPE") != "open_session":
        return 0  # close_session and the other stacks: nothing to do
    user = os.environ.get("PAM_USER", "")
    if ask and user and set(user) <= _NAME_CHARS and len(user) <= 32:
        answer = _ask_service(socket_path, user)
        if answer is not None:
            status, required, message = answer
            if status == "OK":
                return 0
            if not message.startswith(_SERVICE_TROUBLE):
                _say(f"{user}: {message}")
                return 1 if required else 0
            # The service is busy or broke: not this login's fault; mint here.
            _say(f"{user}: mint service: {message}; minting here")
    # No service, or a name the service would refuse: the full path decides.
    return _fallback(user, config_path)


def _ask_service(socket_path: str, user: str) -> tuple[str, bool, str] | None:
    """One round trip in the service's line reply mode; None if no answer came.

    Reply: ``OK`` or ``ERR <required 0|1> <message>``.  ``user`` holds only
    name characters, so the hand-made JSON request needs no escaping.
    """
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(SERVICE_TIMEOUT)
        try:
            sock.connect(socket_path)
        except OSError:
            return None  # no service runs here: the fallback mints, quietly
        sock.sendall(b'{"op":"pam","reply":"line","user":"%s"}\n' % user.encode())
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    except OSError as exc:
        # Nobody listens, or the service is wedged or overloaded: this login
        # must not go without a token for that, so the fallback mints.
        _say(f"{user}: mint service at {socket_path} did not answer ({exc}); minting here")
        return None
    finally:
        sock.close()
    if not chunks:
        return None  # the service closed without a word: the fallback decides
    status, _, rest = b"".join(chunks).decode(errors="replace").strip().partition(" ")
    required, _, message = rest.partition(" ")
    return status, required == "1", message


def _fallback(user: str, config_path: str | None) -> int:
    try:
        from tokenlife.app.pamlite import in_place
    except ImportError:  # an interpreter without the builtin modules it uses
        pass
    else:
        if in_place(user, config_path):
            return 0  # the full path would change nothing: spare the login its imports
    from pathlib import Path

    from tokenlife.config import load
    from tokenlife.errors import TokenlifeError

    required = False
    try:
        config = load(Path(config_path) if config_path else None)
        required = config.pam.required
        _mint_here(user, config)
    except TokenlifeError as exc:
        _say(f"{user}: {exc}")
        return 1 if required else 0
    except Exception as exc:  # a login must not die on a bug unless asked to
        _say(f"{user}: unexpected error: {type(exc).__name__}: {exc}")
        return 1 if required else 0
    return 0


def _mint_here(user: str, config: object) -> None:
    from tokenlife.app.site import Site
    from tokenlife.config import Config
    from tokenlife.users import lookup

    assert isinstance(config, Config)
    if lookup(user).uid < config.pam.min_uid:
        return
    # pam_exec with seteuid: the effective uid is root even under su or sudo
    Site.for_login(config).minter.mint(user, os.geteuid(), reuse=True, actor="pam")
