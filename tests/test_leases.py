"""Online users: connection leases, their caps (free 50; basic and pro max(floor, 10% of MAU);
enterprise custom), their expiry, and the month's peak. Programs run on every store at instants
the test chooses; the online set, MAU sets and the peak hash are read raw by their spelled-out keys."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from quota.config import load_config
from quota.decisions import lease_op
from quota.plans import AppPlan, Directory
from quota.store.program import Program, ReleaseOp
from tests.helpers import raw_deadlines, read_yaml, write_yaml

NOW = 1_800_000_000_000  # 2027-01-15 08:00 UTC, in ms
DAY = date(2027, 1, 15)


def app_of(appkey: str, config_dir: Path | None = None) -> AppPlan:
    cfg = load_config(config_dir)
    app = Directory(cfg.matrix, cfg.accounts).lookup(appkey, DAY)
    assert app is not None
    return app


async def connect(store: Any, app: AppPlan, n: int, now: int = NOW, first: int = 0, ttl: int = 60_000) -> list[bool]:
    out = []
    for i in range(first, first + n):
        out.append((await store.run(Program([lease_op(app, DAY, f"c{i}", ttl)]), now)).allowed)
    return out


async def add_mau(store: Any, key: str, n: int) -> None:
    for i in range(0, n, 5000):
        await store.add_members(key, [f"m{j}" for j in range(i, min(n, i + 5000))])


@pytest.mark.parametrize("appkey,floor", [("demo#basic", 500), ("demo#pro", 1000)])
async def test_online_floor_with_no_mau(store: Any, appkey: str, floor: int) -> None:
    """Catches the floors lost or wrong (500 basic, 1,000 pro): a new app with no MAU yet could hold
    no connection at all, or more than its floor."""
    app = app_of(appkey)
    allowed = await connect(store, app, floor + 1)
    assert allowed.count(True) == floor and allowed[-1] is False
    org, name = appkey.split("#")
    assert len(await raw_deadlines(store, f"q:{{{org}#{name}}}:online")) == floor


@pytest.mark.parametrize(
    "last,this,cap",
    [(6009, 0, 600), (0, 7009, 700), (6999, 5000, 699), (5004, 5009, 500)],
)
async def test_ten_percent_of_mau_rounds_down(store: Any, last: int, this: int, cap: int) -> None:
    """Catches 10% of MAU rounded up (6009 -> 601) or taken from one month only: on basic the cap
    is max(500, floor(10% x max(last month's MAU, this month's)))."""
    app = app_of("demo#basic")
    await add_mau(store, "q:{demo#basic}:mau:202612", last)
    await add_mau(store, "q:{demo#basic}:mau:202701", this)
    allowed = await connect(store, app, cap + 1)
    assert allowed.count(True) == cap and allowed[-1] is False


async def test_enterprise_online_cap_override(store: Any, config_dir: Path) -> None:
    """Catches the enterprise override of online_users ignored: an account whose contract says 3
    online users held the default floor of 1,000."""
    path = config_dir / "accounts.yaml"
    doc = read_yaml(path)
    doc["accounts"]["demo-enterprise"]["overrides"] = {"online_users": 3}
    write_yaml(path, doc)
    allowed = await connect(store, app_of("demo#enterprise", config_dir), 4)
    assert allowed == [True, True, True, False]


async def test_enterprise_default_online_cap(store: Any) -> None:
    """Catches enterprise's default (custom, 10% of MAU with a floor of 1,000) lost: uncapped, or
    capped at another plan's floor."""
    app = app_of("demo#enterprise")
    await add_mau(store, "q:{demo#enterprise}:mau:202701", 12345)
    allowed = await connect(store, app, 1235)
    assert allowed.count(True) == 1234 and allowed[-1] is False


async def test_free_online_cap_is_50(store: Any) -> None:
    """Catches free's fixed cap of 50 lost, or read as a share of MAU."""
    app = app_of("demo#free")
    await add_mau(store, "q:{demo#free}:mau:202701", 5000)
    allowed = await connect(store, app, 51)
    assert allowed.count(True) == 50 and allowed[-1] is False


