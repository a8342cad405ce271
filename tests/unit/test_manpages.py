"""The man pages say what the docs and --help say, and are up to date.

tokenlife/app/manpages.py makes tokenlife(8), tokenlife-engine(1) and
tokenlife.toml(5) from docs/commands.md, docs/configuration.md and the
parser's help.  These tests check the three sources against each other
(every option, command and key, with the same spelling, both ways), that the
committed pages in docs/man/ are what the generator makes now, and that
man, groff and lexgrog read them without a warning.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from client_engine.cli import USAGE
from tests.conftest import REPO, require_tool
from tests.unit.test_config_sample import SAMPLE, code_keys
from tokenlife import config as configmod
from tokenlife.app import manpages
from tokenlife.app.parser import build_parser
from tokenlife.engine_settings import DEFAULT_CONFIG

MAN = REPO / "docs" / "man"
PAGES = ("tokenlife.8", "tokenlife-engine.1", "tokenlife.toml.5")
REGENERATE = ".venv/bin/python -m tokenlife.app.manpages"


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    return manpages.build()


def commands_doc() -> manpages.Section:
    tree = manpages.parse_markdown((REPO / "docs" / "commands.md").read_text())
    (root,) = tree.children
    return root


def leaves() -> dict[str, argparse.ArgumentParser]:
    return {" ".join(path): sub for path, sub in manpages.leaf_parsers(build_parser())}


# -- reading the roff back ------------------------------------------------------------------


def plain(roff: str) -> str:
    """What a reader sees of one roff line (fonts and escapes undone)."""
    text = re.sub(r"\\f[BIRP]", "", roff)
    text = re.sub(r"\\\[u([0-9A-F]{4})\]", lambda m: chr(int(m[1], 16)), text)
    for roff_escape, shown in (("\\-", "-"), ("\\&", ""), ("\\%", ""), ("\\(dq", '"')):
        text = text.replace(roff_escape, shown)
    return text.replace("\\e", "\\")


def split(lines: list[str], macro: str) -> dict[str, list[str]]:
    """Lines grouped under each ``macro`` heading (.SH or .SS), in order."""
    found: dict[str, list[str]] = {"": []}
    current = ""
    for line in lines:
        if line.startswith(f"{macro} "):
            current = plain(line[len(macro) + 1 :]).strip('"')
            found[current] = []
        else:
            found[current].append(line)
    return found


def tags(lines: list[str]) -> list[str]:
    return [plain(lines[i + 1]) for i, line in enumerate(lines) if line == ".TP"]


def man_sections(text: str) -> dict[str, list[str]]:
    return split(text.splitlines(), ".SH")


# -- the committed pages --------------------------------------------------------------------


def test_committed_pages_are_up_to_date(built: dict[str, str]) -> None:
    assert sorted(built) == sorted(PAGES)
    for name, text in built.items():
        path = MAN / name
        assert path.exists() and path.read_text() == text, (
            f"docs/man/{name} is stale: run {REGENERATE}"
        )


def test_the_command_writes_and_checks(tmp_path: Path) -> None:
    assert manpages.main(["--out", str(tmp_path), "--check"]) == 1  # nothing there yet
    assert manpages.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PAGES)
    assert manpages.main(["--out", str(tmp_path), "--check"]) == 0
    page = tmp_path / "tokenlife.8"
    page.write_text(page.read_text().replace("mint", "mind", 1))
    assert manpages.main(["--out", str(tmp_path), "--check"]) == 1


@pytest.mark.parametrize("name", PAGES)
def test_sections_come_in_kstart_order(built: dict[str, str], name: str) -> None:
    found = [s for s in man_sections(built[name]) if s]
    assert found == [s for s in manpages.ORDER if s in found], "out of order"
    wanted = {"NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "ENVIRONMENT", "FILES", "SEE ALSO"}
    assert wanted <= set(found)
    if name != "tokenlife.toml.5":
        assert {"COMMANDS", "EXIT STATUS", "EXAMPLES"} <= set(found)


@pytest.mark.parametrize("name", PAGES)
def test_man_groff_and_lexgrog_read_the_pages_cleanly(name: str) -> None:
    require_tool("groff", "man", "lexgrog")
    page = MAN / name
    groff = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", page], capture_output=True, text=True, check=False
    )
    assert groff.returncode == 0 and groff.stderr == "", groff.stderr
    man = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", page],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "MAN_DISABLE_SECCOMP": "1"},
        check=False,
    )
    assert man.returncode == 0 and man.stderr == "", man.stderr
    assert "SYNOPSIS" in man.stdout
    lexgrog = subprocess.run(["lexgrog", page], capture_output=True, text=True, check=False)
    program = name.rsplit(".", 1)[0]
    assert lexgrog.returncode == 0 and f'"{program} - ' in lexgrog.stdout, lexgrog.stdout


# -- tokenlife: the parser, the docs and tokenlife(8) ---------------------------------------


def parser_elements(parser: argparse.ArgumentParser) -> set[tuple[str, ...]]:
    """What the parser's usage shows, as (option, METAVAR), (option,) or (ARGUMENT,)."""
    found: set[tuple[str, ...]] = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            found |= {(str(action.metavar),), ("...",)}
        elif not action.option_strings:
            found.add((str(action.metavar or action.dest),))
        elif action.nargs == 0:
            found.add((action.option_strings[0],))
        else:
            found.add((action.option_strings[0], str(action.metavar or action.dest.upper())))
    return found


