"""The whole suite at once, on a job that outlives its token many times over.

A real ``tokenlife serve`` (renewer plus SSH delivery, ticking every second)
keeps a 10-second token alive; a chain is renewable for 40 s only, and the
user logs in again (``tokenlife pam``, as the PAM line runs it) every 25 s,
each login starting a new chain. The job runs for ten token lifetimes, over
several chains, on node01, a real sshd node whose slurmd runs in the node's
mount namespace, with the shipped defaults (SLURM_JWT in every step, the
Slurm wrappers first in PATH). Two things run side by side in it:

* the batch step calls plain ``squeue`` every two seconds: its SLURM_JWT was
  captured when the job started and expires after ten seconds, so every call
  after that succeeds only because the wrapper hands squeue the token that
  was delivered since (and JWT is all squeue uses while SLURM_JWT is set);
* under ``tokenlife-engine run``, ``tokenlife-engine exec -- squeue`` every
  few seconds, and a sampler that checks ``$SLURM_JWT_FILE`` five times a
  second for an expired token.

Beside it, a second user's job under ``tokenlife-engine run`` gets no new
login: its stderr says that the token cannot be renewed any more before the
chain's renew-until comes (and the token expires).

The node also pulls (``[engine] pull``, munge-authenticated, from the same
``tokenlife serve``), and the push is cut for 3.5 token lifetimes in the
middle of the job: on 22.05 node01's sshd is stopped (its files and slurmd
stay); on 24.11, whose node is a directory the system root shares, the
daemon is reloaded with ``[delivery] transport = "none"`` and, after the
cut, with its transport again.  Every call above must still succeed,
carried by pulls alone (on 24.11 the engine runs on Debian 13's Python and
libmunge), and after the push is back, push and pull agree on the newest
token.
"""

from __future__ import annotations

import contextlib
import json
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from repository.store import SqlTokenStore
from tests.conftest import require_tool, run_cli, run_engine, tokenlife_bin
from tests.integration.conftest import SLURM_TOOLS, SlurmTarget, write_hs_key, write_task_prolog
from tests.integration.harness.slurm import SlurmCluster, free_port
from tests.integration.harness.sshnodes import SshNodes

pytestmark = pytest.mark.slurm
NODE = "node01"
LIFETIME = 10
RENEWABLE = 40  # each chain's renew-until, from its first token
LOGIN_EVERY = 25  # seconds between the first user's logins: each starts a chain
JOB_SECONDS = 100  # 10 lifetimes, over several chains
CHAIN_END_JOB = RENEWABLE + 15  # the second user's job: past its only chain's end
CUT_FROM, CUT_SECONDS = 20, 35  # no push from 20 s into the job, for 3.5 lifetimes


@dataclass
class Site:
    cluster: SlurmCluster
    work: Path
    config: Path
    nodes: SshNodes | None = None  # 22.05: the sshd node; 24.11: None (local delivery)

    def node_file(self, uid: int) -> str:
        """The user's token file on node01, as the node holds it."""
        if self.nodes is not None:
            return self.nodes[NODE].read_text(f"/run/tokenlife/{uid}/slurm_jwt")
        return (
            self.work / "nodes" / NODE / "run" / "tokenlife" / str(uid) / "slurm_jwt"
        ).read_text()

    def cut_push(self, serve: subprocess.Popen[bytes], cut: bool) -> None:
        """Stop (``cut``) or restore the push to node01, the node's files and slurmd untouched."""
        if self.nodes is not None:
            if cut:
                self.nodes.cut_sshd(NODE)  # ssh refused
            else:
                self.nodes.start_node(NODE)
            return
        local, none = 'transport = "local"', 'transport = "none"'
        text = self.config.read_text()
        self.config.write_text(text.replace(local, none) if cut else text.replace(none, local))
        serve.send_signal(signal.SIGHUP)


# Samples $SLURM_JWT_FILE (the per-job copy) every 0.2 s; reports the longest
# time it held an expired token, and how often it was missing.
SAMPLER = r"""
import base64, json, os, sys, time
path, end = os.environ["SLURM_JWT_FILE"], time.time() + float(sys.argv[1])
samples = missing = 0
worst = 0.0
seen = set()
while time.time() < end:
    samples += 1
    try:
        token = open(path).read()
    except FileNotFoundError:
        missing += 1
    else:
        part = token.split(".")[1]
        exp = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))["exp"]
        seen.add(token)
        worst = max(worst, time.time() - exp)
    time.sleep(0.2)
print(f"sampler samples={samples} missing={missing} tokens={len(seen)} worst={worst:.2f}")
"""

