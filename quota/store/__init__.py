"""Stores: where counters live. `memory` for one process (the default), `redis` for many.

store = store_from_url("memory://")
store = store_from_url("redis://localhost:6379/0")
"""

from __future__ import annotations

from typing import Any, Protocol

from quota.errors import ConfigError, Problem
from quota.store.program import Outcome, Program
from quota.tokens import masked_url


class Store(Protocol):
    async def run(self, program: Program, now_ms: int, dry: bool = False) -> Outcome:
        """Check every op of `program`, then apply all of them or none, in one atomic step. With
        `dry`, only check: the outcome is what applying would give, and nothing changes."""

    async def cardinalities(self, keys: list[str]) -> list[int]:
        """The size of each set (one round trip)."""

    async def members(self, key: str) -> set[str]: ...

    async def online(self, key: str, now_ms: int) -> int:
        """Live connection leases."""

    async def peaks(self, key: str) -> dict[str, int]:
        """Peak online per month (yyyymm -> peak)."""

    async def load_accounts(self) -> tuple[int, dict[str, dict[str, Any]]]:
        """The accounts changed at run time, with the version of that document."""

    async def save_account(self, name: str, record: dict[str, Any]) -> int:
        """Store one account record and bump the version; returns the new version."""

    async def accounts_version(self) -> int: ...

    async def claim_once(self, key: str, ttl_s: int) -> bool:
        """True for the first caller to claim `key` within `ttl_s` seconds, in any process."""

    async def claimed(self, key: str) -> bool:
        """Whether `key` is claimed (claim_once) and its claim has not lapsed, in any process."""

    async def delete_account(self, name: str) -> int:
        """Drop one stored account record (the overlay on accounts.yaml) and bump the version."""

    async def scan_prefix(self, prefix: str) -> list[str]:
        """Every key starting with `prefix` (admin and reconcile only, never on the request path)."""

    async def delete(self, keys: list[str]) -> None: ...

    async def forget_claims(self, key: str, entity: str, owner: bool, member: bool) -> int:
        """Delete the fields of the claims hash `key`, and their deadlines in `key:due`, that name
        the escaped `entity` on the sides given (keys.names); the others' claims and tombstones
        stay. How many went."""
        ...

    async def add_members(self, key: str, members: list[str]) -> None: ...

    async def remove_members(self, key: str, members: list[str]) -> int: ...

    async def swap_member(self, key: str, old: str, new: str) -> bool:
        """Replace `old` by `new` in a set if it is there, atomically (the set keeps its size)."""

    async def close(self) -> None: ...


def store_from_url(url: str, *, timeout_ms: int = 250) -> Store:
    scheme = url.split("://", 1)[0]
    if scheme == "memory":
        from quota.store.memory import MemoryStore

        return MemoryStore()
    from quota.store.redis import SCHEMES, RedisStore

    if scheme in SCHEMES:
        return RedisStore(url, timeout_ms=timeout_ms)
    expected = "memory://, redis[s]://host:port[/db], redis+cluster://h:p[,h:p] or redis+sentinel://h:p[,h:p]/service"
    raise ConfigError([Problem("--redis", "url", expected, masked_url(url))])
