"""The PAM fallback's quick path (tokenlife.app.pamlite) says what the full path would do.

pamlite answers one question with builtin modules only: would the full
fallback (config, Site.for_login, Minter.mint with reuse) change nothing for
this login?  Each of its parts is checked against the code it stands in for
(tomllib, tokenlife.config, parse_duration, validate_name, hmac, jwtlite,
json), and the whole against the real full path: whenever it says True, the
full path leaves every file as it was; every change the full path would make
makes it say False.
"""

from __future__ import annotations

import hmac
import json
import os
import pwd
import secrets
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, require_root, run_cli, write_cli_site
from tokenlife import config as configmod
from tokenlife import jwtlite
from tokenlife.app import pamlite
from tokenlife.app.site import Site
from tokenlife.durations import parse_duration
from tokenlife.errors import ConfigError, UserError
from tokenlife.users import validate_name

FUZZ = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
KEY = secrets.token_bytes(32)
USER = "nobody"  # uid 65534: above pam.min_uid, and no test user is needed


# -- the TOML subset --------------------------------------------------------------------------

bare = st.sampled_from(["key", "path", "a", "b-c", "d_1", "9"]) | st.text("abAB19_-", max_size=4)
scalar = st.one_of(
    st.text(max_size=8).map(lambda s: f'"{s}"'),
    st.text(max_size=8).map(lambda s: f"'{s}'"),
    st.integers().map(str),
    st.floats().map(repr),
    st.text("0123456789+-._eExob", max_size=6),
    st.sampled_from(
        [
            *("true", "false", "True", '"""a"""', "'''a'''", '"a\\tb"', "1_000", "0x1f", "1e5"),
            *("+0", "-0", "01", ".5", "5.", "inf", "nan", "1979-05-27", "07:32:00", "{a = 1}"),
        ]
    ),
)
array = st.lists(scalar, max_size=3).flatmap(
    lambda items: st.sampled_from([", ", ",", " ", ",]"]).map(
        lambda sep: "[" + sep.join(items) + ("]" if not sep.endswith("]") else "")
    )
)
value = scalar | array | st.sampled_from(["", "[[1]]", "[1,\n2]", "[ ]"])
line = st.one_of(
    st.lists(bare, min_size=1, max_size=2).map(lambda p: "[" + ".".join(p) + "]"),
    st.sampled_from(
        ["[[t]]", "[[service]]", "[ key ]", "[key] # c", "[key] x", "[a . b]", "[]", "[a..b]"]
    ),
    st.tuples(
        bare | st.sampled_from(['"q"', "a.b", "a b", ""]),
        st.sampled_from([" = ", "=", " =", "= ", "==", " "]),
        value,
        st.sampled_from(["", " # c", "#c", " x", "  ", "\t# é"]),
    ).map("".join),
    st.text(max_size=12).map(lambda s: f"# {s}"),
    st.sampled_from(["", "  ", "\t", "\r", "a", "=", "é = 1", "\ufeff[key]"]),
)
documents = st.lists(
    st.tuples(st.sampled_from(["", " ", "\t"]), line).map("".join), max_size=12
).map("\n".join)


@FUZZ
@given(documents)
def test_the_subset_reads_what_tomllib_reads(text: str) -> None:
    try:
        got = pamlite.parse_toml(text)
    except pamlite.Unsure:
        return
    assert got == tomllib.loads(text)  # accepted, so valid TOML, read the same way


