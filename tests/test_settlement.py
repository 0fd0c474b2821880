"""What happens to a request's counter changes once the upstream answered (or did not): adds kept
on 2xx only, removals applied on 2xx only, creates bound to the answer's id, batch removes split,
shadow mode. Over HTTP through the middleware, on every store; counter keys are spelled out here
and read raw (SMEMBERS on Redis), never through quota's key helpers."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from quota.config import load_config
from quota.gateway import create_gateway
from quota.store.memory import MemoryStore
from quota.store.program import ConfirmOp
from tests.conftest import Clock, make_client
from tests.helpers import (
    SwitchedStore,
    create_room,
    gateway_state,
    middleware_of,
    raw_deadlines,
    raw_members,
    read_yaml,
    register,
    room_id,
    write_yaml,
)

PRO = "demo/pro"


class Answering:
    """The reference gateway, except that requests `when` picks get `status` and are not performed."""

    def __init__(self, status: int, when: Any) -> None:
        self.gateway = create_gateway()
        self.state = self.gateway.state
        self.status, self.when = status, when

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.when(scope):
            await send({"type": "http.response.start", "status": self.status, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error": "no"}'})
            return
        await self.gateway(scope, receive, send)


def _posts_to(fragment: str) -> Any:
    return lambda scope: scope["method"] == "POST" and fragment in scope["path"]


def _deletes(fragment: str) -> Any:
    return lambda scope: scope["method"] == "DELETE" and fragment in scope["path"]


@pytest.mark.parametrize("status", [400, 404, 409, 302])
async def test_non_2xx_answer_undoes_the_add(store: Any, clock: Clock, status: int) -> None:
    """Catches an add kept after a 4xx (or 3xx) answer: only 5xx and exceptions were undone, so a
    friend request the gateway refused with 409 still used both users' friend slots."""
    upstream = Answering(status, _posts_to("/contacts/"))
    async with make_client(store, clock, upstream=upstream) as client:
        await register(client, PRO, ["a", "b"])
        r = await client.post(f"/{PRO}/users/a/contacts/users/b")
        assert r.status_code == status
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:a") == set()
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:b") == set()


async def test_non_2xx_answer_applies_no_removal(store: Any, clock: Clock) -> None:
    """Catches removals applied whatever the upstream answered: a friend removal and a member
    removal the gateway refused (409, 500) freed slots while the friendship and membership stayed."""
    upstream = Answering(409, lambda scope: False)
    async with make_client(store, clock, upstream=upstream) as client:
        await register(client, PRO, ["own", "a", "b"])
        assert (await client.post(f"/{PRO}/users/a/contacts/users/b")).status_code == 200
        rid = room_id(await create_room(client, PRO, "chatgroups", "own"), "chatgroups")
        assert (await client.post(f"/{PRO}/chatgroups/{rid}/users/a")).status_code == 200
        upstream.when = _deletes("/contacts/")
        assert (await client.delete(f"/{PRO}/users/a/contacts/users/b")).status_code == 409
        upstream.status, upstream.when = 500, _deletes(f"/chatgroups/{rid}")
        assert (await client.delete(f"/{PRO}/chatgroups/{rid}/users/a")).status_code == 500
        assert (await client.delete(f"/{PRO}/chatgroups/{rid}")).status_code == 500
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:a") == {"b"}
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:b") == {"a"}
        assert await raw_members(store, f"q:{{demo#pro}}:s:group_members:o:{rid}") == {"own", "a"}
        assert await raw_members(store, "q:{demo#pro}:s:group_members:m:a") == {rid}
        assert await raw_members(store, "q:{demo#pro}:s:app_groups:o:demo%23pro") == {rid}


class _Hold:
    """The reference gateway, holding chosen requests until the test lets them go (or cancels)."""

    def __init__(self) -> None:
        self.gateway = create_gateway()
        self.state = self.gateway.state
        self.holds: Any = lambda scope: False
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.holds(scope):
            self.entered.set()
            await self.release.wait()
        await self.gateway(scope, receive, send)


