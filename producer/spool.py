"""The login path's store: one root-only JSON record per user in a spool directory.

pam_exec must not import SQLAlchemy (hundreds of milliseconds per login), so
when the tokenlife service is not reachable the login path records what it
minted here; the repository ingests these records before it acts (idempotent
by token id).  Files are 0600 and owned by whoever owns the spool directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

from tokenlife.fsutil import write_secret
from tokenlife.records import TokenRecord
from tokenlife.users import validate_name

#: the suffix of a record taken for ingestion
CLAIMED = ".claimed"


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

    def claim(self) -> list[tuple[Path, dict[str, object]]]:
        """Take every record for ingestion, with its audit fields.

        ``<user>.json`` is renamed to a unique ``.claimed`` name before it is
        read: a login that writes a new record meanwhile makes a new file,
        never lost, and two ingesters never take the same one.  Records
        claimed by an ingester that died are taken again.  A record that is
        not JSON is set aside as ``.bad`` for an administrator.
        """
        out: list[tuple[Path, dict[str, object]]] = []
        if not self.directory.is_dir():
            return out
        for name in sorted(os.listdir(self.directory)):
            path = self.directory / name
            if name.endswith(".json"):
                claimed = self.directory / f"{name}.{secrets.token_hex(4)}{CLAIMED}"
                try:
                    # Not a permission change: the record keeps its 0600 file.
                    os.rename(path, claimed)  # noqa: TID251
                except FileNotFoundError:
                    continue  # another ingester took it
                path = claimed
            elif not name.endswith(CLAIMED):
                continue
            try:
                data = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                self.reject(path)
                continue
            out.append((path, data if isinstance(data, dict) else {"not": "an object"}))
        return out

    def done(self, path: Path) -> None:
        """Delete a claimed record once the store has it (or knows better)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def reject(self, path: Path) -> None:
        """Set a record that cannot be read aside (``.bad``), out of every later claim."""
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, path.with_name(f"{path.name}.bad"))  # noqa: TID251