SUBSET = {
    "": {},
    "# only a comment\n\n": {},
    '[key]\npath = "/k"  # trailing\n': {"key": {"path": "/k"}},
    "[ key ]\n  a = 'lit\"eral'\n": {"key": {"a": 'lit"eral'}},
    "[pam]\nmin_uid = 0\nrequired = true\nx = -0\ny = +1.5\n": {
        "pam": {"min_uid": 0, "required": True, "x": 0, "y": 1.5}
    },
    "[a]\nv = [ \"x\" , 'y', 1, true, ]\nw = []\n": {"a": {"v": ["x", "y", 1, True], "w": []}},
    "[delivery]\nt = 1\n[delivery.ssh]\nport = 22\n": {"delivery": {"t": 1, "ssh": {"port": 22}}},
    'top = "level"\n': {"top": "level"},
    "[a]\nb = 1#c\n": {"a": {"b": 1}},
    '[[service]]\nuser = "a"\n[[ service ]] # c\n[pam]\n': {
        "service": [{"user": "a"}, {}],
        "pam": {},
    },
}
OUTSIDE = [
    '[key]\npath = "/a\\u0041"\n',  # an escape
    "[key]\nowners = [\n  'slurm',\n]\n",  # a multi-line array
    '[key]\npath = """/k"""\n',
    "[a]\nb = {c = 1}\n",
    "a.b = 1\n",
    '"quoted" = 1\n',
    "[a.b]\n[a]\n",  # valid TOML, but a table defined after its sub-table
    "[key]\r\npath = '/k'\r\n",
    "[key]\npath = '/k'\n[key]\n",  # invalid: twice
    "[a]\nb = 1\nb = 2\n",  # invalid: twice
    "[a]\nb = 1_000\n",
    "[a]\nb = 1979-05-27\n",
    "[a]\nb = 01\n",
    '[a]\nb = "x" y\n',
    "[[a]]\n",
    "[[service.x]]\n",
    "[service]\n[[service]]\n",  # invalid: a table, then an array
    "[[service]]\n[service]\n",  # invalid: an array, then a table
    "[[service]]\n[service.x]\n",  # valid TOML, but a sub-table of an element
    "[[service]]]\n",
]


@pytest.mark.parametrize("text", SUBSET, ids=range(len(SUBSET)))
def test_subset_examples(text: str) -> None:
    assert pamlite.parse_toml(text) == tomllib.loads(text) == SUBSET[text]


@pytest.mark.parametrize("text", OUTSIDE, ids=range(len(OUTSIDE)))
def test_outside_the_subset(text: str) -> None:
    with pytest.raises(pamlite.Unsure):
        pamlite.parse_toml(text)


def sample_config() -> str:
    return (REPO / "tokenlife" / "data" / "tokenlife.toml").read_text()


def test_the_sample_configuration_is_in_the_subset() -> None:
    doc = pamlite.parse_toml(sample_config())
    assert doc == tomllib.loads(sample_config())
    read = pamlite.Settings(doc)
    assert_same_settings(read, configmod.parse(doc))


# -- the settings -----------------------------------------------------------------------------


def assert_same_settings(read: pamlite.Settings, config: configmod.Config) -> None:
    assert Path(read.key_path) == config.key.path
    assert read.owners == config.key.owners
    assert read.renew_before == config.token.renew_before
    assert read.renew_fraction == config.token.renew_fraction
    assert read.slurm_user == config.producer.slurm_user
    assert read.min_uid == config.pam.min_uid
    assert Path(read.spool_dir) == config.store.spool_dir
    assert Path(read.token_dir) == config.login.token_dir


def test_the_defaults_are_tokenlife_configs() -> None:
    assert_same_settings(pamlite.Settings({}), configmod.Config())
    assert str(configmod.DEFAULT_PATH) == pamlite.DEFAULT_CONFIG
    assert pamlite.ENV_VAR == configmod.ENV_VAR


#: keys of the login's tables that pamlite does not read: a configuration with
#: any of them goes down the full path (they are for other key sources)
FULL_PATH_ONLY = {
    "key": {"kid", "secret_id", "version_id", "version_stage", "region", "endpoint_url"},
}


def test_every_key_of_the_login_tables_is_read_or_sends_the_login_down_the_full_path() -> None:
    """A new setting in one of these tables must be looked at here: it may change a login."""
    defaults = configmod.Config()
    for table, keys in pamlite.READ_KEYS.items():
        known = {f.name for f in fields(getattr(defaults, table)) if f.name != "options"}
        assert keys | FULL_PATH_ONLY.get(table, set()) == known, table
    tables = {f.name for f in fields(defaults) if f.name != "path"}
    assert set(pamlite.READ_KEYS) | pamlite.NOT_READ == tables