def doc_elements(line: str) -> list[tuple[str, ...]]:
    """A documented command line's elements: [--opt META] -> ('--opt', 'META'), WORD -> (WORD,)."""
    return [
        tuple(group.split()) if group else (word,)
        for group, word in re.findall(r"\[([^\]]+)\]|(\S+)", line)
    ]


def command_synopses() -> list[object]:
    """(command, documented elements after the command words): the table's and the sections'."""
    root = commands_doc().child("tokenlife")
    found = []
    for name, line, _ in manpages.command_table(root):
        elements = doc_elements(line)[len(name.split()) :]
        found.append(pytest.param(name, elements, id=f"table:{name}"))
    globals_ = parser_elements(build_parser())
    for section in root.children:
        name = section.title.removeprefix("tokenlife ")
        synopsis = manpages.parts(section.blocks).get("SYNOPSIS")
        if synopsis:
            elements = doc_elements(manpages.first_code(synopsis)[0])
            assert elements[0] == ("tokenlife",), section.title
            rest = elements[1:]
            while rest and rest[0] in globals_:  # tokenlife [-c CONFIG] pam ...
                rest = rest[1:]
            words = tuple(name.split())
            assert tuple(e[0] for e in rest[: len(words)]) == words, section.title
            found.append(pytest.param(name, rest[len(words) :], id=f"section:{name}"))
    return found


def test_the_command_table_names_every_command() -> None:
    root = commands_doc().child("tokenlife")
    table = [name for name, _, _ in manpages.command_table(root)]
    assert sorted(table) == sorted(leaves()), "docs/commands.md's table vs the parser"
    sections = [s.title.removeprefix("tokenlife ") for s in root.children]
    assert set(sections) <= set(table), "a ### section for a command that does not exist"


@pytest.mark.parametrize(("command", "documented"), command_synopses())
def test_documented_synopses_match_the_parser(
    command: str, documented: list[tuple[str, ...]]
) -> None:
    assert len(documented) == len(set(documented)), f"{command}: an element twice"
    assert set(documented) == parser_elements(leaves()[command]), (
        f"docs/commands.md's synopsis of {command} vs tokenlife {command} --help"
    )


def test_the_global_synopsis_matches_the_parser() -> None:
    lines = manpages._synopsis_lines(commands_doc().child("tokenlife"))
    documented = {e for line in lines for e in doc_elements(line)} - {("tokenlife",)}
    documented = {(e[0].strip("[]"), *e[1:]) for e in documented}
    assert documented == parser_elements(build_parser())


