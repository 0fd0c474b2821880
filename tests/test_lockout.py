"""quota/lockout.py: the table of wrong tokens per client, bounded."""

from __future__ import annotations

from quota.lockout import Lockout
from quota.matrix import Rate


def test_the_table_is_bounded_and_forgets_the_clients_heard_from_longest_ago() -> None:
    """Catches a table that grows with every address a flood of guesses comes from, or that
    forgets the wrong client (the one heard from last, whose guessing goes on)."""
    now = [0.0]
    lockout = Lockout(lambda: Rate(2, 60, "2/minute"), lambda: now[0], clients=2)
    for who in ("a", "b", "c"):
        lockout.failed(who)
        lockout.failed(who)
        now[0] += 1
    assert len(lockout._failed) == 2
    assert lockout.retry_after("a") == 0
    assert (lockout.retry_after("b"), lockout.retry_after("c")) == (58, 59)  # failed at 1 s and 2 s; now 3 s
