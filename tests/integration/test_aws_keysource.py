"""The ``aws`` key source against moto in server mode (a real HTTP endpoint).

The secret is stored as the AWS PCS guide shows it (base64 of Slurm's HS256
key in SecretString), or raw in SecretBinary.  Every test runs its own moto
server on a free loopback port, so stopping it (AWS unreachable) is real:
boto3 gets a refused connection, and minting must go on from the 0600 cache.
Both the Python API (``AwsKeySource``) and the command line are exercised;
tokens are checked with PyJWT against the raw key.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest

from producer.aws import AwsKeySource
from producer.keys import HS256Key
from tests.conftest import require, run_cli
from tokenlife.config import KeyConfig
from tokenlife.errors import InsecureKeyFile, KeySourceError
from tokenlife.testing.keysource_contract import KeySourceContract

pytestmark = pytest.mark.aws

Completed = subprocess.CompletedProcess[str]

REGION = "us-east-1"
KEY_BYTES = 32

# --- moto -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Moto:
    """One moto server and a boto3 client talking to it."""

    url: str
    server: Any
    client: Any
    running: bool = True

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def new_secret(self, value: str | bytes) -> str:
        """Create a secret with a unique name; returns its id (the name)."""
        name = f"tokenlife/test/{uuid.uuid4().hex}"
        if isinstance(value, bytes):
            self.client.create_secret(Name=name, SecretBinary=value)
        else:
            self.client.create_secret(Name=name, SecretString=value)
        return name


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Moto]:
    require(
        importlib.util.find_spec("moto") is not None
        and importlib.util.find_spec("flask") is not None,
        "needs moto[server] (pip install -e '.[test]')",
    )
    import boto3
    from moto.server import ThreadedMotoServer

    # Fake credentials, and nothing from the real machine's AWS setup.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    client = boto3.client("secretsmanager", region_name=REGION, endpoint_url=url)
    moto = Moto(url, server, client)
    try:
        yield moto
    finally:
        moto.stop()


# --- keys, configs and the CLI ------------------------------------------------


def new_key(size: int = KEY_BYTES) -> bytes:
    return secrets.token_bytes(size)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def key_config(moto: Moto, secret_id: str, cache: Path, **extra: Any) -> KeyConfig:
    return KeyConfig(
        source="aws",
        secret_id=secret_id,
        region=REGION,
        endpoint_url=moto.url,
        cache_path=cache,
        **extra,
    )


def verifies_with(token: str, key: bytes) -> bool:
    try:
        jwt.decode(token, key, algorithms=["HS256"])
    except jwt.InvalidSignatureError:
        return False
    return True


def sign_with(config: KeyConfig, **kw: Any) -> str:
    """Load the key through the source and sign a minimal token with it."""
    key = AwsKeySource(config, **kw).load()
    now = int(time.time())
    return key.sign({"iat": now, "exp": now + 600, "sun": "x"})


def mint_user() -> pwd.struct_passwd:
    """Whom the CLI mints for: ourselves, or as root an ordinary test user
    (a token for root is refused without producer.allow_privileged_users)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.getuid())
    from tests.integration.harness.users import ALICE, ensure_user

    return ensure_user(ALICE)


@dataclass
class Site:
    """A temporary tokenlife install: config, store, login dir, spool and cache."""

    root: Path
    moto: Moto
    secret_id: str
    key: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.root / "tokenlife.toml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def cache(self) -> Path:
        return self.state / "cache" / "aws-key.cache"

    @property
    def login(self) -> Path:
        return self.state / "login"

    def write(self) -> Path:
        key = {
            "source": "aws",
            "secret_id": self.secret_id,
            "region": REGION,
            "endpoint_url": self.moto.url,
            "cache_path": str(self.cache),
            "refresh": "1h",
            **self.key,
        }
        lines = ["[key]", *(f"{k} = {json.dumps(v)}" for k, v in key.items())]
        lines += [
            "[store]",
            f'url = "sqlite:///{self.state}/tokenlife.db"',
            f"spool_dir = {json.dumps(str(self.state / 'spool'))}",
            "[login]",
            f"token_dir = {json.dumps(str(self.login))}",
            "[producer]",
            f"socket = {json.dumps(str(self.root / 'no-service.sock'))}",
        ]
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text("\n".join(lines) + "\n")
        return self.config

    def mint(self, user: str) -> Completed:
        self.write()
        return run_cli("-c", str(self.config), "mint", user, "--local", "--print")

    def written(self) -> list[str]:
        """Every file this site has written (the state tree), relative."""
        if not self.state.exists():
            return []
        return sorted(str(p.relative_to(self.state)) for p in self.state.rglob("*") if p.is_file())


