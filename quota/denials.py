"""A local cache of rate windows known to be over their limit: a flood is refused in-process.

A rate refusal carries the first instant at which one more hit could fit if nothing else were
counted meanwhile. Hits from other requests or processes only push that instant later, never
earlier, so until then the store would refuse as well; and a refused request counts nothing in the
store either way. Serving those refusals locally therefore lets no extra request through and
refuses none that would pass: it only saves the round trip (envoy's over_limit local cache and
upstash's ephemeral cache do the same).

A refusal holds for what it was computed for: a hit of its cost, under its limit and window. A call
that costs more (a send to more recipients) cannot fit sooner and is refused too; one that costs
less may fit now, and is asked of the store, as is one under a higher limit or a shorter window (a
plan changed since: an upgrade takes effect at once, not when the refusal would have ended).
"""

from __future__ import annotations

from quota.store.program import Program, RateOp, Refusal

MAX_ENTRIES = 1 << 16
# Entries whose time has passed are dropped every SWEEP_EVERY refusals remembered, so the cache holds
# about what is still refused rather than filling up to MAX_ENTRIES with stale entries.
SWEEP_EVERY = 1 << 10


class DenyCache:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        # Rate key -> (the instant the refused hit could fit, that hit's cost, its limit and window).
        self.until: dict[str, tuple[int, int, int, int]] = {}
        self._remembered = 0

    def check(self, program: Program, now_ms: int) -> Refusal | None:
        if not self.until:
            return None
        for index, op in enumerate(program.ops):
            if isinstance(op, RateOp):
                entry = self.until.get(op.key)
                if entry is not None:
                    until, cost, limit, window_ms = entry
                    if now_ms >= until:
                        del self.until[op.key]
                    elif op.cost >= cost and op.limit <= limit and op.window_ms >= window_ms:
                        reset = op.window_ms - now_ms % op.window_ms
                        return Refusal(index, "rate", op.limit, op.limit, retry_after_ms=until - now_ms, reset_ms=reset)
        return None

    def remember(self, program: Program, refusal: Refusal, now_ms: int) -> None:
        if refusal.kind != "rate":
            return
        op = program.ops[refusal.op_index]
        assert isinstance(op, RateOp)
        self._remembered += 1
        if len(self.until) >= self.max_entries or self._remembered % SWEEP_EVERY == 0:
            self.until = {k: e for k, e in self.until.items() if e[0] > now_ms}
            if len(self.until) >= self.max_entries:
                self.until.clear()
        known = self.until.get(op.key)
        if known is None or op.cost <= known[1] or now_ms >= known[0]:
            # The cheaper refusal is kept: it speaks for more calls.
            self.until[op.key] = (now_ms + refusal.retry_after_ms, op.cost, op.limit, op.window_ms)