async def test_cancelled_request_undoes_its_add(store: Any, clock: Clock) -> None:
    """Catches a cancelled request (the client went away, the server cancelled the app) keeping
    its add: the README promises an undo, and the member was never added at the gateway."""
    upstream = _Hold()
    async with make_client(store, clock, upstream=upstream) as client:
        await register(client, PRO, ["own", "a", "b"])
        rid = room_id(await create_room(client, PRO, "chatrooms", "own"), "chatrooms")
        upstream.holds = _posts_to(f"/chatrooms/{rid}/users")
        task = asyncio.ensure_future(client.post(f"/{PRO}/chatrooms/{rid}/users", json={"usernames": ["a", "b"]}))
        await asyncio.wait_for(upstream.entered.wait(), 10)
        assert await raw_members(store, f"q:{{demo#pro}}:s:chatroom_members:o:{rid}") == {"own", "a", "b"}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gateway_state(client, PRO).chatrooms[rid]["members"] == {"own"}
        assert await raw_members(store, f"q:{{demo#pro}}:s:chatroom_members:o:{rid}") == {"own"}
        assert await raw_members(store, "q:{demo#pro}:s:chatroom_members:m:a") == set()
        assert await raw_members(store, "q:{demo#pro}:s:chatroom_members:m:b") == set()


@pytest.mark.parametrize("kind", ["join", "leave"])
async def test_claims_are_renewed_while_the_upstream_works(store: Any, config_dir: Path, kind: str) -> None:
    """Catches claims (a join's) and tombstones (a leave's) that lapse while their request is still in
    flight (renewals aimed at the wrong key, or none): a request held upstream past their life keeps
    them alive, renewed every third of `reservation_ttl_s`. Waits on the renewal with a deadline,
    never a fixed sleep."""
    (config_dir / "quota.yaml").write_text("reservation_ttl_s: 1\n")
    clock = Clock(tick=0.001)
    upstream = _Hold()
    async with make_client(store, clock, load_config(config_dir), upstream=upstream) as client:
        await register(client, PRO, ["own", "u"])
        rid = room_id(await create_room(client, PRO, "chatgroups", "own"), "chatgroups")
        if kind == "join":
            upstream.holds = _posts_to(f"/chatgroups/{rid}/users")
            request = client.post(f"/{PRO}/chatgroups/{rid}/users", json={"usernames": ["u"]})
            field = f"{rid}|u"
        else:
            assert (await client.post(f"/{PRO}/chatgroups/{rid}/users/u")).status_code == 200
            upstream.holds = _deletes(f"/chatgroups/{rid}/users")
            request = client.delete(f"/{PRO}/chatgroups/{rid}/users/u")
            field = f"rm:{rid}|u"
        task = asyncio.ensure_future(request)
        await asyncio.wait_for(upstream.entered.wait(), 10)
        due_key = "q:{demo#pro}:s:group_members:inflight:due"
        first = (await raw_deadlines(store, due_key))[field]
        clock.advance(0.9)
        deadline = asyncio.get_running_loop().time() + 10
        while (await raw_deadlines(store, due_key)).get(field, 0) <= first + 500:
            assert asyncio.get_running_loop().time() < deadline, "the claim was never renewed"
            await asyncio.sleep(0.02)
        upstream.release.set()
        assert (await task).status_code == 200
        expected = {"own", "u"} if kind == "join" else {"own"}
        assert await raw_members(store, f"q:{{demo#pro}}:s:group_members:o:{rid}") == expected


