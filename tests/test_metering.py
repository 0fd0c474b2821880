"""Metering and billing as a user drives them: logins over HTTP and WebSocket, bills from the CLI."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from quota.accounts import add_months
from quota.billing import AppPeak, compute_bill
from quota.config import load_config
from quota.keys import app_prefix, dau_key
from quota.serve import build_app
from quota.store.memory import MemoryStore
from tests.conftest import Clock, RedisServer, asgi_client, make_client, run_cli
from tests.helpers import raw_members, read_yaml, register, write_yaml

FREE = "demo/free"
TOKEN = "test-admin-token-0123456789"


async def test_free_dau_ceiling(client: httpx.AsyncClient, clock: Clock) -> None:
    """On free, the 101st new user of the day is refused; users already active today still get in."""
    users = [f"d{i}" for i in range(101)]
    await register(client, FREE, users)
    for u in users[:100]:
        assert (await client.post(f"/{FREE}/token", json={"username": u})).status_code == 200
    r = await client.post(f"/{FREE}/token", json={"username": "d100"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden_op"
    assert "100 daily active users" in r.json()["error_description"]
    assert (await client.post(f"/{FREE}/token", json={"username": "d5"})).status_code == 200


async def test_plans_that_bill_overage_never_refuse_new_users(store: Any, clock: Clock, config_dir: Any) -> None:
    """Catches a paid plan's included DAU used as a ceiling: basic includes 2 here and bills the
    rest, so the third and fourth new users of the day get in (and count)."""
    path = config_dir / "plans.yaml"
    doc = read_yaml(path)
    doc["plans"]["basic"]["price"]["included_dau"] = 2
    write_yaml(path, doc)
    async with make_client(store, clock, load_config(config_dir)) as client:
        users = ["n1", "n2", "n3", "n4"]
        await register(client, "demo/basic", users)
        for u in users:
            assert (await client.post("/demo/basic/token", json={"username": u})).status_code == 200
        day = datetime.fromtimestamp(clock.now, UTC).strftime("%Y%m%d")
        assert await raw_members(store, f"q:{{demo#basic}}:dau:{day}") == set(users)


async def test_one_user_two_logins_is_one_dau(client: httpx.AsyncClient, clock: Clock) -> None:
    """A user logging in twice (two devices) on one day counts once."""
    await register(client, "demo/pro", ["a", "b"])
    for u in ("a", "a", "b"):
        assert (await client.post("/demo/pro/token", json={"username": u})).status_code == 200
    mw = client._transport.app  # type: ignore[attr-defined]
    today = datetime.fromtimestamp(clock.now, UTC).date()
    assert await mw.runtime.store.cardinalities([dau_key(app_prefix("demo#pro"), today)]) == [2]


def test_online_cap_on_websocket() -> None:
    """Free holds 50 long connections; the 51st handshake is closed with a clear reason; closing frees one."""
    app = build_app(load_config(), store=MemoryStore())
    with TestClient(app) as tc:
        names = [{"username": f"w{i}"} for i in range(51)]
        assert tc.post(f"/{FREE}/users", json=names[:50]).status_code == 200
        assert tc.post(f"/{FREE}/users", json=names[50:]).status_code == 200
        sockets = [tc.websocket_connect(f"/{FREE}/users/w{i}/connection") for i in range(50)]
        opened = [s.__enter__() for s in sockets]
        with pytest.raises(WebSocketDisconnect) as info:
            with tc.websocket_connect(f"/{FREE}/users/w50/connection") as ws:
                ws.receive_text()
        assert info.value.code == 1008 and "online_users" in info.value.reason
        opened[0].send_text("hi")
        assert opened[0].receive_text() == "hi"
        sockets[0].__exit__(None, None, None)
        with tc.websocket_connect(f"/{FREE}/users/w50/connection") as ws:
            ws.send_text("in")
            assert ws.receive_text() == "in"
        for s in sockets[1:]:
            s.__exit__(None, None, None)


def test_seed_example_what_if() -> None:
    """The seed's worked example, to the last digit, from the what-if CLI."""
    r = run_cli("bill", "--plan", "basic", "--peak-dau", "82370", "--peak-dau", "17865", "--month", "2026-10", "--json")
    assert r.returncode == 0, r.stderr
    bill = json.loads(r.stdout)
    assert bill["total"] == "8557.975" and bill["usage"] == 100235 and bill["excess"] == 90235


