"""Prometheus metrics of one middleware instance, served by the admin API at /_quota/metrics.

    quota_decisions_total{route, limit, plan, outcome}   allowed | refused | shadow | unchecked
    quota_near_limit_total{route, limit, plan}           allowed requests that left a cap >= 80% used
    quota_storage_seconds                                 latency of each store call (histogram)
    quota_errors_total{kind}                              storage_timeout | storage_unavailable | breaker_open
    quota_local_refusals_total                            rate refusals served by the deny cache, no store call

Beside them, `refusals` keeps the last hour of refusals per minute by app, route and limit, for the
dashboard's "refusals over the last hour"; it is in-process, so each worker shows its own.

The request path only adds to plain dicts and lists (one event loop, so no locks); a collector turns
them into metric families when Prometheus scrapes. prometheus_client's own Counter and Histogram
take a lock per update, which cost more than the rest of a read route's checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Final

from mypy_extensions import mypyc_attr
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

NEAR_LIMIT_RATIO = 0.8
REFUSAL_MINUTES = 60
# Apps, routes and limits all come from the config, so keys are bounded already; this bounds a
# minute anyway, should a config hold thousands of apps all refusing at once.
REFUSAL_KEYS_PER_MINUTE = 4096
# Final, so compiled code reads it from a C static (a plain global is looked up by name at each use),
# and built by a call: mypyc inlines a Final tuple *literal*, building it and its floats at each use.
BUCKETS: Final = tuple([0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0])


# Typed as tuple[str, ...], not tuple[str, str, str, str]: compiled, a fixed-size tuple is a C struct,
# boxed into a new tuple (hashed and compared anew) at every dict call.
DecisionKey = tuple[str, ...]


def decision_key(route: str, limit: str | None, plan: str, outcome: str) -> DecisionKey:
    return (route, limit or "", plan, outcome)


# Served metrics extend it (quota/served_metrics.py), and it is compiled (quota/build.py).
@mypyc_attr(allow_interpreted_subclasses=True)
class Metrics:
    def __init__(self) -> None:
        self.decisions: dict[DecisionKey, int] = {}
        # Decisions counted often under one key (a request lane's allowed ones) have a slot of their
        # own: a list index, no key hashed per request. decision_counts() folds them in.
        self._slots: dict[DecisionKey, int] = {}
        self._tally: list[int] = []
        self.near_limit: dict[tuple[str, str, str], int] = {}
        self.errors: dict[str, int] = {}
        self.local_refusals = 0
        self.storage_buckets = [0] * (len(BUCKETS) + 1)
        self.storage_sum = 0.0
        self.refusals = RefusalLog()
        # Told of every cap's use after an allowed request: (app, account, plan, limit, used, cap, now).
        self.listeners: list[Callable[[str, str, str, str, int, int, float], None]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def decision(
        self, route: str, limit: str | None, plan: str, outcome: str, app: str | None = None, now: float | None = None
    ) -> None:
        """Count one decision; a refusal (or a shadow one) of a named `app` also goes into the
        per-minute log. `now` saves a clock read when the caller has the request's start time."""
        key = decision_key(route, limit, plan, outcome)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        if app is not None and outcome in ("refused", "shadow"):
            self.refusals.add(app, route, limit or "", outcome, time.time() if now is None else now)

    def slot(self, key: DecisionKey) -> int:
        """The slot that counts decisions under `key` (see tick)."""
        found = self._slots.get(key)
        if found is None:
            found = self._slots[key] = len(self._tally)
            self._tally.append(0)
        return found

    def tick(self, slot: int) -> None:
        """Count one decision in its slot."""
        self._tally[slot] += 1

    def decision_counts(self) -> dict[DecisionKey, int]:
        """Every decision counted, by `decision` and in slots. Only reads (copies of) what the request
        path writes: the snapshot thread calls it too."""
        counts = dict(self.decisions)
        for key, slot in list(self._slots.items()):
            ticked = self._tally[slot]
            if ticked:
                counts[key] = counts.get(key, 0) + ticked
        return counts

    def near(self, route: str, limit: str, plan: str, used: int, cap: int) -> None:
        if cap > 0 and used >= NEAR_LIMIT_RATIO * cap:
            key = (route, limit, plan)
            self.near_limit[key] = self.near_limit.get(key, 0) + 1

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def storage(self, seconds: float) -> None:
        # The first bucket at or above `seconds` (bisect_left's answer), by a scan: almost every call
        # stops at the first or second bucket, and a compiled scan costs less than the call to bisect.
        bounds = BUCKETS
        index, last = 0, len(bounds)
        while index < last and bounds[index] < seconds:
            index += 1
        self.storage_buckets[index] += 1
        self.storage_sum += seconds

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RefusalLog:
    """Refusals per minute for the last REFUSAL_MINUTES minutes: a ring of dicts, one per minute.

    A slot is reused when its minute comes round again, so memory stays one hour of keys whatever
    the traffic, and an idle hour costs nothing to expire.
    """

    def __init__(self) -> None:
        self._minutes = [-1] * REFUSAL_MINUTES
        self._counts: list[dict[tuple[str, str, str, str], int]] = [{} for _ in range(REFUSAL_MINUTES)]

    def add(self, app: str, route: str, limit: str, outcome: str, now: float) -> None:
        minute = int(now // 60)
        slot = minute % REFUSAL_MINUTES
        counts = self._counts[slot]
        if self._minutes[slot] != minute:
            self._minutes[slot] = minute
            counts.clear()
        key = (app, route, limit, outcome)
        if key in counts:
            counts[key] += 1
        elif len(counts) < REFUSAL_KEYS_PER_MINUTE:
            counts[key] = 1

    def last_hour(self, app: str, now: float) -> dict[tuple[str, str, str], list[int]]:
        """(route, limit, outcome) -> counts per minute, oldest first, the last entry this minute."""
        current = int(now // 60)
        out: dict[tuple[str, str, str], list[int]] = {}
        for slot, minute in enumerate(self._minutes):
            age = current - minute
            if not 0 <= age < REFUSAL_MINUTES:
                continue
            for (who, route, limit, outcome), count in self._counts[slot].items():
                if who == app:
                    series = out.setdefault((route, limit, outcome), [0] * REFUSAL_MINUTES)
                    series[REFUSAL_MINUTES - 1 - age] += count
        return out


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        decisions = CounterMetricFamily(
            "quota_decisions",
            "Decisions taken, by route, limit, plan and outcome.",
            labels=["route", "limit", "plan", "outcome"],
        )
        for key, value in m.decision_counts().items():
            decisions.add_metric(list(key), value)
        yield decisions
        near = CounterMetricFamily(
            "quota_near_limit", "Allowed requests that left a cap at least 80% used.", labels=["route", "limit", "plan"]
        )
        for near_key, value in m.near_limit.items():
            near.add_metric(list(near_key), value)
        yield near
        errors = CounterMetricFamily("quota_errors", "Errors, by kind.", labels=["kind"])
        for kind, value in m.errors.items():
            errors.add_metric([kind], value)
        yield errors
        yield CounterMetricFamily(
            "quota_local_refusals",
            "Rate refusals served from the local deny cache, without the store.",
            value=m.local_refusals,
        )
        cumulative, running = [], 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), m.storage_buckets, strict=True):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily(
            "quota_storage_seconds", "Latency of store calls.", buckets=cumulative, sum_value=m.storage_sum
        )
