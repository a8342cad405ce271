"""An ordinary local user attacks the mint socket; everyone else is still served.

Each test has one uid crowd, hang or trickle at a real ``MintService`` on a
real Unix socket (client processes under ``setpriv``, see
tests/unit/test_mint_service.py), and checks that the daemon's descriptors
and threads stay bounded and that another user, and root's PAM operation,
still get their tokens.  Outcomes are asserted, not durations.
"""

from __future__ import annotations

import threading

from producer.bounded_server import ConnectionLimits
from tests.conftest import require_root, require_tool
from tests.unit.test_mint_service import (
    NOBODY,
    Agent,
    asks,
    errors,
    frozen,
    open_fds,
    running,
    two_users,
    uid_of,
    wait_for,
)

IDLE = 320


def _prerequisites() -> tuple[str, str]:
    require_root()
    require_tool("setpriv")
    return two_users()


class Peak:
    """The most descriptors and threads this process had while it ran."""

    def __init__(self) -> None:
        self.fds, self.threads = open_fds(), threading.active_count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.fds = max(self.fds, open_fds())
            self.threads = max(self.threads, threading.active_count())

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def test_idle_connections_are_bounded_per_uid() -> None:
    alice, bob = _prerequisites()
    nobody = uid_of(NOBODY)
    # Idle connections are held for as long as the test looks at them.
    with running(ConnectionLimits(read_timeout=600)) as svc:
        fds, threads = open_fds(), threading.active_count()
        agent = Agent(NOBODY, "hold", svc.path, IDLE)
        try:
            with Peak() as peak:
                report = agent.wait_report(lambda r: sum(r["replies"].values()) == IDLE - 8)
            # Eight wait for their request; every other one was refused at once.
            assert report["pending"] == 8
            assert errors(report["replies"]) == {
                f"too many connections from uid {nobody} (at most 8 at a time); "
                "try again later": IDLE - 8
            }
            assert svc.server.open_connections() == {nobody: 8}
            # The daemon holds 8 connections and 8 threads, not IDLE (besides
            # them: the agent's 3 pipes, the one being refused, the sampler's).
            assert peak.fds - fds <= 8 + 8, (fds, peak.fds)
            assert peak.threads - threads <= 8 + 2, (threads, peak.threads)
            # Meanwhile other users, and logins, are served.
            assert asks(alice, svc.path, [{"op": "mint", "user": alice}])[0]["ok"]
            assert svc.pam(bob) == b"OK\n"
            assert svc.ask({"op": "mint", "user": bob})["ok"]
            held = open_fds()
        finally:
            agent.close()
        wait_for(lambda: svc.server.open_connections() == {}, "the held connections to end")
        assert open_fds() <= held - 8 + 2


def test_users_together_never_take_roots_reserve() -> None:
    alice, bob = _prerequisites()
    limits = ConnectionLimits(max_connections=6, max_per_uid=2, root_reserve=2, read_timeout=600)
    with running(limits) as svc:
        agents = [Agent(alice, "hold", svc.path, 3), Agent(bob, "hold", svc.path, 3)]
        try:
            for agent, user in zip(agents, (alice, bob), strict=True):
                report = agent.wait_report(lambda r: sum(r["replies"].values()) == 1)
                assert report["pending"] == 2
                assert errors(report["replies"]) == {
                    f"too many connections from uid {uid_of(user)} (at most 2 at a time); "
                    "try again later": 1
                }
            # Four ordinary connections fill the users' share: a third user is told so ...
            crowd = Agent(NOBODY, "hold", svc.path, 2)
            agents.append(crowd)
            report = crowd.wait_report(lambda r: r["pending"] == 0)
            assert errors(report["replies"]) == {
                "mint service busy (4 connections open); try again later": 2
            }
            # ... while logins (root) still get through.
            assert svc.pam(alice) == b"OK\n"
            assert svc.ask({"op": "mint", "user": bob})["ok"]
        finally:
            for agent in agents:
                agent.close()
        wait_for(lambda: svc.server.open_connections() == {}, "the held connections to end")


def test_a_slow_loris_is_cut_off_however_it_trickles() -> None:
    alice, bob = _prerequisites()
    nobody = uid_of(NOBODY)
    # Twenty connections each sending a byte every 0.1 s, for up to two minutes:
    # the 5 s limit is for the whole request line, so trickling does not extend it.
    with running() as svc:
        threads = threading.active_count()
        agent = Agent(NOBODY, "trickle", svc.path, 20, 120)
        try:
            assert asks(alice, svc.path, [{"op": "mint", "user": alice}])[0]["ok"]
            assert svc.pam(bob) == b"OK\n"
            result = agent.result()
        finally:
            agent.close()
        assert result["uncut"] == 0
        got = errors(result["replies"])
        too_many = f"too many connections from uid {nobody} (at most 8 at a time); try again later"
        assert set(got) == {too_many, "request not received within 5 s"}, got
        # Eight were let in and cut (more only if the machine stalled for 5 s
        # while the other twelve were connecting).
        assert got["request not received within 5 s"] >= 8
        assert sum(got.values()) == 20
        wait_for(lambda: svc.server.open_connections() == {}, "the cut connections to end")
        wait_for(lambda: threading.active_count() <= threads, "the handler threads to end")


def test_a_flood_of_connections_with_requests_leaves_others_served() -> None:
    alice, bob = _prerequisites()
    # Not idle this time: nobody keeps asking as fast as it can, from 4 processes
    # (a clock that stands still: the bucket never refills during the test).
    with running(clock=frozen) as svc:
        flood = [{"op": "mint", "user": NOBODY}] * 40
        stop = threading.Event()
        replies: list[dict[str, object]] = []

        def flooder() -> None:
            while not stop.is_set():
                replies.extend(asks(NOBODY, svc.path, flood))

        workers = [threading.Thread(target=flooder, daemon=True) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            wait_for(lambda: len(replies) >= 40, "the flood to get going")
            assert asks(alice, svc.path, [{"op": "mint", "user": alice}])[0]["ok"]
            assert svc.pam(bob) == b"OK\n"
        finally:
            stop.set()
            for worker in workers:
                worker.join(180)
        refusals = {str(r["error"]) for r in replies if not r["ok"]}
        assert refusals <= {
            f"too many connections from uid {uid_of(NOBODY)} (at most 8 at a time); "
            "try again later",
            *(f"too many requests; try again in {n}s" for n in range(1, 11)),
        }
        # The burst got through, no more; and it got one token, reused.
        assert sum(1 for r in replies if r["ok"]) == 5
        assert len(svc.store.records(NOBODY)) == 1
