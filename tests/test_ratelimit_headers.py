"""RateLimit headers on allowed responses (a setting, off by default: an allowed answer passes
through as its upstream sent it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quota.config import load_config
from tests.conftest import Clock, make_client


def headed(config_dir: Path) -> Any:
    (config_dir / "quota.yaml").write_text("ratelimit_headers: true\n")
    return load_config(config_dir)


async def test_allowed_responses_carry_ratelimit_headers(store: Any, clock: Clock, config_dir: Path) -> None:
    """Catches allowed responses without RateLimit-* when asked for (clients could not pace
    themselves), or the remaining count not going down as the budget is used."""
    clock.tick = 0
    async with make_client(store, clock, headed(config_dir)) as client:
        first = await client.get("/demo/pro/users")
        second = await client.get("/demo/pro/users")
        assert first.status_code == second.status_code == 200
        assert first.headers["ratelimit-limit"] == "100"
        assert int(first.headers["ratelimit-remaining"]) == 99 and int(second.headers["ratelimit-remaining"]) == 98
        assert first.headers["ratelimit-reset"] == "1"
        assert first.headers["content-type"] == "application/json"


async def test_the_tightest_rate_speaks(store: Any, clock: Clock, config_dir: Path) -> None:
    """Catches headers naming a loose rate when a tighter one applies (history: 1 per minute per app)."""
    from datetime import UTC, datetime

    async with make_client(store, clock, headed(config_dir)) as client:
        hour = datetime.fromtimestamp(clock.now, UTC).strftime("%Y%m%d%H")
        r = await client.get(f"/demo/pro/chatmessages/{hour}")
        assert r.status_code == 200 and r.headers["ratelimit-limit"] == "1" and r.headers["ratelimit-remaining"] == "0"
        # An exact log frees a hit 1 ms after its minute (a hit at t counts while now <= t + 60 s).
        assert 1 <= int(r.headers["ratelimit-reset"]) <= 61


async def test_allowed_answers_pass_untouched_by_default(store: Any, clock: Clock, config_dir: Path) -> None:
    """Catches the shipped config or the setting's default adding headers to an allowed answer,
    while a refusal still carries them all."""
    clock.tick = 0
    async with make_client(store, clock) as client:
        r = await client.get("/demo/pro/users")
        assert r.status_code == 200 and not any(name.startswith("ratelimit-") for name in r.headers)
        for _ in range(100):
            r = await client.get("/demo/pro/users")
        assert r.status_code == 429
        assert r.headers["ratelimit-limit"] == "100" and r.headers["ratelimit-remaining"] == "0"
        assert r.headers["retry-after"] == r.headers["ratelimit-reset"] == "1"
    # A quota.yaml that does not name the setting: the code's default is the shipped one.
    (config_dir / "quota.yaml").write_text("shadow: false\n")
    assert load_config(config_dir).settings.ratelimit_headers is False
