"""``tokenlife-engine run``: the real supervisor, real children, real signals and files.

Each test starts ``python -m client_engine.cli run -- CHILD`` against a token
directory under tmp_path.  CHILD records what it sees (its environment, the
signals it gets) in files the test polls: no fixed sleeps for things that
must happen, generous deadlines for a loaded machine.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pwd
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_for

UID = os.getuid()
USER = pwd.getpwuid(UID).pw_name
#: the signals `run` forwards (client_engine.supervisor.FORWARDED)
FORWARDED = ("SIGHUP", "SIGINT", "SIGTERM", "SIGQUIT", "SIGUSR1", "SIGUSR2")
MODES = ["inotify", "portable"]

CHILD = r"""
import json, os, signal, sys, time
out = sys.argv[1]
def record(line):
    with open(os.path.join(out, "log"), "a") as handle:
        handle.write(line + "\n")
def handler(signum, frame):
    record(signal.Signals(signum).name)
for name in sys.argv[2].split(","):
    if name:
        signal.signal(getattr(signal, name), handler)
info = {
    "pid": os.getpid(),
    "SLURM_JWT_FILE": os.environ.get("SLURM_JWT_FILE"),
    "has_SLURM_JWT": "SLURM_JWT" in os.environ,
}
with open(os.path.join(out, "info.tmp"), "w") as handle:
    json.dump(info, handle)
os.rename(os.path.join(out, "info.tmp"), os.path.join(out, "info"))
while not os.path.exists(os.path.join(out, "stop")):
    time.sleep(0.02)
sys.exit(int(sys.argv[3]))
"""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(
    sun: str = USER, ttl: int = 600, age: int = 0, renew_until: int | None = None
) -> str:
    """A token issued ``age`` seconds ago that expires ``ttl`` seconds from now
    (with tokenlife's claim when ``renew_until`` is given)."""
    now = int(time.time())
    claims: dict[str, object] = {"iat": now - age, "exp": now + ttl, "sun": sun}
    if renew_until is not None:
        claims["tokenlife"] = {"renew_until": renew_until, "version": 1}
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}.{b64(os.urandom(32))}"


def exp_of(token: str) -> int:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return int(claims["exp"])


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for a parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


class Run:
    """One supervisor and its recording child."""

    def __init__(self, proc: subprocess.Popen[bytes], out: Path, stderr: Path) -> None:
        self.proc, self.out, self.stderr_path = proc, out, stderr

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def info(self) -> dict[str, object]:
        wait_for(lambda: (self.out / "info").exists(), "the child to start")
        data: dict[str, object] = json.loads((self.out / "info").read_text())
        return data

    @property
    def copy(self) -> Path:
        return Path(str(self.info()["SLURM_JWT_FILE"]))

    @property
    def child_pid(self) -> int:
        return int(str(self.info()["pid"]))

    def log(self) -> list[str]:
        return (read(self.out / "log") or "").splitlines()

    def stop(self) -> int:
        (self.out / "stop").touch()
        return self.proc.wait(timeout=20)


