"""What quota itself costs per request: the middleware over a trivial upstream (no gateway, no HTTP
server), on the memory store and on Redis, from the in-process driver. `python -m benchmarks.costs`"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from benchmarks.harness import OwnRedis
from benchmarks.inprocess import drive
from benchmarks.variants import config_dir
from quota.config import load_config
from quota.serve import build_app


async def trivial(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def per_request_us(app: Any, scenario: str, total: int) -> float:
    await drive(app, scenario, 640)
    started = time.process_time()
    await drive(app, scenario, total)
    return (time.process_time() - started) / total * 1e6


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.costs", description=__doc__)
    p.add_argument("--requests", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    redis = OwnRedis()
    try:
        print("CPU µs per request (median of rounds); quota = with quota - trivial upstream alone")
        for scenario in ("read", "write", "login", "flood"):
            base, memory, on_redis = [], [], []
            for _ in range(args.rounds):
                redis.client.flushall()
                cfg = load_config(config_dir(scenario))
                base.append(asyncio.run(per_request_us(trivial, scenario, args.requests)))
                memory.append(asyncio.run(per_request_us(build_app(cfg, upstream=trivial), scenario, args.requests)))
                app = build_app(cfg, upstream=trivial, redis_url=redis.url)
                on_redis.append(asyncio.run(per_request_us(app, scenario, args.requests)))
            b, m, r = (statistics.median(x) for x in (base, memory, on_redis))
            print(f"{scenario:6s} upstream {b:5.1f}   quota-memory {m - b:5.1f}   quota-redis {r - b:5.1f}")
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
