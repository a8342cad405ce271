"""``tokenlife-engine watch``: a real watcher process, real hooks, real files.

Each test starts the watcher (client_engine.watcher.watch_main; until cli.py
dispatches ``watch``, through ``python -c``) on a token file in tmp_path,
with inotify and with ``TOKENLIFE_ENGINE_POLL=1``, replaces the file the way
transfer does (a private temporary file renamed over it) and polls the
files its hook writes.  No fixed sleeps for things that must happen; a short
settling time only where a test shows that something does NOT happen more.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from producer.keys import HS256Key
from tests.conftest import REPO, require_root, wait_for
from tokenlife.slurm_jwt import SlurmJwt
from tokenlife.users import UserInfo, lookup

USER = pwd.getpwuid(os.getuid()).pw_name
# The engine's own entry point, with the command: what `tokenlife-engine watch` runs.
ENTRY = "import sys; from client_engine.cli import main; sys.exit(main(['watch', *sys.argv[1:]]))"
MODES = ["inotify", "poll"]
POLL = 0.1  # --poll in the tests: short, so polling is quick too
#: a uid that is not the caller's: makes a file foreign
STRANGER = 54321

#: records each run; behaves as the marker files in its directory say
HOOK = r"""#!/bin/sh
out=@OUT@
v=$TOKENLIFE_VERSION
echo "start $v" >> "$out/log"
env > "$out/env.$v"
echo $$ > "$out/.pid" && mv "$out/.pid" "$out/pid.$v"
[ -e "$out/fail.$v" ] && exit 1
if [ -e "$out/hang.$v" ]; then
    sleep 60 &
    echo $! > "$out/.gc" && mv "$out/.gc" "$out/grandchild.$v"
    wait
