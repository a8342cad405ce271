"""``tokenlife-engine run -- COMMAND``: keep a long job step's token fresh (krenew-style).

One process, standard library only, and no threads but a short-lived one
for each pull (below); it sleeps in ``poll()`` on two descriptors and a
timeout computed from the token's expiry:

* signals: a signalfd (ctypes) for HUP/INT/TERM/QUIT/USR1/USR2 and CHLD, so
  the sender is known; where signalfd is missing, a ``set_wakeup_fd`` pipe;
* deliveries: inotify on ``<token_dir>/<uid>/`` (client_engine.watch), or
  polling the file when inotify is missing or ``TOKENLIFE_ENGINE_POLL=1``.

The token.  The delivered file is read with client_engine.tokens.load (owner,
mode, no symlink, sun, exp).  The per-job copy ``<user dir>/job.<jobid>.<pid>``
(``SLURM_JWT_FILE`` in COMMAND's environment, where ``SLURM_JWT`` is removed)
holds the newest valid token: a delivered one issued no earlier than the
current one replaces it atomically (tokenlife.fsutil.write_secret); a deleted,
corrupt, foreign or expired delivery leaves the current token in place, with
one line on stderr per distinct problem.  A valid ``SLURM_JWT`` inherited
by ``run`` counts as a first token, so a job that had one keeps it in the
file.  Two windows before ``exp``, like botocore's refreshable credentials:
advisory (min(engine.advisory_window, 50% of the lifetime)): the file is
also polled every second; mandatory (min(engine.mandatory_window, 20%)): one
warning per token.  At ``exp`` (Slurm still accepts exp == now, not later)
the copy is removed unless a newer token is there: readers get "no token"
rather than an expired one, within milliseconds.

With ``engine.pull`` (client_engine.fallback), a delivered file that is
missing, unusable or in the advisory window is pulled: at once before the
command starts, later in a thread (at most one at a time, one attempt per
PULL_RETRY) so that a slow token host never holds up signals; the pulled
token lands in the delivered file, where the watch sees it.

The command.  It runs in the supervisor's process group (the terminal and
Slurm see one job; SIGWINCH, SIGTSTP and the terminal reach it as usual),
with PR_SET_PDEATHSIG=SIGKILL so it cannot outlive a killed supervisor.
Forwarded signals go to the command's pid.  A terminal's Ctrl-C/Ctrl-\\
(SIGINT/SIGQUIT sent by the kernel, si_code SI_KERNEL, to the whole
foreground group) already reached the command, so those are not forwarded
again while the command is still in our group; everything sent by a process
(kill, scancel, slurmstepd) and every SIGHUP is forwarded.  Without signalfd
the sender is unknown and everything is forwarded (Ctrl-C then arrives twice).
The supervisor never dies of a forwarded signal: it waits for the command
and exits with its status, or 128+N when the command was killed by signal N.

Why one module of ~450 lines: the loop, its signal rules and its token rules
share one state (the current token, the child, the windows) and one timeout;
split apart, each half would have to expose that state to the other.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType

from client_engine.fallback import due, one_line, pull_now, windows
from client_engine.hooks import HookRunner
from client_engine.tokens import (
    JOB_COPY_PREFIX,
    Refused,
    Token,
    check,
    delivered_path,
    load,
    parse,
    user_dir,
)
from client_engine.watch import DeliveryWatch, libc
from tokenlife.engine_settings import EngineSettings
from tokenlife.fsutil import write_secret
from tokenlife.layout import FILE_NAME

PROG = "tokenlife-engine"
#: how long an --on-change hook may run before it is killed
HOOK_TIMEOUT = 60.0
#: set to 1 to use the portable fallbacks: poll the file, plain signal handlers
POLL_ENV = "TOKENLIFE_ENGINE_POLL"
FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
#: what a terminal sends to its whole foreground process group
_FROM_TERMINAL = (signal.SIGINT, signal.SIGQUIT)
#: seconds between looks at the file: with inotify (a safety net), without it,
#: in the advisory window or without any token
IDLE_POLL = 60.0
FALLBACK_POLL = 2.0
ADVISORY_POLL = 1.0
#: wake this long after exp: Token.valid_at is then False
EXPIRY_SLACK = 0.002
#: with engine.pull: at most one pull attempt this often (each one is bounded
#: by engine.pull_timeout; client_engine.pull spaces the real requests further)
PULL_RETRY = 5.0
#: ... or a tenth of the token's lifetime if that is shorter, but no more often
#: than this: a 10-second token's whole advisory window is 5 s
PULL_RETRY_SHARE, PULL_RETRY_MIN = 0.1, 0.5

PR_SET_PDEATHSIG = 1
SI_KERNEL = 0x80
SFD_NONBLOCK = os.O_NONBLOCK
SFD_CLOEXEC = 0o2000000
#: struct signalfd_siginfo is 128 bytes; its head: ssi_signo, ssi_errno, ssi_code, ssi_pid
_SIGINFO_SIZE = 128
_SIGINFO_HEAD = struct.Struct("=IiiI")


def say(message: str) -> None:
    """One line on stderr; a closed stderr must not stop the supervisor."""
    with contextlib.suppress(OSError):
        os.write(2, f"{PROG}: {message}\n".encode(errors="replace"))


def choose(current: Token | None, candidate: Token | None, now: float) -> Token | None:
    """The token the copy should hold: the newest valid one, ``current`` on a tie."""
    if current is not None and not current.valid_at(now):
        current = None
    if candidate is None or not candidate.valid_at(now):
        return current
    if current is None or candidate.value == current.value:
        return current or candidate
    if (candidate.iat, candidate.exp) >= (current.iat, current.exp):
        return candidate
    return current


def _signature(path: str) -> tuple[int, ...] | None:
    """What changes when the file is replaced or rewritten (None: missing)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid)


