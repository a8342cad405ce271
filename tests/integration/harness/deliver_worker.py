"""One delivery replica as its own OS process (tests/integration/test_delivery_replicas.py,
bench/bench_push_replicas.py), and the delivery storm both seed and check.

Run as ``python -m tests.integration.harness.deliver_worker`` with the job as one
JSON line on stdin (the store URL carries a password: never on the command line):

    {"url": ..., "root": ..., "remote_dir": ..., "actor": ..., "replica": null | NAME,
     "lease": ..., "batch": ..., "concurrency": ..., "hang": null | "park" | "pause",
     "hang_after": N}

The worker opens the store (engine and migrations) and prints ``ready``; then
each ``go NOW`` line runs one ``DeliveryCycle.run()`` at the fixed time NOW
(no job source: what the store owes) over the local transport (node N's
files under ``<root>/<N>``), and prints its summary as JSON; ``quit`` ends it.

Scaffolding, at a deterministic point rather than after a guessed delay: with
``hang`` set, the ``hang_after``-th push (put or remove) of the process stops
before it touches the node, while its claim is held, and the worker prints
the hang's name:

* ``park``: that push and every later one block for good (the test SIGKILLs
  the worker);
* ``pause``: that push waits for a ``resume`` line, then goes on.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sqlalchemy import insert, select, update

from repository.models import DeliveryRow, EventRow, TokenRow
from repository.rows import to_dt
from repository.store import SqlTokenStore
from tokenlife.layout import FILE_NAME
from tokenlife.records import TokenFile
from tokenlife.testing.fakes import FakeClock
from transfer.cycle import DeliveryCycle
from transfer.transports import LocalTransport

REMOTE_DIR = "/run/tokenlife"
UID_BASE = 300_000
LIFETIME = 3600


# -- the worker ------------------------------------------------------------------------------


class HangingTransport(LocalTransport):
    """The local transport, stopping at its ``hang_after``-th push (see the module doc)."""

    def __init__(self, remote_dir: Path, root: Path, hang: str | None, after: int, out: IO[str]):
        super().__init__(remote_dir, root)
        self.hang, self.after, self.out = hang, after, out
        self.pushes = 0
        self.lock = threading.Lock()
        self.resume = threading.Event()
        self.forever = threading.Event()  # never set

    def _count(self) -> None:
        if self.hang is None:
            return
        with self.lock:
            self.pushes += 1
            n = self.pushes
        if self.hang == "park" and n >= self.after:
            if n == self.after:
                print("park", file=self.out, flush=True)
            self.forever.wait()
        elif self.hang == "pause" and n == self.after:
            print("pause", file=self.out, flush=True)
            self.resume.wait()

    def put(self, node: str, tf: TokenFile) -> str:
        self._count()
        return super().put(node, tf)

    def remove(self, node: str, uid: int) -> bool:
        self._count()
        return super().remove(node, uid)


def _lines(transport: HangingTransport, commands: queue.Queue[str]) -> None:
    """stdin: ``resume`` is for the paused push (the main thread is busy in it)."""
    for line in sys.stdin:
        if line.strip() == "resume":
            transport.resume.set()
        else:
            commands.put(line.strip())
    commands.put("quit")


def main() -> int:
    # The protocol keeps stdout to itself: anything else printing there (a
    # debugging print in the code under test) goes to stderr instead.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    job = json.loads(sys.stdin.readline())
    store = SqlTokenStore(job["url"])
    store.current("nobody")  # open the engine and migrate before the barrier
    transport = HangingTransport(
        Path(job.get("remote_dir", REMOTE_DIR)),
        Path(job["root"]),
        job.get("hang"),
        int(job.get("hang_after", 0)),
        out,
    )
    clock = FakeClock(0)
    cycle = DeliveryCycle(
        store,
        transport,
        None,
        600,
        int(job.get("concurrency", 8)),
        clock=clock,
        actor=job["actor"],
        replica=job.get("replica"),  # default: this host and pid
        lease=int(job.get("lease", 60)),
        batch=int(job.get("batch", 64)),
    )
    commands: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(transport, commands), daemon=True).start()
    print("ready", file=out, flush=True)
    while (command := commands.get()) != "quit":
        verb, _, arg = command.partition(" ")
        if verb != "go":
            return 2
        clock.t = float(arg)
        started = time.perf_counter()
        summary = cycle.run()
        result = {**summary.as_dict(), "seconds": time.perf_counter() - started}
        print(json.dumps(result), file=out, flush=True)
    store.close()
    return 0


# -- the storm: seeding and checking ---------------------------------------------------------


def user_name(i: int) -> str:
    return f"d{i:05d}"


def uid_of(user: str) -> int:
    return UID_BASE + int(user[1:])


def node_name(i: int) -> str:
    return f"n{i:04d}"


@dataclass(frozen=True)
class Storm:
    """``users`` users, each with work on ``per_user`` of ``nodes`` nodes, whose nodes
    hold version 1 of the token while the store has version 2: every pair is owed."""

    users: int
    per_user: int
    nodes: int
    now: int

    def pairs(self) -> list[tuple[str, str]]:
        return [
            (user_name(u), node_name((u * self.per_user + k) % self.nodes))
            for u in range(self.users)
            for k in range(self.per_user)
        ]


def token_text(user: str, version: int) -> str:
    # Opaque to delivery (it never parses the token); unique per user and version.
    return f"tok.{user}.v{version}"


def iat_of(now: int, version: int) -> int:
    return now - 1000 + 100 * version


def seed(url: str, storm: Storm, root: Path, remote_dir: str = REMOTE_DIR) -> None:
    """The store (tokens at version 2, delivery records at 1) and the nodes' version-1 files."""
    now = storm.now
    tokens, deliveries = [], []
    for u in range(storm.users):
        user = user_name(u)
        iat = iat_of(now, 2)
        tokens.append(
            {
                "token_id": f"t{u:07d}",
                "user": user,
                "uid": uid_of(user),
                "gid": uid_of(user),
                "first_issued": to_dt(iat_of(now, 1)),
                "iat": to_dt(iat),
                "exp": to_dt(iat + LIFETIME),
                "renew_until": to_dt(now + 86400),
                "lifetime": LIFETIME,
                "key_id": "k",
                "version": 2,
                "state": "active",
                "token": token_text(user, 2),
                "next_check": to_dt(now + 3000),
                "attempts": 0,
                "last_error": "",
            }
        )
    for user, node in storm.pairs():
        deliveries.append(
            {
                "user": user,
                "uid": uid_of(user),
                "node": node,
                "token_id": f"t{int(user[1:]):07d}",
                "version": 1,
                "status": "delivered",
                "attempts": 0,
                "last_error": "",
                "next_attempt": to_dt(now - 500),
                "last_seen": to_dt(now - 500),
                "updated": to_dt(now - 500),
            }
        )
        write_node_file(root, remote_dir, node, user, token_text(user, 1), iat_of(now, 1))
    store = open_store(url)  # creates the schema
    try:
        with store.engine.begin() as conn:
            conn.execute(insert(TokenRow), tokens)
            conn.execute(insert(DeliveryRow), deliveries)
    finally:
        store.close()


