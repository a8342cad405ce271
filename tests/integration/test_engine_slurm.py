"""tokenlife-engine in real Slurm jobs: the shipped TaskProlog and Epilog
(systemd/slurm/) configured in a real slurmctld/slurmd, jobs submitted by an
ordinary user.

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

from tests.conftest import REPO, require, require_tool, run_cli, tokenlife_bin
from tests.integration.conftest import SLURM_TOOLS, write_hs_key
from tests.integration.harness.slurm import SlurmCluster

pytestmark = pytest.mark.slurm
SLURM_DIR = REPO / "systemd" / "slurm"


@dataclass
class Site:
    cluster: SlurmCluster
    work: Path
    token_dir: Path
    config: Path

    def mint(self, user: str) -> str:
        proc = run_cli("-c", str(self.config), "mint", user, "--local", "--print")
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
        proc = self.cluster.run_as(user, argv, env={"PATH": _path(), **(env or {})})
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
def site(test_users: tuple[str, str]) -> Iterator[Site]:
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
            f'[engine]\ntoken_dir = "{token_dir}"\n'
        )
        config.chmod(0o644)
        # The shipped scripts, with this checkout's engine and paths.
        task_prolog = _install(
            SLURM_DIR / "taskprolog.sh",
            work / "taskprolog.sh",
            {
                "ENGINE=/usr/local/bin/tokenlife-engine": f"ENGINE={engine}\n"
                f"export TOKENLIFE_CONFIG={config}"
            },
        )
        epilog = _install(
            SLURM_DIR / "epilog.sh", work / "epilog.sh", {"/run/tokenlife": str(token_dir)}
        )
        cluster = SlurmCluster(
            work / "cluster", key, task_prolog=task_prolog, epilog=epilog, open_munge=True
        )
        with cluster:
            yield Site(cluster, work, token_dir, config)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# Each line the job prints is "name value"; the test reads them into a dict.
JOB = r"""#!/bin/sh
say() { echo "$1 $2"; }
say batch_jwt "${SLURM_JWT:+set}"
say batch_file "$SLURM_JWT_FILE"
say batch_exec_squeue "$(tokenlife-engine exec -- squeue -h -j "$SLURM_JOB_ID" -o %u 2>&1)"
token=$(tokenlife-engine token)
say batch_token_squeue "$(SLURM_JWT=$token squeue -h -j "$SLURM_JOB_ID" -o %u 2>&1)"
srun sh -c '
  echo "step_jwt ${SLURM_JWT:+set}"
  echo "step_squeue $(squeue -h -j "$SLURM_JOB_ID" -o %u 2>&1)"
  SLURM_JWT=garbage squeue -h >/dev/null 2>&1 || echo "step_garbage refused"'
say srun "$(srun hostname >/dev/null 2>&1 && echo ok)"
srun sleep 120 &
for i in $(seq 240); do  # until the step runs (a loaded machine may take a while)
  out=$(sstat -n -o JobID -j "$SLURM_JOB_ID.2" 2>&1)
  case "$(echo $out)" in *[0-9].2) break ;; esac
  sleep 0.25
done
say sstat "$(echo $out)"
scancel "$SLURM_JOB_ID.2" 2>/dev/null; kill %1 2>/dev/null
wait
"""


def parse(output: str) -> dict[str, str]:
    pairs = (line.partition(" ") for line in output.splitlines() if line.strip())
    return {k: v.strip() for k, _, v in pairs}


def test_jobs_get_a_working_jwt_and_srun_and_sstat_keep_working(
    site: Site, test_users: tuple[str, str]
) -> None:
    alice, _ = test_users
    token_file = site.deliver(alice, site.mint(alice))
    # Submitted with a token of the submitter's own (it reaches the job):
    # the batch step must not keep it, or srun would break.
    submit_env = {"SLURM_JWT": site.cluster.scontrol_token(alice, 600)}
    out = parse(site.run_job(alice, JOB, env=submit_env))
    assert out.get("batch_jwt", "") == "", out  # no SLURM_JWT where srun runs
    assert out["batch_file"] == str(token_file), out
    assert out["batch_exec_squeue"] == alice, out
    assert out["batch_token_squeue"] == alice, out
    assert out["step_jwt"] == "set", out  # srun-launched steps get it...
    assert out["step_squeue"] == alice, out  # ...and it works
    assert out["step_garbage"] == "refused", out  # (so squeue really used JWT)
    assert out["srun"] == "ok", out
    job_step = out["sstat"].split()
    assert len(job_step) == 1 and job_step[0].endswith(".2"), out


def test_the_trap_is_real_when_a_job_asks_for_jwt_everywhere(
    site: Site, test_users: tuple[str, str]
) -> None:
    alice, _ = test_users
    site.deliver(alice, site.mint(alice))
    script = (
        "#!/bin/sh\n"
        'echo "batch_jwt ${SLURM_JWT:+set}"\n'
        'echo "squeue $(squeue -h -j "$SLURM_JOB_ID" -o %u 2>&1)"\n'
        'srun hostname >/dev/null 2>&1 && echo "srun ok" || echo "srun failed"\n'
    )
    # TOKENLIFE_EXPORT_JWT=always: the job's own choice, passed by sbatch.
    out = parse(site.run_job(alice, script, env={"TOKENLIFE_EXPORT_JWT": "always"}))
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


def _path() -> str:
    """PATH for the job: the engine of this checkout first."""
    return f"{Path(tokenlife_bin()).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
