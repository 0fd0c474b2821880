"""The WebSocket connection route (quota/sockets.py), driven as an ASGI server would drive it: each
refusal closes the handshake with its own code (1008 for the plan, 1013 for rates and outages) and
counts nothing; an accepted connection is a login (DAU, MAU) and holds a lease. On every store;
activity and lease sets are read raw by their spelled-out keys."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from quota.config import load_config
from quota.serve import build_app
from quota.store.memory import MemoryStore
from quota.store.redis import RedisStore
from tests.conftest import Clock, asgi_client, free_port, make_client
from tests.helpers import SwitchedStore, raw_deadlines, raw_members, read_yaml, register, write_yaml

SOCKET_TOKEN = "sockets-admin-token-0123456789"


class Socket:
    """One WebSocket connection to the middleware: the client's side of the ASGI messages."""

    def __init__(self, mw: Any, path: str, ip: str = "10.1.2.3") -> None:
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [],
            "client": (ip, 5555),
            "server": ("gateway", 80),
            "subprotocols": [],
        }
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.ensure_future(mw(scope, self.inbox.get, self.outbox.put))

    async def open(self) -> dict[str, Any]:
        """The handshake's answer: websocket.accept, or websocket.close with its code and reason."""
        await self.inbox.put({"type": "websocket.connect"})
        message: dict[str, Any] = await asyncio.wait_for(self.outbox.get(), 10)
        if message["type"] == "websocket.close":
            await asyncio.wait_for(self.task, 10)
        return message

    async def close(self) -> None:
        await self.inbox.put({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(self.task, 10)


async def refused(mw: Any, path: str, ip: str = "10.1.2.3") -> tuple[int, str]:
    ws = Socket(mw, path, ip)
    answer = await ws.open()
    if answer["type"] != "websocket.close":
        await ws.close()
        pytest.fail(f"the handshake was not refused: {answer}")
    return answer["code"], answer["reason"]


def mw_of(client: Any) -> Any:
    return client._transport.app


def day_of(clock: Clock) -> str:
    return datetime.fromtimestamp(clock.now, UTC).strftime("%Y%m%d")


async def test_accepted_connection_is_a_login_with_a_lease(store: Any, clock: Clock) -> None:
    """Catches a connection that is not counted as a login (DAU, MAU), holds no lease, or keeps its
    lease after it closed."""
    async with make_client(store, clock) as client:
        await register(client, "demo/basic", ["amy"])
        ws = Socket(mw_of(client), "/demo/basic/users/AMY/connection")
        assert (await ws.open())["type"] == "websocket.accept"
        assert await raw_members(store, f"q:{{demo#basic}}:dau:{day_of(clock)}") == {"amy"}
        assert await raw_members(store, f"q:{{demo#basic}}:mau:{day_of(clock)[:6]}") == {"amy"}
        assert len(await raw_deadlines(store, "q:{demo#basic}:online")) == 1
        await ws.close()
        assert await raw_deadlines(store, "q:{demo#basic}:online") == {}
        assert await raw_members(store, f"q:{{demo#basic}}:dau:{day_of(clock)}") == {"amy"}


async def test_free_dau_ceiling_on_connect(store: Any, clock: Clock) -> None:
    """Catches the free plan's DAU ceiling skipped on the WebSocket route: with 100 users active
    today, a new user's connection is closed (1008, naming the ceiling) and counts nothing; a user
    already active today still connects."""
    async with make_client(store, clock) as client:
        users = [f"u{i}" for i in range(101)]
        await register(client, "demo/free", users)
        for u in users[:100]:
            assert (await client.post("/demo/free/token", json={"username": u})).status_code == 200
        code, reason = await refused(mw_of(client), "/demo/free/users/u100/connection")
        assert code == 1008 and "100 daily active users" in reason
        dau = await raw_members(store, f"q:{{demo#free}}:dau:{day_of(clock)}")
        assert len(dau) == 100 and "u100" not in dau
        assert await raw_deadlines(store, "q:{demo#free}:online") == {}
        ws = Socket(mw_of(client), "/demo/free/users/u7/connection")
        assert (await ws.open())["type"] == "websocket.accept"
        await ws.close()


async def test_frozen_and_allowlist_refuse_the_handshake(store: Any, clock: Clock, config_dir: Path) -> None:
    """Catches a frozen account or an address outside the app's allowlist reaching the upstream
    over WebSocket (the HTTP checks only): both close with 1008 and count nothing."""
    path = config_dir / "accounts.yaml"
    doc = read_yaml(path)
    doc["accounts"]["demo-pro"]["frozen_on"] = "2026-01-05"
    doc["accounts"]["demo-basic"]["ip_allowlist"] = ["10.0.0.0/8"]
    write_yaml(path, doc)
    async with make_client(store, clock, load_config(config_dir)) as client:
        await register(client, "demo/basic", ["amy"])
        code, reason = await refused(mw_of(client), "/demo/pro/users/amy/connection")
        assert code == 1008 and "frozen" in reason
        code, reason = await refused(mw_of(client), "/demo/basic/users/amy/connection", ip="192.168.1.1")
        assert code == 1008 and reason == "forbidden_op: client address 192.168.1.1 is not in the app's IP allowlist"
        async with asgi_client(mw_of(client), ("192.168.1.1", 4000), "http://gw") as outsider:
            r = await outsider.get("/demo/basic/users")
            assert r.status_code == 403 and r.json()["error"] == "forbidden_op"
        assert await raw_members(store, f"q:{{demo#basic}}:dau:{day_of(clock)}") == set()
        ws = Socket(mw_of(client), "/demo/basic/users/amy/connection", ip="10.200.0.1")
        assert (await ws.open())["type"] == "websocket.accept"
        await ws.close()


async def test_unknown_app_and_bad_id_close_with_1008(store: Any, clock: Clock) -> None:
    """Catches an unknown app's connections let through unmetered, and an id outside the policy
    counted: both close with 1008 before the upstream sees them."""
    async with make_client(store, clock) as client:
        code, reason = await refused(mw_of(client), "/nobody/none/users/amy/connection")
        assert code == 1008 and reason.startswith("service_resource_not_found")
        code, reason = await refused(mw_of(client), "/demo/pro/users/a%7Bb%7D:x/connection")
        assert code == 1008 and reason.startswith("illegal_argument")


async def test_rate_closes_with_1013(store: Any, clock: Clock) -> None:
    """Catches a rate refusal on the WebSocket route closing with the plan code (1008, "do not
    retry") instead of 1013 ("try again later"), or not applied at all: 100 handshakes a second per
    client, the 101st refused."""
    clock.tick = 0
    async with make_client(store, clock) as client:
        await register(client, "demo/pro", ["amy"])
        clock.advance(2)
        for _ in range(100):
            ws = Socket(mw_of(client), "/demo/pro/users/amy/connection")
            assert (await ws.open())["type"] == "websocket.accept"
            await ws.close()
        code, reason = await refused(mw_of(client), "/demo/pro/users/amy/connection")
        assert code == 1013 and reason.startswith("reach_limit")


async def test_outage_closes_with_1013(config_dir: Path) -> None:
    """Catches a storage outage on the WebSocket route letting the connection in unleased, or
    closing it with 1008: counters fail closed, so the handshake is refused with 1013."""
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=200)  # nothing listens there
    app = build_app(load_config(config_dir), store=store)
    try:
        code, reason = await refused(app, "/demo/pro/users/amy/connection")
        assert code == 1013 and reason.startswith("service_unavailable")
    finally:
        await store.close()


async def test_connection_closed_by_the_upstream_counts_nothing(store: Any, clock: Clock) -> None:
    """Catches a login kept when the upstream closed the handshake (a user that does not exist): no
    DAU, no MAU, no lease, on the free plan's ceiling included."""
    async with make_client(store, clock) as client:
        code, _ = await refused(mw_of(client), "/demo/free/users/ghost/connection")
        assert code == 1008
        assert await raw_members(store, f"q:{{demo#free}}:dau:{day_of(clock)}") == set()
        assert await raw_members(store, f"q:{{demo#free}}:mau:{day_of(clock)[:6]}") == set()
        assert await raw_deadlines(store, "q:{demo#free}:online") == {}


async def test_unchecked_connection_closed_upstream_undoes_nothing(config_dir: Path) -> None:
    """Catches an undo that assumes every add was counted: with `outage: open` on the connection
    route and the store down, a handshake goes through unchecked (nothing added); the upstream
    closing it must end cleanly, not raise while undoing adds that never happened."""
    routes = config_dir / "routes.yaml"
    doc = read_yaml(routes)
    for route in doc["routes"]:
        if route["name"] == "users.connect":
            route["outage"] = "open"
    write_yaml(routes, doc)
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=200)  # nothing listens there
    app = build_app(load_config(config_dir), store=store)
    try:
        code, reason = await refused(app, "/demo/pro/users/ghost/connection")
        assert code == 1008 and reason == "user not found"
    finally:
        await store.close()


