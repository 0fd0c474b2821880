"""ProxyApp: an ASGI app that forwards HTTP and WebSocket to one upstream gateway over a pool of
keep-alive connections, streaming bodies both ways. Wrapped in QuotaMiddleware by `quota proxy`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from quota.proxy.errors import BAD_GATEWAY, GATEWAY_TIMEOUT, TOO_LARGE, UpstreamBroken, send_error
from quota.proxy.headers import Networks, client_response_headers, upstream_request_headers

log = logging.getLogger("quota.proxy")
CHUNK = 1 << 16


@dataclass(frozen=True)
class Upstream:
    """Where and how to reach the gateway. Timeouts in seconds; `keepalive` must stay below the
    upstream's own idle timeout (uvicorn's is 5 s), or a reused connection may be closed under us."""

    url: str
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    connections: int = 256
    keepalive: float = 4.0
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        parsed = URL(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"--upstream must be an http(s)://host[:port][/prefix] URL, found {self.url!r}")
        if parsed.query_string or parsed.fragment:
            raise ValueError(f"--upstream takes no query or fragment, found {self.url!r}")


class _TooLarge(Exception):
    pass


class ProxyApp:
    """Forwards every request to `upstream.url` + the request's path and query, as they came."""

    def __init__(self, upstream: Upstream, *, trusted: Networks = ()) -> None:
        self.upstream = upstream
        self.trusted = trusted
        base = URL(upstream.url)
        self._base = str(base.with_path(base.path.rstrip("/"))).rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            up = self.upstream
            connector = aiohttp.TCPConnector(limit=up.connections, keepalive_timeout=up.keepalive)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, connect=up.connect_timeout, sock_read=up.read_timeout),
                # Bodies pass through as the upstream encoded them, and only the client's headers go.
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            from quota.proxy.websocket import relay

            await relay(self, scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def target(self, scope: Scope) -> URL:
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        text = self._base + path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        return URL(text, encoded=True)

    def headers_for(self, scope: Scope, websocket: bool = False) -> aiohttp.typedefs.LooseHeaders:
        client = scope.get("client")
        return upstream_request_headers(
            scope["headers"],
            peer=client[0] if client else "",
            scheme=scope.get("scheme", "http"),
            trusted=self.trusted,
            websocket=websocket,
        )

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.time()
        limit = self.upstream.max_body_bytes
        declared = _content_length(scope["headers"])
        if declared is not None and declared > limit:
            await send_error(TOO_LARGE, f"request body over {limit} bytes", send, started)
            return
        method = scope["method"]
        has_body = declared is not None or any(n == b"transfer-encoding" for n, _ in scope["headers"])
        body = _stream(receive, limit) if has_body else None
        try:
            response = await self.session().request(
                method, self.target(scope), headers=self.headers_for(scope), data=body, allow_redirects=False
            )
        except _TooLarge:
            await send_error(TOO_LARGE, f"request body over {limit} bytes", send, started)
            return
        except (TimeoutError, aiohttp.ServerTimeoutError):
            log.warning("upstream timed out: %s %s", method, scope["path"])
            await send_error(GATEWAY_TIMEOUT, "the upstream gateway did not answer in time", send, started)
            return
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(exc.__cause__, _TooLarge) or isinstance(exc.__context__, _TooLarge):
                await send_error(TOO_LARGE, f"request body over {limit} bytes", send, started)
                return
            log.warning("upstream unreachable: %s %s: %s", method, scope["path"], exc.__class__.__name__)
            await send_error(BAD_GATEWAY, "the upstream gateway could not be reached", send, started)
            return
        async with response:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": client_response_headers(response.raw_headers),
                }
            )
            try:
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.warning("upstream broke off its response: %s %s: %s", method, scope["path"], exc.__class__.__name__)
                raise UpstreamBroken(str(exc)) from None
            await send({"type": "http.response.body", "body": b""})


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _stream(receive: Receive, limit: int) -> AsyncIterator[bytes]:
    """The client's body as it arrives, cut off (and the request failed) past `limit` bytes."""
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            # The client went away: stop the upstream request too.
            raise aiohttp.ClientConnectionError("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
