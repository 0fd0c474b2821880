"""Enforcement through `quota proxy` in front of the reference gateway in another process, each
test run the same way through `quota serve`; then what only a proxy can get wrong: an upstream
that dies, hangs or is down, hop-by-hop headers, streaming, WebSocket relaying."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from quota.config import DEFAULT_DIR, load_config
from quota.proxy import ProxyApp, Upstream
from quota.proxy.headers import client_response_headers, upstream_request_headers
from quota.serve import build_app
from quota.store.memory import MemoryStore
from tests.conftest import RedisServer, asgi_client, free_port
from tests.helpers import call_raw, entitlements, http_scope, read_yaml, set_cap, write_yaml
from tests.running import Running, established, gateway, quota, wait_until

pytestmark = pytest.mark.redis
TOKEN = "proxy-test-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
FREE = "demo/free"
# A body of 2 bytes, then a request of its own: what a lying Content-Length smuggles.
SMUGGLING = b"{}GET /echo?smuggled=1 HTTP/1.1\r\nhost: g\r\n\r\n"


@pytest.fixture(scope="module")
def small_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped config with free's caps made small enough to reach in a few requests."""
    target = tmp_path_factory.mktemp("proxy") / "config"
    target.mkdir()
    for source in DEFAULT_DIR.glob("*.yaml"):
        (target / source.name).write_text(source.read_text())
    plans = read_yaml(target / "plans.yaml")
    plans["plans"]["free"]["limits"].update(friends_per_user=3, groups_per_app=2, online_users=2)
    write_yaml(target / "plans.yaml", plans)
    (target / "quota.yaml").write_text("trusted_proxies: [127.0.0.1/32]\nmax_body_bytes: 1048576\n")
    return target


@pytest.fixture(scope="module", params=["serve", "proxy"])
def front(request: pytest.FixtureRequest, redis_server: RedisServer, small_config: Path) -> Iterator[str]:
    """`quota serve` (the gateway in process), or `quota proxy` in front of the gateway in another process."""
    common = ["--config", str(small_config), "--redis", redis_server.url, "--port", "{port}"]
    env = {"QUOTA_ADMIN_TOKEN": TOKEN}
    started: list[Running] = []
    try:
        if request.param == "serve":
            started.append(Running(quota("serve", *common), ready="/_quota/health", env=env))
        else:
            started.append(gateway())
            started.append(
                Running(quota("proxy", "--upstream", started[0].base, *common), ready="/_quota/health", env=env)
            )
        yield started[-1].base
    finally:
        for proc in reversed(started):
            proc.stop()


