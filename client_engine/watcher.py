"""``tokenlife-engine watch``: run a hook after each change of a token file.

    tokenlife-engine watch --file PATH [--timeout SECONDS] [--poll SECONDS]
                           [--initial] -- CMD [ARG...]
    tokenlife-engine watch --file PATH [...] --exec CMD

For services that hold a copy of a token (a web portal, a REST client that
reads its token at start): the hook copies it or reloads the service.  One
process, no threads, standard library only, asleep in ``poll()`` on two
descriptors: signals (a ``set_wakeup_fd`` pipe: TERM and INT end the watch,
HUP makes it read the file again, CHLD means a hook ended) and inotify on
PATH's directory (client_engine.watch's ctypes helpers), or polling PATH's
stat signature every ``--poll`` seconds where inotify is missing, while the
directory is missing, or with ``TOKENLIFE_ENGINE_POLL=1``.  With inotify the
file is still looked at every minute, as a safety net.

A change is: PATH now holds a token the caller may use
(client_engine.tokens.load: a regular private file owned by the caller,
naming the caller, not expired) that differs from the last one hooked.  The
token found at start is the first one hooked only with ``--initial``.  A
refused file (missing, foreign, 0644, garbage, another user's, expired) is
reported once per distinct problem and never runs the hook.  Hooks run
through client_engine.hooks.HookRunner: one at a time, each change exactly
once, never blocking the watch.  The token is never logged and never given
to the hook (it gets TOKENLIFE_FILE, the path).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import pwd
import select
import signal
import struct
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import NamedTuple

from client_engine.hooks import HookRunner, parse_seconds
from client_engine.supervisor import POLL_ENV, PROG, say
from client_engine.tokens import Refused, load
from client_engine.watch import (
    IN_CLOEXEC,
    IN_DELETE_SELF,
    IN_DONT_FOLLOW,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_NONBLOCK,
    IN_Q_OVERFLOW,
    USER_MASK,
    libc,
)

USAGE = (
    f"usage: {PROG} watch --file PATH [--timeout SECONDS] [--poll SECONDS] [--initial] "
    "-- CMD [ARG...]"
)
DEFAULT_TIMEOUT = 60.0
DEFAULT_POLL = 5.0
#: with inotify, the file is looked at this often anyway
IDLE_CHECK = 60.0
#: wake this long after a token's exp: it is then refused
EXPIRY_SLACK = 0.002
#: TERM and INT end the watch, HUP reads the file again, CHLD: a hook ended
STOP = (signal.SIGTERM, signal.SIGINT)
SIGNALS = (*STOP, signal.SIGHUP, signal.SIGCHLD)
STOP_NUMBERS = frozenset(int(s) for s in STOP)
#: the supervisor's mask, but PATH's directory may be a symlink (the file may not:
#: tokens.load refuses it)
WATCH_MASK = USER_MASK & ~IN_DONT_FOLLOW
_GONE = IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF
_EVENT = struct.Struct("=iIII")  # struct inotify_event without its name


class UsageError(Exception):
    pass


class Options(NamedTuple):
    path: str
    command: list[str]
    timeout: float = DEFAULT_TIMEOUT
    poll: float = DEFAULT_POLL
    initial: bool = False


def _seconds(name: str, text: str) -> float:
    try:
        return parse_seconds(name, text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_args(args: list[str]) -> Options:
    """The options of ``watch``; UsageError (one line) if they make no sense."""
    given: dict[str, str] = {}
    initial = False
    command: list[str] | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            command = args[i + 1 :]
            break
        name, eq, text = arg.partition("=")
        if name == "--initial" and not eq:
            initial = True
            i += 1
            continue
        if name not in ("--file", "--timeout", "--poll", "--exec"):
            if arg.startswith("-"):
                raise UsageError(f"unknown option {arg[:40]!r}")
            raise UsageError(f"unexpected {arg[:40]!r}: put the command after --")
        if not eq:
            if i + 1 >= len(args):
                raise UsageError(f"{name} needs a value")
            text = args[i + 1]
        i += 1 if eq else 2
        if name in given:
            raise UsageError(f"{name} given twice")
        given[name] = text
    path = given.get("--file")
    if path is None:
        raise UsageError("--file PATH is missing")
    base = os.path.basename(path)
    if not path.startswith("/") or base in ("", ".", ".."):
        raise UsageError(f"--file {path[:80]!r}: want the absolute path of a file")
    if "--exec" in given:
        if command is not None:
            raise UsageError("--exec CMD or -- CMD [ARG...], not both")
        if not given["--exec"]:
            raise UsageError("--exec needs a command")
        command = [given["--exec"]]
    if not command:
        raise UsageError("no hook command: put it after --")
    timeout = _seconds("--timeout", given.get("--timeout", str(DEFAULT_TIMEOUT)))
    poll = _seconds("--poll", given.get("--poll", str(DEFAULT_POLL)))
    return Options(path, command, timeout, poll, initial)


def _signature(path: str) -> tuple[int, ...] | None:
    """What changes when the file is replaced or rewritten (None: missing)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid)


