"""Configuration: one TOML file read into frozen, typed, validated objects.

Everything is checked at load time; an error is one line naming the file,
the key and the reason (``tokenlife.toml: token.lifetime: ...``).  Unknown
keys are errors, so a typo never silently falls back to a default; a plugin
backend's own table (``[key.<source>]``, ``[delivery.<name>]``) is handed to
the plugin to check.  Value converters are in tokenlife.config_values.  Only
the standard library is imported: the PAM login path loads this module.
(About 520 lines: one dataclass and one parse step per section, and the
``[[service]]`` entries.)
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tokenlife import engine_settings, registry
from tokenlife.config_values import (
    USER_NAME,
    abspath,
    backend,
    backends,
    boolean,
    choice,
    duration,
    duration_at_most,
    file_mode,
    fraction,
    group_name,
    host_port,
    hosts,
    http_url,
    integer,
    kid,
    listen,
    node_file,
    nonempty,
    optional_path,
    seconds,
    store_url,
    username,
    usernames,
)
from tokenlife.engine_settings import EngineSettings
from tokenlife.errors import ConfigError

DEFAULT_PATH = Path("/etc/tokenlife/tokenlife.toml")
ENV_VAR = "TOKENLIFE_CONFIG"

T = TypeVar("T")


@dataclass(frozen=True)
class KeyConfig:
    source: str = "file"
    path: Path = Path("/etc/slurm/jwt_hs256.key")
    algorithm: str = "HS256"
    kid: str | None = None
    #: users besides root and the service user that may own the key file
    owners: tuple[str, ...] = ("slurm",)
    secret_id: str | None = None
    version_id: str | None = None
    version_stage: str | None = None
    region: str | None = None
    endpoint_url: str | None = None
    cache_path: Path = Path("/var/lib/tokenlife/aws-key.cache")
    refresh: int = 3600
    #: a plugin source's own table, ``[key.<source>]``, as written (the plugin checks it)
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class TokenConfig:
    lifetime: int = 2 * 86400
    renew_until: int = 7 * 86400
    renew_before: int = 3600
    #: a token is due in the last ``renew_fraction`` of its lifetime
    renew_fraction: float = 0.25
    #: the kind of token minted (tokenlife.registry: token kinds)
    kind: str = "slurm_jwt"
    #: told about every renewal, in order (tokenlife.registry: sinks)
    sinks: tuple[str, ...] = ("login_files",)


@dataclass(frozen=True)
class ProducerConfig:
    slurm_user: str = "slurm"
    #: root/SlurmUser tokens can act as anyone over slurmrestd: opt-in only
    allow_privileged_users: bool = False
    #: accounts, besides root and slurm_user, allowed to mint for others
    admins: tuple[str, ...] = ()
    #: the mint service's socket (the PAM line's --socket must match)
    socket: Path = Path("/run/tokenlife/mint.sock")


@dataclass(frozen=True)
class PamConfig:
    #: true: a failed mint fails the login (only if pam_exec is "required")
    required: bool = False
    #: users below this uid (system accounts) get no token at login
    min_uid: int = 1000


@dataclass(frozen=True)
class StoreConfig:
    url: str = "sqlite:////var/lib/tokenlife/tokenlife.db"
    #: where the login path leaves its records for the repository to ingest
    spool_dir: Path = Path("/var/lib/tokenlife/spool")
    #: ``purge`` deletes tokens this long after their renew-until
    purge_after: int = 7 * 86400


@dataclass(frozen=True)
class LoginConfig:
    token_dir: Path = Path("/run/tokenlife")


@dataclass(frozen=True)
class SshConfig:
    user: str = "root"
    identity_file: Path = Path("/etc/tokenlife/id_ed25519")
    known_hosts: Path = Path("/etc/tokenlife/known_hosts")
    port: int = 22
    concurrency: int = 32
    ssh_config: Path | None = None
    connect_timeout: int = 10
    #: pooled connections kept open at most (least recently used closed first)
    max_connections: int = 4096


@dataclass(frozen=True)
class DeliveryConfig:
    transport: str = "ssh"
    remote_dir: Path = Path("/run/tokenlife")
    jobs: str = "slurm"
    root: Path | None = None
    ssh: SshConfig = field(default_factory=SshConfig)
    static: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: a node keeps a user's token this long after the user's last job there ended
    remove_after: int = 600
    #: ``push --job`` (PrologSlurmctld) gives up waiting for slow nodes after this
    job_timeout: int = 20
    #: replicas: a claim on a delivery lapses this long after its holder stopped
    #: extending it (a dead replica's work waits this long for another one)
    lease: int = 120
    #: plugin transports' and job sources' own tables, ``[delivery.<name>]``, as written
    options: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class ServeConfig:
    interval: int = 300
    metrics: str = "127.0.0.1:9464"
    #: after each renewal tick, run a delivery cycle (tokenlife push)
    deliver: bool = True


#: the shortest delivery.lease (transfer/nodefs.py breaks a lock after 60 s)
MIN_LEASE = 90

#: the pull service's access policies (producer.pull.POLICIES has the same)
PULL_POLICIES = ("own", "jobs")


@dataclass(frozen=True)
class PullConfig:
    """``[pull]``: the pull service of ``tokenlife serve`` (docs/pull.md).

    The limits are producer.pull.PullLimits' (same names, same defaults).
    """

    #: HOST:PORT to listen on; "": no pull service
    listen: str = ""
    #: "own": a user's own token from any munge host; "jobs": only where the user works
    policy: str = "own"
    #: jobs: hosts that may pull without work there (login nodes)
    login_hosts: tuple[str, ...] = ()
    #: this host's munged socket; "": libmunge's default
    munge_socket: str = ""
    max_request: int = 4096
    read_timeout: float = 5.0
    request_timeout: float = 8.0
    write_timeout: float = 5.0
    max_connections: int = 256
    max_per_peer: int = 16
    workers: int = 8
    reply_ttl: int = 60


@dataclass(frozen=True)
class ServiceConfig:
    """A ``[[service]]`` entry: a service account whose token tokenlife keeps current
    at ``path`` on ``hosts``, minting a new chain before the old one ends."""

    user: str
    hosts: tuple[str, ...]
    #: the token file on each host (absolute, normalized)
    path: str
    lifetime: int
    renew_until: int
    #: the file's owner; default: ``user``
    owner: str
    #: the file's group; None: the owner's primary group
    group: str | None = None
    mode: int = 0o600
    #: root, uid 0 and SlurmUser's uid are refused unless this is true
    allow_privileged: bool = False

    @property
    def name(self) -> str:
        """How messages name the entry: ``service slurmweb``."""
        return f"service {self.user}"


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    key: KeyConfig = field(default_factory=KeyConfig)
    token: TokenConfig = field(default_factory=TokenConfig)
    producer: ProducerConfig = field(default_factory=ProducerConfig)
    pam: PamConfig = field(default_factory=PamConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    login: LoginConfig = field(default_factory=LoginConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    engine: EngineSettings = field(default_factory=EngineSettings)
    serve: ServeConfig = field(default_factory=ServeConfig)
    #: the ``[[service]]`` entries, in file order
    services: tuple[ServiceConfig, ...] = ()
    pull: PullConfig = field(default_factory=PullConfig)


# --- the loader -------------------------------------------------------------


class _Table:
    """One TOML table being read: takes keys, then complains about the rest."""

    def __init__(self, source: str, prefix: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: {prefix}: expected a table")
        self.source, self.prefix, self.data = source, prefix, dict(data)

    def where(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def take(self, key: str, convert: Callable[[Any], T], default: T) -> T:
        if key not in self.data:
            return default
        try:
            return convert(self.data.pop(key))
        except ValueError as exc:
            raise ConfigError(f"{self.source}: {self.where(key)}: {exc}") from None

    def sub(self, key: str) -> _Table:
        return _Table(self.source, self.where(key), self.data.pop(key, {}))

    def done(self) -> None:
        for key in self.data:
            # quoted unless plain: a key with a newline must not break the line
            shown = key if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key) else repr(key)[:80]
            raise ConfigError(f"{self.source}: {self.where(shown)}: unknown key")


def parse(data: dict[str, Any], source: str = "<config>", path: Path | None = None) -> Config:
    top = _Table(source, "", data)
    d = Config()

    t = top.sub("key")
    kd = d.key
    key_source = t.take("source", backend(registry.KEY_SOURCES), kd.source)
    key = KeyConfig(
        source=key_source,
        path=t.take("path", abspath, kd.path),
        algorithm=t.take("algorithm", choice("HS256", "RS256"), kd.algorithm),
        kid=t.take("kid", kid, kd.kid),
        owners=t.take("owners", usernames, kd.owners),
        secret_id=t.take("secret_id", nonempty, kd.secret_id),
        version_id=t.take("version_id", nonempty, kd.version_id),
        version_stage=t.take("version_stage", nonempty, kd.version_stage),
        region=t.take("region", nonempty, kd.region),
        endpoint_url=t.take("endpoint_url", http_url, kd.endpoint_url),
        cache_path=t.take("cache_path", abspath, kd.cache_path),
        refresh=t.take("refresh", duration, kd.refresh),
        options=_plugin_options(t, registry.KEY_SOURCES, key_source),
    )
    t.done()
    if key.source == "aws":
        if key.secret_id is None:
            raise ConfigError(f"{source}: key.secret_id: required when key.source is 'aws'")
        if key.version_id and key.version_stage:
            raise ConfigError(
                f"{source}: key.version_id: give version_id or version_stage, not both"
            )
        if key.algorithm != "HS256":
            raise ConfigError(f"{source}: key.algorithm: the aws source holds an HS256 key only")

    t = top.sub("token")
    td = d.token
    token = TokenConfig(
        lifetime=t.take("lifetime", duration, td.lifetime),
        renew_until=t.take("renew_until", duration, td.renew_until),
        renew_before=t.take("renew_before", duration, td.renew_before),
        renew_fraction=t.take("renew_fraction", fraction, td.renew_fraction),
        kind=t.take("kind", backend(registry.TOKEN_KINDS), td.kind),
        sinks=t.take("sinks", backends(registry.SINKS), td.sinks),
    )
    t.done()
    if token.renew_until < token.lifetime:
        raise ConfigError(f"{source}: token.renew_until: must not be shorter than token.lifetime")

    t = top.sub("producer")
    pd = d.producer
    producer = ProducerConfig(
        slurm_user=t.take("slurm_user", username, pd.slurm_user),
        allow_privileged_users=t.take("allow_privileged_users", boolean, pd.allow_privileged_users),
        admins=t.take("admins", usernames, pd.admins),
        socket=t.take("socket", abspath, pd.socket),
    )
    t.done()

    t = top.sub("pam")
    pam = PamConfig(
        required=t.take("required", boolean, d.pam.required),
        min_uid=t.take("min_uid", integer(0, 2**31), d.pam.min_uid),
    )
    t.done()

    t = top.sub("store")
    store = StoreConfig(
        url=t.take("url", store_url, d.store.url),
        spool_dir=t.take("spool_dir", abspath, d.store.spool_dir),
        purge_after=t.take("purge_after", duration, d.store.purge_after),
    )
    t.done()

    t = top.sub("login")
    login = LoginConfig(token_dir=t.take("token_dir", abspath, d.login.token_dir))
    t.done()

    t = top.sub("delivery")
    dd = d.delivery
    transport = t.take("transport", backend(registry.TRANSPORTS), dd.transport)
    jobs = t.take("jobs", backend(registry.JOB_SOURCES), dd.jobs)
    options = {
        name: _plugin_options(t, group, name)
        for group, name in ((registry.TRANSPORTS, transport), (registry.JOB_SOURCES, jobs))
        if not registry.is_builtin(group, name)
    }
    s = t.sub("ssh")
    sd = dd.ssh
    ssh = SshConfig(
        user=s.take("user", username, sd.user),
        identity_file=s.take("identity_file", abspath, sd.identity_file),
        known_hosts=s.take("known_hosts", abspath, sd.known_hosts),
        port=s.take("port", integer(1, 65535), sd.port),
        concurrency=s.take("concurrency", integer(1, 1024), sd.concurrency),
        ssh_config=s.take("ssh_config", abspath, sd.ssh_config),
        connect_timeout=s.take("connect_timeout", duration, sd.connect_timeout),
        max_connections=s.take("max_connections", integer(1, 1_000_000), sd.max_connections),
    )
    if ssh.max_connections < ssh.concurrency:
        raise ConfigError(
            f"{source}: delivery.ssh.max_connections: must be at least "
            f"delivery.ssh.concurrency ({ssh.concurrency}): every push holds a connection"
        )
    s.done()
    st = t.sub("static")
    empty: tuple[str, ...] = ()
    static = tuple((_user_key(st, u), st.take(u, hosts, empty)) for u in sorted(st.data))
    st.done()
    delivery = DeliveryConfig(
        transport=transport,
        remote_dir=t.take("remote_dir", abspath, dd.remote_dir),
        jobs=jobs,
        root=t.take("root", abspath, dd.root),
        ssh=ssh,
        static=static,
        remove_after=t.take("remove_after", duration, dd.remove_after),
        job_timeout=t.take("job_timeout", duration, dd.job_timeout),
        lease=t.take("lease", duration_at_most(86400), dd.lease),
        options=options,
    )
    t.done()
    if delivery.lease < MIN_LEASE:
        # Longer than the node-side lock's stale time (transfer/nodefs.py
        # LOCK_STALE, 60 s), so a takeover never waits on a dead pusher's lock.
        raise ConfigError(f"{source}: delivery.lease: must be at least {MIN_LEASE}s")
    if delivery.transport == "local" and delivery.root is None:
        raise ConfigError(f"{source}: delivery.root: required when delivery.transport is 'local'")
    pull = _pull(top.sub("pull"))

    try:  # the engine reads this table alone, on worker nodes: one parser for both
        engine = engine_settings.parse(top.data.pop("engine", {}))
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None

    t = top.sub("serve")
    serve = ServeConfig(
        interval=t.take("interval", duration, d.serve.interval),
        metrics=t.take("metrics", listen, d.serve.metrics),
        deliver=t.take("deliver", boolean, d.serve.deliver),
    )
    t.done()
    services = _services(top, token, producer)
    top.done()
    if services and delivery.transport == "none":
        raise ConfigError(
            f"{source}: service[1].hosts: delivery.transport is 'none', so nothing would "
            "write the service accounts' token files; choose a transport for them"
        )
    return Config(
        path, key, token, producer, pam, store, login, delivery, engine, serve, services, pull
    )


def _pull(t: _Table) -> PullConfig:
    """``[pull]``: the service's address, policy and limits (checked against each other)."""
    d = PullConfig()
    pull = PullConfig(
        listen=t.take("listen", host_port, d.listen),
        policy=t.take("policy", choice(*PULL_POLICIES), d.policy),
        login_hosts=t.take("login_hosts", hosts, d.login_hosts),
        munge_socket=t.take("munge_socket", optional_path, d.munge_socket),
        max_request=t.take("max_request", integer(128, 65536), d.max_request),
        read_timeout=t.take("read_timeout", seconds(300), d.read_timeout),
        request_timeout=t.take("request_timeout", seconds(300), d.request_timeout),
        write_timeout=t.take("write_timeout", seconds(300), d.write_timeout),
        max_connections=t.take("max_connections", integer(1, 65536), d.max_connections),
        max_per_peer=t.take("max_per_peer", integer(1, 65536), d.max_per_peer),
        workers=t.take("workers", integer(1, 256), d.workers),
        reply_ttl=t.take("reply_ttl", duration_at_most(3600), d.reply_ttl),
    )
    t.done()
    if pull.request_timeout < pull.read_timeout:
        raise ConfigError(
            f"{t.source}: pull.request_timeout: must not be shorter than pull.read_timeout"
        )
    if pull.max_per_peer > pull.max_connections:
        raise ConfigError(f"{t.source}: pull.max_per_peer: must not exceed pull.max_connections")
    return pull


