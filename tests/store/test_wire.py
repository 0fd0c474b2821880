"""The lean pipelined connection of the request path, against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis as redis_sync

from quota.store.wire import ReplyError, Script, Wire
from tests.conftest import RedisServer

pytestmark = pytest.mark.redis


async def test_concurrent_calls_get_their_own_replies(redis_server: RedisServer) -> None:
    """Hundreds of concurrent calls share one connection and each gets its own answer, in order."""
    wire = Wire(redis_server.url, timeout_ms=2000)
    replies = await asyncio.gather(*(wire.call(("ECHO", f"m{i}")) for i in range(500)))
    assert replies == [f"m{i}".encode() for i in range(500)]
    await wire.close()


async def test_noscript_reloads_once(redis_server: RedisServer) -> None:
    """After the server forgets its scripts (a restart, SCRIPT FLUSH) the call loads it and goes through."""
    wire = Wire(redis_server.url, timeout_ms=2000)
    script = Script("return ARGV[1] .. KEYS[1]")
    assert await wire.evalsha(script, ["k"], ["v"]) == b"vk"
    await wire.call(("SCRIPT", "FLUSH"))
    assert await wire.evalsha(script, ["k2"], ["w"]) == b"wk2"
    with pytest.raises(ReplyError):
        await wire.evalsha(Script("return redis.call('NOPE')"), ["k"], [])
    await wire.close()


async def test_hung_server_times_out_then_recovers() -> None:
    """A server that stops answering fails every call in flight after the timeout; once it answers
    again the next call reconnects."""
    server = RedisServer()
    server.start()
    wire = Wire(server.url, timeout_ms=200)
    try:
        assert await wire.call(("PING",)) == b"PONG"
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        results = await asyncio.gather(*(wire.call(("PING",)) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results)
        assert time.monotonic() - started < 1.0
        os.kill(server.proc.pid, signal.SIGCONT)
        assert await wire.call(("PING",)) == b"PONG"
        server.stop()
        with pytest.raises(OSError):
            await wire.call(("PING",))
        server.start()
        assert await wire.call(("PING",)) == b"PONG"
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        await wire.close()
        server.stop()


async def test_auth_and_db_are_sent(tmp_path: object) -> None:
    """A password and a database number in the URL are used on every (re)connection."""
    server = RedisServer()
    server.start(["--requirepass", "s3cret-pass"])
    try:
        wire = Wire(f"redis://:s3cret-pass@127.0.0.1:{server.port}/3", timeout_ms=1000)
        await wire.call(("SET", "k", "v"))
        client = redis_sync.Redis(port=server.port, password="s3cret-pass", db=3)
        assert client.get("k") == b"v"
        client.close()
        bad = Wire(f"redis://:wrong@127.0.0.1:{server.port}/0", timeout_ms=1000)
        with pytest.raises(ReplyError):
            await bad.call(("PING",))
        await wire.close()
    finally:
        server.stop()


def test_under_uvloop(redis_server: RedisServer) -> None:
    """The connection works on uvloop, the loop uvicorn runs the gateway on."""
    import uvloop  # installed with uvicorn[standard], a dependency of quota

    async def main() -> list[bytes]:
        wire = Wire(redis_server.url, timeout_ms=2000)
        try:
            script = Script("return ARGV[1]")
            return list(await asyncio.gather(*(wire.evalsha(script, ["k"], [f"u{i}"]) for i in range(200))))
        finally:
            await wire.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == [f"u{i}".encode() for i in range(200)]


def test_which_urls_take_the_lean_connection() -> None:
    """Single servers by URL use the pipelined connection; Cluster and Sentinel keep redis-py."""
    from quota.store.redis import RedisStore

    assert RedisStore("redis://127.0.0.1:1/0").wire is not None
    assert RedisStore("unix:///tmp/none.sock").wire is not None
    assert RedisStore("redis+cluster://127.0.0.1:1").wire is None
    assert RedisStore("redis+sentinel://127.0.0.1:1/svc").wire is None
