"""The man pages tokenlife(8), tokenlife-engine(1) and tokenlife.toml(5), generated.

Every fact has one source, and the pages are made from it:

- prose, synopses, exit status, environment, files, examples and see-also:
  docs/commands.md and docs/configuration.md, which administrators read as
  Markdown;
- the options of ``tokenlife`` and their descriptions: its argparse parser,
  so the man page says what ``--help`` says;
- the NAME lines of the two programs: the descriptions their ``--help`` shows.

The pages are committed in docs/man/ (packages install them from there, with
no build step); tests/unit/test_manpages.py regenerates them and fails when
they differ, and checks the docs' synopses against the parser and against
``tokenlife-engine``'s usage.  Regenerate after changing the docs or an
option::

    .venv/bin/python -m tokenlife.app.manpages            # writes docs/man/
    .venv/bin/python -m tokenlife.app.manpages --check    # exit 1 if stale

The converter knows the Markdown the docs use: headings, paragraphs, lists,
pipe tables, fenced code, inline code, bold and links.  Conventions:

- A page starts at a heading (``## tokenlife``, ``## tokenlife-engine ...``,
  or the whole of configuration.md); its first code block is the SYNOPSIS and
  its table (commands.md) the list of commands; ``### tokenlife X`` is command X.
- A paragraph that starts with ``**LABEL**`` (capitals, one of ``LABELS``)
  opens a part that runs to the next label or heading; text before any label
  is the DESCRIPTION.  EXIT STATUS, ENVIRONMENT, FILES, EXAMPLES and SEE ALSO
  parts go to the page's section of that name (a command's under its name);
  SIGNALS, OUTPUT and METRICS stay in the command's description; PERFORMANCE
  (benchmark figures) stays in the docs.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenlife import __version__

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
OUT = DOCS / "man"

#: the man sections in their order (kstart's, with COMMANDS and METRICS for tokenlife)
ORDER = (
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "COMMANDS",
    "METRICS",
    "EXIT STATUS",
    "ENVIRONMENT",
    "FILES",
    "EXAMPLES",
    "SEE ALSO",
)
#: parts of a command that go to the page's section of the same name
GLOBAL_PARTS = ("EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES", "SEE ALSO")
#: parts that stay in the command's description, with their label as a lead-in
INLINE_PARTS = ("SIGNALS", "OUTPUT", "METRICS")
LABELS = frozenset(
    ("SYNOPSIS", "DESCRIPTION", "OPTIONS", "PERFORMANCE", *GLOBAL_PARTS, *INLINE_PARTS)
)
#: a link whose text is one of these docs is a reference to its man page
MAN_REFS = {
    "configuration.md": "tokenlife.toml(5)",
    "commands.md": "tokenlife(8)",
}
MANUALS = {1: "User Commands", 5: "File Formats Manual", 8: "System Manager's Manual"}


class DocError(ValueError):
    """The docs do not follow the conventions the generator relies on."""


# -- Markdown -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Items:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Code:
    lines: tuple[str, ...]


Block = Para | Items | Table | Code


@dataclass
class Section:
    """A heading, the blocks under it, and its subsections."""

    title: str
    level: int
    blocks: list[Block] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)

    def child(self, first_word: str) -> Section:
        for section in self.children:
            if section.title.split(" ", 1)[0].strip("`") == first_word:
                return section
        raise DocError(f"no section '{first_word}' under '{self.title}'")


HEADING = re.compile(r"(#{1,6}) +(.*?) *#*$")
ITEM = re.compile(r"(?:[-*]|\d+\.) +(.*)")
LABEL = re.compile(r"\*\*([A-Z][A-Z ]*[A-Z])\*\* *")


def _join(lines: Sequence[str]) -> str:
    """Lines of a paragraph as one; a line that ends a sentence keeps it ended."""
    text = lines[0].strip()
    for line in lines[1:]:
        space = "  " if re.search(r"[.!?]$", text) else " "  # see text_lines
        text += space + line.strip()
    return text


#: a list item "`NAME`: text" (or "`A` and `B`: text") is a tagged paragraph
TAGGED = re.compile(r"(`[^`]+`(?:(?:,| and| or) `[^`]+`)*): +")


def _starts_block(line: str) -> bool:
    return bool(HEADING.match(line) or ITEM.match(line)) or line.startswith(("```", "|"))


def _cells(line: str) -> tuple[str, ...]:
    # Split on the pipes outside inline code.
    cells, current, in_code = [], "", False
    for char in line.strip().strip("|"):
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(current.strip())
            current = ""
        else:
            current += char
    return (*cells, current.strip())


def parse_markdown(text: str) -> Section:
    """The document as a tree of sections (the root has level 0 and no title)."""
    root = Section("", 0)
    stack = [root]
    lines = text.splitlines()
    i = 0

    def add(block: Block) -> None:
        stack[-1].blocks.append(block)

    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("<!--"):  # a note to the docs' editors
            while i < len(lines) and "-->" not in lines[i]:
                i += 1
            i += 1
        elif line.startswith("```"):
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            add(Code(tuple(lines[i + 1 : end])))
            i = end + 1
        elif heading := HEADING.match(line):
            level = len(heading[1])
            while stack[-1].level >= level:
                stack.pop()
            section = Section(heading[2], level)
            stack[-1].children.append(section)
            stack.append(section)
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not re.fullmatch(r"[|:\- ]+", lines[i]):  # not the --- line
                    rows.append(_cells(lines[i]))
                i += 1
            add(Table(rows[0], tuple(rows[1:])))
        elif item := ITEM.match(line):
            items = [[item[1]]]
            i += 1
            while i < len(lines) and lines[i].strip():
                if nested := ITEM.match(lines[i]):
                    items.append([nested[1]])
                elif _starts_block(lines[i]):
                    break
                else:
                    items[-1].append(lines[i])
                i += 1
            add(Items(tuple(_join(item) for item in items)))
        else:
            text_lines = [line]
            i += 1
            while i < len(lines) and lines[i].strip() and not _starts_block(lines[i]):
                text_lines.append(lines[i])
                i += 1
            add(Para(_join(text_lines)))
    return root


def parts(blocks: Sequence[Block]) -> dict[str, list[Block]]:
    """The blocks by label, in the docs' order; unlabelled text is the DESCRIPTION."""
    found: dict[str, list[Block]] = {"DESCRIPTION": []}
    current = "DESCRIPTION"
    for block in blocks:
        if isinstance(block, Para) and (label := LABEL.match(block.text)):
            current = "EXAMPLES" if label[1] == "EXAMPLE" else label[1]
            if current not in LABELS:
                raise DocError(f"unknown label **{label[1]}** (known: {sorted(LABELS)})")
            rest = block.text[label.end() :]
            found.setdefault(current, []).extend([Para(rest)] if rest else [])
        else:
            found.setdefault(current, []).append(block)
    if not found["DESCRIPTION"]:
        del found["DESCRIPTION"]
    return found


