"""ProxyApp: an ASGI app that forwards HTTP and WebSocket to one upstream gateway over a pool of
keep-alive connections (quota/proxy/pool.py), streaming bodies both ways. Wrapped in QuotaMiddleware
by `quota proxy`."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from starlette.types import Message, Receive, Scope, Send

from quota.deadlines import DEFAULT_TIMEOUT_S, BodyDeadlines, BodyTimeout
from quota.proxy.errors import (
    BAD_GATEWAY,
    GATEWAY_TIMEOUT,
    ILLEGAL_ARGUMENT,
    REQUEST_TIMEOUT,
    TOO_LARGE,
    UpstreamBroken,
    send_error,
)
from quota.proxy.headers import (
    Headers,
    Networks,
    client_response_headers,
    connection_names_the_message,
    upstream_request_headers,
)
from quota.proxy.pool import NotSent, Pool

log = logging.getLogger("quota.proxy")
# Fields of a query or form read for a `_method` at most: as many as PHP reads (max_input_vars) and
# Express (qs's parameterLimit); more is refused, not read. A name read is at most MAX_NAME_BYTES.
# A multipart body's parts (an upload has one or two) and each part's head are bounded too.
MAX_FORM_FIELDS = 1000
MAX_NAME_BYTES = 256
MAX_PARTS = 16
MAX_PART_HEAD_BYTES = 2048
# `method` in any case, each letter as itself or percent-escaped (a gateway decodes names once), in
# a body made lowercase (so `%4D` is `%4d`, an escaped `M`): what a field or part must spell to be
# named `_method`.
_METHODISH = re.compile(rb"(?:m|%6d|%4d)(?:e|%65|%45)(?:t|%74|%54)(?:h|%68|%48)(?:o|%6f|%4f)(?:d|%64|%44)")
_ESCAPED_LETTERS = (b"%6d", b"%65", b"%74", b"%68", b"%6f", b"%64", b"%4d", b"%45", b"%54", b"%48", b"%4f", b"%44")


def _spells_method(data: bytes) -> bool:
    """Whether some field of `data` could be named `_method`: searches in C (a few milliseconds a
    megabyte), where parsing the fields is Python's (a second and a half for a megabyte of `a=%&`)."""
    low = data.lower()
    if b"method" in low:
        return True
    return any(letter in low for letter in _ESCAPED_LETTERS) and _METHODISH.search(low) is not None


