"""A pull-only cluster: no push anywhere, and a job's first task has its token.

``tokenlife serve`` runs with ``[delivery] transport = "none"`` and the pull
service on; the node has nothing of the user's before the job. The shipped
Prolog (systemd/slurm/prolog.sh, as root on the node) creates the user's
token directory and pulls as the user, munge vouching for the user through
the cluster's own munged; the shipped TaskProlog then exports SLURM_JWT into
the batch step, whose plain ``squeue`` (the wrapper hands it the token)
works. Real Slurm on each release (22.05 on the host, 24.11 in a Debian 13
root, whose own Python and libmunge then run the engine), real munged, real
PAM-free minting: nothing here is faked.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from repository.store import SqlTokenStore
from tests.conftest import REPO, run_cli, run_engine, tokenlife_bin, wait_for
from tests.integration.conftest import SlurmTarget, write_hs_key, write_task_prolog
from tests.integration.harness.slurm import SlurmCluster, free_port

pytestmark = pytest.mark.slurm

JOB = r"""#!/bin/sh
echo "token=${SLURM_JWT:-none}"
out=$(squeue -h -j "$SLURM_JOB_ID" -o %i 2>&1)
echo "squeue=$out"
kept="$TOKEN_DIR/$(id -u)/slurm_jwt"
echo "kept=$(cat "$kept")"
echo "kept_stat=$(stat -c '%u %a' "$kept")"
"""
# Runs until FLAG exists (60 s at most): a job of the user still on the node.
WAITER = r"""#!/bin/sh
i=0
while [ ! -e "$FLAG" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
"""


@dataclass
class Site:
    cluster: SlurmCluster
    work: Path
    config: Path
    token_dir: Path


def write_prolog(path: Path, engine: Path, config: Path, log: Path, token_dir: Path) -> None:
    """The shipped Prolog with this cluster's engine, config, log and token directory."""
    text = (REPO / "systemd" / "slurm" / "prolog.sh").read_text()
    for shipped, ours in (
        (
            "ENGINE=/usr/local/bin/tokenlife-engine",
            f"ENGINE={engine}\nexport TOKENLIFE_CONFIG={config}",
        ),
        ("LOG=/var/log/tokenlife/pull-prolog.log", f"LOG={log}"),
        ("TOKEN_DIR=/run/tokenlife", f"TOKEN_DIR={token_dir}"),
    ):
        assert shipped in text, f"prolog.sh no longer says {shipped!r}"
        text = text.replace(shipped, ours, 1)
    path.write_text(text)
    path.chmod(0o755)


def write_epilog(path: Path, token_dir: Path) -> None:
    """The shipped Epilog with this node's token directory."""
    text = (REPO / "systemd" / "slurm" / "epilog.sh").read_text()
    assert "TOKEN_DIR=/run/tokenlife\n" in text
    path.write_text(text.replace("TOKEN_DIR=/run/tokenlife\n", f"TOKEN_DIR={token_dir}\n", 1))
    path.chmod(0o755)


@pytest.fixture(scope="module")
def site(test_users: tuple[str, str], slurm_target: SlurmTarget) -> Iterator[Site]:
    _, bob = test_users
    work = Path(tempfile.mkdtemp(prefix="tl-pullonly-"))
    work.chmod(0o755)
    try:
        with contextlib.ExitStack() as stack:
            (work / "jobs").mkdir()
            (work / "jobs").chmod(0o1777)
            token_dir = work / "node-tokens"  # the node's /run/tokenlife: root's, 0755
            token_dir.mkdir(mode=0o755)
            key = write_hs_key(work / "jwt_hs256.key")
            task_prolog, prolog = work / "taskprolog.sh", work / "prolog.sh"
            epilog = work / "epilog.sh"
            cluster = SlurmCluster(
                work / "cluster",
                key,
                task_prolog=task_prolog,
                extra_conf=f"Prolog={prolog}\nEpilog={epilog}\n",
                open_munge=True,
                system_root=slurm_target.system_root,
            )
            pull = f"127.0.0.1:{free_port()}"
            config = work / "tokenlife.toml"
            config.write_text(
                f'[key]\npath = "{key}"\n'
                f'[store]\nurl = "sqlite:///{work}/db.sqlite"\nspool_dir = "{work}/spool"\n'
                f'[login]\ntoken_dir = "{work}/login"\n'
                f'[producer]\nsocket = "{work}/mint.sock"\n'
                '[serve]\ninterval = "1h"\nmetrics = ""\n'
                '[delivery]\ntransport = "none"\njobs = "static"\n'
                f'[delivery.static]\n{bob} = ["{cluster.node_name}"]\n'
                f'[pull]\nlisten = "{pull}"\npolicy = "own"\n'
                f'munge_socket = "{cluster.munge_socket}"\n'
            )
            engine_config = work / "engine.toml"
            engine_config.write_text(
                f'[engine]\ntoken_dir = "{token_dir}"\nwrapper_dir = "{work}/wrappers"\n'
                f'pull = "{pull}"\npull_timeout = 5\npull_server_user = "root"\n'
                f'munge_socket = "{cluster.munge_socket}"\n'
            )
            engine_config.chmod(0o644)
            installed = run_engine(engine_config, "install-wrappers")
            assert installed.returncode == 0, installed.stderr
            write_task_prolog(task_prolog, cluster.engine, engine_config)
            write_prolog(prolog, cluster.engine, engine_config, work / "prolog.log", token_dir)
            write_epilog(epilog, token_dir)
            stack.enter_context(cluster)
            slurm_target.check(cluster)
            yield Site(cluster, work, config, token_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def claims(token: str) -> dict[str, object]:
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


@contextlib.contextmanager
def serving(site: Site) -> Iterator[None]:
    """``tokenlife serve`` (pull on, push off) for the duration."""
    log_path = site.work / "serve.log"
    with open(log_path, "ab") as log:
        serve = subprocess.Popen(
            [tokenlife_bin(), "-c", str(site.config), "-v", "serve"], stderr=log
        )
    try:
        deadline = time.monotonic() + 30
        while not (site.work / "mint.sock").exists():
            assert serve.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield
    finally:
        serve.terminate()
        serve.wait(20)


def submit(site: Site, user: str, name: str, body: str, **env: str) -> str:
    script = site.work / f"{name}.sh"
    script.write_text(body)
    script.chmod(0o755)
    argv = ["sbatch", "--parsable", f"--output={site.work}/jobs/%j", str(script)]
    env = {"PATH": site.cluster.job_path(), "TOKEN_DIR": str(site.token_dir), **env}
    submitted = site.cluster.run_as(user, argv, env=env)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


def gone(site: Site, job: str) -> Callable[[], bool]:
    """The job left the queue (its Epilog may still run)."""
    return lambda: (
        not site.cluster.root_run(["squeue", "-h", "-j", job], check=False).stdout.strip()
    )


def test_the_first_task_of_a_job_has_its_token_by_pull_alone(
    site: Site, test_users: tuple[str, str]
) -> None:
    _, bob = test_users
    uid = pwd.getpwnam(bob).pw_uid
    minted = run_cli("-c", str(site.config), "mint", bob, "--local")
    assert minted.returncode == 0, minted.stderr
    directory = site.token_dir / str(uid)
    kept = directory / "slurm_jwt"
    with serving(site):
        assert not directory.exists()  # nothing on the node before the job
        job = submit(site, bob, "job", JOB)
        wait_for(gone(site, job), "the job to end", 60, every=0.2, detail=site.cluster.logs)
        # Pulls are audited in batches, a second or so after they happen.
        deadline = time.monotonic() + 15
        while True:
            status = json.loads(run_cli("-c", str(site.config), "status", "--json").stdout)
            if status["pulls_24h"]["ok"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)

    output = (site.work / "jobs" / job).read_text()
    said = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    store = SqlTokenStore(f"sqlite:///{site.work}/db.sqlite")
    try:
        current = store.current(bob)
    finally:
        store.engine.dispose()
    assert current is not None
    context = f"{output}\n--- prolog ---\n{_read(site.work / 'prolog.log')}"
    # The batch step's SLURM_JWT is the store's token for bob, valid; squeue took it.
    assert said.get("token") == current.token, context
    assert claims(current.token)["sun"] == bob
    assert said.get("squeue") == job, context
    # The Prolog made the user's directory as push would (0700, the user's) and
    # the pull kept the token there 0600 while the job ran; one pull, no
    # failure, no push.
    info = directory.stat()
    assert (info.st_uid, oct(info.st_mode & 0o777)) == (uid, "0o700")
    assert said.get("kept") == current.token, context
    assert said.get("kept_stat") == f"{uid} 600", context
    assert status["pulls_24h"]["ok"] >= 1, status
    assert sum(status["pulls_24h"].values()) == status["pulls_24h"]["ok"], status
    assert _read(site.work / "prolog.log") == "", "the Prolog logs failures only"
    assert os.path.getsize(site.work / "serve.log") > 0
    # The job was bob's last on the node: its Epilog removed the pulled token
    # (and the job's mark); the directory stays, as push leaves it.
    wait_for(
        lambda: not kept.exists(),
        "the Epilog to remove the pulled token",
        30,
        every=0.2,
        detail=site.cluster.logs,
    )
    assert directory.is_dir() and list((site.token_dir / ".jobs").iterdir()) == []


def test_a_pulled_token_stays_while_another_job_of_the_user_runs_there(
    site: Site, test_users: tuple[str, str]
) -> None:
    _, bob = test_users
    uid = pwd.getpwnam(bob).pw_uid
    kept = site.token_dir / str(uid) / "slurm_jwt"
    marks = site.token_dir / ".jobs"
    flag = site.work / "jobs" / "waiter.done"
    with serving(site):
        waiter = submit(site, bob, "waiter", WAITER, FLAG=str(flag))
        wait_for(
            kept.exists, "the waiter's Prolog to pull", 60, every=0.2, detail=site.cluster.logs
        )
        quick = submit(site, bob, "quick", "#!/bin/sh\ntrue\n")
        wait_for(gone(site, quick), "the quick job to end", 60, every=0.2, detail=site.cluster.logs)
        wait_for(
            lambda: not (marks / f"{uid}.{quick}").exists(),
            "the quick job's Epilog to run",
            30,
            every=0.2,
            detail=site.cluster.logs,
        )
        assert kept.exists()  # the waiter still runs here: its token stays
        assert (marks / f"{uid}.{waiter}").exists()
        flag.touch()
        wait_for(gone(site, waiter), "the waiter to end", 60, every=0.2, detail=site.cluster.logs)
        wait_for(
            lambda: not kept.exists(),
            "the Epilog to remove the pulled token",
            30,
            every=0.2,
            detail=site.cluster.logs,
        )
    assert list(marks.iterdir()) == []


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
