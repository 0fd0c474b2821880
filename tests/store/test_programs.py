"""Programs of several ops on every store, at instants the test chooses: rates checked beside
counters (the differential test of test_rates.py with a counter in the same program), and the
expiry of a create's reservation. Keys are spelled out and read raw."""

from __future__ import annotations

import ast
import dataclasses
from typing import Any
from unittest import mock

import pytest
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from quota import decisions, routes
from quota.build import source_of
from quota.config import load_config
from quota.store import program
from quota.store.program import (
    UNLIMITED,
    AddOp,
    BindOp,
    ConfirmOp,
    Program,
    RateOp,
    Refusal,
    RenewOp,
    TombstoneOp,
    UndoOp,
)
from tests.helpers import raw_deadlines, raw_members
from tests.store.test_rates import schedule

GROUPS = "q:{demo#pro}:s:app_groups:o:demo%23pro"


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("limit", [1, 3, 5])
async def test_rate_beside_a_counter_decides_like_limits(store: Any, seed: int, limit: int) -> None:
    """Catches a rate checked differently when the program also holds a counter (the memory store
    takes a shortcut for rate-only programs): every hit of a random schedule, a rate and an add to
    an uncapped set in one program, is allowed exactly as limits' sliding window decides, and each
    allowed hit adds its member."""
    item = RateLimitItemPerSecond(limit, 1)
    reference = SlidingWindowCounterRateLimiter(MemoryStorage())
    ours, theirs = [], []
    for i, now_ms in enumerate(schedule(seed, 300)):
        with mock.patch("time.time", return_value=now_ms / 1000):
            theirs.append(await reference.hit(item, "k"))
        rate = RateOp("q:{demo#pro}:r:users.register:rest_per_ip:k", limit, 1000, 1, "rest_per_ip")
        add = AddOp("registered_users", "q:{demo#pro}:s:app_users:o:demo%23pro", UNLIMITED, (f"u{i}",))
        outcome = await store.run(Program([rate, add]), now_ms)
        ours.append(outcome.allowed)
    assert ours == theirs
    assert 0 < sum(ours) < len(ours)
    counted = await raw_members(store, "q:{demo#pro}:s:app_users:o:demo%23pro")
    assert counted == {f"u{i}" for i, ok in enumerate(ours) if ok}


async def test_rate_then_capped_counter_refuses_without_counting(store: Any) -> None:
    """Catches a program refused by its counter that still spends its rate budget (or the reverse):
    a refused request counts nothing, not a rate hit, not a member."""
    rate = RateOp("q:{demo#pro}:r:groups.add_member:rest_per_ip:k", 2, 1000, 1, "rest_per_ip")
    now = 9_000_000_000_100
    full = AddOp("members_per_group", "q:{demo#pro}:s:group_members:o:1", 1, ("a",))
    assert (await store.run(Program([rate, full]), now)).allowed
    over = AddOp("members_per_group", "q:{demo#pro}:s:group_members:o:1", 1, ("b",))
    for _ in range(3):
        refused = await store.run(Program([rate, over]), now)
        assert refused.refusal is not None and refused.refusal.kind == "owner" and refused.refusal.op_index == 1
    other = AddOp("members_per_group", "q:{demo#pro}:s:group_members:o:2", 1, ("b",))
    assert (await store.run(Program([rate, other]), now)).allowed  # the second hit of 2
    refused = await store.run(
        Program([rate, AddOp("members_per_group", "q:{demo#pro}:s:group_members:o:3", 1, ("c",))]), now
    )
    assert refused.refusal is not None and refused.refusal.kind == "rate"
    assert await raw_members(store, "q:{demo#pro}:s:group_members:o:1") == {"a"}
    assert await raw_members(store, "q:{demo#pro}:s:group_members:o:3") == set()


async def test_create_reservation_expires_after_60_s(store: Any) -> None:
    """Catches reservations that never expire (a create whose process died holding the app's last
    group slot forever) or expire early: a slot reserved at t blocks the cap until t + 60 s - 1 ms
    and is freed, and purged from the set, at t + 60 s."""
    t = 9_100_000_000_000

    def create(tag: str) -> AddOp:
        return AddOp("groups_per_app", GROUPS, 1, (f"~pending:{tag}",), pending_ttl_ms=60_000)

    assert (await store.run(Program([create("first")]), t)).allowed
    assert await raw_members(store, GROUPS) == {"~pending:first"}
    assert await raw_deadlines(store, GROUPS + ":pending") == {"~pending:first": t + 60_000}
    late = await store.run(Program([create("second")]), t + 59_999)
    assert late.refusal is not None and late.refusal.kind == "owner"
    assert (await store.run(Program([create("third")]), t + 60_000)).allowed
    assert await raw_members(store, GROUPS) == {"~pending:third"}
    assert await raw_deadlines(store, GROUPS + ":pending") == {"~pending:third": t + 120_000}


