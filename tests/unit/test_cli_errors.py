"""Bad input, kstart's errors-t style: exact one-line stderr, exit code,
empty stdout, and nothing written anywhere."""

from __future__ import annotations

import os
import pwd
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import require_root, run_cli

DURATION_HINT = "is not a duration such as 90, 30m, 1h, 2d or 1w"


def _mint_user() -> str:
    """An ordinary user this process may mint for: itself, or nobody as root."""
    return "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = root / "jwt_hs256.key"
        self.key.write_bytes(secrets.token_bytes(32))
        self.key.chmod(0o600)
        self.config = root / "tokenlife.toml"
        self.write_config("")

    def write_config(self, extra: str, key: Path | None = None) -> None:
        self.config.write_text(
            f'[key]\npath = "{key or self.key}"\n'
            f'[store]\nurl = "sqlite:///{self.root}/state/db.sqlite"\n'
            f'spool_dir = "{self.root}/state/spool"\n'
            f'[login]\ntoken_dir = "{self.root}/run"\n'
            f'[producer]\nsocket = "{self.root}/no.sock"\n' + extra
        )

    def written(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.name in ("state", "run"))


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def _check(site: Site, args: list[str], code: int, line: str) -> None:
    result = run_cli("-c", str(site.config), *args)
    assert (result.returncode, result.stderr, result.stdout) == (code, line + "\n", "")
    assert site.written() == []


@pytest.mark.parametrize(
    ("user", "line"),
    [
        ("../x", "'../x' is not a valid user name"),
        ("root;rm", "'root;rm' is not a valid user name"),
        ("", "user name is empty"),
        ("a" * 300, "user name is longer than 32 characters"),
        ("tl_no_such_user", "unknown user 'tl_no_such_user'"),
        ("a b", "'a b' is not a valid user name"),
        (".hidden", "'.hidden' is not a valid user name"),
    ],
)
def test_bad_user_names(site: Site, user: str, line: str) -> None:
    _check(site, ["mint", "--local", user], 4, f"tokenlife-mint: {line}")


@pytest.mark.parametrize(
    ("option", "value", "line"),
    [
        ("--lifetime", "1x", f"argument --lifetime: '1x' {DURATION_HINT}"),
        ("--lifetime", "0", "argument --lifetime: a duration must be positive"),
        ("--renew-until", "9999d", "argument --renew-until: a duration must be at most 366d"),
        ("--lifetime", "-5m", "argument --lifetime: expected one argument"),
    ],
)
def test_bad_durations(site: Site, option: str, value: str, line: str) -> None:
    _check(
        site,
        ["mint", "--local", _mint_user(), option, value],
        2,
        f"tokenlife-mint: {line} (see 'tokenlife mint --help')",
    )


CONFIG_CASES: list[tuple[str, str]] = [
    ("[token]\nlifetimes = '1h'\n", "token.lifetimes: unknown key"),
    ("[token]\nlifetime = '2x'\n", f"token.lifetime: '2x' {DURATION_HINT}"),
    (
        "[token]\nlifetime = '3d'\nrenew_until = '1d'\n",
        "token.renew_until: must not be shorter than token.lifetime",
    ),
    (
        "[token]\nrenew_fraction = 2\n",
        "token.renew_fraction: expected a number between 0 and 1 (exclusive)",
    ),
    ("[nonsense]\n", "nonsense: unknown key"),
    ("[pam]\nrequired = 'yes'\n", "pam.required: expected true or false"),
    ("[engine]\ntoken_dir = 'run/x'\n", "engine.token_dir: expected an absolute path"),
    ("[engine]\ntoken_dir = '/run/../etc'\n", "engine.token_dir: '..' is not allowed in paths"),
    ("[pam]\nmin_uid = -1\n", "pam.min_uid: expected an integer from 0 to 2147483648"),
    (
        "[delivery]\ntransport = 'ftp'\n",
        "delivery.transport: expected one of 'ssh', 'local', 'none'",
    ),
    (
        "[delivery]\ntransport = 'local'\n",
        "delivery.root: required when delivery.transport is 'local'",
    ),
    ("[delivery.ssh]\nport = 70000\n", "delivery.ssh.port: expected an integer from 1 to 65535"),
    (
        "[delivery.static]\nalice = ['node 1']\n",
        "delivery.static.alice: 'node 1' is not a valid node name",
    ),
    (
        "[serve]\nmetrics = 'localhost'\n",
        'serve.metrics: expected ADDRESS:PORT such as "127.0.0.1:9464", or ""',
    ),
]


@pytest.mark.parametrize(("extra", "reason"), CONFIG_CASES)
def test_bad_config(site: Site, extra: str, reason: str) -> None:
    site.write_config(extra)
    _check(site, ["mint", "--local", _mint_user()], 2, f"tokenlife-mint: {site.config}: {reason}")