# The batch step itself: plain squeue, as any job script calls it.
PLAIN = r"""
end=$(( $(date +%s) + SECONDS_TO_RUN ))
ok=0; failed=0
while [ "$(date +%s)" -lt "$end" ]; do
  if out=$(squeue -h -j "$SLURM_JOB_ID" -o %i 2>&1) && [ "$out" = "$SLURM_JOB_ID" ]; then
    ok=$((ok + 1))
  else
    failed=$((failed + 1)); echo "batch squeue failed at $(date +%s): $out"
  fi
  sleep 2
done
echo "plain plain_ok=$ok plain_failed=$failed"
"""

INNER = r"""
python3 "$WORK/sampler.py" "$SECONDS_TO_RUN" &
end=$(( $(date +%s) + SECONDS_TO_RUN ))
ok=0; failed=0
while [ "$(date +%s)" -lt "$end" ]; do
  if out=$(tokenlife-engine exec -- squeue -h -j "$SLURM_JOB_ID" -o %i 2>&1) \
     && [ "$out" = "$SLURM_JOB_ID" ]; then
    ok=$((ok + 1))
  else
    failed=$((failed + 1)); echo "failure at $(date +%s): $out"
  fi
  sleep 3
done
wait
echo "calls ok=$ok failed=$failed"
"""


