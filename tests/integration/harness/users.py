"""Local test users for the real-component integration tests.

Jobs, TaskProlog runs and JWT-only clients need ordinary, unprivileged
accounts that really exist in the user database (Slurm maps an unknown
``sun`` to nobody, and tokenlife refuses unknown users).
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess

# The fixed accounts the integration tests use.
ALICE = "tlalice"
BOB = "tlbob"
TEST_USERS = (ALICE, BOB)

# Every test user also belongs to this group, so tests see a user with a
# supplementary group (the ``gids`` claim, setpriv --init-groups, ...).
TEST_GROUP = "tltest"


def _ensure_group(name: str) -> None:
    try:
        grp.getgrnam(name)
    except KeyError:
        # Exit 9: created meanwhile by a concurrent test run; fine.
        rc = subprocess.run(["groupadd", name], check=False).returncode
        if rc not in (0, 9):
            raise RuntimeError(f"groupadd {name} failed with exit status {rc}") from None


def ensure_user(name: str) -> pwd.struct_passwd:
    """Return the passwd entry of ``name``, creating the account if missing.

    Creating needs root; an existing account is returned as it is.
    """
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise PermissionError(f"test user {name!r} is missing and only root can create it")
    _ensure_group(TEST_GROUP)
    proc = subprocess.run(
        ["useradd", "-m", "-s", "/bin/bash", "-G", TEST_GROUP, name],
        capture_output=True,
        text=True,
        check=False,
    )
    # Exit 9 means the name is already taken: another run created it first.
    if proc.returncode not in (0, 9):
        raise RuntimeError(f"useradd {name} failed: {proc.stderr.strip()}")
    return pwd.getpwnam(name)
