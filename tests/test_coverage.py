"""`quota check-routes`: the routes an upstream serves that the route map does not name."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from tests.conftest import run_cli


def extra_gateway() -> Any:
    """The reference gateway with two routes the route map does not know, one under a mount."""
    from starlette.applications import Starlette

    from quota.gateway import create_gateway

    app = create_gateway()

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app.router.routes.append(Route("/{org}/{app}/users/{username}/password", ok, methods=["PUT"]))
    app.router.routes.append(Mount("/{org}/{app}/mutes", Starlette(routes=[Route("/", ok, methods=["POST"])])))
    return app


def test_reference_gateway_is_covered() -> None:
    """Catches a route of the reference gateway missing from config/routes.yaml (it would be refused)."""
    out = run_cli("check-routes", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["uncovered"] == [] and report["served"] >= 30


def test_uncovered_routes_are_listed() -> None:
    """Catches check-routes missing a route (a plain one, or one under a mount) and exiting 0."""
    out = run_cli("check-routes", "--upstream", "tests.test_coverage:extra_gateway")
    assert out.returncode == 1
    assert "PUT       /{org}/{app}/users/{username}/password" in out.stdout
    assert "POST      /{org}/{app}/mutes/" in out.stdout
    assert "refused (404)" in out.stdout
