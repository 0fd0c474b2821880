"""The memory store's own machinery: its rate-only shortcut against its general program path and
against limits, field by field, and the bounds on its rate state (the sweep and MAX_RATE_KEYS)."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from quota.billing import AppPeak, compute_bill
from quota.config import load_config
from quota.store.memory import SWEEP_EVERY, MemoryStore
from quota.store.program import UNLIMITED, AddOp, DrainOp, DropOp, LeaseOp, Outcome, Program, RateOp
from tests.store.test_rates import schedule

KEY = "q:{demo#pro}:r:users.get:rest_per_ip:10.1.2.3"


def _fields(outcome: Outcome) -> tuple[Any, ...]:
    refusal = outcome.refusal
    if refusal is not None:
        return ("refused", refusal.kind, refusal.used, refusal.cap, refusal.retry_after_ms, refusal.reset_ms)
    (state,) = outcome.rates
    return ("allowed", state.name, state.limit, state.remaining, state.reset_ms)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("limit,window_ms", [(1, 1000), (3, 1000), (5, 1000), (2, 60_000)])
async def test_rate_only_shortcut_equals_the_program_path(seed: int, limit: int, window_ms: int) -> None:
    """Catches the rate-only shortcut (`_rate_only`, every read route) drifting from the general
    program path or from limits: each hit of a random schedule gets the same decision, remaining
    budget, reset, used count and Retry-After both ways, and the same decision as limits."""
    shortcut, general = MemoryStore(), MemoryStore()
    item = RateLimitItemPerSecond(limit, window_ms // 1000)
    reference = SlidingWindowCounterRateLimiter(MemoryStorage())
    for i, now_ms in enumerate(schedule(seed, 300)):
        op = RateOp(KEY, limit, window_ms, 1, "rest_per_ip")
        fast = await shortcut.run(Program([op]), now_ms)
        slow = await general.run(Program([op, AddOp("", "q:{demo#pro}:s:x:o:y", UNLIMITED, (f"m{i}",))]), now_ms)
        assert _fields(fast) == _fields(slow), (i, now_ms)
        if window_ms == 1000:
            with mock.patch("time.time", return_value=now_ms / 1000):
                assert fast.allowed == await reference.hit(item, "k"), (i, now_ms)
        if fast.refusal is not None:
            assert fast.refusal.op_index == 0 and fast.refusal.retry_after_ms >= 1


async def test_refusal_fields_of_the_shortcut() -> None:
    """Catches the shortcut's refusal losing its kind, its reset or its used count: 3/s, three hits
    250 ms into a second, the fourth refused with used 3, reset 750 ms, retry 751 ms."""
    store = MemoryStore()
    op = RateOp(KEY, 3, 1000, 1, "rest_per_ip")
    now = 5_000_250
    states = [(await store.run(Program([op]), now)).rates[0] for _ in range(3)]
    assert [(s.remaining, s.reset_ms) for s in states] == [(2, 750), (1, 750), (0, 750)]
    refused = (await store.run(Program([op]), now)).refusal
    assert refused is not None
    assert (refused.kind, refused.used, refused.cap, refused.reset_ms, refused.retry_after_ms) == (
        "rate",
        3,
        3,
        750,
        751,
    )
    # Next second, 400 ms in: the previous window weighs 3 x 0.6 = 1.8 -> 1; two more fit.
    later = [(await store.run(Program([op]), now + 1150)).allowed for _ in range(3)]
    assert later == [True, True, False]


async def test_sweep_keeps_live_windows() -> None:
    """Catches the periodic sweep (every SWEEP_EVERY counted hits) dropping windows that still
    count: a client at its limit stays refused after thousands of other clients' hits."""
    store = MemoryStore()
    now = 7_000_000_100
    busy = RateOp(KEY, 5, 1000, 1, "rest_per_ip")
    for _ in range(5):
        assert (await store.run(Program([busy]), now)).allowed
    for i in range(SWEEP_EVERY):
        other = RateOp(f"q:{{demo#pro}}:r:users.get:rest_per_ip:c{i}", 5, 1000, 1, "rest_per_ip")
        assert (await store.run(Program([other]), now + 1)).allowed
    assert not (await store.run(Program([busy]), now + 2)).allowed
    # Windows that can no longer count are swept: two windows after, the old keys are gone.
    for i in range(SWEEP_EVERY):
        other = RateOp(f"q:{{demo#pro}}:r:users.get:rest_per_ip:d{i}", 5, 1000, 1, "rest_per_ip")
        await store.run(Program([other]), now + 3000)
    assert KEY not in store.windows and len(store.windows) <= SWEEP_EVERY + 1


