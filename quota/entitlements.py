"""What an app's plan allows and how much of it is used: for Python, the admin API and the CLI."""

from __future__ import annotations

import time
from datetime import date
from typing import Any

from quota.errors import UnknownAppError
from quota.keys import app_prefix, dau_key, online_key, set_key
from quota.matrix import MauShare, limit_to_json
from quota.plans import AppPlan, Directory
from quota.store import Store
from quota.store.program import UNLIMITED

# Counted limits kept per app: limit -> (relation, side).
APP_COUNTERS = {
    "registered_users": ("app_users", "o"),
    "groups_per_app": ("app_groups", "o"),
    "chatrooms_per_app": ("app_chatrooms", "o"),
}
# Counted limits kept per entity: kind -> {limit: (relation, side)}.
ENTITY_COUNTERS = {
    "user": {
        "friends_per_user": ("contacts", "o"),
        "groups_per_user": ("group_members", "m"),
        "chatrooms_per_user": ("chatroom_members", "m"),
    },
    "group": {"members_per_group": ("group_members", "o")},
    "chatroom": {"members_per_chatroom": ("chatroom_members", "o")},
}


def plan_json(app: AppPlan) -> dict[str, Any]:
    return {
        "app": app.appkey,
        "account": app.account.name,
        "plan": app.plan.name,
        "frozen": app.frozen,
        "limits": {name: limit_to_json(value) for name, value in app.limits.items()},
        "overrides": {name: app.account.overrides[name] for name in app.account.overrides},
        "features": dict(app.plan.features),
        "rates": {name: rate.text for name, rate in app.plan.rates.items()},
    }


def _usage(limit: Any, used: int, cap: int | None = None) -> dict[str, Any]:
    cap = cap if cap is not None else (limit if isinstance(limit, int) else None)
    return {"used": used, "limit": cap, "remaining": None if cap is None else max(0, cap - used)}


async def entitlements(
    directory: Directory,
    store: Store,
    appkey: str,
    today: date,
    *,
    usage: bool = True,
    entities: dict[str, str] | None = None,
    at: float | None = None,
) -> dict[str, Any]:
    """One app's entitlements; with `usage`, each counted limit's use; `entities` adds one user's,
    group's or chatroom's counters ({"user": "alice"}). `at` is the caller's clock (the
    middleware's; the system's if None): who is online is read against the deadlines it wrote."""
    app = directory.lookup(appkey, today)
    if app is None:
        raise UnknownAppError(appkey)
    out = plan_json(app)
    if not usage:
        return out
    prefix = app_prefix(appkey)
    keys = [set_key(prefix, rel, side, appkey) for rel, side in APP_COUNTERS.values()]
    *counts, dau = await store.cardinalities([*keys, dau_key(prefix, today)])
    used: dict[str, Any] = {name: _usage(app.limits.get(name), n) for name, n in zip(APP_COUNTERS, counts, strict=True)}
    # Today's users against the day's ceiling of new ones (the free plan's; none where overage is billed).
    used["included_dau"] = _usage(None if app.dau_cap == UNLIMITED else app.dau_cap, dau)
    online = await store.online(online_key(prefix), int((time.time() if at is None else at) * 1000))
    cap = app.limits.get("online_users")
    if isinstance(cap, MauShare):
        from quota.metering import mau_pair

        last, this = await mau_pair(store, prefix, today)
        used["online_users"] = _usage(None, online, cap.cap(last, this))
    else:
        used["online_users"] = _usage(cap, online)
    out["usage"] = used
    for kind, entity in (entities or {}).items():
        names = ENTITY_COUNTERS[kind]
        counts = await store.cardinalities([set_key(prefix, rel, side, entity) for rel, side in names.values()])
        out.setdefault("entities", {})[f"{kind}:{entity}"] = {
            name: _usage(app.limits.get(name), n) for name, n in zip(names, counts, strict=True)
        }
    return out
