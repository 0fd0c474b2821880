"""The usage dashboard: server-rendered HTML under <admin prefix>/dashboard, read-only.

    GET  /login, POST /login     the token, given once in a form, becomes a session cookie
    POST /logout                 with the session's CSRF field; clears the cookie
    GET  /                       all apps: plan, DAU, peak, bill so far and forecast, hot caps
    GET  /apps/{org}/{app}       one app: daily DAU chart, caps, nearest entities, refusals, features
    GET  /accounts/{account}     one account's bill, line by line
    ?month=YYYY-MM               any page, a past month (default this month)

Operators (the read or admin token) see every account; a customer signing in with its account's
dashboard token sees that account and its apps only, and gets 404 for any other, as if it did not
exist. Mounted by the admin API (quota/admin.py); the middleware never imports this package. Off
(404) when no operator token is configured, like the admin API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import date
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from quota.accounts import Account
from quota.dashboard import pages, sessions
from quota.dashboard.html import text
from quota.dashboard.reports import account_month, app_month, month_today
from quota.errors import StorageError, UnknownAppError
from quota.keys import signed_out_key
from quota.lockout import Lockout, client_key
from quota.tokens import Tokens

if TYPE_CHECKING:
    from quota.middleware import QuotaMiddleware

MAX_FORM_BYTES = 4096
# No script runs on these pages, so none is allowed; styles come only from the package's file.
HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # Not no-referrer: under it Chromium sends `Origin: null` with our own forms, which the
    # same-origin check below must refuse.
    "referrer-policy": "same-origin",
}
STYLE = files("quota.dashboard").joinpath("style.css").read_text(encoding="utf-8")

Page = Callable[[Request, Any, sessions.Session], Awaitable[Response]]


def _html(body: str, status: int = 200) -> HTMLResponse:
    """A page built by quota.dashboard.pages (every value in it escaped there)."""
    return HTMLResponse(body, status_code=status, headers=HEADERS)


def _said(message: str, status: int) -> HTMLResponse:
    """A message, escaped: it may hold what the URL said (an org, an app, a month)."""
    return HTMLResponse(text(message), status_code=status, headers=HEADERS)


def _month(request: Request, today: date) -> tuple[int, int]:
    # The admin API's parser (imported here: admin.py mounts this package, so not at the top).
    from quota.admin import _month as parse

    return parse(request.query_params.get("month"), today)


def _same_origin(request: Request) -> bool:
    """A form post from a page of this host (or a client that sends no Origin, such as curl).

    Hosts are compared, not schemes: behind a TLS-terminating proxy the page is https while the
    request reaching quota is http, and another site differs in its host anyway."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "") != ""


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("origin", "").startswith("https://")


