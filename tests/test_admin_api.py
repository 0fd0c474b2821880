"""The admin API to build on: lists, account creation, apps, overrides, the overlay rule, OpenAPI."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from quota.config import load_config
from quota.serve import build_app
from quota.store.memory import MemoryStore
from tests.conftest import Clock, RedisServer, asgi_client, make_client, run_cli
from tests.helpers import read_yaml, register, write_yaml

TOKEN = "admin-api-token-0123456789"
READ = "admin-api-read-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
RO = {"authorization": f"Bearer {READ}"}
ORIGIN = {"origin": "http://gateway"}


@pytest.fixture
async def admin(store: Any, clock: Clock, config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("QUOTA_READ_TOKEN", READ)
    async with make_client(store, clock, load_config(config_dir)) as client:
        client.config_dir = config_dir  # type: ignore[attr-defined]
        yield client


async def test_lists(admin: httpx.AsyncClient) -> None:
    """Catches list endpoints missing plans, apps or accounts, or needing the admin scope to read."""
    plans = (await admin.get("/_quota/plans", headers=RO)).json()["plans"]
    assert [p["name"] for p in plans] == ["free", "basic", "pro", "enterprise"]
    assert plans[0]["overage_per_10k_dau"] is None and plans[1]["monthly_fee"] == "888"
    apps = (await admin.get("/_quota/apps", headers=RO)).json()["apps"]
    assert {"app": "demo#pro", "account": "demo-pro", "plan": "pro"} in apps
    accounts = (await admin.get("/_quota/accounts", headers=RO)).json()["accounts"]
    assert {a["name"] for a in accounts} == {"demo-free", "demo-basic", "demo-pro", "demo-enterprise"}
    assert all(a["source"] == "accounts.yaml" for a in accounts)


async def test_a_plan_without_overage_holds_one_app(admin: httpx.AsyncClient) -> None:
    """Catches the free plan's DAU multiplied by apps: its ceiling is held per app, and usage sums
    the apps' peaks, so each further app of a free account was another 100 DAU at 0 元. An account
    on a plan without overage holds one app, however it would come to hold a second."""
    free = {"name": "twins", "plan": "free", "apps": ["twins#a", "twins#b"]}
    r = await admin.post("/_quota/accounts", json=free, headers=AUTH)
    assert r.status_code == 400, r.text
    said = "accounts.twins.apps: expected one app on plan free (no overage: its 100 DAU are the account's)"
    assert r.json()["problems"] == [f"request body: {said}, found 2 apps"], r.json()
    r = await admin.put("/_quota/accounts/demo-free/apps/demo/second", headers=AUTH)
    assert r.status_code == 409 and "one app on plan free" in r.json()["error_description"], r.text
    assert (await admin.get("/demo/second/users")).status_code == 404
    # A paid account with two apps cannot move to free (now, or from the 1st) until it holds one.
    paid = {"name": "pair", "plan": "basic", "apps": ["pair#a", "pair#b"]}
    assert (await admin.post("/_quota/accounts", json=paid, headers=AUTH)).status_code == 201
    for action in ("change-plan", "subscribe"):
        r = await admin.post(f"/_quota/accounts/pair/{action}", json={"plan": "free"}, headers=AUTH)
        assert r.status_code == 409 and "detach the others first" in r.json()["error_description"], r.text
    assert (await admin.delete("/_quota/accounts/pair/apps/pair/b", headers=AUTH)).status_code == 200
    r = await admin.post("/_quota/accounts/pair/change-plan", json={"plan": "free"}, headers=AUTH)
    assert r.status_code == 200, r.text
    # Free from the 1st: a second app now would be a second free allowance next month.
    r = await admin.put("/_quota/accounts/pair/apps/pair/b", headers=AUTH)
    assert r.status_code == 409, r.text
    # An app held earlier this month counts too: one swapped for another is a second allowance.
    assert (await admin.delete("/_quota/accounts/demo-free/apps/demo/free", headers=AUTH)).status_code == 200
    r = await admin.put("/_quota/accounts/demo-free/apps/demo/other", headers=AUTH)
    assert r.status_code == 409 and "held another app this month" in r.json()["error_description"], r.text
    # Its own app back is no second app.
    assert (await admin.put("/_quota/accounts/demo-free/apps/demo/free", headers=AUTH)).status_code == 200


async def test_create_attach_override(admin: httpx.AsyncClient) -> None:
    """Catches an account created through the API not enforced, an app attached twice, overrides
    outside what the plan marks custom accepted, or a read token allowed to change things."""
    body = {"name": "acme", "plan": "enterprise", "apps": ["acme#chat"], "overrides": {"members_per_group": 3}}
    assert (await admin.post("/_quota/accounts", json=body, headers=RO)).status_code == 403
    r = await admin.post("/_quota/accounts", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    assert (await admin.post("/_quota/accounts", json=body, headers=AUTH)).status_code == 409
    # The new app is enforced at once, with its override.
    await admin.post("/acme/chat/users", json=[{"username": u} for u in ("o", "a", "b", "c", "d")])
    gid = (await admin.post("/acme/chat/chatgroups", json={"owner": "o"})).json()["data"]["groupid"]
    r = await admin.post(f"/acme/chat/chatgroups/{gid}/users", json={"usernames": ["a", "b", "c", "d"]})
    assert r.status_code == 403 and r.json()["limit"] == "members_per_group"
    # Attach: a free app, and one another account holds (refused).
    assert (await admin.put("/_quota/accounts/acme/apps/acme/ops", headers=AUTH)).status_code == 200
    r = await admin.put("/_quota/accounts/acme/apps/demo/pro", headers=AUTH)
    assert r.status_code == 409 and "demo-pro" in r.text
    assert (await admin.get("/acme/ops/users")).status_code == 200
    assert (await admin.delete("/_quota/accounts/acme/apps/acme/ops", headers=AUTH)).status_code == 200
    assert (await admin.get("/acme/ops/users")).status_code == 404
    # Overrides: validated with accounts.yaml's messages.
    r = await admin.put("/_quota/accounts/acme/overrides", json={"message_retention_days": 5}, headers=AUTH)
    assert r.status_code == 200, r.text
    r = await admin.put("/_quota/accounts/demo-pro/overrides", json={"members_per_group": 5}, headers=AUTH)
    assert r.status_code == 400
    assert "overrides.members_per_group: expected a limit plan pro lets an account set" in r.json()["problems"][0]
    r = await admin.post("/_quota/accounts", json={"name": "bad", "plan": "gold", "apps": ["x"]}, headers=AUTH)
    problems = r.json()["problems"]
    assert r.status_code == 400 and any("accounts.bad.plan: expected a plan of the matrix" in p for p in problems)
    assert any("accounts.bad.apps[0]: expected an appkey org#app" in p for p in problems)


async def test_limits_past_what_a_date_or_a_counter_holds_are_refused(admin: httpx.AsyncClient, clock: Clock) -> None:
    """Catches an override no date can reach back to: 1,000,000 days of history was accepted, and
    every history request of the account's apps then failed (a date out of range, a 500). The
    longest is 100 years; past it is `unlimited`. Found by the audit of 2026-12-02."""
    url = "/_quota/accounts/demo-enterprise/overrides"
    r = await admin.put(url, json={"message_retention_days": 1_000_000}, headers=AUTH)
    assert r.status_code == 400, r.text
    assert "overrides.message_retention_days: expected at most 36,500 (or 'unlimited')" in r.json()["problems"][0]
    yesterday = f"{datetime.now(UTC) - timedelta(days=1):%Y%m%d%H}"
    assert (await admin.get(f"/demo/enterprise/chatmessages/{yesterday}")).status_code == 200
    for days in (36_500, "unlimited"):
        assert (await admin.put(url, json={"message_retention_days": days}, headers=AUTH)).status_code == 200
        clock.advance(61)  # the history export: once a minute per app
        assert (await admin.get("/demo/enterprise/chatmessages/1930010100")).status_code == 200
    r = await admin.put(url, json={"members_per_group": 10**13}, headers=AUTH)
    assert r.status_code == 400 and "at most 1,000,000,000,000" in r.json()["problems"][0], r.text


async def test_overlay_diff_reset_and_warning(admin: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    """Catches stored changes silently hiding a later accounts.yaml edit: the overlay is shown, a
    warning is logged when the YAML entry changed under it, and a reset makes the YAML apply again."""
    r = await admin.post("/_quota/accounts/demo-free/change-plan", json={"plan": "pro"}, headers=AUTH)
    assert r.status_code == 200
    overlay = (await admin.get("/_quota/accounts/demo-free/overlay", headers=RO)).json()["overlay"]
    assert "subscriptions" in overlay["fields"] and overlay["hides_a_yaml_edit"] is False
    accounts_yaml = admin.config_dir / "accounts.yaml"  # type: ignore[attr-defined]
    doc = read_yaml(accounts_yaml)
    doc["accounts"]["demo-free"]["ip_allowlist"] = ["192.0.2.0/24"]
    write_yaml(accounts_yaml, doc)
    with caplog.at_level(logging.WARNING, logger="quota"):
        assert (await admin.post("/_quota/reload", headers=AUTH)).status_code == 200
    assert any("demo-free" in m and "quota accounts reset" in m for m in caplog.messages)
    listed = {a["name"]: a for a in (await admin.get("/_quota/accounts", headers=RO)).json()["accounts"]}
    assert listed["demo-free"]["hides_yaml_edit"] and listed["demo-free"]["source"] == "accounts.yaml + stored"
    # The YAML's allowlist is hidden by the overlay until reset.
    assert (await admin.get("/demo/free/users")).status_code == 200
    assert (await admin.delete("/_quota/accounts/demo-free/overlay", headers=AUTH)).status_code == 200
    r = await admin.get("/demo/free/users")
    assert r.status_code == 403 and "allowlist" in r.text
    assert (await admin.delete("/_quota/accounts/demo-free/overlay", headers=AUTH)).status_code == 404


async def test_openapi_describes_every_route(admin: httpx.AsyncClient) -> None:
    """Catches an admin route missing from /_quota/openapi.json, or described with the wrong scope,
    and the description itself answering without a token."""
    assert (await admin.get("/_quota/openapi.json")).status_code == 401
    assert (
        await admin.get("/_quota/openapi.json", headers={"authorization": "Bearer wrong-token-0000000"})
    ).status_code == 401
    spec = (await admin.get("/_quota/openapi.json", headers=RO)).json()
    assert spec["openapi"].startswith("3.") and spec["components"]["securitySchemes"].keys() == {"read", "admin"}
    mw = admin._transport.app  # type: ignore[attr-defined]
    routes = [r for r in mw.admin.routes if isinstance(r, Route) and r.path != "/openapi.json"]
    for route in routes:
        described = spec["paths"][f"/_quota{route.path}"]
        for method in route.methods - {"HEAD"}:
            op = described[method.lower()]
            scope = next(iter(op["security"][0]))
            # The described scope is the one enforced: a read token is refused where it says admin.
            path = route.path.replace("{org}", "demo").replace("{app}", "pro").replace("{account}", "demo-pro")
            path = path.replace("{user}", "u").replace("{action}", "freeze")
            r = await admin.request(method, f"/_quota{path}", headers=RO)
            assert (r.status_code == 403) == (scope == "admin"), (method, path, r.status_code)
    ops = {op["operationId"] for item in spec["paths"].values() for op in item.values()}
    assert len(ops) == sum(len(item) for item in spec["paths"].values())


@pytest.mark.redis
def test_accounts_cli_diff_and_reset(redis_server: RedisServer) -> None:
    """Catches `quota accounts diff/reset` not seeing or not dropping stored changes, or running
    without a store (which would show nothing and change nothing)."""
    redis_server.flush()
    url = redis_server.url
    assert run_cli("change-plan", "demo-basic", "pro", "--redis", url).returncode == 0
    out = run_cli("accounts", "diff", "--redis", url)
    assert out.returncode == 0 and "demo-basic:" in out.stdout and "subscriptions" in out.stdout
    out = run_cli("accounts", "diff")
    assert out.returncode == 2 and "--redis" in out.stderr
    assert run_cli("accounts", "reset", "demo-basic", "--redis", url).returncode == 0
    out = run_cli("accounts", "diff", "--redis", url)
    assert "no stored changes" in out.stdout


async def test_an_overlay_stored_by_an_earlier_version_hides_no_edit(store: Any, admin: httpx.AsyncClient) -> None:
    """Catches every overlay stored before apps were dated reported as hiding an accounts.yaml
    edit (and logged so) once the record gained `attached` and `former`: an account's record
    without them must hash as it did."""
    import hashlib
    import json

    mw = admin._transport.app  # type: ignore[attr-defined]
    entry = mw.runtime.directory.configured["demo-basic"].to_json()
    assert "attached" not in entry and "former" not in entry
    base = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
    await store.save_account("demo-basic", {**entry, "ip_allowlist": ["10.0.0.0/8"], "base": base})
    await mw.runtime.directory.refresh()
    rows = (await admin.get("/_quota/accounts", headers=AUTH)).json()["accounts"]
    row = next(a for a in rows if a["name"] == "demo-basic")
    assert (row["source"], row["hides_yaml_edit"]) == ("accounts.yaml + stored", False), row


async def test_resetting_an_overlay_keeps_the_bills_and_one_holder(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a reset of stored changes taking a detached app's days off the account's bills (its
    dated history was in the overlay), and giving back an app another account holds now."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    app = build_app(load_config(), store=store)
    app.clock = Clock(time.time(), tick=0)
    month = datetime.now(UTC).strftime("%Y-%m")
    async with asgi_client(app, base_url="http://gw") as c:
        assert (await c.put("/_quota/accounts/demo-pro/apps/demo/extra", headers=AUTH)).status_code == 200
        await register(c, "demo/extra", ["a", "b"])
        for name in ("a", "b"):
            assert (await c.post("/demo/extra/token", json={"username": name})).status_code == 200
        assert (await c.delete("/_quota/accounts/demo-pro/apps/demo/extra", headers=AUTH)).status_code == 200
        assert (await c.delete("/_quota/accounts/demo-pro/apps/demo/pro", headers=AUTH)).status_code == 200
        acme = {"name": "acme", "plan": "pro", "apps": ["demo#pro"]}
        assert (await c.post("/_quota/accounts", json=acme, headers=AUTH)).status_code == 201
        r = await c.delete("/_quota/accounts/demo-pro/overlay", headers=AUTH)
        assert r.status_code == 409 and "'acme' holds now" in r.json()["error_description"], r.text
        assert (await c.delete("/_quota/accounts/acme/apps/demo/pro", headers=AUTH)).status_code == 200
        assert (await c.delete("/_quota/accounts/demo-pro/overlay", headers=AUTH)).status_code == 200
        account = (await c.get("/_quota/accounts/demo-pro", headers=AUTH)).json()
        assert account["apps"] == ["demo#pro"], account
        bill = (await c.get(f"/_quota/bills/demo-pro?month={month}", headers=AUTH)).json()
        assert {a["app"]: a["peak_dau"] for a in bill["apps"]}.get("demo#extra") == 2, bill


async def test_a_reset_keeps_the_days_of_an_app_only_the_overlay_gave(admin: httpx.AsyncClient) -> None:
    """Catches a reset dropping the days of an app attached through the admin API and never
    detached (found by the audit of 2026-12-01): it lived in the overlay's apps only, and its
    served days left the account's bill. The reset detaches it today, its days kept."""
    month = datetime.now(UTC).strftime("%Y-%m")
    assert (await admin.put("/_quota/accounts/demo-basic/apps/demo/second", headers=AUTH)).status_code == 200
    await register(admin, "demo/second", ["a", "b"])
    for name in ("a", "b"):
        assert (await admin.post("/demo/second/token", json={"username": name})).status_code == 200
    assert (await admin.delete("/_quota/accounts/demo-basic/overlay", headers=AUTH)).status_code == 200
    account = (await admin.get("/_quota/accounts/demo-basic", headers=AUTH)).json()
    assert account["apps"] == ["demo#basic"], account
    bill = (await admin.get(f"/_quota/bills/demo-basic?month={month}", headers=AUTH)).json()
    assert {a["app"]: a["peak_dau"] for a in bill["apps"]}.get("demo#second") == 2, bill


