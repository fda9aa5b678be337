"""Several portal instances on one PostgreSQL store: what one of them stores or changes, every console sees live.

The instances tell each other through PostgreSQL's LISTEN/NOTIFY on one channel (:data:`CHANNEL`), not through the
MQTT broker. A NOTIFY sent inside a transaction is delivered when, and only when, that transaction commits: the
news of a stored alarm travels with the alarm itself, so an instance killed the instant after a commit has told the
others already, and one killed before it has stored nothing (its gateway sends again and another instance stores
it). Every instance needs the database anyway, where only some need the broker; and nothing meant for the
instances' eyes goes onto a broker that estates bridge into and that anyone on an estate LAN can reach.

Two streams share the channel:

* **with the commit** (:meth:`Peers.before_commit`, the store's before-commit step, in the writer thread): the new
  events of every stored gateway batch (with the gateway's sequence bookkeeping), every incident, arm state and
  arm command the alarm board's ops changed, and the notices ops ask for (:meth:`portal.store.Op.notice`: a site
  plan, a patrol checkpoint or route changed);
* **after it** (:meth:`Peers.relay`, on the event loop, on a connection of its own): everything else a hub
  broadcasts (doors, unlock commands, gateway status, care and patrol news) and what it does to sockets (a
  sign-out, a guard's sites changed), which the other hubs repeat for the same sessions and users.

A receiving instance hands the batches and the notices to its store's commit listeners as a peer's commit (doors
follow their state, a command's waiter hears its answer, the consoles get the events, the site plans and the patrol
checkpoints are read again, the patrol rounds looked at) and the rest to its hub. Bodies over PostgreSQL's
8000-byte limit go in parts, sent in one transaction and so delivered together. The listening connection
reconnects with capped backoff and full jitter; what was sent while it was away is lost to it, so its consoles are
told to reconnect (every page then fetches what it missed) and its commit listeners hear
:data:`~portal.store.MISSED` (what they keep of the store, they read again).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from portal.alarms import incidents as alarms
from portal.store import MISSED, BatchResult, GatewaySnapshot, Notice, Op, PeerCommit, Postgres, Store
from portal.store.engine import connect_args
from portal.web.hub import Hub

log = logging.getLogger("portal.centre.peers")

CHANNEL = "gatehouse_peers"
#: Bytes of a body per notification (the payload, with its head, must stay under 8000 bytes).
PART_MAX = 7800
#: Hub messages waiting for the relay's connection; past this the oldest are dropped (and counted).
RELAY_MAX = 10_000
#: Bodies being put together from parts at once (parts of one body arrive together: this is a bound, not a need).
PARTIAL_MAX = 64
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 10.0


_json = msgspec.json.Encoder()


def encode(origin: str, seq: int, body: dict[str, Any]) -> list[str]:
    """One body as notification payloads: ``origin:seq:k:n:`` and the k-th of n parts of its JSON (UTF-8, each
    part at most :data:`PART_MAX` bytes, never cut inside a character)."""
    data = _json.encode(body)  # msgspec: the stdlib's json was a good part of a commit's time in the writer
    parts: list[str] = []
    i = 0
    while i < len(data):
        j = min(i + PART_MAX, len(data))
        while j < len(data) and data[j] & 0xC0 == 0x80:  # a continuation byte: end the part before its character
            j -= 1
        parts.append(data[i:j].decode())
        i = j
    parts = parts or [""]
    return [f"{origin}:{seq}:{k}:{len(parts)}:{p}" for k, p in enumerate(parts)]


class Assembler:
    """Bodies back from payloads (sans-IO). Its own instance's payloads, and malformed ones (counted), give None."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.malformed = 0
        self._partial: dict[tuple[str, str], list[str | None]] = {}

    def feed(self, payload: str) -> dict[str, Any] | None:
        head = payload.split(":", 4)
        if len(head) != 5 or not head[2].isdigit() or not head[3].isdigit():
            self.malformed += 1
            return None
        origin, seq, k, n, part = head[0], head[1], int(head[2]), int(head[3]), head[4]
        if origin == self.me:
            return None
        if not 0 <= k < n or n > 100_000:
            self.malformed += 1
            return None
        if n == 1:
            return self._body(part)
        key = (origin, seq)
        parts = self._partial.get(key)
        if parts is None:
            if len(self._partial) >= PARTIAL_MAX:
                self._partial.pop(next(iter(self._partial)))
                self.malformed += 1
            parts = self._partial[key] = [None] * n
        if len(parts) != n:
            self.malformed += 1
            return None
        parts[k] = part
        if any(p is None for p in parts):
            return None
        del self._partial[key]
        return self._body("".join(p for p in parts if p is not None))

    def _body(self, text: str) -> dict[str, Any] | None:
        try:
            body = msgspec.json.decode(text)
        except ValueError:  # msgspec.DecodeError is one
            body = None
        if not isinstance(body, dict):
            self.malformed += 1
            return None
        return body


