"""The claims of a Slurm JWT, as Slurm and AWS PCS read them."""

from __future__ import annotations

from typing import Any

from tokenlife.users import UserInfo


def build_claims(user: UserInfo, iat: int, exp: int) -> dict[str, Any]:
    """``sun`` is what Slurm 22.05 authenticates; uid/gid/id serve newer Slurm and PCS."""
    return {
        "iat": iat,
        "exp": exp,
        "sun": user.name,
        "uid": user.uid,
        "gid": user.gid,
        "id": {
            "gecos": user.gecos,
            "dir": user.dir,
            "shell": user.shell,
            "gids": list(user.gids),
        },
    }
