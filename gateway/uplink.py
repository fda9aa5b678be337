"""The uplink: the outbox drained to the portal over MQTT, commands taken in.

The broker's PUBACK is not the end of an event's journey: an outbox row is forgotten only when the
portal has stored the event and said so on the ``ack`` topic. Until then the event is re-sent: alone,
``resend_after_s`` after its send once something sent later was acknowledged (the broker, which keeps
order, dropped it: copies of what follows it would only queue behind the originals and push out, from a
broker queue that is full, events that are not copies); everything unacknowledged once acks have
stopped that long (a portal still acknowledging is working through a backlog), backing off while
nothing is acknowledged; and from the start of the outbox after every reconnect. The portal's ingest is
idempotent by event id, and the ack of an earlier copy of an event due to be sent again counts.

At most ``window`` events are in flight unacknowledged, so a portal that is away does not make the
gateway push its whole backlog into a broker that would drop it. The broker's queue for the portal is
bounded in messages (Mosquitto's ``max_queued_messages``, 1000 by default, shared by every gateway of the
site), and an event may ride alone in a message; so the window adapts: it halves when the broker is seen
dropping (events acknowledged by the portal while events sent before them, or just before the acks that
came, never were), at most once per window of data, and grows back by one event for each window's worth
of events acknowledged while the window, not the events, was the limit, up to the configured ``window``.
While the portal is silent, only the oldest batch is re-sent (a probe), never copies of the whole window
into a queue that is full.
Reconnects live here and only here, with capped exponential backoff and full jitter, reset after a
connection that worked.

The outbox is read in two lanes, each in seq order with a cursor of its own: urgent events (alarms,
tamper: priority ``store.URGENT_PRIORITY`` and up) take any room in the window first, so a burst of
routine door events does not hold an alarm back; the portal sees a gap in the seqs meanwhile.

Alarms do not wait for the disk: the store hands an urgent event over (:meth:`Uplink.send_now`) as soon as it is
journaled, before its commit, and it is published at once and counted in flight; when its row then appears in the
outbox it is not sent again. The portal's ack of it goes to the store's queue behind the event's own transaction,
so the outbox row is deleted only after it was committed.

The retained status says "online" and carries the store's fault (a full disk) while it lasts: the
fault cannot wait in an outbox that cannot be written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from common import mqtt
from common.backoff import backoff_delays
from common.tasks import cancel_and_wait, run_until_first_ends
from gateway import __version__, wire
from gateway.config import FileError, GatewayConfig, mqtt_password, mqtt_tls_context
from gateway.store import Store

log = logging.getLogger(__name__)

#: Called with each payload received on the command topic, unverified (gateway.commands verifies it).
CommandHandler = Callable[[bytes], Awaitable[None]]

#: Batches published and not yet PUBACKed at once. More would only queue inside paho while the broker
#: is slow (or dropping for an absent portal), and a resend would then wait behind stale copies.
MAX_PUBLISHES = 32

#: Routine outbox rows read at once when looking past those still in flight.
_SCAN = 200

#: The least the adaptive window shrinks to (events), whatever the broker drops.
MIN_WINDOW = 20


@dataclass
class UplinkStats:
    connected: bool = False
    connects: int = 0
    batches_sent: int = 0
    events_sent: int = 0
    resends: int = 0
    acks: int = 0
    commands: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    last_ack_mono: float | None = None
    urgent_sent: int = 0
    fast_sent: int = 0  # urgent events published before their commit
    lost_resent: int = 0  # events re-sent alone because something sent after them was acknowledged
    late_acks: int = 0  # acks of an earlier copy of an event that was due to be sent again
    ignored_acks: int = 0  # seqs acknowledged that were not sent on this connection (forged, or from before)
    command_errors: int = 0
    resent_events: int = 0  # events sent again, by either kind of re-send
    in_flight: int = 0  # events sent and not acknowledged (at the last change)
    window: int = 0  # the adaptive window now (events)
    window_shrinks: int = 0  # times the broker was seen dropping and the window halved


class _PahoLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """paho's log, its socket errors at WARNING: a broker that went away (or stopped with us) is a lost connection
    the uplink reports itself, once, as a WARNING, not an ERROR for someone to chase. Errors with a traceback (an
    unexpected message id in aiomqtt) stay ERRORs."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level == logging.ERROR and not kwargs.get("exc_info"):
            level = logging.WARNING
        super().log(level, msg, *args, **kwargs)