@dataclass(frozen=True)
class Upstream:
    """Where and how to reach the gateway. Timeouts in seconds; `keepalive` must stay below the
    upstream's own idle timeout (uvicorn's is 5 s), or a reused connection may be closed under us."""

    url: str
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    connections: int = 256
    keepalive: float = 4.0
    max_body_bytes: int = 1 << 20
    # Derived from url in __post_init__.
    host: str = field(init=False, default="")
    port: int = field(init=False, default=0)
    tls: bool = field(init=False, default=False)
    prefix: str = field(init=False, default="")

    def __post_init__(self) -> None:
        expected = f"--upstream must be an http(s)://host[:port][/prefix] URL, found {self.url!r}"
        try:
            parsed = urlsplit(self.url)
            port = parsed.port
        except ValueError:
            raise ValueError(expected) from None
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.username is not None:
            raise ValueError(expected)
        if parsed.query or parsed.fragment:
            raise ValueError(f"--upstream takes no query or fragment, found {self.url!r}")
        for name in ("connect_timeout", "read_timeout", "connections"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be above 0, found {getattr(self, name)}")
        if self.keepalive < 0:
            raise ValueError(f"--keepalive must be 0 or more, found {self.keepalive}")
        tls = parsed.scheme == "https"
        object.__setattr__(self, "host", parsed.hostname)
        object.__setattr__(self, "port", port or (443 if tls else 80))
        object.__setattr__(self, "tls", tls)
        object.__setattr__(self, "prefix", parsed.path.rstrip("/"))


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _WrongLength(Exception):
    pass


class ProxyApp:
    """Forwards every request to `upstream.url` + the request's path and query, as they came."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        trusted: Networks | Callable[[], Networks] = (),
        body_timeout_s: Callable[[], float] = lambda: DEFAULT_TIMEOUT_S,
    ) -> None:
        self.upstream = upstream
        # A callable follows the middleware's config through reloads (serve.build_served passes one).
        self.trusted = trusted
        # A body buffered whole must be in within this long of its start (quota/deadlines.py).
        self.deadlines = BodyDeadlines(body_timeout_s)
        self.prefix = upstream.prefix.encode()
        host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
        self.ws_base = f"{'wss' if upstream.tls else 'ws'}://{host}:{upstream.port}"
        self.pool = Pool(
            upstream.host,
            upstream.port,
            tls=upstream.tls,
            limit=upstream.connections,
            keepalive=upstream.keepalive,
            connect_timeout=upstream.connect_timeout,
            read_timeout=upstream.read_timeout,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            from quota.proxy.websocket import relay

            await relay(self, scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def target(self, scope: Scope) -> bytes:
        """The request target upstream: its prefix, then the path and query exactly as received."""
        path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        return self.prefix + path + (b"?" + query if query else b"")

    def headers_for(self, scope: Scope, websocket: bool = False) -> Headers:
        client = scope.get("client")
        scheme: str = scope.get("scheme", "http")
        return upstream_request_headers(
            scope["headers"],
            peer=client[0] if client else "",
            # A WebSocket's scope says ws/wss; X-Forwarded-Proto names the HTTP scheme it came over.
            scheme={"ws": "http", "wss": "https"}.get(scheme, scheme),
            trusted=self.trusted() if callable(self.trusted) else self.trusted,
            websocket=websocket,
        )

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.time()
        limit = self.upstream.max_body_bytes
        odd_query = _form_refusal("query", scope.get("query_string", b""))
        if odd_query:
            # As the method-override headers (proxy/headers.py): quota checked the request's method.
            await send_error(ILLEGAL_ARGUMENT, odd_query, send, started)
            return
        unclear = _ambiguous_framing(scope["headers"])
        if unclear:
            # Two framings the upstream could read differently from the server in front: what one
            # takes for the end of a body the other may take for a second request nobody checked.
            await send_error(ILLEGAL_ARGUMENT, unclear, send, started)
            return
        dropped = connection_names_the_message(scope["headers"])
        if dropped:
            await send_error(ILLEGAL_ARGUMENT, dropped, send, started)
            return
        declared = _content_length(scope["headers"])
        if declared is not None and declared > limit:
            await send_error(TOO_LARGE, f"request body over {limit} bytes", send, started)
            return
        method: str = scope["method"]
        chunked = declared is None and any(n == b"transfer-encoding" for n, _ in scope["headers"])
        body: AsyncIterator[bytes] | None = None
        if declared is not None or chunked:
            # Read whole (bounded) before a pooled connection is taken, as nginx does by default: a
            # client sending its body slowly, or never, holds no connection to the gateway.
            try:
                whole = await self.deadlines.within(_read_body(receive, limit, declared))
            except BodyTimeout:
                late = f"request body not in within {self.deadlines.timeout_s():g} s"
                await send_error(REQUEST_TIMEOUT, late, send, started)
                return
            except _TooLarge:
                await send_error(TOO_LARGE, f"request body over {limit} bytes", send, started)
                return
            except _WrongLength:
                wrong = "the request body is not as long as its Content-Length"
                await send_error(ILLEGAL_ARGUMENT, wrong, send, started)
                return
            except _ClientGone:
                return
            odd_form = _body_refusal(scope["headers"], whole)
            if odd_form:
                # A form's `_method` field overrides the method as the query's does (Rack, Symfony).
                await send_error(ILLEGAL_ARGUMENT, odd_form, send, started)
                return
            body, declared = _once(whole), len(whole)
        try:
            response = await self.pool.request(method, self.target(scope), self.headers_for(scope), body, declared)
        except NotSent as exc:
            log.warning("upstream unreachable: %s %s: %s", method, scope["path"], exc)
            await send_error(BAD_GATEWAY, "the upstream gateway could not be reached", send, started)
            return
        except OSError as exc:
            # The request was on its way: the gateway may have done it. 504 says the outcome is
            # unknown, and quota keeps what it counted for the request (`quota reconcile` repairs).
            log.warning("upstream gave no answer: %s %s: %s", method, scope["path"], exc.__class__.__name__)
            await send_error(GATEWAY_TIMEOUT, "the upstream gateway did not answer", send, started)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": client_response_headers(response.headers),
                }
            )
            try:
                async for chunk in response.body():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (TimeoutError, OSError) as exc:
                log.warning("upstream broke off its response: %s %s: %s", method, scope["path"], exc.__class__.__name__)
                raise UpstreamBroken(str(exc)) from None
            await send({"type": "http.response.body", "body": b""})
        finally:
            response.release()


def _ambiguous_framing(headers: list[tuple[bytes, bytes]]) -> str:
    """Why a request's framing is ambiguous (RFC 9112 §6.3), or "" when it is not."""
    lengths = [value for name, value in headers if name == b"content-length"]
    if len(lengths) > 1:
        return "more than one Content-Length"
    if lengths and any(name == b"transfer-encoding" for name, _ in headers):
        return "both Content-Length and Transfer-Encoding"
    if lengths and not lengths[0].isdigit():
        return "a Content-Length that is not a number"
    return ""


def _form_refusal(what: str, fields: bytes) -> str:
    """Why a query or a urlencoded form is refused ("" when it is not): it carries `_method=`
    (Express's method-override, Rack, Laravel, Symfony), in any case, however escaped, and as PHP
    reads names: leading spaces dropped, cut at a NUL, `.`, ` ` and an unclosed `[` made `_`
    (`.method`, `[method`), `_method[...]` an array. Names alone are decoded, and only those that
    spell `method`: values may be a megabyte of `%`, which Python's parser takes most of a second
    to unescape. One that spells `method` nowhere is not read; one that does and holds more fields
    than MAX_FORM_FIELDS, or a name that spells it over MAX_NAME_BYTES, is refused unread: a
    megabyte of `a=%&` parsed cost a second and a half of CPU, a stall of every request of the
    process."""
    if not _spells_method(fields):
        return ""
    if fields.count(b"&") >= MAX_FORM_FIELDS:
        return f"the {what} spells `method` and holds more than {MAX_FORM_FIELDS} fields, too many to read for one"
    spelled = [name for name in (piece.partition(b"=")[0] for piece in fields.split(b"&")) if _spells_method(name)]
    if any(len(name) > MAX_NAME_BYTES for name in spelled):
        return f"the {what} spells `method` in a name over {MAX_NAME_BYTES} bytes, too long to read for one"
    if any(_php_name(unquote_to_bytes(name.replace(b"+", b" ")).decode("latin-1")) == "_method" for name in spelled):
        return f"the {what} names a method (_method): send that method"
    return ""


def _body_refusal(headers: list[tuple[bytes, bytes]], body: bytes) -> str:
    """Why a body is refused ("" when it is not): it carries a `_method` field, urlencoded as a
    query is, a multipart part named so, or a JSON object's key (Laravel reads a JSON body's
    `_method` as a form's); or it holds more fields or parts than are read (MAX_FORM_FIELDS). Every
    Content-Type the request names is read as the gateway might read it, and a body with none as
    a form (Rack reads it so)."""
    typed = False
    named = "the form names a method (_method): send that method"
    for name, value in headers:
        if name != b"content-type":
            continue
        typed = True
        kind, _, params = value.partition(b";")
        kind = kind.strip().lower()
        if kind == b"application/x-www-form-urlencoded":
            refused = _form_refusal("form", body)
            if refused:
                return refused
        if kind == b"multipart/form-data":
            # Every part's head is read, whatever the body spells: a quoted name may escape any
            # letter (`_m\ethod`), and RFC 2231 may cut it in pieces (`name*0`, `name*1`).
            boundary = _boundary(params)
            if boundary and body.count(b"--" + boundary) > MAX_PARTS:
                return f"the form holds more than {MAX_PARTS} parts"
            try:
                if _parts_name_a_method(body, boundary):
                    return named
            except ValueError as exc:
                return str(exc)
        # Laravel takes any type naming /json or +json, parameters included, for JSON.
        if (b"/json" in value.lower() or b"+json" in value.lower()) and _json_names_a_method(body):
            return named
    return "" if typed else _form_refusal("form", body)


def _json_names_a_method(body: bytes) -> bool:
    if b"method" not in body.lower() and b"\\u" not in body:
        return False
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False  # not JSON: no gateway reads a field of it as JSON
    return isinstance(doc, dict) and any(key.casefold() == "_method" for key in doc)


_BOUNDARY = re.compile(rb'(?:^|;)\s*boundary\s*=\s*(?:"([^"]*)"|([^;\s]*))', re.IGNORECASE)
# A part's field name as multipart parsers read it: quoted (with backslash escapes) or bare, or
# RFC 2231's `name*=charset'lang'percent-encoded`.
_PART_NAME = re.compile(r'(?:^|;)\s*name(?:\*(\d{1,3}))?(\*?)\s*=\s*(?:"((?:\\.|[^"\\])*)"|([^;\s]*))', re.IGNORECASE)
_HEAD_END = re.compile(rb"\r?\n\r?\n")


def _boundary(params: bytes) -> bytes:
    found = _BOUNDARY.search(params)
    return (found.group(1) or found.group(2) or b"") if found else b""


def _parts_name_a_method(body: bytes, boundary: bytes) -> bool:
    """Whether any part of a multipart body is named `_method` (Rack and Symfony read a multipart
    form's field as a urlencoded one's), however its name is quoted, escaped or encoded. With no
    boundary there are no parts: a gateway cannot read the form either."""
    if not boundary:
        return False
    for part in body.split(b"--" + boundary)[1:]:
        head = _HEAD_END.split(part[: MAX_PART_HEAD_BYTES + 4], maxsplit=1)
        if len(head) == 1 and len(part) > MAX_PART_HEAD_BYTES:
            raise ValueError(f"a part of the form has a head over {MAX_PART_HEAD_BYTES} bytes")
        for line in head[0].decode("latin-1").splitlines():
            field, _, value = line.partition(":")
            if field.strip().lower() != "content-disposition":
                continue
            names: list[str] = []
            # RFC 2231 continuations (`name*0`, `name*1*`...) make one name, joined in order.
            pieces: dict[int, str] = {}
            for index, star, quoted, bare in _PART_NAME.findall(value):
                raw = re.sub(r"\\(.)", r"\1", quoted) if quoted else bare
                if star:
                    raw = unquote(raw.split("'", 2)[-1] if index in ("", "0") else raw, "latin-1")
                if index:
                    pieces[int(index)] = raw
                else:
                    names.append(raw)
            if pieces:
                names.append("".join(pieces[i] for i in sorted(pieces)))
            for raw in names:
                for reading in (raw, unquote(raw, "latin-1")):
                    if _php_name(reading) == "_method":
                        return True
    return False


def _php_name(name: str) -> str:
    """A field's name as PHP reads it (lowercased: the names compared here are matched in any case)."""
    name = name.partition("\x00")[0].lstrip(" ")
    bracket = name.find("[")
    if bracket >= 0 and "]" in name[bracket:]:
        name = name[:bracket]
    return name.replace(" ", "_").replace(".", "_").replace("[", "_").lower()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _read_body(receive: Receive, limit: int, declared: int | None) -> bytes:
    """The client's whole body, refused past `limit` bytes, or past or short of the length it
    declared: a byte more would start a request of its own upstream."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        if declared is not None and size > declared:
            raise _WrongLength
        chunks.append(chunk)
        if not message.get("more_body", False):
            if declared is not None and size != declared:
                raise _WrongLength
            return b"".join(chunks)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
