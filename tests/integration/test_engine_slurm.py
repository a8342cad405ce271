"""tokenlife-engine in real Slurm jobs: the shipped TaskProlog and Epilog
(systemd/slurm/) configured in a real slurmctld/slurmd, jobs submitted by an
ordinary user, on each Slurm release (22.05 on the host, 24.11 in a Debian 13
root: tests/integration/harness/sysroot.py). The Slurm command wrappers are
installed as an administrator does (``tokenlife-engine install-wrappers``).

Here users may use munge, as on a real cluster (srun needs it: slurmd never
accepts JWT). That a client really used JWT is shown by the same client
failing with a garbage SLURM_JWT: with SLURM_JWT set, Slurm's clients use
JWT only.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, require, require_tool, run_cli, run_engine, tokenlife_bin
from tests.integration.conftest import SLURM_TOOLS, SlurmTarget, write_hs_key, write_task_prolog
from tests.integration.harness.slurm import SlurmCluster, SlurmFacts

pytestmark = pytest.mark.slurm
SLURM_DIR = REPO / "systemd" / "slurm"


@dataclass
class Site:
    cluster: SlurmCluster
    work: Path
    token_dir: Path
    config: Path
    rest_url: str

    @property
    def facts(self) -> SlurmFacts:
        return self.cluster.facts

    def mint(self, user: str, *extra: str) -> str:
        proc = run_cli("-c", str(self.config), "mint", user, "--local", "--print", *extra)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def deliver(self, user: str, token: str) -> Path:
        """What transfer leaves on a node: <token_dir>/<uid>/slurm_jwt, the user's, 0600."""
        pw = pwd.getpwnam(user)
        directory = self.token_dir / str(pw.pw_uid)
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chown(directory, pw.pw_uid, pw.pw_gid)
        path = directory / "slurm_jwt"
        path.write_text(token)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        path.chmod(0o600)
        return path

    def run_job(self, user: str, script: str, env: dict[str, str] | None = None) -> str:
        """Submit ``script`` as ``user``, wait for its end; returns its output."""
        path = self.work / f"job-{time.monotonic_ns()}.sh"
        path.write_text(script)
        path.chmod(0o755)
        argv = ["sbatch", "--parsable", f"--output={self.work}/jobs/out-%j", str(path)]
        job_env = {"PATH": self.cluster.job_path(), **(env or {})}
        proc = self.cluster.run_as(user, argv, env=job_env)
        assert proc.returncode == 0, proc.stderr
        job = proc.stdout.strip().split(";")[0]
        deadline = time.monotonic() + 90
        while self.cluster.root_run(["squeue", "-h", "-j", job], check=False).stdout.strip():
            assert time.monotonic() < deadline, f"job {job} did not end\n{self.cluster.logs()}"
            time.sleep(0.2)
        return (self.work / "jobs" / f"out-{job}").read_text()


def _install(src: Path, dst: Path, replace: dict[str, str]) -> Path:
    text = src.read_text()
    for old, new in replace.items():
        assert old in text, f"{src} no longer says {old!r}"
        text = text.replace(old, new)
    dst.write_text(text)
    dst.chmod(0o755)
    return dst


@pytest.fixture(scope="module")
def site(test_users: tuple[str, str], slurm_target: SlurmTarget) -> Iterator[Site]:
    if slurm_target.system_root is None:
        require_tool(*SLURM_TOOLS, "srun", "sstat")
    engine = Path(tokenlife_bin()).with_name("tokenlife-engine")
    require(engine.exists(), f"{engine} missing: install the project")
    work = Path(tempfile.mkdtemp(prefix="tl-engine-"))
    work.chmod(0o755)
    try:
        (work / "jobs").mkdir()
        (work / "jobs").chmod(0o1777)
        token_dir = work / "run"
        token_dir.mkdir(mode=0o755)
        key = write_hs_key(work / "jwt_hs256.key")
        config = work / "tokenlife.toml"
        config.write_text(
            f'[key]\npath = "{key}"\n'
            f'[store]\nurl = "sqlite:///{work}/db.sqlite"\nspool_dir = "{work}/spool"\n'
            f'[login]\ntoken_dir = "{work}/login"\n'
            f'[engine]\ntoken_dir = "{token_dir}"\nwrapper_dir = "{work}/wrappers"\n'
        )
        # As an administrator installs them, on each node.
        installed = run_engine(config, "install-wrappers")
        assert installed.returncode == 0, installed.stderr
        config.chmod(0o644)
        # The shipped scripts, with the cluster's engine and this site's paths.
        task_prolog = work / "taskprolog.sh"
        epilog = _install(
            SLURM_DIR / "epilog.sh", work / "epilog.sh", {"/run/tokenlife": str(token_dir)}
        )
        cluster = SlurmCluster(
            work / "cluster",
            key,
            task_prolog=task_prolog,
            epilog=epilog,
            open_munge=True,
            system_root=slurm_target.system_root,
        )
        write_task_prolog(task_prolog, cluster.engine, config)
        with cluster:
            slurm_target.check(cluster)
            rest_url = cluster.start_rest()
            yield Site(cluster, work, token_dir, config, rest_url)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# Each line the job prints is "name value"; the test reads them into a dict.
