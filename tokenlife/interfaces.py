"""Every seam of tokenlife: one small Protocol per external system, in one place.

A backend implements one of these and is chosen by name through
``tokenlife.registry`` (built-in, or an installed package's entry point).
The parts are typed against these Protocols, never against each other's
classes, and ``tokenlife.testing`` ships a contract suite per seam that a
backend passes to prove itself.  Standard library and ground modules only.

=============  ========================  ==============================================
seam           Protocol                  built-in backends
=============  ========================  ==============================================
key source     KeySource -> SigningKey   file (producer.keys), aws (producer.aws)
store          Repository (TokenStore)   sqlite, postgresql (repository.store)
transport      Transport (over NodeFS)   ssh, local (transfer.transports)
job source     JobSource                 slurm, static (transfer.jobs)
sink           Sink                      login_files (repository.sinks)
token kind     TokenKind                 slurm_jwt (tokenlife.slurm_jwt)
=============  ========================  ==============================================
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from tokenlife.records import (
    DeliveryClaim,
    DeliveryRecord,
    DeliveryResult,
    DeliveryTask,
    Outcome,
    ServiceFile,
    TokenFile,
    TokenRecord,
)
from tokenlife.tokenview import TokenView
from tokenlife.users import UserInfo

# -- clock ----------------------------------------------------------------------------------


class Clock(Protocol):
    """The time (tokenlife.clock.SystemClock; tokenlife.testing.fakes.FakeClock in tests)."""

    def now(self) -> float:
        """Seconds since the epoch (UTC)."""
        ...

    def sleep(self, seconds: float) -> None: ...


# -- key source -----------------------------------------------------------------------------


class SigningKey(Protocol):
    """A loaded key that signs claims into a compact JWT.  Never printable."""

    algorithm: str
    key_id: str  # a fingerprint, safe to log

    def sign(self, claims: dict[str, Any]) -> str: ...

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims if this key signed it (exp not checked); TokenInvalid if not."""
        ...


class KeySource(Protocol):
    """Where the signing key comes from.  Built from ``[key]`` (KeyConfig)."""

    def load(self) -> SigningKey:
        """Load the current signing key; raise KeySourceError with the reason."""
        ...

    def describe(self) -> str:
        """One line for `config check`: where the key comes from (never the key)."""
        ...


# -- store ----------------------------------------------------------------------------------


class TokenStore(Protocol):
    """What minting needs: the user's current token, and saving a new one.

    The login path's spool (producer.spool) is one; the repository is another.
    """

    def current(self, user: str) -> TokenRecord | None:
        """The user's newest active token record, if any."""
        ...

    def save(self, record: TokenRecord, event: str, actor: str, reason: str = "") -> None:
        """Store ``record`` as the user's current token and audit ``event``."""
        ...

    def records(self, user: str | None = None) -> list[TokenRecord]: ...


class RenewalQueue(Protocol):
    """The renewer's view of the store: claim due tokens, apply their outcomes."""

    def process(
        self,
        now: int,
        handle: Callable[[TokenRecord], Outcome],
        actor: str,
        user: str | None = None,
        force: bool = False,
        not_key: str | None = None,
    ) -> list[tuple[TokenRecord, Outcome]]:
        """Hand every due token (without its secret) to ``handle``; store each outcome.

        Exactly once across replicas; a crash leaves a token at its old or its new version.
        """
        ...

    def set_state(
        self, user: str, state: str, event: str, actor: str, reason: str, now: int
    ) -> int:
        """Mark the user's active tokens ``state`` (revoke); returns how many."""
        ...


