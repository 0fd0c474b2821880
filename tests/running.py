"""Real server processes for the tests: started on a free port, logs kept in a file, stopped after."""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port


class Running:
    """`argv` with {port} filled in, run from the checkout until stop(); ready once `ready` answers."""

    def __init__(self, argv: list[str], *, ready: str = "/", env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="quota-test-", suffix=".log")[1])
        atexit.register(self.log_path.unlink, True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [a.format(port=self.port) for a in argv],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self._wait(ready)

    def _wait(self, ready: str) -> None:
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args} exited {self.proc.returncode}:\n{self.log()}")
            try:
                httpx.get(self.base + ready, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.proc.args} did not answer on {ready}:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def quota(*args: str) -> list[str]:
    return [sys.executable, "-m", "quota", *args]


def gateway() -> Running:
    """The reference IM gateway alone, as a separate service (what `quota proxy` stands in front of)."""
    argv = [sys.executable, "-m", "uvicorn", "quota.gateway:create_gateway", "--factory", "--port", "{port}"]
    return Running([*argv, "--log-level", "warning"])


def wait_until(condition: Callable[[], object], what: str, seconds: float = 10) -> None:
    """Poll `condition` until it is true; fail with `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def established(port: int) -> int:
    """How many TCP connections to local `port` are ESTABLISHED, read from /proc/net/tcp{,6}."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                count += int(local.rsplit(":", 1)[1], 16) == port and state == "01"
    return count
