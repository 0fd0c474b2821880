"""WebSocket relay: the client's handshake is answered only once the upstream accepted, then frames
flow both ways until either side closes; the close code crosses over. The upstream side is the
`websockets` client (uvicorn's own WebSocket implementation)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from quota.proxy.headers import connection_names_the_message

if TYPE_CHECKING:
    from quota.proxy.app import ProxyApp

log = logging.getLogger("quota.proxy")
# 1011: the server met an unexpected condition (RFC 6455 §7.4.1), here the upstream's.
UPSTREAM_FAILED = 1011


async def relay(proxy: ProxyApp, scope: Scope, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if connection_names_the_message(scope["headers"]):
        await send({"type": "websocket.close", "code": 1008})  # refused, as HTTP's is (a 403 here)
        return
    up = proxy.upstream
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in proxy.headers_for(scope, websocket=True)]
    try:
        upstream = await connect(
            proxy.ws_base + proxy.target(scope).decode("latin-1"),
            subprotocols=[Subprotocol(p) for p in scope["subprotocols"]] if scope.get("subprotocols") else None,
            additional_headers=headers,
            user_agent_header=None,
            # The client library's own settings would not be the client's: no proxy from the
            # environment, no compression negotiated on its behalf, no pings it did not send.
            proxy=None,
            compression=None,
            ping_interval=None,
            open_timeout=up.connect_timeout,
            max_size=up.max_body_bytes,
        )
    except InvalidStatus as exc:
        # The upstream refused the connection: refuse the client's handshake too (HTTP 403).
        log.info("upstream refused a websocket: %s (%s)", scope["path"], exc.response.status_code)
        await send({"type": "websocket.close", "code": 1008})
        return
    except (TimeoutError, OSError, InvalidHandshake) as exc:
        log.warning("upstream unreachable for a websocket: %s: %s", scope["path"], exc.__class__.__name__)
        await send({"type": "websocket.close", "code": UPSTREAM_FAILED})
        return
    async with upstream:
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
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


async def _client_to_upstream(receive: Receive, upstream: ClientConnection) -> None:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            if message.get("text") is not None:
                await upstream.send(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send(message["bytes"])
        elif kind == "websocket.disconnect":
            await upstream.close(code=message.get("code", 1000))
            return


async def _upstream_to_client(upstream: ClientConnection, send: Send) -> int:
    """Relay until the upstream closes; the close code to send the client."""
    try:
        async for frame in upstream:
            if isinstance(frame, str):
                await send({"type": "websocket.send", "text": frame})
            else:
                await send({"type": "websocket.send", "bytes": frame})
    except ConnectionClosed:
        pass
    code = upstream.close_code
    # 1005 (no code) and 1006 (abnormal) may not be sent in a close frame (RFC 6455 §7.4.1).
    return UPSTREAM_FAILED if code is None or code in (1005, 1006) else code
