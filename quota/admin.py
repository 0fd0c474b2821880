"""The admin HTTP API, mounted by the middleware under settings.admin_prefix (default /_quota).

Every endpoint needs `Authorization: Bearer <token>` of a scope that covers it (quota/tokens.py):
the read token sees metrics, entitlements, usage, bills and accounts; the admin token also changes
things. Without any configured token the API answers 404: it is off.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import date
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from quota import __version__
from quota import accounts as subs
from quota.api import MAX_HEADERS, Quota, header_line
from quota.billing import bill_account
from quota.clients import parse_hop
from quota.config import one_app_rule, plan_may_hold, validate_account, validate_appkey, validate_overrides
from quota.dashboard import create_dashboard
from quota.errors import ConfigError, ConflictError, StorageError, UnknownAppError
from quota.lockout import Lockout, client_key
from quota.metering import usage_report
from quota.privacy import forget_user
from quota.tokens import Scope, Tokens, bearer

if TYPE_CHECKING:
    from quota.matrix import Plan
    from quota.middleware import QuotaMiddleware


def _error(status: int, error: str, description: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status, headers=headers)


def locked_out(lockout: Lockout, who: str) -> JSONResponse | None:
    refusal = lockout.refusal(who)
    if refusal is None:
        return None
    wait, text = refusal
    return _error(429, "reach_limit", text, {"retry-after": str(wait)})


def _month(text: str | None, today: date) -> tuple[int, int]:
    if not text:
        return today.year, today.month
    year, _, month = text.partition("-")
    if not (len(year) == 4 and year.isdigit() and len(month) == 2 and month.isdigit() and 1 <= int(month) <= 12):
        raise ValueError(f"month must be YYYY-MM, found {text[:20]!r}")
    return int(year), int(month)


MAX_ADMIN_BODY = 1 << 16


async def _payload(request: Request, shape: str) -> dict[str, Any]:
    """A bounded JSON object body; ValueError (a 400 that says what to send) otherwise."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ADMIN_BODY:
            raise ValueError(f"body is over {MAX_ADMIN_BODY} bytes")
    try:
        payload = json.loads(body) if body else {}
    except (ValueError, RecursionError) as exc:
        # RecursionError: arrays nested some thousands deep, well within the size bound.
        raise ValueError(f"body must be JSON: {shape}") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"body must be a JSON object: {shape}")
    return payload


@dataclass(frozen=True)
class Endpoint:
    """One admin route, with what its OpenAPI description says about it."""

    path: str
    methods: tuple[str, ...]
    handler: Callable[..., Any]
    scope: Scope
    summary: str
    body: dict[str, Any] | None = None


