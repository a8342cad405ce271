"""Value converters for the configuration: each returns the value or raises
ValueError with a short reason (tokenlife.config adds the file and the key).

Standard library only: the PAM login path loads this module.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenlife import registry
from tokenlife.durations import parse_duration

USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
#: a node name that is safe in a log line, a path or an SSH target
NODE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})?")


def nonempty(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    if any(ord(c) < 32 for c in value):
        raise ValueError("control characters are not allowed")
    return value


def kid(value: Any) -> str:
    text = nonempty(value)
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,56}", text):
        raise ValueError("expected 1-56 characters from A-Z a-z 0-9 _ . : -")
    return text


def choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(repr(c) for c in choices)}")
        return str(value)

    return convert


def abspath(value: Any) -> Path:
    text = nonempty(value)
    if not text.startswith("/"):
        raise ValueError("expected an absolute path")
    if "/../" in f"{text}/":
        raise ValueError("'..' is not allowed in paths")
    return Path(text)


def integer(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value

    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def duration(value: Any) -> int:
    if not isinstance(value, str | int):
        raise ValueError("expected a duration such as 90, 30m, 1h, 2d or 1w")
    return parse_duration(value)


def duration_at_most(high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        seconds = duration(value)
        if seconds > high:
            raise ValueError(f"expected at most {high} seconds")
        return seconds

    return convert


def fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError("expected a number between 0 and 1 (exclusive)")
    return float(value)


def username(value: Any) -> str:
    text = nonempty(value)
    if not USER_NAME.fullmatch(text):
        raise ValueError(f"{text!r} is not a valid user name")
    return text


def usernames(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of user names")
    return tuple(username(v) for v in value)


def hosts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of node names")
    for host in value:
        if not NODE_NAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a valid node name")
    return tuple(value)


def group_name(value: Any) -> str:
    text = nonempty(value)
    if not USER_NAME.fullmatch(text):
        raise ValueError(f"{text!r} is not a valid group name")
    return text


#: what a service's token file path may hold: safe in a log line, an SFTP request and a shell
_NODE_PATH = re.compile(r"[A-Za-z0-9._/+@%,=~-]{1,1024}")


def node_file(value: Any) -> str:
    """An absolute, normalized path of a file on a node: ``/etc/slurm-web/jwt``."""
    text = nonempty(value)
    if not text.startswith("/"):
        raise ValueError("expected an absolute path")
    parts = text.split("/")[1:]
    if "/../" in f"{text}/":
        raise ValueError("'..' is not allowed in paths")
    if any(part in ("", ".") for part in parts):
        raise ValueError("expected a normalized path (no '//', '/./' or trailing '/')")
    if len(parts) < 2:
        raise ValueError("expected a file in a directory below /, such as /etc/slurm-web/jwt")
    if not _NODE_PATH.fullmatch(text):
        raise ValueError("only letters, digits and / . _ - + @ % , = ~ are allowed")
    return text


def file_mode(value: Any) -> int:
    """A token file's mode, as an octal string: the owner reads, the group at most reads."""
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError('expected an octal mode in quotes, such as "0600" or "0640"')
    mode = int(value, 8)
    if mode & 0o007:
        raise ValueError(f"{value}: others must have no access (no o+rwx bits)")
    if mode & 0o131:
        raise ValueError(f"{value}: no execute bits, and the group may only read (0640)")
    if not mode & 0o400:
        raise ValueError(f"{value}: the owner must be able to read the file")
    return mode


def http_url(value: Any) -> str:
    text = nonempty(value)
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", text):
        raise ValueError("expected an http:// or https:// URL")
    return text


def store_url(value: Any) -> str:
    text = nonempty(value)
    scheme = store_scheme(text)
    if scheme == "sqlite":
        match = re.fullmatch(r"sqlite(\+\w+)?:///(.+)", text)
        if match is None:
            raise ValueError("expected sqlite:///PATH or postgresql+psycopg://...")
        if match[2] != ":memory:" and not match[2].startswith("/"):
            raise ValueError("the SQLite path must be absolute: sqlite:////var/lib/tokenlife/...")
    elif scheme == "postgresql":
        if not re.match(r"postgresql(\+\w+)?://", text):
            raise ValueError("expected sqlite:///PATH or postgresql+psycopg://...")
    elif not registry.known(registry.STORES, scheme):
        raise ValueError("expected sqlite:///PATH or postgresql+psycopg://...")
    return text


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL; None for other stores and ``:memory:``."""
    match = re.fullmatch(r"sqlite(\+\w+)?:///(.+)", url)
    if match is None or match[2] == ":memory:":
        return None
    return Path(match[2])


def store_scheme(url: str) -> str:
    """The store backend a URL names: ``postgresql+psycopg://`` is ``postgresql``."""
    return url.partition(":")[0].partition("+")[0]


def backend(group: str) -> Callable[[Any], str]:
    """A backend name of a registry group (built-in or an installed plugin)."""

    def convert(value: Any) -> str:
        if not isinstance(value, str) or not registry.known(group, value):
            known = ", ".join(repr(name) for name in registry.names(group))
            raise ValueError(f"expected one of {known}")
        return value

    return convert


def backends(group: str) -> Callable[[Any], tuple[str, ...]]:
    one = backend(group)

    def convert(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ValueError("expected a list of names")
        return tuple(dict.fromkeys(one(v) for v in value))

    return convert


def optional_path(value: Any) -> str:
    """An absolute path, or "" for "the default" (kept as a string)."""
    if value == "":
        return ""
    return str(abspath(value))


def seconds(high: float) -> Callable[[Any], float]:
    """A positive time in seconds, up to ``high``: a number (``0.5``) or a duration (``"5s"``)."""

    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError("expected seconds (a number such as 5 or 0.5) or a duration")
        number = float(parse_duration(value)) if isinstance(value, str) else float(value)
        if not 0 < number <= high:
            raise ValueError(f"expected more than 0 and at most {high:g} seconds")
        return number

    return convert


def host_port(value: Any) -> str:
    """``HOST:PORT`` to listen on (an address, ``[V6]``, or a name), or "" (off)."""
    if value == "":
        return ""
    text = nonempty(value)
    host, sep, port = text.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ok = bool(sep) and port.isascii() and port.isdigit() and 0 < int(port) < 65536
        if bare != host:
            ok = ok and ipaddress.ip_address(bare).version == 6
        else:
            ok = ok and bool(NODE_NAME.fullmatch(host))
    except ValueError:
        ok = False
    if not ok:
        raise ValueError('expected HOST:PORT such as "0.0.0.0:6821" or "[::]:6821", or ""')
    return text


def listen(value: Any) -> str:
    if value == "":
        return ""
    text = nonempty(value)
    host, sep, port = text.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        ok = bool(sep) and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise ValueError('expected ADDRESS:PORT such as "127.0.0.1:9464", or ""')
    return text