def snapshot_json(s: GatewaySnapshot) -> dict[str, Any]:
    return dataclasses.asdict(s)


def snapshot_of(d: dict[str, Any]) -> GatewaySnapshot:
    d = dict(d)
    d["missing"] = tuple(tuple(r) for r in d["missing"])
    d["open_gaps"] = tuple(tuple(r) for r in d["open_gaps"])
    return GatewaySnapshot(**d)


def board_messages(op: Op, res: Any) -> list[dict[str, Any]]:
    """The console messages an alarm-board op's result makes (as the board broadcasts them)."""
    if isinstance(op, alarms.FeedIncidents) and isinstance(res, alarms.FeedResult):
        return (
            [{"kind": "incident", "incident": i} for i in res.incidents]
            + [{"kind": "group", "group": g} for g in res.groups]
            + [{"kind": "arm_command", "command": c} for c in res.commands]
        )
    if isinstance(op, alarms.IncidentAction) and isinstance(res, dict):
        return [{"kind": "incident", "incident": res}]
    if isinstance(op, alarms.Escalate | alarms.AckMany) and isinstance(res, list):
        return [{"kind": "incident", "incident": i} for i in res if isinstance(i, dict)]
    return []


def _backoff(attempt: int) -> float:
    return random.random() * min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(attempt, 20))


