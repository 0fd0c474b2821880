"""A misbehaving upstream for the proxy tests, served by uvicorn in its own process:
`uvicorn tests.upstreams:app`. Each route does one thing a real gateway may do to a proxy."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

Scope = dict[str, Any]
_released = asyncio.Event()


async def _json(send: Any, payload: Any, status: int = 200, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "websocket":
        await _websocket(scope, receive, send)
        return
    path = scope["path"]
    if path == "/echo":
        body = await _body(receive)
        headers: dict[str, list[str]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode(), []).append(value.decode())
        payload = {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode(),
            "query": scope["query_string"].decode(),
            "headers": headers,
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "peer_port": scope["client"][1],
        }
        # A hop-by-hop header named in Connection, which must not reach the client.
        await _json(send, payload, extra=[(b"x-hop", b"1"), (b"connection", b"x-hop"), (b"x-kept", b"1")])
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
        # The rest waits until the test, holding the first chunk, calls /stream/release: the first
        # chunk cannot have been held back until the end.
        await asyncio.wait_for(_released.wait(), 10)
        _released.clear()
        await send({"type": "http.response.body", "body": b"second\n"})
    elif path == "/stream/release":
        _released.set()
        await _json(send, {"released": True})
    elif path == "/slow":
        # Never answers: waits until the proxy, past its read timeout, drops the connection.
        await _body(receive)
        await receive()
    elif path.endswith("/contacts/users/" + path.rsplit("/", 1)[-1]) and scope["method"] == "POST":
        # A counted route whose upstream dies mid-response: headers and half a body, then the
        # connection drops (uvicorn closes it when the app raises after the response started).
        await _body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"entities": [', "more_body": True})
        raise RuntimeError("the upstream died mid-response (on purpose)")
    else:
        await _json(send, {"error": "service_resource_not_found"}, status=404)


async def _websocket(scope: Scope, receive: Any, send: Any) -> None:
    message = await receive()
    assert message["type"] == "websocket.connect"
    if scope["path"] == "/ws-refuse":
        await send({"type": "websocket.close", "code": 1008})
        return
    protocols = scope.get("subprotocols") or []
    await send({"type": "websocket.accept", "subprotocol": protocols[0] if protocols else None})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text == "close-4001":
            await send({"type": "websocket.close", "code": 4001})
            return
        if text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes", b"")[::-1]})
