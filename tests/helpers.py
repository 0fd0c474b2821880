"""Small drivers of the wrapped gateway, as a client would call it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.inprocess import http_scope as scope_of
from quota.errors import StorageError
from quota.store.memory import MemoryStore

# libyaml's loader and dumper: tests edit the shipped config hundreds of times a run, and the
# pure-Python ones spent some 0.2 s on each edit of plans.yaml.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


# What a body quota counts from must say it is (a request with `content=` and no type is a 415).
JSON_TYPE = {"content-type": "application/json"}


def read_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)  # noqa: S506 - a safe loader


def write_yaml(path: Path, doc: Any) -> None:
    """`doc` as YAML, keys in their order (line numbers a test reads stay where they were)."""
    path.write_text(yaml.dump(doc, Dumper=_DUMPER, allow_unicode=True, sort_keys=False), encoding="utf-8")


async def register(client: httpx.AsyncClient, app: str, names: list[str]) -> None:
    for i in range(0, len(names), 60):
        r = await client.post(f"/{app}/users", json=[{"username": n, "password": "p"} for n in names[i : i + 60]])
        assert r.status_code == 200, r.text


async def create_room(client: httpx.AsyncClient, app: str, kind: str, owner: str) -> httpx.Response:
    return await client.post(f"/{app}/{kind}", json={"groupname": "g", "name": "r", "owner": owner})


def room_id(response: httpx.Response, kind: str) -> str:
    data = response.json()["data"]
    return str(data["groupid"] if kind == "chatgroups" else data["id"])


async def entitlements(client: httpx.AsyncClient, app: str, **entities: str) -> dict[str, Any]:
    from quota.entitlements import entitlements as read

    mw = client._transport.app  # type: ignore[attr-defined]
    rt = mw.runtime
    return await read(rt.directory, rt.store, app.replace("/", "#"), mw.today(mw.clock()), entities=entities)


def gateway_state(client: httpx.AsyncClient, app: str) -> Any:
    mw = client._transport.app  # type: ignore[attr-defined]
    upstream = mw.app
    while not hasattr(upstream, "state") or not hasattr(upstream.state, "gateway"):
        upstream = upstream.app
    return upstream.state.gateway.apps[app.replace("/", "#")]


async def raw_members(store: Any, key: str) -> set[str]:
    """A set read straight from the store by the key the test spells out: SMEMBERS on Redis (and
    Cluster), the dict on memory. Not quota's key helpers, so a key-format bug shows."""
    if hasattr(store, "sets"):
        return set(store.sets.get(key, ()))
    return {m.decode() for m in await store.client.smembers(key)}


async def raw_deadlines(store: Any, key: str) -> dict[str, int]:
    """A sorted set of deadlines (leases, reservations, claims) by its spelled-out key."""
    if hasattr(store, "zsets"):
        found = store.zsets.get(key)
        return dict(found.due) if found else {}
    return {m.decode(): int(s) for m, s in await store.client.zrange(key, 0, -1, withscores=True)}


def store_of(client: httpx.AsyncClient) -> Any:
    return client._transport.app.runtime.store  # type: ignore[attr-defined]


def middleware_of(client: httpx.AsyncClient) -> Any:
    return client._transport.app  # type: ignore[attr-defined]


def http_scope(
    method: str,
    path: str,
    *,
    peer: str = "10.1.2.3",
    headers: list[tuple[bytes, bytes]] | None = None,
    raw_path: bytes | None = None,
) -> dict[str, Any]:
    """An ASGI HTTP scope as a server builds it, for requests httpx cannot send (64 KB paths,
    undecoded slashes, lying headers): from an address no test config trusts, its one header
    saying a body is JSON unless `headers` are given."""
    typed = [(b"content-type", b"application/json")]
    return scope_of(method, path, peer=peer, headers=typed if headers is None else headers, raw_path=raw_path)


async def call_raw(app: Any, scope: dict[str, Any], body: bytes = b"") -> list[dict[str, Any]]:
    """Drive an ASGI app with one request body; the messages it sent back."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def raw_hash(store: Any, key: str) -> dict[str, int]:
    """A hash of counts (claims and tombstones in flight) by its spelled-out key."""
    if hasattr(store, "inflight"):
        return dict(store.inflight.get(key, {}))
    return {f.decode(): int(v) for f, v in (await store.client.hgetall(key)).items()}


class SwitchedStore(MemoryStore):
    """A real memory store behind a switch: while `down`, every call fails as a store outage would."""

    down = False

    async def run(self, program: Any, now_ms: int, dry: bool = False) -> Any:
        if self.down:
            raise StorageError("down")
        return await super().run(program, now_ms, dry)


def set_cap(config_dir: Path, plan: str, **caps: int) -> None:
    """A plan's limits changed in a test's copy of the config."""
    plans = config_dir / "plans.yaml"
    doc = read_yaml(plans)
    doc["plans"][plan]["limits"].update(caps)
    write_yaml(plans, doc)