@pytest.mark.parametrize("alone", [True, False])
async def test_a_late_hit_keeps_its_window_alive(alone: bool) -> None:
    """Catches a hit dated a window late (its body came in slowly) shortening its key's life: the
    sweep then dropped a window that still counted, and a client near its limit had a fresh budget."""
    store = MemoryStore()
    base = 7_000_000_000
    busy = RateOp(KEY, 5, 1000, 1, "rest_per_ip")
    beside = [] if alone else [RateOp(f"{KEY}:beside", 1 << 20, 60_000, 1, "rest_per_ip")]
    for now_ms in (base + 1100, base + 1100, base + 1100, base + 900):
        assert (await store.run(Program([busy, *beside]), now_ms)).allowed
    for i in range(SWEEP_EVERY):
        other = RateOp(f"q:{{demo#pro}}:r:users.get:rest_per_ip:c{i}", 5, 1000, 1, "rest_per_ip")
        await store.run(Program([other]), base + 2001)
    # 1 ms into the next window the three weigh 3 x 999/1000, 2: two more fit (five, swept).
    outcome = await store.run(Program([busy]), base + 2001)
    assert outcome.allowed and outcome.rates[0].remaining == 2


@pytest.mark.parametrize("with_counter", [False, True])
async def test_rate_state_is_bounded(with_counter: bool) -> None:
    """Catches MAX_RATE_KEYS not enforced (memory grows with every client): past the bound the
    oldest keys lose their windows, the newest keep theirs (README's threat model); on the rate-only
    path and on the program path (a rate beside a counter: every write)."""
    store = MemoryStore(max_rate_keys=3)
    now = 8_000_000_100
    ops = [RateOp(f"q:{{demo#pro}}:r:users.get:rest_per_ip:k{i}", 1, 1000, 1, "rest_per_ip") for i in range(5)]
    extra = [AddOp("", "q:{demo#pro}:s:x:o:y", UNLIMITED, ("m",))] if with_counter else []
    for op in ops:
        assert (await store.run(Program([op, *extra]), now)).allowed
    assert len(store.windows) == 3 and set(store.windows) == {op.key for op in ops[2:]}
    assert not (await store.run(Program([ops[4], *extra]), now)).allowed
    assert (await store.run(Program([ops[0], *extra]), now)).allowed


async def test_exact_logs_are_bounded_too() -> None:
    """Catches exact (log) rate keys never forgotten past MAX_RATE_KEYS, or forgetting a log key
    failing because it has no sliding windows."""
    store = MemoryStore(max_rate_keys=2)
    now = 8_100_000_000_100
    ops = [RateOp(f"q:{{demo#pro}}:r:users.get:rest_per_ip:e{i}", 1, 1000, 1, "rest_per_ip", True) for i in range(3)]
    for op in ops:
        assert (await store.run(Program([op]), now)).allowed
    assert set(store.logs) == {ops[1].key, ops[2].key}
    assert not (await store.run(Program([ops[2]]), now)).allowed
    assert (await store.run(Program([ops[0]]), now)).allowed


