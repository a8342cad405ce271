"""`tokenlife serve` with `[pull]`: a real daemon, real munged daemons, real users.

One serve process runs for the module (it costs about a second to start),
and the checks follow its life: pulls under policy ``own`` with push over the
``local`` transport, its metrics and ``tokenlife status``; a second serve
refused the same pull port; then a SIGHUP to policy ``jobs`` with
``delivery.transport = "none"``, where the static job source alone decides
who may pull where and nothing is written to the nodes any more.

munged ``home`` serves the token host; ``node01``/``node02`` are worker nodes
of the same realm with their own origin addresses.  Pulls run as the test
users (tests/integration/harness/users.py), so munge vouches for their uids.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from producer.keys import FileKeySource
from producer.mint import Minter
from producer.pull import RESULTS, HostResolver
from repository.store import SqlTokenStore
from tests.conftest import require, require_root, require_tool, run_cli, tokenlife_bin
from tests.integration.harness.munge import MungeDaemon, MungeRealm, have_munge
from tests.integration.harness.users import ALICE, BOB, ensure_user
from tests.integration.test_pull import PULL, as_user
from tests.unit.test_metrics import free_port, parse, scrape
from tests.unit.test_serve import wait_for
from tokenlife import config as configmod

NODE01, NODE02 = "127.0.0.11", "127.0.0.12"


@dataclass
class Served:
    """The running daemon and what it was started with."""

    proc: subprocess.Popen[str]
    cfg: Path
    root: Path  # the local transport's nodes
    store: SqlTokenStore
    pull: str  # HOST:PORT of the pull service
    metrics: int
    log: Path
    home: MungeDaemon
    node01: MungeDaemon
    node02: MungeDaemon
    node01_name: str  # the name the daemon gives node01's origin address
    first: str = ""  # alice's token when the daemon started

    def config(self, policy: str, transport: str) -> str:
        nodes = f'root = "{self.root}"\n' if transport == "local" else ""
        tmp = self.cfg.parent
        return (
            f'[key]\npath = "{tmp}/k"\n'
            f'[store]\nurl = "sqlite:///{tmp}/db"\nspool_dir = "{tmp}/spool"\n'
            f'[login]\ntoken_dir = "{tmp}/run"\n[producer]\nsocket = "{tmp}/m.sock"\n'
            '[token]\nlifetime = "1h"\nrenew_until = "1d"\n'
            f'[serve]\ninterval = "1h"\nmetrics = "127.0.0.1:{self.metrics}"\n'
            f'[delivery]\ntransport = "{transport}"\njobs = "static"\n{nodes}'
            f'[delivery.static]\n{ALICE} = ["{self.node01_name}"]\n'
            f'[pull]\nlisten = "{self.pull}"\npolicy = "{policy}"\n'
            f'munge_socket = "{self.home.socket}"\n'
        )

    def scrape(self) -> dict[str, float]:
        """tokenlife_pull_requests_total by result, and tokenlife_pull_up as "up"."""
        samples = parse(scrape(self.metrics))
        pulls = {
            dict(labels)["result"]: value
            for (name, labels), value in samples.items()
            if name == "tokenlife_pull_requests_total"
        }
        return {**pulls, "up": samples[("tokenlife_pull_up", ())]}

    def last_tick(self) -> float:
        return parse(scrape(self.metrics))[("tokenlife_last_tick_success_timestamp_seconds", ())]

    def mint(self, user: str) -> str:
        """A new chain for ``user`` in the store (as root may); its token."""
        config = configmod.load(self.cfg)
        record, _ = Minter(config, FileKeySource(config.key), self.store).mint(user, 0)
        return record.token

    def audited(self, user: str) -> list[str]:
        """The pull results the audit trail holds for ``user``, oldest first."""
        events = reversed(self.store.events(user))  # newest first
        return [str(e["event"]) for e in events if str(e["event"]).startswith("pull_")]


def pull_as(user: str, node: MungeDaemon, served: Served) -> subprocess.CompletedProcess[str]:
    return as_user(user, PULL, served.pull, str(node.socket))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require_root()
    require(have_munge(), "needs munge (munged, libmunge2) and the munge account")
    require_tool("setpriv")
    ensure_user(ALICE)
    ensure_user(BOB)
    tmp = tmp_path_factory.mktemp("pullserve")
    key = tmp / "k"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    with MungeRealm("tl-pullserve-") as realm:
        home = realm.start("home")
        served = Served(
            proc=None,  # type: ignore[arg-type]
            cfg=tmp / "c.toml",
            root=tmp / "nodes",
            store=SqlTokenStore(f"sqlite:///{tmp}/db"),
            pull=f"127.0.0.1:{free_port()}",
            metrics=free_port(),
            log=tmp / "serve.log",
            home=home,
            node01=realm.start("node01", home.key, origin=NODE01),
            node02=realm.start("node02", home.key, origin=NODE02),
            node01_name=HostResolver()(NODE01),  # as the daemon will name it
        )
        served.cfg.write_text(served.config("own", "local"))
        served.first = served.mint(ALICE)  # before the start: its first tick pushes it
        with served.log.open("w") as log:
            served.proc = subprocess.Popen(
                [tokenlife_bin(), "-c", str(served.cfg), "-v", "serve"], stderr=log, text=True
            )
        try:
            yield served
        finally:
            if served.proc.poll() is None:
                served.proc.send_signal(signal.SIGTERM)
                try:
                    served.proc.wait(20)
                except subprocess.TimeoutExpired:
                    served.proc.kill()
                    served.proc.wait()


def test_a_pull_gets_the_stores_current_token_counted_in_metrics_and_status(
    served: Served,
) -> None:
    token = served.first

    def ticked() -> bool:
        try:
            return served.last_tick() > 0
        except OSError:
            return False  # not listening yet

    wait_for(ticked, 20)
    before = served.scrape()
    assert set(before) == {*RESULTS, "up"}  # every result, at 0 from the start
    assert before == {**dict.fromkeys(RESULTS, 0.0), "up": 1.0}

    done = pull_as(ALICE, served.node02, served)  # policy own: any host of the realm
    assert done.returncode == 0, done.stderr
    current = served.store.current(ALICE)
    assert current is not None and done.stdout.strip() == current.token == token
    refused = pull_as(BOB, served.node01, served)  # bob holds no token
    assert refused.returncode == 1 and refused.stderr.startswith("no_token:"), refused.stderr

    after = served.scrape()
    assert after == {**before, "ok": 1.0, "no_token": 1.0}
    # the audit trail (written in batches, within a second), and status reading it
    wait_for(lambda: served.audited(ALICE) == ["pull_ok"], 10)
    assert served.audited(BOB) == ["pull_no_token"]
    status = run_cli("-c", str(served.cfg), "status", "--json")
    assert status.returncode == 0, status.stderr
    pulls = json.loads(status.stdout)["pulls_24h"]
    assert pulls == {**dict.fromkeys(pulls, 0), "ok": 1, "no_token": 1}
    assert "busy" not in pulls and "timeout" not in pulls  # counted, never audited
    text = run_cli("-c", str(served.cfg), "status").stdout
    assert "pulls       1 ok, 1 no_token in the last 24h" in text.splitlines()
    # and push, under this configuration, put the same token on node01
    uid = pwd.getpwnam(ALICE).pw_uid
    on_node = served.root / served.node01_name / "run/tokenlife" / str(uid) / "slurm_jwt"
    assert on_node.read_text() == token


def test_a_second_serve_on_a_taken_pull_port_does_not_start(served: Served, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    text = served.config("own", "local").replace(f"127.0.0.1:{served.metrics}", "")
    other.write_text(text.replace(f"{served.cfg.parent}/m.sock", f"{tmp_path}/m.sock"))
    started = time.monotonic()
    second = subprocess.run(
        [tokenlife_bin(), "-c", str(other), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 1, second.stderr
    assert second.stderr.splitlines() == [
        f"tokenlife-serve: cannot serve pulls: pull.listen {served.pull}: Address already in use"
    ]
    assert time.monotonic() - started < 20
    assert not (tmp_path / "m.sock").exists()  # it stopped before its mint socket
    assert served.proc.poll() is None and served.scrape()["up"] == 1  # the first one serves on


def test_a_reload_to_policy_jobs_and_transport_none(served: Served) -> None:
    uid = pwd.getpwnam(ALICE).pw_uid
    on_node = served.root / served.node01_name / "run/tokenlife" / str(uid) / "slurm_jwt"
    pushed = on_node.read_text()
    before = served.scrape()
    assert pull_as(ALICE, served.node02, served).returncode == 0  # "own": yes

    served.cfg.write_text(served.config("jobs", "none"))
    reloads = served.log.read_text().count("configuration reloaded")
    served.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: served.log.read_text().count("configuration reloaded") > reloads, 20)
    token = served.mint(ALICE)  # a new chain: what a node may pull now, and push would write
    ticked = served.last_tick()
    served.proc.send_signal(signal.SIGALRM)
    wait_for(lambda: served.last_tick() > ticked, 20)

    done = pull_as(ALICE, served.node01, served)  # the static job source: alice works there
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == token != pushed
    refused = pull_as(ALICE, served.node02, served)  # but not here any more
    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.startswith("refused_policy:"), refused.stderr
    assert "no work of this user on this host" in refused.stderr
    assert on_node.read_text() == pushed  # transport none: the tick wrote nothing
    assert served.scrape() == {**before, "ok": before["ok"] + 2, "refused_policy": 1.0}
    log = served.log.read_text()
    assert log.count("delivery: delivered 1") == 1  # the first tick's push only
    assert "pull: policy now jobs" in log  # swapped in place: the same server serves on
    assert served.proc.poll() is None
