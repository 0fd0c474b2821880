"""Where a served request's time goes outside Python's own counting: the server's CPU per request
split into user and system time, and with `--strace` its system calls per request, with `--perf`
perf's samples by shared object (libpython, the kernel, quota's compiled library, uvloop).

    python -m benchmarks.syscalls --scenario trivial --variants bare,quota-memory,quota-redis --strace --perf

Each variant is the load runs' server (`benchmarks/server.py`, pinned to its core) under wrk's
load (32 connections on the other core). Callgrind (`benchmarks.instructions`) counts user-space
instructions only: what a variant adds in the kernel (a Redis round trip's reads and writes, an
extra turn of the event loop's epoll) shows here. strace slows the server it watches: its counts
per request hold, its timings do not, so CPU is read in a run of its own before it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.harness import OwnRedis
from benchmarks.load import Server, wrk
from benchmarks.redis_server import free_port

TICKS = os.sysconf("SC_CLK_TCK")
CONNECTIONS = 32
_STRACE_ROW = re.compile(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$")
_PERF_ROW = re.compile(r"\s*([\d.]+)%\s+(\S+)")


def cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far (utime and stime of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def strace_counts(pid: int, base: str, scenario: str, seconds: int) -> dict[str, float]:
    """System calls per request of `pid` over a load run of `seconds`."""
    with tempfile.TemporaryDirectory(prefix="quota-strace-") as tmp:
        out = Path(tmp) / "counts"
        tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out)], stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached before the load starts
        requests = wrk(base, scenario, seconds, CONNECTIONS).requests
        tracer.terminate()
        tracer.wait(10)
        return strace_rows(out.read_text() if out.exists() else "", requests)


def strace_rows(text: str, requests: int) -> dict[str, float]:
    """`strace -c`'s table as calls per request, by system call."""
    counts = {}
    for line in text.splitlines():
        found = _STRACE_ROW.match(line)
        if found and found.group(2) != "total":
            counts[found.group(2)] = int(found.group(1)) / max(1, requests)
    return counts


def perf_shares(pid: int, base: str, scenario: str, seconds: int) -> list[tuple[float, str]]:
    """perf's cpu-clock samples of `pid` under load, as shares by shared object."""
    with tempfile.TemporaryDirectory(prefix="quota-perf-") as tmp:
        data = Path(tmp) / "perf.data"
        load = threading.Thread(target=wrk, args=(base, scenario, seconds + 2, CONNECTIONS))
        load.start()
        time.sleep(1)
        record = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-p", str(pid), "-o", str(data)]
        subprocess.run([*record, "--", "sleep", str(seconds)], check=True, capture_output=True)
        load.join()
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--sort", "dso", "--stdio"], capture_output=True, text=True
        ).stdout
    return perf_rows(report)


def perf_rows(report: str) -> list[tuple[float, str]]:
    """`perf report --sort dso --stdio` as (share in per cent, shared object), largest first."""
    shares = []
    for line in report.splitlines():
        found = _PERF_ROW.match(line)
        if found and not line.lstrip().startswith("#"):
            shares.append((float(found.group(1)), found.group(2)))
    return sorted(shares, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.syscalls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="trivial")
    parser.add_argument("--variants", default="bare,quota-memory,quota-redis")
    parser.add_argument("--seconds", type=int, default=3, help="of load per measure")
    parser.add_argument("--strace", action="store_true", help="count system calls per request (strace)")
    parser.add_argument("--perf", action="store_true", help="sample by shared object (perf, cpu-clock)")
    args = parser.parse_args(argv)
    for tool, asked in (("strace", args.strace), ("perf", args.perf)):
        if asked and shutil.which(tool) is None:
            parser.error(f"--{tool} needs {tool} on the PATH")
    redis = OwnRedis()
    try:
        for variant in args.variants.split(","):
            server = Server(variant, args.scenario, free_port(), redis.url)
            try:
                pid = server.proc.pid
                wrk(server.base, args.scenario, 1, CONNECTIONS)  # warm-up
                user, system = cpu(pid)
                run = wrk(server.base, args.scenario, args.seconds, CONNECTIONS)
                user_after, system_after = cpu(pid)
                n = max(1, run.requests)
                print(
                    f"{args.scenario} {variant}: {run.rps:.0f} rps; server CPU per request: "
                    f"user {(user_after - user) / n * 1e6:.1f} µs, system {(system_after - system) / n * 1e6:.1f} µs",
                    flush=True,
                )
                if args.strace:
                    calls = strace_counts(pid, server.base, args.scenario, args.seconds)
                    listed = ", ".join(
                        f"{name} {count:.3f}" for name, count in sorted(calls.items(), key=lambda c: -c[1])
                    )
                    print(f"  system calls per request: {listed}", flush=True)
                if args.perf:
                    shares = perf_shares(pid, server.base, args.scenario, args.seconds)
                    print(
                        "  perf samples: " + ", ".join(f"{name} {share:.1f}%" for share, name in shares[:8]), flush=True
                    )
            finally:
                server.stop()
    finally:
        redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
