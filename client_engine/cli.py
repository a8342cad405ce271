"""``tokenlife-engine``: the worker-side commands (built in the client engine issue)."""

from __future__ import annotations

import sys

USAGE = "usage: tokenlife-engine {env,token,exec,run} ..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    print(f"tokenlife-engine: not implemented yet; {USAGE}", file=sys.stderr)
    return 2
