"""Packaging and the Slurm hook scripts, without building anything.

* Every shell block of docs/guide.md's "Install" section is marked for
  tests/integration/test_install_guide.py (which runs the marked ones on a
  fresh Debian 12 system) or says why it is not run; the guide names the
  files that ``packaging/build-deb.sh`` writes for this version.
* The TaskProlog never fails a task, and says so in the task's output when
  the engine is installed but cannot run.
* The PrologSlurmctld script runs tokenlife even when its log cannot be
  opened (syslog instead, or nothing), and always exits 0.
* The package's prerm removes exactly the Slurm wrappers that
  ``tokenlife-engine install-wrappers`` wrote.
* The maintainer scripts and the build script are POSIX sh.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from client_engine import wrappers
from tests.conftest import REPO
from tests.integration.test_install_guide import BLOCK, GUIDE, TAGS, guide_blocks, install_section

SLURM = REPO / "systemd" / "slurm"
DEBIAN = REPO / "packaging" / "debian"
SCRIPTS = [
    REPO / "packaging" / "build-deb.sh",
    *(DEBIAN / s for s in ("postinst", "prerm", "postrm")),
]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def sh(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(script), *args], env=env, capture_output=True, text=True, timeout=30
    )


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


# --- the guide ------------------------------------------------------------------


def test_every_install_block_is_marked() -> None:
    section = install_section(GUIDE.read_text())
    fences = re.findall(r"^```sh$", section, re.M)
    marked = list(BLOCK.finditer(section))
    assert len(marked) == len(fences), "a ```sh block without <!-- install-test: TAG -->"
    for match in marked:
        assert match["tag"] in TAGS, match["tag"]
        if match["tag"] == "none":
            assert match["why"], "say why the block is not run"


@pytest.mark.parametrize(
    "tags", [("deb",), ("wheel",), ("host",), ("remove-deb",), ("remove-wheel",)]
)
def test_each_flow_has_its_blocks(tags: tuple[str, ...]) -> None:
    assert guide_blocks(GUIDE.read_text(), *tags)


def test_the_guide_names_the_packages_of_this_version() -> None:
    section = install_section(GUIDE.read_text())
    assert f"`tokenlife_{VERSION}-1_amd64.deb`" in section
    assert f"`tokenlife-{VERSION}-py3-none-any.whl`" in section


def test_the_shipped_files_name_the_path_the_package_rewrites() -> None:
    # build-deb.sh turns /usr/local/bin/tokenlife into /usr/bin/tokenlife: a
    # command named by any other path would escape it.
    shipped = [*SLURM.iterdir(), REPO / "systemd" / "pam.d" / "tokenlife"]
    shipped += [p for p in (REPO / "systemd").iterdir() if p.suffix in (".service", ".timer")]
    for path in shipped:
        for found in re.findall(r"\S*/tokenlife(?:-engine)?\b(?![./-])", path.read_text()):
            if "bin/" in found:
                assert found.split("=")[-1].strip("\"'").startswith("/usr/local/bin/tokenlife"), (
                    path,
                    found,
                )


# --- the TaskProlog ---------------------------------------------------------------


def taskprolog(tmp_path: Path, engine: Path) -> Path:
    text = (SLURM / "taskprolog.sh").read_text()
    assert "ENGINE=/usr/local/bin/tokenlife-engine\n" in text
    return executable(
        tmp_path / "taskprolog.sh",
        text.replace("ENGINE=/usr/local/bin/tokenlife-engine", f"ENGINE={engine}", 1),
    )


def test_taskprolog_passes_the_engines_lines_on(tmp_path: Path) -> None:
    engine = executable(tmp_path / "engine", '#!/bin/sh\necho "export SLURM_JWT=x $1"\n')
    proc = sh(taskprolog(tmp_path, engine), {"PATH": "/usr/bin:/bin"})
    assert (proc.returncode, proc.stdout) == (0, "export SLURM_JWT=x env\n")


def test_taskprolog_without_an_engine_is_silent(tmp_path: Path) -> None:
    proc = sh(taskprolog(tmp_path, tmp_path / "absent"), {"PATH": "/usr/bin:/bin"})
    assert (proc.returncode, proc.stdout) == (0, "")


@pytest.mark.parametrize(
    ("engine_text", "status"),
    [
        # A venv on an interpreter the job's user cannot reach (pyenv's, under /root).
        ("#!/root/.pyenv/versions/3.11.9/bin/python3.11\n", 127),
        ("#!/bin/sh\nexit 1\n", 1),
    ],
    ids=["unreachable-interpreter", "failing"],
)
def test_taskprolog_says_when_the_engine_cannot_run(
    tmp_path: Path, engine_text: str, status: int
) -> None:
    engine = executable(tmp_path / "engine", engine_text)
    proc = sh(taskprolog(tmp_path, engine), {"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0
    assert proc.stdout == (
        f"print tokenlife: {engine} failed (exit status {status}): no SLURM_JWT for this task\n"
    )


# --- PrologSlurmctld ----------------------------------------------------------------


def prolog(tmp_path: Path, log: Path, fails: bool = False) -> tuple[Path, Path]:
    """The shipped script with a fake tokenlife that notes its run, and ``log``."""
    ran = tmp_path / "ran"
    status = 1 if fails else 0
    fake = executable(
        tmp_path / "tokenlife",
        f'#!/bin/sh\necho "$*" >>{ran}\necho "node01: cannot connect" >&2\nexit {status}\n',
    )
    text = (SLURM / "prolog_slurmctld.sh").read_text()
    for old, new in (
        ("TOKENLIFE=/usr/local/bin/tokenlife", f"TOKENLIFE={fake}"),
        ("LOG=/var/log/tokenlife/prolog.log", f"LOG={log}"),
    ):
        assert f"{old}\n" in text
        text = text.replace(old, new, 1)
    return executable(tmp_path / "prolog.sh", text), ran


def test_prolog_logs_to_its_file(tmp_path: Path) -> None:
    script, ran = prolog(tmp_path, tmp_path / "prolog.log", fails=True)
    proc = sh(script, {"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0
    assert ran.read_text() == "push --job\n"
    assert (tmp_path / "prolog.log").read_text() == "node01: cannot connect\n"


def test_prolog_falls_back_to_syslog_when_the_log_cannot_be_opened(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    syslog = tmp_path / "syslog"
    executable(bin_dir / "logger", f'#!/bin/sh\necho "$*" >>{syslog}\ncat >>{syslog}\n')
    script, ran = prolog(tmp_path, tmp_path / "missing" / "prolog.log", fails=True)
    proc = sh(script, {"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert proc.returncode == 0
    assert ran.read_text() == "push --job\n"
    assert syslog.read_text() == "-t tokenlife-prolog -p daemon.warning\nnode01: cannot connect\n"


def test_prolog_runs_tokenlife_without_log_or_logger(tmp_path: Path) -> None:
    script, ran = prolog(tmp_path, tmp_path / "missing" / "prolog.log")
    proc = sh(script, {"PATH": str(tmp_path / "nothing")})  # no logger anywhere
    assert proc.returncode == 0
    assert ran.read_text() == "push --job\n"


# --- the pull-only Prolog and the Epilog: the job marks ------------------------------


def shipped(tmp_path: Path, name: str, replace: dict[str, str]) -> Path:
    text = (SLURM / name).read_text()
    for old, new in replace.items():
        assert f"{old}\n" in text, f"{name} no longer says {old!r}"
        text = text.replace(old, new, 1)
    return executable(tmp_path / name, text)


def epilog(tmp_path: Path, base: Path, uid: int, job: int) -> None:
    script = shipped(tmp_path, "epilog.sh", {"TOKEN_DIR=/run/tokenlife": f"TOKEN_DIR={base}"})
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_UID": str(uid), "SLURM_JOB_ID": str(job)}
    proc = sh(script, env)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_pull_prolog_marks_the_job_before_it_pulls(tmp_path: Path) -> None:
    base = tmp_path / "run"
    base.mkdir(mode=0o755)
    seen = tmp_path / "seen"
    fake = executable(
        tmp_path / "engine",
        f'#!/bin/sh\nls -a "{base}/.jobs" >{seen}\nstat -c %a "{base}/.jobs" >>{seen}\n',
    )
    script = shipped(
        tmp_path,
        "prolog.sh",
        {
            "ENGINE=/usr/local/bin/tokenlife-engine": f"ENGINE={fake}",
            "LOG=/var/log/tokenlife/pull-prolog.log": f"LOG={tmp_path}/pull.log",
            "TOKEN_DIR=/run/tokenlife": f"TOKEN_DIR={base}",
        },
    )
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_UID": "1001", "SLURM_JOB_ID": "77"}
    assert sh(script, env).returncode == 0
    assert seen.read_text().split() == [".", "..", "1001.77", "700"]
    # no token directory (or a job id that is not a number): no mark, the pull still runs
    for bad in ({"SLURM_JOB_ID": "7;rm"}, {"SLURM_JOB_UID": ""}):
        seen.unlink()
        assert sh(script, {**env, **bad}).returncode == 0
        assert seen.read_text().split() == [".", "..", "1001.77", "700"]
    # no token directory (tmpfiles did not run): nothing made, the pull still runs
    script.write_text(script.read_text().replace(f"TOKEN_DIR={base}\n", f"TOKEN_DIR={base}x\n"))
    seen.unlink()
    assert sh(script, env).returncode == 0
    assert seen.exists() and not Path(f"{base}x").exists()


def test_epilog_removes_a_pulled_token_with_the_users_last_marked_job(tmp_path: Path) -> None:
    base = tmp_path / "run"
    marks = base / ".jobs"
    marks.mkdir(parents=True, mode=0o700)
    mine, theirs = base / "1001", base / "1002"
    for d in (mine, theirs):
        d.mkdir(mode=0o700)
        (d / "slurm_jwt").write_text("a.b.c")
        (d / ".pull.lock").write_text("")
    for mark in ("1001.10", "1001.11", "1002.12"):
        (marks / mark).write_text("")
    outside = tmp_path / "precious"
    outside.write_text("keep me")
    epilog(tmp_path, base, 1001, 10)  # job 11 of the same user still runs here
    assert sorted(p.name for p in marks.iterdir()) == ["1001.11", "1002.12"]
    assert (mine / "slurm_jwt").exists()
    # the user swapped the token for a link: removing it never follows it
    (mine / "slurm_jwt").unlink()
    (mine / "slurm_jwt").symlink_to(outside)
    epilog(tmp_path, base, 1001, 11)  # the last one: the pulled token goes
    assert sorted(p.name for p in marks.iterdir()) == ["1002.12"]
    assert sorted(p.name for p in mine.iterdir()) == [] and mine.is_dir()
    assert outside.read_text() == "keep me"
    assert sorted(p.name for p in theirs.iterdir()) == [".pull.lock", "slurm_jwt"]
    # a job the Prolog did not mark (a push site): the delivered token stays
    epilog(tmp_path, base, 1002, 99)
    assert sorted(p.name for p in theirs.iterdir()) == [".pull.lock", "slurm_jwt"]


# --- the Debian package's scripts ----------------------------------------------------


def test_prerm_removes_exactly_the_wrappers_the_engine_wrote(tmp_path: Path) -> None:
    directory = tmp_path / "wrappers"
    names = wrappers.install(str(directory), "")
    (tmp_path / "keep").mkdir()
    mine = tmp_path / "keep" / "site-wrapper"
    mine.write_text("not the engine's")
    text = (DEBIAN / "prerm").read_text()
    function = re.search(r"^remove_wrappers\(\) \{\n.*?^\}\n", text, re.M | re.S)
    assert function is not None
    script = tmp_path / "remove.sh"
    script.write_text(function[0] + 'remove_wrappers "$1"\nremove_wrappers "$2"\n')
    proc = sh(script, {"PATH": "/usr/bin:/bin"}, str(directory), str(mine.parent))
    assert proc.returncode == 0, proc.stderr
    assert len(names) > 10 and not directory.exists()
    assert mine.read_text() == "not the engine's"  # no marker there: nothing touched


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_posix_sh(script: Path) -> None:
    assert script.read_text().startswith("#!/bin/sh\n")
    assert os.access(script, os.X_OK)
    proc = subprocess.run(["/bin/sh", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
