"""Metrics of a served process: storage failures logged (at most one line per interval), and with
several workers, each scrape answering for all of them.

Under `--workers N` every worker is its own process with its own counters, and a scrape reaches
whichever worker accepts the connection. Each worker writes a snapshot of its counters to a
directory the parent made (every second, and at exit); a scrape adds up every snapshot, its own
live counters instead of its stale file, and reports per-worker decision totals too. Snapshots of
workers that died stay in the sum, so totals never go down when uvicorn replaces a worker.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from quota.metrics import Metrics

log = logging.getLogger("quota")
LOG_INTERVAL_S = 10.0
SNAPSHOT_INTERVAL_S = 1.0


class ServedMetrics(Metrics):
    def __init__(self, *, outage: Callable[[], str], shared_dir: Path | None = None) -> None:
        super().__init__()
        self._outage = outage
        self._unlogged: dict[str, int] = {}
        self._logged_at = 0.0
        self.shared_dir = shared_dir
        self._file = shared_dir / f"worker-{os.getpid()}.json" if shared_dir else None
        self._writing = threading.Lock()
        if self._file is not None:
            self._start_snapshots()

    def error(self, kind: str) -> None:
        super().error(kind)
        # Once a store is down every request fails the same way: say so on the first failure,
        # then once per interval with the count, not once per request.
        self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_INTERVAL_S:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self._unlogged.items()))
            window = "" if self._logged_at == 0.0 else f" in the last {now - self._logged_at:.0f} s"
            log.warning("storage failures%s: %s; outage policy in force: %s", window, counts, self._outage())
            self._unlogged.clear()
            self._logged_at = now

    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "decisions": [[*k, v] for k, v in self.decision_counts().items()],
            "near_limit": [[*k, v] for k, v in list(self.near_limit.items())],
            "errors": dict(self.errors),
            "local_refusals": self.local_refusals,
            "storage_buckets": list(self.storage_buckets),
            "storage_sum": self.storage_sum,
        }

    def write_snapshot(self) -> None:
        if self._file is None:
            return
        # Write then rename: a scrape in another worker never reads half a file. The lock keeps the
        # snapshot thread and a scrape from writing the one temporary file at once.
        with self._writing:
            tmp = self._file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.snapshot()))
            tmp.replace(self._file)

    def _start_snapshots(self) -> None:
        def loop() -> None:
            while True:
                time.sleep(SNAPSHOT_INTERVAL_S)
                try:
                    self.write_snapshot()
                except OSError:
                    return

        # A thread, not a task: it needs no event loop and keeps writing while requests are served.
        threading.Thread(target=loop, name="quota-metrics-snapshot", daemon=True).start()
        atexit.register(self.write_snapshot)

    def render(self) -> bytes:
        if self.shared_dir is None:
            return super().render()
        # Our own file first: a later scrape answered by another worker reads it, and must never
        # see less than this one reports, or a counter would go down (a reset, to Prometheus).
        self.write_snapshot()
        snapshots = [self.snapshot()]
        for path in sorted(self.shared_dir.glob("worker-*.json")):
            if path != self._file:
                try:
                    snapshots.append(json.loads(path.read_text()))
                except (OSError, ValueError):
                    continue
        total = Metrics()
        per_worker: dict[str, int] = {}
        for snap in snapshots:
            for *key, value in snap["decisions"]:
                total.decisions[tuple(key)] = total.decisions.get(tuple(key), 0) + value
            for *key, value in snap["near_limit"]:
                total.near_limit[tuple(key)] = total.near_limit.get(tuple(key), 0) + value
            for kind, value in snap["errors"].items():
                total.errors[kind] = total.errors.get(kind, 0) + value
            total.local_refusals += snap["local_refusals"]
            total.storage_buckets = [a + b for a, b in zip(total.storage_buckets, snap["storage_buckets"], strict=True)]
            total.storage_sum += snap["storage_sum"]
            per_worker[str(snap["pid"])] = sum(v for *_, v in snap["decisions"])
        total.registry.register(_Workers(per_worker))
        return total.render()


class _Workers:
    def __init__(self, per_worker: dict[str, int]) -> None:
        self.per_worker = per_worker

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "quota_worker_decisions", "Decisions taken by each worker process (pid).", labels=["worker"]
        )
        for pid, value in self.per_worker.items():
            decisions.add_metric([pid], value)
        yield decisions
        yield GaugeMetricFamily(
            "quota_workers", "Worker processes whose counters this scrape adds up.", value=len(self.per_worker)
        )


def attach(middleware: Any, metrics: Metrics) -> None:
    """Make `metrics` the middleware's, everywhere it counts: its store guard holds its own
    reference, taken when the middleware was built."""
    middleware.metrics = metrics
    guard = getattr(middleware, "guard", None)
    if guard is not None:
        guard.metrics = metrics
