"""Liveness and readiness, answered without a token (orchestrators and load balancers hold none).

GET {admin_prefix}/health   200 while the process serves requests
GET {admin_prefix}/ready    200 when the store answers and a config is loaded, else 503
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from quota.errors import StorageError
from quota.middleware import QuotaMiddleware


class Probes:
    """Answers the two probe paths in front of `app`, whose QuotaMiddleware is `middleware`."""

    def __init__(self, app: ASGIApp, middleware: QuotaMiddleware) -> None:
        self.app = app
        self.middleware = middleware

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            prefix = self.middleware.runtime.settings.admin_prefix
            path = scope["path"]
            if path == prefix + "/health":
                await _answer(send, 200, {"status": "ok"})
                return
            if path == prefix + "/ready":
                status, body = await self.readiness()
                await _answer(send, status, body)
                return
        await self.app(scope, receive, send)

    async def readiness(self) -> tuple[int, dict[str, object]]:
        rt = self.middleware.runtime
        # No path of the host's (the config directory): anyone may ask, with no token.
        body: dict[str, object] = {"routes": len(rt.routes.rules)}
        try:
            await asyncio.wait_for(rt.store.accounts_version(), rt.settings.storage_timeout_ms / 1000)
        except (TimeoutError, StorageError, OSError) as exc:
            return 503, {"status": "not_ready", "store": f"unreachable ({exc.__class__.__name__})", **body}
        return 200, {"status": "ready", "store": "ok", **body}


async def _answer(send: Send, status: int, payload: dict[str, object]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
