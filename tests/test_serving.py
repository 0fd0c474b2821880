"""What `quota serve` says and checks when it starts, its probes, its log of storage failures, and
metrics that answer for every worker under --workers 2."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from quota.config import load_config
from tests.conftest import RedisServer, free_port, run_cli
from tests.running import Running, quota, wait_until

TOKEN = "serving-test-admin-token-0123456789"


def test_start_against_unreachable_redis(config_dir: Path) -> None:
    """With Redis down: one line saying what runs, a warning naming the outage policy now in force,
    /health 200 and /ready 503 without a token, and storage failures logged once, not per request.
    Catches: a silent start against a dead store, unprobed readiness, a log line per failed request."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc = Running(
        quota("serve", "--config", str(config_dir), "--redis", dead, "--port", "{port}"), ready="/_quota/health"
    )
    try:
        with httpx.Client(base_url=proc.base, timeout=10) as c:
            assert c.get("/_quota/health").json() == {"status": "ok"}
            ready = c.get("/_quota/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
            assert str(config_dir) not in ready.text  # no path of the host's to a client without a token
            codes = [c.post("/demo/free/users", json=[{"username": f"x{i}"}]).status_code for i in range(20)]
            assert set(codes) == {503}
        log = proc.log()
    finally:
        proc.stop()
    (line,) = [entry for entry in log.splitlines() if "quota serving" in entry]
    cfg = load_config(config_dir)
    routes, plans = f"{len(cfg.routes.rules)} routes", f"{len(cfg.matrix.plans)} plans"
    for part in ("reference IM gateway", "store redis://127.0.0.1", str(config_dir), routes, plans):
        assert part in line
    assert "trusted proxies 127.0.0.1/32" in line and "outage policy rates open, counters closed" in line
    assert re.search(r"unreachable at start .*outage policy applies: rates open, counters closed", log)
    failures = [entry for entry in log.splitlines() if "storage failures" in entry]
    assert len(failures) == 1 and "outage policy in force" in failures[0]


def test_require_store_refuses_to_start(config_dir: Path) -> None:
    """--require-store: an unreachable store stops the start, exit 4, saying why.
    Catches: a server that starts anyway when told to require its store."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    out = run_cli("serve", "--config", str(config_dir), "--redis", dead, "--require-store", "--port", str(free_port()))
    assert out.returncode == 4 and "unreachable at start" in out.stderr and "not starting" in out.stderr


@pytest.mark.redis
def test_two_workers_metrics_add_up(config_dir: Path, redis_server: RedisServer) -> None:
    """Under --workers 2 every scrape counts the decisions of both workers, whichever one answers.
    Catches: a scrape that sees only the worker that answered it."""
    redis_server.flush()
    argv = quota(
        "serve", "--config", str(config_dir), "--redis", redis_server.url, "--workers", "2", "--port", "{port}"
    )
    proc = Running(argv, ready="/_quota/health", env={"QUOTA_ADMIN_TOKEN": TOKEN})
    auth = {"authorization": f"Bearer {TOKEN}"}
    try:
        sent = 0
        per_worker: dict[str, float] = {}

        def flushed() -> bool:
            # Each worker writes its counters every second; wait until the scrape holds them all.
            nonlocal per_worker
            text = httpx.get(f"{proc.base}/_quota/metrics", headers=auth).text
            found = re.findall(r'quota_worker_decisions_total\{worker="(\d+)"\} (\S+)', text)
            per_worker = {m[0]: float(m[1]) for m in found}
            return sum(per_worker.values()) >= sent

        deadline = time.time() + 60
        # A fresh connection per request lets either worker accept it; go on until both have served.
        while len([v for v in per_worker.values() if v > 0]) < 2 or sent < 20:
            assert time.time() < deadline, f"requests never reached two workers: {per_worker}"
            for _ in range(10):
                assert (
                    httpx.get(
                        f"{proc.base}/demo/pro/users", headers={"x-forwarded-for": f"10.5.0.{sent % 250}"}
                    ).status_code
                    == 200
                )
                sent += 1
            wait_until(flushed, f"the workers' counters never reached {sent}: {per_worker}")
        for _ in range(6):
            text = httpx.get(f"{proc.base}/_quota/metrics", headers=auth).text
            total = sum(
                float(v) for v in re.findall(r'quota_decisions_total\{[^}]*route="users.list"[^}]*\} (\S+)', text)
            )
            assert total == sent, text
            assert "quota_workers 2.0" in text
    finally:
        proc.stop()


def test_a_gateway_route_missing_from_the_route_map_is_named_at_start(config_dir: Path) -> None:
    """A route map without `GET /{org}/{app}/users/{username}`: the start names that route of the
    reference gateway and says it is refused, and it is (404), while a mapped route still answers.
    Catches: a start that is silent about a gateway route the route map leaves out."""
    routes = config_dir / "routes.yaml"
    mapped = '  - {name: users.get, method: GET, path: "/{org}/{app}/users/{username}"}\n'
    assert mapped in routes.read_text()
    routes.write_text(routes.read_text().replace(mapped, ""))
    proc = Running(quota("serve", "--config", str(config_dir), "--port", "{port}"), ready="/_quota/health")
    try:
        with httpx.Client(base_url=proc.base, timeout=10) as c:
            assert c.post("/demo/pro/users", json=[{"username": "ann"}]).status_code == 200
            refused = c.get("/demo/pro/users/ann")
            assert refused.status_code == 404 and refused.json()["error"] == "service_resource_not_found"
            assert c.get("/demo/pro/users").status_code == 200
        log = proc.log()
    finally:
        proc.stop()
    warned = [line for line in log.splitlines() if "is not in the route map" in line]
    assert warned == [line for line in warned if "route GET /{org}/{app}/users/{username} of the gateway" in line]
    assert len(warned) == 1 and "it is refused" in warned[0]
