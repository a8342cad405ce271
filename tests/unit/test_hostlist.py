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


def test_product_of_bracket_groups_is_counted_before_expanding() -> None:
    """n[1-99999][1-99999] names 10**10 hosts: refused at once, not a MemoryError."""
    with pytest.raises(ValueError, match="names more than 100000 hosts"):
        expand("n[1-99999][1-99999]")
    with pytest.raises(ValueError, match="names more than 100000 hosts"):
        expand("n[1-2]" * 20000)
    with pytest.raises(ValueError, match="names more than 100000 hosts"):
        expand("a[1-60000],b[1-200][1-201]")  # the total over the parts too
    assert len(expand("n[1-400][1-250]")) == 100_000  # exactly the limit is fine


def test_long_names_are_counted_too() -> None:
    with pytest.raises(ValueError, match="expands to more than"):
        expand("x" * 100_000 + "[1-99999]")


def test_many_bracket_groups_do_not_recurse() -> None:
    assert expand("n" + "[1]" * 40000) == ["n" + "1" * 40000]


@pytest.mark.parametrize(
    "expression", ["n[١-٣]", "n[１]", "n[1-" + "9" * 5000 + "]", "n[" + "1" * 19 + "]"]
)
def test_numbers_are_short_ascii_digits(expression: str) -> None:
    with pytest.raises(ValueError, match="bad range"):
        expand(expression)


def test_messages_stay_short() -> None:
    with pytest.raises(ValueError) as raised:
        expand("x" * 100_000 + "[1-3")
    assert len(str(raised.value)) < 200 and "(100004 chars)" in str(raised.value)


def test_products_keep_slurm_order() -> None:
    assert expand("r[1-2]n[01-02]x,z") == ["r1n01x", "r1n02x", "r2n01x", "r2n02x", "z"]
