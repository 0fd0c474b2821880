"""What quota itself costs per request: the middleware over a trivial upstream (no gateway, no HTTP
server), on the memory store and on Redis, from the in-process driver. `python -m benchmarks.costs`

`--upstream gateway` measures it over the reference gateway instead, as a served app would run: the
same work costs more there, since the gateway's own code and data leave quota's out of the caches,
and both allocate toward the same garbage collections (`--gc off` shows that share).

`--profile read` (or write, login, flood) profiles that scenario on the memory store instead: the
functions where quota's time goes, by own time, and how many calls one request makes. cProfile sees
only Python functions, so it profiles the pure build (run it with QUOTA_PURE=1). For the compiled
build, `--drive read` only drives the scenario, to run under a sampling profiler:

    CFLAGS=-fno-omit-frame-pointer pip install --no-deps -e .
    perf record --call-graph fp -o perf.data python -m benchmarks.costs --drive read --requests 300000
    perf report -i perf.data --children --sort symbol -g none | grep CPyDef"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import statistics
import time
from typing import Any

from benchmarks.harness import OwnRedis
from benchmarks.inprocess import drive
from benchmarks.variants import config_dir, gateway
from quota.config import load_config
from quota.serve import build_app


async def trivial(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def per_request_us(app: Any, scenario: str, total: int) -> float:
    await drive(app, scenario, 640)
    started = time.process_time()
    await drive(app, scenario, total)
    spent = (time.process_time() - started) / total * 1e6
    if hasattr(app, "shutdown"):
        await app.shutdown()  # as a server's lifespan would: no confirm left pending
    return spent


def upstream_of(kind: str) -> Any:
    """A fresh upstream: each run of the gateway starts from the same state."""
    return gateway() if kind == "gateway" else trivial


def profile(scenario: str, total: int) -> None:
    app = build_app(load_config(config_dir(scenario)), upstream=trivial)
    asyncio.run(drive(app, scenario, 640))
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(drive(app, scenario, total))
    profiler.disable()
    stats = pstats.Stats(profiler)
    calls = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
    print(f"{scenario} on memory, {total} requests: {calls / total:.0f} function calls a request")
    stats.sort_stats("tottime").print_stats(25)


def drive_only(scenario: str, total: int, upstream: str) -> None:
    app = build_app(load_config(config_dir(scenario)), upstream=upstream_of(upstream))
    asyncio.run(drive(app, scenario, 640))
    asyncio.run(drive(app, scenario, total))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.costs", description=__doc__)
    p.add_argument("--requests", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", choices=["read", "write", "login", "flood"])
    p.add_argument("--drive", choices=["read", "write", "login", "flood"])
    p.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="the event loop (uvicorn serves on uvloop; asyncio's own loop is Python, and costs more per store call)",
    )
    p.add_argument(
        "--upstream",
        choices=["trivial", "gateway"],
        default="trivial",
        help="what quota wraps: a raw ASGI answer, or the reference gateway (quota's cost beside a real app)",
    )
    p.add_argument("--gc", choices=["on", "off"], default="on", help="off: garbage collection disabled")
    args = p.parse_args()
    if args.gc == "off":
        gc.disable()
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.profile:
        profile(args.profile, args.requests)
        return
    if args.drive:
        drive_only(args.drive, args.requests, args.upstream)
        return
    redis = OwnRedis()
    try:
        print(
            f"CPU µs per request (median of rounds, {args.loop}, gc {args.gc}); "
            f"quota = with quota - {args.upstream} upstream alone"
        )
        for scenario in ("read", "write", "login", "flood"):
            base, memory, on_redis = [], [], []
            for _ in range(args.rounds):
                redis.client.flushall()
                cfg = load_config(config_dir(scenario))
                up = args.upstream
                base.append(asyncio.run(per_request_us(upstream_of(up), scenario, args.requests)))
                memory.append(
                    asyncio.run(per_request_us(build_app(cfg, upstream=upstream_of(up)), scenario, args.requests))
                )
                app = build_app(cfg, upstream=upstream_of(up), redis_url=redis.url)
                on_redis.append(asyncio.run(per_request_us(app, scenario, args.requests)))
            b, m, r = (statistics.median(x) for x in (base, memory, on_redis))
            print(f"{scenario:6s} upstream {b:5.1f}   quota-memory {m - b:5.1f}   quota-redis {r - b:5.1f}")
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
