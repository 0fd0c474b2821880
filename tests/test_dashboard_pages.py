"""The dashboard without a browser: its login, cookie and CSRF rules, escaping, refusals per app,
and the forecast, driven over HTTP through the middleware (httpx ASGITransport)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from quota.config import load_config
from quota.dashboard import sessions
from quota.dashboard.html import el
from quota.dashboard.reports import forecast_peak
from quota.metrics import REFUSAL_KEYS_PER_MINUTE, RefusalLog
from quota.serve import build_app
from quota.store.memory import MemoryStore
from quota.tokens import Tokens
from tests.activity import config_with
from tests.conftest import RedisServer, asgi_client

READ = "dashboard-read-token-0123456789"
ADMIN = "dashboard-admin-token-0123456789"
HOSTILE = '"><img src=x onerror=alert(1)>'
BASE = "/_quota/dashboard"
CUSTOMER = "acme-dashboard-token-0123456789"
CUSTOMER_SHA = hashlib.sha256(CUSTOMER.encode()).hexdigest()


@pytest.fixture
async def gateway(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setenv("QUOTA_READ_TOKEN", READ)
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", ADMIN)
    cfg = config_with(
        tmp_path / "config",
        f"  '{HOSTILE}':\n    plan: basic\n    apps: ['evil#app']\n"
        f"  acme:\n    plan: pro\n    apps: ['acme#chat', 'acme#game']\n    dashboard_token_sha256: {CUSTOMER_SHA}\n",
    )
    app = build_app(load_config(cfg), store=MemoryStore())
    async with asgi_client(app, base_url="http://gw") as client:
        yield client


async def _login(client: httpx.AsyncClient, token: str = READ) -> httpx.Response:
    return await client.post(f"{BASE}/login", data={"token": token}, headers={"origin": "http://gw"})


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, "no CSRF field on the page"
    return found.group(1)


async def test_off_without_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no token configured the dashboard answers 404, like the admin API. Catches: a dashboard
    (and its login form) served when the operator never turned the admin surface on."""
    monkeypatch.delenv("QUOTA_READ_TOKEN", raising=False)
    monkeypatch.delenv("QUOTA_ADMIN_TOKEN", raising=False)
    app = build_app(load_config(), store=MemoryStore())
    async with asgi_client(app, base_url="http://gw") as c:
        assert (await c.get(f"{BASE}/login")).status_code == 404
        assert (await c.get(f"{BASE}/")).status_code == 404
        assert (await c.post(f"{BASE}/login", data={"token": READ})).status_code == 404


async def test_login_gives_a_cookie_not_a_url(gateway: httpx.AsyncClient) -> None:
    """The token buys an HttpOnly, SameSite=Strict cookie scoped to the dashboard that does not
    contain it; redirects carry no token; a token in the query string logs nobody in.
    Catches: a token leaking into a URL or the cookie, a script-readable or cross-site cookie."""
    assert (await gateway.get(f"{BASE}/?token={READ}")).status_code == 303
    r = await _login(gateway, "not-the-token-at-all-000")
    assert r.status_code == 401 and "not valid" in r.text and "set-cookie" not in r.headers
    r = await _login(gateway)
    assert r.status_code == 303 and READ not in r.headers["location"]
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and f"Path={BASE}" in cookie
    assert READ not in cookie
    page = await gateway.get(f"{BASE}/")
    assert page.status_code == 200 and "All apps" in page.text
    # Behind a TLS-terminating proxy quota sees http; the browser's https origin still gets Secure.
    behind_tls = await gateway.post(f"{BASE}/login", data={"token": READ}, headers={"origin": "https://gw"})
    assert behind_tls.status_code == 303 and "Secure" in behind_tls.headers["set-cookie"]
    stuffed = await gateway.post(
        f"{BASE}/login", data={f"f{i}": "x" for i in range(20)}, headers={"origin": "http://gw"}
    )
    assert stuffed.status_code == 400