# -- roff -----------------------------------------------------------------------------------

OPTION = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")
INLINE = re.compile(
    r"(?P<ticks>`+)(?P<code>.+?)(?P=ticks)"
    r"|\*\*(?P<bold>.+?)\*\*"
    r"|\[(?P<text>[^\]]+)\]\((?P<target>[^)]+)\)"
    r"|\b(?P<page>[a-z][\w.-]*)\((?P<sect>[1-8])\)"
)


def escape(text: str, code: bool = False) -> str:
    """Roff-safe text; '-' of an option, and in code every '-', is a minus (copyable)."""
    text = text.replace("\\", "\\e")
    if code:
        text = text.replace("-", "\\-")
    else:
        text = OPTION.sub(lambda m: m[0].replace("-", "\\-"), text)
    return "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)


def literal(text: str) -> str:
    """Code: minus signs, and no word hyphenated at a line break (\\%)."""
    return " ".join(f"\\%{escape(word, code=True)}" if word else "" for word in text.split(" "))


def bold(text: str) -> str:
    return f"\\fB{text}\\fR"


def italic(text: str) -> str:
    return f"\\fI{text}\\fR"


def inline(text: str) -> str:
    """Markdown inline markup as roff: code and bold in bold, links as their text."""
    out, pos = [], 0
    for match in INLINE.finditer(text):
        out.append(escape(text[pos : match.start()]))
        pos = match.end()
        if match["code"] is not None:
            out.append(bold(literal(match["code"])))
        elif match["bold"] is not None:
            out.append(bold(escape(match["bold"].replace("`", ""))))
        elif match["text"] is not None:
            shown = MAN_REFS.get(match["text"], match["text"])
            if match["target"].startswith("#"):  # a section of this page: its man heading
                shown = shown.upper()
            out.append(inline(shown))
        else:
            out.append(f"{bold(literal(match['page']))}({match['sect']})")
    out.append(escape(text[pos:]))
    return "".join(out)


