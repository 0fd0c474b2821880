"""Hostile clients, as issue "Hold every limit against hostile clients" tried them: each test drives
the attack over HTTP through the middleware (memory, a real redis-server and a real Redis Cluster,
through the `store` fixture) and checks that the paid limit holds. Counter keys are spelled out here,
not built with quota's key helpers, so a key-format bug common to reads and writes still shows."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections import UserDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.middleware.gzip import GZipMiddleware

from quota.config import load_config
from quota.decisions import SHARED_PLANS
from quota.errors import StorageError
from quota.gateway import create_gateway
from quota.keys import app_prefix, set_key
from quota.serve import build_app
from quota.store.memory import MemoryStore
from quota.store.program import AddOp, Program, TombstoneOp
from quota.store.redis import RedisStore
from tests.conftest import Clock, RedisServer, asgi_client, make_client
from tests.helpers import (
    JSON_TYPE,
    SwitchedStore,
    call_raw,
    create_room,
    entitlements,
    gateway_state,
    http_scope,
    middleware_of,
    raw_deadlines,
    raw_hash,
    read_yaml,
    register,
    room_id,
    set_cap,
    write_yaml,
)

FREE, PRO = "demo/free", "demo/pro"
TOKEN = "attack-admin-token-0123456789"
_JSON = (b"content-type", b"application/json")


async def members(client: httpx.AsyncClient, key: str) -> set[str]:
    store = client._transport.app.runtime.store  # type: ignore[attr-defined]
    return set(await store.members(key))


class TestCommas:
    async def test_comma_in_a_single_id_is_refused(self, client: httpx.AsyncClient) -> None:
        """Catches a path value split on commas on a non-batch route: `DELETE /users/zz,victim` freed
        victim's friends while the gateway deleted nothing."""
        await register(client, FREE, ["victim", "f1", "f2"])
        for friend in ("f1", "f2"):
            assert (await client.post(f"/{FREE}/users/victim/contacts/users/{friend}")).status_code == 200
        r = await client.post(f"/{FREE}/users", json={"username": "zz,victim"})
        assert r.status_code == 400 and r.json()["error"] == "illegal_argument"
        assert (await client.delete(f"/{FREE}/users/zz,victim")).status_code == 400
        assert (await client.delete(f"/{FREE}/users/victim/contacts/users/x,f1")).status_code == 400
        assert await members(client, "q:{demo#free}:s:contacts:o:victim") == {"f1", "f2"}

    async def test_batch_routes_split_into_valid_ids_only(self, client: httpx.AsyncClient) -> None:
        """Catches a batch remove that keeps counting members it removed, or accepts an invalid id in
        its list."""
        await register(client, PRO, ["own", "a", "b", "c"])
        rid = room_id(await create_room(client, PRO, "chatgroups", "own"), "chatgroups")
        assert (await client.post(f"/{PRO}/chatgroups/{rid}/users", json={"usernames": ["a", "b", "c"]})).is_success
        assert (await client.delete(f"/{PRO}/chatgroups/{rid}/users/a,b,{{x}}")).status_code == 400
        assert (await client.delete(f"/{PRO}/chatgroups/{rid}/users/A,b")).status_code == 200
        assert await members(client, f"q:{{demo#pro}}:s:group_members:o:{rid}") == {"own", "c"}
        assert gateway_state(client, PRO).groups[rid]["members"] == {"own", "c"}


class TestLogins:
    async def test_refused_logins_use_no_dau(self, client: httpx.AsyncClient, clock: Clock) -> None:
        """Catches logins counted before the upstream answered: 100 logins of users that do not exist
        (404) used up the free plan's 100 DAU and locked real users out."""
        await register(client, FREE, ["real"])
        for i in range(100):
            r = await client.post(f"/{FREE}/token", json={"username": f"ghost{i}"})
            assert r.status_code == 404
        assert (await client.post(f"/{FREE}/token", json={"username": "real"})).status_code == 200
        day = f"{__import__('datetime').datetime.fromtimestamp(clock.now, __import__('datetime').UTC):%Y%m%d}"
        assert await members(client, f"q:{{demo#free}}:dau:{day}") == {"real"}

    async def test_free_ceiling_exact_under_concurrency(self, client: httpx.AsyncClient) -> None:
        """Catches a DAU ceiling that concurrent logins walk past: 150 new users at once on free, 100 in."""
        users = [f"c{i}" for i in range(150)]
        await register(client, FREE, users)
        answers = await asyncio.gather(*(client.post(f"/{FREE}/token", json={"username": u}) for u in users))
        assert sorted({r.status_code for r in answers}) == [200, 403]
        assert sum(r.status_code == 200 for r in answers) == 100

    async def test_case_variants_are_one_user(self, client: httpx.AsyncClient, clock: Clock) -> None:
        """Catches ids not folded: alice, Alice and ALICE logging in were three DAU."""
        await register(client, FREE, ["alice"])
        for name in ("alice", "Alice", "ALICE"):
            assert (await client.post(f"/{FREE}/token", json={"username": name})).status_code == 200
        day = f"{__import__('datetime').datetime.fromtimestamp(clock.now, __import__('datetime').UTC):%Y%m%d}"
        assert await members(client, f"q:{{demo#free}}:dau:{day}") == {"alice"}


async def test_case_variants_share_one_friend_cap(store: Any, clock: Clock, config_dir: Path) -> None:
    """Catches ids not folded: behind a gateway that folds case, Alice and ALICE each had their own
    friend cap."""
    set_cap(config_dir, "free", friends_per_user=2)
    async with make_client(store, clock, load_config(config_dir)) as client:
        await register(client, FREE, ["alice", "b", "c", "d"])
        assert (await client.post(f"/{FREE}/users/alice/contacts/users/b")).status_code == 200
        assert (await client.post(f"/{FREE}/users/ALICE/contacts/users/c")).status_code == 200
        r = await client.post(f"/{FREE}/users/Alice/contacts/users/d")
        assert r.status_code == 403 and r.json()["error"] == "exceed_limit"
        assert await members(client, "q:{demo#free}:s:contacts:o:alice") == {"b", "c"}


class _Gate:
    """An upstream that holds chosen requests until told, so a test can order a race exactly."""

    def __init__(self, app: Any, holds: Any) -> None:
        self.app, self.holds = app, holds
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.state = app.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.holds(scope):
            self.entered.set()
            await self.release.wait()
        await self.app(scope, receive, send)


async def test_undo_never_removes_what_another_request_relies_on(store: Any, clock: Clock) -> None:
    """Catches an undo that removes a member a concurrent request also added: a batch join
    [u, ghost] (refused upstream, 404) raced a single join of u (200); the batch's undo removed u and
    the group went past its cap at the gateway."""
    gateway = create_gateway()
    gate = _Gate(gateway, lambda scope: scope["path"].endswith("/users") and scope["method"] == "POST")
    async with make_client(store, clock, upstream=gate) as client:
        gate.holds = lambda scope: False
        await register(client, PRO, ["own", "u"])
        rid = room_id(await create_room(client, PRO, "chatgroups", "own"), "chatgroups")
        gate.holds = lambda scope: scope["path"].endswith(f"/chatgroups/{rid}/users")
        batch = asyncio.ensure_future(client.post(f"/{PRO}/chatgroups/{rid}/users", json={"usernames": ["u", "ghost"]}))
        await asyncio.wait_for(gate.entered.wait(), 10)
        single = await client.post(f"/{PRO}/chatgroups/{rid}/users/u")
        assert single.status_code == 200
        gate.release.set()
        assert (await batch).status_code == 404
        key = f"q:{{demo#pro}}:s:group_members:o:{rid}"
        assert await members(client, key) == {"own", "u"} == gateway_state(client, PRO).groups[rid]["members"]
        assert await members(client, "q:{demo#pro}:s:group_members:m:u") == {rid}


async def test_undo_removes_a_member_nobody_else_added(store: Any, clock: Clock) -> None:
    """Catches claims that keep a member after every claimant failed (both joins refused upstream)."""
    gateway = create_gateway()
    async with make_client(store, clock, upstream=gateway) as client:
        await register(client, PRO, ["own", "u"])
        rid = room_id(await create_room(client, PRO, "chatgroups", "own"), "chatgroups")
        r = await client.post(f"/{PRO}/chatgroups/{rid}/users", json={"usernames": ["u", "ghost"]})
        assert r.status_code == 404
        assert await members(client, f"q:{{demo#pro}}:s:group_members:o:{rid}") == {"own"}
        assert await members(client, "q:{demo#pro}:s:group_members:m:u") == set()


async def test_create_holds_its_slot_while_the_upstream_works(store: Any, config_dir: Path) -> None:
    """Catches a reservation that expires while its request is still in flight: a create held past
    the reservation's life let another create take the last slot, and both groups existed."""
    set_cap(config_dir, "free", groups_per_app=1)
    (config_dir / "quota.yaml").write_text("reservation_ttl_s: 1\n")
    clock = Clock(tick=0.001)
    gateway = create_gateway()
    gate = _Gate(gateway, lambda scope: False)
    async with make_client(store, clock, load_config(config_dir), upstream=gate) as client:
        await register(client, FREE, ["own"])
        gate.holds = lambda scope: scope["path"].endswith("/chatgroups")
        first = asyncio.ensure_future(create_room(client, FREE, "chatgroups", "own"))
        await asyncio.wait_for(gate.entered.wait(), 10)
        clock.advance(0.5)
        pending_key = "q:{demo#free}:s:app_groups:o:demo%23free:pending"
        # The slot is renewed while the upstream works (every third of its life): wait until a
        # renewal after a jump past its first deadline shows in the store.
        mw = client._transport.app  # type: ignore[attr-defined]
        store_ = mw.runtime.store
        deadline = asyncio.get_running_loop().time() + 10
        clock.advance(0.4)
        start_ms = int(clock.now * 1000)
        while True:
            due = await _deadlines(store_, pending_key)
            if due and min(due) > start_ms + 500:
                break
            assert asyncio.get_running_loop().time() < deadline, due
            await asyncio.sleep(0.05)
        clock.advance(0.9)  # past the first deadline, within the renewed one
        gate.holds = lambda scope: False
        second = await create_room(client, FREE, "chatgroups", "own")
        assert second.status_code == 403 and second.json()["limit"] == "groups_per_app"
        gate.release.set()
        assert (await first).status_code == 200
        assert len(gateway_state(client, FREE).groups) == 1
        counted = await members(client, "q:{demo#free}:s:app_groups:o:demo%23free")
        assert counted == set(gateway_state(client, FREE).groups)


async def _deadlines(store: Any, key: str) -> list[int]:
    if hasattr(store, "zsets"):
        found = store.zsets.get(key)
        return list(found.due.values()) if found else []
    return [int(score) for _, score in await store.client.zrange(key, 0, -1, withscores=True)]


async def test_slow_body_on_create_is_counted(store: Any, clock: Clock) -> None:
    """Catches a create whose slot expired during a slow body: the gateway created the group and
    quota never counted it. The body is read before anything is reserved."""
    async with make_client(store, clock) as client:
        await register(client, FREE, ["own"])
        mw = client._transport.app  # type: ignore[attr-defined]
        body = json.dumps({"owner": "own"}).encode()
        parts = [body[:5], body[5:]]
        sent: list[Any] = []

        async def receive() -> Any:
            if parts:
                chunk = parts.pop(0)
                if not parts:
                    clock.advance(120)  # the slow client: two minutes between its chunks
                    # Meanwhile another create runs, which purges expired reservations.
                    assert (await create_room(client, FREE, "chatgroups", "own")).status_code == 200
                return {"type": "http.request", "body": chunk, "more_body": bool(parts)}
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = _scope("POST", f"/{FREE}/chatgroups")
        await mw(scope, receive, send)
        assert sent[0]["status"] == 200
        gid = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["data"]["groupid"]
        counted = await members(client, "q:{demo#free}:s:app_groups:o:demo%23free")
        assert gid in counted and counted == set(gateway_state(client, FREE).groups) and len(counted) == 2