class Client:
    """One client address (X-Forwarded-For from the trusted local peer), so tests keep apart."""

    counter = 0

    def __init__(self, base: str) -> None:
        Client.counter += 1
        self.ip = f"10.77.{Client.counter // 250}.{Client.counter % 250 + 1}"
        self.http = httpx.Client(base_url=base, headers={"x-forwarded-for": self.ip}, timeout=10)
        self.ws_base = base.replace("http://", "ws://")

    def register(self, app: str, *names: str) -> None:
        r = self.http.post(f"/{app}/users", json=[{"username": n} for n in names])
        assert r.status_code == 200, r.text

    def used(self, app: str, limit: str, **entity: str) -> int:
        r = self.http.get(f"/_quota/entitlements/{app}", params=entity, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        if entity:
            ((kind, name),) = entity.items()
            return int(body["entities"][f"{kind}:{name}"][limit]["used"])
        return int(body["usage"][limit]["used"])


@pytest.fixture
def client(front: str, redis_server: RedisServer) -> Iterator[Client]:
    redis_server.flush()
    c = Client(front)
    yield c
    c.http.close()


def unique(prefix: str) -> str:
    return f"{prefix}{time.monotonic_ns() % 10**12}"


class TestEnforcement:
    def test_friend_cap(self, client: Client) -> None:
        """free's friends_per_user (3 here) holds: the 4th and 5th adds are refused with exceed_limit.
        Catches: a proxy that loses the middleware's refusal, or counts twice."""
        owner = unique("o")
        friends = [f"{owner}f{i}" for i in range(5)]
        client.register(FREE, owner, *friends)
        codes = [client.http.post(f"/{FREE}/users/{owner}/contacts/users/{f}").status_code for f in friends]
        assert codes == [200, 200, 200, 403, 403]
        r = client.http.post(f"/{FREE}/users/{owner}/contacts/users/{friends[4]}")
        assert r.json()["error"] == "exceed_limit" and r.json()["limit"] == "friends_per_user"
        assert client.used(FREE, "friends_per_user", user=owner) == 3

    def test_rate(self, client: Client) -> None:
        """The history export is once a minute per app: the second is 429 reach_limit with Retry-After.
        Catches: rate windows not applied (or applied per connection) behind the proxy."""
        hour = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y%m%d%H")
        assert client.http.get(f"/{FREE}/chatmessages/{hour}").status_code == 200
        r = client.http.get(f"/{FREE}/chatmessages/{hour}")
        assert r.status_code == 429 and r.json()["error"] == "reach_limit"
        # Sliding window of a clock-aligned minute: near its end the next hit may fit within a second.
        assert 1 <= int(r.headers["retry-after"]) <= 60 and r.headers["ratelimit-remaining"] == "0"

    def test_failed_upstream_is_undone(self, client: Client) -> None:
        """A friend add the gateway refuses (404: no such user) leaves the counter as it was.
        Catches: an upstream error status that does not reach the middleware's undo."""
        owner = unique("u")
        client.register(FREE, owner)
        r = client.http.post(f"/{FREE}/users/{owner}/contacts/users/{owner}ghost")
        assert r.status_code == 404 and r.json()["error"] == "service_resource_not_found"
        assert client.used(FREE, "friends_per_user", user=owner) == 0

    def test_create_binds_the_new_id(self, client: Client) -> None:
        """Groups per app (2 here): two creates bind the gateway's ids, the third is refused, a delete frees one.
        Catches: a response body the middleware cannot read through the proxy (no bind, no free on delete)."""
        owner = unique("g")
        client.register(FREE, owner)
        ids = []
        for _ in range(2):
            r = client.http.post(f"/{FREE}/chatgroups", json={"owner": owner, "groupname": "g"})
            assert r.status_code == 200, r.text
            ids.append(r.json()["data"]["groupid"])
        r = client.http.post(f"/{FREE}/chatgroups", json={"owner": owner, "groupname": "g"})
        assert r.status_code == 403 and r.json()["limit"] == "groups_per_app"
        assert client.http.delete(f"/{FREE}/chatgroups/{ids[0]}").status_code == 200
        assert client.used(FREE, "groups_per_app") == 1
        assert client.http.post(f"/{FREE}/chatgroups", json={"owner": owner, "groupname": "g"}).status_code == 200

    def test_websocket_leases(self, client: Client) -> None:
        """online_users (2 here): two connections echo, a third is refused, closing one lets another in.
        Catches: a relay that accepts before the upstream does, or never releases the lease."""
        names = [unique(f"w{i}") for i in range(3)]
        client.register(FREE, *names)
        url = f"{client.ws_base}/{FREE}/users/{{}}/connection"
        headers = {"x-forwarded-for": client.ip}
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(connect(url.format(names[0]), additional_headers=headers))
            stack.enter_context(connect(url.format(names[1]), additional_headers=headers))
            first.send("hello")
            assert first.recv(timeout=5) == "hello"
            with pytest.raises(InvalidStatus):
                stack.enter_context(connect(url.format(names[2]), additional_headers=headers, open_timeout=5))
            first.close()
            deadline = time.time() + 5
            while True:
                # The lease is released when the connection's handler ends: shortly after the close.
                try:
                    third = stack.enter_context(
                        connect(url.format(names[2]), additional_headers=headers, open_timeout=5)
                    )
                    break
                except InvalidStatus:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.1)
            third.send("again")
            assert third.recv(timeout=5) == "again"


