"""Enforcement through HTTP, as a client of the wrapped gateway sees it, on both stores."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from quota.config import DEFAULT_DIR, load_config
from quota.decisions import plan_request
from quota.gateway import create_gateway
from quota.identifiers import IdPolicy
from quota.middleware import LANE_PATH, LANES
from quota.served_metrics import ServedMetrics, attach
from quota.store.memory import MemoryStore
from quota.store.program import AddOp
from tests.conftest import Clock, make_client
from tests.helpers import (
    JSON_TYPE,
    call_raw,
    create_room,
    entitlements,
    gateway_state,
    http_scope,
    middleware_of,
    raw_members,
    read_yaml,
    register,
    room_id,
    write_yaml,
)

FREE, BASIC, PRO, ENT = "demo/free", "demo/basic", "demo/pro", "demo/enterprise"
LANE_TOKEN = "lanes-admin-token-0123456789"
IM_ERROR_KEYS = {"error", "exception", "timestamp", "duration", "error_description"}


def assert_refused(r: httpx.Response, status: int, error: str, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert IM_ERROR_KEYS <= set(body), body
    assert body["error"] == error, body
    for word in words:
        assert word in body["error_description"], body
    return body


class TestFriends:
    async def test_cap_at_free_value(self, client: httpx.AsyncClient) -> None:
        """A free user holds 100 friends; the 101st add is refused with exceed_limit naming the limit."""
        users = [f"u{i}" for i in range(102)]
        await register(client, FREE, users)
        for friend in users[1:101]:
            r = await client.post(f"/{FREE}/users/u0/contacts/users/{friend}")
            assert r.status_code == 200, r.text
        r = await client.post(f"/{FREE}/users/u0/contacts/users/u101")
        body = assert_refused(r, 403, "exceed_limit", "friends_per_user", "free", "100")
        assert body["limit"] == "friends_per_user"
        ent = await entitlements(client, FREE, user="u0")
        assert ent["entities"]["user:u0"]["friends_per_user"] == {"used": 100, "limit": 100, "remaining": 0}

    async def test_invitee_side_is_capped(self, client: httpx.AsyncClient) -> None:
        """Adding a friend to a user whose own list is full is refused too (both sides count)."""
        users = [f"u{i}" for i in range(102)]
        await register(client, FREE, users)
        for friend in users[1:101]:
            assert (await client.post(f"/{FREE}/users/{friend}/contacts/users/u0")).status_code == 200
        r = await client.post(f"/{FREE}/users/u101/contacts/users/u0")
        assert_refused(r, 403, "exceed_limit", "u0")

    async def test_repeats_and_removals(self, client: httpx.AsyncClient) -> None:
        """Adding the same friend twice counts once; removing a non-friend never goes below zero."""
        await register(client, BASIC, ["a", "b", "c"])
        assert (await client.post(f"/{BASIC}/users/a/contacts/users/b")).status_code == 200
        assert (await client.post(f"/{BASIC}/users/a/contacts/users/b")).status_code == 200
        assert (await client.delete(f"/{BASIC}/users/a/contacts/users/c")).status_code == 404
        ent = await entitlements(client, BASIC, user="a")
        assert ent["entities"]["user:a"]["friends_per_user"]["used"] == 1
        assert (await client.delete(f"/{BASIC}/users/a/contacts/users/b")).status_code == 200
        assert (await client.delete(f"/{BASIC}/users/a/contacts/users/b")).status_code == 404
        ent = await entitlements(client, BASIC, user="a")
        assert ent["entities"]["user:a"]["friends_per_user"]["used"] == 0
        assert (await entitlements(client, BASIC, user="b"))["entities"]["user:b"]["friends_per_user"]["used"] == 0


@pytest.mark.parametrize(
    "kind,per_app,per_room,per_user",
    [
        ("chatgroups", "groups_per_app", "members_per_group", "groups_per_user"),
        ("chatrooms", "chatrooms_per_app", "members_per_chatroom", "chatrooms_per_user"),
    ],
)
class TestRooms:
    async def test_rooms_per_app_at_free_value(
        self, client: httpx.AsyncClient, kind: str, per_app: str, per_room: str, per_user: str
    ) -> None:
        """Free creates 100; the 101st is refused; deleting one frees its slot; ids are bound, not leaked."""
        await register(client, FREE, ["owner"])
        ids = []
        for _ in range(100):
            r = await create_room(client, FREE, kind, "owner")
            assert r.status_code == 200, r.text
            ids.append(room_id(r, kind))
        assert_refused(await create_room(client, FREE, kind, "owner"), 403, "forbidden_op", per_app, "100")
        ent = await entitlements(client, FREE)
        assert ent["usage"][per_app]["used"] == 100
        assert (await client.delete(f"/{FREE}/{kind}/{ids[0]}")).status_code == 200
        assert (await create_room(client, FREE, kind, "owner")).status_code == 200

    async def test_members_batch_all_or_nothing(
        self, client: httpx.AsyncClient, kind: str, per_app: str, per_room: str, per_user: str
    ) -> None:
        """A batch over the cap adds nobody and says how much room was left (the owner is a member)."""
        users = [f"m{i}" for i in range(110)]
        await register(client, FREE, ["owner", *users])
        rid = room_id(await create_room(client, FREE, kind, "owner"), kind)
        r = await client.post(f"/{FREE}/{kind}/{rid}/users", json={"usernames": users[:50]})
        assert r.status_code == 200, r.text
        r = await client.post(f"/{FREE}/{kind}/{rid}/users", json={"usernames": users[50:110]})
        assert_refused(r, 403, "forbidden_op", per_room, "room for 49")
        assert (
            len(gateway_state(client, FREE).groups.get(rid, gateway_state(client, FREE).chatrooms.get(rid))["members"])
            == 51
        )
        r = await client.post(f"/{FREE}/{kind}/{rid}/users", json={"usernames": users[50:99]})
        assert r.status_code == 200
        assert_refused(
            await client.post(f"/{FREE}/{kind}/{rid}/users/m99"), 403, "forbidden_op", per_room, "room for 0"
        )
        ent = await entitlements(client, FREE, **{"group" if kind == "chatgroups" else "chatroom": rid})
        assert list(ent["entities"].values())[0][per_room] == {"used": 100, "limit": 100, "remaining": 0}

    async def test_rooms_per_user_and_delete_frees(
        self, client: httpx.AsyncClient, kind: str, per_app: str, per_room: str, per_user: str
    ) -> None:
        """A free user joins at most 100; deleting a room frees its members' joined counts."""
        await register(client, FREE, ["owner", "joiner"])
        ids = []
        for _ in range(100):
            rid = room_id(await create_room(client, FREE, kind, "owner"), kind)
            assert (await client.post(f"/{FREE}/{kind}/{rid}/users/joiner")).status_code == 200
            ids.append(rid)
        ent = await entitlements(client, FREE, user="joiner")
        assert ent["entities"]["user:joiner"][per_user]["used"] == 100
        r = await client.delete(f"/{FREE}/{kind}/{ids[-1]}")
        assert r.status_code == 200, r.text
        ent = await entitlements(client, FREE, user="joiner")
        assert ent["entities"]["user:joiner"][per_user]["used"] == 99
        rid = room_id(await create_room(client, FREE, kind, "owner"), kind)
        assert (await client.post(f"/{FREE}/{kind}/{rid}/users/joiner")).status_code == 200

    async def test_rooms_per_user_refused(
        self, store: Any, clock: Clock, config_dir: Path, kind: str, per_app: str, per_room: str, per_user: str
    ) -> None:
        """A user at their joined cap is refused the next room, naming the user and the limit."""
        path = config_dir / "accounts.yaml"
        doc = read_yaml(path)
        doc["accounts"]["demo-enterprise"]["overrides"] = {per_user: 2}
        write_yaml(path, doc)
        async with make_client(store, clock, load_config(config_dir)) as client:
            await register(client, ENT, ["o0", "o1", "o2", "joiner", "other"])
            rids = [room_id(await create_room(client, ENT, kind, f"o{i}"), kind) for i in range(3)]
            for rid in rids[:2]:
                assert (await client.post(f"/{ENT}/{kind}/{rid}/users/joiner")).status_code == 200
            r = await client.post(f"/{ENT}/{kind}/{rids[2]}/users", json={"usernames": ["other", "joiner"]})
            body = assert_refused(r, 403, "forbidden_op", f"{per_user} is 2", "joiner")
            assert body["limit"] == per_user
            assert (await client.post(f"/{ENT}/{kind}/{rids[2]}/users/other")).status_code == 200
            # Rooms a user creates are rooms it is in: the joiner, in 2, creates none.
            r = await create_room(client, ENT, kind, "joiner")
            assert_refused(r, 403, "forbidden_op", f"{per_user} is 2")
            assert r.json()["limit"] == per_user

    async def test_deleting_user_frees_memberships(
        self, client: httpx.AsyncClient, kind: str, per_app: str, per_room: str, per_user: str
    ) -> None:
        """Deleting a user removes them from every room's member count and frees their friendships."""
        await register(client, FREE, ["owner", "gone", "friend"])
        rid = room_id(await create_room(client, FREE, kind, "owner"), kind)
        assert (await client.post(f"/{FREE}/{kind}/{rid}/users/gone")).status_code == 200
        assert (await client.post(f"/{FREE}/users/gone/contacts/users/friend")).status_code == 200
        assert (await client.delete(f"/{FREE}/users/gone")).status_code == 200
        ent = await entitlements(client, FREE, user="friend", **{"group" if kind == "chatgroups" else "chatroom": rid})
        values = list(ent["entities"].values())
        assert values[0]["friends_per_user"]["used"] == 0
        assert values[1][per_room]["used"] == 1  # the owner
        assert ent["usage"]["registered_users"]["used"] == 2


