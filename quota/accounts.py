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
class Account:
    name: str
    apps: tuple[str, ...]
    subscriptions: tuple[Subscription, ...]
    overrides: dict[str, int | None] = field(default_factory=dict)
    frozen_on: date | None = None
    ip_allowlist: tuple[str, ...] = ()
    # SHA-256 (hex) of the token the customer signs in to the dashboard with; the token is never kept.
    dashboard_token_sha256: str | None = None

    def subscription_on(self, day: date) -> Subscription | None:
        for sub in self.subscriptions:
            if sub.covers(day):
                return sub
        return None

    def plan_on(self, day: date) -> str | None:
        sub = self.subscription_on(day)
        return sub.plan if sub else None

    @property
    def purge_after(self) -> date | None:
        return add_months(self.frozen_on, RETENTION_MONTHS_WHEN_FROZEN) if self.frozen_on else None

    def to_json(self) -> dict[str, Any]:
        return {
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
        )


def first_of_next_month(day: date) -> date:
    return add_months(day.replace(day=1), 1)


def add_months(day: date, months: int) -> date:
    month0 = day.month - 1 + months
    year, month = day.year + month0 // 12, month0 % 12 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def subscribe(account: Account, plan: str, today: date) -> Account:
    """Subscribing takes effect at once, for an account with no plan in force that day (a change of
    plan waits for the 1st of next month: `change_plan`). A month is billed on the plan in force on
    its 1st, so a plan started over another mid-month would be served and never billed."""
    held = account.subscription_on(today)
    if held is not None:
        raise ConflictError(
            f"account {account.name!r} has plan {held.plan!r} in force on {today.isoformat()}: "
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
