"""What an administrator hit installing tokenlife from the docs (issue 16, item 3).

Each test failed before its fix:

* a login file never goes older over newer: the PAM fallback reusing an
  older spooled version of a token, or a late renewal, keeps the newer file;
* ``push --node NODE`` tries that node at once, whatever its backoff, and
  reports its failure honestly;
* a SQLite ``-journal`` that others can read is refused and reported by
  ``config check`` like the store, ``-wal`` and ``-shm``;
* ``list`` says ``superseded`` for a token replaced by a newer one (Slurm
  still accepts it until its exp), not ``expired``.

The unprivileged-user findings are in tests/integration/test_admin_findings.py,
the AWS key cache ones in tests/integration/test_aws_keysource.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import stat
import time
from pathlib import Path

import pytest

from producer.loginfile import token_path, write_login_token
from producer.mint import Minter
from producer.spool import SpoolStore
from repository.sinks import LoginFiles
from repository.store import SqlTokenStore, check_sqlite_private
from tests.conftest import require_root, run_cli, write_cli_site
from tokenlife.config import Config
from tokenlife.errors import StoreError
from tokenlife.records import TokenRecord
from tokenlife.slurm_jwt import SlurmJwt, read_claims
from tokenlife.testing.fakes import FakeClock, StaticKeySource
from tokenlife.users import lookup

KEY = secrets.token_bytes(32)
USER = "nobody" if os.geteuid() == 0 else os.environ.get("USER", "nobody")


def iat_in(path: Path) -> int:
    """The iat of the token in ``path`` (compared instead of the tokens, so a
    failing assertion shows no token)."""
    iat: int = read_claims(path.read_text())["iat"]
    return iat


def renewed(record: TokenRecord, source: StaticKeySource, iat: int) -> TokenRecord:
    """``record``'s next version, as a renewal at ``iat`` makes it."""
    exp = min(iat + record.lifetime, record.renew_until)
    token = SlurmJwt().make(source.load(), lookup(record.user), iat, exp)
    return dataclasses.replace(record, iat=iat, exp=exp, version=record.version + 1, token=token)


# --- 2. a login file never goes older over newer ------------------------------------------


def test_the_fallback_reusing_an_older_spooled_version_keeps_the_newer_login_file(
    tmp_path: Path,
) -> None:
    """The daemon renewed v1 to v2 (the login file followed); then, with the
    daemon down, a login reused the spool's v1: v2 must stay in the file."""
    source, clock, login = StaticKeySource(KEY), FakeClock(), tmp_path / "login"
    minter = Minter(Config(), source, SpoolStore(tmp_path / "spool"), clock, login)
    v1, minted = minter.mint(USER, os.geteuid(), reuse=True, actor="pam")
    assert minted
    clock.advance(3600)
    v2 = renewed(v1, source, int(clock.now()))
    LoginFiles(login).renewed([v2])  # the daemon's sink
    path = token_path(login, v1.uid)
    assert iat_in(path) == v2.iat

    clock.advance(60)
    record, minted = minter.mint(USER, os.geteuid(), reuse=True, actor="pam")

    assert (record.token_id, record.version, minted) == (v1.token_id, 1, False)
    assert iat_in(path) == v2.iat  # before the fix: v1's
    assert path.read_text() == v2.token


def test_a_late_renewal_does_not_overwrite_a_newer_login_file(tmp_path: Path) -> None:
    source, clock, login = StaticKeySource(KEY), FakeClock(), tmp_path / "login"
    minter = Minter(Config(), source, SpoolStore(tmp_path / "spool"), clock, login)
    v1, _ = minter.mint(USER, os.geteuid())
    v2 = renewed(v1, source, v1.iat + 600)
    v3 = renewed(v2, source, v1.iat + 1200)
    write_login_token(login, v3)

    LoginFiles(login).renewed([v2])  # a slower writer, arriving late
    write_login_token(login, v1)

    path = token_path(login, v1.uid)
    assert iat_in(path) == v3.iat
    assert path.read_text() == v3.token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_newer_token_still_replaces_the_file_and_junk_is_replaced(tmp_path: Path) -> None:
    source, clock, login = StaticKeySource(KEY), FakeClock(), tmp_path / "login"
    minter = Minter(Config(), source, SpoolStore(tmp_path / "spool"), clock, login)
    v1, _ = minter.mint(USER, os.geteuid())
    path = token_path(login, v1.uid)
    v2 = renewed(v1, source, v1.iat + 600)

    write_login_token(login, v2)
    assert iat_in(path) == v2.iat

    path.write_text("not a token")  # what the file holds is not a token: replaced
    write_login_token(login, v1)
    assert iat_in(path) == v1.iat


