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
    middleware.admin = create_admin(middleware)
    if cfg.settings.webhooks.urls:
        from quota.webhooks import ThresholdNotifier

        notifier = ThresholdNotifier(cfg.settings.webhooks, store)
        middleware.metrics.listeners.append(notifier.observe)
        middleware.notifier = notifier  # type: ignore[attr-defined]
    return middleware


def serve(config: str | Path | None, *, redis_url: str | None, host: str, port: int) -> None:
    """Run under uvicorn; SIGHUP reloads the config (a bad one is logged and the old one kept)."""
    import asyncio
    import logging
    import signal

    import uvicorn

    from quota.errors import ConfigError

    app = build_app(config, redis_url=redis_url)
    log = logging.getLogger("quota")
    from quota.coverage import uncovered

    for method, path in uncovered(app.app, app.runtime.routes):
        log.warning("route %s %s of the gateway is not in the route map: it is refused", method, path)

    async def main() -> None:
        # quota's trusted_proxies is the one authority on client addresses: uvicorn must not rewrite them.
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", proxy_headers=False))

        async def reload() -> None:
            try:
                cfg = await app.reload_async()
            except ConfigError as exc:
                log.error("reload refused, the old config stays in force:\n%s", exc)
            else:
                log.warning("reloaded %s", cfg.directory)

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
        await server.serve()

    asyncio.run(main())
