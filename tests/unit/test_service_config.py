"""``[[service]]`` entries: what loads, what is refused (one line, exit status 2), and
the checks that need the user database (``tokenlife config check``)."""

from __future__ import annotations

import dataclasses
import os
import pwd
import secrets
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repository.services import check_services
from tests.conftest import run_cli, write_cli_site
from tokenlife import config as configmod
from tokenlife.config import ServiceConfig
from tokenlife.errors import ConfigError

ME = pwd.getpwuid(os.geteuid()).pw_name
#: an unprivileged account that exists here (the tests also run as root)
USER = "nobody" if os.geteuid() == 0 else ME


def load(tmp_path: Path, text: str, token: str = "") -> configmod.Config:
    path = tmp_path / "c.toml"
    path.write_text(token + text)
    return configmod.load(path)


def entry(**keys: object) -> str:
    """A [[service]] table: user, hosts and path, then ``keys`` (None drops a key)."""
    values: dict[str, object] = {"user": USER, "hosts": ["web01"], "path": "/etc/svc/jwt"}
    values.update(keys)
    lines = ["[[service]]"]
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def test_no_entry_no_service(tmp_path: Path) -> None:
    assert load(tmp_path, "").services == ()


def test_a_minimal_entry_takes_the_defaults(tmp_path: Path) -> None:
    (service,) = load(tmp_path, entry()).services
    token = configmod.TokenConfig()
    assert service == ServiceConfig(
        user=USER,
        hosts=("web01",),
        path="/etc/svc/jwt",
        lifetime=token.lifetime,
        renew_until=token.renew_until,
        owner=USER,
        group=None,
        mode=0o600,
        allow_privileged=False,
    )
    assert service.name == f"service {USER}"


def test_a_full_entry(tmp_path: Path) -> None:
    text = entry(
        hosts=["web01", "web02", "web01"],
        path="/etc/slurm-web/jwt.token",
        lifetime="1h",
        renew_until="1d",
        owner="daemon",
        group="adm",
        mode="640",
    ) + entry(user="bin", path="/etc/other/jwt", mode="0400")
    first, second = load(tmp_path, text).services
    assert first.hosts == ("web01", "web02")  # a host named twice gets one file
    assert (first.lifetime, first.renew_until) == (3600, 86400)
    assert (first.owner, first.group, first.mode) == ("daemon", "adm", 0o640)
    assert (second.user, second.mode) == ("bin", 0o400)


BAD = [
    ({"user": None}, "service[1].user: required"),
    ({"hosts": None}, "service[1].hosts: required"),
    ({"path": None}, "service[1].path: required"),
    ({"user": "-x"}, "service[1].user: '-x' is not a valid user name"),
    ({"user": 7}, "service[1].user: expected a non-empty string"),
    ({"hosts": []}, "service[1].hosts: expected at least one host"),
    ({"hosts": "web01"}, "service[1].hosts: expected a list of node names"),
    ({"hosts": ["web01", "-bad"]}, "service[1].hosts: '-bad' is not a valid node name"),
    ({"hosts": ["a b"]}, "service[1].hosts: 'a b' is not a valid node name"),
    ({"path": "etc/jwt"}, "service[1].path: expected an absolute path"),
    ({"path": "/etc/../root/jwt"}, "service[1].path: '..' is not allowed in paths"),
    ({"path": "/etc/svc/.."}, "service[1].path: '..' is not allowed in paths"),
    ({"path": "/etc//jwt"}, "service[1].path: expected a normalized path"),
    ({"path": "/etc/./jwt"}, "service[1].path: expected a normalized path"),
    ({"path": "/etc/svc/"}, "service[1].path: expected a normalized path"),
    ({"path": "/jwt"}, "service[1].path: expected a file in a directory below /"),
    ({"path": "/etc/svc/j wt"}, "service[1].path: only letters, digits"),
    ({"path": "/etc/svc/j\\nwt"}, "service[1].path: control characters are not allowed"),
    ({"lifetime": "3d"}, "service[1].lifetime: 259200s is longer than token.lifetime (172800s)"),
    ({"renew_until": "8d"}, "service[1].renew_until: 691200s is longer than token.renew_until"),
    ({"lifetime": "1d", "renew_until": "1h"}, "service[1].renew_until: must not be shorter"),
    ({"lifetime": "soon"}, "service[1].lifetime: 'soon' is not a duration"),
    ({"owner": "a:b"}, "service[1].owner: 'a:b' is not a valid user name"),
    ({"group": "a/b"}, "service[1].group: 'a/b' is not a valid group name"),
    ({"mode": 600}, 'service[1].mode: expected an octal mode in quotes, such as "0600"'),
    ({"mode": "0o600"}, "service[1].mode: expected an octal mode in quotes"),
    ({"mode": "4600"}, "service[1].mode: expected an octal mode in quotes"),
    ({"mode": "0604"}, "service[1].mode: 0604: others must have no access (no o+rwx bits)"),
    ({"mode": "0601"}, "service[1].mode: 0601: others must have no access"),
    ({"mode": "0602"}, "service[1].mode: 0602: others must have no access"),
    ({"mode": "0660"}, "service[1].mode: 0660: no execute bits, and the group may only read"),
    ({"mode": "0700"}, "service[1].mode: 0700: no execute bits"),
    ({"mode": "0200"}, "service[1].mode: 0200: the owner must be able to read the file"),
    ({"allow_privileged": "yes"}, "service[1].allow_privileged: expected true or false"),
    ({"colour": "blue"}, "service[1].colour: unknown key"),
    ({"user": "root"}, "service[1].user: 'root' is privileged"),
    ({"user": "slurm"}, "service[1].user: 'slurm' is privileged"),
]


