"""Several real gateway processes (`quota serve`) sharing one Redis, as operators run them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
from websockets.sync.client import connect

from quota.keys import app_prefix
from tests.conftest import ROOT, RedisServer, free_port
from tests.running import wait_until

pytestmark = pytest.mark.redis
BASIC = "demo/basic"


def start(argv: list[str], probe: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A server process on a free port (argv ends with --port), once it answers `probe`."""
    port = free_port()
    proc = subprocess.Popen(
        [*argv, str(port)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            httpx.get(base + probe, timeout=1)
            return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{' '.join(argv[:4])} did not start")


def serve(config: Path, redis_url: str) -> tuple[subprocess.Popen[bytes], str]:
    argv = [sys.executable, "-m", "quota", "serve", "--config", str(config), "--redis", redis_url, "--port"]
    return start(argv, "/demo/basic/users")


@pytest.fixture
def two_gateways(redis_server: RedisServer, config_dir: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    redis_server.flush()
    (config_dir / "quota.yaml").write_text("lease_ttl_s: 2\ntrusted_proxies: [127.0.0.1/32]\n")
    procs = [serve(config_dir, redis_server.url) for _ in range(2)]
    yield procs
    for proc, _ in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


async def test_two_processes_share_the_cap(
    two_gateways: list[tuple[subprocess.Popen[bytes], str]], redis_server: RedisServer
) -> None:
    """500 concurrent friend adds spread over two processes against basic's cap of 250: exactly 250 pass.

    Each process runs its own reference gateway (state in memory), so every user is registered on
    both; what the processes share is quota's counter in Redis.
    """
    (_, a), (_, b) = two_gateways
    users = [{"username": f"p{i}"} for i in range(500)] + [{"username": "owner"}]
    async with httpx.AsyncClient(timeout=30) as c:
        for base in (a, b):
            for i in range(0, len(users), 60):
                assert (await c.post(f"{base}/{BASIC}/users", json=users[i : i + 60])).status_code == 200
        sem = asyncio.Semaphore(64)

        async def add(i: int) -> int:
            async with sem:
                # Many clients behind the trusted proxy: each has its own per-IP budget.
                r = await c.post(
                    f"{a if i % 2 else b}/{BASIC}/users/owner/contacts/users/p{i}",
                    headers={"x-forwarded-for": f"10.0.{i // 250}.{i % 250}"},
                )
                return r.status_code

        codes = await asyncio.gather(*(add(i) for i in range(500)))
    assert codes.count(200) == 250 and codes.count(403) == 250
    r = redis_sync.Redis(port=redis_server.port)
    assert r.scard(f"{app_prefix('demo#basic')}s:contacts:o:owner") == 250
    r.close()


def test_one_write_is_one_script_call(redis_server: RedisServer, config_dir: Path) -> None:
    """A typical write (join a group) costs one Redis call: one EVALSHA checks and reserves, and the
    confirm of its claim (the upstream said 2xx) rides with the app's next call; the last one waits
    confirm_delay_ms (1 s here) and goes alone. Counted by INFO commandstats; the claims are read
    from their raw hash, spelled out here.
    Catches: a confirm sent as a call of its own (8 calls for 4 writes), or never sent at all.

    commandstats also counts what the script runs inside Redis (SCARD, SISMEMBER, SADD...), so the
    client's calls are read from the evalsha line alone, and the total from every line.
    """
    redis_server.flush()
    (config_dir / "quota.yaml").write_text("confirm_delay_ms: 1000\n")
    proc, a = serve(config_dir, redis_server.url)
    try:
        httpx.post(f"{a}/{BASIC}/users", json=[{"username": u} for u in ("o", "j0", "j1", "j2", "j3")])
        gid = httpx.post(f"{a}/{BASIC}/chatgroups", json={"owner": "o"}).json()["data"]["groupid"]
        r = redis_sync.Redis(port=redis_server.port)
        claims = "q:{demo#basic}:s:group_members:inflight"
        wait_until(lambda: not r.exists(claims), "the create's claims were never confirmed")
        r.config_resetstat()
        for i in range(4):
            assert httpx.post(f"{a}/{BASIC}/chatgroups/{gid}/users/j{i}").status_code == 200
        stats = r.info("commandstats")
        assert r.hget(claims, f"{gid}|j3") == b"1"  # the last add's claim, still waiting for its confirm
        wait_until(lambda: not r.exists(claims), "the last confirm was never sent")
        evalsha = r.info("commandstats")["cmdstat_evalsha"]["calls"]
        r.close()
    finally:
        proc.terminate()
        proc.wait(10)
    calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
    assert calls.get("evalsha") == 4 and evalsha == 5
    client_side = {
        "evalsha",
        "eval",
        "script|load",
        "script",
        "config|resetstat",
        "info",
        "get",
        "hgetall",
        "multi",
        "exec",
    }
    inside = sum(n for name, n in calls.items() if name not in client_side)
    assert inside > 4  # the script's own commands: visible here, not extra round trips


def test_killed_worker_leaks_no_connections(
    two_gateways: list[tuple[subprocess.Popen[bytes], str]], redis_server: RedisServer
) -> None:
    """Catches leases that outlive a worker killed with -9 (its three connections counted forever)
    and a survivor whose lease is not renewed. Leases last 2 s here (lease_ttl_s: 2), renewed every
    third of that; the test waits on conditions with deadlines, never a fixed sleep."""
    (proc_a, a), (_, b) = two_gateways
    for base in (a, b):
        httpx.post(f"{base}/{BASIC}/users", json=[{"username": f"k{i}"} for i in range(5)])
    url_a, url_b = a.replace("http", "ws"), b.replace("http", "ws")
    stack = contextlib.ExitStack()
    for i in range(3):
        stack.enter_context(connect(f"{url_a}/{BASIC}/users/k{i}/connection"))
    r = redis_sync.Redis(port=redis_server.port)
    key = "q:{demo#basic}:online"

    def leases() -> dict[str, int]:
        return {m.decode(): int(s) for m, s in r.zrange(key, 0, -1, withscores=True)}

    def live() -> dict[str, int]:
        now = int(time.time() * 1000)
        return {m: d for m, d in leases().items() if d > now}

    def wait(cond: Any, seconds: float, what: str) -> None:
        deadline = time.time() + seconds
        while not cond():
            assert time.time() < deadline, what
            time.sleep(0.05)

    wait(lambda: len(live()) == 3, 10, "the three connections of process A hold no leases")
    dead = set(live())
    other = stack.enter_context(connect(f"{url_b}/{BASIC}/users/k4/connection"))
    wait(lambda: len(live()) == 4, 10, "the connection to process B holds no lease")
    (survivor,) = set(live()) - dead
    os.kill(proc_a.pid, signal.SIGKILL)
    proc_a.wait(10)
    killed_ms = int(time.time() * 1000)
    # The dead worker's leases lapse within one lease (2 s) of the kill, and are never renewed.
    wait(lambda: set(live()) == {survivor}, 6, f"leases of the killed worker still count: {live()}")
    # One read: a lapsed lease may be swept between two (a KeyError, seen once in CI).
    held = leases()
    assert all(held[m] <= killed_ms + 2000 for m in dead if m in held)
    # The survivor's lease is renewed past the moment the dead ones lapsed: it keeps counting.
    wait(lambda: live().get(survivor, 0) > killed_ms + 2500, 6, "the survivor's lease was not renewed")
    assert set(live()) == {survivor}
    other.send("still here")
    assert other.recv() == "still here"
    with contextlib.suppress(Exception):
        stack.close()
    r.close()


def race_server(redis_url: str) -> tuple[subprocess.Popen[bytes], str]:
    argv = [sys.executable, "-m", "uvicorn", "tests.race_server:app", "--log-level", "warning", "--port"]
    return start(argv, "/demo/pro/users", {"QUOTA_TEST_REDIS": redis_url})


async def test_undo_race_across_two_processes(redis_server: RedisServer) -> None:
    """Catches an undo in one process removing a member another process's request relies on: a
    batch join [u1, ghost] held upstream in process A (then refused, 404) while process B joins u1
    (200). u1 must stay counted."""
    redis_server.flush()
    servers = [race_server(redis_server.url) for _ in range(2)]
    r = redis_sync.Redis(port=redis_server.port)
    try:
        (_, a), (_, b) = servers
        key = "q:{demo#pro}:s:group_members:o:777"
        async with httpx.AsyncClient(timeout=30) as c:
            batch = asyncio.ensure_future(
                c.post(
                    f"{a}/demo/pro/chatgroups/777/users",
                    json={"usernames": ["u1", "ghost"]},
                    headers={"x-test-hold": "test:release"},
                )
            )
            deadline = time.time() + 10
            while not r.sismember(key, "u1"):
                assert time.time() < deadline, "process A never reserved u1"
                await asyncio.sleep(0.01)
            assert not batch.done()
            single = await c.post(f"{b}/demo/pro/chatgroups/777/users/u1")
            assert single.status_code == 200
            assert not batch.done()  # A's batch is still held: B joined while A's add was unsettled
            r.set("test:release", 1)
            assert (await batch).status_code == 404
        # The undo is settled once the answer has gone out: give it its moment, then hold it to it.
        deadline = time.time() + 5
        while r.sismember(key, "ghost") and time.time() < deadline:
            await asyncio.sleep(0.01)
        assert r.smembers(key) == {b"u1"}
        assert r.smembers("q:{demo#pro}:s:group_members:m:u1") == {b"777"}
    finally:
        r.close()
        for proc, _ in servers:
            proc.terminate()
            proc.wait(10)


def test_websocket_refused_upstream_counts_nothing(
    two_gateways: list[tuple[subprocess.Popen[bytes], str]], redis_server: RedisServer
) -> None:
    """Catches a WebSocket login counted when the gateway closed the connection: a user that does not
    exist is no daily active user, and holds no online lease."""
    (_, a), _ = two_gateways
    r = redis_sync.Redis(port=redis_server.port)
    url = a.replace("http", "ws")
    with pytest.raises(Exception) as info, connect(f"{url}/{BASIC}/users/nobody/connection") as ws:
        ws.recv(timeout=5)
    assert "403" in str(info.value)  # a handshake closed before accept: uvicorn answers HTTP 403
    day = time.strftime("%Y%m%d", time.gmtime())
    deadline = time.time() + 5
    while r.zcard("q:{demo#basic}:online") and time.time() < deadline:
        time.sleep(0.05)
    assert r.scard(f"q:{{demo#basic}}:dau:{day}") == 0 and r.zcard("q:{demo#basic}:online") == 0
    httpx.post(f"{a}/{BASIC}/users", json={"username": "real"})
    with connect(f"{url}/{BASIC}/users/REAL/connection") as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "hi"
        assert r.smembers(f"q:{{demo#basic}}:dau:{day}") == {b"real"}
    r.close()


def test_serve_ignores_uvicorn_proxy_headers(redis_server: RedisServer, config_dir: Path) -> None:
    """Catches uvicorn rewriting the client address from X-Forwarded-For before quota's own
    trusted_proxies applies (FORWARDED_ALLOW_IPS='*'): with no trusted proxy, forged hops must not
    buy fresh per-IP budgets."""
    (config_dir / "quota.yaml").write_text("trusted_proxies: []\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "quota", "serve", "--config", str(config_dir), "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "FORWARDED_ALLOW_IPS": "*"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 20
        while True:
            try:
                httpx.get(base + "/", timeout=1)
                break
            except httpx.HTTPError:
                assert time.time() < deadline
                time.sleep(0.1)
        with httpx.Client() as c:
            codes = [
                c.get(f"{base}/demo/pro/users", headers={"x-forwarded-for": f"5.5.{i // 200}.{i % 200}"}).status_code
                for i in range(140)
            ]
        assert 429 in codes
    finally:
        proc.terminate()
        proc.wait(10)
