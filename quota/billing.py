"""The monthly bill: fee = plan fee + excess DAU x overage price (元 per 10,000 DAU).

Usage is, for each app of the account, its peak daily DAU in the month, summed over the apps
(the seed's example: (82,370 + 17,865 - 10,000) x 0.085 + 888 = 8,557.975). An app attached or
detached during the month counts the days the account held it.

A month that starts a subscription pays the fee prorated by days used / days in the month (the
seed). The included DAU is not prorated: it bounds a daily peak, and a day's peak is no smaller
for having fewer days in the month; shrinking it would bill a late subscriber for usage the full
month would include. Changes and cancellations take effect on the 1st of next month, so the
current month is billed whole on the plan it started with. Exact decimals, rounded once, at the
end, to 0.001 元, half up.

A month is billed from its first day on: the current month's bill is the month so far (`final` is
false, and a note says when it closes); a month not begun has no bill, since its usage does not
exist yet and a plan fee billed ahead would be money for nothing served.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field, replace
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from quota.accounts import Account
from quota.keys import app_prefix
from quota.matrix import Plan
from quota.metering import daily_active

TEN_THOUSAND = Decimal(10000)
CENTS = Decimal("0.001")


@dataclass(frozen=True)
class AppPeak:
    app: str
    peak_dau: int
    day: date | None = None


@dataclass(frozen=True)
class Bill:
    account: str
    month: str
    plan: str
    apps: tuple[AppPeak, ...]
    usage: int
    included: int
    excess: int
    plan_fee: Decimal
    prorated_days: tuple[int, int] | None
    overage_price: Decimal | None
    overage: Decimal
    total: Decimal
    notes: tuple[str, ...] = field(default_factory=tuple)
    # False while the month runs: its peaks may still rise.
    final: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "month": self.month,
            "plan": self.plan,
            "apps": [
                {"app": a.app, "peak_dau": a.peak_dau, "day": a.day.isoformat() if a.day else None} for a in self.apps
            ],
            "usage": self.usage,
            "included_dau": self.included,
            "excess": self.excess,
            "plan_fee": str(self.plan_fee),
            "prorated_days": list(self.prorated_days) if self.prorated_days else None,
            "overage_per_10k_dau": None if self.overage_price is None else str(self.overage_price),
            "overage": str(self.overage),
            "total": str(self.total),
            "final": self.final,
            "notes": list(self.notes),
        }


def compute_bill(
    plan: Plan, apps: list[AppPeak], year: int, month: int, *, account: str = "-", subscribed_on: date | None = None
) -> Bill:
    days_in_month = calendar.monthrange(year, month)[1]
    fee = plan.price.monthly_fee
    prorated = None
    if subscribed_on is not None and (subscribed_on.year, subscribed_on.month) == (year, month):
        used_days = days_in_month - subscribed_on.day + 1
        prorated = (used_days, days_in_month)
        fee = fee * used_days / days_in_month
    usage = sum(a.peak_dau for a in apps)
    included = plan.price.included_dau
    excess = max(0, usage - included)
    notes: list[str] = []
    price = plan.price.overage_per_10k_dau
    if price is None:
        overage = Decimal(0)
        if excess:
            notes.append(f"plan {plan.name} has no overage: logins past {included} DAU are refused")
    else:
        overage = Decimal(excess) * price / TEN_THOUSAND
    total = (fee + overage).quantize(CENTS, rounding=ROUND_HALF_UP)
    return Bill(
        account=account,
        month=f"{year:04d}-{month:02d}",
        plan=plan.name,
        apps=tuple(apps),
        usage=usage,
        included=included,
        excess=excess,
        plan_fee=fee.quantize(CENTS, rounding=ROUND_HALF_UP),
        prorated_days=prorated,
        overage_price=price,
        overage=overage.quantize(CENTS, rounding=ROUND_HALF_UP),
        total=total,
        notes=tuple(notes),
    )


def billing_plan(account: Account, year: int, month: int) -> tuple[str | None, date | None]:
    """The plan a month is billed on, and the subscription start if it falls in that month.

    The plan in force on the month's first day wins (changes wait for the 1st of next month);
    an account that subscribed during the month is billed on that subscription, prorated.
    """
    first = date(year, month, 1)
    last = date(year, month, calendar.monthrange(year, month)[1])
    sub = account.subscription_on(first)
    if sub is not None:
        return sub.plan, None
    for s in account.subscriptions:
        if first <= s.start <= last:
            return s.plan, s.start
    return None, None


async def held_daily(store: Any, account: Account, year: int, month: int) -> dict[str, dict[date, int]]:
    """Each app the account held in the month, with its DAU on the days it held it: an app detached
    (or moved to another account) before the bill is run still counts the days it was this one's."""
    out = {}
    for appkey in account.billed_apps():
        daily = await daily_active(store, app_prefix(appkey), year, month)
        held = {d: n for d, n in daily.items() if account.held_on(appkey, d)}
        if held:
            out[appkey] = held
    return out


def check_begun(year: int, month: int, today: date) -> None:
    """ValueError for a month after today's: it has no usage yet, and no bill."""
    if (year, month) > (today.year, today.month):
        raise ValueError(
            f"{year:04d}-{month:02d} has not begun (today is {today.isoformat()}): "
            "a month is billed from its first day on"
        )


async def bill_account(directory: Any, store: Any, name: str, year: int, month: int, *, today: date) -> Bill:
    """Bill one account's month from stored activity (its apps' daily DAU sets), as of `today`."""
    account: Account | None = directory.accounts.get(name)
    if account is None:
        raise KeyError(f"unknown account {name!r}")
    check_begun(year, month, today)
    plan_name, started = billing_plan(account, year, month)
    if plan_name is None:
        raise KeyError(f"account {name!r} had no subscription in {year:04d}-{month:02d}")
    peaks = []
    for appkey, daily in (await held_daily(store, account, year, month)).items():
        day, peak = max(daily.items(), key=lambda kv: (kv[1], -kv[0].toordinal()))
        peaks.append(AppPeak(appkey, peak, day if peak else None))
    bill = compute_bill(directory.matrix.plans[plan_name], peaks, year, month, account=name, subscribed_on=started)
    notes = list(bill.notes)
    last = date(year, month, calendar.monthrange(year, month)[1])
    final = today > last
    if not final:
        notes.insert(0, f"month not over: usage to {today.isoformat()}; the bill is final after {last.isoformat()}")
    frozen = frozen_note(account, min(today, last))
    if frozen:
        notes.append(frozen)
    return replace(bill, notes=tuple(notes), final=final)


def frozen_note(account: Account, by: date) -> str | None:
    """What a bill read on `by` says of a frozen account; None when it was not frozen by then.

    Freezing stops service, not the subscription: the fee runs until the plan is cancelled.
    """
    if account.frozen_on is None or account.frozen_on > by or account.purge_after is None:
        return None
    return (
        f"account frozen since {account.frozen_on.isoformat()}: its requests are refused and its data "
        f"may be purged after {account.purge_after.isoformat()}; cancel the plan to stop its fee"
    )
