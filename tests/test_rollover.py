"""Days, months and plan changes as the clock crosses them: the free DAU ceiling on the next day,
MAU per month, a plan change from the 1st of next month, and accounts changed in one process
reaching another. The middleware's clock is the test's; DAU and MAU sets are read raw by their
spelled-out keys."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from quota.store.memory import MemoryStore
from tests.conftest import Clock, make_client
from tests.helpers import middleware_of, raw_members, register

TOKEN = "rollover-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def at(text: str, tick: float = 0.021) -> Clock:
    return Clock(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp(), tick)


async def login(client: httpx.AsyncClient, app: str, user: str) -> int:
    return (await client.post(f"/{app}/token", json={"username": user})).status_code


async def test_free_dau_ceiling_resets_the_next_day(store: Any) -> None:
    """Catches the free plan's 100-DAU ceiling carried into the next day (today's date computed
    once, or the DAU set not keyed by day): the 101st user refused on the 15th gets in on the 16th."""
    clock = at("2027-01-15 23:50:00")
    async with make_client(store, clock) as client:
        users = [f"d{i}" for i in range(101)]
        await register(client, "demo/free", users)
        for u in users[:100]:
            assert await login(client, "demo/free", u) == 200
        r = await client.post("/demo/free/token", json={"username": "d100"})
        assert r.status_code == 403 and r.json()["limit"] == "included_dau"
        clock.now = at("2027-01-16 00:00:01").now
        assert await login(client, "demo/free", "d100") == 200
        assert await login(client, "demo/free", "d0") == 200
        assert len(await raw_members(store, "q:{demo#free}:dau:20270115")) == 100
        assert await raw_members(store, "q:{demo#free}:dau:20270116") == {"d100", "d0"}
        assert len(await raw_members(store, "q:{demo#free}:mau:202701")) == 101


async def test_a_clock_stepped_back_over_midnight_counts_on_the_day_it_reads(store: Any) -> None:
    """Catches the day kept from an earlier reading of the clock: a clock stepped back across
    midnight (NTP) counts its logins on the day it reads, and midnight itself is the new day's."""
    clock = at("2027-01-16 00:00:00", tick=0)
    async with make_client(store, clock) as client:
        await register(client, "demo/free", ["a", "b", "c"])
        assert await login(client, "demo/free", "a") == 200
        clock.now = at("2027-01-15 23:59:59.999", tick=0).now
        assert await login(client, "demo/free", "b") == 200
        clock.now = at("2027-01-16 00:00:00", tick=0).now
        assert await login(client, "demo/free", "c") == 200
        assert await raw_members(store, "q:{demo#free}:dau:20270116") == {"a", "c"}
        assert await raw_members(store, "q:{demo#free}:dau:20270115") == {"b"}


async def test_mau_is_per_month(store: Any) -> None:
    """Catches MAU not rolling over with the month: logins on January 31st and February 1st land in
    mau:202701 and mau:202702 respectively."""
    clock = at("2027-01-31 23:59:00")
    async with make_client(store, clock) as client:
        await register(client, "demo/pro", ["a", "b"])
        assert await login(client, "demo/pro", "a") == 200
        assert await login(client, "demo/pro", "b") == 200
        clock.now = at("2027-02-01 00:00:30").now
        assert await login(client, "demo/pro", "A") == 200
        assert await raw_members(store, "q:{demo#pro}:mau:202701") == {"a", "b"}
        assert await raw_members(store, "q:{demo#pro}:mau:202702") == {"a"}
        assert await raw_members(store, "q:{demo#pro}:dau:20270131") == {"a", "b"}
        assert await raw_members(store, "q:{demo#pro}:dau:20270201") == {"a"}


