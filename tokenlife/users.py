"""User names and the system user database (pwd/grp, so NSS: files, sssd, LDAP)."""

from __future__ import annotations

import grp
import os
import pwd
import re
from typing import NamedTuple

from tokenlife.errors import UserError

# POSIX portable user names (IEEE 1003.1, 3.437): letters, digits, '.', '_',
# '-', not starting with '-'.  We also refuse a leading '.', so a name is
# always safe as a single path component, a JWT claim and a shell word.
_PORTABLE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MAX_NAME = 32  # useradd's limit on Linux


class UserInfo(NamedTuple):
    name: str
    uid: int
    gid: int
    gecos: str
    dir: str
    shell: str
    gids: tuple[int, ...]


def validate_name(name: str) -> str:
    """Return ``name`` if it is a portable user name, else raise UserError."""
    if not name:
        raise UserError("user name is empty")
    if len(name) > MAX_NAME:
        raise UserError(f"user name is longer than {MAX_NAME} characters")
    if not _PORTABLE.fullmatch(name):
        raise UserError(f"{name!r} is not a valid user name")
    return name


def lookup(name: str) -> UserInfo:
    """The user's entry with all supplementary groups; unknown users are refused.

    Real Slurm accepts a token for an unknown ``sun`` as uid 99 (nobody), so
    minting for a name the system does not know must never happen.
    """
    validate_name(name)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise UserError(f"unknown user {name!r}") from None
    gids = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
    return UserInfo(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_gecos, pw.pw_dir, pw.pw_shell, gids)


def name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise UserError(f"uid {uid} has no user name") from None


def describe_uid(uid: int) -> str:
    """The user name for audit trails and messages, or ``uid N`` if there is none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
