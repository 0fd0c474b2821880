"""Rounds of every variant on every scenario, interleaved (A B C ... A B C ...), medians with min and
max, ratios to the bare gateway measured in the same round. The machine is shared and noisy: only
same-run ratios mean anything."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import redis as redis_sync

from benchmarks.inprocess import drive
from benchmarks.load import LOAD_CORE, Server, pinned, wrk
from benchmarks.peers import PROXY_VARIANTS
from benchmarks.redis_server import RedisServer, free_port
from benchmarks.variants import EXTRA_VARIANTS, SCENARIOS, VARIANTS, build
from quota.build import BUILD

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PROXY_SCENARIOS = ("read", "write", "flood")
PROXY_BEGIN, PROXY_END = "<!-- proxy: begin -->", "<!-- proxy: end -->"
FAILURES: list[str] = []
LOAD_AT_START = [0.0]
HARNESS_COMMANDS = ("info", "config|resetstat", "flushall", "ping", "client|setinfo", "hello", "config|get")


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    calls_per_req: float
    cmds_per_req: float
    refused_per_s: float = 0.0
    # CPU per request: in-process, this process's; under load, the server's (and its children's).
    # The Redis server's is in neither. 0.0: not measured.
    cpu_us: float = 0.0


@dataclass
class Cell:
    samples: list[Sample] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    # CPU per request over bare's in the same round: what the limiter itself costs.
    own_us: list[float] = field(default_factory=list)


class OwnRedis(RedisServer):
    """The harness's redis-server, started at once and pinned with the load generator."""

    def __init__(self) -> None:
        super().__init__(launcher=pinned(LOAD_CORE, []))
        self.start()
        self.client = redis_sync.Redis(port=self.port)

    def commands(self) -> int:
        stats: dict[str, Any] = self.client.info("commandstats")  # type: ignore[assignment]
        return sum(v["calls"] for k, v in stats.items() if k.removeprefix("cmdstat_") not in HARNESS_COMMANDS)

    def stop(self) -> None:
        self.client.close()
        super().stop()


def load_round(
    redis: OwnRedis, scenario: str, variants: list[str], seconds: float, connections: int, warmup: bool
) -> dict[str, Sample]:
    out: dict[str, Sample] = {}
    for variant in variants:
        redis.client.flushall()
        try:
            server = Server(variant, scenario, free_port(), redis.url)
        except RuntimeError as exc:
            FAILURES.append(f"{scenario}/{variant}: the server did not start ({exc})")
            continue
        try:
            if warmup:
                wrk(server.base, scenario, 1, connections)
            sent, cmds = server.sent(), redis.commands()
            cpu = server.cpu_seconds()
            result = wrk(server.base, scenario, seconds, connections)
            after = server.cpu_seconds()
            sent, cmds = server.sent() - sent, redis.commands() - cmds
        except (httpx.HTTPError, subprocess.CalledProcessError) as exc:
            # A variant that stops answering loses this sample; the run goes on and says so.
            FAILURES.append(f"{scenario}/{variant}: stopped answering ({exc.__class__.__name__}); sample dropped")
            print(f"  {scenario:6s} {variant:13s} FAILED: {exc.__class__.__name__}", file=sys.stderr, flush=True)
            continue
        finally:
            server.stop()
        n = max(1, result.requests)
        cpu_us = 0.0 if cpu is None or after is None else (after - cpu) / n * 1e6
        out[variant] = Sample(
            result.rps, result.p50_ms, result.p99_ms, sent / n, cmds / n, result.non_2xx / result.seconds, cpu_us
        )
        print(f"  {scenario:6s} {variant:13s} {result.rps:8.0f} rps", file=sys.stderr, flush=True)
    return out


def inprocess_round(redis: OwnRedis, scenario: str, variants: list[str], total: int) -> dict[str, Sample]:
    out: dict[str, Sample] = {}
    for variant in variants:
        redis.client.flushall()

        async def run(variant: str = variant) -> tuple[float, float, float, float]:
            app = build(variant, scenario, redis.url)
            await drive(app, scenario, min(total, 640))  # warm connections and caches
            cpu = time.process_time()
            rps, p50, p99 = await drive(app, scenario, total)
            spent = (time.process_time() - cpu) / total * 1e6
            if hasattr(app, "shutdown"):
                await app.shutdown()  # as a server's lifespan would: no confirm left pending
            return rps, p50, p99, spent

        rps, p50, p99, cpu_us = asyncio.run(run())
        out[variant] = Sample(rps, p50, p99, 0.0, 0.0, cpu_us=cpu_us)
    return out


