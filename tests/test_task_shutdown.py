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
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tasks, "CANCEL_AGAIN_S", 0.05)
    task, replies = await _swallowing_task()
    replies[-1].set_result(None)  # the reply lands in the turn the cancel does
    with caplog.at_level(logging.WARNING, logger="common.tasks"):
        await asyncio.wait_for(tasks.cancel_and_wait("uplink", [task]), 2)
    assert task.cancelled()
    if sys.version_info < (3, 12):  # 3.12's wait_for keeps the cancel; 3.11's loses it, so the second one is needed
        assert "uplink ignored a cancel; cancelling again" in caplog.text


async def test_a_task_that_fails_while_stopping_is_logged_and_the_others_still_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise RuntimeError("bus gone while closing") from None

    async def runs() -> None:
        await asyncio.sleep(60)

    failing = asyncio.create_task(fails_on_cancel(), name="poller")
    running = asyncio.create_task(runs(), name="engine")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="common.tasks"):
        await asyncio.wait_for(tasks.cancel_and_wait("producers", [failing, running]), 2)
    assert running.cancelled() and failing.done()
    assert "stopping producers: poller failed" in caplog.text and "bus gone while closing" in caplog.text


# ---------------------------------------------------------------- tasks serving one connection together


async def _stubborn(swallowed: list[str]) -> None:
    """Loses the first cancel, as a task inside 3.11's wait_for can, and carries on."""
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        swallowed.append("cancel")
    await asyncio.sleep(60)


async def test_the_caller_cancelled_stops_a_task_that_lost_its_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    """An asyncio.TaskGroup waits for ever here: it cancels its tasks once."""
    monkeypatch.setattr(tasks, "CANCEL_AGAIN_S", 0.05)
    swallowed: list[str] = []
    children = [
        asyncio.create_task(_stubborn(swallowed), name="status"),
        asyncio.create_task(asyncio.sleep(60), name="receive"),
    ]
    runner = asyncio.create_task(tasks.run_until_first_ends("uplink", children))
    await asyncio.sleep(0.01)
    runner.cancel()
    await asyncio.sleep(0.01)
    runner.cancel()  # cancelled again while it stops its tasks: it still waits for them
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(runner, 2)
    assert swallowed == ["cancel"]
    assert all(c.cancelled() for c in children)


async def test_the_first_error_is_raised_plain_and_the_others_stopped(caplog: pytest.LogCaptureFixture) -> None:
    async def connection_lost() -> None:
        await asyncio.sleep(0.01)
        raise ConnectionResetError("broker gone")

    swallowed: list[str] = []
    children = [
        asyncio.create_task(_stubborn(swallowed), name="send"),
        asyncio.create_task(connection_lost(), name="receive"),
    ]
    with caplog.at_level(logging.ERROR, logger="common.tasks"), pytest.raises(ConnectionResetError, match="broker"):
        await asyncio.wait_for(tasks.run_until_first_ends("uplink", children), 5)
    assert children[0].cancelled() and swallowed == ["cancel"]
    assert "failed" not in caplog.text  # the caller's to handle (a reconnect), not an error at stop


async def test_a_task_that_returns_ends_the_others() -> None:
    children = [
        asyncio.create_task(asyncio.sleep(0.01), name="receive"),
        asyncio.create_task(asyncio.sleep(60), name="acks"),
    ]
    await asyncio.wait_for(tasks.run_until_first_ends("ingest", children), 2)
    assert children[0].done() and not children[0].cancelled() and children[1].cancelled()
