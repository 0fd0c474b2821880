"""The long connection of a logged-in user, over WebSocket.

Before the upstream sees the connection: the app, its allowlist and plan, the route's rates, a held
DAU slot on a capped plan, and an online-user lease. The login is recorded only once the upstream
accepts the connection; one it closes (or that fails) releases the slot and the lease. The lease is
renewed while the connection lives and released when it ends: a worker killed with -9 stops
renewing, and its leases lapse.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from typing import TYPE_CHECKING, Any

from starlette.types import Message, Receive, Send

from quota.decisions import (
    BadInput,
    Denial,
    activity_ops,
    admit,
    confirm_ops,
    denial_for,
    denial_of,
    lease_op,
    path_denial,
    plan_request,
    select,
    undo_ops,
)
from quota.plans import AppPlan
from quota.responses import close_websocket
from quota.routes import RouteRule
from quota.store.program import UNLIMITED, Op, Program, ReleaseOp

if TYPE_CHECKING:
    from quota.middleware import QuotaMiddleware, Runtime


class SocketHandler:
    def __init__(self, middleware: QuotaMiddleware) -> None:
        self.mw = middleware

    async def __call__(self, rt: Runtime, scope: dict[str, Any], receive: Receive, send: Send, started: float) -> None:
        mw = self.mw
        odd = path_denial(scope, rt.max_url_bytes)
        if odd is not None:
            await _refuse(odd, receive, send)
            return
        match = rt.routes.match("WEBSOCKET", scope["path"])
        today = mw.today(started)
        app = mw.app_of(rt, match, today)
        if app is None:
            refused = await mw.fallback_denial(rt, rt.clients.key(rt.clients.address(scope)), started)
            if refused is not None:
                await _refuse(refused, receive, send)
                return
            await mw.app(scope, receive, send)
            return
        if isinstance(app, Denial) or match.rule.refuse or match.rule.admin:
            refusal = app if isinstance(app, Denial) else Denial(404, "service_resource_not_found", "no such API")
            await _refuse(refusal, receive, send)
            return
        rule = match.rule
        address = rt.clients.address(scope)
        conn = uuid.uuid4().hex
        ttl_ms = rt.settings.lease_ttl_s * 1000
        now_ms = int(started * 1000)
        denial: Denial | None = None
        plan = None
        added: tuple[tuple[str, ...], ...] = ()
        admitted = admit(rule, app, match.params, address, started, rt.ids)
        if isinstance(admitted, Denial):
            denial = admitted
            params = match.params
        else:
            params = admitted
        if denial is None:
            try:
                plan = plan_request(
                    rt.routes,
                    rule,
                    app,
                    params,
                    None,
                    rt.clients.key(address),
                    now_ms,
                    ids=rt.ids,
                    lease_ttl_ms=ttl_ms,
                    reservation_ttl_ms=rt.settings.reservation_ttl_s * 1000,
                    conn_id=conn,
                    today=today,
                )
            except BadInput as exc:
                denial = Denial(400, "illegal_argument", str(exc))
            else:
                result = await mw.guard.run(rt, plan.before, now_ms, True, rule)
                if isinstance(result, Denial):
                    denial = result
                elif result.refusal is not None:
                    denial = denial_for(result.refusal, plan, app)
                else:
                    added = result.added
        if denial is not None or plan is None:
            denial = denial or Denial(400, "illegal_argument", "cannot plan this connection")
            mw.metrics.decision(rule.name, denial.limit, app.plan.name, "refused", app=app.appkey, now=started)
            await _refuse(denial, receive, send)
            return
        mw.metrics.decision(rule.name, None, app.plan.name, "allowed")
        accepted = False
        link = _Link(receive, send)
        # The login's claims live while the upstream weighs the handshake, however long: one that
        # lapsed would be purged by another request, and the undo of a refused login skip it.
        ticket = mw.renewals.hold(rt, plan) if plan.held else 0

        async def watch(message: Message) -> None:
            nonlocal accepted
            if link.ended:
                return  # the connection was ended by quota (_Link.end): the upstream speaks to no one
            if message["type"] == "websocket.accept" and not accepted:
                # The upstream took the connection: the login counted before is settled.
                accepted = True
                mw.renewals.release(ticket)
                await mw.guard.settle(rt, Program(list(confirm_ops(plan, added))), int(mw.clock() * 1000))
            await send(message)

        # Who to count active on each later day the connection lives through (a login's user).
        user = select(rule.user, params, None, rt.ids)[0] if rule.login and rule.user is not None else None
        held = _Held(rule, app, params, address, conn, ttl_ms, user, today)
        renew = asyncio.ensure_future(self._renew(rt, held, link, lambda: accepted)) if rule.connection else None
        try:
            await mw.app(scope, link.receive, watch)
        finally:
            mw.renewals.release(ticket)
            if renew is not None:
                renew.cancel()
            end = int(mw.clock() * 1000)
            release = Program()
            if not accepted:
                release = undo_ops(plan, added)
            if rule.connection:
                release.ops.append(ReleaseOp(lease_op(app, today, conn, ttl_ms).online_key, conn))
            await asyncio.shield(mw.guard.settle(rt, release, end))

    async def _renew(self, rt: Runtime, held: _Held, link: _Link, accepted: Callable[[], bool]) -> None:
        # Renew well before expiry; a worker killed with -9 stops renewing and its leases lapse.
        mw = self.mw
        conn, ttl_ms, counted = held.conn, held.ttl_ms, held.today
        release = Program([ReleaseOp(lease_op(held.app, held.today, conn, ttl_ms).online_key, conn)])
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            now = mw.clock()
            now_ms = int(now * 1000)
            today = mw.today(now)
            # Held to the account as it is now, not as it was at the handshake: a connection of an
            # account frozen, cancelled, detached or put behind an allowlist since is ended, as its
            # HTTP requests are refused.
            app = _standing(mw.runtime, held, now, today)
            if isinstance(app, Denial):
                await link.end(app)
                await mw.guard.settle(rt, release, now_ms)
                return
            lease = lease_op(app, today, conn, ttl_ms)
            if _online_cap(app) == _online_cap(held.app):
                # A renewal re-takes its lease whatever the cap: the connection was admitted, and a
                # lease that lapsed during a storage outage must count again (new connections are
                # refused instead).
                lease = replace(lease, cap=UNLIMITED, share_bp=0)
            else:
                # The plan's online cap changed since the handshake (a downgrade on the 1st, an
                # override): the connection stays only if the new cap has room for it among the
                # others, as a new one would; those over it end one by one at their renewals.
                lease = replace(lease, recheck=True)
            ops: list[Op] = [lease]
            active = held.user is not None and today != counted and accepted()
            if active and held.user is not None:
                # Online on a new day (or month), once the upstream took the connection: as active
                # as a user who logged in on it, and held to the same DAU ceiling.
                ops += activity_ops(app, today, held.user)
            outcome = await mw.guard.settle(rt, Program(ops), now_ms)
            if outcome is None:
                continue  # the store did not answer: checked again at the next renewal
            if outcome.refusal is not None:
                await link.end(denial_of(outcome.refusal, ops, app))
                await mw.guard.settle(rt, release, now_ms)
                return
            held.app = app
            if active:
                counted = today


class _Held:
    """A connection's standing, as its renewals check it again."""

    def __init__(
        self,
        rule: RouteRule,
        app: AppPlan,
        params: dict[str, str],
        address: str,
        conn: str,
        ttl_ms: int,
        user: str | None,
        today: date,
    ) -> None:
        self.rule, self.app, self.params, self.address = rule, app, params, address
        self.conn, self.ttl_ms, self.user, self.today = conn, ttl_ms, user, today


