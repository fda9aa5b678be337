"""The one poll-until-true wait of the asynchronous tests (the synchronous ones use tests.procs.wait)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_for(
    check: Callable[[], Awaitable[T | None] | T | None],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    step: float = 0.05,
    context: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` (awaited when it answers an awaitable) every ``step`` s until it answers something truthy, and
    answer that; after ``timeout`` s fail with ``what``, the last answer and, when given, ``context()`` (a process's
    log). End-to-end tests only: real time, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        got: Any = check()
        if isinstance(got, Awaitable):
            got = await got
        if got:
            return got  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            more = f"\n{context()}" if context is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {got!r}){more}")
        await asyncio.sleep(step)