fi
echo "done $v" >> "$out/log"
"""


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaps counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


class Site:
    """A token file, its hook, and the watcher processes started on them."""

    def __init__(self, root: Path, mode: str) -> None:
        self.root = root
        self.mode = mode
        self.dir = root / "tokens"
        self.dir.mkdir(mode=0o700)
        self.path = self.dir / "slurm_jwt"
        self.out = root / "out"
        self.out.mkdir()
        self.hook = root / "hook.sh"
        self.hook.write_text(HOOK.replace("@OUT@", str(self.out)))
        self.hook.chmod(0o755)
        self.key = HS256Key(os.urandom(32))
        self.me = lookup(USER)
        self.tokens: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.err = root / "watch.err"

    # -- tokens ------------------------------------------------------------------

    def token(
        self, version: int, ttl: int = 600, age: int = 0, user: UserInfo | None = None
    ) -> str:
        now = int(time.time())
        text = SlurmJwt().make(
            self.key,
            user or self.me,
            now - age,
            now - age + ttl,
            renew_until=now + 3600,
            version=version,
        )
        self.tokens.append(text)
        return text

    def replace(self, text: str, mode: int = 0o600, uid: int | None = None) -> None:
        """As transfer does: a temporary file in the same directory, renamed over."""
        tmp = self.dir / ".slurm_jwt.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, text.encode())
        os.close(fd)
        os.chmod(tmp, mode)
        if uid is not None:
            os.chown(tmp, uid, uid)
        os.rename(tmp, self.path)

    # -- the watcher -------------------------------------------------------------

    def start(
        self, *options: str, command: list[str] | None = None, polling: bool | None = None
    ) -> None:
        env = {
            "PATH": os.environ["PATH"],
            "PYTHONDONTWRITEBYTECODE": "1",
            # A token in the watcher's environment must not reach the hook.
            "SLURM_JWT": self.token(999),
        }
        if self.mode == "poll":
            env["TOKENLIFE_ENGINE_POLL"] = "1"
        hook = command if command is not None else ["--", str(self.hook)]
        argv = ["--file", str(self.path), "--poll", str(POLL), *options, *hook]
        with self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", ENTRY, *argv],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env,
                cwd=REPO,
            )
        self.wait_said("watching ")
        # The first look at the file says one line (what it found): after it,
        # a replacement is a change.
        wait_for(lambda: len(self.said().splitlines()) >= 2, "the first look at the file")
        polling = self.mode == "poll" if polling is None else polling
        expected = f"(polling every {POLL:g}s)" if polling else "(inotify)"
        assert expected in self.said(), self.said()

    def said(self) -> str:
        return self.err.read_text() if self.err.exists() else ""

    def wait_said(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        def there() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.said()
            return self.said().count(text) >= count

        wait_for(there, repr(text), timeout)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        status = self.proc.wait(timeout=10)
        self.proc = None
        return status

    # -- the hook's records ------------------------------------------------------

    def log(self) -> list[str]:
        path = self.out / "log"
        return path.read_text().splitlines() if path.exists() else []

    def starts(self) -> list[int]:
        return [int(line.split()[1]) for line in self.log() if line.startswith("start ")]

    def wait_log(self, line: str) -> None:
        wait_for(lambda: line in self.log(), repr(line))

    def env(self, version: int) -> dict[str, str]:
        text = (self.out / f"env.{version}").read_text()
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def settle(self) -> None:
        """Long enough for a spurious run to show (several polls)."""
        time.sleep(5 * POLL + 0.2)

    def check_no_token_leaked(self) -> None:
        said = self.said()
        for text in self.tokens:
            assert text not in said
            assert text.split(".")[1] not in said
        for env in self.out.glob("env.*"):
            content = env.read_text()
            assert "SLURM_JWT=" not in content
            assert not any(text in content for text in self.tokens)


@pytest.fixture(params=MODES)
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path, request.param)
    yield site
    if site.proc is not None:
        site.proc.kill()
        site.proc.wait()


def test_each_replacement_runs_the_hook_once(site: Site) -> None:
    site.replace(site.token(1))
    site.start()
    site.wait_said("token version 1 (valid for")  # found at start: not a change
    for version in (2, 3, 4):
        site.replace(site.token(version))
        site.wait_log(f"done {version}")
    site.settle()
    assert site.starts() == [2, 3, 4]
    for version in (2, 3, 4):
        env = site.env(version)
        assert env["TOKENLIFE_VERSION"] == str(version)
        assert env["TOKENLIFE_FILE"] == str(site.path)
        assert env["TOKENLIFE_USER"] == USER
        assert int(env["TOKENLIFE_RENEW_UNTIL"]) > int(env["TOKENLIFE_EXP"]) > time.time()
    # The same token delivered again (a new file, same contents) is no change.
    site.replace(site.tokens[-1])
    site.settle()
    assert site.starts() == [2, 3, 4]
    assert site.stop() == 0
    site.check_no_token_leaked()


def test_initial_hooks_the_token_found_at_start(site: Site) -> None:
    site.replace(site.token(1))
    site.start("--initial", command=["--exec", str(site.hook)])
    site.wait_log("done 1")
    site.replace(site.token(2))
    site.wait_log("done 2")
    site.settle()
    assert site.starts() == [1, 2]
    assert site.stop() == 0


def test_failing_and_hanging_hooks_do_not_stop_the_watch(site: Site) -> None:
    (site.out / "fail.2").touch()
    (site.out / "hang.3").touch()
    site.start("--timeout", "2")
    site.wait_said("no token delivered to this node; hook not run")
    site.replace(site.token(2))
    site.wait_said("(version 2) failed: exit status 1")
    site.replace(site.token(3))
    wait_for(lambda: (site.out / "grandchild.3").exists(), "the hanging hook")
    grandchild = int((site.out / "grandchild.3").read_text())
    # The watch goes on while the hook hangs: version 4 is seen at once...
    site.replace(site.token(4))
    site.wait_said("new token version 4")
    assert "timed out" not in site.said()
    # ...and hooked after version 3's hook is killed (with its child).
    site.wait_log("done 4")
    assert site.said().count("(version 3) timed out after 2s: killed") == 1
    wait_for(lambda: not alive(grandchild), "the hanging hook's child to go")
    assert site.starts() == [2, 3, 4]
    assert [line for line in site.log() if line.startswith("done")] == ["done 4"]
    # And once more: a plain change after all that.
    site.replace(site.token(5))
    site.wait_log("done 5")
    assert site.stop() == 0
    site.check_no_token_leaked()


def test_refused_files_never_run_the_hook(site: Site) -> None:
    require_root()  # to give a file to another uid
    site.replace(site.token(1))
    site.start()
    site.wait_said("token version 1 (valid for")
    stranger = UserInfo("someone-else", STRANGER, STRANGER, "", "/", "/bin/sh", ())
    cases: list[tuple[Callable[[], None], str]] = [
        (lambda: site.replace(site.token(2), uid=STRANGER), f"owned by uid {STRANGER}"),
        (lambda: site.replace(site.token(3), mode=0o644), "mode 0644 lets others in"),
        (lambda: site.replace("garbage\n"), "not a JSON Web Token"),
        (lambda: site.replace(site.token(4, user=stranger)), "for another user (someone-else)"),
        (lambda: site.replace(site.token(5, ttl=60, age=120)), "token expired"),
        (lambda: site.path.unlink(), "no token delivered to this node"),
    ]
    for make, problem in cases:
        make()
        site.wait_said(problem)
        last = site.said().splitlines()[-1]
        assert problem in last and last.endswith("; hook not run"), last
    # A symlink to a good token is refused too.
    good = site.dir / "elsewhere"
    good.write_text(site.token(6))
    good.chmod(0o600)
    site.path.symlink_to(good)
    site.wait_said("is a symlink, refused")
    site.settle()
    assert site.starts() == []
    # Then a good one: hooked once.
    site.path.unlink()
    site.wait_said("no token delivered to this node", count=2)
    site.replace(site.token(7))
    site.wait_log("done 7")
    site.settle()
    assert site.starts() == [7]
    # Each problem was said once.
    for _make, problem in cases[:-1]:
        assert site.said().count(problem) == 1, problem
    assert site.stop() == 0
    site.check_no_token_leaked()


def test_a_token_that_expires_in_place_is_reported(site: Site) -> None:
    site.start()
    site.replace(site.token(1, ttl=2))
    site.wait_log("done 1")
    site.wait_said("token expired", timeout=5)
    site.settle()
    assert site.starts() == [1]
    assert site.stop() == 0


def test_a_missing_directory_is_waited_for(tmp_path: Path) -> None:
    site = Site(tmp_path, "inotify")
    site.dir.rmdir()
    try:
        site.start(polling=True)  # nothing to watch yet
        site.wait_said("no token delivered to this node")
        site.dir.mkdir(mode=0o700)
        site.replace(site.token(1))
        site.wait_log("done 1")
        # Now inotify watches the directory (the safety-net poll is a minute away).
        site.replace(site.token(2))
        site.wait_log("done 2")
        assert site.starts() == [1, 2]
        assert site.stop() == 0
    finally:
        if site.proc is not None:
            site.proc.kill()
            site.proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_ends_the_watch_and_its_hook(site: Site, signum: int) -> None:
    (site.out / "hang.1").touch()
    site.start("--timeout", "60")
    site.replace(site.token(1))
    wait_for(lambda: (site.out / "grandchild.1").exists(), "the hanging hook")
    hook = int((site.out / "pid.1").read_text())
    grandchild = int((site.out / "grandchild.1").read_text())
    started = time.monotonic()
    assert site.stop(signum) == 0
    assert time.monotonic() - started < 5
    assert not alive(hook)
    wait_for(lambda: not alive(grandchild), "the hook's child to go", timeout=5)
    assert "(version 1) killed: exiting" in site.said()


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ([], "--file PATH is missing"),
        (["--file"], "--file needs a value"),
        (["--file", "relative/slurm_jwt", "--", "true"], "want the absolute path"),
        (["--file", "/run/x/", "--", "true"], "want the absolute path"),
        (["--file", "/run/x"], "no hook command"),
        (["--file", "/run/x", "--"], "no hook command"),
        (["--file", "/run/x", "--timeout", "0", "--", "true"], "--timeout '0'"),
        (["--file", "/run/x", "--timeout=-1", "--", "true"], "--timeout '-1'"),
        (["--file", "/run/x", "--poll", "nan", "--", "true"], "--poll 'nan'"),
        (["--file", "/run/x", "--poll", "inf", "--", "true"], "--poll 'inf'"),
        (["--file", "/run/x", "--timeout", "ten", "--", "true"], "--timeout 'ten'"),
        (["--file", "/run/x", "--retry", "--", "true"], "unknown option '--retry'"),
        (["--file", "/run/x", "true"], "put the command after --"),
        (["--file", "/a", "--file", "/b", "--", "true"], "--file given twice"),
        (["--file", "/run/x", "--exec", "a", "--", "b"], "not both"),
        (["--file", "/run/x", "--exec="], "--exec needs a command"),
        (["--file", "/run/x", "--initial=yes", "--", "true"], "unknown option"),
    ],
)
def test_usage_errors(args: list[str], reason: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", ENTRY, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tokenlife-engine: watch: ")
    assert reason in lines[0]
