"""The benchmark harness keeps working: a tiny run, checked for shape only (speed lives in benchmarks/)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# The harness's own workings: run-tests runs them once, on the pure-Python build (each build's
# one-script-call-per-write is checked by tests/test_processes.py).
pytestmark = pytest.mark.one_build


def _module(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m <argv>` from the checkout, as a user runs it: its exit code and output."""
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_quick_json_lines() -> None:
    """`python -m benchmarks --quick` prints one JSON line per scenario and variant, with every figure."""
    out = _module("benchmarks", "--quick", "--scenarios", "write,flood", "--variants", "bare,quota-redis", timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["scenario"], r["variant"]) for r in rows] == [
        ("write", "bare"),
        ("write", "quota-redis"),
        ("flood", "bare"),
        ("flood", "quota-redis"),
    ]
    keys = {
        "scenario",
        "variant",
        "rps",
        "p50_ms",
        "p99_ms",
        "redis_calls_per_req",
        "redis_cmds_per_req",
        "ratio_to_bare",
        "cpu_us",
    }
    assert all(set(r) == keys for r in rows)
    by = {(r["scenario"], r["variant"]): r for r in rows}
    assert by[("write", "bare")]["redis_calls_per_req"] == 0
    # A write through quota is one script call to Redis, whatever its speed: its confirm rides with a
    # later program of the app (a timer sends the few that wait alone).
    assert 0.9 < by[("write", "quota-redis")]["redis_calls_per_req"] < 1.3
    assert all(r["rps"] > 0 for r in rows)
    # The server's CPU per request, read from /proc: a write through quota costs the server more than
    # the bare gateway's; refusing a flood costs it less.
    assert all(r["cpu_us"] > 0 for r in rows), rows
    assert by[("write", "quota-redis")]["cpu_us"] > by[("write", "bare")]["cpu_us"]
    assert by[("flood", "quota-redis")]["cpu_us"] < by[("flood", "bare")]["cpu_us"]


def test_targets_are_checked_against_the_run() -> None:
    """RESULTS.md's target section says met or not from the run's own medians (issue #14's targets),
    and points to the reasons when one is missed."""
    from benchmarks.harness import targets

    def r(scenario: str, variant: str, ratio: float, calls: float) -> dict[str, object]:
        return {"scenario": scenario, "variant": variant, "ratio_to_bare": ratio, "redis_calls_per_req": calls}

    rows = [
        r("trivial", "quota-redis", 0.81, 1.0),
        r("trivial", "quota-memory", 0.86, 0.0),
        r("write", "quota-redis", 0.85, 1.0),
        r("write", "slowapi", 0.30, 1.0),
        r("flood", "quota-redis", 1.3, 0.2),
    ]
    proc = [{"scenario": "trivial", "variant": "quota-memory", "own_us": 7.5}]
    text = targets(rows, proc)  # type: ignore[arg-type]
    assert "**no**" not in text and "2.83x" in text and "Missed targets" not in text
    assert "| read decision on memory: quota's own CPU at most 8 µs | 7.5 µs | yes |" in text
    rows[2]["ratio_to_bare"] = 0.7
    proc[0]["own_us"] = 21.0
    text = targets(rows, proc)  # type: ignore[arg-type]
    assert "| gateway write route: quota-redis at 0.85 of bare | 0.70 | **no** |" in text
    assert "| read decision on memory: quota's own CPU at most 8 µs | 21.0 µs | **no** |" in text
    assert "Missed targets" in text
    rows[0]["redis_calls_per_req"] = 2.0
    assert "| at most one Redis call per request | max 2.00 | **no** |" in targets(rows, proc)  # type: ignore[arg-type]


