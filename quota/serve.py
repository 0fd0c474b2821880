"""What `quota serve` and `quota proxy` run: the reference IM gateway, or a remote gateway behind the
reverse proxy, wrapped in QuotaMiddleware with its admin API, probes and metrics, under uvicorn."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp

from quota.admin import create_admin
from quota.config import Config, Settings, load_config
from quota.errors import ConfigError, StorageError
from quota.middleware import QuotaMiddleware
from quota.probes import Probes
from quota.served_metrics import ServedMetrics, attach
from quota.store import Store, store_from_url
from quota.tokens import masked_url

log = logging.getLogger("quota")
OPTIONS_ENV = "QUOTA_SERVE_OPTIONS"
METRICS_DIR_ENV = "QUOTA_METRICS_DIR"
EXIT_STORE = 4


def build_app(
    config: Config | str | Path | None = None,
    *,
    redis_url: str | None = None,
    store: Store | None = None,
    upstream: ASGIApp | None = None,
) -> QuotaMiddleware:
    """The middleware with its admin API around `upstream` (default: the reference gateway)."""
    cfg = config if isinstance(config, Config) else load_config(config)
    if store is None:
        store = store_from_url(redis_url or "memory://", timeout_ms=cfg.settings.storage_timeout_ms)
    if upstream is None:
        from quota.gateway import create_gateway

        upstream = create_gateway()
    middleware = QuotaMiddleware(upstream, config=cfg, store=store)
    middleware.admin = create_admin(middleware)
    if cfg.settings.webhooks.urls:
        from quota.webhooks import ThresholdNotifier

        notifier = ThresholdNotifier(cfg.settings.webhooks, store)
        middleware.metrics.listeners.append(notifier.observe)
        middleware.notifier = notifier
    return middleware


@dataclass
class Options:
    """Everything a worker needs to build its app; crosses to uvicorn's worker processes as JSON."""

    config: str | None = None
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    require_store: bool = False
    # Proxy mode when set: the gateway's base URL, and how to reach it.
    upstream: str | None = None
    upstream_options: dict[str, Any] = field(default_factory=dict)
    checks: bool = True


def build_served(options: Options, metrics_dir: Path | None = None) -> tuple[ASGIApp, QuotaMiddleware | None]:
    """The whole served app: probes, middleware (unless checks are off), gateway or proxy."""
    cfg = load_config(options.config)
    proxy = None
    if options.upstream is not None:
        from quota.proxy import ProxyApp, Upstream

        upstream = Upstream(options.upstream, **options.upstream_options)
        timeout_s = cfg.settings.body_timeout_s
        proxy = ProxyApp(upstream, trusted=cfg.settings.trusted_proxies, body_timeout_s=lambda: timeout_s)
        if not options.checks:
            return _aborting(proxy), None
    middleware = build_app(cfg, redis_url=options.redis_url, upstream=proxy)
    if proxy is not None:
        # Forwarding headers trust whom the checks trust, and bodies wait as long, after a reload too.
        proxy.trusted = lambda: middleware.runtime.config.settings.trusted_proxies
        proxy.deadlines.timeout_s = lambda: middleware.runtime.body_timeout_s
    attach(middleware, ServedMetrics(outage=lambda: outage_policy(middleware.runtime.config), shared_dir=metrics_dir))
    app: ASGIApp = Probes(middleware, middleware)
    return (_aborting(app) if proxy is not None else app), middleware


def _aborting(app: ASGIApp) -> ASGIApp:
    from quota.proxy.errors import abort_on_broken

    return abort_on_broken(app)


def worker_app() -> ASGIApp:
    """uvicorn's factory in each worker process under --workers N (options from the environment)."""
    options = Options(**json.loads(os.environ[OPTIONS_ENV]))
    shared = os.environ.get(METRICS_DIR_ENV)
    _configure_logging()
    app, _ = build_served(options, Path(shared) if shared else None)
    return app


def outage_policy(cfg: Config) -> str:
    s: Settings = cfg.settings
    overrides = sum(1 for rule in cfg.routes.rules if getattr(rule, "outage", None))
    text = f"rates {s.outage_rates}, counters {s.outage_counters}"
    return text + (f" ({overrides} routes set their own)" if overrides else "")


