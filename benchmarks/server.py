"""One variant for one scenario under uvicorn (one worker, httptools): the harness starts it pinned
to a core. `GET /__bench/sent` answers how many Redis commands the process's clients have sent."""

from __future__ import annotations

import sys
from typing import Any

from benchmarks import counting
from benchmarks.variants import build


def with_counter(app: Any) -> Any:
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/__bench/sent":
            body = str(counting.SENT[0]).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return wrapped


def main() -> None:
    import uvicorn

    variant, scenario, port, redis_url = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    counting.install()
    app = with_counter(build(variant, scenario, redis_url))
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        http="httptools",
        loop="uvloop",
        access_log=False,
        log_level="warning",
        lifespan="off",
    )


if __name__ == "__main__":
    main()
