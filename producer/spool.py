"""The login path's store: one root-only JSON record per user in a spool directory.

pam_exec must not import SQLAlchemy (hundreds of milliseconds per login), so
when the tokenlife service is not reachable the login path records what it
minted here; the repository ingests these records before it acts (idempotent
by token id).  Files are 0600 and owned by whoever owns the spool directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenlife.fsutil import write_secret
from tokenlife.records import TokenRecord
from tokenlife.users import validate_name


class SpoolStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, user: str) -> Path:
        return self.directory / f"{validate_name(user)}.json"

    def current(self, user: str) -> TokenRecord | None:
        try:
            data = json.loads(self._path(user).read_bytes())
            return TokenRecord.from_spool(data)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # a damaged record is replaced by the next mint

    def save(self, record: TokenRecord, event: str, actor: str, reason: str = "") -> None:
        if not self.directory.is_dir():
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        owner = self.directory.stat()
        data = {**record.to_spool(), "event": event, "actor": actor, "reason": reason}
        write_secret(self._path(record.user), json.dumps(data).encode(), owner.st_uid, owner.st_gid)

    def records(self, user: str | None = None) -> list[TokenRecord]:
        names = [f"{user}.json"] if user else sorted(os.listdir(self.directory))
        found = [
            self.current(name.removesuffix(".json")) for name in names if name.endswith(".json")
        ]
        return [r for r in found if r is not None]

    def pending(self) -> list[tuple[Path, dict[str, object]]]:
        """Raw spooled records with their audit fields, for ingestion."""
        out: list[tuple[Path, dict[str, object]]] = []
        if not self.directory.is_dir():
            return out
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(".json"):
                path = self.directory / name
                try:
                    out.append((path, json.loads(path.read_bytes())))
                except (OSError, ValueError):
                    continue
        return out