def test_config_key_source_table(site: Site) -> None:
    site.config.write_text("[key]\nsource = 'vault'\n")
    _check(
        site,
        ["mint", "--local", _mint_user()],
        2,
        f"tokenlife-mint: {site.config}: key.source: expected one of 'file', 'aws'",
    )
    site.config.write_text("[key]\nsource = 'aws'\n")
    _check(
        site,
        ["mint", "--local", _mint_user()],
        2,
        f"tokenlife-mint: {site.config}: key.secret_id: required when key.source is 'aws'",
    )
    site.config.write_text("[store]\nurl = 'mysql://x'\n")
    _check(
        site,
        ["mint", "--local", _mint_user()],
        2,
        f"tokenlife-mint: {site.config}: store.url: expected sqlite:///PATH or postgresql+psycopg://...",
    )


def test_invalid_toml(site: Site) -> None:
    site.config.write_text("[key\n")
    result = run_cli("-c", str(site.config), "mint", "--local", _mint_user())
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"tokenlife-mint: {site.config}: invalid TOML: ")
    assert result.stderr.count("\n") == 1


def test_missing_config(tmp_path: Path) -> None:
    result = run_cli("-c", str(tmp_path / "nope.toml"), "mint", _mint_user())
    assert (result.returncode, result.stderr) == (
        2,
        f"tokenlife-mint: {tmp_path}/nope.toml: no such file\n",
    )


KeyMaker = Callable[[Path], Path]


def _key_mode(mode: int) -> KeyMaker:
    def make(root: Path) -> Path:
        key = root / "k"
        key.write_bytes(secrets.token_bytes(32))
        key.chmod(mode)
        return key

    return make


def _short_key(root: Path) -> Path:
    key = root / "k"
    key.write_bytes(secrets.token_bytes(16))
    key.chmod(0o600)
    return key


def _symlink_key(root: Path) -> Path:
    target = _key_mode(0o600)(root)
    link = root / "link"
    link.symlink_to(target)
    return link


@pytest.mark.parametrize(
    ("make", "line"),
    [
        (
            _key_mode(0o644),
            "key file {k} has mode 0644: it must not be accessible by group or others (chmod 600)",
        ),
        (
            _key_mode(0o640),
            "key file {k} has mode 0640: it must not be accessible by group or others (chmod 600)",
        ),
        (
            _key_mode(0o602),
            "key file {k} has mode 0602: it must not be accessible by group or others (chmod 600)",
        ),
        (_short_key, "HS256 key is 16 bytes; at least 32 are required"),
        (lambda root: root / "missing", "key file {k} does not exist"),
        (_symlink_key, "key file {k}: Too many levels of symbolic links"),
    ],
)
def test_bad_key_files(site: Site, make: KeyMaker, line: str) -> None:
    key = make(site.root)
    site.write_config("", key=key)
    _check(site, ["mint", "--local", _mint_user()], 3, "tokenlife-mint: " + line.format(k=key))


def test_privileged_user_refused(site: Site) -> None:
    require_root()  # as an ordinary user, minting for root fails earlier (not permitted)
    _check(
        site,
        ["mint", "--local", "root"],
        5,
        "tokenlife-mint: refusing to mint for privileged user 'root': such a token can act "
        "as any user over slurmrestd (set producer.allow_privileged_users to allow it)",
    )
    _check(
        site,
        ["mint", "--local", "slurm"],
        5,
        "tokenlife-mint: refusing to mint for privileged user 'slurm': such a token can act "
        "as any user over slurmrestd (set producer.allow_privileged_users to allow it)",
    )


def test_usage_errors(site: Site) -> None:
    result = run_cli("-c", str(site.config), "frobnicate")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("tokenlife-frobnicate: argument COMMAND: invalid choice")
    assert result.stderr.count("\n") == 1


def test_exit_status_table_is_the_documented_one() -> None:
    """docs/commands.md's table, --help and the error classes say the same statuses."""
    import inspect
    import re

    from tests.conftest import REPO
    from tokenlife import errors

    docs = (REPO / "docs" / "commands.md").read_text().split("## Exit status", 1)[1]
    rows = re.findall(r"^\| (\d+) \|\s*([\w, ]*?)\s*\| (.+) \|$", docs, flags=re.M)
    documented = [(int(status), names.strip(), meaning) for status, names, meaning in rows]
    table = [
        (status, ", ".join(c.__name__ for c in classes), meaning)
        for status, classes, meaning in errors.EXIT_STATUS
    ]
    assert documented == table
    for status, classes, _ in errors.EXIT_STATUS:
        assert all(c.exit_code == status for c in classes)
    every_error = {
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.TokenlifeError)
    }
    assert every_error == {c for _, classes, _ in errors.EXIT_STATUS for c in classes}
    help_text = run_cli("--help").stdout
    assert errors.exit_status_line() in " ".join(help_text.split())
