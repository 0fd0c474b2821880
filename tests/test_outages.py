"""Redis goes away under load and comes back: the outage policy holds, nothing leaks to clients."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from quota.config import load_config
from quota.serve import build_app
from quota.store.redis import RedisStore
from tests.conftest import RedisServer
from tests.helpers import entitlements, register

pytestmark = pytest.mark.redis
PRO = "demo/pro"


class CountingStore(RedisStore):
    """The real Redis store, counting the calls that reached the network and failed."""

    failed = 0

    async def run(self, program: Any, now_ms: int) -> Any:
        try:
            return await super().run(program, now_ms)
        except Exception:
            self.failed += 1
            raise


async def test_kill_and_restart_redis_under_load() -> None:
    """Reads fail open, counted writes fail closed with 503, no exception reaches a client, a dead
    Redis is not called on every request, and enforcement resumes within two seconds of a restart."""
    server = RedisServer()
    server.start()
    store = CountingStore(server.url, timeout_ms=200)
    app = build_app(load_config(), store=store)
    log: list[tuple[float, str, int, dict[str, Any]]] = []
    try:
        transport = httpx.ASGITransport(app=app, client=("10.7.7.7", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            await register(client, PRO, ["owner", *[f"p{i}" for i in range(800)]])
            stop = time.monotonic() + 5.0

            async def reads() -> None:
                while time.monotonic() < stop:
                    r = await client.get(f"/{PRO}/users/owner")
                    log.append((time.monotonic(), "read", r.status_code, r.json()))
                    await asyncio.sleep(0.015)

            async def writes() -> None:
                i = 0
                while time.monotonic() < stop:
                    r = await client.post(f"/{PRO}/users/owner/contacts/users/p{i}")
                    log.append((time.monotonic(), "write", r.status_code, r.json()))
                    i += 1
                    await asyncio.sleep(0.015)

            async def outage() -> tuple[float, float]:
                await asyncio.sleep(0.7)
                down = time.monotonic()
                server.stop()
                await asyncio.sleep(1.5)
                server.start()  # same port, no persistence: counters and scripts are gone
                return down, time.monotonic()

            _, _, (down, up) = await asyncio.gather(reads(), writes(), outage())
            during = [e for e in log if down + 0.3 < e[0] < up]
            after = [e for e in log if e[0] > up]
            # No 5xx but the policy's 503s, and those only on counted writes, with the IM body.
            assert {s for _, _, s, _ in log} <= {200, 429, 503}
            assert all(
                kind == "write" and body["error"] == "service_unavailable" for _, kind, s, body in log if s == 503
            )
            assert any(s == 503 for _, kind, s, _ in during if kind == "write")
            assert all(s == 200 for _, kind, s, _ in during if kind == "read")
            # The breaker: far fewer calls reached the dead Redis than requests were made.
            assert store.failed < len(during) / 3
            resumed = min(t for t, kind, s, _ in after if kind == "write" and s == 200)
            assert resumed - up < 2.0
            assert all(s == 200 for t, kind, s, _ in after if kind == "write" and t > up + 2.0)
            # Enforcement resumed from an empty Redis: exactly the friends added since count.
            counted = sum(1 for t, kind, s, _ in after if kind == "write" and s == 200)
            ent = await entitlements(client, PRO, user="owner")
            assert ent["entities"]["user:owner"]["friends_per_user"]["used"] == counted
            metrics = (app.metrics.render()).decode()
            assert 'outcome="unchecked"' in metrics and "quota_errors_total" in metrics
    finally:
        await store.close()
        server.stop()


async def test_per_rule_outage_policy(config_dir: Any) -> None:
    """A route marked `outage: open` lets counted writes through, unchecked, while Redis is down."""
    import yaml

    path = config_dir / "routes.yaml"
    doc = yaml.safe_load(path.read_text())
    for route in doc["routes"]:
        if route["name"] == "contacts.add":
            route["outage"] = "open"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    server = RedisServer()
    server.start()
    store = RedisStore(server.url, timeout_ms=200)
    app = build_app(load_config(config_dir), store=store)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            await register(client, PRO, ["a", "b", "c"])
            server.stop()
            assert (await client.post(f"/{PRO}/users/a/contacts/users/b")).status_code == 200
            r = await client.post(f"/{PRO}/chatgroups", json={"owner": "a"})
            assert r.status_code == 503 and r.json()["error"] == "service_unavailable"
    finally:
        await store.close()
        server.stop()