def _noop(signum: int, frame: FrameType | None) -> None:
    pass


class Signals:
    """The forwarded signals and SIGCHLD as events on a descriptor."""

    WATCHED = (*FORWARDED, signal.SIGCHLD)

    def __init__(self, portable: bool) -> None:
        self.fd = -1
        self.with_sender = False
        self._old_mask: set[int | signal.Signals] | None = None
        self._pipe_write = -1
        #: ignored when we started (SIGINT and SIGQUIT of `cmd &`): COMMAND inherits
        #: that, and we do not forward them either
        self.ignored = {s for s in FORWARDED if signal.getsignal(s) is signal.SIG_IGN}
        if not portable:
            self._open_signalfd()
        if self.fd < 0:
            self._open_pipe()

    def _open_signalfd(self) -> None:
        lib = libc()
        if lib is None or not hasattr(lib, "signalfd"):
            return
        mask = ctypes.create_string_buffer(128)  # glibc's sigset_t
        lib.sigemptyset(mask)
        for signum in self.WATCHED:
            lib.sigaddset(mask, int(signum))
        old = signal.pthread_sigmask(signal.SIG_BLOCK, self.WATCHED)
        fd = int(lib.signalfd(-1, mask, SFD_NONBLOCK | SFD_CLOEXEC))
        if fd < 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            return
        self.fd, self._old_mask, self.with_sender = fd, old, True

    def _open_pipe(self) -> None:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.fd, self._pipe_write = read_end, write_end
        for signum in self.WATCHED:
            if signum not in self.ignored:
                signal.signal(signum, _noop)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def in_child(self) -> None:
        """Between fork and exec: COMMAND gets the signal mask we started with."""
        if self._old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)

    def read(self) -> list[tuple[int, bool]]:
        """Signals received since the last call: (number, sent by the kernel)."""
        received: list[tuple[int, bool]] = []
        while True:
            try:
                data = os.read(self.fd, _SIGINFO_SIZE * 32 if self.with_sender else 512)
            except (BlockingIOError, InterruptedError):
                return received
            if not data:
                return received
            if not self.with_sender:
                received.extend((signum, False) for signum in data)
                continue
            for offset in range(0, len(data) - _SIGINFO_SIZE + 1, _SIGINFO_SIZE):
                signum, _errno, code, _pid = _SIGINFO_HEAD.unpack_from(data, offset)
                received.append((signum, code == SI_KERNEL))

    def close(self) -> None:
        if self._pipe_write >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._pipe_write)
            self._pipe_write = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Supervisor:
    """Runs COMMAND and keeps the job's copy of the token fresh until COMMAND ends."""

    def __init__(
        self,
        command: list[str],
        settings: EngineSettings,
        uid: int,
        user: str,
        portable: bool,
        on_change: list[str] | None = None,
        hook_timeout: float = HOOK_TIMEOUT,
    ) -> None:
        self.command = command
        self.hook_timeout = hook_timeout
        #: ``run --on-change``: its runner exists while the command runs
        self.on_change = on_change
        self.hooks: HookRunner | None = None
        self.started = False
        self.settings = settings
        self.uid = uid
        self.user = user
        self.portable = portable
        self.token_dir = settings.token_dir
        self.delivered_path = delivered_path(settings.token_dir, uid)
        job = os.environ.get("SLURM_JOB_ID", "")
        name = f"{JOB_COPY_PREFIX}{job if job.isdigit() else 'none'}.{os.getpid()}"
        self.copy_path = f"{user_dir(settings.token_dir, uid)}/{name}"
        self.copy_name = name
        #: the token the copy holds (or is to hold, when ``written`` is False)
        self.current: Token | None = None
        self.written = False
        #: the delivered file's last valid token, and that file's signature when read
        self.delivered: Token | None = None
        self.seen: tuple[int, ...] | bool | None = False
        self.last_check = 0.0
        #: the last problem reported (each distinct one is said once)
        self.problem: str | None = None
        #: the token the mandatory window was announced for
        self.warned: Token | None = None
        #: a token expired with no successor; say so when one arrives
        self.lost = False
        #: the renew-until announced as the end of the chain (said once per chain)
        self.chain_end: int | None = None
        self.watch: DeliveryWatch | None = None
        #: engine.pull: the pull in flight (a thread, once COMMAND runs), when
        #: the next may start, and what the last failed one said (by the thread)
        self.pulling: threading.Thread | None = None
        self.next_pull = 0.0
        self.pull_failed: Refused | None = None
        #: how the last reported pull failure ended: each kind is said once
        self.pull_said: str | None = None

    # -- the token ---------------------------------------------------------------

    def _report(self, problem: str) -> None:
        if problem == self.problem:
            return
        self.problem = problem
        current = self.current
        if current is not None and current.valid_at(time.time()):
            left = int(current.exp - time.time())
            problem += f"; keeping the job's current token (valid for {left}s)"
        say(problem)

    def check(self, now: float) -> None:
        """Look at the delivered file (read it again only if it changed)."""
        self.last_check = now
        if self.watch is not None and not self.watch.active:
            self.watch.arm()
        if self.written and not os.path.lexists(self.copy_path):
            self.written = False  # removed behind our back: write it again
        signature = _signature(self.delivered_path)
        if signature == self.seen:
            return
        self.seen = signature
        try:
            self.delivered = load(self.delivered_path, self.uid, self.user, now)
        except Refused as exc:
            self.delivered = None
            self._report(str(exc))
        else:
            self.problem = None

    def maintain(self, now: float) -> None:
        """Make the copy hold the newest valid token (or nothing), and warn in time."""
        best = choose(self.current, self.delivered, now)
        if best is not self.current:
            previous, self.current = self.current, best
            if best is None:
                self._remove_copy()
                self.written = False
                say(
                    f"token EXPIRED and no newer one has arrived: removed {self.copy_path}; "
                    "the job has no token until one is delivered (renewal or delivery is failing)"
                )
                self.lost = True
            else:
                self._write(best)
                if self.written and self.started and self.hooks is not None:
                    self.hooks.changed(best, self.copy_path, self.user)
                if self.lost or (previous is not None and self.warned is previous):
                    say(f"a new token has arrived (valid for {int(best.exp - now)}s)")
                self.lost = False
        elif best is not None and not self.written:
            self._write(best)
        token = self.current
        if token is None:
            return
        last = token.renew_until is not None and token.exp >= token.renew_until
        if last and self.chain_end != token.renew_until:
            # The last token of its chain (krenew's warning): only a new login helps.
            self.chain_end = token.renew_until
            say(
                f"the token cannot be renewed past its renew-until, {int(token.exp - now)}s "
                "from now: log in again to start a new one (it reaches this job), or the "
                "job has no token after that"
            )
        if self.warned is not token and now >= windows(token, self.settings)[1]:
            self.warned = token
            left = max(0, int(token.exp - now))
            if last:
                say(f"token expires in {left}s, at its renew-until, and no new login has come")
            else:
                say(
                    f"token expires in {left}s and no newer one has arrived: renewal or "
                    "delivery is failing"
                )

    def _write(self, token: Token) -> None:
        owner = None if os.geteuid() == self.uid else self.uid  # root running a user's job
        try:
            write_secret(Path(self.copy_path), token.value.encode("ascii"), uid=owner)
        except OSError as exc:
            self.written = False
            self._report(f"cannot write {self.copy_path}: {exc.strerror or exc}")
        else:
            self.written = True

    def _remove_copy(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.copy_path)

    def timeout(self, now: float) -> float:
        """Seconds until the next look at the file, the next window or the expiry."""
        interval = self.interval(now)
        deadline = self.last_check + interval
        token = self.current
        if token is not None:
            advisory, mandatory = windows(token, self.settings)
            if now < advisory:
                deadline = min(deadline, advisory)
            if self.warned is not token and now < mandatory:
                deadline = min(deadline, mandatory)
            deadline = min(deadline, token.exp + EXPIRY_SLACK)
        # A clock set back must not stretch the sleep beyond one interval.
        return max(0.0, min(deadline - now, interval))

    def interval(self, now: float) -> float:
        watched = self.watch is not None and self.watch.active
        base = IDLE_POLL if watched else FALLBACK_POLL
        token = self.current
        if token is None or now >= windows(token, self.settings)[0]:
            return min(base, ADVISORY_POLL)
        return base

    def tend(self, now: float, changed: bool) -> None:
        """check() when due, then maintain(); never lets an error end the job."""
        try:
            expiring = self.current is not None and not self.current.valid_at(now)
            if changed or expiring or now >= self.last_check + self.interval(now):
                self.check(now)
            if self.settings.pull:
                self.pull_if_due(now)
            self.maintain(now)
        except Exception as exc:  # a bug here must not take the job down
            self._report(f"internal error ({type(exc).__name__}); carrying on")

    # -- the pull fallback (engine.pull) ---------------------------------------------

    def pull_if_due(self, now: float) -> None:
        """Pull when the delivered file is missing, unusable or in its advisory
        window (no push has refreshed it): before COMMAND starts, at once (it
        should start with a token); later in a thread, so signals and the copy
        are never held up by a slow token host."""
        idle = self.pulling is None or not self.pulling.is_alive()
        if idle and now >= self.next_pull and due(self.delivered, self.settings, now, True):
            self.next_pull = now + pull_retry(self.delivered)
            if self.started:
                self.pulling = threading.Thread(
                    target=self._pull, args=(self.delivered,), name="pull", daemon=True
                )
                self.pulling.start()
            else:
                self._pull(self.delivered)
                self.check(time.time())
        failed, self.pull_failed = self.pull_failed, None
        kind = None if failed is None else getattr(failed, "result", None) or str(failed)
        if failed is not None and kind != self.pull_said:
            self.pull_said = kind  # a failing host is said once, not at every attempt
            self._report(f"no newer token pulled: {one_line(failed)}")

    def _pull(self, current: Token | None) -> None:
        failed = pull_now(self.settings, self.uid, self.user, current, advisory=True)
        if failed is None:
            self.pull_said = None
        else:
            self.pull_failed = failed
        # The new file (if any) wakes the loop through inotify, or the next poll.

    # -- the command -------------------------------------------------------------

    def run(self) -> int:
        env = dict(os.environ)
        inherited = env.pop("SLURM_JWT", None)
        env["SLURM_JWT_FILE"] = self.copy_path
        signals = Signals(self.portable)
        try:
            if not self.portable:
                self.watch = DeliveryWatch.open(
                    self.token_dir, self.uid, [FILE_NAME, self.copy_name]
                )
            now = time.time()
            if inherited:
                with contextlib.suppress(Refused):
                    self.current = check(parse(inherited.strip(), "SLURM_JWT"), self.user, now)
            self.tend(now, changed=True)
            if self.on_change:
                # The hook sees what the command sees: TOKENLIFE_FILE is the copy.
                self.hooks = HookRunner(self.on_change, self.hook_timeout, say, environ=env)
            try:
                child = self._start(env, signals)
            except (OSError, subprocess.SubprocessError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                say(f"cannot run {self.command[0]}: {reason}")
                return 127 if isinstance(exc, FileNotFoundError) else 126
            self.started = True
            return self._supervise(child, signals)
        finally:
            if self.pulling is not None:
                self.pulling.join(1.0)  # do not cut a write short, nor wait long for a host
            if self.hooks is not None:
                self.hooks.close()
            self._remove_copy()
            if self.watch is not None:
                self.watch.close()
            signals.close()

    def _start(self, env: dict[str, str], signals: Signals) -> subprocess.Popen[bytes]:
        lib = libc()
        parent = os.getpid()

        def in_child() -> None:
            signals.in_child()
            if lib is not None:
                lib.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent:  # we died before prctl took effect
                os.kill(os.getpid(), signal.SIGKILL)

        # close_fds=False: descriptors the job gave us reach COMMAND as with exec;
        # ours are all close-on-exec.
        return subprocess.Popen(self.command, env=env, preexec_fn=in_child, close_fds=False)

    def _supervise(self, child: subprocess.Popen[bytes], signals: Signals) -> int:
        poller = select.poll()
        poller.register(signals.fd, select.POLLIN)
        if self.watch is not None:
            poller.register(self.watch.fd, select.POLLIN)
        changed = False
        while True:
            status = child.poll()
            if status is not None:
                return 128 - status if status < 0 else status
            now = time.time()
            self.tend(now, changed)
            changed = False
            wait = self.timeout(time.time())
            if self.hooks is not None:
                hook_wait = self.hooks.tend(time.monotonic())
                if hook_wait is not None:
                    wait = min(wait, hook_wait)
            for fd, _events in poller.poll(int(wait * 1000) + 1):
                if fd == signals.fd:
                    for signum, by_kernel in signals.read():
                        self._forward(child, signals, signum, by_kernel)
                elif self.watch is not None and fd == self.watch.fd:
                    changed |= self.watch.drain()

    def _forward(
        self, child: subprocess.Popen[bytes], signals: Signals, signum: int, by_kernel: bool
    ) -> None:
        if signum not in FORWARDED or signum in signals.ignored or child.returncode is not None:
            return  # SIGCHLD: the loop reaps
        if by_kernel and signum in _FROM_TERMINAL:
            with contextlib.suppress(OSError):
                if os.getpgid(child.pid) == os.getpgrp():
                    return  # the terminal sent it to the command too
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)


def supervise(
    command: list[str],
    settings: EngineSettings,
    uid: int,
    user: str,
    portable: bool | None = None,
    on_change: list[str] | None = None,
    hook_timeout: float = HOOK_TIMEOUT,
) -> int:
    """Run ``command`` to its end with a fresh token at $SLURM_JWT_FILE; its exit status.

    ``on_change``: a hook run after each new token in the copy (docs/hooks.md),
    killed after ``hook_timeout`` seconds.
    """
    if portable is None:
        portable = os.environ.get(POLL_ENV, "") not in ("", "0")
    return Supervisor(command, settings, uid, user, portable, on_change, hook_timeout).run()


def pull_retry(token: Token | None) -> float:
    """Seconds until the next pull attempt of ``run`` (PULL_RETRY, shorter for short tokens)."""
    if token is None or token.exp <= token.iat:
        return PULL_RETRY
    return max(PULL_RETRY_MIN, min(PULL_RETRY, PULL_RETRY_SHARE * (token.exp - token.iat)))
