"""FastAPI and Starlette helpers: refuse in a route, with the middleware's IM-style bodies.

    quota.install(app, ...)          # sets app.state.quota and the QuotaRefusal handler
    @app.post("/translate", dependencies=[Depends(requires_feature("translation", appkey=from_query))])
    @app.get("/limits", dependencies=[Depends(within_limit("friends_per_user", user="user", appkey=from_query))])

Without install(): `app.add_exception_handler(QuotaRefusal, refusal_handler)` and
`app.state.quota = Quota.of(middleware)` (or pass quota= to each helper).

The app is read from the path's {org} and {app}, or from `appkey=` (a function of the request);
an entity (user=, group=, chatroom=) names the path or query parameter that holds it. Each helper
is an `async def (request) -> None` that a FastAPI dependency or a Starlette endpoint can await.
within_limit reads: use it where the route map counts nothing (the middleware already checks, and
reserves, what it counts), to answer early in the route's own terms.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from quota.api import Quota
from quota.decisions import Denial
from quota.errors import UnknownAppError
from quota.responses import body_of, headers_of

Dependency = Callable[[Request], Awaitable[None]]


class QuotaRefusal(Exception):
    def __init__(self, denial: Denial) -> None:
        super().__init__(denial.description)
        self.denial = denial


async def refusal_handler(request: Request, exc: Exception) -> Response:
    """Render a QuotaRefusal exactly as the middleware renders its refusals."""
    assert isinstance(exc, QuotaRefusal)
    body = body_of(exc.denial, 0.0)
    headers = {k.decode(): v.decode() for k, v in headers_of(exc.denial, body) if k != b"content-length"}
    return Response(body, status_code=exc.denial.status, headers=headers, media_type="application/json")


def _quota(request: Request, quota: Quota | None) -> Quota:
    found = quota or getattr(request.app.state, "quota", None)
    if not isinstance(found, Quota):
        raise RuntimeError("no Quota: pass quota= or set app.state.quota = Quota.of(middleware)")
    return found


AppKey = Callable[[Request], str]


def _from_path(request: Request) -> str:
    return f"{request.path_params['org']}#{request.path_params['app']}"


def from_query(request: Request) -> str:
    """The app named by `?app=org%23app`. The query is the client's to choose: use it only where
    the caller was authenticated as that app, or a client of a free app names a paid one and is
    held to its plan. Otherwise pass `appkey=` a function of the authenticated caller."""
    return _param(request, "app")


def _param(request: Request, name: str) -> str:
    value = request.path_params.get(name, request.query_params.get(name))
    if not isinstance(value, str):
        raise QuotaRefusal(Denial(400, "illegal_argument", f"{name} is required"))
    return value


async def _app(request: Request, q: Quota, appkey: AppKey) -> str:
    key = appkey(request)
    try:
        await q.plan(key)
    except UnknownAppError as exc:
        raise QuotaRefusal(Denial(404, "service_resource_not_found", str(exc))) from exc
    return key


def requires_feature(name: str, *, quota: Quota | None = None, appkey: AppKey = _from_path) -> Dependency:
    async def dependency(request: Request) -> None:
        q = _quota(request, quota)
        key = await _app(request, q, appkey)
        if not await q.feature(key, name):
            plan = (await q.plan(key)).plan
            raise QuotaRefusal(
                Denial(403, "forbidden_op", f"feature {name} is not in plan {plan}; upgrade to use it", name)
            )

    return dependency


def within_limit(
    name: str,
    *,
    add: int = 1,
    user: str | None = None,
    group: str | None = None,
    chatroom: str | None = None,
    quota: Quota | None = None,
    appkey: AppKey = _from_path,
) -> Dependency:
    """Refuse when `add` more would not fit under the limit now (a read: the middleware still
    enforces the limit atomically; this answers early, in the route's own terms)."""

    async def dependency(request: Request) -> None:
        entities = {
            kind: _param(request, param)
            for kind, param in (("user", user), ("group", group), ("chatroom", chatroom))
            if param
        }
        q = _quota(request, quota)
        key = await _app(request, q, appkey)
        try:
            decision = await q.check(key, name, add=add, **entities)
        except ValueError as exc:
            raise QuotaRefusal(Denial(400, "illegal_argument", str(exc))) from exc
        if not decision.allowed:
            raise QuotaRefusal(Denial(decision.status, decision.error or "forbidden_op", decision.reason, name))

    return dependency
