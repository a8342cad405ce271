"""Every command's --help works, as an administrator would first try it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli, tokenlife_bin


def commands() -> list[str]:
    text = run_cli("--help").stdout
    found = re.findall(r"^ {4}([a-z][a-z-]*)(?:\s|$)", text, re.MULTILINE)
    return sorted(set(found))


def test_the_command_list_is_complete() -> None:
    assert set(commands()) >= {
        "mint", "pam", "renew", "list", "revoke", "push", "serve", "rotate-key",
        "purge", "config", "status", "jwks", "demo",
    }  # fmt: skip


@pytest.mark.parametrize(
    "argv", [[c] for c in commands()] + [["config", "check"], ["config", "sample"]]
)
def test_help_of_every_command(argv: list[str]) -> None:
    result = run_cli(*argv, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tokenlife") and result.stderr == ""


def test_engine_help() -> None:
    engine = Path(tokenlife_bin()).with_name("tokenlife-engine")
    result = subprocess.run([engine, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("usage: tokenlife-engine")
    for command in ("env", "token", "exec", "run"):
        assert f"tokenlife-engine {command}" in result.stdout
