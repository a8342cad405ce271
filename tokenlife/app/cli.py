"""The ``tokenlife`` command.

``tokenlife pam`` is dispatched before argparse and logging are imported:
it runs in every login and its cost is measured (bench/bench_pam.py).
Every other command parses its arguments here and imports its part lazily.
"""

from __future__ import annotations

import sys

from tokenlife.app.argv import subcommand


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if subcommand(argv) == "pam":
        from tokenlife.app.pam import main as pam_main

        return pam_main(argv)
    from tokenlife.app.parser import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
