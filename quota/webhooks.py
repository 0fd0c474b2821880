"""Usage thresholds: a signed webhook when an app crosses 80% and 100% of a cap or of its included DAU.

It is the signal a sales team offers an upgrade on, and a customer avoids surprise refusals with.
Each threshold is sent once per period (the day for included DAU, the month for caps), across
processes: the first process to claim it in the store sends it. Delivery runs in the background
with retries and exponential backoff; the body is signed with HMAC-SHA256 over
`<timestamp>.<body>`, in `X-Quota-Signature: sha256=<hex>` beside `X-Quota-Timestamp`.

Wiring: `quota.serve.build_app` subscribes a notifier to the middleware's metrics when
`webhooks:` is configured; the middleware itself never imports this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from quota.config import Webhooks
from quota.keys import app_prefix, escape
from quota.store import Store
from quota.tokens import masked_url

log = logging.getLogger("quota")
# Thresholds already sent by this process, per period: a bounded set (periods roll over).
MAX_SENT = 1 << 14
# A wait between attempts doubles up to this; a shutdown waits this long for deliveries in flight,
# then drops them (logged): a dead receiver never holds the server.
MAX_WEBHOOK_WAIT_S = 60.0
CLOSE_WAIT_S = 10.0


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class ThresholdNotifier:
    def __init__(self, settings: Webhooks, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.lowest = min(settings.thresholds)
        self._sent: set[tuple[str, str, int, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None

    def observe(self, app: str, account: str, plan: str, limit: str, used: int, cap: int, now: float) -> None:
        """Called on the request path with a cap's use after an allowed request: cheap unless a
        threshold is crossed for the first time in its period."""
        if cap <= 0 or used * 100 < self.lowest * cap:
            return
        day = datetime.fromtimestamp(now, UTC)
        period = f"{day:%Y-%m-%d}" if limit == "included_dau" else f"{day:%Y-%m}"
        for threshold in self.settings.thresholds:
            if used * 100 < threshold * cap:
                continue
            key = (app, limit, threshold, period)
            if key in self._sent:
                continue
            if len(self._sent) >= MAX_SENT:
                self._sent.clear()
            self._sent.add(key)
            event = {
                "event": "usage.threshold",
                "app": app,
                "account": account,
                "plan": plan,
                "limit": limit,
                "threshold": threshold,
                "used": used,
                "cap": cap,
                "period": period,
                "at": int(now * 1000),
            }
            task = asyncio.ensure_future(self._send_once(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_once(self, event: dict[str, Any]) -> None:
        marker = f"{app_prefix(event['app'])}th:{escape(event['limit'])}:{event['threshold']}:{event['period']}"
        try:
            if not await self.store.claim_once(marker, 40 * 86400):
                return  # another process sent it
        except Exception as exc:  # noqa: BLE001 - a store fault must not lose the signal: send anyway
            log.warning("webhook: could not claim %s in the store (%s); sending anyway", marker, exc)
        body = json.dumps(event, sort_keys=True).encode()
        for url in self.settings.urls:
            await self._deliver(url, body)

    async def _deliver(self, url: str, body: bytes) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.settings.timeout_s)
        delay = self.settings.retry_base_ms / 1000
        for attempt in range(1, self.settings.attempts + 1):
            timestamp = str(int(time.time()))
            headers = {
                "content-type": "application/json",
                "x-quota-timestamp": timestamp,
                "x-quota-signature": sign(self.settings.secret, timestamp, body),
                "x-quota-attempt": str(attempt),
            }
            try:
                response = await self._client.post(url, content=body, headers=headers)
                if response.is_success:
                    return
                failure = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                failure = exc.__class__.__name__
            if attempt < self.settings.attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_WEBHOOK_WAIT_S)
        shown = masked_url(url)
        log.warning("webhook to %s failed %d times (last: %s); dropped", shown, self.settings.attempts, failure)

    async def drain(self) -> None:
        """Wait for deliveries in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self, wait_s: float | None = None) -> None:
        """Wait for deliveries in flight, at most `wait_s` (CLOSE_WAIT_S); what is left then is
        dropped (logged). The middleware's shutdown calls it."""
        left: set[asyncio.Task[None]] = set()
        if self._tasks:
            # asyncio.wait, not wait_for over a gather: a timeout must not cancel them before they are counted.
            _, left = await asyncio.wait(set(self._tasks), timeout=CLOSE_WAIT_S if wait_s is None else wait_s)
        if left:
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            log.warning("webhook: %d deliveries still retrying at shutdown; dropped", len(left))
        if self._client is not None:
            await self._client.aclose()
