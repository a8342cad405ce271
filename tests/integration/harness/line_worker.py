"""A worker process spoken to in lines, for the replica tests.

``python -m MODULE`` gets a job (one JSON line) on stdin, answers in lines on
stdout and is told what to do in lines on stdin (renew_worker.py,
deliver_worker.py).  Its output is read in a thread, so a worker that goes
silent or dies fails the test after ``deadline`` seconds with its stderr,
instead of hanging it.  Also: waiting until PostgreSQL has rolled back a
killed worker's work.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import REPO

DEADLINE = 120  # seconds before a silent worker counts as stuck (never reached when green)


class LineWorker:
    """``python -m module`` with ``job`` sent as its first line; ``name`` is the job's actor."""

    def __init__(self, module: str, tmp_path: Path, job: dict[str, Any]) -> None:
        self.name = str(job["actor"])
        self.stderr_path = tmp_path / f"{self.name}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "TOKENLIFE_CONFIG"},
        )
        self._lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        self.send(json.dumps(job))

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put("")  # EOF: the process is gone

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, wanted: str | None = None) -> str:
        """The worker's next line (``wanted`` if given); fails if it exits or sticks."""
        try:
            line = self._lines.get(timeout=DEADLINE)
        except queue.Empty:
            pytest.fail(f"{self.name} said nothing for {DEADLINE} s:\n{self.stderr()}")
        if line == "" or (wanted is not None and line != wanted):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5 if line else DEADLINE)
            pytest.fail(
                f"{self.name}: expected {wanted!r}, got {line!r} "
                f"(exit {self.proc.returncode}):\n{self.stderr()}"
            )
        return line

    def result(self) -> dict[str, Any]:
        """Its next line, a JSON object."""
        found: dict[str, Any] = json.loads(self.expect())
        return found

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=DEADLINE) == -signal.SIGKILL

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def close(self, goodbye: str | None = None) -> None:
        """End it (``goodbye`` first, if it is still running and one is given) and its pipes."""
        if self.proc.poll() is None:
            if goodbye is not None:
                with contextlib.suppress(OSError):
                    self.send(goodbye)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)
            if self.proc.poll() is None:
                self.proc.kill()
        self.proc.wait(timeout=DEADLINE)
        self._reader.join(timeout=DEADLINE)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stderr.close()


def wait_for_backends_gone(url: str, application_name: str) -> None:
    """PostgreSQL notices a killed client's closed socket and rolls its work back."""
    engine = create_engine(url)
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            with engine.connect() as conn:
                left = conn.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                    {"n": application_name},
                )
            if left == 0:
                return
            assert time.monotonic() < deadline, f"{left} backends of the killed worker remain"
            time.sleep(0.05)
    finally:
        engine.dispose()
