"""Logging for commands and daemons: stderr only, journald-friendly."""

from __future__ import annotations

import logging
import os


def setup(verbose: int = 0, debug: bool = False) -> None:
    level = logging.DEBUG if debug or verbose > 1 else logging.INFO if verbose else logging.WARNING
    # Under systemd, journald stamps the time itself.
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt)