class Peers:
    """This instance's side of the channel: start with :meth:`start` (after the store, before the ingest connects),
    stop with :meth:`stop`."""

    def __init__(
        self, target: Postgres, store: Store, hub: Hub, *, follow: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.target = target
        self.store = store
        self.hub = hub
        self.follow = follow  # the alarm board's escalation timers, for incidents another instance changed
        self.me = secrets.token_hex(6)
        self._seq = itertools.count(1)
        self._asm = Assembler(self.me)
        self._pending: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()
        self.listening = False
        self.reconnects = 0
        self.received = 0
        self.sent = 0
        self.dropped = 0

    # -- lifecycle

    async def start(self, wait_s: float = 10.0) -> None:
        self.store.set_before_commit(self.before_commit)
        self.hub.relay = self.relay
        self._tasks = [
            asyncio.create_task(self._listen(), name="portal.centre.peers.listen"),
            asyncio.create_task(self._send(), name="portal.centre.peers.send"),
        ]
        try:  # listening before this instance serves anyone, so its consoles miss nothing of the others
            async with asyncio.timeout(wait_s):
                await self._listening.wait()
        except TimeoutError:
            log.warning("not listening to the other instances yet (the store's server does not answer); retrying")

    async def stop(self) -> None:
        self.store.set_before_commit(None)
        self.hub.relay = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    def health(self) -> dict[str, Any]:
        return {
            "instance": self.me,
            "listening": self.listening,
            "reconnects": self.reconnects,
            "received": self.received,
            "sent": self.sent,
            "relay_dropped": self.dropped,
            "malformed": self._asm.malformed,
        }

    # -- with the commit (the store's writer thread)

    def before_commit(self, conn: Any, done: list[tuple[Op, Any]]) -> None:
        batches: list[dict[str, Any]] = []
        messages: list[dict[str, Any]] = []
        notices: list[dict[str, Any]] = []
        for op, res in done:
            notice = op.notice(res)
            if notice is not None:
                notices.append({"kind": notice.kind, "data": notice.data})
            if isinstance(res, BatchResult):
                if res.new_events:
                    batches.append(
                        {
                            "site": res.site,
                            "gateway": res.gateway,
                            "events": res.new_events,
                            "snapshot": snapshot_json(res.snapshot),
                        }
                    )
            else:
                messages.extend(board_messages(op, res))
        if not batches and not messages and not notices:
            return
        body: dict[str, Any] = {"batches": batches, "hub": messages}
        if notices:
            body["notices"] = notices
        parts = encode(self.me, next(self._seq), body)
        # every part in one statement: a round trip per part was a transaction's longest wait after its inserts
        conn.execute("SELECT count(pg_notify(?, p)) FROM unnest(?::text[]) AS p", (CHANNEL, parts))

    # -- after it (the event loop)

    def relay(self, message: dict[str, Any]) -> None:
        """The hub's relay: queue a message for the other instances (never waits)."""
        if len(self._pending) >= RELAY_MAX:
            self._pending.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "%d console messages not told to the other instances (the store's server is away)", self.dropped
                )
        self._pending.append(message)
        self._wake.set()

    async def _connect(self) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(self.target.dsn, autocommit=True, **connect_args(self.target))

    async def _send(self) -> None:
        import psycopg

        attempt = 0
        while True:
            try:
                async with await self._connect() as conn:
                    attempt = 0
                    while True:
                        await self._wake.wait()
                        self._wake.clear()
                        while self._pending:
                            msgs = list(self._pending)
                            parts = encode(self.me, next(self._seq), {"batches": [], "hub": msgs})
                            async with conn.transaction():
                                for part in parts:
                                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, part))
                            for _ in msgs:
                                self._pending.popleft()
                            self.sent += len(msgs)
            except (psycopg.Error, OSError) as e:
                log.warning("telling the other instances failed: %s; connecting again", str(e).strip()[:200])
            await asyncio.sleep(_backoff(attempt))
            attempt += 1

    async def _listen(self) -> None:
        import psycopg

        attempt = 0
        while True:
            try:
                async with await self._connect() as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if self._listening.is_set():  # back after a break: what was sent meanwhile is lost to us
                        self.reconnects += 1
                        n = self.hub.kick_all("missed news of the other instances", peers=False)
                        log.warning("listening to the other instances again; %d consoles told to catch up", n)
                        self.store.peer_committed([(PeerCommit(), MISSED)])
                    self.listening = True
                    self._listening.set()
                    attempt = 0
                    async for note in conn.notifies():
                        body = self._asm.feed(note.payload)
                        if body is not None:
                            self.received += 1
                            self.dispatch(body)
            except (psycopg.Error, OSError) as e:
                if self.listening:
                    log.warning("lost the other instances' news: %s; connecting again", str(e).strip()[:200])
            self.listening = False
            await asyncio.sleep(_backoff(attempt))
            attempt += 1

    def dispatch(self, body: dict[str, Any]) -> None:
        """Apply one body another instance sent; a malformed part is counted and skipped, never raised."""
        for b in body.get("batches") or []:
            try:
                res = BatchResult(
                    str(b["site"]), str(b["gateway"]), [], list(b["events"]), 0, [], [], [], snapshot_of(b["snapshot"])
                )
            except (KeyError, TypeError, ValueError):
                self._asm.malformed += 1
                continue
            self.store.peer_committed([(PeerCommit(), res)])
            self.hub.broadcast_events(res.new_events)
        for n in body.get("notices") or []:
            if not (isinstance(n, dict) and isinstance(n.get("kind"), str) and isinstance(n.get("data"), dict)):
                self._asm.malformed += 1
                continue
            self.store.peer_committed([(PeerCommit(), Notice(n["kind"], n["data"]))])
        for m in body.get("hub") or []:
            if not isinstance(m, dict):
                self._asm.malformed += 1
                continue
            if m.get("kind") == "incident" and isinstance(m.get("incident"), dict) and self.follow is not None:
                try:
                    self.follow(m["incident"])
                except (KeyError, TypeError, ValueError):
                    self._asm.malformed += 1
                    continue
            self.hub.apply_peer(m)
