"""The one place where tokenlife's objects are built from a configuration.

``Site.from_config(config)`` gives every command, the daemon and the demo
the same key source, store, minter, renewer (with its sinks), transport, job
source and delivery cycle (and for ``[[service]]`` accounts the keeper and
their file delivery), each chosen by name through tokenlife.registry;
``Site.for_login(config)`` is the PAM fallback's variant (spool instead of
the database, the key cache before any network).  Everything is built on
first use and imported only then: ``tokenlife pam`` and the commands that
never deliver load no SQLAlchemy, paramiko or boto3.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from tokenlife import registry
from tokenlife.config import Config, KeyConfig
from tokenlife.config_values import store_scheme
from tokenlife.errors import ConfigError
from tokenlife.interfaces import (
    JobSource,
    KeySource,
    Repository,
    Sink,
    TokenKind,
    TokenStore,
    Transport,
)

if TYPE_CHECKING:
    from producer.mint import Minter
    from repository.renewer import Renewer
    from repository.services import ServiceKeeper
    from transfer.cycle import DeliveryCycle
    from transfer.service_delivery import ServiceDelivery


class Site:
    """The parts of one tokenlife installation, wired from its Config."""

    def __init__(self, config: Config, actor: str = "tokenlife", login: bool = False) -> None:
        self.config = config
        #: who the audit trail names for what this site does
        self.actor = actor
        #: the login path: no database and no network (spool, key cache)
        self.login = login

    @classmethod
    def from_config(cls, config: Config, actor: str = "tokenlife") -> Site:
        return cls(config, actor)

    @classmethod
    def for_login(cls, config: Config) -> Site:
        return cls(config, "pam", login=True)

    # -- seams, each built by name through the registry --------------------------------------

    @cached_property
    def kind(self) -> TokenKind:
        kind: TokenKind = registry.load(registry.TOKEN_KINDS, self.config.token.kind)()
        return kind

    @cached_property
    def key_source(self) -> KeySource:
        return self.key_source_for(self.config.key)

    def key_source_for(self, key: KeyConfig) -> KeySource:
        """A key source for ``key`` (rotate-key builds one for the new key)."""
        factory = registry.load(registry.KEY_SOURCES, key.source)
        source: KeySource = factory(key, prefer_cache=self.login)
        return source

    def fresh_key_source(self) -> KeySource:
        """The configured key as its backend holds it now (``rotate-key``).

        A source that caches (aws) offers ``fresh()``: a source that asks the
        backend, not its cache; any other source is fresh already.
        """
        fresh = getattr(self.key_source, "fresh", None)
        if not callable(fresh):
            return self.key_source
        source: KeySource = fresh()
        return source

    def key_file_source(self, path: Path) -> KeySource:
        """The key in ``path`` with this site's algorithm (``rotate-key --key``)."""
        key = dataclasses.replace(self.config.key, source="file", path=path, kid=None)
        return self.key_source_for(key)

    @cached_property
    def store(self) -> Repository:
        factory = registry.load(registry.STORES, store_scheme(self.config.store.url))
        store: Repository = factory(self.config.store)
        return store

    @cached_property
    def login_store(self) -> TokenStore:
        """Where minting records tokens: the store, or the spool on the login path."""
        if not self.login:
            return self.store
        from producer.spool import SpoolStore

        return SpoolStore(self.config.store.spool_dir)

    @cached_property
    def sinks(self) -> list[Sink]:
        return [
            registry.load(registry.SINKS, name)(self.config) for name in self.config.token.sinks
        ]

    @cached_property
    def transport(self) -> Transport:
        from tokenlife.app import fdlimit

        d = self.config.delivery
        fdlimit.ensure(self.config)  # one descriptor per pooled node connection
        transport: Transport = registry.load(registry.TRANSPORTS, d.transport)(d)
        return transport

    @cached_property
    def jobs(self) -> JobSource:
        d = self.config.delivery
        jobs: JobSource = registry.load(registry.JOB_SOURCES, d.jobs)(d)
        return jobs

    # -- the parts -----------------------------------------------------------------------------

    @cached_property
    def minter(self) -> Minter:
        from producer.mint import Minter

        return Minter(
            self.config,
            self.key_source,
            self.login_store,
            login_dir=self.config.login.token_dir,
            kind=self.kind,
        )

    @cached_property
    def renewer(self) -> Renewer:
        from repository.renewer import Renewer

        return Renewer(
            self.config,
            self.key_source,
            self.store,
            sinks=self.sinks,
            actor=self.actor,
            kind=self.kind,
        )

    @property
    def pushes(self) -> bool:
        """Whether tokens are pushed to nodes: false for ``delivery.transport = "none"``."""
        return self.config.delivery.transport != "none"

    def _push_on(self) -> None:
        if not self.pushes:
            from transfer.transports import PUSH_OFF

            raise ConfigError(f"{self.config.path or 'built-in defaults'}: {PUSH_OFF}")

    def cycle(self, jobs: JobSource | None = None, actor: str | None = None) -> DeliveryCycle:
        """A delivery cycle over this site's transport; ``jobs`` overrides the job source.

        ConfigError with ``delivery.transport = "none"``: nothing is pushed there.
        """
        from transfer.cycle import DeliveryCycle

        self._push_on()
        d = self.config.delivery
        return DeliveryCycle(
            self.store,
            self.transport,
            jobs if jobs is not None else self.jobs,
            d.remove_after,
            d.ssh.concurrency,
            actor=actor or self.actor,
            lease=d.lease,
        )

    @cached_property
    def keeper(self) -> ServiceKeeper:
        """Keeps a valid token for each ``[[service]]`` account (after each renewal pass)."""
        from repository.services import ServiceKeeper

        return ServiceKeeper(self.config, self.minter, self.store, actor="service")

    def service_delivery(self, actor: str | None = None) -> ServiceDelivery:
        """The ``[[service]]`` accounts' token files, over this site's transport."""
        from transfer.service_delivery import ServiceDelivery

        self._push_on()
        return ServiceDelivery(
            self.config,
            self.store,
            self.transport,
            self.kind,
            self.config.delivery.ssh.concurrency,
            actor=actor or self.actor,
        )

    def close(self) -> None:
        """Close the transport's connections, if one was opened."""
        transport = self.__dict__.get("transport")
        if transport is not None:
            transport.close()