@pytest.mark.parametrize(("keys", "message"), BAD, ids=[m.split(": ", 1)[1] for _, m in BAD])
def test_each_bad_field_is_one_line(tmp_path: Path, keys: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, entry(**keys))
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'c.toml'}: {message}"), text
    assert "\n" not in text


def test_the_second_entry_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"service\[2\]\.mode: "):
        load(tmp_path, entry() + entry(user="bin", mode="0666"))


def test_one_entry_per_user_and_one_per_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"service\[2\]\.user: '{USER}' already has"):
        load(tmp_path, entry() + entry(path="/etc/other/jwt"))
    with pytest.raises(ConfigError, match=r"service\[2\]\.path: service\[1\] delivers to the same"):
        load(tmp_path, entry(hosts=["a", "b"]) + entry(user="bin", hosts=["b"]))
    # The same path on other hosts is another file.
    assert len(load(tmp_path, entry(hosts=["a"]) + entry(user="bin", hosts=["b"])).services) == 2


def test_service_must_be_an_array_of_tables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"service: expected \[\[service\]\] entries"):
        load(tmp_path, f'[service]\nuser = "{USER}"\n')


def test_limits_follow_the_token_table(tmp_path: Path) -> None:
    token = '[token]\nlifetime = "10m"\nrenew_until = "1h"\n'
    (service,) = load(tmp_path, entry(), token).services
    assert (service.lifetime, service.renew_until) == (600, 3600)
    with pytest.raises(ConfigError, match=r"service\[1\]\.lifetime: 1200s is longer than"):
        load(tmp_path, entry(lifetime="20m"), token)


def test_privileged_names_are_allowed_on_request(tmp_path: Path) -> None:
    (service,) = load(tmp_path, entry(user="root", allow_privileged=True)).services
    assert service.allow_privileged and service.owner == "root"
    slurm_user = '[producer]\nslurm_user = "bin"\n'
    with pytest.raises(ConfigError, match=r"service\[1\]\.user: 'bin' is privileged"):
        load(tmp_path, entry(user="bin"), slurm_user)


# -- the user database: config check --------------------------------------------------------


def test_check_looks_the_names_up(tmp_path: Path) -> None:
    assert check_services(load(tmp_path, entry())) == []
    for keys, message in (
        ({"user": "tl-no-such-user"}, "service[1].user: unknown user 'tl-no-such-user'"),
        ({"owner": "tl-no-such-user"}, "service[1].owner: unknown user 'tl-no-such-user'"),
        ({"group": "tl-no-such-group"}, "service[1].group: unknown group 'tl-no-such-group'"),
    ):
        with pytest.raises(ConfigError) as info:
            check_services(load(tmp_path, entry(**keys)))
        assert str(info.value) == f"{tmp_path / 'c.toml'}: {message}"


