"""One renewer replica as its own OS process, for tests/integration/test_replicas.py.

Run as ``python renew_worker.py`` with the job as one JSON line on stdin
(the store URL carries a password: never on the command line):

    {"url": ..., "key_file": ..., "now": ..., "actor": ...,
     "hang": null | "lookup" | "commit", "hang_after": N, "hang_commits": C}

The worker opens the store (engine and migrations), prints ``ready``, then
waits for a line on stdin (the barrier: the test releases all replicas at
once), runs one ``Renewer.tick()`` at the fixed time ``now`` and prints its
summary as JSON.

Crash scaffolding: with ``hang`` set the worker parks itself, prints
``parked`` and waits to be killed, at a deterministic point rather than
after a guessed delay:

* ``lookup``: in the user database lookup of the ``hang_after``-th token,
  i.e. in the middle of a batch, before it is written;
* ``commit``: in the ``hang_commits``-th database COMMIT issued after
  ``hang_after`` lookups (before it reaches the database), i.e. with a whole
  batch's updates and audit events sent but not committed (PostgreSQL holds
  the row locks, SQLite the write lock).  Parking at the second such COMMIT
  rather than the first also catches a batch written in two transactions.

Users are synthetic (``synthetic_user``): no /etc/passwd entries needed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import event

from producer.keys import FileKeySource
from repository.renewer import Renewer
from repository.store import SqlTokenStore
from tokenlife.config import Config, KeyConfig, TokenConfig
from tokenlife.testing.fakes import FakeClock
from tokenlife.users import UserInfo

UID_BASE = 200_000
#: The policy every replica and the test share: due 900 s before exp.
TOKEN = TokenConfig(lifetime=3600, renew_until=86400, renew_before=600, renew_fraction=0.25)


def user_name(i: int) -> str:
    return f"r{i:05d}"


def synthetic_user(name: str) -> UserInfo:
    """The user database entry of ``r00042``-style names (uid 200042)."""
    uid = UID_BASE + int(name[1:])
    return UserInfo(name, uid, uid, "replica test", f"/home/{name}", "/bin/sh", (uid,))


def _park(out: Any) -> None:
    print("parked", file=out, flush=True)
    while True:
        signal.pause()  # until the test's SIGKILL


def main() -> int:
    # The protocol keeps stdout to itself: anything else printing there (a
    # debugging print in the code under test) goes to stderr instead.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    job = json.loads(sys.stdin.readline())
    store = SqlTokenStore(job["url"])
    store.current("nobody")  # open the engine and migrate before the barrier
    hang, hang_after = job.get("hang"), int(job.get("hang_after", 0))
    hang_commits = int(job.get("hang_commits", 1))
    lookups = 0

    def users(name: str) -> UserInfo:
        nonlocal lookups
        lookups += 1
        if hang == "lookup" and lookups >= hang_after:
            _park(out)
        return synthetic_user(name)

    if hang == "commit":
        commits = 0

        def on_commit(_conn: object) -> None:
            nonlocal commits
            if lookups >= hang_after:
                commits += 1
                if commits >= hang_commits:
                    _park(out)

        event.listen(store.engine, "commit", on_commit)

    config = Config(key=KeyConfig(path=Path(job["key_file"])), token=TOKEN)
    renewer = Renewer(
        config,
        FileKeySource(config.key),
        store,
        clock=FakeClock(float(job["now"])),
        actor=job["actor"],
        users=users,
    )
    print("ready", file=out, flush=True)
    if sys.stdin.readline().strip() != "go":
        return 2
    summary = renewer.tick()
    print(json.dumps(summary.as_dict()), file=out, flush=True)
    store.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