async def test_a_reload_that_shortens_the_ttl_renews_sooner(store: Any, config_dir: Path) -> None:
    """One timer renews every request in flight. A reload that shortens reservation_ttl_s (60 s to
    1 s) while a request holds the timer at 20 s must not leave a new request's claim unrenewed.
    Catches: a timer set for the old life, under which the new claim lapses in flight."""
    clock = Clock(tick=0.001)
    upstream = _Hold()
    async with make_client(store, clock, load_config(config_dir), upstream=upstream) as client:
        await register(client, PRO, ["own", "u", "v"])
        rid = room_id(await create_room(client, PRO, "chatgroups", "own"), "chatgroups")
        upstream.holds = _posts_to(f"/chatgroups/{rid}/users")
        first = asyncio.ensure_future(client.post(f"/{PRO}/chatgroups/{rid}/users/u"))
        await asyncio.wait_for(upstream.entered.wait(), 10)
        (config_dir / "quota.yaml").write_text("reservation_ttl_s: 1\n")
        middleware_of(client).reload(config_dir)
        upstream.entered.clear()
        second = asyncio.ensure_future(client.post(f"/{PRO}/chatgroups/{rid}/users/v"))
        await asyncio.wait_for(upstream.entered.wait(), 10)
        due_key = "q:{demo#pro}:s:group_members:inflight:due"
        born = (await raw_deadlines(store, due_key))[f"{rid}|v"]
        clock.advance(0.9)
        deadline = asyncio.get_running_loop().time() + 5
        while (await raw_deadlines(store, due_key)).get(f"{rid}|v", 0) <= born + 500:
            assert asyncio.get_running_loop().time() < deadline, "the new claim was never renewed"
            await asyncio.sleep(0.02)
        upstream.release.set()
        assert (await first).status_code == 200 and (await second).status_code == 200


async def test_delete_batch_frees_what_the_users_held(store: Any, clock: Clock) -> None:
    """Catches `DELETE /users` (users.delete_batch, ids read from the answer) freeing nothing: the
    deleted users stayed registered, in their friends' lists and in their rooms."""
    async with make_client(store, clock) as client:
        await register(client, PRO, ["old1"])
        clock.advance(1)
        await register(client, PRO, ["old2"])
        clock.advance(1)
        await register(client, PRO, ["keep", "own"])
        rid = room_id(await create_room(client, PRO, "chatgroups", "own"), "chatgroups")
        cid = room_id(await create_room(client, PRO, "chatrooms", "own"), "chatrooms")
        for old in ("old1", "old2"):
            assert (await client.post(f"/{PRO}/users/keep/contacts/users/{old}")).status_code == 200
            assert (await client.post(f"/{PRO}/chatgroups/{rid}/users/{old}")).status_code == 200
            assert (await client.post(f"/{PRO}/chatrooms/{cid}/users/{old}")).status_code == 200
        r = await client.delete(f"/{PRO}/users", params={"limit": "2"})
        assert r.status_code == 200 and {e["username"] for e in r.json()["entities"]} == {"old1", "old2"}
        assert await raw_members(store, "q:{demo#pro}:s:app_users:o:demo%23pro") == {"keep", "own"}
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:keep") == set()
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:old1") == set()
        assert await raw_members(store, f"q:{{demo#pro}}:s:group_members:o:{rid}") == {"own"}
        assert await raw_members(store, f"q:{{demo#pro}}:s:chatroom_members:o:{cid}") == {"own"}
        assert await raw_members(store, "q:{demo#pro}:s:group_members:m:old2") == set()


async def test_chatroom_batch_remove_splits_on_commas(store: Any, clock: Clock) -> None:
    """Catches the batch-remove route not splitting its list: `DELETE .../chatrooms/{id}/users/a,b`
    removed a member named "a,b" (nobody), and a and b kept their slots."""
    async with make_client(store, clock) as client:
        await register(client, PRO, ["own", "a", "b", "c"])
        cid = room_id(await create_room(client, PRO, "chatrooms", "own"), "chatrooms")
        assert (await client.post(f"/{PRO}/chatrooms/{cid}/users", json={"usernames": ["a", "b", "c"]})).is_success
        assert (await client.delete(f"/{PRO}/chatrooms/{cid}/users/a,b")).status_code == 200
        assert await raw_members(store, f"q:{{demo#pro}}:s:chatroom_members:o:{cid}") == {"own", "c"}
        assert await raw_members(store, "q:{demo#pro}:s:chatroom_members:m:a") == set()
        assert await raw_members(store, "q:{demo#pro}:s:chatroom_members:m:c") == {cid}