@pytest.fixture(scope="module")
def odd_upstream() -> Iterator[Running]:
    proc = Running(
        [sys.executable, "-m", "uvicorn", "tests.upstreams:app", "--no-proxy-headers", "--port", "{port}"],
        ready="/echo",
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def odd_proxy(odd_upstream: Running, redis_server: RedisServer, small_config: Path) -> Iterator[Running]:
    """`quota proxy` in front of tests/upstreams.py, with a short read timeout."""
    argv = quota("proxy", "--upstream", odd_upstream.base, "--config", str(small_config), "--redis", redis_server.url)
    proc = Running([*argv, "--read-timeout", "1", "--port", "{port}"], ready="/_quota/health")
    yield proc
    proc.stop()


@pytest.mark.parametrize("mode", ["serve", "proxy"])
def test_a_body_held_back_is_cut_off(mode: str, small_config: Path, tmp_path: Path) -> None:
    """A client that sends its headers and part of its body, then nothing, is answered 408 once
    `body_timeout_s` has passed and its connection closed: on a counted route (quota reads the
    body), and in proxy mode on a path under no app (the proxy buffers it); nothing is counted.
    Catches a slow body holding its connection and buffer for ever (found by the audit of
    2026-12-02): many such clients held the process's memory."""
    import socket

    config = tmp_path / "config"
    config.mkdir()
    for source in small_config.glob("*.yaml"):
        (config / source.name).write_text(source.read_text())
    (config / "quota.yaml").write_text("trusted_proxies: [127.0.0.1/32]\nbody_timeout_s: 1\n")
    started: list[Running] = []
    try:
        if mode == "serve":
            started.append(Running(quota("serve", "--config", str(config), "--port", "{port}"), ready="/_quota/health"))
        else:
            started.append(gateway())
            argv = quota("proxy", "--upstream", started[0].base, "--config", str(config), "--port", "{port}")
            started.append(Running(argv, ready="/_quota/health"))
        front = started[-1]
        paths = ["/demo/free/users"] + (["/no-app-here"] if mode == "proxy" else [])
        for path in paths:
            with socket.create_connection(("127.0.0.1", front.port), timeout=10) as sock:
                head = (
                    f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
                )
                sock.sendall(head.encode() + b'[{"username":')
                began = time.monotonic()
                answer = b""
                while chunk := sock.recv(65536):  # to the close
                    answer += chunk
                waited = time.monotonic() - began
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b'"error":"request_timeout"' in answer.replace(b" ", b""), answer
            assert 0.9 < waited < 5, waited
        users = httpx.get(f"{front.base}/demo/free/users", timeout=10).json()["entities"]
        assert users == [], users
    finally:
        for proc in reversed(started):
            proc.stop()


class TestUpstreamFailures:
    def test_dies_mid_response(self, odd_proxy: Running, redis_server: RedisServer) -> None:
        """An upstream that drops the connection mid-body: the client's connection is dropped too (no
        complete-looking response), the friend counter is kept (its 2xx status line said the change was
        made: quota errs toward counting), no traceback, and the proxy serves on.
        Catches: a truncated body passed off as complete, a lost counter, a stack trace, a dead proxy."""
        redis_server.flush()
        with httpx.Client(base_url=odd_proxy.base, timeout=10) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                c.post(f"/{FREE}/users/ann/contacts/users/bob")
            assert c.get("/echo").status_code == 200
        import redis as redis_sync

        from quota.keys import app_prefix

        r = redis_sync.Redis(port=redis_server.port)
        assert r.scard(f"{app_prefix('demo#free')}s:contacts:o:ann") == 1
        r.close()
        assert "upstream broke off its response" in odd_proxy.log()
        assert "Traceback" not in odd_proxy.log()

    @pytest.mark.parametrize("ending", ["close", "reset"])
    async def test_a_body_that_runs_to_the_close(self, ending: str) -> None:
        """An answer with neither Content-Length nor chunking ends when the upstream closes (RFC
        9112 6.3; an HTTP/1.0 server's way): a close is its end, and the answer reaches the client
        whole, its friend counted; a reset is a failure, never passed off as a whole answer, and
        the friend stays counted as a 2xx status line said. Catches every such answer aborted
        (found by the audit of 2026-12-02), and a reset read as an end."""
        import socket
        import struct

        from quota.config import load_config
        from quota.proxy.errors import UpstreamBroken
        from quota.serve import build_app
        from quota.store.memory import MemoryStore

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b'HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{"ok": ')
            await writer.drain()
            if ending == "reset":
                linger = struct.pack("ii", 1, 0)  # closed at once, with a reset
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            else:
                writer.write(b"true}")
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        proxy = ProxyApp(Upstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"))
        store = MemoryStore()
        app = build_app(load_config(), store=store, upstream=proxy)
        try:
            scope = http_scope("POST", f"/{FREE}/users/ann/contacts/users/bob")
            if ending == "close":
                sent = await call_raw(app, scope)
                assert sent[0]["status"] == 200, sent
                assert b"".join(m.get("body", b"") for m in sent[1:]) == b'{"ok": true}'
            else:
                with pytest.raises(UpstreamBroken):
                    await call_raw(app, scope)
            assert await store.members("q:{demo#free}:s:contacts:o:ann") == {"bob"}
        finally:
            proxy.pool.close()
            server.close()
            await server.wait_closed()

    @pytest.mark.parametrize("tls", [False, True])
    async def test_a_close_over_tls_ends_no_body(self, tls: bool) -> None:
        """Over TLS a close without close_notify may be anyone's FIN (RFC 9112 9.8), and Python's
        TLS reports it as a clean close: a body that runs to the close is whole over plain HTTP
        only. Catches a truncated TLS answer passed off as whole (the review of 2026-12-02)."""
        from quota.proxy.pool import UpstreamClosed, _Connection

        conn = _Connection()
        conn.close_ends = not tls
        conn.data_received(b'HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{"ok": ')
        conn.connection_lost(None)
        assert conn.complete is (not tls)
        assert isinstance(conn.error, UpstreamClosed) is tls

    def test_timeout_is_504(self, odd_proxy: Running) -> None:
        """An upstream silent past --read-timeout: 504 gateway_timeout, an IM-shaped body.
        Catches: a hung upstream holding the client forever, or a bare 500."""
        r = httpx.get(odd_proxy.base + "/slow", timeout=10)
        assert r.status_code == 504
        assert r.json()["error"] == "gateway_timeout" and set(r.json()) >= {"exception", "timestamp", "duration"}

    def test_upstream_closes_idle_connections(self, small_config: Path) -> None:
        """An upstream that drops idle connections sooner than the pool keeps them (1 s against 60 s):
        the next requests still get through, on fresh connections.
        Catches: a pool that hands out connections the upstream already closed (502s)."""
        upstream = Running(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "tests.upstreams:app",
                "--no-proxy-headers",
                "--port",
                "{port}",
                "--timeout-keep-alive",
                "1",
            ],
            ready="/echo",
        )
        argv = quota("proxy", "--upstream", upstream.base, "--config", str(small_config), "--keepalive", "60")
        proc = Running([*argv, "--port", "{port}"], ready="/_quota/health")
        try:
            with httpx.Client(base_url=proc.base, timeout=10) as c:
                first = c.get("/echo").json()["peer_port"]
                wait_until(lambda: established(upstream.port) == 0, "the upstream never closed the idle connection")
                for _ in range(3):
                    r = c.get("/echo")
                    assert r.status_code == 200, r.text
                assert r.json()["peer_port"] != first
        finally:
            proc.stop()
            upstream.stop()

    def test_unreachable_is_502(self, small_config: Path) -> None:
        """Nothing listening upstream: 502 bad_gateway with an IM-shaped body and no traceback.
        Catches: a connection error surfacing as a 500 with a traceback."""
        from tests.conftest import free_port

        argv = quota("proxy", "--upstream", f"http://127.0.0.1:{free_port()}", "--config", str(small_config))
        proc = Running([*argv, "--port", "{port}"], ready="/_quota/health")
        try:
            r = httpx.get(proc.base + "/echo", timeout=10)
            assert r.status_code == 502 and r.json()["error"] == "bad_gateway"
            assert "Traceback" not in r.text and "Traceback" not in proc.log()
        finally:
            proc.stop()


