"""A key source read from an environment variable: docs/architecture.md's worked example.

Some sites hand secrets to services through the environment (systemd's
``LoadCredential=`` plus a wrapper, a container runtime, a CI runner).  This
plugin reads the HS256 key, base64-encoded, from a variable named in its own
config table::

    [key]
    source = "env"

    [key.env]
    variable = "TOKENLIFE_KEY"     # the default

It is registered by the entry point in tokenlife_envkey-1.0.dist-info
(``[tokenlife.key_sources] env = tokenlife_envkey:EnvKeySource``) and proves
itself with the shipped contract suite (tests/unit/test_plugin_example.py).
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from producer.keys import HS256Key
from tokenlife.config import KeyConfig
from tokenlife.errors import ConfigError, KeySourceError

_VARIABLE = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")


class EnvKeySource:
    def __init__(self, config: KeyConfig, prefer_cache: bool = False) -> None:
        options = dict(config.options)
        variable = options.pop("variable", "TOKENLIFE_KEY")
        if not isinstance(variable, str) or not _VARIABLE.fullmatch(variable):
            raise ConfigError("key.env.variable: expected an upper-case environment variable name")
        for unknown in options:
            raise ConfigError(f"key.env.{unknown}: unknown key")
        if config.algorithm != "HS256":
            raise ConfigError("key.algorithm: the env source holds an HS256 key only")
        self.variable = variable

    def describe(self) -> str:
        return f"environment variable ${self.variable} (base64 of the HS256 key)"

    def load(self) -> HS256Key:
        text = os.environ.get(self.variable)
        if not text:
            raise KeySourceError(f"${self.variable} is not set")
        try:
            secret = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise KeySourceError(f"${self.variable} is not base64") from None
        return HS256Key(secret)  # refuses a key shorter than 32 bytes