# --- 3. push --node overrides the backoff -------------------------------------------------


def push_site(tmp_path: Path) -> Path:
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    return write_cli_site(
        tmp_path,
        KEY,
        f'[delivery]\ntransport = "local"\njobs = "static"\nroot = "{nodes}"\n'
        f'[delivery.static]\n{USER} = ["n1", "n2"]\n',
    )


def push(cfg: Path, *args: str) -> tuple[int, str, str]:
    proc = run_cli("-c", str(cfg), "push", *args)
    return proc.returncode, proc.stdout, proc.stderr


def test_push_node_tries_a_node_in_backoff_at_once_and_reports_it(tmp_path: Path) -> None:
    require_root()  # node files are handed to the user
    cfg = push_site(tmp_path)
    assert run_cli("-c", str(cfg), "mint", USER).returncode == 0
    broken = tmp_path / "nodes" / "n1"
    broken.write_text("not a directory")  # the node's file system is broken

    rc, out, err = push(cfg)
    assert (rc, out) == (1, "delivered 1, unchanged 0, removed 0, failed 1\n"), err
    assert "n1: Not a directory" in err

    # n1 now waits 15-30 s; an explicit --node tries it at once, and says it failed.
    rc, out, err = push(cfg, "--node", "n1")
    assert (rc, out) == (1, "delivered 0, unchanged 0, removed 0, failed 1\n"), err
    assert any(line.startswith("tokenlife-push: n1: Not a directory") for line in err.splitlines())

    # Without --node the backoff holds (nothing owed elsewhere).
    rc, out, _ = push(cfg)
    assert (rc, out) == (0, "delivered 0, unchanged 0, removed 0, failed 0\n")

    broken.unlink()  # the administrator fixed the node
    rc, out, err = push(cfg, "--node", "n1")
    assert (rc, out, err) == (0, "delivered 1, unchanged 0, removed 0, failed 0\n", "")
    uid = lookup(USER).uid
    assert (broken / "run" / "tokenlife" / str(uid) / "slurm_jwt").stat().st_size > 100


def test_push_node_says_when_nothing_is_owed_to_the_node(tmp_path: Path) -> None:
    require_root()
    cfg = push_site(tmp_path)
    assert run_cli("-c", str(cfg), "mint", USER).returncode == 0
    assert push(cfg)[0] == 0

    rc, out, err = push(cfg, "--node", "n1")
    assert (rc, out) == (0, "delivered 0, unchanged 0, removed 0, failed 0\n")
    assert err == "tokenlife-push: n1: nothing owed: its 1 delivery record(s) are up to date\n"

    rc, out, err = push(cfg, "--node", "n9")
    assert (rc, out) == (0, "delivered 0, unchanged 0, removed 0, failed 0\n")
    assert err == (
        "tokenlife-push: n9: nothing owed: no delivery record (the job source knows of "
        "no job of a known user there)\n"
    )


# --- 4. store files are private, -journal included ----------------------------------------


def test_a_journal_others_can_read_is_refused_and_reported(tmp_path: Path) -> None:
    cfg = write_cli_site(tmp_path, KEY)
    db = tmp_path / "db"
    SqlTokenStore(f"sqlite:///{db}").records()
    journal = Path(f"{db}-journal")
    journal.touch()
    journal.chmod(0o644)

    with pytest.raises(StoreError, match=rf"token store {journal} has mode 0644"):
        check_sqlite_private(db)
    proc = run_cli("-c", str(cfg), "config", "check")
    assert proc.returncode == 1
    assert f"problem: store: token store {journal} has mode 0644: others could" in proc.stdout
    proc = run_cli("-c", str(cfg), "list")
    assert proc.returncode == 6
    assert proc.stderr.startswith(f"tokenlife-list: token store {journal} has mode 0644")