def _services(
    top: _Table, token: TokenConfig, producer: ProducerConfig
) -> tuple[ServiceConfig, ...]:
    """The ``[[service]]`` entries (counted from 1 in messages: ``service[2].mode``)."""
    source = top.source
    entries = top.data.pop("service", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: service: expected [[service]] entries (an array of tables)")
    services: list[ServiceConfig] = []
    files: dict[tuple[str, str], int] = {}
    for number, data in enumerate(entries, 1):
        t = _Table(source, f"service[{number}]", data)

        def fail(key: str, reason: str, t: _Table = t) -> ConfigError:
            return ConfigError(f"{source}: {t.where(key)}: {reason}")

        for required in ("user", "hosts", "path"):
            if required not in t.data:
                raise fail(required, "required")
        user = t.take("user", username, "")
        no_hosts: tuple[str, ...] = ()
        entry = ServiceConfig(
            user=user,
            hosts=tuple(dict.fromkeys(t.take("hosts", hosts, no_hosts))),
            path=t.take("path", node_file, ""),
            lifetime=t.take("lifetime", duration, token.lifetime),
            renew_until=t.take("renew_until", duration, token.renew_until),
            owner=t.take("owner", username, user),
            group=t.take("group", group_name, None),
            mode=t.take("mode", file_mode, 0o600),
            allow_privileged=t.take("allow_privileged", boolean, False),
        )
        t.done()
        if not entry.hosts:
            raise fail("hosts", "expected at least one host")
        # Never more than [token] allows: a service is no reason for a longer token.
        for key, value, most in (
            ("lifetime", entry.lifetime, token.lifetime),
            ("renew_until", entry.renew_until, token.renew_until),
        ):
            if value > most:
                raise fail(key, f"{value}s is longer than token.{key} ({most}s)")
        if entry.renew_until < entry.lifetime:
            raise fail("renew_until", "must not be shorter than the entry's lifetime")
        if user in ("root", producer.slurm_user) and not entry.allow_privileged:
            raise fail(
                "user",
                f"{user!r} is privileged (its token can act as any user over slurmrestd); "
                "set allow_privileged = true to allow it",
            )
        for other in services:
            if other.user == user:
                raise fail("user", f"{user!r} already has a [[service]] entry")
        for host in entry.hosts:
            earlier = files.setdefault((host, entry.path), number)
            if earlier != number:
                raise fail("path", f"service[{earlier}] delivers to the same file on {host}")
        services.append(entry)
    return tuple(services)


def _plugin_options(table: _Table, group: str, name: str) -> dict[str, Any]:
    """A plugin backend's own sub-table (``[key.<name>]``), handed to it as written.

    Built-in backends have typed keys of their own; a plugin validates its table.
    """
    if registry.is_builtin(group, name):
        return {}
    options = table.data.pop(name, {})
    if not isinstance(options, dict):
        raise ConfigError(f"{table.source}: {table.where(name)}: expected a table")
    return options


def _user_key(table: _Table, name: str) -> str:
    if not USER_NAME.fullmatch(name):
        raise ConfigError(f"{table.source}: {table.where(name)}: not a valid user name")
    return name


def load(path: Path | None = None) -> Config:
    """Load the config from ``path``, $TOKENLIFE_CONFIG or the default path.

    A missing default file means built-in defaults; a missing file that was
    asked for explicitly is an error.
    """
    explicit = path is not None or bool(os.environ.get(ENV_VAR))
    if path is None:
        path = Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)
    try:
        # A regular file of at most 1 MiB, checked before reading: a FIFO or
        # /dev/zero given as the config is refused, not waited on or read forever.
        raw = engine_settings.read_config(str(path))
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file") from None
        return Config()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        data = tomllib.loads(raw.decode())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array or table
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
    return parse(data, str(path), path)
