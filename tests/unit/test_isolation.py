"""One user's fault stays that user's (issue 12, finding 1 and 5; proof suite R7).

A user database error or a bug for one token becomes that token's failure,
backed off in the store, while every other token of the batch is renewed in
the same tick; a failed uid lookup never removes a running job's token.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from repository.renewer import Renewer
from repository.store import SqlTokenStore
from tests.conftest import REPO, require_root
from tokenlife.config import Config, TokenConfig
from tokenlife.errors import UserDbError
from tokenlife.records import TokenRecord
from tokenlife.testing.fakes import FakeClock, FakeJobs, StaticKeySource
from tokenlife.users import UserInfo, uid_of
from transfer.cycle import DeliveryCycle
from transfer.transports import LocalTransport

KEY = secrets.token_bytes(32)
USERS = {"alice": 2001, "bob": 2002, "carol": 2003}


def info(name: str) -> UserInfo:
    uid = USERS[name]
    return UserInfo(name, uid, uid, "", f"/home/{name}", "/bin/sh", (uid,))


def seed(store: SqlTokenStore, now: int) -> None:
    for name, uid in USERS.items():
        store.save(
            TokenRecord(
                secrets.token_hex(8),
                name,
                uid,
                uid,
                now,
                now,
                now + 4000,
                now + 20000,
                4000,
                key_id="k",
            ),
            "minted",
            "test",
        )


def store_with_token(tmp_path: Path, user: str, uid: int, now: int) -> SqlTokenStore:
    """A store holding one fresh token of ``user``."""
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db.sqlite")
    record = TokenRecord("t1", user, uid, uid, now, now, now + 4000, now + 20000, 4000)
    store.save(record, "minted", "test")
    return store


@pytest.mark.parametrize(
    "fault",
    [
        OSError(24, "Too many open files"),
        UserDbError("cannot look up user 'bob': EIO"),
        RuntimeError("a bug"),
    ],
    ids=["oserror", "userdb", "bug"],
)
def test_one_users_lookup_error_fails_only_that_token(tmp_path: Path, fault: Exception) -> None:
    clock = FakeClock()
    now = int(clock.now())
    config = Config(token=replace(TokenConfig(), lifetime=4000, renew_until=20000))
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db.sqlite")
    seed(store, now)

    def users(name: str) -> UserInfo:
        if name == "bob":
            raise fault
        return info(name)

    renewer = Renewer(config, StaticKeySource(KEY), store, clock, users=users)
    renewer.tick()  # files each token for its window
    clock.advance(3500)
    summary = renewer.tick()
    assert (summary.renewed, summary.failed) == (2, 1)
    assert len(summary.errors) == 1 and summary.errors[0].startswith("bob: ")
    assert "\n" not in summary.errors[0]
    versions = {r.user: r.version for r in store.records()}
    assert versions == {"alice": 2, "bob": 1, "carol": 2}
    (failed,) = [e for e in store.events("bob") if e["event"] == "failed"]
    assert failed["version"] == 1
    # Backed off in the store: the next tick does not hammer bob again at once ...
    assert renewer.tick().failed == 0
    # ... and once the user database answers, bob is renewed like the others.
    renewer.users = info
    clock.advance(400)
    assert renewer.tick().renewed == 1
    assert {r.user: r.version for r in store.records()}["bob"] == 2


def test_a_failing_sink_never_stops_a_renewal(tmp_path: Path) -> None:
    class Broken:
        def renewed(self, records: list[TokenRecord]) -> None:
            raise ValueError("disk on fire")

    clock = FakeClock()
    config = Config(token=replace(TokenConfig(), lifetime=4000, renew_until=20000))
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db.sqlite")
    seed(store, int(clock.now()))
    renewer = Renewer(config, StaticKeySource(KEY), store, clock, sinks=[Broken()], users=info)
    renewer.tick()
    clock.advance(3500)
    assert renewer.tick().renewed == 3
    assert {r.version for r in store.records()} == {2}


def test_a_failed_uid_lookup_never_removes_a_running_jobs_token(tmp_path: Path) -> None:
    require_root()
    user = "nobody"
    real_uid = uid_of(user)
    assert real_uid is not None
    clock = FakeClock()
    store = store_with_token(tmp_path, user, real_uid, int(clock.now()))
    nodes = tmp_path / "nodes"
    answer: dict[str, object] = {"uid": real_uid}

    def uids(name: str) -> int | None:
        if isinstance(answer["uid"], Exception):
            raise answer["uid"]
        return answer["uid"]  # type: ignore[return-value]

    jobs = FakeJobs({user: {"node01"}})
    transport = LocalTransport(Path("/run/tokenlife"), nodes)
    cycle = DeliveryCycle(store, transport, jobs, remove_after=600, clock=clock, uids=uids)
    token_file = nodes / "node01" / "run" / "tokenlife" / str(real_uid) / "slurm_jwt"
    assert cycle.run().delivered == 1 and token_file.exists()

    answer["uid"] = UserDbError("cannot look up user 'nobody': Too many open files")
    for _ in range(3):  # well past remove_after, the job still running
        clock.advance(601)
        summary = cycle.run()
        assert summary.removed == 0
    assert token_file.exists()
    assert {d.status for d in store.deliveries.deliveries(user)} == {"delivered"}

    answer["uid"] = None  # the database now says: no such user
    clock.advance(601)
    assert cycle.run().removed == 1  # its work counts as gone: cleaned after remove_after
    assert not token_file.exists()


def test_an_exhausted_fd_table_is_a_lookup_error_not_an_unknown_user() -> None:
    """Python's pwd says KeyError ("not found") when NSS cannot open /etc/passwd."""
    code = f"""
import os, resource, sys
sys.path.insert(0, {str(REPO)!r})
from tokenlife.errors import UserDbError
from tokenlife.users import lookup, uid_of
assert uid_of("root") == 0 and uid_of("no-such-user-here") is None
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
fds = []
try:
    while True:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
for call in (lambda: uid_of("daemon"), lambda: lookup("daemon")):
    try:
        print("answered", call())
    except UserDbError as exc:
        print("UserDbError", exc)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.splitlines()
        == ["UserDbError cannot look up user 'daemon': Too many open files"] * 2
    )
    assert resource.getrlimit(resource.RLIMIT_NOFILE)  # this process is untouched
    assert os.path.exists("/etc/passwd")


def test_one_unreadable_job_costs_that_job_only_and_removes_nothing(tmp_path: Path) -> None:
    """squeue lists a job whose nodelist cannot be read: the others are served,
    and since the view misses a job, no token is taken off any node."""
    require_root()
    from transfer.jobs import SlurmJobs

    user = "nobody"
    real_uid = uid_of(user)
    assert real_uid is not None
    squeue = tmp_path / "squeue"
    jobs_json = tmp_path / "jobs.json"
    squeue.write_text(f"#!/bin/sh\ncat {jobs_json}\n")
    squeue.chmod(0o755)

    def answer(*nodelists: str) -> None:
        jobs = [
            {"job_id": i, "job_state": ["RUNNING"], "nodes": nodes, "user_name": user}
            for i, nodes in enumerate(nodelists)
        ]
        jobs_json.write_text(json.dumps({"jobs": jobs}))

    clock = FakeClock()
    store = store_with_token(tmp_path, user, real_uid, int(clock.now()))
    nodes = tmp_path / "nodes"
    source = SlurmJobs(squeue=str(squeue))
    cycle = DeliveryCycle(
        store, LocalTransport(Path("/run/tokenlife"), nodes), source, remove_after=600, clock=clock
    )
    answer("n01", "n02")
    assert cycle.run().delivered == 2
    answer("n01", "n[1-99999][1-99999]")  # job 1 moved to a list nobody can expand
    for _ in range(2):
        clock.advance(601)
        summary = cycle.run()
        assert (summary.removed, summary.jobs_error) == (0, "")
    assert source.partial
    assert (nodes / "n02" / "run" / "tokenlife" / str(real_uid) / "slurm_jwt").exists()
    answer("n01")  # readable again, and job 1 gone: n02 is cleaned
    clock.advance(601)
    assert cycle.run().removed == 1 and not source.partial