# Plain Slurm commands, as a user's job script would call them: the wrappers
# in PATH keep srun and sstat on munge and hand squeue the freshest token.
JOB = r"""#!/bin/sh
say() { echo "$1 $2"; }
say batch_jwt_user "$(tokenlife-engine token >/dev/null 2>&1 && echo "$SLURM_JWT" | cut -d. -f2)"
say batch_file "$SLURM_JWT_FILE"
say batch_squeue "$(squeue -h -j "$SLURM_JOB_ID" -o %u 2>&1)"
say batch_garbage "$(SLURM_JWT=garbage squeue -h >/dev/null 2>&1 && echo accepted || echo refused)"
say srun "$(srun -n1 true 2>&1 && echo ok)"
srun -n1 sh -c '
  echo "step_jwt ${SLURM_JWT:+set}"
  echo "step_squeue $(squeue -h -j "$SLURM_JOB_ID" -o %u 2>&1)"
  echo "step_nested $(srun -n1 --overlap true 2>&1 && echo ok)"
  echo "step_nested_deeper $(srun -n1 --overlap sh -c "srun -n1 --overlap true && echo ok" 2>&1)"'
say rest "$(python3 "$WORK/rest.py" 2>&1)"
srun -n1 --overlap --job-name=sleeper sleep 120 2>/dev/null &
for i in $(seq 240); do  # until the step runs (a loaded machine may take a while)
  step=$(squeue -h -s -j "$SLURM_JOB_ID" -o "%i %j" | awk '$2 == "sleeper" { print $1 }')
  [ -n "$step" ] && out=$(sstat -n -o JobID -j "$step" 2>&1) \
    && [ "$(echo $out)" = "$step" ] && break
  sleep 0.25
done
say sstat "$(echo $out) $step"
scancel "$step" 2>/dev/null; kill %1 2>/dev/null
wait
"""

# REST requests with the job's SLURM_JWT, from inside the job: with the
# X-SLURM-USER-* headers, and with Authorization: Bearer.
REST = r"""
import json, os, urllib.request, urllib.error
user, token = os.environ["USER"], os.environ["SLURM_JWT"]
results = []
for headers in (
    {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": token},
    {"X-SLURM-USER-NAME": user, "Authorization": "Bearer " + token},
):
    req = urllib.request.Request(os.environ["REST_URL"], headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            results.append(f"{resp.status}/{len(json.load(resp).get('errors') or [])}")
    except urllib.error.HTTPError as err:
        results.append(str(err.code))
print(" ".join(results))
"""


def parse(output: str) -> dict[str, str]:
    pairs = (line.partition(" ") for line in output.splitlines() if line.strip())
    return {k: v.strip() for k, _, v in pairs}


def claims(payload: str) -> dict[str, object]:
    import base64
    import json

    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert isinstance(data, dict)
    return data


def test_every_step_has_a_working_jwt_and_srun_and_sstat_keep_working(
    site: Site, test_users: tuple[str, str]
) -> None:
    alice, _ = test_users
    delivered = site.mint(alice)
    token_file = site.deliver(alice, delivered)
    (site.work / "rest.py").write_text(REST)
    rest = site.rest_url + site.facts.rest("diag")
    # The submitter's own token reaches the job (it expires as the job
    # starts): the delivered one must replace it, in every step.
    submitted = site.cluster.scontrol_token(alice, 2)
    env = {"SLURM_JWT": submitted, "WORK": str(site.work), "REST_URL": rest}
    output = site.run_job(alice, JOB, env=env)
    out = parse(output)
    assert out["batch_jwt_user"] == delivered.split(".")[1], output
    assert claims(out["batch_jwt_user"])["sun"] == alice, output
    assert out["batch_file"] == str(token_file), output
    assert out["batch_squeue"] == alice, output
    assert out["batch_garbage"] == "refused", output  # with SLURM_JWT set, JWT only
    assert out["srun"] == "ok", output
    assert out["step_jwt"] == "set", output
    assert out["step_squeue"] == alice, output
    assert out["step_nested"] == "ok", output
    assert out["step_nested_deeper"] == "ok", output
    bearer = "200/0" if site.facts.bearer_accepted else str(site.facts.bearer_refused_http)
    assert out["rest"] == f"200/0 {bearer}", output
    step = out.get("sstat", "").split()
    assert len(step) == 2 and step[0] == step[1], output  # sstat saw the step, and said no more
    assert "error" not in output.lower(), output


