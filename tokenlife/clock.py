"""The system clock; everything that asks for the time takes a Clock (tokenlife.interfaces)."""

from __future__ import annotations

import time

from tokenlife.interfaces import Clock

__all__ = ["Clock", "SystemClock"]


class SystemClock:
    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