async def test_past_the_bound_the_soonest_to_end_go_first() -> None:
    """Catches the bound forgetting the oldest key first: an app's day of broadcasts (1 a day here),
    hit first, was dropped for four clients' per-second windows, and a second broadcast passed
    (found by the audit of 2026-12-02). The windows that would end soonest go instead."""
    store = MemoryStore(max_rate_keys=4)
    now = 8_200_000_000_000
    day = RateOp("q:{demo#pro}:r:messages.broadcast:day:app", 1, 86_400_000, 1, "day", True)
    assert (await store.run(Program([day]), now)).allowed
    for i in range(4):
        other = RateOp(f"q:{{demo#pro}}:r:users.list:rest_per_ip:c{i}", 100, 1000, 1, "rest_per_ip")
        assert (await store.run(Program([other]), now + 1 + i)).allowed
    assert day.key in store.logs and len(store._expiry) == 4
    assert not (await store.run(Program([day]), now + 10)).allowed


async def test_a_hit_dated_earlier_never_shortens_its_log() -> None:
    """Catches a hit dated before the newest (the clock stepped back) moving its log's end earlier:
    a sweep then forgot a log that still counted, and 3 hits passed a limit of 2 in one window
    (found by the audit of 2026-12-02)."""
    store = MemoryStore()
    op = RateOp(KEY + ":exact", 2, 60_000, 1, "rest_per_ip", True)
    assert (await store.run(Program([op]), 1010)).allowed
    assert (await store.run(Program([op]), 1000)).allowed
    for i in range(SWEEP_EVERY):  # other clients' traffic brings a sweep at 61,005
        other = RateOp(f"q:{{demo#pro}}:r:users.get:rest_per_ip:s{i}", 5, 1000, 1, "rest_per_ip")
        await store.run(Program([other]), 61_005)
    assert (await store.run(Program([op]), 61_006)).allowed  # the hit at 1,000 is out
    assert not (await store.run(Program([op]), 61_007)).allowed  # the one at 1,010 still counts


async def test_admin_reads_and_writes() -> None:
    """Catches the memory store's admin calls (reconcile, forget-user, the dashboard) touching the
    wrong keys or reporting wrong counts: scan by prefix, delete, remove, swap, peaks of an app
    with none."""
    store = MemoryStore()
    await store.add_members("q:{demo#pro}:s:contacts:o:a", ["b", "c"])
    await store.add_members("q:{demo#pro}:s:contacts:o:b", ["a"])
    await store.add_members("q:{demo#free}:s:contacts:o:a", ["z"])
    await store.add_members("q:{demo#pro}:s:contacts:o:x", [])
    assert sorted(await store.scan_prefix("q:{demo#pro}:")) == [
        "q:{demo#pro}:s:contacts:o:a",
        "q:{demo#pro}:s:contacts:o:b",
    ]
    assert await store.remove_members("q:{demo#pro}:s:contacts:o:a", ["c", "nobody"]) == 1
    assert await store.remove_members("q:{demo#pro}:s:contacts:o:b", ["a"]) == 1
    assert "q:{demo#pro}:s:contacts:o:b" not in store.sets
    assert await store.swap_member("q:{demo#pro}:s:contacts:o:a", "b", "d") is True
    assert await store.members("q:{demo#pro}:s:contacts:o:a") == {"d"}
    assert await store.swap_member("q:{demo#pro}:s:contacts:o:a", "b", "e") is False
    assert await store.swap_member("q:{demo#pro}:s:contacts:o:none", "b", "e") is False
    assert await store.members("q:{demo#pro}:s:contacts:o:a") == {"d"}
    store.inflight["q:{demo#pro}:s:contacts:inflight"] = {"a|d": 1}
    await store.run(Program([AddOp("", "q:{demo#pro}:s:app_groups:o:x", UNLIMITED, ("p",), pending_ttl_ms=1000)]), 1)
    await store.delete(
        ["q:{demo#pro}:s:contacts:o:a", "q:{demo#pro}:s:contacts:inflight", "q:{demo#pro}:s:app_groups:o:x:pending"]
    )
    assert set(store.sets) == {"q:{demo#free}:s:contacts:o:a", "q:{demo#pro}:s:app_groups:o:x"}
    assert store.inflight == {} and "q:{demo#pro}:s:app_groups:o:x:pending" not in store.zsets
    assert await store.peaks("q:{demo#none}:peak") == {}
    assert await store.online("q:{demo#none}:online", 5) == 0


