"""Personal data deletion (个人数据删除 API): remove every trace of one user from quota's storage.

quota holds user ids in membership sets (friends, groups and chatrooms joined, the app's users) and
in activity sets (DAU per day, MAU per month). Memberships are removed, freeing what the user held.
In activity sets the id is replaced by an anonymous token, so every day's and month's count, which
bills were issued on, stays the same number. Connection leases hold connection ids, not user ids;
rate windows keyed by a user expire within two windows.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from quota.decisions import drop
from quota.identifiers import IdPolicy
from quota.keys import app_prefix, escape, inflight_key, set_key, side_prefix
from quota.routes import RouteMap
from quota.store import Store
from quota.store.program import DrainOp, Program, RemoveOp

FORGOTTEN = "~forgotten:"


async def forget_user(
    store: Store,
    routes: RouteMap,
    appkey: str,
    user: str,
    now_ms: int,
    progress: Callable[[int, int], None] | None = None,
    *,
    ids: IdPolicy,
) -> dict[str, Any]:
    """Forget `user` in `appkey`; `progress(done, total)` is told after each relation and activity set.
    Raises ValueError (InvalidId) for a user id the policy refuses: nothing could hold it."""
    # The configured policy (quota.yaml's identifiers): the id as the request path spelled it.
    user = ids.canonical("user", user)
    prefix = app_prefix(appkey)
    activity_keys: list[tuple[str, str]] = []
    for kind, part, digits in (("days", "dau:", 8), ("months", "mau:", 6)):
        # Only the sets themselves (dau:yyyymmdd, mau:yyyymm): another key under the prefix, such
        # as an earlier version's login holds, is of another type, and a swap in it fails.
        found = await store.scan_prefix(prefix + part)
        activity_keys += [(kind, k) for k in found if len(k) == len(prefix + part) + digits and k[-digits:].isdigit()]
    total = len(routes.relations) + len(activity_keys)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    removed: dict[str, int] = {}
    program = Program()
    drains: list[DrainOp] = []
    for rel in routes.relations.values():
        step()
        app_set = set_key(prefix, rel.name, "o", appkey)
        if user in await store.members(app_set):
            removed[rel.name] = removed.get(rel.name, 0) + 1
            program.ops.append(RemoveOp(app_set, (user,)))
        if rel.symmetric:
            own = set_key(prefix, rel.name, "o", user)
        elif rel.member_limit:
            own = set_key(prefix, rel.name, "m", user)
        else:
            continue
        held = len(await store.members(own))
        if held:
            removed[rel.name] = removed.get(rel.name, 0) + held
            dropped, drain = drop(own, side_prefix(prefix, rel.name, "o"), user)
            program.ops.append(dropped)
            drains.append(drain)
    # Claims and tombstones of requests in flight that name the user go (a request in flight that
    # then fails keeps its member: drift on the safe side, not a leak of the id). Only those: the
    # others' tombstones still hold adds off what their removals are about to take out.
    sides = [
        (rel.name, rel.symmetric or rel.owner_kind == "user", rel.member_kind == "user")
        for rel in routes.relations.values()
    ]
    for name, owner, member in [*sides, ("activity", False, True)]:
        if owner or member:
            await store.forget_claims(inflight_key(prefix, name), escape(user), owner, member)
    if program:
        await store.run(program, now_ms)
    for drain in drains:
        while (await store.run(Program([drain]), now_ms)).remaining:
            pass
    activity: dict[str, int] = {"days": 0, "months": 0}
    for kind, key in activity_keys:
        if await store.swap_member(key, user, FORGOTTEN + uuid.uuid4().hex):
            activity[kind] += 1
        step()
    return {"app": appkey, "user": user, "memberships_removed": removed, "activity_anonymised": activity}
