"""The store-latency histogram as Prometheus reads it: each call lands in the first bucket at or
above its duration (the `le` convention), whatever the build."""

from __future__ import annotations

from bisect import bisect_left

import pytest

from quota.metrics import BUCKETS, Metrics

DURATIONS = [0.0, 0.00005, 0.0001, 0.00010001, 0.0003, 0.001, 0.0049, 0.25, 0.2500001, 1.0, 3.5]


def _buckets(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("quota_storage_seconds_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[bound] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("seconds", DURATIONS)
def test_a_store_call_lands_in_the_first_bucket_at_or_above_it(seconds: float) -> None:
    """Catches a call counted one bucket off (at a bound, or past the last one): the cumulative
    count of each bucket is 1 exactly from the first bound >= the call's duration."""
    metrics = Metrics()
    metrics.storage(seconds)
    first = bisect_left(BUCKETS, seconds)
    expected = {str(b): float(i >= first) for i, b in enumerate(BUCKETS)} | {"+Inf": 1.0}
    assert _buckets(metrics.render().decode()) == expected


def test_the_histogram_adds_up() -> None:
    """Catches a sum or a count that drifts from the calls made."""
    metrics = Metrics()
    for seconds in DURATIONS:
        metrics.storage(seconds)
    text = metrics.render().decode()
    assert _buckets(text)["+Inf"] == len(DURATIONS)
    assert f"quota_storage_seconds_sum {sum(DURATIONS)}" in text
