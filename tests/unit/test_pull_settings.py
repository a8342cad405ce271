"""``[pull]`` and ``delivery.transport = "none"``: what loads, what is refused
(one line naming the key), what ``config check`` and ``push`` say, and how
the daemon's PullService follows a reload (with libmunge; no munged needed)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import require, run_cli, write_cli_site
from tests.unit.test_metrics import free_port
from tokenlife import config as configmod
from tokenlife import munge
from tokenlife.config import Config, PullConfig
from tokenlife.errors import ConfigError


def load(text: str) -> Config:
    return configmod.parse(tomllib.loads(text), "t.toml")


def test_a_full_pull_table_loads() -> None:
    pull = load(
        '[pull]\nlisten = "[::]:6821"\npolicy = "jobs"\nlogin_hosts = ["login01", "10.0.0.5"]\n'
        'munge_socket = "/run/munge/other.socket"\nmax_request = 8192\nread_timeout = 0.5\n'
        'request_timeout = "10s"\nwrite_timeout = 2\nmax_connections = 512\n'
        'max_per_peer = 32\nworkers = 4\nreply_ttl = "2m"\n'
    ).pull
    assert pull == PullConfig(
        listen="[::]:6821",
        policy="jobs",
        login_hosts=("login01", "10.0.0.5"),
        munge_socket="/run/munge/other.socket",
        max_request=8192,
        read_timeout=0.5,
        request_timeout=10.0,
        write_timeout=2.0,
        max_connections=512,
        max_per_peer=32,
        workers=4,
        reply_ttl=120,
    )
    assert load("").pull == PullConfig()  # off by default
    assert load('[pull]\nlisten = "tokenhost.example.org:6821"\n').pull.listen


LISTEN = 'pull.listen: expected HOST:PORT such as "0.0.0.0:6821" or "[::]:6821", or ""'
BAD = [
    ('listen = "6821"', LISTEN),
    ('listen = "0.0.0.0:0"', LISTEN),
    ('listen = "::1:6821"', LISTEN),
    ('listen = "[node01]:6821"', LISTEN),
    ('listen = "bad host:6821"', LISTEN),
    ("listen = 6821", "pull.listen: expected a non-empty string"),
    ('policy = "all"', "pull.policy: expected one of 'own', 'jobs'"),
    ('login_hosts = ["a b"]', "pull.login_hosts: 'a b' is not a valid node name"),
    ('munge_socket = "run/munge"', "pull.munge_socket: expected an absolute path"),
    ("max_request = 10", "pull.max_request: expected an integer from 128 to 65536"),
    ("read_timeout = 0", "pull.read_timeout: expected more than 0 and at most 300 seconds"),
    ("read_timeout = true", "pull.read_timeout: expected seconds"),
    ('write_timeout = "1h"', "pull.write_timeout: expected more than 0 and at most 300 seconds"),
    ('write_timeout = "soon"', "pull.write_timeout: 'soon' is not a duration"),
    ("read_timeout = 9", "pull.request_timeout: must not be shorter than pull.read_timeout"),
    ("max_per_peer = 300", "pull.max_per_peer: must not exceed pull.max_connections"),
    ("workers = 0", "pull.workers: expected an integer from 1 to 256"),
    ('reply_ttl = "2h"', "pull.reply_ttl: expected at most 3600 seconds"),
    ("listne = 1", "pull.listne: unknown key"),
]


@pytest.mark.parametrize(("line", "reason"), BAD)
def test_a_bad_pull_value_is_one_line_naming_the_key(line: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(f"[pull]\n{line}\n")
    message = str(err.value)
    assert message.startswith(f"t.toml: {reason}"), message
    assert "\n" not in message


def test_transport_none_leaves_no_transport_for_service_files() -> None:
    assert load('[delivery]\ntransport = "none"\n').delivery.transport == "none"
    with pytest.raises(ConfigError, match=r"service\[1\]\.hosts: delivery.transport is 'none'"):
        load(
            '[delivery]\ntransport = "none"\n'
            '[[service]]\nuser = "nobody"\nhosts = ["web01"]\npath = "/etc/web/jwt"\n'
        )


def test_push_with_transport_none_says_so_in_one_line(tmp_path: Path) -> None:
    cfg = write_cli_site(tmp_path, b"k" * 32, '[delivery]\ntransport = "none"\n')
    done = run_cli("-c", str(cfg), "push")
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"tokenlife-push: {cfg}: delivery.transport is 'none': push is off "
        "(nodes pull their tokens, docs/pull.md)\n"
    )
    assert done.stdout == ""
    # PrologSlurmctld: the same line, and exit 0 (a failing prolog holds the job)
    env = {"SLURM_JOB_USER": "nobody", "SLURM_JOB_NODELIST": "node01"}
    job = run_cli("-c", str(cfg), "push", "--job", env=env)
    assert job.returncode == 0 and job.stderr == done.stderr, job.stderr
    assert not (tmp_path / "db").exists()  # nothing was even opened


def socket_file(path: Path) -> str:
    """A Unix socket's file at ``path`` (it stays after the socket closes)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return str(path)


