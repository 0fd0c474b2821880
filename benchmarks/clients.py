"""The proxy with httpx as its upstream client instead of aiohttp: kept here so the choice of
client (benchmarks/RESULTS.md, "Proxy") can be measured again. HTTP only; same streaming."""

from __future__ import annotations

import time
from typing import Any

import httpx

from quota.proxy.app import ProxyApp, Upstream
from quota.proxy.errors import BAD_GATEWAY, GATEWAY_TIMEOUT, UpstreamBroken, send_error
from quota.proxy.headers import client_response_headers


class HttpxProxyApp(ProxyApp):
    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream)
        limits = httpx.Limits(max_connections=upstream.connections, keepalive_expiry=upstream.keepalive)
        timeout = httpx.Timeout(upstream.read_timeout, connect=upstream.connect_timeout)
        self.client = httpx.AsyncClient(limits=limits, timeout=timeout)

    async def _http(self, scope: Any, receive: Any, send: Any) -> None:
        started = time.time()
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k, v) for k, v in self.headers_for(scope).items()]
        request = self.client.build_request(scope["method"], str(self.target(scope)), headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            await send_error(GATEWAY_TIMEOUT, "the upstream gateway did not answer in time", send, started)
            return
        except httpx.HTTPError:
            await send_error(BAD_GATEWAY, "the upstream gateway could not be reached", send, started)
            return
        try:
            raw = [(k, v) for k, v in response.headers.raw]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": client_response_headers(raw)}
            )
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                raise UpstreamBroken(str(exc)) from None
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()
