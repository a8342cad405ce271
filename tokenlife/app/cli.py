"""The ``tokenlife`` command.

``tokenlife pam`` is dispatched before argparse and logging are imported:
it runs in every login and its cost is measured (bench/bench_pam.py,
bench/bench_login.py).  Every other command parses its arguments here and
imports its part lazily.
"""

import os
import sys

from tokenlife.app.argv import subcommand


def main(argv: list[str] | None = None) -> int:
    """The console script's entry (``argv`` None) or a caller's, with its argv."""
    program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if subcommand(argv) == "pam":
        from tokenlife.app.pam import main as pam_main

        status = pam_main(argv)
        if program:
            _exit_now(status)
        return status
    from tokenlife.app.parser import run

    return run(argv)


def _exit_now(status: int) -> None:
    """End the process without the interpreter's teardown.

    A login waits for this process, and freeing every module costs it 1-3 ms
    (docs/producer.md, "Login cost").  Nothing else is owed at exit: the
    login path writes its files with fsync and starts no threads, and no
    logging handler of its holds text; only stdio may.
    """
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 - contextlib would cost an import here
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing to save
            pass
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
