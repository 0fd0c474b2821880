"""An in-process driver: calls the ASGI app directly, no HTTP server or parser, so that what is
measured is the middleware's own cost on top of the gateway's."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from benchmarks.variants import request_of

HEADERS = [(b"host", b"bench"), (b"content-type", b"application/json")]


def http_scope(
    method: str,
    path: str,
    *,
    peer: str = "127.0.0.1",
    headers: list[tuple[bytes, bytes]] | None = None,
    raw_path: bytes | None = None,
) -> dict[str, Any]:
    """The scope a server hands the app for one HTTP/1.1 request from `peer` (the tests build theirs
    here too, for requests httpx cannot send)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode() if raw_path is None else raw_path,
        "root_path": "",
        "query_string": b"",
        "client": (peer, 40000),
        "server": ("gateway", 80),
        "headers": list(HEADERS) if headers is None else headers,
    }


def shares(total: int, concurrency: int) -> list[int]:
    """`total` requests split over `concurrency` workers, exactly: counts per request divide by it."""
    return [total // concurrency + (i < total % concurrency) for i in range(concurrency)]


def request_for(scenario: str, n: int) -> tuple[str, str, bytes]:
    """(method, path, body) of the `n`th request, varied as wrk's scripts vary it (benchmarks/load.py)."""
    method, path, body = request_of(scenario)
    if scenario == "write":
        return method, path.rsplit("/", 1)[0] + f"/u{n % 200}", b""
    if scenario == "login":
        return method, path, json.dumps({"username": f"u{n % 2000}"}).encode()
    return method, path, (body or "").encode()


async def drive(app: Any, scenario: str, total: int, concurrency: int = 32) -> tuple[float, float, float]:
    """(requests per second, p50 ms, p99 ms) over `total` requests from `concurrency` tasks."""
    latencies: list[float] = []
    counter = [0]

    async def one() -> None:
        counter[0] += 1
        method, p, b = request_for(scenario, counter[0])
        scope = http_scope(method, p)
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            return None

        started = time.perf_counter()
        await app(scope, receive, send)
        latencies.append(time.perf_counter() - started)

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    started = time.perf_counter()
    await asyncio.gather(*(worker(count) for count in shares(total, concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    done = len(latencies)
    return done / elapsed, latencies[done // 2] * 1000, latencies[min(done - 1, int(done * 0.99))] * 1000