def one_line_error(proc: Completed) -> str:
    return one_line_error_of(proc, "mint")


def one_line_error_of(proc: Completed, command: str) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {proc.stderr!r}"
    assert lines[0].startswith(f"tokenlife-{command}: "), lines[0]
    return lines[0]


def check_minted(proc: Completed, key: bytes, user: pwd.struct_passwd) -> str:
    """The CLI succeeded and printed a token signed with ``key`` for ``user``."""
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    assert proc.stdout == token + "\n"
    claims = jwt.decode(token, key, algorithms=["HS256"])
    assert claims["sun"] == user.pw_name
    assert claims["uid"] == user.pw_uid
    assert claims["gid"] == user.pw_gid
    assert set(claims["id"]) >= {"gecos", "dir", "shell", "gids"}
    assert sorted(claims["id"]["gids"]) == sorted(set(os.getgrouplist(user.pw_name, user.pw_gid)))
    return token


@pytest.fixture
def site(tmp_path: Path, moto: Moto) -> Site:
    return Site(tmp_path / "site", moto, secret_id="")


# --- the PCS layout: base64 in SecretString ----------------------------------


def test_api_base64_secret_string(moto: Moto, tmp_path: Path) -> None:
    key = new_key()
    secret_id = moto.new_secret(b64(key))
    cache = tmp_path / "cache" / "aws-key.cache"

    token = sign_with(key_config(moto, secret_id, cache))

    assert verifies_with(token, key)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700


def test_api_base64_with_line_breaks(moto: Moto, tmp_path: Path) -> None:
    """`base64 key` wraps at 76 columns; a pasted secret may carry the newlines."""
    key = new_key(64)
    text = b64(key)
    secret_id = moto.new_secret(text[:40] + "\n" + text[40:] + "\n")

    assert verifies_with(sign_with(key_config(moto, secret_id, tmp_path / "c")), key)


def test_cli_mint_base64_secret_string(site: Site) -> None:
    user = mint_user()
    key = new_key()
    site.secret_id = site.moto.new_secret(b64(key))

    proc = site.mint(user.pw_name)

    token = check_minted(proc, key, user)
    token_file = site.login / str(user.pw_uid) / "slurm_jwt"
    assert token_file.read_text() == token
    assert stat.S_IMODE(site.cache.stat().st_mode) == 0o600
    assert b64(key) not in proc.stderr


# --- versions: AWSCURRENT, AWSPREVIOUS and a version id ------------------------


@dataclass
class Rotated:
    secret_id: str
    old: bytes
    new: bytes
    old_version: str
    new_version: str


@pytest.fixture
def rotated(moto: Moto) -> Rotated:
    """A secret with two versions: the old key is AWSPREVIOUS, the new AWSCURRENT."""
    old, new = new_key(), new_key(48)
    name = f"tokenlife/test/{uuid.uuid4().hex}"
    first = moto.client.create_secret(Name=name, SecretString=b64(old))
    second = moto.client.put_secret_value(SecretId=name, SecretString=b64(new))
    stages = {
        v["VersionId"]: v["VersionStages"]
        for v in moto.client.list_secret_version_ids(SecretId=name)["Versions"]
    }
    assert stages == {first["VersionId"]: ["AWSPREVIOUS"], second["VersionId"]: ["AWSCURRENT"]}
    return Rotated(name, old, new, first["VersionId"], second["VersionId"])