async def test_undo_keeps_a_member_whose_claim_lapsed(store: Any) -> None:
    """Catches an undo that stops at the first lapsed claim of a batch (or removes a member whose
    claim lapsed and was purged): a batch join [a, b] whose claim on a lapsed while b's was renewed
    keeps a and removes b, on both sides of the relation."""
    t = 9_200_000_000_000
    owner = "q:{demo#pro}:s:group_members:o:7"
    inflight = "q:{demo#pro}:s:group_members:inflight"
    add = AddOp(
        "members_per_group",
        owner,
        10,
        ("a", "b"),
        reverse_prefix="q:{demo#pro}:s:group_members:m:",
        reverse_value="7",
        inflight_key=inflight,
        fields=("7|a", "7|b"),
        claim_ttl_ms=60_000,
    )
    outcome = await store.run(Program([add]), t)
    assert outcome.added == (("a", "b"),)
    assert await raw_deadlines(store, inflight + ":due") == {"7|a": t + 60_000, "7|b": t + 60_000}
    await store.run(Program([RenewOp(inflight + ":due", ("7|b",), 60_000)]), t + 50_000)
    # Another join of the relation purges the lapsed claim (claims are purged by adds, a slice at a time).
    other = AddOp(
        "members_per_group",
        "q:{demo#pro}:s:group_members:o:8",
        10,
        ("c",),
        inflight_key=inflight,
        fields=("8|c",),
        claim_ttl_ms=60_000,
    )
    assert (await store.run(Program([other]), t + 61_000)).allowed
    undo = UndoOp(owner, ("a", "b"), ("7|a", "7|b"), "q:{demo#pro}:s:group_members:m:", "7", inflight)
    await store.run(Program([undo]), t + 62_000)
    assert await raw_members(store, owner) == {"a"}
    assert await raw_members(store, "q:{demo#pro}:s:group_members:m:a") == {"7"}
    assert await raw_members(store, "q:{demo#pro}:s:group_members:m:b") == set()
    assert "7|b" not in await raw_deadlines(store, inflight + ":due")


async def test_bind_after_the_reservation_expired(store: Any) -> None:
    """Catches a bind that fails (or drops the id) once its reservation expired and was purged: the
    upstream created the group, so its id is counted anyway."""
    t = 9_300_000_000_000
    create = AddOp("groups_per_app", GROUPS, 5, ("~pending:slow",), pending_ttl_ms=60_000)
    assert (await store.run(Program([create]), t)).allowed
    other = AddOp("groups_per_app", GROUPS, 5, ("~pending:other",), pending_ttl_ms=60_000)
    assert (await store.run(Program([other]), t + 61_000)).allowed  # purges the expired slot
    assert await raw_members(store, GROUPS) == {"~pending:other"}
    await store.run(Program([BindOp(GROUPS, "~pending:slow", "123")]), t + 62_000)
    assert await raw_members(store, GROUPS) == {"~pending:other", "123"}
    assert await raw_deadlines(store, GROUPS + ":pending") == {"~pending:other": t + 121_000}


async def test_a_claimed_member_is_claimed_again(store: Any) -> None:
    """Catches a second request that finds a member added by one still in flight not claiming it
    (or counting its claim twice): each undo drops one claim, and the member goes with the last."""
    t = 9_400_000_000_000
    owner = "q:{demo#pro}:s:contacts:o:a"
    inflight = "q:{demo#pro}:s:contacts:inflight"

    def add(now_ms: int) -> Any:
        op = AddOp("friends_per_user", owner, 5, ("b",), inflight_key=inflight, fields=("a|b",), claim_ttl_ms=60_000)
        return store.run(Program([op]), now_ms)

    assert (await add(t)).added == (("b",),)
    assert (await add(t + 1000)).added == (("b",),)  # still claimed: this request relies on it too
    undo = UndoOp(owner, ("b",), ("a|b",), "", "", inflight)
    await store.run(Program([undo]), t + 2000)
    assert await raw_members(store, owner) == {"b"}
    await store.run(Program([undo]), t + 3000)
    assert await raw_members(store, owner) == set()
    assert (await add(t + 4000)).added == (("b",),)
    # The first claim lapsed: b stands on its own. A new add claims it too (a removal must wait for
    # it), and its undo leaves b where it stood.
    assert (await add(t + 64_000)).added == (("b",),)
    await store.run(Program([undo]), t + 65_000)
    assert await raw_members(store, owner) == {"b"}


