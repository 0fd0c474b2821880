"""The in-process store: the embedded default, with the same semantics as the Redis script.

Atomicity comes from asyncio: `run` never awaits between its checks and its writes. Rate state is
bounded: windows and logs that can no longer count are swept as keys accumulate, and past
MAX_RATE_KEYS the keys that would stop counting soonest are dropped (a flood of more distinct
clients than that within one window is the one case where a client could get a fresh budget
early; README's threat model).
"""

from __future__ import annotations

import copy
import time
from bisect import bisect_left, insort
from heapq import heapify, heappop, heappush
from typing import Any

from mypy_extensions import mypyc_attr

from quota.keys import escape, names
from quota.store.program import (
    UNLIMITED,
    AddOp,
    BindOp,
    ClearOp,
    ConfirmOp,
    DrainOp,
    DropOp,
    LeaseOp,
    Op,
    Outcome,
    Program,
    RateOp,
    RateState,
    Refusal,
    ReleaseOp,
    RemoveOp,
    RenewOp,
    TombstoneOp,
    UndoOp,
    log_retry_ms,
    retry_after_ms,
    sliding_window,
)

MAX_RATE_KEYS = 1 << 18
SWEEP_EVERY = 1 << 12
# Expired reservations and leases purged per check, as the Lua script does (bounded work per call).
PURGE_BATCH = 256


def _split(now_ms: int, window_ms: int) -> tuple[int, int]:
    """divmod(now_ms, window_ms) (the window's index, the time into it), in native integer ops:
    compiled, divmod is a generic call that builds its tuple of boxed ints. No product of the
    index: mypyc multiplies natively only factors under 2**30, and a clock's index is not."""
    return now_ms // window_ms, now_ms % window_ms


class Window:
    """A sliding-window counter's state: the counts of the newest window written (`index`) and of
    the two before it. Native ints on one object, where a dict of window index -> count boxed the
    clock-sized index and each count at every hit.

    A hit dated a window or two before the newest (a call that waited on the way, its clock read
    before) counts in its own window, and reads the one before it, as the Redis script's keys per
    window do. A hit dated further back means the clock stepped back, or the window grew under the
    same key (a plan's rate changed from per second to per minute): the counts start over from it,
    as they do in Redis, where such a window's key is new. Never dropped: every hit counts somewhere."""

    __slots__ = ("index", "cur", "prev", "prev2")

    def __init__(self) -> None:
        # Index -3: no window yet, so the first hit's window is none of these three nor the next.
        self.index, self.cur, self.prev, self.prev2 = -3, 0, 0, 0

    def counts(self, index: int) -> tuple[int, int]:
        """(the count of the window before `index`, window `index`'s)."""
        newest = self.index
        if index == newest:
            return self.prev, self.cur
        if index == newest + 1:
            return self.cur, 0
        if index == newest - 1:
            return self.prev2, self.prev
        if index == newest - 2:
            return 0, self.prev2
        return 0, 0

    def add(self, index: int, cost: int) -> bool:
        """Count `cost` in window `index`; True when its newest window changed (its key's expiry with it)."""
        newest = self.index
        if index == newest:
            self.cur += cost
            return False
        if index == newest - 1:
            self.prev += cost
            return False
        if index == newest - 2:
            self.prev2 += cost
            return False
        if index == newest + 1:
            self.prev2, self.prev = self.prev, self.cur
        elif index == newest + 2:
            self.prev2, self.prev = self.cur, 0
        else:
            # Far ahead (nothing counted in between), or far behind (a clock or window changed).
            self.prev2, self.prev = 0, 0
        self.index, self.cur = index, cost
        return True


