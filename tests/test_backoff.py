"""common/backoff.py: the one backoff every reconnect loop uses (uplink, ingest, Modbus links and polls,
serial lines): full jitter under a doubling ceiling, capped, and no overflow however long a link stays down."""

from __future__ import annotations

import random

from common.backoff import backoff_delay, backoff_delays


def test_the_ceiling_doubles_to_the_cap() -> None:
    assert [backoff_delay(n, 0.5, 30.0, lambda: 1.0) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(0, 0.5, 30.0, lambda: 0.0) == 0.0


def test_a_link_down_for_days_neither_overflows_nor_passes_the_cap() -> None:
    # A serial line retried every few seconds for a week is past attempt 100,000 (2.0 * 2**1100 overflows).
    assert backoff_delay(10**6, 2.0, 60.0, lambda: 0.999) < 60.0
    assert backoff_delay(-1, 2.0, 60.0, lambda: 1.0) == 2.0


def test_full_jitter_spreads_over_the_whole_window() -> None:
    delay = backoff_delays(0.5, 30.0, random.Random(7))
    samples = [delay(4) for _ in range(2000)]  # window [0, 8)
    assert 0.0 <= min(samples) < 0.2 and 7.8 < max(samples) < 8.0
    assert 3.6 < sum(samples) / len(samples) < 4.4
