"""Token buckets per key (a client address, a phone number, a house), on an injectable monotonic clock.

Memory is bounded: past ``max_keys`` the least recently used keys are forgotten (a forgotten key
starts with a full bucket again, which only ever errs towards letting a person in).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    def __init__(self, rate: float, per_s: float, *, burst: float | None = None, max_keys: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or per_s <= 0:
            raise ValueError("rate and per_s must be positive")
        self.capacity = float(burst if burst is not None else rate)
        self.refill = rate / per_s  # tokens a second
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key → (tokens, at)

    def _level(self, key: str) -> float:
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.refill)

    def allow(self, key: str, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are that many."""
        level = self._level(key)
        ok = level >= cost
        self._put(key, level - cost if ok else level)
        return ok

    def blocked(self, key: str) -> bool:
        """True while the bucket is empty (without taking anything)."""
        return self._level(key) < 1.0

    def spend(self, key: str, cost: float = 1.0) -> None:
        """Take tokens whether or not there are enough (failures count even when already throttled)."""
        self._put(key, max(-self.capacity, self._level(key) - cost))

    def _put(self, key: str, tokens: float) -> None:
        self._buckets[key] = (tokens, self.clock())
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
