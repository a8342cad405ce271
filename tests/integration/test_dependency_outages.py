"""R8: a dependency goes away; the daemon runs on, says so, recovers and loses nothing.

PostgreSQL (a private server, so no other test sees the outage) is stopped
under a running `tokenlife serve`: the tick fails and is reported in the
metrics and the log, the daemon keeps its pid, a login still gets a token
(through the spool), and once PostgreSQL is back the next tick succeeds and
ingests what the login left, without a restart.
"""

from __future__ import annotations

import os
import pwd
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from repository.store import SqlTokenStore
from tests.conftest import require_root, run_cli, tokenlife_bin
from tests.integration.harness.postgres import PostgresServer

KEY = secrets.token_bytes(32)
LAST = "tokenlife_last_tick_success_timestamp_seconds"
NOBODY = pwd.getpwnam("nobody").pw_uid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric(url: str, name: str) -> float | None:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_for(check: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stop(serve: subprocess.Popen[str]) -> str:
    """SIGTERM the daemon, wait (kill it after a minute); its stderr."""
    serve.send_signal(signal.SIGTERM)
    try:
        return serve.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        serve.kill()
        return serve.communicate()[1]


@pytest.fixture
def pg() -> Iterator[PostgresServer]:
    require_root()
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_postgresql_outage_under_a_running_daemon(tmp_path: Path, pg: PostgresServer) -> None:
    url = pg.create_database("tl_outage")
    key = tmp_path / "jwt_hs256.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    (tmp_path / "spool").mkdir(mode=0o700)
    port = free_port()
    cfg = tmp_path / "tokenlife.toml"
    cfg.write_text(
        f'[key]\npath = "{key}"\n'
        f'[store]\nurl = "{url}"\nspool_dir = "{tmp_path}/spool"\n'
        f'[login]\ntoken_dir = "{tmp_path}/login"\n'
        f'[producer]\nsocket = "{tmp_path}/mint.sock"\n'
        f'[serve]\ninterval = "1h"\nmetrics = "127.0.0.1:{port}"\ndeliver = false\n'
    )
    metrics = f"http://127.0.0.1:{port}/metrics"
    serve = subprocess.Popen(
        [tokenlife_bin(), "-c", str(cfg), "-v", "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (tmp_path / "mint.sock").exists(), "the mint socket")
        wait_for(lambda: (metric(metrics, LAST) or 0) > 0, "the first tick")
        assert metric(metrics, "tokenlife_store_up") == 1
        assert run_cli("-c", str(cfg), "mint", "nobody").returncode == 0

        good = metric(metrics, LAST) or 0
        pg.pause()  # the outage
        failed_before = metric(metrics, "tokenlife_tick_failures_total") or 0
        serve.send_signal(signal.SIGALRM)
        wait_for(
            lambda: (metric(metrics, "tokenlife_tick_failures_total") or 0) > failed_before,
            "a failed tick",
        )
        assert metric(metrics, "tokenlife_store_up") == 0
        status = run_cli("-c", str(cfg), "status")
        assert status.returncode == 6 and len(status.stderr.splitlines()) == 1

        # A login during the outage still gets its token: the service cannot
        # store it, so PAM mints itself and the spool keeps the record.
        (tmp_path / "login" / str(NOBODY) / "slurm_jwt").unlink()
        env = {"PAM_TYPE": "open_session", "PAM_USER": "nobody", "TOKENLIFE_CONFIG": str(cfg)}
        login = run_cli("pam", "--socket", str(tmp_path / "mint.sock"), env=env)
        assert login.returncode == 0, login.stderr
        assert "token store" in login.stderr and "minting here" in login.stderr
        token_file = tmp_path / "login" / str(NOBODY) / "slurm_jwt"
        assert token_file.stat().st_size > 100
        assert [p.name for p in (tmp_path / "spool").iterdir()] == ["nobody.json"]

        pg.resume()  # recovery, no restart
        serve.send_signal(signal.SIGALRM)
        wait_for(lambda: metric(metrics, "tokenlife_store_up") == 1, "the store back up")
        wait_for(lambda: (metric(metrics, LAST) or 0) > good, "a good tick")
        assert serve.poll() is None  # the same process all along
        assert list((tmp_path / "spool").iterdir()) == []  # what the login left is stored
        store = SqlTokenStore(url)
        current = store.current("nobody")
        assert current is not None and current.token == token_file.read_text()
        store.close()
    finally:
        err = stop(serve)
    assert serve.returncode == 0
    assert "tick failed" in err


def test_slurmctld_unreachable_under_a_running_daemon(tmp_path: Path) -> None:
    """squeue fails as it does when slurmctld is down: the daemon runs on, the
    metrics say so, nothing is removed from the nodes, and it recovers by itself."""
    require_root()
    key = tmp_path / "jwt_hs256.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answer = tmp_path / "squeue.json"
    (bin_dir / "squeue").write_text(
        "#!/bin/sh\n"
        f"[ -f {answer} ] && exec cat {answer}\n"
        'echo "squeue: error: Unable to contact slurm controller (connect failure)" >&2\n'
        "exit 1\n"
    )
    (bin_dir / "squeue").chmod(0o755)
    port = free_port()
    cfg = tmp_path / "tokenlife.toml"
    cfg.write_text(
        f'[key]\npath = "{key}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/db"\nspool_dir = "{tmp_path}/spool"\n'
        f'[login]\ntoken_dir = "{tmp_path}/login"\n'
        f'[producer]\nsocket = "{tmp_path}/mint.sock"\n'
        f'[delivery]\ntransport = "local"\nroot = "{tmp_path}/nodes"\njobs = "slurm"\n'
        f'remove_after = "1s"\n'
        f'[serve]\ninterval = "1h"\nmetrics = "127.0.0.1:{port}"\n'
    )
    assert run_cli("-c", str(cfg), "mint", "nobody").returncode == 0
    answer.write_text(
        '{"jobs": [{"job_id": 1, "job_state": ["RUNNING"], "nodes": "n01", "user_name": "nobody"}]}'
    )
    node_file = tmp_path / "nodes" / "n01" / "run" / "tokenlife" / str(NOBODY) / "slurm_jwt"
    metrics = f"http://127.0.0.1:{port}/metrics"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    serve = subprocess.Popen(
        [tokenlife_bin(), "-c", str(cfg), "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: node_file.exists(), "the first delivery")
        wait_for(lambda: metric(metrics, "tokenlife_job_source_up") == 1, "the job source up")
        answer.unlink()  # slurmctld goes away
        time.sleep(2)  # past remove_after: a wrong cycle would remove now
        serve.send_signal(signal.SIGALRM)
        wait_for(lambda: metric(metrics, "tokenlife_job_source_up") == 0, "the outage seen")
        assert (metric(metrics, "tokenlife_job_source_failures_total") or 0) >= 1
        assert node_file.exists()  # nothing removed on a failed view
        assert serve.poll() is None
        answer.write_text(
            '{"jobs": [{"job_id": 1, "job_state": ["RUNNING"], "nodes": "n01", '
            '"user_name": "nobody"}]}'
        )
        serve.send_signal(signal.SIGALRM)
        wait_for(lambda: metric(metrics, "tokenlife_job_source_up") == 1, "the recovery")
        assert node_file.exists()
    finally:
        err = stop(serve)
    assert serve.returncode == 0
    assert "Unable to contact slurm controller" in err
