"""Transports (tokenlife.interfaces.Transport): put a token file on a node, or take it away."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tokenlife.config import DeliveryConfig
from tokenlife.errors import TransportError
from tokenlife.records import ServiceFile, TokenFile
from tokenlife.tokenview import TokenView
from transfer import nodefs
from transfer.localfs import LocalFS

if TYPE_CHECKING:
    from transfer.sftpfs import SftpFS

log = logging.getLogger(__name__)
T = TypeVar("T")


def _reason(node: str, exc: OSError) -> TransportError:
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    return TransportError(f"{node}: {what}{where}")


class LocalTransport:
    """Nodes as directories on this host: node N's files under <root>/<N>/...

    Without ``root`` every node is this host (a single-host install).
    """

    def __init__(self, remote_dir: Path, root: Path | None = None) -> None:
        self.remote_dir = str(remote_dir)
        self.root = root

    @classmethod
    def from_config(cls, config: DeliveryConfig) -> LocalTransport:
        return cls(config.remote_dir, config.root)

    def _fs(self, node: str) -> LocalFS:
        return LocalFS(str(self.root / node) if self.root else "")

    def put(self, node: str, tf: TokenFile) -> str:
        try:
            return nodefs.install(self._fs(node), self.remote_dir, tf)
        except OSError as exc:
            raise _reason(node, exc) from exc

    def remove(self, node: str, uid: int) -> bool:
        try:
            return nodefs.remove(self._fs(node), self.remote_dir, uid)
        except OSError as exc:
            raise _reason(node, exc) from exc

    def put_file(self, node: str, sf: ServiceFile, read: Callable[[str], TokenView]) -> str:
        try:
            return nodefs.install_file(self._fs(node), sf, read)
        except OSError as exc:
            raise _reason(node, exc) from exc

    def close(self) -> None:
        pass


#: why a transport of "none" does nothing (one line, for push and the log)
PUSH_OFF = "delivery.transport is 'none': push is off (nodes pull their tokens, docs/pull.md)"


class NoTransport:
    """``delivery.transport = "none"``: a pull-only site writes nothing to nodes.

    Nothing builds a delivery cycle on it (Site.cycle refuses); should
    anything call it anyway, each call fails in one line, writing nothing.
    """

    def __init__(self, config: DeliveryConfig) -> None:
        del config  # nothing to set up: there are no connections

    def put(self, node: str, tf: TokenFile) -> str:
        raise TransportError(f"{node}: {PUSH_OFF}")

    def remove(self, node: str, uid: int) -> bool:
        raise TransportError(f"{node}: {PUSH_OFF}")

    def put_file(self, node: str, sf: ServiceFile, read: Callable[[str], TokenView]) -> str:
        raise TransportError(f"{node}: {PUSH_OFF}")

    def close(self) -> None:
        pass


class SshTransport:
    def __init__(self, config: DeliveryConfig) -> None:
        from transfer.ssh import SshPool

        self.remote_dir = str(config.remote_dir)
        self.pool = SshPool(config.ssh)

    def put(self, node: str, tf: TokenFile) -> str:
        # What was checked over this connection is not checked again (nodefs.install).
        return self._twice(node, lambda fs: nodefs.install(fs, self.remote_dir, tf, fs.seen))

    def remove(self, node: str, uid: int) -> bool:
        return self._twice(node, lambda fs: nodefs.remove(fs, self.remote_dir, uid, fs.seen))

    def put_file(self, node: str, sf: ServiceFile, read: Callable[[str], TokenView]) -> str:
        return self._twice(node, lambda fs: nodefs.install_file(fs, sf, read))

    def _twice(self, node: str, action: Callable[[SftpFS], T]) -> T:
        # A pooled connection may have died while idle: one fresh try.
        for attempt in (1, 2):
            try:
                with self.pool.fs(node) as fs:
                    return action(fs)
            except OSError as exc:
                raise _reason(node, exc) from exc
            except TransportError as exc:
                if attempt == 2 or "connection lost" not in str(exc):
                    raise
                log.info("%s: reconnecting: %s", node, exc)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.pool.close()