#: selection id: (the config's version keys, which key it must select)
SELECTIONS: dict[str, tuple[Callable[[Rotated], dict[str, str]], str]] = {
    "default": (lambda r: {}, "new"),
    "AWSCURRENT": (lambda r: {"version_stage": "AWSCURRENT"}, "new"),
    "AWSPREVIOUS": (lambda r: {"version_stage": "AWSPREVIOUS"}, "old"),
    "version_id-old": (lambda r: {"version_id": r.old_version}, "old"),
    "version_id-new": (lambda r: {"version_id": r.new_version}, "new"),
}


@pytest.mark.parametrize("selection", SELECTIONS)
def test_api_version_selection(
    moto: Moto, rotated: Rotated, tmp_path: Path, selection: str
) -> None:
    extra, which = SELECTIONS[selection]
    expected, other = (rotated.new, rotated.old) if which == "new" else (rotated.old, rotated.new)

    token = sign_with(key_config(moto, rotated.secret_id, tmp_path / "cache", **extra(rotated)))

    assert verifies_with(token, expected)
    assert not verifies_with(token, other)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_cli_version_selection(site: Site, rotated: Rotated, selection: str) -> None:
    user = mint_user()
    extra, which = SELECTIONS[selection]
    expected, other = (rotated.new, rotated.old) if which == "new" else (rotated.old, rotated.new)
    site.secret_id = rotated.secret_id
    site.key = extra(rotated)

    token = check_minted(site.mint(user.pw_name), expected, user)

    assert not verifies_with(token, other)


def test_changing_the_version_selection_is_not_served_from_the_cache(
    moto: Moto, rotated: Rotated, tmp_path: Path
) -> None:
    """An administrator rolls back to AWSPREVIOUS: the next mint must use the old key."""
    cache = tmp_path / "cache"
    current = key_config(moto, rotated.secret_id, cache, version_stage="AWSCURRENT")
    assert verifies_with(sign_with(current), rotated.new)

    previous = key_config(moto, rotated.secret_id, cache, version_stage="AWSPREVIOUS")
    assert verifies_with(sign_with(previous), rotated.old)


# --- SecretBinary ----------------------------------------------------------------


def test_api_secret_binary_taken_as_is(moto: Moto, tmp_path: Path) -> None:
    key = new_key(64)
    secret_id = moto.new_secret(key)

    assert verifies_with(sign_with(key_config(moto, secret_id, tmp_path / "c")), key)


def test_cli_secret_binary_taken_as_is(site: Site) -> None:
    user = mint_user()
    # Binary that happens to be valid base64 text must still not be decoded.
    key = b64(new_key(KEY_BYTES)).encode()
    site.secret_id = site.moto.new_secret(key)

    check_minted(site.mint(user.pw_name), key, user)


# --- bad secrets: exit 3, one line, nothing written ----------------------------


@dataclass(frozen=True)
class Bad:
    secret: str | bytes | None  # None: no such secret
    message: str  # the exact reason after "tokenlife-mint: " ({id} is the secret id)


BAD = {
    "not-base64": Bad("this is *not* base64!", "secret {id} is not base64 of the key"),
    "too-short": Bad(b64(b"k" * 16), "HS256 key is 16 bytes; at least 32 are required"),
    "too-short-binary": Bad(b"k" * 31, "HS256 key is 31 bytes; at least 32 are required"),
    "empty-base64": Bad("=", "secret {id} is not base64 of the key"),
    "unknown-id": Bad(None, "AWS Secrets Manager refused {id}: ResourceNotFoundException"),
}


def _bad_secret(moto: Moto, case: Bad) -> str:
    if case.secret is None:
        return f"tokenlife/test/missing-{uuid.uuid4().hex}"
    return moto.new_secret(case.secret)


@pytest.mark.parametrize("case_id", BAD)
def test_api_bad_secret(moto: Moto, tmp_path: Path, case_id: str) -> None:
    case = BAD[case_id]
    secret_id = _bad_secret(moto, case)
    cache = tmp_path / "cache" / "aws-key.cache"

    with pytest.raises(KeySourceError) as info:
        AwsKeySource(key_config(moto, secret_id, cache)).load()

    assert str(info.value) == case.message.format(id=secret_id)
    assert not cache.exists()


