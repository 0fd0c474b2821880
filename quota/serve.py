"""The main job: the reference IM gateway wrapped in QuotaMiddleware, with the admin API."""

from __future__ import annotations

from pathlib import Path

from starlette.types import ASGIApp

from quota.admin import create_admin
from quota.config import Config, load_config
from quota.gateway import create_gateway
from quota.middleware import QuotaMiddleware
from quota.store import Store, store_from_url


def build_app(
    config: Config | str | Path | None = None,
    *,
    redis_url: str | None = None,
    store: Store | None = None,
    upstream: ASGIApp | None = None,
) -> QuotaMiddleware:
    cfg = config if isinstance(config, Config) else load_config(config)
    if store is None:
        store = store_from_url(redis_url or "memory://", timeout_ms=cfg.settings.storage_timeout_ms)
    middleware = QuotaMiddleware(upstream or create_gateway(), config=cfg, store=store)
    middleware.admin = create_admin(lambda: middleware.runtime)
    return middleware