async def test_online_cap_refusal_names_the_limit(store: Any, clock: Clock) -> None:
    """Catches the online-user refusal mis-shaped: free holds 50 connections; the 51st handshake is
    closed with 1008 and a reason naming online_users, the cap and how many are online."""
    async with make_client(store, clock) as client:
        users = [f"w{i}" for i in range(51)]
        await register(client, "demo/free", users)
        sockets = [Socket(mw_of(client), f"/demo/free/users/w{i}/connection") for i in range(50)]
        for ws in sockets:
            assert (await ws.open())["type"] == "websocket.accept"
        code, reason = await refused(mw_of(client), "/demo/free/users/w50/connection")
        assert (code, reason) == (1008, "forbidden_op: online_users is 50 on plan free and 50 are online")
        assert 'limit="online_users"' in mw_of(client).metrics.render().decode()
        for ws in sockets:
            await ws.close()


async def test_a_socket_under_no_app_is_held_to_the_fallback_rate(store: Any, clock: Clock, config_dir: Path) -> None:
    """Catches a WebSocket path under no app (`/ws`) let through with no rate at all, where an HTTP
    request there is held to the general per-client rate: the third handshake in one second from
    one address closes with 1013 and never reaches the upstream; another address still connects."""
    (config_dir / "quota.yaml").write_text("fallback_rate: 2/second\n")
    clock.tick = 0
    reached: list[str] = []

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        await receive()
        reached.append(scope["path"])
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    async with make_client(store, clock, load_config(config_dir), upstream=upstream) as client:
        mw = mw_of(client)
        for _ in range(2):
            ws = Socket(mw, "/ws")
            assert (await ws.open())["type"] == "websocket.accept"
            await ws.close()
        code, reason = await refused(mw, "/ws")
        assert code == 1013 and reason.startswith("reach_limit")
        assert reached == ["/ws", "/ws"]
        ws = Socket(mw, "/ws", ip="10.9.9.9")
        assert (await ws.open())["type"] == "websocket.accept"
        await ws.close()
        clock.advance(2)
        ws = Socket(mw, "/ws")
        assert (await ws.open())["type"] == "websocket.accept"
        await ws.close()


