"""Durations as written in config and on the command line: 90, 30m, 1h, 2d, 1w.

Read without ``re``: the TaskProlog (tokenlife.engine_settings) and the PAM
fallback import this module on every task and login, where ``re`` alone
costs milliseconds.
"""

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: ASCII digits only: str.isdigit() would read Arabic-Indic "12h" (U+0661 U+0662 h) as 12 h
_DIGITS = frozenset("0123456789")
#: Nothing we keep lives longer than a year; a bigger number is a typo.
MAX_SECONDS = 366 * 86400


def parse_duration(text: str | int) -> int:
    """Return seconds for ``text``; raise ValueError with a short reason."""
    if isinstance(text, bool):
        raise ValueError("expected a duration such as 90, 30m, 1h, 2d or 1w")
    if isinstance(text, int):
        seconds = text
    else:
        word = text.strip()
        unit = word[-1:] if word[-1:] in ("s", "m", "h", "d", "w") else ""
        digits = word[: len(word) - len(unit)]
        if not 0 < len(digits) <= 9 or not set(digits) <= _DIGITS:
            raise ValueError(f"{text!r} is not a duration such as 90, 30m, 1h, 2d or 1w")
        seconds = int(digits) * _UNITS[unit]
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if seconds > MAX_SECONDS:
        raise ValueError("a duration must be at most 366d")
    return seconds


def format_duration(seconds: float) -> str:
    """A short human form: 2d, 1h30m, 45s."""
    seconds = int(seconds)
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts[:2])
