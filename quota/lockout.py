"""Wrong tokens, counted per client: the admin API's bearer tokens and the dashboard's sign-in.

A client (its rate key: its address, or its IPv6 network) that sent as many wrong or missing
tokens as `wrong_tokens` allows in its window (quota.yaml; 10/minute) is answered 429 before
anything it sends is compared, until the oldest of them is a window old: guessing a token is held
to a few tries a minute from each client.
Counted in the process (each process counts its own), in a bounded table that forgets the clients
heard from longest ago: a flood of addresses cannot make it grow.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from quota.clients import ClientAddress
from quota.matrix import Rate

CLIENTS = 4096


class Lockout:
    """The recent wrong tokens of each client. The allowance is read at each call (`rate`), so a
    reload of quota.yaml applies at once."""

    def __init__(
        self, rate: Callable[[], Rate], clock: Callable[[], float] = time.monotonic, clients: int = CLIENTS
    ) -> None:
        self.rate = rate
        self.clock = clock
        self.clients = clients
        self._failed: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, who: str) -> float:
        """Seconds before `who` may send a token again; 0 when it may now."""
        seen = self._failed.get(who)
        if seen is None:
            return 0.0
        rate, now = self.rate(), self.clock()
        while seen and seen[0] <= now - rate.window_s:
            seen.popleft()
        if not seen:
            del self._failed[who]
            return 0.0
        return seen[0] + rate.window_s - now if len(seen) >= rate.amount else 0.0

    def wait_s(self, who: str) -> int:
        """Whole seconds before `who` may send a token again (Retry-After); 0 when it may now."""
        wait = self.retry_after(who)
        return max(1, math.ceil(wait)) if wait else 0

    def refusal(self, who: str) -> tuple[int, str] | None:
        """(whole seconds to wait, what to tell the client) while `who` is locked out, else None."""
        wait = self.wait_s(who)
        if not wait:
            return None
        return wait, f"too many wrong tokens from this client ({self.rate().text}); retry in {wait} s"

    def failed(self, who: str) -> None:
        seen = self._failed.pop(who, None)
        if seen is None or seen.maxlen != self.rate().amount:
            seen = deque(seen or (), maxlen=self.rate().amount)
        seen.append(self.clock())
        self._failed[who] = seen
        if len(self._failed) > self.clients:
            self._failed.popitem(last=False)


def client_key(clients: ClientAddress, scope: Any) -> str:
    """The client's rate key, as the middleware reads it (forwarding headers from trusted proxies)."""
    return clients.key(clients.address(scope))
