"""The ``tokenlife`` command.

``tokenlife pam`` is dispatched before argparse and logging are imported:
it runs in every login and its cost is measured (bench/bench_pam.py).
Every other command parses its arguments here and imports its part lazily.
"""

from __future__ import annotations

import sys


def _subcommand(argv: list[str]) -> str | None:
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-c", "--config"):
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if _subcommand(argv) == "pam":
        from producer.pam import main as pam_main

        return pam_main(argv)
    from tokenlife.commands import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
