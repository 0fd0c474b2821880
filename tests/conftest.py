"""Shared fixtures: a redis-server of our own on a free port, stores on both backends, and a
client that drives the wrapped gateway over HTTP through the middleware."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync

from benchmarks.redis_server import RedisServer, free_port
from quota.config import DEFAULT_DIR, load_config
from quota.serve import build_app
from quota.store.memory import MemoryStore
from quota.store.redis import RedisStore

ROOT = Path(__file__).resolve().parent.parent


class RedisCluster:
    """A 3-master Redis Cluster this session started: redis-server --cluster-enabled, joined by redis-cli."""

    def __init__(self) -> None:
        self.nodes = [RedisServer(free_port(below=55000)) for _ in range(3)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for node in self.nodes:
            node.start(
                ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"]
            )
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
        deadline = time.time() + 30
        for node in self.nodes:
            client = redis_sync.Redis(port=node.port)
            while client.cluster("info").get("cluster_state") != "ok":
                if time.time() > deadline:
                    raise RuntimeError("the test cluster did not come up")
                time.sleep(0.1)
            client.close()

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.cluster),
    ]
)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Every store behaviour runs on memory, a single redis-server and a 3-master Redis Cluster."""
    if request.param == "memory":
        yield MemoryStore()
        return
    server: RedisServer | RedisCluster = request.getfixturevalue(
        "redis_server" if request.param == "redis" else "redis_cluster"
    )
    server.flush()
    s = RedisStore(server.url, timeout_ms=2000)
    yield s
    await s.close()


class Clock:
    """A controllable clock for rate windows: tests move time, never sleep.

    Each reading advances it by `tick` seconds, so fill-to-the-cap tests stay under the per-IP
    rate; rate tests set tick to 0 and move time with advance().
    """

    def __init__(self, start: float = 1_790_000_000.0, tick: float = 0.021) -> None:
        self.now = start
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock(time.time())


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A writable copy of the shipped config, for tests that change it."""
    target = tmp_path / "config"
    shutil.copytree(DEFAULT_DIR, target)
    return target


class _Client(httpx.AsyncClient):
    """A client that, like a server at shutdown, stops the middleware's accounts watcher and lets
    it send its waiting confirms before the test's store and event loop close under them (a confirm
    task still pending, or a watcher's store call in flight, leaves a warning that fails whichever
    test comes next)."""

    async def __aexit__(self, *exc: Any) -> None:
        shutdown = getattr(self._transport.app, "shutdown", None)  # type: ignore[attr-defined]
        if shutdown is not None:
            await shutdown()
        await super().__aexit__(*exc)


def asgi_client(
    app: Any, client: tuple[str, int] = ("127.0.0.1", 123), base_url: str = "http://gateway"
) -> httpx.AsyncClient:
    """An HTTP client calling `app` in-process, from the address `client`: the one way tests do."""
    return _Client(transport=httpx.ASGITransport(app=app, client=client), base_url=base_url)


def make_client(
    store: Any, clock: Clock | None = None, config: Any = None, upstream: Any = None, client_ip: str = "10.1.2.3"
) -> httpx.AsyncClient:
    app = build_app(config if config is not None else load_config(), store=store, upstream=upstream)
    if clock is not None:
        app.clock = clock
    return asgi_client(app, (client_ip, 40000))


@pytest.fixture
async def client(store: Any, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(store, clock) as c:
        yield c


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m quota ...` as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "quota", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