def test_every_option_has_help() -> None:
    for command, parser in [("", build_parser()), *leaves().items()]:
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"tokenlife {command}: {action.option_strings or action.dest}"


def expected_tag(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest)
    tag = ", ".join(action.option_strings)
    return tag if action.nargs == 0 else f"{tag} {action.metavar or action.dest.upper()}"


def test_the_man_page_lists_every_option_of_every_command(built: dict[str, str]) -> None:
    sections = man_sections(built["tokenlife.8"])
    options = [a for a in build_parser()._actions if a.option_strings]
    assert tags(sections["OPTIONS"]) == [expected_tag(a) for a in options]
    commands = split(sections["COMMANDS"], ".SS")
    assert [c for c in commands if c] == [f"tokenlife {n}" for n, _, _ in command_table()]
    for name, parser in leaves().items():
        wanted = [
            expected_tag(a)
            for a in parser._actions
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
        ]
        got = tags(commands[f"tokenlife {name}"])  # a description's tables come first
        assert got[len(got) - len(wanted) :] == wanted, name
        help_texts = {plain(line) for line in commands[f"tokenlife {name}"]}
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                assert str(action.help) in help_texts, f"{name}: --help's words, verbatim"


def command_table() -> list[tuple[str, str, str]]:
    return manpages.command_table(commands_doc().child("tokenlife"))


def test_every_long_option_the_docs_name_exists() -> None:
    known = {"--help"} | {
        option
        for parser in [build_parser(), *leaves().values()]
        for action in parser._actions
        for option in action.option_strings
    }
    commands = (REPO / "docs" / "commands.md").read_text()
    # tokenlife's part (the engine's names squeue's --me), and the configuration
    texts = {
        "commands.md": commands.split("\n## tokenlife-engine", 1)[0],
        "configuration.md": (REPO / "docs" / "configuration.md").read_text(),
    }
    for doc, text in texts.items():
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
        assert named <= known, f"docs/{doc} names options no parser has: {named - known}"


def test_files_are_the_configured_defaults(built: dict[str, str]) -> None:
    """A path in FILES is a default of the sample config (which holds the code's defaults)."""
    sample = SAMPLE.read_text()
    for name in PAGES:
        files = " ".join(plain(line) for line in man_sections(built[name])["FILES"])
        paths = re.findall(r"(?<![\w>])/[\w./-]+", files)
        assert paths, name
        for path in paths:
            assert path == DEFAULT_CONFIG or path in sample, f"{name}: {path} is no default"


# -- tokenlife-engine: its usage, the docs and tokenlife-engine(1) --------------------------


def usage_lines() -> list[str]:
    head = USAGE.split("\n\n", 1)[0]
    return [line.strip().removeprefix("usage:").strip() for line in head.splitlines()]


def test_engine_usage_and_docs_name_the_same_commands(built: dict[str, str]) -> None:
    root = commands_doc().child("tokenlife-engine")
    assert manpages._synopsis_lines(root) == usage_lines(), "docs synopsis vs --help"
    documented = {}
    for section in root.children:
        line, _ = manpages.first_code(manpages.parts(section.blocks)["SYNOPSIS"])
        documented[section.title] = line
    by_command = {" ".join(line.split()[:2]): line for line in usage_lines()}
    assert documented == by_command, "### sections' SYNOPSIS vs --help's usage lines"
    commands = split(man_sections(built["tokenlife-engine.1"])["COMMANDS"], ".SS")
    assert [c for c in commands if c] == list(by_command)


