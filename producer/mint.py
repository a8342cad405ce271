"""Minting: who may get a token, with which limits, and where it goes."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from producer.loginfile import write_login_token
from tokenlife.clock import Clock, SystemClock
from tokenlife.config import Config
from tokenlife.errors import PermissionDenied, TokenInvalid, TokenlifeError, UsageError
from tokenlife.interfaces import KeySource, SigningKey, TokenKind, TokenStore
from tokenlife.records import ACTIVE, TokenRecord
from tokenlife.slurm_jwt import SlurmJwt
from tokenlife.users import UserInfo, describe_uid, lookup, uid_of

log = logging.getLogger(__name__)


class Minter:
    def __init__(
        self,
        config: Config,
        key_source: KeySource,
        store: TokenStore,
        clock: Clock | None = None,
        login_dir: Path | None = None,
        kind: TokenKind | None = None,
    ) -> None:
        self.config = config
        self.key_source = key_source
        self.store = store
        self.clock = clock or SystemClock()
        #: where login-node token files go; None: do not write one
        self.login_dir = login_dir
        self.kind: TokenKind = kind or SlurmJwt()

    # -- policy -------------------------------------------------------------

    def is_privileged(self, user: UserInfo) -> bool:
        """root and SlurmUser tokens may act as any user over slurmrestd.

        Decided by uid: a second passwd name for SlurmUser's uid (useradd -o)
        gets a token Slurm maps to SlurmUser all the same.
        """
        return user.uid == 0 or user.uid == uid_of(self.config.producer.slurm_user)

    def may_mint_for_others(self, caller_uid: int) -> bool:
        if caller_uid == 0:
            return True
        p = self.config.producer
        return any(uid_of(name) == caller_uid for name in (p.slurm_user, *p.admins))

    def authorize(self, caller_uid: int, user: UserInfo) -> None:
        if caller_uid != user.uid and not self.may_mint_for_others(caller_uid):
            raise PermissionDenied(
                f"{describe_uid(caller_uid)} may not mint a token for {user.name!r} "
                "(only root, the Slurm user and configured admins may)"
            )
        if self.is_privileged(user) and not self.config.producer.allow_privileged_users:
            raise PermissionDenied(
                f"refusing to mint for privileged user {user.name!r}: such a token can act as "
                "any user over slurmrestd (set producer.allow_privileged_users to allow it)"
            )
        if (
            caller_uid == user.uid
            and user.uid < self.config.pam.min_uid
            and not self.may_mint_for_others(caller_uid)
        ):
            raise PermissionDenied(
                f"{user.name!r} (uid {user.uid}) is a system account: below pam.min_uid "
                f"({self.config.pam.min_uid}) no token is minted for oneself"
            )

    def limits(self, lifetime: int | None, renew_until: int | None) -> tuple[int, int]:
        """The lifetime and renew-until span of a new token: the configured ones,
        or shorter ones asked for.  Nobody gets more than configured, not even
        root: a longer token needs a longer ``[token]`` setting."""
        t = self.config.token
        for name, asked, most in (
            ("lifetime", lifetime, t.lifetime),
            ("renew-until", renew_until, t.renew_until),
        ):
            if asked is None:
                continue
            if isinstance(asked, bool) or not isinstance(asked, int) or asked <= 0:
                raise UsageError(f"{name} must be a positive number of seconds")
            if asked > most:
                raise PermissionDenied(
                    f"{name} {asked}s is longer than the configured token.{name.replace('-', '_')} "
                    f"({most}s); ask for less, or raise it in the configuration"
                )
        return lifetime or t.lifetime, renew_until or t.renew_until

    # -- minting ------------------------------------------------------------

    def mint(
        self,
        user_name: str | UserInfo,
        caller_uid: int,
        lifetime: int | None = None,
        renew_until: int | None = None,
        reuse: bool = False,
        actor: str = "cli",
        write_login: bool = True,
    ) -> tuple[TokenRecord, bool]:
        """Mint (or, with ``reuse``, keep) a token; returns (record, minted_now).

        ``write_login``: also write the login token file (the mint service
        does that itself, outside its lock: a user's file never holds up
        another user's login).
        """
        # A caller that has just looked the user up passes the entry: on a
        # login burst the user database is the service's largest cost.
        user = user_name if isinstance(user_name, UserInfo) else lookup(user_name)
        self.authorize(caller_uid, user)
        lifetime, span = self.limits(lifetime, renew_until)
        now = int(self.clock.now())
        key = self.key_source.load()
        if reuse:
            existing = self.reusable(user, key, now)
            if existing is not None:
                if write_login:
                    self.write_login(existing)
                return existing, False
        record = self._issue(user, key, now, lifetime, span, actor, describe_uid(caller_uid))
        if self.is_privileged(user):
            log.warning(
                "minted a privileged token for %s (token id %s)", user.name, record.token_id
            )
        else:
            log.info("minted token %s for %s, exp %d", record.token_id, user.name, record.exp)
        if write_login:
            self.write_login(record)
        return record, True

    def mint_service(
        self,
        user_name: str,
        lifetime: int,
        renew_until: int,
        allow_privileged: bool,
        reason: str,
        actor: str = "service",
    ) -> TokenRecord:
        """A new chain for a ``[[service]]`` account (repository.services keeps them).

        No caller to authorize (the token host's own configuration asks for
        it) and no ``pam.min_uid`` (service accounts are system accounts);
        the entry's ``allow_privileged``, not ``producer.allow_privileged_users``,
        decides about root and SlurmUser, and each such mint is a warning.
        """
        user = lookup(user_name)
        privileged = self.is_privileged(user)
        if privileged and not allow_privileged:
            raise PermissionDenied(
                f"refusing to mint for privileged service account {user.name!r} (uid "
                f"{user.uid}): such a token can act as any user over slurmrestd (set "
                "allow_privileged = true in its [[service]] entry to allow it)"
            )
        lifetime, span = self.limits(lifetime, renew_until)
        now = int(self.clock.now())
        record = self._issue(user, self.key_source.load(), now, lifetime, span, actor, reason)
        if privileged:
            log.warning(
                "service %s: minted a PRIVILEGED token (uid %d, token id %s): it can act as "
                "any user over slurmrestd (allow_privileged = true)",
                user.name,
                user.uid,
                record.token_id,
            )
        else:
            log.info("service %s: minted token %s, exp %d", user.name, record.token_id, record.exp)
        return record

    def _issue(
        self,
        user: UserInfo,
        key: SigningKey,
        now: int,
        lifetime: int,
        span: int,
        actor: str,
        reason: str,
    ) -> TokenRecord:
        """Sign and store the first token of a new chain (it supersedes the user's others)."""
        limit = now + span
        exp = min(now + lifetime, limit)
        token = self.kind.make(key, user, now, exp, renew_until=limit, version=1)
        record = TokenRecord(
            token_id=secrets.token_hex(8),
            user=user.name,
            uid=user.uid,
            gid=user.gid,
            first_issued=now,
            iat=now,
            exp=exp,
            renew_until=limit,
            lifetime=lifetime,
            key_id=key.key_id,
            token=token,
        )
        self.store.save(record, "minted", actor, reason)
        return record

    def reusable(self, user: UserInfo, key: SigningKey, now: int) -> TokenRecord | None:
        """The stored token if it is still good for a while, its chain younger than
        one lifetime, and signed by today's key."""
        record = self.store.current(user.name)
        if record is None or record.state != ACTIVE or record.uid != user.uid:
            return None
        t = self.config.token
        margin = max(t.renew_before, int(record.lifetime * t.renew_fraction))
        if now >= record.exp - margin or now >= record.renew_until:
            return None
        # A chain older than one lifetime is not reused: this login starts a
        # new one, as kinit does, so users who log in now and then keep their
        # jobs' tokens past any one chain's renew-until (docs/producer.md).
        if now - record.first_issued >= record.lifetime:
            return None
        if record.key_id != key.key_id:
            return None
        try:
            self.kind.verify(key, record.token)
            subject = self.kind.read(record.token).subject
        except (TokenInvalid, ValueError):
            return None
        return record if subject == user.name else None

    def write_login(self, record: TokenRecord) -> None:
        """Write the login token file, if this minter writes one."""
        if self.login_dir is not None:
            try:
                write_login_token(self.login_dir, record)
            except OSError as exc:
                raise TokenlifeError(
                    f"cannot write the token file under {self.login_dir}: {exc.strerror}"
                ) from exc


def caller_uid() -> int:
    return os.getuid()
