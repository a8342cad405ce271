"""Backends by name: the built-in ones, and those an installed package adds.

Each seam of tokenlife (see ``tokenlife.interfaces``) has a group here.  A
configuration value such as ``key.source = "file"`` names a backend of that
group; the registry turns the name into its factory.  Built-in backends are
listed below as ``module:attribute`` strings and imported only when chosen,
so the login and TaskProlog paths never pay for a backend they do not use
(nor for scanning entry points).  Any other name is looked up among the
Python entry points of the group's name, the way keyring finds its
backends: a site's plugin is one module and one line in its package's
metadata::

    [project.entry-points."tokenlife.key_sources"]
    env = "tokenlife_envkey:EnvKeySource"

A built-in name cannot be taken over by a plugin.  Only the standard library
is imported here.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from tokenlife.errors import ConfigError

#: group -> {name: "module:attribute"}; the group is also the entry-point group
BUILTIN: dict[str, dict[str, str]] = {
    "tokenlife.key_sources": {
        "file": "producer.keys:FileKeySource",
        "aws": "producer.aws:AwsKeySource",
    },
    "tokenlife.stores": {
        "sqlite": "repository.store:SqlTokenStore.from_config",
        "postgresql": "repository.store:SqlTokenStore.from_config",
    },
    "tokenlife.transports": {
        "ssh": "transfer.transports:SshTransport",
        "local": "transfer.transports:LocalTransport.from_config",
        "none": "transfer.transports:NoTransport",
    },
    "tokenlife.job_sources": {
        "slurm": "transfer.jobs:SlurmJobs.from_config",
        "static": "transfer.jobs:StaticJobs.from_config",
    },
    "tokenlife.sinks": {
        "login_files": "repository.sinks:LoginFiles.from_config",
    },
    "tokenlife.token_kinds": {
        "slurm_jwt": "tokenlife.slurm_jwt:SlurmJwt",
    },
}

KEY_SOURCES = "tokenlife.key_sources"
STORES = "tokenlife.stores"
TRANSPORTS = "tokenlife.transports"
JOB_SOURCES = "tokenlife.job_sources"
SINKS = "tokenlife.sinks"
TOKEN_KINDS = "tokenlife.token_kinds"  # noqa: S105 - a group name, not a secret

#: what a backend name may look like (it is a config value and an entry-point name)
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _plugins(group: str) -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=group)}


def names(group: str) -> list[str]:
    """Every backend name of ``group``: built-in first, then installed plugins."""
    builtin = BUILTIN[group]
    return [*builtin, *sorted(n for n in _plugins(group) if n not in builtin)]


def is_builtin(group: str, name: str) -> bool:
    return name in BUILTIN[group]


def known(group: str, name: str) -> bool:
    """Whether ``name`` is a backend of ``group`` (built-in or installed)."""
    return name in BUILTIN[group] or (bool(NAME.fullmatch(name)) and name in _plugins(group))


def load(group: str, name: str) -> Any:
    """The factory registered as ``name`` in ``group``; ConfigError if there is none."""
    target = BUILTIN[group].get(name)
    if target is not None:
        module, _, attributes = target.partition(":")
        found: Any = importlib.import_module(module)
        for attribute in attributes.split("."):
            found = getattr(found, attribute)
        return found
    plugin = _plugins(group).get(name) if NAME.fullmatch(name) else None
    if plugin is None:
        raise ConfigError(
            f"no {_what(group)} named {name!r} (known: {', '.join(map(repr, names(group)))})"
        )
    try:
        return plugin.load()
    except Exception as exc:  # a broken plugin is a configuration problem, in one line
        raise ConfigError(
            f"{_what(group)} {name!r} ({plugin.value}) cannot be loaded: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _what(group: str) -> str:
    return group.removeprefix("tokenlife.").replace("_", " ").rstrip("s")