@pytest.mark.parametrize("kind,most", [("chatgroups", 60), ("chatrooms", 100)])
async def test_remove_routes_hold_their_max_batch(store: Any, clock: Clock, kind: str, most: int) -> None:
    """Catches `max_batch` ignored on the remove routes: a list of 61 (groups) or 101 (chatrooms)
    ids was split and removed in one call."""
    upstream = Answering(200, lambda scope: False)
    async with make_client(store, clock, upstream=upstream) as client:
        names = ",".join(f"u{i}" for i in range(most + 1))
        r = await client.delete(f"/{PRO}/{kind}/1/users/{names}")
        assert r.status_code == 400 and r.json()["error"] == "illegal_argument"
        upstream.when = _deletes("/users/")
        names = ",".join(f"u{i}" for i in range(most))
        assert (await client.delete(f"/{PRO}/{kind}/1/users/{names}")).status_code == 200


async def test_create_2xx_without_an_id_keeps_its_slot(store: Any, config_dir: Path) -> None:
    """Catches a create whose 2xx answer names no id losing its slot: the chatroom existed and the
    reservation lapsed after 60 s, so the app could create one more than its plan allows."""
    plans = config_dir / "plans.yaml"
    doc = read_yaml(plans)
    doc["plans"]["pro"]["limits"]["chatrooms_per_app"] = 2
    write_yaml(plans, doc)
    clock = Clock(tick=0.001)
    upstream = Answering(200, _posts_to("/chatrooms"))
    async with make_client(store, clock, load_config(config_dir), upstream=upstream) as client:
        await register(client, PRO, ["own"])
        r = await create_room(client, PRO, "chatrooms", "own")
        assert r.status_code == 200
        key = "q:{demo#pro}:s:app_chatrooms:o:demo%23pro"
        (placeholder,) = await raw_members(store, key)
        assert await raw_deadlines(store, key + ":pending") == {}
        assert 'kind="unbound_create"' in middleware_of(client).metrics.render().decode()
        clock.advance(3600)  # far past the reservation's 60 s
        upstream.when = lambda scope: False
        assert (await create_room(client, PRO, "chatrooms", "own")).status_code == 200
        third = await create_room(client, PRO, "chatrooms", "own")
        assert third.status_code == 403 and third.json()["limit"] == "chatrooms_per_app"
        counted = await raw_members(store, key)
        assert placeholder in counted and len(counted) == 2


@pytest.mark.parametrize("status", [409, 500])
async def test_refused_create_frees_its_slot_at_once(store: Any, clock: Clock, status: int) -> None:
    """Catches a create the upstream refused keeping its reservation until it expires (60 s of a
    slot held for nothing), or an undo that cannot handle a reservation (no claim fields)."""
    upstream = Answering(status, _posts_to("/chatgroups"))
    async with make_client(store, clock, upstream=upstream) as client:
        assert (await create_room(client, PRO, "chatgroups", "own")).status_code == status
        assert await raw_members(store, "q:{demo#pro}:s:app_groups:o:demo%23pro") == set()
        assert await raw_deadlines(store, "q:{demo#pro}:s:app_groups:o:demo%23pro:pending") == {}


