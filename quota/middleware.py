"""QuotaMiddleware: holds every request of an IM REST gateway to its app's plan.

    app.add_middleware(QuotaMiddleware, config="config/", store=store_from_url("redis://..."))

Per request, top-down in `_http`: bound the URL, match the route, find the app and its plan, refuse
what needs no I/O (unknown app, unnamed path, allowlist, frozen account, feature, retention, bad
ids), read the body where a counted route needs it, then one store round trip for the route's rates
and reservations. Allowed requests pass through untouched, their bodies bounded as they stream;
reservations are kept only if the upstream answers 2xx and undone otherwise (`_forward_settled`).
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quota.clients import ClientAddress
from quota.config import Config, Settings, load_config
from quota.deadlines import BodyDeadlines, BodyTimeout
from quota.decisions import (
    BadInput,
    Denial,
    RequestPlan,
    admit,
    after_ops,
    confirm_ops,
    denial_for,
    parse_body,
    path_denial,
    plan_request,
    renew_program,
    undo_ops,
    unreadable_body,
    url_fits,
)
from quota.denials import DenyCache
from quota.errors import StorageError
from quota.guard import StoreGuard
from quota.keys import rate_key
from quota.lockout import Lockout
from quota.metrics import Metrics, decision_key
from quota.plans import AppPlan, Directory
from quota.responses import send_denial
from quota.routes import Match, RouteRule
from quota.sockets import SocketHandler
from quota.store import Store
from quota.store.memory import MemoryStore
from quota.store.program import AddOp, ConfirmOp, Outcome, Program, RateOp, RateState
from quota.tokens import bearer, resolve

FALLBACK_PREFIX = "q:{_}:"
RESPONSE_CAPTURE_LIMIT = 1 << 16
SHADOW_HEADER = b"x-quota-shadow"
NOT_FOUND = "service_resource_not_found"
# Gateway Timeout: the answer of a server that heard nothing back from its own upstream (`quota
# proxy` sends it once the request was on its way). Whether the change was made is unknown, so
# what was counted for it is kept, not undone: counts may drift up, repaired by `quota reconcile`,
# never down, which a client could arrange with a slow gateway to pass a cap.
UNKNOWN_OUTCOME = 504


class Runtime:
    """Everything a request needs, swapped as one object on reload so in-flight requests keep theirs."""

    def __init__(self, config: Config, store: Store, directory: Directory | None = None) -> None:
        self.config = config
        self.settings: Settings = config.settings
        self.routes = config.routes
        self.store = store
        # The embedded store answers without I/O: called directly, not awaited (a subclass, such as
        # a test's store with faults, may await in `run`, and is awaited).
        self.memory = store if type(store) is MemoryStore else None
        self.directory = directory or Directory(config.matrix, config.accounts, store)
        settings = config.settings
        self.clients = ClientAddress(settings.trusted_proxies, settings.ipv6_prefix, settings.trusted_unix)
        self.ids = config.settings.identifiers
        # What every request reads of the settings, held natively: Settings is a plain dataclass,
        # and reading its attributes from compiled code is a dictionary lookup each.
        self.admin_prefix = config.settings.admin_prefix
        self.admin_under = config.settings.admin_prefix + "/"
        self.max_url_bytes = config.settings.max_url_bytes
        self.max_body_bytes = config.settings.max_body_bytes
        self.body_timeout_s = config.settings.body_timeout_s
        self.rate_headers = config.settings.ratelimit_headers
        self.shadow = config.settings.shadow
        # Resolved once per config: a short token (in quota.yaml or the environment) stops the start.
        self.tokens = resolve(config.settings.admin_token, config.settings.read_token)
        # Per runtime: a reload may change the limits the cached refusals were computed from.
        self.denials = DenyCache()


class _Verdict:
    """What quota decided for one request, before the upstream is called."""

    def __init__(self, receive: Receive, params: dict[str, str]) -> None:
        self.receive = receive
        self.params = params
        self.denial: Denial | None = None
        self.plan: RequestPlan | None = None
        self.outcome: Outcome | None = None
        self.body: Any = None
        self.body_read = False


def _judged(verdict: _Verdict, result: Outcome | Denial, app: AppPlan) -> _Verdict:
    if isinstance(result, Denial):
        verdict.denial = result
    elif result.refusal is not None:
        assert verdict.plan is not None
        verdict.denial = denial_for(result.refusal, verdict.plan, app)
    else:
        verdict.outcome = result
    return verdict


# Lanes, and the routes memoised beside them (_route): at most this many a day and directory, each
# on a path of at most this many characters. Past the bound they are emptied, as the shared plans
# are: a client naming a fresh path on every request only ever takes the long way.
LANES: Final = 1024
LANE_PATH: Final = 256


class _Lane:
    """What a request's checks decided before its store call, for a route whose plan its path and
    client decide (_laned): its rule, app, canonical ids and (shared) plan of store ops. All of it
    depends on the method, path, raw path and client address alone, and on the day's apps: a lane
    lives in the directory's memo of today (Directory.lanes), emptied with its apps. Retention, the
    one check that reads the clock, never takes a lane."""

    __slots__ = ("rule", "app", "params", "plan", "metrics", "allowed")

    def __init__(self, rule: RouteRule, app: AppPlan, verdict: _Verdict, metrics: Metrics) -> None:
        assert verdict.plan is not None
        self.rule, self.app, self.params, self.plan = rule, app, verdict.params, verdict.plan
        # Where its allowed requests are counted: a slot, no key built and hashed per request; of
        # these metrics only (others attached since count them the long way).
        self.metrics, self.allowed = metrics, metrics.slot(decision_key(rule.name, None, app.plan.name, "allowed"))


def _laned(rule: RouteRule) -> bool:
    """A route whose requests take lanes once their checks pass and their store ops are built: the
    plan of such a request is the same for every request of its path and client. Rates alone; or
    adds alone whose ids all come from the path (a friend added, a group joined), which nothing
    changes once built: their settling reads the plan (confirms, undos) and never adds to it, as a
    removal's or a create's does. Such a request takes its lane only when its framing says it has
    no body (_http): one with a body still to come reads it before it reserves anything."""
    if rule.retention is not None or rule.admin or rule.refuse or rule.method == "WEBSOCKET":
        return False
    if rule.rates_only:
        return True
    by_path = not (rule.needs_body or rule.reads_response or rule.login or rule.connection)
    return by_path and bool(rule.changes) and all(change.op == "add" for change in rule.changes)


def _keep(lanes: dict[Any, Any], key: Any, value: Any) -> None:
    """A lane or a memoised route kept for the day; past LANES, all of them are emptied first."""
    if len(lanes) >= LANES:
        lanes.clear()
    lanes[key] = value


def _fits(scope: dict[str, Any], rt: Runtime, declared: int | None) -> bool:
    """What the lane does not hold: the query's share of the URL's size, and the declared body."""
    return url_fits(scope, rt.max_url_bytes) and (declared is None or declared <= rt.max_body_bytes)


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
        self.guard = StoreGuard(self.metrics)
        self.sockets = SocketHandler(self)
        # Wrong admin tokens per client, wherever one is given: the admin API, the dashboard's
        # sign-in and an app's admin routes share one count, so no door guesses past another's.
        self.lockout = Lockout(lambda: self.runtime.settings.wrong_tokens, lambda: self.clock())
        self.deadlines = BodyDeadlines(lambda: self.runtime.body_timeout_s)
        self.renewals = _Renewals(self)
        self._watcher: asyncio.Task[None] | None = None
        # The first read of the stored accounts, and whether it is done (_first_load).
        self._loading: asyncio.Future[None] | None = None
        self._loaded = False
        # The usage-threshold webhooks, when configured (quota/serve.py): held for their flush.
        self.notifier: Any = None
        # The UTC day of the last request, as the seconds it spans: a clock inside them is today.
        self._day_starts, self._day_ends, self._date = 0.0, 0.0, date(1970, 1, 1)

    @property
    def breaker(self) -> Any:
        return self.guard.breaker

    def reload(self, directory: str | Path | None = None) -> Config:
        """Load the config again and apply it to the next request; raises ConfigError and keeps the
        old config when the new one does not validate. In-flight requests finish under their own."""
        old = self.runtime
        cfg = load_config(directory or old.config.directory)
        new = Runtime(cfg, old.store)
        # The stored changes known so far hold from the first request: the new runtime does not
        # serve accounts.yaml alone while it reads them again (reload_async, the watcher).
        new.directory.carry(old.directory, str(cfg.directory / "accounts.yaml"))
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
        # Narrowed to str: compiled, a comparison of text, not a generic one of objects.
        if not isinstance(kind, str) or kind not in ("http", "websocket"):
            await self.app(scope, self._on_shutdown(receive) if kind == "lifespan" else receive, send)
            return
        # Every server hands a dict; typed as one, compiled code reads it without a method call.
        # Any other mapping is copied once, and the copy goes on to the app.
        http: dict[str, Any] = scope if isinstance(scope, dict) else dict(scope)
        rt = self.runtime
        if not self._loaded and rt.directory.store is not None:
            await self._first_load()
        path: str = http["path"]
        prefix = rt.admin_prefix
        if self.admin is not None and (path == prefix or path.startswith(rt.admin_under)):
            await self.admin({**http, "root_path": http.get("root_path", "") + prefix}, receive, send)
            return
        started = self.clock()
        if kind == "websocket":
            await self.sockets(rt, http, receive, send, started)
        else:
            await self._http(rt, http, receive, send, started)

    async def _first_load(self) -> None:
        """Nothing is served before the stored account changes (a freeze, an allowlist, a plan set
        through the admin API or CLI) are read: a process just started would serve accounts.yaml
        alone until its watcher's first poll. One read for every request waiting on it; if the
        store does not answer, accounts.yaml serves and the watcher reads them once it does."""
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
            self._watcher = asyncio.ensure_future(self._watch())
        await asyncio.shield(self._loading)

    async def _load(self) -> None:
        try:
            rt = None
            # A reload during the read carried an overlay not read yet: read the new runtime's too.
            while rt is not self.runtime:
                rt = self.runtime
                await rt.directory.refresh()
        except StorageError:
            self.metrics.error("storage_unavailable")
        finally:
            self._loaded = True

    def _on_shutdown(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        return wrapped

    async def shutdown(self) -> None:
        """What a server's lifespan shutdown runs (call it when embedding without lifespan): the
        accounts watcher stopped and waited for, so no store call of it outlives the store, then the
        confirms still waiting for a ride sent, then the threshold webhooks still on their way."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.guard.flush()
        if self.notifier is not None:
            # Deliveries in flight get a bounded wait (quota/webhooks.py), then are dropped.
            await self.notifier.close()

    def today(self, now_s: float) -> date:
        # The UTC date changes once a day: build it once a day, not once a request (two float
        # comparisons, where a floor division costs a call to fmod).
        if not self._day_starts <= now_s < self._day_ends:
            day = int(now_s // 86400)
            self._day_starts, self._day_ends = day * 86400.0, (day + 1) * 86400.0
            self._date = datetime.fromtimestamp(day * 86400, UTC).date()
        return self._date

    async def _watch(self) -> None:
        # The runtime may be swapped by a reload: always watch the current one's directory.
        task = asyncio.current_task()
        # Python 3.11's wait_for (redis-py sends through it) can swallow a cancellation landing as
        # its send completes; the task's count of cancel requests still says it is being stopped.
        while task is None or not task.cancelling():
            await asyncio.sleep(1.0)
            rt = self.runtime
            try:
                if rt.directory.store is not None and await rt.store.accounts_version() != rt.directory.version:
                    await rt.directory.refresh()
            except Exception:  # noqa: BLE001 - a background poll must outlive any storage fault
                self.metrics.error("storage_unavailable")

    def app_of(self, rt: Runtime, match: Match, today: date) -> AppPlan | Denial | None:
        """The app a path is under (None: under no app), or the refusal of an unknown one."""
        org, app = match.params.get("org"), match.params.get("app")
        if not org or not app:
            return None
        found = rt.directory.lookup(f"{org}#{app}", today)
        if found is None:
            return Denial(404, NOT_FOUND, f"app {org[:64]}#{app[:64]} has no plan here")
        return found

    async def _http(self, rt: Runtime, scope: dict[str, Any], receive: Receive, send: Send, started: float) -> None:
        declared, framed = _framing(scope)
        address = rt.clients.address(scope)
        today = self.today(started)
        # A request on a lane skips the checks its path already passed today (see _laned).
        lanes = rt.directory.lanes(today)
        path: str = scope["path"]
        lane_key = (scope["method"], path, scope.get("raw_path"), address)
        lane: _Lane | None = lanes.get(lane_key)
        # Where a route that takes no lane is memoised once its checks pass (_route): not yet memoised.
        route_key: Any = None
        if lane is not None and _fits(scope, rt, declared) and (not lane.rule.holds or (framed and not declared)):
            rule, app = lane.rule, lane.app
            decided = self._on_lane(rt, lane, receive, started)
        else:
            key = (scope["method"], path, scope.get("raw_path"))
            memoised: tuple[Match, AppPlan] | None = lanes.get(key)
            routed = self._route(rt, scope, declared, today, memoised)
            if isinstance(routed, Denial):
                await send_denial(routed, send, started)
                return
            if routed is None:
                refused = await self.fallback_denial(rt, rt.clients.key(address), started)
                if refused is not None:
                    await send_denial(refused, send, started)
                    return
                await _forward(self.app, scope, receive, send, rt.max_body_bytes, framed, started)
                return
            match, app = routed
            rule = match.rule
            if memoised is None:
                route_key = key
            # A WebSocket route named as an HTTP method would hold an online slot with no connection.
            socket_only = rule.method == "WEBSOCKET"
            if rule.refuse or socket_only:
                await send_denial(Denial(404, NOT_FOUND, "no such API"), send, started)
                return
            if rule.admin:
                refused = self._admin_denial(rt, scope, address)
                if refused is not None:
                    await send_denial(refused, send, started)
                    return
                await self.app(scope, receive, send)
                return
            # No body to wait for before a reservation: HTTP/1 framing says there is none (no length,
            # or a length of 0), as _Bounded already trusts. A route that reads its body reads it
            # whatever the framing says: what quota counts is what the upstream is handed.
            empty = framed and not declared
            # Read only for a route that counts from its body; judged once the body is in.
            media = unreadable_body(scope["headers"]) if rule.needs_body else None
            decided = self._decide(rt, match, app, address, receive, started, today, empty, media)
        verdict = decided if isinstance(decided, _Verdict) else await decided
        # Memoised only once its checks passed and its store ops were built: requests refused before
        # (an unknown path, a frozen account, an address off the allowlist) never empty the lanes.
        if lane is None and verdict.plan is not None and len(path) <= LANE_PATH:
            if _laned(rule):
                _keep(lanes, lane_key, _Lane(rule, app, verdict, self.metrics))
            elif route_key is not None:
                _keep(lanes, route_key, (match, app))
        # Its body bounded by its framing, or read whole already: nothing to count as it streams.
        checked = verdict.body_read or framed
        denial = verdict.denial
        if denial is not None:
            if denial.status in (403, 429) and (rule.shadow or rt.shadow):
                # Shadow: report the refusal, count nothing, let the request through and say so.
                self.metrics.decision(rule.name, denial.limit, app.plan.name, "shadow", app=app.appkey, now=started)
                note = f"{denial.status} {denial.error} {denial.limit or ''}".strip().encode()
                shadowed = _with_header(send, SHADOW_HEADER, note)
                await _forward(self.app, scope, verdict.receive, shadowed, rt.max_body_bytes, checked, started)
                return
            self.metrics.decision(rule.name, denial.limit, app.plan.name, "refused", app=app.appkey, now=started)
            await send_denial(denial, send, started)
            return
        plan, outcome = verdict.plan, verdict.outcome
        assert plan is not None and outcome is not None
        self._report(rule, app, plan, outcome, started, lane)
        rate = _tightest(outcome.rates) if rt.rate_headers and outcome.rates else None
        if not plan.settles or outcome.unchecked:
            sender = send if rate is None else _RateHeaders(send, rate)
            await _forward(self.app, scope, verdict.receive, sender, rt.max_body_bytes, checked, started)
            return
        bounded = _Bounded(verdict.receive, rt.max_body_bytes, checked)
        await self._forward_settled(rt, rule, app, plan, outcome, verdict, bounded, scope, send, rate, started)

    def _route(
        self,
        rt: Runtime,
        scope: dict[str, Any],
        declared: int | None,
        today: date,
        memoised: tuple[Match, AppPlan] | None,
    ) -> Denial | tuple[Match, AppPlan] | None:
        """The route and app of a request, or its refusal (an odd or long URL, a body declared too
        large, an unknown app); None when its path is under no app.

        `memoised`: what an earlier request of the same method, path and raw path found today (the
        path checks, match and lookup read nothing else), kept beside the lanes by `_http` once its
        checks passed, for a route that takes no lane (a message sent, a user registered). The query's
        share of the URL and the declared body are checked every time."""
        if memoised is None or not url_fits(scope, rt.max_url_bytes):
            odd = path_denial(scope, rt.max_url_bytes)
            if odd is not None:
                return odd
        if declared is not None and declared > rt.max_body_bytes:
            return _too_large(rt.max_body_bytes)
        if memoised is not None:
            return memoised
        match = rt.routes.match(scope["method"], scope["path"])
        app = self.app_of(rt, match, today)
        if app is None or isinstance(app, Denial):
            return app
        return match, app

    def _on_lane(self, rt: Runtime, lane: _Lane, receive: Receive, started: float) -> _Verdict | Awaitable[_Verdict]:
        verdict = _Verdict(receive, lane.params)
        verdict.plan = lane.plan
        return self._run(rt, lane.rule, lane.app, verdict, lane.plan, int(started * 1000))

    def _admin_denial(self, rt: Runtime, scope: dict[str, Any], address: str) -> Denial | None:
        """An app's admin route (the gateway's state) answers as if it did not exist without the
        admin token; each wrong or missing token counts toward the client's lockout."""
        who = rt.clients.key(address)
        refusal = self.lockout.refusal(who)
        if refusal is not None:
            wait, text = refusal
            return Denial(429, "reach_limit", text, None, wait * 1000, self.lockout.rate().amount, wait * 1000)
        if not rt.tokens.grants(_authorization(scope), "admin"):
            self.lockout.failed(who)
            return Denial(404, NOT_FOUND, "no such API")
        return None

    def _decide(
        self,
        rt: Runtime,
        match: Match,
        app: AppPlan,
        address: str,
        receive: Receive,
        started: float,
        today: date,
        empty: bool,
        media: str | None = None,
    ) -> _Verdict | Awaitable[_Verdict]:
        """The verdict, at once when nothing needs an await (no body to read, a store that answers
        at once); else the awaitable of it: most reads cost no coroutine of their own. `empty`: the
        request's framing says it has no body: a route that holds a reservation but reads no body
        has nothing to wait for before it reserves. `media`: why its Content-Type does not say
        JSON in UTF-8 (None when it does), a 415 if a body comes."""
        rule = match.rule
        verdict = _Verdict(receive, match.params)
        admitted = admit(rule, app, match.params, address, started, rt.ids)
        if isinstance(admitted, Denial):
            verdict.denial = admitted
            return verdict
        verdict.params = admitted
        if rule.needs_body or (rule.holds and not empty):
            return self._decide_on_body(rt, rule, app, address, verdict, started, today, media)
        return self._planned(rt, rule, app, address, verdict, started, today)

    async def _decide_on_body(
        self,
        rt: Runtime,
        rule: RouteRule,
        app: AppPlan,
        address: str,
        verdict: _Verdict,
        started: float,
        today: date,
        media: str | None,
    ) -> _Verdict:
        # Read before anything is reserved: a slow body never outlives a reservation, nor its deadline.
        try:
            raw, verdict.receive, too_big = await self.deadlines.within(_read_body(verdict.receive, rt.max_body_bytes))
        except BodyTimeout:
            verdict.denial = Denial(408, "request_timeout", f"request body not in within {rt.body_timeout_s} s")
            return verdict
        verdict.body_read = True
        if too_big:
            verdict.denial = _too_large(rt.max_body_bytes)
            return verdict
        if rule.needs_body:
            if raw and media is not None:
                verdict.denial = Denial(415, "illegal_argument", media)
                return verdict
            try:
                verdict.body = parse_body(raw)
            except BadInput as exc:
                verdict.denial = Denial(400, "illegal_argument", str(exc))
                return verdict
        # The store counts the request when its body is in, not when its headers were: a client
        # holding its bodies back would date its hits in windows long gone, each found empty. The
        # day stays the headers': the app and plan it was admitted under, the day it was active.
        planned = self._planned(rt, rule, app, address, verdict, self.clock(), today)
        return planned if isinstance(planned, _Verdict) else await planned

    def _planned(
        self, rt: Runtime, rule: RouteRule, app: AppPlan, address: str, verdict: _Verdict, started: float, today: date
    ) -> _Verdict | Awaitable[_Verdict]:
        now_ms = int(started * 1000)
        settings = rt.settings
        try:
            plan = verdict.plan = plan_request(
                rt.routes,
                rule,
                app,
                verdict.params,
                verdict.body,
                rt.clients.key(address),
                now_ms,
                ids=rt.ids,
                lease_ttl_ms=settings.lease_ttl_s * 1000,
                reservation_ttl_ms=settings.reservation_ttl_s * 1000,
                today=today,
            )
        except BadInput as exc:
            verdict.denial = Denial(400, "illegal_argument", str(exc))
            return verdict
        return self._run(rt, rule, app, verdict, plan, now_ms)

    def _run(
        self, rt: Runtime, rule: RouteRule, app: AppPlan, verdict: _Verdict, plan: RequestPlan, now_ms: int
    ) -> _Verdict | Awaitable[_Verdict]:
        # The guard's two halves, not `run`: a store that answers at once costs no coroutine.
        result = self.guard.at_once(rt, plan.before, now_ms)
        if result is None:
            return self._asked(rt, rule, app, verdict, plan, now_ms)
        return _judged(verdict, result, app)

    async def _asked(
        self, rt: Runtime, rule: RouteRule, app: AppPlan, verdict: _Verdict, plan: RequestPlan, now_ms: int
    ) -> _Verdict:
        return _judged(verdict, await self.guard.call(rt, plan.before, now_ms, plan.writes, rule), app)

    def _report(
        self, rule: RouteRule, app: AppPlan, plan: RequestPlan, outcome: Outcome, now: float, lane: _Lane | None
    ) -> None:
        metrics = self.metrics
        if lane is not None and lane.metrics is metrics and not outcome.unchecked:
            metrics.tick(lane.allowed)
        else:
            metrics.decision(rule.name, None, app.plan.name, "unchecked" if outcome.unchecked else "allowed")
        for state in outcome.rates:
            if state.remaining * 5 <= state.limit:
                metrics.near(rule.name, state.name, app.plan.name, state.limit - state.remaining, state.limit)
        # A fail-open outcome reports no sizes: stop at the shorter (indexes: see decisions.undo_ops).
        for i in range(min(len(plan.adds), len(outcome.sizes))):
            op, size = plan.before.ops[plan.adds[i]], outcome.sizes[i]
            if not isinstance(op, AddOp):
                continue
            limit, cap = op.limit, op.cap
            if limit == "included_dau" and cap < 0:
                # Plans that bill overage have no DAU cap, but their included DAU is still the mark.
                cap = app.plan.price.included_dau
            if limit and cap > 0:
                plan_name = app.plan.name
                metrics.near(rule.name, limit, plan_name, size, cap)
                for listener in metrics.listeners:
                    listener(app.appkey, app.account.name, plan_name, limit, size, cap, now)

    async def _forward_settled(
        self,
        rt: Runtime,
        rule: RouteRule,
        app: AppPlan,
        plan: RequestPlan,
        outcome: Outcome,
        verdict: _Verdict,
        bounded: _Bounded,
        scope: Scope,
        send: Send,
        rate: RateState | None,
        started: float,
    ) -> None:
        # One wrapper on the answer, not two: it watches the status and adds the RateLimit headers.
        capture = _Capture(send, rule.reads_response, rate)
        if rule.reads_response:
            # The answer must be readable: ask the upstream not to compress it.
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]}
        # A removal is held too, even with nothing held yet: a batch deletion marks the users its
        # answer names (decisions.after_ops), and those marks live until its drain is done.
        ticket = self.renewals.hold(rt, plan) if plan.held or plan.after else 0
        # No await inside the except clause: mypyc's compiled coroutine loses the exception it
        # re-raises across one (a segfault when a client goes away); hold it and raise it after.
        failed: BaseException | None = None
        try:
            await bounded.forward(self.app, scope, capture, started)
        except BaseException as exc:
            failed = exc
        # Renewed until settled, not only until answered: a removal's tombstones must outlive the
        # drain of the sets it dropped.
        try:
            # The client went away or the upstream raised: an answer that had already started as a
            # 2xx was the upstream's success, so it is settled (confirmed here), not undone.
            if not self._confirmed(rt, rule, plan, outcome, capture, bounded):
                settling = self._settle_answer(rt, rule, app, plan, outcome, verdict, capture, bounded)
                if failed is None and not plan.tombstones:
                    await settling
                else:
                    # A removal is settled whatever happens to its request meanwhile (a server that
                    # cancels on disconnect, a shutdown): its drain done and its tombstones lifted.
                    await asyncio.shield(settling)
        finally:
            self.renewals.release(ticket)
        if failed is not None:
            raise failed

    def _confirmed(
        self, rt: Runtime, rule: RouteRule, plan: RequestPlan, outcome: Outcome, capture: _Capture, bounded: _Bounded
    ) -> bool:
        """Whether a kept request whose changes are adds alone was settled here, with no await:
        their confirms are all that settles them, and they ride with a later program."""
        if bounded.cut or plan.binds or plan.after or plan.tombstones:
            return False
        if not _kept(rule, capture.status):
            return False
        confirms = confirm_ops(plan, outcome.added)
        if confirms:
            self.guard.defer(rt, Program([*confirms]))
        return True

    async def _settle_answer(
        self,
        rt: Runtime,
        rule: RouteRule,
        app: AppPlan,
        plan: RequestPlan,
        outcome: Outcome,
        verdict: _Verdict,
        capture: _Capture,
        bounded: _Bounded,
    ) -> None:
        """What `_confirmed` did not settle: an undo, or a settlement with binds, removals or
        tombstones."""
        # The clock of the answer, not of the request: what this writes with a deadline (a batch
        # deletion's marks) must last from now, however long the upstream took.
        now_ms = int(self.clock() * 1000)
        if bounded.cut or not _kept(rule, capture.status):
            await self.guard.settle(rt, undo_ops(plan, outcome.added), now_ms)
            return
        answered = 200 <= capture.status < 300
        ttl_ms = rt.settings.reservation_ttl_s * 1000
        response = capture.json() if answered else None
        done = after_ops(
            rt.routes, plan, app, verdict.params, verdict.body, response, outcome.added, rt.ids, ttl_ms, answered
        )
        if done.unbound:
            self.metrics.error("unbound_create")
        if done.program and all(isinstance(op, ConfirmOp) for op in done.program.ops) and not done.drains:
            self.guard.defer(rt, done.program)
            return
        settled = await self.guard.settle_or_retry(rt, done.program, now_ms)
        await self.guard.drain(rt, done.drains, now_ms)
        clears = done.clears + (done.unmarks if settled is not None and settled.refusal is None else [])
        if clears:
            await self.guard.settle(rt, Program(clears), now_ms)

    async def fallback_denial(self, rt: Runtime, who: str, started: float) -> Denial | None:
        """A path under no app is held to the general per-client rate: its refusal, or None."""
        rate = rt.settings.fallback_rate
        op = RateOp(
            rate_key(FALLBACK_PREFIX, "other", "rest_per_ip", who), rate.amount, rate.window_ms, 1, "rest_per_ip"
        )
        result = await self.guard.run(rt, Program([op]), int(started * 1000), False, rt.routes.fallback)
        if isinstance(result, Denial):
            return result
        r = result.refusal
        if r is None:
            return None
        description = "This request has reached api limit (rest_per_ip)"
        return Denial(429, "reach_limit", description, "rest_per_ip", r.retry_after_ms, rate.amount, r.reset_ms)