def test_store_files_made_by_a_root_command_are_private_whatever_the_umask(
    tmp_path: Path,
) -> None:
    require_root()
    cfg = write_cli_site(tmp_path, KEY)
    old = os.umask(0o022)
    try:
        assert run_cli("-c", str(cfg), "mint", USER).returncode == 0
        store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
        with store.transaction() as session:  # -wal and -shm exist while it is open
            session.connection().exec_driver_sql("CREATE TABLE probe (x INTEGER)")
            made = sorted(tmp_path.glob("db*"))
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in made}
        store.close()
    finally:
        os.umask(old)
    assert modes == {"db": 0o600, "db-shm": 0o600, "db-wal": 0o600}
    assert "ok" in run_cli("-c", str(cfg), "config", "check").stdout.splitlines()


# --- 6. list: superseded, not expired -----------------------------------------------------


def test_list_shows_a_superseded_token_as_superseded(tmp_path: Path) -> None:
    cfg = write_cli_site(tmp_path, KEY)
    assert run_cli("-c", str(cfg), "mint", USER).returncode == 0
    time.sleep(1.1)  # a newer iat
    assert run_cli("-c", str(cfg), "mint", USER).returncode == 0
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
    old, new = store.records(USER)
    # An expired token that nothing replaced (past renew-until) stays "expired".
    gone = dataclasses.replace(
        old, token_id="gone", user="ghost", iat=1, exp=2, renew_until=3, first_issued=1
    )
    store.save(dataclasses.replace(gone, state="expired"), "minted", "test")

    proc = run_cli("-c", str(cfg), "list")

    assert proc.returncode == 0, proc.stderr
    _header, *rows = proc.stdout.splitlines()
    table = {row.split()[-1]: row.split()[1] for row in rows if not row.startswith("note:")}
    assert table == {old.token_id: "superseded", new.token_id: "active", "gone": "expired"}
    # The superseded token is still valid in Slurm until its exp: the list says so.
    assert rows[-1] == (
        "note: 1 token(s) no longer renewed are still accepted by Slurm until "
        "their EXPIRES time (Slurm has no revocation list)"
    )
    listed = {
        r["token_id"]: r for r in json.loads(run_cli("-c", str(cfg), "list", "--json").stdout)
    }
    assert listed[old.token_id]["state"] == "superseded"
    assert listed[old.token_id]["accepted_by_slurm"] is True
    assert listed["gone"]["state"] == "expired"
    assert listed["gone"]["accepted_by_slurm"] is False
    assert listed[new.token_id]["state"] == "active"
    assert listed[new.token_id]["accepted_by_slurm"] is True


def test_a_store_failure_recording_the_jobs_is_no_job_source_failure(
    tmp_path: Path,
) -> None:
    """The store refuses to record the job source's answer (a concurrent
    pusher's row, say): what is owed still goes, and the report blames the
    store, not squeue."""
    require_root()
    from repository.delivery_store import DeliveryStore
    from tokenlife.testing.fakes import FakeJobs
    from transfer.cycle import DeliveryCycle
    from transfer.transports import LocalTransport

    store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
    Minter(Config(), StaticKeySource(KEY), store, FakeClock()).mint(USER, 0)
    jobs = FakeJobs({USER: {"n1"}})
    cycle = DeliveryCycle(store, LocalTransport(Path("/run/tokenlife"), tmp_path / "n"), jobs, 600)
    cycle.run()  # n1 is recorded and delivered
    with store.transaction() as s:  # a newer version is owed to n1
        s.connection().exec_driver_sql("UPDATE tokens SET version = version + 1")

    def refuse(*_: object, **__: object) -> None:
        raise StoreError("token store failed: UNIQUE constraint failed: deliveries.user")

    ledger = DeliveryStore(store)
    ledger.sync_needs = refuse  # type: ignore[method-assign]
    cycle.store = ledger

    summary = cycle.run()

    assert (summary.delivered + summary.unchanged, summary.failed) == (1, 0)  # owed: gone
    assert summary.jobs_error == ""
    assert summary.store_error == (
        "recording the jobs failed: token store failed: UNIQUE constraint failed: deliveries.user"
    )
