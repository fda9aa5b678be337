"""Stopping asyncio tasks for good, for both programs' shutdowns and connections.

On Python 3.11 a cancel that arrives as an ``asyncio.wait_for`` inside the task completes is lost (aiomqtt wraps
its subscribe and publish replies in one), so a single cancel and an await can wait for ever; an
``asyncio.TaskGroup`` cancels its tasks only once. These helpers cancel again until the task has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

CANCEL_AGAIN_S = 1.0  # a task still running this long after a cancel is cancelled again


async def cancel_and_wait(step: str, tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until each has ended, cancelling again any that lives on; log those that failed
    while being stopped (one that had ended already is its owner's business)."""
    pending = {t for t in tasks if not t.done()}
    stopped = set(pending)
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
        if pending:
            log.warning(
                "stopping %s: %s ignored a cancel; cancelling again", step, ", ".join(t.get_name() for t in pending)
            )
    for t in stopped:
        if not t.cancelled() and t.exception() is not None:
            log.error("stopping %s: %s failed", step, t.get_name(), exc_info=t.exception())


async def run_until_first_ends(step: str, tasks: list[asyncio.Task[Any]]) -> None:
    """Wait until one of the tasks ends or the caller is cancelled, stop the others for good, then raise the
    error of the first that failed (or the cancel). A TaskGroup for tasks that serve one connection together."""
    cancelled = False
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        cancelled, done = True, set()
    stopping = asyncio.ensure_future(cancel_and_wait(step, tasks))
    while not stopping.done():
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:
            cancelled = True  # going down already; the stop runs to its end first
    # Take every error (a task that failed in the very turn the cancel came, say the link dropping as the broker
    # stops with us): one left in a task is reported as "never retrieved" when the task is collected.
    errors = [e for t in tasks if t.done() and not t.cancelled() and (e := t.exception()) is not None]
    if cancelled:
        for e in errors:
            log.debug("stopping %s: a task had failed meanwhile: %r", step, e)
        raise asyncio.CancelledError
    for t in tasks:
        if t in done and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
