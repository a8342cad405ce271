"""The SQL token store behind the TokenStore interface.

One engine per process; each public method is one transaction.  Callers get
frozen TokenRecords, never ORM objects, and only StoreError crosses this
boundary.  Records that the login path left in the spool are ingested first.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, delete, event, func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from producer.spool import SpoolStore
from repository.counts import compact
from repository.migrate import migrate
from repository.models import EventRow, TokenRow
from repository.rows import audit, to_dt, to_epoch, to_record, to_row
from repository.write_turn import WriteTurn, turn_for
from tokenlife.config import StoreConfig
from tokenlife.config_values import sqlite_file
from tokenlife.errors import StoreError
from tokenlife.interfaces import Repository
from tokenlife.records import ACTIVE, TokenRecord

if TYPE_CHECKING:
    from repository.delivery_store import DeliveryStore
    from repository.renewal_store import RenewalStore

log = logging.getLogger(__name__)


def _sqlite_connect(dbapi_connection: object, _record: object) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN, not the driver (see below).
    dbapi_connection.isolation_level = None  # type: ignore[attr-defined]
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    # WAL lets readers go on while one writes; the busy timeout makes the
    # second writer wait instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    # WAL + NORMAL: never corrupt, at worst the last commits before a power
    # cut are lost (the user's next login mints again); saves an fsync per mint.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # A transaction that may write takes the write lock at BEGIN, so one that
    # reads due tokens and then renews them cannot be overtaken by another
    # process (a timer run beside a manual run): the second waits for the
    # first batch to commit, then sees its result.  SQLite has no row locks
    # to do better.  Read-only transactions never wait (WAL).
    read_only = connection.get_execution_options().get(READ_ONLY, False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


READ_ONLY = "tokenlife_read_only"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = sqlite_file(url)
        if path is not None:
            private_sqlite_file(path)
        engine = create_engine(url, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, hide_parameters=True)


#: SQLite's files beside the database: WAL, its index, the rollback journal
SQLITE_SIBLINGS = ("-wal", "-shm", "-journal")


def private_sqlite_file(path: Path) -> None:
    """Create the SQLite file 0600 in a 0700 directory; refuse one others can read.

    The store holds every live token.  SQLite creates its -wal, -shm and
    -journal files with the database file's mode, so creating that one
    private (whatever the caller's umask) keeps them all private; an existing
    store that others could read is refused, like ssh refuses such a key.
    """
    if not path.is_absolute():
        raise StoreError(f"store.url: the SQLite path {path} must be absolute")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, flags, 0o600))
    check_sqlite_private(path)


def check_sqlite_private(path: Path) -> None:
    """StoreError if the store or a sibling is no private regular file (absent is fine)."""
    for name in (path, *(Path(f"{path}{suffix}") for suffix in SQLITE_SIBLINGS)):
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        except OSError as exc:  # e.g. a 0700 state directory of another account
            raise StoreError(f"cannot check the token store {name}: {_os_reason(exc)}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"token store {name} is not a regular file")
        if st.st_mode & 0o077:
            raise StoreError(
                f"token store {name} has mode {stat.S_IMODE(st.st_mode):04o}: others could "
                f"read every live token (chmod 600 {name})"
            )


class SqlTokenStore:
    def __init__(self, url: str, spool_dir: Path | None = None) -> None:
        # Nothing is opened or created until the first operation, so a
        # command refused for other reasons leaves no database behind.
        self.url = url
        self.spool = SpoolStore(spool_dir) if spool_dir else None
        self._sessions: sessionmaker[Session] | None = None
        self._opening = threading.RLock()  # the daemon's threads open it together

    def _open(self) -> sessionmaker[Session]:
        with self._opening:
            return self._open_once()

    @cached_property
    def _write_turn(self) -> WriteTurn | None:
        """SQLite: the queue this process's writers to this file wait in; else None."""
        if not self.url.startswith("sqlite"):
            return None
        return turn_for(str(sqlite_file(self.url) or self.url))

    def _open_once(self, ingest: bool = True) -> sessionmaker[Session]:
        if self._sessions is None:
            try:
                self.engine = make_engine(self.url)
                migrate(self.engine)
            except (SQLAlchemyError, OSError, ValueError) as exc:
                # ValueError: a malformed URL (a port that is not a number, ...)
                raise StoreError(f"cannot open the token store: {_reason(exc)}") from exc
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
            if ingest and self.spool is not None:
                self.ingest_spool()
        return self._sessions

    @classmethod
    def from_config(cls, config: StoreConfig) -> SqlTokenStore:
        """``[store]``: the URL, and the login path's spool when that directory exists.

        A spool this process may not even look at (the service's 0700 state
        directory, seen by SlurmUser's PrologSlurmctld or a user's ``list``)
        is one it could not ingest either: it is left to those who can.
        """
        try:
            spool = stat.S_ISDIR(os.stat(config.spool_dir).st_mode)
        except OSError:
            spool = False
        return cls(config.url, config.spool_dir if spool else None)

    @cached_property
    def renewals(self) -> RenewalStore:
        """The renewer's view: claim due tokens, apply outcomes in bulk."""
        from repository.renewal_store import RenewalStore

        return RenewalStore(self)

    @cached_property
    def deliveries(self) -> DeliveryStore:
        """What each node holds of whose token, and what is owed."""
        from repository.delivery_store import DeliveryStore

        return DeliveryStore(self)

    def close(self) -> None:
        """Release the connections (the store reopens on its next use)."""
        with self._opening:
            if self._sessions is not None:
                self.engine.dispose()
                self._sessions = None

    @contextmanager
    def transaction(self, read_only: bool = False) -> Iterator[Session]:
        """One transaction, for the store's own views (renewals, deliveries, status).

        ``read_only``: it never writes (SQLite: it takes no write lock).
        Database errors leave as StoreError with the driver's first line.
        """
        sessions = self._open()
        # SQLite: this process's writers queue in order (repository/write_turn.py)
        turn = None if read_only else self._write_turn
        try:
            with turn or contextlib.nullcontext(), sessions.begin() as session:
                if read_only:
                    session.connection(execution_options={READ_ONLY: True})
                yield session
        except SQLAlchemyError as exc:
            raise StoreError(f"token store failed: {_reason(exc)}") from exc

    def current(self, user: str) -> TokenRecord | None:
        with self.transaction(read_only=True) as s:
            row = s.scalars(
                select(TokenRow)
                .where(TokenRow.user == user, TokenRow.state == ACTIVE)
                .order_by(TokenRow.id.desc())
                .limit(1)
            ).first()
            return None if row is None else to_record(row)

    def records(self, user: str | None = None) -> list[TokenRecord]:
        with self.transaction(read_only=True) as s:
            query = select(TokenRow).order_by(TokenRow.user, TokenRow.id)
            if user:
                query = query.where(TokenRow.user == user)
            return [to_record(r) for r in s.scalars(query)]

    def save(self, record: TokenRecord, event: str, actor: str, reason: str = "") -> None:
        with self.transaction() as s:
            self._save(s, record, event, actor, reason)

    def _save(self, s: Session, record: TokenRecord, event: str, actor: str, reason: str) -> None:
        # A new token supersedes the user's previous ones (one current token
        # each), and says so in the audit trail.
        for old in s.scalars(
            select(TokenRow).where(TokenRow.user == record.user, TokenRow.state == ACTIVE)
        ):
            if old.token_id != record.token_id:
                old.state = "expired"
                why = f"by {record.token_id}"
                audit(s, record.iat, "superseded", old.user, old.token_id, old.version, actor, why)
        # The next tick looks at a new token once and files it for its
        # renewal window (the store knows no policy).
        s.add(to_row(record, next_check=record.iat))
        s.flush()
        audit(s, record.iat, event, record.user, record.token_id, record.version, actor, reason)

    def ingest_spool(self) -> int:
        """Import what the login path minted while no service ran; returns how many.

        Each record is claimed (renamed) before it is read, stored in one
        transaction, then deleted: a login writing a new record meanwhile is
        never lost, and a purged token never comes back.  A record already
        known (by its token id, in the tokens or the audit trail) or older
        than the user's stored token is dropped, never stored over a newer
        one; a record that cannot be read is left for an administrator.
        """
        if self.spool is None:
            return 0
        with self._opening:
            self._open_once(ingest=False)  # opening would ingest: this call does it
        try:
            claimed = self.spool.claim()
        except OSError as exc:  # a spool this account may not read (root's 0700)
            log.warning(
                "cannot ingest the spool %s: %s; its records wait for an account that can",
                self.spool.directory,
                _os_reason(exc),
            )
            return 0
        count = 0
        for path, data in claimed:
            try:
                record = _spooled(data)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("setting aside malformed spool record %s: %s", path.name, exc)
                self.spool.reject(path)
                continue
            try:
                with self.transaction() as s:
                    if self._ingest(s, record, data):
                        count += 1
            except StoreError as exc:
                # A record the schema refuses (a CHECK constraint), or one a
                # concurrent ingester stored first (unique token_id): skip it,
                # never let it block the records after it.  Anything else
                # (database down) is the caller's problem; the claimed record
                # stays and is ingested next time.
                if not isinstance(exc.__cause__, IntegrityError):
                    raise
                log.warning("setting aside spool record %s: %s", path.name, exc)
                self.spool.reject(path)
                continue
            self.spool.done(path)
        return count

    def _ingest(self, s: Session, record: TokenRecord, data: dict[str, object]) -> bool:
        """Store one spooled record unless it is known or older; True if stored."""
        token_id = record.token_id
        if s.scalar(select(TokenRow.id).where(TokenRow.token_id == token_id)) is not None:
            return False
        if s.scalar(select(EventRow.id).where(EventRow.token_id == token_id).limit(1)):
            return False  # stored once, since purged: the trail remembers it
        newer = s.scalars(
            select(TokenRow).where(
                TokenRow.user == record.user,
                TokenRow.state == ACTIVE,
                TokenRow.iat >= to_dt(record.iat),
            )
        ).first()
        if newer is not None:
            why = f"older than the stored token {newer.token_id} v{newer.version}"
            audit(s, record.iat, "ignored", record.user, token_id, record.version, "spool", why)
            log.warning("spool record of %s: %s; not stored", record.user, why)
            return False
        self._save(
            s,
            record,
            str(data.get("event", "minted")),
            str(data.get("actor", "pam")),
            str(data.get("reason", "")),
        )
        return True

    def purge(
        self, before: int, events_before: int | None, actor: str, now: int, dry_run: bool = False
    ) -> tuple[list[TokenRecord], int]:
        """Delete tokens whose renew-until is before ``before`` (any state).

        Each deletion is audited ("purged"); the trail itself is kept unless
        ``events_before`` asks to drop events older than that.  Returns the
        purged records and the number of events dropped.
        """
        with self.transaction() as s:
            rows = list(
                s.scalars(
                    select(TokenRow)
                    .where(TokenRow.renew_until < to_dt(before))
                    .order_by(TokenRow.id)
                )
            )
            purged = [to_record(row) for row in rows]
            dropped = 0
            if events_before is not None:
                old = EventRow.at < to_dt(events_before)
                dropped = s.scalar(select(func.count()).select_from(EventRow).where(old)) or 0
                if not dry_run:
                    s.execute(delete(EventRow).where(old))
            if not dry_run:
                for row in rows:
                    s.delete(row)
                    audit(s, now, "purged", row.user, row.token_id, row.version, actor, "")
        if not dry_run and (rows or dropped):
            compact(self, now)  # each deletion appended to the kept counts
        return purged, dropped

    def events(self, user: str | None = None) -> list[dict[str, object]]:
        with self.transaction(read_only=True) as s:
            query = select(EventRow).order_by(EventRow.id)
            if user:
                query = query.where(EventRow.user == user)
            return [
                {
                    "at": to_epoch(e.at),
                    "event": e.event,
                    "user": e.user,
                    "token_id": e.token_id,
                    "version": e.version,
                    "actor": e.actor,
                    "reason": e.reason,
                }
                for e in s.scalars(query)
            ]


def superseded_ids(store: Repository, token_ids: list[str]) -> set[str]:
    """Which of ``token_ids`` a newer token superseded, as the audit trail says."""
    found: set[str] = set()
    with store.transaction(read_only=True) as s:
        for start in range(0, len(token_ids), 500):  # any backend's parameter limit
            chunk = token_ids[start : start + 500]
            found.update(
                s.scalars(
                    select(EventRow.token_id).where(
                        EventRow.event == "superseded", EventRow.token_id.in_(chunk)
                    )
                )
            )
    return found


#: TokenRecord's fields and their types, to check what a spool file holds
_SPOOL_TYPES = {f.name: {"int": int, "str": str}[str(f.type)] for f in fields(TokenRecord)}


def _spooled(data: object) -> TokenRecord:
    """The record in a spool file's JSON; TypeError/ValueError if it is not one."""
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    record = TokenRecord.from_spool(data)
    for name, kind in _SPOOL_TYPES.items():
        if type(getattr(record, name)) is not kind:
            raise TypeError(f"{name} is not {'an integer' if kind is int else 'a string'}")
    return record


def _reason(exc: BaseException) -> str:
    """The first line of the driver's message, without SQL or parameters."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {_os_reason(exc)}" if exc.filename else _os_reason(exc)
    orig = getattr(exc, "orig", None) or exc
    return str(orig).splitlines()[0] if str(orig) else type(orig).__name__


def _os_reason(exc: OSError) -> str:
    """``Permission denied (uid 1001)``: who was refused says what to fix."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.EACCES, errno.EPERM):
        reason += f" (uid {os.geteuid()})"
    return reason
