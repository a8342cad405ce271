"""`tokenlife serve` as a real process: ticks at start, SIGALRM ticks now,
SIGHUP reloads (a broken file keeps the old config), SIGTERM exits 0."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from producer.keys import FileKeySource
from producer.mint import Minter
from repository.store import SqlTokenStore
from tests.conftest import tokenlife_bin
from tokenlife import config as configmod
from tokenlife.testing.fakes import FakeClock

USER = "nobody" if os.geteuid() == 0 else os.environ.get("USER", "nobody")


def wait_for(cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def mint_in_the_past(cfg: Path, store: SqlTokenStore, ago: int) -> str:
    """A token issued ``ago`` seconds back: due now, without waiting for it."""
    config = configmod.load(cfg)
    clock = FakeClock(start=time.time() - ago)
    record, _ = Minter(config, FileKeySource(config.key), store, clock).mint(USER, os.geteuid())
    return record.token_id


def version(store: SqlTokenStore, token_id: str) -> int:
    return next(r.version for r in store.records(USER) if r.token_id == token_id)


def current_token(store: SqlTokenStore) -> str:
    record = store.current(USER)
    return record.token if record else ""


def test_serve_signals(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(secrets.token_bytes(32))
    key.chmod(0o600)
    cfg = tmp_path / "c.toml"
    body = (
        f'[key]\npath = "{key}"\n[store]\nurl = "sqlite:///{tmp_path}/db"\n'
        f'[login]\ntoken_dir = "{tmp_path}/run"\n[producer]\nsocket = "{tmp_path}/m.sock"\n'
        '[token]\nlifetime = "1h"\nrenew_until = "1d"\n[serve]\ninterval = "1h"\n'
        f'[delivery]\ntransport = "local"\nroot = "{tmp_path}/nodes"\njobs = "static"\n'
        f'remote_dir = "/run/tokenlife"\n[delivery.static]\n{USER} = ["node01"]\n'
    )
    on_node = (
        tmp_path
        / "nodes/node01/run/tokenlife"
        / str(os.geteuid() if USER != "nobody" else 65534)
        / "slurm_jwt"
    )
    cfg.write_text(body)
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
    first = mint_in_the_past(cfg, store, 3500)
    proc = subprocess.Popen(
        [tokenlife_bin(), "-c", str(cfg), "-v", "serve"], stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: version(store, first) == 2)  # the tick at start renewed it
        second = mint_in_the_past(cfg, store, 3500)  # supersedes the first
        proc.send_signal(signal.SIGALRM)
        wait_for(lambda: version(store, second) == 2)
        # ... and the delivery cycle after it put the renewed token on the node.
        wait_for(lambda: on_node.exists() and on_node.read_text() == current_token(store))
        cfg.write_text("[nonsense]\n")
        proc.send_signal(signal.SIGHUP)
        cfg.write_text(body)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.stderr is not None
    log = proc.stderr.read()
    proc.stderr.close()
    assert "tick: renewed 1" in log
    assert "delivery: delivered 1" in log
    assert (
        "reload failed, keeping the running configuration" in log or "configuration reloaded" in log
    )