async def test_forged_expired_and_rotated_cookies_refused(gateway: httpx.AsyncClient) -> None:
    """A cookie whose scope was edited, one past its expiry, and one signed with another token all
    send the browser back to the login. Catches: an unsigned or unchecked cookie, no expiry."""
    tokens = Tokens(admin=ADMIN, read=READ)
    accounts = gateway._transport.app.runtime.directory.accounts  # type: ignore[attr-defined]
    good = sessions.issue(tokens, READ, accounts)
    customer = sessions.issue(tokens, CUSTOMER, accounts)
    assert good is not None and customer is not None and customer.account == "acme"
    forged = "admin." + good.cookie.partition(".")[2]
    # A customer's cookie relabelled for another account, or promoted to an operator's.
    label, _, rest = customer.cookie.partition(".")
    other = "acct-" + base64.urlsafe_b64encode(b"demo-pro").decode().rstrip("=") + "." + rest
    promoted = "read." + rest
    expired = sessions.issue(tokens, READ, accounts, now=time.time() - sessions.LIFETIME_S - 1)
    rotated = sessions.issue(Tokens(read="an-older-read-token-0000"), "an-older-read-token-0000", accounts)
    assert expired is not None and rotated is not None
    for cookie in (forged, other, promoted, expired.cookie, rotated.cookie, "read.9999999999.", "acct-!!.1.2", ""):
        gateway.cookies.set(sessions.COOKIE, cookie)
        r = await gateway.get(f"{BASE}/")
        assert r.status_code == 303 and r.headers["location"].endswith("/login"), cookie
    gateway.cookies.set(sessions.COOKIE, good.cookie)
    assert (await gateway.get(f"{BASE}/")).status_code == 200


async def test_customer_sees_its_own_account_only(gateway: httpx.AsyncClient) -> None:
    """An account's dashboard token shows that account and its apps; every other account and app
    answers 404, as if it did not exist, and the all-apps page lists none of them. The operators'
    read token sees every account. Catches: one customer reading another's usage or bill."""
    r = await _login(gateway, CUSTOMER)
    assert r.status_code == 303 and CUSTOMER not in r.headers["set-cookie"]
    overview = (await gateway.get(f"{BASE}/")).text
    assert 'data-account="acme"' in overview and 'data-app="acme#game"' in overview
    assert "demo-pro" not in overview and "demo#free" not in overview and "evil#app" not in overview
    assert (await gateway.get(f"{BASE}/apps/acme/chat")).status_code == 200
    assert (await gateway.get(f"{BASE}/accounts/acme")).status_code == 200
    for path in ("/apps/demo/pro", "/apps/demo/free", "/accounts/demo-pro", "/accounts/nobody"):
        assert (await gateway.get(BASE + path)).status_code == 404, path
    gateway.cookies.clear()
    await _login(gateway, READ)
    overview = (await gateway.get(f"{BASE}/")).text
    assert 'data-account="acme"' in overview and 'data-account="demo-pro"' in overview
    assert (await gateway.get(f"{BASE}/apps/demo/pro")).status_code == 200


async def test_an_account_page_says_when_its_bill_is_not_final(gateway: httpx.AsyncClient) -> None:
    """Catches the page's bill dated by the month's reading day (a past month's last day) instead of
    today: last month's bill, long final, said "month not over"; this month's must say it."""
    await _login(gateway, READ)
    this = (await gateway.get(f"{BASE}/accounts/acme")).text
    assert "month not over: usage to" in this
    last = datetime.now(UTC).date().replace(day=1) - timedelta(days=1)
    past = await gateway.get(f"{BASE}/accounts/acme", params={"month": f"{last:%Y-%m}"})
    assert past.status_code == 200 and "month not over" not in past.text and "acme" in past.text


async def test_a_frozen_account_page_says_so_once(gateway: httpx.AsyncClient) -> None:
    """Catches the page listing the account's freeze twice (once from the plan's notes, once from
    the bill's, in two wordings) or without the day its data may be purged."""
    auth = {"authorization": f"Bearer {ADMIN}"}
    today = datetime.now(UTC).date()
    frozen = await gateway.post("/_quota/accounts/acme/freeze", json={"date": today.isoformat()}, headers=auth)
    assert frozen.status_code == 200, frozen.text
    await _login(gateway, READ)
    page = (await gateway.get(f"{BASE}/accounts/acme")).text
    assert page.count("frozen since") == 1, page
    assert f"frozen since {today.isoformat()}" in page and f"purged after {frozen.json()['purge_after']}" in page


