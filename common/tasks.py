"""Stopping asyncio tasks for good, for both programs' shutdowns."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

CANCEL_AGAIN_S = 1.0  # a task still running this long after a cancel is cancelled again


async def cancel_and_wait(step: str, tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until each has ended, cancelling again any that lives on; log those that failed.

    On Python 3.11 a cancel that arrives as an ``asyncio.wait_for`` inside the task completes is lost (aiomqtt
    wraps its subscribe and publish replies in one), so a single cancel and await can wait forever.
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
        if pending:
            log.warning("stopping %s: %s ignored a cancel; cancelling again", step,
                        ", ".join(t.get_name() for t in pending))
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            log.error("stopping %s: %s failed", step, t.get_name(), exc_info=t.exception())
