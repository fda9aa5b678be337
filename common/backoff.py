"""Capped exponential backoff with full jitter, the one copy every reconnect loop uses (the MQTT uplink, the
portal's ingest, Modbus links and polls, serial lines).

Attempt n (0 for the first retry) waits uniform(0, min(cap, base * 2**n)): spread out, so a hundred gateways
that lost the same broker do not come back in step, and never longer than the cap. The caller resets n after
a connection that worked. Randomness is injected, so tests can pin it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

#: Past this many doublings every ceiling is the cap anyway; the bound keeps 2**n a small number.
MAX_DOUBLINGS = 30


def backoff_delay(attempt: int, base_s: float, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry ``attempt``: ``rand()`` (in [0, 1)) of min(cap, base * 2**attempt)."""
    return rand() * min(cap_s, math.ldexp(base_s, min(max(attempt, 0), MAX_DOUBLINGS)))


def backoff_delays(base_s: float, cap_s: float, rng: random.Random | None = None) -> Callable[[int], float]:
    """:func:`backoff_delay` with its bounds and its own random generator bound: ``delay(attempt)``."""
    r = rng or random.Random()
    return lambda attempt: backoff_delay(attempt, base_s, cap_s, r.random)