async def test_customer_sees_only_the_days_its_account_held_an_app(gateway: httpx.AsyncClient) -> None:
    """An app moved to acme today was demo-pro's last month, and today is still demo-pro's (the day
    of a move is the old account's): acme's customer sees the app, but none of its DAU, MAU or peak
    online from before, where the operator sees the app's whole history. Catches the app page
    checking only who holds the app now (acme's customer read demo-pro's 4,321 DAU), and the
    overview's app rows doing the same."""
    from tests.activity import previous_month

    store = gateway._transport.app.runtime.store  # type: ignore[attr-defined]
    year, month = previous_month()
    store.sets[f"q:{{demo#pro}}:dau:{year:04d}{month:02d}10"] = {f"r{i}" for i in range(4321)}
    store.sets[f"q:{{demo#pro}}:mau:{year:04d}{month:02d}"] = {f"r{i}" for i in range(4322)}
    today = datetime.now(UTC).date()
    store.sets[f"q:{{demo#pro}}:dau:{today:%Y%m%d}"] = {f"t{i}" for i in range(1234)}
    auth = {"authorization": f"Bearer {ADMIN}"}
    assert (await gateway.delete("/_quota/accounts/demo-pro/apps/demo/pro", headers=auth)).status_code == 200
    assert (await gateway.put("/_quota/accounts/acme/apps/demo/pro", headers=auth)).status_code == 200
    last = f"?month={year:04d}-{month:02d}"
    await _login(gateway, READ)
    seen = (await gateway.get(f"{BASE}/apps/demo/pro{last}")).text
    assert "4,321" in seen and "4,322" in seen and "1,234" in (await gateway.get(f"{BASE}/apps/demo/pro")).text
    gateway.cookies.clear()
    await _login(gateway, CUSTOMER)
    for path in (f"/apps/demo/pro{last}", "/apps/demo/pro", f"/accounts/acme{last}", f"/{last}", "/"):
        page = await gateway.get(BASE + path)
        assert page.status_code == 200 and "demo#pro" in page.text, path
        for figure in ("4,321", "4,322", "1,234"):
            assert figure not in page.text, (path, figure)
    assert "held by another account" in (await gateway.get(f"{BASE}/apps/demo/pro{last}")).text


async def test_logout_needs_the_pages_csrf_field(gateway: httpx.AsyncClient) -> None:
    """Logout is a POST carrying the session's CSRF field from this origin; without it, or from
    another origin, nothing happens. Catches: a logout (or any form) another site can trigger."""
    await _login(gateway)
    page = (await gateway.get(f"{BASE}/")).text
    csrf = _csrf(page)
    assert (await gateway.post(f"{BASE}/logout", data={}, headers={"origin": "http://gw"})).status_code == 403
    evil = await gateway.post(f"{BASE}/logout", data={"csrf": csrf}, headers={"origin": "http://evil.example"})
    assert evil.status_code == 403
    stuffed = await gateway.post(
        f"{BASE}/logout", data={f"f{i}": "x" for i in range(20)}, headers={"origin": "http://gw"}
    )
    assert stuffed.status_code == 403
    assert (await gateway.get(f"{BASE}/")).status_code == 200
    r = await gateway.post(f"{BASE}/logout", data={"csrf": csrf}, headers={"origin": "http://gw"})
    assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"]
    assert (await gateway.get(f"{BASE}/")).status_code == 303


async def test_a_signed_out_cookie_is_refused_when_copied(gateway: httpx.AsyncClient) -> None:
    """Catches a logout that only asks the browser to drop its cookie: a copy of it (stolen, or
    another tab's) stayed valid for the rest of its 8 hours. Another session is left alone."""
    await _login(gateway)
    copied = _cookie(gateway.cookies[sessions.COOKIE])
    csrf = _csrf((await gateway.get(f"{BASE}/")).text)
    r = await gateway.post(f"{BASE}/logout", data={"csrf": csrf}, headers={"origin": "http://gw"})
    assert r.status_code == 303 and sessions.COOKIE not in gateway.cookies
    again = await gateway.get(f"{BASE}/", headers=copied)
    assert again.status_code == 303 and again.headers["location"].endswith("/login")
    await _login(gateway)
    assert (await gateway.get(f"{BASE}/")).status_code == 200  # a new session of the same token