async def test_an_account_only_the_api_made_is_not_reset_away(admin: httpx.AsyncClient, clock: Clock) -> None:
    """Catches a reset deleting an account created through the admin API (no accounts.yaml entry to
    compare its plan with) and its served month with it: its bill became a 404."""
    today = datetime.fromtimestamp(clock.now, UTC).date()
    month = today.strftime("%Y-%m")
    acme = {"name": "acme", "plan": "basic", "apps": ["acme#chat"]}
    assert (await admin.post("/_quota/accounts", json=acme, headers=AUTH)).status_code == 201
    r = await admin.delete("/_quota/accounts/acme/overlay", headers=AUTH)
    assert r.status_code == 409 and "cancel it instead" in r.json()["error_description"], r.text
    assert (await admin.get(f"/_quota/bills/acme?month={month}", headers=AUTH)).status_code == 200
    # Served from today: refused too. Not served yet (it starts next month): a reset deletes it.
    for name, start, status in (("acme-today", today, 409), ("acme-later", (today + timedelta(days=32)), 200)):
        body = {"name": name, "plan": "basic", "apps": [f"{name}#chat"], "subscribed_on": start.isoformat()}
        assert (await admin.post("/_quota/accounts", json=body, headers=AUTH)).status_code == 201
        r = await admin.delete(f"/_quota/accounts/{name}/overlay", headers=AUTH)
        assert r.status_code == status, (name, r.text)


