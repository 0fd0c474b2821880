"""Random paths, methods, headers, query strings and bodies through the middleware (hypothesis):
no unhandled exception, no 5xx, and no counter changed by a request quota refused."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quota.config import load_config
from quota.serve import build_app
from quota.store.memory import MemoryStore
from tests.conftest import Clock

IDS = st.one_of(
    st.sampled_from(["alice", "bob", "a", "b"]),
    st.sampled_from(["alice", "bob", "g1", "{demo#pro}", "a:b", "}", "{", "#", "%7B", "..", "ü", "x,y", ""]),
    st.text(min_size=1, max_size=12).filter(lambda t: "/" not in t),
)
ROUTES = [
    ("POST", "/{org}/{app}/users"),
    ("DELETE", "/{org}/{app}/users/{id}"),
    ("POST", "/{org}/{app}/token"),
    ("POST", "/{org}/{app}/users/{id}/contacts/users/{id2}"),
    ("POST", "/{org}/{app}/chatgroups"),
    ("POST", "/{org}/{app}/chatgroups/{id}/users"),
    ("POST", "/{org}/{app}/chatgroups/{id}/users/{id2}"),
    ("DELETE", "/{org}/{app}/chatgroups/{id}/users/{id2}"),
    ("POST", "/{org}/{app}/chatrooms/{id}/users"),
    ("GET", "/{org}/{app}/chatmessages/{id}"),
    ("PUT", "/{org}/{app}/callbacks"),
    ("GET", "/{org}/{app}/users"),
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(["username", "usernames", "owner", "to", "groupname", "x", "{", ":"]), inner, max_size=4
        )
    ),
    max_leaves=12,
)
BODIES = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.just(b"{"),
    st.just(b'{"usernames": ["a"' + b', "b"' * 2000 + b"]}"),  # over the fuzz config's body limit
    st.lists(st.sampled_from(["a", "b", "c", "{x}", "d:e"]), max_size=70).map(
        lambda names: json.dumps({"usernames": names}).encode()
    ),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes]:
    if draw(st.booleans()):
        method, template = draw(st.sampled_from(ROUTES))
        path = (
            template.replace("{org}", draw(st.sampled_from(["demo", "nobody", "de{mo"])))
            .replace("{app}", draw(st.sampled_from(["free", "pro", "basic", "x}"])))
            .replace("{id}", draw(IDS))
            .replace("{id2}", draw(IDS))
        )
    else:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
        path = "/" + "/".join(draw(st.lists(IDS, max_size=6)))
    headers = {}
    if draw(st.booleans()):
        headers["x-forwarded-for"] = draw(st.sampled_from(["1.2.3.4", "junk", "1.1.1.1, 2.2.2.2", "::1", ""]))
    if draw(st.booleans()):
        headers["content-type"] = draw(st.sampled_from(["application/json", "text/plain", "multipart/form-data"]))
    query = draw(st.sampled_from(["", "?limit=5", "?limit=abc", "?limit=-1", "?x=%7B%7D"]))
    return method, path + query, headers, draw(BODIES)


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, MemoryStore, asyncio.AbstractEventLoop]]:
    import shutil

    from quota.config import DEFAULT_DIR

    target = Path(tmp_path_factory.mktemp("fuzz")) / "config"
    shutil.copytree(DEFAULT_DIR, target)
    (target / "quota.yaml").write_text("max_body_bytes: 4096\ntrusted_proxies: ['127.0.0.1/32']\n")
    store = MemoryStore()
    app = build_app(load_config(target), store=store)
    app.clock = Clock(tick=0.05)  # time moves, so per-IP rates do not swallow the whole run
    loop = asyncio.new_event_loop()

    async def seed() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            for plan in ("free", "pro"):
                await c.post(f"/demo/{plan}/users", json=[{"username": u} for u in ("alice", "bob", "a", "b")])
                await c.post(f"/demo/{plan}/users/alice/contacts/users/bob")

    loop.run_until_complete(seed())
    yield app, store, loop
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()


async def call(
    app: Any, method: str, target: str, headers: dict[str, str], body: bytes, peer: str
) -> tuple[int, bytes]:
    """Drive the ASGI app as a server would, with the path as decoded text and the body in chunks."""
    path, _, query = target.partition("?")
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)] or [b""]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogatepass"),
        "root_path": "",
        "query_string": query.encode(),
        "client": (peer, 1234),
        "server": ("127.0.0.1", 8000),
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def _state(store: MemoryStore) -> Any:
    return copy.deepcopy((store.sets, store.windows, store.leases))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=requests(), peer=st.sampled_from(["127.0.0.1", "10.0.0.9"]))
def test_random_requests(
    fuzz_env: tuple[Any, MemoryStore, asyncio.AbstractEventLoop], req: tuple[str, str, dict[str, str], bytes], peer: str
) -> None:
    """Whatever arrives, quota answers without a 5xx, and a refusal changes no counter."""
    app, store, loop = fuzz_env
    method, path, headers, body = req

    before = _state(store)
    status, raw = loop.run_until_complete(call(app, method, path, headers, body, peer))
    assert status < 500, (method, path, raw[:300])
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and str(payload.get("exception", "")).startswith("Quota"):
        assert _state(store) == before, (method, path, payload)
