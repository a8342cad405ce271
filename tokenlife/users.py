"""User names and the system user database (pwd/grp, so NSS: files, sssd, LDAP)."""

from __future__ import annotations

import grp
import os
import pwd
import re
from typing import NamedTuple

from tokenlife.errors import UserDbError, UserError

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
    pw = _getpwnam(name)
    if pw is None:
        raise UserError(f"unknown user {name!r}")
    try:
        gids = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
    except OSError as exc:
        raise UserDbError(f"cannot read the groups of {name!r}: {exc.strerror or exc}") from None
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
    """The user's uid; None only when the user database says there is no such user.

    UserDbError when it cannot say (NSS/LDAP down, out of file descriptors):
    callers must never take that for "no such user" (and, say, remove a
    running job's token).
    """
    pw = _getpwnam(name)
    return None if pw is None else pw.pw_uid


#: getpwnam_r's answers that mean "no such user" (see getpwnam(3), NOTES)
_NOT_FOUND = frozenset({0, 2, 3})  # 0, ENOENT, ESRCH


def _getpwnam(name: str) -> pwd.struct_passwd | None:
    """The entry, None if there is none, UserDbError if the database failed.

    Python's pwd module raises KeyError for both "not found" and a failed
    lookup; only then is getpwnam_r asked again, through ctypes, for its status.
    """
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    status = _getpwnam_r_status(name)
    if status not in _NOT_FOUND:
        raise UserDbError(f"cannot look up user {name!r}: {os.strerror(status)}")
    # glibc also answers "not found" when the files source could not be
    # opened and a later source (nss-systemd) said no: a process out of file
    # descriptors cannot tell that a user does not exist.
    try:
        os.close(os.open("/etc/passwd", os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        raise UserDbError(f"cannot look up user {name!r}: {exc.strerror}") from None
    return None


def _getpwnam_r_status(name: str) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    entry = ctypes.create_string_buffer(256)  # struct passwd: 7 fields
    result = ctypes.c_void_p()
    size = 16384
    while True:
        buffer = ctypes.create_string_buffer(size)
        status = int(
            libc.getpwnam_r(
                name.encode(), entry, buffer, ctypes.c_size_t(size), ctypes.byref(result)
            )
        )
        if status != 34 or size >= 1 << 22:  # ERANGE: a bigger buffer, please
            break
        size *= 4
    if status == 0 and result.value:
        return 0  # found on a second try (a transient failure): not an error to report
    return status


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