async def test_the_day_an_app_moves_is_served_as_it_is_billed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a move day served without the ceiling of the plan it is billed to (found by the audit
    of 2026-12-01): the day of a move is the old account's bill, so an app moved from a free account
    to a paid one was served past free's 100 DAU on a day billed to free, which bills no overage:
    no one paid for them. That day it keeps free's ceiling; the next, basic has none."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    app = build_app(load_config(), store=MemoryStore())
    clock = Clock(datetime(2031, 1, 5, 9, tzinfo=UTC).timestamp())
    app.clock = clock
    async with asgi_client(app, base_url="http://gw") as c:
        users = [f"u{i}" for i in range(102)]
        await register(c, "demo/free", users)
        assert (await c.delete("/_quota/accounts/demo-free/apps/demo/free", headers=AUTH)).status_code == 200
        assert (await c.put("/_quota/accounts/demo-basic/apps/demo/free", headers=AUTH)).status_code == 200
        statuses = [(await c.post("/demo/free/token", json={"username": u})).status_code for u in users]
        assert statuses == [200] * 100 + [403] * 2, statuses
        usage = (await c.get("/_quota/entitlements/demo/free", headers=AUTH)).json()["usage"]
        assert usage["included_dau"]["limit"] == 100, usage
        clock.advance(86400)
        statuses = [(await c.post("/demo/free/token", json={"username": u})).status_code for u in users]
        assert statuses == [200] * 102, statuses
        usage = (await c.get("/_quota/entitlements/demo/free", headers=AUTH)).json()["usage"]
        assert usage["included_dau"]["limit"] is None, usage