async def test_a_lease_lapsed_in_an_outage_is_taken_again(config_dir: Path) -> None:
    """Catches a live connection left uncounted for good once its lease lapsed during a storage
    outage: when the store answers again, the next renewal takes the lease back, even with the
    plan's online cap (1 here) filled meanwhile by a newcomer. New connections are what a full cap
    refuses, never one already admitted."""
    (config_dir / "quota.yaml").write_text("lease_ttl_s: 3\n")  # renewed every second
    path = config_dir / "accounts.yaml"
    doc = read_yaml(path)
    doc["accounts"]["demo-enterprise"]["overrides"] = {"online_users": 1}
    write_yaml(path, doc)
    store = SwitchedStore()
    clock = Clock(tick=0)
    online = "q:{demo#enterprise}:online"
    async with make_client(store, clock, load_config(config_dir)) as client:
        await register(client, "demo/enterprise", ["amy", "bob", "cy"])
        amy = Socket(mw_of(client), "/demo/enterprise/users/amy/connection")
        assert (await amy.open())["type"] == "websocket.accept"
        (amy_conn,) = await raw_deadlines(store, online)
        store.down = True
        clock.advance(10)  # amy's lease lapses while no renewal can reach the store
        await asyncio.sleep(1.3)
        assert await store.online(online, int(clock.now * 1000)) == 0
        store.down = False
        bob = Socket(mw_of(client), "/demo/enterprise/users/bob/connection")
        assert (await bob.open())["type"] == "websocket.accept"
        code, reason = await refused(mw_of(client), "/demo/enterprise/users/cy/connection")
        assert code == 1008 and "online_users" in reason, reason
        deadline = asyncio.get_running_loop().time() + 5
        while amy_conn not in await raw_deadlines(store, online):
            assert asyncio.get_running_loop().time() < deadline, "amy's lease was never taken again"
            await asyncio.sleep(0.05)
        assert await store.online(online, int(clock.now * 1000)) == 2
        await amy.close()
        await bob.close()
        assert await store.online(online, int(clock.now * 1000)) == 0


