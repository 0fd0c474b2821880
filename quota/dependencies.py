"""FastAPI and Starlette helpers: refuse in a route, with the middleware's IM-style bodies.

    from quota.dependencies import requires_feature, within_limit, QuotaRefusal, refusal_handler
    app.add_exception_handler(QuotaRefusal, refusal_handler)
    app.state.quota = Quota.of(middleware)            # or pass quota= to each helper

    @app.post("/{org}/{app}/messages/translate", dependencies=[Depends(requires_feature("translation"))])
    @app.post("/{org}/{app}/users/{owner}/contacts/users/{friend}",
              dependencies=[Depends(within_limit("friends_per_user", user="owner"))])

The app is read from the path's {org} and {app}; an entity (user=, group=, chatroom=) names the
path parameter that holds it. Each helper is an `async def (request) -> None` a FastAPI dependency
or a Starlette endpoint can await.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from quota.api import Quota
from quota.decisions import Denial
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


def _appkey(request: Request) -> str:
    return f"{request.path_params['org']}#{request.path_params['app']}"


def requires_feature(name: str, *, quota: Quota | None = None) -> Dependency:
    async def dependency(request: Request) -> None:
        q = _quota(request, quota)
        if not await q.feature(_appkey(request), name):
            plan = (await q.plan(_appkey(request))).plan
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
) -> Dependency:
    """Refuse when `add` more would not fit under the limit now (a read: the middleware still
    enforces the limit atomically; this answers early, in the route's own terms)."""

    async def dependency(request: Request) -> None:
        params = request.path_params
        entities = {
            kind: params[param] for kind, param in (("user", user), ("group", group), ("chatroom", chatroom)) if param
        }
        try:
            decision = await _quota(request, quota).check(_appkey(request), name, add=add, **entities)
        except ValueError as exc:
            raise QuotaRefusal(Denial(400, "illegal_argument", str(exc))) from exc
        if not decision.allowed:
            raise QuotaRefusal(Denial(decision.status, decision.error or "forbidden_op", decision.reason, name))

    return dependency
