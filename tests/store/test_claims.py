"""Claims and tombstones on every store, op by op, at instants the test chooses: what a removal in
flight refuses, what an add in flight refuses, and what confirm, clear, undo and renew leave behind.
Keys are spelled out here and read raw (HGETALL, ZRANGE, SMEMBERS on Redis; the dicts on memory)."""

from __future__ import annotations

from typing import Any

from quota.store.program import (
    UNLIMITED,
    AddOp,
    ClearOp,
    ConfirmOp,
    Program,
    Refusal,
    RenewOp,
    TombstoneOp,
    UndoOp,
)
from tests.helpers import raw_deadlines, raw_hash, raw_members

T0 = 9_600_000_000_000
FRIENDS = "q:{demo#pro}:s:contacts:inflight"
ROOMS = "q:{demo#pro}:s:group_members:inflight"


def friend(owner: str, member: str, ttl_ms: int = 60_000) -> AddOp:
    """A friend add as plan_request builds it (a symmetric relation: both sides are owner sides)."""
    return AddOp(
        "friends_per_user",
        f"q:{{demo#pro}}:s:contacts:o:{owner}",
        UNLIMITED,
        (member,),
        reverse_prefix="q:{demo#pro}:s:contacts:o:",
        reverse_value=owner,
        inflight_key=FRIENDS,
        fields=(f"{min(owner, member)}|{max(owner, member)}",),
        claim_ttl_ms=ttl_ms,
        member_drop="xo",
    )


def join(group: str, user: str) -> AddOp:
    """A group join: owner side the group's members, member side the user's groups."""
    return AddOp(
        "members_per_group",
        f"q:{{demo#pro}}:s:group_members:o:{group}",
        UNLIMITED,
        (user,),
        reverse_prefix="q:{demo#pro}:s:group_members:m:",
        reverse_value=group,
        inflight_key=ROOMS,
        fields=(f"{group}|{user}",),
        claim_ttl_ms=60_000,
        member_drop="xm",
    )


def busy(index: int, who: str) -> Refusal:
    return Refusal(index, "busy", 0, 0, who=who)


async def test_a_removal_waits_for_the_add_it_would_erase(store: Any) -> None:
    """Catches a removal (rm tombstone) passing an add of the same pair still in flight, or
    refusing one of another pair; the refusal says busy and names the pair, and writes nothing."""
    await store.run(Program([friend("a", "b")]), T0)
    refused = await store.run(Program([TombstoneOp(FRIENDS, ("rm:a|c", "rm:a|b"), 60_000, True)]), T0 + 1)
    assert refused.refusal == busy(0, "a|b")
    assert await raw_hash(store, FRIENDS) == {"a|b": 1}
    assert await raw_deadlines(store, FRIENDS + ":due") == {"a|b": T0 + 60_000}
    other = await store.run(Program([TombstoneOp(FRIENDS, ("rm:a|c",), 30_000, True)]), T0 + 2)
    assert other.refusal is None
    assert await raw_hash(store, FRIENDS) == {"a|b": 1, "rm:a|c": 1}
    assert (await raw_deadlines(store, FRIENDS + ":due"))["rm:a|c"] == T0 + 2 + 30_000


async def test_dropping_a_set_waits_for_adds_that_name_its_owner(store: Any) -> None:
    """A whole set dropped (a group deleted: xo, its owner on the left of the pair) or a user's own
    set (xm: the user on the right) waits for every add in flight naming it there, and only there.
    Catches: sides confused, pairs matched by prefix, claims of other entities refusing it."""
    await store.run(Program([join("7", "u")]), T0)
    assert (await store.run(Program([TombstoneOp(ROOMS, ("xo:7",), 60_000)]), T0 + 1)).refusal == busy(0, "7")
    assert (await store.run(Program([TombstoneOp(ROOMS, ("xm:u",), 60_000)]), T0 + 1)).refusal == busy(0, "u")
    # The group on the right or the user on the left is not what these tombstones drop.
    assert (await store.run(Program([TombstoneOp(ROOMS, ("xm:7",), 60_000)]), T0 + 1)).refusal is None
    assert (await store.run(Program([TombstoneOp(ROOMS, ("xo:u",), 60_000)]), T0 + 1)).refusal is None
    assert (await store.run(Program([TombstoneOp(ROOMS, ("xo:77",), 60_000)]), T0 + 1)).refusal is None
    # A symmetric relation (friends): a user's whole list waits for a pair naming them on either side.
    await store.run(Program([friend("b", "a")]), T0)
    symmetric = TombstoneOp(FRIENDS, ("xo:b",), 60_000, True)
    assert (await store.run(Program([symmetric]), T0 + 1)).refusal == busy(0, "b")
    assert (await store.run(Program([TombstoneOp(FRIENDS, ("xo:b",), 60_000)]), T0 + 1)).refusal is None