class DirWatch:
    """inotify on the directory of one file: tells when that file may have changed."""

    def __init__(self, lib: ctypes.CDLL, fd: int, path: str) -> None:
        directory, name = os.path.split(path)
        self._lib = lib
        self.fd = fd
        self._dir = os.fsencode(directory or "/")
        self._name = os.fsencode(name)
        self._wd = -1
        self.arm()

    @classmethod
    def open(cls, path: str) -> DirWatch | None:
        """None where inotify is missing (or its per-user limit is used up)."""
        lib = libc()
        if lib is None or not hasattr(lib, "inotify_init1"):
            return None
        fd = int(lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        return cls(lib, fd, path) if fd >= 0 else None

    @property
    def active(self) -> bool:
        return self._wd >= 0

    def arm(self) -> None:
        """Watch the directory, if it is there (tried again while it is not)."""
        if self._wd < 0:
            mask = ctypes.c_uint32(WATCH_MASK)
            self._wd = int(self._lib.inotify_add_watch(self.fd, self._dir, mask))

    def drain(self) -> bool:
        """Read the pending events; True if the file may have changed."""
        changed = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                return changed
            if not data:
                return changed
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = data[start : start + length].rstrip(b"\0")
                offset = start + length
                if mask & IN_Q_OVERFLOW:
                    changed = True
                elif wd == self._wd and mask & _GONE:  # the directory went away
                    if mask & IN_MOVE_SELF:
                        self._lib.inotify_rm_watch(self.fd, wd)
                    self._wd = -1
                    changed = True
                elif wd == self._wd and name == self._name:
                    changed = True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _noop(signum: int, frame: FrameType | None) -> None:
    pass


class Watcher:
    """Watches one token file and hooks each new valid token, until TERM or INT."""

    def __init__(
        self, options: Options, uid: int, user: str, portable: bool, environ: Mapping[str, str]
    ) -> None:
        self.options = options
        self.path = options.path
        self.uid, self.user = uid, user
        self.portable = portable
        self.runner = HookRunner(options.command, options.timeout, say, environ=environ)
        self.watch: DirWatch | None = None
        #: the stat signature of the file when last read (False: never read)
        self.seen: tuple[int, ...] | bool | None = False
        #: sha256 of the last token hooked (or found at start), never the token
        self.hooked: bytes | None = None
        #: exp of the valid token the file holds now: re-read it then
        self.expires: float | None = None
        self.problem: str | None = None
        self.last_check = -math.inf

    def interval(self) -> float:
        watched = self.watch is not None and self.watch.active
        return IDLE_CHECK if watched else self.options.poll

    def check(self, force: bool, at_start: bool = False) -> None:
        """Read the file if it changed (or ``force``); queue a hook run for a new token."""
        self.last_check = time.monotonic()
        if self.watch is not None and not self.watch.active:
            self.watch.arm()
        signature = _signature(self.path)
        if signature == self.seen and not force:
            return
        self.seen = signature
        now = time.time()
        try:
            token = load(self.path, self.uid, self.user, now)
        except Refused as exc:
            self.expires = None
            if str(exc) != self.problem:
                self.problem = str(exc)
                say(f"{exc}; hook not run")
            return
        self.problem = None
        self.expires = token.exp
        key = hashlib.sha256(token.value.encode()).digest()
        if key == self.hooked:
            return
        self.hooked = key
        version = token.version if token.version is not None else token.iat
        left = int(token.exp - now)
        if at_start and not self.options.initial:
            say(f"{self.path}: token version {version} (valid for {left}s); hook on its change")
            return
        say(f"{self.path}: new token version {version} (valid for {left}s): running the hook")
        self.runner.changed(token, self.path, self.user)

    def _check(self, force: bool, at_start: bool = False) -> None:
        try:
            self.check(force, at_start)
        except Exception as exc:  # a bug here must not end the watch
            say(f"internal error ({type(exc).__name__}); carrying on")

    def timeout(self, hook: float | None) -> float:
        """Seconds to sleep: next look at the file, the hook's deadline or the token's exp."""
        wait = self.last_check + self.interval() - time.monotonic()
        if hook is not None:
            wait = min(wait, hook)
        if self.expires is not None:
            wait = min(wait, self.expires + EXPIRY_SLACK - time.time())
        return max(0.0, min(wait, self.interval()))

    def serve(self) -> int:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}
        for signum in SIGNALS:
            old[signum] = signal.signal(signum, _noop)
        old_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        try:
            if not self.portable:
                self.watch = DirWatch.open(self.path)
            how = (
                "inotify"
                if self.watch is not None and self.watch.active
                else f"polling every {self.options.poll:g}s"
            )
            say(
                f"watching {self.path} ({how}); hook {self.runner.name}, "
                f"timeout {self.options.timeout:g}s"
            )
            self._check(force=True, at_start=True)
            return self._loop(read_end)
        finally:
            self.runner.close()
            if self.watch is not None:
                self.watch.close()
            signal.set_wakeup_fd(old_fd)
            for number, handler in old.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(number, handler)
            os.close(read_end)
            os.close(write_end)

    def _loop(self, signal_fd: int) -> int:
        poller = select.poll()
        poller.register(signal_fd, select.POLLIN)
        registered = -1
        while True:
            if self.watch is not None and self.watch.fd != registered:
                poller.register(self.watch.fd, select.POLLIN)
                registered = self.watch.fd
            hook = self.runner.tend(time.monotonic())  # reap, time out, start the next
            changed = force = False
            for fd, _events in poller.poll(int(self.timeout(hook) * 1000) + 1):
                if fd == signal_fd:
                    received = _drain_signals(fd)
                    if received & STOP_NUMBERS:
                        return 0
                    force |= signal.SIGHUP in received
                elif fd == registered and self.watch is not None:
                    changed |= self.watch.drain()
            expired = self.expires is not None and time.time() > self.expires
            due = time.monotonic() >= self.last_check + self.interval()
            if changed or force or expired or due:
                self._check(force=force or expired)


def _drain_signals(fd: int) -> set[int]:
    received: set[int] = set()
    while True:
        try:
            data = os.read(fd, 512)
        except (BlockingIOError, InterruptedError):
            return received
        if not data:
            return received
        received.update(data)


def watch_main(environ: Mapping[str, str], args: list[str]) -> int:
    """``tokenlife-engine watch ARGS``: runs until TERM/INT (0); 2 on usage errors."""
    if args[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n       {PROG} watch --file PATH [...] --exec CMD\nSee docs/hooks.md.")
        return 0
    try:
        options = parse_args(args)
    except UsageError as exc:
        say(f"watch: {exc} ({USAGE.removeprefix('usage: ')})")
        return 2
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        say(f"watch: uid {uid} is not in the user database")
        return 1
    portable = environ.get(POLL_ENV, "") not in ("", "0")
    with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C before the handlers are in
        return Watcher(options, uid, user, portable, environ).serve()
    return 0