def _standing(rt: Runtime, held: _Held, now: float, today: date) -> AppPlan | Denial:
    """The app's plan as it is now, or why the account no longer holds the connection (what its
    handshake would be refused now for, the caps aside)."""
    app = rt.directory.lookup(held.app.appkey, today)
    if app is None:
        return Denial(404, "service_resource_not_found", f"app {held.app.appkey} has no plan here")
    admitted = admit(held.rule, app, held.params, held.address, now, rt.ids)
    return admitted if isinstance(admitted, Denial) else app


def _online_cap(app: AppPlan) -> Any:
    """online_users: a number, or a share of MAU with its floor. (The DAU ceiling, which may change
    by the day, is applied by each new day's activity ops.)"""
    return app.limits.get("online_users")


class _Link:
    """The client's side of a connection, which quota may end: the client is sent the close, and the
    upstream reads the client gone at its next receive, whatever the client sends meanwhile (its
    sends go nowhere: see `watch`). A client that never answers the close is cut by its server's
    close timeout; its lease is released at once."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send
        self.ended = False

    async def receive(self) -> Message:
        if not self.ended:
            message = await self._receive()
            # What the client sent while the close was on its way is not delivered.
            if not self.ended:
                return message
        return {"type": "websocket.disconnect", "code": 1008}

    async def end(self, denial: Denial) -> None:
        self.ended = True
        await close_websocket(denial, self._send)


async def _refuse(denial: Denial, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] == "websocket.connect":
        await close_websocket(denial, send)
