"""The route map as requests meet it: per-route fixed rates, Retry-After, trailing slashes. Time is
the test's `Clock` (tick 0: it moves only when the test moves it)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tests.conftest import Clock, make_client
from tests.helpers import raw_members, register

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
