"""The route map as requests meet it: per-route fixed rates, Retry-After, trailing slashes. Time is
the test's `Clock` (tick 0: it moves only when the test moves it)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from quota.config import load_config
from tests.conftest import Clock, make_client
from tests.helpers import raw_members, read_yaml, register, write_yaml

PRO = "demo/pro"


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    """An upstream that answers 200 `{}` to every path (with or without a trailing slash)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.parametrize(
    "method,path,amount",
    [
        ("DELETE", "/users", 30),
        ("GET", "/users/a/joined_chatgroups", 50),
        ("GET", "/users/a/joined_chatrooms", 50),
        ("GET", "/chatrooms", 50),
        ("POST", "/users/batch/status", 50),
        ("GET", "/users/a/blocks/users", 50),
        ("POST", "/users/a/blocks/users", 50),
        ("DELETE", "/users/a/blocks/users/b", 50),
    ],
)
async def test_fixed_route_rates(store: Any, clock: Clock, method: str, path: str, amount: int) -> None:
    """Catches a route's fixed rate (30/s on the batch delete, 50/s on joined lists and chatrooms)
    replaced by the plan's general 100/s, or not applied at all."""
    clock.tick = 0
    clock.now = float(int(clock.now)) + 0.25
    async with make_client(store, clock, upstream=_ok) as client:
        codes = [(await client.request(method, f"/{PRO}{path}")).status_code for _ in range(amount + 1)]
        assert codes == [200] * amount + [429]
        r = await client.request(method, f"/{PRO}{path}")
        assert r.status_code == 429 and r.headers["ratelimit-limit"] == str(amount)
        assert f"{amount} per 1s" in r.json()["error_description"]
        clock.advance(2)
        assert (await client.request(method, f"/{PRO}{path}")).status_code == 200