async def test_an_add_waits_for_the_removal_of_what_it_adds(store: Any) -> None:
    """An add meets busy under a tombstone of its pair (rm), of its owner's whole set (xo), or of its
    member's own set (member_drop); not under one of someone else. Catches: any of the three missed."""
    tombs = [("rm:7|u", "u"), ("xo:7", "u"), ("xm:u", "u")]
    for field, who in tombs:
        await store.run(Program([TombstoneOp(ROOMS, (field,), 60_000)]), T0)
        assert (await store.run(Program([join("7", "u")]), T0 + 1)).refusal == busy(0, who), field
        assert await raw_members(store, "q:{demo#pro}:s:group_members:o:7") == set()
        assert (await store.run(Program([join("8", "v")]), T0 + 1)).refusal is None
        await store.run(Program([ClearOp(ROOMS, (field,))]), T0 + 2)
        assert field not in await raw_hash(store, ROOMS)
    assert (await store.run(Program([join("7", "u")]), T0 + 3)).refusal is None


async def test_clear_takes_one_tombstone_at_a_time(store: Any) -> None:
    """Two removals of the same pair in flight: the first to settle leaves the second's tombstone.
    Catches: a clear that drops every tombstone of the pair (an add slipping past the second)."""
    tomb = TombstoneOp(ROOMS, ("rm:7|u",), 60_000)
    await store.run(Program([tomb]), T0)
    await store.run(Program([tomb]), T0 + 1)
    assert await raw_hash(store, ROOMS) == {"rm:7|u": 2}
    assert await raw_deadlines(store, ROOMS + ":due") == {"rm:7|u": T0 + 1 + 60_000}
    await store.run(Program([ClearOp(ROOMS, ("rm:7|u",))]), T0 + 2)
    assert await raw_hash(store, ROOMS) == {"rm:7|u": 1}
    assert (await store.run(Program([join("7", "u")]), T0 + 3)).refusal == busy(0, "u")
    await store.run(Program([ClearOp(ROOMS, ("rm:7|u",))]), T0 + 4)
    assert await raw_hash(store, ROOMS) == {}
    assert await raw_deadlines(store, ROOMS + ":due") == {}
    # Clearing what is not there leaves nothing behind (no negative counts), on any relation.
    await store.run(Program([ClearOp(ROOMS, ("rm:7|u",))]), T0 + 5)
    assert await raw_hash(store, ROOMS) == {}
    never = "q:{demo#pro}:s:chatroom_members:inflight"
    assert (await store.run(Program([ClearOp(never, ("rm:1|x",))]), T0 + 6)).refusal is None
    assert await raw_hash(store, never) == {}


async def test_confirm_settles_one_claim_and_marks_the_member_as_standing(store: Any) -> None:
    """Two adds of the same pair in flight: the first confirm leaves the second's claim, with the
    member now standing on its own (s:), so the second's undo keeps it; the last confirm leaves
    nothing. Catches: a confirm that drops every claim, or forgets that the member now stands."""
    owner = "q:{demo#pro}:s:group_members:o:7"
    await store.run(Program([join("7", "u")]), T0)
    await store.run(Program([join("7", "u")]), T0 + 1)
    assert await raw_hash(store, ROOMS) == {"7|u": 2}
    await store.run(Program([ConfirmOp(ROOMS, ("7|u",))]), T0 + 2)
    assert await raw_hash(store, ROOMS) == {"7|u": 1, "s:7|u": 1}
    assert set(await raw_deadlines(store, ROOMS + ":due")) == {"7|u"}
    undo = UndoOp(owner, ("u",), ("7|u",), "q:{demo#pro}:s:group_members:m:", "7", ROOMS)
    await store.run(Program([undo]), T0 + 3)
    assert await raw_members(store, owner) == {"u"}
    assert await raw_members(store, "q:{demo#pro}:s:group_members:m:u") == {"7"}
    assert await raw_hash(store, ROOMS) == {}
    # One add, confirmed: nothing is left in flight, and a confirm of nothing changes nothing.
    await store.run(Program([join("7", "v")]), T0 + 4)
    await store.run(Program([ConfirmOp(ROOMS, ("7|v",)), ConfirmOp(ROOMS, ("7|w",))]), T0 + 5)
    assert await raw_hash(store, ROOMS) == {}
    assert await raw_deadlines(store, ROOMS + ":due") == {}
    assert await raw_members(store, owner) == {"u", "v"}


