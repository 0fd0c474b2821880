"""The proxy with a general-purpose HTTP client (aiohttp or httpx) in place of its own pool
(quota/proxy/pool.py): kept here so the choice of client (benchmarks/RESULTS.md, "Proxy") can be
measured again. HTTP only; the same headers, streaming and error mapping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

import httpx

from quota.proxy.app import ProxyApp, Upstream
from quota.proxy.errors import BAD_GATEWAY, GATEWAY_TIMEOUT, UpstreamBroken, send_error
from quota.proxy.headers import client_response_headers


class AiohttpProxyApp(ProxyApp):
    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream)
        self.session: Any = None

    async def _http(self, scope: Any, receive: Any, send: Any) -> None:
        import aiohttp
        import yarl

        started = time.time()
        if self.session is None:
            up = self.upstream
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=up.connections, keepalive_timeout=up.keepalive),
                timeout=aiohttp.ClientTimeout(total=None, connect=up.connect_timeout, sock_read=up.read_timeout),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        body = await _read(receive)
        url = f"http://{self.upstream.host}:{self.upstream.port}" + self.target(scope).decode("latin-1")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.headers_for(scope)]
        try:
            response = await self.session.request(
                scope["method"], yarl.URL(url, encoded=True), headers=headers, data=body or None
            )
        except (TimeoutError, aiohttp.ServerTimeoutError):
            await send_error(GATEWAY_TIMEOUT, "the upstream gateway did not answer in time", send, started)
            return
        except (aiohttp.ClientError, OSError):
            await send_error(BAD_GATEWAY, "the upstream gateway could not be reached", send, started)
            return
        async with response:
            raw = client_response_headers(response.raw_headers)
            await send({"type": "http.response.start", "status": response.status, "headers": raw})
            try:
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise UpstreamBroken(str(exc)) from None
            await send({"type": "http.response.body", "body": b""})


async def _read(receive: Any) -> bytes:
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


class HttpxProxyApp(ProxyApp):
    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream)
        limits = httpx.Limits(max_connections=upstream.connections, keepalive_expiry=upstream.keepalive)
        timeout = httpx.Timeout(upstream.read_timeout, connect=upstream.connect_timeout)
        self.client = httpx.AsyncClient(limits=limits, timeout=timeout)

    async def _http(self, scope: Any, receive: Any, send: Any) -> None:
        started = time.time()
        body = await _read(receive)
        url = f"http://{self.upstream.host}:{self.upstream.port}" + self.target(scope).decode("latin-1")
        request = self.client.build_request(scope["method"], url, headers=self.headers_for(scope), content=body)
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


async def _drive(app: ProxyApp, total: int, concurrency: int) -> float:
    """CPU seconds of this process per request, the proxy app called directly (no server around it)."""

    async def one() -> None:
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/demo/pro/users/u1",
            "raw_path": b"/demo/pro/users/u1",
            "query_string": b"",
            "headers": [(b"host", b"bench"), (b"accept", b"*/*")],
            "client": ("127.0.0.1", 5000),
            "scheme": "http",
        }
        await app(scope, receive, send)
        assert sent[0]["status"] == 200, sent[:1]

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))  # warm the pool
    started = time.process_time()
    await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
    return (time.process_time() - started) / (total // concurrency * concurrency)


def main() -> None:
    """`python -m benchmarks.clients`: the proxy's own CPU per request with each upstream client,
    against the reference gateway in another process (pinned apart), under uvloop."""
    import argparse

    import uvloop

    from benchmarks.peers import start_gateway

    p = argparse.ArgumentParser(prog="python -m benchmarks.clients", description=main.__doc__)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args()
    gateway, base = start_gateway("read", "redis://127.0.0.1:1/0")
    try:
        upstream = Upstream(base)
        for name, make in (("own pool", ProxyApp), ("aiohttp", AiohttpProxyApp), ("httpx", HttpxProxyApp)):
            cpu = uvloop.run(_drive(make(upstream), args.requests, args.concurrency))
            print(f"{name:9s} {cpu * 1e6:7.1f} µs CPU per proxied request")
    finally:
        gateway.terminate()
        gateway.wait(10)


if __name__ == "__main__":
    main()