durations = st.sampled_from(["1h", "2d", "90", " 5m", "5 m", "0", "367d", "١٢h", "1e9", "h"])
durations |= st.integers(-5, 40_000_000) | st.text("0123456789smhdw ", max_size=11)
paths = st.sampled_from(["/k", "/a/b/", "//x", "k", "", "/a/../b", "/a/..", "/x\ty", "/é"])
names = st.sampled_from(["slurm", "root", "a.b-c_d", "-x", ".x", "a" * 32, "a" * 33, "ro ot", ""])
values = st.one_of(
    durations,
    paths,
    names,
    st.booleans(),
    st.floats(-1, 2),
    st.lists(names, max_size=3),
    st.sampled_from(["file", "aws", "env", "HS256", "RS256", "slurm_jwt", "other"]),
    st.sampled_from([["login_files"], ["other"], [], "login_files"]),
    st.sampled_from(["sqlite:////db", "sqlite:///rel", "sqlite:///:memory:", "sqlite+x:////d"]),
    st.sampled_from(["postgresql://h/db", "postgresql+psycopg://h", "postgresql+p-g://h"]),
    st.sampled_from(["mysql://h", 2**31, 2**31 + 1, -1, {"sub": 1}]),
)
good_durations = st.sampled_from(["1h", "2d", "90", " 5m", "7d", "1w"]) | st.integers(1, 10**6)
good_paths = st.sampled_from(["/k", "/a/b/", "//x", "/é", "/run/tokenlife"])
good_names = st.sampled_from(["slurm", "root", "a.b-c_d", "a" * 32, "_x"])
#: per key, mostly values tokenlife.config accepts (one draw in ten is any of ``values``)
TYPICAL = {
    "source": st.just("file"),
    "algorithm": st.just("HS256"),
    "path": good_paths,
    "owners": st.lists(good_names, max_size=2),
    "cache_path": good_paths,
    "refresh": good_durations,
    "lifetime": good_durations,
    "renew_until": good_durations,
    "renew_before": good_durations,
    "renew_fraction": st.floats(0, 1),
    "kind": st.just("slurm_jwt"),
    "sinks": st.sampled_from([["login_files"], []]),
    "slurm_user": good_names,
    "allow_privileged_users": st.booleans(),
    "admins": st.lists(good_names, max_size=2),
    "socket": good_paths,
    "required": st.booleans(),
    "min_uid": st.integers(0, 2**31),
    "url": st.sampled_from(["sqlite:////db", "sqlite:///:memory:", "postgresql+psycopg://h"]),
    "spool_dir": good_paths,
    "purge_after": good_durations,
    "token_dir": good_paths,
}


def one_in_ten(
    usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    return st.tuples(st.integers(0, 9), usual, rare).map(lambda t: t[2] if t[0] == 0 else t[1])


def login_table(table: str, keys: frozenset[str]) -> st.SearchStrategy[dict[str, Any]]:
    plain = st.fixed_dictionaries({}, optional={k: one_in_ten(TYPICAL[k], values) for k in keys})
    odd_keys = sorted(FULL_PATH_ONLY.get(table, set()) | {"other"})
    odd = st.tuples(plain, st.sampled_from(odd_keys), values).map(lambda t: {**t[0], t[1]: t[2]})
    return one_in_ten(plain, odd)


login_tables = st.fixed_dictionaries(
    {}, optional={table: login_table(table, keys) for table, keys in pamlite.READ_KEYS.items()}
)


@FUZZ
@given(login_tables)
def test_settings_accept_only_what_tokenlife_config_accepts(doc: dict[str, Any]) -> None:
    try:
        read = pamlite.Settings(doc)
    except pamlite.Unsure:
        return
    assert_same_settings(read, configmod.parse(doc))  # no ConfigError either


def test_the_daemons_tables_are_not_read() -> None:
    """The documented difference: a login does not check what only the daemons use."""
    doc = {"delivery": {"transport": "nowhere"}, "serve": {"interval": "never"}}
    with pytest.raises(ConfigError):
        configmod.parse(doc)
    pamlite.Settings(doc)


@FUZZ
@given(durations)
def test_durations_as_parse_duration(text: str | int) -> None:
    try:
        expected: int | None = parse_duration(text)
    except ValueError:
        expected = None
    try:
        got: int | None = pamlite.duration(text)
    except pamlite.Unsure:
        got = None
    assert got == expected


@FUZZ
@given(names | st.text(max_size=34))
def test_names_as_validate_name(name: str) -> None:
    try:
        expected = validate_name(name)
    except UserError:
        expected = None
    try:
        got: str | None = pamlite.check_name(name)
    except pamlite.Unsure:
        got = None
    assert got == expected


# -- HMAC, base64url, JSON --------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200), st.binary(max_size=300))
def test_hmac_sha256_as_hmac(key: bytes, message: bytes) -> None:
    expected = hmac.new(key, message, "sha256").digest()
    assert pamlite.hmac_sha256(key, message) == expected
    assert pamlite.b64url(expected) == jwtlite.b64url(expected)


json_texts = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
).map(json.dumps) | st.text(' \t\n{}[]":,0123456789.eE-truefalsn\\u', max_size=20)


