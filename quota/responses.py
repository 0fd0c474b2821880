"""Refusals shaped like the IM vendor's errors (reference §5):
{"error", "exception", "timestamp", "duration", "error_description"}, plus `limit` where one applies.
"""

from __future__ import annotations

import json
import time

from starlette.types import Send

from quota.decisions import Denial

_EXCEPTIONS = {
    "reach_limit": "QuotaReachLimitException",
    "exceed_limit": "QuotaExceedLimitException",
    "forbidden_op": "QuotaForbiddenOpException",
    "illegal_argument": "QuotaIllegalArgumentException",
    "request_too_large": "QuotaRequestTooLargeException",
    "request_timeout": "QuotaRequestTimeoutException",
    "service_unavailable": "QuotaStorageUnavailableException",
    "unauthorized": "QuotaUnauthorizedException",
    "service_resource_not_found": "QuotaResourceNotFoundException",
    "conflict": "QuotaConflictException",
}


def body_of(denial: Denial, started: float) -> bytes:
    now = time.time()
    payload: dict[str, object] = {
        "error": denial.error,
        "exception": _EXCEPTIONS.get(denial.error, "QuotaException"),
        "timestamp": int(now * 1000),
        "duration": max(0, int((now - started) * 1000)),
        "error_description": denial.description,
    }
    if denial.limit:
        payload["limit"] = denial.limit
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def headers_of(denial: Denial, body: bytes) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if denial.status == 429:
        retry = str(max(1, -(-denial.retry_after_ms // 1000))).encode()
        reset = str(max(1, -(-denial.reset_ms // 1000))).encode()
        headers += [
            (b"retry-after", retry),
            (b"ratelimit-limit", str(denial.rate_limit).encode()),
            (b"ratelimit-remaining", b"0"),
            (b"ratelimit-reset", reset),
        ]
    if denial.status in (409, 503):
        headers.append((b"retry-after", b"1"))
    elif denial.status == 408:
        # The rest of the body may never come: the server ends the connection after this answer.
        headers.append((b"connection", b"close"))
    return headers


async def send_denial(denial: Denial, send: Send, started: float) -> None:
    body = body_of(denial, started)
    await send({"type": "http.response.start", "status": denial.status, "headers": headers_of(denial, body)})
    await send({"type": "http.response.body", "body": body})


async def close_websocket(denial: Denial, send: Send) -> None:
    # 1008 (policy violation) for plan refusals, 1013 (try again later) for rates and outages.
    code = 1013 if denial.status in (429, 503) else 1008
    reason = f"{denial.error}: {denial.description}".encode()[:123].decode("utf-8", "ignore")
    await send({"type": "websocket.close", "code": code, "reason": reason})