class Deadlines:
    """A sorted set of deadlines (member -> time), as Redis keeps leases, reservations and claims:
    a dict for lookups and a heap for expiry in deadline order (stale heap entries are skipped)."""

    def __init__(self) -> None:
        self.due: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def __contains__(self, member: str) -> bool:
        return member in self.due

    def __len__(self) -> int:
        return len(self.due)

    def get(self, member: str) -> int | None:
        return self.due.get(member)

    def set(self, member: str, deadline: int) -> None:
        self.due[member] = deadline
        heappush(self._heap, (deadline, member))

    def pop(self, member: str) -> None:
        self.due.pop(member, None)

    def expire(self, now_ms: int, most: int = PURGE_BATCH) -> list[str]:
        """Remove and return up to `most` members whose deadline has passed, earliest first."""
        gone: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ms and len(gone) < most:
            deadline, member = heappop(heap)
            if self.due.get(member) == deadline:
                del self.due[member]
                gone.append(member)
        if len(heap) > 4 * len(self.due) + 64:
            self._heap = [(d, m) for m, d in self.due.items()]
            heapify(self._heap)
        return gone

    def live(self, now_ms: int) -> int:
        self.expire(now_ms, 1 << 62)
        return len(self.due)


# Compiled (quota/build.py), and open to subclasses: a store that wraps it adds faults or logging.
@mypyc_attr(allow_interpreted_subclasses=True)
class MemoryStore:
    def __init__(self, max_rate_keys: int = MAX_RATE_KEYS) -> None:
        self.sets: dict[str, set[str]] = {}
        # Rate state: key -> its windows for sliding windows, key -> hit times for logs.
        self.windows: dict[str, Window] = {}
        self.logs: dict[str, list[int]] = {}
        self._expiry: dict[str, int] = {}
        self.max_rate_keys = max_rate_keys
        self._writes = 0
        # Claims on members added by requests in flight: key -> pair -> claims (deadlines in key:due).
        self.inflight: dict[str, dict[str, int]] = {}
        # Sorted sets of deadlines: leases, reservations (owner:pending), claims (inflight:due).
        self.zsets: dict[str, Deadlines] = {}
        self.peak: dict[str, dict[str, int]] = {}
        self.accounts: dict[str, dict[str, Any]] = {}
        self.version = 0
        # claim_once markers: key -> expiry (s).
        self.markers: dict[str, int] = {}

    async def run(self, program: Program, now_ms: int, dry: bool = False) -> Outcome:
        return self.decide(program, now_ms, dry)

    def decide(self, program: Program, now_ms: int, dry: bool = False) -> Outcome:
        """`run`, without a coroutine: the middleware's store guard calls it directly."""
        ops = program.ops
        if len(ops) == 1 and isinstance(ops[0], RateOp) and not ops[0].exact and not dry:
            return self._rate_only(ops[0], now_ms)
        if not dry:
            # Confirms first, whatever the checks decide (as in program.lua: answers already given).
            for op in ops:
                if isinstance(op, ConfirmOp):
                    self._confirm(op)
        rates: list[RateState] = []
        for index, op in enumerate(ops):
            refusal = self._check(index, op, now_ms, rates)
            if refusal:
                return Outcome(refusal=refusal)
        if dry:
            return Outcome(
                rates=tuple(rates),
                added=tuple(a for a, _ in self._would_add(ops)),
                sizes=tuple(n for _, n in self._would_add(ops)),
            )
        added: list[tuple[str, ...]] = []
        sizes: list[int] = []
        online = remaining = 0
        for op in ops:
            result = self._apply(op, now_ms)
            if isinstance(op, AddOp):
                added.append(result)
                sizes.append(len(self.sets.get(op.owner_key, ())))
            elif isinstance(op, LeaseOp):
                online = self._live(op.online_key, now_ms)
            elif isinstance(op, DrainOp):
                remaining = len(self.sets.get(op.trash_key, ()))
        return Outcome(rates=tuple(rates), added=tuple(added), sizes=tuple(sizes), online=online, remaining=remaining)

    # Rates

    def _rate_only(self, op: RateOp, now_ms: int) -> Outcome:
        # The commonest program (a read route): one window, checked and counted in one pass.
        index, elapsed = _split(now_ms, op.window_ms)
        window = self.windows.get(op.key)
        prev, cur = window.counts(index) if window is not None else (0, 0)
        used = prev * (op.window_ms - elapsed) // op.window_ms + cur
        if used + op.cost > op.limit:
            retry = retry_after_ms(prev, cur, elapsed, op.window_ms, op.limit, op.cost)
            return Outcome(Refusal(0, "rate", used, op.limit, retry_after_ms=retry, reset_ms=op.window_ms - elapsed))
        self._count(op, window, index, elapsed, now_ms)
        return Outcome(rates=(RateState(op.name, op.limit, op.limit - used - op.cost, op.window_ms - elapsed),))

    def _count(self, op: RateOp, window: Window | None, index: int, elapsed: int, now_ms: int) -> None:
        if window is None:
            window = self.windows[op.key] = Window()
        if window.add(index, op.cost):
            # The end of the next window, (index + 2) * window, from the clock (see _split). Set
            # when the window moves on, the only time it changes: not at every hit.
            self._counted(op.key, now_ms - elapsed + 2 * op.window_ms, now_ms)

    def _window(self, op: RateOp, now_ms: int) -> tuple[int, int, int]:
        """(the time into the current window, the previous window's count, the current one's)."""
        index, elapsed = _split(now_ms, op.window_ms)
        window = self.windows.get(op.key)
        prev, cur = window.counts(index) if window is not None else (0, 0)
        return elapsed, prev, cur

    def _hits(self, op: RateOp, now_ms: int) -> list[int]:
        hits = self.logs.get(op.key, [])
        # A hit at t counts while now <= t + window: drop those before now - window.
        first = bisect_left(hits, now_ms - op.window_ms)
        if first:
            del hits[:first]
        return hits

    def _counted(self, key: str, expires_ms: int, now_ms: int) -> None:
        """Remember when a rate key stops mattering; sweep and bound the rate state now and then.
        A key's end only moves later: a hit dated before the newest one (the clock stepped back)
        must not cut short the life of those after it. Past the bound, the keys that would stop
        mattering soonest go first, a tenth of the bound at once (a sort now and then, not a scan
        per request): a per-second window, not the day's log of an app's broadcasts."""
        expiry = self._expiry
        expiry[key] = max(expiry.get(key, 0), expires_ms)
        self._writes += 1
        if self._writes % SWEEP_EVERY == 0 or len(expiry) > self.max_rate_keys:
            for dead in [k for k, t in expiry.items() if t <= now_ms]:
                self._forget_rate(dead)
            if len(expiry) > self.max_rate_keys:
                over = len(expiry) - self.max_rate_keys + self.max_rate_keys // 10
                for soonest in sorted(expiry, key=expiry.__getitem__)[:over]:
                    self._forget_rate(soonest)

    def _forget_rate(self, key: str) -> None:
        self._expiry.pop(key, None)
        self.windows.pop(key, None)
        self.logs.pop(key, None)

    # Programs

    def _check(self, index: int, op: Op, now_ms: int, rates: list[RateState]) -> Refusal | None:
        if isinstance(op, RateOp):
            if op.exact:
                hits = self._hits(op, now_ms)
                if len(hits) + op.cost > op.limit:
                    retry = log_retry_ms(hits, now_ms, op.window_ms, op.limit, op.cost)
                    return Refusal(index, "rate", len(hits), op.limit, retry_after_ms=retry, reset_ms=retry)
                reset = (hits[0] if hits else now_ms) + op.window_ms + 1 - now_ms
                rates.append(RateState(op.name, op.limit, op.limit - len(hits) - op.cost, reset))
                return None
            elapsed, prev, cur = self._window(op, now_ms)
            used = sliding_window(prev, cur, elapsed, op.window_ms)
            if used + op.cost > op.limit:
                retry = retry_after_ms(prev, cur, elapsed, op.window_ms, op.limit, op.cost)
                return Refusal(index, "rate", used, op.limit, retry_after_ms=retry, reset_ms=op.window_ms - elapsed)
            rates.append(RateState(op.name, op.limit, op.limit - used - op.cost, op.window_ms - elapsed))
        elif isinstance(op, AddOp):
            if op.pending_ttl_ms:
                self._purge_pending(op.owner_key, now_ms)
            if op.inflight_key:
                self._purge_claims(op.inflight_key, now_ms)
            if op.inflight_key:
                busy = self._busy(op)
                if busy is not None:
                    return Refusal(index, "busy", 0, 0, who=busy)
            owner = self.sets.get(op.owner_key, set())
            new = [m for m in op.members if m not in owner]
            if op.cap != UNLIMITED and len(owner) + len(new) > op.cap:
                room = max(0, op.cap - len(owner))
                return Refusal(index, "owner", len(owner), op.cap, room=room)
            if op.reverse_prefix and op.reverse_cap != UNLIMITED:
                for member in new:
                    key = op.reverse_prefix + escape(member)
                    theirs = self.sets.get(key, set())
                    if op.reverse_value not in theirs and len(theirs) + 1 > op.reverse_cap:
                        # The member's set may hold a room's creation its creator reserved and
                        # never settled (an undo the store missed): dropped once expired, here,
                        # on the refusing path alone, so that a join costs nothing more.
                        self._purge_pending(key, now_ms)
                        theirs = self.sets.get(key, set())
                        if len(theirs) + 1 > op.reverse_cap:
                            return Refusal(index, "member", len(theirs), op.reverse_cap, who=member)
        elif isinstance(op, TombstoneOp) and op.checked:
            # A claim whose request died unanswered must not hold removals for ever.
            self._purge_claims(op.inflight_key, now_ms)
            busy = self._removal_busy(op)
            if busy is not None:
                return Refusal(index, "busy", 0, 0, who=busy)
        elif isinstance(op, LeaseOp):
            live = self._live(op.online_key, now_ms)
            cap = self._lease_cap(op)
            if op.recheck:
                # Counted among the others: its own live lease vouches for nothing.
                mine = (self._zset(op.online_key).get(op.conn) or 0) > now_ms
                if cap != UNLIMITED and live - mine >= cap:
                    return Refusal(index, "online", live - mine, cap)
            elif op.conn not in self._zset(op.online_key) and cap != UNLIMITED and live >= cap:
                return Refusal(index, "online", live, cap)
        return None

    def _apply(self, op: Op, now_ms: int) -> tuple[str, ...]:
        if isinstance(op, RateOp):
            if op.exact:
                hits = self.logs.setdefault(op.key, [])
                for _ in range(op.cost):
                    insort(hits, now_ms)
                self._counted(op.key, now_ms + op.window_ms + 1, now_ms)
                return ()
            index, elapsed = _split(now_ms, op.window_ms)
            self._count(op, self.windows.get(op.key), index, elapsed, now_ms)
        elif isinstance(op, AddOp):
            return self._add(op, now_ms)
        elif isinstance(op, UndoOp):
            self._undo(op)
        elif isinstance(op, TombstoneOp):
            marks = self.inflight.setdefault(op.inflight_key, {})
            due = self._zset(op.inflight_key + ":due", True)
            for field in op.fields:
                marks[field] = marks.get(field, 0) + 1
                due.set(field, now_ms + op.ttl_ms)
        elif isinstance(op, ClearOp):
            marks = self.inflight.get(op.inflight_key, {})
            due = self._zset(op.inflight_key + ":due")
            for field in op.fields:
                left = marks.get(field, 0) - 1
                if left > 0:
                    marks[field] = left
                else:
                    marks.pop(field, None)
                    due.pop(field)
        elif isinstance(op, RemoveOp):
            self._srem(op.owner_key, op.members)
            if op.reverse_prefix:
                for member in op.members:
                    self._srem(op.reverse_prefix + escape(member), (op.reverse_value,))
        elif isinstance(op, DropOp):
            members = self.sets.pop(op.owner_key, None)
            if members:
                self.sets[op.trash_key] = members
        elif isinstance(op, DrainOp):
            trash = self.sets.get(op.trash_key, set())
            for _ in range(min(op.batch, len(trash))):
                member = trash.pop()
                if op.reverse_prefix:  # a relation with no member side has nothing to take out
                    self._srem(op.reverse_prefix + escape(member), (op.value,))
            if not trash:
                self.sets.pop(op.trash_key, None)
        elif isinstance(op, BindOp):
            self._zset(op.owner_key + ":pending").pop(op.placeholder)
            if op.member != op.placeholder:
                self._srem(op.owner_key, (op.placeholder,))
                self.sets.setdefault(op.owner_key, set()).add(op.member)
                if op.reverse_prefix:
                    self.sets.setdefault(op.reverse_prefix + escape(op.member), set()).add(op.reverse_value)
        elif isinstance(op, RenewOp):
            held = self._zset(op.key)
            for member in op.members:
                if (held.get(member) or 0) > now_ms:
                    held.set(member, now_ms + op.ttl_ms)
        elif isinstance(op, LeaseOp):
            self._zset(op.online_key, True).set(op.conn, now_ms + op.ttl_ms)
            peaks = self.peak.setdefault(op.peak_key, {})
            peaks[op.month] = max(peaks.get(op.month, 0), self._live(op.online_key, now_ms))
        elif isinstance(op, ReleaseOp):
            self._zset(op.online_key).pop(op.conn)
        return ()

    def _would_add(self, ops: list[Op]) -> list[tuple[tuple[str, ...], int]]:
        out = []
        for op in ops:
            if isinstance(op, AddOp):
                owner = self.sets.get(op.owner_key, set())
                new = tuple(m for m in op.members if m not in owner)
                out.append((new, len(owner) + len(new)))
        return out

    def _zset(self, key: str, create: bool = False) -> Deadlines:
        found = self.zsets.get(key)
        if found is None:
            found = Deadlines()
            if create:
                self.zsets[key] = found
        return found

    def _add(self, op: AddOp, now_ms: int) -> tuple[str, ...]:
        owner = self.sets.setdefault(op.owner_key, set())
        claims = self.inflight.setdefault(op.inflight_key, {}) if op.inflight_key else None
        due = self._zset(op.inflight_key + ":due", True) if op.inflight_key else None
        claimed: list[str] = []
        for i, member in enumerate(op.members):
            if member not in owner:
                owner.add(member)
                if op.reverse_prefix:
                    self.sets.setdefault(op.reverse_prefix + escape(member), set()).add(op.reverse_value)
                if op.pending_ttl_ms:
                    self._zset(op.owner_key + ":pending", True).set(member, now_ms + op.pending_ttl_ms)
                if claims is not None and due is not None:
                    claims[op.fields[i]] = 1
                    claims.pop("s:" + op.fields[i], None)
                    due.set(op.fields[i], now_ms + op.claim_ttl_ms)
                claimed.append(member)
            elif claims is not None and due is not None:
                # Already there: claimed too (a removal must wait for this add), and standing on its
                # own unless another add in flight brought it.
                field = op.fields[i]
                claims[field] = claims.get(field, 0) + 1
                if claims[field] == 1:
                    claims["s:" + field] = 1
                due.set(field, now_ms + op.claim_ttl_ms)
                claimed.append(member)
        return tuple(claimed)

    def _undo(self, op: UndoOp) -> None:
        claims = self.inflight.get(op.inflight_key, {}) if op.inflight_key else None
        due = self._zset(op.inflight_key + ":due")
        for i, member in enumerate(op.members):
            if claims is not None:
                field = op.fields[i]
                if field not in claims:
                    continue  # the claim lapsed: the member may be real, it stays
                claims[field] -= 1
                if claims[field] > 0:
                    continue
                stands = claims.pop("s:" + field, None) is not None
                del claims[field]
                due.pop(field)
                if stands:
                    continue
            else:
                self._zset(op.owner_key + ":pending").pop(member)
            self._srem(op.owner_key, (member,))
            if op.reverse_prefix:
                self._srem(op.reverse_prefix + escape(member), (op.reverse_value,))

    def _confirm(self, op: ConfirmOp) -> None:
        claims = self.inflight.get(op.inflight_key, {})
        due = self._zset(op.inflight_key + ":due")
        for field in op.fields:
            if field not in claims:
                continue
            claims[field] -= 1
            if claims[field] > 0:
                claims["s:" + field] = 1
            else:
                del claims[field]
                claims.pop("s:" + field, None)
                due.pop(field)

    def _removal_busy(self, op: TombstoneOp) -> str | None:
        claims = self.inflight.get(op.inflight_key)
        if not claims:
            return None
        for field in op.fields:
            kind, what = field[:2], field[3:]
            if kind == "rm":
                if what in claims:
                    return what
                continue
            for pair in claims:
                if ":" in pair:
                    continue
                left, _, right = pair.partition("|")
                if (
                    (kind == "xo" and left == what)
                    or (kind == "xm" and right == what)
                    or (op.symmetric and right == what)
                ):
                    return what
        return None

    def _busy(self, op: AddOp) -> str | None:
        marks = self.inflight.get(op.inflight_key)
        if not marks:
            return None
        if "xo:" + escape(op.reverse_value) in marks:
            return op.members[0] if op.members else ""
        for i, member in enumerate(op.members):
            if "rm:" + op.fields[i] in marks or f"{op.member_drop}:{escape(member)}" in marks:
                return member
        return None

    def _purge_claims(self, key: str, now_ms: int) -> None:
        claims = self.inflight.get(key)
        for field in self._zset(key + ":due").expire(now_ms):
            if claims is not None:
                claims.pop(field, None)
                claims.pop("s:" + field, None)

    def _srem(self, key: str, members: tuple[str, ...]) -> None:
        current = self.sets.get(key)
        if current is not None:
            current.difference_update(members)
            if not current:
                del self.sets[key]

    def _purge_pending(self, owner_key: str, now_ms: int) -> None:
        for placeholder in self._zset(owner_key + ":pending").expire(now_ms):
            self._srem(owner_key, (placeholder,))

    def _live(self, key: str, now_ms: int) -> int:
        return self._zset(key).live(now_ms)

    def _lease_cap(self, op: LeaseOp) -> int:
        if not op.share_bp:
            return op.cap
        mau = max(len(self.sets.get(op.mau_last_key, ())), len(self.sets.get(op.mau_this_key, ())))
        return max(op.cap, op.share_bp * mau // 10000)

    # Reads and admin (never on the request path)

    async def cardinalities(self, keys: list[str]) -> list[int]:
        return [len(self.sets.get(k, ())) for k in keys]

    async def members(self, key: str) -> set[str]:
        return set(self.sets.get(key, ()))

    async def online(self, key: str, now_ms: int) -> int:
        return self._live(key, now_ms)

    async def peaks(self, key: str) -> dict[str, int]:
        return dict(self.peak.get(key, {}))

    async def load_accounts(self) -> tuple[int, dict[str, dict[str, Any]]]:
        return self.version, copy.deepcopy(self.accounts)

    async def save_account(self, name: str, record: dict[str, Any]) -> int:
        self.accounts[name] = copy.deepcopy(record)
        self.version += 1
        return self.version

    async def accounts_version(self) -> int:
        return self.version

    async def claim_once(self, key: str, ttl_s: int) -> bool:
        now = int(time.time())
        if self.markers.get(key, 0) > now:
            return False
        if len(self.markers) >= MAX_RATE_KEYS:
            self.markers = {k: t for k, t in self.markers.items() if t > now}
        self.markers[key] = now + ttl_s
        return True

    async def claimed(self, key: str) -> bool:
        return self.markers.get(key, 0) > int(time.time())

    async def delete_account(self, name: str) -> int:
        self.accounts.pop(name, None)
        self.version += 1
        return self.version

    async def scan_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.sets if k.startswith(prefix)]

    async def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.sets.pop(key, None)
            self.zsets.pop(key, None)
            self.inflight.pop(key, None)

    async def forget_claims(self, key: str, entity: str, owner: bool, member: bool) -> int:
        claims = self.inflight.get(key, {})
        gone = [f for f in claims if names(f, entity, owner, member)]
        due = self.zsets.get(key + ":due")
        for f in gone:
            del claims[f]
            if due is not None:
                due.pop(f)
        return len(gone)

    async def add_members(self, key: str, members: list[str]) -> None:
        if members:
            self.sets.setdefault(key, set()).update(members)

    async def remove_members(self, key: str, members: list[str]) -> int:
        before = len(self.sets.get(key, ()))
        self._srem(key, tuple(members))
        return before - len(self.sets.get(key, ()))

    async def swap_member(self, key: str, old: str, new: str) -> bool:
        members = self.sets.get(key)
        if not members or old not in members:
            return False
        members.discard(old)
        members.add(new)
        return True

    async def close(self) -> None:
        return None