def test_config_check_reports_the_pull_service(tmp_path: Path) -> None:
    require(munge.available(), "needs libmunge (Debian's libmunge2)")
    path = socket_file(tmp_path / "munge.socket")
    cfg = write_cli_site(
        tmp_path,
        b"k" * 32,
        f'[pull]\nlisten = "0.0.0.0:6821"\npolicy = "jobs"\nlogin_hosts = ["login01"]\n'
        f'munge_socket = "{path}"\n[delivery]\ntransport = "none"\n',
    )
    (tmp_path / "k").chmod(0o600)
    done = run_cli("-c", str(cfg), "config", "check", "--json")
    report = json.loads(done.stdout)
    assert report["pull"] == (
        f"0.0.0.0:6821, policy jobs (login hosts: login01), munge socket {path}"
    )
    assert report["transport"] == "none (push is off)"
    assert report["problems"] == [] and done.returncode == 0, done.stdout
    # munged not there: a problem, and exit 1
    cfg.write_text(cfg.read_text().replace(path, f"{tmp_path}/gone.socket"))
    done = run_cli("-c", str(cfg), "config", "check")
    assert done.returncode == 1
    assert (
        f"problem: pull: munge socket {tmp_path}/gone.socket: No such file or directory "
        "(is munged running?)"
    ) in done.stdout.splitlines()
    # off: said so, nothing checked; login_hosts without "jobs" is a warning
    cfg.write_text(cfg.read_text().replace('policy = "jobs"', 'policy = "own"'))
    cfg.write_text(cfg.read_text().replace('listen = "0.0.0.0:6821"', 'listen = ""'))
    done = run_cli("-c", str(cfg), "config", "check", "--json")
    report = json.loads(done.stdout)
    assert report["pull"] == "off" and report["problems"] == []
    assert report["warnings"] == ["pull.login_hosts: ignored, pull.policy is not 'jobs'"]


# -- the daemon's pull service across reloads ---------------------------------------------


def send(address: str, data: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    return reply


@pytest.fixture
def service() -> Iterator[object]:
    require(munge.available(), "needs libmunge (Debian's libmunge2)")
    from tokenlife.app.pull_service import PullService

    def no_store() -> object:
        raise AssertionError("no pull reaches the store here")

    s = PullService(no_store, no_store, "test")  # type: ignore[arg-type]
    try:
        yield s
    finally:
        s.close()


def with_pull(**values: object) -> Config:
    pull = PullConfig(munge_socket="/nonexistent/munge.socket", max_request=128)
    return replace(Config(), pull=replace(pull, **values))


def test_a_reload_swaps_the_policy_in_place_and_restarts_for_new_limits(
    service: object, caplog: pytest.LogCaptureFixture
) -> None:
    from tokenlife.app.pull_service import PullService

    assert isinstance(service, PullService)
    caplog.set_level(logging.INFO)
    first = f"127.0.0.1:{free_port()}"
    service.bind(with_pull(listen=first))
    service.serve()
    server = service.server
    assert server is not None and service.alive()
    # munged is not there: said once at start, in one line
    assert "pull: munged at /nonexistent/munge.socket does not answer" in caplog.text
    too_long = b"M" * 200  # over max_request: refused without munge
    assert send(first, too_long) == b"ERR bad_request request too long\n"

    service.apply(with_pull(listen=first, policy="jobs", login_hosts=("login01",)))
    assert service.server is server  # the same server, the same connections
    assert server.policy.mode == "jobs" and server.policy.login_hosts == {"login01"}

    service.apply(with_pull(listen=first, policy="jobs", workers=2))  # a limit: a new server
    assert service.server is not server and not server.alive()
    assert service.server is not None and service.server.limits.workers == 2
    assert send(first, too_long) == b"ERR bad_request request too long\n"
    figures = service.figures()
    assert figures is not None and figures[0] and figures[1]["bad_request"] == 2  # kept

    # a new address that is taken: one error line, the running server goes on
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        running = service.server
        service.apply(with_pull(listen=busy))
        assert service.server is running and running.alive()
        assert f"cannot serve pulls: pull.listen {busy}: Address already in use" in caplog.text
        assert f"still serving on {first}" in caplog.text

    service.apply(with_pull(listen=""))  # off: stopped, healthy, no figures
    assert service.server is None and not running.alive()
    assert service.alive() and service.figures() is None


def test_a_pull_service_that_stopped_stops_the_watchdog_pings() -> None:
    require(munge.available(), "needs libmunge (Debian's libmunge2)")
    from tokenlife.app.daemon import Daemon

    daemon = Daemon(None)
    done = threading.Event()
    # what healthy() looks for besides the pull service: the mint socket's thread
    mint = threading.Thread(target=done.wait, name="mint-socket", daemon=True)
    mint.start()
    try:
        assert daemon.healthy()  # pull off
        daemon.pull.bind(with_pull(listen=f"127.0.0.1:{free_port()}"))
        daemon.pull.serve()
        assert daemon.healthy()
        assert daemon.pull.server is not None
        daemon.pull.server.close()  # what a dead I/O thread looks like from outside
        assert not daemon.healthy()
        figures = daemon.pull.figures()
        assert figures is not None and figures[0] is False  # tokenlife_pull_up 0
    finally:
        done.set()
        daemon.pull.close()
