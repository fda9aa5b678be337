"""aiomqtt's client, with fewer trips through the event loop per packet. Both programs' MQTT connections use it.

aiomqtt hands each packet paho queues to the loop's writer: from the loop's own thread too it goes through
``call_soon_threadsafe`` (a write to the loop's self-pipe, an iteration to read it), ``add_writer`` (a system
call), an iteration for the socket to report writable, and ``remove_writer`` (another). And every reply awaited
(a publish's PUBACK, a SUBACK) is wrapped in ``asyncio.wait_for``, which on Python 3.11 makes a task of its own.
On the alarm path (an event published, the portal's ack taken in and PUBACKed) that was four trips and two tasks
per alarm, each costing about as much CPU as the work around it on a small machine.

:class:`Client` writes on the loop's thread with ``call_soon`` (the packet goes out in the next iteration, where
it would have been written at best); only what the socket does not take at once waits for it to be writable,
as before. Replies are awaited under ``asyncio.timeout`` in the caller's task. paho's keepalive checks run every
quarter keepalive, not every second. Everything else is aiomqtt's.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiomqtt
import paho.mqtt.client as paho

__all__ = ["Client"]

T = TypeVar("T")


class Client(aiomqtt.Client):
    """:class:`aiomqtt.Client` that writes without the self-pipe, the writer registration and a task per reply."""

    _flush_due = False  # a _flush is booked for the next iteration

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if asyncio._get_running_loop() is not self._loop:  # paho's connect runs in an executor thread
            super()._on_socket_register_write(client, userdata, sock)
            return
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush, client, sock)

    def _flush(self, client: paho.Client, sock: Any) -> None:
        """Write what paho queued; what the socket does not take waits for it to be writable (aiomqtt's way)."""
        self._flush_due = False
        try:
            client.loop_write()
        except Exception as exc:  # a broken pipe: the connection is lost (aiomqtt's writer does the same)
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)
            return
        if client.want_write() and sock.fileno() >= 0:
            # paho still thinks itself registered (it unregisters only when nothing is left): register for it.
            super()._on_socket_register_write(client, None, sock)

    async def _misc_loop(self) -> None:
        # paho's keepalive (a PINGREQ after keepalive s without sending, the link given up after keepalive s without a
        # PINGRESP), asked by aiomqtt every second: a wake-up a second of an idle gateway, for checks that a quarter
        # of the keepalive serves as well (the broker waits 1.5 keepalives before it gives up on us).
        every = min(max(1.0, self._client.keepalive / 4), 15.0)
        while self._client.loop_misc() == paho.MQTT_ERR_SUCCESS:  # noqa: ASYNC110 (paho's timers are polled)
            await asyncio.sleep(every)

    async def _wait_for(self, fut: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109 (aiomqtt's signature)
        if timeout is None:
            timeout = self.timeout
        try:
            async with asyncio.timeout(None if timeout == math.inf else timeout):
                return await fut
        except TimeoutError:
            raise aiomqtt.MqttError("Operation timed out") from None
