"""The README's first command: `tokenlife demo` runs the whole lifecycle.

The demo runs as a real process (the installed console script) in real time,
about 20 s each, so the runs start together (a module fixture) and each test
waits for its own.  What is checked is the outcome, read from the store the
demo kept, from the files it left (none on the nodes) and from what the
engine printed, never the narration's wording.  Each run gets its own TMPDIR
and HOME, so "nothing left behind" is exact: TMPDIR holds only the work dir
(or nothing), HOME stays empty.
"""

from __future__ import annotations

import collections
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from repository.store import SqlTokenStore
from tests.conftest import require, require_root, require_tool, tokenlife_bin
from tokenlife.app.demo import NODES, RENEW_UNTIL
from tokenlife.records import TokenRecord

MAX_SECONDS = 60
ORDINARY = "nobody"


@dataclass
class DemoRun:
    """One ``tokenlife demo`` process and what it printed."""

    tmp: Path  # its TMPDIR: the work dir is made here
    home: Path  # its HOME
    uid: int
    argv: list[str]
    env: dict[str, str]
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    seconds: float = 0.0
    _thread: threading.Thread | None = field(default=None, repr=False)
    _proc: subprocess.Popen[str] | None = field(default=None, repr=False)

    def start(self) -> DemoRun:
        started = time.monotonic()
        self._proc = proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=self.tmp,
        )

        def collect() -> None:
            try:
                self.stdout, self.stderr = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                self.stdout, self.stderr = proc.communicate()
            self.seconds = time.monotonic() - started
            self.returncode = proc.returncode

        self._thread = threading.Thread(target=collect, daemon=True)
        self._thread.start()
        return self

    def wait(self) -> DemoRun:
        assert self._thread is not None
        self._thread.join(150)
        assert self.returncode is not None, "the demo did not finish"
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._thread is not None:
            self._thread.join(10)


def _env(tmp: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENLIFE_", "SLURM_"))}
    return {**env, "TMPDIR": str(tmp), "HOME": str(home)}


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(ORDINARY)
    except KeyError:
        return None


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, DemoRun]]:
    runs: dict[str, DemoRun] = {}
    made: list[Path] = []
    for name, args in (("keep", ["--keep"]), ("plain", [])):
        base = tmp_path_factory.mktemp(f"demo-{name}")
        tmp, home = base / "tmp", base / "home"
        tmp.mkdir()
        home.mkdir()
        argv = [tokenlife_bin(), "demo", *args]
        runs[name] = DemoRun(tmp, home, os.getuid(), argv, _env(tmp, home))
    nobody = _nobody()
    if os.geteuid() == 0 and nobody is not None and shutil.which("setpriv"):
        # pytest's own tmp dirs are private to root: this one is nobody's.
        tmp = Path(tempfile.mkdtemp(prefix="tokenlife-demo-test-"))
        made.append(tmp)
        os.chown(tmp, nobody.pw_uid, nobody.pw_gid)
        setpriv = [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
        ]
        argv = [*setpriv, tokenlife_bin(), "demo", "--keep"]
        home = Path("/nonexistent")
        runs["nobody"] = DemoRun(tmp, home, nobody.pw_uid, argv, _env(tmp, home))
    for run in runs.values():
        run.start()
    yield runs
    for run in runs.values():
        run.stop()
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def _events(work: Path) -> tuple[list[TokenRecord], list[dict[str, object]]]:
    store = SqlTokenStore(f"sqlite:///{work}/tokenlife.db")
    try:
        return store.records(), store.events()
    finally:
        store.engine.dispose()


def check_lifecycle(run: DemoRun) -> None:
    """The outcome of a kept run: store, files and engine output."""
    assert run.returncode == 0, run.stderr
    assert RENEW_UNTIL <= run.seconds < MAX_SECONDS  # real time, and under a minute
    (work,) = run.tmp.iterdir()  # the kept work dir, nothing else
    records, events = _events(work)
    first, second = records
    assert {first.uid, second.uid} == {run.uid}

    # mint, renewals up to renew-until, expiry
    assert first.state == "expired"
    assert first.exp == first.renew_until
    renewed = [e for e in events if e["event"] == "renewed" and e["token_id"] == first.token_id]
    assert len(renewed) >= 3 and len(renewed) == first.version - 1
    (expired,) = [e for e in events if e["event"] == "expired"]
    assert expired["token_id"] == first.token_id
    assert isinstance(expired["at"], int) and expired["at"] >= first.renew_until

    # revocation of the second login's token
    assert second.state == "revoked" and second.version == 1
    (revoked,) = [e for e in events if e["event"] == "revoked"]
    assert revoked["token_id"] == second.token_id
    counts = collections.Counter(e["event"] for e in events)
    assert counts["minted"] == 2

    # every version reached every node, and every node lost it again
    delivered = {
        (e["token_id"], e["version"], e["reason"]) for e in events if e["event"] == "delivered"
    }
    wanted = {(first.token_id, v) for v in range(1, first.version + 1)}
    wanted.add((second.token_id, 1))
    for token_id, version in wanted:
        for node in NODES:
            assert (token_id, version, f"node {node}") in delivered
    removed = sorted(str(e["reason"]) for e in events if e["event"] == "removed")
    assert removed == sorted(f"node {n}" for n in NODES * 2)  # after expiry, after revoke
    assert sorted(p.name for p in (work / "nodes").iterdir()) == sorted(NODES)
    assert list((work / "nodes").rglob("slurm_jwt")) == []
    assert not (work / "login" / str(run.uid) / "slurm_jwt").exists()  # revoke removed it

    # tokenlife-engine env exported SLURM_JWT once (while the token was valid), and
    # no token was ever printed in full
    exports = [line for line in run.stdout.splitlines() if "export SLURM_JWT=" in line]
    assert len(exports) == 1
    for record in records:
        assert record.token and record.token not in run.stdout + run.stderr
    shutil.rmtree(work)


def test_demo_runs_the_whole_lifecycle(demos: dict[str, DemoRun]) -> None:
    run = demos["keep"].wait()
    check_lifecycle(run)
    assert list(run.home.iterdir()) == []


def test_demo_leaves_nothing_behind(demos: dict[str, DemoRun]) -> None:
    run = demos["plain"].wait()
    assert run.returncode == 0, run.stderr
    assert run.seconds < MAX_SECONDS
    first_line = run.stdout.splitlines()[0]
    work = re.search(re.escape(str(run.tmp)) + r"/[^\s)]+", first_line)
    assert work is not None, first_line
    assert not Path(work.group(0)).exists()
    assert list(run.tmp.iterdir()) == []
    assert list(run.home.iterdir()) == []


def test_demo_as_an_ordinary_user(demos: dict[str, DemoRun]) -> None:
    """As root, the same demo as ``nobody`` (HOME=/nonexistent): local delivery
    hands the node files to the user itself, with no privilege at all."""
    require_root()  # outside CI, as an ordinary user, the other tests already ran it so
    require(_nobody() is not None, f"needs a user named {ORDINARY}")
    require_tool("setpriv")
    run = demos["nobody"].wait()
    check_lifecycle(run)
    assert not run.home.exists()