class _Renewals:
    """Reservations and claims live as long as their request: every request in flight has them
    renewed each third of their life. One timer for all of them, not one per request: most requests
    end long before it fires, and a timer per request costs a heap push and pop on every write."""

    def __init__(self, mw: QuotaMiddleware) -> None:
        self.mw = mw
        self.held: dict[int, tuple[Runtime, RequestPlan]] = {}
        self.handle: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # The period the timer was last set with: a hold with a shorter one may need it sooner.
        self.period = 0.0
        self.tasks: set[asyncio.Future[Any]] = set()
        self._next = 0

    def hold(self, rt: Runtime, plan: RequestPlan) -> int:
        self._next += 1
        self.held[self._next] = (rt, plan)
        loop = asyncio.get_running_loop()
        period = rt.settings.reservation_ttl_s / 3
        # A first request, a new loop, or one whose life is shorter than the timer's next tick
        # allows (a reload shortened reservation_ttl_s): the timer is set again, sooner. Only a
        # shorter period can make a tick late, so the clock is read only then.
        handle = self.handle
        if handle is None or self.loop is not loop or (period < self.period and loop.time() + period < handle.when()):
            if handle is not None:
                handle.cancel()
            self.loop = loop
            self._set(loop, period)
        return self._next

    def release(self, ticket: int) -> None:
        self.held.pop(ticket, None)

    def _period(self) -> float:
        return min(rt.settings.reservation_ttl_s for rt, _ in self.held.values()) / 3

    def _tick(self) -> None:
        self.handle = None
        if not self.held:
            return
        # Every request in flight now is renewed, however young: its deadline stays at least two
        # thirds of a life ahead until the next tick.
        now_ms = int(self.mw.clock() * 1000)
        for rt, plan in self.held.values():
            program = renew_program(plan, rt.settings.reservation_ttl_s * 1000)
            task = asyncio.ensure_future(self.mw.guard.settle(rt, program, now_ms))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self._set(asyncio.get_running_loop(), self._period())

    def _set(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        self.period = period
        self.handle = loop.call_later(period, self._tick)


def _kept(rule: RouteRule, status: int) -> bool:
    """Whether an answer's changes stand: a 2xx, or an answer that never came (the upstream may have
    done the change). A login answered 504 is undone all the same: anyone can name a user, so keeping
    it would let a client that slows the gateway fill the day's DAU with names; a user who did log in
    is counted when they connect."""
    return 200 <= status < 300 or (status == UNKNOWN_OUTCOME and not rule.login)


def _forward(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, limit: int, checked: bool, started: float
) -> Awaitable[None]:
    """The request passed on, unsettled: as it came when its framing bounds its body (`checked`),
    else through a _Bounded that counts it."""
    if checked:
        return app(scope, receive, send)
    return _Bounded(receive, limit, False).forward(app, scope, send, started)


class _Bounded:
    """Counts request body bytes as they stream to the upstream; past the limit the upstream sees the
    client go away and the client gets 413 (if no answer has started)."""

    def __init__(self, receive: Receive, limit: int, checked: bool) -> None:
        self.receive, self.limit, self.checked = receive, limit, checked
        self.size = 0
        self.cut = False

    async def _receive(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.limit:
                self.cut = True
                return {"type": "http.disconnect"}
        return message

    def forward(self, app: ASGIApp, scope: Scope, send: Send, started: float) -> Awaitable[None]:
        if self.checked:
            # Bounded by its framing: the app gets the request as it came, with no coroutine between.
            return app(scope, self.receive, send)
        return self._counted(app, scope, send, started)

    async def _counted(self, app: ASGIApp, scope: Scope, send: Send, started: float) -> None:
        started_response = False

        async def guarded_send(message: Message) -> None:
            nonlocal started_response
            if self.cut:
                return
            if message["type"] == "http.response.start":
                started_response = True
            await send(message)

        try:
            await app(scope, self._receive, guarded_send)
        except Exception:
            if not self.cut:
                raise
        if self.cut and not started_response:
            await send_denial(_too_large(self.limit), send, started)


class _Capture:
    """The send of a settled answer: watches its status and, where the route reads it, keeps a
    bounded copy of its body. A plain callable returning the server's own awaitable, like
    _RateHeaders."""

    def __init__(self, send: Send, reads: bool, rate: RateState | None = None) -> None:
        self.send = send
        self.reads = reads
        self.rate = rate
        self.status = 0
        self.encoding = b""
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflow = False

    def __call__(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.reads:
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-encoding":
                        self.encoding = value.strip().lower()
            if self.rate is not None:
                message = _with_rate_headers(message, self.rate)
        elif self.reads and message["type"] == "http.response.body" and 200 <= self.status < 300:
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if self.size <= RESPONSE_CAPTURE_LIMIT:
                self.chunks.append(chunk)
            else:
                self.overflow = True
        return self.send(message)

    def json(self) -> Any:
        """The answer as JSON, or None when it cannot be read (too big, compressed unknowably, not JSON)."""
        if not self.reads or self.overflow:
            return None
        raw = b"".join(self.chunks)
        if self.encoding in (b"gzip", b"deflate", b"x-gzip"):
            inflater = zlib.decompressobj(wbits=47)  # gzip or zlib, detected from the header
            try:
                raw = inflater.decompress(raw, RESPONSE_CAPTURE_LIMIT)
            except zlib.error:
                return None
            if inflater.unconsumed_tail:
                return None
        elif self.encoding not in (b"", b"identity"):
            return None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None


def _too_large(limit: int) -> Denial:
    return Denial(413, "request_too_large", f"request body over {limit} bytes")


def _framing(scope: dict[str, Any]) -> tuple[int | None, bool]:
    """(the declared Content-Length, whether HTTP/1 framing bounds the body by it). An HTTP/1 request
    with no Transfer-Encoding carries exactly Content-Length bytes, or none: the server's parser
    ends the body there, so it needs no counting as it streams. Anything else is counted."""
    declared, unframed = None, False
    headers = scope["headers"]
    # A list (what servers hand) is walked natively; any other iterable of pairs is listed first.
    for header in headers if isinstance(headers, list) else list(headers):
        # Indexed, and the name narrowed to bytes: compiled, that compares lengths and memory where
        # unpacking and comparing objects cost a thousand instructions a request.
        name = header[0]
        if not isinstance(name, bytes):
            continue
        if name == b"content-length":
            value = header[1]
            if not isinstance(value, bytes) or not value.isdigit():
                return None, False
            # Longer than any real size (and int() of 4,300+ digits raises): too large.
            length = int(value) if len(value) <= 18 else 1 << 62
            # Two lengths: trust neither (the largest is checked, the body is counted).
            unframed = unframed or declared is not None
            declared = length if declared is None else max(declared, length)
        elif name == b"transfer-encoding":
            unframed = True
    version = scope.get("http_version")
    return declared, not unframed and isinstance(version, str) and version in ("1.1", "1.0")


def _authorization(scope: dict[str, Any]) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bearer(value.decode("latin-1"))
    return ""


# The numbers RateLimit headers carry most (a limit of 100/s, what is left of it, a second to reset),
# encoded once: three str().encode() a response cost more than the dict and list around them.
# Final, so compiled code reads it from a C static, not the module's dict by name at every call.
_DIGITS: Final = tuple(str(n).encode() for n in range(1024))


def _digits(n: int) -> bytes:
    return _DIGITS[n] if 0 <= n < 1024 else str(n).encode()


def _tightest(rates: tuple[RateState, ...]) -> RateState:
    """The rate nearest its limit speaks for the request (what a client must pace itself by)."""
    return rates[0] if len(rates) == 1 else min(rates, key=lambda r: r.remaining / r.limit if r.limit else 0)


def _with_rate_headers(message: Message, state: RateState) -> Message:
    message = dict(message)  # the upstream's own message (and its header list) stays as sent
    message["headers"] = [
        *message.get("headers", ()),
        (b"ratelimit-limit", _digits(state.limit)),
        (b"ratelimit-remaining", _digits(max(0, state.remaining))),
        (b"ratelimit-reset", _digits(max(1, -(-state.reset_ms // 1000)))),
    ]
    return message


class _RateHeaders:
    """The send of an allowed answer, adding the RateLimit headers to its start. A plain callable
    that returns the server's own awaitable: no coroutine object of its own per message."""

    def __init__(self, send: Send, state: RateState) -> None:
        self.send = send
        self.state: RateState | None = state

    def __call__(self, message: Message) -> Awaitable[None]:
        # One start per answer: once it has its headers, the body's messages go by unread.
        state = self.state
        if state is not None and message["type"] == "http.response.start":
            self.state = None
            message = _with_rate_headers(message, state)
        return self.send(message)


def _with_header(send: Send, name: bytes, value: bytes) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return wrapped


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
