"""A lean Redis connection for the request path: one EVALSHA per request, pipelined.

Why not redis-py here: one awaited command through redis.asyncio costs about 80 µs of Python per
request, most of it in its connection-pool and parser layers; its pipelines allow one batch in
flight. This connection writes the packed commands of concurrent requests into one socket as they
come (flushing every few commands, or at the end of the loop tick), parses replies with
hiredis.Reader, and resolves each request's future in order: a few µs per request. Commands are
packed here, not by hiredis.pack_command, which formats each argument's length with sprintf.

It does only what the hot path needs, with the care redis-py takes:
- a timeout on every call: a watchdog aborts the connection when the oldest call outlives it,
  failing every call in flight (Redis answers in order, so nothing later can arrive first);
- reconnection on the next call after any loss, with AUTH and SELECT again;
- NOSCRIPT after a Redis restart: SCRIPT LOAD, then the call is sent again, once.

redis-py remains the client for everything else (admin reads, accounts, Cluster, Sentinel).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import ssl as ssl_module
import time
from collections.abc import Callable
from typing import Any, Final

import hiredis
from mypy_extensions import mypyc_attr
from redis.asyncio.connection import parse_url


class ReplyError(Exception):
    """An error reply from Redis (-ERR ..., -NOSCRIPT ...)."""


# A ConnectionError (callers catch OSError), which mypyc cannot make a native class of.
@mypyc_attr(native_class=False)
class WireClosed(ConnectionError):
    # Which failure of a connection failed the call (0: none in particular): every call waiting
    # when a connection fails gets the same one, and counts once toward the breaker.
    event = 0


@mypyc_attr(native_class=False)
class WireTimeout(WireClosed):
    """Redis did not answer in time (named so: the store guard reports it as a timeout)."""


# A reply is late only if the watchdog saw it late on time. One that fires this much past its
# time found the event loop busy (a request's CPU), with replies perhaps unread in the socket: it
# looks again once the loop has read them, up to LATE_MOST timeouts past the deadline. A loop stall
# must not pass for a Redis outage: it would open the breaker and put every app on its outage policy.
LATE_S: Final = 0.05
LATE_MOST: Final = 4
_EVENTS = itertools.count(1)


def _failure(exc: Exception) -> WireClosed:
    """A connection's failure, as its callers get it: a timeout said so, and one event for all."""
    kind = WireTimeout if isinstance(exc, TimeoutError) else WireClosed
    failed = kind(str(exc) or exc.__class__.__name__)
    failed.event = next(_EVENTS)
    return failed


# Flush once this many commands are buffered, else at the end of the loop tick. Per-tick flushing
# alone puts concurrent requests in lockstep and leaves the CPU idle between ticks; per-command
# writes cost a syscall each.
FLUSH_EVERY: Final = 4


# RESP's "*<count>\r\n" and "$<length>\r\n" for the counts and lengths commands mostly have, built once.
_ARRAYS: Final = tuple(b"*%d\r\n" % n for n in range(512))
_BULKS: Final = tuple(b"$%d\r\n" % n for n in range(512))


def array(count: int) -> bytes:
    """RESP's header of a command of `count` arguments."""
    return _ARRAYS[count] if count < 512 else b"*%d\r\n" % count


def bulk(data: bytes) -> bytes:
    """One argument, bytes already, in RESP."""
    size = len(data)
    return b"".join((_BULKS[size] if size < 512 else b"$%d\r\n" % size, data, b"\r\n"))


# Each str or int argument's whole RESP bulk, kept: a write's program is packed anew per request,
# yet most of its arguments (keys, caps, TTLs, the client's rate key) recur from one request to the
# next. One item a join where there were three, and no encode. Bounded: cleared when full.
_PACKED: Final[dict[str | int, bytes]] = {}
PACKED_KEPT: Final = 4096
PACKED_LONGEST: Final = 256


