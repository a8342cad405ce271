"""What the pull service asks the daemon: the user's current token, and where users work.

:class:`StoreLookup` is the server's ``lookup``: the user's current token from
the store (never a new one: pulling mints nothing), refused when the stored
token belongs to another uid than the caller's (a recycled name), and not
handed out once expired.  A burst of pulls by one user (a big job's nodes)
costs one store query: answers are kept ``cache_ttl`` seconds.

:class:`WorkView` is the ``jobs`` policy's ``has_work``: the job source's
answer (user -> hosts), refreshed when a host asks that the last answer does
not name (a job that started after it) but at most once every
``refresh_after`` seconds, by one thread while the others wait for it: a
thousand nodes of a new job cost one ``squeue``.  The daemon may also feed it
every answer its delivery cycle gets (:meth:`WorkView.update`).

Both take callables that return the current store or job source, because a
reload (SIGHUP) replaces them; both are thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from producer.pull import Refusal, host_key
from tokenlife.interfaces import Needs, TokenStore
from tokenlife.records import ACTIVE, TokenRecord


class StoreLookup:
    def __init__(
        self,
        store: Callable[[], TokenStore],
        cache_ttl: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.cache_ttl, self.clock = store, cache_ttl, clock
        self._cache: dict[str, tuple[TokenRecord | None, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, uid: int, user: str, host: str) -> str | Refusal | None:
        now = self.clock()
        with self._lock:
            hit = self._cache.get(user)
        if hit is not None and hit[1] > now:
            record = hit[0]
        else:
            record = self.store().current(user)  # StoreError: the server counts an error
            with self._lock:
                if len(self._cache) >= 4096:
                    self._cache.clear()
                self._cache[user] = (record, now + self.cache_ttl)
        if record is None or record.state != ACTIVE or not record.token:
            return None
        if record.uid != uid:
            return Refusal(f"the stored token of {user} is for uid {record.uid}, not {uid}")
        if record.exp < now:  # Slurm takes exp == now still
            return None
        return record.token

    def forget(self) -> None:
        """Drop the cache (after a renewal tick, say: the next pull sees the new token)."""
        with self._lock:
            self._cache.clear()


class WorkView:
    def __init__(
        self,
        needs: Callable[[], Needs],
        refresh_after: float = 10.0,
        max_age: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.needs, self.refresh_after, self.max_age, self.clock = (
            needs,
            refresh_after,
            max_age,
            clock,
        )
        self._view: dict[str, frozenset[str]] = {}
        self._at: float | None = None  # when the view was taken
        self._tried: float | None = None  # when the job source was last asked
        self._lock = threading.Lock()  # the view
        self._refreshing = threading.Lock()  # one refresh at a time

    def update(self, needs: Needs) -> None:
        """Take a fresh answer of the job source (user -> node names)."""
        view = {user: frozenset(host_key(h) for h in hosts) for user, hosts in needs.items()}
        with self._lock:
            self._view, self._at = view, self.clock()

    def __call__(self, user: str, host: str) -> bool:
        key = host_key(host)
        if self._has(user, key, fresh=True):
            return True
        with self._lock:
            taken, tried = self._at, self._tried
        if tried is None or self.clock() - tried >= self.refresh_after:
            self._refresh(taken)
        return self._has(user, key, fresh=False)

    def _has(self, user: str, key: str, fresh: bool) -> bool:
        with self._lock:
            view, at = self._view, self._at
        if at is None:
            return False
        if self.clock() - at > self.max_age:
            if fresh:
                return False
            # The job source has not answered for too long: say nothing rather than guess.
            raise RuntimeError(f"the job source has not answered for over {self.max_age:g}s")
        return key in view.get(user, frozenset())

    def _refresh(self, seen: float | None) -> None:
        with self._refreshing:
            with self._lock:
                if self._at != seen:  # another thread refreshed while this one waited
                    return
                self._tried = self.clock()  # a failing job source is asked no more often
            try:
                needs = self.needs()
            except Exception:
                # Keep the last view (a still-young one answers); _has decides.
                with self._lock:
                    if self._at is None:
                        raise
                return
            self.update(needs)
