"""The daemon's pull service: ``[pull]`` wired to producer.pull (docs/pull.md).

:class:`PullService` builds the PullServer from the configuration with the
store's lookup (pull_backing.StoreLookup), the ``jobs`` policy's view of the
job source (pull_backing.WorkView), the privileged accounts of
``[producer]`` and the batched audit trail (repository.pull_audit), and
keeps it across reloads: a reload that changes only the policy (``policy``,
``login_hosts``, ``producer.slurm_user``, ``producer.allow_privileged_users``)
swaps it in place, without closing a connection; one that changes the
address, the munge socket or a limit starts a new server; the counts per
result survive both.  Everything it reaches of the daemon goes through
getters, since a reload replaces the store and the job source.
"""

from __future__ import annotations

import logging
import pwd
import threading
from collections.abc import Callable
from dataclasses import dataclass

from producer.pull import DEFAULT_MUNGE_SOCKET, RESULTS, PullLimits, PullPolicy, PullServer
from producer.pull_backing import StoreLookup, WorkView
from repository.pull_audit import PullAudit
from tokenlife.config import Config, PullConfig
from tokenlife.errors import TokenlifeError
from tokenlife.interfaces import JobSource, Needs, Repository

log = logging.getLogger("tokenlife.pull")  # the name operators grep for


@dataclass(frozen=True)
class _Binding:
    """What a running server was built with: another value needs a new server."""

    listen: str
    munge_socket: str
    limits: PullLimits


def limits_of(pull: PullConfig) -> PullLimits:
    return PullLimits(
        max_request=pull.max_request,
        read_timeout=pull.read_timeout,
        request_timeout=pull.request_timeout,
        write_timeout=pull.write_timeout,
        max_connections=pull.max_connections,
        max_per_peer=pull.max_per_peer,
        workers=pull.workers,
        reply_ttl=pull.reply_ttl,
    )


def privileged_uids(slurm_user: str) -> frozenset[int]:
    """root and SlurmUser's uid (when the user database knows that account)."""
    try:
        return frozenset({0, pwd.getpwnam(slurm_user).pw_uid})
    except KeyError:
        return frozenset({0})


class ObservedJobs:
    """A job source whose every answer also goes to ``seen`` (the ``jobs`` policy's view):
    the delivery cycle asks it anyway, so the view costs no second ``squeue``."""

    def __init__(self, inner: JobSource, seen: Callable[[Needs], None]) -> None:
        self.inner, self.seen = inner, seen

    @property
    def partial(self) -> bool:
        return bool(getattr(self.inner, "partial", False))

    def needs(self) -> Needs:
        needs = self.inner.needs()
        self.seen(needs)
        return needs


