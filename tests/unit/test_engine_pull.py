"""The engine's pull fallback without munge: its settings, its decisions, what
a task is told, ``tokenlife-engine pull``'s errors and the shipped Prolog.

client_engine.pull.pull (the network and munge part) is replaced by a fake
that counts calls; tests/integration/test_engine_pull.py runs the same paths
against a real munged and a real pull service.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import client_engine.pull as client
from client_engine import cli, fallback, supervisor
from client_engine.tokens import Refused, Token, parse
from tests.conftest import REPO, run_engine
from tokenlife import engine_settings
from tokenlife.engine_settings import EngineSettings

ME = os.getuid()
MY_NAME = pwd.getpwuid(ME).pw_name


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(sun: str = MY_NAME, ttl: int = 3600, age: int = 0) -> str:
    now = int(time.time())
    claims = {"iat": now - age, "exp": now + ttl, "sun": sun}
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}.{b64(os.urandom(32))}"


# -- [engine] pull settings ---------------------------------------------------------------


def test_pull_settings_default_to_never_pulling() -> None:
    settings = EngineSettings()
    assert (settings.pull, settings.pull_timeout) == ("", 5.0)
    assert (settings.pull_server_user, settings.munge_socket) == ("tokenlife", "")
    assert engine_settings.parse({}) == settings
    assert not fallback.due(None, settings, time.time())  # no service: never due


def test_pull_settings_are_read() -> None:
    settings = engine_settings.parse(
        {
            "pull": " th1:6821 , [::1]:6821",
            "pull_timeout": 0.5,
            "pull_server_user": "1234",
            "munge_socket": "/run/munge//munge.socket.2",
        }
    )
    assert settings.pull == "th1:6821,[::1]:6821"
    assert settings.pull_timeout == 0.5 and settings.pull_server_user == "1234"
    assert settings.munge_socket == "/run/munge/munge.socket.2"
    assert engine_settings.parse({"pull_timeout": 60}).pull_timeout == 60.0


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("pull", "tokenhost", "'tokenhost' is not HOST:PORT"),
        ("pull", "::1:6821", "write an IPv6 address as [ADDRESS]:PORT"),
        ("pull", "th:0", "port out of range"),
        ("pull", "th:65536", "port out of range"),
        ("pull", "th:6821,", "an empty address in the list"),
        ("pull", "t h:6821", "not a host name or address"),
        ("pull", "th\n:6821", "not a host name or address"),
        ("pull", 6821, 'expected HOST:PORT[,HOST:PORT...] or ""'),
        ("pull_timeout", 0, "expected more than 0 and at most 60 seconds"),
        ("pull_timeout", 61, "expected more than 0 and at most 60 seconds"),
        ("pull_timeout", float("nan"), "expected more than 0 and at most 60 seconds"),
        ("pull_timeout", "5", "expected a number of seconds"),
        ("pull_timeout", True, "expected a number of seconds"),
        ("pull_server_user", "-rf", "'-rf' is not a user name"),
        ("pull_server_user", "a b", "'a b' is not a user name"),
        ("pull_server_user", "4294967295", "'4294967295' is not a uid"),
        ("pull_server_user", 0, 'expected a user name, a uid, or ""'),
        ("munge_socket", "munge.socket", "expected an absolute path"),
    ],
)
def test_bad_pull_settings_are_one_clear_line(key: str, value: object, says: str) -> None:
    with pytest.raises(ValueError) as err:
        engine_settings.parse({key: value})
    message = str(err.value)
    assert message.startswith(f"engine.{key}: ") and says in message
    assert "\n" not in message


def test_a_bad_pull_setting_is_exit_2_for_token_and_a_print_line_for_env(
    tmp_path: Path,
) -> None:
    config = tmp_path / "tokenlife.toml"
    config.write_text(f'[engine]\ntoken_dir = "{tmp_path}"\npull = "tokenhost"\n')
    done = run_engine(config, "token")
    assert done.returncode == 2
    assert done.stderr == (
        f"tokenlife-engine: {config}: engine.pull: 'tokenhost' is not HOST:PORT\n"
    )
    done = run_engine(config, "env")
    assert done.returncode == 0
    assert done.stdout.startswith(
        f"print tokenlife-engine: {config}: engine.pull: 'tokenhost' is not HOST:PORT; "
        "using the defaults\n"
    )


def test_the_service_account_is_a_name_a_uid_or_unchecked() -> None:
    def uid_of(name: str) -> int | None:
        return fallback.server_uid(EngineSettings(pull_server_user=name))

    assert uid_of("") is None
    assert uid_of("0") == 0 and uid_of("root") == 0
    with pytest.raises(Refused, match="no user 'tl-nobody-here' on this node"):
        uid_of("tl-nobody-here")


# -- when a pull is due ---------------------------------------------------------------------


def token(ttl: int, age: int) -> Token:
    return parse(make_token(ttl=ttl, age=age), "test")


def test_windows_and_due() -> None:
    settings = EngineSettings(pull="th:1")  # advisory 900 s, mandatory 600 s
    now = time.time()
    fresh, advisory, mandatory = token(3000, 600), token(800, 2800), token(500, 3100)
    assert not fallback.due(fresh, settings, now)
    assert not fallback.due(advisory, settings, now)
    assert fallback.due(advisory, settings, now, advisory=True)
    assert fallback.due(mandatory, settings, now) and fallback.due(None, settings, now)
    # a short token: the windows are at most half and a fifth of its life
    short = token(10, 10)
    assert fallback.windows(short, settings) == (short.exp - 10, short.exp - 4)


# -- the fallback in process, with a fake service ------------------------------------------------


class FakePull:
    def __init__(self, token: str | None = None, error: client.PullError | None = None) -> None:
        self.token, self.error, self.calls = token, error, 0

    def __call__(self, address: str, sock: str | None, timeout: float, **kw: Any) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        assert self.token is not None
        return self.token


class Site:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, pull: str = "th:6821") -> None:
        self.token_dir = root / "run"
        self.user_dir = self.token_dir / str(ME)
        self.user_dir.mkdir(parents=True, mode=0o700)
        self.file = self.user_dir / "slurm_jwt"
        config = root / "tokenlife.toml"
        config.write_text(
            f'[engine]\ntoken_dir = "{self.token_dir}"\npull = "{pull}"\n'
            'pull_server_user = ""\nwrapper_dir = ""\n'
        )
        monkeypatch.setenv("TOKENLIFE_CONFIG", str(config))
        self.env = {"SLURM_JOB_UID": str(ME), "SLURM_JOB_USER": MY_NAME, "SLURM_STEP_ID": "0"}

    def deliver(self, text: str) -> str:
        self.file.write_text(text)
        self.file.chmod(0o600)
        return text


def test_env_exports_a_token_in_its_window_and_says_why_no_newer_one_came(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(tmp_path, monkeypatch)
    kept = site.deliver(make_token(ttl=300, age=3300))
    fake = FakePull(error=client.PullError("unreachable", "pull from th:6821: Connection refused"))
    monkeypatch.setattr(client, "pull", fake)
    lines = cli.env_lines(site.env, time.time())
    assert lines[:2] == [f"export SLURM_JWT_FILE={site.file}", f"export SLURM_JWT={kept}"]
    assert len(lines) == 3 and lines[2].startswith(
        "print tokenlife-engine: pull from th:6821: Connection refused; this token expires in "
    )
    assert fake.calls == 1 and site.file.read_text() == kept


def test_env_without_a_service_never_pulls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = Site(tmp_path, monkeypatch, pull="")
    fake = FakePull(make_token())
    monkeypatch.setattr(client, "pull", fake)
    lines = cli.env_lines(site.env, time.time())
    why = f"{site.file}: no token delivered to this node"
    assert lines == [f"print tokenlife-engine: no token for this job: {why}"]
    assert fake.calls == 0


def test_what_a_server_says_cannot_break_a_taskprolog_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(tmp_path, monkeypatch)
    hostile = client.PullError("x", "pull from th:6821: bad\rexport SLURM_JWT=forged")
    monkeypatch.setattr(client, "pull", FakePull(error=hostile))
    lines = cli.env_lines(site.env, time.time())
    assert len(lines) == 1 and lines[0].startswith("print tokenlife-engine: no token for this job")
    assert "bad?export SLURM_JWT=forged" in lines[0]


def test_a_failing_write_never_costs_the_task_the_token_it_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from tokenlife import fsutil

    site = Site(tmp_path, monkeypatch)
    kept = site.deliver(make_token(ttl=300, age=3300))
    monkeypatch.setattr(client, "pull", FakePull(make_token()))

    def full(path: Path, data: bytes, **kw: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(fsutil, "write_secret", full)
    lines = cli.env_lines(site.env, time.time())
    assert lines[1] == f"export SLURM_JWT={kept}"
    assert lines[2].startswith(
        f"print tokenlife-engine: {site.file}: No space left on device; this token expires in "
    )


def test_fetch_into_says_why_a_kept_token_was_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(tmp_path, monkeypatch)
    in_window = site.deliver(make_token(ttl=300, age=3300))
    fake = FakePull(error=client.PullError("busy", "pull from th:6821: busy; try again"))
    monkeypatch.setattr(client, "pull", fake)

    def fetch() -> tuple[Token, client.PullError | None]:
        return client.fetch_into(str(site.token_dir), ME, MY_NAME, "th:6821", min_remaining=600)

    kept, failed = fetch()
    assert kept.value == in_window
    assert failed is not None and (failed.result, str(failed)) == (
        "busy",
        "pull from th:6821: busy; try again",
    )
    _, failed = fetch()  # within 30 s: the last pull's word, no new request
    assert fake.calls == 1 and failed is not None and failed.result == "busy"
    assert re.search(r"the pull \d+s ago said busy; next try in \d+s", str(failed))
    fake.error, fake.token = None, site.file.read_text()  # the service has nothing newer
    kept, failed = client.fetch_into(
        str(site.token_dir), ME, MY_NAME, "th:6821", min_remaining=600, min_interval=0
    )
    assert failed is None and fake.calls == 2 and kept.value == in_window
    _, failed = fetch()
    assert failed is None and fake.calls == 2  # "ok" 0 s ago: nothing to report, no request


# -- tokenlife-engine pull: its errors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "status", "says"),
    [
        (["pull", "--user"], {}, 2, "pull: --user needs a USER"),
        (["pull", "--user", "a", "--user", "b"], {}, 2, "pull: unexpected '--user'"),
        (["pull", "bob"], {}, 2, "pull: unexpected 'bob'"),
        (["pull", "--user", "tl-nobody-here"], {}, 1, "no user 'tl-nobody-here'"),
    ],
)
def test_pull_command_errors_are_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], status: int, says: str
) -> None:
    config = tmp_path / "tokenlife.toml"
    config.write_text(f'[engine]\ntoken_dir = "{tmp_path}/run"\npull = "127.0.0.1:9"\n')
    done = run_engine(config, *args, env=env)
    assert done.returncode == status and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("tokenlife-engine: ") and says in done.stderr


def test_pull_command_needs_a_service_and_root_needs_a_user(tmp_path: Path) -> None:
    config = tmp_path / "tokenlife.toml"
    config.write_text(f'[engine]\ntoken_dir = "{tmp_path}/run"\n')
    done = run_engine(config, "pull")
    assert done.returncode == 2
    assert "engine.pull is not set: there is no pull service to ask" in done.stderr
    if ME == 0:
        config.write_text(f'[engine]\ntoken_dir = "{tmp_path}/run"\npull = "127.0.0.1:9"\n')
        done = run_engine(config, "pull")
        assert done.returncode == 2 and "as root, name the user" in done.stderr


# -- run: a failing token host is said once per kind ----------------------------------------


def test_run_reports_a_failing_pull_once_per_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = EngineSettings(token_dir=str(tmp_path), pull="th:6821")
    sup = supervisor.Supervisor(["true"], settings, ME, MY_NAME, portable=True)
    sup.started = True
    said = [client.PullError("unreachable", "pull from th:6821: Connection refused")]
    said.append(client.PullError("unreachable", "no token: the pull 5s ago said unreachable"))
    said.append(client.PullError("no_token", "pull from th:6821: no current token for this user"))
    calls = []

    def fake_pull_now(*args: Any, **kw: Any) -> client.PullError:
        calls.append(threading.current_thread().name)
        return said[len(calls) - 1]

    monkeypatch.setattr(supervisor, "pull_now", fake_pull_now)
    now = time.time()
    for step in range(3):
        sup.pull_if_due(now + step * supervisor.PULL_RETRY)
        assert sup.pulling is not None
        sup.pulling.join()
    sup.pull_if_due(now + 2 * supervisor.PULL_RETRY)  # too soon to pull: only says
    err = capfd.readouterr().err.splitlines()
    assert calls == ["pull"] * 3  # in a thread of its own, each time
    assert err == [
        "tokenlife-engine: no newer token pulled: pull from th:6821: Connection refused",
        "tokenlife-engine: no newer token pulled: pull from th:6821: no current token for "
        "this user",
    ]


# -- the shipped Prolog, with a stand-in engine ---------------------------------------------------


def prolog(tmp_path: Path, engine_text: str | None, log: Path, limit: int = 15) -> Path:
    engine = tmp_path / "engine"
    if engine_text is not None:
        engine.write_text(engine_text)
        engine.chmod(0o755)
    text = (REPO / "systemd" / "slurm" / "prolog.sh").read_text()
    for old, new in (
        ("ENGINE=/usr/local/bin/tokenlife-engine", f"ENGINE={engine}"),
        ("LOG=/var/log/tokenlife/pull-prolog.log", f"LOG={log}"),
        ("LIMIT=15", f"LIMIT={limit}"),
    ):
        assert f"{old}\n" in text
        text = text.replace(old, new, 1)
    script = tmp_path / "prolog.sh"
    script.write_text(text)
    return script


def sh(script: Path, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(script)],
        env={"PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


FAILING = '#!/bin/sh\necho "$*" >&2\necho "tokenlife-engine: it failed" >&2\nexit 1\n'


def test_prolog_logs_failures_with_the_job_and_exits_0(tmp_path: Path) -> None:
    log = tmp_path / "prolog.log"
    done = sh(prolog(tmp_path, FAILING, log), "/usr/bin:/bin", SLURM_JOB_ID="42")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert log.read_text() == "job 42: pull\njob 42: tokenlife-engine: it failed\n"


def test_prolog_stops_a_hanging_engine(tmp_path: Path) -> None:
    log = tmp_path / "prolog.log"
    script = prolog(tmp_path, "#!/bin/sh\nexec sleep 30\n", log, limit=1)
    done = sh(script, "/usr/bin:/bin", SLURM_JOB_ID="7;rm -rf /")
    assert done.returncode == 0
    assert log.read_text() == "job ?: tokenlife-engine pull: stopped after 1s\n"


def test_prolog_falls_back_to_syslog_then_to_nothing(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    syslog = tmp_path / "syslog"
    logger = bin_dir / "logger"
    logger.write_text(f'#!/bin/sh\necho "$*" >>{syslog}\ncat >>{syslog}\n')
    logger.chmod(0o755)
    script = prolog(tmp_path, FAILING, tmp_path / "missing" / "prolog.log")
    done = sh(script, f"{bin_dir}:/usr/bin:/bin", SLURM_JOB_ID="3")
    assert done.returncode == 0
    assert syslog.read_text() == (
        "-t tokenlife-pull -p daemon.warning\njob 3: pull\njob 3: tokenlife-engine: it failed\n"
    )
    assert sh(script, str(tmp_path / "nothing")).returncode == 0  # no sed, logger, timeout


def test_prolog_without_an_engine_does_nothing(tmp_path: Path) -> None:
    log = tmp_path / "prolog.log"
    done = sh(prolog(tmp_path, None, log), "/usr/bin:/bin")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert not log.exists()


def test_run_tries_again_sooner_for_short_tokens() -> None:
    """run's pull attempts: every 5 s, or a tenth of a shorter token's life (not under 0.5 s)."""

    def token(lifetime: int) -> Token:
        return Token("x", "u", 1000 + lifetime, 1000, "f")

    assert supervisor.pull_retry(None) == supervisor.PULL_RETRY == 5.0
    assert supervisor.pull_retry(token(2 * 86400)) == 5.0
    assert supervisor.pull_retry(token(10)) == 1.0
    assert supervisor.pull_retry(token(2)) == 0.5