_MQTT_LOG = _PahoLog(logging.getLogger("gateway.mqtt"), {})


def _take_disconnect_error(client: aiomqtt.Client) -> None:
    """aiomqtt keeps a lost connection's error in a future that only its message iterator reads; when the uplink is
    stopped before it did (the broker went down in the same moment), take it here, or asyncio logs it at ERROR as
    "Future exception was never retrieved" when the future is collected."""
    fut = getattr(client, "_disconnected", None)
    if isinstance(fut, asyncio.Future) and fut.done() and not fut.cancelled():
        fut.exception()


class Uplink:
    def __init__(
        self,
        cfg: GatewayConfig,
        store: Store,
        on_command: CommandHandler | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.on_command = on_command
        self.stats = UplinkStats()
        self._clock = clock
        self._delay = backoff_delays(cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s, rng)
        self._t_events = wire.topic(cfg.site, cfg.gateway, "events")
        self._t_ack = wire.topic(cfg.site, cfg.gateway, "ack")
        self._t_cmd = wire.topic(cfg.site, cfg.gateway, "cmd")
        self._t_status = wire.topic(cfg.site, cfg.gateway, "status")
        self._inflight: dict[int, tuple[float, bool]] = {}  # seq -> (monotonic time sent, urgent lane)
        # Sent on this connection, unacknowledged, and due to be sent again (seq -> urgent lane): an earlier copy may
        # still reach the portal, and its ack counts.
        self._rewound: dict[int, bool] = {}
        # When each event sent again was first sent on this connection: its ack may be the original's (an ack does
        # not say which copy arrived), so only that time says what the broker delivered in order.
        self._first_sent: dict[int, float] = {}
        self._acked_sent_last = float("-inf")  # the latest send time among the events acknowledged
        self._cursor = 0  # highest routine seq sent on this connection
        self._cursor_urgent = 0  # highest urgent seq sent on this connection
        self._fault = ""  # the store's standing fault, carried in the retained status
        self._status_changed = asyncio.Event()
        # The send loop's one wake-up: a commit that added events, an ack (room in the window), a new connection.
        self._wake = asyncio.Event()
        store.on_commit = self._wake.set
        self._logged_reasons: set[str] = set()
        self._client: aiomqtt.Client | None = None
        self._serving = False  # connected, subscribed, and the outbox is being sent
        self._acked_early: set[int] = set()  # urgent seqs the portal acknowledged before their commit
        # The urgent lane must be read up to here: what was not handed over before its commit (the store's
        # last_unhanded_seq), and everything after a reconnect or a re-send.
        self._urgent_goal = 0
        self._closing = False  # close() began: nothing more is published but the "offline" status
        self._publishes: set[asyncio.Task[None]] = set()
        # The adaptive window (module docstring): its size, the send time before which a drop was already
        # answered by a halving, events acknowledged towards the next growth, and whether the window was the limit.
        self.stats.window = cfg.uplink.window
        self._shrunk_before = float("-inf")
        self._resent_at = float("-inf")  # when the last re-send for silence was made (one per resend_after)
        self._grow_credit = 0
        self._window_full = False

    # ------------------------------------------------------------ connection

    def _client_for(self) -> aiomqtt.Client:
        """A client as the config says; :class:`~gateway.config.FileError` when a file it names cannot be used."""
        m = self.cfg.mqtt
        offline = wire.encode(wire.Status(v=wire.SCHEMA_VERSION, state="offline"))
        return mqtt.Client(
            m.host,
            m.port,
            username=m.username,
            password=mqtt_password(m),
            identifier=f"gatehouse-{self.cfg.site}-{self.cfg.gateway}",
            clean_session=False,
            will=aiomqtt.Will(self._t_status, offline, qos=1, retain=True),
            keepalive=m.keepalive_s,
            tls_context=mqtt_tls_context(m),
            timeout=10,
            max_inflight_messages=MAX_PUBLISHES,
            logger=_MQTT_LOG,  # type: ignore[arg-type]
        )

    async def run(self) -> None:
        """Connect, serve, reconnect; until cancelled. The client is made anew for each attempt, inside the retry: a
        password or certificate file that goes missing or wrong while the gateway runs (checked at start-up) is
        logged once and retried with the backoff, like a broker that is away, never the end of the daemon."""
        attempt = 0
        file_error = ""
        while True:
            started = self._clock()
            mqtt_client: aiomqtt.Client | None = None
            try:
                mqtt_client = self._client_for()
                file_error = ""
                async with mqtt_client as client:
                    self._client = client
                    self.stats.connected = True
                    self.stats.connects += 1
                    log.info("uplink connected to %s:%d", self.cfg.mqtt.host, self.cfg.mqtt.port)
                    await self._serve(client)
            except FileError as e:
                if str(e) != file_error:
                    file_error = str(e)
                    log.error("uplink cannot connect: %s; retrying", e)
            except aiomqtt.MqttError as e:
                if self.stats.connected or attempt == 0:
                    log.warning("uplink to %s:%d down: %s", self.cfg.mqtt.host, self.cfg.mqtt.port, e)
            finally:
                self._client = None
                self.stats.connected = False
                if mqtt_client is not None:
                    _take_disconnect_error(mqtt_client)
            # A connection that lived a while resets the backoff.
            attempt = 0 if self._clock() - started > 10 else attempt + 1
            await asyncio.sleep(self._delay(attempt))

    async def close(self) -> None:
        """Say "offline" (retained) before a clean shutdown; the last will covers the unclean one. Events are no
        longer published from here on (they stay in the outbox for the next start)."""
        self._closing = True
        client = self._client
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                payload = wire.encode(wire.Status(v=wire.SCHEMA_VERSION, state="offline", ts=wire.utcnow()))
                await client.publish(self._t_status, payload, qos=1, retain=True, timeout=2)

    def set_fault(self, fault: str | None) -> None:
        """The store's fault changed (None: cleared); the retained status says so at once when connected."""
        fault = (fault or "")[:500]
        if fault != self._fault:
            self._fault = fault
            self._status_changed.set()

    def _online(self) -> bytes:
        return wire.encode(
            wire.Status(v=wire.SCHEMA_VERSION, state="online", ts=wire.utcnow(), version=__version__, fault=self._fault)
        )

    async def _status_loop(self, client: aiomqtt.Client) -> None:
        while True:
            await self._status_changed.wait()
            self._status_changed.clear()
            await client.publish(self._t_status, self._online(), qos=1, retain=True)

    async def _serve(self, client: aiomqtt.Client) -> None:
        client.pending_calls_threshold = 2 * MAX_PUBLISHES  # aiomqtt warns past this; we never get there
        self._inflight.clear()
        self._rewound.clear()
        self._first_sent.clear()
        self._cursor = self._cursor_urgent = 0
        await client.subscribe([(self._t_ack, 1), (self._t_cmd, 1)])
        self._status_changed.clear()
        await client.publish(self._t_status, self._online(), qos=1, retain=True)
        self._acked_early.clear()
        self._urgent_goal = self.store.last_urgent_seq
        self._wake.set()  # whatever is in the outbox goes out now
        name = f"gateway[{self.cfg.gateway}].uplink"
        self._serving = True
        try:
            # A lost connection surfaces as the MqttError of one of them.
            await run_until_first_ends(
                name,
                [
                    asyncio.create_task(self._receive(client), name=f"{name}.receive"),
                    asyncio.create_task(self._send(client), name=f"{name}.send"),
                    asyncio.create_task(self._status_loop(client), name=f"{name}.status"),
                ],
            )
        finally:
            self._serving = False
            await cancel_and_wait(
                "uplink publishes", list(self._publishes)
            )  # each an aiomqtt publish: see common.tasks

    def send_now(self, rows: list[tuple[int, bytes]]) -> bool:
        """Publish urgent events (seq, encoded event) before their commit; True if they went out. While the link is
        down they simply wait for the outbox. Never blocks."""
        client = self._client
        if client is None or not self._serving or self._closing or not rows:
            return False
        now = self._clock()
        for seq, _ in rows:
            self._inflight[seq] = (now, True)
            self._resent(self._rewound.pop(seq, None))
        self._note_in_flight()
        self.stats.urgent_sent += len(rows)
        self.stats.fast_sent += len(rows)
        self.stats.batches_sent += 1
        self.stats.events_sent += len(rows)
        task = asyncio.create_task(
            self._publish_one(client, self._frame(rows)), name=f"gateway[{self.cfg.gateway}].uplink.publish-now"
        )
        self._publishes.add(task)
        task.add_done_callback(self._publishes.discard)
        return True

    # ------------------------------------------------------------ sending

    async def _send(self, client: aiomqtt.Client) -> None:
        up = self.cfg.uplink
        resend_after = up.resend_after_s
        publishes: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(MAX_PUBLISHES)
        try:
            while True:
                await slots.acquire()
                slots.release()  # only waited for a free slot; _publish takes it
                room = 0 if self._closing else self.stats.window - len(self._inflight)
                rows, urgent = await self._next_rows(min(up.batch_max, room)) if room > 0 else ([], False)
                if rows:
                    await slots.acquire()
                    self._publish(client, rows, urgent, publishes, slots)
                    continue
                # Nothing to send now: wait for new events, an ack (room in the window), or a resend.
                self._wake.clear()
                if room > 0:
                    # Re-check after clearing, in case a commit landed between the read and the clear.
                    rows, _ = await self._next_rows(1)
                    if rows:
                        continue
                woken = True
                try:
                    async with asyncio.timeout(self._resend_due(resend_after)):
                        await self._wake.wait()
                except TimeoutError:
                    woken = False
                if not woken and self._inflight:
                    oldest = min(t for t, _ in self._inflight.values())
                    if oldest < self._acked_sent_last:
                        # Something sent after these was acknowledged: the broker dropped them. Send only them
                        # again; what was sent after them is still on its way, and a copy would only queue
                        # behind it (and push out, in a broker queue that is full, what is not a copy).
                        lost = self._lost(resend_after)  # empty if the timer woke us a moment early
                        if lost:
                            self.stats.resends += 1
                            self.stats.lost_resent += len(lost)
                            log.debug("uplink: %d events dropped on the way, re-sending them", len(lost))
                            self._dropped(lost)
                            self._rewind(lost)
                    else:
                        # Nothing acknowledged for a while. If the portal acknowledged after the oldest of these was
                        # sent, in order, then fell silent, the broker dropped what was sent before that ack (its queue
                        # for the portal was full): send those again. Otherwise the portal is away, and what is in
                        # flight waits in the broker's queue, or was dropped from it: send one batch, the oldest, as
                        # a probe (its ack, or the ack of anything newer, tells what the broker lost), not copies of
                        # the whole window into a queue that is full. Wait longer next time while it stays silent.
                        self.stats.resends += 1
                        last_ack = self.stats.last_ack_mono
                        if last_ack is not None and last_ack > oldest:
                            again = [s for s, (t, _) in self._inflight.items() if t < last_ack]
                            self._dropped(again)
                        else:
                            by_age = sorted(self._inflight, key=lambda s: self._inflight[s][0])
                            again = by_age[: up.batch_max]
                        self._resent_at = self._clock()
                        log.info(
                            "uplink: %d events unacknowledged for %.1f s, re-sending %d",
                            len(self._inflight),
                            resend_after,
                            len(again),
                        )
                        self._rewind(again)
                        resend_after = min(resend_after * 2, up.resend_max_s)
                elif self.stats.last_ack_mono is not None and self._clock() - self.stats.last_ack_mono < 1:
                    resend_after = up.resend_after_s
        finally:
            await cancel_and_wait("uplink sends", publishes)

    async def _next_rows(self, limit: int) -> tuple[list[tuple[int, bytes]], bool]:
        """The next rows to send, urgent lane first; and whether they are urgent. Urgent rows already sent before
        their commit (in flight, or acknowledged already) are passed over."""
        while (
            last_urgent := min(self.store.last_urgent_seq, max(self._urgent_goal, self.store.last_unhanded_seq))
        ) > self._cursor_urgent:
            rows = await self.store.outbox_after(self._cursor_urgent, limit, lane="urgent", upto=last_urgent)
            if not rows:
                self._cursor_urgent = last_urgent  # nothing left in that range: the lane is empty up to there
                break
            fresh = [r for r in rows if r[0] not in self._inflight and r[0] not in self._acked_early]
            if fresh:
                return fresh, True
            self._cursor_urgent = rows[-1][0]
            self._acked_early = {s for s in self._acked_early if s > self._cursor_urgent}
        # Routine rows still in flight (sent after one the broker dropped, which is being sent again) are passed over.
        n = limit
        while self.store.last_routine_seq > self._cursor:
            rows = await self.store.outbox_after(self._cursor, n, lane="routine")
            fresh = [r for r in rows if r[0] not in self._inflight][:limit]
            if fresh or not rows:
                return fresh, False
            self._cursor = rows[-1][0]
            n = max(limit, _SCAN)
        return [], False

    def _lost(self, resend_after: float) -> list[int]:
        """The events in flight that something sent after them overtook (acknowledged), sent ``resend_after`` ago or
        longer: the broker dropped them (it keeps order), or the portal's ack of them is very late."""
        cut = min(self._acked_sent_last, self._clock() - resend_after)
        return [seq for seq, (t, _) in self._inflight.items() if t < cut]

    def _dropped(self, seqs: list[int]) -> None:
        """The broker dropped these in-flight events: halve the window (to no more than half of what was in
        flight), once for all the events sent before the last halving."""
        sent = [self._inflight[s][0] for s in seqs if s in self._inflight]
        if not sent or max(sent) < self._shrunk_before:
            return  # a drop of events sent before the last halving: already answered
        before = self.stats.window
        self.stats.window = max(min(MIN_WINDOW, self.cfg.uplink.window), min(before, len(self._inflight)) // 2)
        self.stats.window_shrinks += 1
        self._shrunk_before = self._clock()
        self._grow_credit = 0
        self._window_full = False
        log.info(
            "uplink: the broker dropped %d events (of %d in flight): window %d -> %d",
            len(seqs),
            len(self._inflight),
            before,
            self.stats.window,
        )

    def _note_in_flight(self) -> None:
        n = len(self._inflight)
        self.stats.in_flight = n
        if n >= self.stats.window:
            self._window_full = True

    def _resent(self, was_rewound: bool | None) -> None:
        if was_rewound is not None:
            self.stats.resent_events += 1

    def _rewind(self, seqs: list[int]) -> None:
        """Send these in-flight events again: each lane's cursor goes back to before the first of them. An urgent one
        sent before its commit is read again from the outbox once committed (the urgent lane is read up to
        ``_urgent_goal``), not before."""
        urgent = [seq for seq in seqs if self._inflight.get(seq, (0.0, False))[1]]
        # Never lowered here: an urgent event taken back by an earlier re-send may still wait for its commit.
        self._urgent_goal = max([self._urgent_goal, self.store.last_urgent_seq, *urgent])
        for seq in seqs:
            sent, lane_urgent = self._inflight.pop(seq)
            self._first_sent.setdefault(seq, sent)
            self._rewound[seq] = lane_urgent
            if lane_urgent:
                self._cursor_urgent = min(self._cursor_urgent, seq - 1)
            else:
                self._cursor = min(self._cursor, seq - 1)
        self.stats.in_flight = len(self._inflight)

    def _publish(
        self,
        client: aiomqtt.Client,
        rows: list[tuple[int, bytes]],
        urgent: bool,
        publishes: set[asyncio.Task[None]],
        slots: asyncio.Semaphore,
    ) -> None:
        payload = self._frame(rows)
        now = self._clock()
        for seq, _ in rows:
            self._inflight[seq] = (now, urgent)
            self._resent(self._rewound.pop(seq, None))
        self._note_in_flight()
        if urgent:
            self._cursor_urgent = rows[-1][0]
            self.stats.urgent_sent += len(rows)
        else:
            self._cursor = rows[-1][0]
        self.stats.batches_sent += 1
        self.stats.events_sent += len(rows)
        task = asyncio.create_task(
            self._publish_one(client, payload), name=f"gateway[{self.cfg.gateway}].uplink.publish"
        )
        publishes.add(task)
        task.add_done_callback(publishes.discard)
        task.add_done_callback(lambda _: slots.release())

    def _frame(self, rows: list[tuple[int, bytes]]) -> bytes:
        """The stored bodies are already encoded wire.Events: frame them into a batch without re-encoding."""
        return wire.encode_framed(self.cfg.site, self.cfg.gateway, [body for _, body in rows])

    async def _publish_one(self, client: aiomqtt.Client, payload: bytes) -> None:
        try:
            await client.publish(self._t_events, payload, qos=1)
        except aiomqtt.MqttError as e:
            # The connection is going down; the receive loop notices and the outbox is re-sent after reconnect.
            log.debug("publish failed: %s", e)

    # ------------------------------------------------------------ receiving

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            topic = str(msg.topic)
            payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else b""
            try:
                if topic == self._t_ack:
                    self._on_ack(wire.decode_ack(bytes(payload)))
                elif topic == self._t_cmd:
                    await self._on_command(bytes(payload))
            except wire.WireError as e:
                self._reject(topic, e.reason, str(e))

    def _reject(self, topic: str, reason: str, detail: str) -> None:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        key = f"{topic}:{reason}"
        if key not in self._logged_reasons:
            self._logged_reasons.add(key)
            log.warning("uplink: rejected a message on %s: %s (further ones are only counted)", topic, detail)

    def _resend_due(self, resend_after: float) -> float | None:
        """Seconds until the unacknowledged events are re-sent (None: nothing in flight).

        The oldest is re-sent ``resend_after`` after its send when something sent after it was acknowledged
        (the broker dropped it); otherwise only once acks have stopped for ``resend_after``: a portal working
        through a backlog is busy, not lost, and copies of the window would only bury it.
        """
        oldest = min((t for t, _ in self._inflight.values()), default=None)
        if oldest is None:
            return None
        since = oldest
        if self._acked_sent_last <= oldest:
            # Nothing sent after these was acknowledged: wait for acks to stop that long, and no more than one
            # re-send (a probe, while the portal is silent) per resend_after.
            since = max(oldest, self._resent_at, self.stats.last_ack_mono or oldest)
        return max(0.0, since + resend_after - self._clock())

    def _on_ack(self, ack: wire.Ack) -> None:
        """Forget what the portal says it stored, of what this gateway sent and awaits an ack for. An ack naming
        events not sent (yet) forgets nothing: acks are not signed, and one naming every seq to come, published
        by whoever holds the portal's broker password, would otherwise drop each new event, alarms included, from
        the outbox as it is committed, before it ever left. (A late ack for a send before a reconnect is dropped
        too; the event is sent again and the portal stores it once.)"""
        acked = []
        for s in ack.seqs:
            sent = self._inflight.pop(s, None)
            first = self._first_sent.pop(s, None)
            if sent is not None:
                self._acked_sent_last = max(self._acked_sent_last, sent[0] if first is None else first)
            elif s in self._rewound:  # an earlier copy arrived: which send it was is unknown
                sent = (float("-inf"), self._rewound.pop(s))
                self.stats.late_acks += 1
            else:
                self.stats.ignored_acks += 1
            if sent is not None:
                acked.append(s)
                if sent[1] and s > self._cursor_urgent:
                    self._acked_early.add(s)  # sent before its commit: when its row appears, do not send it again
        self.store.acknowledge(acked)
        self.stats.acks += len(acked)
        self.stats.last_ack_mono = self._clock()
        self.stats.in_flight = len(self._inflight)
        self._grow(len(acked))
        self._wake.set()

    def _grow(self, acked: int) -> None:
        """Each window's worth of events acknowledged while the window was full (the window, not the events,
        limited the sending) opens it by one event, up to the configured window: back to where the broker
        dropped only slowly."""
        ceiling = self.cfg.uplink.window
        if self.stats.window >= ceiling or not self._window_full:
            return
        self._grow_credit += acked
        if self._grow_credit >= self.stats.window:
            self._grow_credit = 0
            self._window_full = len(self._inflight) >= self.stats.window
            self.stats.window += 1

    async def _on_command(self, payload: bytes) -> None:
        self.stats.commands += 1
        if self.on_command is not None:
            try:
                await self.on_command(payload)
            except Exception:  # a failing command must not take the uplink (and the gateway) down with it
                self.stats.command_errors += 1
                log.exception("uplink: a command (%d bytes) failed", len(payload))
