"""Instructions per request, counted by valgrind's callgrind: what quota costs, whatever else the
machine is doing. `python -m benchmarks.instructions`

Timings on a shared machine move by a third from one run to the next; an instruction count of the
same build and inputs moves by about one per cent. So a change to the request path is judged here
first, and under load (`python -m benchmarks`) when the machine is quiet.

Each store is driven twice under callgrind, N requests and 3N (after the same warm-up), in the
in-process driver (32 concurrent, uvloop); the difference over 2N is one request's count, start-up
and warm-up cancelled out. `bare` is the upstream alone, so quota's own count is a store's less
bare's. Redis runs outside valgrind: its work is not counted, only quota's side of the wire. Under
valgrind a program runs some fifty times slower, so a store call seems slow to quota: the latency
histogram's buckets and the pipelining of replies differ from a real run's.

`--served` counts what the load runs time: the server process of `python -m benchmarks` (uvicorn,
httptools, uvloop) under callgrind, fed over HTTP by a client outside it (32 keep-alive connections,
the requests wrk sends), N and 3N requests after the same warm-up. Its ratio, bare's count over a
variant's, is what a load run's ratio would be if an instruction cost the same everywhere; uvicorn's
parsing, its checks of each response header and the event loop are in it, and the idle ticks of
uvicorn's clock add a little noise (some hundreds of instructions a request).

`--redis-server` counts the other side of the wire: redis-server under callgrind, its instructions a
request (the script that judges it, its commands, the protocol), while the load runs' quota-redis
server runs outside valgrind and is fed as above. Redis shares its core with wrk in the load runs,
and a request waits for its reply: what Redis spends a request is latency the server may not fill."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.costs import upstream_of
from benchmarks.harness import OwnRedis
from benchmarks.inprocess import drive, request_for, shares
from benchmarks.redis_server import RedisServer, free_port
from benchmarks.variants import config_dir
from quota.build import BUILD

STORES = ("bare", "memory", "redis")
# --served runs the load runs' variants; `headers` is quota on memory with the RateLimit headers.
SERVED = {"bare": "bare", "memory": "quota-memory", "redis": "quota-redis", "headers": "quota-headers"}
WARM_UP = 640
_COLLECTED = re.compile(r"Collected : (\d+)")


def collected(stderr: str) -> int:
    """The instructions callgrind counted, from what it printed at exit."""
    found = _COLLECTED.search(stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count:\n{stderr[-2000:]}")
    return int(found.group(1))


def per_request(small: int, large: int, requests: int) -> float:
    """One request's count: runs of `requests` and of 3 x `requests`, differenced."""
    return (large - small) / (2 * requests)


def child(store: str, scenario: str, total: int, upstream: str) -> None:
    """The run callgrind counts: one app, warmed up, then `total` requests."""
    import uvloop

    from quota.config import load_config
    from quota.serve import build_app

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    inner = upstream_of(upstream)
    redis = OwnRedis() if store == "redis" else None
    try:
        if store == "bare":
            app: Any = inner
        else:
            url = redis.url if redis is not None else None
            app = build_app(load_config(config_dir(scenario)), upstream=inner, redis_url=url)

        async def run() -> None:
            await drive(app, scenario, WARM_UP)
            await drive(app, scenario, total)
            if hasattr(app, "shutdown"):
                await app.shutdown()

        asyncio.run(run())
    finally:
        if redis is not None:
            redis.stop()


def _under_callgrind(tmp: str, *module: str) -> tuple[list[str], dict[str, str]]:
    """`python -m <module...>` under callgrind, its output file in `tmp`, and its environment."""
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={Path(tmp) / 'out'}", sys.executable, "-m", *module]
    # A fixed hash seed: dict and set layouts, and so the count, the same from run to run. A store
    # that waits: under valgrind its calls seem fifty times slower (benchmarks/variants.py).
    return argv, {**os.environ, "PYTHONHASHSEED": "0", "QUOTA_BENCH_STORAGE_TIMEOUT_MS": "60000"}


def counted(store: str, scenario: str, total: int, upstream: str) -> int:
    """The instructions of one child run under callgrind (its output file thrown away)."""
    with tempfile.TemporaryDirectory(prefix="quota-callgrind-") as tmp:
        child = ("--child", store, "--scenario", scenario, "--requests", str(total), "--upstream", upstream)
        argv, env = _under_callgrind(tmp, "benchmarks.instructions", *child)
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return collected(done.stderr)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    """One request on a kept-alive connection; its answer's status, the whole answer read."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"transfer-encoding":
            raise RuntimeError("a chunked answer: the benchmark upstreams send their length")
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def feed(port: int, scenario: str, total: int, concurrency: int = 32) -> None:
    """`total` requests of `scenario` over `concurrency` connections, as wrk sends them."""
    host = f"127.0.0.1:{port}".encode()
    counter = [0]

    async def worker(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(count):
                counter[0] += 1
                method, path, body = request_for(scenario, counter[0])
                head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), path.encode(), host)
                if body:
                    head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
                status = await _exchange(reader, writer, head + b"\r\n" + body)
                if status >= 400:
                    raise RuntimeError(f"{method} {path} answered {status}: the count would not be of the work")
        finally:
            writer.close()

    await asyncio.gather(*(worker(count) for count in shares(total, concurrency)))


def _fed(port: int, proc: subprocess.Popen[Any], scenario: str, total: int) -> None:
    """The server `proc` on `port`, once it answers, fed the warm-up and then `total` requests."""
    asyncio.run(_started(port, proc))
    asyncio.run(feed(port, scenario, WARM_UP))
    asyncio.run(feed(port, scenario, total))


def _kept(out: Path, keep: Path | None, name: str) -> None:
    """A run's callgrind output copied to `keep` (for callgrind_annotate), when asked."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, keep / name)