async def test_renew_pushes_only_live_deadlines(store: Any) -> None:
    """A renewal pushes the deadlines of claims still alive to now + ttl, and leaves a lapsed one
    lapsed. Catches: a renewal that revives an expired claim, or misses one that ends exactly now."""
    await store.run(Program([friend("a", "b", ttl_ms=1000)]), T0)
    await store.run(Program([friend("a", "c", ttl_ms=5000)]), T0)
    renew = RenewOp(FRIENDS + ":due", ("a|b", "a|c"), 10_000)
    await store.run(Program([renew]), T0 + 2000)
    assert await raw_deadlines(store, FRIENDS + ":due") == {"a|b": T0 + 1000, "a|c": T0 + 12_000}
    await store.run(Program([RenewOp(FRIENDS + ":due", ("a|c",), 10_000)]), T0 + 12_000 - 1)
    assert (await raw_deadlines(store, FRIENDS + ":due"))["a|c"] == T0 + 22_000 - 1


async def test_a_lapsed_claim_no_longer_blocks_a_removal(store: Any) -> None:
    """A claim whose deadline passed (its request died without an answer) stops holding removals:
    the busy check purges it first. Catches: a dead request blocking removals for ever."""
    await store.run(Program([friend("a", "b", ttl_ms=1000)]), T0)
    tomb = TombstoneOp(FRIENDS, ("rm:a|b",), 60_000, True)
    assert (await store.run(Program([tomb]), T0 + 999)).refusal == busy(0, "a|b")
    assert (await store.run(Program([tomb]), T0 + 1001)).refusal is None


async def test_confirm_of_the_last_claim_clears_the_standing_mark(store: Any) -> None:
    """A member that stood on its own, claimed again by a later add: that add's confirm leaves no
    claim and no standing mark behind; a confirm on a relation never claimed, or of a pair not
    claimed before one that is, changes only what it names.
    Catches: a standing mark left for ever, a confirm that stops at the first unknown pair, a
    confirm that fails on a relation with no claims yet."""
    await store.run(Program([join("7", "u")]), T0)
    await store.run(Program([ConfirmOp(ROOMS, ("7|u",))]), T0 + 1)
    await store.run(Program([join("7", "u")]), T0 + 2)  # already there: claimed, and standing
    assert await raw_hash(store, ROOMS) == {"7|u": 1, "s:7|u": 1}
    await store.run(Program([ConfirmOp(ROOMS, ("7|w", "7|u"))]), T0 + 3)
    assert await raw_hash(store, ROOMS) == {}
    assert await raw_deadlines(store, ROOMS + ":due") == {}
    never = "q:{demo#pro}:s:chatroom_members:inflight"
    assert (await store.run(Program([ConfirmOp(never, ("1|x",))]), T0 + 4)).refusal is None
    assert await raw_hash(store, never) == {}


async def test_a_drop_looks_at_claims_not_at_other_tombstones(store: Any) -> None:
    """The hash of a relation holds claims (`7|u`), tombstones (`rm:7|u`) and standing marks
    (`s:7|u`); a drop in flight waits for claims only, and sees every one of them.
    Catches: a tombstone read as a claim (`rm:7|u` taken for a pair naming u: a user's deletion
    refused for ever while one of their leaves is in flight), or a scan that stops at the first
    entry that is not a claim."""
    await store.run(Program([TombstoneOp(ROOMS, ("rm:7|u",), 60_000)]), T0)
    assert (await store.run(Program([TombstoneOp(ROOMS, ("xm:u",), 60_000)]), T0 + 1)).refusal is None
    await store.run(Program([join("8", "v")]), T0 + 2)
    assert (await store.run(Program([TombstoneOp(ROOMS, ("xm:v",), 60_000)]), T0 + 3)).refusal == busy(0, "v")
    # Several sets dropped at once (a user forgotten: their own and every one naming them): each is
    # looked for among the claims, the last as surely as the first.
    several = TombstoneOp(ROOMS, ("xm:w", "xo:9", "rm:9|x", "xo:8"), 60_000)
    assert (await store.run(Program([several]), T0 + 3)).refusal == busy(0, "8")


async def test_an_undo_of_several_members_settles_each(store: Any) -> None:
    """One undo names two members: the first still has another request's claim (it stays), the
    second has only this one (it goes). Catches: an undo that stops at the first member it keeps."""
    owner = "q:{demo#pro}:s:group_members:o:7"
    await store.run(Program([join("7", "u")]), T0)
    await store.run(Program([join("7", "u")]), T0 + 1)
    await store.run(Program([join("7", "v")]), T0 + 2)
    undo = UndoOp(owner, ("u", "v"), ("7|u", "7|v"), "q:{demo#pro}:s:group_members:m:", "7", ROOMS)
    await store.run(Program([undo]), T0 + 3)
    assert await raw_members(store, owner) == {"u"}
    assert await raw_members(store, "q:{demo#pro}:s:group_members:m:v") == set()
    assert await raw_hash(store, ROOMS) == {"7|u": 1}


