"""QuotaMiddleware: holds every request of an IM REST gateway to its app's plan.

    app.add_middleware(QuotaMiddleware, config="config/", store=store_from_url("redis://..."))

Per request: match the route, read the app's plan from the in-process snapshot, gate features
(no I/O), then one store round trip for the route's rates and counter changes. Allowed requests
pass through untouched; counter changes are kept only if the upstream answers 2xx.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quota.breaker import CircuitBreaker
from quota.config import Config, Settings, load_config
from quota.decisions import (
    BadInput,
    Denial,
    RequestPlan,
    after_ops,
    denial_for,
    gate,
    lease_op,
    plan_request,
    undo_ops,
)
from quota.denials import DenyCache
from quota.errors import StorageError
from quota.keys import rate_key
from quota.metrics import Metrics
from quota.plans import AppPlan, Directory
from quota.responses import close_websocket, send_denial
from quota.routes import Match, RouteRule
from quota.store import Store
from quota.store.memory import MemoryStore
from quota.store.program import AddOp, Outcome, Program, RateOp, ReleaseOp
from quota.tokens import resolve

FALLBACK_PREFIX = "q:{_}:"
RESPONSE_CAPTURE_LIMIT = 1 << 16
SHADOW_HEADER = b"x-quota-shadow"
UNAVAILABLE = Denial(503, "service_unavailable", "quota storage is unavailable; retry shortly")


class Runtime:
    """Everything a request needs, swapped as one object on reload so in-flight requests keep theirs."""

    def __init__(self, config: Config, store: Store, directory: Directory | None = None) -> None:
        self.config = config
        self.settings: Settings = config.settings
        self.routes = config.routes
        self.store = store
        self.directory = directory or Directory(config.matrix, config.accounts, store)
        self.trusted = config.settings.trusted_proxies
        # Resolved once per config: a short token (in quota.yaml or the environment) stops the start.
        self.tokens = resolve(config.settings.admin_token, config.settings.read_token)
        # Per runtime: a reload may change the limits the cached refusals were computed from.
        self.denials = DenyCache()


@dataclass
class _Verdict:
    """What quota decided for one request, before the upstream is called."""

    app: AppPlan
    receive: Receive
    denial: Denial | None = None
    plan: RequestPlan | None = None
    outcome: Outcome | None = None
    body: Any = None


class QuotaMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        config: Config | str | Path | None = None,
        store: Store | None = None,
        clock: Callable[[], float] = time.time,
        admin: ASGIApp | None = None,
    ) -> None:
        self.app = app
        cfg = config if isinstance(config, Config) else load_config(config)
        self.runtime = Runtime(cfg, store or MemoryStore())
        self.clock = clock
        self.admin = admin
        self.metrics = Metrics()
        self.breaker = CircuitBreaker()
        self._watcher: asyncio.Task[None] | None = None
        self._day, self._date = -1, date(1970, 1, 1)

    def reload(self, directory: str | Path | None = None) -> Config:
        """Load the config again and apply it to the next request; raises ConfigError and keeps the
        old config when the new one does not validate. In-flight requests finish under their own."""
        old = self.runtime
        cfg = load_config(directory or old.config.directory)
        new = Runtime(cfg, old.store)
        new.directory.version = -1
        self.runtime = new
        return cfg

    async def reload_async(self, directory: str | Path | None = None) -> Config:
        cfg = self.reload(directory)
        try:
            await self.runtime.directory.refresh()
        except StorageError:
            self.metrics.error("storage_unavailable")
        return cfg

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rt = self.runtime
        if self._watcher is None and rt.directory.store is not None:
            self._watcher = asyncio.ensure_future(self._watch())
        path: str = scope["path"]
        prefix = rt.settings.admin_prefix
        if self.admin is not None and (path == prefix or path.startswith(prefix + "/")):
            await self.admin({**scope, "root_path": scope.get("root_path", "") + prefix}, receive, send)
            return
        started = self.clock()
        method = "WEBSOCKET" if kind == "websocket" else scope["method"]
        match = rt.routes.match(method, path)
        if kind == "websocket":
            await self._websocket(rt, match, scope, receive, send, started)
        else:
            await self._http(rt, match, scope, receive, send, started)

    def _today(self, now_s: float) -> date:
        # The UTC date changes once a day: build it once a day, not once a request.
        day = int(now_s // 86400)
        if day != self._day:
            self._day, self._date = day, datetime.fromtimestamp(day * 86400, UTC).date()
        return self._date

    async def _watch(self) -> None:
        # The runtime may be swapped by a reload: always watch the current one's directory.
        while True:
            await asyncio.sleep(1.0)
            rt = self.runtime
            try:
                if rt.directory.store is not None and await rt.store.accounts_version() != rt.directory.version:
                    await rt.directory.refresh()
            except Exception:  # noqa: BLE001 - a background poll must outlive any storage fault
                self.metrics.error("storage_unavailable")

    def client_ip(self, rt: Runtime, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else ""
        if not rt.trusted or not peer or not _within(peer, rt.trusted):
            return peer
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                # Walk from the right: the first hop that is not a trusted proxy is the client.
                hops = [h.strip() for h in value.decode("latin-1").split(",") if h.strip()]
                for hop in reversed(hops):
                    try:
                        ipaddress.ip_address(hop)
                    except ValueError:
                        return peer
                    if not _within(hop, rt.trusted):
                        return str(hop)
                return str(hops[0]) if hops else peer
        return peer

    def _app_of(self, rt: Runtime, match: Match, today: Any) -> AppPlan | Denial | None:
        org, app = match.params.get("org"), match.params.get("app")
        if not org or not app:
            return None
        found = rt.directory.lookup(f"{org}#{app}", today)
        if found is None:
            if match.rule.name == "other":
                return None
            return Denial(404, "service_resource_not_found", f"app {org}#{app} has no plan here")
        return found

    async def _run(
        self, rt: Runtime, program: Program, now_ms: int, counters: bool, rule: RouteRule | None
    ) -> Outcome | Denial:
        """The one way quota calls its store: deny cache, breaker, timing, and the outage policy."""
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
                self.metrics.error("storage_timeout" if timed_out else "storage_unavailable")
            else:
                self.breaker.success()
                self.metrics.storage(time.perf_counter() - started)
                if outcome.refusal is not None:
                    rt.denials.remember(program, outcome.refusal, now_ms)
                return outcome
        else:
            self.metrics.error("breaker_open")
        outage = rule.outage if rule is not None else None
        policy = outage or (rt.settings.outage_counters if counters else rt.settings.outage_rates)
        return Outcome(unchecked=True) if policy == "open" else UNAVAILABLE

    async def _settle(self, rt: Runtime, program: Program, now_ms: int) -> None:
        # Settling never fails the client's request: a lost settle is drift, which reconcile repairs.
        if program:
            await self._run(rt, program, now_ms, True, None)

    async def _decide(
        self, rt: Runtime, match: Match, app: AppPlan, ip: str, receive: Receive, started: float, today: date
    ) -> _Verdict:
        rule = match.rule
        verdict = _Verdict(app, receive)
        if not app.allows(ip):
            verdict.denial = Denial(403, "forbidden_op", f"client address {ip} is not in the app's IP allowlist")
            return verdict
        verdict.denial = gate(rule, app, match.params, started)
        if verdict.denial:
            return verdict
        if rule.needs_body:
            raw, verdict.receive, too_big = await _read_body(receive, rt.settings.max_body_bytes)
            if too_big:
                limit = rt.settings.max_body_bytes
                verdict.denial = Denial(413, "request_too_large", f"request body over {limit} bytes")
                return verdict
            try:
                verdict.body = json.loads(raw) if raw else None
            except (ValueError, UnicodeDecodeError):
                verdict.denial = Denial(400, "illegal_argument", "request body is not valid JSON")
                return verdict
        now_ms = int(started * 1000)
        try:
            verdict.plan = plan_request(
                rt.routes,
                rule,
                app,
                match.params,
                verdict.body,
                ip,
                now_ms,
                lease_ttl_ms=rt.settings.lease_ttl_s * 1000,
            )
        except BadInput as exc:
            verdict.denial = Denial(400, "illegal_argument", str(exc))
            return verdict
        counted = bool(verdict.plan.adds or verdict.plan.login_user)
        result = await self._run(rt, verdict.plan.before, now_ms, counted, rule)
        if isinstance(result, Denial):
            verdict.denial = result
        elif result.refusal is not None:
            verdict.denial = denial_for(result.refusal, verdict.plan, app)
        else:
            verdict.outcome = result
        return verdict

    def _report(self, rule: RouteRule, app: AppPlan, plan: RequestPlan, outcome: Outcome) -> None:
        metrics, plan_name = self.metrics, app.plan.name
        metrics.decision(rule.name, None, plan_name, "unchecked" if outcome.unchecked else "allowed")
        for state in outcome.rates:
            if state.remaining * 5 <= state.limit:
                metrics.near(rule.name, state.name, plan_name, state.limit - state.remaining, state.limit)
        for index, size in zip(plan.adds, outcome.sizes, strict=False):
            op = plan.before.ops[index]
            if isinstance(op, AddOp) and op.limit and op.cap > 0:
                metrics.near(rule.name, op.limit, plan_name, size, op.cap)

    async def _http(
        self, rt: Runtime, match: Match, scope: Scope, receive: Receive, send: Send, started: float
    ) -> None:
        today = self._today(started)
        rule = match.rule
        app = self._app_of(rt, match, today)
        if isinstance(app, Denial):
            await send_denial(app, send, started)
            return
        ip = self.client_ip(rt, scope)
        if app is None:
            await self._fallback(rt, scope, receive, send, started, ip)
            return
        verdict = await self._decide(rt, match, app, ip, receive, started, today)
        denial = verdict.denial
        if denial is not None:
            if denial.status in (403, 429) and (rule.shadow or rt.settings.shadow):
                # Shadow: report the refusal, count nothing, let the request through and say so.
                self.metrics.decision(rule.name, denial.limit, app.plan.name, "shadow")
                note = f"{denial.status} {denial.error} {denial.limit or ''}".strip().encode()
                await self.app(scope, verdict.receive, _with_header(send, SHADOW_HEADER, note))
                return
            self.metrics.decision(rule.name, denial.limit, app.plan.name, "refused")
            await send_denial(denial, send, started)
            return
        plan, outcome = verdict.plan, verdict.outcome
        assert plan is not None and outcome is not None
        self._report(rule, app, plan, outcome)
        if not (plan.adds or plan.after) or outcome.unchecked:
            await self.app(scope, verdict.receive, send)
            return
        await self._forward_counted(rt, match, app, plan, outcome, verdict, scope, send, started)

    async def _forward_counted(
        self,
        rt: Runtime,
        match: Match,
        app: AppPlan,
        plan: RequestPlan,
        outcome: Outcome,
        verdict: _Verdict,
        scope: Scope,
        send: Send,
        started: float,
    ) -> None:
        now_ms = int(started * 1000)
        status = 0
        captured: list[bytes] = []
        capture = match.rule.reads_response

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif capture and message["type"] == "http.response.body" and 200 <= status < 300:
                if sum(map(len, captured)) < RESPONSE_CAPTURE_LIMIT:
                    captured.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, verdict.receive, send_wrapper)
        except BaseException:
            await self._settle(rt, undo_ops(plan, outcome.added), now_ms)
            raise
        if not 200 <= status < 300:
            await self._settle(rt, undo_ops(plan, outcome.added), now_ms)
            return
        if not (plan.binds or plan.after):
            return
        response: Any = None
        if capture:
            try:
                response = json.loads(b"".join(captured))
            except ValueError:
                response = None
        program = after_ops(rt.routes, plan, app, match.params, verdict.body, response, outcome.added)
        await self._settle(rt, program, now_ms)

    async def _fallback(self, rt: Runtime, scope: Scope, receive: Receive, send: Send, started: float, ip: str) -> None:
        rate = rt.settings.fallback_rate
        op = RateOp(
            rate_key(FALLBACK_PREFIX, "other", "rest_per_ip", ip), rate.amount, rate.window_ms, 1, "rest_per_ip"
        )
        result = await self._run(rt, Program([op]), int(started * 1000), False, rt.routes.fallback)
        if isinstance(result, Outcome) and result.refusal is not None:
            r = result.refusal
            description = "This request has reached api limit (rest_per_ip)"
            result = Denial(429, "reach_limit", description, "rest_per_ip", r.retry_after_ms, rate.amount, r.reset_ms)
        if isinstance(result, Denial):
            await send_denial(result, send, started)
            return
        await self.app(scope, receive, send)

    async def _websocket(
        self, rt: Runtime, match: Match, scope: Scope, receive: Receive, send: Send, started: float
    ) -> None:
        today = self._today(started)
        app = self._app_of(rt, match, today)
        if not isinstance(app, AppPlan):
            if app is None and match.rule.name == "other":
                await self.app(scope, receive, send)
                return
            await _refuse_websocket(app or Denial(404, "service_resource_not_found", "unknown app"), receive, send)
            return
        ip = self.client_ip(rt, scope)
        conn = uuid.uuid4().hex
        ttl_ms = rt.settings.lease_ttl_s * 1000
        denial = gate(match.rule, app, match.params, started)
        if denial is None and not app.allows(ip):
            denial = Denial(403, "forbidden_op", f"client address {ip} is not in the app's IP allowlist")
        if denial is None:
            try:
                plan = plan_request(
                    rt.routes,
                    match.rule,
                    app,
                    match.params,
                    None,
                    ip,
                    int(started * 1000),
                    lease_ttl_ms=ttl_ms,
                    conn_id=conn,
                )
            except BadInput as exc:
                denial = Denial(400, "illegal_argument", str(exc))
            else:
                result = await self._run(rt, plan.before, int(started * 1000), True, match.rule)
                if isinstance(result, Denial):
                    denial = result
                elif result.refusal is not None:
                    denial = denial_for(result.refusal, plan, app)
        if denial is not None:
            self.metrics.decision(match.rule.name, denial.limit, app.plan.name, "refused")
            await _refuse_websocket(denial, receive, send)
            return
        self.metrics.decision(match.rule.name, None, app.plan.name, "allowed")
        if not match.rule.connection:
            await self.app(scope, receive, send)
            return
        renew = asyncio.ensure_future(self._renew(rt, app, conn, ttl_ms))
        try:
            await self.app(scope, receive, send)
        finally:
            renew.cancel()
            release = Program([ReleaseOp(lease_op(app, today, conn, ttl_ms).online_key, conn)])
            await self._settle(rt, release, int(self.clock() * 1000))

    async def _renew(self, rt: Runtime, app: AppPlan, conn: str, ttl_ms: int) -> None:
        # Renew well before expiry; a worker killed with -9 stops renewing and its leases lapse.
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            now = self.clock()
            op = lease_op(app, self._today(now), conn, ttl_ms)
            await self._settle(rt, Program([op]), int(now * 1000))


def _within(ip: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)


def _with_header(send: Send, name: bytes, value: bytes) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return wrapped


async def _refuse_websocket(denial: Denial, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] == "websocket.connect":
        await close_websocket(denial, send)


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, Receive, bool]:
    """Read the whole body (bounded), and give the app a receive that replays it."""
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", receive, True
        chunks.append(chunk)
        more = message.get("more_body", False)
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay, False


__all__ = ["QuotaMiddleware", "Runtime"]
