"""Entitlements for application code: what an app's plan allows, how much is used, and what quota
would decide, each in one call with a typed, frozen result.

    q = Quota(config="config/", store=store_from_url("redis://..."))   # or Quota.of(middleware)
    await q.feature("demo#pro", "translation")                       -> True
    await q.limit("demo#free", "friends_per_user", user="alice")     -> Usage(used=3, limit=100, remaining=97)
    await q.check("demo#free", "members_per_group", group="1", add=5) -> Decision(allowed=True, ...)
    await q.explain("POST", "/demo/free/users/a/contacts/users/b")   -> Explanation(...)

Nothing here consumes anything: `check` and `explain` read, and `explain` runs the request's store
program as a dry run (every check, nothing applied). The admin API and the CLI use this object;
the middleware never imports it (it is not on the request path).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from quota.config import Config, load_config
from quota.decisions import BadInput, Denial, admit, denial_for, parse_body, plan_request, unreadable_body
from quota.entitlements import APP_COUNTERS, ENTITY_COUNTERS, entitlements
from quota.errors import UnknownAppError
from quota.identifiers import InvalidId
from quota.keys import app_prefix, dau_key, online_key, set_key
from quota.matrix import MauShare, limit_to_json
from quota.metering import mau_pair, usage_report
from quota.middleware import QuotaMiddleware, Runtime
from quota.plans import AppPlan
from quota.store import Store
from quota.store.memory import MemoryStore
from quota.store.program import UNLIMITED, AddOp, Program, RateOp

ENTITY_KINDS = {"user": "user", "group": "room", "chatroom": "room"}


@dataclass(frozen=True)
class Usage:
    """A counted limit: `limit` and `remaining` are None when the plan sets no cap."""

    used: int
    limit: int | None
    remaining: int | None


@dataclass(frozen=True)
class Decision:
    """What quota would answer: `allowed`, or the HTTP status, IM error and reason it would refuse with."""

    allowed: bool
    reason: str = ""
    status: int = 200
    error: str | None = None
    limit: str | None = None
    retry_after_s: int | None = None


@dataclass(frozen=True)
class PlanInfo:
    app: str
    account: str
    plan: str
    frozen: bool
    limits: Mapping[str, object]
    features: Mapping[str, bool]
    rates: Mapping[str, str]


@dataclass(frozen=True)
class RateCheck:
    name: str
    limit: int
    window_s: float
    exact: bool
    remaining: int | None  # after this request, if it were counted; None when it is over
    cost: int = 1  # the hits this request counts (a send: one per recipient)


@dataclass(frozen=True)
class CounterCheck:
    limit: str
    cap: int | None
    used: int
    adding: int


@dataclass(frozen=True)
class Explanation:
    """Which route a request matches, what applies to it, the usage of each, and the decision."""

    method: str
    path: str
    route: str
    app: str | None
    decision: Decision
    feature: str | None = None
    retention_days: int | None = None
    rates: tuple[RateCheck, ...] = ()
    counters: tuple[CounterCheck, ...] = ()
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class UsageReport:
    app: str
    month: str
    plan: str
    daily_active: Mapping[str, int]
    peak_dau: int
    included_dau: int
    mau: int
    peak_online: int
    limits: Mapping[str, Usage]


def _decision(denial: Denial | None) -> Decision:
    if denial is None:
        return Decision(True)
    retry = -(-denial.retry_after_ms // 1000) if denial.status == 429 else None
    return Decision(False, denial.description, denial.status, denial.error, denial.limit, retry)


class Quota:
    """One handle on a config and a store (or on a running middleware's, via `Quota.of`)."""

    def __init__(self, config: Config | str | Path | None = None, store: Store | None = None) -> None:
        cfg = config if isinstance(config, Config) else load_config(config)
        runtime = Runtime(cfg, store or MemoryStore())
        self._runtime: Callable[[], Runtime] = lambda: runtime
        self.clock: Callable[[], float] = time.time

    @classmethod
    def of(cls, middleware: QuotaMiddleware) -> Quota:
        """The live view of a middleware: its current config (after reloads), store and clock."""
        q = cls.__new__(cls)
        q._runtime = lambda: middleware.runtime
        q.clock = lambda: middleware.clock()
        return q

    @property
    def runtime(self) -> Runtime:
        return self._runtime()

    def _app(self, appkey: str, today: date | None = None) -> AppPlan:
        found = self.runtime.directory.lookup(appkey, today or self._today())
        if found is None:
            raise UnknownAppError(appkey)
        return found

    def _today(self, now: float | None = None) -> date:
        return datetime.fromtimestamp(self.clock() if now is None else now, UTC).date()

    async def plan(self, appkey: str) -> PlanInfo:
        app = self._app(appkey)
        return PlanInfo(
            app=app.appkey,
            account=app.account.name,
            plan=app.plan.name,
            frozen=app.frozen,
            limits={name: limit_to_json(value) for name, value in app.limits.items()},
            features=dict(app.plan.features),
            rates={name: rate.text for name, rate in app.plan.rates.items()},
        )

    async def feature(self, appkey: str, name: str) -> bool:
        """Whether the app's plan has a feature; ValueError for a name the matrix does not have."""
        app = self._app(appkey)
        if name not in app.plan.features:
            raise ValueError(f"unknown feature {name!r}")
        return app.plan.features[name] and not app.frozen

    async def limit(
        self, appkey: str, name: str, *, user: str | None = None, group: str | None = None, chatroom: str | None = None
    ) -> Usage:
        """A counted limit and its use: per app (groups_per_app, registered_users, online_users,
        included_dau for today) or per entity (friends_per_user with user=, members_per_group with
        group=, ...)."""
        rt, app = self.runtime, self._app(appkey)
        prefix = app_prefix(appkey)
        cap = app.limits.get(name)
        if name in APP_COUNTERS:
            rel, side = APP_COUNTERS[name]
            (used,) = await rt.store.cardinalities([set_key(prefix, rel, side, appkey)])
            return _usage(used, cap if isinstance(cap, int) else None)
        if name == "included_dau":
            (used,) = await rt.store.cardinalities([dau_key(prefix, self._today())])
            return _usage(used, None if app.dau_cap == UNLIMITED else app.dau_cap)
        if name == "online_users":
            online = await rt.store.online(online_key(prefix), int(self.clock() * 1000))
            if isinstance(cap, MauShare):
                last, this = await mau_pair(rt.store, prefix, self._today())
                return _usage(online, cap.cap(last, this))
            return _usage(online, cap if isinstance(cap, int) else None)
        given = {"user": user, "group": group, "chatroom": chatroom}
        for kind, names in ENTITY_COUNTERS.items():
            if name in names:
                entity = given[kind]
                if entity is None:
                    raise ValueError(f"{name} is counted per {kind}: pass {kind}=")
                rel, side = names[name]
                key = set_key(prefix, rel, side, self._entity(kind, entity))
                (used,) = await rt.store.cardinalities([key])
                return _usage(used, cap if isinstance(cap, int) else None)
        raise ValueError(f"{name!r} is not a counted limit")

    def _entity(self, kind: str, value: str) -> str:
        try:
            return self.runtime.ids.canonical(ENTITY_KINDS[kind], value)  # type: ignore[arg-type]
        except InvalidId as exc:
            raise ValueError(str(exc)) from exc

    async def check(
        self,
        appkey: str,
        name: str,
        *,
        add: int = 1,
        user: str | None = None,
        group: str | None = None,
        chatroom: str | None = None,
    ) -> Decision:
        """Would `add` more fit under the limit now? Reads only; a later request may still race."""
        usage = await self.limit(appkey, name, user=user, group=group, chatroom=chatroom)
        if usage.limit is None or usage.used + add <= usage.limit:
            return Decision(
                True, f"{name}: {usage.used} used of {usage.limit if usage.limit is not None else 'no cap'}"
            )
        app = self._app(appkey)
        error = "exceed_limit" if name == "friends_per_user" else "forbidden_op"
        room = max(0, usage.limit - usage.used)
        reason = f"{name} is {usage.limit} on plan {app.plan.name}: {usage.used} used, room for {room} more"
        return Decision(False, reason, 403, error, name)

    async def usage(self, appkey: str, month: str | None = None) -> UsageReport:
        today = self._today()
        year, mon = (int(month[:4]), int(month[5:7])) if month else (today.year, today.month)
        raw = await usage_report(self.runtime.directory, self.runtime.store, appkey, year, mon, today)
        limits = {k: Usage(v["used"], v["limit"], v["remaining"]) for k, v in raw["limits"].items()}  # type: ignore[attr-defined]
        return UsageReport(
            app=appkey,
            month=str(raw["month"]),
            plan=str(raw["plan"]),
            daily_active=dict(raw["dau"]),  # type: ignore[call-overload]
            peak_dau=int(raw["peak_dau"]),  # type: ignore[call-overload]
            included_dau=int(raw["included_dau"]),  # type: ignore[call-overload]
            mau=int(raw["mau"]),  # type: ignore[call-overload]
            peak_online=int(raw["peak_online"]),  # type: ignore[call-overload]
            limits=limits,
        )

    async def entitlements(
        self, appkey: str, entities: dict[str, str] | None = None, *, usage: bool = True
    ) -> dict[str, Any]:
        """The JSON the admin API and `quota entitlements` show (`usage=False`: the plan only)."""
        rt = self.runtime
        canonical = {k: self._entity(k, v) for k, v in (entities or {}).items()}
        now = self.clock()
        return await entitlements(
            rt.directory, rt.store, appkey, self._today(now), usage=usage, entities=canonical, at=now
        )

    async def explain(
        self,
        method: str,
        path: str,
        *,
        body: bytes | str | None = None,
        ip: str = "203.0.113.1",
        headers: Sequence[tuple[str, str]] | None = None,
    ) -> Explanation:
        """What quota would decide for this request, and why, without consuming anything. `headers`:
        the request's (name, value) pairs as sent; None is a request typed `application/json`."""
        rt = self.runtime
        now = self.clock()
        match = rt.routes.match(method.upper(), path)
        rule = match.rule
        org, app_name = match.params.get("org"), match.params.get("app")
        if not org or not app_name:
            return Explanation(method, path, rule.name, None, Decision(True, "under no app: the general per-IP rate"))
        appkey = f"{org}#{app_name}"
        app = rt.directory.lookup(appkey, datetime.fromtimestamp(now, UTC).date())
        days = app.limits.get("message_retention_days") if app is not None and rule.retention else None

        def answer(
            denial: Denial | None, rates: list[RateCheck] | None = None, counters: list[CounterCheck] | None = None
        ) -> Explanation:
            return Explanation(
                method,
                path,
                rule.name,
                appkey,
                _decision(denial),
                feature=rule.feature,
                retention_days=days if isinstance(days, int) else None,
                rates=tuple(rates or ()),
                counters=tuple(counters or ()),
            )

        if app is None:
            return answer(Denial(404, "service_resource_not_found", f"app {appkey} has no plan here"))
        if rule.refuse or rule.admin:
            return answer(Denial(404, "service_resource_not_found", "no such API"))
        admitted = admit(rule, app, match.params, ip, now, rt.ids)
        if isinstance(admitted, Denial):
            return answer(admitted)
        raw = body.encode() if isinstance(body, str) else body or b""
        sent = _JSON_TYPED if headers is None else [_header_bytes(name, value) for name, value in headers]
        refused = unreadable_body(sent) if rule.needs_body and raw else None
        if refused is not None:
            return answer(Denial(415, "illegal_argument", refused))
        try:
            parsed = parse_body(raw) if rule.needs_body else None
            plan = plan_request(
                rt.routes,
                rule,
                app,
                admitted,
                parsed,
                rt.clients.key(ip),
                int(now * 1000),
                ids=rt.ids,
                lease_ttl_ms=rt.settings.lease_ttl_s * 1000,
                reservation_ttl_ms=rt.settings.reservation_ttl_s * 1000,
                conn_id="explain",
            )
        except BadInput as exc:
            return answer(Denial(400, "illegal_argument", str(exc)))
        now_ms = int(now * 1000)
        outcome = await rt.store.run(plan.before, now_ms, dry=True)
        denial = denial_for(outcome.refusal, plan, app) if outcome.refusal is not None else None
        rates: list[RateCheck] = []
        counters: list[CounterCheck] = []
        # Each op alone, as a dry run, for its own figures (the whole program stops at its first refusal).
        for op in plan.before.ops:
            alone = await rt.store.run(Program([op]), now_ms, dry=True)
            if isinstance(op, RateOp):
                remaining = alone.rates[0].remaining if alone.refusal is None and alone.rates else None
                rates.append(RateCheck(op.name, op.limit, op.window_ms / 1000, op.exact, remaining, op.cost))
            elif isinstance(op, AddOp) and op.limit:
                cap = None if op.cap < 0 else op.cap
                if alone.refusal is not None:
                    counters.append(CounterCheck(op.limit, cap, alone.refusal.used, len(op.members)))
                else:
                    adding = len(alone.added[0]) if alone.added else 0
                    size = alone.sizes[0] if alone.sizes else adding
                    counters.append(CounterCheck(op.limit, cap, size - adding, adding))
        return answer(denial, rates, counters)


def _usage(used: int, cap: int | None) -> Usage:
    return Usage(used, cap, None if cap is None else max(0, cap - used))


__all__ = [
    "CounterCheck",
    "Decision",
    "Explanation",
    "PlanInfo",
    "Quota",
    "RateCheck",
    "Usage",
    "UsageReport",
]


_JSON_TYPED = ((b"content-type", b"application/json"),)
MAX_HEADERS = 64


def header_line(text: str) -> tuple[str, str]:
    """`Name: value`, as curl's -H takes it; ValueError otherwise."""
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or len(text) > 8192:
        raise ValueError(f"a header is `Name: value` (at most 8192 characters), found {text[:40]!r}")
    return name.strip(), value.strip()


def _header_bytes(name: str, value: str) -> tuple[bytes, bytes]:
    # As a server hands them to ASGI: names lowercased, both as bytes.
    return name.strip().lower().encode("latin-1", "replace"), value.strip().encode("latin-1", "replace")