def aggregate(rounds: list[dict[str, dict[str, Sample]]]) -> dict[tuple[str, str], Cell]:
    cells: dict[tuple[str, str], Cell] = {}
    for by_scenario in rounds:
        for scenario, by_variant in by_scenario.items():
            bare = by_variant.get("bare")
            for variant, sample in by_variant.items():
                cell = cells.setdefault((scenario, variant), Cell())
                cell.samples.append(sample)
                if bare and bare.rps:
                    cell.ratios.append(sample.rps / bare.rps)
                if bare and bare.cpu_us and sample.cpu_us:
                    cell.own_us.append(sample.cpu_us - bare.cpu_us)
    return cells


def row(scenario: str, variant: str, cell: Cell) -> dict[str, Any]:
    med = statistics.median
    s = cell.samples
    return {
        "scenario": scenario,
        "variant": variant,
        "rps": round(med(x.rps for x in s), 1),
        "rps_min": round(min(x.rps for x in s), 1),
        "rps_max": round(max(x.rps for x in s), 1),
        "p50_ms": round(med(x.p50_ms for x in s), 3),
        "p99_ms": round(med(x.p99_ms for x in s), 3),
        "redis_calls_per_req": round(med(x.calls_per_req for x in s), 3),
        "redis_cmds_per_req": round(med(x.cmds_per_req for x in s), 3),
        "ratio_to_bare": round(med(cell.ratios), 3) if cell.ratios else None,
        "ratio_min": round(min(cell.ratios), 3) if cell.ratios else None,
        "ratio_max": round(max(cell.ratios), 3) if cell.ratios else None,
        "refused_per_s": round(med(x.refused_per_s for x in s), 1),
        "cpu_us": round(med(x.cpu_us for x in s), 1),
        "own_us": round(med(cell.own_us), 1) if cell.own_us else None,
    }


