"""A lean HTTP/1.1 client for the proxy's one upstream: a pool of keep-alive connections, each an
asyncio Protocol parsed by httptools (the parser uvicorn uses), bodies streamed both ways.

Measured against aiohttp and httpx as the proxy's client (benchmarks/RESULTS.md, "Proxy"): per
request it builds one bytes head and two futures, where a general client builds request and
response objects, cookie jars, tracing hooks and URL objects that a proxy to one host never needs.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, TypeVar, cast

import httptools

T = TypeVar("T")
# Reading stops while this much of a response waits for a slow client, so memory stays bounded.
HIGH_WATER = 1 << 18


class NotSent(ConnectionError):
    """No connection to the upstream could be made: the request never left, so nothing was done."""


class UpstreamClosed(ConnectionError):
    """The upstream closed the connection before the response was complete."""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.alive = True
        self.received = False
        self.idle_since = 0.0
        self.idle = False
        self.extra = False
        # The final response's head named its body's length or chunking; else the body runs to
        # the close (RFC 9112 6.3, an HTTP/1.0 server's way), which httptools cannot be told of.
        self.framed = False
        # Whether a close may end a body: not over TLS, where a close without close_notify may be
        # an attacker's FIN (RFC 9112 9.8), and Python's TLS reports it as a clean close.
        self.close_ends = True
        self.writable: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.idle:
            # An answer nobody asked for: the stream is out of step, and the next request on this
            # connection would be handed it. The connection is done.
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamClosed(f"the upstream sent a malformed response: {exc}"))
            self.close()
        except httptools.HttpParserUpgrade:
            # No HttpParserError: a 101 to a request that asked for no upgrade (the proxy relays
            # WebSockets apart), after which the connection speaks something else.
            self._fail(UpstreamClosed("the upstream switched protocols (101) unasked"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        # Closed here (a timeout, a malformed or unasked answer), not ended by the upstream.
        ours = not self.alive
        self.alive = False
        ended = exc is None and not ours and self.error is None and not self.extra
        if ended and self.close_ends and not self.complete and self.head.done() and not self.framed:
            self.complete = True  # a body delimited by the close: it is whole now
            self._wake()
        if not self.complete:
            self._fail(exc or UpstreamClosed("the upstream closed the connection"))
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.head.done():
            # A second answer to one request (one that was smuggled, or a broken upstream): none of
            # it reaches this client, and the connection is not used again.
            self.extra = True
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.extra:
            self.headers.append((name, value))
            if name.lower() in (b"content-length", b"transfer-encoding"):
                self.framed = True

    def on_headers_complete(self) -> None:
        if self.extra:
            return
        status = self.parser.get_status_code()
        if status == 101:
            return  # not an answer to pass on: feed_data raises HttpParserUpgrade next
        if 100 <= status < 200:
            # An interim answer (103 Early Hints...): the final response follows on the connection.
            self.headers = []
            self.framed = False
            return
        # Read now: the parser forgets it once the message is complete.
        self.keep_alive = self.parser.should_keep_alive()
        if not self.head.done():
            self.head.set_result(status)

    def on_body(self, body: bytes) -> None:
        if self.extra:
            return
        self.chunks.append(bytes(body))
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.extra:
            return
        if self.head.done():
            self.complete = True
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
        self._wake()

    def reset(self) -> None:
        self.idle = False
        self.extra = False
        self.framed = False
        self.keep_alive = False
        self.headers = []
        self.head = asyncio.get_running_loop().create_future()
        self.complete = False
        self.received = False

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.close()

    async def write(self, data: bytes) -> None:
        if not self.alive or self.transport is None:
            raise UpstreamClosed("the upstream closed the connection")
        self.transport.write(data)
        if self.writable is not None:
            await self.writable

    async def _within(self, future: asyncio.Future[T], timeout: float) -> T:
        # A timer on the future itself: asyncio.wait_for wraps every wait in a task, which costs
        # more than the rest of a small request's handling.
        timer = asyncio.get_running_loop().call_later(timeout, self._expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future[Any]) -> None:
        if not future.done():
            future.set_exception(TimeoutError())
            self.close()

    async def body(self, timeout: float) -> AsyncIterator[bytes]:
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self.buffered <= HIGH_WATER // 2 and self.transport is not None and self.alive:
                    self.transport.resume_reading()
                yield chunk
            elif self.complete:
                return
            elif self.error is not None:
                raise self.error
            else:
                self.waiter = asyncio.get_running_loop().create_future()
                await self._within(self.waiter, timeout)
                self.waiter = None


class Response:
    """One upstream response: status and raw headers at once, the body as it arrives."""

    def __init__(self, pool: Pool, conn: _Connection, status: int, *, head: bool) -> None:
        self.status = status
        self.headers = conn.headers
        self._pool = pool
        self._conn = conn
        self._head = head

    async def body(self) -> AsyncIterator[bytes]:
        if self._head:
            return
        async for chunk in self._conn.body(self._pool.read_timeout):
            yield chunk

    def release(self) -> None:
        conn = self._conn
        keep = not self._head and conn.complete and conn.alive and conn.keep_alive
        self._pool.put_back(conn, keep)


class Pool:
    """Keep-alive connections to one host; at most `limit` requests in flight (others wait)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool = False,
        limit: int = 256,
        keepalive: float = 4.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        self.host, self.port = host, port
        name = f"[{host}]" if ":" in host else host
        self.authority = name if port == (443 if tls else 80) else f"{name}:{port}"
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if tls else None
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle: list[_Connection] = []
        self.limit = limit
        self.slots: asyncio.Semaphore | None = None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl), self.connect_timeout
        )
        conn.close_ends = self.ssl is None
        return conn

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.alive and not conn.chunks and now - conn.idle_since < self.keepalive:
                conn.reset()
                return conn
            conn.close()
        return None

    def put_back(self, conn: _Connection, keep: bool) -> None:
        if keep:
            conn.idle_since = time.monotonic()
            conn.idle = True
            self.idle.append(conn)
        else:
            conn.close()
        if self.slots is not None:
            self.slots.release()

    async def request(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | None,
        length: int | None,
    ) -> Response:
        """Send one request; returns once the response's head arrived. Raises NotSent (no
        connection: nothing was sent), OSError (the connection lost once the request was on its
        way), TimeoutError (no answer in time), or whatever the body iterator raised."""
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.limit)
        await self.slots.acquire()
        try:
            return await self._request(method, target, headers, body, length)
        except BaseException:
            self.slots.release()
            raise

    async def _request(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | None,
        length: int | None,
    ) -> Response:
        lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), target, self.authority.encode())]
        lines += [b"%s: %s\r\n" % (name, value) for name, value in headers]
        chunked = body is not None and length is None
        if length is not None:
            lines.append(b"content-length: %d\r\n" % length)
        elif chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"\r\n")
        head = b"".join(lines)
        for attempt in (0, 1):
            conn = self._idle_connection()
            reused = conn is not None
            if conn is None:
                try:
                    conn = await self._connect()
                except OSError as exc:  # a timeout too: TimeoutError is an OSError
                    raise NotSent(f"{exc.__class__.__name__}: {exc}") from exc
            try:
                await conn.write(head)
                if body is not None:
                    async for chunk in body:
                        if chunk:
                            await conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                    if chunked:
                        await conn.write(b"0\r\n\r\n")
                status = await conn._within(conn.head, self.read_timeout)
            except OSError:
                conn.close()
                # A kept-alive connection the upstream closed as we reused it: nothing was read and
                # no body consumed, so the request can go once more on a new connection.
                if attempt == 0 and reused and body is None and not conn.received:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            # HEAD answers carry no body whatever their Content-Length says: the parser would wait
            # for one, so such a connection is not reused.
            return Response(self, conn, status, head=method == "HEAD")
        raise AssertionError("unreachable")


__all__ = ["Pool", "Response", "UpstreamClosed"]
