"""Which routes an ASGI upstream serves that the route map does not name (`quota check-routes`).

Such a route is refused by default (`unmatched: refuse`), or gets only the general per-IP rate
(`rate-only`): either way it is a gap to close in config/routes.yaml, so quota says so at start.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from typing import Any

from quota.routes import RouteMap

_PARAM = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)(:[a-z]+)?\}")


def served_routes(app: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path template) of every route a Starlette app (or router) serves, mounts included."""
    from starlette.routing import Mount, Route, WebSocketRoute

    routes = getattr(app, "routes", None)
    if routes is None:
        inner = getattr(app, "app", None)
        if inner is not None and inner is not app:
            yield from served_routes(inner, prefix)
        return
    for route in routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":  # matched as GET
                    yield method, prefix + route.path
        elif isinstance(route, WebSocketRoute):
            yield "WEBSOCKET", prefix + route.path
        elif isinstance(route, Mount):
            yield from served_routes(route.app, prefix + route.path)


def uncovered(app: Any, routes: RouteMap) -> list[tuple[str, str]]:
    """Routes of `app` under an app prefix that no rule of the route map matches."""
    out = []
    for method, template in served_routes(app):
        sample = _PARAM.sub("x1", template)
        match = routes.match(method, sample)
        if match.rule.name in ("unmatched", "other") and template.startswith("/{org}/{app}"):
            out.append((method, template))
    return out


def load_upstream(spec: str) -> Any:
    """`module:attribute`; a callable attribute (a factory) is called with no arguments."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--upstream must be module:attribute, found {spec!r}")
    found = getattr(importlib.import_module(module_name), attr)
    return found() if callable(found) and not hasattr(found, "routes") and not hasattr(found, "app") else found