@FUZZ
@given(json_texts)
def test_json_value_as_json_loads(text: str) -> None:
    try:
        expected = json.loads(text)
    except ValueError:
        expected = ValueError
    try:
        got = pamlite.json_value(text)
    except Exception:
        got = ValueError
    assert got == expected


# -- the login, against the full path ---------------------------------------------------------


class LoginSite:
    """A key, a config keeping all state under ``root``, and the login's files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = root / "k"
        self.config = write_cli_site(root, KEY)
        self.base = self.config.read_text()
        self.user = pwd.getpwnam(USER)
        self.spool = root / "spool" / f"{USER}.json"
        self.user_dir = root / "run" / str(self.user.pw_uid)
        self.login_file = self.user_dir / "slurm_jwt"

    def configure(self, extra: str) -> None:
        self.config.write_text(self.base + extra)

    def full_path(self) -> bool:
        """What ``tokenlife pam`` does without pamlite; True if it minted."""
        config = configmod.load(self.config)
        _, minted = Site.for_login(config).minter.mint(USER, 0, reuse=True, actor="pam")
        return minted

    def in_place(self, user: str = USER) -> bool:
        return pamlite.in_place(user, str(self.config))

    def snapshot(self) -> dict[str, tuple[bytes, int, int, int, int]]:
        """Every file and directory of the site, with contents, mode, owner, mtime."""
        found = {}
        for path in sorted(self.root.rglob("*")):
            st = path.lstat()
            data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
            found[str(path)] = (data, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
        return found

    def record(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.spool.read_bytes())
        return data

    def rewrite_record(self, **changes: Any) -> None:
        self.spool.write_text(json.dumps({**self.record(), **changes}))


@pytest.fixture
def site(tmp_path: Path) -> LoginSite:
    require_root()
    return LoginSite(tmp_path)


def test_a_good_token_in_place_is_left_as_it_is(site: LoginSite) -> None:
    assert site.full_path() is True
    assert site.in_place() is True
    before = site.snapshot()
    assert site.full_path() is False  # the full path reuses it ...
    assert site.snapshot() == before  # ... and changes nothing


def _other_token(site: LoginSite) -> None:
    token = site.record()["token"]
    site.login_file.write_text(token[:-2] + ("AA" if token[-2:] != "AA" else "BB"))


def _symlink(site: LoginSite) -> None:
    copy = site.root / "copy"
    copy.write_bytes(site.login_file.read_bytes())
    os.chown(copy, site.user.pw_uid, site.user.pw_gid)
    copy.chmod(0o600)
    site.login_file.unlink()
    site.login_file.symlink_to(copy)


def _tampered(site: LoginSite) -> None:
    token = site.record()["token"]
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    site.rewrite_record(token=forged)
    site.login_file.write_text(forged)


#: what the full path would change (or refuse), and so pamlite must not call in place
CHANGES: dict[str, Callable[[LoginSite], object]] = {
    "login file missing": lambda s: s.login_file.unlink(),
    "login file mode": lambda s: s.login_file.chmod(0o644),
    "login file owner": lambda s: os.chown(s.login_file, 0, 0),
    "login file content": _other_token,
    "login file a symlink": _symlink,
    "user directory mode": lambda s: s.user_dir.chmod(0o755),
    "user directory owner": lambda s: os.chown(s.user_dir, 0, 0),
    "token directory missing": lambda s: os.rename(s.root / "run", s.root / "run.old"),
    "no spool record": lambda s: s.spool.unlink(),
    "spool record unreadable": lambda s: s.spool.write_text("{"),
    "record revoked": lambda s: s.rewrite_record(state="revoked"),
    "record of another uid": lambda s: s.rewrite_record(uid=s.user.pw_uid + 1),
    "record without gid": lambda s: s.rewrite_record(gid=None),
    "token in its renewal window": lambda s: s.configure('[token]\nrenew_before = "2d"\n'),
    "past renew-until": lambda s: s.rewrite_record(renew_until=1),
    "a new key": lambda s: s.key.write_bytes(secrets.token_bytes(32)),
    "token tampered": _tampered,
    "key readable by the group": lambda s: s.key.chmod(0o640),
    "key too short": lambda s: s.key.write_bytes(KEY[:31]),
    "RS256": lambda s: s.configure('[key]\nalgorithm = "RS256"\n'),
    "aws key source": lambda s: s.configure('[key]\nsource = "aws"\nsecret_id = "x"\n'),
    "an unknown key": lambda s: s.configure("[pam]\nrequird = true\n"),
    "outside the TOML subset": lambda s: s.configure("[pam]\nmin_uid = 1_000\n"),
    "config missing": lambda s: s.config.unlink(),
    "owner not in the user database": lambda s: s.configure('[key]\nowners = ["tl-none"]\n'),
}


def test_service_entries_keep_the_quick_path(site: LoginSite) -> None:
    """[[service]] entries are the daemons', like [delivery]: a login is decided (and
    they are checked: not at all) as without them."""
    site.configure(
        '[[service]]\nuser = "bin"\nhosts = ["web01"]\npath = "/etc/svc/jwt"\n'
        '[[service]]\nuser = "daemon"\nhosts = ["web01"]\npath = "/etc/svc/other"\n'
    )
    assert len(configmod.load(site.config).services) == 2
    assert site.full_path() is True
    assert site.in_place() is True
    before = site.snapshot()
    assert site.full_path() is False and site.snapshot() == before


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_anything_to_do_or_to_refuse_goes_down_the_full_path(
    site: LoginSite, change: Callable[[LoginSite], object]
) -> None:
    assert site.full_path() is True
    change(site)
    assert site.in_place() is False
    # Where the full path repairs or mints, pamlite agrees afterwards, and then
    # the full path changes nothing more: True always means "nothing to do".
    try:
        site.full_path()
    except Exception:
        return  # the full path refuses: the login goes on without a token, as ever
    if site.in_place():
        before = site.snapshot()
        assert site.full_path() is False
        assert site.snapshot() == before


def test_below_min_uid_nothing_is_done_by_either_path(site: LoginSite) -> None:
    site.configure(f"[pam]\nmin_uid = {site.user.pw_uid + 1}\n")
    before = site.snapshot()
    assert site.in_place() is True
    assert site.snapshot() == before


@pytest.mark.parametrize("user", ["root", "tl-no-such-user", "-x", ""])
def test_privileged_unknown_and_invalid_users_take_the_full_path(
    site: LoginSite, user: str
) -> None:
    site.configure("[pam]\nmin_uid = 0\n")
    assert site.in_place(user) is False


def test_only_root_takes_the_quick_path(site: LoginSite, monkeypatch: pytest.MonkeyPatch) -> None:
    assert site.full_path() is True
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert site.in_place() is False


# -- through the command --------------------------------------------------------------------

DRIVER = """
import sys
from tokenlife.app.cli import main
rc = main({argv!r})
print(repr((rc, "tokenlife.config" in sys.modules)), file=sys.stderr)
"""


def test_the_fallback_takes_the_quick_path_when_the_token_is_in_place(tmp_path: Path) -> None:
    require_root()
    site = LoginSite(tmp_path)
    env = {"PATH": os.environ["PATH"], "PAM_TYPE": "open_session", "PAM_USER": USER}
    argv = ["-c", str(site.config), "pam", "--socket", str(tmp_path / "none.sock")]
    first = run_cli(*argv, env=env)
    assert first.returncode == 0, first.stderr
    before = site.snapshot()

    proc = subprocess.run(
        [sys.executable, "-c", DRIVER.format(argv=argv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.stderr.strip() == repr((0, False)), proc.stderr  # no configuration loaded
    assert site.snapshot() == before


def test_the_console_script_ends_with_pams_status_and_flushes_its_output(
    tmp_path: Path,
) -> None:
    """``tokenlife pam`` ends with os._exit: its status and its output still arrive."""
    cfg = tmp_path / "tokenlife.toml"
    cfg.write_text(
        f'[key]\npath = "{tmp_path}/missing.key"\n[pam]\nrequired = true\n'
        f'[store]\nspool_dir = "{tmp_path}/spool"\n[login]\ntoken_dir = "{tmp_path}/run"\n'
    )
    env = {"PAM_TYPE": "open_session", "PAM_USER": USER}

    failed = run_cli("-c", str(cfg), "pam", "--socket", str(tmp_path / "none.sock"), env=env)
    helped = run_cli("pam", "--help")

    assert failed.returncode == 1
    assert failed.stderr.startswith(f"tokenlife-pam: {USER}: ")
    assert len(failed.stderr.splitlines()) == 1
    assert (helped.returncode, helped.stdout.startswith("usage: tokenlife")) == (0, True)
