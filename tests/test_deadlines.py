"""quota/deadlines.py: a request body quota reads has a deadline; a shutdown is not one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from quota.config import load_config
from quota.deadlines import BodyDeadlines
from quota.serve import build_app
from quota.store.memory import MemoryStore
from tests.helpers import http_scope


async def _stalled_call(app: Any, sent: list[dict[str, Any]], reached: list[str]) -> None:
    """POST a counted body whose first part arrives and whose rest never does."""
    parts = [{"type": "http.request", "body": b'[{"username":', "more_body": True}]

    async def receive() -> dict[str, Any]:
        if parts:
            return parts.pop()
        await asyncio.Event().wait()  # the rest of the body never comes
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    app.app = upstream
    headers = [(b"content-type", b"application/json"), (b"content-length", b"100")]
    await app(http_scope("POST", "/demo/free/users", headers=headers), receive, send)


async def test_a_body_past_its_deadline_is_a_408_and_a_shutdown_is_not(config_dir: Path) -> None:
    """Catches a read cut off by its deadline passed on to the app, counted, or answered without
    closing the connection; and a cancellation that is not the deadline's (a server shutting down)
    taken for one: it must reach the server as a cancellation, not as a 408 answered to nobody."""
    (config_dir / "quota.yaml").write_text("body_timeout_s: 1\n")
    app = build_app(load_config(config_dir), store=MemoryStore())
    sent: list[dict[str, Any]] = []
    reached: list[str] = []
    began = time.monotonic()
    await asyncio.wait_for(_stalled_call(app, sent, reached), 10)
    assert 0.9 < time.monotonic() - began < 3
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"], sent
    assert b"request body not in within 1 s" in sent[1]["body"] and reached == []
    assert app.deadlines._reads == {}

    sent.clear()
    task = asyncio.ensure_future(_stalled_call(app, sent, reached))
    await asyncio.sleep(0.2)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done and task.cancelled() and sent == [] and reached == []
    assert app.deadlines._reads == {}


@pytest.mark.parametrize("order", ["deadline, then shutdown", "shutdown, then deadline"])
async def test_a_shutdown_meeting_the_deadline_is_still_a_shutdown(config_dir: Path, order: str) -> None:
    """Catches a server's cancellation swallowed when the deadline's lands in the same turn of the
    loop (one CancelledError carries both): the read answered 408 and ended as if nothing had
    asked it to stop. Found by the review of 2026-12-02."""
    app = build_app(load_config(config_dir), store=MemoryStore())
    sent: list[dict[str, Any]] = []
    task = asyncio.ensure_future(_stalled_call(app, sent, []))
    await asyncio.sleep(0.05)
    assert list(app.deadlines._reads) == [task]
    app.deadlines._reads[task][0] = 0.0  # past its deadline: the sweep is due
    loop = asyncio.get_running_loop()
    if order == "deadline, then shutdown":
        app.deadlines._sweep(loop)
        task.cancel()
    else:
        task.cancel()
        app.deadlines._sweep(loop)
    await asyncio.wait([task], timeout=5)
    assert task.cancelled() and sent == [], sent


def test_a_read_left_on_a_closed_loop_stops_no_later_deadline() -> None:
    """Catches one BodyDeadlines outliving a loop (a middleware kept across a test's loops, or a
    worker's restarts): a read left pending on a closed loop made each later sweep fail before
    it reached the live reads, which were then never cut off. Found by the review of 2026-12-02."""
    deadlines = BodyDeadlines(lambda: 0.2)

    async def read() -> str:
        task = deadlines.start()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "cut off" if deadlines.end(task) else "cancelled"
        return "ended"

    old = asyncio.new_event_loop()
    stale = old.create_task(read())
    old.run_until_complete(asyncio.sleep(0.01))
    old.close()  # the read is left pending
    assert stale in deadlines._reads
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(asyncio.wait_for(read(), 4)) == "cut off"
    finally:
        loop.close()
    assert stale not in deadlines._reads
    stale._log_destroy_pending = False  # type: ignore[attr-defined]
