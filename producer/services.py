"""``[[service]]`` accounts: who they are on this host, and whether they may have a token.

A service account's entry names users and a group by name; this resolves
them through the user database (NSS) into the uid the token is for and the
owner and group its file gets on the hosts (the same ids there, as for users'
tokens).  Root, uid 0 under any name and SlurmUser's uid are privileged:
their tokens can act as any user over slurmrestd, so an entry for one is
refused unless it says ``allow_privileged = true``.
"""

from __future__ import annotations

import grp
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tokenlife.config import Config, ServiceConfig
from tokenlife.errors import PermissionDenied, UserDbError, UserError
from tokenlife.users import lookup, uid_of

T = TypeVar("T")


@dataclass(frozen=True)
class ServiceAccount:
    """A ``[[service]]`` entry with its names looked up."""

    entry: ServiceConfig
    #: the token's user
    uid: int
    #: the token file's owner and group
    owner_uid: int
    gid: int
    privileged: bool


def privileged_uid(config: Config, uid: int) -> bool:
    """root and SlurmUser (by uid: a second name for either is just as privileged)."""
    return uid == 0 or uid == uid_of(config.producer.slurm_user)


def resolve(config: Config, entry: ServiceConfig) -> ServiceAccount:
    """Look ``entry`` up: UserError for a name the user database does not know,
    UserDbError when it cannot answer, PermissionDenied for a privileged
    account without ``allow_privileged``.  Messages start with the entry's key
    (``owner: unknown user 'web'``)."""
    user = _named("user", lambda: lookup(entry.user))
    privileged = _named("user", lambda: privileged_uid(config, user.uid))
    if privileged and not entry.allow_privileged:
        raise PermissionDenied(
            f"user: {entry.user!r} (uid {user.uid}) is privileged: its token can act as any "
            "user over slurmrestd; set allow_privileged = true to allow it"
        )
    owner = user if entry.owner == entry.user else _named("owner", lambda: lookup(entry.owner))
    group = entry.group
    gid = owner.gid if group is None else _named("group", lambda: group_id(group))
    return ServiceAccount(entry, user.uid, owner.uid, gid, privileged)


def _named(key: str, look: Callable[[], T]) -> T:
    try:
        return look()
    except (UserError, UserDbError) as exc:
        raise type(exc)(f"{key}: {exc}") from None


def group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise UserError(f"unknown group {name!r}") from None
    except OSError as exc:  # NSS failed, rather than said "no such group"
        raise UserDbError(f"cannot look up group {name!r}: {exc.strerror or exc}") from None


def privileged_warning(entry: ServiceConfig, uid: int) -> str:
    """The line said at every mint and by ``config check`` for an allowed privileged entry."""
    return (
        f"{entry.name}: allow_privileged = true: uid {uid} gets a token that can act as any "
        "user over slurmrestd"
    )
