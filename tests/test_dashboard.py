"""The usage dashboard in a real browser (Debian's chromium, driven by Playwright), over a real
`quota serve` on a redis-server the test started and filled with a month of activity.

The numbers on each page are checked against `quota usage --json` and `quota bill --json`; the
screenshots land in the test's temporary directory and their paths are printed.
"""

from __future__ import annotations

import calendar
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from tests.activity import AppActivity, config_with, fill, previous_month
from tests.conftest import ROOT, RedisServer, free_port, run_cli

READ_TOKEN = "dashboard-read-token-0123456789"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = "<img src=x onerror=alert(1)>"


def _wait_for(port: int, proc: subprocess.Popen[bytes], seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"quota serve exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("quota serve did not start")


@pytest.fixture
def month_of_activity(redis_server: RedisServer, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A served gateway over a Redis holding last month's activity of three apps in two accounts."""
    redis_server.flush()
    year, month = previous_month()
    cfg = config_with(
        tmp_path / "config",
        "  acme:\n    plan: basic\n    apps: ['acme#chat', 'acme#game']\n"
        f"    subscribed_on: {year:04d}-{month:02d}-10\n",
    )
    apps = [
        AppActivity("acme#chat", base=6000, growth=100, online=120, peak_online=640),
        AppActivity("acme#game", base=2000, growth=50, peak_online=210),
        AppActivity(
            "demo#free",
            base=30,
            growth=2,
            online=45,
            peak_online=48,
            sets={
                ("app_groups", "o", "demo#free"): 85,
                ("contacts", "o", "alice"): 92,
                ("group_members", "o", HOSTILE): 40,
                ("group_members", "o", "g1"): 30,
            },
        ),
    ]
    written = fill(redis_server.port, apps, year, month)
    # A change of plan during the month: the bill stays on basic and says when pro starts.
    change = run_cli(
        "change-plan", "acme", "pro", "--date", f"{year:04d}-{month:02d}-20",
        "--config", str(cfg), "--redis", redis_server.url,
    )  # fmt: skip
    assert change.returncode == 0, change.stderr
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "quota",
            "serve",
            "--config",
            str(cfg),
            "--redis",
            redis_server.url,
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env={**os.environ, "QUOTA_READ_TOKEN": READ_TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(port, proc)
        yield {
            "base": f"http://127.0.0.1:{port}/_quota/dashboard",
            "config": str(cfg),
            "redis": redis_server.url,
            "month": f"{year:04d}-{month:02d}",
            "days": calendar.monthrange(year, month)[1],
            "written": written,
            "last_day": date(year, month, calendar.monthrange(year, month)[1]),
        }
    finally:
        proc.terminate()
        proc.wait(10)


def _cli_json(env: dict[str, Any], *args: str) -> Any:
    out = run_cli(*args, "--json", "--month", env["month"], "--config", env["config"], "--redis", env["redis"])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.redis
def test_dashboard_in_chromium(
    month_of_activity: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Login gives an HttpOnly SameSite=Strict cookie and no token in any URL; each page's numbers
    equal the CLI's JSON; the DAU chart has a bar per day with the included line; hot caps are
    highlighted; a hostile entity id is shown as text; logout ends the session.
    Catches: a page number drifting from `quota usage/bill --json`, a chart without data, a token
    in a URL or a script-readable cookie, unescaped values, a logout that leaves the session."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: ./run-tests installs it (apt-get install chromium)")
    env = month_of_activity
    base, month = env["base"], env["month"]
    usage = {app: _cli_json(env, "usage", app) for app in ("acme#chat", "acme#game", "demo#free")}
    bill = _cli_json(env, "bill", "acme")
    shots: list[Path] = []
    dialogs: list[str] = []
    urls: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(10_000)
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("request", lambda r: urls.append(r.url))

            page.goto(f"{base}/?month={month}")
            assert page.url.endswith("/login")
            page.fill("input[name=token]", "wrong-token-but-long-enough")
            page.click("button[type=submit]")
            assert "not valid" in page.inner_text("main")
            page.fill("input[name=token]", READ_TOKEN)
            page.click("button[type=submit]")
            page.goto(f"{base}/?month={month}")
            (cookie,) = page.context.cookies()
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and READ_TOKEN not in cookie["value"]
            assert page.evaluate("document.cookie") == ""

            # All apps: peak DAU per app, the bill so far and its forecast, hot caps.
            for app, data in usage.items():
                row = page.locator(f"tr[data-app='{app}']")
                assert int(row.locator("[data-peak-dau]").get_attribute("data-peak-dau") or -1) == data["peak_dau"]
            acme = page.locator("tr[data-account='acme']")
            assert acme.locator("[data-total]").get_attribute("data-total") == bill["total"]
            assert f"{int(bill['total'].split('.')[0]):,}" in acme.inner_text() and "元" in acme.inner_text()
            forecast = acme.locator("[data-forecast]").get_attribute("data-forecast")
            assert forecast is not None and float(forecast) >= float(bill["total"])
            hot = page.locator("tr[data-app='demo#free'] [data-cap]").evaluate_all("els => els.map(e => e.dataset.cap)")
            assert {"groups_per_app", "friends_per_user", "online_users"} <= set(hot)
            assert page.locator("tr[data-app='acme#game'] [data-cap]").count() == 0
            shots.append(tmp_path / "dashboard-all-apps.png")
            page.screenshot(path=str(shots[-1]), full_page=True)

            # One app: a bar per day carrying the CLI's DAU, the included line, MAU and peak online.
            page.click("a[href*='/apps/acme/chat']")
            page.goto(page.url.split("?")[0] + f"?month={month}")
            bars = page.locator("svg.daily rect.bar")
            assert bars.count() == env["days"]
            days = bars.evaluate_all("els => els.map(e => e.dataset.day)")
            values = bars.evaluate_all("els => els.map(e => Number(e.dataset.value))")
            shown = dict(zip(days, values, strict=True))
            assert shown == usage["acme#chat"]["dau"]
            assert bars.first.bounding_box() is not None
            assert max(b["height"] for b in [bars.nth(i).bounding_box() or {"height": 0} for i in range(3)]) > 20
            assert page.locator("svg.daily line.included").count() == 1
            tile = page.locator("[data-tile=mau]").inner_text().replace(",", "")
            assert int(tile) == usage["acme#chat"]["mau"]
            peak_online, online_cap = page.locator("[data-tile=peak_online]").inner_text().split(" / ")
            assert int(peak_online) == usage["acme#chat"]["peak_online"] == 640
            assert int(online_cap.replace(",", "")) == usage["acme#chat"]["limits"]["online_users"]["limit"]
            shots.append(tmp_path / "dashboard-app-acme-chat.png")
            page.screenshot(path=str(shots[-1]), full_page=True)

            # The free app: every cap as a used/limit bar equal to the CLI's, the nearest entity named.
            page.goto(f"{base}/apps/demo/free?month={month}")
            for name, figures in usage["demo#free"]["limits"].items():
                cell = page.locator(f"tr[data-cap='{name}'] td[data-used]")
                assert int(cell.get_attribute("data-used") or -1) == figures["used"], name
            friends = page.locator("tr[data-cap='friends_per_user']")
            assert "user:alice" in friends.inner_text() and "hot" in (friends.get_attribute("class") or "")
            assert page.locator("svg.bar-chart rect.fill.hot").count() >= 3
            assert f"group:{HOSTILE}" in page.locator("tr[data-cap='members_per_group']").inner_text()
            assert page.locator("#caps img").count() == 0
            assert "✖ translation" in page.inner_text("ul.features")
            # This month, the default: a bar for each of its days, today's DAU read from today.
            page.goto(f"{base}/apps/demo/free")
            assert (
                page.locator("svg.daily rect.bar").count()
                == calendar.monthrange(date.today().year, date.today().month)[1]
            )
            page.goto(f"{base}/apps/demo/free?month={month}")
            shots.append(tmp_path / "dashboard-app-demo-free.png")
            page.screenshot(path=str(shots[-1]), full_page=True)

            # One account: the bill line by line, with proration and the plan change.
            page.goto(f"{base}/accounts/acme?month={month}")
            lines = {
                el.get_attribute("data-line"): el.get_attribute("data-value")
                for el in page.locator("#bill [data-line]").all()
            }
            assert lines["total"] == bill["total"] and lines["plan_fee"] == bill["plan_fee"]
            assert lines["overage"] == bill["overage"] and int(lines["usage"] or -1) == bill["usage"]
            notes = page.inner_text("#notes")
            assert "prorated" in notes and "changes to pro" in notes
            used, days = bill["prorated_days"]
            assert f"{used} of {days} days" in page.inner_text("#bill")
            shots.append(tmp_path / "dashboard-account-acme.png")
            page.screenshot(path=str(shots[-1]), full_page=True)

            page.click("header button[type=submit]")
            assert page.url.endswith("/login")
            page.goto(f"{base}/?month={month}")
            assert page.url.endswith("/login") and page.context.cookies() == []
        finally:
            browser.close()
    assert not dialogs, f"a value ran as script: {dialogs}"
    assert all(READ_TOKEN not in u for u in urls)
    assert all(u.startswith(base) for u in urls), "the page fetched something from elsewhere"
    for shot in shots:
        assert shot.stat().st_size > 10_000
    with capsys.disabled():
        print("\ndashboard screenshots:\n  " + "\n  ".join(map(str, shots)))
