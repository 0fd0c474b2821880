"""What quota itself costs per request: the middleware over a trivial upstream (no gateway, no HTTP
server), on the memory store and on Redis, from the in-process driver. `python -m benchmarks.costs`

`--upstream gateway` measures it over the reference gateway instead, as a served app would run: the
same work costs more there, since the gateway's own code and data leave quota's out of the caches,
and both allocate toward the same garbage collections (`--gc off` shows that share).

`--steps` times each stage of a read's decision on the memory store alone beside a whole request,
one request at a time: the checks a lane holds (the URL checks, the route match, the app's plan,
ids and features, the plan of store ops: run for a path's first request from a client only), then
every request's (the client's address, the lane, the deny cache, the store, the metrics); what those
do not account for is the request's coroutines, the answer's wrappers and headers.

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
from collections.abc import Callable
from typing import Any

from benchmarks.harness import OwnRedis
from benchmarks.inprocess import drive, http_scope
from benchmarks.variants import config_dir, gateway, request_of
from quota.config import load_config
from quota.decisions import Denial, admit, path_denial, plan_request
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


def _us(call: Callable[[], object], total: int) -> float:
    """µs per call, the best of three runs of `total` calls (each with the loop's own call, ~0.05 µs)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(total):
            call()
        best = min(best, time.perf_counter() - started)
    return best / total * 1e6


def steps(total: int) -> None:
    app = build_app(load_config(config_dir("read")), upstream=trivial)
    rt, settings = app.runtime, app.runtime.settings
    method, path, _ = request_of("read")
    scope = http_scope(method, path)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    async def requests(target: Any) -> float:
        for _ in range(2):
            started = time.perf_counter()
            for _ in range(total):
                await target(scope, receive, send)
            spent = time.perf_counter() - started
        return spent / total * 1e6

    whole, alone = asyncio.run(requests(app)), asyncio.run(requests(trivial))
    started = time.time()
    today = app.today(started)
    match = rt.routes.match(method, path)
    found = app.app_of(rt, match, today)
    assert found is not None and not isinstance(found, Denial)
    address = rt.clients.address(scope)
    params = admit(match.rule, found, match.params, address, started, rt.ids)
    assert isinstance(params, dict)
    client = rt.clients.key(address)
    ttl = settings.reservation_ttl_s * 1000
    plan = plan_request(
        rt.routes, match.rule, found, params, None, client, 0, ids=rt.ids, lease_ttl_ms=ttl, reservation_ttl_ms=ttl
    )
    store, clock = rt.memory, [int(started * 1000)]
    assert store is not None

    def decide() -> object:
        clock[0] += 1000  # a fresh window each time: always the allowed path
        return store.decide(plan.before, clock[0])

    lanes = rt.directory.lanes(today)
    lane_key = (method, path, scope.get("raw_path"), address)
    assert lane_key in lanes, "the requests above took a lane"
    stages = {
        "URL checks": lambda: path_denial(scope, settings.max_url_bytes),
        "route match": lambda: rt.routes.match(method, path),
        "app and plan lookup": lambda: app.app_of(rt, match, today),
        "ids, allowlist, features": lambda: admit(match.rule, found, match.params, address, started, rt.ids),
        "store ops (shared plan)": lambda: plan_request(
            rt.routes, match.rule, found, params, None, client, 0, ids=rt.ids, lease_ttl_ms=ttl, reservation_ttl_ms=ttl
        ),
        "client address and key": lambda: rt.clients.key(rt.clients.address(scope)),
        "lane lookup": lambda: rt.directory.lanes(today).get((method, path, scope.get("raw_path"), address)),
        "deny cache": lambda: rt.denials.check(plan.before, clock[0]),
        "memory store": decide,
        "metrics": lambda: app.metrics.decision(match.rule.name, None, found.plan.name, "allowed"),
    }
    # A request like the one before it takes its lane: the first five stages ran for the first only.
    on_lane = list(stages)[5:]
    print(f"read on memory, one request at a time, µs (best of 3 x {total})")
    print(f"{'a whole request, with quota':40s} {whole:6.2f}")
    print(f"{'the upstream alone':40s} {alone:6.2f}")
    print("  the checks a lane holds (a path's first request only):")
    for name in list(stages)[:5]:
        print(f"    {name:36s} {_us(stages[name], total):6.2f}")
    print("  every request's:")
    spent = 0.0
    for name in on_lane:
        us = _us(stages[name], total)
        spent += us
        print(f"    {name:36s} {us:6.2f}")
    print(f"  {'those together':38s} {spent:6.2f}")
    print(f"  {'rest (coroutines, wrappers, headers)':38s} {whole - alone - spent:6.2f}")


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
    p.add_argument("--steps", action="store_true", help="time each stage of a read's decision (memory store)")
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
    if args.steps:
        steps(args.requests)
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