async def test_fill_at_real_value_basic_members(client: httpx.AsyncClient) -> None:
    """basic: 250 members per group at the seed's value, the owner one of them, the 251st refused."""
    users = [f"m{i}" for i in range(250)]
    await register(client, BASIC, ["owner", *users])
    rid = room_id(await create_room(client, BASIC, "chatgroups", "owner"), "chatgroups")
    for i in range(0, 240, 60):
        assert (
            await client.post(f"/{BASIC}/chatgroups/{rid}/users", json={"usernames": users[i : i + 60]})
        ).status_code == 200
    assert (
        await client.post(f"/{BASIC}/chatgroups/{rid}/users", json={"usernames": users[240:249]})
    ).status_code == 200
    assert_refused(
        await client.post(f"/{BASIC}/chatgroups/{rid}/users/m249"),
        403,
        "forbidden_op",
        "members_per_group is 250 on plan basic",
    )


async def test_override_lowers_cap(store: Any, clock: Clock, config_dir: Path) -> None:
    """An enterprise account's override is what the middleware enforces."""
    path = config_dir / "accounts.yaml"
    doc = read_yaml(path)
    doc["accounts"]["demo-enterprise"]["overrides"] = {"members_per_group": 3, "groups_per_app": 2}
    write_yaml(path, doc)
    async with make_client(store, clock, load_config(config_dir)) as client:
        await register(client, ENT, ["o", "a", "b", "c", "d"])
        rid = room_id(await create_room(client, ENT, "chatgroups", "o"), "chatgroups")
        r = await client.post(f"/{ENT}/chatgroups/{rid}/users", json={"usernames": ["a", "b", "c", "d"]})
        assert_refused(r, 403, "forbidden_op", "members_per_group is 3 on plan enterprise", "room for 2")
        assert (await create_room(client, ENT, "chatgroups", "o")).status_code == 200
        assert_refused(await create_room(client, ENT, "chatgroups", "o"), 403, "forbidden_op", "groups_per_app is 2")