def node_file(root: Path, remote_dir: str, node: str, user: str) -> Path:
    return root / node / remote_dir.lstrip("/") / str(uid_of(user)) / FILE_NAME


def write_node_file(root: Path, remote_dir: str, node: str, user: str, text: str, iat: int) -> None:
    """A token file as a push leaves it (0600, the user's, mtime = iat), without fsync."""
    path = node_file(root, remote_dir, node, user)
    if not path.parent.exists():
        path.parent.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.parent.mkdir(mode=0o700)
        os.chown(path.parent, uid_of(user), uid_of(user))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fchown(fd, uid_of(user), uid_of(user))
        os.utime(fd, (iat, iat))
    finally:
        os.close(fd)


def open_store(url: str) -> SqlTokenStore:
    """A store with its engine open (and the schema made)."""
    store = SqlTokenStore(url)
    store.current("nobody")
    return store


def renew(url: str, storm: Storm, users: list[str], version: int) -> None:
    """A newer token for ``users``, as a renewal writes it (a later iat)."""
    store = open_store(url)
    try:
        with store.engine.begin() as conn:
            conn.execute(
                update(TokenRow)
                .where(TokenRow.user.in_(users))
                .values(version=version, iat=to_dt(iat_of(storm.now, version)))
            )
            for user in users:  # each its own text
                conn.execute(
                    update(TokenRow)
                    .where(TokenRow.user == user)
                    .values(token=token_text(user, version))
                )
    finally:
        store.close()


@dataclass
class Outcome:
    """What the store and the nodes say after the replicas ran."""

    #: delivered audit events per (user, node), and per actor
    events: Counter[tuple[str, str]]
    actors: Counter[str]
    #: records still owed (a version other than the token's), and records claimed
    owed: int
    claimed: dict[tuple[str, str], str]
    #: (user, node) whose file is not the user's current token, with what it holds
    wrong_files: dict[tuple[str, str], str]
    versions: Counter[int]


def outcome(url: str, storm: Storm, root: Path, remote_dir: str = REMOTE_DIR) -> Outcome:
    store = open_store(url)
    try:
        with store.engine.connect() as conn:
            current = dict(conn.execute(select(TokenRow.user, TokenRow.version)).all())
            texts = {u: token_text(u, v) for u, v in current.items()}
            rows = conn.execute(
                select(
                    DeliveryRow.user, DeliveryRow.node, DeliveryRow.version, DeliveryRow.claimed_by
                )
            ).all()
            delivered = conn.execute(
                select(EventRow.user, EventRow.reason, EventRow.actor).where(
                    EventRow.event == "delivered"
                )
            ).all()
    finally:
        store.close()
    wrong = {}
    for user, node in storm.pairs():
        text = node_file(root, remote_dir, node, user).read_text()
        if text != texts[user]:
            wrong[(user, node)] = text
    return Outcome(
        events=Counter((u, reason.removeprefix("node ")) for u, reason, _ in delivered),
        actors=Counter(actor for _, _, actor in delivered),
        owed=sum(1 for u, _, v, _ in rows if v != current[u]),
        claimed={(u, n): c for u, n, _, c in rows if c is not None},
        wrong_files=wrong,
        versions=Counter(v for _, _, v, _ in rows),
    )


if __name__ == "__main__":
    sys.exit(main())
