"""Slurm hostlist expansion."""

from __future__ import annotations

import pytest

from transfer.hostlist import expand


@pytest.mark.parametrize(
    ("expression", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-03]", ["node01", "node02", "node03"]),
        ("node[01-02,07],login1", ["node01", "node02", "node07", "login1"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("a[1],b", ["a1", "b"]),
        ("  node1 ", ["node1"]),
    ],
)
def test_expand(expression: str, hosts: list[str]) -> None:
    assert expand(expression) == hosts


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("node[01-03", "unbalanced '\\['"),
        ("node01-03]", "unbalanced '\\]'"),
        ("node[3-1]", "descending range"),
        ("node[a-b]", "bad range"),
        ("node[[1]]", "nested brackets"),
        ("a,,b", "empty host name"),
        ("n[1-99999999]", "more than 100000 hosts"),
    ],
)
def test_malformed(expression: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        expand(expression)