async def test_confirms_apply_even_when_the_program_is_refused(store: Any) -> None:
    """A confirm records an answer the upstream already gave, so it travels with whatever program
    the app sends next: applied first, even when a check of that program refuses.
    Catches: a confirm lost with a refused program (its claim would lapse after 60 s and take a
    member the upstream added), and a confirm that is not applied before the checks (the removal
    it rides with would meet the claim it settles: 409 busy)."""
    t = 9_500_000_000_000
    owner = "q:{demo#pro}:s:contacts:o:a"
    inflight = "q:{demo#pro}:s:contacts:inflight"
    add = AddOp("friends_per_user", owner, 5, ("b",), inflight_key=inflight, fields=("a|b",), claim_ttl_ms=60_000)
    await store.run(Program([add]), t)
    assert await raw_deadlines(store, inflight + ":due") == {"a|b": t + 60_000}
    rate = RateOp("q:{demo#pro}:r:friends.add:rest_per_ip:k", 0, 1000, 1, "rest_per_ip")  # refuses
    refused = await store.run(Program([rate, ConfirmOp(inflight, ("a|b",))]), t + 10)
    assert refused.refusal is not None and refused.refusal.op_index == 0
    assert await raw_deadlines(store, inflight + ":due") == {}
    assert await raw_members(store, owner) == {"b"}
    # Carried by a removal's tombstone of the same pair: settled first, so the removal is not busy.
    await store.run(Program([add]), t + 20)
    tomb = TombstoneOp(inflight, ("a|b",), 60_000)
    outcome = await store.run(Program([tomb, ConfirmOp(inflight, ("a|b",))]), t + 30)
    assert outcome.refusal is None


def _annotations(cls: type) -> dict[str, str]:
    """The fields' annotations as written: read from the source, since the compiled build keeps
    some only as `type` (its unions)."""
    tree = ast.parse(source_of(cls.__module__).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    return {
        st.target.id: ast.unparse(st.annotation)
        for st in node.body
        if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)
    }


def _value_for(annotation: str, index: int) -> Any:
    """A value of the field's type, distinct for each field, so that two swapped assignments show."""
    kind = annotation.split("[")[0].split(" | ")[0]
    if kind == "str":
        return f"value-{index}"
    if kind == "int":
        return 100 + index
    if kind == "bool":
        return True
    if kind == "tuple":
        return (f"item-{index}",)
    if kind == "list":
        return [f"item-{index}"]
    if kind == "dict":
        return {"key": f"value-{index}"}
    if kind == "Program":
        return Program([RateOp(f"k{index}", 1, 1000, 1, "rate")])
    if kind == "Refusal":
        return Refusal(index, "rate", 1, 1)
    if kind == "RouteRule":
        return load_config(None).routes.rules[index % 3]
    raise AssertionError(f"no test value for {annotation}")


WRITTEN_OUT = [
    cls
    for module in (program, decisions, routes)
    for cls in vars(module).values()
    if dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__ and not cls.__dataclass_params__.init  # type: ignore[attr-defined]
]


@pytest.mark.parametrize("cls", WRITTEN_OUT, ids=lambda c: c.__name__)
def test_a_written_out_init_sets_every_field_as_dataclasses_would(cls: Any) -> None:
    """Catches an __init__ written out for speed (store/program.py says why) that drifts from its
    fields: a field it skips, two it swaps (in its parameters or its assignments), a default it
    changes, or a list two instances share. A field the init does not take (a store's cache)
    starts at its default."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    for f in dataclasses.fields(cls):
        if not f.init:
            assert (
                getattr(cls(**{g.name: _value_for(_annotations(cls)[g.name], 0) for g in fields}), f.name) == f.default
            )
    written = _annotations(cls)
    values = {f.name: _value_for(written[f.name], i) for i, f in enumerate(fields)}
    for built in (cls(**values), cls(*values.values())):  # by name, and in the fields' order
        assert {f.name: getattr(built, f.name) for f in fields} == values
    required = {f.name: values[f.name] for f in fields if f.default is f.default_factory is dataclasses.MISSING}
    plain, other = cls(**required), cls(**required)
    for f in fields:
        if f.name in required:
            continue
        if f.default_factory is not dataclasses.MISSING:
            assert getattr(plain, f.name) == f.default_factory()
            assert getattr(plain, f.name) is not getattr(other, f.name)
        else:
            assert getattr(plain, f.name) == f.default
    assert plain == other and repr(plain) == repr(other)


def test_the_hot_value_classes_have_written_out_inits() -> None:
    """Catches a per-request class going back to the generated __init__ (interpreted, and about
    seven times slower in the compiled build)."""
    names = {cls.__name__ for cls in WRITTEN_OUT}
    assert {"RateOp", "AddOp", "ConfirmOp", "RateState", "Refusal", "Outcome", "Program"} <= names
    assert {"Denial", "RequestPlan", "Settlement", "Match"} <= names


async def test_a_set_with_no_member_side_drains_without_stray_keys(store: Any) -> None:
    """Catches a drain of a relation with no member side (an app's own set: `op: drop, owner: app`)
    taking members out of keys built from the member id alone: outside the app's hash tag, a
    cross-slot error on Cluster (the trash never emptied) and stray writes elsewhere."""
    from quota.decisions import drop

    t = 9_400_000_000_000
    add = AddOp("groups_per_app", GROUPS, UNLIMITED, ("g1", "g2", "g3"))
    assert (await store.run(Program([add]), t)).allowed
    dropped, drain = drop(GROUPS, "", "demo#pro")
    assert (await store.run(Program([dropped, drain]), t)).allowed
    while (await store.run(Program([drain]), t)).remaining:
        pass
    assert await raw_members(store, GROUPS) == set()
    assert await raw_members(store, dropped.trash_key) == set()
