"""Delivery driven by real Slurm jobs: the ``slurm`` job source (``squeue
--json``) and ``push --job`` as slurmctld's PrologSlurmctld.

One real OpenSSH node, ``node01`` (its own host key and its own tmpfs
``/run/tokenlife``), is also the Slurm compute node: slurmd runs inside the
node's mount namespace, so jobs see exactly the files that were delivered
over SSH to that node.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_tool, tokenlife_bin
from tests.integration.conftest import SLURM_TOOLS, write_hs_key
from tests.integration.harness.slurm import SlurmCluster, setpriv
from tests.integration.harness.sshnodes import SshNode, SshNodes

pytestmark = pytest.mark.slurm
NODE = "node01"


@dataclass
class Site:
    cluster: SlurmCluster
    nodes: SshNodes
    work: Path
    key: Path

    @property
    def node(self) -> SshNode:
        return self.nodes[NODE]

    def config(self, name: str, remove_after: str = "10m") -> Path:
        """A tokenlife config (state under work/name) that pushes to node01 over SSH.

        Everything belongs to SlurmUser, who runs PrologSlurmctld and, here, the
        other pushes too; root mints and gives the files back (``as_slurm``).
        """
        base = self.work / name
        base.mkdir(mode=0o700)
        as_slurm(base)
        for src in (self.nodes.client_key, self.nodes.known_hosts, self.nodes.ssh_config):
            shutil.copy(src, base / src.name)
        (base / self.nodes.client_key.name).chmod(0o600)
        cfg = base / "tokenlife.toml"
        cfg.write_text(
            f'[key]\npath = "{self.key}"\n'
            f'[store]\nurl = "sqlite:///{base}/db.sqlite"\nspool_dir = "{base}/spool"\n'
            f'[login]\ntoken_dir = "{base}/run"\n'
            f'[delivery]\ntransport = "ssh"\njobs = "slurm"\nremove_after = "{remove_after}"\n'
            "[delivery.ssh]\n"
            f'identity_file = "{base / self.nodes.client_key.name}"\n'
            f'known_hosts = "{base / self.nodes.known_hosts.name}"\n'
            f'ssh_config = "{base / self.nodes.ssh_config.name}"\n'
            f"port = {self.nodes.port}\n"
        )
        return cfg

    def tokenlife(
        self, cfg: Path, *args: str, root: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run the CLI as SlurmUser (or root, then hand the state back to SlurmUser)."""
        env = {**self.cluster.env(), "HOME": "/root" if root else "/nonexistent"}
        prefix = [] if root else setpriv("slurm")
        proc = subprocess.run(
            [*prefix, tokenlife_bin(), "-c", str(cfg), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        as_slurm(cfg.parent)
        return proc

    def sbatch(self, user: str, script: str, *opts: str) -> str:
        """Submit ``script`` as ``user`` (root may, over munge); returns the job id."""
        path = self.work / f"job-{time.monotonic_ns()}.sh"
        path.write_text(script)
        path.chmod(0o755)
        argv = ["sbatch", "--parsable", f"--uid={user}", f"--gid={user_gid(user)}"]
        argv += [f"--output={self.work}/jobs/out-%j", "--chdir=/tmp", *opts, str(path)]
        return self.cluster.root_run(argv).stdout.strip().split(";")[0]

    def job_state(self, job: str) -> str:
        out = self.cluster.root_run(["squeue", "-h", "-j", job, "-o", "%T"], check=False)
        return out.stdout.strip()

    def wait(self, what: str, cond: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.cluster.logs()}")
            time.sleep(0.2)

    def token_path(self, user: str) -> str:
        return f"/run/tokenlife/{pwd.getpwnam(user).pw_uid}/slurm_jwt"

    def clean_node(self) -> None:
        self.node.run(["sh", "-c", "rm -rf /run/tokenlife/[0-9]*"])


def user_gid(user: str) -> int:
    return pwd.getpwnam(user).pw_gid


def as_slurm(base: Path) -> None:
    slurm = pwd.getpwnam("slurm")
    for root, dirs, files in os.walk(base):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.lchown(name, slurm.pw_uid, slurm.pw_gid)


def mint(site: Site, cfg: Path, user: str) -> str:
    proc = site.tokenlife(cfg, "mint", user, "--local", "--print", root=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def site(test_users: tuple[str, str]) -> Iterator[Site]:
    require_tool(*SLURM_TOOLS, "sshd", "unshare", "nsenter", "ssh-keygen")
    work = Path(tempfile.mkdtemp(prefix="tl-slurm-delivery-"))
    work.chmod(0o755)
    try:
        key = write_hs_key(work / "jwt_hs256.key")
        prolog = work / "prolog_slurmctld.sh"
        # The test switches the prolog on by creating prolog.toml (a config).
        # As docs/transfer.md recommends: no exec, and exit 0 whatever happens
        # (even a log the shell cannot open must not requeue and hold the job).
        prolog.write_text(
            "#!/bin/sh\n"
            f'[ -e "{work}/prolog.toml" ] || exit 0\n'
            f'{tokenlife_bin()} -c "{work}/prolog.toml" push --job'
            f' 2>>"{work}/jobs/prolog.log"\n'
            "exit 0\n"
        )
        prolog.chmod(0o755)
        (work / "jobs").mkdir()
        (work / "jobs").chmod(0o1777)  # job output, written by the job's user
        with SshNodes(work / "ssh", 1) as nodes:
            enter = ["nsenter", f"--target={nodes[NODE].pid}", "--mount", "--"]
            cluster = SlurmCluster(
                work / "cluster",
                key,
                prolog_slurmctld=prolog,
                node_name=NODE,
                slurmd_prefix=enter,
            )
            with cluster:
                yield Site(cluster, nodes, work, key)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_running_job_brings_token_and_its_end_removes_it(
    site: Site, test_users: tuple[str, str]
) -> None:
    alice, _ = test_users
    site.clean_node()
    cfg = site.config("source", remove_after="1")
    token = mint(site, cfg, alice)
    path = site.token_path(alice)

    # No job yet: the cycle has nothing to deliver.
    proc = site.tokenlife(cfg, "push", "--json")
    assert proc.returncode == 0, proc.stderr
    assert not site.node.exists(path)

    job = site.sbatch(alice, "#!/bin/sh\nexec sleep 300\n")
    site.wait("the job to run", lambda: site.job_state(job) == "RUNNING")
    proc = site.tokenlife(cfg, "push")
    assert proc.returncode == 0, proc.stderr
    assert site.node.read_text(path) == token
    st = site.node.stat(path)
    pw = pwd.getpwnam(alice)
    assert (stat.S_IMODE(st.mode), st.uid, st.gid) == (0o600, pw.pw_uid, pw.pw_gid)

    # While the job runs, the token stays; once it is gone (plus remove_after), so is the file.
    assert site.tokenlife(cfg, "push").returncode == 0
    assert site.node.exists(path)
    site.cluster.root_run(["scancel", job])
    site.wait("the job to end", lambda: site.job_state(job) == "")
    # remove_after = 1 s, and the store counts whole seconds: last seen + 2 s is past it.
    time.sleep(2.1)
    proc = site.tokenlife(cfg, "push")
    assert proc.returncode == 0, proc.stderr
    assert not site.node.exists(path)


CHECK_SCRIPT = """#!/bin/sh
# The first thing the job's first task does: is the token already here?
f=/run/tokenlife/$(id -u)/slurm_jwt
if [ -r "$f" ]; then echo "token $(sha256sum < "$f" | cut -c1-64)"; else echo "no token"; fi
"""


def test_prolog_slurmctld_delivers_before_the_first_task(
    site: Site, test_users: tuple[str, str]
) -> None:
    alice, bob = test_users
    site.clean_node()
    cfg = site.config("prolog")
    token = mint(site, cfg, alice)
    # Without the prolog, nothing brings the token before the job starts.
    before = site.sbatch(alice, CHECK_SCRIPT)
    site.wait("the job to finish", lambda: site.job_state(before) == "", 60)
    assert (site.work / "jobs" / f"out-{before}").read_text().strip() == "no token"

    prolog_cfg = site.work / "prolog.toml"
    shutil.copy(cfg, prolog_cfg)
    os.chown(prolog_cfg, pwd.getpwnam("slurm").pw_uid, -1)
    try:
        # bob has no token: his job finds none (the check below can fail).
        jobs = {user: site.sbatch(user, CHECK_SCRIPT) for user in (alice, bob)}
        site.wait("the jobs to finish", lambda: not any(map(site.job_state, jobs.values())), 60)
    finally:
        prolog_cfg.unlink()
    log_file = site.work / "jobs" / "prolog.log"
    log = log_file.read_text() if log_file.exists() else ""
    outputs = {u: (site.work / "jobs" / f"out-{j}").read_text().strip() for u, j in jobs.items()}
    want = hashlib.sha256(token.encode()).hexdigest()
    assert outputs[alice] == f"token {want}", (outputs, log, site.cluster.logs())
    assert outputs[bob] == "no token", outputs
    # The prolog ran as SlurmUser and wrote the delivery into the store.
    listing = site.tokenlife(cfg, "list", "--json").stdout
    assert '"delivered"' in listing, listing
