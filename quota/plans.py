"""Who is on which plan: an in-process snapshot of app -> account -> plan, refreshed on change.

Requests read the snapshot only; the middleware asks the store for the accounts' version in the
background (once a second), never on the request path, and calls refresh() when it moved.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any

from quota.accounts import Account, detach
from quota.errors import ConfigError, ConflictError, Problem
from quota.keys import app_prefix
from quota.matrix import LimitValue, Matrix, Plan
from quota.store import Store
from quota.store.program import UNLIMITED

log = logging.getLogger("quota")


@dataclass(frozen=True)
class AppPlan:
    appkey: str
    prefix: str
    account: Account
    plan: Plan
    # The plan's limits with the account's overrides applied.
    limits: dict[str, LimitValue]
    # Parsed once per snapshot: the request path only tests membership.
    allowlist: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # New users past this many a day are refused (UNLIMITED: none): see Directory._dau_cap.
    dau_cap: int = UNLIMITED
    # What decisions.plan_request derives from a route and this app's plan, once per route: an
    # AppPlan is rebuilt whenever its plan, account or config changes, and the cache goes with it.
    compiled: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def allows(self, ip: str) -> bool:
        if not self.allowlist:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.allowlist)

    @property
    def frozen(self) -> bool:
        return self.account.frozen_on is not None


def effective_limits(plan: Plan, account: Account) -> dict[str, LimitValue]:
    limits = dict(plan.limits)
    for name, value in account.overrides.items():
        if name in plan.custom:
            limits[name] = value
    return limits


def dau_ceiling(plan: Plan) -> int:
    """A plan that cannot bill overage refuses new users past its included DAU; one that can has no
    ceiling (UNLIMITED)."""
    return plan.price.included_dau if plan.price.overage_per_10k_dau is None else UNLIMITED


class Directory:
    def __init__(self, matrix: Matrix, accounts: dict[str, Account], store: Store | None = None) -> None:
        self.matrix = matrix
        self.configured = dict(accounts)
        self.store = store
        self.version = -1
        self._accounts = dict(accounts)
        self._apps: dict[str, str] = {}
        self._cache: dict[str, AppPlan | None] = {}
        # What the request path memoises of its own checks on what this directory answers (see
        # QuotaMiddleware's lanes): it lives and dies with the apps it was worked out from.
        self._lanes: dict[Any, Any] = {}
        self._day: date | None = None
        # Names with a stored overlay -> the fingerprint of the accounts.yaml entry it was made on.
        self.stored: dict[str, str | None] = {}
        self._warned: set[str] = set()
        self._index()

    def _index(self) -> None:
        self._apps = {app: acc.name for acc in self._accounts.values() for app in acc.apps}
        # App -> the accounts that held it before (a lookup asks them only, not every account).
        self._formerly: dict[str, list[Account]] = {}
        for acc in self._accounts.values():
            for app in dict.fromkeys(span.app for span in acc.former):
                self._formerly.setdefault(app, []).append(acc)
        self._cache, self._lanes = {}, {}

    @property
    def accounts(self) -> dict[str, Account]:
        return self._accounts

    def account_of(self, appkey: str) -> Account | None:
        name = self._apps.get(appkey)
        return self._accounts.get(name) if name else None

    def lanes(self, today: date) -> dict[Any, Any]:
        """The request path's memo of today's apps: emptied with them (a day, a change of accounts)."""
        # The middleware hands the same date object all day: identity first, a date comparison
        # (a generic call, compiled) only when it changed.
        if today is not self._day and today != self._day:
            self._cache, self._lanes, self._day = {}, {}, today
        return self._lanes

    def lookup(self, appkey: str, today: date) -> AppPlan | None:
        if today != self._day:
            self._cache, self._lanes, self._day = {}, {}, today
        try:
            return self._cache[appkey]
        except KeyError:
            pass
        account = self.account_of(appkey)
        if account is None:
            # Unknown apps are not cached: a flood of made-up appkeys must not grow the cache.
            return None
        found = None
        if account is not None:
            plan_name = account.plan_on(today)
            plan = self.matrix.plans.get(plan_name) if plan_name else None
            if plan is not None:
                allow = tuple(ipaddress.ip_network(n, strict=False) for n in account.ip_allowlist)
                limits = effective_limits(plan, account)
                cap = self._dau_cap(appkey, account, plan, today)
                found = AppPlan(appkey, app_prefix(appkey), account, plan, limits, allow, cap)
        # Only apps with a plan are cached: a miss costs two dict lookups, and caching misses let a
        # client grow the cache without bound by naming a fresh unknown app on every request.
        if found is not None:
            self._cache[appkey] = found
        return found

    def _dau_cap(self, appkey: str, account: Account, plan: Plan, today: date) -> int:
        """The day's ceiling of new users: the plan's, and on the day an app moved, the lower of it
        and that of the account the day is billed to (the one it left: accounts.billed_from). A day
        is served as it is billed: an app moved from a free account to a paid one is not served
        without a ceiling on a day billed to a plan that bills no overage."""
        cap = dau_ceiling(plan)
        for other in self._formerly.get(appkey, ()):
            if other.name == account.name or not other.held_on(appkey, today):
                continue
            held_plan = other.plan_on(today)
            billed = self.matrix.plans.get(held_plan) if held_plan else None
            theirs = dau_ceiling(billed) if billed is not None else UNLIMITED
            if theirs != UNLIMITED and (cap == UNLIMITED or theirs < cap):
                cap = theirs
        return cap

    def carry(self, old: Directory, source: str) -> None:
        """Start from the stored changes another directory holds (a reload's new directory from the
        old one's), over this one's accounts.yaml (`source`); `refresh` reads them again (version
        -1). Raises ConfigError if the file gives an account an app a stored change gave another."""
        stored = {name: old._accounts[name] for name in old.stored if name in old._accounts}
        merged, contested = self._merge(stored)
        if contested:
            raise ConfigError(
                [
                    Problem(source, f"accounts.{name}.apps", "an app held by one account only", f"{app} ({why})")
                    for app, name, why in contested
                ]
            )
        self._accounts = merged
        self.stored, self.version = dict(old.stored), -1
        self._index()

    def _merge(self, stored: dict[str, Account]) -> tuple[dict[str, Account], list[tuple[str, str, str]]]:
        """accounts.yaml's accounts under the stored overlay, each app held by one account: served,
        billed and shown to that one. An app the file and a stored change give to two accounts stays
        with the stored one (made at run time, once the app was checked free) and the other is
        served without it; (app, account served without it, why) for each."""
        merged = {**self.configured, **stored}
        holder: dict[str, str] = {}
        contested: list[tuple[str, str, str]] = []
        for name in [*sorted(n for n in merged if n in stored), *sorted(n for n in merged if n not in stored)]:
            account = merged[name]
            taken = [app for app in account.apps if app in holder]
            for app in taken:
                contested.append((app, name, f"account {holder[app]} holds it by a stored change (admin API or CLI)"))
            for app in account.apps:
                holder.setdefault(app, name)
            if taken:
                merged[name] = replace(
                    account,
                    apps=tuple(a for a in account.apps if a not in taken),
                    attached={a: d for a, d in account.attached.items() if a not in taken},
                )
        return merged, contested

    async def refresh(self) -> None:
        """Reload accounts changed at run time. Stored changes are an overlay on accounts.yaml: a
        stored record wins over the file's account of the same name, until `reset` drops it. When
        the file's account changed after the overlay was made, the overlay hides that edit: say so."""
        if self.store is None:
            return
        version, records = await self.store.load_accounts()
        if version == self.version:
            return
        merged, contested = self._merge({name: Account.from_json(rec) for name, rec in records.items()})
        for app, name, why in contested:
            # Kept out of accounts.yaml at a reload (carry); here the stored change came after it.
            log.error("account %s is served without the app %s: %s", name, app, why)
        self.stored = {name: rec.get("base") for name, rec in records.items()}
        self._accounts, self.version = merged, version
        self._index()
        for name in self.hidden_edits():
            if name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "accounts.yaml changed account %s, but a stored change (admin API or CLI) overrides it; "
                    "`quota accounts diff %s` shows it, `quota accounts reset %s` drops it",
                    name,
                    name,
                    name,
                )

    def hidden_edits(self) -> list[str]:
        """Accounts whose accounts.yaml entry changed after a stored change was made on top of it."""
        return sorted(
            name
            for name, base in self.stored.items()
            if name in self.configured and base != fingerprint(self.configured[name])
        )

    def diff(self, name: str) -> dict[str, Any]:
        """What the stored overlay changes in an account, field by field ({} without an overlay)."""
        if name not in self.stored:
            return {}
        now = self._accounts[name].to_json()
        if name not in self.configured:
            return {"created": "through the admin API or CLI (not in accounts.yaml)", "account": now}
        was = self.configured[name].to_json()
        # Over both records' keys: a key only one has (an app's dated history) is a change too.
        changes = {
            k: {"accounts.yaml": was.get(k), "stored": now.get(k)}
            for k in dict.fromkeys((*was, *now))
            if now.get(k) != was.get(k)
        }
        return {"fields": changes, "hides_a_yaml_edit": name in self.hidden_edits()}

    async def reset(self, name: str, today: date) -> bool:
        """Drop the stored overlay of an account: accounts.yaml applies again (or the account goes),
        keeping the dated history of apps it held (its bills count them). ConflictError when the
        file's plan differs from the one a day up to today was served on (the bills of months
        served would change: change-plan instead), or when an app the file gives it is another
        account's now (two accounts would hold it)."""
        if self.store is None or name not in self.stored:
            return False
        configured, kept = self.configured.get(name), self._accounts[name]
        if configured is None and any(sub.start <= today for sub in kept.subscriptions):
            raise ConflictError(
                f"{name!r} exists only through the admin API or CLI and was served up to "
                f"{today.isoformat()}: a reset would delete it and its bills; cancel it instead"
            )
        if configured is not None and not same_plans_until(kept, configured, today):
            raise ConflictError(
                f"accounts.yaml's plan for {name!r} differs from the one it was served on up to "
                f"{today.isoformat()}: a reset would rewrite those bills; change-plan instead"
            )
        for app in configured.apps if configured is not None else ():
            holder = self.account_of(app)
            if holder is not None and holder.name != name:
                raise ConflictError(f"accounts.yaml gives {name!r} the app {app!r}, which {holder.name!r} holds now")
        await self.store.delete_account(name)
        self._warned.discard(name)
        await self.refresh()
        if configured is not None:
            # An app only the overlay gave it leaves today, its days kept as any detached app's.
            for app in kept.apps:
                if app not in configured.apps:
                    kept = detach(kept, app, today)
            if kept.former:
                dated = {app: day for app, day in kept.attached.items() if app in configured.apps}
                await self.save(replace(configured, former=kept.former, attached=dated))
        return True

    async def save(self, account: Account) -> None:
        if self.store is None:
            self._accounts[account.name] = account
            self._index()
            return
        record = {
            **account.to_json(),
            "base": fingerprint(self.configured[account.name]) if account.name in self.configured else None,
        }
        await self.store.save_account(account.name, record)
        await self.refresh()


def same_plans_until(a: Account, b: Account, day: date) -> bool:
    """Whether two accounts had the same plan on every day up to `day`: plans change only where a
    subscription starts or ends, so those days (and none before the first) are all to compare."""
    subs = (*a.subscriptions, *b.subscriptions)
    changes = {s.start for s in subs} | {s.end for s in subs if s.end is not None}
    return all(a.plan_on(d) == b.plan_on(d) for d in changes if d <= day)


def fingerprint(account: Account) -> str:
    """What an accounts.yaml entry looked like, to tell later whether it was edited."""
    return hashlib.sha256(json.dumps(account.to_json(), sort_keys=True).encode()).hexdigest()[:16]
