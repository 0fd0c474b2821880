"""The lean pipelined connection of the request path, against a real redis-server."""

from __future__ import annotations

import asyncio
import enum
import os
import signal
import time

import hiredis
import pytest
import redis as redis_sync
from hypothesis import given
from hypothesis import strategies as st

from quota.store.program import AddOp, ConfirmOp, Program, RateOp
from quota.store.redis import RedisStore
from quota.store.wire import (
    _PACKED,
    PACKED_KEPT,
    PACKED_LONGEST,
    ReplyError,
    Script,
    Wire,
    WireClosed,
    WireTimeout,
    pack,
)
from tests.conftest import RedisServer

pytestmark = pytest.mark.redis


async def test_concurrent_calls_get_their_own_replies(redis_server: RedisServer) -> None:
    """Hundreds of concurrent calls share one connection and each gets its own answer, in order."""
    wire = Wire(redis_server.url, timeout_ms=2000)
    replies = await asyncio.gather(*(wire.call(("ECHO", f"m{i}")) for i in range(500)))
    assert replies == [f"m{i}".encode() for i in range(500)]
    await wire.close()


async def test_a_reply_to_a_caller_gone_is_dropped_in_step(redis_server: RedisServer) -> None:
    """A caller cancelled while its command is in flight (a client gone mid-request): its reply is
    dropped when it comes, the connection stays up, and the calls after it get their own replies."""
    wire = Wire(redis_server.url, timeout_ms=2000)
    await wire.call(("PING",))
    gone = [wire.send(pack(("ECHO", f"gone{i}"))) for i in range(3)]
    kept = [wire.send(pack(("ECHO", f"kept{i}"))) for i in range(3)]
    for future in gone:
        assert future is not None
        future.cancel()
    assert await asyncio.gather(*kept) == [b"kept0", b"kept1", b"kept2"]
    assert await wire.call(("ECHO", "after")) == b"after"
    await wire.close()


ARGUMENT = st.one_of(st.text(), st.binary(), st.integers(min_value=-(10**40), max_value=10**40))


@given(st.lists(ARGUMENT, min_size=1, max_size=40), st.integers(min_value=0, max_value=2))
def test_commands_are_packed_as_hiredis_packs_them(command: list[str | bytes | int], widen: int) -> None:
    """Catches a command packed unlike hiredis.pack_command (the reference): a non-ASCII string
    counted in characters, not bytes, or a count or length past the pre-built ones (512) wrong."""
    if widen:
        command = command + ["é" * 300] * widen + list(range(600 * (widen - 1)))
    assert pack(tuple(command)) == hiredis.pack_command(tuple(command))


@pytest.mark.parametrize("odd", [1.5, 1.0, True, None, ["k"]])
def test_a_command_refuses_what_redis_would_get_wrong(odd: object) -> None:
    """Catches a float or a bool sent as whatever its text happens to be: a bug upstream, said so;
    also once the int it equals (True == 1 == 1.0) was packed, and its bulk kept."""
    pack(("SET", "k", 1))
    with pytest.raises(TypeError, match="str, bytes or int"):
        pack(("SET", "k", odd))


def test_a_subclass_is_packed_by_its_value_and_never_kept() -> None:
    """An int enum spells itself by name and a str subclass may encode itself otherwise: packed by
    value, never kept, so a plain 1 or "k" packed after them is packed as itself."""

    class Level(enum.IntEnum):
        ONE = 1

    class Odd(str):
        def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
            return b"evil"

    _PACKED.clear()
    assert pack(("SET", Odd("k"), Level.ONE)) == pack(("SET", "k", 1)) == hiredis.pack_command(("SET", "k", 1))


def test_kept_bulks_are_bounded_and_packed_alike() -> None:
    """Arguments' bulks are kept between commands (a write's keys and caps recur): a command packs
    the same from the kept bulks as fresh; the kept ones stay at most PACKED_KEPT, and an argument
    too long to keep is packed all the same."""
    command = ("EVALSHA", "q:{demo#pro}:g:777", 200, "é" * 100, "x" * (PACKED_LONGEST + 1), b"raw")
    _PACKED.clear()
    first = pack(command)
    assert "q:{demo#pro}:g:777" in _PACKED and 200 in _PACKED and "é" * 100 in _PACKED
    assert "x" * (PACKED_LONGEST + 1) not in _PACKED
    assert pack(command) == first == hiredis.pack_command(command)
    _PACKED["q:{demo#pro}:g:777"] = b"$3\r\nhit\r\n"  # what a kept bulk is, it is sent as
    assert b"$3\r\nhit\r\n" in pack(command)
    _PACKED.clear()
    for i in range(PACKED_KEPT + 100):
        pack(("SADD", f"member-{i}", i))
        assert len(_PACKED) <= PACKED_KEPT
    assert pack(command) == first


async def test_packed_commands_reach_redis_whole(redis_server: RedisServer) -> None:
    """Long and non-ASCII values and a command of 700 arguments arrive as sent."""
    wire = Wire(redis_server.url, timeout_ms=2000)
    key = "wire-test:{members}"
    members = [f"m{i}" for i in range(698)]
    try:
        assert await wire.call(("SADD", key, *members)) == 698
        assert await wire.call(("SCARD", key)) == 698
        assert await wire.call(("ECHO", "好" * 1000)) == ("好" * 1000).encode()
        assert await wire.call(("ECHO", -(10**30))) == str(-(10**30)).encode()
    finally:
        await wire.call(("DEL", key))
        await wire.close()


