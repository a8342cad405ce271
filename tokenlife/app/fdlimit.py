"""Enough file descriptors for the connections the configuration allows.

systemd starts services with a soft RLIMIT_NOFILE of 1024 (for programs
still using select()) and a hard limit far above it, and asks programs that
need more to raise the soft limit themselves.  A pusher keeps one socket per
pooled node connection (``delivery.ssh.max_connections``) and the pull
service one per client (``pull.max_connections``): at a thousand nodes the
soft limit would be hit in the middle of a cycle, failing deliveries with
EMFILE.  Nothing here uses select(): paramiko, the pull server (epoll) and
the database drivers are fine with descriptors above 1024.
"""

from __future__ import annotations

import logging
import resource

from tokenlife.config import Config

log = logging.getLogger(__name__)

#: descriptors besides the connections: the store, logs, the mint socket, key files
SPARE = 256


def needed(config: Config) -> int:
    """Descriptors this configuration may hold open at once."""
    total = SPARE
    if config.delivery.transport == "ssh":
        total += config.delivery.ssh.max_connections
    if config.pull.listen:
        total += config.pull.max_connections
    return total


def ensure(config: Config) -> int:
    """Raise the soft limit towards what ``config`` needs (never above the hard
    limit, never lowered); warn once if it stays short.  Returns the soft limit."""
    want = needed(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError) as exc:
                log.debug("cannot raise RLIMIT_NOFILE to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning(
            "open files limit %d is below the %d this configuration may use "
            "(delivery.ssh.max_connections, pull.max_connections): raise LimitNOFILE= "
            "in the unit, or lower those keys",
            soft,
            want,
        )
    return soft
