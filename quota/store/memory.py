"""The in-process store: the embedded default, with the same semantics as the Redis script.

Atomicity comes from asyncio: `run` never awaits between its checks and its writes.
"""

from __future__ import annotations

import copy
from typing import Any

from quota.keys import escape
from quota.store.program import (
    UNLIMITED,
    AddOp,
    BindOp,
    DropOp,
    LeaseOp,
    LoginOp,
    Outcome,
    Program,
    RateOp,
    RateState,
    Refusal,
    ReleaseOp,
    RemoveOp,
    retry_after_ms,
    sliding_window,
)


class MemoryStore:
    def __init__(self) -> None:
        self.sets: dict[str, set[str]] = {}
        self.windows: dict[str, dict[int, int]] = {}
        self.leases: dict[str, dict[str, int]] = {}
        self.pending: dict[str, dict[str, int]] = {}
        self.peak: dict[str, dict[str, int]] = {}
        self.accounts: dict[str, dict[str, Any]] = {}
        self.version = 0

    async def run(self, program: Program, now_ms: int) -> Outcome:
        if len(program.ops) == 1 and isinstance(program.ops[0], RateOp):
            return self._rate_only(program.ops[0], now_ms)
        rates: list[RateState] = []
        for index, op in enumerate(program.ops):
            refusal = self._check(index, op, now_ms, rates)
            if refusal:
                return Outcome(refusal=refusal)
        added: list[tuple[str, ...]] = []
        sizes: list[int] = []
        online = 0
        for op in program.ops:
            result = self._apply(op, now_ms)
            if isinstance(op, AddOp):
                added.append(result)
                sizes.append(len(self.sets.get(op.owner_key, ())))
            elif isinstance(op, LeaseOp):
                online = len(self.leases[op.online_key])
        return Outcome(rates=tuple(rates), added=tuple(added), sizes=tuple(sizes), online=online)

    def _rate_only(self, op: RateOp, now_ms: int) -> Outcome:
        # The commonest program (a read route): one window, checked and counted in one pass.
        index, elapsed = divmod(now_ms, op.window_ms)
        slots = self.windows.get(op.key)
        if slots is None:
            slots = self.windows[op.key] = {}
        prev, cur = slots.get(index - 1, 0), slots.get(index, 0)
        used = prev * (op.window_ms - elapsed) // op.window_ms + cur
        if used + op.cost > op.limit:
            retry = retry_after_ms(prev, cur, elapsed, op.window_ms, op.limit, op.cost)
            return Outcome(Refusal(0, "rate", used, op.limit, retry_after_ms=retry, reset_ms=op.window_ms - elapsed))
        slots[index] = cur + op.cost
        if len(slots) > 2:
            for old in [i for i in slots if i < index - 1]:
                del slots[old]
        return Outcome(rates=(RateState(op.name, op.limit, op.limit - used - op.cost, op.window_ms - elapsed),))

    def _window(self, op: RateOp, now_ms: int) -> tuple[int, int, int, int]:
        index, elapsed = divmod(now_ms, op.window_ms)
        slots = self.windows.get(op.key, {})
        return index, elapsed, slots.get(index - 1, 0), slots.get(index, 0)

    def _check(self, index: int, op: Any, now_ms: int, rates: list[RateState]) -> Refusal | None:
        if isinstance(op, RateOp):
            _, elapsed, prev, cur = self._window(op, now_ms)
            used = sliding_window(prev, cur, elapsed, op.window_ms)
            if used + op.cost > op.limit:
                retry = retry_after_ms(prev, cur, elapsed, op.window_ms, op.limit, op.cost)
                return Refusal(index, "rate", used, op.limit, retry_after_ms=retry, reset_ms=op.window_ms - elapsed)
            rates.append(RateState(op.name, op.limit, op.limit - used - op.cost, op.window_ms - elapsed))
        elif isinstance(op, AddOp):
            if op.pending_ttl_ms:
                self._purge_pending(op.owner_key, now_ms)
            owner = self.sets.get(op.owner_key, set())
            new = [m for m in op.members if m not in owner]
            if op.cap != UNLIMITED and len(owner) + len(new) > op.cap:
                room = max(0, op.cap - len(owner))
                return Refusal(index, "owner", len(owner), op.cap, room=room)
            if op.reverse_prefix and op.reverse_cap != UNLIMITED:
                for member in new:
                    theirs = self.sets.get(op.reverse_prefix + escape(member), set())
                    if op.reverse_value not in theirs and len(theirs) + 1 > op.reverse_cap:
                        return Refusal(index, "member", len(theirs), op.reverse_cap, who=member)
        elif isinstance(op, LoginOp):
            today = self.sets.get(op.dau_key, set())
            if op.dau_cap != UNLIMITED and op.user not in today and len(today) >= op.dau_cap:
                return Refusal(index, "dau", len(today), op.dau_cap)
        elif isinstance(op, LeaseOp):
            leases = self._live_leases(op.online_key, now_ms)
            cap = self._lease_cap(op)
            if op.conn not in leases and cap != UNLIMITED and len(leases) >= cap:
                return Refusal(index, "online", len(leases), cap)
        return None

    def _apply(self, op: Any, now_ms: int) -> tuple[str, ...]:
        if isinstance(op, RateOp):
            index, _, _, _ = self._window(op, now_ms)
            slots = self.windows.setdefault(op.key, {})
            slots[index] = slots.get(index, 0) + op.cost
            for old in [i for i in slots if i < index - 1]:
                del slots[old]
        elif isinstance(op, AddOp):
            owner = self.sets.setdefault(op.owner_key, set())
            new = tuple(m for m in op.members if m not in owner)
            owner.update(new)
            if op.reverse_prefix:
                for member in new:
                    self.sets.setdefault(op.reverse_prefix + escape(member), set()).add(op.reverse_value)
            if op.pending_ttl_ms:
                for member in new:
                    self.pending.setdefault(op.owner_key, {})[member] = now_ms + op.pending_ttl_ms
            return new
        elif isinstance(op, RemoveOp):
            self._srem(op.owner_key, op.members)
            if op.reverse_prefix:
                for member in op.members:
                    self._srem(op.reverse_prefix + escape(member), (op.reverse_value,))
        elif isinstance(op, DropOp):
            for member in self.sets.pop(op.owner_key, set()):
                self._srem(op.reverse_prefix + escape(member), (op.value,))
        elif isinstance(op, BindOp):
            if self.pending.get(op.owner_key, {}).pop(op.placeholder, None) is not None:
                self._srem(op.owner_key, (op.placeholder,))
                self.sets.setdefault(op.owner_key, set()).add(op.member)
        elif isinstance(op, LoginOp):
            self.sets.setdefault(op.dau_key, set()).add(op.user)
            self.sets.setdefault(op.mau_key, set()).add(op.user)
        elif isinstance(op, LeaseOp):
            leases = self._live_leases(op.online_key, now_ms)
            leases[op.conn] = now_ms + op.ttl_ms
            peaks = self.peak.setdefault(op.peak_key, {})
            peaks[op.month] = max(peaks.get(op.month, 0), len(leases))
        elif isinstance(op, ReleaseOp):
            self.leases.get(op.online_key, {}).pop(op.conn, None)
        return ()

    def _srem(self, key: str, members: tuple[str, ...]) -> None:
        current = self.sets.get(key)
        if current is not None:
            current.difference_update(members)
            if not current:
                del self.sets[key]

    def _purge_pending(self, owner_key: str, now_ms: int) -> None:
        pending = self.pending.get(owner_key, {})
        for placeholder in [p for p, deadline in pending.items() if deadline <= now_ms]:
            del pending[placeholder]
            self._srem(owner_key, (placeholder,))

    def _live_leases(self, key: str, now_ms: int) -> dict[str, int]:
        leases = self.leases.setdefault(key, {})
        for conn in [c for c, expiry in leases.items() if expiry <= now_ms]:
            del leases[conn]
        return leases

    def _lease_cap(self, op: LeaseOp) -> int:
        if not op.share_bp:
            return op.cap
        mau = max(len(self.sets.get(op.mau_last_key, ())), len(self.sets.get(op.mau_this_key, ())))
        return max(op.cap, op.share_bp * mau // 10000)

    async def cardinalities(self, keys: list[str]) -> list[int]:
        return [len(self.sets.get(k, ())) for k in keys]

    async def members(self, key: str) -> set[str]:
        return set(self.sets.get(key, ()))

    async def online(self, key: str, now_ms: int) -> int:
        return len(self._live_leases(key, now_ms))

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

    async def scan_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.sets if k.startswith(prefix)]

    async def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.sets.pop(key, None)

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
