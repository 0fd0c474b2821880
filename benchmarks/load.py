"""Load from wrk (pinned to its own core) against a variant served by uvicorn (pinned to another)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.variants import request_of

WRK_SCRIPTS = {
    "write": """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("POST", "/demo/pro/chatgroups/777/users/u" .. (counter % 200))
end
""",
    "login": """
counter = 0
request = function()
  counter = counter + 1
  local body = '{"username": "u' .. (counter % 2000) .. '"}'
  return wrk.format("POST", "/demo/pro/token", {["Content-Type"] = "application/json"}, body)
end
""",
}
SERVER_CORE, LOAD_CORE = "0", "1"
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(out: str) -> LoadResult:
    requests, seconds = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).groups()[:2]  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return LoadResult(int(requests), float(seconds), rps, p50, p99, int(non.group(1)) if non else 0)


def pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv] if shutil.which("taskset") else argv


class Server:
    """`python -m benchmarks.server VARIANT SCENARIO PORT REDIS` on its own core."""

    def __init__(self, variant: str, scenario: str, port: int, redis_url: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "benchmarks.server", variant, scenario, str(port), redis_url]
        self.proc = subprocess.Popen(pinned(SERVER_CORE, argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(self.base + "/__bench/sent", timeout=1)
                return
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.time() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"benchmark server {variant}/{scenario} did not start:\n{err}") from None
                time.sleep(0.05)

    def sent(self) -> int:
        # A slow variant may still be working off wrk's last requests: wait for it, patiently.
        deadline = time.time() + 20
        while True:
            try:
                return int(httpx.get(self.base + "/__bench/sent", timeout=5).text)
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def cpu_seconds(self) -> float | None:
        """User and system CPU so far of the server and its descendants (a proxy variant's gateway,
        nginx's workers). Per request, it tells whether the server's core was the limit (throughput
        times CPU per request near one second a second) and, for bare, how fast the host ran: other
        tenants of a shared machine raise it. None where there is no /proc to read."""
        total, todo, seen = 0, [self.proc.pid], False
        while todo:
            pid = todo.pop()
            try:
                # Fields after the command's closing parenthesis start at the state (field 3):
                # utime and stime are fields 14 and 15.
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
                seen = True
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(child) for child in (task / "children").read_text().split()]
            except (OSError, ValueError, IndexError):
                continue  # a process gone meanwhile, or no /proc
        return total / TICKS if seen else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def wrk(base: str, scenario: str, seconds: float, connections: int) -> LoadResult:
    method, path, _ = request_of(scenario)
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    script = WRK_SCRIPTS.get(scenario)
    with tempfile.TemporaryDirectory(prefix="quota-wrk-") as tmp:
        if script:
            lua = Path(tmp) / f"{scenario}.lua"
            lua.write_text(script)
            argv += ["-s", str(lua)]
        out = subprocess.run(pinned(LOAD_CORE, [*argv, base + path]), capture_output=True, text=True, check=True)
    return parse_wrk(out.stdout)
