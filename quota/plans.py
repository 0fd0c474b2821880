"""Who is on which plan: an in-process snapshot of app -> account -> plan, refreshed on change.

Requests read the snapshot only; the middleware asks the store for the accounts' version in the
background (once a second), never on the request path, and calls refresh() when it moved.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import date

from quota.accounts import Account
from quota.keys import app_prefix
from quota.matrix import LimitValue, Matrix, Plan
from quota.store import Store


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


class Directory:
    def __init__(self, matrix: Matrix, accounts: dict[str, Account], store: Store | None = None) -> None:
        self.matrix = matrix
        self.configured = dict(accounts)
        self.store = store
        self.version = -1
        self._accounts = dict(accounts)
        self._apps: dict[str, str] = {}
        self._cache: dict[str, AppPlan | None] = {}
        self._day: date | None = None
        self._index()

    def _index(self) -> None:
        self._apps = {app: acc.name for acc in self._accounts.values() for app in acc.apps}
        self._cache = {}

    @property
    def accounts(self) -> dict[str, Account]:
        return self._accounts

    def account_of(self, appkey: str) -> Account | None:
        name = self._apps.get(appkey)
        return self._accounts.get(name) if name else None

    def lookup(self, appkey: str, today: date) -> AppPlan | None:
        if today != self._day:
            self._cache, self._day = {}, today
        try:
            return self._cache[appkey]
        except KeyError:
            pass
        account = self.account_of(appkey)
        found = None
        if account is not None:
            plan_name = account.plan_on(today)
            plan = self.matrix.plans.get(plan_name) if plan_name else None
            if plan is not None:
                allow = tuple(ipaddress.ip_network(n, strict=False) for n in account.ip_allowlist)
                found = AppPlan(appkey, app_prefix(appkey), account, plan, effective_limits(plan, account), allow)
        # Only apps with a plan are cached: a miss costs two dict lookups, and caching misses let a
        # client grow the cache without bound by naming a fresh unknown app on every request.
        if found is not None:
            self._cache[appkey] = found
        return found

    async def refresh(self) -> None:
        """Reload accounts changed at run time; those in the store win over the config file's."""
        if self.store is None:
            return
        version, records = await self.store.load_accounts()
        if version == self.version:
            return
        merged = dict(self.configured)
        merged.update({name: Account.from_json(rec) for name, rec in records.items()})
        self._accounts, self.version = merged, version
        self._index()

    async def save(self, account: Account) -> None:
        if self.store is None:
            self._accounts[account.name] = account
            self._index()
            return
        await self.store.save_account(account.name, account.to_json())
        await self.refresh()
