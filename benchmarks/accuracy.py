"""How far each rate algorithm lets one client go past its rate: `python -m benchmarks.accuracy`.

A greedy client asks every millisecond for 10 s against 100/second on the in-process store, and
the most hits admitted within any window of 1 s (closed, [t, t + 1000 ms]) is reported for each
algorithm. The sliding window (two weighted clock-aligned windows) trades exactness for two
counters; the exact log holds one entry per hit.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right

from quota.store.memory import MemoryStore
from quota.store.program import Program, RateOp

LIMIT, WINDOW_MS, SECONDS = 100, 1000, 10


async def worst_case(exact: bool, start_ms: int) -> tuple[int, int]:
    store = MemoryStore()
    op = RateOp("q:{bench}:r:accuracy", LIMIT, WINDOW_MS, 1, "accuracy", exact)
    admitted: list[int] = []
    for now in range(start_ms, start_ms + SECONDS * 1000):
        if (await store.run(Program([op]), now)).refusal is None:
            admitted.append(now)
    most = max(bisect_right(admitted, t + WINDOW_MS) - i for i, t in enumerate(admitted))
    return most, len(admitted)


def main() -> None:
    for name, exact in (("sliding", False), ("exact", True)):
        # Start at several offsets into a window: the sliding window's excess depends on the phase.
        results = [asyncio.run(worst_case(exact, 1_800_000_000_000 + offset)) for offset in (0, 250, 500, 900)]
        most = max(r[0] for r in results)
        total = sum(r[1] for r in results) / len(results)
        print(f"{name:8s} most hits in any 1 s window: {most} (limit {LIMIT}); admitted in {SECONDS} s: {total:.0f}")


if __name__ == "__main__":
    main()
