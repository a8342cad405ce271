"""``tokenlife-engine env``, ``token`` and ``exec``, run as real processes on real files."""

from __future__ import annotations

import base64
import json
import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest

from client_engine.wrappers import install
from tests.conftest import require_root, run_engine

UID = os.getuid()
USER = pwd.getpwuid(UID).pw_name


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(sun: str = USER, ttl: int = 600, iat: int | None = None) -> str:
    now = int(time.time())
    claims = {"iat": now if iat is None else iat, "exp": now + ttl, "sun": sun}
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}.{b64(os.urandom(32))}"


class Node:
    """A worker node's token directory and an engine config pointing at it.

    With ``wrappers``, the Slurm wrappers are installed and configured (the
    default settings); without, there are none and the mode is "steps"
    unless ``extra`` sets one (the settings before the wrappers existed).
    """

    def __init__(self, root: Path, extra: str = "", wrappers: bool = False) -> None:
        self.token_dir = root / "run"
        self.user_dir = self.token_dir / str(UID)
        self.user_dir.mkdir(parents=True, mode=0o700)
        self.file = self.user_dir / "slurm_jwt"
        self.config = root / "tokenlife.toml"
        self.wrapper_dir = root / "wrappers"
        if wrappers:
            install(str(self.wrapper_dir))
            extra += f'wrapper_dir = "{self.wrapper_dir}"\n'
        else:
            extra += 'wrapper_dir = ""\n' + (
                "" if "export_jwt" in extra else 'export_jwt = "steps"\n'
            )
        self.config.write_text(f'[engine]\ntoken_dir = "{self.token_dir}"\n{extra}')

    def deliver(self, token: str, mode: int = 0o600) -> str:
        self.file.write_text(token + "\n")  # a newline must not reach SLURM_JWT
        self.file.chmod(mode)
        return token

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_engine(self.config, *args, env=env)

    def env_lines(self, **env: str) -> list[str]:
        proc = self.run("env", env=env)
        assert proc.returncode == 0 and proc.stderr == "", proc
        return proc.stdout.splitlines()


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


STEP = {"SLURM_STEP_ID": "0"}


def test_batch_step_gets_the_file_but_not_the_variable(node: Node) -> None:
    node.deliver(make_token())
    assert node.env_lines() == [f"export SLURM_JWT_FILE={node.file}"]


def test_srun_step_gets_the_exact_token(node: Node) -> None:
    token = node.deliver(make_token())
    lines = node.env_lines(**STEP)
    assert lines == [f"export SLURM_JWT_FILE={node.file}", f"export SLURM_JWT={token}"]


def test_submitters_token_is_dropped_where_srun_runs(node: Node) -> None:
    node.deliver(make_token())
    lines = node.env_lines(SLURM_JWT=make_token())
    assert lines == [f"export SLURM_JWT_FILE={node.file}", "unset SLURM_JWT"]


@pytest.mark.parametrize(
    ("site", "job", "step", "exported"),
    [
        ("always", "", False, True),
        ("never", "", True, False),
        ("steps", "always", False, True),
        ("always", "never", True, False),
        ("steps", "steps", True, True),
    ],
)
def test_export_mode_from_site_and_job(
    tmp_path: Path, site: str, job: str, step: bool, exported: bool
) -> None:
    node = Node(tmp_path, f'export_jwt = "{site}"\n')
    token = node.deliver(make_token())
    env = {"TOKENLIFE_EXPORT_JWT": job} if job else {}
    lines = node.env_lines(**env, **(STEP if step else {}))
    assert (f"export SLURM_JWT={token}" in lines) is exported
    assert f"export SLURM_JWT_FILE={node.file}" in lines


def test_bad_job_choice_says_so_and_keeps_the_site_mode(node: Node) -> None:
    token = node.deliver(make_token())
    lines = node.env_lines(TOKENLIFE_EXPORT_JWT="yes", **STEP)
    assert lines[0].startswith("print ") and "TOKENLIFE_EXPORT_JWT" in lines[0]
    assert f"export SLURM_JWT={token}" in lines


def _refused(node: Node, reason: str, **env: str) -> None:
    lines = node.env_lines(**STEP, **env)
    assert not [line for line in lines if line.startswith("export")], lines
    prints = [line for line in lines if line.startswith("print ")]
    assert len(prints) == 1 and reason in prints[0], lines


def test_missing_token_prints_why(node: Node) -> None:
    _refused(node, "no token delivered")


def test_expired_token_refused(node: Node) -> None:
    node.deliver(make_token(ttl=-5))
    _refused(node, "expired")


def test_foreign_token_refused(node: Node) -> None:
    node.deliver(make_token(sun="somebodyelse"))
    _refused(node, "another user (somebodyelse)")


