"""The one way quota calls its store on the request path: the local deny cache first, then the
circuit breaker, a timed call, and the outage policy when the store does not answer.

Confirms (an add's upstream answered 2xx) are not a store call of their own: they wait, per app, to
travel with the next program of the same app, and a timer sends what is left after `confirm_delay_ms`.
A write costs one store call, not two, and the claims it confirms are held at most that much longer.

Storage failures are logged, at most once per LOG_EVERY_S seconds with the count since the last
line, so an outage shows up in the logs without a line per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final

from quota.breaker import CircuitBreaker
from quota.decisions import Denial
from quota.errors import StorageError
from quota.metrics import Metrics
from quota.routes import RouteRule
from quota.store.memory import MemoryStore
from quota.store.program import BindOp, ConfirmOp, DrainOp, Outcome, Program, RateOp, Refusal

if TYPE_CHECKING:
    from quota.middleware import Runtime

UNAVAILABLE = Denial(503, "service_unavailable", "quota storage is unavailable; retry shortly")
LOG_EVERY_S = 10.0
# Binds that the store did not take are retried until it takes them, from this delay, doubling up
# to the most: a create the upstream made is counted once the store is back, however long it was
# down (its placeholder may have lapsed by then; the bind adds its id all the same). At most this
# many at once: past it a bind is dropped, logged, and `quota reconcile` repairs the count.
RETRY_FIRST_S, RETRY_MOST_S, RETRYING_MOST = 0.25, 60.0, 10_000
log = logging.getLogger("quota")
# Final: compiled code calls it from a C static, where `time.perf_counter` is two lookups by name.
perf_counter: Final = time.perf_counter


class StoreGuard:
    def __init__(self, metrics: Metrics, breaker: CircuitBreaker | None = None) -> None:
        self.metrics = metrics
        self.breaker = breaker or CircuitBreaker()
        self._last_event = 0
        # The rates of programs the store did not answer, under the `open` policy (held_here).
        self.local = MemoryStore()
        self._logged_at = 0.0
        self._unlogged = 0
        self._retries: set[asyncio.Task[None]] = set()
        self._sending: set[asyncio.Task[None]] = set()
        # App prefix -> (the runtime they were decided under, confirms waiting for a ride).
        self._confirms: dict[str, tuple[Runtime, list[ConfirmOp]]] = {}
        # App prefix -> (the task sending its confirms alone, done when they landed): the app's
        # next programs wait for it, since a store client may send what comes later first.
        self._landing: dict[str, tuple[asyncio.Task[Any] | None, asyncio.Future[None]]] = {}
        # App prefix -> the loop its flush timer runs on (a timer of a loop since closed never fires).
        self._timers: dict[str, asyncio.AbstractEventLoop] = {}

    async def run(
        self, rt: Runtime, program: Program, now_ms: int, counters: bool, rule: RouteRule | None
    ) -> Outcome | Denial:
        outcome = self.at_once(rt, program, now_ms)
        return outcome if outcome is not None else await self.call(rt, program, now_ms, counters, rule)

    def at_once(self, rt: Runtime, program: Program, now_ms: int) -> Outcome | None:
        """`run`'s outcome when it needs no await: a refusal the deny cache holds, or the memory
        store's answer when none of the app's confirms is on its way. None: await `call`."""
        cached = rt.denials.check(program, now_ms)
        if cached is not None:
            self.metrics.local_refusals += 1
            return Outcome(cached)
        memory = rt.memory
        if memory is None or (self._landing and program) or not self.breaker.allow():
            return None
        started = perf_counter()
        program = self._with_waiting(program)
        return self._answered(rt, program, memory.decide(program, now_ms), now_ms, started)

    def _answered(self, rt: Runtime, program: Program, outcome: Outcome, now_ms: int, started: float) -> Outcome:
        self.breaker.success()
        self.metrics.storage(perf_counter() - started)
        if outcome.refusal is not None:
            rt.denials.remember(program, outcome.refusal, now_ms)
        return outcome

    def _with_waiting(self, program: Program) -> Program:
        if self._confirms and program:
            waiting = self._confirms.pop(program.app_prefix(), None)
            if waiting is not None:
                return program.extended(waiting[1])
        return program

    async def call(
        self, rt: Runtime, program: Program, now_ms: int, counters: bool, rule: RouteRule | None
    ) -> Outcome | Denial:
        """`run` past the deny cache: the store called behind the breaker, the outage policy if it
        does not answer."""
        if self._landing and program:
            landing = self._landing.get(program.app_prefix())
            if landing is not None and landing[0] is not asyncio.current_task():
                await asyncio.shield(landing[1])
        if self.breaker.allow():
            started = perf_counter()
            program = self._with_waiting(program)
            try:
                memory = rt.memory
                outcome = memory.decide(program, now_ms) if memory is not None else await rt.store.run(program, now_ms)
            except (TimeoutError, StorageError, OSError) as exc:
                # Confirms carried by a failed call are not sent again: the script may have run
                # (a reply lost to a timeout), and a confirm applied twice would settle another
                # request's claim. One that is lost only leaves its claim to lapse, member kept.
                # One failure per event, not per call: the calls a stalled connection fails at once
                # share its event and count once (a probe's always counts).
                event = getattr(exc, "event", 0)
                if not event or event != self._last_event or self.breaker.probing:
                    self._last_event = event
                    self.breaker.failure()
                timed_out = isinstance(exc, TimeoutError) or "Timeout" in str(exc)
                self._failed("storage_timeout" if timed_out else "storage_unavailable", exc)
            except BaseException:
                # Cancelled mid-call (a client gone, a renewal stopped): no verdict on the store, but a
                # probe must not stay taken, or the breaker would never close again.
                self.breaker.probing = False
                raise
            else:
                return self._answered(rt, program, outcome, now_ms, started)
        else:
            self._failed("breaker_open", None)
        outage = rule.outage if rule is not None else None
        policy = outage or (rt.settings.outage_counters if counters else rt.settings.outage_rates)
        return self.held_here(program, now_ms) if policy == "open" else UNAVAILABLE

    def held_here(self, program: Program, now_ms: int) -> Outcome:
        """The `open` policy: counters go unchecked, but a program's rates are held by this process
        alone (a memory store of the guard's own), so a store that does not answer, or a client able
        to make it seem so, lets each client its rate through each process, not everything."""
        at = [i for i, op in enumerate(program.ops) if isinstance(op, RateOp)]
        if not at:
            return Outcome(unchecked=True)
        local = self.local.decide(Program([program.ops[i] for i in at]), now_ms)
        r = local.refusal
        if r is None:
            return Outcome(rates=local.rates, unchecked=True)
        # Named by its index in the request's program, as the store names it.
        return Outcome(Refusal(at[r.op_index], r.kind, r.used, r.cap, r.retry_after_ms, r.reset_ms), local.rates)

    def defer(self, rt: Runtime, program: Program) -> None:
        """Confirms (only) to send with the app's next program, or after confirm_delay_ms at the latest."""
        prefix = program.app_prefix()
        waiting = self._confirms.get(prefix)
        if waiting is None:
            self._confirms[prefix] = (rt, [op for op in program.ops if isinstance(op, ConfirmOp)])
        else:
            waiting[1].extend(op for op in program.ops if isinstance(op, ConfirmOp))
        loop = asyncio.get_running_loop()
        if self._timers.get(prefix) is not loop:
            # One timer per app at a time (not one per write): it sends whatever still waits then.
            self._timers[prefix] = loop
            loop.call_later(rt.settings.confirm_delay_ms / 1000, self._flush_soon, prefix)

    def _flush_soon(self, prefix: str) -> None:
        self._timers.pop(prefix, None)
        if prefix in self._confirms:
            task = asyncio.ensure_future(self._send_waiting(prefix))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send_waiting(self, prefix: str) -> None:
        # Taken off the list only now, as they go out: a program of the app decided between the
        # timer and this task carries them; one decided while they are on their way waits for
        # them (run). Either way no program is sent ahead of confirms that were waiting before it.
        waiting = self._confirms.pop(prefix, None)
        if waiting is None:
            return
        landed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._landing[prefix] = (asyncio.current_task(), landed)
        try:
            await self._send(*waiting)
        finally:
            del self._landing[prefix]
            landed.set_result(None)

    async def _send(self, rt: Runtime, confirms: list[ConfirmOp]) -> None:
        # A confirm reads no clock (it only settles claims): the wall clock serves.
        await self.settle(rt, Program(list(confirms)), int(time.time() * 1000))

    async def flush(self) -> None:
        """Send every confirm still waiting (at shutdown), and wait for those already on their way."""
        # Confirms a failed send loses leave their claims to lapse (members kept), as in `run`.
        waiting, self._confirms = self._confirms, {}
        for rt, confirms in waiting.values():
            await self._send(rt, confirms)
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        if self._retries:
            log.warning(
                "quota storage: %d binds still waiting for the store at shutdown; `quota reconcile` repairs the count",
                len(self._retries),
            )
            for task in self._retries:
                task.cancel()
            await asyncio.gather(*self._retries, return_exceptions=True)

    async def settle(self, rt: Runtime, program: Program, now_ms: int) -> Outcome | None:
        """Changes decided after the upstream answered. They never fail the client's request: a
        settle lost to an outage is drift, which `quota reconcile` repairs."""
        if not program:
            return None
        result = await self.run(rt, program, now_ms, True, None)
        return result if isinstance(result, Outcome) and not result.unchecked else None

    async def settle_or_retry(self, rt: Runtime, program: Program, now_ms: int) -> Outcome | None:
        """Settle; if the store did not answer, retry its binds in the background (they are
        idempotent): a create the upstream made must not go uncounted because of an outage."""
        outcome = await self.settle(rt, program, now_ms)
        if outcome is None and program:
            binds = Program([op for op in program.ops if isinstance(op, BindOp)])
            if binds and len(self._retries) >= RETRYING_MOST:
                log.warning(
                    "quota storage: %d binds dropped (too many waiting); `quota reconcile` repairs the count",
                    len(binds.ops),
                )
            elif binds:
                task = asyncio.ensure_future(self._retry(rt, binds, now_ms))
                self._retries.add(task)
                task.add_done_callback(self._retries.discard)
        return outcome

    async def _retry(self, rt: Runtime, program: Program, now_ms: int) -> None:
        # The clock of the answer, kept: the bind lands as it would have then (its placeholder, if
        # still stored, is swapped for the id, not counted twice).
        delay = RETRY_FIRST_S
        while True:
            await asyncio.sleep(delay)
            if await self.settle(rt, program, now_ms) is not None:
                return
            delay = min(delay * 2, RETRY_MOST_S)

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
