"""Exponential backoff with jitter, shared by renewal and delivery retries."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff(attempts: int, base: int, cap: int, rand: Callable[[], float] = random.random) -> int:
    """``base`` doubled per attempt up to ``cap``, then scaled by 50-100 % at random
    so that many failures at once do not retry in lockstep."""
    delay = min(cap, base * 2 ** min(attempts, 20))
    return int(delay * (0.5 + rand() / 2))
