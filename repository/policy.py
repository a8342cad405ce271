"""When to renew: a pure function of (token, policy, now).

Kerberos semantics.  A token is due in its renewal window: the last
``renew_fraction`` of its lifetime or at least ``renew_before`` ahead of
``exp``, whichever is earlier, but never earlier than half its lifetime (so
a short-lived token is not re-minted the moment it is issued).  A renewal
gives ``exp = min(now + lifetime, renew_until)``.  Nothing reaches past
renew-until; a token already at its limit just runs out, then expires.  A
token that expired while no renewer ran is renewed on the next tick while
renew-until allows: the repository, not the token holder, is the authority.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenlife.config import TokenConfig
from tokenlife.records import ACTIVE, Expired, TokenRecord, Waiting


@dataclass(frozen=True)
class Policy:
    renew_before: int = 3600
    renew_fraction: float = 0.25

    @classmethod
    def from_config(cls, token: TokenConfig) -> Policy:
        return cls(token.renew_before, token.renew_fraction)

    def margin(self, lifetime: int) -> int:
        wanted = max(self.renew_before, int(lifetime * self.renew_fraction))
        return min(wanted, lifetime // 2)

    def due_at(self, record: TokenRecord) -> int:
        return record.exp - self.margin(record.lifetime)


@dataclass(frozen=True)
class Renew:
    """Due: re-mint with this ``exp``.  Not due or past it: the outcomes Waiting and Expired."""

    new_exp: int


Decision = Renew | Waiting | Expired


def decide(record: TokenRecord, policy: Policy, now: int, force: bool = False) -> Decision:
    """What the renewer does with ``record`` at ``now`` (``force``: ignore the window)."""
    if record.state != ACTIVE:
        return Expired(f"token is {record.state}")
    if now >= record.renew_until:
        return Expired("past renew-until")
    if record.exp >= record.renew_until:
        # Already at its limit: nothing to gain; look again when it runs out.
        return Waiting(record.renew_until)
    due = policy.due_at(record)
    if not force and now < due:
        return Waiting(due)
    new_exp = min(now + record.lifetime, record.renew_until)
    if new_exp <= record.exp:
        return Waiting(max(due, now + 1))  # forced at issue time: a renewal would gain nothing
    return Renew(new_exp)


def next_check(record: TokenRecord, policy: Policy) -> int:
    """When the renewer must look at ``record`` again (what the tick selects on)."""
    if record.exp >= record.renew_until:
        return record.renew_until
    return min(policy.due_at(record), record.renew_until)


def rotation(record: TokenRecord, now: int) -> Decision:
    """Re-mint under a new key: the renewal limit still holds, the window does not."""
    if record.state != ACTIVE:
        return Expired(f"token is {record.state}")
    if now >= record.renew_until:
        return Expired("past renew-until")
    return Renew(min(now + record.lifetime, record.renew_until))