def text_lines(roff: str) -> list[str]:
    """A paragraph's roff text as input lines: one sentence per line, none a request."""
    roff = re.sub(r"(?<=[.!?]) {2,}", "\n", roff.strip())
    roff = re.sub(r" {2,}", " ", roff)
    return [f"\\&{line}" if line.startswith((".", "'")) else line for line in roff.split("\n")]


def heading(title: str) -> str:
    """A macro argument: quoted, without inline code marks."""
    return '"' + inline(title.replace("`", "")).replace('"', "\\(dq") + '"'


def synopsis(line: str) -> str:
    """A command line in man style: literals bold, placeholders italic."""
    out = []
    for word in re.split(r"([\s\[\]|]+)", line.strip()):
        dots = "..." if word.endswith("...") and word != "..." else ""
        core = word.removesuffix(dots) if dots else word
        if not core or re.fullmatch(r"[\s\[\]|]+|\.\.\.", core):
            out.append(core)
        elif re.fullmatch(r"[A-Z][A-Z0-9_]*", core):
            out.append(italic(core))
        else:
            out.append(bold(literal(core)))
        out.append(dots)
    return "".join(out)


def render(blocks: Sequence[Block]) -> list[str]:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Para):
            lines += [".PP", *text_lines(inline(block.text))]
        elif isinstance(block, Items) and all(TAGGED.match(item) for item in block.items):
            lines.append(".PP")
            for item in block.items:
                tag = TAGGED.match(item)
                assert tag is not None
                lines += [".TP", inline(tag[1]), *text_lines(inline(item[tag.end() :]))]
        elif isinstance(block, Items):
            for item in block.items:
                lines += [".IP \\(bu 2", *text_lines(inline(item))]
        elif isinstance(block, Table):
            lines += _table(block)
        else:
            body = [escape(line, code=True) or "\\&" for line in block.lines]
            body = [f"\\&{line}" if line.startswith((".", "'")) else line for line in body]
            lines += [".PP", ".RS 4", ".nf", *body, ".fi", ".RE"]
    return lines


def _table(table: Table) -> list[str]:
    """A table as a tagged list: the first column is the tag, the last the text.

    Columns between (a key's default, a metric's type) follow the tag in
    parentheses, "(header: value)"; a terminal has no room for tbl's columns.
    """
    lines = [".PP"]
    for row in table.rows:
        middle = [
            f"{escape(name)}: {inline(cell)}"
            for name, cell in zip(table.header[1:-1], row[1:-1], strict=True)
            if cell
        ]
        tag = inline(row[0]) + (f" ({'; '.join(middle)})" if middle else "")
        lines += [".TP", tag or "\\&", *text_lines(inline(row[-1]))]
    return lines


def lead_in(label: str, blocks: list[Block]) -> list[Block]:
    """The part's blocks, its first paragraph led by the label in bold."""
    title = f"**{label.capitalize()}.**"
    if blocks and isinstance(blocks[0], Para):
        return [Para(f"{title} {blocks[0].text}"), *blocks[1:]]
    return [Para(title), *blocks]


# -- argparse -------------------------------------------------------------------------------


def leaf_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command words, parser) of every command that runs, config's included."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from leaf_parsers(sub, (*path, name))


