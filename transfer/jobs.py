"""Job sources (tokenlife.interfaces.JobSource): which users need a token on which nodes now."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Mapping
from typing import Any

from tokenlife.config import DeliveryConfig
from tokenlife.config_values import NODE_NAME
from tokenlife.errors import TokenlifeError, UserError
from tokenlife.interfaces import Needs
from tokenlife.users import validate_name
from transfer.hostlist import expand

log = logging.getLogger(__name__)


#: job states whose nodes run (or are about to run, or will resume) the job
ACTIVE_STATES = frozenset({"RUNNING", "CONFIGURING", "SUSPENDED"})


def valid_node(name: str) -> bool:
    """A node name that is safe to put in a log, a path or an SSH target."""
    return bool(NODE_NAME.fullmatch(name))


def _add(needs: Needs, user: str, nodes: list[str], where: str) -> None:
    try:
        validate_name(user)
    except UserError as exc:
        log.warning("%s: skipping a job: %s", where, exc)
        return
    good = [n for n in nodes if valid_node(n)]
    if len(good) != len(nodes):
        log.warning("%s: skipping invalid node names of %s's job", where, user)
    if good:
        needs.setdefault(user, set()).update(good)


class StaticJobs:
    """``[delivery.static]``: fixed user -> nodes, for small sites and tests."""

    def __init__(self, table: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
        self.table = table

    @classmethod
    def from_config(cls, config: DeliveryConfig) -> StaticJobs:
        return cls(config.static)

    def needs(self) -> Needs:
        needs: Needs = {}
        for user, nodes in self.table:
            _add(needs, user, list(nodes), "delivery.static")
        return needs


class SlurmJobs:
    """Running jobs from ``squeue --json`` (run where squeue can reach slurmctld)."""

    def __init__(self, squeue: str = "squeue", timeout: float = 30) -> None:
        self.squeue = squeue
        self.timeout = timeout
        #: the last answer skipped a job it could not read
        self.partial = False

    @classmethod
    def from_config(cls, config: DeliveryConfig) -> SlurmJobs:
        return cls()

    def needs(self) -> Needs:
        try:
            proc = subprocess.run(
                [self.squeue, "--json"],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TokenlifeError(f"squeue failed: {exc}") from exc
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise TokenlifeError(f"squeue failed (exit {proc.returncode}): {last}")
        skipped: list[str] = []
        try:
            needs = parse_squeue(json.loads(proc.stdout), skipped)
            # A job that could not be read may run anywhere: nothing is removed
            # on a view that misses it (see DeliveryCycle).
            self.partial = bool(skipped)
            return needs
        except (ValueError, TypeError, KeyError) as exc:
            raise TokenlifeError(f"squeue --json output not understood: {exc}") from exc


def parse_squeue(data: Mapping[str, Any], skipped: list[str] | None = None) -> Needs:
    """Needs from squeue's JSON (Slurm 22.05: state is a string; 23.02+: a list)."""
    needs: Needs = {}
    jobs = data["jobs"]
    if not isinstance(jobs, list):
        raise TypeError("'jobs' is not a list")
    for job in jobs:
        try:
            state = job.get("job_state")
            states = set(state) if isinstance(state, list) else {state}
            if not states & ACTIVE_STATES:
                continue
            nodes = job.get("nodes") or ""
            if not nodes:
                continue
            user, hosts = str(job["user_name"]), expand(str(nodes))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # One odd job (a hostlist too big, a missing field) costs that job,
            # not every delivery of the cycle.
            job_id = str(job.get("job_id") if isinstance(job, dict) else None)[:20]
            log.warning("squeue: skipping job %s: %s", job_id, str(exc)[:200])
            if skipped is not None:
                skipped.append(job_id)
            continue
        _add(needs, user, hosts, "squeue")
    return needs


class JobEnvironment:
    """One job, from PrologSlurmctld's environment (``tokenlife push --job``)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        user, nodelist = env.get("SLURM_JOB_USER", ""), env.get("SLURM_JOB_NODELIST", "")
        if not user or not nodelist:
            raise TokenlifeError(
                "--job needs SLURM_JOB_USER and SLURM_JOB_NODELIST (run it as PrologSlurmctld)"
            )
        self.user = validate_name(user)
        try:
            self.nodes = expand(nodelist)
        except ValueError as exc:
            raise TokenlifeError(f"SLURM_JOB_NODELIST: {exc}") from exc

    def needs(self) -> Needs:
        needs: Needs = {}
        _add(needs, self.user, self.nodes, "job")
        return needs
