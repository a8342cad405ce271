"""The whole suite at once, on a job that outlives its token many times over.

A real ``tokenlife serve`` (renewer plus SSH delivery, ticking every second)
keeps a 20-second token alive (renew-until 1 h). The job runs for more than
five token lifetimes on node01, a real sshd node whose slurmd runs in the
node's mount namespace, under ``tokenlife-engine run``. Every few seconds it
calls ``tokenlife-engine exec -- squeue`` (JWT only: SLURM_JWT is set), and a
sampler checks ``$SLURM_JWT_FILE`` five times a second for an expired token.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_tool, run_cli, tokenlife_bin
from tests.integration.conftest import SLURM_TOOLS, write_hs_key
from tests.integration.harness.slurm import SlurmCluster
from tests.integration.harness.sshnodes import SshNodes

pytestmark = pytest.mark.slurm
NODE = "node01"
LIFETIME = 20
JOB_SECONDS = 110  # 5.5 lifetimes


@dataclass
class Site:
    cluster: SlurmCluster
    work: Path
    config: Path


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
def site(test_users: tuple[str, str]) -> Iterator[Site]:
    require_tool(*SLURM_TOOLS, "sshd", "unshare", "nsenter", "ssh-keygen", "python3")
    alice, _ = test_users
    work = Path(tempfile.mkdtemp(prefix="tl-longjob-"))
    work.chmod(0o755)
    try:
        (work / "jobs").mkdir()
        (work / "jobs").chmod(0o1777)
        key = write_hs_key(work / "jwt_hs256.key")
        (work / "sampler.py").write_text(SAMPLER)
        (work / "inner.sh").write_text(INNER)
        engine = Path(tokenlife_bin()).with_name("tokenlife-engine")
        prolog = work / "taskprolog.sh"
        prolog.write_text(f"#!/bin/sh\n{engine} env\nexit 0\n")
        prolog.chmod(0o755)
        with SshNodes(work / "ssh", 1) as nodes:
            enter = ["nsenter", f"--target={nodes[NODE].pid}", "--mount", "--"]
            cluster = SlurmCluster(
                work / "cluster",
                key,
                task_prolog=prolog,
                node_name=NODE,
                slurmd_prefix=enter,
                open_munge=True,
            )
            config = work / "tokenlife.toml"
            config.write_text(
                f'[key]\npath = "{key}"\n'
                f'[token]\nlifetime = "{LIFETIME}"\nrenew_until = "1h"\nrenew_before = "10"\n'
                f'[store]\nurl = "sqlite:///{work}/db.sqlite"\nspool_dir = "{work}/spool"\n'
                f'[login]\ntoken_dir = "{work}/login"\n'
                '[serve]\ninterval = "1"\nmetrics = ""\n'
                '[delivery]\ntransport = "ssh"\njobs = "static"\n'
                f'[delivery.static]\n{alice} = ["{NODE}"]\n'
                "[delivery.ssh]\n"
                f'identity_file = "{nodes.client_key}"\n'
                f'known_hosts = "{nodes.known_hosts}"\n'
                f'ssh_config = "{nodes.ssh_config}"\n'
                f"port = {nodes.port}\n"
            )
            with cluster:
                yield Site(cluster, work, config)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_long_job_keeps_a_valid_token_for_its_whole_life(
    site: Site, test_users: tuple[str, str]
) -> None:
    alice, _ = test_users
    proc = run_cli("-c", str(site.config), "mint", alice, "--local")
    assert proc.returncode == 0, proc.stderr
    serve = subprocess.Popen(
        [tokenlife_bin(), "-c", str(site.config), "-v", "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        script = site.work / "job.sh"
        script.write_text(
            "#!/bin/sh\n"
            f"export WORK={site.work} SECONDS_TO_RUN={JOB_SECONDS}\n"
            f"exec tokenlife-engine run -- /bin/sh {site.work}/inner.sh\n"
        )
        script.chmod(0o755)
        path = f"{Path(tokenlife_bin()).parent}:/usr/local/bin:/usr/bin:/bin"
        argv = ["sbatch", "--parsable", f"--output={site.work}/jobs/out-%j", str(script)]
        # The first delivery must be on the node before the job starts.
        deadline = time.monotonic() + 30
        while "delivered" not in run_cli("-c", str(site.config), "list", "--json").stdout:
            assert time.monotonic() < deadline and serve.poll() is None, "no first delivery"
            time.sleep(0.5)
        submitted = site.cluster.run_as(alice, argv, env={"PATH": path})
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip()
        deadline = time.monotonic() + JOB_SECONDS + 60
        while site.cluster.root_run(["squeue", "-h", "-j", job], check=False).stdout.strip():
            assert time.monotonic() < deadline, f"job did not end\n{site.cluster.logs()}"
            assert serve.poll() is None, "tokenlife serve died"
            time.sleep(1)
    finally:
        serve.terminate()
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    assert serve.stderr is not None
    serve_log = serve.stderr.read()
    serve.stderr.close()
    output = (site.work / "jobs" / f"out-{job}").read_text()
    stats = dict(
        pair.split("=")
        for line in output.splitlines()
        if line.startswith(("calls ", "sampler "))
        for pair in line.split()[1:]
    )
    context = f"{output}\n--- serve ---\n{serve_log[-3000:]}"
    assert int(stats["failed"]) == 0 and int(stats["ok"]) >= JOB_SECONDS // 4, context
    # The token was renewed and re-delivered many times while the job ran ...
    assert int(stats["tokens"]) >= JOB_SECONDS // LIFETIME, context
    # ... and the job's file never held an expired token for more than a second.
    assert float(stats["worst"]) <= 1.0 and int(stats["missing"]) == 0, context