class PullService:
    def __init__(
        self,
        store: Callable[[], Repository],
        jobs: Callable[[], JobSource],
        actor: str,
    ) -> None:
        self.lookup = StoreLookup(store)
        self.work = WorkView(lambda: jobs().needs())
        self.audit = PullAudit(store, actor)
        self.server: PullServer | None = None
        self._binding: _Binding | None = None
        self._wanted = ""  # pull.listen of the configuration in force
        self._config: Config | None = None  # bound, not yet serving
        self._retired = dict.fromkeys(RESULTS, 0)  # the counts of servers replaced since start
        self._audit_started = False
        self._lock = threading.Lock()  # two quick SIGHUPs reload in two threads

    @property
    def wants_jobs(self) -> bool:
        """Whether a running server's policy asks the job source."""
        return self.server is not None and self.server.policy.mode == "jobs"

    def policy(self, config: Config) -> PullPolicy:
        pull = config.pull
        return PullPolicy(
            pull.policy,
            self.work if pull.policy == "jobs" else None,
            frozenset(pull.login_hosts),
            privileged_uids(config.producer.slurm_user),
            config.producer.allow_privileged_users,
        )

    def bind(self, config: Config) -> None:
        """Bind the address ``config.pull`` names (nothing if ``listen`` is "").

        TokenlifeError in one line if it cannot be bound or libmunge cannot
        be loaded: the daemon refuses to start then.  Nothing is answered
        until :meth:`serve`: callers wait in the listen backlog meanwhile.
        """
        self._wanted = config.pull.listen
        if config.pull.listen:
            self.server = self._bind(config)
            self._config = config

    def serve(self) -> None:
        """Answer on the bound address (once the daemon's store is open)."""
        if self.server is not None and self._binding is None:
            self._serve(self._config)

    def apply(self, config: Config) -> None:
        """After a reload: keep, adjust, restart, start or stop the server.

        Never raises: a new address that cannot be bound is one error line,
        and the server that ran goes on (if it could: a restart on the same
        address closes it first, and then the daemon reports itself unhealthy).
        """
        with self._lock:
            self._apply(config)

    def _apply(self, config: Config) -> None:
        pull = config.pull
        self._wanted = pull.listen
        binding = _Binding(pull.listen, pull.munge_socket, limits_of(pull))
        if self.server is not None and binding == self._binding:
            policy = self.policy(config)
            if policy != self.server.policy:
                self.server.policy = policy  # read once per request: the next one sees it
                log.info("pull: policy now %s", policy.mode)
            return
        if not pull.listen:
            if self.server is not None:
                self._retire()
                log.warning("pull: service stopped (pull.listen is empty)")
            return
        same_port = self._binding is not None and self._binding.listen == pull.listen
        if same_port:
            self._retire()  # its port is needed by the new one
        try:
            server = self._bind(config)
        except TokenlifeError as exc:
            still = f"; still serving on {self.server.address}" if self.server else ""
            log.error("pull: %s%s", exc, still)
            return
        if self.server is not None:
            self._retire()
        self.server = server
        self._serve(config)

    def _bind(self, config: Config) -> PullServer:
        pull = config.pull
        try:
            return PullServer(
                pull.listen,
                self.lookup,
                self.policy(config),
                self.audit,
                munge_socket=pull.munge_socket or None,
                limits=limits_of(pull),
            )
        except OSError as exc:
            raise TokenlifeError(
                f"cannot serve pulls: pull.listen {pull.listen}: {exc.strerror or exc}"
            ) from None
        except Exception as exc:  # MungeError: libmunge missing; a bad limit
            raise TokenlifeError(f"cannot serve pulls: {exc}") from None

    def _serve(self, config: Config | None) -> None:
        assert self.server is not None and config is not None
        self._config = None
        pull = config.pull
        self._binding = _Binding(pull.listen, pull.munge_socket, self.server.limits)
        if not self._audit_started:
            self.audit.start()
            self._audit_started = True
        self.server.start()
        self._check_munged(self.server)

    @staticmethod
    def _check_munged(server: PullServer) -> None:
        """One credential made at start: a munged that is down is said at once,
        not at the first pull (which then fails with ``error``)."""
        try:
            server.munge.encode(b"tokenlife-pull selftest", ttl=1)
        except Exception as exc:
            socket = getattr(server.munge, "socket", None) or DEFAULT_MUNGE_SOCKET
            log.error(
                "pull: munged at %s does not answer (%s): pulls fail until it does", socket, exc
            )

    def _retire(self) -> None:
        server, self.server, self._binding = self.server, None, None
        if server is None:
            return
        server.close()
        for result, n in server.counts().items():
            self._retired[result] = self._retired.get(result, 0) + n

    def feed(self, needs: Needs) -> None:
        """A fresh answer of the job source, for the ``jobs`` policy."""
        self.work.update(needs)

    def forget(self) -> None:
        """After a tick: the next pull reads the store again (a renewed token)."""
        self.lookup.forget()

    def alive(self) -> bool:
        """False while a configured service does not serve (the watchdog's question)."""
        server = self.server
        return not self._wanted or (server is not None and server.alive())

    def figures(self) -> tuple[bool, dict[str, int]] | None:
        """(serving, requests by result since the daemon started); None if pull is off."""
        if not self._wanted:
            return None
        server = self.server
        counts = dict(self._retired)
        if server is not None:
            for result, n in server.counts().items():
                counts[result] = counts.get(result, 0) + n
        return self.alive(), counts

    def close(self) -> None:
        """Stop serving, then write the audit events that are left."""
        with self._lock:
            self._wanted = ""
            self._retire()
        if self._audit_started:
            self.audit.close()
