"""The WebSocket hub: fan each newly stored event (and gateway status change) out to every console.

Each console has its own bounded queue and its own sender task, so a slow phone on a bad link
never holds up the others: when its queue overflows, the queue is emptied and the client is told
to go away (close code 1013, "try again later"); its page reconnects and catches up from its last
event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import WSMsgType, web

from portal.metrics import Metrics

log = logging.getLogger("portal.hub")

Message = dict[str, Any]
_KICK: Message = {"kind": "_kick"}
_CLOSE: Message = {"kind": "_close"}
CLOSE_TRY_AGAIN = 1013
CLOSE_GOING_AWAY = 1001


class _Client:
    __slots__ = ("id", "kicked", "label", "queue", "render", "wants", "ws")

    def __init__(self, cid: int, ws: web.WebSocketResponse, queue_max: int, render: Callable[[Message], str],
                 label: str, wants: Callable[[Message], bool] | None) -> None:
        self.id = cid
        self.ws = ws
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=queue_max)
        self.render = render
        self.label = label
        self.wants = wants
        self.kicked = False


class Hub:
    def __init__(self, *, queue_max: int = 256, metrics: Metrics | None = None) -> None:
        self.queue_max = queue_max
        self.metrics = metrics
        self._clients: dict[int, _Client] = {}
        self._ids = itertools.count(1)
        self._closed = False

    @property
    def clients(self) -> int:
        return len(self._clients)

    def broadcast(self, message: Message) -> None:
        """Queue a message for every console that wants it; never waits. A console that cannot keep up is dropped."""
        for c in list(self._clients.values()):
            if c.kicked or (c.wants is not None and not c.wants(message)):
                continue
            try:
                c.queue.put_nowait(message)
            except asyncio.QueueFull:
                self._kick(c, "fell behind")

    def _kick(self, c: _Client, why: str, *, slow: bool = True) -> None:
        c.kicked = True
        while not c.queue.empty():
            c.queue.get_nowait()
        c.queue.put_nowait(_KICK)
        self._clients.pop(c.id, None)
        self._gauge()
        if slow and self.metrics:
            self.metrics.ws_dropped.inc()
        log.log(logging.WARNING if slow else logging.INFO, "console socket %d (%s) dropped: %s", c.id, c.label, why)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.ws_clients.set(len(self._clients))

    async def serve(self, request: web.Request, *, render: Callable[[Message], str], label: str = "",
                    backlog: Callable[[], Awaitable[Iterable[Message]]] | None = None,
                    hello: Message | None = None,
                    wants: Callable[[Message], bool] | None = None) -> web.WebSocketResponse:
        """Run one console socket until either side closes it.

        ``backlog`` (what the console missed) is sent after the client is registered, so nothing
        that is stored meanwhile falls between the two; the page drops duplicates by event id.
        ``wants`` filters what this console is sent (broadcasts and backlog alike): a guard scoped to
        some sites gets nothing of the others.
        """
        ws = web.WebSocketResponse(heartbeat=25.0, max_msg_size=4096)
        await ws.prepare(request)
        if self._closed:
            await ws.close(code=CLOSE_GOING_AWAY)
            return ws
        c = _Client(next(self._ids), ws, self.queue_max, render, label, wants)
        self._clients[c.id] = c
        self._gauge()
        sender = asyncio.create_task(self._send_loop(c), name=f"portal.ws[{c.id}].send")
        try:
            if hello is not None:
                c.queue.put_nowait(hello)
            if backlog is not None:
                for m in await backlog():
                    if c.kicked:
                        break
                    if wants is not None and not wants(m):
                        continue
                    try:
                        c.queue.put_nowait(m)
                    except asyncio.QueueFull:
                        self._kick(c, "backlog larger than the queue")
            async for msg in ws:
                if msg.type == WSMsgType.TEXT and msg.data == "ping" and not c.kicked:
                    with contextlib.suppress(asyncio.QueueFull):
                        c.queue.put_nowait({"kind": "pong"})
        finally:
            if self._clients.pop(c.id, None) is not None:
                self._gauge()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            if not ws.closed:
                await ws.close()
        return ws

    async def _send_loop(self, c: _Client) -> None:
        while True:
            m = await c.queue.get()
            if m is _KICK:
                await c.ws.close(code=CLOSE_TRY_AGAIN, message=b"too slow")
                return
            if m is _CLOSE:
                await c.ws.close(code=CLOSE_GOING_AWAY, message=b"server shutdown")
                return
            try:
                await c.ws.send_str(c.render(m))
            except (ConnectionError, RuntimeError) as e:  # closing underneath us
                log.debug("console socket %d: send failed: %s", c.id, e)
                return

    def kick_label(self, label: str, why: str) -> int:
        """Tell the consoles of one user (by label) to reconnect, e.g. after their sites changed."""
        clients = [c for c in self._clients.values() if not c.kicked and c.label == label]
        for c in clients:
            self._kick(c, why, slow=False)
        return len(clients)

    def kick_all(self, why: str) -> int:
        """Tell every console to reconnect (e.g. after a change of roles); returns how many there were."""
        clients = [c for c in self._clients.values() if not c.kicked]
        for c in clients:
            self._kick(c, why, slow=False)
        return len(clients)

    async def close(self) -> None:
        """Close every console socket (server shutdown); the serve() calls then return."""
        self._closed = True
        for c in list(self._clients.values()):
            c.kicked = True
            while not c.queue.empty():
                c.queue.get_nowait()
            c.queue.put_nowait(_CLOSE)
        for _ in range(200):  # bounded wait for the handlers to unwind
            if not self._clients:
                break
            await asyncio.sleep(0.01)
        self._gauge()