@pytest.mark.parametrize("case_id", BAD)
def test_cli_bad_secret(site: Site, case_id: str) -> None:
    case = BAD[case_id]
    site.secret_id = _bad_secret(site.moto, case)

    proc = site.mint(mint_user().pw_name)

    assert proc.returncode == 3
    assert proc.stdout == ""
    assert one_line_error(proc) == "tokenlife-mint: " + case.message.format(id=site.secret_id)
    if isinstance(case.secret, str):
        assert case.secret not in proc.stderr
    assert site.written() == []


def test_fixing_a_too_short_secret_takes_effect_at_once(site: Site) -> None:
    user = mint_user()
    site.secret_id = site.moto.new_secret(b64(new_key(16)))
    assert site.mint(user.pw_name).returncode == 3

    good = new_key()
    site.moto.client.put_secret_value(SecretId=site.secret_id, SecretString=b64(good))

    check_minted(site.mint(user.pw_name), good, user)


# --- the cache: minting goes on when AWS is unreachable ------------------------


def test_api_fresh_cache_used_without_aws(moto: Moto, tmp_path: Path) -> None:
    key = new_key()
    config = key_config(moto, moto.new_secret(b64(key)), tmp_path / "cache" / "k")
    sign_with(config)
    moto.stop()

    assert verifies_with(sign_with(config), key)


