"""Rebuild an app's counters from the gateway's own truth, after drift or a Redis restart.

The source is a JSON document in the reference gateway's shape (its `GET /{org}/{app}/_state`):

    {"users": [...], "contacts": {"alice": ["bob", ...]},
     "groups": {"<group id>": ["alice", ...]}, "chatrooms": {"<room id>": ["bob", ...]}}

Every membership set of the app is deleted and written again. Activity (DAU/MAU), rate windows and
connection leases are not membership and are left alone. Run it when the app is quiet: requests
that change counters while it runs may be lost from the rebuilt sets.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from quota.keys import app_prefix, set_key
from quota.store import Store
from quota.tokens import masked_url

# (relation, rooms key of the snapshot) for the group-like relations of config/routes.yaml.
ROOMS = (("app_groups", "group_members", "groups"), ("app_chatrooms", "chatroom_members", "chatrooms"))


def read_source(source: str) -> dict[str, Any]:
    """The gateway's truth from a file or a URL. Behind quota the state route is operators-only:
    the request carries QUOTA_ADMIN_TOKEN when it is set, over plain http only to this machine."""
    if source.startswith(("http://", "https://")):
        token = os.environ.get("QUOTA_ADMIN_TOKEN")
        if token and source.startswith("http://") and not _loopback(source):
            # Anyone on the path would read the token that opens every app's admin routes.
            raise ValueError(
                f"{masked_url(source)}: QUOTA_ADMIN_TOKEN goes over plain http only to this machine "
                "(localhost, 127.0.0.0/8, ::1); use https"
            )
        headers = {"authorization": f"Bearer {token}"} if token else {}
        try:
            response = httpx.get(source, timeout=30, headers=headers)
        except httpx.HTTPError as exc:
            raise ValueError(f"{masked_url(source)}: {exc}") from exc
        if response.status_code != 200:
            hint = " (behind quota, set QUOTA_ADMIN_TOKEN)" if response.status_code == 404 and not token else ""
            raise ValueError(f"{masked_url(source)}: HTTP {response.status_code}{hint}")
        data = response.json()
    else:
        data = json.loads(Path(source).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("users", []), list):
        raise ValueError(f"{masked_url(source)}: expected a JSON object with users, contacts, groups, chatrooms")
    return data


def _loopback(url: str) -> bool:
    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def reconcile(
    store: Store, appkey: str, truth: dict[str, Any], progress: Callable[[int, int], None] | None = None
) -> dict[str, int]:
    """Rebuild the app's sets; `progress(done, total)` is told after each set written."""
    prefix = app_prefix(appkey)
    stale = await store.scan_prefix(prefix + "s:")
    await store.delete(stale)
    sets: dict[str, list[str]] = {}
    sets[set_key(prefix, "app_users", "o", appkey)] = [str(u) for u in truth.get("users", [])]
    for user, friends in (truth.get("contacts") or {}).items():
        sets[set_key(prefix, "contacts", "o", str(user))] = [str(f) for f in friends]
    for app_relation, members_relation, field in ROOMS:
        rooms = truth.get(field) or {}
        sets[set_key(prefix, app_relation, "o", appkey)] = [str(r) for r in rooms]
        for room, members in rooms.items():
            sets[set_key(prefix, members_relation, "o", str(room))] = [str(m) for m in members]
            for member in members:
                sets.setdefault(set_key(prefix, members_relation, "m", str(member)), []).append(str(room))
    for done, (key, members) in enumerate(sets.items(), 1):
        await store.add_members(key, members)
        if progress is not None:
            progress(done, len(sets))
    return {
        "keys_deleted": len(stale),
        "sets_written": sum(1 for m in sets.values() if m),
        "users": len(truth.get("users", [])),
        "groups": len(truth.get("groups") or {}),
        "chatrooms": len(truth.get("chatrooms") or {}),
    }
