"""The variants measured, each as an ASGI app on the same route of the same upstream: the reference
gateway, or (scenario `trivial`) a Starlette route that answers a 49-byte JSON, so that what is left
is the limiter's own cost.

bare          the reference gateway alone
quota-memory  wrapped in QuotaMiddleware on the in-memory store
quota-redis   wrapped in QuotaMiddleware on Redis
slowapi       SlowAPIASGIMiddleware with an equivalent default limit on the same Redis
limits-asgi   a minimal pure-ASGI middleware calling limits' async sliding-window hit once

Run only when named (`--variants bare,quota-memory,quota-headers`):
quota-headers  quota-memory with `ratelimit_headers: true` (what the RateLimit headers cost)
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from quota.config import DEFAULT_DIR, load_config
from quota.gateway import create_gateway
from quota.serve import build_app

VARIANTS = ("bare", "quota-memory", "quota-redis", "slowapi", "limits-asgi")
EXTRA_VARIANTS = ("quota-headers",)
SCENARIOS = ("trivial", "read", "write", "login", "flood")
TRIVIAL_BODY = b'{"action":"get","entities":[{"username":"u001"}]}'
assert len(TRIVIAL_BODY) == 49
USERS = 2000
GROUP = "777"
# Every scenario but the flood runs under a rate no request reaches, so all of them do the full
# work; the flood runs at the seed's 100/s per IP, with one client far over it.
OPEN_RATE, FLOOD_RATE = 1_000_000, 100


def limit_of(scenario: str) -> int:
    return FLOOD_RATE if scenario == "flood" else OPEN_RATE


def request_of(scenario: str) -> tuple[str, str, str | None]:
    """(method, path, body) of one request; write and login vary the user per request in wrk."""
    if scenario in ("trivial", "read", "flood"):
        return "GET", "/demo/pro/users/u1", None
    if scenario == "write":
        return "POST", f"/demo/pro/chatgroups/{GROUP}/users/u1", None
    return "POST", "/demo/pro/token", json.dumps({"username": "u1"})


def config_dir(scenario: str) -> Path:
    """The shipped config with the scenario's rate, in a directory removed when this process exits."""
    root = Path(tempfile.mkdtemp(prefix=f"quota-bench-{scenario}-"))
    atexit.register(shutil.rmtree, root, True)
    target = root / "config"
    shutil.copytree(DEFAULT_DIR, target)
    plans = target / "plans.yaml"
    doc = yaml.safe_load(plans.read_text())
    for plan in doc["plans"].values():
        plan["rates"]["rest_per_ip"] = f"{limit_of(scenario)}/second"
    plans.write_text(yaml.safe_dump(doc, allow_unicode=True))
    settings = "trusted_proxies: []\n"
    # Under valgrind a store call seems fifty times slower to quota (benchmarks/instructions.py):
    # a store timeout of the real run's would answer 503s and count their work instead.
    timeout_ms = os.environ.get("QUOTA_BENCH_STORAGE_TIMEOUT_MS")
    if timeout_ms:
        settings += f"storage_timeout_ms: {int(timeout_ms)}\n"
    (target / "quota.yaml").write_text(settings)
    return target


def gateway() -> Any:
    """The reference gateway, with the users and the group the scenarios touch."""
    app = create_gateway()
    from quota.gateway.app import AppState

    state = app.state.gateway.apps.setdefault("demo#pro", AppState())
    for i in range(USERS):
        state.users[f"u{i}"] = 0.0
    state.groups[GROUP] = {"name": GROUP, "owner": "u0", "members": set()}
    return app


def trivial() -> Any:
    """A Starlette app whose one route answers the same 49 bytes: the upstream that costs least."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def user(request: Request) -> Response:
        return Response(TRIVIAL_BODY, media_type="application/json")

    return Starlette(routes=[Route("/{org}/{app}/users/{username}", user)])


def build(variant: str, scenario: str, redis_url: str) -> Any:
    upstream = trivial() if scenario == "trivial" else gateway()
    if variant == "bare":
        return upstream
    if variant in ("quota-memory", "quota-redis"):
        cfg = load_config(config_dir(scenario))
        return build_app(cfg, redis_url=redis_url if variant == "quota-redis" else None, upstream=upstream)
    if variant == "quota-headers":
        target = config_dir(scenario)
        (target / "quota.yaml").write_text("trusted_proxies: []\nratelimit_headers: true\n")
        return build_app(load_config(target), upstream=upstream)
    if variant == "slowapi":
        from slowapi import Limiter
        from slowapi.middleware import SlowAPIASGIMiddleware
        from slowapi.util import get_remote_address

        limiter = Limiter(
            key_func=get_remote_address,
            default_limits=[f"{limit_of(scenario)}/second"],
            storage_uri=redis_url,
            strategy="sliding-window-counter",
        )
        upstream.state.limiter = limiter
        from slowapi import _rate_limit_exceeded_handler
        from slowapi.errors import RateLimitExceeded

        upstream.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
        # As slowapi's docs add it: inside the Starlette app, which puts itself in scope["app"].
        upstream.add_middleware(SlowAPIASGIMiddleware)
        return upstream
    if variant == "limits-asgi":
        return LimitsASGI(upstream, redis_url, limit_of(scenario))
    raise ValueError(variant)


class LimitsASGI:
    """What a careful user writes with `limits` alone: one async sliding-window hit per request."""

    def __init__(self, app: Any, redis_url: str, per_second: int) -> None:
        from limits import RateLimitItemPerSecond
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import SlidingWindowCounterRateLimiter

        self.app = app
        self.item = RateLimitItemPerSecond(per_second, 1)
        self.limiter = SlidingWindowCounterRateLimiter(RedisStorage("async+" + redis_url, implementation="redispy"))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("", 0)
        if not await self.limiter.hit(self.item, client[0], scope["path"]):
            await send({"type": "http.response.start", "status": 429, "headers": [(b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": b'{"error": "reach_limit"}'})
            return
        await self.app(scope, receive, send)