@pytest.fixture(scope="module")
def site(test_users: tuple[str, str], slurm_target: SlurmTarget) -> Iterator[Site]:
    """22.05: delivery over SSH to a real sshd node whose namespace slurmd runs
    in. 24.11 (in its system root): local delivery into a directory the root
    shares; the renewal, the wrappers and the engine are the same."""
    require_tool("python3")
    if slurm_target.system_root is None:
        require_tool(*SLURM_TOOLS, "sshd", "unshare", "nsenter", "ssh-keygen")
    alice, bob = test_users
    work = Path(tempfile.mkdtemp(prefix="tl-longjob-"))
    work.chmod(0o755)
    try:
        with contextlib.ExitStack() as stack:
            (work / "jobs").mkdir()
            (work / "jobs").chmod(0o1777)
            key = write_hs_key(work / "jwt_hs256.key")
            (work / "sampler.py").write_text(SAMPLER)
            (work / "inner.sh").write_text(INNER)
            (work / "plain.sh").write_text(PLAIN)
            config = work / "tokenlife.toml"
            config_text = (
                f'[key]\npath = "{key}"\n'
                f'[token]\nlifetime = "{LIFETIME}"\nrenew_until = "{RENEWABLE}"\n'
                'renew_before = "5"\n'
                f'[store]\nurl = "sqlite:///{work}/db.sqlite"\nspool_dir = "{work}/spool"\n'
                f'[login]\ntoken_dir = "{work}/login"\n'
                f'[producer]\nsocket = "{work}/mint.sock"\n'
                '[serve]\ninterval = "1"\nmetrics = ""\n'
                f'[delivery.static]\n{alice} = ["{NODE}"]\n{bob} = ["{NODE}"]\n'
            )
            # The node's engine: the defaults, with the wrappers installed here.
            engine = f'[engine]\nwrapper_dir = "{work}/wrappers"\n'
            prolog = work / "taskprolog.sh"
            nodes: SshNodes | None = None
            if slurm_target.system_root is None:
                nodes = stack.enter_context(SshNodes(work / "ssh", 1))
                enter = ["nsenter", f"--target={nodes[NODE].pid}", "--mount", "--"]
                cluster = SlurmCluster(
                    work / "cluster",
                    key,
                    task_prolog=prolog,
                    node_name=NODE,
                    slurmd_prefix=enter,
                    open_munge=True,
                )
                config_text += (
                    '[delivery]\ntransport = "ssh"\njobs = "static"\n'
                    "[delivery.ssh]\n"
                    f'identity_file = "{nodes.client_key}"\n'
                    f'known_hosts = "{nodes.known_hosts}"\n'
                    f'ssh_config = "{nodes.ssh_config}"\n'
                    f"port = {nodes.port}\n"
                )
            else:
                cluster = SlurmCluster(
                    work / "cluster",
                    key,
                    task_prolog=prolog,
                    node_name=NODE,
                    open_munge=True,
                    system_root=slurm_target.system_root,
                )
                config_text += (
                    f'[delivery]\ntransport = "local"\nroot = "{work}/nodes"\n'
                    'remote_dir = "/run/tokenlife"\njobs = "static"\n'
                )
                engine += f'token_dir = "{work}/nodes/{NODE}/run/tokenlife"\n'
            # Pull beside push: the cluster's munged vouches for the job's user.
            pull = f"127.0.0.1:{free_port()}"
            config_text += (
                f'[pull]\nlisten = "{pull}"\npolicy = "own"\n'
                f'munge_socket = "{cluster.munge_socket}"\n'
            )
            engine += (
                f'pull = "{pull}"\npull_timeout = 5\npull_server_user = "root"\n'
                f'munge_socket = "{cluster.munge_socket}"\n'
            )
            config.write_text(config_text)
            engine_config = work / "engine.toml"
            engine_config.write_text(engine)
            engine_config.chmod(0o644)
            installed = run_engine(engine_config, "install-wrappers")
            assert installed.returncode == 0, installed.stderr
            write_task_prolog(prolog, cluster.engine, engine_config)
            stack.enter_context(cluster)
            slurm_target.check(cluster)
            yield Site(cluster, work, config, nodes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def login(site: Site, user: str) -> None:
    """What the PAM line does at a login: ``tokenlife pam`` asks the running service."""
    env = {"PAM_TYPE": "open_session", "PAM_USER": user}
    sock = site.work / "mint.sock"
    proc = run_cli("-c", str(site.config), "pam", "--socket", str(sock), env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def submit(site: Site, user: str, name: str, body: str) -> str:
    script = site.work / f"{name}.sh"
    script.write_text(
        "#!/bin/sh\n"
        # the node's engine settings, for run and exec as for the TaskProlog
        f"export TOKENLIFE_CONFIG={site.work}/engine.toml\n" + body
    )
    script.chmod(0o755)
    path = site.cluster.job_path()
    argv = ["sbatch", "--parsable", f"--output={site.work}/jobs/{name}-%j", str(script)]
    submitted = site.cluster.run_as(user, argv, env={"PATH": path})
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


def test_long_job_keeps_a_valid_token_for_its_whole_life(
    site: Site, test_users: tuple[str, str]
) -> None:
    alice, bob = test_users
    for user in (alice, bob):
        proc = run_cli("-c", str(site.config), "mint", user, "--local")
        assert proc.returncode == 0, proc.stderr
    first_login = time.monotonic()
    # A file, not a pipe: nobody reads a pipe while the job runs, and a
    # full one would stall the daemon's logging, and with it its renewals.
    serve_log_path = site.work / "serve.log"
    with open(serve_log_path, "wb") as log:
        serve = subprocess.Popen(
            [tokenlife_bin(), "-c", str(site.config), "-v", "serve"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        # The first deliveries must be on the node before the jobs start.
        deadline = time.monotonic() + 30
        while run_cli("-c", str(site.config), "list", "--json").stdout.count("delivered") < 2:
            assert time.monotonic() < deadline and serve.poll() is None, "no first delivery"
            time.sleep(0.5)
        job = submit(
            site,
            alice,
            "alice",
            f"export WORK={site.work} SECONDS_TO_RUN={JOB_SECONDS}\n"
            f"tokenlife-engine run -- /bin/sh {site.work}/inner.sh &\n"
            f"/bin/sh {site.work}/plain.sh\n"
            "wait\n",
        )
        bob_job = submit(site, bob, "bob", f"exec tokenlife-engine run -- sleep {CHAIN_END_JOB}\n")
        logins = 1
        started = time.monotonic()
        cut = "before"
        deadline = time.monotonic() + JOB_SECONDS + 60
        while site.cluster.root_run(["squeue", "-h", "-j", job], check=False).stdout.strip():
            assert time.monotonic() < deadline, f"job did not end\n{site.cluster.logs()}"
            assert serve.poll() is None, "tokenlife serve died"
            if time.monotonic() - first_login >= logins * LOGIN_EVERY:
                login(site, alice)
                logins += 1
            into_job = time.monotonic() - started
            if cut == "before" and into_job >= CUT_FROM:
                site.cut_push(serve, cut=True)  # no push; files, slurmd and the job stay
                cut = "during"
            elif cut == "during" and into_job >= CUT_FROM + CUT_SECONDS:
                site.cut_push(serve, cut=False)
                cut = "after"
            time.sleep(1)
        assert cut == "after", f"the job ended before the push was back ({cut})"
        while site.cluster.root_run(["squeue", "-h", "-j", bob_job], check=False).stdout.strip():
            assert time.monotonic() < deadline, f"job did not end\n{site.cluster.logs()}"
            time.sleep(1)
    finally:
        serve.terminate()
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    serve_log = serve_log_path.read_text()
    output = (site.work / "jobs" / f"alice-{job}").read_text()
    stats = dict(
        pair.split("=")
        for line in output.splitlines()
        if line.startswith(("calls ", "sampler ", "plain "))
        for pair in line.split()[1:]
    )
    context = f"{output}\n--- serve ---\n{serve_log[-3000:]}"
    assert int(stats["failed"]) == 0 and int(stats["ok"]) >= JOB_SECONDS // 4, context
    # Plain squeue in the batch step: every call worked, long after the
    # token the step started with had expired, and past the first chain's end.
    assert int(stats["plain_failed"]) == 0, context
    assert int(stats["plain_ok"]) >= JOB_SECONDS // 3, context
    # The token was renewed and re-delivered many times while the job ran ...
    assert int(stats["tokens"]) >= JOB_SECONDS // LIFETIME, context
    # ... and the job's file never held an expired token for more than a second.
    assert float(stats["worst"]) <= 1.0 and int(stats["missing"]) == 0, context
    # The job outlived its first chain by far: the logins started new ones.
    records = json.loads(run_cli("-c", str(site.config), "list", "--json").stdout)
    chains = {r["token_id"] for r in records if r["user"] == alice}
    assert len(chains) >= JOB_SECONDS // LOGIN_EVERY, records
    # Bob logged in once: his job was told before the chain's renew-until
    # (the warning comes before the expiry), and then lost the token.
    said = (site.work / "jobs" / f"bob-{bob_job}").read_text().splitlines()
    warned = [i for i, line in enumerate(said) if "cannot be renewed past its renew-until" in line]
    expired = [i for i, line in enumerate(said) if "token EXPIRED" in line]
    assert len(warned) == 1 and len(expired) == 1, said
    assert warned[0] < expired[0], said
    assert "log in again" in said[warned[0]]
    pulls_carried_the_cut(site, alice, serve_log)


def pulls_carried_the_cut(site: Site, alice: str, serve_log: str) -> None:
    """The push was really cut, pulls filled in, and once the push is back
    the node holds the store's newest token whoever wrote it last."""
    if site.nodes is not None:
        assert f"delivery to {NODE} failed" in serve_log, serve_log[-3000:]
    else:
        assert serve_log.count("configuration reloaded") == 2, serve_log[-3000:]
    status = json.loads(run_cli("-c", str(site.config), "status", "--json").stdout)
    # Each lifetime of the cut needs a token no push brought.
    assert status["pulls_24h"]["ok"] >= CUT_SECONDS // LIFETIME, status["pulls_24h"]
    # and nothing refused or failed (bob's job asks in vain once his chain has ended)
    others = {k: n for k, n in status["pulls_24h"].items() if n and k not in ("ok", "no_token")}
    assert others == {}, status["pulls_24h"]
    # The node is back: a push (no waiting out its backoff) brings what the store holds.
    renewed = run_cli("-c", str(site.config), "renew", "--now")
    assert renewed.returncode == 0, renewed.stderr
    pushed = run_cli("-c", str(site.config), "push", "--node", NODE)
    assert pushed.returncode == 0, pushed.stderr
    store = SqlTokenStore(f"sqlite:///{site.work}/db.sqlite")
    try:
        current = store.current(alice)
    finally:
        store.engine.dispose()
    assert current is not None
    assert site.node_file(pwd.getpwnam(alice).pw_uid).strip() == current.token
