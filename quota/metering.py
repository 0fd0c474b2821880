"""Metering: DAU and MAU as exact sets, peak online, read back for usage reports and bills."""

from __future__ import annotations

import calendar
from datetime import date, timedelta
from typing import TYPE_CHECKING

from quota.accounts import month_days
from quota.keys import dau_key, mau_key, peak_key
from quota.store import Store

if TYPE_CHECKING:
    from quota.plans import Directory


async def mau_pair(store: Store, prefix: str, today: date) -> tuple[int, int]:
    last = today.replace(day=1) - timedelta(days=1)
    counts = await store.cardinalities(
        [mau_key(prefix, last.year, last.month), mau_key(prefix, today.year, today.month)]
    )
    return counts[0], counts[1]


async def daily_active(store: Store, prefix: str, year: int, month: int) -> dict[date, int]:
    days = month_days(year, month)
    counts = await store.cardinalities([dau_key(prefix, d) for d in days])
    return dict(zip(days, counts, strict=True))


async def monthly_active(store: Store, prefix: str, year: int, month: int) -> int:
    return (await store.cardinalities([mau_key(prefix, year, month)]))[0]


async def peak_online(store: Store, prefix: str, year: int, month: int) -> int:
    return (await store.peaks(peak_key(prefix))).get(f"{year:04d}{month:02d}", 0)


async def usage_report(
    directory: Directory, store: Store, appkey: str, year: int, month: int, today: date
) -> dict[str, object]:
    """DAU per day, MAU, peak online, and each counted limit against its cap. `today` is the
    caller's (the middleware's clock, in UTC), as for everything served."""
    from quota.entitlements import entitlements
    from quota.keys import app_prefix

    prefix = app_prefix(appkey)
    # The plan as the month ends (or today, for this month): an app subscribed mid-month had no
    # plan on the 1st, and its month still has usage to report.
    last = date(year, month, calendar.monthrange(year, month)[1])
    day = max(date(year, month, 1), min(today, last))
    ent = await entitlements(directory, store, appkey, day)
    app = directory.lookup(appkey, day)
    assert app is not None  # entitlements() raised UnknownAppError otherwise
    daily = await daily_active(store, prefix, year, month)
    return {
        "app": appkey,
        "month": f"{year:04d}-{month:02d}",
        "plan": ent["plan"],
        "dau": {d.isoformat(): n for d, n in daily.items()},
        "peak_dau": max(daily.values()),
        "included_dau": app.plan.price.included_dau,
        "mau": await monthly_active(store, prefix, year, month),
        "peak_online": await peak_online(store, prefix, year, month),
        "limits": ent["usage"],
    }
