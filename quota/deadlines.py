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
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# How often the reads in progress are looked at: a read is cut off within a second of its deadline.
SWEEP_S = 1.0
# `body_timeout_s` unless quota.yaml says otherwise: 1 MiB in 30 s is 35 KB/s, a slow phone's pace.
DEFAULT_TIMEOUT_S = 30


class BodyTimeout(Exception):
    """A body was not in by its deadline (answered 408)."""


class BodyDeadlines:
    def __init__(self, timeout_s: Callable[[], float]) -> None:
        self.timeout_s = timeout_s
        # The task reading a body -> [its deadline on its loop's clock, 1.0 once it was cut off].
        self._reads: dict[asyncio.Task[object], list[float]] = {}
        # One sweeping timer per event loop with reads (a test's loops come and go; threads may
        # each run one): a sweep looks only at its own loop's reads.
        self._timers: dict[asyncio.AbstractEventLoop, asyncio.TimerHandle] = {}

    async def within(self, read: Awaitable[T]) -> T:
        """`read` (a body being read), or BodyTimeout once its deadline passed; a cancellation of
        anyone else's (a server shutting down) goes on as one."""
        task = self.start()
        try:
            return await read
        except asyncio.CancelledError:
            if self.end(task):
                raise BodyTimeout from None
            raise
        finally:
            self.end(task)  # however the read ended; a second end does nothing

    def start(self) -> asyncio.Task[object] | None:
        """A read begins in the current task; give its task to `end` when the read ends."""
        task = asyncio.current_task()
        if task is None:
            return None
        loop = task.get_loop()
        self._reads[task] = [loop.time() + self.timeout_s(), 0.0]
        if loop not in self._timers:
            self._timers[loop] = loop.call_later(SWEEP_S, self._sweep, loop)
        return task

    def end(self, task: asyncio.Task[object] | None) -> bool:
        """The read of `task` ended: True when its deadline cut it off and no other cancellation
        is pending (the deadline's is taken back here); False when it ended by itself, or when
        a cancellation of someone else's (a server shutting down) must go on."""
        entry = self._reads.pop(task, None) if task is not None else None
        if entry is None or not entry[1]:
            return False
        assert task is not None
        return task.uncancel() == 0

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        del self._timers[loop]
        for closed in [other for other in self._timers if other.is_closed()]:
            del self._timers[closed]
        now = loop.time()
        left = False
        for task, entry in list(self._reads.items()):
            theirs = task.get_loop()
            if task.done() or theirs.is_closed():
                del self._reads[task]  # ended without a word (its loop torn down mid-read)
            elif theirs is not loop:
                continue
            elif not entry[1] and entry[0] <= now and not task.cancelling():
                # A task already being cancelled (a shutdown) is left to that cancellation.
                entry[1] = 1.0
                task.cancel()
            else:
                left = True
        if left:
            self._timers[loop] = loop.call_later(SWEEP_S, self._sweep, loop)