async def test_shadow_mode_lets_a_429_through(store: Any, clock: Clock, config_dir: Path) -> None:
    """Catches shadow mode applying to 403s only: past the rate, a shadowed route still answered
    429 instead of passing the request on with the refusal in `x-quota-shadow`."""
    (config_dir / "quota.yaml").write_text("shadow: true\n")
    clock.tick = 0
    async with make_client(store, clock, load_config(config_dir)) as client:
        await register(client, PRO, ["a"])
        clock.advance(2)
        for _ in range(100):
            r = await client.get(f"/{PRO}/users/a")
            assert r.status_code == 200 and "x-quota-shadow" not in r.headers
        r = await client.get(f"/{PRO}/users/a")
        assert r.status_code == 200 and json.loads(r.text)["entities"][0]["username"] == "a"
        assert r.headers["x-quota-shadow"] == "429 reach_limit rest_per_ip"
        assert 'outcome="shadow"' in middleware_of(client).metrics.render().decode()


class Creating:
    """The reference gateway, except that a create answers 200 with the body the test chose."""

    def __init__(self) -> None:
        self.gateway = create_gateway()
        self.state = self.gateway.state
        self.answer: Any = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/chatgroups"):
            body = json.dumps(self.answer).encode()
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.gateway(scope, receive, send)


async def test_create_ids_read_from_the_answer(store: Any, clock: Clock) -> None:
    """Catches a create's id read wrongly from its answer: a numeric id is bound (as text), a room id
    of 32 digits is bound, and an empty, 33-digit, non-numeric or boolean id is not taken for an id
    (the slot stays, counted and unnamed)."""
    upstream = Creating()
    key = "q:{demo#pro}:s:app_groups:o:demo%23pro"
    async with make_client(store, clock, upstream=upstream) as client:
        for answer, bound in (
            ({"data": {"groupid": 12345}}, "12345"),
            ({"data": {"groupid": "1" * 32}}, "1" * 32),
            ({"data": {"groupid": ""}}, None),
            ({"data": {"groupid": "1" * 33}}, None),
            ({"data": {"groupid": "12a"}}, None),
            ({"data": {"groupid": True}}, None),
        ):
            upstream.answer = answer
            before = await raw_members(store, key)
            assert (await client.post(f"/{PRO}/chatgroups", json={"owner": "own"})).status_code == 200
            (new,) = await raw_members(store, key) - before
            assert new == bound if bound is not None else new.startswith("~pending:"), (answer, new)


def _confirm_delay(config_dir: Path, ms: int = 1000) -> Any:
    (config_dir / "quota.yaml").write_text(f"confirm_delay_ms: {ms}\n")
    return load_config(config_dir)


CLAIMS = "q:{demo#pro}:s:contacts:inflight:due"


async def test_confirm_rides_with_the_next_call(store: Any, clock: Clock, config_dir: Path) -> None:
    """An add's confirm waits (confirm_delay_ms, 1 s here) for the app's next store call and settles
    first in it: a removal right after the add is not refused as busy, and leaves no claim behind.
    Catches: a waiting confirm that is not carried (409 conflict on the removal), or carried after
    the removal's checks."""
    async with make_client(store, clock, _confirm_delay(config_dir)) as client:
        await register(client, PRO, ["a", "b"])
        assert (await client.post(f"/{PRO}/users/a/contacts/users/b")).status_code == 200
        assert set(await raw_deadlines(store, CLAIMS)) == {"a|b"}  # waiting for a ride
        r = await client.delete(f"/{PRO}/users/a/contacts/users/b")
        assert r.status_code == 200, r.text
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:a") == set()
        assert await raw_deadlines(store, CLAIMS) == {}


async def test_a_removal_decided_as_the_confirm_timer_fires_is_not_busy(
    store: Any, clock: Clock, config_dir: Path
) -> None:
    """The confirm timer fires just as a removal of the same friend is being decided: the removal
    must still find the confirm ahead of it. Catches: confirms taken off the waiting list when the
    timer fired but sent only once its task ran, so a removal decided in between went out first and
    met its own add's claim (409; seen in the suite as a room delete that freed nobody's count)."""
    async with make_client(store, clock, _confirm_delay(config_dir)) as client:
        await register(client, PRO, ["a", "b"])
        assert (await client.post(f"/{PRO}/users/a/contacts/users/b")).status_code == 200
        removal = asyncio.ensure_future(client.delete(f"/{PRO}/users/a/contacts/users/b"))
        middleware_of(client).guard._flush_soon("q:{demo#pro}:")  # the timer, firing now
        r = await removal
        assert r.status_code == 200, r.text
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:a") == set()
        assert await raw_deadlines(store, CLAIMS) == {}


