"""The admin HTTP API, mounted by the middleware under settings.admin_prefix (default /_quota).

Every endpoint needs `Authorization: Bearer <token>` of a scope that covers it (quota/tokens.py):
the read token sees metrics, entitlements, usage, bills and accounts; the admin token also changes
things. Without any configured token the API answers 404: it is off.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from quota import accounts as subs
from quota.billing import bill_account
from quota.dashboard import create_dashboard
from quota.entitlements import entitlements
from quota.errors import ConfigError, StorageError, UnknownAppError
from quota.metering import usage_report
from quota.privacy import forget_user
from quota.tokens import Scope, Tokens, bearer

if TYPE_CHECKING:
    from quota.middleware import QuotaMiddleware


def _error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


def _month(text: str | None) -> tuple[int, int]:
    today = date.today()
    if not text:
        return today.year, today.month
    year, _, month = text.partition("-")
    if not (len(year) == 4 and year.isdigit() and len(month) == 2 and month.isdigit() and 1 <= int(month) <= 12):
        raise ValueError(f"month must be YYYY-MM, found {text[:20]!r}")
    return int(year), int(month)


def create_admin(middleware: QuotaMiddleware) -> Starlette:
    def runtime() -> Any:
        return middleware.runtime

    def guarded(handler: Callable[..., Any], scope: Scope = "read") -> Callable[[Request], Any]:
        async def run(request: Request) -> Response:
            tokens: Tokens = runtime().tokens
            if not tokens.enabled:
                return _error(404, "service_resource_not_found", "the admin API is off: no admin token configured")
            given = bearer(request.headers.get("authorization", ""))
            if tokens.scope_of(given) is None:
                return _error(401, "unauthorized", "missing or wrong admin token")
            if not tokens.grants(given, scope):
                return _error(403, "forbidden", f"this token may read only; {request.url.path} needs the admin token")
            try:
                response: Response = await handler(request, runtime())
                return response
            except UnknownAppError as exc:
                return _error(404, "service_resource_not_found", str(exc))
            except KeyError as exc:
                return _error(404, "service_resource_not_found", str(exc.args[0]))
            except ValueError as exc:
                return _error(400, "illegal_argument", str(exc))
            except StorageError:
                return _error(503, "service_unavailable", "quota storage is unavailable")

        return run

    async def show_entitlements(request: Request, rt: Any) -> JSONResponse:
        appkey = f"{request.path_params['org']}#{request.path_params['app']}"
        entities = {k: v for k in ("user", "group", "chatroom") if (v := request.query_params.get(k))}
        return JSONResponse(await entitlements(rt.directory, rt.store, appkey, entities=entities))

    async def show_usage(request: Request, rt: Any) -> JSONResponse:
        appkey = f"{request.path_params['org']}#{request.path_params['app']}"
        if rt.directory.lookup(appkey, date.today()) is None:
            raise UnknownAppError(appkey)
        year, month = _month(request.query_params.get("month"))
        return JSONResponse(await usage_report(rt.directory, rt.store, appkey, year, month))

    async def show_bill(request: Request, rt: Any) -> JSONResponse:
        year, month = _month(request.query_params.get("month"))
        bill = await bill_account(rt.directory, rt.store, request.path_params["account"], year, month)
        return JSONResponse(bill.to_json())

    async def show_account(request: Request, rt: Any) -> JSONResponse:
        name = request.path_params["account"]
        account = rt.directory.accounts.get(name)
        if account is None:
            raise KeyError(f"unknown account {name!r}")
        return JSONResponse(account.to_json())

    async def change(request: Request, rt: Any) -> JSONResponse:
        name, action = request.path_params["account"], request.path_params["action"]
        account = rt.directory.accounts.get(name)
        if account is None:
            raise KeyError(f"unknown account {name!r}")
        try:
            payload = await request.json() if await request.body() else {}
        except ValueError as exc:
            raise ValueError("body must be JSON") from exc
        if not isinstance(payload, dict):
            raise ValueError("body must be a JSON object")
        unknown = set(payload) - {"date", "plan"}
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}; expected date, plan")
        raw_day, plan = payload.get("date"), payload.get("plan")
        if raw_day is not None and not isinstance(raw_day, str):
            raise ValueError(f"date must be a string YYYY-MM-DD, found {type(raw_day).__name__}")
        try:
            day = date.fromisoformat(raw_day) if raw_day else date.today()
        except ValueError as exc:
            raise ValueError(f"date must be YYYY-MM-DD, found {str(raw_day)[:20]!r}") from exc
        if plan is not None and not isinstance(plan, str):
            raise ValueError(f"plan must be a string, found {type(plan).__name__}")
        if action in ("subscribe", "change-plan") and plan not in rt.config.matrix.plans:
            raise ValueError(f"plan must be one of {', '.join(rt.config.matrix.plans)}")
        updated = apply_change(account, action, plan, day)
        await rt.directory.save(updated)
        return JSONResponse(updated.to_json())

    async def set_allowlist(request: Request, rt: Any) -> JSONResponse:
        name = request.path_params["account"]
        account = rt.directory.accounts.get(name)
        if account is None:
            raise KeyError(f"unknown account {name!r}")
        try:
            payload = await request.json()
        except ValueError as exc:
            raise ValueError('body must be JSON: {"ip_allowlist": ["10.0.0.0/8", ...]}') from exc
        nets = payload.get("ip_allowlist") if isinstance(payload, dict) else None
        if not isinstance(nets, list) or not all(isinstance(n, str) for n in nets):
            raise ValueError("ip_allowlist must be a list of addresses or networks ([] removes the allowlist)")
        for net in nets:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"ip_allowlist: {net!r} is not an address or network") from exc
        updated = replace(account, ip_allowlist=tuple(nets))
        await rt.directory.save(updated)
        return JSONResponse(updated.to_json())

    async def forget(request: Request, rt: Any) -> JSONResponse:
        appkey = f"{request.path_params['org']}#{request.path_params['app']}"
        if rt.directory.account_of(appkey) is None:
            raise UnknownAppError(appkey)
        user = request.path_params["user"]
        report = await forget_user(rt.store, rt.routes, appkey, user, int(time.time() * 1000))
        return JSONResponse(report)

    async def reload(request: Request, rt: Any) -> JSONResponse:
        try:
            cfg = await middleware.reload_async()
        except ConfigError as exc:
            body = {
                "error": "illegal_argument",
                "error_description": "the new config does not validate; the old one stays in force",
                "problems": [str(p) for p in exc.problems],
            }
            return JSONResponse(body, status_code=400)
        summary = {"plans": len(cfg.matrix.plans), "routes": len(cfg.routes.rules), "accounts": len(cfg.accounts)}
        return JSONResponse({"reloaded": str(cfg.directory), **summary})

    async def metrics(request: Request, rt: Any) -> Response:
        return Response(middleware.metrics.render(), media_type="text/plain; version=0.0.4")

    return Starlette(
        routes=[
            Route("/metrics", guarded(metrics)),
            Route("/reload", guarded(reload, "admin"), methods=["POST"]),
            Route("/forget/{org}/{app}/{user}", guarded(forget, "admin"), methods=["POST"]),
            Route("/entitlements/{org}/{app}", guarded(show_entitlements)),
            Route("/usage/{org}/{app}", guarded(show_usage)),
            Route("/bills/{account}", guarded(show_bill)),
            Route("/accounts/{account}", guarded(show_account)),
            Route("/accounts/{account}/allowlist", guarded(set_allowlist, "admin"), methods=["PUT"]),
            Route("/accounts/{account}/{action}", guarded(change, "admin"), methods=["POST"]),
            # Its own login (a cookie, not a bearer header): a browser cannot send the header.
            Mount("/dashboard", app=create_dashboard(middleware)),
        ]
    )


def apply_change(account: subs.Account, action: str, plan: str | None, day: date) -> subs.Account:
    if action == "subscribe":
        return subs.subscribe(account, str(plan), day)
    if action == "change-plan":
        return subs.change_plan(account, str(plan), day)
    if action == "cancel":
        return subs.cancel(account, day)
    if action == "freeze":
        return subs.freeze(account, day)
    if action == "unfreeze":
        return subs.unfreeze(account)
    raise KeyError(f"unknown action {action!r} (subscribe, change-plan, cancel, freeze, unfreeze)")