@pytest.mark.redis
async def test_a_sign_out_holds_in_every_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_server: Any
) -> None:
    """Two processes on one Redis (two apps here): a session signed out on one is refused by the
    other, which never saw the sign-out; a session not signed out passes on both. Catches a sign-out
    kept in the process that took it."""
    monkeypatch.setenv("QUOTA_READ_TOKEN", READ)
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", ADMIN)
    redis_server.flush()
    cfg = load_config(config_with(tmp_path / "config", ""))
    one, two = build_app(cfg, redis_url=redis_server.url), build_app(cfg, redis_url=redis_server.url)
    try:
        async with asgi_client(one, base_url="http://gw") as a, asgi_client(two, base_url="http://gw") as b:
            await _login(a)
            first = _cookie(a.cookies[sessions.COOKIE])
            assert (await b.get(f"{BASE}/", headers=first)).status_code == 200
            csrf = _csrf((await a.get(f"{BASE}/")).text)
            signed_out = await a.post(f"{BASE}/logout", data={"csrf": csrf}, headers={"origin": "http://gw"})
            assert signed_out.status_code == 303
            assert (await b.get(f"{BASE}/", headers=first)).status_code == 303
            await _login(b)
            second = _cookie(b.cookies[sessions.COOKIE])
            assert (await a.get(f"{BASE}/", headers=second)).status_code == 200
    finally:
        for app in (one, two):
            await app.shutdown()
            await app.runtime.store.close()


@pytest.mark.redis
async def test_a_store_that_cannot_say_gives_503s_not_sessions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whether a session was signed out is the store's to say. Catches a page served, or a logout
    answered as done, while the store does not answer (a signed-out cookie would pass an outage),
    and a stack trace shown for it."""
    monkeypatch.setenv("QUOTA_READ_TOKEN", READ)
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", ADMIN)
    server = RedisServer()
    server.start()
    app = build_app(load_config(config_with(tmp_path / "config", "")), redis_url=server.url)
    try:
        async with asgi_client(app, base_url="http://gw") as client:
            await _login(client)
            csrf = _csrf((await client.get(f"{BASE}/")).text)
            server.stop()
            page = await client.get(f"{BASE}/")
            assert page.status_code == 503 and "Traceback" not in page.text
            out = await client.post(f"{BASE}/logout", data={"csrf": csrf}, headers={"origin": "http://gw"})
            assert out.status_code == 503 and "set-cookie" not in out.headers and "Traceback" not in out.text
    finally:
        await app.shutdown()
        await app.runtime.store.close()
        server.stop()


def _cookie(value: str) -> dict[str, str]:
    """A session's cookie sent by hand, as a copy of it would be (not from the client's jar)."""
    return {"cookie": f"{sessions.COOKIE}={value}"}


async def test_cross_site_login_refused(gateway: httpx.AsyncClient) -> None:
    """A login form posted from another site is refused (login CSRF). Catches: a foreign page
    logging the operator's browser into a session of the attacker's choosing."""
    r = await gateway.post(f"{BASE}/login", data={"token": READ}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers


async def test_a_burst_of_sign_ins_is_held_to_the_wrong_token_allowance(gateway: httpx.AsyncClient) -> None:
    """Catches the lockout checked before the form was read and the wrong token counted after
    (audit of 2026-12-02): sign-ins whose bodies all follow their headers each passed the check
    before any was counted, so a burst of 500 guesses was compared whole. Of 30 sent at once, 10
    are compared (wrong_tokens: 10/minute) and the rest refused, the right token among them."""
    gate = asyncio.Event()

    async def later(token: str) -> AsyncIterator[bytes]:
        await gate.wait()
        yield f"token={token}".encode()

    form = {"origin": "http://gw", "content-type": "application/x-www-form-urlencoded"}
    guesses = [f"guess-{i:04d}-000000000000000" for i in range(29)] + [READ]
    sent = [asyncio.ensure_future(gateway.post(f"{BASE}/login", content=later(t), headers=form)) for t in guesses]
    await asyncio.sleep(0.2)  # every sign-in's headers are in, its body not yet
    gate.set()
    codes = [r.status_code for r in await asyncio.gather(*sent)]
    assert codes.count(401) == 10 and codes.count(429) == 20, codes
    assert codes[-1] == 429


async def test_a_sign_in_form_that_never_arrives_is_dropped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches a sign-in form read with no deadline: a client with no token held the connection
    as long as it liked. It is answered 408 after body_timeout_s, as the request path does."""
    monkeypatch.setenv("QUOTA_READ_TOKEN", READ)
    cfg = config_with(tmp_path / "config", "")
    (cfg / "quota.yaml").write_text("body_timeout_s: 1\n")
    never = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"token="
        await never.wait()
        yield b"x"

    form = {"origin": "http://gw", "content-type": "application/x-www-form-urlencoded"}
    async with asgi_client(build_app(load_config(cfg), store=MemoryStore()), base_url="http://gw") as client:
        started = time.monotonic()
        r = await asyncio.wait_for(client.post(f"{BASE}/login", content=stalled(), headers=form), 10)
    assert r.status_code == 408 and "did not arrive" in r.text, r.text
    assert time.monotonic() - started < 5