def bulks(args: tuple[Any, ...] | list[Any]) -> bytes:
    """Arguments in RESP, as hiredis.pack_command packs them: str as UTF-8, bytes as they are, int in
    decimal. Anything else is a TypeError (a float or a bool in a command is a bug upstream)."""
    parts: list[bytes] = []
    packed = _PACKED
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif type(arg) is str or type(arg) is int:
            # Exact types only: a bool would find its int's entry (True == 1), and any subclass may
            # spell itself otherwise (an int enum's str is its name); the kept bytes are everyone's.
            one = packed.get(arg)
            if one is not None:
                parts.append(one)
                continue
            data = arg.encode() if type(arg) is str else str(arg).encode()
            if len(data) <= PACKED_LONGEST:
                if len(packed) >= PACKED_KEPT:
                    packed.clear()
                one = packed[arg] = bulk(data)
                parts.append(one)
                continue
        elif isinstance(arg, str):
            data = str.encode(arg)  # a subclass's own encode() is not the wire's
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = str(int(arg)).encode()
        else:
            raise TypeError(f"a redis command takes str, bytes or int, not {type(arg).__name__}")
        size = len(data)
        # Three appends, not `parts += (...)`: compiled, that is a generic extend by a new tuple.
        parts.append(_BULKS[size] if size < 512 else b"$%d\r\n" % size)
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


def pack(command: tuple[Any, ...]) -> bytes:
    """A command in RESP (see `bulks`)."""
    return array(len(command)) + bulks(command)


# Final: compiled code calls it from a C static, where `time.monotonic` is two lookups by name.
monotonic: Final = time.monotonic


class _Protocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.reader = hiredis.Reader(replyError=ReplyError)
        # uvloop's transports are not asyncio.Transport subclasses: typed by what is used.
        self.transport: Any = None
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.buffer: list[bytes] = []
        self.flush_scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.check_at = 0.0
        self.closed: asyncio.Future[None] = loop.create_future()
        self.error: Exception | None = None
        # Bound once: each is called per request, and a bound method saves a lookup by name per call.
        self.gets: Callable[[], Any] = self.reader.gets
        self.feed: Callable[[bytes], None] = self.reader.feed
        self.popleft: Callable[[], tuple[asyncio.Future[Any], float]] = self.waiting.popleft
        self.push: Callable[[tuple[asyncio.Future[Any], float]], None] = self.waiting.append
        self.create_future: Callable[[], asyncio.Future[Any]] = loop.create_future

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.feed(data)
        waiting, gets, popleft = self.waiting, self.gets, self.popleft
        while True:
            reply = gets()
            if reply is False:
                break
            if not waiting:
                # A reply nobody asked for: the stream is out of step, so nothing after it can be trusted.
                self._fail(WireClosed("redis sent an unexpected reply"))
                return
            future, _ = popleft()
            try:
                future.set_result(reply)
            except asyncio.InvalidStateError:
                pass  # its caller is gone (cancelled): the reply is dropped, the stream stays in step

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc if isinstance(exc, Exception) else WireClosed("redis closed the connection"))

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = _failure(exc)
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.error)
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.transport is not None:
            self.transport.abort()
        if not self.closed.done():
            self.closed.set_result(None)

    def call(self, packed: bytes) -> asyncio.Future[Any]:
        future = self.create_future()
        if self.error is not None:
            future.set_exception(self.error)
            return future
        deadline = monotonic() + self.timeout_s
        self.push((future, deadline))
        self.buffer.append(packed)
        if len(self.buffer) >= FLUSH_EVERY:
            self.flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)
        if self.watchdog is None:
            self.check_at = deadline
            self.watchdog = self.loop.call_later(self.timeout_s, self._check)
        return future

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.buffer and self.transport is not None and self.error is None:
            data = self.buffer[0] if len(self.buffer) == 1 else b"".join(self.buffer)
            self.buffer = []
            self.transport.write(data)

    def _check(self) -> None:
        self.watchdog = None
        if not self.waiting:
            return
        deadline = self.waiting[0][1]
        now = monotonic()
        if now >= deadline:
            if now - self.check_at < LATE_S or now - deadline >= LATE_MOST * self.timeout_s:
                self._fail(TimeoutError(f"redis did not answer within {self.timeout_s * 1000:.0f} ms"))
                return
            deadline = now + LATE_S
        self.check_at = deadline
        self.watchdog = self.loop.call_later(deadline - now, self._check)


