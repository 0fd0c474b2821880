"""The admin API and the operations behind it, driven over HTTP and through the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from quota.config import load_config
from quota.gateway import create_gateway
from quota.serve import build_app
from quota.store.memory import MemoryStore
from tests.conftest import ROOT, Clock, RedisServer, asgi_client, free_port, run_cli
from tests.helpers import (
    create_room,
    entitlements,
    raw_deadlines,
    raw_hash,
    raw_members,
    read_yaml,
    register,
    room_id,
    write_yaml,
)

TOKEN = "test-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
FREE, PRO = "demo/free", "demo/pro"


@pytest.fixture
async def admin(store: Any, clock: Clock, config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    app = build_app(load_config(config_dir), store=store)
    app.clock = clock
    async with asgi_client(app, ("10.3.3.3", 5000), "http://gw") as client:
        client.config_dir = config_dir  # type: ignore[attr-defined]
        yield client


def edit(path: Path, change: Any) -> None:
    doc = read_yaml(path)
    change(doc)
    write_yaml(path, doc)


class TestToken:
    async def test_missing_and_wrong_token(self, admin: httpx.AsyncClient) -> None:
        """Without the bearer token, or with a wrong one, the admin API answers 401 and shows nothing."""
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": TOKEN}):
            r = await admin.get("/_quota/entitlements/demo/pro", headers=headers)
            assert r.status_code == 401 and "limits" not in r.text
        assert (await admin.get("/_quota/entitlements/demo/pro", headers=AUTH)).status_code == 200

    async def test_off_without_token(self, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """With no token configured the admin API is off (404), never open."""
        monkeypatch.delenv("QUOTA_ADMIN_TOKEN", raising=False)
        app = build_app(load_config(), store=store)
        async with asgi_client(app, base_url="http://gw") as c:
            assert (await c.get("/_quota/metrics", headers={"authorization": "Bearer "})).status_code == 404


class TestReload:
    async def test_valid_config_applies_to_next_request(self, admin: httpx.AsyncClient) -> None:
        """A reloaded matrix applies at once: free's friend cap lowered to 2 refuses the third friend."""
        await register(admin, FREE, ["a", "b", "c", "d"])
        assert (await admin.post(f"/{FREE}/users/a/contacts/users/b")).status_code == 200
        edit(admin.config_dir / "plans.yaml", lambda d: d["plans"]["free"]["limits"].update(friends_per_user=2))
        r = await admin.post("/_quota/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        assert (await admin.post(f"/{FREE}/users/a/contacts/users/c")).status_code == 200
        r = await admin.post(f"/{FREE}/users/a/contacts/users/d")
        assert r.status_code == 403 and "friends_per_user is 2" in r.json()["error_description"]

    async def test_invalid_config_is_refused_and_old_stays(self, admin: httpx.AsyncClient) -> None:
        """A config that does not validate is refused with its errors; the old one stays in force."""
        edit(admin.config_dir / "plans.yaml", lambda d: d["plans"]["free"]["limits"].update(friends_per_user=-5))
        r = await admin.post("/_quota/reload", headers=AUTH)
        assert r.status_code == 400
        assert any("plans.free.limits.friends_per_user" in p for p in r.json()["problems"])
        ent = (await admin.get("/_quota/entitlements/demo/free", headers=AUTH)).json()
        assert ent["limits"]["friends_per_user"] == 100

    async def test_an_unreadable_file_is_named_and_the_old_config_stays(self, admin: httpx.AsyncClient) -> None:
        """Catches a reload that met a file it could not read (audit of 2026-12-02: quota.yaml
        replaced by a directory) answering 500, where a broken file is a 400 naming it."""
        quota_yaml = admin.config_dir / "quota.yaml"
        quota_yaml.unlink()
        quota_yaml.mkdir()
        r = await admin.post("/_quota/reload", headers=AUTH)
        assert r.status_code == 400, r.text
        assert f"{quota_yaml}: (file): expected a readable file" in " ".join(r.json()["problems"]), r.json()
        assert (await admin.get(f"/{PRO}/users")).status_code == 200

    async def test_in_flight_request_keeps_its_config(
        self, store: Any, config_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A request that started before a reload finishes, and settles, under the config it started with."""
        from quota.gateway import create_gateway

        monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
        gateway = create_gateway()
        release = asyncio.Event()
        entered = asyncio.Event()

        async def slow(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"].endswith("/chatgroups") and scope["method"] == "POST":
                entered.set()
                await release.wait()
            await gateway(scope, receive, send)

        app = build_app(load_config(config_dir), store=store, upstream=slow)
        async with asgi_client(app, base_url="http://gw") as c:
            await register(c, FREE, ["o"])
            pending = asyncio.ensure_future(create_room(c, FREE, "chatgroups", "o"))
            await entered.wait()
            # The new route map stops counting group creation; the in-flight create still binds its slot.
            edit(
                config_dir / "routes.yaml",
                lambda d: [r.pop("changes", None) for r in d["routes"] if r["name"] == "groups.create"],
            )
            assert (await c.post("/_quota/reload", headers=AUTH)).status_code == 200
            release.set()
            r = await pending
            assert r.status_code == 200
            ent = await entitlements(c, FREE)
            assert ent["usage"]["groups_per_app"]["used"] == 1
            assert (await create_room(c, FREE, "chatgroups", "o")).status_code == 200
            assert (await entitlements(c, FREE))["usage"]["groups_per_app"]["used"] == 1


@pytest.mark.redis
def test_sighup_reloads_a_running_server(redis_server: RedisServer, config_dir: Path) -> None:
    """`kill -HUP` makes a running `quota serve` reload; a broken config on SIGHUP is refused."""
    redis_server.flush()
    port = free_port()
    env = {**os.environ, "QUOTA_ADMIN_TOKEN": TOKEN}
    log = config_dir.parent / "serve.log"
    stderr = log.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "quota",
            "serve",
            "--config",
            str(config_dir),
            "--redis",
            redis_server.url,
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    stderr.close()  # the child holds its own copy
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 20
        while True:
            try:
                httpx.get(base + "/_quota/metrics", headers=AUTH, timeout=1)
                break
            except httpx.HTTPError:
                assert time.time() < deadline
                time.sleep(0.1)

        def cap() -> Any:
            return httpx.get(base + "/_quota/entitlements/demo/free", headers=AUTH).json()["limits"]["groups_per_app"]

        assert cap() == 100
        edit(config_dir / "plans.yaml", lambda d: d["plans"]["free"]["limits"].update(groups_per_app=7))
        proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while cap() != 7:
            assert time.time() < deadline
            time.sleep(0.1)
        edit(config_dir / "plans.yaml", lambda d: d["plans"]["free"]["limits"].update(groups_per_app="many"))
        proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while "reload refused" not in log.read_text():
            assert time.time() < deadline, "the broken config was never refused"
            time.sleep(0.05)
        assert cap() == 7 and proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    err = log.read_text()
    assert "reload refused" in err and "plans.free.limits.groups_per_app" in err


class TestShadow:
    async def test_shadow_lets_refusals_through_and_says_so(
        self, store: Any, clock: Clock, config_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """In shadow mode a request over a cap reaches the upstream, with a header naming the refusal,
        and it is reported as shadow; routes not in shadow still refuse."""
        monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
        edit(
            config_dir / "routes.yaml",
            lambda d: [
                r.update(shadow=True) for r in d["routes"] if r["name"] in ("messages.translate", "contacts.add")
            ],
        )
        edit(config_dir / "plans.yaml", lambda d: d["plans"]["free"]["limits"].update(friends_per_user=1))
        app = build_app(load_config(config_dir), store=store)
        app.clock = clock
        async with asgi_client(app, base_url="http://gw") as c:
            r = await c.post(f"/{FREE}/messages/translate", json={})
            assert r.status_code == 200 and r.headers["x-quota-shadow"] == "403 forbidden_op translation"
            await register(c, FREE, ["a", "b", "c"])
            assert (await c.post(f"/{FREE}/users/a/contacts/users/b")).status_code == 200
            r = await c.post(f"/{FREE}/users/a/contacts/users/c")
            assert r.status_code == 200 and "friends_per_user" in r.headers["x-quota-shadow"]
            assert (await entitlements(c, FREE, user="a"))["entities"]["user:a"]["friends_per_user"]["used"] == 1
            assert (await c.post(f"/{FREE}/messages/report", json={})).status_code == 403
            metrics = (await c.get("/_quota/metrics", headers=AUTH)).text
            assert (
                'quota_decisions_total{limit="translation",outcome="shadow",plan="free",route="messages.translate"}'
                in metrics
            )
            assert 'outcome="refused",plan="free",route="messages.report"' in metrics

    async def test_global_shadow(self, store: Any, clock: Clock, config_dir: Path) -> None:
        """`shadow: true` in quota.yaml puts every rule in shadow."""
        (config_dir / "quota.yaml").write_text("shadow: true\n")
        app = build_app(load_config(config_dir), store=store)
        async with asgi_client(app, base_url="http://gw") as c:
            r = await c.put(f"/{FREE}/callbacks", json={})
            assert r.status_code == 200 and "message_event_callbacks" in r.headers["x-quota-shadow"]


async def test_metrics(admin: httpx.AsyncClient) -> None:
    """Decisions by route, limit, plan and outcome; near-limit at 80% of a cap; storage latency."""
    users = [f"m{i}" for i in range(101)]
    await register(admin, FREE, ["o", *users])
    rid = room_id(await create_room(admin, FREE, "chatgroups", "o"), "chatgroups")
    assert (await admin.post(f"/{FREE}/chatgroups/{rid}/users", json={"usernames": users[:60]})).status_code == 200
    assert (await admin.post(f"/{FREE}/chatgroups/{rid}/users", json={"usernames": users[60:85]})).status_code == 200
    assert (await admin.post(f"/{FREE}/chatgroups/{rid}/users", json={"usernames": users[85:]})).status_code == 403
    text = (await admin.get("/_quota/metrics", headers=AUTH)).text
    assert 'quota_decisions_total{limit="",outcome="allowed",plan="free",route="groups.add_members"} 2.0' in text
    assert (
        'quota_decisions_total{limit="members_per_group",outcome="refused",plan="free",'
        'route="groups.add_members"} 1.0' in text
    )
    assert 'quota_near_limit_total{limit="members_per_group",plan="free",route="groups.add_members"} 1.0' in text
    assert "quota_storage_seconds_count" in text


class TestAllowlist:
    async def test_set_through_admin(self, admin: httpx.AsyncClient) -> None:
        """An app with an allowlist refuses other addresses with 403; [] lifts it; bad input is refused."""
        assert (await admin.get(f"/{PRO}/users")).status_code == 200
        r = await admin.put(
            "/_quota/accounts/demo-pro/allowlist", json={"ip_allowlist": ["192.0.2.0/24"]}, headers=AUTH
        )
        assert r.status_code == 200
        r = await admin.get(f"/{PRO}/users")
        assert r.status_code == 403 and "10.3.3.3 is not in the app's IP allowlist" in r.json()["error_description"]
        assert (await admin.get(f"/{FREE}/users")).status_code == 200
        bad = await admin.put("/_quota/accounts/demo-pro/allowlist", json={"ip_allowlist": ["999.1.1.1"]}, headers=AUTH)
        assert bad.status_code == 400
        await admin.put("/_quota/accounts/demo-pro/allowlist", json={"ip_allowlist": ["10.3.3.0/24"]}, headers=AUTH)
        assert (await admin.get(f"/{PRO}/users")).status_code == 200

    async def test_from_config_and_reload(self, admin: httpx.AsyncClient) -> None:
        """An allowlist in accounts.yaml applies after a reload."""
        edit(
            admin.config_dir / "accounts.yaml",
            lambda d: d["accounts"]["demo-free"].update(ip_allowlist=["198.51.100.7"]),
        )
        assert (await admin.post("/_quota/reload", headers=AUTH)).status_code == 200
        assert (await admin.get(f"/{FREE}/users")).status_code == 403


class TestForget:
    async def test_forget_user_over_admin(self, admin: httpx.AsyncClient, clock: Clock) -> None:
        """Every trace of the user leaves quota's storage; the day's DAU count stays the same number."""
        await register(admin, FREE, ["gone", "friend", "o"])
        assert (await admin.post(f"/{FREE}/users/gone/contacts/users/friend")).status_code == 200
        rid = room_id(await create_room(admin, FREE, "chatgroups", "o"), "chatgroups")
        assert (await admin.post(f"/{FREE}/chatgroups/{rid}/users/gone")).status_code == 200
        for u in ("gone", "friend"):
            assert (await admin.post(f"/{FREE}/token", json={"username": u})).status_code == 200
        usage_before = (await admin.get("/_quota/usage/demo/free", headers=AUTH)).json()
        r = await admin.post("/_quota/forget/demo/free/gone", headers=AUTH)
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["memberships_removed"] == {"app_users": 1, "contacts": 1, "group_members": 1}
        assert report["activity_anonymised"] == {"days": 1, "months": 1}
        store = admin._transport.app.runtime.store  # type: ignore[attr-defined]
        keys = await store.scan_prefix("q:{demo#free}:")
        # Claims in flight may stay (friend's login, its confirm on its way), none naming the user.
        for key in [f"q:{{demo#free}}:s:{rel}:inflight" for rel in ("contacts", "group_members", "activity")]:
            assert not [f for f in await raw_hash(store, key) if "gone" in f], key
            assert not [f for f in await raw_deadlines(store, key + ":due") if "gone" in f], key
        for key in keys:
            counted = (":s:" in key and ":inflight" not in key) or ":dau:" in key or ":mau:" in key
            members = await store.members(key) if counted else set()
            assert "gone" not in members and "gone" not in key, key
        usage_after = (await admin.get("/_quota/usage/demo/free", headers=AUTH)).json()
        assert usage_after["dau"] == usage_before["dau"] and usage_after["mau"] == usage_before["mau"] == 2
        ent = await entitlements(admin, FREE, user="friend", group=rid)
        assert ent["entities"]["user:friend"]["friends_per_user"]["used"] == 0
        assert ent["entities"][f"group:{rid}"]["members_per_group"]["used"] == 1  # its owner

    async def test_forgetting_a_user_keeps_the_others_removals_in_flight(
        self, store: Any, clock: Clock, config_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Catches forget deleting each relation's whole claims hash (audit of 2026-12-02): the
        tombstone of an unfriend in flight went with it, so the same pair's re-add passed, then
        the unfriend's settlement took out the friendship the re-add had just made: quota counted
        none where the gateway held one. Forgetting `c` leaves a|b's tombstone: the re-add waits
        (409), and what quota counts matches the gateway."""
        monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
        gateway = create_gateway()
        done, release = asyncio.Event(), asyncio.Event()

        async def answer_held(scope: Any, receive: Any, send: Any) -> None:
            # The gateway removes the pair at once; its answer waits for the test.
            if scope["type"] != "http" or scope["method"] != "DELETE":
                return await gateway(scope, receive, send)
            sent: list[Any] = []

            async def keep(message: Any) -> None:
                sent.append(message)

            await gateway(scope, receive, keep)
            done.set()
            await release.wait()
            for message in sent:
                await send(message)

        app = build_app(load_config(config_dir), store=store, upstream=answer_held)
        app.clock = clock
        async with asgi_client(app, ("10.3.3.3", 5000), "http://gw") as c:
            await register(c, FREE, ["a", "b", "c"])
            assert (await c.post(f"/{FREE}/users/a/contacts/users/b")).status_code == 200
            assert (await c.post(f"/{FREE}/users/c/contacts/users/b")).status_code == 200
            unfriend = asyncio.ensure_future(c.delete(f"/{FREE}/users/a/contacts/users/b"))
            await asyncio.wait_for(done.wait(), 10)
            assert (await c.post(f"/_quota/forget/{FREE}/c", headers=AUTH)).status_code == 200
            readd = await c.post(f"/{FREE}/users/a/contacts/users/b")
            release.set()
            assert (await unfriend).status_code == 200
            assert readd.status_code == 409 and readd.json()["error"] == "conflict", readd.text
            ent = await entitlements(c, FREE, user="a")
            held = gateway.state.gateway.apps["demo#free"].contacts.get("a", set())
            assert ent["entities"]["user:a"]["friends_per_user"]["used"] == len(held) == 0
            assert await raw_members(store, "q:{demo#free}:s:contacts:o:b") == set()

    async def test_forget_reads_the_id_as_the_configured_policy_does(
        self, config_dir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Catches forget canonicalising the id by the default policy, not quota.yaml's: with ids
        whose case matters, forgetting `Bob` forgot `bob`, another user, and kept Bob."""
        edit(
            config_dir / "quota.yaml",
            lambda d: d["identifiers"].update(user={"pattern": "[A-Za-z0-9_]{1,64}", "fold_case": False}),
        )
        monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
        store = MemoryStore()
        app = build_app(load_config(config_dir), store=store)
        app.clock = clock
        day = datetime.fromtimestamp(clock.now, UTC).strftime("%Y%m%d")
        store.sets[f"q:{{demo#pro}}:dau:{day}"] = {"Bob", "bob"}
        async with asgi_client(app, base_url="http://gw") as c:
            assert (await c.post("/_quota/forget/demo/pro/Bob", headers=AUTH)).status_code == 200
        assert "bob" in store.sets[f"q:{{demo#pro}}:dau:{day}"]
        assert "Bob" not in store.sets[f"q:{{demo#pro}}:dau:{day}"]


@pytest.mark.redis
def test_forget_user_cli(redis_server: RedisServer) -> None:
    """`quota forget-user ORG#APP USER` reports what it removed. A key of another shape under the
    activity prefix (the login holds an earlier version kept beside a day's DAU, a sorted set) is
    no activity set: it was swapped as one, met WRONGTYPE and stopped the deletion partway."""
    import redis as redis_sync

    redis_server.flush()
    r = redis_sync.Redis(port=redis_server.port)
    r.sadd("q:{demo#pro}:s:app_users:o:demo%23pro", "zoe", "yan")
    r.zadd("q:{demo#pro}:dau:20261001:holds", {"zoe": 1})
    r.sadd("q:{demo#pro}:dau:20261001", "zoe", "yan")
    r.sadd("q:{demo#pro}:mau:202610", "zoe")
    r.close()
    out = run_cli("forget-user", "demo#pro", "zoe", "--json", "--redis", redis_server.url)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["memberships_removed"] == {"app_users": 1}
    assert report["activity_anonymised"] == {"days": 1, "months": 1}
    r = redis_sync.Redis(port=redis_server.port)
    assert r.scard("q:{demo#pro}:dau:20261001") == 2 and not r.sismember("q:{demo#pro}:dau:20261001", "zoe")
    r.close()


@pytest.mark.redis
def test_forget_user_cli_reads_the_id_by_the_configured_policy(redis_server: RedisServer, config_dir: Path) -> None:
    """Catches the CLI's forget canonicalising by the default policy: with ids whose case matters,
    `quota forget-user demo#pro Bob` forgot `bob`, another user."""
    import redis as redis_sync

    edit(
        config_dir / "quota.yaml",
        lambda d: d["identifiers"].update(user={"pattern": "[A-Za-z0-9_]{1,64}", "fold_case": False}),
    )
    redis_server.flush()
    r = redis_sync.Redis(port=redis_server.port)
    r.sadd("q:{demo#pro}:dau:20261001", "Bob", "bob")
    out = run_cli("forget-user", "demo#pro", "Bob", "--config", str(config_dir), "--redis", redis_server.url)
    assert out.returncode == 0, out.stderr
    assert r.sismember("q:{demo#pro}:dau:20261001", "bob") and not r.sismember("q:{demo#pro}:dau:20261001", "Bob")
    r.close()


@pytest.mark.redis
def test_reconcile_from_file_and_http(redis_server: RedisServer, tmp_path: Path) -> None:
    """`quota reconcile` rebuilds drifted counters from a JSON file, or from the gateway's /_state over HTTP."""
    import redis as redis_sync

    redis_server.flush()
    r = redis_sync.Redis(port=redis_server.port)
    r.sadd("q:{demo#pro}:s:contacts:o:ann", "ghost1", "ghost2")  # drift: friends the gateway never had
    truth = {
        "users": ["ann", "bob", "cy"],
        "contacts": {"ann": ["bob"], "bob": ["ann"]},
        "groups": {"g1": ["ann", "cy"]},
        "chatrooms": {},
    }
    source = tmp_path / "state.json"
    source.write_text(json.dumps(truth))
    out = run_cli("reconcile", "demo#pro", "--source", str(source), "--json", "--redis", redis_server.url)
    assert out.returncode == 0, out.stderr
    assert r.smembers("q:{demo#pro}:s:contacts:o:ann") == {b"bob"}
    assert r.smembers("q:{demo#pro}:s:group_members:m:cy") == {b"g1"}
    assert r.scard("q:{demo#pro}:s:app_users:o:demo%23pro") == 3
    # From a running gateway's own state: quota serve, one group created, then counters wiped.
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "quota", "serve", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "QUOTA_ADMIN_TOKEN": TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 20
        while True:
            try:
                httpx.post(base + "/demo/pro/users", json=[{"username": "u1"}, {"username": "u2"}], timeout=1)
                break
            except httpx.HTTPError:
                assert time.time() < deadline
                time.sleep(0.1)
        gid = httpx.post(base + "/demo/pro/chatgroups", json={"owner": "u1"}).json()["data"]["groupid"]
        httpx.post(f"{base}/demo/pro/chatgroups/{gid}/users/u2")
        # The state route is for operators: without the admin token quota answers 404.
        assert httpx.get(f"{base}/demo/pro/_state").status_code == 404
        url = f"{base}/demo/pro/_state"
        out = run_cli("reconcile", "demo#pro", "--source", url, "--redis", redis_server.url)
        assert out.returncode != 0 and "QUOTA_ADMIN_TOKEN" in out.stderr and "Traceback" not in out.stderr
        out = run_cli(
            "reconcile", "demo#pro", "--source", url, "--redis", redis_server.url, env={"QUOTA_ADMIN_TOKEN": TOKEN}
        )
        assert out.returncode == 0, out.stderr
        assert r.smembers(f"q:{{demo#pro}}:s:group_members:o:{gid}") == {b"u1", b"u2"}  # the owner is one
        assert r.smembers("q:{demo#pro}:s:app_groups:o:demo%23pro") == {gid.encode()}
        assert not r.exists("q:{demo#pro}:s:contacts:o:ann")
    finally:
        proc.terminate()
        proc.wait(10)
        r.close()
    bad = run_cli("reconcile", "demo#pro", "--source", str(tmp_path / "missing.json"), "--redis", redis_server.url)
    assert bad.returncode != 0 and "missing.json" in bad.stderr


async def test_apps_never_see_each_other(admin: httpx.AsyncClient) -> None:
    """One app's counters are not readable through another app's path, even with key characters in ids."""
    await register(admin, PRO, ["a", "b"])
    assert (await admin.post(f"/{PRO}/users/a/contacts/users/b")).status_code == 200
    free = (await admin.get("/_quota/entitlements/demo/free?user=a", headers=AUTH)).json()
    assert free["entities"]["user:a"]["friends_per_user"]["used"] == 0
    assert free["usage"]["registered_users"]["used"] == 0
    # An app name built to look like another app's key prefix does not reach its keys.
    r = await admin.get("/_quota/entitlements/demo/pro}:s:contacts:o:a?user=a", headers=AUTH)
    assert r.status_code == 404


class TestScopes:
    """Scoped tokens: the read token sees, only the admin token changes; short tokens never start."""

    async def test_read_token_reads_but_cannot_change(
        self, store: Any, monkeypatch: pytest.MonkeyPatch, clock: Clock
    ) -> None:
        """Catches a read token that may freeze accounts or reload (scope not checked)."""
        read = "read-only-token-0123456789"
        monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
        monkeypatch.setenv("QUOTA_READ_TOKEN", read)
        app = build_app(load_config(), store=store)
        app.clock = clock
        async with asgi_client(app, base_url="http://gw") as c:
            ro = {"authorization": f"Bearer {read}"}
            assert (await c.get("/_quota/metrics", headers=ro)).status_code == 200
            assert (await c.get("/_quota/entitlements/demo/free", headers=ro)).status_code == 200
            r = await c.post("/_quota/accounts/demo-free/freeze", headers=ro)
            assert r.status_code == 403 and "admin token" in r.json()["error_description"]
            assert (await c.post("/_quota/reload", headers=ro)).status_code == 403
            # The account is untouched: requests still pass.
            assert (await c.get("/demo/free/users")).status_code == 200
            assert (await c.post("/_quota/accounts/demo-free/freeze", headers=AUTH)).status_code == 200

    @pytest.mark.parametrize("name", ["QUOTA_ADMIN_TOKEN", "QUOTA_READ_TOKEN"])
    def test_short_token_in_environment_refuses_to_start(self, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Catches a short environment token being accepted (only quota.yaml's was checked)."""
        from quota.errors import ConfigError

        monkeypatch.setenv(name, "short")
        with pytest.raises(ConfigError, match=name):
            build_app(load_config())

    @pytest.mark.parametrize(
        "body",
        [{"date": 20261130}, {"date": "yesterday"}, {"plan": ["pro"]}, [1, 2], {"plan": "pro", "extra": 1}, "x"],
    )
    async def test_bad_admin_bodies_are_400(self, admin: httpx.AsyncClient, body: Any) -> None:
        """Catches a 500 with a Python message on a body of the wrong JSON types."""
        r = await admin.post("/_quota/accounts/demo-free/change-plan", json=body, headers=AUTH)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "illegal_argument" and "Traceback" not in r.text

    async def test_bad_month_is_400(self, admin: httpx.AsyncClient) -> None:
        for month in ("2026-13", "abc", "2026-1-1"):
            r = await admin.get(f"/_quota/usage/demo/free?month={month}", headers=AUTH)
            assert r.status_code == 400 and "YYYY-MM" in r.text
