"""Slurm hostlist expressions: ``node[01-04,07],gpu[1-2]-ib`` to names.

An expression is counted before it is expanded: several bracket groups in
one name multiply (``n[1-99999][1-99999]`` names 10**10 hosts), so the limits
hold for the whole product, and nothing is built for an expression that
breaks them.  Parsing is iterative (no recursion per bracket group).
"""

from __future__ import annotations

import itertools
import re

#: ASCII digits only (``\d`` would take Arabic-Indic digits too), and not too many
_RANGE = re.compile(r"([0-9]{1,18})(?:-([0-9]{1,18}))?")
MAX_HOSTS = 100_000  # a typo such as node[1-999999999] must not eat the memory
#: characters of all the names together (long names: a huge prefix times a range)
MAX_CHARS = MAX_HOSTS * 256
#: how much of a bad expression an error message shows
_SHOWN = 60

#: one bracket group: its numbers, as (low, high, zero-padded width)
_Group = list[tuple[int, int, int]]


def expand(expression: str) -> list[str]:
    """Every host name in ``expression``, in order; ValueError (one short line) if
    malformed or naming more than MAX_HOSTS hosts."""
    text = expression.strip()
    parsed = [_parse(part) for part in _split_top(text)]
    hosts = chars = 0
    for literals, groups in parsed:
        count, longest = 1, sum(len(literal) for literal in literals)
        for group in groups:
            count *= sum(high - low + 1 for low, high, _ in group)
            if hosts + count > MAX_HOSTS:  # checked as it grows: never a huge number
                raise ValueError(f"hostlist {_show(text)} names more than {MAX_HOSTS} hosts")
            longest += max(max(width, len(str(high))) for _, high, width in group)
        hosts += count
        chars += count * longest
        if chars > MAX_CHARS:
            raise ValueError(f"hostlist {_show(text)} expands to more than {MAX_CHARS} characters")
    names: list[str] = []
    for literals, groups in parsed:
        choices = [_numbers(group) for group in groups]
        for numbers in itertools.product(*choices):
            pieces = [literals[0]]
            for number, literal in zip(numbers, literals[1:], strict=True):
                pieces += (number, literal)
            names.append("".join(pieces))
    return names


def _numbers(group: _Group) -> list[str]:
    return [f"{n:0{width}d}" for low, high, width in group for n in range(low, high + 1)]


def _show(text: str) -> str:
    """``text`` for an error message: quoted, and cut short if long."""
    return repr(text) if len(text) <= _SHOWN else repr(text[:_SHOWN]) + f"... ({len(text)} chars)"


def _split_top(text: str) -> list[str]:
    """Split at commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in hostlist {_show(text)}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {_show(text)}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in hostlist {_show(text)}")
    parts.append(text[start:])
    if any(not p for p in parts):
        raise ValueError(f"empty host name in hostlist {_show(text)}")
    return parts


def _parse(part: str) -> tuple[list[str], list[_Group]]:
    """``a[1-2]b[3]c`` -> (["a", "b", "c"], [group 1-2, group 3]): n+1 literals, n groups."""
    literals: list[str] = []
    groups: list[_Group] = []
    position = 0
    while (open_at := part.find("[", position)) >= 0:
        close_at = part.index("]", open_at)  # balanced: _split_top checked
        literals.append(part[position:open_at])
        groups.append([_range(item, part) for item in part[open_at + 1 : close_at].split(",")])
        position = close_at + 1
    literals.append(part[position:])
    return literals, groups


def _range(item: str, part: str) -> tuple[int, int, int]:
    match = _RANGE.fullmatch(item)
    if not match:
        raise ValueError(f"bad range {_show(item)} in hostlist {_show(part)}")
    low, high = match.group(1), match.group(2) or match.group(1)
    if int(high) < int(low):
        raise ValueError(f"descending range {_show(item)} in hostlist {_show(part)}")
    if int(high) - int(low) >= MAX_HOSTS:
        raise ValueError(f"range {_show(item)} names more than {MAX_HOSTS} hosts")
    width = len(low) if low.startswith("0") else 0  # node[01-10] keeps the padding
    return int(low), int(high), width