async def test_lease_lapses_after_its_ttl(store: Any) -> None:
    """Catches leases that never expire (a killed worker's connections counted forever) or expire
    early: a lease taken at t counts until t + ttl - 1 ms and not at t + ttl."""
    app = app_of("demo#free")
    assert await connect(store, app, 50) == [True] * 50
    assert await connect(store, app, 1, now=NOW + 59_999, first=50) == [False]
    assert await connect(store, app, 1, now=NOW + 60_000, first=50) == [True]
    assert await store.online("q:{demo#free}:online", NOW + 60_000) == 1


async def test_renewed_lease_keeps_its_place(store: Any) -> None:
    """Catches a renewal counted as a new connection (a full app refusing its own live ones), or a
    renewal that does not move the deadline."""
    app = app_of("demo#free")
    assert await connect(store, app, 50) == [True] * 50
    assert await connect(store, app, 50, now=NOW + 30_000) == [True] * 50
    assert (await raw_deadlines(store, "q:{demo#free}:online"))["c0"] == NOW + 30_000 + 60_000
    assert await connect(store, app, 1, now=NOW + 60_000, first=50) == [False]
    release = Program([ReleaseOp("q:{demo#free}:online", "c0")])
    await store.run(release, NOW + 60_001)
    assert await connect(store, app, 1, now=NOW + 60_002, first=50) == [True]


async def test_a_rechecked_lease_fits_among_the_others_or_is_refused(store: Any) -> None:
    """Catches a renewal under a lowered cap vouched for by its own lease (a downgrade's connections
    all kept), or one refused though it fits: with 5 live and a cap of 2, rechecks are refused
    while the others fill the cap, and a refused one is left as it was (the connection's end
    releases it); once 2 are left, both recheck fine. A lapsed lease counts among no one."""
    app = app_of("demo#free")
    assert await connect(store, app, 5) == [True] * 5
    key = "q:{demo#free}:online"

    async def recheck(conn: str, now: int) -> bool:
        op = replace(lease_op(app, DAY, conn, 60_000), cap=2, recheck=True)
        return (await store.run(Program([op]), now)).allowed

    assert [await recheck(f"c{i}", NOW + 1) for i in range(5)] == [False] * 5
    for i in range(3):
        await store.run(Program([ReleaseOp(key, f"c{i}")]), NOW + 2)
    assert [await recheck(f"c{i}", NOW + 3) for i in (3, 4)] == [True, True]
    assert await store.online(key, NOW + 3) == 2
    assert not await recheck("c9", NOW + 4)  # a new one too: the cap is full
    assert await recheck("c9", NOW + 60_004)  # c3 and c4 lapsed: they count among no one


async def test_peak_online_is_recorded(store: Any) -> None:
    """Catches the month's peak of online users never recorded (or overwritten by a lower count)."""
    app = app_of("demo#pro")
    await connect(store, app, 7)
    for i in range(5):
        await store.run(Program([ReleaseOp("q:{demo#pro}:online", f"c{i}")]), NOW + 1)
    await connect(store, app, 1, now=NOW + 2, first=100)
    assert await store.peaks("q:{demo#pro}:peak") == {"202701": 7}
    if not hasattr(store, "peak"):
        assert await store.client.hget("q:{demo#pro}:peak", "202701") == b"7"


async def test_release_of_a_lapsed_lease(store: Any) -> None:
    """Catches a release that fails when its lease already lapsed and was purged (a connection
    that outlived a storage outage): it must end quietly and free nothing else."""
    app = app_of("demo#free")
    assert await connect(store, app, 2) == [True, True]
    assert await connect(store, app, 1, now=NOW + 60_000, first=9) == [True]  # purges c0 and c1
    await store.run(Program([ReleaseOp("q:{demo#free}:online", "c0")]), NOW + 60_001)
    assert await raw_deadlines(store, "q:{demo#free}:online") == {"c9": NOW + 120_000}