async def test_an_overlay_with_dated_apps_is_shown(admin: httpx.AsyncClient) -> None:
    """Catches an overlay whose record has keys the accounts.yaml entry lacks (an app's dated
    history) failing to show, over the API (a 404) and in `quota accounts diff`."""
    assert (await admin.put("/_quota/accounts/demo-basic/apps/demo/second", headers=AUTH)).status_code == 200
    r = await admin.get("/_quota/accounts/demo-basic/overlay", headers=AUTH)
    assert r.status_code == 200, r.text
    fields = r.json()["overlay"]["fields"]
    assert fields["apps"] == {"accounts.yaml": ["demo#basic"], "stored": ["demo#basic", "demo#second"]}
    assert fields["attached"]["accounts.yaml"] is None and "demo#second" in fields["attached"]["stored"]


def test_cli_diff_of_an_overlay_with_a_detached_app(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through the CLI, over Redis: `quota accounts diff` of an account whose app was
    detached exits 0 and names the change."""
    import asyncio

    from quota.store.redis import RedisStore

    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)

    async def detach() -> None:
        store = RedisStore(redis_server.url, timeout_ms=2000)
        try:
            app = build_app(load_config(), store=store)
            async with asgi_client(app, base_url="http://gw") as c:
                r = await c.delete("/_quota/accounts/demo-pro/apps/demo/pro", headers=AUTH)
                assert r.status_code == 200, r.text
        finally:
            await store.close()

    redis_server.flush()
    asyncio.run(detach())
    out = run_cli("accounts", "diff", "demo-pro", "--redis", redis_server.url)
    assert out.returncode == 0, out.stderr
    assert "apps" in out.stdout and "former" in out.stdout, out.stdout


async def test_an_account_made_over_the_api_is_billed_from_the_day_it_was_made(
    admin: httpx.AsyncClient, clock: Clock
) -> None:
    """Catches an account created mid-month with no subscribed_on billed the whole month (the
    default start of accounts.yaml, 2000-01-01, put it on its plan since then), and a start dated
    in a month already served accepted: its fee was billed for months nothing was served."""
    clock.now = datetime(2031, 3, 20, 10, tzinfo=UTC).timestamp()
    body = {"name": "fresh", "plan": "basic", "apps": ["fresh#chat"]}
    r = await admin.post("/_quota/accounts", json=body, headers=AUTH)
    assert r.status_code == 201 and r.json()["subscriptions"][0]["start"] == "2031-03-20", r.text
    bill = (await admin.get("/_quota/bills/fresh?month=2031-03", headers=AUTH)).json()
    assert (bill["prorated_days"], bill["plan_fee"]) == ([12, 31], "343.742"), bill
    for start, status in (("2031-02-28", 400), ("2031-03-01", 201)):
        body = {"name": f"from-{start}", "plan": "basic", "apps": [f"f{start[-2:]}#chat"], "subscribed_on": start}
        r = await admin.post("/_quota/accounts", json=body, headers=AUTH)
        assert r.status_code == status, r.text
    assert (
        "subscribed_on must be 2031-03-01 or later"
        in (
            await admin.post(
                "/_quota/accounts", json={**body, "name": "x", "subscribed_on": "2000-01-01"}, headers=AUTH
            )
        ).json()["error_description"]
    )


async def test_usage_is_reported_on_the_middlewares_day(store: Any, admin: httpx.AsyncClient, clock: Clock) -> None:
    """Catches /usage looking an app up on the system's date, not the middleware's: an account
    subscribed mid-month (by the served clock) had no plan on the 1st, and its usage was a 404."""
    clock.now = datetime(2031, 3, 20, 10, tzinfo=UTC).timestamp()
    body = {"name": "late", "plan": "basic", "apps": ["late#chat"], "subscribed_on": "2031-03-10"}
    assert (await admin.post("/_quota/accounts", json=body, headers=AUTH)).status_code == 201
    r = await admin.get("/_quota/usage/late/chat?month=2031-03", headers=AUTH)
    assert r.status_code == 200 and r.json()["plan"] == "basic", r.text


async def test_a_reset_that_would_rewrite_a_served_month_is_refused(admin: httpx.AsyncClient, clock: Clock) -> None:
    """Catches a reset putting back the file's subscription over days already served on the stored
    one: February served as enterprise was billed as basic. Before the change takes effect, a
    reset is the way back."""
    clock.now = datetime(2031, 1, 20, 10, tzinfo=UTC).timestamp()
    r = await admin.post("/_quota/accounts/demo-basic/change-plan", json={"plan": "enterprise"}, headers=AUTH)
    assert r.status_code == 200, r.text
    clock.now = datetime(2031, 2, 15, 10, tzinfo=UTC).timestamp()
    assert (await admin.get("/_quota/entitlements/demo/basic", headers=AUTH)).json()["plan"] == "enterprise"
    r = await admin.delete("/_quota/accounts/demo-basic/overlay", headers=AUTH)
    assert r.status_code == 409 and "change-plan instead" in r.json()["error_description"], r.text
    bill = (await admin.get("/_quota/bills/demo-basic?month=2031-02", headers=AUTH)).json()
    assert bill["plan"] == "enterprise", bill
    # A change not yet in force is undone by a reset.
    r = await admin.post("/_quota/accounts/demo-free/change-plan", json={"plan": "pro"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert (await admin.delete("/_quota/accounts/demo-free/overlay", headers=AUTH)).status_code == 200
    clock.now = datetime(2031, 3, 2, 10, tzinfo=UTC).timestamp()
    assert (await admin.get("/_quota/bills/demo-free?month=2031-03", headers=AUTH)).json()["plan"] == "free"


async def test_wrong_tokens_are_held_per_client(admin: httpx.AsyncClient, clock: Clock) -> None:
    """Catches token guessing left unthrottled (found by the audit of 2026-12-02): any number of
    wrong bearer tokens, or dashboard sign-ins, a second. Ten wrong or missing tokens a minute from
    one client, then 429 with Retry-After, the right token too, on the admin API and the dashboard's
    sign-in alike; right tokens never count; other clients are not held; a minute later the client
    may try again."""
    clock.tick = 0
    for _ in range(15):
        assert (await admin.get("/_quota/accounts", headers=AUTH)).status_code == 200
    for _ in range(12):
        assert (await admin.post("/_quota/dashboard/login", data={"token": READ}, headers=ORIGIN)).status_code == 303
    for i in range(10):
        wrong = {"authorization": f"Bearer wrong-token-{i:010d}"}
        assert (await admin.get("/_quota/accounts", headers=wrong if i % 2 else {})).status_code == 401
    r = await admin.get("/_quota/accounts", headers=AUTH)
    assert r.status_code == 429 and r.json()["error"] == "reach_limit", r.text
    assert "10/minute" in r.json()["error_description"] and r.headers["retry-after"] == "60"
    signin = await admin.post("/_quota/dashboard/login", data={"token": READ}, headers=ORIGIN)
    assert signin.status_code == 429 and "Too many wrong tokens" in signin.text
    assert signin.headers["retry-after"] == "60"
    app = admin._transport.app  # type: ignore[attr-defined]
    async with asgi_client(app, ("198.51.100.7", 5000)) as other:
        assert (await other.get("/_quota/accounts", headers=AUTH)).status_code == 200
    clock.advance(59)
    assert (await admin.get("/_quota/accounts", headers=AUTH)).status_code == 429
    clock.advance(2)
    assert (await admin.get("/_quota/accounts", headers=AUTH)).status_code == 200


async def test_wrong_dashboard_sign_ins_count_too(admin: httpx.AsyncClient, clock: Clock) -> None:
    """Catches the dashboard's sign-in form as a way around the admin API's count."""
    clock.tick = 0
    for i in range(10):
        r = await admin.post("/_quota/dashboard/login", data={"token": f"guess-{i:016d}"}, headers=ORIGIN)
        assert r.status_code == 401, r.text
    assert (await admin.get("/_quota/accounts", headers=RO)).status_code == 429


async def test_an_apps_admin_route_shares_the_wrong_token_count(admin: httpx.AsyncClient, clock: Clock) -> None:
    """Catches an app's admin route (`GET /{org}/{app}/_state`, 404 without the admin token) as a
    door past the count: a client locked out of the admin API went on guessing there, any number a
    second, and the right guess answered 200. Found by the audit of 2026-12-02."""
    clock.tick = 0
    assert (await admin.get("/demo/pro/_state", headers=AUTH)).status_code == 200
    for i in range(10):
        wrong = {"authorization": f"Bearer guess-{i:020d}"}
        assert (await admin.get("/demo/pro/_state", headers=wrong if i % 2 else {})).status_code == 404
    r = await admin.get("/demo/pro/_state", headers=AUTH)
    assert r.status_code == 429 and r.headers["retry-after"] == "60" and "10/minute" in r.text, r.text
    assert (await admin.get("/_quota/accounts", headers=AUTH)).status_code == 429  # one count, every door
    clock.advance(61)
    assert (await admin.get("/demo/pro/_state", headers=AUTH)).status_code == 200
    for i in range(10):
        assert (await admin.get("/_quota/accounts", headers={"authorization": f"Bearer x{i:020d}"})).status_code == 401
    assert (await admin.get("/demo/pro/_state", headers=AUTH)).status_code == 429


async def test_every_method_of_an_admin_route_needs_the_token(
    store: Any, clock: Clock, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches the admin route's other methods as a way round its token: under `unmatched:
    rate-only`, POST, PUT, DELETE and OPTIONS of `/{org}/{app}/_state` reached the gateway with no
    token asked and no wrong token counted. Found by the review of 2026-12-02."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    routes = config_dir / "routes.yaml"
    routes.write_text(routes.read_text().replace("unmatched: refuse", "unmatched: rate-only"))
    clock.tick = 0
    async with make_client(store, clock, load_config(config_dir)) as client:
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
            assert (await client.request(method, "/demo/pro/_state")).status_code == 404, method
        assert (await client.request("POST", "/demo/pro/_state", headers=AUTH)).status_code == 405
        for i in range(5):
            assert (
                await client.get("/demo/pro/_state", headers={"authorization": f"Bearer g{i:020d}"})
            ).status_code == 404
        assert (await client.get("/demo/pro/_state", headers=AUTH)).status_code == 429  # ten wrong in all


async def test_wrong_tokens_are_counted_per_network_as_configured(
    store: Any, clock: Clock, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches the count keyed by address where rates key by network (a host holds a whole IPv6
    /64: one guesser, a fresh allowance per address) or `wrong_tokens` in quota.yaml ignored."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    (config_dir / "quota.yaml").write_text("wrong_tokens: 3/minute\n")
    clock.tick = 0
    app = build_app(load_config(config_dir), store=store)
    app.clock = clock
    wrong = {"authorization": "Bearer wrong-token-0000000000"}
    for i in range(3):
        async with asgi_client(app, (f"2001:db8:1:2::{i + 1}", 5000)) as c:
            assert (await c.get("/_quota/accounts", headers=wrong)).status_code == 401
    async with asgi_client(app, ("2001:db8:1:2::99", 5000)) as same_network:
        assert (await same_network.get("/_quota/accounts", headers=AUTH)).status_code == 429
    async with asgi_client(app, ("2001:db8:1:3::1", 5000)) as next_network:
        assert (await next_network.get("/_quota/accounts", headers=AUTH)).status_code == 200


async def test_an_app_is_held_by_one_account_whatever_the_file_says_later(
    admin: httpx.AsyncClient, store: Any, clock: Clock, config_dir: Path
) -> None:
    """Catches a stored change and accounts.yaml each giving one app to another account (audit of
    2026-12-02): the file alone validated, the reload was accepted, and both accounts held the app,
    both bills counting its DAU and the other customer's dashboard showing it. A reload whose
    accounts.yaml gives an app a stored change gave another account is refused (the old config
    stays); a process that starts on such a file serves the app to the stored account alone."""
    r = await admin.post("/_quota/accounts", json={"name": "acme", "plan": "pro", "apps": ["acme#chat"]}, headers=AUTH)
    assert r.status_code == 201, r.text
    doc = read_yaml(config_dir / "accounts.yaml")
    doc["accounts"]["demo-basic"]["apps"].append("acme#chat")
    write_yaml(config_dir / "accounts.yaml", doc)
    r = await admin.post("/_quota/reload", headers=AUTH)
    assert r.status_code == 400, r.text
    said = "accounts.demo-basic.apps: expected an app held by one account only, found acme#chat (account acme"
    assert any(p.startswith(f"{config_dir / 'accounts.yaml'}: {said}") for p in r.json()["problems"]), r.json()

    async def holders(client: httpx.AsyncClient) -> list[str]:
        apps = (await client.get("/_quota/apps", headers=RO)).json()["apps"]
        return [a["account"] for a in apps if a["app"] == "acme#chat"]

    assert await holders(admin) == ["acme"]
    # Another process, started on the edited file, over the same store.
    async with make_client(store, clock, load_config(config_dir)) as other:
        assert (await other.post("/acme/chat/users", json={"username": "alice"})).status_code == 200
        assert (await other.post("/acme/chat/token", json={"username": "alice"})).status_code == 200
        assert await holders(other) == ["acme"]
        month = datetime.fromtimestamp(clock.now, UTC).strftime("%Y-%m")
        bill = (await other.get(f"/_quota/bills/demo-basic?month={month}", headers=RO)).json()
        assert "acme#chat" not in [a["app"] for a in bill["apps"]], bill
        bill = (await other.get(f"/_quota/bills/acme?month={month}", headers=RO)).json()
        assert [a["peak_dau"] for a in bill["apps"] if a["app"] == "acme#chat"] == [1], bill


async def test_odd_admin_input_is_a_clear_400_and_answers_are_not_cached(admin: httpx.AsyncClient) -> None:
    """Catches (audit of 2026-12-02): a body of arrays nested 30,000 deep, well under the size
    bound, raised RecursionError past the handler (a 500); an appkey ending in a newline was
    attached (`$` matches before one), and one of 5,000 characters was taken in a new account;
    admin answers, which name accounts and customers' token digests, carried no Cache-Control."""
    nested = "[" * 30_000 + "]" * 30_000
    r = await admin.post("/_quota/accounts", content=nested, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "body must be JSON" in r.json()["error_description"], r.text
    r = await admin.put("/_quota/accounts/demo-pro/apps/demo/chat%0A", headers=AUTH)
    assert r.status_code == 400, r.text
    long = {"name": "longname", "plan": "pro", "apps": ["x" * 5000 + "#chat"]}
    r = await admin.post("/_quota/accounts", json=long, headers=AUTH)
    assert r.status_code == 400 and "accounts.longname.apps[0]" in r.text, r.text
    apps = (await admin.get("/_quota/accounts/demo-pro", headers=AUTH)).json()["apps"]
    assert apps == ["demo#pro"], apps
    for path, headers in (("/_quota/accounts", RO), ("/_quota/accounts", {}), ("/_quota/metrics", AUTH)):
        r = await admin.get(path, headers=headers)
        assert r.headers.get("cache-control") == "no-store", (path, r.status_code, r.headers)