SEED_CAPS = {  # from the seed, by hand
    "free": {
        "friends_per_user": 100,
        "groups_per_app": 100,
        "members_per_group": 100,
        "groups_per_user": 100,
        "chatrooms_per_app": 100,
        "members_per_chatroom": 100,
        "chatrooms_per_user": 100,
    },
    "basic": {
        "friends_per_user": 250,
        "groups_per_app": 100000,
        "members_per_group": 250,
        "groups_per_user": 1000,
        "chatrooms_per_app": 10000,
        "members_per_chatroom": 2000,
        "chatrooms_per_user": 1000,
    },
    "pro": {
        "friends_per_user": 1000,
        "groups_per_app": 50000,
        "members_per_group": 1000,
        "groups_per_user": 2000,
        "chatrooms_per_app": 50000,
        "members_per_chatroom": 10000,
        "chatrooms_per_user": 2000,
    },
    "enterprise": {
        "friends_per_user": 10000,
        "groups_per_app": 100000,
        "members_per_group": 5000,
        "groups_per_user": 10000,
        "chatrooms_per_app": 100000,
        "members_per_chatroom": 200000,
        "chatrooms_per_user": 10000,
    },
}


@pytest.mark.parametrize("plan", list(SEED_CAPS))
def test_real_values_are_what_requests_are_held_to(plan: str) -> None:
    """For every counted limit, the cap a request carries to the store is the seed's value."""
    cfg = load_config()
    from quota.plans import Directory

    directory = Directory(cfg.matrix, cfg.accounts)
    appkey = f"demo#{plan}"
    app = directory.lookup(appkey, datetime.now(UTC).date())
    assert app is not None
    if plan == "enterprise":
        app = type(app)(app.appkey, app.prefix, app.account, app.plan, dict(app.plan.limits))  # no overrides
    seen: dict[str, int] = {}
    for rule in cfg.routes.rules:
        for change in rule.changes:
            if change.op != "add":
                continue
            params = {
                "org": "demo",
                "app": plan,
                "owner": "a",
                "friend": "b",
                "group_id": "1",
                "chatroom_id": "2",
                "username": "u",
            }
            body = {"usernames": ["x"], "username": "x", "owner": "o"}
            built = plan_request(
                cfg.routes,
                rule,
                app,
                params,
                body,
                "1.2.3.4",
                0,
                ids=IdPolicy(),
                lease_ttl_ms=1000,
                reservation_ttl_ms=1,
            )
            for op in built.before.ops:
                if isinstance(op, AddOp):
                    if op.limit:
                        seen[op.limit] = op.cap
                    if op.reverse_limit:
                        seen[op.reverse_limit] = op.reverse_cap
    assert {k: v for k, v in seen.items() if k in SEED_CAPS[plan]} == SEED_CAPS[plan]


class TestRates:
    @pytest.fixture(autouse=True)
    def frozen(self, clock: Clock) -> None:
        clock.tick = 0

    async def test_per_ip_rate(self, client: httpx.AsyncClient, clock: Clock) -> None:
        """100/s per client IP per API: the 101st in a second gets 429 reach_limit with headers."""
        await register(client, PRO, ["a"])
        clock.advance(2)
        for _ in range(100):
            assert (await client.get(f"/{PRO}/users/a")).status_code == 200
        r = await client.get(f"/{PRO}/users/a")
        assert_refused(r, 429, "reach_limit")
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["ratelimit-limit"] == "100" and r.headers["ratelimit-remaining"] == "0"
        assert int(r.headers["ratelimit-reset"]) >= 1
        # Another API has its own budget.
        assert (await client.get(f"/{PRO}/users/a/contacts/users")).status_code == 200
        clock.advance(2.0)
        assert (await client.get(f"/{PRO}/users/a")).status_code == 200

    async def test_other_ip_has_its_own_budget(self, store: Any, clock: Clock) -> None:
        """Two client IPs each get 100/s."""
        async with (
            make_client(store, clock, client_ip="10.0.0.1") as one,
            make_client(store, clock, client_ip="10.0.0.2") as two,
        ):
            for _ in range(100):
                await one.get(f"/{PRO}/users")
            assert (await one.get(f"/{PRO}/users")).status_code == 429
            assert (await two.get(f"/{PRO}/users")).status_code == 200

    async def test_history_once_a_minute_per_app(self, store: Any, clock: Clock) -> None:
        """The history file: once a minute per app, whatever the IP."""
        hour = (datetime.fromtimestamp(clock.now, UTC) - timedelta(hours=2)).strftime("%Y%m%d%H")
        async with (
            make_client(store, clock, client_ip="10.0.0.1") as one,
            make_client(store, clock, client_ip="10.0.0.2") as two,
        ):
            assert (await one.get(f"/{PRO}/chatmessages/{hour}")).status_code == 200
            r = await two.get(f"/{PRO}/chatmessages/{hour}")
            assert_refused(r, 429, "reach_limit", "history_export_per_app")
            assert int(r.headers["retry-after"]) > 1
            assert (await two.get(f"/{BASIC}/chatmessages/{hour}")).status_code == 200
            clock.advance(120)
            assert (await two.get(f"/{PRO}/chatmessages/{hour}")).status_code == 200

    @pytest.mark.parametrize("pro_rate", ["10/minute", "1/second"])
    async def test_a_refusal_remembered_ends_with_its_plan(
        self, config_dir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch, pro_rate: str
    ) -> None:
        """Catches the deny cache holding a refusal past a change of plan: demo-free moves to a pro
        plan whose history export is 10 a minute, or once a second (a higher limit, or a shorter
        window), from the 1st of next month through the admin API; refused at 23:59:30 on free's
        once a minute, the export is let through at 00:00:10 on pro, not refused from memory until
        free's minute is over."""
        doc = read_yaml(config_dir / "plans.yaml")
        doc["plans"]["pro"]["rates"]["history_export_per_app"] = pro_rate
        write_yaml(config_dir / "plans.yaml", doc)
        monkeypatch.setenv("QUOTA_ADMIN_TOKEN", LANE_TOKEN)
        this_month = datetime.now(UTC).date().replace(day=1)
        next_month = (this_month + timedelta(days=32)).replace(day=1)
        clock.tick = 0
        clock.now = datetime(next_month.year, next_month.month, 1, tzinfo=UTC).timestamp() - 30
        hour = (datetime.fromtimestamp(clock.now, UTC) - timedelta(hours=2)).strftime("%Y%m%d%H")
        async with make_client(MemoryStore(), clock, config=load_config(config_dir)) as c:
            r = await c.post(
                "/_quota/accounts/demo-free/change-plan",
                json={"plan": "pro", "date": this_month.isoformat()},
                headers={"authorization": f"Bearer {LANE_TOKEN}"},
            )
            assert r.status_code == 200, r.text
            assert (await c.get(f"/{FREE}/chatmessages/{hour}")).status_code == 200
            assert_refused(await c.get(f"/{FREE}/chatmessages/{hour}"), 429, "reach_limit", "history_export_per_app")
            clock.advance(40)
            r = await c.get(f"/{FREE}/chatmessages/{hour}")
            assert r.status_code == 200, r.text

    async def test_route_figure_from_reference(self, client: httpx.AsyncClient, clock: Clock) -> None:
        """Per-endpoint figures of the reference apply: group messages at 20/s."""
        for _ in range(20):
            assert (await client.post(f"/{PRO}/messages/chatgroups", json={"to": ["g"]})).status_code == 200
        assert (await client.post(f"/{PRO}/messages/chatgroups", json={"to": ["g"]})).status_code == 429

    async def test_unknown_route_gets_general_rate(self, client: httpx.AsyncClient) -> None:
        """Routes outside the map still get the general per-IP rate."""
        codes = [(await client.get("/nowhere")).status_code for _ in range(101)]
        assert codes[:100] == [404] * 100 and codes[100] == 429


