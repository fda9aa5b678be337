"""The WebSocket hub: fan each newly stored event (and gateway status change) out to every console.

Each console has its own bounded queue and its own sender task, so a slow phone on a bad link
never holds up the others: when its queue overflows, the queue is emptied and the client is told
to go away (close code 1013, "try again later"); its page reconnects and catches up from its last
event id.

A socket lives only as long as the session it was opened with. :meth:`Hub.run_beats` sends every console a
``{"kind": "beat"}`` every few seconds (the page's proof that it is live) and re-checks the sessions behind the
open sockets at each beat; a socket whose session has ended (signed out, timed out, password changed, purged)
is told ``{"kind": "session_ended"}`` and closed with code 4401. Sign-out and a password change end their
sockets at once (:meth:`Hub.end_sessions`, :meth:`Hub.end_user`).

Several instances (a monitoring centre): :attr:`Hub.relay`, when set, is handed every message broadcast here (but
the beats) and every kick and end of sockets, for the other instances' hubs, which apply them with
:meth:`Hub.apply_peer` (portal.centre.peers carries them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from portal.web.metrics import Metrics

log = logging.getLogger("portal.hub")

Message = dict[str, Any]
_KICK: Message = {"kind": "_kick"}
_CLOSE: Message = {"kind": "_close"}
CLOSE_TRY_AGAIN = 1013
CLOSE_GOING_AWAY = 1001
CLOSE_SESSION_ENDED = 4401  # private-use range: the page asks the guard to sign in again


class _Client:
    __slots__ = ("closing", "id", "kicked", "label", "queue", "render", "session", "wants", "ws")

    def __init__(
        self,
        cid: int,
        ws: web.WebSocketResponse,
        queue_max: int,
        render: Callable[[Message], str],
        label: str,
        wants: Callable[[Message], bool] | None,
        session: str | None,
    ) -> None:
        self.id = cid
        self.ws = ws
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=queue_max)
        self.render = render
        self.label = label
        self.wants = wants
        self.session = session
        self.kicked = False
        self.closing: tuple[int, bytes] | None = None  # the close code and reason the sender settled on


class Hub:
    def __init__(self, *, queue_max: int = 256, metrics: Metrics | None = None) -> None:
        self.queue_max = queue_max
        self.metrics = metrics
        self._clients: dict[int, _Client] = {}
        self._ids = itertools.count(1)
        self._closed = False
        #: where what happens here is told to the other instances (None: one instance)
        self.relay: Callable[[Message], None] | None = None

    @property
    def clients(self) -> int:
        return len(self._clients)

    def broadcast(self, message: Message, *, relay: bool = True) -> None:
        """Queue a message for every console that wants it; never waits. A console that cannot keep up is dropped.
        ``relay=False``: the other instances hear of it another way (or it came from one of them)."""
        if relay and self.relay is not None and message.get("kind") != "beat":
            self.relay(message)
        for c in list(self._clients.values()):
            if c.kicked or (c.wants is not None and message.get("kind") != "beat" and not c.wants(message)):
                continue
            try:
                c.queue.put_nowait(message)
            except asyncio.QueueFull:
                self._kick(c, "fell behind")

    def broadcast_events(self, events: Sequence[Message]) -> None:
        """Stored events for the consoles' event lists (``relay=False``: the other instances hear of them with the
        commit). Of more than half a console's queue at once (a gateway's backlog after an outage, batches of up to
        500), only the newest that many: a list shows a hundred at most, alarms reach it as incidents, and every
        console would otherwise be dropped as too slow."""
        burst = max(1, self.queue_max // 2)
        if len(events) > burst:
            events = sorted(events, key=lambda e: str(e["id"]))[-burst:]
        for e in events:
            self.broadcast({"kind": "event", "event": e}, relay=False)

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

    async def serve(
        self,
        request: web.Request,
        *,
        render: Callable[[Message], str],
        label: str = "",
        backlog: Callable[[], Awaitable[Iterable[Message]]] | None = None,
        hello: Message | None = None,
        wants: Callable[[Message], bool] | None = None,
        session: str | None = None,
    ) -> web.WebSocketResponse:
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
        c = _Client(next(self._ids), ws, self.queue_max, render, label, wants, session)
        self._clients[c.id] = c
        self._gauge()
        sender = asyncio.create_task(self._send_loop(c), name=f"portal.ws[{c.id}].send")
        receiver: asyncio.Task[None] | None = None
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
            receiver = asyncio.create_task(self._receive_loop(c), name=f"portal.ws[{c.id}].receive")
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._clients.pop(c.id, None) is not None:
                self._gauge()
            for t in (receiver, sender):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
            # Closed here, with nothing receiving: a close from another task while one receives makes aiohttp drop
            # the connection without waiting for the page's reply, and the page may see 1006 instead of the code.
            if not ws.closed:
                code, why = c.closing or (WSCloseCode.OK, b"")
                await ws.close(code=code, message=why)
        return ws

    async def _receive_loop(self, c: _Client) -> None:
        async for msg in c.ws:
            if msg.type == WSMsgType.TEXT and msg.data == "ping" and not c.kicked:
                with contextlib.suppress(asyncio.QueueFull):
                    c.queue.put_nowait({"kind": "pong"})

    async def _send_loop(self, c: _Client) -> None:
        """Send what is queued until a kick, a shutdown or the session's end, which set how the socket closes."""
        while True:
            m = await c.queue.get()
            if m is _KICK:
                c.closing = (CLOSE_TRY_AGAIN, b"too slow")
                return
            if m is _CLOSE:
                c.closing = (CLOSE_GOING_AWAY, b"server shutdown")
                return
            if m.get("kind") == "_end":
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await c.ws.send_str(json.dumps({"kind": "session_ended", "why": m["why"]}))
                c.closing = (CLOSE_SESSION_ENDED, b"session ended")
                return
            try:
                await c.ws.send_str(c.render(m))
            except (ConnectionError, RuntimeError) as e:  # closing underneath us
                log.debug("console socket %d: send failed: %s", c.id, e)
                return

    def _tell_peers(self, op: str, *args: Any) -> None:
        if self.relay is not None:
            self.relay({"kind": "_peer", "op": op, "args": list(args)})

    def apply_peer(self, message: Message) -> None:
        """What another instance's hub broadcast (to this instance's consoles) or did to its sockets (to the same
        users' and sessions' sockets here)."""
        if message.get("kind") != "_peer":
            self.broadcast(message, relay=False)
            return
        op, args = message.get("op"), message.get("args") or []
        ops: dict[str, Callable[..., int]] = {  # called with the peer's JSON args
            "kick_label": self.kick_label,
            "end_sessions": self.end_sessions,
            "end_user": self.end_user,
            "kick_all": self.kick_all,
        }
        local = ops.get(str(op))
        if local is None:
            log.warning("an instance asked for %r: not a hub operation", op)
            return
        local(*args, peers=False)

    def kick_label(self, label: str, why: str, *, peers: bool = True) -> int:
        """Tell the consoles of one user (by label) to reconnect, e.g. after their sites changed."""
        if peers:
            self._tell_peers("kick_label", label, why)
        clients = [c for c in self._clients.values() if not c.kicked and c.label == label]
        for c in clients:
            self._kick(c, why, slow=False)
        return len(clients)

    def _end(self, c: _Client, why: str) -> None:
        c.kicked = True
        while not c.queue.empty():
            c.queue.get_nowait()
        c.queue.put_nowait({"kind": "_end", "why": why})
        self._clients.pop(c.id, None)
        self._gauge()
        log.info("console socket %d (%s) closed: %s", c.id, c.label, why)

    def end_sessions(self, sessions: Iterable[str], why: str, *, peers: bool = True) -> int:
        """Close the sockets opened with these sessions (by id hash): their session is over."""
        gone = set(sessions)
        if peers:
            self._tell_peers("end_sessions", sorted(gone), why)
        clients = [c for c in self._clients.values() if not c.kicked and c.session in gone]
        for c in clients:
            self._end(c, why)
        return len(clients)

    def end_user(self, label: str, why: str, *, peers: bool = True) -> int:
        """Close every socket of one user (by label): e.g. a password change ended all their sessions."""
        if peers:
            self._tell_peers("end_user", label, why)
        clients = [c for c in self._clients.values() if not c.kicked and c.label == label]
        for c in clients:
            self._end(c, why)
        return len(clients)

    async def run_beats(
        self, every_s: float, alive: Callable[[set[str]], Awaitable[set[str]]], wall: Callable[[], float]
    ) -> None:
        """Beat on every socket every ``every_s`` and close those whose session ``alive`` no longer returns."""
        while True:
            await asyncio.sleep(every_s)
            at = datetime.fromtimestamp(wall(), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            self.broadcast({"kind": "beat", "at": at, "every_s": every_s})
            sessions = {c.session for c in self._clients.values() if not c.kicked and c.session}
            if not sessions:
                continue
            try:
                live = await alive(sessions)
            except Exception as e:  # the store is busy or failing: check again at the next beat
                log.warning("console sessions not checked: %s", e)
                continue
            if sessions - live:
                self.end_sessions(sessions - live, "session ended", peers=False)  # each instance checks its own

    def kick_all(self, why: str, *, peers: bool = True) -> int:
        """Tell every console to reconnect (e.g. after a change of roles); returns how many there were."""
        if peers:
            self._tell_peers("kick_all", why)
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
