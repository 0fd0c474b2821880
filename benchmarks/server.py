"""One variant for one scenario under uvicorn (one worker, httptools): the harness starts it pinned
to a core. `GET /__bench/sent` answers how many Redis commands the process's clients have sent."""

from __future__ import annotations

import signal
import sys
from typing import Any

from benchmarks import counting
from benchmarks.variants import build


def with_counter(app: Any) -> Any:
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/__bench/sent":
            body = str(counting.sent()).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return wrapped


def proxy_app(variant: str, scenario: str, upstream: str, redis_url: str) -> Any:
    """A proxy variant in front of the gateway at `upstream` (benchmarks/peers.py)."""
    from benchmarks.variants import config_dir
    from quota.proxy import ProxyApp, Upstream
    from quota.serve import Options, build_served

    if variant == "proxy-off-httpx":
        from benchmarks.clients import HttpxProxyApp

        return HttpxProxyApp(Upstream(upstream))
    if variant == "proxy-off-aiohttp":
        from benchmarks.clients import AiohttpProxyApp

        return AiohttpProxyApp(Upstream(upstream))
    if variant == "proxy-off":
        return ProxyApp(Upstream(upstream))
    options = Options(config=str(config_dir(scenario)), redis_url=redis_url, upstream=upstream)
    app, middleware = build_served(options)
    if middleware is not None:
        counting.watch(middleware)
    return app


def main() -> int:
    import uvicorn

    from benchmarks.peers import PROXY_VARIANTS, run_nginx, start_gateway

    variant, scenario, port, redis_url = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    # uvicorn re-raises the SIGTERM it caught once it has shut down; exit through `finally` then,
    # so the gateway this process started is stopped with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    gateway = None
    if variant in PROXY_VARIANTS:
        gateway, upstream = start_gateway(scenario, redis_url)
    try:
        if variant == "nginx":
            return run_nginx(scenario, port, upstream)
        counting.install()
        if gateway:
            app = proxy_app(variant, scenario, upstream, redis_url)
        else:
            app = build(variant, scenario, redis_url)
            if hasattr(app, "runtime"):
                counting.watch(app)
        uvicorn.run(
            with_counter(app),
            host="127.0.0.1",
            port=port,
            http="httptools",
            loop="uvloop",
            access_log=False,
            log_level="warning",
            # The proxy opens its upstream pool at startup and closes it at shutdown.
            lifespan="on" if gateway else "off",
            server_header=gateway is None,
            date_header=gateway is None,
        )
        return 0
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)


if __name__ == "__main__":
    sys.exit(main())
