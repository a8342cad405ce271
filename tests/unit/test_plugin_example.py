"""Seams in practice: the built-in key sources and an installed plugin pass the contract.

tests/plugins holds docs/architecture.md's worked example, a key source read
from an environment variable (tokenlife_envkey.py), and the metadata that
registers it as an entry point of ``tokenlife.key_sources``, exactly as a
package installed with pip would.  Putting tests/plugins on the path
installs it; nothing in tokenlife names it.
"""

from __future__ import annotations

import base64
import os
import pwd
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from producer.keys import FileKeySource
from tests.conftest import REPO, run_cli
from tokenlife import config as configmod
from tokenlife import registry
from tokenlife.config import KeyConfig
from tokenlife.errors import ConfigError
from tokenlife.interfaces import KeySource
from tokenlife.testing.keysource_contract import KeySourceContract

PLUGINS = REPO / "tests" / "plugins"


@pytest.fixture
def plugin_installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(PLUGINS))
    yield
    sys.modules.pop("tokenlife_envkey", None)


def env_config(tmp_path: Path, variable: str = "TOKENLIFE_TEST_KEY") -> configmod.Config:
    path = tmp_path / "tokenlife.toml"
    path.write_text(f'[key]\nsource = "env"\n\n[key.env]\nvariable = "{variable}"\n')
    return configmod.load(path)


# -- the plugin, found by its entry point --------------------------------------------------


def test_without_the_plugin_env_is_an_unknown_source(tmp_path: Path) -> None:
    assert "env" not in registry.names(registry.KEY_SOURCES)
    with pytest.raises(ConfigError, match=r"key\.source: expected one of 'file', 'aws'$"):
        env_config(tmp_path)


@pytest.mark.usefixtures("plugin_installed")
def test_the_entry_point_makes_env_a_key_source(tmp_path: Path) -> None:
    assert registry.names(registry.KEY_SOURCES) == ["file", "aws", "env"]
    config = env_config(tmp_path)
    assert config.key.options == {"variable": "TOKENLIFE_TEST_KEY"}
    source = registry.load(registry.KEY_SOURCES, "env")(config.key)
    assert type(source).__module__ == "tokenlife_envkey"


@pytest.mark.usefixtures("plugin_installed")
def test_the_plugin_checks_its_own_table(tmp_path: Path) -> None:
    factory = registry.load(registry.KEY_SOURCES, "env")
    with pytest.raises(ConfigError, match=r"key\.env\.varaible: unknown key"):
        factory(KeyConfig(source="env", options={"varaible": "X"}))
    with pytest.raises(ConfigError, match=r"key\.env\.variable: expected"):
        factory(KeyConfig(source="env", options={"variable": "lower"}))


@pytest.mark.usefixtures("plugin_installed")
class TestEnvKeySourceContract(KeySourceContract):
    @pytest.fixture
    def secret(self, monkeypatch: pytest.MonkeyPatch) -> bytes:
        key = secrets.token_bytes(32)
        monkeypatch.setenv("TOKENLIFE_TEST_KEY", base64.b64encode(key).decode())
        return key

    @pytest.fixture
    def source(self, tmp_path: Path, secret: bytes) -> KeySource:
        config = env_config(tmp_path)
        source: KeySource = registry.load(registry.KEY_SOURCES, "env")(config.key)
        return source

    @pytest.fixture
    def broken_source(self, tmp_path: Path, secret: bytes) -> KeySource:
        config = env_config(tmp_path, variable="TOKENLIFE_TEST_UNSET")
        source: KeySource = registry.load(registry.KEY_SOURCES, "env")(config.key)
        return source


def test_the_cli_mints_with_the_plugin_key(tmp_path: Path) -> None:
    """``config check`` names the plugin; ``mint`` signs with the variable's key."""
    key = secrets.token_bytes(32)
    config = tmp_path / "tokenlife.toml"
    config.write_text(
        '[key]\nsource = "env"\n\n'
        f'[producer]\nsocket = "{tmp_path}/none.sock"\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/db.sqlite"\nspool_dir = "{tmp_path}/spool"\n'
        f'[login]\ntoken_dir = "{tmp_path}/login"\n'
    )
    env = {
        "PYTHONPATH": str(PLUGINS),
        "TOKENLIFE_KEY": base64.b64encode(key).decode(),
        "TOKENLIFE_CONFIG": str(config),
    }
    check = run_cli("config", "check", env=env)
    assert check.returncode == 0, check.stderr
    assert "key_source: environment variable $TOKENLIFE_KEY" in check.stdout
    user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
    mint = run_cli("mint", "--local", "--print", user, env=env)
    assert mint.returncode == 0, mint.stderr
    claims = jwt.decode(mint.stdout.strip(), key, algorithms=["HS256"])
    assert claims["sun"] == user
    unset = run_cli("config", "check", env={**env, "TOKENLIFE_KEY": ""})
    assert unset.returncode == 1
    assert "problem: key: $TOKENLIFE_KEY is not set" in unset.stdout


# -- the built-in sources pass the same contract --------------------------------------------


class TestFileKeySourceHS256(KeySourceContract):
    @pytest.fixture
    def secret(self) -> bytes:
        return secrets.token_bytes(32)

    @pytest.fixture
    def source(self, tmp_path: Path, secret: bytes) -> KeySource:
        path = tmp_path / "jwt_hs256.key"
        path.write_bytes(secret)
        path.chmod(0o600)
        return FileKeySource(KeyConfig(path=path))

    @pytest.fixture
    def broken_source(self, tmp_path: Path) -> KeySource:
        return FileKeySource(KeyConfig(path=tmp_path / "missing.key"))


class TestFileKeySourceRS256(KeySourceContract):
    @pytest.fixture
    def secret(self) -> bytes:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @pytest.fixture
    def source(self, tmp_path: Path, secret: bytes) -> KeySource:
        path = tmp_path / "jwt_rs256.pem"
        path.write_bytes(secret)
        path.chmod(0o600)
        return FileKeySource(KeyConfig(path=path, algorithm="RS256"))

    @pytest.fixture
    def broken_source(self, tmp_path: Path) -> KeySource:
        path = tmp_path / "world.pem"
        path.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
        path.chmod(0o644)  # refused like ssh refuses such a key
        return FileKeySource(KeyConfig(path=path, algorithm="RS256"))
