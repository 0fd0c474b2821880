"""What the dashboard shows, read from the store: one month of an account, an app, a bill.

Everything here reads; nothing writes. The numbers come from the same functions as the CLI's
`quota usage --json` and `quota bill --json`, so the page and the CLI cannot disagree.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import unquote

from quota.accounts import Account, first_of_next_month
from quota.billing import AppPeak, Bill, bill_account, billing_plan, compute_bill, frozen_note, held_daily
from quota.display import day
from quota.entitlements import ENTITY_COUNTERS, entitlements
from quota.keys import app_prefix, side_prefix
from quota.metering import daily_active, monthly_active, peak_online
from quota.plans import Directory
from quota.store import Store

HOT_RATIO = 0.8
# Days of recent DAU the forecast fits its line to: long enough to smooth a weekend, short enough
# to follow a launch.
FORECAST_DAYS = 14


@dataclass(frozen=True)
class Cap:
    name: str
    used: int
    limit: int | None
    # The entity holding the most, for a per-entity cap (user:alice, group:123).
    entity: str | None = None

    @property
    def hot(self) -> bool:
        return self.limit is not None and self.used >= HOT_RATIO * self.limit


@dataclass(frozen=True)
class AppMonth:
    appkey: str
    plan: str | None
    today: date
    daily: dict[date, int]
    included_dau: int
    # None: not shown, the app having been another account's part of the month (both are counted
    # over the whole month, not per day).
    mau: int | None = 0
    peak_online: int | None = 0
    online_now: int = 0
    online_cap: int | None = None
    caps: tuple[Cap, ...] = ()
    features: dict[str, bool] = field(default_factory=dict)

    @property
    def today_dau(self) -> int:
        return self.daily.get(self.today, 0)

    @property
    def peak_dau(self) -> int:
        return max(self.daily.values(), default=0)

    @property
    def hot(self) -> tuple[Cap, ...]:
        return tuple(c for c in self.caps if c.hot)


@dataclass(frozen=True)
class AccountMonth:
    account: Account
    plan: str | None
    bill: Bill | None
    forecast: Bill | None
    apps: tuple[AppMonth, ...]
    notes: tuple[str, ...] = ()


def month_today(year: int, month: int, now: date) -> date:
    """The day a month's "today" figures are read on: today, or the last day of a past month."""
    last = date(year, month, calendar.monthrange(year, month)[1])
    if (year, month) > (now.year, now.month):
        raise ValueError(f"{year:04d}-{month:02d} has not started yet")
    return now if (year, month) == (now.year, now.month) else last


async def nearest_entities(store: Store, appkey: str, limits: dict[str, Any]) -> list[Cap]:
    """For each per-entity cap, the entity holding the most (SCAN: admin path only, never per request)."""
    prefix = app_prefix(appkey)
    found: list[Cap] = []
    for kind, counters in ENTITY_COUNTERS.items():
        for name, (relation, side) in counters.items():
            start = side_prefix(prefix, relation, side)
            # Keys of other kinds (reservations) carry a further ':'; an escaped id never does.
            keys = [k for k in await store.scan_prefix(start) if ":" not in k[len(start) :]]
            limit = limits.get(name)
            cap = limit if isinstance(limit, int) else None
            if not keys:
                found.append(Cap(name, 0, cap))
                continue
            sizes = await store.cardinalities(keys)
            size, key = max(zip(sizes, keys, strict=True), key=lambda sk: (sk[0], sk[1]))
            found.append(Cap(name, size, cap, f"{kind}:{unquote(key[len(start) :])}"))
    return found


