"""One call to put quota inside a Starlette or FastAPI app, admin API, probes and metrics included.

    app = FastAPI()
    quota.install(app, config="config/", redis_url="redis://localhost:6379/0")

`app.add_middleware(QuotaMiddleware, ...)` alone works for enforcement, but Starlette builds that
instance out of reach at the first request, so nothing can hand it to the admin API: /_quota/*
would answer 404. install() builds the middleware itself and adds it through a factory instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from quota.config import Config, load_config
from quota.middleware import QuotaMiddleware
from quota.probes import Probes
from quota.serve import METRICS_DIR_ENV, build_app, outage_policy
from quota.served_metrics import ServedMetrics, attach
from quota.store import Store


class _Inner:
    """Stands in for the app's own stack until Starlette builds it and hands it over."""

    def __init__(self) -> None:
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None, "quota.install: the app's middleware stack was never built"
        await self.app(scope, receive, send)


def install(
    app: Starlette,
    *,
    config: Config | str | Path | None = None,
    store: Store | None = None,
    redis_url: str | None = None,
    metrics_dir: str | Path | None = None,
) -> QuotaMiddleware:
    """Add QuotaMiddleware (outermost of the app's own middleware) with its admin API under
    `admin_prefix`, /health and /ready probes, and storage failures logged; set `app.state.quota`
    (a quota.Quota on the live config) and the handler that renders quota.dependencies' refusals.
    Returns the middleware, for reload() and its metrics. The store: `store`, else `redis_url`,
    else memory (one process).

    Under `uvicorn app --workers N`, give every worker the same empty `metrics_dir` (or set
    QUOTA_METRICS_DIR) so that each scrape adds up all workers' counters (quota/served_metrics.py)."""
    cfg = config if isinstance(config, Config) else load_config(config)
    inner = _Inner()
    middleware = build_app(cfg, store=store, redis_url=redis_url, upstream=inner)
    shared = metrics_dir or os.environ.get(METRICS_DIR_ENV)
    metrics = ServedMetrics(
        outage=lambda: outage_policy(middleware.runtime.config), shared_dir=Path(shared) if shared else None
    )
    attach(middleware, metrics)
    probes = Probes(middleware, middleware)

    def factory(stack: ASGIApp) -> ASGIApp:
        inner.app = stack
        return probes

    app.add_middleware(factory)
    # For route-level checks (quota.dependencies): the live API, and refusals shaped as the middleware's.
    from quota.api import Quota
    from quota.dependencies import QuotaRefusal, refusal_handler

    app.state.quota = Quota.of(middleware)
    app.add_exception_handler(QuotaRefusal, refusal_handler)
    return middleware


__all__ = ["install"]
