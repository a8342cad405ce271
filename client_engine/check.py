"""``tokenlife-engine check [--time-limit T]``: will the caller's token last T?

For submit time (the cli_filter in systemd/slurm/cli_filter.lua runs it for
``sbatch`` and ``salloc``) and for anyone who wants to know.  The token is
the one ``tokenlife-engine token`` would hand out; its renewable life is the
``renew_until`` that tokenlife writes into every token it mints (a token
without it, minted elsewhere, counts until its ``exp``).

T is a Slurm time limit, as ``sbatch --time`` takes it: ``MM``, ``MM:SS``,
``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``, or ``UNLIMITED``.
"""

from __future__ import annotations

import time

from client_engine.tokens import Token

#: exit status when the token is valid now but its renewable life ends first
WILL_NOT_LAST = 3
UNLIMITED = ("UNLIMITED", "INFINITE", "-1")


class BadTimeLimit(ValueError):
    """Not a Slurm time limit."""


def parse_time_limit(text: str) -> int | None:
    """Seconds in a Slurm time limit; None for an unlimited one."""
    value = text.strip()
    if value.upper() in UNLIMITED:
        return None
    days = 0
    rest = value
    if "-" in value:
        head, _, rest = value.partition("-")
        days = _number(head, text)
        fields = [_number(f, text) for f in rest.split(":")]
        if len(fields) > 3:
            raise BadTimeLimit(f"{text!r} is not a Slurm time limit")
        hours, minutes, seconds = [*fields, 0, 0][:3]
    else:
        fields = [_number(f, text) for f in rest.split(":")]
        if len(fields) == 1:
            hours, minutes, seconds = 0, fields[0], 0
        elif len(fields) == 2:
            hours, (minutes, seconds) = 0, fields
        elif len(fields) == 3:
            hours, minutes, seconds = fields
        else:
            raise BadTimeLimit(f"{text!r} is not a Slurm time limit")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _number(field: str, text: str) -> int:
    if not (field.isascii() and field.isdigit()) or len(field) > 9:
        raise BadTimeLimit(f"{text!r} is not a Slurm time limit (MM, HH:MM:SS, D-HH:MM, ...)")
    return int(field)


def span(seconds: float) -> str:
    """``3d 4h``, ``2h 5m``, ``40s``: a short, human duration."""
    left = int(max(0, seconds))
    days, left = divmod(left, 86400)
    hours, left = divmod(left, 3600)
    minutes, secs = divmod(left, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n][:2]
    return " ".join(shown) or "0s"


def when(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


def verdict(token: Token, limit: int | None, now: float) -> tuple[int, str]:
    """(exit status, one line) for ``token`` and a time limit of ``limit`` seconds."""
    end = token.renew_until if token.renew_until is not None else token.exp
    known = token.renew_until is not None
    life = (
        f"renewable until {when(end)}, {span(end - now)} from now"
        if known
        else f"expires {when(end)}, {span(end - now)} from now; it does not say its renew-until"
    )
    if limit is None:
        return (
            WILL_NOT_LAST,
            f"token for {token.sun} will not last an unlimited time: {life}; "
            "log in again before then to start a new one",
        )
    if now + limit > end:
        return (
            WILL_NOT_LAST,
            f"token for {token.sun} will not last {span(limit)}: {life}; "
            "log in again before then to start a new one",
        )
    return 0, f"token for {token.sun} valid until {when(token.exp)}, {life}"


def parse_args(args: list[str]) -> tuple[int | None, bool]:
    """(the time limit in seconds, None if unlimited; quiet) from ``check ARGS``."""
    limit: int | None = 0
    quiet = False
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        flag, eq, value = arg.partition("=")
        if flag in ("-t", "--time-limit"):
            if not eq:
                if not rest:
                    raise BadTimeLimit(f"{flag} needs a value")
                value = rest.pop(0)
            limit = parse_time_limit(value)
        elif arg in ("-q", "--quiet"):
            quiet = True
        else:
            raise BadTimeLimit(f"check: unexpected argument {arg[:40]!r}")
    return limit, quiet
