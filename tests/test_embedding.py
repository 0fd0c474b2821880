"""quota.install() in a FastAPI app: examples/fastapi_app.py as shipped, driven as a client would."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from starlette.testclient import TestClient

from quota.config import DEFAULT_DIR
from tests.conftest import ROOT
from tests.helpers import read_yaml, write_yaml

TOKEN = "embedding-test-token-0123456789"


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The example module, loaded fresh with a config whose free plan allows 2 friends."""
    config = tmp_path / "config"
    shutil.copytree(DEFAULT_DIR, config)
    plans = read_yaml(config / "plans.yaml")
    plans["plans"]["free"]["limits"]["friends_per_user"] = 2
    write_yaml(config / "plans.yaml", plans)
    monkeypatch.setenv("QUOTA_CONFIG", str(config))
    monkeypatch.setenv("QUOTA_ADMIN_TOKEN", TOKEN)
    monkeypatch.delenv("QUOTA_REDIS_URL", raising=False)
    spec = importlib.util.spec_from_file_location("fastapi_app", ROOT / "examples" / "fastapi_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module


def test_fastapi_example_enforces_and_serves_admin(example: ModuleType) -> None:
    """The FastAPI example refuses the 3rd friend (exceed_limit), and its admin API, metrics and
    probes answer: the 404s that `add_middleware(QuotaMiddleware)` alone leaves are gone.
    Catches: install() leaving the admin API out of reach (404), or the example rotting."""
    with TestClient(example.app, client=("10.3.0.1", 5000)) as client:
        assert client.post("/demo/free/users", json=[{"username": u} for u in "abcd"]).status_code == 200
        codes = [client.post(f"/demo/free/users/a/contacts/users/{f}").status_code for f in "bcd"]
        assert codes == [200, 200, 403]
        refused = client.post("/demo/free/users/a/contacts/users/d").json()
        assert refused["error"] == "exceed_limit" and refused["limit"] == "friends_per_user"
        auth = {"authorization": f"Bearer {TOKEN}"}
        ent = client.get("/_quota/entitlements/demo/free?user=a", headers=auth).json()
        assert ent["entities"]["user:a"]["friends_per_user"]["used"] == 2
        metrics = client.get("/_quota/metrics", headers=auth)
        assert metrics.status_code == 200
        assert 'quota_decisions_total{limit="friends_per_user",outcome="refused"' in metrics.text
        assert client.get("/_quota/health").json() == {"status": "ok"}
        assert client.get("/_quota/ready").json()["status"] == "ready"
        with client.websocket_connect("/demo/free/users/a/connection") as ws:
            ws.send_text("hi")
            assert ws.receive_text() == "hi"
    assert example.middleware.metrics.decision_counts()


def test_fastapi_example_uses_the_api_and_dependencies(example: ModuleType) -> None:
    """The example's own routes ask quota.Quota and refuse through quota.dependencies. Catches:
    install() not wiring app.state.quota or the refusal handler, a dependency letting a plan without
    translation through, or within_limit not refusing a user at the cap."""
    with TestClient(example.app, client=("10.3.0.2", 5000)) as client:
        assert client.post("/demo/free/users", json=[{"username": u} for u in "abc"]).status_code == 200
        assert client.post("/demo/free/users/a/contacts/users/b").status_code == 200
        r = client.get("/limits", params={"app": "demo#free", "user": "A"})
        assert r.status_code == 200, r.text
        assert r.json() == {"friends": {"used": 1, "limit": 2, "remaining": 1}, "plan": "free", "translation": False}
        assert client.post("/demo/free/users/a/contacts/users/c").status_code == 200
        r = client.get("/limits", params={"app": "demo#free", "user": "a"})
        assert r.status_code == 403 and r.json()["error"] == "exceed_limit" and r.json()["limit"] == "friends_per_user"
        r = client.post("/translate", params={"app": "demo#free", "text": "hi"})
        assert r.status_code == 403 and r.json()["exception"] == "QuotaForbiddenOpException"
        assert client.post("/translate", params={"app": "demo#pro", "text": "hi"}).json()["translated"] == "ih"
        assert client.post("/translate", params={"app": "nobody#none", "text": "x"}).status_code == 404
