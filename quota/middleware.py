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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quota.config import Config, Settings, load_config
from quota.decisions import BadInput, Denial, after_ops, denial_for, gate, lease_op, plan_request, undo_ops
from quota.errors import StorageError
from quota.keys import rate_key
from quota.plans import AppPlan, Directory
from quota.responses import close_websocket, send_denial
from quota.routes import Match
from quota.store import Store
from quota.store.memory import MemoryStore
from quota.store.program import Outcome, Program, RateOp, ReleaseOp

FALLBACK_PREFIX = "q:{_}:"
RESPONSE_CAPTURE_LIMIT = 1 << 16


class Runtime:
    """Everything a request needs, swapped as one object on reload so in-flight requests keep theirs."""

    def __init__(self, config: Config, store: Store, directory: Directory | None = None) -> None:
        self.config = config
        self.settings: Settings = config.settings
        self.routes = config.routes
        self.store = store
        self.directory = directory or Directory(config.matrix, config.accounts, store)
        self.trusted = config.settings.trusted_proxies


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
        self._watcher: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        if kind not in ("http", "websocket"):  # pragma: no cover
            await self.app(scope, receive, send)
            return
        rt = self.runtime
        if self._watcher is None and rt.directory.store is not None:
            self._watcher = asyncio.ensure_future(rt.directory.watch())
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

    def client_ip(self, rt: Runtime, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else ""
        if not rt.trusted or not peer:
            return peer
        try:
            if not any(ipaddress.ip_address(peer) in net for net in rt.trusted):
                return peer
        except ValueError:
            return peer
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                # Walk from the right: the first hop that is not a trusted proxy is the client.
                hops = [h.strip() for h in value.decode("latin-1").split(",") if h.strip()]
                for hop in reversed(hops):
                    try:
                        addr = ipaddress.ip_address(hop)
                    except ValueError:
                        return peer
                    if not any(addr in net for net in rt.trusted):
                        return str(hop)
                return hops[0] if hops else peer
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
        self, rt: Runtime, program: Program, now_ms: int, counters: bool, rule_outage: str | None
    ) -> Outcome | Denial:
        try:
            return await rt.store.run(program, now_ms)
        except (TimeoutError, StorageError, OSError):
            policy = rule_outage or (rt.settings.outage_counters if counters else rt.settings.outage_rates)
            if policy == "open":
                return Outcome()
            return Denial(503, "service_unavailable", "quota storage is unavailable; retry shortly")

    async def _http(
        self, rt: Runtime, match: Match, scope: Scope, receive: Receive, send: Send, started: float
    ) -> None:
        now = datetime.fromtimestamp(started, UTC)
        rule = match.rule
        app = self._app_of(rt, match, now.date())
        if isinstance(app, Denial):
            await send_denial(app, send, started)
            return
        ip = self.client_ip(rt, scope)
        if app is None:
            await self._fallback(rt, scope, receive, send, started, ip)
            return
        if not app.allows(ip):
            await send_denial(
                Denial(403, "forbidden_op", f"client address {ip} is not in the app's IP allowlist"), send, started
            )
            return
        denial = gate(rule, app, match.params, now)
        if denial:
            await send_denial(denial, send, started)
            return
        body: Any = None
        if rule.needs_body:
            raw, receive, too_big = await _read_body(receive, rt.settings.max_body_bytes)
            if too_big:
                await send_denial(
                    Denial(413, "request_too_large", f"request body over {rt.settings.max_body_bytes} bytes"),
                    send,
                    started,
                )
                return
            try:
                body = json.loads(raw) if raw else None
            except (ValueError, UnicodeDecodeError):
                await send_denial(Denial(400, "illegal_argument", "request body is not valid JSON"), send, started)
                return
        now_ms = int(started * 1000)
        try:
            plan = plan_request(
                rt.routes, rule, app, match.params, body, ip, now_ms, lease_ttl_ms=rt.settings.lease_ttl_s * 1000
            )
        except BadInput as exc:
            await send_denial(Denial(400, "illegal_argument", str(exc)), send, started)
            return
        counted = bool(plan.adds or plan.login_user)
        result = await self._run(rt, plan.before, now_ms, counted, rule.outage)
        if isinstance(result, Denial):
            await send_denial(result, send, started)
            return
        if result.refusal is not None:
            await send_denial(denial_for(result.refusal, plan, app), send, started)
            return
        if not (plan.adds or plan.after):
            await self.app(scope, receive, send)
            return

        status = 0
        captured: list[bytes] = []
        capture = bool(plan.binds) or any(
            c.owner.source == "response" or (c.members and c.members.source == "response") for c in plan.after
        )

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif capture and message["type"] == "http.response.body" and 200 <= status < 300:
                if sum(map(len, captured)) < RESPONSE_CAPTURE_LIMIT:
                    captured.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            await self._settle(rt, undo_ops(plan, result.added), now_ms)
            raise
        if 200 <= status < 300:
            response: Any = None
            if capture:
                try:
                    response = json.loads(b"".join(captured))
                except ValueError:
                    response = None
            await self._settle(rt, after_ops(rt.routes, plan, app, match.params, body, response, result.added), now_ms)
        else:
            await self._settle(rt, undo_ops(plan, result.added), now_ms)

    async def _settle(self, rt: Runtime, program: Program, now_ms: int) -> None:
        # Settling never fails the client's request: a lost settle is drift, which reconcile repairs.
        if program:
            try:
                await rt.store.run(program, now_ms)
            except (TimeoutError, StorageError, OSError):
                pass

    async def _fallback(self, rt: Runtime, scope: Scope, receive: Receive, send: Send, started: float, ip: str) -> None:
        rate = rt.settings.fallback_rate
        op = RateOp(
            rate_key(FALLBACK_PREFIX, "other", "rest_per_ip", ip), rate.amount, rate.window_ms, 1, "rest_per_ip"
        )
        result = await self._run(rt, Program([op]), int(started * 1000), False, None)
        if isinstance(result, Outcome) and result.refusal is not None:
            r = result.refusal
            result = Denial(
                429,
                "reach_limit",
                "This request has reached api limit (rest_per_ip)",
                "rest_per_ip",
                r.retry_after_ms,
                rate.amount,
                r.reset_ms,
            )
        if isinstance(result, Denial):
            await send_denial(result, send, started)
            return
        await self.app(scope, receive, send)

    async def _websocket(
        self, rt: Runtime, match: Match, scope: Scope, receive: Receive, send: Send, started: float
    ) -> None:
        now = datetime.fromtimestamp(started, UTC)
        app = self._app_of(rt, match, now.date())
        denial: Denial | None = app if isinstance(app, Denial) else None
        if app is None and match.rule.name != "other":
            denial = Denial(404, "service_resource_not_found", "unknown app")
        if not isinstance(app, AppPlan):
            if denial is None:
                await self.app(scope, receive, send)
                return
            await _refuse_websocket(denial, receive, send)
            return
        ip = self.client_ip(rt, scope)
        denial = gate(match.rule, app, match.params, now)
        if denial is None and not app.allows(ip):
            denial = Denial(403, "forbidden_op", f"client address {ip} is not in the app's IP allowlist")
        conn = uuid.uuid4().hex
        ttl_ms = rt.settings.lease_ttl_s * 1000
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
                result = await self._run(rt, plan.before, int(started * 1000), True, match.rule.outage)
                if isinstance(result, Denial):
                    denial = result
                elif result.refusal is not None:
                    denial = denial_for(result.refusal, plan, app)
        if denial is not None:
            await _refuse_websocket(denial, receive, send)
            return
        if not match.rule.connection:
            await self.app(scope, receive, send)
            return
        renew = asyncio.ensure_future(self._renew(rt, app, conn, ttl_ms))
        try:
            await self.app(scope, receive, send)
        finally:
            renew.cancel()
            release = Program([ReleaseOp(lease_op(app, now.date(), conn, ttl_ms).online_key, conn)])
            await self._settle(rt, release, int(self.clock() * 1000))

    async def _renew(self, rt: Runtime, app: AppPlan, conn: str, ttl_ms: int) -> None:
        # Renew well before expiry; a worker killed with -9 stops renewing and its leases lapse.
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            now = self.clock()
            op = lease_op(app, datetime.fromtimestamp(now, UTC).date(), conn, ttl_ms)
            await self._settle(rt, Program([op]), int(now * 1000))


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
