"""A `quota serve`-like process for race tests: the reference gateway seeded with group 777 and
users u0..u9, wrapped in the middleware on the Redis in QUOTA_TEST_REDIS. A request carrying
`x-test-hold: <key>` waits inside the upstream, after quota's checks, until the test sets that
Redis key (at most 30 s), so a test can order a race between processes without a fixed sleep.
Run: `python -m uvicorn tests.race_server:app --port P`."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis.asyncio as aioredis

from quota.config import load_config
from quota.gateway import create_gateway
from quota.gateway.app import AppState
from quota.serve import build_app

GROUP = "777"


def _gateway() -> Any:
    gateway = create_gateway()
    state = gateway.state.gateway.apps.setdefault("demo#pro", AppState())
    for i in range(10):
        state.users[f"u{i}"] = 0.0
    state.groups[GROUP] = {"name": GROUP, "owner": "u0", "members": set()}

    async def holding(scope: Any, receive: Any, send: Any) -> None:
        for name, value in scope.get("headers", []):
            if name == b"x-test-hold":
                client = aioredis.Redis.from_url(os.environ["QUOTA_TEST_REDIS"])
                deadline = time.monotonic() + 30
                try:
                    while not await client.exists(value.decode()) and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                finally:
                    await client.aclose()
        await gateway(scope, receive, send)

    return holding


app = build_app(
    load_config(os.environ.get("QUOTA_TEST_CONFIG")), redis_url=os.environ["QUOTA_TEST_REDIS"], upstream=_gateway()
)