@pytest.mark.parametrize(
    ("version", "headers"),
    [("1.1", [(b"transfer-encoding", b"chunked")]), ("2", []), ("1.1", [(b"content-length", b"2")])],
    ids=["chunked", "http2", "length"],
)
@pytest.mark.parametrize("laned", [False, True], ids=["first", "laned"])
async def test_slow_body_on_a_friend_add_is_read_before_its_reservation(
    store: Any, clock: Clock, config_dir: Path, version: str, headers: list[tuple[bytes, bytes]], laned: bool
) -> None:
    """A friend add counts nothing of its body, yet a body still to come (chunked, HTTP/2, or a
    length of 2) is read before anything is reserved, as a create's is; only HTTP/1 framing that
    says there is none lets it reserve at once. Catches a reservation taken at the headers of a
    request whose body has not come: a slow client holds the last slot for as long as it takes to
    send, and the add that completes first, two minutes before it, is refused. `laned`: the path
    and client took a lane first (an add with no body, then removed): the lane is no way round."""
    set_cap(config_dir, "free", friends_per_user=1)
    async with make_client(store, clock, load_config(config_dir)) as client:
        await register(client, FREE, ["a", "b", "c"])
        mw = middleware_of(client)
        gateway = mw.app
        scope = {**_scope("POST", f"/{FREE}/users/a/contacts/users/b", headers), "http_version": version}
        if laned:
            for _ in range(2):
                sent_first: list[Any] = []
                await mw(_scope("POST", scope["path"]), _no_body, _into(sent_first))
                assert sent_first[0]["status"] == 200
            assert (await client.delete(f"/{FREE}/users/a/contacts/users/b")).status_code == 200
            lanes = mw.runtime.directory.lanes(mw.today(clock.now))
            key = ("POST", scope["path"], scope["raw_path"], mw.runtime.clients.address(scope))
            assert key in lanes  # so the request below could take it

        async def reading(scope: Any, receive: Any, send: Any) -> None:
            # An upstream that reads the whole body before it answers, as a proxy's upstream does.
            chunks, more = [], True
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)

            async def replay() -> Any:
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

            await gateway(scope, replay, send)

        parts = [b"{", b"}"]

        async def receive() -> Any:
            if parts:
                chunk = parts.pop(0)
                if not parts:
                    clock.advance(120)  # the slow client: two minutes between its chunks
                    assert (await client.post(f"/{FREE}/users/a/contacts/users/c")).status_code == 200
                return {"type": "http.request", "body": chunk, "more_body": bool(parts)}
            return {"type": "http.disconnect"}

        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        mw.app = reading
        await mw(scope, receive, send)
        mw.app = gateway
        assert sent[0]["status"] == 403, sent[0]
        await mw.guard.flush()  # the confirms waiting for a ride
        assert await members(client, set_key(app_prefix("demo#free"), "contacts", "o", "a")) == {"c"}
        assert gateway_state(client, FREE).contacts["a"] == {"c"}