def metavar(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """What --help shows after the option (or for the argument); "" for flags."""
    if action.nargs == 0:
        return ""
    formatter = parser._get_formatter()
    if action.option_strings:
        default = formatter._get_default_metavar_for_optional(action)
    else:
        default = formatter._get_default_metavar_for_positional(action)
    return formatter._format_args(action, default)


def option_items(parser: argparse.ArgumentParser, with_help: bool) -> list[str]:
    """The parser's arguments as .TP items, with --help's words."""
    formatter = parser._get_formatter()
    lines = [".PP"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._HelpAction) and not with_help:
            continue
        args = metavar(parser, action)
        if action.option_strings:
            tag = ", ".join(bold(literal(o)) for o in action.option_strings)
            tag += f" {italic(escape(args))}" if args else ""
        else:
            tag = italic(escape(args))
        text = formatter._expand_help(action) if action.help else ""
        lines += [".TP", tag, *text_lines(escape(text))]
    return lines if len(lines) > 1 else []


# -- pages ----------------------------------------------------------------------------------


@dataclass
class Page:
    name: str
    section: int
    whatis: str
    body: dict[str, list[str]] = field(default_factory=dict)

    def add(self, section: str, lines: list[str]) -> None:
        if section not in ORDER:
            raise DocError(f"{self.name}({self.section}): no man section {section}")
        if lines:
            self.body.setdefault(section, []).extend(lines)

    def add_parts(self, found: dict[str, list[Block]], owner: str | None = None) -> None:
        """Parts that go to the page's sections; a command's under its name."""
        for label in GLOBAL_PARTS:
            if label in found:
                head = [f".SS {heading(owner)}"] if owner else []
                self.add(label, head + render(found[label]))

    def roff(self, source: str) -> str:
        lines = [
            f'.\\" Generated from {source} by python -m tokenlife.app.manpages: do not edit.',
            f'.TH {self.name.upper()} {self.section} "" "tokenlife {__version__}" '
            f'"{MANUALS[self.section]}"',
            ".SH NAME",
            f"{escape(self.name, code=True)} \\- {escape(self.whatis)}",
        ]
        for section in ORDER[1:]:
            if section in self.body:
                lines += [f".SH {section}", *self.body[section]]
        return "\n".join(lines) + "\n"

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.section}"


def _description(text: str) -> str:
    """A --help description as a NAME line: no parentheses, no final period."""
    return re.sub(r"\s*\([^)]*\)", "", " ".join(text.split())).rstrip(".")


def _synopsis_lines(root: Section) -> list[str]:
    code = next((b for b in root.blocks if isinstance(b, Code)), None)
    if code is None:
        raise DocError(f"'{root.title}' has no code block with the synopsis")
    return [line for line in code.lines if line.strip()]


def _root_parts(root: Section) -> dict[str, list[Block]]:
    """The page heading's own parts; its synopsis block and command table are not prose."""
    first_code = next((b for b in root.blocks if isinstance(b, Code)), None)
    blocks = [b for b in root.blocks if b is not first_code and not isinstance(b, Table)]
    return parts(blocks)


def _page_head(page: Page, root: Section, found: dict[str, list[Block]]) -> None:
    lines = [synopsis(line) for line in _synopsis_lines(root)]
    page.add("SYNOPSIS", [".PP", *"\n.br\n".join(lines).split("\n")])
    page.add("DESCRIPTION", render(found.get("DESCRIPTION", [])))


def first_code(blocks: Sequence[Block]) -> tuple[str, str]:
    """(the first inline code, the rest) of a SYNOPSIS part."""
    text = blocks[0].text if blocks and isinstance(blocks[0], Para) else ""
    match = re.match(r"`([^`]+)` *(.*)", text)
    if not match:
        raise DocError(f"a SYNOPSIS must start with the command line in `code`: {text!r}")
    return match[1], match[2]


def _command(page: Page, title: str, line: str, remark: str, found: dict[str, list[Block]]) -> None:
    """One command's subsection: synopsis, description, then its options."""
    head = synopsis(line) + (f" {inline(remark)}" if remark else "")
    description: list[Block] = list(found.get("DESCRIPTION", []))
    for label in INLINE_PARTS:
        if label in found:
            description += lead_in(label, found[label])
    page.add("COMMANDS", [f".SS {heading(title)}", ".PP", head, *render(description)])
    page.add_parts(found, owner=title)


def command_table(root: Section) -> list[tuple[str, str, str]]:
    """(command words, synopsis after 'tokenlife', what it does) of each table row."""
    tables = [b for b in root.blocks if isinstance(b, Table)]
    if len(tables) != 1:
        raise DocError(f"'{root.title}' needs one table, the commands; it has {len(tables)}")
    rows = []
    (table,) = tables
    for row in table.rows:
        line = row[0].strip("`")
        words = re.match(r"[a-z][a-z-]*(?: [a-z][a-z-]*)*", line)
        if not words:
            raise DocError(f"command table: {row[0]!r} does not start with a command")
        rows.append((words[0], line, row[1]))
    return rows


