"""Prometheus metrics of one middleware instance, served by the admin API at /_quota/metrics.

quota_decisions_total{route, limit, plan, outcome}   allowed | refused | shadow | unchecked
quota_near_limit_total{route, limit, plan}           allowed requests that left a cap >= 80% used
quota_storage_seconds                                 latency of each store call
quota_errors_total{kind}                              storage_timeout | storage_unavailable | breaker_open
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

NEAR_LIMIT_RATIO = 0.8


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "quota_decisions",
            "Decisions taken, by route, limit, plan and outcome.",
            ["route", "limit", "plan", "outcome"],
            registry=self.registry,
        )
        self.near_limit = Counter(
            "quota_near_limit",
            "Allowed requests that left a cap at least 80% used.",
            ["route", "limit", "plan"],
            registry=self.registry,
        )
        self.storage_seconds = Histogram(
            "quota_storage_seconds",
            "Latency of store calls.",
            registry=self.registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.errors = Counter("quota_errors", "Errors, by kind.", ["kind"], registry=self.registry)
        self.local_refusals = Counter(
            "quota_local_refusals",
            "Rate refusals served from the local deny cache, without the store.",
            registry=self.registry,
        )
        # labels() builds and locks on every call; the label sets are few, so keep their children.
        self._decisions: dict[tuple[str, str, str, str], Any] = {}
        self._near: dict[tuple[str, str, str], Any] = {}

    def decision(self, route: str, limit: str | None, plan: str, outcome: str) -> None:
        key = (route, limit or "", plan, outcome)
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self.decisions.labels(*key)
        child.inc()

    def near(self, route: str, limit: str, plan: str, used: int, cap: int) -> None:
        if cap > 0 and used >= NEAR_LIMIT_RATIO * cap:
            key = (route, limit, plan)
            child = self._near.get(key)
            if child is None:
                child = self._near[key] = self.near_limit.labels(*key)
            child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
