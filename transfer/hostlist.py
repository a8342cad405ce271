"""Slurm hostlist expressions: ``node[01-04,07],gpu[1-2]-ib`` to names."""

from __future__ import annotations

import re

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
MAX_HOSTS = 100_000  # a typo such as node[1-999999999] must not eat the memory


def expand(expression: str) -> list[str]:
    """Every host name in ``expression``, in order; ValueError if malformed."""
    hosts: list[str] = []
    for part in _split_top(expression.strip()):
        hosts.extend(_expand_one(part))
        if len(hosts) > MAX_HOSTS:
            raise ValueError(f"hostlist {expression!r} names more than {MAX_HOSTS} hosts")
    return hosts


def _split_top(text: str) -> list[str]:
    """Split at commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in hostlist {text!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    parts.append(text[start:])
    if any(not p for p in parts):
        raise ValueError(f"empty host name in hostlist {text!r}")
    return parts


def _expand_one(part: str) -> list[str]:
    open_at = part.find("[")
    if open_at < 0:
        return [part]
    close_at = part.index("]", open_at)
    prefix, body, rest = part[:open_at], part[open_at + 1 : close_at], part[close_at + 1 :]
    tails = _expand_one(rest) if rest else [""]  # several bracket groups: a product
    names: list[str] = []
    for item in body.split(","):
        match = _RANGE.match(item)
        if not match:
            raise ValueError(f"bad range {item!r} in hostlist {part!r}")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in hostlist {part!r}")
        if int(high) - int(low) >= MAX_HOSTS:
            raise ValueError(f"range {item!r} names more than {MAX_HOSTS} hosts")
        width = len(low) if low.startswith("0") else 0  # node[01-10] keeps the padding
        for number in range(int(low), int(high) + 1):
            names.extend(f"{prefix}{number:0{width}d}{tail}" for tail in tails)
    return names