def tokenlife_page(commands: Section, parser: argparse.ArgumentParser) -> Page:
    root = commands.child("tokenlife")
    description = _description(parser.description or "")
    page = Page("tokenlife", 8, description)
    found = _root_parts(root)
    _page_head(page, root, found)
    page.add("OPTIONS", option_items(parser, with_help=True))
    # Every status first, then what each command adds (GLOBAL_PARTS).
    page.add("EXIT STATUS", render(commands.child("Exit").blocks))
    page.add_parts(found)
    leaves = {" ".join(path): sub for path, sub in leaf_parsers(parser)}
    sections = {s.title.removeprefix("tokenlife "): s for s in root.children}
    for name, line, summary in command_table(root):
        if name not in leaves:
            raise DocError(f"tokenlife {name}: in the command table but not in the parser")
        section = sections.pop(name, None)
        found_cmd = parts(section.blocks) if section else {}
        if "OPTIONS" in found_cmd:
            raise DocError(f"tokenlife {name}: options are described in parser.py's help")
        remark = first_code(found_cmd["SYNOPSIS"])[1] if "SYNOPSIS" in found_cmd else ""
        if not section:
            summary = summary[0].upper() + summary[1:].rstrip(".") + "."
            found_cmd = {"DESCRIPTION": [Para(summary)]}
        _command(page, f"tokenlife {name}", f"tokenlife {line}", remark, found_cmd)
        page.add("COMMANDS", option_items(leaves[name], with_help=False))
    if sections:
        raise DocError(f"sections without a row in the command table: {sorted(sections)}")
    page.add("METRICS", render(commands.child("Metrics").blocks))
    return page


def engine_page(commands: Section, usage: str) -> Page:
    root = commands.child("tokenlife-engine")
    # The paragraph after the usage lines of --help says what the program is.
    page = Page("tokenlife-engine", 1, _description(usage.split("\n\n")[1]))
    found = _root_parts(root)
    _page_head(page, root, found)
    page.add("OPTIONS", render(found.get("OPTIONS", [])))
    page.add_parts(found)
    for section in root.children:
        found_cmd = parts(section.blocks)
        if "SYNOPSIS" not in found_cmd:
            raise DocError(f"{section.title}: no **SYNOPSIS**")
        line, remark = first_code(found_cmd["SYNOPSIS"])
        _command(page, section.title, line, remark, found_cmd)
    return page


def config_page(configuration: Section, default_path: str) -> Page:
    (root,) = configuration.children
    page = Page("tokenlife.toml", 5, "configuration of tokenlife and tokenlife-engine")
    found = parts(root.blocks)
    page.add("SYNOPSIS", [".PP", bold(escape(default_path, code=True))])
    page.add("DESCRIPTION", render(found.get("DESCRIPTION", [])))
    for section in root.children:
        if section.children:
            raise DocError(f"{section.title}: subsections are not rendered")
        page.add("OPTIONS", [f".SS {heading(section.title)}", *render(section.blocks)])
    page.add_parts(found)
    return page


def build(docs: Path = DOCS) -> dict[str, str]:
    """File name -> roff text of every page."""
    from client_engine.cli import USAGE
    from tokenlife.app.parser import build_parser
    from tokenlife.engine_settings import DEFAULT_CONFIG

    commands = parse_markdown((docs / "commands.md").read_text(encoding="utf-8"))
    configuration = parse_markdown((docs / "configuration.md").read_text(encoding="utf-8"))
    (commands_root,) = commands.children
    pages = [
        (tokenlife_page(commands_root, build_parser()), "docs/commands.md and the parser"),
        (engine_page(commands_root, USAGE), "docs/commands.md"),
        (config_page(configuration, DEFAULT_CONFIG), "docs/configuration.md"),
    ]
    return {page.filename: page.roff(source) for page, source in pages}


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(
        prog="python -m tokenlife.app.manpages",
        description="Generate the man pages from docs/commands.md, docs/configuration.md "
        "and the tokenlife parser.",
    )
    cli.add_argument("--docs", type=Path, default=DOCS, help="the docs directory")
    cli.add_argument("--out", type=Path, default=OUT, help="where the pages go")
    cli.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a page in --out is stale"
    )
    args = cli.parse_args(argv)
    try:
        pages = build(args.docs)
    except DocError as exc:
        print(f"manpages: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # an installed package has no docs: name the tree's
        print(f"manpages: {exc.filename}: not found (--docs DIR)", file=sys.stderr)
        return 2
    stale = [
        name
        for name, text in pages.items()
        if not (args.out / name).exists() or (args.out / name).read_text() != text
    ]
    if args.check:
        for name in stale:
            print(f"manpages: {args.out / name} is stale: regenerate it", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (args.out / name).write_text(pages[name], encoding="utf-8")
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
