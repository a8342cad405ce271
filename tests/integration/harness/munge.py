"""Private munged instances for the pull tests and benchmark.

Each :class:`MungeDaemon` is a real ``munged -F`` run as the ``munge`` user
with its own key, socket, log, pid and seed files under ``workdir``: no
system munged is touched, and nothing listens on the network (munged only
serves a Unix socket).  Two daemons with the same key are two hosts of one
munge realm (``origin`` sets the address munged writes into its credentials,
so tests can play several nodes on one machine); a daemon with another key is
a foreign realm, whose credentials the first refuses.

The socket directory is world-traversable (0755), so unprivileged test users
(tests/integration/harness/users.py) can make and read credentials, as on a
real cluster node.  Needs root and Debian's ``munge`` package.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

MUNGED = "/usr/sbin/munged"
LIBMUNGE = "libmunge.so.2"


def have_munge() -> bool:
    """munged and libmunge are installed, and the munge account exists."""
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return False
    if not os.access(MUNGED, os.X_OK):
        return False
    import ctypes

    try:
        ctypes.CDLL(LIBMUNGE)
    except OSError:
        return False
    return True


def new_key() -> bytes:
    return os.urandom(128)


class MungeError(RuntimeError):
    pass


class MungeDaemon:
    """``with MungeDaemon(workdir, key) as m:`` → ``m.socket`` is its socket path."""

    def __init__(
        self,
        workdir: Path,
        key: bytes | None = None,
        origin: str | None = None,
        threads: int = 2,
        max_ttl: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.key = key if key is not None else new_key()
        self.origin = origin
        self.threads = threads
        self.max_ttl = max_ttl
        self.socket = workdir / "socket" / "munge.socket"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        munge = pwd.getpwnam("munge")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        state, sockdir = self.workdir / "state", self.socket.parent
        for d, mode in ((state, 0o700), (sockdir, 0o755)):
            d.mkdir(exist_ok=True)
            os.chown(d, munge.pw_uid, munge.pw_gid)
            d.chmod(mode)
        key = state / "key"
        key.unlink(missing_ok=True)
        with open(key, "xb", opener=lambda p, flags: os.open(p, flags, 0o400)) as fh:
            fh.write(self.key)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        argv = [
            "setpriv",
            f"--reuid={munge.pw_uid}",
            f"--regid={munge.pw_gid}",
            "--init-groups",
            MUNGED,
            "-F",
            "--force",  # the temp dir's parents are not munge's own
            f"--socket={self.socket}",
            f"--num-threads={self.threads}",
            *(f"--{f}-file={state / f}" for f in ("key", "log", "pid", "seed")),
        ]
        if self.origin:
            argv.append(f"--origin={self.origin}")
        if self.max_ttl is not None:
            argv.append(f"--max-ttl={self.max_ttl}")
        out = open(self.workdir / "munged.out", "ab")  # noqa: SIM115 - kept by the child
        with out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise MungeError(f"munged exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise MungeError(f"munged did not start within 10 s:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log(self) -> str:
        parts = []
        for path in (self.workdir / "munged.out", self.workdir / "state" / "log"):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)


class MungeRealm:
    """A temp dir with any number of munged instances; removed on exit."""

    def __init__(self, prefix: str = "tl-munge-") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.root.chmod(0o755)
        self.daemons: list[MungeDaemon] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(
        self,
        name: str,
        key: bytes | None = None,
        origin: str | None = None,
        threads: int = 2,
        max_ttl: int | None = None,
    ) -> MungeDaemon:
        daemon = MungeDaemon(self.root / name, key, origin, threads, max_ttl)
        daemon.start()
        self.daemons.append(daemon)
        return daemon

    def close(self) -> None:
        try:
            for daemon in reversed(self.daemons):
                daemon.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