class Wire:
    """A pipelined connection to one Redis server (redis://, rediss://, unix://)."""

    def __init__(self, url: str, *, timeout_ms: int = 250) -> None:
        options = parse_url(url)
        self.host = options.get("host", "localhost")
        self.port = int(options.get("port", 6379))
        self.path = options.get("path")
        self.db = int(options.get("db", 0) or 0)
        self.username = options.get("username")
        self.password = options.get("password")
        self.ssl = ssl_module.create_default_context() if url.startswith("rediss://") else None
        self.timeout_s = timeout_ms / 1000
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        # Commands sent (round trips' worth): what the benchmarks report as Redis calls per request.
        self.sent = 0

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        self._connecting = loop.create_future()
        try:
            protocol = await self._opened(loop)
            if self.password:
                auth = (self.username, self.password) if self.username else (self.password,)
                await self._checked(protocol, ("AUTH", *auth))
            if self.db:
                await self._checked(protocol, ("SELECT", self.db))
        except Exception as exc:
            # One failure for every caller waiting on this connect, counted once (StorageError.event).
            failed = exc if isinstance(exc, (WireClosed, ReplyError)) else _failure(exc)
            self._connecting.set_exception(failed)
            self._connecting.exception()  # retrieved: the callers that raced us see it through shield
            self._connecting = None
            if failed is exc:
                raise
            raise failed from exc
        except BaseException:
            self._connecting.set_exception(WireClosed("cancelled"))
            self._connecting.exception()
            self._connecting = None
            raise
        self._protocol = protocol
        self._connecting.set_result(protocol)
        self._connecting = None
        return protocol

    async def _opened(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        # A connect timed out by a timer that fired late found the loop busy, not Redis slow: the
        # connection may be made and unread. Tried once more then, as a late watchdog looks again.
        for attempt in (1, 2):
            started = monotonic()
            if self.path:
                make = loop.create_unix_connection(lambda: _Protocol(loop, self.timeout_s), self.path)
            else:
                make = loop.create_connection(
                    lambda: _Protocol(loop, self.timeout_s), self.host, self.port, ssl=self.ssl
                )
            try:
                _, protocol = await asyncio.wait_for(make, self.timeout_s)
                return protocol
            except TimeoutError:
                if attempt == 2 or monotonic() - started < self.timeout_s + LATE_S:
                    raise
        raise AssertionError("unreachable")

    def send(self, packed: bytes) -> asyncio.Future[Any] | None:
        """A packed command sent now, when connected: its reply's future. None: `call` connects."""
        protocol = self._protocol
        if protocol is None or protocol.error is not None:
            return None
        self.sent += 1
        return protocol.call(packed)

    async def _checked(self, protocol: _Protocol, command: tuple[Any, ...]) -> Any:
        self.sent += 1
        reply = await protocol.call(pack(command))
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def call(self, command: tuple[Any, ...] | bytes) -> Any:
        """A command (or one packed already), connecting first if need be: its reply."""
        packed = command if isinstance(command, bytes) else pack(command)
        sent = self.send(packed)
        if sent is None:
            self._protocol = None
            await self._connect()
            sent = self.send(packed)
            if sent is None:
                raise WireClosed("redis closed the connection")
        return await sent

    async def evalsha(self, script: Script, packed: bytes) -> Any:
        """An EVALSHA of `script`, packed (`script.command`, or a store's cached encoding): its reply.
        An error reply raises ReplyError."""
        sent = self.send(packed)
        reply = await (sent if sent is not None else self.call(packed))
        return reply if not isinstance(reply, ReplyError) else await self.recovered(script, packed, reply)

    async def recovered(self, script: Script, packed: bytes, error: ReplyError) -> Any:
        """The reply of an EVALSHA that answered `error`: NOSCRIPT (Redis restarted, or flushed its
        scripts) loads the script and sends the call again, once; any other error raises."""
        if not str(error).startswith("NOSCRIPT"):
            raise error
        loaded = await self.call(("SCRIPT", "LOAD", script.source))
        if isinstance(loaded, ReplyError):
            raise loaded
        reply = await self.call(packed)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def command(self, keys: list[str], args: list[Any]) -> bytes:
        """EVALSHA of this script, packed."""
        return pack(("EVALSHA", self.sha, len(keys), *keys, *args))
