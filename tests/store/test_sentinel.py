"""redis+sentinel:// reaches the master a real Redis Sentinel names, and runs programs there."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis as redis_sync

from quota.store import store_from_url
from quota.store.program import AddOp, Program, RateOp
from tests.conftest import RedisServer, free_port

pytestmark = pytest.mark.redis


async def test_store_through_sentinel(tmp_path: Path) -> None:
    """A store built from redis+sentinel://host:port/service runs its programs on the named master."""
    master = RedisServer()
    master.start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor quota-test 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds quota-test 1000\n"
    )
    binary = shutil.which("redis-server")
    assert binary is not None
    sentinel = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
    store = None
    try:
        client = redis_sync.Redis(port=port)
        deadline = time.time() + 15
        while True:
            try:
                if client.execute_command("SENTINEL", "get-master-addr-by-name", "quota-test"):
                    break
            except redis_sync.ConnectionError:
                pass
            assert time.time() < deadline, "sentinel did not come up"
            time.sleep(0.1)
        client.close()
        store = store_from_url(f"redis+sentinel://127.0.0.1:{port}/quota-test", timeout_ms=2000)
        key = "q:{demo#pro}:s:group_members:o:g1"
        program = Program([RateOp("q:{demo#pro}:r:x:y:z", 5, 1000, 1, "r"), AddOp("members_per_group", key, 2, ("a",))])
        outcome = await store.run(program, 1_800_000_000_000)
        assert outcome.allowed and outcome.added == (("a",),)
        direct = redis_sync.Redis(port=master.port)
        assert direct.smembers(key) == {b"a"}
        direct.close()
    finally:
        if store is not None:
            await store.close()
        sentinel.terminate()
        sentinel.wait(10)
        master.stop()