@pytest.mark.parametrize("store", ["memory", "redis"], indirect=True)
async def test_a_connection_held_past_midnight_is_active_on_each_new_day(store: Any, config_dir: Path) -> None:
    """Catches a user who stays connected never counting again (found by the audit of 2026-11-30):
    the login was counted on the day the connection opened only, so an app that keeps its users'
    connections open billed no DAU for later days and no MAU for later months. Each renewal that
    lands on a new day puts the user in that day's DAU and its month's MAU, once."""
    (config_dir / "quota.yaml").write_text("lease_ttl_s: 3\n")  # renewed every second
    clock = Clock(datetime(2026, 5, 31, 23, 0, tzinfo=UTC).timestamp(), tick=0)
    async with make_client(store, clock, load_config(config_dir)) as client:
        await register(client, "demo/basic", ["amy"])
        amy = Socket(mw_of(client), "/demo/basic/users/amy/connection")
        assert (await amy.open())["type"] == "websocket.accept"
        for day, month in (("20260601", "202606"), ("20260702", "202607")):
            clock.now = datetime.strptime(day + "12", "%Y%m%d%H").replace(tzinfo=UTC).timestamp()
            deadline = asyncio.get_running_loop().time() + 5
            while await raw_members(store, f"q:{{demo#basic}}:dau:{day}") != {"amy"}:
                assert asyncio.get_running_loop().time() < deadline, f"amy never counted on {day}"
                await asyncio.sleep(0.1)
            assert await raw_members(store, f"q:{{demo#basic}}:mau:{month}") == {"amy"}
        assert await raw_members(store, "q:{demo#basic}:dau:20260531") == {"amy"}
        assert await raw_members(store, "q:{demo#basic}:dau:20260615") == set()  # no renewal landed on it
        await amy.close()


async def test_a_connection_never_accepted_is_not_active_on_a_new_day(config_dir: Path) -> None:
    """Catches a user the gateway refused counted active on the day after the connect (audit of
    2026-11-30): the renewal that lands on a new day counts only a connection the upstream took."""
    (config_dir / "quota.yaml").write_text("lease_ttl_s: 3\n")  # renewed every second
    decide = asyncio.Event()

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        # The gateway checks the user slowly, then refuses the connection.
        assert (await receive())["type"] == "websocket.connect"
        await decide.wait()
        await send({"type": "websocket.close", "code": 1008, "reason": "user not found"})

    store = MemoryStore()
    clock = Clock(datetime(2026, 5, 31, 23, 59, 59, tzinfo=UTC).timestamp(), tick=0)
    async with make_client(store, clock, load_config(config_dir), upstream=upstream) as client:
        ghost = Socket(mw_of(client), "/demo/basic/users/ghost/connection")
        await ghost.inbox.put({"type": "websocket.connect"})
        await asyncio.sleep(0.1)
        clock.now = datetime(2026, 6, 1, 0, 0, 30, tzinfo=UTC).timestamp()
        await asyncio.sleep(1.5)  # a renewal lands on the new day, the handshake still undecided
        decide.set()
        answer = await asyncio.wait_for(ghost.outbox.get(), 5)
        assert answer["type"] == "websocket.close" and answer["code"] == 1008
        await asyncio.wait_for(ghost.task, 5)
        for key in ("dau:20260531", "dau:20260601", "mau:202606"):
            assert await raw_members(store, f"q:{{demo#basic}}:{key}") == set(), key