async def test_lapsed_claims_leave_no_state() -> None:
    """Catches claims purged from their deadlines but not from the claim counts (memory that grows
    with every join ever made)."""
    store = MemoryStore()
    inflight = "q:{demo#pro}:s:group_members:inflight"

    def join(room: str, now: int) -> Any:
        op = AddOp(
            "",
            f"q:{{demo#pro}}:s:group_members:o:{room}",
            UNLIMITED,
            ("u",),
            inflight_key=inflight,
            fields=(f"{room}|u",),
            claim_ttl_ms=1000,
        )
        return store.run(Program([op]), now)

    await join("1", 10_000)
    assert store.inflight[inflight] == {"1|u": 1}
    await join("2", 11_000)  # the first claim lapsed at 11,000: purged from both
    assert store.inflight[inflight] == {"2|u": 1}
    assert set(store.zsets[inflight + ":due"].due) == {"2|u"}


async def test_accounts_and_markers() -> None:
    """Catches the memory store's account records shared with their callers (a caller's edit
    changing the stored record), its version not moving by one per change, and webhook markers that
    fire twice."""
    store = MemoryStore()
    record = {"name": "acme", "apps": ["acme#a"], "overrides": {"x": 1}}
    assert await store.save_account("acme", record) == 1
    record["overrides"]["x"] = 2
    version, records = await store.load_accounts()
    assert version == 1 and records["acme"]["overrides"] == {"x": 1}
    records["acme"]["overrides"]["x"] = 3
    assert (await store.load_accounts())[1]["acme"]["overrides"] == {"x": 1}
    assert await store.delete_account("acme") == 2 and (await store.load_accounts()) == (2, {})
    assert await store.accounts_version() == 2
    assert await store.claim_once("hook:acme:80", 3600) is True
    assert await store.claim_once("hook:acme:80", 3600) is False
    assert await store.claim_once("hook:acme:100", 3600) is True


async def test_first_hit_on_a_window_edge() -> None:
    """Catches a missing previous window read as one hit: a 1/s client's first request, exactly on
    a second's edge, passes on both paths."""
    for program in (
        Program([RateOp(KEY, 1, 1000, 1, "rest_per_ip")]),
        Program([RateOp(KEY, 1, 1000, 1, "rest_per_ip"), AddOp("", "q:{demo#pro}:s:x:o:y", UNLIMITED, ("m",))]),
    ):
        store = MemoryStore()
        assert (await store.run(program, 9_000_000_000)).allowed
        assert not (await store.run(program, 9_000_000_001)).allowed


def test_deadlines_expire_a_slice_at_a_time() -> None:
    """Catches the purge taking more than its slice (bounded work per call), or not the earliest."""
    from quota.store.memory import Deadlines

    due = Deadlines()
    for i, deadline in enumerate((50, 10, 40, 20, 30)):
        due.set(f"m{i}", deadline)
    due.set("m0", 60)  # re-set: its old heap entry is stale
    assert due.expire(100, 2) == ["m1", "m3"]
    assert due.expire(100, 2) == ["m4", "m2"]
    assert due.expire(55) == [] and due.live(55) == 1 and due.live(60) == 0


