"""WebSocket relay: the client's handshake is answered only once the upstream accepted, then frames
flow both ways until either side closes; the close code crosses over."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from quota.proxy.app import ProxyApp

log = logging.getLogger("quota.proxy")
# 1011: the server met an unexpected condition (RFC 6455 §7.4.1), here the upstream's.
UPSTREAM_FAILED = 1011


async def relay(proxy: ProxyApp, scope: Scope, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    try:
        upstream = await proxy.session().ws_connect(
            proxy.target(scope),
            protocols=scope.get("subprotocols") or (),
            headers=proxy.headers_for(scope, websocket=True),
            autoping=True,
            max_msg_size=proxy.upstream.max_body_bytes,
        )
    except aiohttp.WSServerHandshakeError as exc:
        # The upstream refused the connection: refuse the client's handshake too (HTTP 403).
        log.info("upstream refused a websocket: %s (%s)", scope["path"], exc.status)
        await send({"type": "websocket.close", "code": 1008})
        return
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        log.warning("upstream unreachable for a websocket: %s: %s", scope["path"], exc.__class__.__name__)
        await send({"type": "websocket.close", "code": UPSTREAM_FAILED})
        return
    async with upstream:
        await send({"type": "websocket.accept", "subprotocol": upstream.protocol})
        client_side = asyncio.ensure_future(_client_to_upstream(receive, upstream))
        upstream_side = asyncio.ensure_future(_upstream_to_client(upstream, send))
        try:
            done, _ = await asyncio.wait((client_side, upstream_side), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (client_side, upstream_side):
                task.cancel()
            await asyncio.gather(client_side, upstream_side, return_exceptions=True)
        if upstream_side in done and not upstream_side.cancelled() and upstream_side.exception() is None:
            # The upstream closed first: pass its close code on to the client, who is still there.
            await send({"type": "websocket.close", "code": upstream_side.result()})


async def _client_to_upstream(receive: Receive, upstream: aiohttp.ClientWebSocketResponse) -> None:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            if message.get("text") is not None:
                await upstream.send_str(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send_bytes(message["bytes"])
        elif kind == "websocket.disconnect":
            await upstream.close(code=message.get("code", 1000))
            return


async def _upstream_to_client(upstream: aiohttp.ClientWebSocketResponse, send: Send) -> int | None:
    """Relay until the upstream closes; the close code to send the client, or None if it left first."""
    async for frame in upstream:
        if frame.type == aiohttp.WSMsgType.TEXT:
            await send({"type": "websocket.send", "text": frame.data})
        elif frame.type == aiohttp.WSMsgType.BINARY:
            await send({"type": "websocket.send", "bytes": frame.data})
        elif frame.type == aiohttp.WSMsgType.ERROR:
            return UPSTREAM_FAILED
    if upstream.close_code is None:
        return UPSTREAM_FAILED
    return upstream.close_code