@pytest.mark.redis
def test_seed_example_from_stored_activity(redis_server: RedisServer) -> None:
    """The same bill from stored daily activity of two apps, peaks on different days."""
    import redis as redis_sync

    redis_server.flush()
    r = redis_sync.Redis(port=redis_server.port)
    # Two apps of one basic account; each app's DAU set per day, peaks on the 9th and the 20th.
    for app, peak, day in (("acme#a", 82370, 9), ("acme#b", 17865, 20)):
        for d, n in ((day, peak), (day + 1, peak - 100)):
            key = dau_key(app_prefix(app), date(2026, 10, d))
            for i in range(0, n, 10000):
                r.sadd(key, *[f"u{j}" for j in range(i, min(n, i + 10000))])
    r.close()
    cfg = redis_server.dir + "/cfg"
    import shutil

    shutil.copytree("config", cfg)
    with open(cfg + "/accounts.yaml", "a") as f:
        f.write("  acme:\n    plan: basic\n    apps: ['acme#a', 'acme#b']\n    subscribed_on: 2026-01-01\n")
    out = run_cli("bill", "acme", "--month", "2026-10", "--json", "--config", cfg, "--redis", redis_server.url)
    assert out.returncode == 0, out.stderr
    bill = json.loads(out.stdout)
    assert bill["total"] == "8557.975"
    assert [(a["peak_dau"], a["day"]) for a in bill["apps"]] == [(82370, "2026-10-09"), (17865, "2026-10-20")]


@pytest.mark.parametrize(
    "start,days,fee",
    [
        (date(2026, 2, 1), (28, 28), "888.000"),
        (date(2026, 2, 15), (14, 28), "444.000"),
        (date(2026, 2, 28), (1, 28), "31.714"),
        (date(2026, 1, 31), (1, 31), "28.645"),
        (date(2026, 1, 1), (31, 31), "888.000"),
        (date(2028, 2, 29), (1, 29), "30.621"),
    ],
)
def test_proration(start: date, days: tuple[int, int], fee: str) -> None:
    """The first month's fee is prorated by days used / days in the month; February and 31-day months."""
    plan = load_config().matrix.plans["basic"]
    bill = compute_bill(plan, [AppPeak("a", 10)], start.year, start.month, subscribed_on=start)
    assert bill.prorated_days == days and bill.plan_fee == Decimal(fee) and bill.total == Decimal(fee)
    assert isinstance(bill.total, Decimal)


def test_free_never_bills_overage() -> None:
    """Catches free billing an overage (it has no overage price: past 100 DAU logins are refused),
    and the bill not saying why 50 over costs nothing."""
    bill = compute_bill(load_config().matrix.plans["free"], [AppPeak("a", 150)], 2026, 3)
    assert (bill.usage, bill.included, bill.excess) == (150, 100, 50)
    assert bill.overage == Decimal("0.000") and bill.total == Decimal("0.000")
    assert bill.overage_price is None
    assert bill.notes == ("plan free has no overage: logins past 100 DAU are refused",)


@pytest.mark.redis
def test_subscription_changes_through_cli(redis_server: RedisServer) -> None:
    """Subscribe mid-month is prorated; a change and a cancel wait for the 1st of next month."""
    redis_server.flush()
    url = redis_server.url

    def cli(*args: str) -> Any:
        out = run_cli(*args, "--redis", url)
        assert out.returncode == 0, out.stderr
        return out.stdout

    # The demo account is subscribed from the config; cancelling in March ends it on April 1st.
    cli("cancel", "demo-basic", "--date", "2026-03-10")
    cli("subscribe", "demo-basic", "basic", "--date", "2026-04-16")
    bill = json.loads(cli("bill", "demo-basic", "--month", "2026-04", "--json"))
    assert bill["plan_fee"] == "444.000" and bill["prorated_days"] == [15, 30]
    cli("change-plan", "demo-basic", "pro", "--date", "2026-05-10")
    may = json.loads(cli("bill", "demo-basic", "--month", "2026-05", "--json"))
    june = json.loads(cli("bill", "demo-basic", "--month", "2026-06", "--json"))
    assert (may["plan"], may["total"]) == ("basic", "888.000")
    assert (june["plan"], june["total"]) == ("pro", "2888.000")
    cli("cancel", "demo-basic", "--date", "2026-06-20")
    assert json.loads(cli("bill", "demo-basic", "--month", "2026-06", "--json"))["total"] == "2888.000"
    out = run_cli("bill", "demo-basic", "--month", "2026-07", "--redis", url)
    assert out.returncode != 0 and "no subscription" in out.stderr


