"""client_engine.hooks.HookRunner with real child processes.

The hooks are small /bin/sh scripts that write what they see (their
environment, command line, stdin, process group, descriptors) into files of
tmp_path.  The runner is driven like a poll loop would: ``tend()`` in a loop
with short sleeps, until a condition holds or a deadline passes.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from client_engine.hooks import ENV_NAMES, RUNNING_TICK, HookRunner
from client_engine.tokens import Token

USER = "alice"
PATH = "/run/tokenlife/1000/slurm_jwt"
#: what a token would be: it must never reach a hook
SECRET = f"eyJhbGciOiJIUzI1NiJ9.SECRET{secrets.token_hex(8)}.c2ln"
#: an inherited descriptor the hooks must not see

RECORD = r"""
out=$1
echo "$TOKENLIFE_VERSION" >> "$out/log"
v=$TOKENLIFE_VERSION
env > "$out/env.$v"
tr '\0' ' ' < /proc/$$/cmdline > "$out/cmdline.$v"
readlink /proc/$$/fd/0 > "$out/stdin.$v"
echo $$ > "$out/pid.$v"
cut -d' ' -f5 /proc/$$/stat > "$out/pgid.$v"
ls /proc/$$/fd > "$out/fds.$v"
"""
#: waits for the file "go", then records its version
GATED = r"""
out=$1
while [ ! -e "$out/go" ]; do sleep 0.01; done
echo "$TOKENLIFE_VERSION" >> "$out/log"
"""
#: version 1 exits 3, version 2 is killed by SIGKILL, the others succeed
FAILING = r"""
out=$1
case $TOKENLIFE_VERSION in
1) exit 3 ;;
2) kill -KILL $$ ;;
esac
echo "$TOKENLIFE_VERSION" >> "$out/log"
"""
#: hangs with a child of its own; "deaf": both ignore SIGTERM, "deaf-child": the child does
HANGING = r"""
out=$1
[ "$2" = deaf ] && trap '' TERM
if [ "$2" = deaf-child ]; then (trap '' TERM; exec sleep 60) & else sleep 60 & fi
# pid first, grandchild last; each written whole before it appears
echo $$ > "$out/.pid" && mv "$out/.pid" "$out/pid.$TOKENLIFE_VERSION"
echo $! > "$out/.gc" && mv "$out/.gc" "$out/grandchild.$TOKENLIFE_VERSION"
wait
"""


#: the new_runner fixture: HookRunner(...), closed when the test ends
Factory = Callable[..., HookRunner]


class Said(list[str]):
    """The runner's ``say``: collects the lines."""

    def __call__(self, line: str) -> None:
        assert "\n" not in line
        self.append(line)


def script(tmp_path: Path, text: str) -> str:
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return str(path)


def token(version: int | None, iat: int = 1_700_000_000, renew_until: int | None = None) -> Token:
    exp = iat + 600
    return Token(SECRET, USER, exp, iat, PATH, renew_until=renew_until, version=version)