def test_check_refuses_privileged_uids_by_number(tmp_path: Path) -> None:
    # SlurmUser named by [producer] is refused by name at load; a second
    # name for uid 0 or for SlurmUser's uid only by the lookup.
    slurm_user = f'[producer]\nslurm_user = "{USER}"\n'
    config = load(tmp_path, entry(user=USER, allow_privileged=True), slurm_user)
    (warning,) = check_services(config)
    uid = pwd.getpwnam(USER).pw_uid
    assert warning == (
        f"service {USER}: allow_privileged = true: uid {uid} gets a token that can act as "
        "any user over slurmrestd"
    )
    alias = next((p.pw_name for p in pwd.getpwall() if p.pw_uid == 0 and p.pw_name != "root"), "")
    if alias:  # an alias of root, as useradd -o makes (rare on test hosts)
        with pytest.raises(ConfigError, match="is privileged"):
            check_services(load(tmp_path, entry(user=alias)))


def test_check_warns_when_the_margin_is_shorter_than_a_tick(tmp_path: Path) -> None:
    token = '[token]\nlifetime = "60"\nrenew_until = "600"\nrenew_before = "10"\n'
    (warning,) = check_services(load(tmp_path, entry() + '[serve]\ninterval = "1m"\n', token))
    assert warning == (
        f"service {USER}: its token is renewed or replaced 15s before it expires, less than "
        "serve.interval (60s): it may expire between ticks"
    )


def test_config_check_cli(tmp_path: Path) -> None:
    key = secrets.token_bytes(32)
    cfg = write_cli_site(tmp_path, key, entry())
    result = run_cli("-c", str(cfg), "config", "check")
    assert result.returncode == 0, result.stderr
    assert f"services: ['{USER}: web01:/etc/svc/jwt']" in result.stdout
    assert "warning:" not in result.stdout

    cfg = write_cli_site(tmp_path, key, entry(user="root"))
    result = run_cli("-c", str(cfg), "config", "check")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"tokenlife-config: {cfg}: service[1].user: 'root' is privileged (its token can act as "
        "any user over slurmrestd); set allow_privileged = true to allow it"
    ]

    cfg = write_cli_site(tmp_path, key, entry(user="root", allow_privileged=True))
    result = run_cli("-c", str(cfg), "config", "check")
    assert result.returncode == 0, result.stderr
    assert (
        "warning: service root: allow_privileged = true: uid 0 gets a token that can act as "
        "any user over slurmrestd"
    ) in result.stdout.splitlines()

    cfg = write_cli_site(tmp_path, key, entry(user="tl-no-such-user"))
    result = run_cli("-c", str(cfg), "config", "check")
    assert result.returncode == 2
    assert f"{cfg}: service[1].user: unknown user 'tl-no-such-user'" in result.stderr


# -- anything at all: a ConfigError of one line, or entries that hold what was asked ------

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**9),
    st.text(max_size=12),
    st.sampled_from(["root", "nobody", "-x", "1h", "2d", "0640", "0604", "640", "/a/b", "/a/../b"]),
    st.lists(st.sampled_from(["web01", "a b", "", "-x", "n1"]) | st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_keys = st.sampled_from([f.name for f in dataclasses.fields(ServiceConfig)])
_entries = st.lists(st.dictionaries(_keys | st.text(max_size=6), _values, max_size=9), max_size=3)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(st.one_of(_entries, _values))
def test_any_service_value_is_one_line_or_valid(entries: object) -> None:
    try:
        config = configmod.parse({"service": entries}, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: service") and "\n" not in str(exc)
        return
    for service in config.services:
        assert service.hosts and service.path.startswith("/") and "/../" not in service.path
        assert service.mode & 0o137 == 0 and service.mode & 0o400
        assert service.lifetime <= service.renew_until <= config.token.renew_until
        assert service.user != "root" or service.allow_privileged
