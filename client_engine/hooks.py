"""Change hooks (certbot-style): run a command after each change of a token file.

Standard library only, no threads: :class:`HookRunner` is driven by the
caller's poll loop (``tokenlife-engine watch``, ``run --on-change``).
:meth:`HookRunner.changed` queues one run per change, :meth:`HookRunner.tend`
starts, reaps and times out runs without ever blocking, and returns when it
wants to be called again.

Runs are one at a time, in the order of the changes; at most ``queue_limit``
changes wait (beyond that the oldest waiting one is dropped, with one line).
A run gets the caller's environment without ``SLURM_JWT``, plus
TOKENLIFE_USER, TOKENLIFE_FILE, TOKENLIFE_EXP, TOKENLIFE_VERSION and
TOKENLIFE_RENEW_UNTIL: the token itself never reaches the hook (nor its
command line, nor this module's queue), only where it is.  stdin is
/dev/null, stdout and stderr are the caller's, no other descriptor is
inherited, the signal mask is emptied, and the run leads a session (so a
process group) of its own: a timeout kills the whole group, SIGTERM first,
SIGKILL ``grace`` seconds later.  The caller may have children of its own
(``run``'s command), so only the hook's own pid is ever waited for.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping

from client_engine.tokens import Token

#: changes that may wait while a run is going on
QUEUE_LIMIT = 16
#: the longest a hook may be given, and the longest poll interval
MAX_SECONDS = 86400.0
#: seconds between SIGTERM and SIGKILL for a run past its timeout
GRACE = 3.0
#: while a run is going on, tend() wants a call at least this often (callers
#: that also wake on SIGCHLD see the end sooner)
RUNNING_TICK = 0.5
#: after SIGKILL, the run is reaped this soon
KILLED_TICK = 0.05
#: what the hook gets instead of the token
ENV_NAMES = (
    "TOKENLIFE_USER",
    "TOKENLIFE_FILE",
    "TOKENLIFE_EXP",
    "TOKENLIFE_VERSION",
    "TOKENLIFE_RENEW_UNTIL",
)


def describe(status: int) -> str:
    """A Popen return code in words: 'exit status 3', 'killed by SIGKILL'."""
    if status >= 0:
        return f"exit status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    return f"killed by {name}"


def _in_child() -> None:
    # The caller may block signals (run's signalfd): the hook must be killable.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def parse_seconds(name: str, text: str) -> float:
    """``text`` as seconds for option ``name``; ValueError (one line) if not in (0, 1 day]."""
    try:
        value = float(text) if text.isascii() else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
        want = f"want seconds, more than 0 and at most {MAX_SECONDS:g}"
        raise ValueError(f"{name} {text[:40]!r}: {want}")
    return value


class _Run:
    __slots__ = ("deadline", "label", "process", "term_at")

    def __init__(self, process: subprocess.Popen[bytes], label: str, deadline: float) -> None:
        self.process, self.label, self.deadline = process, label, deadline
        #: when SIGTERM went to the group (it timed out), else None
        self.term_at: float | None = None


class HookRunner:
    """Runs ``command`` once per :meth:`changed`, one run at a time.

    ``now`` in :meth:`tend` is any clock, the same in every call
    (``time.monotonic()``): runs start inside :meth:`tend`, so their
    deadlines are on that clock.  ``environ`` defaults to ``os.environ``,
    read when each run starts.
    """

    def __init__(
        self,
        command: list[str],
        timeout: float,
        say: Callable[[str], None],
        *,
        grace: float = GRACE,
        queue_limit: int = QUEUE_LIMIT,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if not command:
            raise ValueError("a hook needs a command")
        self.command = list(command)
        self.timeout = timeout
        self.grace = grace
        self.say = say
        self.environ = environ
        self._queue: deque[dict[str, str]] = deque(maxlen=max(1, queue_limit))
        self._run: _Run | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.command[0]) or self.command[0]

    @property
    def busy(self) -> bool:
        """A run is going on or waiting."""
        return self._run is not None or bool(self._queue)

    @property
    def pid(self) -> int | None:
        """The running hook's pid (its process group too), if one runs."""
        return self._run.process.pid if self._run is not None else None

    def changed(self, token: Token, path: str, user: str) -> None:
        """Queue one run for this change (call :meth:`tend` to start it)."""
        version = token.version if token.version is not None else token.iat
        facts = {
            "TOKENLIFE_USER": user,
            "TOKENLIFE_FILE": path,
            "TOKENLIFE_EXP": str(token.exp),
            "TOKENLIFE_VERSION": str(version),
            "TOKENLIFE_RENEW_UNTIL": "" if token.renew_until is None else str(token.renew_until),
        }
        if len(self._queue) == self._queue.maxlen:
            dropped = self._queue[0]  # the append below pushes it out
            self.say(
                f"hook {self.name}: {len(self._queue)} changes already waiting; "
                f"dropped the oldest (version {dropped['TOKENLIFE_VERSION']})"
            )
        self._queue.append(facts)

    def tend(self, now: float) -> float | None:
        """Reap, time out and start runs; seconds until the next call is due (None: idle)."""
        run = self._run
        if run is not None:
            if self._ended(run):
                self._reap(run)
            elif run.term_at is None and now >= run.deadline:
                self.say(
                    f"hook {self.name} ({run.label}) timed out after {self.timeout:g}s: killed"
                )
                run.term_at = now
                self._signal(run, signal.SIGTERM)
            elif run.term_at is not None and now >= run.term_at + self.grace:
                self._signal(run, signal.SIGKILL)
        while self._run is None and self._queue:
            self._start(self._queue.popleft(), now)
        return self._due(now)

    def _due(self, now: float) -> float | None:
        run = self._run
        if run is None:
            return None
        if run.term_at is None:
            return max(0.0, min(run.deadline - now, RUNNING_TICK))
        return max(0.0, min(run.term_at + self.grace - now, KILLED_TICK))

    def close(self) -> None:
        """For shutdown: drop what waits, kill and reap a running hook (waits up to grace)."""
        if self._queue:
            self.say(f"hook {self.name}: {len(self._queue)} waiting changes dropped at exit")
            self._queue.clear()
        run = self._run
        if run is None:
            return
        self._run = None
        self.say(f"hook {self.name} ({run.label}) killed: exiting")
        self._signal(run, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while not self._ended(run) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._signal(run, signal.SIGKILL)  # the group's stragglers, or all of it
        run.process.wait()

    # -- one run -----------------------------------------------------------------

    def _start(self, facts: dict[str, str], now: float) -> None:
        base = os.environ if self.environ is None else self.environ
        env = {k: v for k, v in base.items() if k != "SLURM_JWT"}
        env.update(facts)
        label = f"version {facts['TOKENLIFE_VERSION']}"
        try:
            process = subprocess.Popen(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
                preexec_fn=_in_child,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            self.say(f"hook {self.name} ({label}): cannot run {self.command[0]}: {reason}")
            return
        self._run = _Run(process, label, now + self.timeout)

    def _ended(self, run: _Run) -> bool:
        """The hook has exited (still a zombie: its pid, and so its group, stay ours)."""
        try:
            info = os.waitid(os.P_PID, run.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # reaped already (cannot happen unless someone waited for -1)
        return info is not None and info.si_pid == run.process.pid

    def _reap(self, run: _Run) -> None:
        if run.term_at is not None:
            # It timed out: what is left of its group goes too, while the
            # zombie leader still holds the group's id.
            self._signal(run, signal.SIGKILL)
        status = run.process.wait()  # it has exited: does not block
        self._run = None
        if run.term_at is None and status != 0:
            self.say(f"hook {self.name} ({run.label}) failed: {describe(status)}")

    @staticmethod
    def _signal(run: _Run, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.process.pid, signum)