async def app_month(
    directory: Directory,
    store: Store,
    appkey: str,
    year: int,
    month: int,
    today: date,
    holder: Account | None = None,
    *,
    at: float | None = None,
) -> AppMonth:
    """One app's month; seen as `holder`'s (a customer's, or an account page's row), only the days
    that account held it: what another account held before is that one's. `at`: the clock the
    online count is read by (the middleware's)."""
    ent = await entitlements(directory, store, appkey, today, at=at)
    prefix = app_prefix(appkey)
    daily = await daily_active(store, prefix, year, month)
    whole = True
    if holder is not None:
        daily = {d: n for d, n in daily.items() if holder.held_on(appkey, d)}
        first = date(year, month, 1)
        whole = all(
            holder.held_on(appkey, date.fromordinal(n)) for n in range(first.toordinal(), today.toordinal() + 1)
        )
    app = directory.lookup(appkey, today)
    assert app is not None  # entitlements() raised UnknownAppError otherwise
    usage = ent["usage"]
    if holder is not None and not holder.held_on(appkey, today):
        usage.pop("included_dau")  # today's users are the account that held the app this morning's
    caps = [Cap(name, u["used"], u["limit"]) for name, u in usage.items()]
    caps += await nearest_entities(store, appkey, app.limits)
    online = ent["usage"]["online_users"]
    return AppMonth(
        appkey=appkey,
        plan=ent["plan"],
        today=today,
        daily=daily,
        included_dau=app.plan.price.included_dau,
        mau=await monthly_active(store, prefix, year, month) if whole else None,
        peak_online=await peak_online(store, prefix, year, month) if whole else None,
        online_now=online["used"],
        online_cap=online["limit"],
        caps=tuple(caps),
        features=dict(ent["features"]),
    )


def forecast_peak(daily: dict[date, int], today: date) -> int:
    """The month's peak DAU if the last FORECAST_DAYS days' trend (least squares) runs to its end.

    Never below the peak already reached: a peak, once billed, cannot shrink.
    """
    seen = [(d.day, n) for d, n in daily.items() if d <= today]
    peak = max((n for _, n in seen), default=0)
    recent = seen[-FORECAST_DAYS:]
    if len(recent) < 2:
        return peak
    mean_x = sum(x for x, _ in recent) / len(recent)
    mean_y = sum(y for _, y in recent) / len(recent)
    spread = sum((x - mean_x) ** 2 for x, _ in recent)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in recent) / spread
    ahead = range(today.day, max(d.day for d in daily) + 1)
    if not ahead:
        return peak  # the days to come are not this account's (an app detached before today)
    projected = max(mean_y + slope * (x - mean_x) for x in ahead)
    return max(peak, round(projected))


def plan_notes(account: Account, year: int, month: int) -> list[str]:
    """What a person reading the bill should know about plan changes around this month."""
    first = date(year, month, 1)
    following = first_of_next_month(first)
    notes = []
    billed, started = billing_plan(account, year, month)
    if started is not None:
        notes.append(f"subscribed to {billed} on {day(started)}: the fee is prorated")
    for sub in account.subscriptions:
        if sub.start == following:
            notes.append(f"changes to {sub.plan} on {day(sub.start)}; this month stays on {billed}")
        if sub.end == following and not any(s.start == following for s in account.subscriptions):
            notes.append(f"cancelled: the subscription ends on {day(following)}")
    return notes


async def account_month(
    directory: Directory, store: Store, account: Account, year: int, month: int, now: date, *, at: float | None = None
) -> AccountMonth:
    today = month_today(year, month, now)
    plan, started = billing_plan(account, year, month)
    apps = []
    for appkey in account.apps:
        if directory.lookup(appkey, today) is not None:
            apps.append(await app_month(directory, store, appkey, year, month, today, account, at=at))
    bill = forecast = None
    if plan is not None:
        bill = await bill_account(directory, store, account.name, year, month, today=now)
        # The apps the bill counts, on the days it counts them (not only those held now).
        held = await held_daily(store, account, year, month)
        peaks = [AppPeak(appkey, forecast_peak(daily, today)) for appkey, daily in held.items()]
        forecast = compute_bill(
            directory.matrix.plans[plan], peaks, year, month, account=account.name, subscribed_on=started
        )
    notes = plan_notes(account, year, month)
    frozen = frozen_note(account, min(now, date(year, month, calendar.monthrange(year, month)[1])))
    if bill is None and frozen:
        notes.append(frozen)  # a bill says it itself, and the page shows the bill's notes too
    return AccountMonth(account, plan, bill, forecast, tuple(apps), tuple(notes))