async def test_values_are_escaped_and_headers_strict(gateway: httpx.AsyncClient) -> None:
    """An account named like markup is shown as text on every page that names it; pages forbid
    script and framing and are not cached. Catches: an unescaped value, a missing CSP."""
    await _login(gateway)
    for path in (f"{BASE}/", f"{BASE}/accounts/{HOSTILE}"):
        r = await gateway.get(path)
        assert r.status_code == 200, path
        assert "<img src=x" not in r.text and "&lt;img src=x onerror=alert(1)&gt;" in r.text
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp and "frame-ancestors 'none'" in csp
        assert r.headers["cache-control"] == "no-store"
    assert el("a", "x", href='"><b') == '<a href="&quot;&gt;&lt;b">x</a>'


@pytest.mark.parametrize(
    "path",
    [
        "/apps/{markup}/x",  # not found: an unknown app, named as the URL spelled it
        "/accounts/{markup}",  # not found: an unknown account
        "/apps/demo/free?month={markup}",  # bad request: a month that is no month
    ],
)
async def test_an_error_page_shows_the_url_as_text(gateway: httpx.AsyncClient, path: str) -> None:
    """Catches the error pages putting what the URL said into the page as markup (found by the
    audit of 2026-12-01): a link naming an app as a meta refresh sent a signed-in operator's
    browser elsewhere (no CSP directive governs a meta refresh)."""
    await _login(gateway)
    markup = '<meta http-equiv="refresh" content="0;url=https:\\\\evil.example">'
    r = await gateway.get(BASE + path.format(markup=markup.replace(" ", "%20")))
    assert r.status_code in (400, 404), r.text
    assert "<meta" not in r.text and "&lt;meta" in r.text, r.text


async def test_app_page_shows_its_own_refusals_only(gateway: httpx.AsyncClient) -> None:
    """Refusals recorded for an app appear on its page by route and limit, and never on another
    app's page. Catches: refusals shown unattributed, or one app's traffic on another's page."""
    await _login(gateway)
    metrics = gateway._transport.app.metrics  # type: ignore[attr-defined]
    for _ in range(3):
        metrics.decision("messages_translate", "translation", "free", "refused", app="demo#free")
    metrics.decision("users_create", "registered_users", "pro", "refused", app="demo#pro")
    free = (await gateway.get(f"{BASE}/apps/demo/free")).text
    assert 'data-refusals="3"' in free and "messages_translate" in free and "users_create" not in free
    pro = (await gateway.get(f"{BASE}/apps/demo/pro")).text
    assert "users_create" in pro and "messages_translate" not in pro


async def test_refused_request_reaches_the_app_page(gateway: httpx.AsyncClient) -> None:
    """A request the middleware refuses shows on its app's page within the hour. Catches: the
    middleware's decision call sites not naming the app."""
    r = await gateway.post("/demo/free/messages/translate", json={})
    assert r.status_code == 403
    await _login(gateway)
    page = (await gateway.get(f"{BASE}/apps/demo/free")).text
    refusals = page.split("Refusals over")[1].split("Features of")[0]
    assert "translation" in refusals


def test_refusal_log_keeps_one_hour_and_is_bounded() -> None:
    """The log answers per minute for the last 60 minutes, forgets older minutes, and holds at
    most REFUSAL_KEYS_PER_MINUTE keys a minute. Catches: a log that grows forever or leaks old data."""
    log = RefusalLog()
    now = 1_800_000_000.0
    log.add("a#b", "r", "l", "refused", now - 61 * 60)
    log.add("a#b", "r", "l", "refused", now - 59 * 60)
    log.add("a#b", "r", "l", "refused", now)
    log.add("a#b", "r", "l", "refused", now)
    series = log.last_hour("a#b", now)[("r", "l", "refused")]
    assert len(series) == 60 and series[-1] == 2 and series[0] == 1 and sum(series) == 3
    for i in range(REFUSAL_KEYS_PER_MINUTE + 50):
        log.add(f"app{i}#x", "r", "l", "refused", now + 60)
    assert log.last_hour(f"app{REFUSAL_KEYS_PER_MINUTE + 10}#x", now + 60) == {}
    assert log.last_hour("a#b", now + 3600 + 60) == {}