def drive(runner: HookRunner, until: Callable[[], bool], timeout: float = 10.0) -> None:
    """Call tend() as a poll loop would until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        wait = runner.tend(time.monotonic())
        if until():
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(min(0.01 if wait is None else wait, 0.01))


def idle(runner: HookRunner, timeout: float = 10.0) -> None:
    drive(runner, lambda: not runner.busy, timeout)


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaps counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def new_runner() -> Iterator[Factory]:
    """HookRunner(...), closed at the end of the test whatever happened."""
    made: list[HookRunner] = []

    def make(*args: Any, **kwargs: Any) -> HookRunner:
        made.append(HookRunner(*args, **kwargs))
        return made[-1]

    yield make
    for runner in made:
        runner.close()


@pytest.fixture
def leaked_fd() -> Iterator[int]:
    """An inheritable descriptor in this process: hooks must not get it."""
    # A fresh descriptor, never a fixed number: dup2 onto a number in use
    # would close whatever another part of the test process holds there.
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    yield read_end
    os.close(read_end)
    os.close(write_end)


def test_each_change_runs_once_in_order(new_runner: Factory, tmp_path: Path) -> None:
    said = Said()
    runner = new_runner(["/bin/sh", script(tmp_path, RECORD), str(tmp_path)], 10, said)
    assert runner.tend(time.monotonic()) is None  # idle: nothing to wake for
    for version in range(1, 7):
        runner.changed(token(version), PATH, USER)
    wait = runner.tend(time.monotonic())
    assert wait is not None and 0 <= wait <= RUNNING_TICK
    assert runner.pid is not None
    idle(runner)
    assert lines(tmp_path / "log") == [str(v) for v in range(1, 7)]
    assert said == []
    assert runner.tend(time.monotonic()) is None
    # Runs were one at a time: six different processes, each its own group.
    pids = {(tmp_path / f"pid.{v}").read_text() for v in range(1, 7)}
    assert len(pids) == 6


def test_the_hook_gets_where_the_token_is_never_the_token(
    new_runner: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, leaked_fd: int
) -> None:
    for name in [n for n in os.environ if n.startswith("TOKENLIFE_")]:
        monkeypatch.delenv(name)  # only the runner's own below
    monkeypatch.setenv("SLURM_JWT", SECRET)
    monkeypatch.setenv("KEPT_FOR_THE_HOOK", "yes")
    runner = new_runner(["/bin/sh", script(tmp_path, RECORD), str(tmp_path)], 10, Said())
    runner.changed(token(7, iat=1_700_000_100, renew_until=1_700_500_000), PATH, USER)
    runner.changed(token(None, iat=1_700_000_200), PATH, USER)  # no tokenlife claim
    idle(runner)
    expected = [("7", "1700000700", "1700500000"), ("1700000200", "1700000800", "")]
    for version, exp, renew_until in expected:
        env = dict(
            line.split("=", 1)
            for line in (tmp_path / f"env.{version}").read_text().splitlines()
            if "=" in line
        )
        assert {name for name in env if name.startswith("TOKENLIFE_")} == set(ENV_NAMES)
        assert env["TOKENLIFE_USER"] == USER
        assert env["TOKENLIFE_FILE"] == PATH
        assert env["TOKENLIFE_VERSION"] == version  # the iat when the token has no version
        assert env["TOKENLIFE_EXP"] == exp
        assert env["TOKENLIFE_RENEW_UNTIL"] == renew_until
        assert env["KEPT_FOR_THE_HOOK"] == "yes"
        assert "SLURM_JWT" not in env
        for name in ("env", "cmdline"):
            assert SECRET not in (tmp_path / f"{name}.{version}").read_text()
            assert "SECRET" not in (tmp_path / f"{name}.{version}").read_text()
        assert (tmp_path / f"stdin.{version}").read_text().strip() == "/dev/null"
        # Its own process group, so a timeout kill reaches its children.
        pid = (tmp_path / f"pid.{version}").read_text().strip()
        assert (tmp_path / f"pgid.{version}").read_text().strip() == pid
        fds = set(lines(tmp_path / f"fds.{version}"))
        assert {"0", "1", "2"} <= fds
        assert str(leaked_fd) not in fds


def test_the_queue_is_bounded_dropping_the_oldest(new_runner: Factory, tmp_path: Path) -> None:
    said = Said()
    runner = new_runner(
        ["/bin/sh", script(tmp_path, GATED), str(tmp_path)], 10, said, queue_limit=3
    )
    runner.changed(token(1), PATH, USER)
    runner.tend(time.monotonic())
    assert runner.pid is not None  # version 1 runs, held at the gate
    for version in range(2, 7):
        runner.changed(token(version), PATH, USER)
    assert len(said) == 2
    assert "dropped the oldest (version 2)" in said[0]
    assert "dropped the oldest (version 3)" in said[1]
    (tmp_path / "go").touch()
    idle(runner)
    assert lines(tmp_path / "log") == ["1", "4", "5", "6"]
    assert len(said) == 2


def test_a_failing_hook_is_logged_and_the_next_change_runs(
    new_runner: Factory, tmp_path: Path
) -> None:
    said = Said()
    runner = new_runner(["/bin/sh", script(tmp_path, FAILING), str(tmp_path)], 10, said)
    for version in (1, 2, 3):
        runner.changed(token(version), PATH, USER)
    idle(runner)
    assert lines(tmp_path / "log") == ["3"]
    assert len(said) == 2, said
    assert "(version 1) failed: exit status 3" in said[0]
    assert "(version 2) failed: killed by SIGKILL" in said[1]
    assert all(SECRET not in line for line in said)


@pytest.mark.parametrize("deaf", ["-", "deaf", "deaf-child"], ids=["sigterm", "sigkill", "stray"])
def test_a_hanging_hook_is_killed_with_its_children(
    new_runner: Factory, tmp_path: Path, deaf: str
) -> None:
    # sigterm: SIGTERM ends both; sigkill: SIGKILL after the grace ends both;
    # stray: SIGTERM ends the hook, and its deaf child goes when it is reaped.
    said = Said()
    hang = ["/bin/sh", script(tmp_path, HANGING), str(tmp_path), deaf]
    runner = new_runner(hang, 0.3, said, grace=0.3)
    runner.changed(token(1), PATH, USER)
    started = time.monotonic()
    drive(runner, lambda: (tmp_path / "grandchild.1").exists())
    grandchild = int((tmp_path / "grandchild.1").read_text())
    hook = int((tmp_path / "pid.1").read_text())
    assert alive(grandchild) and alive(hook)
    idle(runner)
    elapsed = time.monotonic() - started
    # SIGTERM at 0.3 s; a hook deaf to it gets SIGKILL 0.3 s later.
    assert 0.3 <= elapsed < 3.0, elapsed
    assert said == ["hook sh (version 1) timed out after 0.3s: killed"]
    wait_for(lambda: not alive(grandchild), timeout=3)
    assert not alive(hook)
    # The next change still runs.
    runner.changed(token(2), PATH, USER)
    drive(runner, lambda: (tmp_path / "grandchild.2").exists())
    runner.close()


def test_sigterm_reaches_a_hook_although_the_caller_blocks_it(
    new_runner: Factory, tmp_path: Path
) -> None:
    # `run` blocks its signals (signalfd); a hook must not inherit that mask,
    # or SIGTERM would never end it (only SIGKILL, after the long grace here).
    said = Said()
    runner = new_runner(["/bin/sh", script(tmp_path, HANGING), str(tmp_path)], 0.2, said, grace=30)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
    try:
        runner.changed(token(1), PATH, USER)
        started = time.monotonic()
        idle(runner, timeout=5)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert time.monotonic() - started < 5
    assert len(said) == 1 and "timed out" in said[0]


@pytest.mark.parametrize("missing", [True, False], ids=["missing", "not-executable"])
def test_a_program_that_cannot_run_is_a_logged_failure(
    new_runner: Factory, tmp_path: Path, missing: bool
) -> None:
    said = Said()
    program = tmp_path / "hook"
    if not missing:
        program.write_text("#!/bin/sh\n")
        program.chmod(0o644)
    runner = new_runner([str(program)], 10, said)
    runner.changed(token(1), PATH, USER)
    runner.changed(token(2), PATH, USER)
    assert runner.tend(time.monotonic()) is None  # both tried, nothing running
    reason = "No such file or directory" if missing else "Permission denied"
    assert said == [f"hook hook (version {v}): cannot run {program}: {reason}" for v in (1, 2)]
    assert not runner.busy


def test_close_kills_the_running_hook_and_drops_the_queue(
    new_runner: Factory, tmp_path: Path
) -> None:
    said = Said()
    runner = new_runner(
        ["/bin/sh", script(tmp_path, HANGING), str(tmp_path), "deaf"], 60, said, grace=0.3
    )
    runner.changed(token(1), PATH, USER)
    drive(runner, lambda: (tmp_path / "grandchild.1").exists())
    runner.changed(token(2), PATH, USER)
    runner.changed(token(3), PATH, USER)
    grandchild = int((tmp_path / "grandchild.1").read_text())
    hook = int((tmp_path / "pid.1").read_text())
    started = time.monotonic()
    runner.close()
    assert time.monotonic() - started < 3
    assert not alive(hook)
    wait_for(lambda: not alive(grandchild), timeout=3)
    assert said == [
        "hook sh: 2 waiting changes dropped at exit",
        "hook sh (version 1) killed: exiting",
    ]
    assert not runner.busy and runner.tend(time.monotonic()) is None
    assert not (tmp_path / "grandchild.2").exists()


def test_only_the_hooks_own_pid_is_waited_for(new_runner: Factory, tmp_path: Path) -> None:
    # The caller's own child (run's command) ends while hooks run: its exit
    # status must still be there for the caller (waitpid(-1) would take it).
    own = subprocess.Popen(["/bin/sh", "-c", "exit 7"])
    wait_for(lambda: not alive(own.pid))
    runner = new_runner(["/bin/sh", script(tmp_path, RECORD), str(tmp_path)], 10, Said())
    for version in (1, 2, 3):
        runner.changed(token(version), PATH, USER)
    idle(runner)
    assert lines(tmp_path / "log") == ["1", "2", "3"]
    assert own.wait(timeout=5) == 7