async def test_plan_change_is_enforced_from_the_first(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a plan change or a cancellation enforced from the day it was made: pro changed to
    free on the 20th keeps translation until the month ends, and loses it on the 1st; a cancelled
    basic account answers until the 1st, then its app has no plan."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    clock = at("2027-01-20 12:00:00")
    async with make_client(store, clock) as client:
        r = await client.post(
            "/_quota/accounts/demo-pro/change-plan", json={"plan": "free", "date": "2027-01-20"}, headers=AUTH
        )
        assert r.status_code == 200
        r = await client.post("/_quota/accounts/demo-basic/cancel", json={"date": "2027-01-20"}, headers=AUTH)
        assert r.status_code == 200
        assert (await client.post("/demo/pro/messages/translate", json={})).status_code == 200
        assert (await client.get("/demo/basic/users")).status_code == 200
        clock.now = at("2027-01-31 23:59:58").now
        assert (await client.post("/demo/pro/messages/translate", json={})).status_code == 200
        assert (await client.get("/demo/basic/users")).status_code == 200
        clock.now = at("2027-02-01 00:00:01").now
        r = await client.post("/demo/pro/messages/translate", json={})
        assert r.status_code == 403 and r.json()["limit"] == "translation"
        r = await client.get("/demo/basic/users")
        assert r.status_code == 404 and r.json()["error"] == "service_resource_not_found"


async def test_accounts_reach_every_process(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the accounts watcher never refreshing: an account frozen through process A's admin
    API must be refused by process B (same store) within about a second, and let in again once
    unfrozen. Waits on the condition with a deadline."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    clock = Clock(time.time())
    async with make_client(store, clock) as a, make_client(store, clock) as b:
        assert (await b.get("/demo/pro/users")).status_code == 200  # B's watcher starts with its first request

        async def b_answers(status: int) -> float:
            started = time.monotonic()
            deadline = started + 10
            while (await b.get("/demo/pro/users")).status_code != status:
                assert time.monotonic() < deadline, f"process B never answered {status}"
                await asyncio.sleep(0.02)
            return time.monotonic() - started

        assert (await a.post("/_quota/accounts/demo-pro/freeze", headers=AUTH)).status_code == 200
        assert (await a.get("/demo/pro/users")).status_code == 403
        assert await b_answers(403) < 5
        assert (await a.post("/_quota/accounts/demo-pro/unfreeze", headers=AUTH)).status_code == 200
        assert await b_answers(200) < 5


async def test_a_new_process_serves_the_stored_accounts_from_its_first_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catches a process serving accounts.yaml alone until its watcher's first poll (found by the
    audit of 2026-12-01): a worker started after an account was frozen through another served the
    frozen account's first requests, one restart after another."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    store = MemoryStore()  # stands for the Redis every process shares
    clock = Clock(time.time())
    async with make_client(store, clock) as a:
        assert (await a.post("/_quota/accounts/demo-pro/freeze", headers=AUTH)).status_code == 200
    async with make_client(store, clock) as b:
        answers = await asyncio.gather(*(b.get("/demo/pro/users") for _ in range(5)))
        assert [r.status_code for r in answers] == [403] * 5


class SlowAccounts(MemoryStore):
    """A memory store whose accounts read takes a round trip's time, as on Redis."""

    async def load_accounts(self) -> tuple[int, dict[str, dict[str, Any]]]:
        await asyncio.sleep(0.05)
        return await super().load_accounts()


async def test_a_reload_keeps_the_stored_accounts_while_it_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a reload serving accounts.yaml alone while it reads the stored changes again (found by
    the audit of 2026-12-01): a frozen account was served during the read, and until the watcher's
    next poll if the read failed."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    async with make_client(SlowAccounts(), Clock(time.time())) as client:
        assert (await client.post("/_quota/accounts/demo-pro/freeze", headers=AUTH)).status_code == 200
        assert (await client.get("/demo/pro/users")).status_code == 403
        reload = asyncio.ensure_future(client.post("/_quota/reload", headers=AUTH))
        await asyncio.sleep(0.01)  # the reload is reading the stored accounts
        during = await client.get("/demo/pro/users")
        assert (await reload).status_code == 200
        assert during.status_code == 403
        assert (await client.get("/demo/pro/users")).status_code == 403


async def test_a_reload_during_the_first_read_reads_the_new_runtimes_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a reload (SIGHUP) landing while a new process reads the stored accounts: the new
    runtime carried an overlay not read yet, and served accounts.yaml alone until the next poll."""
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    store = SlowAccounts()
    clock = Clock(time.time())
    async with make_client(store, clock) as a:
        assert (await a.post("/_quota/accounts/demo-pro/freeze", headers=AUTH)).status_code == 200
    async with make_client(store, clock) as b:
        first = asyncio.ensure_future(b.get("/demo/pro/users"))
        await asyncio.sleep(0.01)  # the first read is on its way
        middleware_of(b).reload()
        assert (await first).status_code == 403
        assert (await b.get("/demo/pro/users")).status_code == 403


class SwallowingStore(MemoryStore):
    """A memory store whose version poll answers the way Python 3.11's wait_for does (redis-py sends
    through it) when a cancel lands as the send completes: with the value, the cancel swallowed."""

    def __init__(self) -> None:
        super().__init__()
        self.polling = asyncio.Event()
        self.swallow = True

    async def accounts_version(self) -> int:
        self.polling.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if not self.swallow:
                raise
        return self.version


async def test_the_accounts_watcher_stops_with_the_server(clock: Clock) -> None:
    """Catches a watcher that outlives its server: stopped mid-poll by lifespan.shutdown, with the
    cancel swallowed under it, it must still end (it polled on for ever, hanging the event loop's
    close and with it the test run)."""
    store = SwallowingStore()
    async with make_client(store, clock) as client:
        assert (await client.get("/demo/pro/users")).status_code == 200
        await asyncio.wait_for(store.polling.wait(), 5)
        messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: dict[str, Any]) -> None:
            pass

        watcher = middleware_of(client)._watcher
        try:
            # The shutdown waits for the watcher: once it returns, no poll is left in flight.
            await asyncio.wait_for(
                middleware_of(client)({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send), 3
            )
            assert watcher.done()
        finally:
            store.swallow = False  # a failing run must not hang the event loop's close as well
            watcher.cancel()