async def test_exact_log_fields() -> None:
    """Catches the exact (log) rate's answers mis-shaped on the program path: remaining budget and
    reset while allowed, and a refusal's kind, used count, cap and Retry-After (until the oldest hit
    leaves the window, 1 ms after a full window)."""
    store = MemoryStore()
    t = 5_000_000
    op = RateOp(KEY, 2, 1000, 1, "rest_per_ip", True)
    first = (await store.run(Program([op]), t)).rates[0]
    second = (await store.run(Program([op]), t + 100)).rates[0]
    assert (first.name, first.limit, first.remaining, first.reset_ms) == ("rest_per_ip", 2, 1, 1001)
    assert (second.remaining, second.reset_ms) == (0, 901)
    refused = (await store.run(Program([op]), t + 200)).refusal
    assert refused is not None
    assert (refused.op_index, refused.kind, refused.used, refused.cap) == (0, "rate", 2, 2)
    assert (refused.retry_after_ms, refused.reset_ms) == (801, 801)
    assert not (await store.run(Program([op]), t + 1000)).allowed
    assert (await store.run(Program([op]), t + 1001)).allowed


async def test_dry_run_reports_and_changes_nothing() -> None:
    """Catches a dry run (quota.api's "would this pass?") that writes, or reports the wrong members
    or sizes: it names the members an add would add and the set's size after, and leaves the sets
    and the rate budget as they were."""
    store = MemoryStore()
    owner = "q:{demo#pro}:s:group_members:o:1"
    await store.add_members(owner, ["a"])
    rate = RateOp(KEY, 1, 1000, 1, "rest_per_ip")
    add = AddOp("members_per_group", owner, 5, ("a", "b", "c"))
    dry = await store.run(Program([rate, add]), 9_000_000_500, dry=True)
    assert dry.allowed and dry.added == (("b", "c"),) and dry.sizes == (3,)
    assert await store.members(owner) == {"a"}
    assert (await store.run(Program([rate]), 9_000_000_500, dry=True)).allowed
    assert (await store.run(Program([rate]), 9_000_000_500)).allowed  # the dry runs spent nothing
    fresh = AddOp("members_per_group", "q:{demo#pro}:s:group_members:o:2", 5, ("x",))
    dry = await store.run(Program([fresh]), 9_000_000_600, dry=True)
    assert dry.added == (("x",),) and dry.sizes == (1,) and "q:{demo#pro}:s:group_members:o:2" not in store.sets


def test_what_if_bill_has_no_account() -> None:
    """Catches the what-if bill (no account: `quota bill --plan`) naming one."""
    bill = compute_bill(load_config().matrix.plans["basic"], [AppPeak("a", 1)], 2026, 10)
    assert bill.account == "-"


@pytest.mark.parametrize("with_counter", [False, True])
async def test_sweep_keeps_live_windows_on_both_paths(with_counter: bool) -> None:
    """Catches the program path's rate bookkeeping (a window's expiry, the time it is counted at)
    wrong: the periodic sweep must neither drop a live window nor fail."""
    store = MemoryStore()
    now = 7_100_000_100

    def program(key: str) -> Program:
        rate = RateOp(key, 5, 1000, 1, "rest_per_ip")
        extra = [AddOp("", "q:{demo#pro}:s:x:o:y", UNLIMITED, ("m",))] if with_counter else []
        return Program([rate, *extra])

    for _ in range(5):
        assert (await store.run(program(KEY), now)).allowed
    for i in range(SWEEP_EVERY):
        assert (await store.run(program(f"q:{{demo#pro}}:r:users.get:rest_per_ip:c{i}"), now + 1)).allowed
    assert not (await store.run(program(KEY), now + 2)).allowed
    assert (await store.run(program(KEY), now + 2000)).allowed


