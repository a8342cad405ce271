"""Processes by mount namespace, read from /proc: how the harnesses find and
end everything their private namespaces hold (sshd's sessions and Slurm's
steps call setsid, so process groups would miss them)."""

from __future__ import annotations

import contextlib
import os
import signal
import time


def mnt_ns(pid: int | str) -> str | None:
    """The mount namespace of ``pid`` (``mnt:[inode]``), None once it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:  # gone, or a zombie
        return None


def exe(pid: int) -> str | None:
    """The program ``pid`` runs, None once it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def kill_namespaces(targets: set[str], spare: set[int], timeout: float = 15) -> list[int]:
    """SIGKILL every process in the mount namespaces ``targets`` but ``spare``.

    Returns [] once they are gone, or the pids still there after ``timeout``.
    Keep a holder of each namespace alive meanwhile (in ``spare``): while it
    lives, the namespace's inode number cannot be reused by another one.
    """
    deadline = time.monotonic() + timeout
    while targets:
        left = [p for p in pids() if p not in spare and mnt_ns(p) in targets]
        if not left or time.monotonic() > deadline:
            return left
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    return []