def test_api_stale_cache_used_with_a_warning_when_aws_is_down(
    moto: Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key()
    config = key_config(moto, moto.new_secret(b64(key)), tmp_path / "cache" / "k", refresh=60)
    sign_with(config)
    moto.stop()

    later = time.time() + 3600
    with caplog.at_level(logging.WARNING, logger="producer.aws"):
        token = sign_with(config, now=lambda: later)

    assert verifies_with(token, key)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "AWS Secrets Manager unreachable" in message
    assert "using the cached key fetched" in message
    assert b64(key) not in caplog.text


def test_api_stale_cache_is_refreshed_when_aws_is_up(moto: Moto, tmp_path: Path) -> None:
    old, new = new_key(), new_key()
    secret_id = moto.new_secret(b64(old))
    config = key_config(moto, secret_id, tmp_path / "cache" / "k", refresh=60)
    sign_with(config)
    moto.client.put_secret_value(SecretId=secret_id, SecretString=b64(new))

    # Within refresh the cached (old) key is used; past it, the new one is fetched.
    assert verifies_with(sign_with(config), old)
    assert verifies_with(sign_with(config, now=lambda: time.time() + 3600), new)


def test_api_no_cache_and_aws_down(moto: Moto, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "k"
    config = key_config(moto, moto.new_secret(b64(new_key())), cache)
    moto.stop()

    with pytest.raises(KeySourceError, match=r"^AWS Secrets Manager unreachable: \w+$"):
        AwsKeySource(config).load()
    assert not cache.exists()


def test_api_group_readable_cache_is_refused(moto: Moto, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "k"
    config = key_config(moto, moto.new_secret(b64(new_key())), cache)
    sign_with(config)
    cache.chmod(0o644)

    with pytest.raises(InsecureKeyFile, match=r"has mode 0644"):
        AwsKeySource(config).load()


def test_cli_cache_keeps_minting_after_aws_stops(site: Site) -> None:
    user = mint_user()
    key = new_key()
    site.secret_id = site.moto.new_secret(b64(key))
    check_minted(site.mint(user.pw_name), key, user)
    assert stat.S_IMODE(site.cache.stat().st_mode) == 0o600

    site.moto.stop()

    proc = site.mint(user.pw_name)
    check_minted(proc, key, user)
    assert proc.stderr == ""  # a fresh cache: AWS was not even asked


def test_cli_stale_cache_used_with_a_warning_when_aws_is_down(site: Site) -> None:
    user = mint_user()
    key = new_key()
    site.secret_id = site.moto.new_secret(b64(key))
    site.key = {"refresh": "1"}
    check_minted(site.mint(user.pw_name), key, user)
    site.moto.stop()
    time.sleep(1.2)  # the cache is now older than refresh

    proc = site.mint(user.pw_name)

    check_minted(proc, key, user)
    assert "AWS Secrets Manager unreachable" in proc.stderr
    assert "using the cached key fetched" in proc.stderr
    assert "WARNING" in proc.stderr
    assert b64(key) not in proc.stderr


def test_cli_no_cache_and_aws_down(site: Site) -> None:
    site.secret_id = site.moto.new_secret(b64(new_key()))
    site.moto.stop()

    proc = site.mint(mint_user().pw_name)

    assert proc.returncode == 3
    assert proc.stdout == ""
    line = one_line_error(proc)
    assert line.startswith("tokenlife-mint: AWS Secrets Manager unreachable: ")
    assert site.written() == []


def test_cli_group_readable_cache_is_refused(site: Site) -> None:
    user = mint_user()
    key = new_key()
    site.secret_id = site.moto.new_secret(b64(key))
    check_minted(site.mint(user.pw_name), key, user)
    token_file = site.login / str(user.pw_uid) / "slurm_jwt"
    before = token_file.read_bytes()
    site.cache.chmod(0o644)

    proc = site.mint(user.pw_name)

    assert proc.returncode == 3
    assert proc.stdout == ""
    assert one_line_error(proc) == (
        f"tokenlife-mint: AWS key cache {site.cache} has mode 0644: "
        "it must not be accessible by group or others (chmod 600)"
    )
    assert token_file.read_bytes() == before


# --- the shipped key-source contract ------------------------------------------


class TestAwsKeySourceContract(KeySourceContract):
    """The AWS source passes the contract every key source passes (moto's server mode)."""

    @pytest.fixture
    def secret(self) -> bytes:
        return new_key()

    @pytest.fixture
    def source(self, moto: Moto, tmp_path: Path, secret: bytes) -> AwsKeySource:
        return AwsKeySource(key_config(moto, moto.new_secret(b64(secret)), tmp_path / "c" / "k"))

    @pytest.fixture
    def broken_source(self, moto: Moto, tmp_path: Path) -> AwsKeySource:
        return AwsKeySource(key_config(moto, "tokenlife/test/missing", tmp_path / "c" / "k"))


# --- the cache between the service account and root (issue 16, item 3.1) ------
#
# The daemon runs as the service account and writes the cache into its own
# 0700 state directory; the PAM fallback runs as root when the daemon is
# stopped.  Both must use the same cache, and the cache stays 0600.  Here the
# test user tlbob plays the service account.


@dataclass
class SharedSite:
    root: Path
    moto: Moto
    secret_id: str
    service: pwd.struct_passwd
    login_user: pwd.struct_passwd

    @property
    def config(self) -> Path:
        return self.root / "tokenlife.toml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def cache(self) -> Path:
        return self.state / "aws-key.cache"

    def write(self) -> None:
        self.config.write_text(
            "[key]\n"
            'source = "aws"\n'
            f"secret_id = {json.dumps(self.secret_id)}\n"
            f'region = "{REGION}"\n'
            f'endpoint_url = "{self.moto.url}"\n'
            f'cache_path = "{self.cache}"\n'
            'refresh = "1h"\n'
            f'[store]\nurl = "sqlite:///{self.root}/db/tokenlife.db"\n'
            f'spool_dir = "{self.root}/spool"\n'
            f'[login]\ntoken_dir = "{self.root}/login"\n'
            f'[producer]\nsocket = "{self.root}/no-service.sock"\n'
        )
        self.config.chmod(0o644)

    def as_service(self, *args: str) -> Completed:
        """``tokenlife ARGS`` as the service account (what the daemon does)."""
        u = self.service
        cmd = ["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--init-groups"]
        env = {k: v for k, v in os.environ.items() if k != "TOKENLIFE_CONFIG"}
        return subprocess.run(
            [*cmd, str(Path(sys.executable).parent / "tokenlife"), "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            env={**env, "HOME": u.pw_dir},
            timeout=60,
        )

    def pam_fallback(self) -> Completed:
        """A login while the daemon is stopped: ``tokenlife pam`` as root, no service."""
        env = {"PAM_TYPE": "open_session", "PAM_USER": self.login_user.pw_name}
        return run_cli(
            "-c", str(self.config), "pam", "--socket", str(self.root / "no-service.sock"), env=env
        )

    def login_token(self) -> Path:
        return self.root / "login" / str(self.login_user.pw_uid) / "slurm_jwt"


@pytest.fixture
def shared(moto: Moto) -> Iterator[SharedSite]:
    require(os.geteuid() == 0, "needs root (the PAM fallback, and setpriv to the service account)")
    require(shutil.which("setpriv") is not None, "needs setpriv")
    from tests.integration.harness.users import ALICE, BOB, ensure_user

    root = Path(tempfile.mkdtemp(prefix="tl-aws-"))
    try:
        root.chmod(0o755)
        site = SharedSite(root, moto, "", ensure_user(BOB), ensure_user(ALICE))
        # The service's StateDirectory=: 0700, owned by the service account.
        site.state.mkdir(mode=0o700)
        os.chown(site.state, site.service.pw_uid, site.service.pw_gid)
        yield site
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_root_fallback_uses_the_cache_the_service_account_wrote(shared: SharedSite) -> None:
    key = new_key()
    shared.secret_id = shared.moto.new_secret(b64(key))
    shared.write()
    check = shared.as_service("config", "check")  # loads the key: fetches and caches it
    assert check.returncode == 0, check.stdout + check.stderr
    st = shared.cache.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (shared.service.pw_uid, 0o600)
    shared.moto.stop()  # a login never waits on AWS when a cache exists

    proc = shared.pam_fallback()

    assert (proc.returncode, proc.stderr) == (0, "")  # before: "... is owned by uid 1002"
    token = shared.login_token().read_text()
    assert jwt.decode(token, key, algorithms=["HS256"])["sun"] == shared.login_user.pw_name


def test_a_cache_written_by_root_is_handed_to_the_service_account(shared: SharedSite) -> None:
    """Root fetched first (a login before the daemon ever ran): the daemon,
    even without CAP_DAC_OVERRIDE, must read that cache."""
    key = new_key()
    shared.secret_id = shared.moto.new_secret(b64(key))
    shared.write()
    assert shared.pam_fallback().returncode == 0
    st = shared.cache.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        shared.service.pw_uid,
        shared.service.pw_gid,
        0o600,
    )
    shared.moto.stop()

    check = shared.as_service("config", "check")

    assert check.returncode == 0, check.stdout
    assert f"key_id: {HS256Key(key).key_id}" in check.stdout.splitlines()


def test_a_cache_owned_by_anyone_else_is_still_refused(shared: SharedSite) -> None:
    key = new_key()
    shared.secret_id = shared.moto.new_secret(b64(key))
    shared.write()
    assert shared.as_service("config", "check").returncode == 0
    other = shared.login_user  # neither root, nor the service account, nor key.owners
    os.chown(shared.cache, other.pw_uid, other.pw_gid)

    proc = shared.pam_fallback()

    assert not shared.login_token().exists()
    assert f"is owned by uid {other.pw_uid}" in proc.stderr


def test_the_owner_of_a_directory_others_may_write_is_not_trusted(shared: SharedSite) -> None:
    key = new_key()
    shared.secret_id = shared.moto.new_secret(b64(key))
    shared.write()
    assert shared.as_service("config", "check").returncode == 0
    shared.state.chmod(0o733)  # anyone may put a file there: its owner vouches for nothing

    proc = shared.pam_fallback()

    assert not shared.login_token().exists()
    assert f"is owned by uid {shared.service.pw_uid}" in proc.stderr


# --- a rotated secret: logged, and picked up at once by rotate-key ---------------


def aws_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the key source logged (moto's server logs its requests too)."""
    return [r.getMessage() for r in caplog.records if r.name == "producer.aws"]


def test_a_changed_key_is_logged_once_with_both_key_ids(
    moto: Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = new_key(), new_key()
    secret_id = moto.new_secret(b64(old))
    config = key_config(moto, secret_id, tmp_path / "cache" / "k", refresh=60)
    clock = [time.time()]
    daemon = AwsKeySource(config, now=lambda: clock[0])  # one long-lived source, as in the daemon
    assert daemon.load().key_id == HS256Key(old).key_id
    moto.client.put_secret_value(SecretId=secret_id, SecretString=b64(new))
    clock[0] += 3600  # past refresh: AWS is asked

    with caplog.at_level(logging.INFO, logger="producer.aws"):
        assert daemon.load().key_id == HS256Key(new).key_id
        assert daemon.load().key_id == HS256Key(new).key_id  # no second line

    lines = aws_lines(caplog)
    assert lines == [
        f"AWS key of secret {secret_id} changed: {HS256Key(old).key_id} -> {HS256Key(new).key_id}"
    ]
    assert b64(old) not in caplog.text and b64(new) not in caplog.text


def test_another_process_that_refreshed_the_cache_is_noticed_and_logged(
    moto: Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon holds the old key; ``rotate-key`` (another process) fetched
    the new one: the daemon's next mint uses it, and says so."""
    old, new = new_key(), new_key()
    secret_id = moto.new_secret(b64(old))
    config = key_config(moto, secret_id, tmp_path / "cache" / "k")
    daemon = AwsKeySource(config)
    assert daemon.load().key_id == HS256Key(old).key_id
    moto.client.put_secret_value(SecretId=secret_id, SecretString=b64(new))
    moto.stop()  # the daemon must not need AWS for this

    with caplog.at_level(logging.INFO, logger="producer.aws"):
        rewrite = AwsKeySource(config)
        rewrite.load()  # within refresh: the old key, from the cache
        assert daemon.load().key_id == HS256Key(old).key_id
    assert aws_lines(caplog) == []

    # The same cache rewritten with the new key, as a fresh fetch does.
    data = json.loads(config.cache_path.read_text())
    config.cache_path.write_text(json.dumps({**data, "key": b64(new)}))
    with caplog.at_level(logging.INFO, logger="producer.aws"):
        assert daemon.load().key_id == HS256Key(new).key_id
    assert aws_lines(caplog) == [
        f"AWS key of secret {secret_id} changed: {HS256Key(old).key_id} -> {HS256Key(new).key_id}"
    ]


def test_rotate_key_asks_aws_at_once_and_the_next_mint_uses_the_new_key(site: Site) -> None:
    user = mint_user()
    old, new = new_key(), new_key()
    site.secret_id = site.moto.new_secret(b64(old))
    check_minted(site.mint(user.pw_name), old, user)  # cached, fresh for an hour
    site.moto.client.put_secret_value(SecretId=site.secret_id, SecretString=b64(new))

    proc = run_cli("-c", str(site.config), "rotate-key")

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("renewed 1,")  # before: "renewed 0" (the cached old key)
    assert proc.stderr.splitlines()[-1].endswith(
        f"AWS key of secret {site.secret_id} changed: {HS256Key(old).key_id} -> "
        f"{HS256Key(new).key_id}"
    )
    assert b64(new) not in proc.stderr
    site.moto.stop()
    check_minted(site.mint(user.pw_name), new, user)  # from the refreshed cache


def test_rotate_key_with_aws_down_fails_instead_of_using_the_cache(site: Site) -> None:
    user = mint_user()
    key = new_key()
    site.secret_id = site.moto.new_secret(b64(key))
    check_minted(site.mint(user.pw_name), key, user)  # a fresh cache
    site.moto.stop()

    proc = run_cli("-c", str(site.config), "rotate-key")

    assert proc.returncode == 3
    assert proc.stdout == ""
    assert one_line_error_of(proc, "rotate-key").startswith(
        "tokenlife-rotate-key: AWS Secrets Manager unreachable: "
    )
