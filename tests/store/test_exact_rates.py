"""Exact rates (`RateOp(..., exact=True)`, `algorithm: exact` in routes.yaml): a log of hits, checked
against the `limits` library's moving-window limiter (a differential test) on every store, and
against the property that makes it worth its cost: never more than `limit` hits in any window."""

from __future__ import annotations

import random
from bisect import bisect_left
from typing import Any
from unittest import mock

import pytest
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from quota.store.memory import MemoryStore
from quota.store.program import Program, RateOp

# limits counts in float seconds. One of its seconds is 1024 of our milliseconds, so every instant
# (now_ms / 1024) is exact in binary floating point and both sides compare the same numbers; the
# instants lie in the future because limits' memory storage expires entries on the real clock.
MS_PER_S = 1024
START = 2_000_000_000_000


def schedule(seed: int, window_ms: int, n: int = 300) -> list[tuple[int, int]]:
    """(instant, cost) pairs: bursts at one instant, gaps of exactly one window (the closed edge),
    one window plus or minus a millisecond, and long pauses."""
    rng = random.Random(seed)
    t, out = START, []
    for _ in range(n):
        t += rng.choice(
            [0, 0, 1, 2, 7, 50, 200, window_ms // 3, window_ms - 1, window_ms, window_ms + 1, 3 * window_ms]
        )
        out.append((t, rng.choice([1, 1, 1, 2])))
    return out


def most_in_a_window(times: list[int], window_ms: int) -> int:
    """The most hits in any closed window [t - window_ms, t] (times sorted)."""
    return max((i - bisect_left(times, t - window_ms) + 1 for i, t in enumerate(times)), default=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("limit", "seconds"), [(1, 1), (3, 1), (5, 2)])
async def test_same_decisions_as_limits_moving_window(store: Any, seed: int, limit: int, seconds: int) -> None:
    """Catches any difference from a reference sliding log: an off-by-one at the window's closed
    edge (a hit exactly `window_ms` old still counts), a cost > 1 counted once, refused hits logged
    (a refusal must consume nothing), or Lua and Python logs disagreeing on a burst at one instant."""
    window_ms = seconds * MS_PER_S
    item = RateLimitItemPerSecond(limit, seconds)
    reference = MovingWindowRateLimiter(MemoryStorage())
    ours, theirs = [], []
    for now_ms, cost in schedule(seed * 7 + limit, window_ms):
        with mock.patch("time.time", return_value=now_ms / MS_PER_S):
            theirs.append(await reference.hit(item, "k", cost=cost))
        outcome = await store.run(Program([RateOp("q:{t}:r:exact", limit, window_ms, cost, "r", exact=True)]), now_ms)
        ours.append(outcome.allowed)
    assert ours == theirs
    assert 0 < sum(ours) < len(ours)


@pytest.mark.parametrize("limit", [1, 5, 20])
async def test_exact_never_admits_more_than_limit_in_any_window(store: Any, limit: int) -> None:
    """Catches an exact rate that lets a burst through across a window edge, the known weakness of
    the sliding-window counter it replaces.

    Schedule: `2 x limit` hits in the last millisecond of a window, then one hit per millisecond for
    the whole next window. Measured on the memory store (window 1000 ms): the sliding window admits
    10 hits in one window for a limit of 5, 20 for 10 and 200 for 100, that is 2 x limit (limit at
    the edge, then limit more while the previous window's weight fades); a greedy client hitting
    every millisecond gets limit + 1. The exact rate admits `limit`, and no more, in every window.
    """
    window_ms = 1000
    base = 10_000_000
    times = [base + window_ms - 1] * (2 * limit) + list(range(base + window_ms, base + 2 * window_ms))

    async def admitted(s: Any, exact: bool) -> list[int]:
        op = RateOp(f"q:{{t}}:r:burst:{int(exact)}", limit, window_ms, 1, "r", exact=exact)
        return [t for t in times if (await s.run(Program([op]), t)).allowed]

    exact = await admitted(store, True)
    assert most_in_a_window(exact, window_ms) == limit
    # The edge burst fills the log, which stays full through the closed window [t, t + window].
    assert exact == [base + window_ms - 1] * limit
    sliding = await admitted(MemoryStore(), False)
    assert most_in_a_window(sliding, window_ms) == 2 * limit


async def test_exact_limit_holds_under_random_traffic(store: Any) -> None:
    """Catches an exact rate exceeding its limit in some window under random bursts and costs."""
    window_ms, limit = 700, 4
    rng = random.Random(11)
    t, admitted = 5_000_000, []
    for _ in range(600):
        t += rng.choice([0, 0, 1, 13, 100, 350, 699, 700, 701])
        cost = rng.choice([1, 1, 2, 3])
        if (await store.run(Program([RateOp("q:{t}:r:rand", limit, window_ms, cost, "r", exact=True)]), t)).allowed:
            admitted.extend([t] * cost)
    assert most_in_a_window(admitted, window_ms) == limit


@pytest.mark.parametrize("cost", [1, 2])
async def test_retry_after_of_an_exact_refusal_is_exact(store: Any, cost: int) -> None:
    """Catches a Retry-After that is early (the retry is refused again) or late (a client made to
    wait longer than the log requires), including when a cost of 2 needs the two oldest hits gone."""
    op = RateOp("q:{t}:r:retry", 3, 1000, cost, "r", exact=True)
    one = RateOp("q:{t}:r:retry", 3, 1000, 1, "r", exact=True)
    base = 9_000_000
    for offset in (0, 150, 400):
        assert (await store.run(Program([one]), base + offset)).allowed
    now = base + 700
    refused = await store.run(Program([op]), now)
    assert refused.refusal is not None and refused.refusal.kind == "rate"
    wait = refused.refusal.retry_after_ms
    # The oldest hit (cost 1) or the two oldest (cost 2) must age out: at t + 1000 they still count.
    oldest_needed = base + (0 if cost == 1 else 150)
    assert wait == oldest_needed + 1000 + 1 - now
    assert not (await store.run(Program([op]), now + wait - 1)).allowed
    assert (await store.run(Program([op]), now + wait)).allowed


async def test_refused_exact_hits_consume_nothing(store: Any) -> None:
    """Catches a refused hit being logged: a flood of refusals must not push the retry time later."""
    op = RateOp("q:{t}:r:flood", 2, 1000, 1, "r", exact=True)
    base = 3_000_000
    assert (await store.run(Program([op]), base)).allowed
    assert (await store.run(Program([op]), base + 10)).allowed
    for t in range(base + 20, base + 1000, 7):
        assert not (await store.run(Program([op]), t)).allowed
    assert (await store.run(Program([op]), base + 1001)).allowed


async def test_hits_dated_alike_landing_out_of_order_both_count(store: Any) -> None:
    """Catches two hits of one instant sharing a name in the Redis log: two workers dated A and C
    at 60,000; B (60,011) landed between them and trimmed two old hits, so C was logged under A's
    name and lost, and a fourth hit passed a limit of 3 in one window (found by the audit of
    2026-12-02). Every store decides the same."""
    op = RateOp("q:{t}:r:broadcast", 3, 60_000, 1, "r", exact=True)
    base = 4_000_000
    decided = [
        (await store.run(Program([op]), base + t)).allowed for t in (0, 10, 60_000, 60_011, 60_000, 60_012, 60_013)
    ]
    assert decided == [True, True, True, True, True, False, False]
