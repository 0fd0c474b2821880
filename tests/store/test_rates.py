"""The sliding-window counter of both stores, checked against the `limits` library's own
implementation of the same algorithm (a differential test), and against each other."""

from __future__ import annotations

import random
from typing import Any
from unittest import mock

import pytest
import redis as redis_sync
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from quota.store.memory import MemoryStore
from quota.store.program import Program, RateOp
from quota.store.redis import RedisStore
from tests.conftest import RedisServer


def schedule(seed: int, n: int = 400) -> list[int]:
    """Bursts and pauses across window boundaries.

    limits computes the weight of the previous window in floats: where the exact weighted count is
    a whole number (say 5 x 0.4 = 2) it can come out a hair below and floor one lower, letting one
    more hit through. quota counts in integers. The schedule avoids those instants by keeping the
    time left in the window coprime to 10 (so prev x left / 1000 is never whole for prev < 1000);
    test_exact_at_whole_weights pins quota's behaviour there.
    """
    rng = random.Random(seed)
    # In the future: limits' memory storage expires keys on a timer that reads the real clock.
    t, out = 2_000_000_000_000, []
    for _ in range(n):
        t += rng.choice([0, 1, 3, 7, 20, 60, 150, 400, 900, 1300])
        while (1000 - t % 1000) % 2 == 0 or (1000 - t % 1000) % 5 == 0:
            t += 1
        out.append(t)
    return out


@pytest.mark.parametrize(
    ("seed", "limit", "alone"),
    [*((seed, limit, True) for seed in range(6) for limit in (1, 3, 5)), (6, 1, False), (7, 5, False)],
)
async def test_same_decisions_as_limits(store: Any, seed: int, limit: int, alone: bool) -> None:
    """Every hit of a random schedule is allowed or refused exactly as limits' sliding window decides:
    a rate alone (the memory store's shortcut) and a rate beside another (a program's checks and writes)."""
    item = RateLimitItemPerSecond(limit, 1)
    ours, theirs = [], []
    reference = SlidingWindowCounterRateLimiter(MemoryStorage())
    beside = [] if alone else [RateOp("q:{t}:r:other", 1 << 20, 60_000, 1, "r")]
    for now_ms in schedule(seed):
        # limits reads the wall clock; feed it the same instant, in whole milliseconds.
        with mock.patch("time.time", return_value=now_ms / 1000):
            theirs.append(await reference.hit(item, "k"))
        outcome = await store.run(Program([RateOp("q:{t}:r:k", limit, 1000, 1, "r"), *beside]), now_ms)
        ours.append(outcome.allowed)
    assert ours == theirs
    assert 0 < sum(ours) < len(ours)


@pytest.mark.parametrize("seed", range(2))
async def test_one_program_sent_again_decides_each_time(store: Any, seed: int) -> None:
    """A read route's program is built once per client and sent on each of its requests (Redis sends
    its cached encoding): each run reads its own clock, and a dry run in between counts nothing."""
    item = RateLimitItemPerSecond(3, 1)
    reference = SlidingWindowCounterRateLimiter(MemoryStorage())
    program = Program([RateOp("q:{t}:r:again", 3, 1000, 1, "r")])
    ours, theirs = [], []
    for now_ms in schedule(seed, 200):
        with mock.patch("time.time", return_value=now_ms / 1000):
            theirs.append(await reference.hit(item, "k"))
        await store.run(program, now_ms, dry=True)
        ours.append((await store.run(program, now_ms)).allowed)
    assert ours == theirs
    assert 0 < sum(ours) < len(ours)


@pytest.mark.parametrize("alone", [True, False])
async def test_a_late_hit_counts_in_its_own_window(store: Any, alone: bool) -> None:
    """A hit dated a window late (a body that came in slowly, its clock read after it) counts in the
    window it is dated in, which the next window weighs: catches it dropped, or counted as a hit of now."""
    base = 7_000_000_000
    op = RateOp("q:{t}:r:k", 5, 1000, 1, "r")
    beside = [] if alone else [RateOp("q:{t}:r:other", 1 << 20, 60_000, 1, "r")]
    remaining = []
    for now_ms in (base + 1100, base + 1100, base + 1100, base + 900, base + 900, base + 1100):
        outcome = await store.run(Program([op, *beside]), now_ms)
        assert outcome.allowed
        remaining.append(outcome.rates[0].remaining)
    # The two late ones saw their own window empty (4, 3 left); then they weigh 2 x 900/1000, 1.
    assert remaining == [4, 3, 2, 4, 3, 0]


async def allowed_of(store: Any, op: RateOp, now_ms: int, tries: int) -> int:
    return sum([(await store.run(Program([op]), now_ms)).allowed for _ in range(tries)])


async def test_a_clock_stepped_back_still_counts(store: Any) -> None:
    """Catches hits dated well before the newest window (the clock stepped back: NTP, a VM resumed)
    counted nowhere, the limit gone until the clock catches up: 5 of 50, as in a fresh window."""
    base = 7_000_000_000
    op = RateOp("q:{t}:r:k", 5, 1000, 1, "r")
    assert (await store.run(Program([op]), base + 5500)).allowed
    assert await allowed_of(store, op, base + 2500, 50) == 5