@pytest.mark.parametrize("change", ["freeze", "allowlist"])
async def test_a_connection_ends_when_its_account_no_longer_holds_it(
    change: str, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a connection outliving its account's standing (found by the audit of 2026-12-01): the
    account was checked at the handshake only, so a client of an account frozen (or put behind an
    allowlist) since kept its connection, renewed as online, for as long as it liked, while HTTP
    was refused. The next renewal closes it with 1008 naming why, the upstream reads the client
    gone, and the lease is released."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", SOCKET_TOKEN)
    auth = {"authorization": f"Bearer {SOCKET_TOKEN}"}
    (config_dir / "quota.yaml").write_text("lease_ttl_s: 3\n")  # renewed every second
    store = MemoryStore()
    clock = Clock(tick=0)
    online = "q:{demo#pro}:online"
    heard: list[str] = []
    speak, spoke = asyncio.Event(), asyncio.Event()

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        # The upstream records what reaches it, echoes it, and speaks unasked when told to.
        assert scope["type"] == "websocket"
        await receive()
        await send({"type": "websocket.accept"})

        async def unasked() -> None:
            await speak.wait()
            await send({"type": "websocket.send", "text": "unasked"})
            spoke.set()

        talker = asyncio.ensure_future(unasked())
        while (message := await receive())["type"] == "websocket.receive":
            heard.append(message["text"])
            await send({"type": "websocket.send", "text": message["text"]})
        await talker

    async with make_client(store, clock, load_config(config_dir), upstream=upstream) as client:
        amy = Socket(mw_of(client), "/demo/pro/users/amy/connection")
        assert (await amy.open())["type"] == "websocket.accept"
        await amy.inbox.put({"type": "websocket.receive", "text": "before"})
        assert await asyncio.wait_for(amy.outbox.get(), 5) == {"type": "websocket.send", "text": "before"}
        if change == "freeze":
            r = await client.post("/_quota/accounts/demo-pro/freeze", headers=auth)
        else:
            r = await client.put(
                "/_quota/accounts/demo-pro/allowlist", json={"ip_allowlist": ["192.0.2.1"]}, headers=auth
            )
        assert r.status_code == 200, r.text
        closed = await asyncio.wait_for(amy.outbox.get(), 5)  # within a renewal (a second)
        assert closed["type"] == "websocket.close" and closed["code"] == 1008, closed
        assert ("frozen" if change == "freeze" else "allowlist") in closed["reason"], closed
        # The lease is released at once, while the upstream still waits on the client.
        deadline = asyncio.get_running_loop().time() + 2
        while await store.online(online, int(clock.now * 1000)) != 0:
            assert asyncio.get_running_loop().time() < deadline, "the lease outlived the close"
            await asyncio.sleep(0.01)
        assert not amy.task.done()
        # What the client sends after the close never reaches the upstream, which reads the client
        # gone; nothing the upstream says reaches the client.
        speak.set()
        await asyncio.wait_for(spoke.wait(), 5)
        await amy.inbox.put({"type": "websocket.receive", "text": "after"})
        await asyncio.wait_for(amy.task, 5)
        assert heard == ["before"] and amy.outbox.empty()


async def _until(check: Any, what: str, within: float = 8) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


def _ended(sockets: list[Socket]) -> list[Socket]:
    """The sockets quota closed (an open one, past its handshake, has nothing waiting)."""
    return [ws for ws in sockets if ws.task.done() or not ws.outbox.empty()]