class DeliveryLedger(Protocol):
    """What each node holds of whose token, and what is owed to it."""

    def deliveries(self, user: str | None = None) -> list[DeliveryRecord]: ...

    def request_removal(self, user: str, now: int) -> int: ...

    def sync_needs(
        self,
        needs: dict[str, set[str]],
        uids: dict[str, int],
        now: int,
        grace: int | None,
        unsure: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        """Users have work on nodes now; ``grace``: queue removals of work gone that long.

        ``unsure`` users (uid lookup failed) keep their nodes: never remove on an error.
        """
        ...

    def due(
        self, now: int, user: str | None = None, node: str | None = None
    ) -> list[DeliveryTask]: ...

    def claim(
        self,
        now: int,
        claim: str,
        lease: int,
        limit: int,
        after: tuple[str, int] = ("", 0),
        user: str | None = None,
        node: str | None = None,
        due_by: int | None = None,
    ) -> DeliveryClaim:
        """Claim up to ``limit`` owed deliveries (due by ``due_by``, default ``now``)
        that no live lease holds, for ``claim`` until ``now + lease``.

        Exactly one replica holds a delivery at a time; walking on from ``after``
        (node, id), in node order: a node's deliveries come together.
        """
        ...

    def extend(self, claim: str, until: int) -> int:
        """Move the lease of every record ``claim`` holds to ``until``; returns how many."""
        ...

    def release(self, claim: str, tasks: list[DeliveryTask]) -> None:
        """Give up ``claim``'s hold on these records (never started): others may take them."""
        ...

    def holders(self, now: int) -> list[str]:
        """The claims whose lease has not ended at ``now``."""
        ...

    def forget(self, claims: list[str]) -> int:
        """Free every record these claims hold (their replicas are gone); returns how many."""
        ...

    def record(
        self, results: list[DeliveryResult], now: int, actor: str, claim: str | None = None
    ) -> list[DeliveryResult]:
        """Store outcomes (and free their records); with ``claim``, only those whose
        record ``claim`` still holds: returns the others, dropped."""
        ...


class Repository(TokenStore, Protocol):
    """The token host's store (``[store]``): tokens, audit trail, renewals, deliveries."""

    @property
    def renewals(self) -> RenewalQueue: ...

    @property
    def deliveries(self) -> DeliveryLedger: ...

    def events(self, user: str | None = None) -> list[dict[str, object]]: ...

    def purge(
        self, before: int, events_before: int | None, actor: str, now: int, dry_run: bool = False
    ) -> tuple[list[TokenRecord], int]: ...

    def ingest_spool(self) -> int:
        """Import what the login path left in the spool (idempotent)."""
        ...

    def transaction(self, read_only: bool = False) -> AbstractContextManager[Any]:
        """One transaction for the store's own views (renewals, deliveries, status)."""
        ...

    def close(self) -> None: ...


# -- transport ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    """What ``lstat`` tells of a path on a node."""

    mode: int  # st_mode, with the type bits
    uid: int
    gid: int
    size: int
    mtime: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


Owner = tuple[int, int] | None  # (uid, gid) to hand a file to; None: keep ours


class NodeFS(Protocol):
    """File operations on one node, by absolute path.  Errors: OSError.

    transfer.nodefs builds the safe delivery protocol (exclusive temp file,
    owner set on the handle, ordered atomic rename under a per-user lock) on
    these; a new way to reach nodes supplies only these operations.
    """

    #: the uid files are created as there (root for a normal delivery)
    own_uid: int

    def lstat(self, path: str) -> FileInfo | None: ...

    def mkdir(self, path: str, mode: int, owner: Owner) -> None: ...

    def fix_dir(self, path: str, mode: int, owner: Owner) -> None: ...

    def create(self, path: str, data: bytes, mode: int, owner: Owner, mtime: int | None) -> bool:
        """Create exclusively (False if it exists), write, sync, set owner and mtime."""
        ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` (POSIX rename)."""
        ...

    def remove(self, path: str) -> bool: ...

    def rmdir(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]:
        """The names in directory ``path`` (to sweep a killed pusher's temp files)."""
        ...

    def read(self, path: str, limit: int) -> bytes:
        """At most ``limit`` bytes of the regular file ``path`` (a service account's
        token file: is what is there newer?)."""
        ...


class Transport(Protocol):
    """Puts a user's token file on a node, or takes it away.  Built from ``[delivery]``."""

    def put(self, node: str, tf: TokenFile) -> str:
        """Install ``tf`` on ``node`` unless it has a newer one: nodefs.INSTALLED,
        UNCHANGED or NEWER_THERE.  TransportError with the node and the reason."""
        ...

    def remove(self, node: str, uid: int) -> bool:
        """Delete the user's token file on ``node``; True if one was there."""
        ...

    def close(self) -> None: ...


class FileTransport(Transport, Protocol):
    """A transport that can also put a service account's token at a path of its
    own (``[[service]]``).  The built-in ones can; a plugin transport without
    ``put_file`` cannot deliver service tokens (each delivery fails, one line)."""

    def put_file(self, node: str, sf: ServiceFile, read: Callable[[str], TokenView]) -> str:
        """Install ``sf`` on ``node`` unless it has a newer token of the same user there
        (``read``: the token kind's reader): nodefs.INSTALLED, UNCHANGED or NEWER_THERE.
        TransportError with the node and the reason."""
        ...


# -- job source -----------------------------------------------------------------------------

Needs = dict[str, set[str]]  # user -> nodes


class JobSource(Protocol):
    """Who has work where right now.  Built from ``[delivery]``.

    A source may set ``partial = True`` after an answer that had to leave a
    job out: the delivery cycle then removes nothing on that answer.
    """

    def needs(self) -> Needs:
        """Users and the nodes where they have work; TokenlifeError if unknown."""
        ...


# -- sink -----------------------------------------------------------------------------------


class Sink(Protocol):
    """Told about freshly renewed (or rotated) tokens, after they are stored.

    A sink's failure is logged and never undoes or delays a renewal.
    """

    def renewed(self, records: list[TokenRecord]) -> None: ...


# -- token kind -----------------------------------------------------------------------------


class TokenKind(Protocol):
    """How a kind of token is made, verified, named on disk and read back on a node.

    The engine (TaskProlog) reads tokens through ``read``: a kind keeps that
    method on the standard library, as it runs before every task.
    """

    name: str
    #: the token file's name in <dir>/<uid>/ on login and worker nodes
    file_name: str

    def make(
        self,
        key: SigningKey,
        user: UserInfo,
        iat: int,
        exp: int,
        renew_until: int | None = None,
        version: int | None = None,
    ) -> str:
        """A token for ``user`` valid from ``iat`` until ``exp``, signed by ``key``.

        ``renew_until`` and ``version`` (the chain's end and the token's number
        in it) go into the token where the kind has room for them, so that a
        node can tell them without the store (``read``).
        """
        ...

    def verify(self, key: SigningKey, token: str) -> dict[str, Any]:
        """The token's claims if ``key`` signed it; TokenInvalid otherwise."""
        ...

    def read(self, text: str) -> TokenView:
        """Subject, times (and renew-until, version if the token has them) from the
        token text, unverified; ValueError if unreadable."""
        ...


__all__ = [
    "Clock",
    "DeliveryLedger",
    "FileInfo",
    "FileTransport",
    "JobSource",
    "KeySource",
    "Needs",
    "NodeFS",
    "Owner",
    "RenewalQueue",
    "Repository",
    "SigningKey",
    "Sink",
    "TokenKind",
    "TokenStore",
    "TokenView",
    "Transport",
]