@pytest.mark.redis
def test_cli_bills_a_month_from_its_first_day_on(redis_server: RedisServer) -> None:
    """Catches a month not begun billed its plan fee ahead (for nothing served), alone or in --all;
    the current month's bill passed off as final while its peaks may still rise; a frozen account's
    bill not saying that its fee runs on. A what-if quote of any month stays a quote."""
    redis_server.flush()
    url = redis_server.url
    # The CLI reads the real date, in each of the subprocesses below: not across a midnight.
    to_midnight = 86400 - time.time() % 86400
    if to_midnight < 90:
        time.sleep(to_midnight + 1)
    today = datetime.now(UTC).date()
    nxt = today.replace(day=1) + timedelta(days=32)
    for args in (("demo-basic",), ("--all",)):
        out = run_cli("bill", *args, "--month", f"{nxt:%Y-%m}", "--redis", url)
        assert out.returncode != 0 and f"{nxt:%Y-%m} has not begun" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and out.stdout == ""
    out = run_cli("bill", "--plan", "basic", "--peak-dau", "5", "--month", f"{nxt:%Y-%m}", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["total"] == "888.000", out.stderr
    assert run_cli("freeze", "demo-basic", "--redis", url).returncode == 0
    out = run_cli("bill", "demo-basic", "--json", "--redis", url)
    assert out.returncode == 0, out.stderr
    bill = json.loads(out.stdout)
    assert bill["month"] == f"{today:%Y-%m}" and bill["final"] is False
    assert bill["notes"][0].startswith(f"month not over: usage to {today.isoformat()};"), bill["notes"]
    assert any(n.startswith(f"account frozen since {today.isoformat()}") for n in bill["notes"]), bill["notes"]
    last = today.replace(day=1) - timedelta(days=1)
    out = run_cli("bill", "demo-basic", "--month", f"{last:%Y-%m}", "--json", "--redis", url)
    assert out.returncode == 0, out.stderr
    assert (json.loads(out.stdout)["final"], json.loads(out.stdout)["notes"]) == (True, [])


async def test_frozen_account_over_admin_api(store: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Freezing through the admin API refuses the account's requests and shows the purge date."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    app = build_app(load_config(), store=store)
    app.clock = clock
    auth = {"authorization": f"Bearer {TOKEN}"}
    # Dated the 1st of the served month (earlier is refused: a freeze dated back nears its purge).
    first = datetime.fromtimestamp(clock.now, UTC).date().replace(day=1)
    since, purge = first.isoformat(), add_months(first, 6).isoformat()
    async with asgi_client(app, base_url="http://gw") as c:
        assert (await c.post("/_quota/accounts/demo-pro/freeze", json={"date": since})).status_code == 401
        r = await c.post("/_quota/accounts/demo-pro/freeze", json={"date": since}, headers=auth)
        assert r.status_code == 200 and r.json()["purge_after"] == purge
        r = await c.get("/demo/pro/users")
        assert (
            r.status_code == 403 and r.json()["error"] == "forbidden_op" and "frozen" in r.json()["error_description"]
        )
        assert purge in r.json()["error_description"]
        assert (await c.get("/demo/basic/users")).status_code == 200
        month = datetime.fromtimestamp(clock.now, UTC).strftime("%Y-%m")
        notes = (await c.get(f"/_quota/bills/demo-pro?month={month}", headers=auth)).json()["notes"]
        assert (
            f"account frozen since {since}: its requests are refused and its data may be purged after "
            f"{purge}; cancel the plan to stop its fee"
        ) in notes
        assert (await c.post("/_quota/accounts/demo-pro/unfreeze", headers=auth)).status_code == 200
        assert (await c.get("/demo/pro/users")).status_code == 200


def test_cli_entitlements_and_unknown_app() -> None:
    """`quota entitlements` prints one app's plan as JSON; an unknown app exits non-zero."""
    out = run_cli("entitlements", "demo#enterprise", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["plan"] == "enterprise" and data["limits"]["members_per_group"] == 8000
    assert data["limits"]["registered_users"] is None and data["features"]["translation"] is True
    bad = run_cli("entitlements", "nobody#here")
    assert bad.returncode != 0 and "nobody#here" in bad.stderr


async def test_online_cap_follows_last_months_mau(store: Any) -> None:
    """basic: cap = max(500, 10% x max(last month's MAU, this month's)); on the 1st last month carries it."""
    from quota.decisions import lease_op
    from quota.keys import mau_key
    from quota.plans import Directory
    from quota.store.program import Program

    cfg = load_config()
    day = date(2026, 5, 1)
    app = Directory(cfg.matrix, cfg.accounts).lookup("demo#basic", day)
    assert app is not None
    await store.add_members(mau_key(app.prefix, 2026, 4), [f"m{i}" for i in range(6000)])
    now = 1_800_000_000_000
    results = [(await store.run(Program([lease_op(app, day, f"c{i}", 60_000)]), now)).allowed for i in range(601)]
    assert results.count(True) == 600 and results[-1] is False


@pytest.mark.redis
def test_usage_cli(redis_server: RedisServer) -> None:
    """`quota usage ORG#APP --month` reports DAU per day, MAU and each counted limit."""
    import redis as redis_sync

    redis_server.flush()
    r = redis_sync.Redis(port=redis_server.port)
    prefix = app_prefix("demo#pro")
    r.sadd(dau_key(prefix, date(2026, 9, 3)), "a", "b")
    r.sadd(dau_key(prefix, date(2026, 9, 4)), "a")
    r.sadd(prefix + "mau:202609", "a", "b")
    r.close()
    out = run_cli("usage", "demo#pro", "--month", "2026-09", "--json", "--redis", redis_server.url)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["dau"]["2026-09-03"] == 2 and data["peak_dau"] == 2 and data["mau"] == 2
    assert data["limits"]["groups_per_app"] == {"used": 0, "limit": 50000, "remaining": 50000}
