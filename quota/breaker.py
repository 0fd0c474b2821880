"""A circuit breaker in front of the store: a dead Redis costs a check of a timestamp per request,
not a timeout each. After `threshold` consecutive failures it opens for `cooldown_s`; then one
request probes, and its success closes the breaker (recovery on its own)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    def __init__(
        self, threshold: int = 3, cooldown_s: float = 0.5, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False
        self.probe_started = 0.0

    @property
    def state(self) -> State:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        # One request at a time tests the store; the others keep failing fast. A probe that never
        # reported (its task was cancelled) is abandoned after a cooldown, so the breaker cannot jam.
        abandoned = self.probing and self.clock() - self.probe_started >= self.cooldown_s
        if state == "half-open" and (not self.probing or abandoned):
            self.probing = True
            self.probe_started = self.clock()
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = self.clock()