async def test_laned_adds_at_once_or_failing_upstream_keep_the_cap(store: Any, clock: Clock, config_dir: Path) -> None:
    """Friend adds on their lanes (each path decided once before) sent nine at once behind a slow
    upstream, then one whose upstream fails. Catches a lane that shares more than its plan between
    requests in flight (a verdict, a claim, an outcome): the cap of 2 held exactly, what quota
    counts is what the gateway holds, and a failed add is undone."""
    set_cap(config_dir, "free", friends_per_user=2)
    async with make_client(store, clock, load_config(config_dir)) as client:
        await register(client, FREE, ["a", "c", "d", "e"])
        mw = middleware_of(client)
        gateway = mw.app
        paths = {m: f"/{FREE}/users/a/contacts/users/{m}" for m in "cde"}
        for m, path in paths.items():
            for _ in range(2):
                assert (await client.post(path)).status_code == (403 if m == "e" else 200)
        for m in "cd":
            assert (await client.delete(paths[m])).status_code == 200
        lanes = mw.runtime.directory.lanes(mw.today(clock.now))
        assert {key[1] for key in lanes if key[0] == "POST"} >= set(paths.values())
        owner = set_key(app_prefix("demo#free"), "contacts", "o", "a")

        async def slow(scope: Any, receive: Any, send: Any) -> None:
            await asyncio.sleep(0.05)
            await gateway(scope, receive, send)

        mw.app = slow
        answers = await asyncio.gather(*(client.post(paths[m]) for m in "cdecdecde"))
        mw.app = gateway
        assert {r.status_code for r in answers} == {200, 403}
        await mw.guard.flush()
        held = await members(client, owner)
        assert len(held) == 2 and held == gateway_state(client, FREE).contacts["a"]
        gone = sorted(held)[0]
        assert (await client.delete(paths[gone])).status_code == 200

        async def failing(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        mw.app = failing
        left = next(m for m in "cde" if m not in held or m == gone)
        assert (await client.post(paths[left])).status_code == 500
        mw.app = gateway
        await mw.guard.flush()
        assert await members(client, owner) == held - {gone}


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return http_scope(method, path, headers=headers)


async def _no_body() -> Any:
    return {"type": "http.request", "body": b"", "more_body": False}


def _into(sent: list[Any]) -> Any:
    async def send(message: Any) -> None:
        sent.append(message)

    return send


async def _everything_ok(scope: Any, receive: Any, send: Any) -> None:
    """An upstream that answers 200 to every path: serves `/x/` like `/x`, HEAD like GET."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


def _counting(seen: dict[str, int]) -> Any:
    """An upstream that counts the body bytes of its first message into `seen`, then answers 200."""

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        seen["bytes"] += len(message.get("body", b""))
        await _everything_ok(scope, receive, send)

    return counting


class TestUnnamedPaths:
    @pytest.mark.parametrize(
        "path",
        [
            "/moderation/audio",
            "/moderation/video",
            "/moderation/labels",
            "/moderation/anything/deeper",
            "/callbacks/whatever",
            "/callbacks/",
        ],
    )
    async def test_every_kind_is_gated(self, store: Any, clock: Clock, path: str) -> None:
        """Catches moderation and callback kinds the route map did not list passing on free."""
        async with make_client(store, clock, upstream=_everything_ok) as client:
            r = await client.put(f"/{FREE}{path}", json={})
            assert r.status_code == 403 and r.json()["error"] == "forbidden_op", r.text

    @pytest.mark.parametrize(
        ("method", "path", "feature"),
        [
            ("POST", "/callbacks", "message_event_callbacks"),
            ("GET", "/callbacks", "message_event_callbacks"),
            ("DELETE", "/callbacks/pre_send", "pre_send_callbacks"),
            ("POST", "/callbacks/user_status/x", "user_status_callbacks"),
            ("POST", "/moderation/text", "text_moderation"),
            ("PATCH", "/moderation/user_id_filter", "realtime_moderation"),
            ("GET", "/chatgroups/1/read_receipts", "group_read_receipts"),
            ("POST", "/messages/translate/batch", "translation"),
            ("DELETE", "/messages/report", "message_report"),
        ],
    )
    async def test_a_gate_holds_for_every_method(
        self, store: Any, clock: Clock, config_dir: Path, method: str, path: str, feature: str
    ) -> None:
        """Catches feature gates that matched PUT (or POST) alone: under `unmatched: rate-only` a
        free app's `POST /callbacks` or `GET .../read_receipts` passed on the per-IP rate alone.
        Found by the review of the plan matrix of 2026-12-01."""
        edit = read_yaml(config_dir / "routes.yaml")
        edit["unmatched"] = "rate-only"
        write_yaml(config_dir / "routes.yaml", edit)
        async with make_client(store, clock, load_config(config_dir), upstream=_everything_ok) as client:
            r = await client.request(method, f"/{FREE}{path}", json={} if method != "GET" else None)
            assert r.status_code == 403 and r.json()["limit"] == feature, r.text

    async def test_trailing_slash_does_not_skip_the_gate(self, store: Any, clock: Clock) -> None:
        """Catches `POST /messages/translate/` passing the feature gate on an upstream that serves it."""
        async with make_client(store, clock, upstream=_everything_ok) as client:
            r = await client.post(f"/{FREE}/messages/translate/", json={})
            assert r.status_code == 403 and r.json()["limit"] == "translation"

    async def test_head_is_held_like_get(self, store: Any, clock: Clock) -> None:
        """Catches HEAD skipping retention and the history export's once-a-minute rate."""
        from datetime import UTC, datetime, timedelta

        async with make_client(store, clock, upstream=_everything_ok) as client:
            old = (datetime.fromtimestamp(clock.now, UTC) - timedelta(days=30)).strftime("%Y%m%d%H")
            assert (await client.head(f"/{FREE}/chatmessages/{old}")).status_code == 403
            fresh = datetime.fromtimestamp(clock.now, UTC).strftime("%Y%m%d%H")
            assert (await client.head(f"/{PRO}/chatmessages/{fresh}")).status_code == 200
            assert (await client.head(f"/{PRO}/chatmessages/{fresh}")).status_code == 429

    async def test_unnamed_path_under_an_app_is_refused(self, store: Any, clock: Clock) -> None:
        """Catches paths the route map does not name getting only the general rate."""
        async with make_client(store, clock, upstream=_everything_ok) as client:
            r = await client.get(f"/{PRO}/anything/at/all")
            assert r.status_code == 404 and r.json()["error"] == "service_resource_not_found"
            assert (await client.get("/nobody/none/anything")).status_code == 404
            assert (await client.get("/nobody/none")).status_code == 404

    async def test_rate_only_policy(self, store: Any, clock: Clock, config_dir: Path) -> None:
        """Catches `unmatched: rate-only` being ignored (configurable default deny)."""
        routes = config_dir / "routes.yaml"
        routes.write_text(routes.read_text().replace("unmatched: refuse", "unmatched: rate-only"))
        async with make_client(store, clock, load_config(config_dir), upstream=_everything_ok) as client:
            assert (await client.get(f"/{PRO}/anything")).status_code == 200

    async def test_state_dump_is_for_operators(self, store: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
        """Catches `GET /{org}/{app}/_state` showing any app's whole user graph to anyone."""
        monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
        async with make_client(store, clock) as client:
            await register(client, PRO, ["secret"])
            r = await client.get(f"/{PRO}/_state")
            assert r.status_code == 404 and "secret" not in r.text
            r = await client.get(f"/{PRO}/_state", headers={"authorization": "Bearer wrong-token-0123456789"})
            assert r.status_code == 404
            r = await client.get(f"/{PRO}/_state", headers={"authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200 and "secret" in r.text


class TestForwardedFor:
    async def _budget(self, client: httpx.AsyncClient, headers: list[dict[str, str]]) -> list[int]:
        return [(await client.get(f"/{PRO}/users", headers=h)).status_code for h in headers]

    async def test_every_line_is_read(self, store: Any, clock: Clock) -> None:
        """Catches reading only the first X-Forwarded-For line: a client sent its own line before the
        proxy's and got a fresh budget per request."""
        clock.tick = 0
        async with make_client(store, clock, client_ip="127.0.0.1") as proxy:
            transport = proxy._transport  # type: ignore[attr-defined]
            codes = []
            for i in range(101):
                request = proxy.build_request("GET", f"/{PRO}/users")
                request.headers.update({"x-forwarded-for": f"7.7.{i // 250}.{i % 250}"})
                raw = [(k, v) for k, v in request.headers.raw if k.lower() != b"x-forwarded-for"]
                raw += [(b"x-forwarded-for", f"7.7.{i // 250}.{i % 250}".encode()), (b"x-forwarded-for", b"9.9.9.9")]
                request = httpx.Request("GET", request.url, headers=raw)
                codes.append((await transport.handle_async_request(request)).status_code)
            assert codes[:100] == [200] * 100 and codes[100] == 429

    async def test_ports_and_ipv6_networks(self, store: Any, clock: Clock) -> None:
        """Catches an `ip:port` hop falling back to the proxy's address (every client in one bucket),
        and IPv6 clients taking a fresh budget per address of their /64."""
        clock.tick = 0
        async with make_client(store, clock, client_ip="127.0.0.1") as proxy:
            hops = [{"x-forwarded-for": "9.9.9.9:5555"}] * 50 + [{"x-forwarded-for": "9.9.9.9"}] * 50
            assert set(await self._budget(proxy, hops)) == {200}
            assert await self._budget(proxy, [{"x-forwarded-for": "9.9.9.9:1"}]) == [429]
            assert await self._budget(proxy, [{"x-forwarded-for": "8.8.8.8:1"}]) == [200]
            v6 = [{"x-forwarded-for": f"[2001:db8::{i:x}]:443"} for i in range(1, 101)]
            assert set(await self._budget(proxy, v6)) == {200}
            assert await self._budget(proxy, [{"x-forwarded-for": "2001:db8::ffff"}]) == [429]
            assert await self._budget(proxy, [{"x-forwarded-for": "2001:db8:0:1::1"}]) == [200]

    async def test_many_addresses_never_reset_a_clients_count(self, store: Any, clock: Clock, config_dir: Path) -> None:
        """A read's plan is built once per client and kept, for a bounded number of clients. Catches
        a client whose kept plan was pushed out by 200 other addresses starting over at 0, the kept
        plans growing past their bound, and a kept plan outliving a reload that changed the rate."""
        clock.tick = 0
        async with make_client(store, clock, load_config(config_dir), client_ip="127.0.0.1") as proxy:
            first = [{"x-forwarded-for": "9.9.9.9"}] * 101
            assert await self._budget(proxy, first) == [200] * 100 + [429]
            others = [{"x-forwarded-for": f"8.8.{i // 250}.{i % 250}"} for i in range(200)]
            assert set(await self._budget(proxy, others)) == {200}
            assert await self._budget(proxy, first[:1]) == [429]
            mw = middleware_of(proxy)
            app = mw.runtime.directory.lookup("demo#pro", mw.today(clock.now))
            assert 0 < len(app.compiled["users.list"].shared) <= SHARED_PLANS
            plans = config_dir / "plans.yaml"
            doc = read_yaml(plans)
            doc["plans"]["pro"]["rates"]["rest_per_ip"] = "150/second"
            write_yaml(plans, doc)
            mw.reload(config_dir)
            assert await self._budget(proxy, first[:51]) == [200] * 50 + [429]

    @pytest.mark.parametrize("trusted", [True, False], ids=["unix-trusted", "untrusted"])
    async def test_a_unix_socket_behind_a_proxy(
        self, clock: Clock, config_dir: Path, tmp_path: Path, trusted: bool
    ) -> None:
        """quota embedded in an app that uvicorn serves on a unix socket behind a proxy (nginx, say):
        such a server names no peer. With `unix` among trusted_proxies, X-Forwarded-For names the
        client: each has its own budget, and a hop a client wrote itself, before the one the proxy
        appended, buys none. Without it, forwarded hops are not read and every client shares one
        budget. Catches: hops read from a socket nobody trusted, or a trusted socket's clients all
        in one bucket."""
        clock.tick = 0
        (config_dir / "quota.yaml").write_text(f"trusted_proxies: [{'unix' if trusted else ''}]\n")
        app = build_app(load_config(config_dir), store=MemoryStore())
        app.clock = clock
        sock = tmp_path / "quota.sock"
        server = uvicorn.Server(
            uvicorn.Config(app, uds=str(sock), proxy_headers=False, lifespan="off", log_level="warning")
        )
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                assert not serving.done()
                await asyncio.sleep(0.01)
            transport = httpx.AsyncHTTPTransport(uds=str(sock))
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as proxy:
                first = await self._budget(proxy, [{"x-forwarded-for": "9.9.9.9"}] * 101)
                assert first == [200] * 100 + [429]
                other = await self._budget(proxy, [{"x-forwarded-for": "8.8.8.8"}])
                spoofed = await self._budget(proxy, [{"x-forwarded-for": "1.1.1.1, 9.9.9.9"}])
            assert (other, spoofed) == (([200], [429]) if trusted else ([429], [429]))
        finally:
            server.should_exit = True
            await serving
            await app.shutdown()

    async def test_untrusted_peer_cannot_forward(self, store: Any, clock: Clock) -> None:
        """Catches X-Forwarded-For honoured from a peer that is not a trusted proxy."""
        clock.tick = 0
        async with make_client(store, clock, client_ip="10.9.9.9") as direct:
            spoofed = [{"x-forwarded-for": f"1.2.3.{i}"} for i in range(101)]
            assert (await self._budget(direct, spoofed))[-1] == 429


class TestBodies:
    @pytest.mark.parametrize(
        "body",
        [
            b'{"usernames": ["a"], "USERNAMES": ["b", "c", "d"]}',  # Go's encoding/json: the last, any case
            b'{"usernames": ["a"], "usernames": ["b", "c", "d"]}',  # most parsers: the last one
            b'{"usernames": ["a"], "u\\u017fernames": ["b", "c", "d"]}',  # Go folds the long s to s
        ],
    )
    async def test_a_key_named_twice_is_refused(self, store: Any, clock: Clock, config_dir: Path, body: bytes) -> None:
        """Catches a body quota and a gateway read differently: quota counted the first (or the
        exactly named) `usernames`, one member, where a gateway in Go adds the three of the last,
        past members_per_group. Such a body is a 400 that reaches nobody."""
        set_cap(config_dir, "free", members_per_group=3)
        seen: list[str] = []
        async with make_client(store, clock, load_config(config_dir)) as client:
            await register(client, FREE, ["o", "a", "b", "c", "d"])
            gid = room_id(await create_room(client, FREE, "chatgroups", "o"), "chatgroups")
            mw = middleware_of(client)
            mw.app = _recording(seen, "path")
            sent = await call_raw(mw, http_scope("POST", f"/{FREE}/chatgroups/{gid}/users"), body)
            assert sent[0]["status"] == 400, sent
            assert b"names a key twice" in sent[1]["body"]
            assert seen == []

    async def test_a_batch_of_thousands_is_held_to_its_cap(self, store: Any, clock: Clock, config_dir: Path) -> None:
        """A batch add whose route sets no max_batch (the key is optional) and fails open: 4,000
        members in one body (some 34 KB of short ids, under the 64 KiB bound) are refused by the
        free plan's members_per_group, three times running, and another app's write passes after
        them. Catches: an add too large for one script call failing as an outage (let through on
        `open`) and opening the breaker for every app."""
        routes = config_dir / "routes.yaml"
        doc = read_yaml(routes)
        for rule in doc["routes"]:
            if rule.get("name") == "groups.add_members":
                rule["outage"] = "open"
                for change in rule["changes"]:
                    change.pop("max_batch", None)
        write_yaml(routes, doc)
        body = {"usernames": [f"u{i}" for i in range(4_000)]}
        async with make_client(store, clock, load_config(config_dir)) as client:
            await register(client, FREE, ["o"])
            gid = room_id(await create_room(client, FREE, "chatgroups", "o"), "chatgroups")
            for _ in range(3):
                r = await client.post(f"/{FREE}/chatgroups/{gid}/users", json=body)
                assert r.status_code == 403, (r.status_code, r.text[:200])
                assert r.json()["limit"] == "members_per_group"
            r = await client.post(f"/{PRO}/users", json=[{"username": "x", "password": "p"}])
            assert r.status_code == 200, r.text

    @pytest.mark.parametrize(
        ("headers", "body", "status"),
        [
            ([(b"content-type", b"application/json; charset=utf-7")], b'{"usernames": ["a"]}', 415),
            ([(b"content-type", b"application/json; charset=UTF-16")], b'{"usernames": ["a"]}', 415),
            ([(b"content-type", b"application/x-www-form-urlencoded")], b'{"usernames": ["a"]}', 415),
            ([(b"content-type", b"text/plain")], b'{"usernames": ["a"]}', 415),
            ([(b"content-type", b"application/json; boundary=x")], b'{"usernames": ["a"]}', 415),
            ([(b"content-type", b"application/json")] * 2, b'{"usernames": ["a"]}', 415),
            ([(b"content-type", b"application/json")], '{"usernames": ["a"]}'.encode("utf-16"), 400),
            ([(b"content-type", b"application/json")], b'\xef\xbb\xbf{"usernames": ["a"]}', 400),
            ([], b'{"usernames": ["a"]}', 415),  # Rack reads an untyped body as a form
            ([(b"content-type", b"application/json")], b'{"usernames": ["a"]}', 200),
            ([(b"content-type", b'Application/JSON ; Charset="UTF-8";')], b'{"usernames": ["a"]}', 200),
            # JSON to quota, and `{` opens a raw deflate block to a gateway that inflates it
            ([_JSON, (b"content-encoding", b"deflate")], b'{"usernames": ["a"]}', 415),
            ([(b"content-encoding", b"GZIP"), _JSON], gzip.compress(b"{}"), 415),
            ([_JSON, (b"content-encoding", b"Identity")], b'{"usernames": ["a"]}', 200),
        ],
    )
    async def test_a_body_is_json_in_utf8_or_it_is_refused(
        self, clock: Clock, headers: list[tuple[bytes, bytes]], body: bytes, status: int
    ) -> None:
        """Catches a counted body the gateway may read as another document: a declared charset
        (a gateway decoding by it), a form or text type or none (one reading fields by type, Rack
        an untyped body as a form), two types, bytes not in UTF-8, or an encoded body (a gateway
        inflating it). Refused before anything is counted; JSON typed as JSON passes."""
        seen: list[str] = []
        async with make_client(MemoryStore(), clock) as client:
            await register(client, FREE, ["o", "a"])
            gid = room_id(await create_room(client, FREE, "chatgroups", "o"), "chatgroups")
            mw = middleware_of(client)
            gateway, mw.app = mw.app, _recording(seen, "path")
            sent = await call_raw(mw, http_scope("POST", f"/{FREE}/chatgroups/{gid}/users", headers=headers), body)
            assert sent[0]["status"] == status, sent
            assert len(seen) == (status == 200)
            mw.app = gateway
            members = await entitlements(client, FREE, group=gid)
            assert members["entities"][f"group:{gid}"]["members_per_group"]["used"] == 1 + (status == 200)

    async def test_a_utf7_body_hides_no_login_from_the_dau_count(self, clock: Clock) -> None:
        """The attack, end to end: behind `quota proxy`, a gateway in aiohttp decodes a body by the
        charset it declares. In UTF-7 `+ACI-` is a quote, so a login naming `alice` to quota named
        another user to the gateway (the last key of a name wins): 101 users a day on free's
        100-DAU plan, quota counting one. Found by the audit of 2026-12-02."""
        import base64

        from aiohttp import web

        logged_in: set[str] = set()

        async def token(request: web.Request) -> web.Response:
            logged_in.add((await request.json())["username"])  # decoded by the declared charset
            return web.json_response({"access_token": "YWMt", "expires_in": 86400})

        utf7 = {"content-type": "application/json; charset=utf-7"}
        async with _behind_proxy_of_aiohttp("/{org}/{app}/token", token, clock) as client:
            for i in range(3):
                quote = base64.b64encode(f'","username":"user{i}","x":"'.encode("utf-16-be")).decode()
                body = '{"username":"alice","x":"+' + quote.rstrip("=") + '-"}'
                r = await client.post("/demo/free/token", content=body, headers=utf7)
                assert r.status_code == 415, r.text
            codes = [
                (await client.post("/demo/free/token", json={"username": f"u{i}"})).status_code for i in range(101)
            ]
        assert logged_in == {f"u{i}" for i in range(100)}
        assert codes == [200] * 100 + [403]

    async def test_connection_drops_no_field_quota_read(self, clock: Clock) -> None:
        """The attack: behind `quota proxy`, `Connection: content-type` asked the proxy to drop the
        type quota checked, and a gateway reading an untyped body as a form (as Rack does) read
        the members hidden in a JSON string: 51 joined, quota counting one. Found by the audit of
        2026-12-02. A Connection naming a field of the message is a 400 that reaches nobody."""
        from urllib.parse import parse_qs

        from aiohttp import web

        joined: list[str] = []

        async def join(request: web.Request) -> web.Response:
            raw = await request.read()
            typed = "Content-Type" in request.headers
            names = json.loads(raw)["usernames"] if typed else parse_qs(raw.decode()).get("usernames", [])
            joined.extend(names)
            return web.json_response({"data": {"newmembers": names}})

        hidden = "&".join(f"usernames=u{i}" for i in range(50))
        body = json.dumps({"usernames": ["alice"], "note": f"&{hidden}&x="})
        async with _behind_proxy_of_aiohttp("/{org}/{app}/chatgroups/{id}/users", join, clock) as client:
            for named in ("keep-alive, Content-Type", "content-encoding", "Host", "content-length, close"):
                headers = {"content-type": "application/json", "connection": named}
                r = await client.post(f"/{FREE}/chatgroups/7/users", content=body, headers=headers)
                assert r.status_code == 400 and "Connection names" in r.text, (named, r.text)
            r = await client.post(
                f"/{FREE}/chatgroups/7/users", content=body, headers={**JSON_TYPE, "connection": "x-a"}
            )
            assert r.status_code == 200, r.text
            assert joined == ["alice"]
            members = await entitlements(client, FREE, group="7")
            assert members["entities"]["group:7"]["members_per_group"]["used"] == 1

    @pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
    async def test_a_number_json_has_not_is_refused(self, store: Any, clock: Clock, constant: bytes) -> None:
        """Catches a body Python reads and JSON does not (RFC 8259 has no NaN): quota would count
        what a strict gateway refuses, or a lenient one reads otherwise. A 400 that reaches nobody."""
        seen: list[str] = []
        async with make_client(store, clock) as client:
            await register(client, FREE, ["o", "a"])
            gid = room_id(await create_room(client, FREE, "chatgroups", "o"), "chatgroups")
            mw = middleware_of(client)
            mw.app = _recording(seen, "path")
            body = b'{"usernames": ["a"], "x": ' + constant + b"}"
            sent = await call_raw(mw, http_scope("POST", f"/{FREE}/chatgroups/{gid}/users"), body)
            assert sent[0]["status"] == 400, sent
            assert b"not a JSON number" in sent[1]["body"]
            assert seen == []

    @pytest.mark.parametrize("kind", ["chatgroups", "chatrooms"])
    async def test_a_create_naming_its_members_is_refused(self, store: Any, clock: Clock, kind: str) -> None:
        """Catches a create's initial members (the vendor's `members`) reaching a gateway that adds
        them: counted nowhere, 101 users joined a free group of 100 at most, each past their own
        groups_per_user. Found by the audit of 2026-12-01. Members join by the member routes."""
        seen: list[str] = []
        async with make_client(store, clock) as client:
            await register(client, FREE, ["o"])
            mw = middleware_of(client)
            gateway, mw.app = mw.app, _recording(seen, "path")
            members = [f"m{i}" for i in range(101)]
            for name in ("members", "Members", "MEMBERS"):
                body = json.dumps({"name": "g", "owner": "o", name: members}).encode()
                sent = await call_raw(mw, http_scope("POST", f"/{FREE}/{kind}"), body)
                assert sent[0]["status"] == 400 and b"members" in sent[1]["body"], (name, sent)
            assert seen == []
            mw.app = gateway
            assert (await client.post(f"/{FREE}/{kind}", json={"name": "g", "owner": "o"})).status_code == 200

    async def test_a_login_creates_no_user(self, store: Any, clock: Clock, config_dir: Path) -> None:
        """Catches the vendor's `inherit` grant with `autoCreateUser` reaching a gateway that makes
        the user it names: a registration counted nowhere, users past registered_users (3 here)
        by logging in. Found by the audit of 2026-12-02. The field is refused in any case and any
        value; a login without it is counted as ever."""
        set_cap(config_dir, "free", registered_users=3)
        seen: list[str] = []
        async with make_client(store, clock, load_config(config_dir)) as client:
            await register(client, FREE, ["u0", "u1", "u2"])
            assert (await client.post(f"/{FREE}/users", json=[{"username": "u3"}])).status_code == 403
            mw = middleware_of(client)
            gateway, mw.app = mw.app, _recording(seen, "path")
            for name, value in (("autoCreateUser", True), ("AUTOCREATEUSER", "true"), ("autocreateuser", False)):
                body = json.dumps({"grant_type": "inherit", "username": "u4", name: value}).encode()
                sent = await call_raw(mw, http_scope("POST", f"/{FREE}/token"), body)
                assert sent[0]["status"] == 400 and b"autoCreateUser" in sent[1]["body"], (name, sent)
            assert seen == []
            mw.app = gateway
            assert (
                await client.post(f"/{FREE}/token", json={"grant_type": "inherit", "username": "u0"})
            ).status_code == 200
            assert (await entitlements(client, FREE))["usage"]["registered_users"]["used"] == 3

    async def test_body_bound_on_a_route_quota_does_not_read(self, store: Any, clock: Clock, config_dir: Path) -> None:
        """Catches max_body_bytes applying only where quota reads the body: a big chunked upload to
        POST /messages/recall reached the upstream whole."""
        (config_dir / "quota.yaml").write_text("max_body_bytes: 1024\n")
        seen = {"bytes": 0}

        async def counting(scope: Any, receive: Any, send: Any) -> None:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                seen["bytes"] += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            await _everything_ok(scope, receive, send)

        async with make_client(store, clock, load_config(config_dir), upstream=counting) as client:

            async def chunks() -> Any:
                for _ in range(1000):
                    yield b"x" * 1000

            r = await client.post(f"/{PRO}/messages/recall", content=chunks())
            assert r.status_code == 413 and r.json()["error"] == "request_too_large"
            assert seen["bytes"] <= 2048
            r = await client.post(f"/{PRO}/messages/recall", content=b"y" * 5000)
            assert r.status_code == 413

    @pytest.mark.parametrize(
        ("version", "headers"),
        [
            ("2", [(b"content-length", b"10")]),  # HTTP/2: the server may not hold a body to its length
            ("1.1", [(b"content-length", b"10"), (b"transfer-encoding", b"chunked")]),  # smuggling both
            ("1.1", [(b"transfer-encoding", b"chunked")]),
            ("1.1", [(b"content-length", b"10"), (b"content-length", b"10")]),  # two lengths: neither
        ],
    )
    async def test_body_not_bounded_by_framing_is_counted(
        self, store: Any, clock: Clock, config_dir: Path, version: str, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """Only an HTTP/1 request with a Content-Length and no Transfer-Encoding has its body bounded
        by the server's parser; every other body is counted as it streams.
        Catches: trusting a declared Content-Length that no parser enforces (5,000 bytes behind a
        declared 10 reaching the upstream past max_body_bytes)."""
        (config_dir / "quota.yaml").write_text("max_body_bytes: 1024\n")
        seen = {"bytes": 0}
        async with make_client(store, clock, load_config(config_dir), upstream=_counting(seen)) as client:
            scope = {**http_scope("POST", f"/{PRO}/messages/users", headers=headers), "http_version": version}
            sent = await call_raw(middleware_of(client), scope, b"z" * 5000)
            assert sent[0]["status"] == 413 and seen["bytes"] == 0

    @pytest.mark.parametrize("mapping", [False, True])
    async def test_framing_is_read_from_every_shape_asgi_allows(
        self, store: Any, clock: Clock, config_dir: Path, mapping: bool
    ) -> None:
        """ASGI gives headers as an iterable of pairs (a server may hand lists) in a scope that is a
        mapping (not always a dict). Catches a request path that reads only dicts of tuples: a
        crash, or a Transfer-Encoding missed and 5,000 bytes behind a declared 10 reaching the upstream."""
        (config_dir / "quota.yaml").write_text("max_body_bytes: 1024\n")
        seen = {"bytes": 0}
        async with make_client(store, clock, load_config(config_dir), upstream=_counting(seen)) as client:
            scope: Any = http_scope("POST", f"/{PRO}/messages/users")
            scope["headers"] = [[b"content-length", b"10"], [b"transfer-encoding", b"chunked"]]
            sent = await call_raw(middleware_of(client), UserDict(scope) if mapping else scope, b"z" * 5000)
            assert sent[0]["status"] == 413 and seen["bytes"] == 0
            scope["headers"] = [[b"content-length", b"4096"]]
            sent = await call_raw(middleware_of(client), UserDict(scope) if mapping else scope)
            assert sent[0]["status"] == 413 and seen["bytes"] == 0
            scope["headers"] = [[b"content-type", b"application/json"]]
            body = b'{"from": "admin", "to": ["u1"], "type": "txt", "body": {"msg": "x"}}'
            sent = await call_raw(middleware_of(client), UserDict(scope) if mapping else scope, body)
            assert sent[0]["status"] == 200 and seen["bytes"] == len(body)

    async def test_create_with_big_body_counts_nothing(self, store: Any, clock: Clock, config_dir: Path) -> None:
        """Catches creates with unbounded bodies (and a slot taken by a refused one)."""
        (config_dir / "quota.yaml").write_text("max_body_bytes: 1024\n")
        async with make_client(store, clock, load_config(config_dir)) as client:
            r = await client.post(f"/{PRO}/chatgroups", content=b'{"owner": "' + b"a" * 5000 + b'"}')
            assert r.status_code == 413
            assert await members(client, "q:{demo#pro}:s:app_groups:o:demo%23pro") == set()

    async def test_long_ids_never_reach_the_store(self, client: httpx.AsyncClient) -> None:
        """Catches 64 KB ids in a path going to the store (Redis busy escaping them in Lua)."""
        mw = client._transport.app  # type: ignore[attr-defined]
        sent = await call_raw(mw, _scope("POST", f"/{PRO}/users/{'a' * 65536}/contacts/users/b"))
        assert sent[0]["status"] == 414
        r = await client.post(f"/{PRO}/users/{'a' * 300}/contacts/users/b")
        assert r.status_code == 400 and r.json()["error"] == "illegal_argument"


class TestCompressedAnswers:
    async def test_gzip_upstream_create_is_counted(self, store: Any, clock: Clock) -> None:
        """Catches a create whose gzipped answer could not be read: the slot was freed, the group
        uncounted."""
        upstream = GZipMiddleware(create_gateway(), minimum_size=0)
        upstream.state = upstream.app.state  # type: ignore[attr-defined]
        async with make_client(store, clock, upstream=upstream) as client:
            await register(client, PRO, ["own"])
            r = await client.post(f"/{PRO}/chatgroups", json={"owner": "own"}, headers={"accept-encoding": "gzip"})
            assert r.status_code == 200
            gid = r.json()["data"]["groupid"]
            assert await members(client, "q:{demo#pro}:s:app_groups:o:demo%23pro") == {gid}

    async def test_upstream_that_always_compresses(self, store: Any, clock: Clock) -> None:
        """Catches quota trusting the upstream to honour a dropped Accept-Encoding: the answer is
        decoded before its id is read."""
        gateway = create_gateway()

        async def always_gzip(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or not scope["path"].endswith("/chatgroups"):
                await gateway(scope, receive, send)
                return
            captured: list[Any] = []

            async def keep(message: Any) -> None:
                captured.append(message)

            await gateway(scope, receive, keep)
            body = gzip.compress(b"".join(m.get("body", b"") for m in captured[1:]))
            headers = [(k, v) for k, v in captured[0]["headers"] if k != b"content-length"]
            headers += [(b"content-encoding", b"gzip"), (b"content-length", str(len(body)).encode())]
            await send({**captured[0], "headers": headers})
            await send({"type": "http.response.body", "body": body})

        always_gzip.state = gateway.state  # type: ignore[attr-defined]
        async with make_client(store, clock, upstream=always_gzip) as client:
            await register(client, PRO, ["own"])
            r = await client.post(f"/{PRO}/chatgroups", json={"owner": "own"})
            gid = r.json()["data"]["groupid"]
            assert await members(client, "q:{demo#pro}:s:app_groups:o:demo%23pro") == {gid}


async def test_invalid_unicode_is_a_400(client: httpx.AsyncClient) -> None:
    """Catches a lone surrogate in a username giving a 500 (Redis's packer) or poisoning the
    gateway's user list (memory)."""
    r = await client.post(f"/{PRO}/users", content=b'{"username": "\\ud800"}', headers=JSON_TYPE)
    assert r.status_code == 400 and r.json()["error"] == "illegal_argument"
    r = await client.post(f"/{PRO}/users", content=b'[{"username": "ok"}, {"username": "\\udfff"}]', headers=JSON_TYPE)
    assert r.status_code == 400
    assert (await client.get(f"/{PRO}/users")).status_code == 200


async def test_exact_rate_from_routes_yaml(store: Any, clock: Clock, config_dir: Path) -> None:
    """Catches `algorithm: exact` being ignored: across a window edge the sliding window admits up
    to about twice the rate; the exact log never more than the rate in any second."""
    routes = config_dir / "routes.yaml"
    doc = read_yaml(routes)
    doc["default_rates"] = [{"rate": "rest_per_ip", "by": "ip", "algorithm": "exact"}]
    write_yaml(routes, doc)
    clock.tick = 0
    clock.now = float(int(clock.now)) + 0.9  # 0.9 s into a second: the worst place for a window edge
    async with make_client(store, clock, load_config(config_dir)) as client:
        passed = 0
        for _ in range(100):
            passed += (await client.get(f"/{PRO}/users")).status_code == 200
        clock.advance(0.2)  # a new clock-aligned second, 0.2 s after the 100 hits
        for _ in range(100):
            passed += (await client.get(f"/{PRO}/users")).status_code == 200
        assert passed == 100
        clock.advance(0.801)  # 1.001 s after the first hits: all of them have left the window
        assert (await client.get(f"/{PRO}/users")).status_code == 200


class TestAuditFindings:
    """Attacks a hostile-client review found after the first hardening, each driven as the attacker did."""

    async def test_remove_and_readd_race_keeps_the_cap(self, store: Any, clock: Clock) -> None:
        """Catches a late removal erasing an add made after the upstream removed: unfriend and
        re-friend at once left a real friendship uncounted, and the cap stopped holding."""
        gateway = create_gateway()
        gate = _Gate(gateway, lambda scope: False)
        async with make_client(store, clock, upstream=gate) as client:
            await register(client, FREE, ["alice", "bob"])
            assert (await client.post(f"/{FREE}/users/alice/contacts/users/bob")).status_code == 200
            gate.holds = lambda scope: scope["method"] == "DELETE"
            unfriend = asyncio.ensure_future(client.delete(f"/{FREE}/users/alice/contacts/users/bob"))
            await asyncio.wait_for(gate.entered.wait(), 10)
            readd = await client.post(f"/{FREE}/users/BOB/contacts/users/alice")
            assert readd.status_code == 409 and readd.json()["error"] == "conflict"
            assert readd.headers["retry-after"] == "1"
            assert readd.json()["error_description"].startswith("a removal of alice is in flight")
            gate.release.set()
            assert (await unfriend).status_code == 200
            gate.holds = lambda scope: False
            assert (await client.post(f"/{FREE}/users/bob/contacts/users/alice")).status_code == 200
            assert await members(client, "q:{demo#free}:s:contacts:o:alice") == {"bob"}
            assert gateway_state(client, FREE).contacts["alice"] == {"bob"}

    async def test_a_removal_in_flight_blocks_only_what_it_removes(self, store: Any, clock: Clock) -> None:
        """An unfriend in flight blocks re-adding that pair, not the same users' other friends; a group's
        deletion blocks joins of that group, not of another; a user's deletion blocks that user's
        joins, not another user's.
        Catches: a tombstone of the wrong shape (a whole list for one pair, the wrong side of a
        relation), which turns every add near a removal into a 409."""
        gateway = create_gateway()
        gate = _Gate(gateway, lambda scope: False)
        async with make_client(store, clock, upstream=gate) as client:
            await register(client, PRO, ["alice", "bob", "carol", "dave", "own", "u", "v"])
            assert (await client.post(f"/{PRO}/users/alice/contacts/users/bob")).status_code == 200
            g1 = room_id(await create_room(client, PRO, "chatgroups", "own"), "chatgroups")
            g2 = room_id(await create_room(client, PRO, "chatgroups", "own"), "chatgroups")
            assert (await client.post(f"/{PRO}/chatgroups/{g1}/users/u")).status_code == 200

            async def held(path: str, checks: list[tuple[str, int]]) -> None:
                gate.entered.clear()
                gate.release.clear()
                gate.holds = lambda scope: scope["method"] == "DELETE"
                removal = asyncio.ensure_future(client.delete(path))
                await asyncio.wait_for(gate.entered.wait(), 10)
                gate.holds = lambda scope: False
                for add, status in checks:
                    assert (await client.post(add)).status_code == status, (path, add)
                gate.release.set()
                assert (await removal).status_code == 200, path

            # Named from the later name (bob, alice): the pair is one whichever side names it.
            await held(
                f"/{PRO}/users/bob/contacts/users/alice",
                [
                    (f"/{PRO}/users/alice/contacts/users/bob", 409),
                    (f"/{PRO}/users/alice/contacts/users/carol", 200),
                    (f"/{PRO}/users/dave/contacts/users/bob", 200),
                ],
            )
            await held(
                f"/{PRO}/chatgroups/{g1}",
                [(f"/{PRO}/chatgroups/{g1}/users/v", 409), (f"/{PRO}/chatgroups/{g2}/users/v", 200)],
            )
            await held(
                f"/{PRO}/users/u",
                [
                    (f"/{PRO}/chatgroups/{g2}/users/u", 409),
                    (f"/{PRO}/users/v/contacts/users/u", 409),  # friends: u on either side of the pair
                    (f"/{PRO}/users/carol/contacts/users/u", 409),
                    (f"/{PRO}/users/u/contacts/users/carol", 409),  # u naming the pair itself
                    (f"/{PRO}/chatgroups/{g2}/users/alice", 200),
                    (f"/{PRO}/users/v/contacts/users/carol", 200),
                ],
            )

    async def test_a_users_deletion_waits_for_a_friend_add_naming_them(self, store: Any, clock: Clock) -> None:
        """Friends are symmetric: deleting u drops u's whole list, so it waits for a friend add in
        flight that names u on either side of the pair ("carol|u": u on the right).
        Catches: a drop that looks for its owner only on the left of a symmetric pair (the deletion
        passes, then the add lands: a friendship with a deleted user, counted on carol's side)."""
        gateway = create_gateway()
        gate = _Gate(gateway, lambda scope: False)
        async with make_client(store, clock, upstream=gate) as client:
            await register(client, PRO, ["carol", "u"])
            gate.holds = lambda scope: scope["method"] == "POST" and "/contacts/" in scope["path"]
            adding = asyncio.ensure_future(client.post(f"/{PRO}/users/carol/contacts/users/u"))
            await asyncio.wait_for(gate.entered.wait(), 10)
            gate.holds = lambda scope: False
            assert (await client.delete(f"/{PRO}/users/u")).status_code == 409
            gate.release.set()
            assert (await adding).status_code == 200
            assert (await client.delete(f"/{PRO}/users/u")).status_code == 200

    async def test_failed_removal_lifts_its_tombstone(self, store: Any, clock: Clock) -> None:
        """Catches a removal refused upstream leaving its pair blocked (adds refused for ever)."""
        async with make_client(store, clock) as client:
            await register(client, FREE, ["alice", "bob"])
            r = await client.delete(f"/{FREE}/users/alice/contacts/users/bob")  # not friends: 404
            assert r.status_code == 404
            assert (await client.post(f"/{FREE}/users/alice/contacts/users/bob")).status_code == 200

    async def test_user_deletion_in_flight_blocks_joins(self, store: Any, clock: Clock) -> None:
        """Catches a user's deletion (which drops every room they joined) racing a join of that user:
        the late drop must not erase a join the gateway made after it."""
        gateway = create_gateway()
        gate = _Gate(gateway, lambda scope: False)
        async with make_client(store, clock, upstream=gate) as client:
            await register(client, PRO, ["own", "u"])
            rid = room_id(await create_room(client, PRO, "chatgroups", "own"), "chatgroups")
            gate.holds = lambda scope: scope["method"] == "DELETE"
            deletion = asyncio.ensure_future(client.delete(f"/{PRO}/users/u"))
            await asyncio.wait_for(gate.entered.wait(), 10)
            assert (await client.post(f"/{PRO}/chatgroups/{rid}/users/u")).status_code == 409
            gate.release.set()
            assert (await deletion).status_code == 200
            assert await members(client, f"q:{{demo#pro}}:s:group_members:o:{rid}") == {"own"}

    @pytest.mark.parametrize(
        "path",
        ["/demo/free/chatgroups/1/users/.", "/demo/free/users/../users", "/demo/free/users/a%2Fb"],
    )
    async def test_dot_segments_and_encoded_slashes(self, client: httpx.AsyncClient, path: str) -> None:
        """Catches paths an RFC 3986 normaliser routes elsewhere than quota matched (a batch join
        counted as one member called '.')."""
        mw = client._transport.app  # type: ignore[attr-defined]
        scope = http_scope("POST", path.replace("%2F", "/"), raw_path=path.encode())
        sent = await call_raw(mw, scope, b'{"usernames": ["a"]}')
        assert sent[0]["status"] == 400

    @pytest.mark.parametrize(
        ("path", "raw"),
        [
            ("/demo/free/messages/translate#x", b"/demo/free/messages/translate#x"),  # as h11 passes it on
            ("/demo/free/messages/translate;jsessionid=1", b"/demo/free/messages/translate;jsessionid=1"),
            ("/demo/free/messages/translate?x", b"/demo/free/messages/translate%3Fx"),
            ("/demo/free/messages/translate#x", b"/demo/free/messages/translate%23x"),
            ("/demo/free/messages/translate\x00", b"/demo/free/messages/translate%00"),
            ("/demo/free/messages/translate ", b"/demo/free/messages/translate%20"),
            ("/demo/free/messages/translate\t", b"/demo/free/messages/translate%09"),
        ],
    )
    async def test_a_path_a_server_cuts_short_is_refused(
        self, client: httpx.AsyncClient, path: str, raw: bytes
    ) -> None:
        """Catches a segment quota reads whole and a gateway's server cuts (a fragment an h11 server
        passes on, a matrix parameter Tomcat strips, NUL, a trimmed space): quota matched an
        unknown path under the prefix gate, the gateway ran free's translation. Found by the
        audit of 2026-12-02 (`#`)."""
        seen: list[str] = []
        mw = client._transport.app  # type: ignore[attr-defined]
        gateway, mw.app = mw.app, _recording(seen, "path")
        sent = await call_raw(mw, http_scope("POST", path, raw_path=raw), b"{}")
        assert sent[0]["status"] == 400 and b"#, ?, ;" in sent[1]["body"], sent
        assert seen == []
        mw.app = gateway

    async def test_room_ids_have_one_spelling(self, client: httpx.AsyncClient) -> None:
        """Catches 7, 07 and 0007 being three counters for one group of a gateway that parses numbers."""
        await register(client, PRO, ["u"])
        assert (await client.post(f"/{PRO}/chatgroups/07/users/u")).status_code == 400

    async def test_huge_content_length_is_413(self, client: httpx.AsyncClient) -> None:
        """Catches int() of a 4,400-digit Content-Length raising (a 500 and a traceback per request)."""
        mw = client._transport.app  # type: ignore[attr-defined]
        sent = await call_raw(mw, _scope("POST", f"/{PRO}/messages/users", [(b"content-length", b"9" * 4400)]))
        assert sent[0]["status"] == 413

    async def test_ipv4_mapped_peer_meets_an_ipv4_allowlist(self, store: Any, clock: Clock, config_dir: Path) -> None:
        """Catches a dual-stack peer (::ffff:a.b.c.d) refused by an allowlist of its IPv4 network."""
        accounts = config_dir / "accounts.yaml"
        doc = read_yaml(accounts)
        doc["accounts"]["demo-pro"]["ip_allowlist"] = ["10.0.0.0/8"]
        write_yaml(accounts, doc)
        async with make_client(store, clock, load_config(config_dir), client_ip="::ffff:10.1.2.3") as client:
            assert (await client.get(f"/{PRO}/users")).status_code == 200


async def test_cancelled_probe_does_not_jam_the_breaker(clock: Clock) -> None:
    """Catches a half-open probe whose task is cancelled mid-call leaving the breaker refusing every
    store call for ever (rates skipped, counted routes 503) until a restart."""
    from quota.errors import StorageError
    from quota.store.memory import MemoryStore

    class Faulty(MemoryStore):
        """A real memory store behind a switch: down (raises) or stalled (never answers)."""

        mode = "up"
        stalled = asyncio.Event()

        async def run(self, program: Any, now_ms: int, dry: bool = False) -> Any:
            if self.mode == "down":
                raise StorageError("down")
            if self.mode == "stalled":
                self.stalled.set()
                await asyncio.Event().wait()
            return await super().run(program, now_ms, dry)

    store = Faulty()
    breaker_now = [0.0]
    async with make_client(store, clock) as client:
        mw = client._transport.app  # type: ignore[attr-defined]
        mw.guard.breaker.clock = lambda: breaker_now[0]
        await register(client, PRO, ["a", "b"])
        store.mode = "down"
        for _ in range(3):
            await client.post(f"/{PRO}/users/a/contacts/users/b")
        assert mw.guard.breaker.state == "open"
        breaker_now[0] += 1.0  # half-open: the next store call is the probe
        store.mode = "stalled"
        probe = asyncio.ensure_future(client.post(f"/{PRO}/users/a/contacts/users/b"))
        await asyncio.wait_for(store.stalled.wait(), 10)  # the probe is inside the store call
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        store.mode = "up"
        breaker_now[0] += 1.0
        assert (await client.post(f"/{PRO}/users/a/contacts/users/b")).status_code == 200
        assert mw.guard.breaker.state == "closed"


async def test_bind_lost_to_a_blip_is_retried(clock: Clock) -> None:
    """Catches a create counted by nobody when the store missed its bind: the slot expired, the
    group existed upstream, and the next create took its place."""

    store = SwitchedStore()
    gateway = create_gateway()
    gate = _Gate(gateway, lambda scope: False)
    async with make_client(store, clock, upstream=gate) as client:
        await register(client, PRO, ["own"])
        gate.holds = lambda scope: scope["path"].endswith("/chatgroups")
        create = asyncio.ensure_future(create_room(client, PRO, "chatgroups", "own"))
        await asyncio.wait_for(gate.entered.wait(), 10)
        store.down = True
        gate.release.set()
        answer = await create
        assert answer.status_code == 200
        gid = room_id(answer, "chatgroups")
        store.down = False
        deadline = asyncio.get_running_loop().time() + 10
        while gid not in await members(client, "q:{demo#pro}:s:app_groups:o:demo%23pro"):
            assert asyncio.get_running_loop().time() < deadline, "the bind was never retried"
            await asyncio.sleep(0.05)


async def test_client_gone_after_a_2xx_keeps_the_add(store: Any, clock: Clock) -> None:
    """Catches an add undone because the client left while a 2xx answer streamed: the upstream made
    the change, so quota must keep counting it."""
    async with make_client(store, clock) as client:
        await register(client, PRO, ["alice", "bob"])
        mw = client._transport.app  # type: ignore[attr-defined]

        async def receive() -> Any:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            if message["type"] == "http.response.body":
                raise OSError("the client went away")

        with pytest.raises(OSError):
            await mw(_scope("POST", f"/{PRO}/users/alice/contacts/users/bob"), receive, send)
        assert gateway_state(client, PRO).contacts["alice"] == {"bob"}
        assert await members(client, "q:{demo#pro}:s:contacts:o:alice") == {"bob"}


class _HeldDrains:
    """The test's store: everything passes through, except that the first program made only of drain
    slices of a chosen relation waits until the test lets it go. On Redis every later slice is its own
    script, so other requests' scripts run between the drop and the rest of the drain anyway: the hold
    only fixes which request lands in that gap."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.relation: str | None = None
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def run(self, program: Any, now_ms: int, dry: bool = False) -> Any:
        from quota.store.program import DrainOp

        rel, ops = self.relation, program.ops
        if rel and ops and all(isinstance(op, DrainOp) and f":s:{rel}:" in op.reverse_prefix for op in ops):
            self.relation = None
            self.held.set()
            await self.release.wait()
        return await self.inner.run(program, now_ms, dry)


class TestDrains:
    """Found by the audit of 2026-11-30: a deletion dropped a user's sets and cleared its tombstones in
    one script, then took the user out of each friend's list and room in later scripts. A re-add in
    between found the user still there (not drained yet), counted nothing, and the drain then took it
    out: the gateway held the friendship or membership, quota counted neither side."""

    async def test_a_friend_readded_while_a_users_deletion_drains(
        self, store: Any, clock: Clock, config_dir: Path
    ) -> None:
        """Catches tombstones lifted before the drain: a re-registration and a re-add must wait (409)
        until the deleted user is out of every list, and then count; friends_per_user (1) holds."""
        set_cap(config_dir, "free", friends_per_user=1)
        held = _HeldDrains(store)
        async with make_client(held, clock, load_config(config_dir)) as client:
            await register(client, FREE, ["f", "u", "x"])
            assert (await client.post(f"/{FREE}/users/f/contacts/users/u")).status_code == 200
            held.relation = "contacts"
            deletion = asyncio.ensure_future(client.delete(f"/{FREE}/users/u"))
            await asyncio.wait_for(held.held.wait(), 10)
            again = await client.post(f"/{FREE}/users", json={"username": "u"})
            assert again.status_code == 409 and again.json()["error"] == "conflict", again.text
            early = await client.post(f"/{FREE}/users/f/contacts/users/u")
            assert early.status_code == 409 and early.json()["error"] == "conflict", early.text
            held.release.set()
            assert (await deletion).status_code == 200
            await register(client, FREE, ["u"])
            assert (await client.post(f"/{FREE}/users/f/contacts/users/u")).status_code == 200
            over = await client.post(f"/{FREE}/users/f/contacts/users/x")
            assert over.status_code == 403 and over.json()["limit"] == "friends_per_user", over.text
            assert gateway_state(client, FREE).contacts["f"] == {"u"}
            assert await members(client, "q:{demo#free}:s:contacts:o:f") == {"u"}

    async def test_a_member_rejoining_while_a_users_deletion_drains(
        self, store: Any, clock: Clock, config_dir: Path
    ) -> None:
        """The same race on a group: members_per_group (2: the owner and one) holds."""
        set_cap(config_dir, "free", members_per_group=2)
        held = _HeldDrains(store)
        async with make_client(held, clock, load_config(config_dir)) as client:
            await register(client, FREE, ["own", "u", "v"])
            gid = room_id(await create_room(client, FREE, "chatgroups", "own"), "chatgroups")
            assert (await client.post(f"/{FREE}/chatgroups/{gid}/users/u")).status_code == 200
            held.relation = "group_members"
            deletion = asyncio.ensure_future(client.delete(f"/{FREE}/users/u"))
            await asyncio.wait_for(held.held.wait(), 10)
            assert (await client.post(f"/{FREE}/chatgroups/{gid}/users/u")).status_code == 409
            held.release.set()
            assert (await deletion).status_code == 200
            await register(client, FREE, ["u"])
            assert (await client.post(f"/{FREE}/chatgroups/{gid}/users/u")).status_code == 200
            over = await client.post(f"/{FREE}/chatgroups/{gid}/users/v")
            assert over.status_code == 403 and over.json()["limit"] == "members_per_group", over.text
            assert gateway_state(client, FREE).groups[gid]["members"] == {"own", "u"}
            assert await members(client, f"q:{{demo#free}}:s:group_members:o:{gid}") == {"own", "u"}

    async def test_a_deletion_cancelled_mid_drain_still_lifts_its_tombstones(
        self, store: Any, clock: Clock, config_dir: Path
    ) -> None:
        """Catches a 409 that outlives its removal (audit of 2026-11-30): a deletion whose request
        was cancelled while its drain ran (a server that cancels on disconnect, a shutdown) never
        lifted its tombstones, and every add naming the user was refused until they lapsed."""
        held = _HeldDrains(store)
        async with make_client(held, clock, load_config(config_dir)) as client:
            await register(client, FREE, ["u", "f"])
            assert (await client.post(f"/{FREE}/users/f/contacts/users/u")).status_code == 200
            held.relation = "contacts"
            deletion = asyncio.ensure_future(client.delete(f"/{FREE}/users/u"))
            await asyncio.wait_for(held.held.wait(), 10)
            deletion.cancel()
            await asyncio.gather(deletion, return_exceptions=True)
            held.release.set()
            await asyncio.sleep(0.2)
            again = await client.post(f"/{FREE}/users", json={"username": "u"})
            assert again.status_code == 200, again.text

    async def test_a_batch_deletion_holds_its_users_until_drained(
        self, store: Any, clock: Clock, config_dir: Path
    ) -> None:
        """Catches the drain of a batch deletion (its users named only by the answer, so no tombstone
        before the upstream call) left open to re-adds: a set of up to a slice leaves every friend's
        list in the script that drops it, which also marks the user; a re-add waits (409) until the
        drain is done, then counts, and the cap holds."""
        set_cap(config_dir, "free", friends_per_user=1)
        held = _HeldDrains(store)
        async with make_client(held, clock, load_config(config_dir)) as client:
            await register(client, FREE, ["u", "f", "x"])  # u is the oldest: the batch deletes it
            assert (await client.post(f"/{FREE}/users/f/contacts/users/u")).status_code == 200
            held.relation = "contacts"
            deletion = asyncio.ensure_future(client.delete(f"/{FREE}/users", params={"limit": "1"}))
            await asyncio.wait_for(held.held.wait(), 10)
            assert await members(client, "q:{demo#free}:s:contacts:o:f") == set()
            await register(client, FREE, ["u"])
            early = await client.post(f"/{FREE}/users/f/contacts/users/u")
            assert early.status_code == 409 and early.json()["error"] == "conflict", early.text
            held.release.set()
            gone = await deletion
            assert gone.status_code == 200 and [e["username"] for e in gone.json()["entities"]] == ["u"]
            assert (await client.post(f"/{FREE}/users/f/contacts/users/u")).status_code == 200
            over = await client.post(f"/{FREE}/users/f/contacts/users/x")
            assert over.status_code == 403 and over.json()["limit"] == "friends_per_user", over.text
            assert gateway_state(client, FREE).contacts["f"] == {"u"}
            assert await members(client, "q:{demo#free}:s:contacts:o:f") == {"u"}

    async def test_a_batch_deletion_of_a_user_past_one_slice(self, store: Any, clock: Clock, config_dir: Path) -> None:
        """Catches the gap between the slices of a batch deletion (its user named only by the
        answer, so no tombstone was written before the upstream call): a friend still holding the
        deleted user when the first slice ran could re-add it then, count nothing, and lose it to
        the next slice. The drop now writes the tombstone itself: the re-add waits (409)."""
        set_cap(config_dir, "free", friends_per_user=201)
        held = _HeldDrains(store)
        async with make_client(held, clock, load_config(config_dir)) as client:
            await _befriend_many(client)
            held.relation = "contacts"
            deletion = asyncio.ensure_future(client.delete(f"/{FREE}/users", params={"limit": "1"}))
            await asyncio.wait_for(held.held.wait(), 10)
            left = await _still_friends(client)
            assert len(left) == 1, left  # one slice of 200 went with the drop
            await register(client, FREE, ["u"])
            early = await client.post(f"/{FREE}/users/{left[0]}/contacts/users/u")
            assert early.status_code == 409 and early.json()["error"] == "conflict", early.text
            held.release.set()
            assert (await deletion).status_code == 200
            assert (await client.post(f"/{FREE}/users/{left[0]}/contacts/users/u")).status_code == 200
            assert gateway_state(client, FREE).contacts[left[0]] == {"u"}
            assert await members(client, f"q:{{demo#free}}:s:contacts:o:{left[0]}") == {"u"}
            assert await members(client, "q:{demo#free}:s:contacts:o:u") == {left[0]}

    async def test_a_slow_batch_deletion_marks_its_users_from_its_answer(
        self, store: Any, clock: Clock, config_dir: Path
    ) -> None:
        """Catches the mark written by the request's start clock (audit of 2026-12-01): a gateway
        that answered after reservation_ttl_s got a mark already lapsed, purged by the next add,
        and the re-add between slices counted nothing and lost its friend to the next slice."""
        set_cap(config_dir, "free", friends_per_user=201)
        held = _HeldDrains(store)
        gate = _Gate(create_gateway(), lambda scope: False)
        async with make_client(held, clock, load_config(config_dir), upstream=gate) as client:
            await _befriend_many(client)
            held.relation = "contacts"
            gate.holds = lambda s: s["method"] == "DELETE" and s["path"].endswith("/users")
            deletion = asyncio.ensure_future(client.delete(f"/{FREE}/users", params={"limit": "1"}))
            await asyncio.wait_for(gate.entered.wait(), 10)
            clock.advance(61)  # the gateway answers after reservation_ttl_s (60 s)
            gate.holds = lambda s: False
            gate.release.set()
            await asyncio.wait_for(held.held.wait(), 10)
            left = await _still_friends(client)
            assert len(left) == 1, left
            await register(client, FREE, ["u"])
            early = await client.post(f"/{FREE}/users/{left[0]}/contacts/users/u")
            held.release.set()
            assert (await deletion).status_code == 200
            assert early.status_code == 409, early.text

    async def test_a_batch_deletions_mark_is_renewed_while_it_drains(
        self, store: Any, clock: Clock, config_dir: Path
    ) -> None:
        """Catches the mark left to lapse (audit of 2026-12-01): a batch deletion had nothing held
        before its upstream call, so its plan was never given to the renewals, and the mark
        outlived the request by reservation_ttl_s at most, however long its drain took."""
        set_cap(config_dir, "free", friends_per_user=201)
        (config_dir / "quota.yaml").write_text("reservation_ttl_s: 1\n")
        held = _HeldDrains(store)
        async with make_client(held, clock, load_config(config_dir)) as client:
            await _befriend_many(client)
            held.relation = "contacts"
            deletion = asyncio.ensure_future(client.delete(f"/{FREE}/users", params={"limit": "1"}))
            await asyncio.wait_for(held.held.wait(), 10)
            due = "q:{demo#free}:s:contacts:inflight:due"
            first = (await raw_deadlines(store, due))["xo:u"]
            clock.advance(0.9)
            loop = asyncio.get_running_loop()
            until, renewed = loop.time() + 3, False
            while loop.time() < until and not renewed:
                renewed = (await raw_deadlines(store, due)).get("xo:u", 0) > first + 500
                await asyncio.sleep(0.05)
            held.release.set()
            assert (await deletion).status_code == 200
            assert renewed, "the batch deletion's mark was never renewed while its drain was held"

    async def test_a_mark_never_written_is_never_cleared(self, store: Any, clock: Clock) -> None:
        """Catches a clear without its mark (audit of 2026-12-01): when the settlement that writes a
        batch deletion's marks failed, their clears went out anyway, and a clear is a count down:
        it took the tombstone of a single deletion of the same user still in flight."""
        gate = _Gate(create_gateway(), lambda scope: False)
        async with make_client(_FailsMarks(store), clock, upstream=gate) as client:
            await register(client, FREE, ["u", "f"])
            assert (await client.post(f"/{FREE}/users/u/contacts/users/f")).status_code == 200
            gate.holds = lambda s: s["method"] == "DELETE" and s["path"].endswith("/users/u")
            single = asyncio.ensure_future(client.delete(f"/{FREE}/users/u"))
            await asyncio.wait_for(gate.entered.wait(), 10)
            inflight = "q:{demo#free}:s:contacts:inflight"
            assert (await raw_hash(store, inflight)).get("xo:u") == 1  # the single deletion's tombstone
            batch = await client.delete(f"/{FREE}/users", params={"limit": "1"})
            assert batch.status_code == 200 and [e["username"] for e in batch.json()["entities"]] == ["u"]
            still = (await raw_hash(store, inflight)).get("xo:u")
            gate.release.set()
            await single
            assert still == 1, f"the single deletion (still in flight) lost its tombstone: xo:u = {still}"


MANY_FRIENDS = [f"f{i:03d}" for i in range(201)]


async def _befriend_many(client: httpx.AsyncClient) -> None:
    """u (the oldest user, the one a batch deletion of one takes) with a friend past one drain slice."""
    await register(client, FREE, ["u", *MANY_FRIENDS])
    for f in MANY_FRIENDS:
        assert (await client.post(f"/{FREE}/users/u/contacts/users/{f}")).status_code == 200


async def _still_friends(client: httpx.AsyncClient) -> list[str]:
    return [f for f in MANY_FRIENDS if "u" in await members(client, f"q:{{demo#free}}:s:contacts:o:{f}")]


class _FailsMarks:
    """The test's store: the settlement carrying a batch deletion's marks fails, as a refused
    connection would (its script never ran); everything else passes through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def run(self, program: Any, now_ms: int, dry: bool = False) -> Any:
        if any(isinstance(op, TombstoneOp) and not op.checked for op in program.ops):
            raise StorageError("redis: ConnectionError: connection refused")
        return await self.inner.run(program, now_ms, dry)


async def test_a_create_body_nested_past_the_parser_is_a_400(client: httpx.AsyncClient) -> None:
    """Catches a 500 (and a traceback) from the reference gateway on a create whose body nests deeper
    than the JSON parser goes: quota forwards a create's body unparsed (the id comes from the
    answer), so the gateway meets it; the reserved slot is undone either way."""
    r = await client.post(f"/{PRO}/chatgroups", content=b"[" * 100_000, headers=JSON_TYPE)
    assert r.status_code == 400 and r.json()["error"] == "illegal_argument", r.text
    assert await members(client, "q:{demo#pro}:s:app_groups:o:demo%23pro") == set()


def _recording(seen: list[str], field: str) -> Any:
    """An upstream that notes each request's `field` of its scope and answers 200."""

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope[field])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return upstream


class TestPathsAGatewayReadsDifferently:
    """Found by the audit of 2026-11-30: nginx (in front of many gateways) merges slashes and removes
    dot segments. `/demo//free/...` was a path under no app here (the fallback rate only) and
    demo#free's there; a WebSocket path skipped the dot-segment check HTTP had."""

    async def test_an_empty_segment_is_refused(self, store: Any, clock: Clock) -> None:
        """Catches a path with an empty segment reaching the upstream: translation is not in free's
        plan, and `/demo//free/messages/translate` must not get it by the back door."""
        seen: list[str] = []
        async with make_client(store, clock, upstream=_recording(seen, "path")) as client:
            mw = middleware_of(client)
            for path in ("/demo//free/messages/translate", "//demo/free/messages/translate", "/demo/free//users"):
                sent = await call_raw(mw, http_scope("POST", path), b"{}")
                assert sent[0]["status"] == 400, path
            assert seen == []

    @pytest.mark.parametrize(
        ("path", "raw"),
        [
            # A WHATWG URL parser (Node's `new URL`, Deno, Bun) reads a backslash as a slash: one
            # segment here, so a path under no app (the fallback rate only), demo#free's there.
            ("/demo\\free\\messages\\translate", "/demo\\free\\messages\\translate"),
            ("/demo/free\\messages/translate", "/demo/free%5Cmessages/translate"),
            # Encoded twice: a gateway that decodes twice reads a slash.
            ("/demo%2Ffree/messages/translate", "/demo%252Ffree/messages/translate"),
            # The target `http:/demo/...`, as an h11 server passes it on: under no app here, the
            # path /demo/... to a gateway that parses the target as a URL (Go's net/http).
            ("http:/demo/free/messages/translate", "http:/demo/free/messages/translate"),
        ],
    )
    async def test_a_backslash_or_a_percent_left_is_refused(
        self, store: Any, clock: Clock, path: str, raw: str
    ) -> None:
        """Catches the free app's translation (not in its plan) reached through a path quota reads
        as under no app: the audit of 2026-12-01 showed the reference gateway, behind a WHATWG URL
        parser, run it for `/demo\\free\\messages\\translate`."""
        seen: list[str] = []
        async with make_client(store, clock, upstream=_recording(seen, "path")) as client:
            mw = middleware_of(client)
            sent = await call_raw(mw, http_scope("POST", path, raw_path=raw.encode()), b"{}")
            assert sent[0]["status"] == 400, (path, sent)
            assert seen == []

    @pytest.mark.parametrize("hour", ["202611105", "20261110５", "202611100５"])
    async def test_a_history_hour_is_ten_digits(self, client: httpx.AsyncClient, hour: str) -> None:
        """Catches an hour quota reads one way and a gateway another: strptime took `202611105` as
        Nov 10, 05h (inside the retention), where a lenient parser may read Jan 11, older than the
        plan keeps."""
        r = await client.get(f"/{PRO}/chatmessages/{hour}")
        assert r.status_code == 400 and "yyyyMMddHH" in r.json()["error_description"], r.text

    async def test_a_websocket_path_read_otherwise_is_refused(self, store: Any, clock: Clock) -> None:
        """Catches a connection past online_users and the login count: over WebSocket,
        `/a//../demo/free/users/bob/connection` was a path under no app, passed to a gateway that
        serves it, after normalising, as bob's connection; so was the path with backslashes for
        slashes, bob's to a WHATWG-URL gateway (the audit of 2026-12-01)."""
        from tests.test_sockets import Socket

        opened: list[str] = []

        async def upstream(scope: Any, receive: Any, send: Any) -> None:
            opened.append(scope["path"])
            await receive()
            await send({"type": "websocket.accept"})

        async with make_client(store, clock, upstream=upstream) as client:
            mw = middleware_of(client)
            for path in (
                "/a//../demo/free/users/bob/connection",
                "/x/../demo/free/users/bob/connection",
                "/demo\\free\\users\\bob\\connection",
                "http:/demo/free/users/bob/connection",
            ):
                answer = await Socket(mw, path).open()
                assert answer["type"] == "websocket.close", (path, answer)
            assert opened == []

    async def test_an_http_request_never_takes_a_connection_lease(self, store: Any, clock: Clock) -> None:
        """Catches a plain HTTP request naming the method WEBSOCKET: it matched the connection
        route, took an online slot (and counted a login) with no connection behind it, held until
        the lease lapsed. A connection route is served to WebSocket connections only."""
        seen: list[str] = []
        async with make_client(store, clock, upstream=_recording(seen, "method")) as client:
            for method in ("WEBSOCKET", "websocket"):
                r = await client.request(method, "/demo/free/users/bob/connection")
                assert r.status_code == 404 and r.json()["error"] == "service_resource_not_found", (method, r.text)
            assert seen == []
            assert await raw_deadlines(store, "q:{demo#free}:online") == {}


async def test_a_history_export_on_each_side_of_a_minute_edge(store: Any, clock: Clock) -> None:
    """Catches "once a minute per app" walked past across a window edge: with a sliding window and a
    limit of 1, the previous window's weighted count rounded down to nothing, so an export at :59.9
    and another at :00.1 both passed (the suite met it whenever it ran in a minute's last second)."""
    from datetime import UTC, datetime, timedelta

    clock.tick = 0
    clock.now = (int(clock.now // 60) + 1) * 60 - 0.1
    hour = (datetime.fromtimestamp(clock.now, UTC) - timedelta(hours=2)).strftime("%Y%m%d%H")
    async with make_client(store, clock) as client:
        assert (await client.get(f"/{PRO}/chatmessages/{hour}")).status_code == 200
        clock.advance(0.2)
        again = await client.get(f"/{PRO}/chatmessages/{hour}")
        assert again.status_code == 429 and again.json()["limit"] == "history_export_per_app", again.text
        assert 59 <= int(again.headers["retry-after"]) <= 61
        clock.advance(60)
        assert (await client.get(f"/{PRO}/chatmessages/{hour}")).status_code == 200


class TestMessageSends:
    """A send is held to the app's messages, one per recipient (reference: 6,000 a minute to users,
    at most 600 a call; 100 a second to chatrooms, at most 10 a call), not only to its calls."""

    @staticmethod
    def _send(recipients: list[str]) -> dict[str, Any]:
        return {"from": "admin", "to": recipients, "type": "txt", "body": {"msg": "x"}}

    async def test_each_recipient_of_a_user_send_is_a_message(self, store: Any, clock: Clock) -> None:
        """Catches the send counted as one call: seven calls of 1,000 recipients in a second sent
        7,000 messages against 6,000 a minute, each call past the 600 allowed."""
        clock.tick = 0
        clock.now = float(int(clock.now // 60) * 60)  # the start of a minute: one window holds it all
        async with make_client(store, clock) as client:
            over = await client.post(f"/{FREE}/messages/users", json=self._send([f"u{i}" for i in range(601)]))
            assert over.status_code == 400 and over.json()["error"] == "illegal_argument", over.text
            assert "at most 600" in over.json()["error_description"]
            batch = [f"u{i}" for i in range(600)]
            for n in range(10):
                r = await client.post(f"/{FREE}/messages/users", json=self._send(batch))
                assert r.status_code == 200, (n, r.text)
            # The 400 above counted nothing; 6,000 messages are spent, and one more is refused.
            refused = await client.post(f"/{FREE}/messages/users", json=self._send(["u1"]))
            assert refused.status_code == 429 and refused.json()["limit"] == "6000/60s", refused.text
            assert int(refused.headers["retry-after"]) >= 1
            clock.advance(120)
            assert (await client.post(f"/{FREE}/messages/users", json=self._send(batch))).status_code == 200

    async def test_a_refused_big_send_does_not_refuse_a_small_one_that_fits(self, store: Any, clock: Clock) -> None:
        """Catches the deny cache (quota/denials.py) keeping a refusal for any call of its rate:
        refused 600 recipients, an app could send to no one until all 600 would fit, though the
        store admitted one recipient at once. Found by the audit of 2026-12-01."""
        clock.tick = 0
        clock.now = float(int(clock.now // 60) * 60)
        batch = [f"u{i}" for i in range(600)]
        async with make_client(store, clock) as client:
            for _ in range(10):
                assert (await client.post(f"/{FREE}/messages/users", json=self._send(batch))).status_code == 200
            clock.advance(61)  # the next minute, 1 s in: 5,900 of 6,000 still weigh, room for 100
            for n in range(3):
                big = await client.post(f"/{FREE}/messages/users", json=self._send(batch))
                assert big.status_code == 429, big.text
                small = await client.post(f"/{FREE}/messages/users", json=self._send([f"u{n}"]))
                assert small.status_code == 200, (n, small.text)
            # A refusal still speaks for the calls it covers: as many recipients, or more.
            assert (await client.post(f"/{FREE}/messages/users", json=self._send(batch))).status_code == 429

    @pytest.mark.parametrize("to", ["u1,u2,u3", ["u1", "u2,u3"]])
    async def test_a_comma_never_splits_a_recipient(self, store: Any, clock: Clock, to: Any) -> None:
        """Catches `"to": "u1,u2,u3"` counted as one message where a gateway that splits on commas
        sends three (no recipient id holds a comma). Found by the audit of 2026-12-01."""
        seen: list[str] = []
        async with make_client(store, clock) as client:
            mw = middleware_of(client)
            mw.app = _recording(seen, "path")
            body = json.dumps({"from": "admin", "to": to, "type": "txt", "body": {"msg": "x"}}).encode()
            sent = await call_raw(mw, http_scope("POST", f"/{FREE}/messages/users"), body)
            assert sent[0]["status"] == 400 and b"comma" in sent[1]["body"], sent
            assert seen == []

    async def test_recipients_named_twice_and_clients_spread_do_not_dilute_it(self, store: Any, clock: Clock) -> None:
        """Catches recipients counted once however often named (an upstream that sends to each
        entry sends again), and the per-app count kept per client: ten rooms a call, each named
        ten times over two client addresses, still spend 100 messages a second."""
        clock.tick = 0
        clock.now = float(int(clock.now))
        app = build_app(load_config(), store=store)
        app.clock = clock
        rooms = ["1001"] * 10
        async with asgi_client(app, ("10.0.0.1", 1)) as one, asgi_client(app, ("10.0.0.2", 1)) as two:
            for n in range(10):
                r = await (one if n % 2 else two).post(f"/{FREE}/messages/chatrooms", json=self._send(rooms))
                assert r.status_code == 200, (n, r.text)
            refused = await one.post(f"/{FREE}/messages/chatrooms", json=self._send(["1002"]))
            assert refused.status_code == 429 and refused.json()["limit"] == "100/1s", refused.text
            over = await two.post(f"/{FREE}/messages/chatrooms", json=self._send([str(1000 + i) for i in range(11)]))
            assert over.status_code == 400, over.text

    @pytest.mark.parametrize("body", [{"to": []}, {"to": [1, 2]}, {"to": [""]}, {"msg": "no recipients"}, [1]])
    async def test_a_send_whose_recipients_cannot_be_read_is_a_400(self, client: httpx.AsyncClient, body: Any) -> None:
        """Catches a send whose recipients cannot be counted let through uncounted, or crashing the
        middleware."""
        r = await client.post(f"/{FREE}/messages/users", json=body)
        assert r.status_code == 400 and r.json()["error"] == "illegal_argument", r.text
        assert "body.to" in r.json()["error_description"]  # quota's refusal, not the gateway's


async def test_a_body_held_back_is_counted_when_it_arrives() -> None:
    """Catches a request's rate hits dated by its headers: a client sends the headers of ten sends of
    600 recipients in each of two earlier minutes and holds their bodies, then spends the app's
    6,000 a minute live and releases them all at once. Dated by their headers, each found its
    long-gone window empty and 18,000 messages passed in one instant; dated by their bodies, none
    of the held ones passes."""

    async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    clock = Clock(1_790_000_000.0, tick=0)
    app = build_app(load_config(), store=MemoryStore(), upstream=upstream)
    app.clock = clock
    path = f"/{PRO}/messages/users"

    def send_of(n: int, tag: str) -> bytes:
        return json.dumps(
            {"target_type": "users", "to": [f"{tag}{i}" for i in range(n)], "msg": {"msg": "hi"}}
        ).encode()

    async def request(body: bytes, gate: asyncio.Event) -> int:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            await gate.wait()
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(http_scope("POST", path, headers=headers), receive, send)
        return statuses[0]

    held, release = [], asyncio.Event()
    for minute in range(2):
        held += [asyncio.ensure_future(request(send_of(600, f"m{minute}r{k}x"), release)) for k in range(10)]
        await asyncio.sleep(0.01)  # their headers are in: each waits for its body
        clock.advance(130)
    clock.advance(300)
    now = asyncio.Event()
    now.set()
    live = [await request(send_of(600, f"live{k}x"), now) for k in range(10)]
    assert live == [200] * 10
    release.set()
    late = await asyncio.gather(*held)
    await app.shutdown()
    assert late == [429] * 20, late


@pytest.mark.parametrize(
    ("kind", "relation", "per_room", "per_user"),
    [
        ("chatgroups", "group_members", "members_per_group", "groups_per_user"),
        ("chatrooms", "chatroom_members", "members_per_chatroom", "chatrooms_per_user"),
    ],
)
class TestOwners:
    async def test_a_rooms_owner_is_one_of_its_members(
        self, store: Any, clock: Clock, config_dir: Path, kind: str, relation: str, per_room: str, per_user: str
    ) -> None:
        """Catches a room's creator counted nowhere (the vendor's maxusers includes the owner, and a
        user's rooms include those it owns): a free user owned 100 groups past its 100 joined, and a
        group held its 100 members and the owner. Also the way back: a batch removal naming the
        owner (the vendor answers 200, the owner `result: false`) freed the owner's slots."""
        set_cap(config_dir, "free", **{per_user: 2, per_room: 3})
        async with make_client(store, clock, load_config(config_dir)) as client:
            await register(client, FREE, ["own", "a", "b", "c"])
            rooms = [room_id(await create_room(client, FREE, kind, "own"), kind) for _ in range(2)]
            r = await create_room(client, FREE, kind, "own")
            assert r.status_code == 403 and r.json()["limit"] == per_user, r.text
            state = gateway_state(client, FREE)
            held = state.groups if kind == "chatgroups" else state.chatrooms
            assert sorted(held) == sorted(rooms)  # the refused create never reached the gateway
            first = rooms[0]
            assert (await client.post(f"/{FREE}/{kind}/{first}/users", json={"usernames": ["a", "b"]})).is_success
            r = await client.post(f"/{FREE}/{kind}/{first}/users/c")
            assert r.status_code == 403 and r.json()["limit"] == per_room, r.text
            # The owner stays (the gateway refuses it alone, answers result false in a batch).
            assert (await client.delete(f"/{FREE}/{kind}/{first}/users/own")).status_code == 400
            r = await client.delete(f"/{FREE}/{kind}/{first}/users/a,OWN")
            assert r.status_code == 200 and {"result": False, "user": "own"} in r.json()["data"], r.text
            assert await members(client, f"q:{{demo#free}}:s:{relation}:o:{first}") == {"own", "b"}
            assert await members(client, f"q:{{demo#free}}:s:{relation}:m:own") == set(rooms)
            assert (await create_room(client, FREE, kind, "own")).status_code == 403
            assert (await client.post(f"/{FREE}/{kind}/{first}/users/c")).status_code == 200
            assert (await client.post(f"/{FREE}/{kind}/{first}/users/a")).status_code == 403
            assert held[first]["members"] == {"own", "b", "c"}
            # Deleting a room frees its owner's slot with its members'.
            assert (await client.delete(f"/{FREE}/{kind}/{rooms[1]}")).status_code == 200
            r = await create_room(client, FREE, kind, "own")
            assert r.status_code == 200, r.text
            assert await members(client, f"q:{{demo#free}}:s:{relation}:o:{room_id(r, kind)}") == {"own"}

    async def test_a_create_the_upstream_refuses_holds_no_slot(
        self, store: Any, clock: Clock, config_dir: Path, kind: str, relation: str, per_room: str, per_user: str
    ) -> None:
        """Catches a refused create keeping its owner's reservation: a create for an unknown owner
        (the gateway's 404), sent as often as a user may be in rooms, left it in none it could join."""
        set_cap(config_dir, "free", **{per_user: 1})
        async with make_client(store, clock, load_config(config_dir)) as client:
            await register(client, FREE, ["own"])
            for _ in range(3):
                assert (await create_room(client, FREE, kind, "ghost")).status_code == 404
            assert await members(client, f"q:{{demo#free}}:s:{relation}:m:ghost") == set()
            await register(client, FREE, ["ghost"])
            assert (await create_room(client, FREE, kind, "ghost")).status_code == 200

    @pytest.mark.parametrize(
        "answer",
        [
            b"removed, mostly",
            b"{}",
            b'{"data": [{"user": "own"}]}',
            b'{"data": [{"result": "false", "user": "own"}]}',
            b'{"data": [{"result": false, "user": "own"}], "pad": "' + b"x" * 70_000 + b'"}',
        ],
        ids=["text", "empty", "no-result", "result-a-string", "over-64KiB"],
    )
    async def test_a_removal_whose_answer_cannot_be_read_takes_nothing_off(
        self,
        store: Any,
        clock: Clock,
        config_dir: Path,
        kind: str,
        relation: str,
        per_room: str,
        per_user: str,
        answer: bytes,
    ) -> None:
        """Catches `unless` failing open (found by the review of the owner change): a removal whose
        2xx answer quota cannot read (not JSON, over the capture limit, another shape) took off every
        member it named, the owner too, whom the vendor keeps: each such call freed one of the
        owner's rooms and one of the room's members. Now nothing is taken off (counted, until
        `reconcile`), which refuses more, never less."""
        set_cap(config_dir, "free", **{per_user: 1, per_room: 2})
        gateway = create_gateway()

        async def unreadable(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["method"] != "DELETE":
                await gateway(scope, receive, send)
                return

            async def swallow(message: Any) -> None:
                return None

            await gateway(scope, receive, swallow)  # the gateway acts; its answer is replaced
            kind_of = b"text/plain" if answer[:1] != b"{" else b"application/json"
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind_of)]})
            await send({"type": "http.response.body", "body": answer})

        unreadable.state = gateway.state  # type: ignore[attr-defined]
        async with make_client(store, clock, load_config(config_dir), upstream=unreadable) as client:
            await register(client, FREE, ["own", "a", "b"])
            room = room_id(await create_room(client, FREE, kind, "own"), kind)
            assert (await client.post(f"/{FREE}/{kind}/{room}/users/a")).status_code == 200
            assert (await client.delete(f"/{FREE}/{kind}/{room}/users/a,own")).status_code == 200
            assert await members(client, f"q:{{demo#free}}:s:{relation}:o:{room}") == {"own", "a"}
            assert await members(client, f"q:{{demo#free}}:s:{relation}:m:own") == {room}
            assert (await create_room(client, FREE, kind, "own")).status_code == 403
            assert (await client.post(f"/{FREE}/{kind}/{room}/users/b")).status_code == 403

    async def test_a_creation_never_settled_stops_holding_its_owners_slot(
        self, store: Any, clock: Clock, config_dir: Path, kind: str, relation: str, per_room: str, per_user: str
    ) -> None:
        """Catches a user kept out of every room by a creation of its own that never settled (found by
        the review of the owner change): a create's reservation whose undo the store missed (it was
        down then) stayed in the user's rooms past its TTL, since only the user's own next create
        purged it. A join that would be refused drops the expired ones first."""
        set_cap(config_dir, "free", **{per_user: 1})
        async with make_client(store, clock, load_config(config_dir)) as client:
            await register(client, FREE, ["own", "host"])
            room = room_id(await create_room(client, FREE, kind, "host"), kind)
            lost = AddOp(per_user, f"q:{{demo#free}}:s:{relation}:m:own", 1, ("~pending:lost",), pending_ttl_ms=60_000)
            await store.run(Program([lost]), int(clock.now * 1000))
            r = await client.post(f"/{FREE}/{kind}/{room}/users/own")
            assert r.status_code == 403 and r.json()["limit"] == per_user, r.text
            clock.advance(61)
            assert (await client.post(f"/{FREE}/{kind}/{room}/users/own")).status_code == 200
            assert await members(client, f"q:{{demo#free}}:s:{relation}:m:own") == {room}

    async def test_creates_at_once_in_any_spelling_hold_the_owners_cap(
        self, store: Any, clock: Clock, config_dir: Path, kind: str, relation: str, per_room: str, per_user: str
    ) -> None:
        """Catches the owner's reservation checked and taken apart (two creates at once both fitting
        under the cap) or an owner's spelling counted apart (`OWN`, `Own` as other users)."""
        set_cap(config_dir, "free", **{per_user: 2})
        async with make_client(store, clock, load_config(config_dir)) as client:
            await register(client, FREE, ["own"])
            spellings = ["own", "OWN", "Own"] * 3
            results = await asyncio.gather(*(create_room(client, FREE, kind, name) for name in spellings))
            codes = sorted(r.status_code for r in results)
            assert codes == [200, 200] + [403] * 7, codes
            rooms = {room_id(r, kind) for r in results if r.status_code == 200}
            assert await members(client, f"q:{{demo#free}}:s:{relation}:m:own") == rooms


@contextlib.asynccontextmanager
async def _behind_proxy_of_aiohttp(route: str, handler: Any, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    """A client of quota (memory, shipped config) proxying to a real aiohttp gateway that serves
    `handler` on POST `route`: a gateway reading requests as a framework of its own does."""
    from aiohttp import web

    from quota.proxy import ProxyApp, Upstream

    gateway = web.Application()
    gateway.router.add_post(route, handler)
    runner = web.AppRunner(gateway)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    proxy = ProxyApp(Upstream(f"http://127.0.0.1:{port}"))
    app = build_app(load_config(), store=MemoryStore(), upstream=proxy)
    app.clock = clock
    try:
        async with asgi_client(app, ("10.1.2.3", 4000)) as client:
            yield client
    finally:
        proxy.pool.close()
        await runner.cleanup()


@pytest.mark.redis
@pytest.mark.parametrize("inner", [b"{}", b"[]"])
async def test_a_client_stalling_the_loop_gains_no_unchecked_rates(redis_server: RedisServer, inner: bytes) -> None:
    """Catches the chain of the audit of 2026-12-02: three bodies whose every object the parser
    checked for a repeated key (a third of a second of CPU together, refused 400, no rate hit)
    stalled the loop while three reads waited on Redis; the watchdog failed the three, which
    opened the breaker, and `rates: open` then let 50 history exports through against 1 a minute.
    Now such a body is refused unread, a stall is no Redis timeout, one stall is one failure, and
    rates under the outage policy are held by the process: the breaker stays closed and the
    export limit holds."""
    # Refused once read (its outer object names `to` twice), after 345,000 objects (arrays: the
    # review's form, which a count of objects let through): under a MiB.
    stalling = b'{"to":["u1"],"type":"txt","x":[' + b",".join([inner] * 345_000) + b'],"TO":1}'
    assert len(stalling) <= 1 << 20
    redis_server.flush()
    store = RedisStore(redis_server.url, timeout_ms=250)
    app = build_app(load_config(), store=store)
    hour = datetime.now(UTC).strftime("%Y%m%d%H")
    try:
        async with asgi_client(app, ("10.7.7.7", 4000), "http://gw") as client:
            reads = [call_raw(app, http_scope("GET", f"/{PRO}/users/u1", peer=f"198.51.100.{i}")) for i in range(3)]
            bodies = [
                call_raw(app, http_scope("POST", f"/{PRO}/messages/users", peer=f"203.0.113.{i}"), stalling)
                for i in range(3)
            ]
            answers = await asyncio.gather(*reads, *bodies)
            assert [a[0]["status"] for a in answers] == [404, 404, 404, 400, 400, 400]
            exports = [(await client.get(f"/{PRO}/chatmessages/{hour}")).status_code for _ in range(20)]
            assert exports.count(200) == 1 and exports.count(429) == 19, exports
            assert app.breaker.state == "closed" and app.breaker.failures == 0
            assert b"request body over 65536 bytes" in answers[3][1]["body"]
    finally:
        await store.close()