class SlowConfirms(MemoryStore):
    """A real memory store that confirm-only programs reach late, as a command does that waits for
    a connection of redis-py's pool (Cluster) while a later one goes out on another."""

    async def run(self, program: Any, now_ms: int, dry: bool = False) -> Any:
        if program.ops and all(isinstance(op, ConfirmOp) for op in program.ops):
            await asyncio.sleep(0.05)
        return await super().run(program, now_ms, dry)


async def test_a_removal_decided_while_the_confirms_travel_waits_for_them(clock: Clock, config_dir: Path) -> None:
    """The confirm timer has fired and its confirms are on their way, slowly, when a removal of the
    same friend is decided. Catches: the removal overtaking them and meeting its own add's claim
    (409; seen on Cluster as a room delete that freed nobody's count)."""
    store = SlowConfirms()
    async with make_client(store, clock, _confirm_delay(config_dir)) as client:
        await register(client, PRO, ["a", "b"])
        assert (await client.post(f"/{PRO}/users/a/contacts/users/b")).status_code == 200
        middleware_of(client).guard._flush_soon("q:{demo#pro}:")  # the timer fires
        await asyncio.sleep(0)  # its task takes the confirms and sets off
        r = await client.delete(f"/{PRO}/users/a/contacts/users/b")
        assert r.status_code == 200, r.text
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:a") == set()
        assert await raw_deadlines(store, CLAIMS) == {}


