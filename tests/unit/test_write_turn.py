"""SQLite writers of one process take turns in order (repository/write_turn.py).

``tokenlife serve`` mints (logins) and renews in one process.  Without the
turns a renewal run over a day's backlog took SQLite's write lock again the
moment each batch committed, and a login's mint, asleep in SQLite's busy
handler, waited for seconds (bench/bench_renew_herd.py: p99 2.7-3.9 s; with
the turns 0.2 s).  With the turns a mint waits for the batch being written.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from repository.store import SqlTokenStore
from repository.write_turn import WriteTurn, turn_for
from tests.conftest import wait_for
from tokenlife.errors import StoreError
from tokenlife.testing.store_contract import record


def test_turns_go_in_the_order_asked_and_a_holder_may_take_it_again() -> None:
    turn = WriteTurn()
    order: list[int] = []

    def writer(i: int) -> None:
        with turn:
            order.append(i)

    with turn:
        with turn:  # the same thread again: no deadlock
            pass
        threads = []
        for i in range(5):
            t = threading.Thread(target=writer, args=(i,))
            t.start()
            wait_for(lambda i=i: turn._next == i + 2, f"writer {i}'s ticket", every=0.001)
            threads.append(t)
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]


def test_a_stores_writers_queue_in_order_and_readers_never_wait(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/db"
    store, other = SqlTokenStore(url), SqlTokenStore(url)  # two objects, one file: one turn
    store.save(record("tlalice", uid=1001, gid=1001), "minted", "test")
    turn = turn_for(str(tmp_path / "db"))
    committed: list[str] = []
    release = threading.Event()

    def holder() -> None:
        with store.transaction():
            release.wait(10)
        committed.append("holder")

    def writer(name: str, on: SqlTokenStore) -> None:
        on.save(record(name, uid=1002, gid=1002), "minted", "test")
        committed.append(name)

    first = threading.Thread(target=holder)
    first.start()
    wait_for(
        lambda: turn._serving == turn._next - 1 and turn._owner is not None,
        "the holder's turn",
        every=0.001,
    )
    later = []
    for k, name in enumerate(("tlbob", "tlcarol", "tldave")):
        t = threading.Thread(target=writer, args=(name, (store, other)[k % 2]))
        t.start()
        wait_for(
            lambda k=k: turn._next == turn._serving + k + 2, f"writer {k}'s ticket", every=0.001
        )
        later.append(t)
    # a reader goes on while the writers wait
    assert other.current("tlalice") is not None
    assert committed == []
    release.set()
    for t in (first, *later):
        t.join(30)
    assert committed == ["holder", "tlbob", "tlcarol", "tldave"]


def test_a_transaction_that_fails_hands_the_turn_on(tmp_path: Path) -> None:
    """An exception in a write transaction (the caller's, or the database's)
    rolls it back and frees the turn: the next writer is not stuck behind it."""
    url = f"sqlite:///{tmp_path}/db"
    store = SqlTokenStore(url)
    store.save(record("tlalice", uid=1001, gid=1001), "minted", "test")
    turn = turn_for(str(tmp_path / "db"))

    class Boom(Exception):
        pass

    try:
        with store.transaction() as session:
            session.execute(text("DELETE FROM tokens"))
            raise Boom
    except Boom:
        pass
    # the database refuses: StoreError, and the turn is freed too
    with pytest.raises(StoreError), store.transaction() as session:
        session.execute(text("INSERT INTO no_such_table VALUES (1)"))
    assert turn._owner is None and turn._serving == turn._next
    done = threading.Event()

    def writer() -> None:
        store.save(record("tlbob", uid=1002, gid=1002), "minted", "test")
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    assert done.wait(10), "the next writer waited for a turn nobody holds"
    t.join()
    assert store.current("tlalice") is not None  # the failed DELETE was rolled back
    assert store.current("tlbob") is not None


def test_postgresql_has_no_turns() -> None:
    assert SqlTokenStore("postgresql+psycopg://u@localhost/x")._write_turn is None
