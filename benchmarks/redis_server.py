"""A redis-server of our own on a free port, with no persistence: the one the tests and the
benchmarks start, so neither ever touches (or flushes) a Redis it did not start."""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time

import redis as redis_sync


def free_port(below: int = 65536) -> int:
    """A port free now; `below` leaves room for a cluster bus, which listens on port + 10000."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if below == 65536:
            return port
        if port < below:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port + 10000)) != 0:
                    return port


class RedisServer:
    """`redis-server` on 127.0.0.1, its data in a directory of its own. `launcher` goes before the
    command (the benchmarks pin it to a core with taskset)."""

    def __init__(self, port: int | None = None, launcher: list[str] | None = None) -> None:
        self.port = port or free_port()
        self.launcher = launcher or []
        self.dir = tempfile.mkdtemp(prefix="quota-redis-")
        # Removed at exit, not at stop(): a test may stop its server and start it again.
        atexit.register(shutil.rmtree, self.dir, True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, extra: list[str] | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: .ci/run installs it (apt-get install redis-server)")
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [*self.launcher, *argv, "--dir", self.dir, *(extra or [])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Any reply to a raw PING (+PONG, or -NOAUTH when a test set a password) means it is up.
        deadline = time.time() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64):
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def flush(self) -> None:
        # Our own server only: safe to flush.
        client = redis_sync.Redis(port=self.port)
        client.flushdb()
        client.close()
