"""A wedged tick neither keeps feeding the watchdog nor keeps the daemon from stopping.

(Issue 12, finding 2: a tick blocked on a user's FIFO kept WATCHDOG=1 coming
and ignored SIGTERM.)  The tick here blocks forever on purpose; the daemon is
a real process with a real notify socket.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, write_cli_site

DRIVER = """
import sys, threading
sys.path.insert(0, {repo!r})
from pathlib import Path
from tokenlife.app import daemon
daemon.STUCK_AFTER, daemon.STOP_GRACE = 2, 3
def wedged(self):
    print("tick started", flush=True)
    threading.Event().wait()
daemon.Daemon._tick_once = wedged
from tokenlife import logsetup
logsetup.setup(1)
sys.exit(daemon.Daemon(Path({cfg!r})).run())
"""


def test_a_wedged_tick_stops_the_watchdog_and_not_the_shutdown(tmp_path: Path) -> None:
    cfg = write_cli_site(
        tmp_path,
        secrets.token_bytes(32),
        '[serve]\nmetrics = ""\ndeliver = false\ninterval = "1h"\n',
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.5)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "WATCHDOG_USEC": "1000000",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER.format(repo=str(REPO), cfg=str(cfg))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        messages: list[tuple[float, str]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                messages.append((time.monotonic(), notify.recv(256).decode()))
            pings = [t for t, m in messages if m == "WATCHDOG=1"]
            # stuck after 2 s: the pings stop; wait 4 s of silence to be sure
            if pings and time.monotonic() - pings[-1] > 4:
                break
        states = [m for _, m in messages]
        assert states[0] == "READY=1"
        assert "WATCHDOG=1" in states
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        notify.close()
    assert proc.returncode == 0
    assert "a tick has run for over 2s: no more watchdog pings" in stderr
    assert "a tick still runs after 3s: stopping without it" in stderr
