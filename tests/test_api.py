"""The application-code API (quota.Quota) and `quota explain`, on every store: typed answers, and an
explanation that predicts the decision the middleware then makes for the real request."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from quota import Decision, Quota, Usage
from quota.config import load_config
from tests.conftest import Clock, RedisServer, make_client, run_cli
from tests.helpers import create_room, read_yaml, register, room_id, write_yaml

TOKEN = "api-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
FREE, PRO = "demo/free", "demo/pro"


@pytest.fixture
async def admin(store: Any, clock: Clock, config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    plans = config_dir / "plans.yaml"
    doc = read_yaml(plans)
    doc["plans"]["free"]["limits"]["friends_per_user"] = 2
    write_yaml(plans, doc)
    async with make_client(store, clock, load_config(config_dir)) as client:
        yield client


def quota_of(client: httpx.AsyncClient) -> Quota:
    return Quota.of(client._transport.app)  # type: ignore[attr-defined]


async def test_typed_answers(admin: httpx.AsyncClient) -> None:
    """Catches the API answering from the wrong counter, plan or feature (each call on each store)."""
    q = quota_of(admin)
    await register(admin, FREE, ["alice", "bob", "own"])
    assert (await admin.post(f"/{FREE}/users/alice/contacts/users/bob")).status_code == 200
    rid = room_id(await create_room(admin, FREE, "chatgroups", "own"), "chatgroups")
    assert await q.feature("demo#pro", "translation") is True
    assert await q.feature("demo#free", "translation") is False
    assert await q.limit("demo#free", "friends_per_user", user="ALICE") == Usage(1, 2, 1)
    assert await q.limit("demo#free", "groups_per_app") == Usage(1, 100, 99)
    assert await q.limit("demo#free", "registered_users") == Usage(3, None, None)
    assert await q.limit("demo#free", "members_per_group", group=rid) == Usage(1, 100, 99)  # the owner
    assert (await q.check("demo#free", "friends_per_user", user="alice")).allowed
    refused = await q.check("demo#free", "friends_per_user", user="alice", add=2)
    assert refused == Decision(False, refused.reason, 403, "exceed_limit", "friends_per_user")
    assert "room for 1 more" in refused.reason
    # check() consumes nothing.
    assert await q.limit("demo#free", "friends_per_user", user="alice") == Usage(1, 2, 1)
    plan = await q.plan("demo#pro")
    assert plan.plan == "pro" and plan.features["translation"] and plan.limits["friends_per_user"] == 1000
    assert dataclasses.is_dataclass(plan) and plan.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert (await admin.post(f"/{FREE}/token", json={"username": "alice"})).status_code == 200
    assert await q.limit("demo#free", "included_dau") == Usage(1, 100, 99)
    usage = await q.usage("demo#free")
    assert usage.plan == "free" and usage.mau == 1 and usage.limits["groups_per_app"] == Usage(1, 100, 99)
    with pytest.raises(ValueError, match="per user"):
        await q.limit("demo#free", "friends_per_user")
    with pytest.raises(ValueError, match="not valid"):
        await q.limit("demo#free", "friends_per_user", user="a,b")


async def _explain(
    client: httpx.AsyncClient, method: str, path: str, body: Any = None, headers: list[str] | None = None
) -> dict[str, Any]:
    params: dict[str, Any] = {"method": method, "path": path, "ip": "10.1.2.3"}
    if body is not None:
        params["body"] = json.dumps(body)
    if headers is not None:
        params["header"] = headers
    r = await client.get("/_quota/explain", params=params, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def _same(
    client: httpx.AsyncClient, method: str, path: str, body: Any = None, headers: list[str] | None = None
) -> dict[str, Any]:
    """Explain, then send the real request: the decision must be the one the middleware makes.
    `headers`: `Name: value` lines, sent as they are with the body in place of a JSON type."""
    found = await _explain(client, method, path, body, headers)
    if headers is None:
        real = await client.request(method, path, json=body)
    else:
        sent = [tuple(part.strip() for part in line.split(":", 1)) for line in headers]
        real = await client.request(method, path, content=json.dumps(body).encode(), headers=sent)
    decision = found["decision"]
    if decision["allowed"]:
        assert real.status_code < 400, (found, real.text)
    else:
        assert real.status_code == decision["status"], (found, real.text)
        assert real.json()["error"] == decision["error"] and real.json().get("limit") == decision["limit"]
    return found


async def test_explain_predicts_the_decision(admin: httpx.AsyncClient, clock: Clock) -> None:
    """Catches `explain` and the middleware disagreeing, or explain consuming what it explains: a
    friend add at the cap, a join under it, a feature refused, a history hour too old, a rate used up."""
    await register(admin, FREE, ["a", "b", "c", "d", "own"])
    for friend in ("b", "c"):
        assert (await admin.post(f"/{FREE}/users/a/contacts/users/{friend}")).status_code == 200
    at_cap = await _same(admin, "POST", f"/{FREE}/users/a/contacts/users/d")
    assert at_cap["decision"]["limit"] == "friends_per_user"
    assert {"limit": "friends_per_user", "cap": 2, "used": 2, "adding": 1} in at_cap["counters"]

    rid = room_id(await create_room(admin, FREE, "chatgroups", "own"), "chatgroups")
    join = await _same(admin, "POST", f"/{FREE}/chatgroups/{rid}/users", {"usernames": ["a", "b"]})
    assert (
        join["decision"]["allowed"]
        and {"limit": "members_per_group", "cap": 100, "used": 1, "adding": 2} in join["counters"]
    )
    feature = await _same(admin, "POST", f"/{FREE}/messages/translate", {})
    assert feature["feature"] == "translation" and feature["decision"]["limit"] == "translation"
    old = (datetime.fromtimestamp(clock.now, UTC) - timedelta(days=8)).strftime("%Y%m%d%H")
    history = await _same(admin, "GET", f"/{FREE}/chatmessages/{old}")
    assert history["retention_days"] == 7 and history["decision"]["limit"] == "message_retention_days"
    fresh = datetime.fromtimestamp(clock.now, UTC).strftime("%Y%m%d%H")
    assert (await admin.get(f"/{PRO}/chatmessages/{fresh}")).status_code == 200
    rate = await _same(admin, "GET", f"/{PRO}/chatmessages/{fresh}")
    assert rate["decision"]["status"] == 429 and rate["decision"]["retry_after_s"] >= 1
    assert rate["rates"][0]["name"] == "history_export_per_app" and rate["rates"][0]["remaining"] is None
    # A send counts one per recipient, named twice or not.
    send = await _same(admin, "POST", f"/{FREE}/messages/users", {"from": "a", "to": ["b", "c", "c"], "body": {}})
    assert {"name": "6000/60s", "limit": 6000, "window_s": 60.0, "exact": False, "remaining": 5997, "cost": 3} in send[
        "rates"
    ], send
    # Explaining twice changes nothing: the join is still the same size.
    again = await _explain(admin, "POST", f"/{FREE}/chatgroups/{rid}/users", {"usernames": ["c"]})
    assert {"limit": "members_per_group", "cap": 100, "used": 3, "adding": 1} in again["counters"]


async def test_explain_reads_a_body_as_the_middleware_does(admin: httpx.AsyncClient) -> None:
    """Catches `explain` allowing a counted body the middleware refuses for its headers (a text
    type, two types, an encoding), or refusing one typed as JSON (its default, and named)."""
    await register(admin, FREE, ["own", "a"])
    rid = room_id(await create_room(admin, FREE, "chatgroups", "own"), "chatgroups")
    path = f"/{FREE}/chatgroups/{rid}/users"
    for headers in (
        ["Content-Type: text/plain"],
        ["Content-Type: application/json", "content-type: application/json"],
        ["Content-Type: application/json", "Content-Encoding: deflate"],
    ):
        found = await _same(admin, "POST", path, {"usernames": ["a"]}, headers)
        assert found["decision"]["status"] == 415, (headers, found)
    typed = await _explain(admin, "POST", path, {"usernames": ["a"]}, ["content-type: Application/JSON; charset=utf-8"])
    assert (
        typed["decision"]["allowed"]
        and (await _explain(admin, "POST", path, {"usernames": ["a"]}))["decision"]["allowed"]
    )
    r = await admin.get("/_quota/explain", params={"path": path, "header": "no colon"}, headers=AUTH)
    assert r.status_code == 400 and "Name: value" in r.text, r.text
    r = await admin.get("/_quota/explain", params={"path": path, "header": ["a: b"] * 65}, headers=AUTH)
    assert r.status_code == 400 and "at most 64 headers" in r.text, r.text


@pytest.mark.redis
def test_explain_cli_takes_headers(redis_server: RedisServer) -> None:
    """Catches `quota explain -H` ignored (a text-typed join explained as allowed) or a header
    line without a colon taken as anything but a usage error."""
    path, body, url = "/demo/free/chatgroups/1/users", '{"usernames": ["a"]}', ("--redis", redis_server.url)
    out = run_cli("explain", "POST", path, "--body", body, "-H", "Content-Type: text/plain", "--json", *url)
    assert out.returncode == 1, out.stdout + out.stderr
    assert json.loads(out.stdout)["decision"]["status"] == 415
    out = run_cli("explain", "POST", path, "--body", body, "--header", "content-encoding: gzip", *url)
    assert out.returncode == 1 and "415" in out.stdout and "Content-Encoding 'gzip'" in out.stdout, out.stdout
    out = run_cli("explain", "POST", path, "--body", body, *url)
    assert "415" not in out.stdout, out.stdout
    out = run_cli("explain", "POST", path, "--body", body, "-H", "nocolon", *url)
    assert out.returncode == 2 and "Name: value" in out.stderr and not out.stdout, out.stdout + out.stderr


async def test_explain_needs_a_token_and_a_sane_query(admin: httpx.AsyncClient) -> None:
    """Catches explain open without a token, or a bad query reaching quota as a 500."""
    assert (await admin.get("/_quota/explain", params={"path": "/demo/free/users"})).status_code == 401
    for params in ({"path": "nope"}, {"path": "/demo/free/users", "ip": "not-an-ip"}):
        r = await admin.get("/_quota/explain", params=params, headers=AUTH)
        assert r.status_code == 400, r.text


@pytest.mark.redis
def test_explain_cli_on_redis(redis_server: RedisServer) -> None:
    """Catches `quota explain` not reading the store the gateway writes to (a feature and a cap)."""
    import redis as redis_sync

    redis_server.flush()
    r = redis_sync.Redis(port=redis_server.port)
    r.sadd("q:{demo#free}:s:contacts:o:a", *[f"f{i}" for i in range(100)])
    r.close()
    out = run_cli("explain", "POST", "/demo/free/users/a/contacts/users/b", "--redis", redis_server.url)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "friends_per_user: 100 used, cap 100" in out.stdout and "403 exceed_limit" in out.stdout
    out = run_cli("explain", "POST", "/demo/free/users/z/contacts/users/b", "--json", "--redis", redis_server.url)
    assert out.returncode == 0 and json.loads(out.stdout)["decision"]["allowed"] is True
