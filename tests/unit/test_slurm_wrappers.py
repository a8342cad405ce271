"""The Slurm command wrappers (client_engine/wrappers.py), run by the real /bin/sh.

Fake Slurm commands stand in for the real ones here: each prints what it was
given (its SLURM_JWT, arguments and wrapper depth).  The real ones, in real
jobs on Slurm 22.05 and 24.11, are in tests/integration/test_engine_slurm.py.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from client_engine import wrappers
from tests.conftest import require_root
from tests.unit.test_engine_cli import STEP, Node, make_token

FAKE = """#!/bin/sh
printf 'name=%s jwt=%s depth=%s args=' "${0##*/}" "${SLURM_JWT-<unset>}" \\
  "${TOKENLIFE_WRAPPER_DEPTH-}"
printf '[%s]' "$@"
echo
exit ${FAKE_STATUS:-0}
"""


class Site:
    """A wrapper directory, a directory of fake Slurm commands, a token file."""

    def __init__(self, root: Path, slurm_bin_dir: str = "") -> None:
        self.wrapper_dir = root / "wrappers"
        self.bin = root / "bin"
        self.bin.mkdir()
        for name in wrappers.COMMANDS:
            (self.bin / name).write_text(FAKE)
            (self.bin / name).chmod(0o755)
        wrappers.install(str(self.wrapper_dir), slurm_bin_dir)
        self.file = root / "slurm_jwt"
        self.path = f"{self.wrapper_dir}:{self.bin}:/usr/bin:/bin"

    def deliver(self, token: str) -> str:
        self.file.write_text(token)
        self.file.chmod(0o600)
        return token

    def run(
        self, name: str, *args: str, jwt: str | None = None, path: str | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        full = {"PATH": path or self.path, "SLURM_JWT_FILE": str(self.file), **env}
        if jwt is not None:
            full["SLURM_JWT"] = jwt
        return subprocess.run(
            [name, *args], env=full, capture_output=True, text=True, timeout=30, check=False
        )

    def seen(self, name: str, **kwargs: str) -> dict[str, str]:
        proc = self.run(name, **kwargs)
        assert proc.returncode == 0 and proc.stderr == "", proc
        line = proc.stdout.strip()
        head, _, args = line.partition(" args=")
        fields = dict(part.split("=", 1) for part in head.split(" "))
        return {**fields, "args": args}


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_install_writes_every_wrapper_executable_and_a_marker(site: Site) -> None:
    names = sorted(p.name for p in site.wrapper_dir.iterdir())
    assert names == sorted([*wrappers.COMMANDS, wrappers.MARKER])
    for name in wrappers.COMMANDS:
        mode = stat.S_IMODE((site.wrapper_dir / name).stat().st_mode)
        assert mode == 0o755, name
        assert f"wrapper for Slurm's {name}," in (site.wrapper_dir / name).read_text()
    assert wrappers.problem(str(site.wrapper_dir), os.getuid()) is None


def test_reinstall_replaces_its_own_files_and_leaves_others(site: Site) -> None:
    marker = site.wrapper_dir / wrappers.MARKER
    # An earlier install that also wrapped "sview"; and a file of the admin's.
    (site.wrapper_dir / "sview").write_text("old wrapper")
    marker.write_text(marker.read_text() + "sview\n")
    (site.wrapper_dir / "README").write_text("mine")
    (site.wrapper_dir / "srun").write_text("edited by hand")
    wrappers.install(str(site.wrapper_dir))
    assert not (site.wrapper_dir / "sview").exists()
    assert (site.wrapper_dir / "README").read_text() == "mine"
    assert (site.wrapper_dir / "srun").read_text() == wrappers.script("srun", str(site.wrapper_dir))
    leftovers = [p.name for p in site.wrapper_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.parametrize("name", wrappers.SLURMD_COMMANDS)
def test_commands_that_talk_to_slurmd_never_see_slurm_jwt(site: Site, name: str) -> None:
    token = site.deliver(make_token())
    seen = site.seen(name, jwt=token)
    assert seen["name"] == name and seen["jwt"] == "<unset>", seen


@pytest.mark.parametrize("name", wrappers.CONTROLLER_COMMANDS)
def test_controller_commands_get_the_newer_token_of_the_file(site: Site, name: str) -> None:
    old = make_token(ttl=60)
    new = site.deliver(make_token(ttl=600))
    assert site.seen(name, jwt=old)["jwt"] == new


def test_a_token_as_fresh_as_the_file_is_kept(site: Site) -> None:
    site.deliver(make_token(ttl=60))
    newer_in_env = make_token(ttl=600)
    assert site.seen("squeue", jwt=newer_in_env)["jwt"] == newer_in_env


@pytest.mark.parametrize(
    "jwt",
    [
        make_token(sun="someoneelse", ttl=60),  # an explicit other identity (an admin token)
        "garbage",  # as a test of whether JWT is really used would set it
        "a.b",
        "",
    ],
    ids=["other-user", "garbage", "two-parts", "empty"],
)
def test_a_slurm_jwt_the_user_chose_is_left_alone(site: Site, jwt: str) -> None:
    site.deliver(make_token(ttl=600))
    assert site.seen("squeue", jwt=jwt)["jwt"] == jwt


def test_unset_slurm_jwt_stays_unset(site: Site) -> None:
    site.deliver(make_token())
    assert site.seen("squeue")["jwt"] == "<unset>"


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not a token",
        make_token(sun="someoneelse", ttl=6000),
        "x." + "A" * 5000 + ".y",
        "é.é.é",
    ],
    ids=["empty", "garbage", "other-user", "junk-payload", "non-ascii"],
)
def test_a_file_that_is_no_better_is_not_used(site: Site, content: str) -> None:
    site.file.write_text(content)
    site.file.chmod(0o600)
    token = make_token(ttl=60)
    assert site.seen("squeue", jwt=token)["jwt"] == token


def test_a_file_that_is_not_a_regular_file_is_not_read(site: Site) -> None:
    os.mkfifo(site.file)  # a reader would block forever
    token = make_token(ttl=60)
    assert site.seen("squeue", jwt=token)["jwt"] == token


def test_a_file_of_another_owner_is_not_used(site: Site) -> None:
    require_root()
    new = site.deliver(make_token(ttl=600))
    os.chown(site.file, 65534, 65534)
    old = make_token(ttl=60)
    assert site.seen("squeue", jwt=old)["jwt"] == old
    os.chown(site.file, 0, 0)
    assert site.seen("squeue", jwt=old)["jwt"] == new


def test_arguments_and_exit_status_pass_through(site: Site) -> None:
    args = ["-o", "%i %u", "", "a b", "*", "$HOME", "--", "-x"]
    proc = site.run("squeue", *args, FAKE_STATUS="3")
    assert proc.returncode == 3, proc
    assert proc.stdout.strip().endswith("args=" + "".join(f"[{a}]" for a in args)), proc.stdout


def test_the_token_is_never_on_a_command_line(site: Site, tmp_path: Path) -> None:
    """awk compares the tokens: it must get them through its environment."""
    spy = tmp_path / "spy"
    spy.mkdir()
    log = tmp_path / "awk-argv"
    (spy / "awk").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >>{log}\nexec /usr/bin/awk "$@"\n')
    (spy / "awk").chmod(0o755)
    new = site.deliver(make_token(ttl=600))
    old = make_token(ttl=60)
    path = f"{site.wrapper_dir}:{spy}:{site.bin}:/usr/bin:/bin"
    proc = site.run("squeue", jwt=old, path=path)
    assert f"jwt={new} " in proc.stdout, proc
    argv = log.read_text()
    assert argv and new not in argv and old not in argv
    assert new.split(".")[1] not in argv


def test_the_real_command_is_the_next_in_path_never_a_wrapper(site: Site, tmp_path: Path) -> None:
    # The wrapper directory again (also by another name), a relative entry
    # and an empty one (both the working directory) come before the real one.
    alias = tmp_path / "alias"
    alias.symlink_to(site.wrapper_dir)
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    (decoy / "squeue").write_text("#!/bin/sh\necho DECOY\n")
    (decoy / "squeue").chmod(0o755)
    path = f"{site.wrapper_dir}:{alias}:.::{site.wrapper_dir}:{site.bin}:/usr/bin"
    proc = subprocess.run(
        ["squeue"],
        env={"PATH": path},
        cwd=decoy,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("name=squeue "), proc


def test_no_real_command_is_a_clear_127(site: Site) -> None:
    proc = site.run("sinfo", path=f"{site.wrapper_dir}:/nonexistent")
    assert proc.returncode == 127, proc
    assert proc.stderr.strip() == (
        f"sinfo: command not found (tokenlife: nothing after {site.wrapper_dir} in PATH)"
    )


def test_a_configured_slurm_bin_dir_is_used_whatever_the_path(tmp_path: Path) -> None:
    site = Site(tmp_path, slurm_bin_dir=str(tmp_path / "bin"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "srun").write_text("#!/bin/sh\necho WRONG\n")
    (other / "srun").chmod(0o755)
    seen = site.seen("srun", path=f"{site.wrapper_dir}:{other}")
    assert seen["name"] == "srun", seen


def test_a_site_wrapper_that_calls_back_by_path_stops_with_a_message(site: Site) -> None:
    # A site's own srun wrapper (ahead of the real one) runs "srun" by PATH,
    # which finds tokenlife's wrapper again: that must not loop for ever.
    (site.bin / "srun").write_text('#!/bin/sh\nexec srun "$@"\n')
    proc = site.run("srun", "hostname")
    assert proc.returncode == 126, proc
    assert "runs in a loop" in proc.stderr and "slurm_bin_dir" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_nesting_counts_levels_and_a_junk_count_is_refused(site: Site) -> None:
    site.deliver(make_token())
    assert site.seen("squeue")["depth"] == "1"
    assert site.seen("squeue", TOKENLIFE_WRAPPER_DEPTH="4")["depth"] == "5"
    proc = site.run("squeue", TOKENLIFE_WRAPPER_DEPTH="1; rm -rf /")
    assert proc.returncode == 126 and "loop" in proc.stderr, proc


# Where the wrappers may not be used: the TaskProlog checks this every time.


def test_problem_missing_or_incomplete(tmp_path: Path) -> None:
    assert "no Slurm wrappers there" in str(wrappers.problem(str(tmp_path / "none"), os.getuid()))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "srun").write_text("")
    assert "no Slurm wrappers there" in str(wrappers.problem(str(tmp_path / "half"), os.getuid()))


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_problem_writable_by_others(site: Site, mode: int) -> None:
    site.wrapper_dir.chmod(mode)
    assert "writable by others" in str(wrappers.problem(str(site.wrapper_dir), os.getuid()))


def test_problem_a_parent_writable_by_others_unless_sticky(tmp_path: Path) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    wrappers.install(str(parent / "w"))
    parent.chmod(0o777)
    assert "writable by others" in str(wrappers.problem(str(parent / "w"), os.getuid()))
    parent.chmod(0o1777)  # like /tmp: nobody can rename what is not theirs
    assert wrappers.problem(str(parent / "w"), os.getuid()) is None


def test_problem_owned_by_another_user_or_through_their_symlink(tmp_path: Path) -> None:
    require_root()
    theirs = tmp_path / "theirs"
    wrappers.install(str(theirs))
    os.chown(theirs, 65534, 65534)
    assert "owned by uid 65534" in str(wrappers.problem(str(theirs), 0))
    assert wrappers.problem(str(theirs), 65534) is None  # their own: only they use it
    link = tmp_path / "link"
    link.symlink_to(theirs)
    assert "owned by uid 65534" in str(wrappers.problem(str(link), 0))


def test_task_path_puts_the_wrappers_first_once() -> None:
    assert wrappers.task_path("/w", "/usr/bin:/w:/bin:/w/") == "/w:/usr/bin:/bin"
    assert wrappers.task_path("/w", None) == f"/w:{wrappers.FALLBACK_PATH}"
    assert wrappers.task_path("/w", "") == f"/w:{wrappers.FALLBACK_PATH}"


# What the TaskProlog prints with the wrappers (the default settings).


def test_default_every_task_gets_the_token_and_the_wrappers(tmp_path: Path) -> None:
    node = Node(tmp_path, wrappers=True)
    token = node.deliver(make_token())
    for env in ({}, STEP):
        lines = node.env_lines(PATH="/usr/bin:/bin", **env)
        assert lines == [
            f"export SLURM_JWT_FILE={node.file}",
            f"export SLURM_JWT={token}",
            f"export PATH={node.wrapper_dir}:/usr/bin:/bin",
        ]


def test_nested_tasks_keep_one_wrapper_entry_and_restart_the_count(tmp_path: Path) -> None:
    node = Node(tmp_path, wrappers=True)
    node.deliver(make_token())
    lines = node.env_lines(PATH=f"{node.wrapper_dir}:/usr/bin", TOKENLIFE_WRAPPER_DEPTH="3", **STEP)
    assert lines[-2:] == [
        f"export PATH={node.wrapper_dir}:/usr/bin",
        "unset TOKENLIFE_WRAPPER_DEPTH",
    ]


def test_without_usable_wrappers_the_batch_step_gets_no_jwt(tmp_path: Path) -> None:
    node = Node(tmp_path, wrappers=True)
    token = node.deliver(make_token())
    node.wrapper_dir.chmod(0o777)
    batch = node.env_lines(SLURM_JWT=make_token(ttl=60))
    assert batch[0].startswith("print tokenlife-engine: ") and "writable by others" in batch[0]
    assert batch[1:] == [f"export SLURM_JWT_FILE={node.file}", "unset SLURM_JWT"]
    step = node.env_lines(**STEP)
    assert step[1:] == [f"export SLURM_JWT_FILE={node.file}", f"export SLURM_JWT={token}"]
    shutil.rmtree(node.wrapper_dir)
    assert "no Slurm wrappers there" in node.env_lines()[0]


def test_never_leaves_path_alone(tmp_path: Path) -> None:
    node = Node(tmp_path, 'export_jwt = "never"\n', wrappers=True)
    node.deliver(make_token())
    assert node.env_lines(PATH="/usr/bin") == [f"export SLURM_JWT_FILE={node.file}"]


def test_a_path_with_a_line_break_is_not_exported(tmp_path: Path) -> None:
    node = Node(tmp_path, wrappers=True)
    node.deliver(make_token())
    lines = node.env_lines(PATH="/usr/bin\nexport LD_PRELOAD=/tmp/x.so")
    assert not [line for line in lines if "LD_PRELOAD" in line or line.startswith("export PATH")]
    assert any("line break" in line for line in lines), lines


def test_install_wrappers_command(tmp_path: Path) -> None:
    node = Node(tmp_path)
    target = tmp_path / "elsewhere"
    proc = node.run("install-wrappers", str(target))
    assert proc.returncode == 0, proc
    assert f"{len(wrappers.COMMANDS)} Slurm wrappers in {target}" in proc.stdout
    assert (target / "srun").exists()
    bad = node.run("install-wrappers", "relative/dir")
    assert bad.returncode == 2 and "absolute path" in bad.stderr, bad
