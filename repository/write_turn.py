"""SQLite writers of one process take turns, first come first served.

SQLite has one writer at a time, and a writer that finds the database locked
sleeps and tries again (its busy handler), up to 100 ms between tries.  A
renewal run writes batch after batch, each taking the lock again the moment
the last one committed, so a login waiting to record its new token kept
losing: in a day's backlog of 100,000 renewals a mint waited up to 4 s
(bench/bench_renew_herd.py) although no batch held the lock for more than
60 ms.  ``tokenlife serve`` mints and renews in one process, so its writers
queue here, in order, before they ask SQLite: a login waits for the batch
being written, never for the whole run.
"""

from __future__ import annotations

import threading
from types import TracebackType


class WriteTurn:
    """A lock handed out in the order it was asked for; its holder may take it again."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the next ticket to give out
        self._serving = 0  # the ticket whose turn it is
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1  # a write transaction inside one: its own turn
                return
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()
            self._owner, self._depth = me, 1

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth:
                return
            self._owner = None
            self._serving += 1
            self._cond.notify_all()


_turns: dict[str, WriteTurn] = {}
_guard = threading.Lock()


def turn_for(database: str) -> WriteTurn:
    """The turn of this process's writers to ``database`` (one per file)."""
    with _guard:
        turn = _turns.get(database)
        if turn is None:
            turn = _turns[database] = WriteTurn()
        return turn