def masked(url: str | None) -> str:
    """A store URL fit for a log line: any password replaced by ***."""
    return masked_url(url) if url else "memory (this process only)"


def describe(options: Options, cfg: Config) -> str:
    """The one line a started server logs about what it runs."""
    trusted = ", ".join(str(n) for n in cfg.settings.trusted_proxies) or "none"
    what = f"proxy to {options.upstream}" if options.upstream else "the reference IM gateway"
    checks = "" if options.checks else " with quota's checks OFF"
    return (
        f"quota serving {what}{checks} on {options.host}:{options.port} ({options.workers} worker"
        f"{'s' if options.workers != 1 else ''}); store {masked(options.redis_url)}; config {cfg.directory} "
        f"({len(cfg.routes.rules)} routes, {len(cfg.matrix.plans)} plans, {len(cfg.accounts)} accounts); "
        f"trusted proxies {trusted}; outage policy {outage_policy(cfg)}"
    )


async def check_store(url: str, timeout_ms: int) -> str | None:
    """None when the store answers, else why not."""
    store = store_from_url(url, timeout_ms=timeout_ms)
    try:
        await asyncio.wait_for(store.accounts_version(), max(1.0, timeout_ms / 1000))
    except (TimeoutError, StorageError, OSError) as exc:
        return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
    finally:
        try:
            await store.close()
        except (StorageError, OSError):
            pass
    return None


def _configure_logging() -> None:
    logger = logging.getLogger("quota")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run(options: Options) -> int:
    """Serve until stopped; SIGHUP reloads the config (a bad one is logged and the old one kept)."""
    _configure_logging()
    cfg = load_config(options.config)
    log.info("%s", describe(options, cfg))
    if options.upstream is None:
        from quota.coverage import uncovered
        from quota.gateway import create_gateway

        for method, path in uncovered(create_gateway(), cfg.routes):
            log.warning("route %s %s of the gateway is not in the route map: it is refused", method, path)
    if options.workers > 1 and not options.redis_url:
        log.warning(
            "%d workers on the in-memory store: each worker counts alone, so caps and rates hold per "
            "worker, not in total; give --redis to share them",
            options.workers,
        )
    if options.redis_url:
        problem = asyncio.run(check_store(options.redis_url, cfg.settings.storage_timeout_ms))
        if problem is not None:
            if options.require_store:
                log.error("store %s unreachable at start (%s); not starting", masked(options.redis_url), problem)
                return EXIT_STORE
            log.warning(
                "store %s unreachable at start (%s); until it answers, the outage policy applies: %s",
                masked(options.redis_url),
                problem,
                outage_policy(cfg),
            )
    import uvicorn

    common: dict[str, Any] = {
        "host": options.host,
        "port": options.port,
        "log_level": "info",
        # quota's trusted_proxies alone decides whom X-Forwarded-For is believed from.
        "proxy_headers": False,
    }
    if options.upstream is not None:
        # The upstream's Date and Server pass through; uvicorn adding its own would double them.
        common.update(server_header=False, date_header=False)
    if options.workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="quota-metrics-")
        os.environ[OPTIONS_ENV] = json.dumps(asdict(options))
        os.environ[METRICS_DIR_ENV] = metrics_dir
        try:
            # Each worker is a process of its own; SIGHUP to this parent restarts them all on the new config.
            uvicorn.run("quota.serve:worker_app", factory=True, workers=options.workers, **common)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return 0
    app, middleware = build_served(options)

    async def main() -> None:
        server = uvicorn.Server(uvicorn.Config(app, **common))

        async def reload() -> None:
            if middleware is None:
                return
            try:
                cfg = await middleware.reload_async()
            except ConfigError as exc:
                log.error("reload refused, the old config stays in force:\n%s", exc)
            else:
                log.warning("reloaded %s", cfg.directory)

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
        await server.serve()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())
    return 0


def _loop_factory() -> Any:
    # uvicorn.run picks uvloop when installed; serving through uvicorn.Server here must too.
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def serve(config: str | Path | None, *, redis_url: str | None, host: str, port: int) -> None:
    """Run the reference gateway wrapped in quota (kept for callers of the earlier API)."""
    run(Options(config=None if config is None else str(config), redis_url=redis_url, host=host, port=port))
