"""What a client gets when the upstream fails: IM-shaped bodies, never a stack trace."""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Receive, Scope, Send


class UpstreamBroken(Exception):
    """The upstream failed after the response had started: the only honest signal left is to abort
    the client's connection. Raised through QuotaMiddleware, which undoes the request's counters."""


# (status, error, exception) by failure; descriptions name the upstream's fault, not ours.
BAD_GATEWAY = (502, "bad_gateway", "QuotaBadGatewayException")
GATEWAY_TIMEOUT = (504, "gateway_timeout", "QuotaGatewayTimeoutException")
TOO_LARGE = (413, "request_too_large", "QuotaRequestTooLargeException")
ILLEGAL_ARGUMENT = (400, "illegal_argument", "QuotaIllegalArgumentException")
REQUEST_TIMEOUT = (408, "request_timeout", "QuotaRequestTimeoutException")


async def send_error(kind: tuple[int, str, str], description: str, send: Send, started: float) -> None:
    status, error, exception = kind
    now = time.time()
    body = json.dumps(
        {
            "error": error,
            "exception": exception,
            "timestamp": int(now * 1000),
            "duration": max(0, int((now - started) * 1000)),
            "error_description": description,
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 408:
        headers.append((b"connection", b"close"))  # the rest of the body may never come
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def abort_on_broken(app: ASGIApp) -> ASGIApp:
    """Outermost wrapper: an upstream that broke off mid-response has already been logged and its
    counters undone by the middleware; returning without finishing makes the server drop the
    client's connection, which is all a client can be told once a response has started."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await app(scope, receive, send)
        except UpstreamBroken:
            return

    return wrapped