async def test_shutdown_sends_the_waiting_confirms(store: Any, clock: Clock, config_dir: Path) -> None:
    """Catches confirms lost when the server stops: their claims would linger until they lapse
    (reservation_ttl_s), and a removal of what was just added would meet 409 until then.
    lifespan.shutdown sends them first."""
    async with make_client(store, clock, _confirm_delay(config_dir)) as client:
        await register(client, PRO, ["a", "b"])
        assert (await client.post(f"/{PRO}/users/a/contacts/users/b")).status_code == 200
        assert set(await raw_deadlines(store, CLAIMS)) == {"a|b"}
        messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await middleware_of(client)({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert await raw_deadlines(store, CLAIMS) == {}
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:a") == {"b"}


async def test_a_confirm_lost_with_a_failed_call_only_lets_its_claim_lapse(clock: Clock, config_dir: Path) -> None:
    """Confirms carried by a store call that fails are not sent again: the script may have run (a
    reply lost to a timeout), and a confirm applied twice would settle another request's claim. The
    claim then lapses after reservation_ttl_s, keeping its member, and stops holding removals.
    Catches: a lost confirm taking the member with it (a friend slot given back), or its claim
    blocking the removal for ever."""
    store = SwitchedStore()
    async with make_client(store, clock, _confirm_delay(config_dir)) as client:
        await register(client, PRO, ["a", "b", "c"])
        assert (await client.post(f"/{PRO}/users/a/contacts/users/b")).status_code == 200
        store.down = True
        assert (await client.get(f"/{PRO}/users/a")).status_code == 200  # rates fail open
        store.down = False
        assert set(await raw_deadlines(store, CLAIMS)) == {"a|b"}  # not confirmed, not resent
        assert (await client.delete(f"/{PRO}/users/a/contacts/users/b")).status_code == 409
        clock.advance(61)  # past reservation_ttl_s: the claim lapses
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:a") == {"b"}
        assert (await client.delete(f"/{PRO}/users/a/contacts/users/b")).status_code == 200
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:a") == set()


async def test_a_route_with_no_rates_beside_waiting_confirms(store: Any, clock: Clock, config_dir: Path) -> None:
    """Catches a route whose program is empty (no rates, no changes) crashing while another
    request's confirms wait for a ride (an empty program has no app to carry them for)."""
    routes = config_dir / "routes.yaml"
    text = routes.read_text()
    assert "feature: rest_message_recall}" in text
    routes.write_text(text.replace("feature: rest_message_recall}", "feature: rest_message_recall, rates: []}"))
    async with make_client(store, clock, _confirm_delay(config_dir)) as client:
        await register(client, PRO, ["a", "b"])
        alone = await client.post(f"/{PRO}/messages/recall", json={})  # the gateway's own answer
        assert (await client.post(f"/{PRO}/users/a/contacts/users/b")).status_code == 200
        beside = await client.post(f"/{PRO}/messages/recall", json={})
        assert (beside.status_code, beside.json().get("error")) == (alone.status_code, alone.json().get("error"))
        assert set(await raw_deadlines(store, CLAIMS)) == {"a|b"}  # still waiting: nothing carried it


async def test_a_plain_add_is_no_reservation(store: Any, clock: Clock) -> None:
    """Only a create's placeholder is a reservation that lapses; a friend added and answered 2xx
    stays counted however long ago it was. Catches: plain adds written as reservations (purged a
    minute later by the next add to the same owner, a friend slot given back)."""
    async with make_client(store, clock) as client:
        await register(client, PRO, ["a", "b", "c"])
        assert (await client.post(f"/{PRO}/users/a/contacts/users/b")).status_code == 200
        clock.advance(61)
        assert (await client.post(f"/{PRO}/users/a/contacts/users/c")).status_code == 200
        assert await raw_members(store, "q:{demo#pro}:s:contacts:o:a") == {"b", "c"}
        assert await raw_deadlines(store, "q:{demo#pro}:s:contacts:o:a:pending") == {}


async def test_a_failed_login_racing_a_good_one_keeps_the_user_active(store: Any, clock: Clock) -> None:
    """A login fails upstream (500) while another login succeeds. When the other is the same user,
    the user logged in today and stays in today's DAU and this month's MAU; when it is another
    user, the failed login leaves no trace.
    Catches: logins counted without claims (the failed one's undo takes out what the good one
    put there: DAU billed short), or with claims that lapse at once (the failed one's user stays
    active: DAU billed long)."""

    class FirstFails:
        def __init__(self) -> None:
            self.gateway = create_gateway()
            self.state = self.gateway.state
            self.logins = 0
            self.entered, self.release = asyncio.Event(), asyncio.Event()

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"].endswith("/token"):
                self.logins += 1
                if self.logins == 1:
                    self.entered.set()
                    await self.release.wait()
                    await send({"type": "http.response.start", "status": 500, "headers": []})
                    await send({"type": "http.response.body", "body": b'{"error": "down"}'})
                    return
            await self.gateway(scope, receive, send)

    for other, active in (("u", {"u"}), ("v", {"v"})):
        # u: the same user logs in again meanwhile; v: another user does (whose login purges lapsed
        # claims: a failed login's claim must still be alive then, and its undo take u out).
        upstream = FirstFails()
        async with make_client(store, clock, upstream=upstream) as client:
            await register(client, PRO, ["u", "v"])
            failing = asyncio.ensure_future(client.post(f"/{PRO}/token", json={"username": "u"}))
            await asyncio.wait_for(upstream.entered.wait(), 10)
            assert (await client.post(f"/{PRO}/token", json={"username": other})).status_code == 200
            upstream.release.set()
            assert (await failing).status_code == 500
            now = datetime.fromtimestamp(clock.now, UTC)
            assert await raw_members(store, f"q:{{demo#pro}}:dau:{now:%Y%m%d}") == active, other
            assert await raw_members(store, f"q:{{demo#pro}}:mau:{now:%Y%m}") == active, other
        clock.advance(86400 * 40)  # another day and month: fresh activity sets
