"""Usage-threshold webhooks, delivered to a real local HTTP receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from quota.config import load_config
from tests.conftest import Clock, free_port, make_client
from tests.helpers import create_room, read_yaml, register, write_yaml

SECRET = "webhook-secret-0123456789"


class Receiver:
    """A real HTTP server on loopback that records deliveries and fails the first `fail` attempts."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        self.port = free_port()

        async def hook(request: Request) -> JSONResponse:
            self.attempts += 1
            if self.attempts <= self.fail:
                return JSONResponse({"error": "down"}, status_code=503)
            body = await request.body()
            self.received.append({"headers": dict(request.headers), "body": body})
            return JSONResponse({"ok": True})

        self.server = uvicorn.Server(
            uvicorn.Config(
                Starlette(routes=[Route("/hook", hook, methods=["POST"])]), port=self.port, log_level="error"
            )
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"{len(self.received)} of {count} webhooks arrived"
            await asyncio.sleep(0.01)


@pytest.fixture
async def receiver(request: pytest.FixtureRequest) -> AsyncIterator[Receiver]:
    r = Receiver(getattr(request, "param", 0))
    task = asyncio.ensure_future(r.server.serve())
    while not r.server.started:
        await asyncio.sleep(0.01)
    yield r
    r.server.should_exit = True
    await task


def configure(config_dir: Path, url: str, groups: int) -> None:
    write_yaml(config_dir / "quota.yaml", {"webhooks": {"urls": [url], "thresholds": [80, 100], "retry_base_ms": 20}})
    plans = config_dir / "plans.yaml"
    doc = read_yaml(plans)
    doc["plans"]["free"]["limits"]["groups_per_app"] = groups
    write_yaml(plans, doc)


@pytest.mark.parametrize("receiver", [2], indirect=True)
async def test_thresholds_once_each_signed_and_retried(
    store: Any, clock: Clock, config_dir: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a threshold webhook not sent, sent twice, unsigned (or signed wrong), or lost to a
    receiver that fails its first attempts."""
    monkeypatch.setenv("QUOTA_WEBHOOK_SECRET", SECRET)
    configure(config_dir, receiver.url, groups=5)
    async with make_client(store, clock, load_config(config_dir)) as client:
        notifier = client._transport.app.notifier  # type: ignore[attr-defined]
        await register(client, "demo/free", ["own"])
        for _ in range(3):
            assert (await create_room(client, "demo/free", "chatgroups", "own")).status_code == 200
        await notifier.drain()
        assert receiver.received == []  # 3 of 5 is 60%
        assert (await create_room(client, "demo/free", "chatgroups", "own")).status_code == 200  # 80%
        await receiver.wait_for(1)
        assert (await create_room(client, "demo/free", "chatgroups", "own")).status_code == 200  # 100%
        assert (await create_room(client, "demo/free", "chatgroups", "own")).status_code == 403
        await receiver.wait_for(2)
        await notifier.drain()
        assert len(receiver.received) == 2
        events = [json.loads(r["body"]) for r in receiver.received]
        assert [(e["limit"], e["threshold"], e["used"], e["cap"]) for e in events] == [
            ("groups_per_app", 80, 4, 5),
            ("groups_per_app", 100, 5, 5),
        ]
        assert events[0]["app"] == "demo#free" and events[0]["account"] == "demo-free"
        first = receiver.received[0]
        expected = hmac.new(
            SECRET.encode(), first["headers"]["x-quota-timestamp"].encode() + b"." + first["body"], hashlib.sha256
        ).hexdigest()
        assert first["headers"]["x-quota-signature"] == f"sha256={expected}"
        assert first["headers"]["x-quota-attempt"] == "3"  # two failures, then delivered
        await notifier.close()


async def test_included_dau_threshold(
    store: Any, clock: Clock, config_dir: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches the included-DAU signal missing on a plan that bills overage (its DAU has no cap)."""
    monkeypatch.setenv("QUOTA_WEBHOOK_SECRET", SECRET)
    write_yaml(config_dir / "quota.yaml", {"webhooks": {"urls": [receiver.url], "thresholds": [80]}})
    accounts = config_dir / "accounts.yaml"
    plans = config_dir / "plans.yaml"
    doc = read_yaml(plans)
    doc["plans"]["basic"]["price"]["included_dau"] = 5
    write_yaml(plans, doc)
    assert accounts.exists()
    async with make_client(store, clock, load_config(config_dir)) as client:
        users = [f"u{i}" for i in range(6)]
        await register(client, "demo/basic", users)
        for u in users:
            assert (await client.post("/demo/basic/token", json={"username": u})).status_code == 200
        await receiver.wait_for(1)
        notifier = client._transport.app.notifier  # type: ignore[attr-defined]
        await notifier.close()
        event = json.loads(receiver.received[0]["body"])
        assert (event["limit"], event["used"], event["cap"], event["threshold"]) == ("included_dau", 4, 5, 80)
        assert len(receiver.received) == 1


def test_webhooks_need_a_secret(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches webhooks configured without a signing secret (unsigned signals anyone could forge)."""
    from quota.errors import ConfigError

    monkeypatch.delenv("QUOTA_WEBHOOK_SECRET", raising=False)
    write_yaml(config_dir / "quota.yaml", {"webhooks": {"urls": ["http://127.0.0.1:9/h"]}})
    with pytest.raises(ConfigError, match="webhooks.secret_env"):
        load_config(config_dir)


def test_retries_are_bounded(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches retries without an end: 40 attempts from 1 ms, doubling, waited 2^38 ms (eight years)
    before the last, and a shutdown waiting for them never ended. Found by the audit of 2026-12-01."""
    from quota.errors import ConfigError

    monkeypatch.setenv("QUOTA_WEBHOOK_SECRET", SECRET)
    for hooks, said in (
        ({"attempts": 40}, "webhooks.attempts: expected at most 10, found 40"),
        ({"retry_base_ms": 3_600_000}, "webhooks.retry_base_ms: expected at most 60000, found 3600000"),
        # A URL refused is shown without its password.
        (
            {"urls": ["ftp://u:hunter2@x/h"]},
            "webhooks.urls: expected a list of http(s) URLs, found ['ftp://u:***@x/h']",
        ),
    ):
        write_yaml(config_dir / "quota.yaml", {"webhooks": {"urls": ["http://127.0.0.1:9/h"], **hooks}})
        with pytest.raises(ConfigError) as info:
            load_config(config_dir)
        assert said in str(info.value) and "hunter2" not in str(info.value), str(info.value)


async def test_a_dead_receiver_neither_holds_the_shutdown_nor_leaks_the_urls_secrets(
    store: Any, clock: Clock, config_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches a failed delivery logging its URL whole (a receiver's password and query token in
    every log pipeline), and a lifespan shutdown waiting on a receiver that never answers: its
    deliveries get CLOSE_WAIT_S, then are dropped and said to be. Found by the audit of 2026-12-01."""
    import logging

    from quota import webhooks

    monkeypatch.setenv("QUOTA_WEBHOOK_SECRET", SECRET)
    monkeypatch.setattr(webhooks, "CLOSE_WAIT_S", 0.5)
    dead = f"http://hookuser:S3cret-passw0rd@127.0.0.1:{free_port()}/hook?token=qs-S3cret"
    hooks = {"urls": [dead], "thresholds": [80], "attempts": 10, "retry_base_ms": 60_000}
    write_yaml(config_dir / "quota.yaml", {"webhooks": hooks})
    plans = config_dir / "plans.yaml"
    doc = read_yaml(plans)
    doc["plans"]["basic"]["price"]["included_dau"] = 1
    write_yaml(plans, doc)
    with caplog.at_level(logging.WARNING, logger="quota"):
        async with make_client(store, clock, load_config(config_dir)) as client:
            await register(client, "demo/basic", ["u0"])
            assert (await client.post("/demo/basic/token", json={"username": "u0"})).status_code == 200
            mw = client._transport.app  # type: ignore[attr-defined]
            for _ in range(200):  # the first attempt fails at once (nothing listens), then it waits 60 s
                if any("webhook" in r.getMessage() for r in caplog.records) or mw.notifier._tasks:
                    break
                await asyncio.sleep(0.01)
            assert mw.notifier._tasks, "no delivery in flight"
            await asyncio.wait_for(mw.shutdown(), 5)
        assert not mw.notifier._tasks
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "1 deliveries still retrying at shutdown; dropped" in logged, logged
        # A delivery that ran out of attempts names its receiver masked.
        notifier = webhooks.ThresholdNotifier(replace(mw.runtime.settings.webhooks, attempts=1), store)
        notifier.observe("demo#basic", "demo-basic", "basic", "groups_per_app", 5, 5, time.time())
        await notifier.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "webhook to http://hookuser:***@127.0.0.1:" in logged and "/hook?*** failed 1 times" in logged, logged
    assert "S3cret" not in logged, logged