async def test_a_deadline_reached_is_not_renewed(store: Any) -> None:
    """A claim whose deadline is now has lapsed (purges take deadlines <= now): renewing it then
    must not revive it. Catches: a renewal that counts the deadline's own millisecond as alive."""
    await store.run(Program([friend("a", "d", ttl_ms=1000)]), T0)
    await store.run(Program([RenewOp(FRIENDS + ":due", ("a|d",), 10_000)]), T0 + 1000)
    assert await raw_deadlines(store, FRIENDS + ":due") == {"a|d": T0 + 1000}


async def test_forgetting_a_user_takes_only_the_claims_naming_it(store: Any) -> None:
    """Catches a forget that deletes a relation's whole claims hash (audit of 2026-12-02): the other
    users' claims and the tombstones of their removals in flight went too. Forgetting `c` takes
    the pairs, removals and dropped sets naming `c` (either side of a friendship) with their
    deadlines, and leaves every field that names others, ids that merely contain `c` included.
    And only where a user stands (the review): forgetting user `1001` leaves group 1001's claims."""
    ops: list[Any] = [friend("a", "b"), friend("c", "d"), friend("ac", "b"), friend("a", "c")]
    ops.append(TombstoneOp(FRIENDS, ("rm:b|c", "xo:c", "rm:a|b", "xo:cc"), 60_000, True))
    ops += [join("1001", "bob"), join("77", "1001")]
    ops.append(TombstoneOp(ROOMS, ("xo:1001", "xm:1001", "rm:77|bob"), 60_000))
    assert (await store.run(Program(ops), T0)).allowed
    assert await store.forget_claims(FRIENDS, "c", True, True) == 4
    kept = {"a|b", "ac|b", "rm:a|b", "xo:cc"}
    assert set(await raw_hash(store, FRIENDS)) == kept
    assert set(await raw_deadlines(store, FRIENDS + ":due")) == kept
    assert await store.forget_claims(FRIENDS, "c", True, True) == 0
    assert await store.forget_claims(ROOMS, "1001", False, True) == 2
    kept = {"1001|bob", "xo:1001", "rm:77|bob"}
    assert set(await raw_hash(store, ROOMS)) == kept
    assert set(await raw_deadlines(store, ROOMS + ":due")) == kept


def batch_join(group: str, users: tuple[str, ...], cap: int) -> AddOp:
    """Users added to a group in one request, as a route with no max_batch lets a body ask."""
    return AddOp(
        "members_per_group",
        f"q:{{demo#pro}}:s:group_members:o:{group}",
        cap,
        users,
        reverse_prefix="q:{demo#pro}:s:group_members:m:",
        reverse_value=group,
        inflight_key=ROOMS,
        fields=tuple(f"{group}|{user}" for user in users),
        claim_ttl_ms=60_000,
        member_drop="xm",
    )


async def test_an_add_of_thousands_is_judged_whole(store: Any) -> None:
    """4,500 members in one add (max_batch is optional, and a 64 KiB body holds that many short ids):
    busy under a tombstone of any of them, the last and those whose names straddle the script's
    slices of 1,000 names included; refused whole by its cap when over it; added whole under it.
    Catches: more names than one Lua unpack takes (an error, a 503, the breaker), or a slice skipped."""
    users = tuple(f"u{i}" for i in range(4_500))
    for field, who in (
        (f"rm:g1|{users[499]}", users[499]),
        (f"xm:{users[499]}", users[499]),
        (f"rm:g1|{users[-1]}", users[-1]),
    ):
        await store.run(Program([TombstoneOp(ROOMS, (field,), 60_000)]), T0)
        assert (await store.run(Program([batch_join("g1", users, UNLIMITED)]), T0 + 1)).refusal == busy(0, who), field
        await store.run(Program([ClearOp(ROOMS, (field,))]), T0 + 2)
    over = await store.run(Program([batch_join("g1", users, 4_499)]), T0 + 3)
    assert over.refusal is not None and (over.refusal.kind, over.refusal.used) == ("owner", 0)
    assert await raw_members(store, "q:{demo#pro}:s:group_members:o:g1") == set()
    under = await store.run(Program([batch_join("g1", users, 4_500)]), T0 + 4)
    assert under.allowed and under.sizes == (4_500,) and len(under.added[0]) == 4_500
    assert await raw_members(store, "q:{demo#pro}:s:group_members:o:g1") == set(users)
