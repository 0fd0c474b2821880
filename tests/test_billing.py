"""The monthly bill: the included DAU, rounding, plans without overage, and bills, accounts and plan
changes over the admin API from activity that logins through the middleware recorded."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quota.billing import AppPeak, compute_bill
from quota.config import load_config
from quota.matrix import Price
from quota.serve import build_app
from tests.conftest import Clock, asgi_client
from tests.helpers import raw_members, read_yaml, register, write_yaml

TOKEN = "billing-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def test_included_dau_is_not_prorated() -> None:
    """Catches the included DAU prorated like the fee: subscribed on the 16th of a 30-day month, a
    basic app peaking at 12,000 DAU has 2,000 over the 10,000 included (not 7,000 over 5,000)."""
    plan = load_config().matrix.plans["basic"]
    bill = compute_bill(plan, [AppPeak("a", 12000)], 2026, 4, subscribed_on=date(2026, 4, 16))
    assert bill.prorated_days == (15, 30)
    assert (bill.included, bill.excess) == (10000, 2000)
    assert bill.plan_fee == Decimal("444.000") and bill.overage == Decimal("170.000")
    assert bill.total == Decimal("614.000")


@pytest.mark.parametrize(
    "excess,total",
    [(100, "888.003"), (300, "888.008"), (140, "888.004"), (20, "888.001")],
)
def test_total_rounds_half_up_at_a_thousandth(excess: int, total: str) -> None:
    """Catches half-even (banker's) rounding, or rounding to cents: at 0.25 元 per 10,000 DAU, 100
    over is 0.0025 元 and rounds up to 0.003 (half-even would give 0.002); 300 over is 0.0075."""
    plan = load_config().matrix.plans["basic"]
    plan = replace(plan, price=Price(Decimal("888"), 10000, Decimal("0.25")))
    bill = compute_bill(plan, [AppPeak("a", 10000 + excess)], 2026, 5)
    assert str(bill.total) == total


def test_total_is_rounded_once_at_the_end() -> None:
    """Catches the fee and the overage rounded before they are added: 888 x 1/29 is 30.6206896...
    and 100 over at 0.25 per 10,000 is 0.0025; their sum 30.6231896... is 30.623 (rounding each
    first would bill 30.621 + 0.003 = 30.624)."""
    plan = load_config().matrix.plans["basic"]
    plan = replace(plan, price=Price(Decimal("888"), 10000, Decimal("0.25")))
    bill = compute_bill(plan, [AppPeak("a", 10100)], 2028, 2, subscribed_on=date(2028, 2, 29))
    assert bill.prorated_days == (1, 29)
    assert bill.total == Decimal("30.623")
    assert (bill.plan_fee, bill.overage) == (Decimal("30.621"), Decimal("0.003"))


async def test_bill_account_and_plan_change_over_admin_api(
    store: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches bills over the admin API not reading the logins the middleware recorded, the account
    not showing a change, and a change of plan billed from its own month instead of the next."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    app = build_app(load_config(), store=store)
    app.clock = clock
    today = datetime.fromtimestamp(clock.now, UTC).date()
    month = f"{today:%Y-%m}"
    nxt = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    async with asgi_client(app, base_url="http://gw") as c:
        await register(c, "demo/pro", ["a", "b", "c"])
        for name in ("a", "b", "c", "a"):
            assert (await c.post("/demo/pro/token", json={"username": name})).status_code == 200
        assert await raw_members(store, f"q:{{demo#pro}}:dau:{today:%Y%m%d}") == {"a", "b", "c"}
        assert await raw_members(store, f"q:{{demo#pro}}:mau:{today:%Y%m}") == {"a", "b", "c"}
        assert (await c.get(f"/_quota/bills/demo-pro?month={month}")).status_code == 401
        bill = (await c.get(f"/_quota/bills/demo-pro?month={month}", headers=AUTH)).json()
        assert bill["apps"] == [{"app": "demo#pro", "peak_dau": 3, "day": today.isoformat()}]
        assert (bill["plan"], bill["total"], bill["excess"]) == ("pro", "2888.000", 0)
        change = {"plan": "basic", "date": str(today)}
        r = await c.post("/_quota/accounts/demo-pro/change-plan", json=change, headers=AUTH)
        assert r.status_code == 200
        subs = r.json()["subscriptions"]
        assert subs == [
            {"plan": "pro", "start": "2000-01-01", "end": nxt.isoformat()},
            {"plan": "basic", "start": nxt.isoformat(), "end": None},
        ]
        assert (await c.get("/_quota/accounts/demo-pro", headers=AUTH)).json()["subscriptions"] == subs
        this = (await c.get(f"/_quota/bills/demo-pro?month={month}", headers=AUTH)).json()
        assert (this["plan"], this["total"], this["final"]) == ("pro", "2888.000", False)
        # Next month has not begun: no bill yet, not its plan fee billed ahead.
        r = await c.get(f"/_quota/bills/demo-pro?month={nxt:%Y-%m}", headers=AUTH)
        assert r.status_code == 400 and "has not begun" in r.json()["error_description"], r.text
        clock.now = datetime(nxt.year, nxt.month, nxt.day, 0, 30, tzinfo=UTC).timestamp()
        this = (await c.get(f"/_quota/bills/demo-pro?month={month}", headers=AUTH)).json()
        after = (await c.get(f"/_quota/bills/demo-pro?month={nxt:%Y-%m}", headers=AUTH)).json()
        assert (this["plan"], this["total"], this["final"], this["notes"]) == ("pro", "2888.000", True, [])
        assert (after["plan"], after["total"], after["apps"][0]["peak_dau"]) == ("basic", "888.000", 0)
        assert not after["final"] and after["notes"][0].startswith(f"month not over: usage to {nxt.isoformat()};")
        r = await c.post("/_quota/accounts/demo-pro/change-plan", json={"plan": "gold"}, headers=AUTH)
        assert r.status_code == 400
        assert (await c.get("/_quota/bills/nobody?month=2026-01", headers=AUTH)).status_code == 404


def test_plan_fee_rounds_half_up_too() -> None:
    """Catches the plan fee line rounded half-even (or by the context's default): a fee of 0.0025
    元 shows as 0.003, like the total."""
    plan = load_config().matrix.plans["basic"]
    plan = replace(plan, price=Price(Decimal("0.0025"), 10000, Decimal("850")))
    bill = compute_bill(plan, [AppPeak("a", 5)], 2026, 5, account="acme")
    assert (bill.plan_fee, bill.total, bill.account, bill.month) == (
        Decimal("0.003"),
        Decimal("0.003"),
        "acme",
        "2026-05",
    )
    assert bill.overage_price == Decimal("850") and bill.prorated_days is None


@pytest.mark.parametrize("day,days", [(date(2027, 1, 2), (30, 31)), (date(2027, 1, 31), (1, 31))])
def test_subscription_starting_after_the_first_is_prorated(day: date, days: tuple[int, int]) -> None:
    """Catches the month's plan looked up on the wrong day, or a subscription starting on the 2nd
    or on the month's last day billed in full (or not at all)."""
    from quota.accounts import Account, Subscription
    from quota.billing import billing_plan

    account = Account("acme", ("acme#a",), (Subscription("pro", date(2026, 1, 1), date(2026, 12, 1)),))
    account = replace(account, subscriptions=(*account.subscriptions, Subscription("basic", day)))
    assert billing_plan(account, 2027, 1) == ("basic", day)
    assert billing_plan(account, 2027, 2) == ("basic", None)
    assert billing_plan(account, 2026, 12) == (None, None)
    bill = compute_bill(load_config().matrix.plans["basic"], [AppPeak("a", 1)], 2027, 1, subscribed_on=day)
    assert bill.prorated_days == days


async def test_bill_json_over_admin_api(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a bill served over the admin API with a field missing or renamed, not prorated for
    a subscription that started mid-month, its peak day not the earliest of equal peaks, a day
    named for an app with no activity, or refusals that do not say what is missing."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    app = build_app(load_config(), store=store)
    app.clock = Clock(datetime(2026, 12, 10, 10, tzinfo=UTC).timestamp())
    async with asgi_client(app, base_url="http://gw") as c:
        post = c.post
        assert (await post("/_quota/accounts/demo-basic/cancel", json={"date": "2026-12-10"}, headers=AUTH)).is_success
        app.clock.now = datetime(2027, 1, 5, 10, tzinfo=UTC).timestamp()
        r = await post(
            "/_quota/accounts/demo-basic/subscribe", json={"plan": "basic", "date": "2027-01-02"}, headers=AUTH
        )
        assert r.is_success
        await register(c, "demo/basic", ["a", "b", "c"])
        for name in ("a", "b"):
            assert (await c.post("/demo/basic/token", json={"username": name})).status_code == 200
        app.clock.now += 86400
        for name in ("b", "c"):
            assert (await c.post("/demo/basic/token", json={"username": name})).status_code == 200
        bill = (await c.get("/_quota/bills/demo-basic?month=2027-01", headers=AUTH)).json()
        assert (bill["final"], bill["notes"]) == (
            False,
            ["month not over: usage to 2027-01-06; the bill is final after 2027-01-31"],
        )
        app.clock.now = datetime(2027, 1, 31, 23, 59, tzinfo=UTC).timestamp()
        assert (await c.get("/_quota/bills/demo-basic?month=2027-01", headers=AUTH)).json()["final"] is False
        # Once January is over, its bill is final, and says nothing more.
        app.clock.now = datetime(2027, 2, 1, 0, 0, tzinfo=UTC).timestamp()
        bill = (await c.get("/_quota/bills/demo-basic?month=2027-01", headers=AUTH)).json()
        assert bill == {
            "account": "demo-basic",
            "month": "2027-01",
            "plan": "basic",
            "apps": [{"app": "demo#basic", "peak_dau": 2, "day": "2027-01-05"}],
            "usage": 2,
            "included_dau": 10000,
            "excess": 0,
            "plan_fee": "859.355",
            "prorated_days": [30, 31],
            "overage_per_10k_dau": "850",
            "overage": "0.000",
            "total": "859.355",
            "final": True,
            "notes": [],
        }
        idle = (await c.get("/_quota/bills/demo-free?month=2027-01", headers=AUTH)).json()
        assert idle["apps"] == [{"app": "demo#free", "peak_dau": 0, "day": None}]
        assert (idle["overage_per_10k_dau"], idle["prorated_days"], idle["total"]) == (None, None, "0.000")
        r = await c.get("/_quota/bills/nobody?month=2027-01", headers=AUTH)
        assert r.status_code == 404 and r.json()["error_description"] == "unknown account 'nobody'"
        r = await c.get("/_quota/bills/demo-basic?month=1999-05", headers=AUTH)
        assert r.status_code == 404
        assert r.json()["error_description"] == "account 'demo-basic' had no subscription in 1999-05"


async def test_subscribing_over_a_plan_in_force_is_refused(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a plan started over another mid-month: served at once as pro, billed on the plan in
    force on the 1st (free, 0 元), so a month of pro for nothing. A change of plan waits for the 1st
    of next month; subscribing is for an account with no plan in force."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    app = build_app(load_config(), store=store)
    app.clock = Clock(datetime(2027, 1, 5, 10, tzinfo=UTC).timestamp())
    async with asgi_client(app, base_url="http://gw") as c:
        r = await c.post(
            "/_quota/accounts/demo-free/subscribe", json={"plan": "pro", "date": "2027-01-02"}, headers=AUTH
        )
        assert r.status_code == 409 and r.json()["error"] == "conflict", r.text
        assert "change-plan" in r.json()["error_description"]
        await app.runtime.directory.refresh()
        assert (await c.post("/demo/free/messages/translate", json={})).status_code == 403
        bill = (await c.get("/_quota/bills/demo-free?month=2027-01", headers=AUTH)).json()
        assert (bill["plan"], bill["total"]) == ("free", "0.000")
        # The way to pro: from the 1st of next month, billed whole then.
        r = await c.post(
            "/_quota/accounts/demo-free/change-plan", json={"plan": "pro", "date": "2027-01-02"}, headers=AUTH
        )
        assert r.is_success, r.text
        app.clock.now = datetime(2027, 2, 2, 10, tzinfo=UTC).timestamp()
        february = (await c.get("/_quota/bills/demo-free?month=2027-02", headers=AUTH)).json()
        assert (february["plan"], february["total"]) == ("pro", "2888.000")
        # Once the old plan is cancelled and over, a subscription starts at once, prorated.
        assert (await c.post("/_quota/accounts/demo-free/cancel", json={"date": "2027-02-03"}, headers=AUTH)).is_success
        r = await c.post(
            "/_quota/accounts/demo-free/subscribe", json={"plan": "basic", "date": "2027-03-02"}, headers=AUTH
        )
        assert r.is_success, r.text
        # A plan starting later holds too: a subscribe dated before it, on a day no plan covers
        # (pro ends as March begins), would drop it.
        r = await c.post(
            "/_quota/accounts/demo-free/subscribe", json={"plan": "pro", "date": "2027-03-01"}, headers=AUTH
        )
        assert r.status_code == 409, r.text
        app.clock.now = datetime(2027, 3, 3, 10, tzinfo=UTC).timestamp()
        march = (await c.get("/_quota/bills/demo-free?month=2027-03", headers=AUTH)).json()
        assert (march["plan"], march["prorated_days"], march["total"]) == ("basic", [30, 31], "859.355")


async def test_an_app_moved_away_stays_on_the_bill_of_the_days_it_was_held(
    store: Any, monkeypatch: pytest.MonkeyPatch, config_dir: Path
) -> None:
    """Catches a bill counting the apps an account holds when it is run, not those it held: an app
    over its included DAU, detached before the bill (and attached to another account), took its
    usage off the bill, or was billed twice. The day of a move is the old account's; the new one
    bills from the next day."""
    plans = config_dir / "plans.yaml"
    doc = read_yaml(plans)
    doc["plans"]["basic"]["price"]["included_dau"] = 1
    write_yaml(plans, doc)
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    app = build_app(load_config(config_dir), store=store)
    # The admin API dates a move by today's date: the logins happen today too.
    app.clock = Clock(time.time(), tick=0)
    today = datetime.now(UTC).date()
    tomorrow = today + timedelta(days=1)

    async def bill(account: str, day: date) -> dict[str, Any]:
        r = await c.get(f"/_quota/bills/{account}?month={day:%Y-%m}", headers=AUTH)
        assert r.status_code == 200, r.text
        return dict(r.json())

    async with asgi_client(app, base_url="http://gw") as c:
        await register(c, "demo/basic", ["a", "b", "c", "d", "e"])
        for name in ("a", "b", "c"):
            assert (await c.post("/demo/basic/token", json={"username": name})).status_code == 200
        before = await bill("demo-basic", today)
        assert (before["usage"], before["overage"]) == (3, "0.170"), before
        assert (await c.delete("/_quota/accounts/demo-basic/apps/demo/basic", headers=AUTH)).status_code == 200
        after = await bill("demo-basic", today)
        assert (after["usage"], after["overage"], after["apps"]) == (3, "0.170", before["apps"]), after
        acme = {"name": "acme", "plan": "basic", "apps": ["demo#basic"]}
        assert (await c.post("/_quota/accounts", json=acme, headers=AUTH)).status_code == 201
        # Still today: the old account's day, though the app is enforced under the new one.
        assert (await c.post("/demo/basic/token", json={"username": "d"})).status_code == 200
        assert (await bill("demo-basic", today))["usage"] == 4
        assert (await bill("acme", today))["usage"] == 0
        app.clock.now += 86400
        assert (await c.post("/demo/basic/token", json={"username": "e"})).status_code == 200
        moved = await bill("acme", tomorrow)
        assert moved["usage"] == 1 and moved["apps"][0]["day"] == tomorrow.isoformat(), moved
        old = await bill("demo-basic", tomorrow)
        assert old["usage"] == (4 if tomorrow.month == today.month else 0), old


async def test_an_app_attached_to_another_account_bills_there_from_the_next_day(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a move by the attach endpoint (`PUT .../apps/{org}/{app}`) dated today: the day of a
    move is the old account's, and the new one billed it too, twice over."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    app = build_app(load_config(), store=store)
    app.clock = Clock(datetime(2027, 1, 5, 10, tzinfo=UTC).timestamp(), tick=0)
    async with asgi_client(app, base_url="http://gw") as c:
        await register(c, "demo/basic", ["a", "b"])
        for name in ("a", "b"):
            assert (await c.post("/demo/basic/token", json={"username": name})).status_code == 200
        assert (await c.delete("/_quota/accounts/demo-basic/apps/demo/basic", headers=AUTH)).status_code == 200
        assert (await c.put("/_quota/accounts/demo-pro/apps/demo/basic", headers=AUTH)).status_code == 200
        pro = (await c.get("/_quota/bills/demo-pro?month=2027-01", headers=AUTH)).json()
        assert {a["app"]: a["peak_dau"] for a in pro["apps"]}.get("demo#basic", 0) == 0, pro
        assert (await c.get("/_quota/bills/demo-basic?month=2027-01", headers=AUTH)).json()["usage"] == 2
        app.clock.now += 86400
        assert (await c.post("/demo/basic/token", json={"username": "a"})).status_code == 200
        pro = (await c.get("/_quota/bills/demo-pro?month=2027-01", headers=AUTH)).json()
        assert {a["app"]: a["peak_dau"] for a in pro["apps"]}["demo#basic"] == 1, pro


async def test_a_change_dated_into_a_month_served_is_refused(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a backdated change rewriting a month already served: a subscribe dated before the
    plan in force dropped it (January served as enterprise, billed as free), a cancel dated last
    month took this month's bill away, a freeze dated back brought its purge date into the past.
    Over the admin API a change is dated this month or later, and a subscribe is refused while any
    plan runs on or past its date."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    app = build_app(load_config(), store=store)
    app.clock = Clock(datetime(2027, 1, 20, 10, tzinfo=UTC).timestamp())
    async with asgi_client(app, base_url="http://gw") as c:
        for action, body in (
            ("subscribe", {"plan": "free", "date": "1999-12-31"}),
            ("change-plan", {"plan": "free", "date": "2026-12-31"}),
            ("cancel", {"date": "2026-12-05"}),
            ("freeze", {"date": "0001-01-01"}),  # its purge date long past
        ):
            r = await c.post(f"/_quota/accounts/demo-enterprise/{action}", json=body, headers=AUTH)
            assert r.status_code == 400 and "2027-01-01 or later" in r.json()["error_description"], (action, r.text)
        r = await c.post(
            "/_quota/accounts/demo-enterprise/subscribe", json={"plan": "free", "date": "2027-01-01"}, headers=AUTH
        )
        assert r.status_code == 409 and "change-plan" in r.json()["error_description"], r.text
        bill = (await c.get("/_quota/bills/demo-enterprise?month=2027-01", headers=AUTH)).json()
        assert bill["plan"] == "enterprise", bill