def test_squeue_in_the_batch_step_gets_the_token_delivered_after_the_job_started(
    site: Site, test_users: tuple[str, str]
) -> None:
    """The variable was captured at task start; the wrapper reads the file."""
    alice, _ = test_users
    site.deliver(alice, site.mint(alice, "--lifetime", "4"))
    fresh = site.mint(alice)
    script = (
        "#!/bin/sh\n"
        'echo "before $(squeue -h -j "$SLURM_JOB_ID" -o %u 2>&1)"\n'
        f'while [ "$(cat "$SLURM_JWT_FILE")" != "{fresh}" ]; do sleep 0.2; done\n'
        "sleep 5\n"  # the token the task started with has expired by now
        'echo "after $(squeue -h -j "$SLURM_JOB_ID" -o %u 2>&1)"\n'
        # the real squeue, with the variable as the task got it
        'echo "stale $(/usr/bin/squeue -h >/dev/null 2>&1 || echo refused)"\n'
    )

    def redeliver() -> None:
        time.sleep(2)
        site.deliver(alice, fresh)

    import threading

    thread = threading.Thread(target=redeliver)
    thread.start()
    try:
        out = parse(site.run_job(alice, script))
    finally:
        thread.join()
    assert out == {"before": alice, "after": alice, "stale": "refused"}, out


def test_the_old_modes_stay_available(site: Site, test_users: tuple[str, str]) -> None:
    alice, _ = test_users
    site.deliver(alice, site.mint(alice))
    script = (
        "#!/bin/sh\n"
        'echo "batch_jwt ${SLURM_JWT:+set}"\n'
        "srun -n1 sh -c 'echo \"step_jwt ${SLURM_JWT:+set}\"'\n"
        'echo "srun $(srun -n1 true 2>&1 && echo ok)"\n'
    )
    out = parse(site.run_job(alice, script, env={"TOKENLIFE_EXPORT_JWT": "steps"}))
    assert out == {"batch_jwt": "", "step_jwt": "set", "srun": "ok"}, out
    out = parse(site.run_job(alice, script, env={"TOKENLIFE_EXPORT_JWT": "never"}))
    assert out == {"batch_jwt": "", "step_jwt": "", "srun": "ok"}, out


def test_the_trap_is_real_without_the_wrappers(site: Site, test_users: tuple[str, str]) -> None:
    alice, _ = test_users
    site.deliver(alice, site.mint(alice))
    script = (
        "#!/bin/sh\n"
        'echo "batch_jwt ${SLURM_JWT:+set}"\n'
        'echo "squeue $(squeue -h -j "$SLURM_JOB_ID" -o %u 2>&1)"\n'
        'srun -n1 true >/dev/null 2>&1 && echo "srun ok" || echo "srun failed"\n'
    )
    original = site.config.read_text()
    site.config.write_text(
        original.replace(f'wrapper_dir = "{site.work}/wrappers"', 'wrapper_dir = ""')
    )
    try:
        out = parse(site.run_job(alice, script))
    finally:
        site.config.write_text(original)
    assert out["batch_jwt"] == "set" and out["squeue"] == alice, out
    assert out["srun"] == "failed", out


def test_missing_token_tells_the_job_and_the_job_runs(
    site: Site, test_users: tuple[str, str]
) -> None:
    _, bob = test_users
    shutil.rmtree(site.token_dir / str(pwd.getpwnam(bob).pw_uid), ignore_errors=True)
    script = '#!/bin/sh\necho "jwt ${SLURM_JWT:+set}"\necho "file ${SLURM_JWT_FILE:-none}"\n'
    output = site.run_job(bob, script)
    out = parse(output)
    assert out == {"tokenlife-engine:": out["tokenlife-engine:"], "jwt": "", "file": "none"}
    assert "no token delivered" in out["tokenlife-engine:"], output


def test_epilog_removes_the_jobs_copies_only(site: Site, test_users: tuple[str, str]) -> None:
    alice, _ = test_users
    token_file = site.deliver(alice, site.mint(alice))
    other = token_file.with_name("job.999999.1")  # another job's copy
    shutil.copy(token_file, other)
    # A supervisor killed with SIGKILL leaves its copy behind: make one.
    script = (
        "#!/bin/sh\n"
        'cp "$SLURM_JWT_FILE" "${SLURM_JWT_FILE%/*}/job.$SLURM_JOB_ID.4242"\n'
        'cp "$SLURM_JWT_FILE" "${SLURM_JWT_FILE%/*}/.job.$SLURM_JOB_ID.4242.x1.tmp"\n'
        'ls -a "${SLURM_JWT_FILE%/*}"\n'
    )
    listing = site.run_job(alice, script).split()
    mine = [name for name in listing if name.startswith("job.") and name.endswith(".4242")]
    assert len(mine) == 1, listing
    deadline = time.monotonic() + 30  # the Epilog runs after the job left the queue
    temp = token_file.parent / f".{mine[0]}.x1.tmp"
    assert temp.name in listing, listing
    while (token_file.parent / mine[0]).exists() or temp.exists():
        assert time.monotonic() < deadline, site.cluster.logs()
        time.sleep(0.2)
    assert token_file.exists() and other.exists()
