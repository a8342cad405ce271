"""The renewal decision, exhaustively, with plain integers for time."""

from __future__ import annotations

import itertools

import pytest

from repository.policy import Policy, Renew, decide, next_check
from tokenlife.records import Expired, TokenRecord, Waiting

H, D = 3600, 86400
T0 = 1_800_000_000


def token(
    iat: int, exp: int, renew_until: int, lifetime: int = 2 * D, state: str = "active"
) -> TokenRecord:
    return TokenRecord("t", "alice", 1000, 1000, T0, iat, exp, renew_until, lifetime, state=state)


DEFAULT = Policy(renew_before=H, renew_fraction=0.25)
FRESH = token(T0, T0 + 2 * D, T0 + 7 * D)


def test_waits_until_last_quarter() -> None:
    assert DEFAULT.due_at(FRESH) == T0 + 2 * D - 12 * H
    assert decide(FRESH, DEFAULT, T0) == Waiting(T0 + 36 * H)
    assert decide(FRESH, DEFAULT, T0 + 36 * H - 1) == Waiting(T0 + 36 * H)


def test_renews_in_window_with_full_lifetime() -> None:
    now = T0 + 36 * H
    assert decide(FRESH, DEFAULT, now) == Renew(now + 2 * D)


def test_renew_before_wins_when_larger() -> None:
    policy = Policy(renew_before=20 * H, renew_fraction=0.25)
    assert policy.due_at(FRESH) == T0 + 2 * D - 20 * H


def test_margin_never_more_than_half_the_lifetime() -> None:
    short = token(T0, T0 + 30, T0 + 600, lifetime=30)
    assert DEFAULT.margin(30) == 15
    assert decide(short, DEFAULT, T0) == Waiting(T0 + 15)
    assert decide(short, DEFAULT, T0 + 15) == Renew(T0 + 45)


def test_new_exp_capped_at_renew_until() -> None:
    late = token(T0 + 5 * D, T0 + 7 * D - H, T0 + 7 * D)
    now = T0 + 7 * D - 12 * H
    assert decide(late, DEFAULT, now) == Renew(T0 + 7 * D)


def test_at_the_limit_waits_then_expires() -> None:
    capped = token(T0 + 6 * D, T0 + 7 * D, T0 + 7 * D)
    assert decide(capped, DEFAULT, T0 + 7 * D - 1) == Waiting(T0 + 7 * D)
    assert decide(capped, DEFAULT, T0 + 7 * D) == Expired("past renew-until")
    assert decide(capped, DEFAULT, T0 + 8 * D) == Expired("past renew-until")


def test_expired_before_renew_until_is_renewed() -> None:
    now = T0 + 3 * D  # exp passed a day ago, renewer was down
    assert decide(FRESH, DEFAULT, now) == Renew(now + 2 * D)


def test_force_ignores_the_window_not_the_limit() -> None:
    assert decide(FRESH, DEFAULT, T0 + 1, force=True) == Renew(T0 + 1 + 2 * D)
    assert decide(FRESH, DEFAULT, T0 + 7 * D, force=True) == Expired("past renew-until")


@pytest.mark.parametrize("state", ["revoked", "expired"])
def test_inactive_refused(state: str) -> None:
    assert decide(token(T0, T0 + D, T0 + 2 * D, state=state), DEFAULT, T0) == Expired(
        f"token is {state}"
    )


def test_next_check() -> None:
    assert next_check(FRESH, DEFAULT) == T0 + 36 * H
    assert next_check(token(T0, T0 + 7 * D, T0 + 7 * D), DEFAULT) == T0 + 7 * D


LIFETIMES = [30, 600, H, 2 * D]
LIMITS = [1, 2, 7]


@pytest.mark.parametrize(("lifetime", "limit"), list(itertools.product(LIFETIMES, LIMITS)))
def test_invariants_over_a_whole_life(lifetime: int, limit: int) -> None:
    """Simulate a renewer ticking every lifetime/10: never past renew-until,
    never lets the token run out before renew-until, expires exactly once."""
    renew_until = T0 + limit * lifetime * 3
    record = token(T0, T0 + lifetime, renew_until, lifetime=lifetime)
    step = max(1, lifetime // 10)
    expired_at = None
    for now in range(T0, renew_until + 3 * step, step):
        decision = decide(record, DEFAULT, now)
        assert record.exp <= record.renew_until
        if isinstance(decision, Renew):
            assert now < decision.new_exp <= renew_until and decision.new_exp > record.exp
            record = token(now, decision.new_exp, renew_until, lifetime=lifetime)
        elif isinstance(decision, Expired):
            expired_at = now
            break
        else:
            assert isinstance(decision, Waiting) and decision.until > now
            assert now < record.exp, "the token ran out before renew-until while waiting"
    assert expired_at is not None and renew_until <= expired_at < renew_until + step