def test_forecast_follows_the_trend_and_never_drops_below_the_peak() -> None:
    """A rising month forecasts a higher peak at its end; a falling one keeps the peak reached.
    Catches: a forecast below what is already billed, or one that ignores the trend."""
    rising = {date(2026, 11, d): 100 * d for d in range(1, 31)}
    assert forecast_peak(rising, date(2026, 11, 15)) == 3000
    falling = {date(2026, 11, d): (3000 - 100 * d if d <= 15 else 0) for d in range(1, 31)}
    assert forecast_peak(falling, date(2026, 11, 15)) == 2900


async def test_customer_token_survives_account_changes(gateway: httpx.AsyncClient) -> None:
    """An account changed at run time (stored, then reloaded from the store) keeps its dashboard
    token hash. Catches: the hash dropped by Account.to_json/from_json, locking the customer out."""
    r = await gateway.post("/_quota/accounts/acme/freeze", json={}, headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.json()["dashboard_token_sha256"] == CUSTOMER_SHA
    assert (await _login(gateway, CUSTOMER)).status_code == 303


def test_config_refuses_a_malformed_token_hash(tmp_path: Path) -> None:
    """dashboard_token_sha256 must be a SHA-256 in hex; a token pasted there instead is refused
    with the file and key named. Catches: a plain token kept in the config, silently unusable."""
    from quota.errors import ConfigError

    cfg = config_with(
        tmp_path / "config", "  acme:\n    plan: pro\n    apps: ['acme#x']\n    dashboard_token_sha256: my-token\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "accounts.acme.dashboard_token_sha256" in str(info.value)


def test_request_path_imports_no_dashboard_or_terminal_code() -> None:
    """Importing the middleware loads neither the dashboard, the CLI's output module nor rich.
    Catches: people-facing code (and its import time) creeping onto the request path."""
    import subprocess
    import sys

    code = (
        "import sys, quota.middleware; "
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['quota', 'dashboard'], ['quota', 'cli'], "
        "['quota', 'cli_output'], ['quota', 'display']) or m.split('.')[0] == 'rich'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


async def test_the_forecast_counts_the_apps_the_bill_counts(
    store: object, monkeypatch: pytest.MonkeyPatch, config_dir: Path
) -> None:
    """Catches the forecast built from the apps held now while the bill counts those held during
    the month: an app over its included DAU, detached, left the forecast below the bill already run.
    The app is detached on an earlier day than the page is read: its days all lie behind today
    (a forecast that projected them forward failed the page)."""

    from tests.conftest import Clock
    from tests.helpers import read_yaml, register, write_yaml

    plans = config_dir / "plans.yaml"
    doc = read_yaml(plans)
    doc["plans"]["basic"]["price"]["included_dau"] = 1
    write_yaml(plans, doc)
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", ADMIN)
    monkeypatch.setenv("QUOTA_READ_TOKEN", READ)
    app = build_app(load_config(config_dir), store=store)
    app.clock = Clock(datetime(2027, 1, 5, 10, tzinfo=UTC).timestamp(), tick=0)
    auth = {"authorization": f"Bearer {ADMIN}"}
    async with asgi_client(app, base_url="http://gw") as c:
        await register(c, "demo/basic", ["a", "b", "c"])
        for name in ("a", "b", "c"):
            assert (await c.post("/demo/basic/token", json={"username": name})).status_code == 200
        app.clock.now += 86400
        for name in ("a", "b"):
            assert (await c.post("/demo/basic/token", json={"username": name})).status_code == 200
        assert (await c.delete("/_quota/accounts/demo-basic/apps/demo/basic", headers=auth)).status_code == 200
        app.clock.now += 2 * 86400
        bill = (await c.get("/_quota/bills/demo-basic", headers=auth)).json()
        assert bill["total"] == "888.170", bill
        assert (await _login(c)).status_code == 303
        page = (await c.get(f"{BASE}/")).text
        row = re.search(r'<tr[^>]*data-account="demo-basic"[^>]*>.*?</tr>', page, re.S)
        assert row, page[:2000]
        total = re.search(r'data-total="([0-9.]+)"', row.group(0))
        forecast = re.search(r'data-forecast="([0-9.]+)"', row.group(0))
        assert total and forecast, row.group(0)
        assert (total.group(1), forecast.group(1)) == ("888.170", "888.170")