class Node:
    """A worker node's token directory, an engine config, and supervisors run there."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token_dir = root / "run"
        self.user_dir = self.token_dir / str(UID)
        self.file = self.user_dir / "slurm_jwt"
        self.token_dir.mkdir()
        self.config = root / "tokenlife.toml"
        self.config.write_text(f'[engine]\ntoken_dir = "{self.token_dir}"\n')
        self.runs: list[Run] = []

    def deliver(self, token: str, mode: int = 0o600) -> str:
        """As transfer does: a private temporary file renamed over the old one."""
        self.user_dir.mkdir(mode=0o700, exist_ok=True)
        temp = self.user_dir / ".slurm_jwt.test.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, token.encode())
        os.fchmod(fd, mode)
        os.close(fd)
        os.rename(temp, self.file)
        return token

    def env(self, mode: str = "inotify", **extra: str) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "TOKENLIFE_CONFIG": str(self.config), **extra}
        if mode == "portable":
            env["TOKENLIFE_ENGINE_POLL"] = "1"
        return env

    def start(
        self,
        *,
        mode: str = "inotify",
        traps: tuple[str, ...] = (),
        status: int = 0,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        **popen: object,
    ) -> Run:
        out = self.root / f"child{len(self.runs)}"
        out.mkdir()
        stderr = self.root / f"stderr{len(self.runs)}"
        argv = command or [sys.executable, "-c", CHILD, str(out), ",".join(traps), str(status)]
        # run keeps a signal ignored at its start ignored (as a shell does), so
        # it starts with the defaults whatever this pytest inherited (nohup
        # ignores SIGHUP); a test that wants one ignored says so
        popen.setdefault("preexec_fn", _default_signals)
        with stderr.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "client_engine.cli", "run", "--", *argv],
                env=self.env(mode, **(env or {})),
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=err,
                **popen,  # type: ignore[call-overload]
            )
        run = Run(proc, out, stderr)
        self.runs.append(run)
        return run

    def run(self, *command: str, mode: str = "inotify") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "client_engine.cli", "run", "--", *command],
            env=self.env(mode),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def cleanup(self) -> None:
        for run in self.runs:
            if run.proc.poll() is None:
                run.proc.kill()  # its child dies with it (PR_SET_PDEATHSIG)
            run.proc.wait(timeout=20)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path)
    yield node
    node.cleanup()


# -- the command's exit status ----------------------------------------------------


@pytest.mark.parametrize("status", [0, 3])
def test_exit_status_is_the_commands(node: Node, status: int) -> None:
    node.deliver(make_token())
    proc = node.run("sh", "-c", f'test -f "$SLURM_JWT_FILE" && exit {status}')
    assert proc.returncode == status, proc.stderr
    assert proc.stderr == ""
    assert sorted(os.listdir(node.user_dir)) == ["slurm_jwt"]  # the copy is gone


def test_command_killed_by_a_signal_gives_128_plus_n(node: Node) -> None:
    assert node.run("sh", "-c", "kill -KILL $$").returncode == 128 + signal.SIGKILL
    assert node.run("sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM


def test_commands_that_cannot_run_give_127_and_126_like_a_shell(node: Node) -> None:
    node.deliver(make_token())
    missing = node.run("no-such-command-here")
    assert missing.returncode == 127
    assert missing.stderr == (
        "tokenlife-engine: cannot run no-such-command-here: No such file or directory\n"
    )
    assert node.run(str(node.root)).returncode == 126  # a directory
    assert sorted(os.listdir(node.user_dir)) == ["slurm_jwt"]


# -- signals -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_each_signal_reaches_the_command_once(node: Node, mode: str) -> None:
    node.deliver(make_token())
    run = node.start(mode=mode, traps=FORWARDED, status=5)
    run.info()
    for name in FORWARDED:
        run.proc.send_signal(getattr(signal, name))
        wait_for(lambda name=name: name in run.log(), f"{name} to reach the command")
    assert run.proc.poll() is None  # the supervisor survives what the command survives
    time.sleep(0.2)
    assert run.log() == list(FORWARDED)  # each exactly once
    assert run.stop() == 5


def _default_signals() -> None:
    for name in FORWARDED:
        signal.signal(getattr(signal, name), signal.SIG_DFL)


def _ignore_sigint() -> None:
    _default_signals()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("mode", MODES)
def test_signal_ignored_at_start_is_not_forwarded(node: Node, mode: str) -> None:
    """Like `cmd &` in a script: SIGINT ignored by run stays ignored, not forwarded."""
    node.deliver(make_token())
    run = node.start(mode=mode, traps=("SIGINT", "SIGUSR1"), preexec_fn=_ignore_sigint)
    run.info()
    run.proc.send_signal(signal.SIGINT)
    run.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "SIGUSR1" in run.log(), "SIGUSR1 to reach the command")
    time.sleep(0.2)
    assert run.log() == ["SIGUSR1"]
    assert run.stop() == 0


def test_terminated_supervisor_ends_with_its_command(node: Node) -> None:
    node.deliver(make_token())
    run = node.start(command=["sleep", "60"])
    wait_for(lambda: any(f.startswith("job.") for f in os.listdir(node.user_dir)), "the copy")
    run.proc.terminate()
    assert run.proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert sorted(os.listdir(node.user_dir)) == ["slurm_jwt"]


def test_killed_supervisor_leaves_no_orphan(node: Node) -> None:
    node.deliver(make_token())
    run = node.start()
    pid = run.child_pid
    assert alive(pid)
    run.proc.kill()
    run.proc.wait(timeout=20)
    wait_for(lambda: not alive(pid), "the command to die with its supervisor")


def _controlling_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_terminal_ctrl_c_reaches_the_command_once(node: Node) -> None:
    """The terminal signals the whole foreground group: no second SIGINT from us."""
    node.deliver(make_token())
    master, slave = os.openpty()
    try:
        run = node.start(
            traps=("SIGINT",),
            stdin=slave,
            start_new_session=True,
            preexec_fn=_controlling_tty,
        )
        run.info()
        os.write(master, b"\x03")
        wait_for(lambda: "SIGINT" in run.log(), "Ctrl-C to reach the command")
        time.sleep(0.3)
        assert run.log() == ["SIGINT"]
        assert run.stop() == 0
    finally:
        os.close(master)
        os.close(slave)


# -- the job's copy of the token ------------------------------------------------------


def test_command_gets_a_private_copy_and_no_variable(node: Node) -> None:
    token = node.deliver(make_token())
    run = node.start(env={"SLURM_JOB_ID": "4242", "SLURM_JWT": make_token(ttl=60)})
    info = run.info()
    assert info["has_SLURM_JWT"] is False
    assert run.copy == node.user_dir / f"job.4242.{run.proc.pid}"
    st = run.copy.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, UID)
    assert run.copy.read_text() == token  # the delivered token, issued no earlier
    assert run.stop() == 0
    assert not run.copy.exists()


def test_inherited_token_is_kept_in_the_copy_until_one_is_delivered(node: Node) -> None:
    node.user_dir.mkdir(mode=0o700)
    inherited = make_token(ttl=120)
    run = node.start(env={"SLURM_JWT": inherited})
    assert run.info()["has_SLURM_JWT"] is False
    assert run.copy.read_text() == inherited
    delivered = node.deliver(make_token())
    wait_for(lambda: read(run.copy) == delivered, "the delivered token in the copy")
    assert run.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_copy_follows_a_new_delivery(node: Node, mode: str) -> None:
    first = node.deliver(make_token(age=10))
    run = node.start(mode=mode)
    assert read(run.copy) == first
    second = node.deliver(make_token())
    started = time.monotonic()
    wait_for(lambda: read(run.copy) == second, "the new token in the copy", timeout=15)
    # inotify: at once; polling: every 2 s (loaded machines get some slack)
    assert time.monotonic() - started < (2.0 if mode == "inotify" else 4.5)
    assert run.stop() == 0
    assert run.stderr == ""


def test_older_delivery_does_not_replace_a_newer_token(node: Node) -> None:
    newer = node.deliver(make_token())
    run = node.start()
    assert read(run.copy) == newer
    node.deliver(make_token(age=100, ttl=1000))
    latest = node.deliver(make_token(ttl=900))  # proves the older one was seen and skipped
    node.deliver(make_token(age=100, ttl=1000))
    time.sleep(0.5)
    assert read(run.copy) in (newer, latest)
    assert run.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_copy_appears_when_a_token_is_first_delivered(node: Node, mode: str) -> None:
    run = node.start(mode=mode)
    wait_for(lambda: "no token delivered" in run.stderr, "the missing token reported")
    assert not node.user_dir.exists()
    token = node.deliver(make_token())
    wait_for(lambda: read(run.copy) == token, "the first token in the copy")
    assert run.stop() == 0
    assert run.stderr.count("\n") == 1


def test_copy_is_removed_at_expiry_with_a_warning(node: Node) -> None:
    token = node.deliver(make_token(ttl=5, age=25))  # 30 s lifetime: windows of 15 s and 6 s
    run = node.start()
    assert read(run.copy) == token
    wait_for(lambda: not run.copy.exists(), "the expired token removed", timeout=15)
    gone = time.time()
    # Removed after exp, and soon after: 1 s is the promise; the extra second
    # is this test's own polling latency on a loaded 2-core machine.
    assert exp_of(token) < gone < exp_of(token) + 2.0
    assert run.proc.poll() is None
    assert "token expires in" in run.stderr
    # The copy goes first, then the line: wait for it rather than race it.
    wait_for(lambda: "token EXPIRED and no newer one has arrived" in run.stderr, "the warning")
    fresh = node.deliver(make_token())
    wait_for(lambda: read(run.copy) == fresh, "a fresh token after the gap")
    assert run.stop() == 0
    assert "a new token has arrived" in run.stderr


def test_deleted_delivery_keeps_the_copy_until_expiry(node: Node) -> None:
    token = node.deliver(make_token(ttl=4, age=26))
    run = node.start()
    assert read(run.copy) == token
    node.file.unlink()
    wait_for(lambda: "no token delivered" in run.stderr, "the deletion reported")
    if time.time() < exp_of(token):
        assert read(run.copy) == token
    wait_for(lambda: not run.copy.exists(), "the expired token removed", timeout=15)
    assert time.time() > exp_of(token)
    assert run.stderr.count("no token delivered") == 1
    assert run.stop() == 0


def test_corrupt_delivery_is_reported_once_and_the_copy_kept(node: Node) -> None:
    token = node.deliver(make_token(age=10))
    run = node.start()
    assert read(run.copy) == token
    node.deliver("garbage, not a token")
    wait_for(lambda: "not a JSON Web Token" in run.stderr, "the corrupt file reported")
    node.deliver("other.garbage")
    node.file.write_text("\x00\xff half-written")  # in place, as a careless writer would
    node.file.chmod(0o600)
    time.sleep(0.3)
    assert read(run.copy) == token
    fresh = node.deliver(make_token())
    wait_for(lambda: read(run.copy) == fresh, "the next good token in the copy")
    assert run.stderr.count("not a JSON Web Token") == 1, run.stderr
    assert "keeping the job's current token" in run.stderr
    assert run.stop() == 0


def test_foreign_or_insecure_tokens_are_refused(node: Node) -> None:
    node.deliver(make_token(sun="somebody-else"))
    run = node.start()
    wait_for(lambda: "another user" in run.stderr, "the foreign token refused")
    assert not run.copy.exists()
    node.deliver(make_token(), mode=0o644)
    wait_for(lambda: "lets others in" in run.stderr, "the readable token refused")
    assert not run.copy.exists()
    token = node.deliver(make_token())
    wait_for(lambda: read(run.copy) == token, "the good token in the copy")
    assert run.stop() == 0


# -- the end of a chain --------------------------------------------------------------


def test_the_last_token_of_a_chain_is_announced_once(node: Node) -> None:
    """krenew's warning: the token at its renew-until cannot be renewed; only a
    new login helps.  A token with renewable life left says nothing."""
    now = int(time.time())
    node.deliver(make_token(ttl=600, renew_until=now + 3600))
    run = node.start()
    run.info()
    time.sleep(0.3)
    quiet = run.stderr
    node.deliver(make_token(ttl=300, renew_until=now + 300, age=-1))
    wait_for(lambda: "renew-until" in run.stderr, "the chain's end to be announced")
    node.deliver(make_token(ttl=300, renew_until=now + 300, age=-2))
    time.sleep(0.3)

    assert run.stop() == 0
    assert quiet == ""
    lines = [line for line in run.stderr.splitlines() if "renew-until" in line]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("tokenlife-engine: the token cannot be renewed past its ")
    assert "log in again" in lines[0]


# -- run --on-change -------------------------------------------------------------------


def test_on_change_runs_the_hook_once_per_new_token(node: Node, tmp_path: Path) -> None:
    """The first token (there before the command starts) runs nothing; each
    newer delivery runs the hook once, with where the token is, never the token."""
    record = tmp_path / "hook.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(
        "#!/bin/sh\n"
        'echo "$TOKENLIFE_FILE $TOKENLIFE_EXP $TOKENLIFE_VERSION ${SLURM_JWT:-none}"'
        f" >> {record}\n"
    )
    hook.chmod(0o755)
    now = int(time.time())
    node.deliver(make_token(ttl=600, renew_until=now + 3600))
    stop = tmp_path / "stop"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "client_engine.cli", "run", "--on-change", str(hook), "--"),
            *("sh", "-c", f'while [ ! -e {stop} ]; do sleep 0.05; done; echo "$SLURM_JWT_FILE"'),
        ],
        env=node.env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        tokens = []
        for i in range(2):  # each delivery seen, then the next (faster ones coalesce)
            tokens.append(node.deliver(make_token(ttl=600 + i, age=-1 - i)))
            runs = i + 1
            wait_for(lambda n=runs: len((read(record) or "").splitlines()) == n, f"run {runs}")
        time.sleep(0.5)  # no third run comes
        stop.touch()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 0, err
    lines = (read(record) or "").splitlines()
    assert len(lines) == 2, lines
    copy = out.strip()
    assert [line.split()[0] for line in lines] == [copy, copy]
    assert [int(line.split()[1]) for line in lines] == [exp_of(t) for t in tokens]
    assert all(line.split()[3] == "none" for line in lines), "SLURM_JWT never reaches the hook"
    assert not any(t in (read(record) or "") + err for t in tokens)


def test_a_failing_and_a_hanging_hook_never_stop_the_next_change(
    node: Node, tmp_path: Path
) -> None:
    """Three new tokens: the first run fails (exit 3), the second hangs past
    --on-change-timeout and is killed with its process group, the third exits
    0. Each is said in one line, the command's copy follows every token, and
    the command ends normally with its own status."""
    starts = tmp_path / "starts"
    ends = tmp_path / "ends"
    hook = tmp_path / "hook.sh"
    hook.write_text(
        "#!/bin/sh\n"
        f"n=$(($(cat {starts} 2>/dev/null | wc -l) + 1))\n"
        f'echo "$n $$ $TOKENLIFE_EXP" >> {starts}\n'
        "case $n in\n"
        "  1) exit 3 ;;\n"
        "  2) sleep 300 & echo $! > " + str(tmp_path / "child") + "; wait ;;\n"
        "esac\n"
        f"echo $n >> {ends}\n"
    )
    hook.chmod(0o755)
    now = int(time.time())
    node.deliver(make_token(ttl=600, renew_until=now + 3600))
    stop = tmp_path / "stop"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "client_engine.cli", "run"),
            *("--on-change", str(hook), "--on-change-timeout", "1", "--"),
            *("sh", "-c", f'while [ ! -e {stop} ]; do sleep 0.05; done; cat "$SLURM_JWT_FILE"'),
        ],
        env=node.env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        tokens = []
        for i in range(3):
            tokens.append(node.deliver(make_token(ttl=600 + i, age=-1 - i)))
            runs = i + 1
            wait_for(lambda n=runs: len((read(starts) or "").splitlines()) == n, f"run {runs}")
            if runs == 2:  # killed at its limit, then the next change is taken
                wait_for(
                    lambda: not alive(int((read(tmp_path / "child") or "0").strip() or 0)),
                    "the hung hook's child killed",
                    timeout=15,
                )
        wait_for(lambda: (read(ends) or "").split() == ["3"], "the third run ended")
        stop.touch()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 0, err
    assert out.strip() == tokens[-1]  # the copy followed every token through the bad runs
    lines = (read(starts) or "").splitlines()
    assert [int(line.split()[2]) for line in lines] == [exp_of(t) for t in tokens]
    said = [line for line in err.splitlines() if line.startswith("tokenlife-engine: hook ")]
    assert len(said) == 2, err
    assert said[0].endswith(") failed: exit status 3")
    assert said[1].endswith(") timed out after 1s: killed")
    assert sum("timed out after 1s: killed" in line for line in said) == 1, said
    assert not any(t in err for t in tokens)


@pytest.mark.parametrize(
    "args",
    [["--on-change-timeout", "0"], ["--on-change-timeout=x"], ["--on-change-timeout"]],
)
def test_on_change_timeout_usage_errors(node: Node, args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "client_engine.cli", "run", "--on-change", "true", *args, "--"],
        env=node.env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("tokenlife-engine: run: --on-change-timeout ")
    assert len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("args", [["--on-change"], ["--on-change", "--"], ["--on-colour=x"]])
def test_on_change_usage_errors(node: Node, args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "client_engine.cli", "run", *args, "--", "true"],
        env=node.env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("tokenlife-engine: run: ")