async def test_retry_after_rounds_up(store: Any, clock: Clock) -> None:
    """Catches Retry-After (and RateLimit-Reset) rounded down: a client told 60 s came back a
    millisecond early and was refused again. The history export is 1 per minute per app, an exact
    log: a hit counts while now <= its time + 60 s, so the next is free 60.001 s later (61 s)."""
    clock.tick = 0
    minute = float(int(clock.now) // 60 * 60 + 120)
    clock.now = minute + 29.6
    hour = datetime.fromtimestamp(clock.now, UTC).strftime("%Y%m%d%H")
    async with make_client(store, clock, upstream=_ok) as client:
        assert (await client.get(f"/{PRO}/chatmessages/{hour}")).status_code == 200
        r = await client.get(f"/{PRO}/chatmessages/{hour}")
        assert r.status_code == 429
        assert r.headers["retry-after"] == "61" and r.headers["ratelimit-reset"] == "61"
        clock.advance(60.0)
        assert (await client.get(f"/{PRO}/chatmessages/{hour}")).status_code == 429
        clock.advance(0.002)
        assert (await client.get(f"/{PRO}/chatmessages/{hour}")).status_code == 200


async def test_trailing_slash_is_the_same_route(store: Any, clock: Clock) -> None:
    """Catches a trailing slash escaping the route (counted nothing, or refused as an unnamed path)
    and a route whose budget splits in two, with the slash and without."""
    clock.tick = 0
    async with make_client(store, clock, upstream=_ok) as client:
        assert (await client.post(f"/{PRO}/users/a/contacts/users/b/")).status_code == 200
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:a") == {"b"}
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:b") == {"a"}
        assert (await client.delete(f"/{PRO}/users/a/contacts/users/b/")).status_code == 200
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:a") == set()
        codes = [(await client.get(f"/{PRO}/users/x{'/' if i % 2 else ''}")).status_code for i in range(101)]
        assert codes == [200] * 100 + [429]


async def test_registered_users_count_through_a_trailing_slash(store: Any, clock: Clock) -> None:
    """Catches `POST /users/` (with the slash) registering users uncounted on the reference gateway
    path shape."""
    async with make_client(store, clock, upstream=_ok) as client:
        await register(client, PRO, ["z"])
        assert (await client.post(f"/{PRO}/users/", json={"username": "y"})).status_code == 200
        assert await raw_members(store, "q:{demo#pro}:s:app_users:o:demo%23pro") == {"y", "z"}


async def test_bad_id_is_a_400_that_says_why(store: Any, clock: Clock) -> None:
    """Catches an id outside the policy refused without saying which id and which rule, or with
    another status: the vendor's 400 illegal_argument names both."""
    async with make_client(store, clock, upstream=_ok) as client:
        r = await client.get(f"/{PRO}/users/a%7Bb%7D")
        assert r.status_code == 400 and r.json()["error"] == "illegal_argument"
        assert r.json()["error_description"] == "user id 'a{b}' is not valid: expected (?!\\.\\.?$)[a-z0-9_.\\-]{1,64}"

        r = await client.post(f"/{PRO}/users", json={"username": "a{b}"})
        assert r.status_code == 400
        assert (
            r.json()["error_description"]
            == "body.username: user id 'a{b}' is not valid: expected (?!\\.\\.?$)[a-z0-9_.\\-]{1,64}"
        )


@pytest.mark.parametrize(
    ("method", "path", "feature"),
    [
        ("POST", "/users/a/deactivate", "rest_ban_users"),
        ("POST", "/users/a/activate", "rest_ban_users"),
        ("GET", "/users/a/status", "rest_user_status"),
        ("POST", "/users/batch/status", "rest_user_status"),
        ("GET", "/users/a/blocks/users", "rest_block_users"),
        ("POST", "/users/a/blocks/users", "rest_block_users"),
        ("DELETE", "/users/a/blocks/users/b", "rest_block_users"),
        ("POST", "/messages/msg_recall", "rest_message_recall"),
        ("POST", "/messages/chatrooms/broadcast", "chatroom_broadcast"),
    ],
)
async def test_the_sheets_rest_features_have_routes(
    store: Any, clock: Clock, config_dir: Path, method: str, path: str, feature: str
) -> None:
    """Catches a REST feature of the plan sheet (on in every plan) refused as an unnamed path (a
    gateway behind `quota proxy` serving the vendor's API lost it), or served without its gate:
    a plan with the feature off is refused it."""
    async with make_client(store, clock, upstream=_ok) as client:
        r = await client.request(method, f"/{PRO}{path}", json={} if method == "POST" else None)
        assert r.status_code == 200, r.text
    plans = config_dir / "plans.yaml"
    doc = read_yaml(plans)
    for group in doc["plans"]["pro"]["features"].values():
        if feature in group:
            group[feature] = False
    write_yaml(plans, doc)
    async with make_client(store, clock, load_config(config_dir), upstream=_ok) as client:
        r = await client.request(method, f"/{PRO}{path}", json={} if method == "POST" else None)
        assert r.status_code == 403 and feature in r.text, r.text


async def test_a_broadcast_is_held_to_ten_a_minute_and_a_hundred_a_day(store: Any, clock: Clock) -> None:
    """Catches the chatroom broadcast (the reference: 10 a minute and 100 a day per app) held only
    to the per-client rate, or to a sliding minute that admits more across its edge."""
    clock.tick = 0
    clock.now = float(int(clock.now // 86400) * 86400) + 59.5  # half a second before a minute's edge
    async with make_client(store, clock, upstream=_ok) as client:
        path = f"/{PRO}/messages/chatrooms/broadcast"
        assert [(await client.post(path, json={})).status_code for _ in range(11)] == [200] * 10 + [429]
        clock.advance(1)  # the next minute: the ten are still within 60 s
        refused = await client.post(path, json={})
        assert refused.status_code == 429 and refused.json()["limit"] == "10/60s", refused.text
        sent = 10
        while sent < 100:
            clock.advance(61)  # a hit counts for 60 s, its 60th included
            codes = [(await client.post(path, json={})).status_code for _ in range(10)]
            assert codes == [200] * 10, (sent, codes)
            sent += 10
        clock.advance(61)
        day = await client.post(path, json={})
        assert day.status_code == 429 and day.json()["limit"] == "100/86400s", day.text