def test_engine_environment_of_usage_is_documented(built: dict[str, str]) -> None:
    named = USAGE.split("Environment:", 1)[1].split("Exit status:", 1)[0]
    variables = set(re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", named))
    assert {"TOKENLIFE_CONFIG", "SLURM_JWT_FILE"} <= variables
    environment = " ".join(
        plain(line) for line in man_sections(built["tokenlife-engine.1"])["ENVIRONMENT"]
    )
    missing = {v for v in variables if not re.search(rf"\b{v}\b", environment)}
    assert not missing, f"in --help's Environment, not in the man page: {missing}"


# -- tokenlife.toml(5) ----------------------------------------------------------------------


def test_every_config_key_is_in_the_man_page(built: dict[str, str]) -> None:
    keys = set()
    for heading, lines in split(man_sections(built["tokenlife.toml.5"])["OPTIONS"], ".SS").items():
        section = re.match(r"\[\[?([a-z.]+)\]", heading)
        for tag in tags(lines):
            assert section, f"key {tag} under no [section]"
            key = tag.split(" (", 1)[0]
            keys.add(key if "." in key else f"{section[1]}.{key}")
    assert keys == code_keys()


def test_the_configuration_example_loads(tmp_path: Path) -> None:
    doc = manpages.parse_markdown((REPO / "docs" / "configuration.md").read_text())
    (example,) = [
        b
        for b in manpages.parts(doc.children[0].blocks)["EXAMPLES"]
        if isinstance(b, manpages.Code)
    ]
    path = tmp_path / "tokenlife.toml"
    path.write_text("\n".join(example.lines))
    loaded = configmod.load(path)
    assert loaded.key.source == "aws" and loaded.store.url.startswith("postgresql")


# -- the converter --------------------------------------------------------------------------


def convert(markdown: str) -> list[str]:
    return manpages.render(manpages.parse_markdown(markdown).blocks)


def test_text_that_roff_would_read_as_requests_is_escaped() -> None:
    lines = convert(".dot at the start, a back\\slash,  'quote.  Second `--x` sentence.\n")
    assert lines == [
        ".PP",
        "\\&.dot at the start, a back\\eslash, 'quote.",
        "Second \\fB\\%\\-\\-x\\fR sentence.",
    ]
    assert convert("```\n.x \\y\n'z\n\n```\n")[3:7] == ["\\&.x \\ey", "\\&'z", "\\&", ".fi"]
    assert convert("a \u2014 b")[1] == "a \\[u2014] b"
    # an option outside code is still typed with minus signs; a word's hyphen stays one
    assert convert("use --json or -c, well-known")[1] == "use \\-\\-json or \\-c, well-known"


def test_lists_tables_links_and_man_references() -> None:
    assert convert("- one\n  more\n- two\n") == [".IP \\(bu 2", "one more", ".IP \\(bu 2", "two"]
    tagged = convert("- `A` and `B`: both\n- `C`: see [configuration.md](configuration.md)\n")
    assert tagged == [
        ".PP",
        ".TP",
        "\\fB\\%A\\fR and \\fB\\%B\\fR",
        "both",
        ".TP",
        "\\fB\\%C\\fR",
        "see \\fB\\%tokenlife.toml\\fR(5)",
    ]
    table = convert("| key | default | meaning |\n| --- | --- | --- |\n| `a` | `1` | the a |\n")
    assert table == [".PP", ".TP", "\\fB\\%a\\fR (default: \\fB\\%1\\fR)", "the a"]
    assert convert("see [Metrics](#metrics), srun(1)")[1] == "see METRICS, \\fB\\%srun\\fR(1)"


def test_labels_are_checked() -> None:
    with pytest.raises(manpages.DocError, match="unknown label"):
        manpages.parts(manpages.parse_markdown("**NOTES** x\n").blocks)
    found = manpages.parts(
        manpages.parse_markdown("text\n\n**EXAMPLE** `x`\n\n```\ny\n```\n").blocks
    )
    assert list(found) == ["DESCRIPTION", "EXAMPLES"] and len(found["EXAMPLES"]) == 2


def test_a_broken_doc_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs, ignore=shutil.ignore_patterns("man"))
    text = (docs / "commands.md").read_text()
    (docs / "commands.md").write_text(text.replace("**DESCRIPTION**", "**DESCRIPTON**", 1))
    assert manpages.main(["--docs", str(docs), "--out", str(tmp_path / "man")]) == 2
    assert not (tmp_path / "man").exists()
