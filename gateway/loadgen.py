"""A synthetic event source for durability tests and benchmarks.

It produces ``test.synthetic`` events numbered 1..count at ``rate`` per second. The number of the
next event is stored in the same transaction as the events, so after a crash it resumes exactly
where the store left off: every number is produced once, whatever happens to the process.

With ``alarm_every`` = k, every k-th event is instead a ``test.alarm`` (INTRUSION) or, every other
time, a ``test.tamper`` (TAMPER), for burst tests of the uplink's urgent lane; the kind depends on the
number alone, so a resumed run makes the same mix. Numbers the store refuses (its memory ring full of
routine work while the disk is full) are gone, as routine events then are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from gateway import wire
from gateway.config import LoadgenConfig
from gateway.events import Draft
from gateway.store import Store, StoreError

log = logging.getLogger(__name__)

STATE_KEY = "loadgen"
TICK_S = 0.01


def draft(cfg: LoadgenConfig, place: wire.Place, n: int) -> Draft:
    """Event number ``n``."""
    k = cfg.alarm_every
    if k and n % k == 0:
        if (n // k) % 2:
            return Draft(
                type="test.alarm",
                device="loadgen",
                place=place,
                point=f"in{n}",
                priority=wire.Priority.INTRUSION,
                data={"n": n},
            )
        return Draft(
            type="test.tamper",
            device="loadgen",
            place=place,
            point=f"in{n}",
            priority=wire.Priority.TAMPER,
            data={"n": n},
        )
    return Draft(type="test.synthetic", device="loadgen", place=place, data={"n": n})


async def run_loadgen(
    cfg: LoadgenConfig, store: Store, site: str, *, clock: Callable[[], float] = time.monotonic
) -> None:
    state = await store.get_state(STATE_KEY) or {}
    n = int(state.get("next", 1))
    if n > cfg.count:
        return
    if cfg.start_after_s:
        await asyncio.sleep(cfg.start_after_s)
    log.info("loadgen: producing events %d..%d at %.0f/s", n, cfg.count, cfg.rate)
    place = wire.Place(site=site)
    start, produced = clock(), 0
    last: asyncio.Future[list[wire.Event]] | None = None
    while n <= cfg.count:
        due = int((clock() - start) * cfg.rate) + 1 - produced
        k = max(0, min(due, cfg.count - n + 1, store.batch_max))
        if k:
            drafts = [draft(cfg, place, i) for i in range(n, n + k)]
            n += k
            produced += k
            last = store.submit(drafts, state={STATE_KEY: {"next": n}})
            if store.pending > 4 * store.batch_max:
                await _settled(last)  # let the writer catch up; the rate is a ceiling, not a promise
        else:
            await asyncio.sleep(TICK_S)
    if last is not None:
        await _settled(last)
    log.info("loadgen: done, %d events", cfg.count)


async def _settled(fut: asyncio.Future[list[wire.Event]]) -> None:
    """Wait for a submission; one the store refused (its memory ring full of routine work) is counted there."""
    with contextlib.suppress(StoreError):
        await fut
