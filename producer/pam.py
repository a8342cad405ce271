"""``tokenlife pam``: the pam_exec entry point, in the session stack.

Runs inside every login, so it is built for speed: it asks the mint service
over its Unix socket (one round trip, no heavy imports) and only when no
service answers does it load the config and mint itself, leaving a record
in the spool for the repository.  It never prints the token and never fails
a login unless ``pam.required`` is true (and the PAM line is ``required``).
Messages go to syslog (authpriv) and stderr, one line each.
"""

from __future__ import annotations

import os
import sys

from producer.client import DEFAULT_SOCKET, ask

USAGE = "usage: tokenlife [-c CONFIG] pam [--socket PATH]"


def _say(message: str) -> None:
    import syslog

    syslog.openlog("tokenlife-pam", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_WARNING, message)
    print(f"tokenlife-pam: {message}", file=sys.stderr)


def main(argv: list[str]) -> int:
    """``argv`` is the whole command line after the program name."""
    config_path, socket_path = None, DEFAULT_SOCKET
    args = [a for a in argv if a != "pam"]
    while args:
        flag = args.pop(0)
        if flag in ("-c", "--config", "--socket") and args:
            value = args.pop(0)
            if flag == "--socket":
                socket_path = value
            else:
                config_path = value
        elif flag in ("-h", "--help"):
            print(USAGE)
            return 0
        else:
            _say(f"unexpected argument {flag!r}; {USAGE}")
            return 2
    if os.environ.get("PAM_TYPE") != "open_session":
        return 0  # close_session and the other stacks: nothing to do
    user = os.environ.get("PAM_USER", "")

    answer = ask(socket_path, {"op": "pam", "user": user})
    if answer is not None:
        if answer.get("ok"):
            return 0
        _say(f"{user}: {answer.get('error', 'refused')}")
        return 1 if answer.get("required") else 0
    return _fallback(user, config_path)


def _fallback(user: str, config_path: str | None) -> int:
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
    from producer.keys import make_key_source
    from producer.mint import Minter
    from producer.spool import SpoolStore
    from tokenlife.config import Config
    from tokenlife.users import lookup

    assert isinstance(config, Config)
    if lookup(user).uid < config.pam.min_uid:
        return
    minter = Minter(
        config,
        make_key_source(config.key, prefer_cache=True),
        SpoolStore(config.store.spool_dir),
        login_dir=config.login.token_dir,
    )
    minter.mint(user, os.getuid(), reuse=True, actor="pam")
