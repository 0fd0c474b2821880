"""A month of an IM service's activity, written straight into a redis-server the tests started.

The same keys the middleware writes (quota/keys.py): DAU and MAU sets, the peak-online hash,
connection leases, membership sets. Sizes follow a trend with a weekly dip, so charts and the
forecast have something to show, and every figure is known to the test.
"""

from __future__ import annotations

import calendar
import shutil
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import redis as redis_sync

from quota.keys import app_prefix, dau_key, mau_key, online_key, peak_key, set_key
from tests.conftest import ROOT


@dataclass
class AppActivity:
    appkey: str
    base: int
    growth: int
    # (relation, side, entity) -> members
    sets: dict[tuple[str, str, str], int] = field(default_factory=dict)
    online: int = 0
    peak_online: int = 0

    def dau(self, d: date) -> int:
        weekend = 0.8 if d.weekday() >= 5 else 1.0
        return int((self.base + self.growth * d.day) * weekend)


def previous_month(today: date | None = None) -> tuple[int, int]:
    today = today or date.today()
    return (today.year - 1, 12) if today.month == 1 else (today.year, today.month - 1)


def fill(port: int, apps: list[AppActivity], year: int, month: int) -> dict[str, dict[date, int]]:
    """Write the month; returns each app's DAU per day as written."""
    client = redis_sync.Redis(port=port)
    pipe = client.pipeline(transaction=False)
    written: dict[str, dict[date, int]] = {}
    for app in apps:
        prefix = app_prefix(app.appkey)
        days = [date(year, month, d) for d in range(1, calendar.monthrange(year, month)[1] + 1)]
        written[app.appkey] = {}
        everyone = 0
        for d in days:
            n = app.dau(d)
            written[app.appkey][d] = n
            # Users rotate through the month, so MAU is more than any day's DAU.
            first = d.day * 97
            members = [f"u{i}" for i in range(first, first + n)]
            for i in range(0, n, 5000):
                pipe.sadd(dau_key(prefix, d), *members[i : i + 5000])
            everyone = max(everyone, first + n)
        for i in range(0, everyone, 5000):
            pipe.sadd(mau_key(prefix, year, month), *[f"u{j}" for j in range(i, min(everyone, i + 5000))])
        if app.peak_online:
            pipe.hset(peak_key(prefix), f"{year:04d}{month:02d}", app.peak_online)
        if app.online:
            expires = int(time.time() * 1000) + 3_600_000
            pipe.zadd(online_key(prefix), {f"c{i}": expires for i in range(app.online)})
        for (relation, side, entity), size in app.sets.items():
            pipe.sadd(set_key(prefix, relation, side, entity), *[f"m{i}" for i in range(size)])
        pipe.execute()
    client.close()
    return written


def config_with(target: Path, accounts_yaml: str) -> Path:
    """The shipped config with more accounts appended."""
    shutil.copytree(ROOT / "config", target)
    with open(target / "accounts.yaml", "a", encoding="utf-8") as f:
        f.write(accounts_yaml)
    return target