class TestPassThrough:
    def test_headers(self, odd_proxy: Running) -> None:
        """Hop-by-hop headers stop at the proxy both ways (RFC 9110 §7.6.1); X-Forwarded-* are set;
        the path and query arrive byte for byte.
        Catches: hop-by-hop fields or a method override leaking, a lost client address, a
        re-encoded path or query."""
        overrides = {"x-http-method-override": "DELETE", "x-http-method": "DELETE", "x-method-override": "PUT"}
        r = httpx.get(
            odd_proxy.base + "/echo?a=1&b=%2F",
            headers={
                "connection": "x-secret",
                "x-secret": "1",
                "te": "trailers",
                "x-forwarded-for": "203.0.113.9",
                **overrides,
            },
        )
        seen = r.json()
        assert seen["query"] == "a=1&b=%2F"
        # Method overrides too: quota checked the request's own method, not the one they name.
        for name in ("x-secret", "te", "connection", *overrides):
            assert name not in seen["headers"]
        # The test client's peer (127.0.0.1) is trusted here: its chain is kept and extended.
        assert seen["headers"]["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
        assert seen["headers"]["x-forwarded-proto"] == ["http"]
        assert seen["headers"]["x-forwarded-host"] == [odd_proxy.base.removeprefix("http://")]
        assert "x-hop" not in r.headers and r.headers["x-kept"] == "1"

    @pytest.mark.parametrize(
        "query",
        [
            "_method=DELETE",
            "a=1&%5Fmethod=PUT",
            "_METHOD=delete",
            "x=1&_method",
            # As PHP reads names (Laravel, Symfony): `.` and an unclosed `[` are `_`, `[..]` an array.
            ".method=DELETE",
            "%2Emethod=DELETE",
            "[method=DELETE",
            "a=1&%5Bmethod=PUT",
            "+_method=DELETE",
            "_method[]=DELETE",
            "_%6Dethod=DELETE",  # a letter of the name escaped
            "_%4DETHOD=DELETE",  # an escaped capital
            "_M%45%54%48%4F%44=PUT",
            "_method%00x=DELETE",  # PHP cuts a name at a NUL
        ],
    )
    def test_a_query_naming_a_method_is_refused(self, odd_proxy: Running, query: str) -> None:
        """Catches `?_method=DELETE` reaching a gateway that honours it (Express's method-override,
        Laravel, Symfony): quota checked the request's own method, the gateway would do another."""
        r = httpx.post(odd_proxy.base + "/echo?" + query, json={})
        assert r.status_code == 400 and "_method" in r.json()["error_description"], r.text
        assert httpx.post(odd_proxy.base + "/echo?method=x&a_method=1&_methods=2", json={}).status_code == 200

    def test_a_form_naming_a_method_is_refused(self, odd_proxy: Running) -> None:
        """Catches a form's `_method` field (Rack's MethodOverride, Symfony) crossing: the same
        override as the query's, in the body."""
        r = httpx.post(odd_proxy.base + "/echo", data={"a": "1", "_method": "DELETE"})
        assert r.status_code == 400 and "_method" in r.json()["error_description"], r.text
        escaped = {"content-type": "application/x-www-form-urlencoded"}
        r = httpx.post(odd_proxy.base + "/echo", content=b"a=1&_%6Dethod=DELETE", headers=escaped)
        assert r.status_code == 400, r.text
        assert httpx.post(odd_proxy.base + "/echo", data={"a": "1", "method": "x"}).status_code == 200
        # A JSON object's key too (Laravel reads it as a form's), in any case, however escaped;
        # a value, a nested key, or a body that is not JSON is the gateway's data.
        for body in (b'{"_method": "DELETE"}', b'{"a": 1, "_METHOD": "PUT"}', b'{"\\u005fmethod": "DELETE"}'):
            r = httpx.post(odd_proxy.base + "/echo", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.text)
        r = httpx.post(odd_proxy.base + "/echo", content=b'{"_method": 1}', headers={"content-type": "text/x+json"})
        assert r.status_code == 400, r.text
        for data in ({"a": "_method"}, {"a": {"_method": "DELETE"}}, [{"_method": "DELETE"}]):
            assert httpx.post(odd_proxy.base + "/echo", json=data).status_code == 200, data
        plain = httpx.post(odd_proxy.base + "/echo", content=b"_method", headers={"content-type": "application/json"})
        assert plain.status_code == 200
        # No type at all: Rack reads the body as a form (found by the review of 2026-12-02).
        r = httpx.post(odd_proxy.base + "/echo", content=b"a=1&_method=DELETE")
        assert r.status_code == 400 and "_method" in r.json()["error_description"], r.text
        assert httpx.post(odd_proxy.base + "/echo", content=b"a=1&method=x").status_code == 200

    @pytest.mark.parametrize(
        "disposition",
        [
            'form-data; name="_method"',
            "form-data; name=_method",
            'Form-Data; NAME="_METHOD"',
            'form-data; name=".method"',
            'form-data; name="_\\method"',  # a quoted name's backslash escape
            "form-data; name*=utf-8''%5Fmethod",  # RFC 2231
            'form-data; name="%5Fmethod"',  # a parser that percent-decodes names
            'form-data; name="_%4D%45THOD"',  # and escaped capitals
            'form-data; name="_m\\ethod"',  # a quoted pair inside the word (found by the review)
            "form-data; name*=utf-8''_%4Dethod",
            'form-data; name*0="_me"; name*1="thod"',  # RFC 2231 continuations
            "form-data; name*0*=utf-8''%5Fme; name*1*=th%6Fd",
            'form-data; name="_method[]"',
        ],
    )
    def test_a_multipart_form_naming_a_method_is_refused(self, odd_proxy: Running, disposition: str) -> None:
        """Catches a multipart form's `_method` part crossing, as the urlencoded field did: Rack and
        Symfony read a multipart field as a form's."""
        body = (
            b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n'
            b"--XyZ\r\ncontent-disposition: " + disposition.encode() + b"\r\n\r\nDELETE\r\n--XyZ--\r\n"
        )
        headers = {"content-type": 'multipart/form-data; boundary="XyZ"'}
        r = httpx.post(odd_proxy.base + "/echo", content=body, headers=headers)
        assert r.status_code == 400 and "_method" in r.json()["error_description"], r.text
        # As a client library writes it (`Content-Disposition`, its own boundary).
        r = httpx.post(odd_proxy.base + "/echo", files={"_method": (None, b"DELETE")})
        assert r.status_code == 400, r.text

    def test_a_multipart_form_without_a_method_crosses(self, odd_proxy: Running) -> None:
        """The check reads part names, not contents: a file that holds `name="_method"`, or a field
        called `filename_method`, reaches the gateway whole."""
        r = httpx.post(
            odd_proxy.base + "/echo",
            files={"file": ("_method", b'Content-Disposition: form-data; name="x"\r\n\r\n_method=DELETE')},
            data={"method": "x", "a_method": "1"},
        )
        assert r.status_code == 200, r.text

    def test_a_form_of_more_fields_than_are_read_is_refused(self, odd_proxy: Running) -> None:
        """Catches a form parsed whole for its `_method` however many fields it held (audit of
        2026-12-02): a megabyte of `a=%&` with no Content-Type (Rack reads it as a form) cost a
        second and a half of CPU, long enough to stall every request of the process and make
        Redis seem down; the review found one value of a megabyte of `%` cost 0.8 s, and a part's
        head of a megabyte 0.3 s. Names alone are decoded; a form that spells `method` nowhere,
        however escaped, crosses unread; one that does is refused past 1,000 fields or a name
        over 256 bytes; a multipart body past 16 parts or a part's head over 2 KB."""
        hostile = b"a=%&" * 250_000
        form = {"content-type": "application/x-www-form-urlencoded"}
        for headers in ({}, form):
            r = httpx.post(odd_proxy.base + "/echo", content=hostile, headers=headers, timeout=30)
            assert r.status_code == 200 and r.json()["length"] == len(hostile), r.text
            r = httpx.post(odd_proxy.base + "/echo", content=hostile + b"%6Dethod=1", headers=headers, timeout=30)
            assert r.status_code == 400 and "more than 1000 fields" in r.json()["error_description"], r.text
        one_value = b"method=x&a=" + b"%" * 1_000_000
        r = httpx.post(odd_proxy.base + "/echo", content=one_value, headers=form, timeout=30)
        assert r.status_code == 200, r.text
        r = httpx.post(odd_proxy.base + "/echo", content=b"%" * 2000 + b"method=x", headers=form, timeout=30)
        assert r.status_code == 400 and "name over 256 bytes" in r.json()["error_description"], r.text
        part = b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n'
        multipart = {"content-type": 'multipart/form-data; boundary="XyZ"'}
        r = httpx.post(odd_proxy.base + "/echo", content=part * 17 + b"--XyZ--\r\n", headers=multipart)
        assert r.status_code == 400 and "more than 16 parts" in r.json()["error_description"], r.text
        r = httpx.post(odd_proxy.base + "/echo", content=part * 15 + b"--XyZ--\r\n", headers=multipart)
        assert r.status_code == 200, r.text
        long_head = b"--XyZ\r\nContent-Disposition: form-data" + b'; name="a"' * 100_000 + b"\r\n\r\n1\r\n--XyZ--\r\n"
        r = httpx.post(odd_proxy.base + "/echo", content=long_head, headers=multipart, timeout=30)
        assert r.status_code == 400 and "head over 2048 bytes" in r.json()["error_description"], r.text
        r = httpx.post(odd_proxy.base + "/echo?" + "&".join(["a=1"] * 1001) + "&method=x", json={})
        assert r.status_code == 400 and "the query spells `method`" in r.text, r.text
        kept = b"&".join(b"a%d=1" % i for i in range(998)) + b"&method=x"
        assert httpx.post(odd_proxy.base + "/echo", content=kept, headers=form).status_code == 200

    def test_head(self, odd_proxy: Running) -> None:
        """HEAD answers carry headers and no body: the proxy neither waits for one nor hangs after.
        Catches: a pool waiting for the body a HEAD answer never has."""
        for _ in range(2):
            r = httpx.head(odd_proxy.base + "/echo", timeout=3)
            assert r.status_code == 200 and int(r.headers["content-length"]) > 0 and r.content == b""

    def test_keep_alive_pool(self, odd_proxy: Running) -> None:
        """Sequential requests reuse one upstream connection (the pool keeps it alive), even when
        each comes from a new client connection.
        Catches: a new upstream connection per request (keep-alive lost)."""
        ports = {httpx.get(odd_proxy.base + "/echo").json()["peer_port"] for _ in range(5)}
        assert len(ports) == 1

    def test_streams_both_ways(self, odd_proxy: Running, odd_upstream: Running) -> None:
        """A response's first chunk reaches the client before the upstream wrote its last; a 600 kB
        chunked upload arrives whole; one past max_body_bytes is refused 413.
        Catches: buffering whole responses, a corrupted or unbounded upload."""
        with httpx.stream("GET", odd_proxy.base + "/stream", timeout=10) as r:
            chunks = r.iter_raw()
            first = next(chunks)
            assert first.startswith(b"first")
            assert httpx.get(odd_upstream.base + "/stream/release").status_code == 200
            assert first + b"".join(chunks) == b"first\nsecond\n"
        payload = bytes(range(256)) * 2400

        def chunks(data: bytes) -> Iterator[bytes]:
            for i in range(0, len(data), 65536):
                yield data[i : i + 65536]

        r = httpx.post(odd_proxy.base + "/echo", content=chunks(payload), timeout=10)
        assert r.json()["length"] == len(payload)
        assert r.json()["sha256"] == hashlib.sha256(payload).hexdigest()
        r = httpx.post(odd_proxy.base + "/echo", content=chunks(payload * 2), timeout=10)
        assert r.status_code == 413 and r.json()["error"] == "request_too_large"
        r = httpx.post(odd_proxy.base + "/echo", content=payload * 2, timeout=10)
        assert r.status_code == 413

    def test_websocket_relay(self, odd_proxy: Running) -> None:
        """Text and binary frames cross, the subprotocol is the upstream's choice, the upstream's
        close code reaches the client, and an upstream refusal refuses the client's handshake.
        Catches: frames, subprotocol or close codes lost across the relay, or a Connection asking
        the relay to drop a field of the handshake's message."""
        ws_base = odd_proxy.base.replace("http://", "ws://")
        with connect(ws_base + "/ws-echo", subprotocols=["im.v1"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "im.v1"
            ws.send("text")
            assert ws.recv(timeout=5) == "text"
            ws.send(b"\x01\x02\x03")
            assert ws.recv(timeout=5) == b"\x03\x02\x01"
            ws.send("close-4001")
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.close_code == 4001
        with pytest.raises(InvalidStatus):
            connect(ws_base + "/ws-refuse", open_timeout=5)
        # A handshake whose Connection names a field of the message is refused, as HTTP's is.
        with pytest.raises(InvalidStatus):
            connect(ws_base + "/ws-echo", additional_headers={"connection": "Upgrade, Authorization"}, open_timeout=5)


class TestHeaderRules:
    def test_forged_forwarding_from_an_untrusted_peer_is_replaced(self) -> None:
        """A client that is not a trusted proxy cannot choose the address or scheme the gateway sees.
        Catches: a client choosing the address the gateway sees."""
        raw: list[tuple[bytes, bytes]] = [
            (b"host", b"im.example"),
            (b"x-forwarded-for", b"1.2.3.4"),
            (b"x-forwarded-proto", b"https"),
            (b"keep-alive", b"timeout=5"),
            (b"expect", b"100-continue"),
            (b"accept", b"*/*"),
        ]
        out = dict(upstream_request_headers(raw, peer="198.51.100.7", scheme="http", trusted=()))
        assert out == {
            b"accept": b"*/*",
            b"x-forwarded-for": b"198.51.100.7",
            b"x-forwarded-proto": b"http",
            b"x-forwarded-host": b"im.example",
        }

    def test_other_forwarding_claims_from_an_untrusted_peer_are_dropped(self) -> None:
        """Catches `Forwarded` (RFC 7239), X-Real-IP or another X-Forwarded-* of a client's choosing
        reaching the gateway (found by the audit of 2026-11-30): a gateway reading them would see the
        address the client chose. From a trusted proxy they cross as sent."""
        claims: list[tuple[bytes, bytes]] = [
            (b"forwarded", b"for=198.51.100.77;proto=https"),
            (b"x-real-ip", b"198.51.100.77"),
            (b"true-client-ip", b"198.51.100.77"),
            (b"x-forwarded-port", b"443"),
            (b"accept", b"*/*"),
        ]
        untrusted = dict(upstream_request_headers(claims, peer="203.0.113.9", scheme="http", trusted=()))
        assert untrusted == {b"accept": b"*/*", b"x-forwarded-for": b"203.0.113.9", b"x-forwarded-proto": b"http"}
        local = (ipaddress.ip_network("127.0.0.0/8"),)
        trusted = dict(upstream_request_headers(claims, peer="127.0.0.1", scheme="http", trusted=local))
        assert trusted[b"forwarded"] == b"for=198.51.100.77;proto=https" and trusted[b"x-real-ip"] == b"198.51.100.77"

    def test_response_hop_by_hop(self) -> None:
        """Transfer-Encoding and fields named by Connection are dropped from responses; others kept.
        Catches: connection-level fields of the upstream hop reaching the client."""
        raw = [(b"Transfer-Encoding", b"chunked"), (b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"), (b"ETag", b"x")]
        assert client_response_headers(raw) == [(b"etag", b"x")]


class _RawUpstream:
    """An upstream written byte by byte (what no well-behaved server sends): `reply(n)` is the answer
    to its n-th request. Every connection it accepted is closed when the test leaves it."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.count = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.count += 1
                for part in self.reply(self.count):
                    if isinstance(part, float):
                        await asyncio.sleep(part)
                        continue
                    writer.write(part)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.sleep(0.05)  # the handlers see their connections end and return
        await self.server.wait_closed()


async def _one_add(proxy: ProxyApp, config_dir: Path) -> tuple[httpx.Response, dict[str, Any]]:
    """A friend add through `proxy`, and alice's counts after it."""
    app = build_app(load_config(config_dir), store=MemoryStore(), upstream=proxy)
    try:
        async with asgi_client(app, ("10.1.2.3", 4000)) as client:
            r = await client.post(f"/{FREE}/users/alice/contacts/users/bob")
            used = (await entitlements(client, FREE, user="alice"))["entities"]["user:alice"]
    finally:
        proxy.pool.close()
    return r, used


class TestUnknownOutcome:
    """Found by the audit of 2026-12-02: a gateway slower than --read-timeout, or one whose
    connection broke once the request was on its way, may have done the request, and quota undid
    what it had counted: a friend add the gateway made went uncounted, and the next passed the cap."""

    async def test_an_add_whose_answer_never_came_stays_counted(self, config_dir: Path) -> None:
        """Catches an add undone on the proxy's own 504 (the gateway may have made it): with
        friends_per_user at 3, the third add times out, and the fourth is refused, not made. A
        removal that times out takes nothing off either."""
        set_cap(config_dir, "free", friends_per_user=3)
        ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        async with _RawUpstream(lambda n: [2.0] if n in (3, 4) else [ok]) as url:
            proxy = ProxyApp(Upstream(url, read_timeout=0.5))
            app = build_app(load_config(config_dir), store=MemoryStore(), upstream=proxy)
            try:
                async with asgi_client(app, ("10.1.2.3", 4000)) as client:
                    codes = [
                        (await client.post(f"/{FREE}/users/alice/contacts/users/f{i}")).status_code for i in range(4)
                    ]
                    removal = await client.delete(f"/{FREE}/users/alice/contacts/users/f0")
                    used = (await entitlements(client, FREE, user="alice"))["entities"]["user:alice"]
            finally:
                proxy.pool.close()
        assert codes == [200, 200, 504, 403] and removal.status_code == 504, (codes, removal.text)
        assert used["friends_per_user"]["used"] == 3

    async def test_a_login_whose_answer_never_came_is_undone(self, config_dir: Path) -> None:
        """Catches logins kept on a 504 like adds: anyone can name a user, so a client slowing the
        gateway filled free's 100 DAU with made-up names and locked real users out for the day."""
        async with _RawUpstream(lambda n: [2.0]) as url:
            proxy = ProxyApp(Upstream(url, read_timeout=0.3))
            app = build_app(load_config(config_dir), store=MemoryStore(), upstream=proxy)
            try:
                async with asgi_client(app, ("10.1.2.3", 4000)) as client:
                    r = await client.post(f"/{FREE}/token", json={"username": "ghost"})
                    usage = (await entitlements(client, FREE))["usage"]
            finally:
                proxy.pool.close()
        assert r.status_code == 504, r.text
        assert usage["included_dau"]["used"] == 0, usage

    async def test_a_switch_of_protocols_unasked_is_no_answer(self, config_dir: Path) -> None:
        """Catches a 101 to a plain request (audit of 2026-12-02): the parser's upgrade exception,
        no HttpParserError, escaped the connection's reader (a traceback in the log) and the 101
        went on to the client. It is an answer that never came: 504, the add kept."""
        switched = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n"
        async with _RawUpstream(lambda n: [switched]) as url:
            r, used = await _one_add(ProxyApp(Upstream(url, read_timeout=2)), config_dir)
        assert r.status_code == 504 and r.json()["error"] == "gateway_timeout", r.text
        assert used["friends_per_user"]["used"] == 1

    async def test_an_add_that_never_left_is_undone(self, config_dir: Path) -> None:
        """Catches the keep above applied where nothing was sent: an upstream nobody listens on is a
        502, and the add is undone."""
        r, used = await _one_add(ProxyApp(Upstream(f"http://127.0.0.1:{free_port()}", connect_timeout=1)), config_dir)
        assert r.status_code == 502 and r.json()["error"] == "bad_gateway", r.text
        assert used["friends_per_user"]["used"] == 0


class TestFraming:
    """Found by the audit of 2026-11-30: under a server that hands over a body both Content-Length
    and Transfer-Encoding framed (h11), the proxy told the gateway the length and then wrote every
    byte it got; the bytes past the length were read upstream as a second request nobody checked,
    and its answer, left on the pooled connection, went to the next client (of any app)."""

    async def test_ambiguous_framing_is_refused(self, odd_upstream: Running) -> None:
        """Catches two Content-Lengths, or one beside Transfer-Encoding, being forwarded at all."""
        proxy = ProxyApp(Upstream(odd_upstream.base))
        try:
            for headers in (
                [(b"content-length", b"2"), (b"transfer-encoding", b"chunked")],
                [(b"content-length", b"2"), (b"content-length", b"46")],
            ):
                sent = await call_raw(proxy, http_scope("POST", "/echo", headers=headers), SMUGGLING)
                assert sent[0]["status"] == 400, headers
                assert json.loads(sent[1]["body"])["error"] == "illegal_argument"
        finally:
            proxy.pool.close()

    async def test_a_body_past_or_short_of_its_length_goes_nowhere(self, odd_upstream: Running) -> None:
        """Catches a body longer (or shorter) than its Content-Length being written upstream: the
        next request on the pooled connection must get its own answer, not the smuggled one's."""
        proxy = ProxyApp(Upstream(odd_upstream.base, connections=1))
        try:
            fine = await call_raw(proxy, http_scope("POST", "/echo", headers=[(b"content-length", b"2")]), b"{}")
            assert fine[0]["status"] == 200 and json.loads(fine[1]["body"])["length"] == 2
            for declared in (b"2", b"99"):
                scope = http_scope("POST", "/echo", headers=[(b"content-length", declared)])
                assert (await call_raw(proxy, scope, SMUGGLING))[0]["status"] == 400, declared
            after = await call_raw(proxy, http_scope("GET", "/echo"))
            assert json.loads(after[1]["body"])["query"] == ""
        finally:
            proxy.pool.close()

    async def test_an_answer_nobody_asked_for_is_never_handed_on(self) -> None:
        """Catches an idle pooled connection keeping what the upstream sent unasked (a smuggled
        request's answer) and handing it to the next request as the start of its answer."""
        answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        unasked = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nevil!"
        async with _RawUpstream(lambda n: [answer, 0.05, unasked]) as base:
            proxy = ProxyApp(Upstream(base))
            try:
                for _ in range(2):
                    sent = await call_raw(proxy, http_scope("GET", "/x"))
                    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"ok"
                    await asyncio.sleep(0.2)
            finally:
                proxy.pool.close()

    async def test_a_body_that_never_comes_holds_no_upstream_connection(self, odd_upstream: Running) -> None:
        """Catches a client stalling every other app's requests (found by the audit of 2026-11-30):
        a pooled connection was taken before the body streamed, and a body that never came held it
        for good. With one connection in the pool, another client's request must still be answered."""
        proxy = ProxyApp(Upstream(odd_upstream.base, connections=1))

        async def never() -> dict[str, object]:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def drop(message: object) -> None:
            return None

        stalled = asyncio.ensure_future(
            proxy(http_scope("POST", "/echo", headers=[(b"content-length", b"1000")]), never, drop)
        )
        try:
            await asyncio.sleep(0.2)
            answered = await asyncio.wait_for(call_raw(proxy, http_scope("GET", "/echo", peer="10.9.9.9")), 5)
            assert answered[0]["status"] == 200
        finally:
            stalled.cancel()
            await asyncio.gather(stalled, return_exceptions=True)
            proxy.pool.close()


class TestUnaskedAnswers:
    """Found by the audit of 2026-11-30 (the third): an answer the upstream sent unasked, arriving in
    the same read as the asked one, was parsed into the asked response (its body and headers), and
    one cut short left the pooled connection mid-message for the next client (502)."""

    GOOD = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfine"
    ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def test_a_whole_unasked_answer_in_the_same_read(self) -> None:
        """Catches the unasked answer's body and Set-Cookie reaching the client who asked."""
        unasked = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nset-cookie: session=attacker\r\n\r\nevil!"
        async with _RawUpstream(lambda n: [self.ANSWER + unasked if n == 1 else self.GOOD]) as base:
            proxy = ProxyApp(Upstream(base))
            try:
                sent = await call_raw(proxy, http_scope("GET", "/x"))
                assert b"".join(m.get("body", b"") for m in sent[1:]) == b"ok"
                assert [h for h in sent[0]["headers"] if h[0] == b"set-cookie"] == []
            finally:
                proxy.pool.close()

    async def test_a_partial_unasked_answer_never_reaches_the_next_client(self) -> None:
        """Catches a connection left mid-message being pooled: the next client gets its own answer."""
        unasked = b"HTTP/1.1 200 OK\r\ncontent-length: 30\r\n\r\nevil"
        async with _RawUpstream(lambda n: [self.ANSWER + unasked if n == 1 else self.GOOD]) as base:
            proxy = ProxyApp(Upstream(base, connections=1))
            try:
                await call_raw(proxy, http_scope("GET", "/x"))
                await asyncio.sleep(0.1)
                victim = await asyncio.wait_for(call_raw(proxy, http_scope("GET", "/y", peer="10.9.9.9")), 5)
                assert victim[0]["status"] == 200
                assert b"".join(m.get("body", b"") for m in victim[1:]) == b"fine"
            finally:
                proxy.pool.close()