async def _form(request: Request, timeout_s: float) -> dict[str, str]:
    """The form's fields; ValueError past MAX_FORM_BYTES, TimeoutError if not in within `timeout_s`
    (the request path's body_timeout_s: a sign-in form must not hold a connection forever)."""
    body = b""
    async with asyncio.timeout(timeout_s):
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise ValueError("form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
    return {k: v[0] for k, v in fields.items()}


def create_dashboard(middleware: QuotaMiddleware, lockout: Lockout) -> Starlette:
    def base(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def tokens() -> Tokens:
        return middleware.runtime.tokens

    def served_day() -> date:
        # The middleware's clock, as the admin API's: what is served and what is shown agree.
        return middleware.today(middleware.clock())

    def accounts() -> dict[str, Account]:
        return middleware.runtime.directory.accounts

    async def session_of(request: Request) -> sessions.Session | None:
        """The request's session: its cookie signed and unexpired, and not signed out (a mark in
        the store, so that a copy of the cookie ends with the sign-out in every process too).
        Raises StorageError when the store cannot say."""
        cookie = request.cookies.get(sessions.COOKIE, "")
        session = sessions.verify(tokens(), cookie, accounts())
        if session is None or await middleware.runtime.store.claimed(signed_out_key(cookie)):
            return None
        return session

    def csrf(session: sessions.Session) -> str:
        return session.csrf(tokens(), accounts())

    def cookie_path(request: Request) -> str:
        return base(request) or "/"

    def page(handler: Page) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            if not tokens().enabled:
                return _said("the dashboard is off: no token configured", 404)
            try:
                session = await session_of(request)
                if session is None:
                    return RedirectResponse(f"{base(request)}/login", status_code=303, headers=HEADERS)
                return await handler(request, middleware.runtime, session)
            except (UnknownAppError, KeyError) as exc:
                return _said(f"not found: {exc}", 404)
            except ValueError as exc:
                return _said(f"bad request: {exc}", 400)
            except StorageError:
                return _said("quota storage is unavailable; retry shortly", 503)

        return run

    async def login_form(request: Request) -> Response:
        if not tokens().enabled:
            return _said("the dashboard is off: no token configured", 404)
        return _html(pages.login(base(request)))

    async def login(request: Request) -> Response:
        if not tokens().enabled:
            return _said("the dashboard is off: no token configured", 404)
        if not _same_origin(request):
            return _said("cross-site form refused", 403)
        # The form is read first: nothing may be awaited between the lockout's check and the count
        # of a wrong token, or a burst of sign-ins whose bodies follow their headers would each
        # pass the check before the first was counted (every guess compared, not ten a minute).
        try:
            form = await _form(request, middleware.runtime.body_timeout_s)
        except ValueError:
            return _html(pages.login(base(request), "The form was too large."), 400)
        except TimeoutError:
            return _html(pages.login(base(request), "The form did not arrive in time."), 408)
        who = client_key(middleware.runtime.clients, request.scope)
        wait = lockout.wait_s(who)
        if wait:
            refused = _html(pages.login(base(request), f"Too many wrong tokens from here: try again in {wait} s."), 429)
            refused.headers["retry-after"] = str(wait)
            return refused
        session = sessions.issue(tokens(), form.get("token", "").strip(), accounts())
        if session is None:
            lockout.failed(who)
            return _html(pages.login(base(request), "That token is not valid."), 401)
        response = RedirectResponse(f"{base(request)}/", status_code=303, headers=HEADERS)
        response.set_cookie(
            sessions.COOKIE,
            session.cookie,
            max_age=sessions.LIFETIME_S,
            path=cookie_path(request),
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )
        return response

    async def logout(request: Request) -> Response:
        try:
            session = await session_of(request)
        except StorageError:
            return _said("quota storage is unavailable; retry shortly", 503)
        if session is None:
            return RedirectResponse(f"{base(request)}/login", status_code=303, headers=HEADERS)
        try:
            form = await _form(request, middleware.runtime.body_timeout_s) if _same_origin(request) else {}
        except (ValueError, TimeoutError):
            form = {}
        if not sessions.csrf_ok(tokens(), accounts(), session, form.get("csrf", "")):
            return _said("logout refused: the form did not come from this dashboard", 403)
        # Marked in the store until it would have expired: a copy of the cookie (a stolen one, a
        # browser's other tab) is refused from now on, by every process.
        cookie = request.cookies.get(sessions.COOKIE, "")
        left_s = max(1, session.expires - int(time.time()) + 1)
        try:
            await middleware.runtime.store.claim_once(signed_out_key(cookie), left_s)
        except StorageError:
            return _said("quota storage is unavailable, so the sign-out could not be recorded; retry shortly", 503)
        response = RedirectResponse(f"{base(request)}/login", status_code=303, headers=HEADERS)
        response.delete_cookie(sessions.COOKIE, path=cookie_path(request), httponly=True, samesite="strict")
        return response

    async def style(request: Request) -> Response:
        return Response(STYLE, media_type="text/css", headers={"cache-control": "max-age=3600"})

    async def overview(request: Request, rt: Any, session: sessions.Session) -> Response:
        now, at = served_day(), middleware.clock()
        year, month = _month(request, now)
        shown = []
        for name in sorted(rt.directory.accounts):
            if session.sees(name):
                account = rt.directory.accounts[name]
                shown.append(await account_month(rt.directory, rt.store, account, year, month, now, at=at))
        return _html(pages.overview(shown, year, month, base=base(request), csrf=csrf(session)))

    async def one_app(request: Request, rt: Any, session: sessions.Session) -> Response:
        appkey = f"{request.path_params['org']}#{request.path_params['app']}"
        year, month = _month(request, served_day())
        today = month_today(year, month, served_day())
        owner = rt.directory.account_of(appkey)
        if owner is None or not session.sees(owner.name):
            raise UnknownAppError(appkey)
        # A customer sees the app's days as its account's; an operator, the app's whole history.
        holder = owner if session.account is not None else None
        at = middleware.clock()
        app = await app_month(rt.directory, rt.store, appkey, year, month, today, holder, at=at)
        refusals = middleware.metrics.refusals.last_hour(appkey, at)
        return _html(pages.app_page(app, refusals, year, month, base=base(request), csrf=csrf(session)))

    async def one_account(request: Request, rt: Any, session: sessions.Session) -> Response:
        name = request.path_params["account"]
        account = rt.directory.accounts.get(name)
        if account is None or not session.sees(name):
            raise KeyError(f"unknown account {name!r}")
        now = served_day()
        year, month = _month(request, now)
        acc = await account_month(rt.directory, rt.store, account, year, month, now, at=middleware.clock())
        return _html(pages.account_page(acc, year, month, base=base(request), csrf=csrf(session)))

    return Starlette(
        routes=[
            Route("/", page(overview)),
            Route("/login", login_form),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/style.css", style),
            Route("/apps/{org}/{app}", page(one_app)),
            Route("/accounts/{account}", page(one_account)),
        ]
    )


__all__ = ["create_dashboard"]
