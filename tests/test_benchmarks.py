"""The benchmark harness keeps working: a tiny run, checked for shape only (speed lives in benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_quick_json_lines() -> None:
    """`python -m benchmarks --quick` prints one JSON line per scenario and variant, with every figure."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--scenarios", "write,flood", "--variants", "bare,quota-redis"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["scenario"], r["variant"]) for r in rows] == [
        ("write", "bare"),
        ("write", "quota-redis"),
        ("flood", "bare"),
        ("flood", "quota-redis"),
    ]
    keys = {
        "scenario",
        "variant",
        "rps",
        "p50_ms",
        "p99_ms",
        "redis_calls_per_req",
        "redis_cmds_per_req",
        "ratio_to_bare",
    }
    assert all(set(r) == keys for r in rows)
    by = {(r["scenario"], r["variant"]): r for r in rows}
    assert by[("write", "bare")]["redis_calls_per_req"] == 0
    # A write through quota is one script call to Redis, whatever its speed.
    assert 0.9 < by[("write", "quota-redis")]["redis_calls_per_req"] < 1.2
    assert all(r["rps"] > 0 for r in rows)


def test_targets_are_checked_against_the_run() -> None:
    """RESULTS.md's target section says met or not from the run's own medians, with the reason when not."""
    from benchmarks.harness import targets

    def r(scenario: str, variant: str, ratio: float, calls: float) -> dict[str, object]:
        return {"scenario": scenario, "variant": variant, "ratio_to_bare": ratio, "redis_calls_per_req": calls}

    rows = [r("write", "quota-redis", 0.85, 1.0), r("write", "slowapi", 0.30, 1.0), r("flood", "quota-redis", 1.3, 0.2)]
    text = targets(rows)  # type: ignore[arg-type]
    assert "**no**" not in text and "2.83x" in text and "measured reason" not in text
    rows[0]["ratio_to_bare"] = 0.7
    text = targets(rows)  # type: ignore[arg-type]
    assert "| write route at 0.8 of bare or better | 0.70 | **no** |" in text and "measured reason" in text


def test_proxy_variants_run() -> None:
    """`--only proxy` serves the gateway in its own process behind quota proxy: with checks on, a
    write costs one Redis call; with them off, none (the harness measures what it says it does).
    Catches: proxy variants that do not start, or measure a proxy without quota's checks."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--only",
            "proxy",
            "--quick",
            "--scenarios",
            "write",
            "--variants",
            "bare,proxy-off,proxy-on",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = {r["variant"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert set(rows) == {"bare", "proxy-off", "proxy-on"}
    assert rows["proxy-off"]["redis_calls_per_req"] == 0 and rows["proxy-off"]["rps"] > 0
    assert 0.9 < rows["proxy-on"]["redis_calls_per_req"] < 1.2