def create_admin(middleware: QuotaMiddleware) -> Starlette:
    # Wrong tokens, per client: the middleware's count, which its apps' admin routes share.
    lockout = middleware.lockout

    def runtime() -> Any:
        return middleware.runtime

    def today() -> date:
        # The middleware's clock, not the system's: one notion of today for what is served and
        # what is changed (and a test's clock drives both).
        return middleware.today(middleware.clock())

    def guarded(handler: Callable[..., Any], scope: Scope = "read") -> Callable[[Request], Any]:
        async def run(request: Request) -> Response:
            # Never kept by a cache between the client and quota: answers name accounts, customers'
            # token digests and usage.
            response = await answer(request)
            response.headers["cache-control"] = "no-store"
            return response

        async def answer(request: Request) -> Response:
            tokens: Tokens = runtime().tokens
            if not tokens.enabled:
                return _error(404, "service_resource_not_found", "the admin API is off: no admin token configured")
            who = client_key(middleware.runtime.clients, request.scope)
            refused = locked_out(lockout, who)
            if refused is not None:
                return refused
            given = bearer(request.headers.get("authorization", ""))
            if tokens.scope_of(given) is None:
                lockout.failed(who)
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
            except ConfigError as exc:
                body = {
                    "error": "illegal_argument",
                    "error_description": "the change does not validate",
                    "problems": [str(p) for p in exc.problems],
                }
                return JSONResponse(body, status_code=400)
            except ConflictError as exc:
                return _error(409, "conflict", str(exc))
            except StorageError:
                return _error(503, "service_unavailable", "quota storage is unavailable")

        return run

    async def show_entitlements(request: Request, rt: Any) -> JSONResponse:
        appkey = f"{request.path_params['org']}#{request.path_params['app']}"
        entities = {k: v for k in ("user", "group", "chatroom") if (v := request.query_params.get(k))}
        return JSONResponse(await Quota.of(middleware).entitlements(appkey, entities))

    async def explain(request: Request, rt: Any) -> JSONResponse:
        q = request.query_params
        method, path = q.get("method", "GET"), q.get("path", "")
        if not path.startswith("/") or len(path) > rt.settings.max_url_bytes:
            raise ValueError("path must be a request path starting with / (?method=POST&path=/org/app/...)")
        body = q.get("body")
        if body is not None and len(body) > rt.settings.max_body_bytes:
            raise ValueError("body is over max_body_bytes")
        ip = q.get("ip", "203.0.113.1")
        if parse_hop(ip) is None:
            raise ValueError(f"ip must be an IP address, found {ip[:45]!r}")
        lines = q.getlist("header")
        if len(lines) > MAX_HEADERS:
            raise ValueError(f"at most {MAX_HEADERS} headers")
        headers = [header_line(line) for line in lines] if lines else None
        found = await Quota.of(middleware).explain(method, path, body=body, ip=ip, headers=headers)
        return JSONResponse(asdict(found))

    async def show_usage(request: Request, rt: Any) -> JSONResponse:
        appkey = f"{request.path_params['org']}#{request.path_params['app']}"
        if rt.directory.lookup(appkey, today()) is None:
            raise UnknownAppError(appkey)
        year, month = _month(request.query_params.get("month"), today())
        return JSONResponse(await usage_report(rt.directory, rt.store, appkey, year, month, today()))

    async def show_bill(request: Request, rt: Any) -> JSONResponse:
        year, month = _month(request.query_params.get("month"), today())
        bill = await bill_account(rt.directory, rt.store, request.path_params["account"], year, month, today=today())
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
        payload = await _payload(request, '{"plan": "pro", "date": "YYYY-MM-DD"}')
        unknown = set(payload) - {"date", "plan"}
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}; expected date, plan")
        raw_day, plan = payload.get("date"), payload.get("plan")
        if raw_day is not None and not isinstance(raw_day, str):
            raise ValueError(f"date must be a string YYYY-MM-DD, found {type(raw_day).__name__}")
        try:
            day = date.fromisoformat(raw_day) if raw_day else today()
        except ValueError as exc:
            raise ValueError(f"date must be YYYY-MM-DD, found {str(raw_day)[:20]!r}") from exc
        if plan is not None and not isinstance(plan, str):
            raise ValueError(f"plan must be a string, found {type(plan).__name__}")
        if action in ("subscribe", "change-plan") and plan not in rt.config.matrix.plans:
            raise ValueError(f"plan must be one of {', '.join(rt.config.matrix.plans)}")
        first = today().replace(day=1)
        if action in ("subscribe", "change-plan", "cancel", "freeze") and day < first:
            # A plan dated into a month already served would rewrite what that month is billed on
            # (a cancel dated last month takes this month's bill away); a freeze dated back brings
            # its purge date as near, past even. The CLI may record history.
            raise ValueError(f"date must be {first.isoformat()} or later: earlier months are served already")
        updated = apply_change(account, action, plan, day, rt.config.matrix.plans)
        await rt.directory.save(updated)
        return JSONResponse(updated.to_json())

    async def set_allowlist(request: Request, rt: Any) -> JSONResponse:
        name = request.path_params["account"]
        account = rt.directory.accounts.get(name)
        if account is None:
            raise KeyError(f"unknown account {name!r}")
        payload = await _payload(request, '{"ip_allowlist": ["10.0.0.0/8", ...]}')
        nets = payload.get("ip_allowlist")
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
        report = await forget_user(rt.store, rt.routes, appkey, user, int(middleware.clock() * 1000), ids=rt.ids)
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

    def account_or_404(rt: Any, name: str) -> subs.Account:
        account = rt.directory.accounts.get(name)
        if account is None:
            raise KeyError(f"unknown account {name!r}")
        return account  # type: ignore[no-any-return]

    async def list_plans(request: Request, rt: Any) -> JSONResponse:
        plans = [
            {
                "name": plan.name,
                "monthly_fee": str(plan.price.monthly_fee),
                "included_dau": plan.price.included_dau,
                "overage_per_10k_dau": None
                if plan.price.overage_per_10k_dau is None
                else str(plan.price.overage_per_10k_dau),
                "custom": sorted(plan.custom),
            }
            for plan in rt.config.matrix.plans.values()
        ]
        return JSONResponse({"plans": plans})

    async def list_accounts(request: Request, rt: Any) -> JSONResponse:
        day = today()
        hidden = set(rt.directory.hidden_edits())
        accounts = [
            {
                "name": acc.name,
                "plan": acc.plan_on(day),
                "apps": list(acc.apps),
                "frozen": acc.frozen_on is not None,
                "source": ("stored" if name not in rt.directory.configured else "accounts.yaml + stored")
                if name in rt.directory.stored
                else "accounts.yaml",
                "hides_yaml_edit": name in hidden,
            }
            for name, acc in sorted(rt.directory.accounts.items())
        ]
        return JSONResponse({"accounts": accounts})

    async def list_apps(request: Request, rt: Any) -> JSONResponse:
        day = today()
        apps = [
            {"app": app, "account": acc.name, "plan": acc.plan_on(day)}
            for acc in rt.directory.accounts.values()
            for app in acc.apps
        ]
        return JSONResponse({"apps": sorted(apps, key=lambda a: a["app"])})

    async def create_account(request: Request, rt: Any) -> JSONResponse:
        payload = await _payload(request, '{"name": "acme", "plan": "pro", "apps": ["acme#chat"]}')
        name = payload.pop("name", None)
        # Subscribing takes effect at once: a new account's first month is prorated from today,
        # not billed whole from accounts.yaml's default start (2000-01-01).
        payload.setdefault("subscribed_on", today().isoformat())
        account = validate_account(rt.config.matrix, name, payload)
        first = today().replace(day=1)
        if account.subscriptions and account.subscriptions[0].start < first:
            # As for a change of plan: a start in a month already served would bill it afresh.
            raise ValueError(f"subscribed_on must be {first.isoformat()} or later: earlier months are served already")
        if name in rt.directory.accounts:
            raise ConflictError(f"account {name!r} exists")
        _check_apps_free(rt, account.name, account.apps)
        # An app another account held bills here from the day after that one's bills end.
        known = list(rt.directory.accounts.values())
        since = {app: day for app in account.apps if (day := subs.billed_from(known, app, today()))}
        account = replace(account, attached=since)
        await rt.directory.save(account)
        return JSONResponse(account.to_json(), status_code=201)

    async def attach_app(request: Request, rt: Any) -> JSONResponse:
        account = account_or_404(rt, request.path_params["account"])
        appkey = validate_appkey(f"{request.path_params['org']}#{request.path_params['app']}")
        _check_apps_free(rt, account.name, (appkey,))
        day = today()
        since = subs.billed_from(list(rt.directory.accounts.values()), appkey, day)
        updated = subs.attach(account, appkey, since or day)
        # On a plan without overage, an app held earlier this month counts too: one detached and
        # another attached would be a second allowance within the month.
        this_month = {s.app for s in account.former if s.end > day.replace(day=1)}
        held = len(set(updated.apps) | this_month)
        for sub in account.subscriptions:
            plan = rt.config.matrix.plans.get(sub.plan)
            if (sub.end is None or sub.end > day) and plan is not None and not plan_may_hold(plan, held):
                raise ConflictError(f"account {account.name!r} held another app this month: {one_app_rule(plan)}")
        await rt.directory.save(updated)
        return JSONResponse(updated.to_json())

    async def detach_app(request: Request, rt: Any) -> JSONResponse:
        account = account_or_404(rt, request.path_params["account"])
        appkey = f"{request.path_params['org']}#{request.path_params['app']}"
        if appkey not in account.apps:
            raise KeyError(f"account {account.name!r} has no app {appkey!r}")
        updated = subs.detach(account, appkey, today())
        await rt.directory.save(updated)
        return JSONResponse(updated.to_json())

    async def set_overrides(request: Request, rt: Any) -> JSONResponse:
        account = account_or_404(rt, request.path_params["account"])
        payload = await _payload(request, '{"members_per_group": 8000, "online_users": "unlimited"}')
        plan = account.plan_on(today()) or (account.subscriptions[-1].plan if account.subscriptions else None)
        overrides = validate_overrides(rt.config.matrix, plan, payload)
        updated = replace(account, overrides=overrides)
        await rt.directory.save(updated)
        return JSONResponse(updated.to_json())

    async def show_overlay(request: Request, rt: Any) -> JSONResponse:
        name = request.path_params["account"]
        account_or_404(rt, name)
        return JSONResponse({"account": name, "overlay": rt.directory.diff(name)})

    async def reset_overlay(request: Request, rt: Any) -> JSONResponse:
        name = request.path_params["account"]
        account_or_404(rt, name)
        if not await rt.directory.reset(name, today()):
            raise KeyError(f"account {name!r} has no stored changes")
        return JSONResponse({"account": name, "reset": True})

    async def metrics(request: Request, rt: Any) -> Response:
        return Response(middleware.metrics.render(), media_type="text/plain; version=0.0.4")

    obj = {"type": "object"}
    endpoints = [
        Endpoint("/metrics", ("GET",), metrics, "read", "Prometheus metrics of this process"),
        Endpoint("/reload", ("POST",), reload, "admin", "re-read config/; a config that does not validate is refused"),
        Endpoint("/forget/{org}/{app}/{user}", ("POST",), forget, "admin", "personal data deletion of one user"),
        Endpoint("/entitlements/{org}/{app}", ("GET",), show_entitlements, "read", "an app's plan and usage"),
        Endpoint(
            "/explain", ("GET",), explain, "read", "the decision quota would make (?method=&path=&body=&ip=&header=...)"
        ),
        Endpoint("/usage/{org}/{app}", ("GET",), show_usage, "read", "an app's month: DAU per day, MAU, peaks"),
        Endpoint("/bills/{account}", ("GET",), show_bill, "read", "an account's bill for a month (?month=YYYY-MM)"),
        Endpoint("/plans", ("GET",), list_plans, "read", "the plans of the matrix"),
        Endpoint("/apps", ("GET",), list_apps, "read", "every app with its account and plan"),
        Endpoint("/accounts", ("GET",), list_accounts, "read", "every account, and whether stored changes overlay it"),
        Endpoint("/accounts", ("POST",), create_account, "admin", "create an account (accounts.yaml's shape)", obj),
        Endpoint("/accounts/{account}", ("GET",), show_account, "read", "one account"),
        Endpoint("/accounts/{account}/overlay", ("GET",), show_overlay, "read", "what stored changes alter"),
        Endpoint("/accounts/{account}/overlay", ("DELETE",), reset_overlay, "admin", "drop stored changes"),
        Endpoint("/accounts/{account}/overrides", ("PUT",), set_overrides, "admin", "set custom limits", obj),
        Endpoint("/accounts/{account}/allowlist", ("PUT",), set_allowlist, "admin", "set the IP allowlist", obj),
        Endpoint("/accounts/{account}/apps/{org}/{app}", ("PUT",), attach_app, "admin", "attach an app"),
        Endpoint("/accounts/{account}/apps/{org}/{app}", ("DELETE",), detach_app, "admin", "detach an app"),
        Endpoint(
            "/accounts/{account}/{action}",
            ("POST",),
            change,
            "admin",
            "subscribe, change-plan, cancel, freeze or unfreeze",
            obj,
        ),
    ]
    spec = openapi(endpoints, middleware.runtime.settings.admin_prefix)

    async def show_openapi(request: Request, rt: Any) -> JSONResponse:
        return JSONResponse(spec)

    return Starlette(
        routes=[
            *(Route(e.path, guarded(e.handler, e.scope), methods=list(e.methods)) for e in endpoints),
            # Behind the read token like every other admin read: the map of the admin API (its
            # prefix, its routes, which token writes) is of use to no one who holds neither token.
            Route("/openapi.json", guarded(show_openapi), methods=["GET"]),
            # Its own login (a cookie, not a bearer header): a browser cannot send the header.
            Mount("/dashboard", app=create_dashboard(middleware, lockout)),
        ]
    )


