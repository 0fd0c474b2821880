"""The local deny cache serves flood refusals without the store, and changes no decision."""

from __future__ import annotations

import random
from typing import Any

import pytest

from quota.config import load_config
from quota.keys import app_prefix, rate_key
from quota.serve import build_app
from quota.store.memory import MemoryStore
from quota.store.program import Program, RateOp
from tests.conftest import Clock, asgi_client


class CountingStore:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def run(self, program: Program, now_ms: int) -> Any:
        self.calls += 1
        return await self.inner.run(program, now_ms)


@pytest.mark.parametrize("seed", range(3))
async def test_same_decisions_fewer_calls(store: Any, seed: int) -> None:
    """Two gateway processes with their own caches, sharing one store, under a random flood: every
    decision equals the store's own decision without any cache, and most refusals never reach it."""
    counting = CountingStore(store)
    clock = Clock(tick=0)
    apps = [build_app(load_config(), store=counting) for _ in range(2)]
    for app in apps:
        app.clock = clock
    reference = MemoryStore()
    key = rate_key(app_prefix("demo#pro"), "users.get", "rest_per_ip", "10.0.0.1")
    rng = random.Random(seed)
    got, expected = [], []
    clients = [asgi_client(a, ("10.0.0.1", 1), "http://g") for a in apps]
    try:
        for _ in range(1500):
            # Bursts well over 100/s, with pauses that let the window drain.
            clock.advance(rng.choice([0.0] * 30 + [0.001] * 5 + [0.01, 0.05, 0.2]))
            r = await rng.choice(clients).get("/demo/pro/users/nobody")
            got.append(r.status_code != 429)
            op = RateOp(key, 100, 1000, 1, "rest_per_ip")
            expected.append((await reference.run(Program([op]), int(clock.now * 1000))).allowed)
    finally:
        for c in clients:
            await c.aclose()
    assert got == expected
    refusals = got.count(False)
    assert refusals > 300
    assert counting.calls < len(got) - refusals / 2
    assert sum(a.metrics.local_refusals for a in apps) > refusals / 2
