"""Stopping tasks (gateway and portal shutdown): a cancel swallowed by ``asyncio.wait_for`` (Python 3.11) must not hang.

CI caught a gateway that never exited after SIGTERM: its uplink task was inside aiomqtt's ``wait_for`` (subscribe)
when the cancel came, the awaited reply completed in the same loop turn, and 3.11's ``wait_for`` returned the
result instead of raising; the task carried on and the shutdown waited on it forever.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from common import tasks


async def _swallowing_task() -> tuple[asyncio.Task[None], list[asyncio.Future[None]]]:
    """A task looping on ``wait_for`` like aiomqtt's request/reply calls, parked on its first reply."""
    loop = asyncio.get_running_loop()
    replies: list[asyncio.Future[None]] = []

    async def requests() -> None:
        while True:
            replies.append(loop.create_future())
            await asyncio.wait_for(replies[-1], 5)

    task = asyncio.create_task(requests(), name="uplink")
    await asyncio.sleep(0)
    return task, replies


async def test_cancel_again_stops_a_task_that_swallowed_the_cancel(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tasks, "CANCEL_AGAIN_S", 0.05)
    task, replies = await _swallowing_task()
    replies[-1].set_result(None)  # the reply lands in the turn the cancel does
    with caplog.at_level(logging.WARNING, logger="common.tasks"):
        await asyncio.wait_for(tasks.cancel_and_wait("uplink", [task]), 2)
    assert task.cancelled()
    if sys.version_info < (3, 12):  # 3.12's wait_for keeps the cancel; 3.11's loses it, so the second one is needed
        assert "uplink ignored a cancel; cancelling again" in caplog.text


async def test_a_task_that_failed_is_logged_and_the_others_still_stop(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise RuntimeError("bus gone")

    async def runs() -> None:
        await asyncio.sleep(60)

    failed = asyncio.create_task(fails(), name="poller")
    running = asyncio.create_task(runs(), name="engine")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="common.tasks"):
        await asyncio.wait_for(tasks.cancel_and_wait("producers", [failed, running]), 2)
    assert running.cancelled()
    assert "stopping producers: poller failed" in caplog.text and "bus gone" in caplog.text