def table(rows: list[dict[str, Any]], title: str, load: bool) -> str:
    head = ["scenario", "variant", "rps (median)", "rps min-max", "p50 ms", "p99 ms", "ratio to bare (min-max)"]
    if load:
        head += ["redis calls/req", "redis cmds/req", "refused/s", "server CPU µs/req"]
    else:
        head += ["CPU µs/req", "own CPU µs/req (over bare)"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = (
            "-"
            if r["ratio_to_bare"] is None
            else f"{r['ratio_to_bare']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        )
        cells = [
            r["scenario"],
            r["variant"],
            f"{r['rps']:.0f}",
            f"{r['rps_min']:.0f}-{r['rps_max']:.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            ratio,
        ]
        if load:
            cells += [f"{r['redis_calls_per_req']:.2f}", f"{r['redis_cmds_per_req']:.2f}", f"{r['refused_per_s']:.0f}"]
            cells += [f"{r['cpu_us']:.1f}" if r["cpu_us"] else "-"]
        else:
            cells += [f"{r['cpu_us']:.1f}", "-" if r["own_us"] is None else f"{r['own_us']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], proc_rows: list[dict[str, Any]]) -> str:
    """Issue #14's targets, checked against this run's medians (load: rows; CPU: proc_rows)."""
    by = {(r["scenario"], r["variant"]): r for r in rows}
    by_proc = {(r["scenario"], r["variant"]): r for r in proc_rows}

    def get(scenario: str, variant: str, key: str, table: dict[tuple[str, str], Any] = by) -> float | None:
        row = table.get((scenario, variant))
        return None if row is None or row[key] is None else float(row[key])

    checks: list[tuple[str, str, bool]] = []

    def at_least(name: str, value: float | None, floor: float, unit: str = "") -> None:
        if value is not None:
            checks.append((name, f"{value:.2f}{unit}", value >= floor))

    at_least(
        "trivial upstream, read: quota-redis at 0.80 of bare", get("trivial", "quota-redis", "ratio_to_bare"), 0.80
    )
    at_least(
        "trivial upstream, read: quota-memory at 0.85 of bare", get("trivial", "quota-memory", "ratio_to_bare"), 0.85
    )
    write, slow = get("write", "quota-redis", "ratio_to_bare"), get("write", "slowapi", "ratio_to_bare")
    at_least("gateway write route: quota-redis at 0.85 of bare", write, 0.85)
    if write is not None and slow:
        at_least("gateway write route: quota-redis at 2.5 times slowapi", write / slow, 2.5, "x")
    at_least("flood: quota-redis at 1.3 times bare", get("flood", "quota-redis", "ratio_to_bare"), 1.3)
    calls = [r["redis_calls_per_req"] for r in rows if r["variant"] == "quota-redis"]
    if calls:
        checks.append(("at most one Redis call per request", f"max {max(calls):.2f}", max(calls) <= 1.02))
    own = get("trivial", "quota-memory", "own_us", by_proc)
    if own is not None:
        checks.append(("read decision on memory: quota's own CPU at most 8 µs", f"{own:.1f} µs", own <= 8))
    lines = ["### Targets (issue #14)", "", "| target | this run | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in checks]
    if not all(ok for _, _, ok in checks):
        lines += ["", MISSED]
    return "\n".join(lines)


MISSED = (
    "Missed targets: by how much, where the time goes (`python -m benchmarks.costs --profile`) and what "
    'would close it are in "Where the time goes" below.'
)
# Sections a full run keeps as they are: the notes written from the profile, and the proxy run's.
NOTES_BEGIN = "<!-- notes: begin -->"


def proxy_section(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, when: str) -> str:
    """RESULTS.md's proxy section: its own run, its own command, ratios to the bare gateway of that run."""
    failures = "".join(f"- {failure}\n" for failure in FAILURES)
    return "\n".join(
        [
            PROXY_BEGIN,
            "## Proxy",
            "",
            f"Run {when} on {os.cpu_count()} cores, command: `{command}`. Load average (1 min) at the start "
            f"{LOAD_AT_START[0]:.2f}, at the end {os.getloadavg()[0]:.2f}: the cores are shared, and above 2 "
            "other processes take turns with the variants (two-process variants then get a larger share).",
            "",
            f"Versions: {versions()}.",
            "",
            "The gateway in its own process, a proxy in front of it, both pinned to core 0 (where the bare "
            "gateway runs alone), wrk and Redis on core 1. `proxy-off`: quota proxy with quota's checks off "
            "(the cost of proxying, with its own connection pool); `proxy-off-aiohttp` and `proxy-off-httpx`: "
            "the same with aiohttp or httpx as the upstream client (benchmarks/clients.py); "
            "`proxy-on`: quota proxy with its checks on Redis; `nginx`: nginx with `limit_req` at the same "
            f"rate. wrk: 1 thread, {args.connections} connections, {args.seconds:g} s per run after a 1 s "
            f"warm-up; {args.rounds} round(s), variants rotated each round; ratios are to bare in the same round.",
            "",
            *(["Runs that failed:", "", failures] if failures else []),
            table(rows, "Under load, through a proxy (HTTP, wrk)", True),
            PROXY_END,
        ]
    )


def write_section(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if PROXY_BEGIN in text and PROXY_END in text:
        before, rest = text.split(PROXY_BEGIN, 1)
        after = rest.split(PROXY_END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def versions() -> str:
    names = (
        "quota",
        "starlette",
        "uvicorn",
        "httptools",
        "uvloop",
        "redis",
        "hiredis",
        "limits",
        "slowapi",
        "aiohttp",
        "httpx",
    )
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}" + (f" ({BUILD} build)" if name == "quota" else ""))
        except metadata.PackageNotFoundError:
            pass
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    extra = [wrk_version[0].split(" [")[0] if wrk_version else "wrk ?", " ".join(redis_version[:3])]
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if os.path.exists(nginx):
        extra.append(subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip())
    return ", ".join(found + extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one short round; JSON lines, no RESULTS.md (< 1 minute)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per load run")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--requests", type=int, default=6400, help="requests per in-process run")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument(
        "--only",
        choices=["proxy"],
        help="proxy: the bare gateway and the proxy variants (benchmarks/peers.py), under load only; "
        "writes RESULTS.md's proxy section and leaves the rest",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.requests = 1, 1.0, 1280
    if args.only == "proxy":
        if args.variants == ",".join(VARIANTS):
            args.variants = ",".join(("bare", *PROXY_VARIANTS))
        if args.scenarios == ",".join(SCENARIOS):
            args.scenarios = ",".join(PROXY_SCENARIOS)
    for tool in ("wrk", "redis-server"):
        if not shutil.which(tool):
            print(f"benchmarks: {tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 2
    LOAD_AT_START[0] = os.getloadavg()[0]
    variants, scenarios = args.variants.split(","), args.scenarios.split(",")
    unknown = [v for v in variants if v not in (*VARIANTS, *EXTRA_VARIANTS, *PROXY_VARIANTS)]
    unknown += [s for s in scenarios if s not in (*SCENARIOS, *PROXY_SCENARIOS)]
    if unknown:
        print(f"benchmarks: no such variant or scenario: {', '.join(unknown)}", file=sys.stderr)
        return 2
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    redis = OwnRedis()
    load_rounds: list[dict[str, dict[str, Sample]]] = []
    proc_rounds: list[dict[str, dict[str, Sample]]] = []
    try:
        for i in range(args.rounds):
            order = variants[i % len(variants) :] + variants[: i % len(variants)]
            load_rounds.append(
                {s: load_round(redis, s, order, args.seconds, args.connections, not args.quick) for s in scenarios}
            )
            if args.only != "proxy":
                proc_rounds.append({s: inprocess_round(redis, s, order, args.requests) for s in scenarios})
            print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        redis.stop()
    load_rows = [
        row(s, v, c)
        for (s, v), c in sorted(
            aggregate(load_rounds).items(), key=lambda kv: (scenarios.index(kv[0][0]), variants.index(kv[0][1]))
        )
    ]
    proc_rows = [
        row(s, v, c)
        for (s, v), c in sorted(
            aggregate(proc_rounds).items(), key=lambda kv: (scenarios.index(kv[0][0]), variants.index(kv[0][1]))
        )
    ]
    if args.quick:
        keys = (
            "scenario",
            "variant",
            "rps",
            "p50_ms",
            "p99_ms",
            "redis_calls_per_req",
            "redis_cmds_per_req",
            "ratio_to_bare",
            "cpu_us",
        )
        for r in load_rows:
            print(json.dumps({k: r[k] for k in keys}))
        return 0
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.only == "proxy":
        section = proxy_section(load_rows, args, command, when)
        write_section(section)
        print(section)
        return 0
    header = (
        f"# Benchmark results\n\nRun {when} on {os.cpu_count()} cores ({platform.machine()}, Python "
        f"{platform.python_version()}), command: `{command}`.\n\nVersions: {versions()}.\n\n"
        f"Load: wrk, 1 thread, {args.connections} connections, {args.seconds:g} s per run after a 1 s warm-up, "
        f"pinned to core {LOAD_CORE} (with Redis); uvicorn, one worker, httptools + uvloop, pinned to core 0. "
        f"{args.rounds} rounds, variants interleaved and rotated each round; medians, with min-max over rounds. "
        f"Ratios are to the bare gateway in the same round.\n"
    )
    if FAILURES:
        header += "\nRuns that failed (their samples are missing from the medians):\n\n"
        header += "".join(f"- {failure}\n" for failure in FAILURES)
    text = (
        "\n\n".join(
            [
                header,
                table(load_rows, "Under load (HTTP, wrk)", True),
                targets(load_rows, proc_rows),
                table(proc_rows, f"In-process (ASGI called directly, {args.requests} requests, 32 concurrent)", False),
            ]
        )
        + "\n"
    )
    old = RESULTS.read_text() if RESULTS.exists() else ""
    kept = [i for i in (old.find(NOTES_BEGIN), old.find(PROXY_BEGIN)) if i >= 0]
    RESULTS.write_text(text + ("\n" + old[min(kept) :] if kept else ""))
    print(text)
    return 0