async def test_a_store_packs_every_clock_whole(redis_server: RedisServer) -> None:
    """Catches the store's cached clock encoding served for a clock it does not hold: -1 as the first
    clock (the cache's starting value) must go out as -1, not as nothing, or the command arrives one
    argument short and the pipeline falls out of step."""
    store = RedisStore(redis_server.url, timeout_ms=2000)
    rate = RateOp("q:{wire-clock}:r:users.get:rest_per_ip:c", 100, 1000, 1, "rest_per_ip")
    try:
        for now_ms in (-1, 0, -1, 5):
            outcome = await store.run(Program([rate]), now_ms)
            assert outcome.allowed and outcome.rates[0].remaining < 100
    finally:
        await store.client.delete(rate.key)
        await store.close()


async def test_a_shared_program_with_confirms_after_it_is_packed_whole(redis_server: RedisServer) -> None:
    """A shared program's encoding is kept on it; the app's waiting confirms that ride with it are
    packed alone and sent after it. Catches the kept encoding sent without them, with them counted
    in the argument count but missing (the pipeline falls out of step), or reused for a program
    whose ops differ: every packing equals the same ops packed from scratch, dry runs included, and
    Redis runs what is sent (the confirm settles its claim)."""
    store = RedisStore(redis_server.url, timeout_ms=2000)
    inflight = "q:{wire-ride}:s:contacts:inflight"
    rate = RateOp("q:{wire-ride}:r:friends.add:rest_per_ip:c", 100, 1000, 1, "rest_per_ip")
    add = AddOp(
        "friends_per_user",
        "q:{wire-ride}:s:contacts:o:a",
        5,
        ("b",),
        inflight_key=inflight,
        fields=("a|b",),
        claim_ttl_ms=60_000,
    )
    shared = Program([rate, add])
    try:
        assert (await store.run(shared, 1_000)).allowed
        assert shared.packed is not None  # kept: what follows reuses it
        for confirms in (
            [ConfirmOp(inflight, ("a|b",))],
            [ConfirmOp(inflight, ("a|b",)), ConfirmOp(inflight, ("x|y",))],
        ):
            riding = shared.extended(confirms)
            assert riding.ops == [rate, add, *confirms] and riding.base is shared
            for dry in (False, True):
                whole = store._packed(Program(list(riding.ops)), 2_000, dry)
                assert store._packed(riding, 2_000, dry) == whole
        assert (await store.run(shared.extended([ConfirmOp(inflight, ("a|b",))]), 3_000)).allowed
        # The confirm went out and ran (first, as confirms do): the first claim settled, the ride's
        # own add claimed again; without it, two claims would be in flight.
        assert await store.client.hget(inflight, "a|b") == b"1"
    finally:
        await store.client.delete(rate.key, add.owner_key, inflight, inflight + ":due", "q:{wire-ride}:s:contacts:m:b")
        await store.close()


async def test_noscript_reloads_once(redis_server: RedisServer) -> None:
    """After the server forgets its scripts (a restart, SCRIPT FLUSH) the call loads it and goes through."""
    wire = Wire(redis_server.url, timeout_ms=2000)
    script = Script("return ARGV[1] .. KEYS[1]")
    assert await wire.evalsha(script, script.command(["k"], ["v"])) == b"vk"
    await wire.call(("SCRIPT", "FLUSH"))
    assert await wire.evalsha(script, script.command(["k2"], ["w"])) == b"wk2"
    with pytest.raises(ReplyError):
        nope = Script("return redis.call('NOPE')")
        await wire.evalsha(nope, nope.command(["k"], []))
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
        assert all(isinstance(r, WireTimeout) for r in results), results  # a timeout, said so
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


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "connecting"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_busy_event_loop_is_no_redis_timeout(redis_server: RedisServer, loop: str, connected: bool) -> None:
    """Catches a loop stall passing for a Redis timeout (audit of 2026-12-02): calls queued, then
    0.6 s of CPU on the loop (a client's large body parsed), and the watchdog, due first under
    uvloop (timers run before I/O), failed every call whose reply sat unread in the socket. Three
    such failures opened the breaker, and `rates: open` let rates through. The calls get their
    replies; a Redis that really stopped still times out (test_hung_server_times_out_then_recovers).
    The same for a connect under way when the loop stalls (the review of 2026-12-02)."""
    import uvloop

    async def main() -> list[object]:
        wire = Wire(redis_server.url, timeout_ms=200)
        try:
            if connected:
                assert await wire.call(("PING",)) == b"PONG"
            calls = [asyncio.ensure_future(wire.call(("ECHO", f"m{i}"))) for i in range(3)]
            asyncio.get_running_loop().call_soon(time.sleep, 0.6)
            return list(await asyncio.gather(*calls, return_exceptions=True))
        finally:
            await wire.close()

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(main()) == [b"m0", b"m1", b"m2"]


async def test_the_calls_one_failed_connect_fails_share_its_event() -> None:
    """Catches the calls waiting on one connect each failing on their own (the review of
    2026-12-02): the failed connect's error named no event, so each counted apart toward the
    breaker, and one refused connect was three consecutive failures. They share one error, with
    one event, and a later failure has another."""
    server = RedisServer()
    server.start()
    wire = Wire(server.url, timeout_ms=200)
    try:
        assert await wire.call(("PING",)) == b"PONG"
        server.stop()
        await asyncio.sleep(0.05)  # the close reaches the wire
        first = await asyncio.gather(*(wire.call(("PING",)) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, WireClosed) for r in first), first
        events = {getattr(r, "event", 0) for r in first}
        assert len(events) == 1 and 0 not in events, events
        again = await asyncio.gather(wire.call(("PING",)), return_exceptions=True)
        assert isinstance(again[0], WireClosed) and again[0].event not in events
    finally:
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
            return list(
                await asyncio.gather(*(wire.evalsha(script, script.command(["k"], [f"u{i}"])) for i in range(200)))
            )
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
