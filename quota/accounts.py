"""Accounts, their apps and their subscriptions, as effective-dated records."""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any

from quota.errors import ConflictError

# A frozen account's data is kept this long before it may be purged (seed: 6 个月).
RETENTION_MONTHS_WHEN_FROZEN = 6


@dataclass(frozen=True)
class Subscription:
    """One plan in force from `start` (inclusive) to `end` (exclusive, None = open-ended)."""

    plan: str
    start: date
    end: date | None = None

    def covers(self, day: date) -> bool:
        return self.start <= day and (self.end is None or day < self.end)


@dataclass(frozen=True)
class AppSpan:
    """An app an account held from `start` (inclusive; None: from the first) to `end` (exclusive)."""

    app: str
    start: date | None
    end: date


# Detached apps' spans are kept this long for the bills of the months they cover.
SPANS_KEPT_MONTHS = 24


@dataclass(frozen=True)
class Account:
    name: str
    apps: tuple[str, ...]
    subscriptions: tuple[Subscription, ...]
    overrides: dict[str, int | None] = field(default_factory=dict)
    frozen_on: date | None = None
    ip_allowlist: tuple[str, ...] = ()
    # SHA-256 (hex) of the token the customer signs in to the dashboard with; the token is never kept.
    dashboard_token_sha256: str | None = None
    # The day each app attached after the account was made joined it (the others: from the first).
    attached: dict[str, date] = field(default_factory=dict)
    # The apps it held before, and when: a month is billed on the apps the account held that month.
    former: tuple[AppSpan, ...] = ()

    def subscription_on(self, day: date) -> Subscription | None:
        for sub in self.subscriptions:
            if sub.covers(day):
                return sub
        return None

    def plan_on(self, day: date) -> str | None:
        sub = self.subscription_on(day)
        return sub.plan if sub else None

    def held_on(self, app: str, day: date) -> bool:
        """Whether the account held `app` on `day`: its bill counts that day's activity."""
        if app in self.apps and (app not in self.attached or self.attached[app] <= day):
            return True
        return any(s.app == app and (s.start is None or s.start <= day) and day < s.end for s in self.former)

    def billed_apps(self) -> tuple[str, ...]:
        """Every app a bill may count: those held now, then those held before."""
        return tuple(dict.fromkeys((*self.apps, *(s.app for s in self.former))))

    @property
    def purge_after(self) -> date | None:
        return add_months(self.frozen_on, RETENTION_MONTHS_WHEN_FROZEN) if self.frozen_on else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "apps": list(self.apps),
            "overrides": dict(self.overrides),
            "subscriptions": [
                {"plan": s.plan, "start": s.start.isoformat(), "end": s.end.isoformat() if s.end else None}
                for s in self.subscriptions
            ],
            "frozen_on": self.frozen_on.isoformat() if self.frozen_on else None,
            "purge_after": self.purge_after.isoformat() if self.purge_after else None,
            "ip_allowlist": list(self.ip_allowlist),
            "dashboard_token_sha256": self.dashboard_token_sha256,
        }
        # Only when held: a record without them hashes as it did before apps were dated (the
        # directory's fingerprint of an accounts.yaml entry an overlay was stored over).
        if self.attached:
            out["attached"] = {app: day.isoformat() for app, day in self.attached.items()}
        if self.former:
            out["former"] = [
                {"app": s.app, "start": s.start.isoformat() if s.start else None, "end": s.end.isoformat()}
                for s in self.former
            ]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Account:
        return cls(
            name=data["name"],
            apps=tuple(data["apps"]),
            overrides=dict(data.get("overrides") or {}),
            subscriptions=tuple(
                Subscription(
                    s["plan"], date.fromisoformat(s["start"]), date.fromisoformat(s["end"]) if s["end"] else None
                )
                for s in data["subscriptions"]
            ),
            frozen_on=date.fromisoformat(data["frozen_on"]) if data.get("frozen_on") else None,
            ip_allowlist=tuple(data.get("ip_allowlist") or ()),
            dashboard_token_sha256=data.get("dashboard_token_sha256"),
            # Records stored before apps were dated hold neither.
            attached={app: date.fromisoformat(day) for app, day in (data.get("attached") or {}).items()},
            former=tuple(
                AppSpan(s["app"], date.fromisoformat(s["start"]) if s["start"] else None, date.fromisoformat(s["end"]))
                for s in data.get("former") or ()
            ),
        )


def first_of_next_month(day: date) -> date:
    return add_months(day.replace(day=1), 1)


def add_months(day: date, months: int) -> date:
    month0 = day.month - 1 + months
    year, month = day.year + month0 // 12, month0 % 12 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def subscribe(account: Account, plan: str, today: date) -> Account:
    """Subscribing takes effect at once, for an account with no plan in force that day or later (a
    change of plan waits for the 1st of next month: `change_plan`). A month is billed on the plan in force on
    its 1st, so a plan started over another mid-month would be served and never billed."""
    # In force that day or after it (a subscribe dated before a plan that is in force would drop it).
    held = next((s for s in account.subscriptions if s.end is None or s.end > today), None)
    if held is not None:
        raise ConflictError(
            f"account {account.name!r} has plan {held.plan!r} from {held.start.isoformat()}: "
            "change-plan switches it on the 1st of next month"
        )
    kept = tuple(_close(s, today) for s in account.subscriptions if s.start < today)
    return replace(account, subscriptions=(*kept, Subscription(plan, today)))


def change_plan(account: Account, plan: str, today: date) -> Account:
    """A change takes effect on the 1st of next month; this month stays on the old plan."""
    switch = first_of_next_month(today)
    kept = tuple(_close(s, switch) for s in account.subscriptions if s.start < switch)
    return replace(account, subscriptions=(*kept, Subscription(plan, switch)))


def cancel(account: Account, today: date) -> Account:
    switch = first_of_next_month(today)
    return replace(account, subscriptions=tuple(_close(s, switch) for s in account.subscriptions if s.start < switch))


def attach(account: Account, app: str, since: date) -> Account:
    """The account holds `app`, and its bills count the app's activity from `since`."""
    if app in account.apps:
        return account
    return replace(account, apps=(*account.apps, app), attached={**account.attached, app: since})


def detach(account: Account, app: str, today: date) -> Account:
    """The account holds `app` no more; its bills keep the days it did, today included (the day of
    a move is the old account's: `billed_from`)."""
    span = AppSpan(app, account.attached.get(app), today + timedelta(days=1))
    oldest = add_months(today, -SPANS_KEPT_MONTHS)
    former = tuple(s for s in (*account.former, span) if s.end >= oldest and (s.start is None or s.start < s.end))
    return replace(
        account,
        apps=tuple(a for a in account.apps if a != app),
        attached={a: d for a, d in account.attached.items() if a != app},
        former=former,
    )


def billed_from(accounts: list[Account], app: str, today: date) -> date | None:
    """The first day an account that takes `app` today bills, when another held it before: the day
    after the last one's bills end. None: no account held it (nothing of its activity is billed
    elsewhere)."""
    ends = [s.end for account in accounts for s in account.former if s.app == app]
    return max(today, *ends) if ends else None


def freeze(account: Account, today: date) -> Account:
    return replace(account, frozen_on=account.frozen_on or today)


def unfreeze(account: Account) -> Account:
    return replace(account, frozen_on=None)


def _close(sub: Subscription, end: date) -> Subscription:
    if sub.end is None or sub.end > end:
        return replace(sub, end=end)
    return sub


def month_days(year: int, month: int) -> list[date]:
    return [date(year, month, 1) + timedelta(days=i) for i in range(calendar.monthrange(year, month)[1])]