def _money(value: Any) -> str | None:
    return None if value is None else str(value)


def _check_apps_free(rt: Any, name: str, apps: tuple[str, ...]) -> None:
    for app in apps:
        holder = rt.directory.account_of(app)
        if holder is not None and holder.name != name:
            raise ConflictError(f"app {app!r} is held by account {holder.name!r}; detach it there first")


def openapi(endpoints: list[Endpoint], prefix: str) -> dict[str, Any]:
    """OpenAPI 3.1 description of the admin API, made from the routes themselves so it cannot drift."""
    error = {"$ref": "#/components/schemas/Error"}
    paths: dict[str, Any] = {}
    for e in endpoints:
        for method in e.methods:
            params = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in re.findall(r"\{([a-z_]+)\}", e.path)
            ]
            reply = {"application/json": {"schema": error}}
            op: dict[str, Any] = {
                "summary": e.summary,
                "operationId": method.lower() + "_" + re.sub(r"[^a-z0-9]+", "_", e.path.lower()).strip("_"),
                "security": [{e.scope: []}],
                "parameters": params,
                "responses": {
                    "200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
                    "400": {"description": "bad input", "content": reply},
                    "401": {"description": "no or wrong token", "content": reply},
                    "403": {"description": "the token's scope is read", "content": reply},
                    "404": {"description": "unknown", "content": reply},
                },
            }
            if e.body is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": e.body}}}
            paths.setdefault(prefix + e.path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "quota admin API", "version": __version__},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "read": {"type": "http", "scheme": "bearer", "description": "the read token (QUOTA_READ_TOKEN)"},
                "admin": {"type": "http", "scheme": "bearer", "description": "the admin token (QUOTA_ADMIN_TOKEN)"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "error_description"],
                    "properties": {
                        "error": {"type": "string"},
                        "error_description": {"type": "string"},
                        "problems": {"type": "array", "items": {"type": "string"}},
                    },
                }
            },
        },
    }


def apply_change(
    account: subs.Account, action: str, plan: str | None, day: date, plans: Mapping[str, Plan]
) -> subs.Account:
    """An account after `action`; `plan` (subscribe, change-plan) is one of `plans`."""
    chosen = plans.get(str(plan)) if action in ("subscribe", "change-plan") else None
    if chosen is not None and not plan_may_hold(chosen, len(account.apps)):
        raise ConflictError(
            f"account {account.name!r} holds {len(account.apps)} apps: {one_app_rule(chosen)}; detach the others first"
        )
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