def served(store: str, scenario: str, total: int, redis: OwnRedis, keep: Path | None = None) -> int:
    """The instructions of the load runs' server under callgrind, fed `total` requests after a warm-up."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="quota-callgrind-") as tmp:
        argv, env = _under_callgrind(tmp, "benchmarks.server", SERVED[store], scenario, str(port), redis.url)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            _fed(port, proc, scenario, total)
        finally:
            proc.terminate()
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
        _kept(Path(tmp) / "out", keep, f"{store}.{scenario}.{total}.callgrind")
        return collected(err)


def redis_side(scenario: str, total: int, keep: Path | None = None) -> int:
    """The instructions of redis-server under callgrind while the quota-redis server, outside valgrind,
    is fed `total` requests after a warm-up."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="quota-callgrind-") as tmp:
        out, log = Path(tmp) / "out", Path(tmp) / "log"
        callgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", f"--log-file={log}"]
        redis = RedisServer(launcher=callgrind)
        redis.start()
        # Redis under valgrind answers some fifty times slower: a store timeout of the real run's
        # would answer 503s (benchmarks/variants.py).
        env = {**os.environ, "QUOTA_BENCH_STORAGE_TIMEOUT_MS": "60000"}
        argv = [sys.executable, "-m", "benchmarks.server", SERVED["redis"], scenario, str(port), redis.url]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            _fed(port, proc, scenario, total)
        finally:
            proc.terminate()
            proc.wait(60)
            redis.stop()
        _kept(out, keep, f"redis-server.{scenario}.{total}.callgrind")
        return collected(log.read_text())


async def _started(port: int, proc: subprocess.Popen[Any], patience: float = 600) -> None:
    # Under valgrind, importing quota and the app takes a minute or more.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if proc.poll() is not None or loop.time() > deadline:
                raise RuntimeError(f"the server under callgrind did not start ({proc.returncode})") from None
            await asyncio.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    p.add_argument("--scenario", choices=["read", "write", "login", "flood"], default="read")
    p.add_argument("--stores", default=",".join(STORES), help=f"of {', '.join(STORES)}; with --served, also headers")
    p.add_argument("--requests", type=int, default=1000, help="N: the runs are N and 3N requests")
    p.add_argument("--upstream", choices=["trivial", "gateway"], default="trivial")
    p.add_argument(
        "--served",
        action="store_true",
        help="count the load runs' uvicorn server fed over HTTP (the scenario names the upstream: trivial, "
        "else the gateway), not the in-process driver",
    )
    p.add_argument(
        "--redis-server",
        action="store_true",
        help="count redis-server's instructions a request, the load runs' quota-redis server fed over HTTP "
        "outside valgrind (--stores is not used)",
    )
    p.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="with --served or --redis-server, keep each run's callgrind output in DIR, for callgrind_annotate",
    )
    p.add_argument("--child", choices=STORES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.scenario, args.requests, args.upstream)
        return 0
    stores = [s for s in args.stores.split(",") if s]
    known = SERVED if args.served else STORES
    unknown = [s for s in stores if s not in known]
    if unknown:
        p.error(f"unknown store {unknown[0]!r}: choose from {', '.join(known)}")
    if shutil.which("valgrind") is None:
        p.error("valgrind is not installed (Debian: apt-get install valgrind)")
    if args.keep is not None and not (args.served or args.redis_server):
        p.error("--keep keeps the outputs of --served or --redis-server runs (the in-process children's are not kept)")
    if (args.served or args.redis_server) and args.scenario == "flood":
        p.error("--served counts allowed requests; a flood is refused by design (count it in-process)")
    if args.redis_server:
        scenario = "trivial" if args.scenario == "read" and args.upstream == "trivial" else args.scenario
        print(f"redis-server's instructions per request, {scenario} (runs of {args.requests} and {3 * args.requests})")
        small = redis_side(scenario, args.requests, args.keep)
        large = redis_side(scenario, 3 * args.requests, args.keep)
        print(f"  redis     {per_request(small, large, args.requests):9.0f}")
        return 0
    if args.served:
        where = "under uvicorn, fed over HTTP"
        scenario = "trivial" if args.scenario == "read" and args.upstream == "trivial" else args.scenario
    else:
        where = f"on a {args.upstream} upstream, in-process"
        scenario = args.scenario
    print(
        f"instructions per request, {scenario} {where}, {BUILD} build "
        f"(runs of {args.requests} and {3 * args.requests} requests)"
    )
    redis = OwnRedis() if args.served else None
    try:
        bare: float | None = None
        for store in stores:
            if redis is not None:
                small = served(store, scenario, args.requests, redis, args.keep)
                large = served(store, scenario, 3 * args.requests, redis, args.keep)
            else:
                small = counted(store, scenario, args.requests, args.upstream)
                large = counted(store, scenario, 3 * args.requests, args.upstream)
            count = per_request(small, large, args.requests)
            if store == "bare":
                bare = count
                print(f"  {store:9s} {count:9.0f}")
            else:
                own = f"   quota's own {count - bare:9.0f}   ratio {bare / count:.2f}" if bare is not None else ""
                print(f"  {store:9s} {count:9.0f}{own}")
    finally:
        if redis is not None:
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