@pytest.mark.parametrize("with_counter", [False, True])
async def test_a_window_is_kept_while_it_counts_and_no_longer(with_counter: bool) -> None:
    """Catches a rate key's expiry off by a window, on the rate-only path and on the program path: a
    hit in window i still counts in window i + 1, so a sweep in that window's last millisecond keeps
    it, and one at the start of window i + 2 forgets it."""
    store = MemoryStore()
    window = 1000
    index = 7_200_000
    extra = [AddOp("", "q:{demo#pro}:s:x:o:y", UNLIMITED, ("m",))] if with_counter else []
    hit = RateOp(KEY, 5, window, 1, "rest_per_ip")
    assert (await store.run(Program([hit, *extra]), index * window + 300)).allowed

    async def sweep_at(now: int, tag: str) -> None:
        # SWEEP_EVERY hits of other clients: at least one of them sweeps, at `now`.
        for i in range(SWEEP_EVERY):
            other = RateOp(f"q:{{demo#pro}}:r:users.get:rest_per_ip:{tag}{i}", 5, window, 1, "rest_per_ip")
            await store.run(Program([other, *extra]), now)

    await sweep_at((index + 2) * window - 1, "a")
    assert KEY in store.windows
    await sweep_at((index + 2) * window, "b")
    assert KEY not in store.windows


async def test_refusals_say_which_side() -> None:
    """Catches a counter refusal's kind or count mis-reported: the owner's own cap ("owner", its
    size), a member's cap ("member", that member's count), the online cap ("online")."""
    store = MemoryStore()
    await store.add_members("q:{demo#pro}:s:group_members:o:1", ["a", "b"])
    await store.add_members("q:{demo#pro}:s:group_members:m:c", ["7", "8", "9"])
    owner = AddOp("members_per_group", "q:{demo#pro}:s:group_members:o:1", 2, ("c",))
    refused = (await store.run(Program([owner]), 1_000)).refusal
    assert refused is not None and (refused.kind, refused.used, refused.cap, refused.room) == ("owner", 2, 2, 0)
    member = AddOp(
        "members_per_group",
        "q:{demo#pro}:s:group_members:o:2",
        10,
        ("c",),
        reverse_limit="groups_per_user",
        reverse_prefix="q:{demo#pro}:s:group_members:m:",
        reverse_cap=3,
        reverse_value="2",
    )
    refused = (await store.run(Program([member]), 1_000)).refusal
    assert refused is not None and (refused.kind, refused.used, refused.cap, refused.who) == ("member", 3, 3, "c")

    def lease(conn: str) -> LeaseOp:
        return LeaseOp("q:{demo#pro}:online", "q:{demo#pro}:peak", "202611", conn, 60_000, 1)

    assert (await store.run(Program([lease("c1")]), 1_000)).refusal is None
    refused = (await store.run(Program([lease("c2")]), 1_001)).refusal
    assert refused is not None and (refused.kind, refused.used, refused.cap) == ("online", 1, 1)


async def test_outcomes_say_what_callers_read() -> None:
    """What callers read from an outcome: a dry run's rates (`quota explain`: how many are left), an
    add's set size (near-limit metrics and webhooks), a drain's members left (the drain loop).
    Catches: any of them missing or wrong, which would stop a 450-member room's drain after one
    slice (250 reverse sets left naming a deleted room)."""
    store = MemoryStore()
    now = 9_000_000_100
    dry = await store.run(Program([RateOp(KEY, 5, 1000, 1, "rest_per_ip")]), now, dry=True)
    assert [(r.name, r.limit, r.remaining) for r in dry.rates] == [("rest_per_ip", 5, 4)]
    owner = "q:{demo#pro}:s:group_members:o:9"
    added = await store.run(Program([AddOp("members_per_group", owner, UNLIMITED, ("a", "b"))]), now)
    assert added.sizes == (2,)
    members = [f"m{i}" for i in range(450)]
    await store.add_members(owner, members)
    for m in members:
        await store.add_members(f"q:{{demo#pro}}:s:group_members:m:{m}", ["9"])
    trash = owner + ":dropped:t"
    await store.run(Program([DropOp(owner, "q:{demo#pro}:s:group_members:m:", "9", trash)]), now)
    left = []
    while True:
        outcome = await store.run(Program([DrainOp(trash, "q:{demo#pro}:s:group_members:m:", "9")]), now)
        left.append(outcome.remaining)
        if not outcome.remaining:
            break
    assert left == [252, 52, 0]
    assert not any(store.sets.get(f"q:{{demo#pro}}:s:group_members:m:{m}") for m in members)