def test_proxy_variants_run() -> None:
    """`--only proxy` serves the gateway in its own process behind quota proxy: with checks on, a
    write costs one Redis call; with them off, none (the harness measures what it says it does).
    Catches: proxy variants that do not start, or measure a proxy without quota's checks."""
    out = _module(
        "benchmarks",
        "--only",
        "proxy",
        "--quick",
        "--scenarios",
        "write",
        "--variants",
        "bare,proxy-off,proxy-on",
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = {r["variant"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert set(rows) == {"bare", "proxy-off", "proxy-on"}
    assert rows["proxy-off"]["redis_calls_per_req"] == 0 and rows["proxy-off"]["rps"] > 0
    assert 0.9 < rows["proxy-on"]["redis_calls_per_req"] < 1.3  # a write: one call (its confirm rides along)


def test_costs_drive_only_runs_the_scenario() -> None:
    """`python -m benchmarks.costs --drive write` (the run a sampling profiler records) drives the
    scenario through quota and prints nothing; an exception on the request path fails it."""
    out = _module("benchmarks.costs", "--drive", "write", "--requests", "320", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def test_costs_steps_account_for_a_read() -> None:
    """`python -m benchmarks.costs --steps` times each stage of a read's decision beside a whole
    request: every stage has its figure, and the stages every request runs (those a lane holds run
    for a path's first request only) with the rest add up to the whole request less the upstream
    (a stage that raised, or a sum printed wrong, fails it)."""
    out = _module("benchmarks.costs", "--steps", "--requests", "500", timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines()[1:] if not line.endswith(":")]
    figures = {line.rsplit(None, 1)[0].strip(): float(line.rsplit(None, 1)[1]) for line in lines}
    laned = ["URL checks", "route match", "app and plan lookup", "ids, allowlist, features", "store ops (shared plan)"]
    every = ["client address and key", "lane lookup", "deny cache", "memory store", "metrics"]
    assert all(figures[name] > 0 for name in laned + every), figures
    assert abs(sum(figures[name] for name in every) - figures["those together"]) < 0.05
    whole, alone = figures["a whole request, with quota"], figures["the upstream alone"]
    rest = figures["rest (coroutines, wrappers, headers)"]
    assert abs(whole - alone - figures["those together"] - rest) < 0.05, figures


def _costs_lines(*options: str) -> list[str]:
    """A tiny `python -m benchmarks.costs` run: its header, then one line per scenario, each with the
    upstream's CPU and quota's on memory and on Redis."""
    out = _module("benchmarks.costs", "--rounds", "1", "--requests", "320", *options, timeout=180)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["read", "write", "login", "flood"]
    assert all(len(line.split()) == 7 for line in lines[1:]), out.stdout
    return lines


def test_costs_on_uvloop_prints_every_scenario() -> None:
    """`python -m benchmarks.costs --loop uvloop` measures on the loop uvicorn serves on."""
    assert "uvloop" in _costs_lines("--loop", "uvloop")[0]


def test_costs_over_the_gateway_prints_every_scenario() -> None:
    """`python -m benchmarks.costs --upstream gateway --gc off` measures quota beside the reference
    gateway, with garbage collection off: the header says so, and every scenario has its line."""
    header = _costs_lines("--upstream", "gateway", "--gc", "off")[0]
    assert "gc off" in header and "gateway upstream" in header, header


async def test_the_headers_variant_differs_only_by_its_headers() -> None:
    """`quota-headers` (named to run: what the RateLimit headers cost) answers like quota-memory,
    with the headers; quota-memory, as shipped, has none."""
    import httpx

    from benchmarks.variants import build

    for variant, headed in (("quota-memory", False), ("quota-headers", True)):
        app = build(variant, "trivial", "redis://127.0.0.1:1/0")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            r = await client.get("/demo/pro/users/u1")
        await app.shutdown()
        assert r.status_code == 200 and r.json()["entities"] == [{"username": "u001"}]
        assert ("ratelimit-limit" in r.headers) is headed, variant


def test_an_unknown_variant_is_named() -> None:
    """A misspelt variant stops the harness before anything runs, naming it (not a run without it)."""
    out = _module("benchmarks", "--quick", "--variants", "bare,quota-haeders", timeout=60)
    assert out.returncode == 2 and "quota-haeders" in out.stderr, out.stderr


def test_instructions_child_drives_quota_on_redis() -> None:
    """`python -m benchmarks.instructions` counts its children under callgrind; a child (here without
    valgrind, which takes minutes) drives the scenario through quota on its own Redis and prints
    nothing: an exception on the request path, or a Redis it failed to start, fails it."""
    argv = ("--child", "redis", "--scenario", "write", "--requests", "200")
    out = _module("benchmarks.instructions", *argv, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def test_instructions_per_request_from_callgrind_counts() -> None:
    """One request's count is the difference of the N and 3N runs over 2N (start-up cancels out),
    read from the line callgrind prints at exit; a run that printed none is an error, not a zero."""
    from benchmarks.instructions import collected, per_request

    stderr = "==71== Events    : Ir\n==71== Collected : 2027680292\n==71==\n==71== I   refs:      2,027,680,292\n"
    assert collected(stderr) == 2027680292
    assert per_request(1991740477, 2027680292, 1000) == (2027680292 - 1991740477) / 2000
    with pytest.raises(RuntimeError, match="no count"):
        collected("==71== valgrind: failed to start tool\n")


def test_instructions_served_feed_speaks_http_to_the_load_server() -> None:
    """`--served` feeds the load runs' uvicorn server as wrk does, over kept-alive connections; a
    read and a write each come back whole, and a refusal (the flood's 429s) stops the count rather
    than counting a refusal's cheaper work as the request's."""
    import asyncio

    from benchmarks.instructions import feed
    from benchmarks.load import Server
    from benchmarks.redis_server import free_port

    for scenario in ("trivial", "write", "flood"):
        server = Server("quota-memory", scenario, free_port(), "redis://127.0.0.1:1/0")
        port = int(server.base.rsplit(":", 1)[1])
        try:
            if scenario == "flood":
                with pytest.raises(RuntimeError, match="answered 429"):
                    asyncio.run(asyncio.wait_for(feed(port, scenario, 640), 60))
            else:
                asyncio.run(asyncio.wait_for(feed(port, scenario, 96), 60))
        finally:
            server.stop()


def test_instructions_counts_the_redis_side_of_a_write(tmp_path: Path) -> None:
    """`--redis-server` counts redis-server under callgrind while the quota-redis server, outside it,
    is fed writes: one count a request, of a script's size (tens of thousands of instructions at
    least: a parse, a rate and a capped add), not the idle server's nothing nor a run's total.
    `--keep` leaves both runs' outputs for callgrind_annotate."""
    argv = ("--redis-server", "--scenario", "write", "--requests", "60", "--keep", str(tmp_path / "kept"))
    out = _module("benchmarks.instructions", *argv, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("redis-server's instructions per request, write"), out.stdout
    count = int(lines[1].split()[1])
    assert 30_000 < count < 3_000_000, out.stdout
    kept = sorted(p.name for p in (tmp_path / "kept").iterdir())
    assert kept == ["redis-server.write.180.callgrind", "redis-server.write.60.callgrind"], kept
    assert (tmp_path / "kept" / kept[0]).read_text().startswith("# callgrind format")
    refused = _module("benchmarks.instructions", "--keep", str(tmp_path / "no"), timeout=60)
    assert refused.returncode == 2 and "--keep" in refused.stderr, refused.stderr


def test_a_counted_run_waits_for_its_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under callgrind a store call seems some fifty times slower: the counted runs' config waits a
    minute for it (a 503 would count the refusal's work, not the request's); load runs keep the
    default 250 ms."""
    from benchmarks.variants import config_dir
    from quota.config import load_config

    monkeypatch.delenv("QUOTA_BENCH_STORAGE_TIMEOUT_MS", raising=False)
    assert load_config(config_dir("write")).settings.storage_timeout_ms == 250
    monkeypatch.setenv("QUOTA_BENCH_STORAGE_TIMEOUT_MS", "60000")
    assert load_config(config_dir("write")).settings.storage_timeout_ms == 60000


def test_syscalls_reads_strace_and_perf_tables() -> None:
    """`benchmarks.syscalls` reads `strace -c` as calls per request and `perf report --sort dso`
    as shares, largest first (tables as this machine's strace 6.1 and perf 6.1 print them)."""
    from benchmarks.syscalls import perf_rows, strace_rows

    table = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 79.59    0.153648          18      8423         8 write
 17.12    0.033061           8      4006           read
  2.46    0.004757          13       343           epoll_pwait
------ ----------- ----------- --------- --------- ----------------
100.00    0.193057          14     12772         8 total
"""
    assert strace_rows(table, 4000) == {"write": 8423 / 4000, "read": 4006 / 4000, "epoll_pwait": 343 / 4000}
    report = """# Samples: 14K of event 'cpu-clock'
# Overhead  Shared Object
# ........  ............................
#
     4.27%  quota_compiled__mypyc.cpython-311-x86_64-linux-gnu.so
    52.37%  libpython3.11.so.1.0
    33.06%  [kernel.kallsyms]
"""
    shares = perf_rows(report)
    assert [name for _, name in shares] == [
        "libpython3.11.so.1.0",
        "[kernel.kallsyms]",
        "quota_compiled__mypyc.cpython-311-x86_64-linux-gnu.so",
    ]
    assert shares[0][0] == 52.37


def test_syscalls_split_each_variants_cpu() -> None:
    """`python -m benchmarks.syscalls` serves each variant under wrk and prints its CPU per request,
    user and system, one line a variant."""
    out = _module("benchmarks.syscalls", "--variants", "bare,quota-memory", "--seconds", "1", timeout=180)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["trivial bare", "trivial quota-memory"], out.stdout
    for line in lines:
        user, system = (float(x) for x in re.findall(r"(?:user|system) ([\d.]+) µs", line))
        assert user > 0 and system >= 0, line
