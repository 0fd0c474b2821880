"""quota.dependencies in a Starlette app: refusals in the route, shaped like the middleware's."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from quota import Quota
from quota.dependencies import QuotaRefusal, refusal_handler, requires_feature, within_limit
from quota.store.memory import MemoryStore
from tests.conftest import asgi_client


def build(store: Any) -> tuple[Starlette, Quota]:
    quota = Quota(store=store)
    translate = requires_feature("translation")
    friends = within_limit("friends_per_user", user="owner")

    async def do_translate(request: Request) -> JSONResponse:
        await translate(request)
        return JSONResponse({"translated": True})

    async def add_friend(request: Request) -> JSONResponse:
        await friends(request)
        return JSONResponse({"added": request.path_params["friend"]})

    app = Starlette(
        routes=[
            Route("/{org}/{app}/messages/translate", do_translate, methods=["POST"]),
            Route("/{org}/{app}/users/{owner}/contacts/users/{friend}", add_friend, methods=["POST"]),
        ],
        exception_handlers={QuotaRefusal: refusal_handler},
    )
    app.state.quota = quota
    return app, quota


async def test_helpers_refuse_like_the_middleware(store: Any) -> None:
    """Catches the helpers letting a plan's missing feature or a full cap through, or refusing with
    another body shape than the middleware's."""
    app, _ = build(store)
    await store.add_members("q:{demo#free}:s:contacts:o:alice", [f"f{i}" for i in range(100)])
    async with asgi_client(app, base_url="http://app") as c:
        r = await c.post("/demo/free/messages/translate")
        assert r.status_code == 403
        assert r.json()["error"] == "forbidden_op" and r.json()["exception"] == "QuotaForbiddenOpException"
        assert r.json()["limit"] == "translation" and set(r.json()) >= {"timestamp", "duration", "error_description"}
        assert (await c.post("/demo/pro/messages/translate")).json() == {"translated": True}
        r = await c.post("/demo/free/users/ALICE/contacts/users/bob")
        assert r.status_code == 403 and r.json()["error"] == "exceed_limit" and "room for 0 more" in r.text
        assert (await c.post("/demo/free/users/carol/contacts/users/bob")).status_code == 200
        r = await c.post("/demo/free/users/a,b/contacts/users/bob")
        assert r.status_code == 400 and r.json()["error"] == "illegal_argument"


def test_without_a_quota_it_says_so() -> None:
    """Catches a helper silently allowing everything when no Quota is wired in."""
    import pytest

    app, _ = build(MemoryStore())
    del app.state.quota
    from starlette.testclient import TestClient

    with TestClient(app, raise_server_exceptions=True) as c, pytest.raises(RuntimeError, match="app.state.quota"):
        c.post("/demo/free/messages/translate")
