"""Sinks: what happens after a renewal (tokenlife.interfaces.Sink), chosen by ``token.sinks``."""

from __future__ import annotations

import logging
from pathlib import Path

from producer.loginfile import token_path, write_login_token
from tokenlife.config import Config
from tokenlife.records import TokenRecord

log = logging.getLogger(__name__)


class LoginFiles:
    """Refresh login-node token files that exist on this host (single-host installs).

    Only files that are already there are rewritten: a user who never logged
    in here gets no file from a renewal.
    """

    def __init__(self, token_dir: Path) -> None:
        self.token_dir = token_dir

    @classmethod
    def from_config(cls, config: Config) -> LoginFiles:
        return cls(config.login.token_dir)

    def renewed(self, records: list[TokenRecord]) -> None:
        """Rewrite the files of these renewed tokens; never one holding a newer token."""
        for record in records:
            try:
                if token_path(self.token_dir, record.uid).exists():
                    write_login_token(self.token_dir, record)
            except OSError as exc:  # the next user's file may be fine
                log.warning("cannot refresh the token file of %s: %s", record.user, exc)
