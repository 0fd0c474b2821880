"""A deadline on each request body quota reads: a client that sends its headers and then its body
slowly, or never, would otherwise hold its connection and what arrived of the body (up to
`max_body_bytes`) for as long as it liked, and many such clients the process's memory.

Each read has `body_timeout_s` (quota.yaml) from its start. One timer per process sweeps the reads
in progress every second and cancels the task of each past its deadline; the reader, told it was
its deadline and not a shutdown, answers 408. One timer for all reads, not one a read: arming and
cancelling a timer costs some 4 µs a request on uvloop (`asyncio.timeout`, 10), a dictionary entry
a fraction of one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# How often the reads in progress are looked at: a read is cut off within a second of its deadline.
SWEEP_S = 1.0
# `body_timeout_s` unless quota.yaml says otherwise: 1 MiB in 30 s is 35 KB/s, a slow phone's pace.
DEFAULT_TIMEOUT_S = 30


class BodyDeadlines:
    def __init__(self, timeout_s: Callable[[], float]) -> None:
        self.timeout_s = timeout_s
        # The task reading a body -> [its deadline on the loop's clock, whether it was cut off].
        self._reads: dict[asyncio.Task[object], list[float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> asyncio.Task[object] | None:
        """A read begins in the current task; give its task to `end` when the read ends."""
        task = asyncio.current_task()
        if task is None:
            return None
        loop = task.get_loop()
        self._reads[task] = [loop.time() + self.timeout_s(), 0.0]
        if self._timer is None or self._loop is not loop:
            self._loop = loop
            self._timer = loop.call_later(SWEEP_S, self._sweep)
        return task

    def end(self, task: asyncio.Task[object] | None) -> bool:
        """The read of `task` ended: True when its deadline cut it off (the cancellation it got was
        this one's, taken back here), False when it ended by itself or by another cancellation."""
        entry = self._reads.pop(task, None) if task is not None else None
        if entry is None or not entry[1]:
            return False
        assert task is not None
        task.uncancel()
        return True

    def _sweep(self) -> None:
        self._timer = None
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        now = loop.time()
        for task, entry in list(self._reads.items()):
            if task.done():
                del self._reads[task]  # ended without a word (its loop torn down mid-read)
            elif not entry[1] and entry[0] <= now:
                entry[1] = 1.0
                task.cancel()
        if self._reads:
            self._timer = loop.call_later(SWEEP_S, self._sweep)