@pytest.mark.parametrize("windows", [(1000, 60_000), (60_000, 1000)])
async def test_a_window_changed_under_one_key_still_limits(store: Any, windows: tuple[int, int]) -> None:
    """Catches a rate whose window grew (or shrank) under the same name, a plan changed from per
    second to per minute, counting nowhere: its windows start afresh, and hold at the limit."""
    base = 7_000_000_000
    before, after = (RateOp("q:{t}:r:k", 5, window, 1, "r") for window in windows)
    assert await allowed_of(store, before, base + 500, 3) == 3
    assert await allowed_of(store, after, base + 600, 20) == 5


async def test_a_late_hit_reads_the_window_before_its_own(store: Any) -> None:
    """A hit dated in the window before the newest, the newest two windows after the last busy one,
    weighs that busy window: 4 x 750/1000, 3 of 5, so two more fit. Catches it read as empty."""
    base = 7_000_000_000
    op = RateOp("q:{t}:r:k", 5, 1000, 1, "r")
    for now_ms in (base + 100, base + 100, base + 100, base + 100, base + 2100):
        assert (await store.run(Program([op]), now_ms)).allowed
    assert await allowed_of(store, op, base + 1250, 50) == 2


@pytest.mark.redis
@pytest.mark.parametrize("seed", range(4))
async def test_late_hits_decide_as_in_redis(redis_server: RedisServer, seed: int) -> None:
    """Hits arriving up to a window late (calls reordered on their way), across window boundaries
    and gaps: the memory store allows and refuses each exactly as the Redis script does."""
    redis_server.flush()
    redis = RedisStore(redis_server.url, timeout_ms=2000)
    memory = MemoryStore()
    rng = random.Random(seed)
    newest, decided = 7_000_000_000, []
    try:
        for _ in range(300):
            newest += rng.choice([0, 3, 40, 300, 900, 1700, 2600])
            now_ms = newest - rng.choice([0, 0, 0, 5, 250, 999])
            op = RateOp("q:{t}:r:late", 4, 1000, 1, "r")
            ours = await memory.run(Program([op]), now_ms)
            theirs = await redis.run(Program([op]), now_ms)
            decided.append(ours.allowed)
            assert (ours.allowed, ours.rates) == (theirs.allowed, theirs.rates), (now_ms, len(decided))
    finally:
        await redis.close()
    assert 0 < sum(decided) < len(decided)


async def test_refusal_reports_retry_after(store: Any) -> None:
    """A refused hit says when the next one will pass, and that hit does pass then."""
    op = RateOp("q:{t}:r:x", 3, 1000, 1, "r")
    now = 5_000_250
    for _ in range(3):
        assert (await store.run(Program([op]), now)).allowed
    refused = await store.run(Program([op]), now)
    assert refused.refusal is not None and refused.refusal.kind == "rate"
    wait = refused.refusal.retry_after_ms
    assert not (await store.run(Program([op]), now + wait - 1)).allowed
    assert (await store.run(Program([op]), now + wait)).allowed


async def test_exact_at_whole_weights(store: Any) -> None:
    """At 60% into a window, 5 previous hits weigh exactly 2: with 3 current, a 5/s limit is full."""
    op = RateOp("q:{t}:r:w", 5, 1000, 1, "r")
    base = 7_000_000
    for _ in range(5):
        assert (await store.run(Program([op]), base + 100)).allowed
    for _ in range(3):
        assert (await store.run(Program([op]), base + 1000 + 500)).allowed
    assert not (await store.run(Program([op]), base + 1000 + 600)).allowed
    assert (await store.run(Program([op]), base + 1000 + 801)).allowed


async def test_every_counter_in_redis_expires(redis_server: RedisServer) -> None:
    """A window's counter is dated when a hit makes it, not again on every hit: from its first hit
    on it expires, after the next window has read it, whatever hits follow (one program hitting it
    twice included); nothing the rates write is left without a TTL."""
    redis_server.flush()
    store = RedisStore(redis_server.url, timeout_ms=2000)
    probe = redis_sync.Redis(port=redis_server.port)
    op = RateOp("q:{t}:r:dated", 100, 1000, 1, "r")
    twice = Program([RateOp("q:{t}:r:dated", 100, 1000, 2, "r"), op])
    now = 9_000_000_100
    try:
        counter = f"q:{{t}}:r:dated:{now // 1000}"
        assert (await store.run(Program([op]), now)).allowed
        made = probe.pttl(counter)
        # Two windows and a second: alive while the next window weighs it.
        assert 2_000 < made <= 3_000
        for step in range(1, 6):
            assert (await store.run(Program([op]), now + step)).allowed
        assert (await store.run(twice, now + 10)).allowed
        assert int(probe.get(counter) or 0) == 1 + 5 + 3
        assert 0 < probe.pttl(counter) <= made
        # A new window's counter, made by a program that hits it twice, is dated too.
        assert (await store.run(twice, now + 1_000)).allowed
        assert int(probe.get(f"q:{{t}}:r:dated:{now // 1000 + 1}") or 0) == 3
        keys = list(probe.scan_iter("q:{t}:r:*"))
        assert len(keys) == 2
        assert all(probe.pttl(key) > 0 for key in keys)
    finally:
        probe.close()
        await store.close()
