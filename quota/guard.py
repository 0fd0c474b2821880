"""The one way quota calls its store on the request path: the local deny cache first, then the
circuit breaker, a timed call, and the outage policy when the store does not answer.

Storage failures are logged, at most once per LOG_EVERY_S seconds with the count since the last
line, so an outage shows up in the logs without a line per request.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from quota.breaker import CircuitBreaker
from quota.decisions import Denial
from quota.errors import StorageError
from quota.metrics import Metrics
from quota.routes import RouteRule
from quota.store.program import DrainOp, Outcome, Program

if TYPE_CHECKING:
    from quota.middleware import Runtime

UNAVAILABLE = Denial(503, "service_unavailable", "quota storage is unavailable; retry shortly")
LOG_EVERY_S = 10.0
log = logging.getLogger("quota")


class StoreGuard:
    def __init__(self, metrics: Metrics, breaker: CircuitBreaker | None = None) -> None:
        self.metrics = metrics
        self.breaker = breaker or CircuitBreaker()
        self._logged_at = 0.0
        self._unlogged = 0

    async def run(
        self, rt: Runtime, program: Program, now_ms: int, counters: bool, rule: RouteRule | None
    ) -> Outcome | Denial:
        cached = rt.denials.check(program, now_ms)
        if cached is not None:
            self.metrics.local_refusals += 1
            return Outcome(cached)
        if self.breaker.allow():
            started = time.perf_counter()
            try:
                outcome = await rt.store.run(program, now_ms)
            except (TimeoutError, StorageError, OSError) as exc:
                self.breaker.failure()
                timed_out = isinstance(exc, TimeoutError) or "Timeout" in str(exc)
                self._failed("storage_timeout" if timed_out else "storage_unavailable", exc)
            except BaseException:
                # Cancelled mid-call (a client gone, a renewal stopped): no verdict on the store, but a
                # probe must not stay taken, or the breaker would never close again.
                self.breaker.probing = False
                raise
            else:
                self.breaker.success()
                self.metrics.storage(time.perf_counter() - started)
                if outcome.refusal is not None:
                    rt.denials.remember(program, outcome.refusal, now_ms)
                return outcome
        else:
            self._failed("breaker_open", None)
        outage = rule.outage if rule is not None else None
        policy = outage or (rt.settings.outage_counters if counters else rt.settings.outage_rates)
        return Outcome(unchecked=True) if policy == "open" else UNAVAILABLE

    async def settle(self, rt: Runtime, program: Program, now_ms: int) -> Outcome | None:
        """Changes decided after the upstream answered. They never fail the client's request: a
        settle lost to an outage is drift, which `quota reconcile` repairs."""
        if not program:
            return None
        result = await self.run(rt, program, now_ms, True, None)
        return result if isinstance(result, Outcome) and not result.unchecked else None

    async def drain(self, rt: Runtime, drains: list[DrainOp], now_ms: int) -> None:
        # Slices of a dropped set, one short script each, so a 200,000-member room never stalls Redis.
        for op in drains:
            while True:
                outcome = await self.settle(rt, Program([op]), now_ms)
                if outcome is None or not outcome.remaining:
                    break

    def _failed(self, kind: str, exc: BaseException | None) -> None:
        self.metrics.error(kind)
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            detail = f": {exc}" if exc is not None else ""
            log.warning("quota storage: %s (%d failures since the last report)%s", kind, self._unlogged, detail)
            self._logged_at, self._unlogged = now, 0