@pytest.mark.parametrize("garbage", ["", "not a token", "a.b.c", "x" * 20000, "é.é.é"])
def test_garbage_refused(node: Node, garbage: str) -> None:
    node.file.write_text(garbage)
    node.file.chmod(0o600)
    lines = node.env_lines(**STEP)
    assert not [line for line in lines if line.startswith("export")], lines
    assert len(lines) == 1 and lines[0].startswith("print "), lines


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_file_others_can_read_refused(node: Node, mode: int) -> None:
    node.deliver(make_token(), mode=mode)
    _refused(node, f"mode {mode:04o}")


def test_file_of_another_owner_refused(node: Node) -> None:
    require_root()
    node.deliver(make_token())
    os.chown(node.file, 1, 1)
    _refused(node, "owned by uid 1")


def test_symlink_refused(node: Node, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.write_text(make_token())
    real.chmod(0o600)
    node.file.symlink_to(real)
    _refused(node, "symlink")


def test_inherited_token_kept_where_wanted_when_nothing_delivered(node: Node) -> None:
    lines = node.env_lines(SLURM_JWT=make_token(), **STEP)
    assert "unset SLURM_JWT" not in lines and lines[0].startswith("print ")
    # ... but an expired one goes, so srun and squeue do not trip over it.
    lines = node.env_lines(SLURM_JWT=make_token(ttl=-1), **STEP)
    assert lines[-1] == "unset SLURM_JWT"


def test_job_uid_must_be_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    from client_engine import cli
    from client_engine.tokens import Refused

    monkeypatch.setattr(os, "getuid", lambda: 1000)
    with pytest.raises(Refused, match="SLURM_JOB_UID=1001 but running as uid 1000"):
        cli.identity({"SLURM_JOB_UID": "1001", "SLURM_JOB_USER": "bob"})
    assert cli.identity({"SLURM_JOB_UID": "1000", "SLURM_JOB_USER": "al"}) == (1000, "al")
    monkeypatch.setattr(os, "getuid", lambda: 0)  # root (a root TaskProlog) acts for the job
    assert cli.identity({"SLURM_JOB_UID": "1001", "SLURM_JOB_USER": "bob"}) == (1001, "bob")
    with pytest.raises(Refused, match="not a uid"):
        cli.identity({"SLURM_JOB_UID": "-1"})


def test_broken_config_falls_back_to_defaults_and_exits_0(node: Node) -> None:
    node.config.write_text("[engine]\nexport_jwt = 'sometimes'\n")
    proc = node.run("env")
    assert proc.returncode == 0
    assert "engine.export_jwt" in proc.stdout.splitlines()[0]


def test_token_prints_the_freshest(node: Node, tmp_path: Path) -> None:
    node.deliver(make_token(ttl=100))
    newer = make_token(ttl=200)
    copy = node.user_dir / "job.7.1"
    copy.write_text(newer)
    copy.chmod(0o600)
    proc = node.run("token", env={"SLURM_JWT_FILE": str(copy), "SLURM_JWT": make_token(ttl=50)})
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, newer + "\n", "")


def test_token_without_one_fails_in_one_line(node: Node) -> None:
    proc = node.run("token")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no token delivered" in proc.stderr


def test_exec_hands_the_token_to_the_command(node: Node) -> None:
    token = node.deliver(make_token())
    script = 'printf "%s|%s" "$SLURM_JWT" "$SLURM_JWT_FILE"'
    proc = node.run("exec", "--", "sh", "-c", script, env={"SLURM_JWT": make_token(ttl=-1)})
    assert (proc.returncode, proc.stdout) == (0, f"{token}|{node.file}")


def test_exec_passes_the_commands_status(node: Node) -> None:
    node.deliver(make_token())
    assert node.run("exec", "sh", "-c", "exit 7").returncode == 7
    assert node.run("exec", "--", "no-such-command-here").returncode == 127


def test_exec_without_token_does_not_run(node: Node, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    proc = node.run("exec", "--", "touch", str(marker))
    assert proc.returncode == 1 and not marker.exists()


@pytest.mark.parametrize("args", [[], ["exec"], ["exec", "--"], ["run"], ["token", "x"], ["bogus"]])
def test_usage_errors(node: Node, args: list[str]) -> None:
    proc = node.run(*args)
    assert proc.returncode == 2 and proc.stderr.startswith("tokenlife-engine: ")


def test_help(node: Node) -> None:
    proc = node.run("--help")
    assert proc.returncode == 0 and "TaskProlog" in proc.stdout


def test_bad_config_is_exit_2_for_token(node: Node) -> None:
    node.config.write_text("[engine]\ntoken_dir = 'relative'\n")
    proc = node.run("token")
    assert proc.returncode == 2 and "engine.token_dir" in proc.stderr
