"""The shipped sample config, the reference in docs/configuration.md and the
code name the same keys, and the sample holds exactly the defaults."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tokenlife import config as configmod
from tokenlife import engine_settings

SAMPLE = REPO / "tokenlife" / "data" / "tokenlife.toml"
DOCS = REPO / "docs" / "configuration.md"
SUBTABLES = {"ssh", "static"}  # DeliveryConfig fields that are TOML tables


def code_keys() -> set[str]:
    """section.key for every key the loader knows, from its dataclasses."""
    keys: set[str] = set()
    for section in dataclasses.fields(configmod.Config):
        if section.name == "path":
            continue
        if section.name == "engine":
            keys |= {f"engine.{k}" for k in engine_settings.KEYS}
            continue
        if section.name == "services":  # [[service]] entries: an array of tables
            keys |= {f"service.{f.name}" for f in dataclasses.fields(configmod.ServiceConfig)}
            continue
        default = getattr(configmod.Config(), section.name)
        for item in dataclasses.fields(default):
            if item.name == "options":
                continue  # a plugin backend's own table, not a key of ours
            if item.name == "ssh":
                keys |= {f"delivery.ssh.{f.name}" for f in dataclasses.fields(default.ssh)}
            elif item.name == "static":
                keys.add("delivery.static.USER")
            else:
                keys.add(f"{section.name}.{item.name}")
    return keys


def sample_keys() -> set[str]:
    """Keys set or shown commented out in the sample, as section.key."""
    keys: set[str] = set()
    section = ""
    for line in SAMPLE.read_text().splitlines():
        if header := re.match(r"\[([a-z.]+)\]|# \[\[([a-z]+)\]\]", line):
            section = header[1] or header[2]
        elif item := re.match(r"#? ?([a-z_]+) = ", line):
            name = "USER" if section == "delivery.static" else item[1]
            keys.add(f"{section}.{name}")
    return keys


def doc_keys() -> set[str]:
    """Keys in the reference's tables; a bare key belongs to its heading's first table."""
    keys: set[str] = set()
    section = ""
    for line in DOCS.read_text().splitlines():
        if header := re.match(r"## `\[\[?([a-z.]+)\]\]?`", line):
            section = header[1]
        elif row := re.match(r"\| `([a-zA-Z_.]+)` \|", line):
            name = row[1]
            keys.add(name if "." in name else f"{section}.{name}")
    return keys


def test_sample_is_valid_and_holds_the_defaults() -> None:
    loaded = configmod.load(SAMPLE)
    assert replace(loaded, path=None) == configmod.Config()


def test_code_sample_and_docs_name_the_same_keys() -> None:
    code = code_keys()
    assert len(code) > 40  # the walk found the sections
    assert sample_keys() == code, "sample vs code"
    assert doc_keys() == code, "docs/configuration.md vs code"


def test_every_key_really_loads(tmp_path: Path) -> None:
    # The dataclass walk must not invent keys: each one, set alone, is accepted.
    data = tomllib.loads(SAMPLE.read_text())
    for dotted in code_keys() - {"delivery.static.USER"}:
        *sections, key = dotted.split(".")
        if sections[0] not in data:
            continue  # [[service]]: commented out in the sample (test_service_config.py)
        table = data
        for name in sections:
            table = table[name]
        if key not in table:
            continue  # commented out in the sample: an optional key without default
        one = tmp_path / "one.toml"
        value = table[key]
        rendered = str(value).lower() if isinstance(value, bool) else repr(value)
        rendered = rendered.replace("'", '"')
        one.write_text(f"[{'.'.join(sections)}]\n{key} = {rendered}\n")
        configmod.load(one)


@pytest.mark.parametrize("text", ["[engine]\nbogus = 1\n", "[serve]\nbogus = 1\n"])
def test_an_unknown_key_is_refused(tmp_path: Path, text: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(configmod.ConfigError, match="bogus: unknown key"):
        configmod.load(bad)


def test_config_sample_command_prints_the_installed_sample() -> None:
    result = run_cli("config", "sample")
    assert result.returncode == 0, result.stderr
    assert result.stdout == SAMPLE.read_text()