@pytest.mark.parametrize("store", ["memory", "redis"], indirect=True)
async def test_a_downgrade_holds_live_connections_to_the_new_plan(
    store: Any, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches connections of a plan left behind outliving it (found by the audit of 2026-12-02):
    an app moved from basic to free on the 1st kept 300 connections open, online and active each
    day past free's 50 online users and 100 DAU, billed nothing. The renewals after the change
    hold each connection to the new plan as a handshake would be: 60 open, 50 stay; the other 10
    are closed (1008, naming online_users) and leave the day's DAU; a newcomer is refused."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", SOCKET_TOKEN)
    (config_dir / "quota.yaml").write_text("lease_ttl_s: 3\n")  # renewed every second
    clock = Clock(datetime(2026, 5, 31, 23, 59, tzinfo=UTC).timestamp(), tick=0)
    online = "q:{demo#basic}:online"
    async with make_client(store, clock, load_config(config_dir)) as client:
        auth = {"authorization": f"Bearer {SOCKET_TOKEN}"}
        r = await client.post("/_quota/accounts/demo-basic/change-plan", json={"plan": "free"}, headers=auth)
        assert r.status_code == 200, r.text  # free from June 1st
        users = [f"u{i}" for i in range(60)]
        await register(client, "demo/basic", [*users, "late"])
        sockets = [Socket(mw_of(client), f"/demo/basic/users/{u}/connection") for u in users]
        for ws in sockets:
            assert (await ws.open())["type"] == "websocket.accept"
        assert await store.online(online, int(clock.now * 1000)) == 60
        clock.now = datetime(2026, 6, 1, 0, 1, tzinfo=UTC).timestamp()

        async def settled() -> bool:
            return len(_ended(sockets)) == 10

        await _until(settled, "the connections over free's 50 were not closed")
        await asyncio.sleep(1.2)  # a renewal more: none of the 50 left is closed
        ended = _ended(sockets)
        assert len(ended) == 10
        for ws in ended:
            closed = ws.outbox.get_nowait()
            assert closed["code"] == 1008 and "online_users is 50 on plan free" in closed["reason"], closed
        assert await store.online(online, int(clock.now * 1000)) == 50
        dau = await raw_members(store, "q:{demo#basic}:dau:20260601")
        assert len(dau) == 50 and not dau & {u for u, ws in zip(users, sockets, strict=True) if ws in ended}
        code, reason = await refused(mw_of(client), "/demo/basic/users/late/connection")
        assert code == 1008 and "online_users" in reason
        for ws in sockets:
            await ws.close()  # those quota closed answer the close


@pytest.mark.parametrize("store", ["memory", "redis"], indirect=True)
async def test_connections_held_past_midnight_stay_under_the_free_dau_ceiling(store: Any, config_dir: Path) -> None:
    """Catches free's 100-DAU ceiling passed at midnight (found by the audit of 2026-12-02): 50 users
    held connections over midnight, 100 others logged in at 00:00 before the renewals landed, and
    the renewals counted the 50 past the ceiling, 150 DAU on a plan that bills no overage. A
    renewal is held to the ceiling as a login is: whichever comes first of a login and a renewal
    takes a place, the others are refused (403) or closed (1008, naming the ceiling): DAU 100."""
    (config_dir / "quota.yaml").write_text("lease_ttl_s: 3\n")  # renewed every second
    clock = Clock(datetime(2026, 5, 31, 23, 59, tzinfo=UTC).timestamp(), tick=0)
    async with make_client(store, clock, load_config(config_dir)) as client:
        held = [f"h{i}" for i in range(50)]
        fresh = [f"n{i}" for i in range(100)]
        await register(client, "demo/free", held + fresh)
        sockets = [Socket(mw_of(client), f"/demo/free/users/{u}/connection") for u in held]
        for ws in sockets:
            assert (await ws.open())["type"] == "websocket.accept"
        clock.now = datetime(2026, 6, 1, tzinfo=UTC).timestamp()
        codes = [(await client.post("/demo/free/token", json={"username": u})).status_code for u in fresh]
        assert set(codes) <= {200, 403} and codes.count(200) >= 50, codes  # the held 50 take at most 50
        dau_key = "q:{demo#free}:dau:20260601"

        async def settled() -> bool:
            # Every held connection either counted on the new day or closed.
            counted = await raw_members(store, dau_key)
            return all(ws in _ended(sockets) or u in counted for u, ws in zip(held, sockets, strict=True))

        await _until(settled, "a held connection neither counted on the new day nor closed")
        await asyncio.sleep(1.2)  # a renewal more changes nothing
        dau = await raw_members(store, dau_key)
        ended = _ended(sockets)
        assert len(dau) == 100, len(dau)
        assert dau == {u for u, c in zip(fresh, codes, strict=True) if c == 200} | {
            u for u, ws in zip(held, sockets, strict=True) if ws not in ended
        }
        assert len(ended) == 50 - (100 - codes.count(200))
        for ws in sockets:
            if ws in ended:
                closed = ws.outbox.get_nowait()
                assert closed["code"] == 1008 and "100 daily active users" in closed["reason"], closed
            await ws.close()  # those quota closed answer the close
        assert await store.online("q:{demo#free}:online", int(clock.now * 1000)) == 0


async def test_a_slow_handshake_keeps_its_login_claimed(config_dir: Path) -> None:
    """Catches a login's claims lapsing while the gateway weighs a slow handshake (found by the
    audit of 2026-12-02): another connect purged them, and the refused login's undo then skipped
    them, leaving a user the gateway refused in the day's DAU and the month's MAU. The claims are
    renewed until the handshake is answered."""
    (config_dir / "quota.yaml").write_text("reservation_ttl_s: 2\n")
    decide = asyncio.Event()

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        if scope["path"].endswith("/ghost/connection"):
            await decide.wait()
            await send({"type": "websocket.close", "code": 1008, "reason": "user not found"})
            return
        await send({"type": "websocket.accept"})
        await receive()

    store = MemoryStore()
    clock = Clock(tick=0)
    async with make_client(store, clock, load_config(config_dir), upstream=upstream) as client:
        ghost = Socket(mw_of(client), "/demo/basic/users/ghost/connection")
        await ghost.inbox.put({"type": "websocket.connect"})
        await asyncio.sleep(0.1)
        for _ in range(8):  # 4 s go by, past the claims' first life (2 s): only renewals keep them
            clock.advance(0.5)
            await asyncio.sleep(0.35)
        amy = Socket(mw_of(client), "/demo/basic/users/amy/connection")  # purges lapsed claims
        assert (await amy.open())["type"] == "websocket.accept"
        decide.set()
        answer = await asyncio.wait_for(ghost.outbox.get(), 5)
        assert answer["type"] == "websocket.close"
        await asyncio.wait_for(ghost.task, 5)
        assert await raw_members(store, f"q:{{demo#basic}}:dau:{day_of(clock)}") == {"amy"}
        assert await raw_members(store, f"q:{{demo#basic}}:mau:{day_of(clock)[:6]}") == {"amy"}
        await amy.close()


async def test_online_count_read_by_the_middlewares_clock(
    store: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Catches entitlements reading who is online by the system's clock while the middleware wrote
    the deadlines by its own: with the middleware's clock an hour behind, a connected user showed 0
    online in the admin API and on the dashboard."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", SOCKET_TOKEN)
    monkeypatch.setenv("QUOTA_READ_TOKEN", "sockets-read-token-0123456789")
    auth = {"authorization": f"Bearer {SOCKET_TOKEN}"}
    behind = Clock(time.time() - 3600, tick=0)
    async with make_client(store, behind) as client:
        await register(client, "demo/basic", ["amy"])
        ws = Socket(mw_of(client), "/demo/basic/users/amy/connection")
        assert (await ws.open())["type"] == "websocket.accept"
        try:
            usage = (await client.get("/_quota/entitlements/demo/basic", headers=auth)).json()["usage"]
            assert usage["online_users"]["used"] == 1, usage
            login = {"token": "sockets-read-token-0123456789"}
            signed = await client.post("/_quota/dashboard/login", data=login, headers={"origin": "http://gateway"})
            assert signed.status_code == 303, signed.text
            page = (await client.get("/_quota/dashboard/apps/demo/basic")).text
            assert re.search(r'data-tile="online">1 / ', page), page
        finally:
            await ws.close()