GATED = [
    ("POST", "/messages/translate", "translation"),
    ("POST", "/messages/report", "message_report"),
    ("PUT", "/callbacks", "message_event_callbacks"),
    ("PUT", "/callbacks/user_status", "user_status_callbacks"),
    ("PUT", "/callbacks/pre_send", "pre_send_callbacks"),
    ("PUT", "/moderation/text", "text_moderation"),
    ("PUT", "/moderation/image", "image_moderation"),
    ("POST", "/chatgroups/1/read_receipts", "group_read_receipts"),
]


@pytest.mark.parametrize("method,path,feature", GATED, ids=[g[2] for g in GATED])
async def test_feature_gates(client: httpx.AsyncClient, method: str, path: str, feature: str) -> None:
    """Each gated route is refused on free and basic (forbidden_op naming the feature) and passes on pro+."""
    for app in (FREE, BASIC):
        r = await client.request(method, f"/{app}{path}", json={})
        assert_refused(r, 403, "forbidden_op", feature)
    for app in (PRO, ENT):
        r = await client.request(method, f"/{app}{path}", json={})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("app,days", [(FREE, 7), (BASIC, 90), (PRO, 180), (ENT, 180)])
async def test_history_retention(client: httpx.AsyncClient, clock: Clock, app: str, days: int) -> None:
    """Catches retention off by one at its boundary, or missing on enterprise: with the clock on the
    hour, the hour exactly 7, 90 or 180 days back (enterprise: its default 180) is kept and the hour
    before it refused."""
    clock.tick = 0
    clock.now = float(int(clock.now) // 3600 * 3600)
    now = datetime.fromtimestamp(clock.now, UTC)
    r = await client.get(f"/{app}/chatmessages/{now - timedelta(days=days):%Y%m%d%H}")
    assert r.status_code == 200, r.text
    clock.advance(120)  # past the history export's once-a-minute rate
    r = await client.get(f"/{app}/chatmessages/{now - timedelta(days=days, hours=1):%Y%m%d%H}")
    body = assert_refused(r, 403, "forbidden_op", f"message_retention_days is {days} on plan")
    assert body["limit"] == "message_retention_days"
    assert body["error_description"].endswith(f"history before {now - timedelta(days=days):%Y%m%d%H} is not kept")


async def test_history_hour_that_is_no_hour_is_400(client: httpx.AsyncClient) -> None:
    """Catches an export asked for an hour that does not exist (10 digits, month 13) passing the
    retention check, or failing as anything but 400 illegal_argument that says what it expected."""
    r = await client.get(f"/{PRO}/chatmessages/2026139999")
    assert_refused(r, 400, "illegal_argument")
    assert r.json()["error_description"] == "time must be yyyyMMddHH, found '2026139999'"
    r = await client.get(f"/{PRO}/chatmessages/{'2026' * 6}")  # quoted up to 20 characters
    assert r.json()["error_description"] == "time must be yyyyMMddHH, found '20262026202620262026'"


async def test_a_path_value_over_the_bound_is_400(client: httpx.AsyncClient) -> None:
    """Catches a 300-character id reaching the id policy (or the store) unbounded, or refused
    without saying why."""
    r = await client.get(f"/{PRO}/users/{'a' * 300}")
    assert_refused(r, 400, "illegal_argument")
    assert r.json()["error_description"] == "path parameter username is too long"


async def test_enterprise_retention_override(store: Any, clock: Clock, config_dir: Path) -> None:
    """Catches retention read from the plan instead of the account: an enterprise account whose
    override is 30 days still served 180 days of history."""
    path = config_dir / "accounts.yaml"
    doc = read_yaml(path)
    doc["accounts"]["demo-enterprise"]["overrides"] = {"message_retention_days": 30}
    write_yaml(path, doc)
    clock.tick = 0
    clock.now = float(int(clock.now) // 3600 * 3600)
    now = datetime.fromtimestamp(clock.now, UTC)
    async with make_client(store, clock, load_config(config_dir)) as client:
        assert (await client.get(f"/{ENT}/chatmessages/{now - timedelta(days=30):%Y%m%d%H}")).status_code == 200
        clock.advance(120)
        r = await client.get(f"/{ENT}/chatmessages/{now - timedelta(days=30, hours=1):%Y%m%d%H}")
        assert_refused(r, 403, "forbidden_op", "message_retention_days is 30 on plan enterprise")


async def test_concurrent_joins_exact(store: Any, clock: Clock) -> None:
    """Catches a cap that concurrent joins walk past (a check and its add not atomic): 500 joins
    against basic's 250 members per group (the owner one), with every admitted join held at the
    upstream until 249 are in flight at once, so all the others are checked while those adds are
    unsettled. Exactly 249 pass, on the memory store too (which only races when a request awaits between its check
    and its add)."""
    gateway = create_gateway()
    in_flight = {"n": 0}
    full = asyncio.Event()

    async def holding(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and "/chatgroups/" in scope["path"]:
            in_flight["n"] += 1
            if in_flight["n"] >= 249:
                full.set()
            await asyncio.wait_for(full.wait(), 30)
        await gateway(scope, receive, send)

    holding.state = gateway.state  # type: ignore[attr-defined]
    async with make_client(store, clock, upstream=holding) as client:
        users = [f"c{i}" for i in range(500)]
        await register(client, BASIC, ["owner", *users])
        rid = room_id(await create_room(client, BASIC, "chatgroups", "owner"), "chatgroups")
        results = await asyncio.gather(*(client.post(f"/{BASIC}/chatgroups/{rid}/users/{u}") for u in users))
        codes = [r.status_code for r in results]
        assert codes.count(200) == 249 and codes.count(403) == 251 and in_flight["n"] == 249
        assert len(gateway_state(client, BASIC).groups[rid]["members"]) == 250
        assert len(await raw_members(store, f"q:{{demo#basic}}:s:group_members:o:{rid}")) == 250


async def test_upstream_failures_are_undone(store: Any, clock: Clock) -> None:
    """With a third of upstream calls failing or raising, counters equal what succeeded."""
    gateway = create_gateway()
    rng = random.Random(7)

    async def flaky(scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and "/users/" in scope["path"]
            and "chatgroups" in scope["path"]
        ):
            roll = rng.random()
            if roll < 1 / 6:
                await send({"type": "http.response.start", "status": 500, "headers": []})
                await send({"type": "http.response.body", "body": b"{}"})
                return
            if roll < 1 / 3:
                raise RuntimeError("upstream crashed")
        await gateway(scope, receive, send)

    async with make_client(store, clock, upstream=flaky) as client:
        users = [f"f{i}" for i in range(90)]
        await register(client, PRO, ["owner", *users])
        rid = room_id(await create_room(client, PRO, "chatgroups", "owner"), "chatgroups")
        for u in users:
            try:
                await client.post(f"/{PRO}/chatgroups/{rid}/users/{u}")
            except RuntimeError:
                pass
        truth = gateway.state.gateway.apps["demo#pro"].groups[rid]["members"]
        assert 30 < len(truth) < 90
        ent = await entitlements(client, PRO, group=rid)
        assert ent["entities"][f"group:{rid}"]["members_per_group"]["used"] == len(truth)
        for u in users:
            joined = (await entitlements(client, PRO, user=u))["entities"][f"user:{u}"]["groups_per_user"]["used"]
            assert joined == (1 if u in truth else 0)


def _any_ids_gateway() -> Any:
    """The reference gateway under the same wider id policy as the test's quota."""
    from quota.gateway import create_gateway

    return create_gateway(user_id=r"[^,/.]{1,64}")


class TestInput:
    async def test_malformed_body(self, client: httpx.AsyncClient) -> None:
        """Catches a body a counted route cannot read reaching the store, or a 400 that does not say
        what is wrong: invalid JSON, wrong types, an empty body and oversize batches change nothing."""
        for content, says in (
            (b"{not json", "request body is not valid JSON"),
            (b'{"usernames": 5}', "body.usernames must be a string or a list of strings"),
            (b'{"usernames": [1.5]}', "body.usernames must be a string or a list of strings"),
            (b"[]", "body.usernames must be a string or a list of strings"),
            (b"", "body.usernames is missing"),
        ):
            r = await client.post(f"/{PRO}/chatgroups/1/users", content=content, headers=JSON_TYPE)
            assert assert_refused(r, 400, "illegal_argument")["error_description"] == says
        r = await client.post(f"/{PRO}/chatgroups/1/users", json={"usernames": [f"x{i}" for i in range(61)]})
        assert_refused(r, 400, "illegal_argument", "at most 60")
        r = await client.post(f"/{PRO}/users", content=b"\xff\xfe", headers=JSON_TYPE)
        assert_refused(r, 400, "illegal_argument")
        assert (await entitlements(client, PRO))["usage"]["registered_users"]["used"] == 0

    async def test_body_limit(self, store: Any, clock: Clock, config_dir: Path) -> None:
        """A body over max_body_bytes is refused with 413."""
        (config_dir / "quota.yaml").write_text("max_body_bytes: 64\n")
        async with make_client(store, clock, load_config(config_dir)) as client:
            r = await client.post(f"/{PRO}/users", json=[{"username": "x" * 100}])
            assert_refused(r, 413, "request_too_large")

    async def test_ids_outside_the_policy_are_refused(self, client: httpx.AsyncClient) -> None:
        """Catches ids with key characters reaching the store: the vendor's policy refuses them (400)."""
        for name in ("a{b}", "c:d", "e#f", "ü", "x" * 65, "a,b"):
            r = await client.post(f"/{PRO}/users", json={"username": name})
            assert_refused(r, 400, "illegal_argument")
        assert (await entitlements(client, PRO))["usage"]["registered_users"]["used"] == 0

    async def test_ids_with_key_characters(self, store: Any, clock: Clock, config_dir: Path) -> None:
        """Under a wider id policy, ids with braces, colons and non-ASCII letters are escaped: they
        count, and never reach another key."""
        (config_dir / "quota.yaml").write_text('identifiers: {user: {pattern: "(?!\\\\.\\\\.?$)[a-zü:{}]{1,64}"}}\n')
        names = ["a{b}", "c:d", "ü"]
        async with make_client(store, clock, load_config(config_dir), upstream=_any_ids_gateway()) as client:
            await register(client, PRO, ["owner", *names])
            rid = room_id(await create_room(client, PRO, "chatgroups", "owner"), "chatgroups")
            r = await client.post(f"/{PRO}/chatgroups/{rid}/users", json={"usernames": names})
            assert r.status_code == 200, r.text
            ent = await entitlements(client, PRO, group=rid, user="a{b}")
            assert ent["entities"][f"group:{rid}"]["members_per_group"]["used"] == 4  # and the owner
            assert ent["entities"]["user:a{b}"]["groups_per_user"]["used"] == 1

    async def test_unknown_app(self, client: httpx.AsyncClient) -> None:
        """An app no account holds is refused, not let through unmetered."""
        assert_refused(await client.get("/nobody/nothing/users"), 404, "service_resource_not_found")

    @pytest.mark.parametrize(
        "method,path",
        [
            ("GET", "/users/a"),  # a rate only
            ("POST", "/users/a/contacts/users/b"),  # a counter, settled after the answer
            ("POST", "/chatgroups"),  # a create: its answer is read for the id
            ("POST", "/messages/chatgroups"),  # a feature and a route rate
        ],
    )
    @pytest.mark.parametrize("headed", [False, True], ids=["default", "ratelimit_headers"])
    async def test_responses_pass_through_untouched(
        self, client: httpx.AsyncClient, config_dir: Path, method: str, path: str, headed: bool
    ) -> None:
        """Catches an allowed answer changed on its way back (a header dropped, reordered or added,
        beyond the RateLimit-* asked for with `ratelimit_headers`; the status, the body) or no longer
        streamed (chunks joined, `more_body` lost): the client gets the messages the upstream sent,
        chunk by chunk."""
        mw = client._transport.app  # type: ignore[attr-defined]
        if headed:
            (config_dir / "quota.yaml").write_text("ratelimit_headers: true\n")
            mw.reload(config_dir)
        upstream_sent: list[Any] = []

        async def streaming(scope: Any, receive: Any, send: Any) -> None:
            async def keep(message: Any) -> None:
                upstream_sent.append(message)
                await send(message)

            headers = [
                (b"content-type", b"application/x-ndjson"),
                (b"x-upstream", b"yes"),
                (b"set-cookie", b"a=1"),
                (b"set-cookie", b"b=2"),
            ]
            await keep({"type": "http.response.start", "status": 207, "headers": headers})
            for chunk in (b'{"data": {"groupid": "5"}}', b"\n", b"second\n"):
                await keep({"type": "http.response.body", "body": chunk, "more_body": True})
            await keep({"type": "http.response.body", "body": b"", "more_body": False})

        mw.app = streaming
        got: list[Any] = []

        async def receive() -> Any:
            return {"type": "http.request", "body": b'{"owner": "a", "to": ["g"]}', "more_body": False}

        async def send(message: Any) -> None:
            got.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": f"/{PRO}{path}",
            "raw_path": f"/{PRO}{path}".encode(),
            "root_path": "",
            "query_string": b"",
            "client": ("10.1.2.3", 1234),
            "server": ("gateway", 80),
            "headers": [(b"content-type", b"application/json"), (b"accept-encoding", b"gzip")],
        }
        await mw(scope, receive, send)
        assert len(upstream_sent) == 5
        # The body, chunk by chunk with its more_body flags, and the status: exactly the upstream's.
        assert got[1:] == upstream_sent[1:] and got[0]["status"] == 207
        # The upstream's headers, in order; quota appends only its RateLimit-*, and only when asked.
        sent_headers, got_headers = upstream_sent[0]["headers"], got[0]["headers"]
        assert got_headers[: len(sent_headers)] == sent_headers
        added = [b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset"] if headed else []
        assert [k for k, _ in got_headers[len(sent_headers) :]] == added


class TestClientIp:
    @pytest.fixture(autouse=True)
    def frozen(self, clock: Clock) -> None:
        clock.tick = 0

    async def test_forwarded_for_only_from_trusted_proxy(self, store: Any, clock: Clock) -> None:
        """X-Forwarded-For is believed from a trusted proxy, ignored from anyone else."""
        async with (
            make_client(store, clock, client_ip="127.0.0.1") as proxy,
            make_client(store, clock, client_ip="10.9.9.9") as direct,
        ):
            for _ in range(100):
                assert (await proxy.get(f"/{PRO}/users", headers={"x-forwarded-for": "1.1.1.1"})).status_code == 200
            assert (await proxy.get(f"/{PRO}/users", headers={"x-forwarded-for": "1.1.1.1"})).status_code == 429
            assert (await proxy.get(f"/{PRO}/users", headers={"x-forwarded-for": "2.2.2.2"})).status_code == 200
            # An untrusted peer cannot borrow another address's budget or escape its own.
            for i in range(100):
                await direct.get(f"/{PRO}/users", headers={"x-forwarded-for": f"3.3.3.{i}"})
            assert (await direct.get(f"/{PRO}/users", headers={"x-forwarded-for": "4.4.4.4"})).status_code == 429


class TestLanes:
    """A request like an earlier one (method, path, client address) takes its lane: the checks that
    need no I/O are not run again. Each test catches a lane that outlives what it was decided on."""

    async def test_the_url_and_body_bounds_still_hold(self, clock: Clock) -> None:
        """Catches a lane skipping the query's share of the URL bound or the declared body bound."""
        async with make_client(MemoryStore(), clock) as c:
            for _ in range(2):
                assert (await c.get(f"/{PRO}/users")).status_code == 200
            assert (await c.get(f"/{PRO}/users", params={"q": "x" * 9000})).status_code == 414
            r = await c.request("GET", f"/{PRO}/users", headers={"content-length": str(1 << 30)})
            assert r.status_code == 413

    async def test_one_clients_lane_is_not_anothers(self, tmp_path: Path, clock: Clock) -> None:
        """Catches a lane keyed without the client's address: an allowlisted client's lane would let
        every other address through the same path."""
        target = tmp_path / "config"
        shutil.copytree(DEFAULT_DIR, target)
        doc = read_yaml(target / "accounts.yaml")
        doc["accounts"]["demo-pro"]["ip_allowlist"] = ["1.1.1.1"]
        write_yaml(target / "accounts.yaml", doc)
        async with make_client(MemoryStore(), clock, config=load_config(target), client_ip="127.0.0.1") as proxy:
            for _ in range(3):
                r = await proxy.get(f"/{PRO}/users", headers={"x-forwarded-for": "1.1.1.1"})
                assert r.status_code == 200, r.text
            r = await proxy.get(f"/{PRO}/users", headers={"x-forwarded-for": "2.2.2.2"})
            assert_refused(r, 403, "forbidden_op", "2.2.2.2 is not in the app's IP allowlist")

    async def test_a_lane_ends_with_its_day(self, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
        """Catches a lane kept past midnight: demo-pro moves down to free (through the admin API),
        which lands at the month's end; on the month's last day its translation is allowed on a lane,
        and refused once the clock reaches the next month."""
        monkeypatch.setenv("QUOTA_ADMIN_TOKEN", LANE_TOKEN)
        auth = {"authorization": f"Bearer {LANE_TOKEN}"}
        this_month = datetime.now(UTC).date().replace(day=1)
        next_month = (this_month + timedelta(days=32)).replace(day=1)
        clock.tick = 0
        clock.now = datetime(next_month.year, next_month.month, 1, tzinfo=UTC).timestamp() - 12 * 3600
        translate = f"/{PRO}/messages/translate"
        async with make_client(MemoryStore(), clock) as c:
            r = await c.post(
                "/_quota/accounts/demo-pro/change-plan",
                json={"plan": "free", "date": this_month.isoformat()},
                headers=auth,
            )
            assert r.status_code == 200, r.text
            for _ in range(3):
                assert (await c.post(translate, json={"text": "hi"})).status_code == 200
            clock.advance(86400)
            r = await c.post(translate, json={"text": "hi"})
            assert_refused(r, 403, "forbidden_op", "translation", "free")

    @pytest.mark.parametrize("served", [False, True])
    async def test_a_lanes_decisions_are_counted(
        self, clock: Clock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, served: bool
    ) -> None:
        """Catches allowed requests on a lane missing from quota_decisions_total (a lane counts in a
        slot of its own, folded in when read) or counted twice: in one process, and as `quota serve`
        scrapes its workers, through the snapshot each writes for the others, its metrics attached
        once lanes exist (a lane's slot is its first metrics', never an index into others)."""
        monkeypatch.setenv("QUOTA_ADMIN_TOKEN", LANE_TOKEN)
        auth = {"authorization": f"Bearer {LANE_TOKEN}"}
        async with make_client(MemoryStore(), clock) as c:
            for _ in range(3):
                assert (await c.get(f"/{PRO}/users")).status_code == 200
            if served:
                attach(middleware_of(c), ServedMetrics(outage=lambda: "", shared_dir=tmp_path))
            for _ in range(4):
                assert (await c.get(f"/{PRO}/users")).status_code == 200
            for _ in range(2):
                assert (await c.get(f"/{FREE}/users")).status_code == 200
            text = (await c.get("/_quota/metrics", headers=auth)).text
            pro = 4 if served else 7
            assert f'quota_decisions_total{{limit="",outcome="allowed",plan="pro",route="users.list"}} {pro}.0' in text
            assert 'quota_decisions_total{limit="",outcome="allowed",plan="free",route="users.list"} 2.0' in text
            if served:
                written = json.loads(next(tmp_path.glob("worker-*.json")).read_text())
                assert ["users.list", "", "pro", "allowed", 4] in written["decisions"]

    @pytest.mark.parametrize(
        ("path", "body", "raw"),
        [
            # A friend add: no body, its ids from the path alone, so it takes a lane.
            (f"/{PRO}/users/a/contacts/users/b", None, f"/{PRO}/users/a/contacts/users%2Fb"),
            # A registration reads its body: no lane, its route and app memoised.
            (f"/{PRO}/users", [{"username": "c"}], f"/{PRO}%2Fusers"),
        ],
        ids=["lane", "memo"],
    )
    async def test_a_lane_or_memo_still_checks_its_url_and_body(
        self, clock: Clock, path: str, body: Any, raw: str
    ) -> None:
        """A write whose ids are its path's takes a lane; a route that reads its body has its route
        and app memoised by method, path and raw path. Catches either skipping the query's share of
        the URL bound, the declared body bound, or the raw path: `%2F` decodes to the same path, and
        is another path upstream."""
        async with make_client(MemoryStore(), clock) as c:
            mw = middleware_of(c)
            await register(c, PRO, ["a", "b"])
            for _ in range(2):
                assert (await c.post(path, json=body)).status_code in (200, 400)
            memo = mw.runtime.directory.lanes(mw.today(clock.now))
            # So that what follows is asked of the lane, or of the memo.
            held = [key for key in memo if key[:3] == ("POST", path, path.encode())]
            assert [len(key) for key in held] == [4 if body is None else 3]
            assert (await c.post(path, json=body, params={"q": "x" * 9000})).status_code == 414
            assert (await c.post(path, json=body, headers={"content-length": str(1 << 30)})).status_code == 413
            odd = http_scope("POST", path, raw_path=raw.encode())
            sent = await call_raw(mw, odd)
            assert sent[0]["status"] == 400 and b"encoded slashes" in sent[1]["body"]
            assert (await c.post(path, json=body)).status_code in (200, 400)

    async def test_a_laned_add_is_still_held_to_its_cap(self, clock: Clock, tmp_path: Path) -> None:
        """A lane keeps an add's plan, never its verdict. Catches a lane that carried what the store
        said the first time: a friend add refused at the cap refused for the day after the friend
        that filled it was removed, or one allowed before allowed past the cap."""
        target = tmp_path / "config"
        shutil.copytree(DEFAULT_DIR, target)
        doc = read_yaml(target / "plans.yaml")
        doc["plans"]["free"]["limits"]["friends_per_user"] = 1
        write_yaml(target / "plans.yaml", doc)
        async with make_client(MemoryStore(), clock, config=load_config(target)) as c:
            mw = middleware_of(c)
            await register(c, FREE, ["a", "b", "c"])
            ab, ac = f"/{FREE}/users/a/contacts/users/b", f"/{FREE}/users/a/contacts/users/c"
            for _ in range(3):
                assert (await c.post(ac)).status_code == 200
            for _ in range(3):
                assert_refused(await c.post(ab), 403, "exceed_limit", "friends_per_user")
            lanes = mw.runtime.directory.lanes(mw.today(clock.now))
            assert {key[1] for key in lanes if key[0] == "POST" and len(key) == 4} >= {ab, ac}
            assert (await c.delete(ac)).status_code == 200
            for _ in range(2):
                assert (await c.post(ab)).status_code == 200
            assert_refused(await c.post(ac), 403, "exceed_limit", "friends_per_user")
            await mw.guard.flush()
            assert await raw_members(mw.runtime.store, "q:{demo#free}:s:contacts:o:a") == {"b"}
            assert gateway_state(c, FREE).contacts["a"] == {"b"}

    async def test_a_lane_is_its_methods_alone(self, clock: Clock) -> None:
        """Catches a lane keyed without the method: the DELETE of a laned friend add would be taken
        for the add, counted as one, and the friend never freed from the cap."""
        async with make_client(MemoryStore(), clock) as c:
            await register(c, PRO, ["a", "b"])
            add = f"/{PRO}/users/a/contacts/users/b"
            for _ in range(2):
                assert (await c.post(add)).status_code == 200
            assert (await c.delete(add)).status_code == 200
            assert (await c.head(add)).status_code in (404, 405)
            assert await raw_members(middleware_of(c).runtime.store, "q:{demo#pro}:s:contacts:o:a") == set()
            assert gateway_state(c, PRO).contacts.get("a", set()) == set()

    async def test_a_laned_write_ends_with_its_apps(self, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
        """Catches a lane kept past a change of its app's account: demo-pro is frozen through the
        admin API, and the friend add laned a moment ago is refused."""
        monkeypatch.setenv("QUOTA_ADMIN_TOKEN", LANE_TOKEN)
        async with make_client(MemoryStore(), clock) as c:
            await register(c, PRO, ["a", "b"])
            add = f"/{PRO}/users/a/contacts/users/b"
            for _ in range(2):
                assert (await c.post(add)).status_code == 200
            r = await c.post("/_quota/accounts/demo-pro/freeze", headers={"authorization": f"Bearer {LANE_TOKEN}"})
            assert r.status_code == 200, r.text
            assert_refused(await c.post(add), 403, "forbidden_op", "frozen")

    async def test_refusals_before_the_store_memoise_nothing(self, clock: Clock) -> None:
        """Catches a route memoised before its checks pass: a client naming fresh paths the route
        map refuses, or fresh ids that are not ids, filled the memo past LANES and emptied every
        app's lanes with it."""
        async with make_client(MemoryStore(), clock) as c:
            mw = middleware_of(c)
            assert (await c.get(f"/{PRO}/users")).status_code == 200
            lanes = mw.runtime.directory.lanes(mw.today(clock.now))
            laned = list(lanes)
            for i in range(LANES + 1):
                assert (await c.get(f"/{PRO}/zz{i}")).status_code == 404
                r = await c.post(f"/{PRO}/users/{'x' * 65}{i}/contacts/users/b")
                assert r.status_code == 400, r.text
            assert list(lanes) == laned and len(laned) == 1

    async def test_lanes_are_bounded(self, clock: Clock) -> None:
        """Catches lanes growing with every path a client names (past LANES they are emptied), and a
        lane kept on a long path (a prefix route takes any depth: 1,024 lanes of 8 KB paths)."""
        async with make_client(MemoryStore(), clock) as c:
            mw = middleware_of(c)
            for i in range(LANES + 50):
                # A registered user's joined groups: a read route, one lane a user id.
                assert (await c.get(f"/{PRO}/users/u{i}/joined_chatgroups")).status_code in (200, 404)
            lanes = mw.runtime.directory.lanes(mw.today(clock.now))
            assert 0 < len(lanes) <= LANES
            lanes.clear()
            for depth in (10, LANE_PATH):
                r = await c.post(f"/{PRO}/messages/translate/" + "x" * depth, json={"text": "hi"})
                assert r.status_code in (200, 404), r.text
            assert [len(key[1]) for key in lanes] == [len(f"/{PRO}/messages/translate/") + 10]
            lanes.clear()
            for i in range(LANES + 50):
                # A friend add: a lane a path (one client).
                assert (await c.post(f"/{PRO}/users/a/contacts/users/u{i}")).status_code in (200, 404)
            assert 0 < len(lanes) <= LANES
            lanes.clear()
            for depth in (10, LANE_PATH):
                r = await c.post(f"/{PRO}/users/a/contacts/users/" + "b" * depth)
                assert r.status_code in (200, 400, 404), r.text
            assert [len(key[1]) for key in lanes] == [len(f"/{PRO}/users/a/contacts/users/") + 10]
