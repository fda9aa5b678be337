"""Contact ID over a serial line: indoor alarm panels (``mode="panel"``) or an alarm receiver's
automation port (``mode="receiver"``), turned into :class:`devices.events.PanelReport` and
:class:`devices.events.Availability`.

Replies on the line (see ``docs/contact-id.md``):

=====================================  ==========  ===================================================
what came in                           reply       effect
=====================================  ==========  ===================================================
a good message (or a resend of one)    ACK 0x06    a PanelReport (``repeat`` when it repeats the previous)
heartbeat (receiver)                   ACK 0x06    keeps the line online
received intact, not understood        ACK 0x06    counted ``rejected_unsupported``, and an Unreadable
                                                   event: resending won't help, so it is lost here
bad checksum                           NAK 0x15    counted; the sender repeats at once
malformed line                         NAK 0x15    counted; the sender repeats at once
over-long line                         nothing     counted; dropped up to the next terminator
=====================================  ==========  ===================================================

A run of :data:`UNREADABLE_AFTER` refused lines with no good one between them (a sender whose every
resend arrives damaged, which gives up after a few) is an Unreadable event too.

Neither framing carries a sequence number, and a sender repeats a message whose ACK it missed.
So a message equal to the previous one, arriving within ``dedupe_window`` seconds of it (the
window slides with each repeat), is reported with ``repeat=True`` (counted ``duplicates``): the
driver knows nothing of alarms, the engine does, and it folds a repeat into the incident still open
or raises it anew when none is (two identical events close together are then one incident, never
none). ``dedupe_window=0`` turns the flag off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Literal, Self

from devices.contact_id import ACK, NAK, CidFramer, Heartbeat, Item, PanelMessage, ReceiverMessage, Rejected
from devices.events import Availability, DeviceEvent, PanelReport, Unreadable
from devices.serial_line import LineDriver, SerialLine, SerialLineDown

log = logging.getLogger(__name__)

Mode = Literal["panel", "receiver"]

#: Receiver heartbeats come about every 30 s; three missed ones make the line offline.
RECEIVER_SILENCE_TIMEOUT = 90.0
#: Refused lines in a row (no good message between) after which what was sent is taken as lost.
UNREADABLE_AFTER = 3

STAT_KEYS = (
    "frames",  # good Contact ID messages, repeats included
    "reports",  # PanelReports emitted, repeats included
    "duplicates",  # repeats of the previous message (reported with repeat=True)
    "unreadable",  # Unreadable events emitted
    "heartbeats",
    "rejected_checksum",
    "rejected_malformed",
    "rejected_overlong",
    "rejected_unsupported",
    "garbage_bytes",  # bytes dropped: rejected lines and the rest of over-long runs
    "acks_sent",
    "naks_sent",
    "replies_lost",  # a reply that could not be written (port closing)
    "bytes_in",
    "opens",
    "losses",
)


class ContactIdLine(LineDriver[Item]):
    """One serial line carrying Contact ID. An async context manager: enter starts the line's tasks
    (``cid[<name>].read`` and ``cid[<name>].supervise``), exit stops them and closes the port.

    ``on_event`` receives every event synchronously (pass ``queue.put_nowait`` to hand them to a
    consumer task). ``silence_timeout`` (seconds without a good message or heartbeat before the
    line is reported offline) defaults to 90 s in receiver mode and to none in panel mode, where
    panels may test only once a day. ``clock`` drives supervision and the duplicate window and
    stamps events; tests inject one and call :meth:`check_supervision`.
    """

    def __init__(
        self,
        name: str,
        url: str,
        on_event: Callable[[DeviceEvent], object],
        *,
        mode: Mode = "panel",
        baudrate: int = 9600,
        bytesize: int = 8,
        parity: str = "N",
        stopbits: int = 1,
        silence_timeout: float | None = None,
        dedupe_window: float = 20.0,
        check_interval: float = 1.0,
        reconnect_min: float = 0.2,
        reconnect_max: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("panel", "receiver"):
            raise ValueError(f"mode must be 'panel' or 'receiver', got {mode!r}")
        if silence_timeout is None and mode == "receiver":
            silence_timeout = RECEIVER_SILENCE_TIMEOUT
        if silence_timeout is not None and silence_timeout <= 0:
            raise ValueError("silence_timeout must be positive")
        if dedupe_window < 0 or check_interval <= 0:
            raise ValueError("dedupe_window must be >= 0 and check_interval > 0")
        self.name = name
        self.mode: Mode = mode
        self._on_event = on_event
        self._clock = clock
        self._silence_timeout = silence_timeout
        self._dedupe_window = dedupe_window
        self._check_interval = check_interval
        self._label = f"cid[{name}]"
        self._framer = CidFramer(mode)
        super().__init__(
            SerialLine(
                url,
                self._framer,
                self._handle,
                label=self._label,
                on_state=self._port_state,
                baudrate=baudrate,
                bytesize=bytesize,
                parity=parity,
                stopbits=stopbits,
                reconnect_min=reconnect_min,
                reconnect_max=reconnect_max,
            ),
            STAT_KEYS,
        )
        self._state: Literal["unknown", "online", "offline"] = "unknown"
        self._last_traffic = clock()
        self._last_key: PanelMessage | ReceiverMessage | None = None
        self._last_key_at = 0.0
        self._warned: dict[str, float] = {}
        self._bad_run = 0  # refused lines since the last good one

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        self._last_traffic = self._clock()
        return await super().__aenter__()

    @property
    def availability(self) -> Literal["unknown", "online", "offline"]:
        return self._state

    def stats(self) -> dict[str, int]:
        """Counters since start; the keys are :data:`STAT_KEYS` (all always present)."""
        out = super().stats()
        out["garbage_bytes"] = self._framer.garbage_bytes
        return out

    # ------------------------------------------------------------ supervision

    def check_supervision(self) -> None:
        """Mark the line offline if it has been silent past ``silence_timeout``. The supervise task
        calls this every ``check_interval`` seconds."""
        if self._silence_timeout is None or self._state == "offline":
            return
        silent_for = self._clock() - self._last_traffic
        if silent_for > self._silence_timeout:
            what = "heartbeat" if self.mode == "receiver" else "message"
            self._set_state("offline", f"no {what} for {silent_for:.0f} s")

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval)
            try:
                self.check_supervision()
            except Exception:
                log.exception("%s: supervision check failed", self._label)

    def _set_state(self, state: Literal["online", "offline"], reason: str) -> None:
        if state == self._state:
            return
        self._state = state
        (log.info if state == "online" else log.warning)("%s: %s (%s)", self._label, state, reason)
        self._emit(Availability(self.name, state, self._clock(), reason))

    def _port_state(self, is_open: bool, detail: str) -> None:
        if not is_open:
            self._set_state("offline", f"serial port {detail}")
        else:
            self._last_traffic = self._clock()  # the silence clock restarts with the port

    def _traffic(self, now: float) -> None:
        self._last_traffic = now
        self._set_state("online", "traffic")

    # ------------------------------------------------------------ frames

    def _emit(self, event: DeviceEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("%s: event consumer failed on %r", self._label, event)

    def _reply(self, data: bytes) -> None:
        try:
            self._line.write(data)
        except SerialLineDown:
            self._counts["replies_lost"] += 1
            return
        self._counts["acks_sent" if data == ACK else "naks_sent"] += 1

    def _handle(self, item: Item) -> None:
        now = self._clock()
        if isinstance(item, Rejected):
            self._rejected(item, now)
        elif isinstance(item, Heartbeat):
            self._bad_run = 0
            self._counts["heartbeats"] += 1
            self._reply(ACK)
            self._traffic(now)
        else:
            self._message(item, now)

    def _message(self, msg: PanelMessage | ReceiverMessage, now: float) -> None:
        self._counts["frames"] += 1
        self._bad_run = 0
        self._reply(ACK)
        self._traffic(now)
        repeat = self._dedupe_window > 0 and msg == self._last_key and now - self._last_key_at <= self._dedupe_window
        if repeat:
            self._counts["duplicates"] += 1
            log.debug("%s: repeat of %r acknowledged again", self._label, msg)
        else:
            self._last_key = msg
        self._last_key_at = now
        self._counts["reports"] += 1
        self._emit(
            PanelReport(
                device=self.name,
                account=msg.account,
                qualifier=msg.qualifier,
                code=msg.code,
                partition=msg.partition,
                zone_or_user=msg.zone,
                mono=now,
                repeat=repeat,
            )
        )

    def _rejected(self, item: Rejected, now: float) -> None:
        self._counts[f"rejected_{item.reason}"] += 1
        self._bad_run += 1
        if item.reason == "unsupported":
            self._reply(ACK)
            self._traffic(now)
        elif item.reason != "overlong":
            self._reply(NAK)
        if item.reason == "unsupported" or self._bad_run >= UNREADABLE_AFTER:
            self._bad_run = 0
            self._counts["unreadable"] += 1
            sample = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in item.sample[:40])
            self._emit(Unreadable(self.name, item.reason, sample, now))
        # One warning per reason per minute; the rest at debug level, all of them counted.
        last = self._warned.get(item.reason)
        level = logging.DEBUG if last is not None and now - last < 60.0 else logging.WARNING
        if level == logging.WARNING:
            self._warned[item.reason] = now
        log.log(
            level, "%s: rejected (%s) %d bytes %r %s", self._label, item.reason, item.nbytes, item.sample, item.detail
        )
