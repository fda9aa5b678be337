"""QR readers on a serial line: each scanned code arrives as one line of text, turned into
:class:`devices.events.Scan`, and reader supervision into :class:`devices.events.Availability`.

The line protocol (documented in ``docs/profiles.md``, "QR readers"):

* a line is printable ASCII (0x20-0x7E) ended by CR, CR LF or LF, at most :data:`MAX_LINE` bytes;
  a longer run is refused and skipped up to the next terminator, a line with any other byte is
  refused whole. Both are counted and never decoded. Empty lines are ignored.
* one reader on the line: the line is the scanned text. Several readers on one RS-485 line: every
  line starts with ``@<address>:`` (decimal 0-255); a line without it, or for an address no reader
  here has, is refused and counted.
* heartbeat (readers with ``heartbeat_s``): the driver sends ``@<address>?`` (a lone reader: ``?``)
  and CR LF every ``heartbeat_s``; the reader answers ``@<address>!`` (``!``). Any line from a reader
  counts as an answer; ``offline_after_misses`` unanswered heartbeats in a row make it offline.
  Readers without a heartbeat are offline only while the port cannot be opened.

The framing is sans-IO (:class:`LineFramer`, :func:`parse_line`); :class:`QrReaderLine` runs it on a
:class:`devices.serial_line.SerialLine` (a device path, a pseudo-terminal, a pyserial URL).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from devices.events import Availability, Scan
from devices.serial_line import LineDriver, SerialLine, SerialLineDown

log = logging.getLogger(__name__)

#: Longest line (without its terminator) a reader may send; a pass is at most 512 characters.
MAX_LINE = 512
_PRINTABLE = re.compile(rb"[\x20-\x7e]+")
_ADDRESSED = re.compile(rb"@([0-9]{1,3}):(.*)", re.DOTALL)
_HEARTBEAT = re.compile(rb"(?:@([0-9]{1,3}))?!")

STAT_KEYS = (
    "lines",  # good lines (scans and heartbeat answers)
    "scans",  # Scan events emitted
    "heartbeats",  # heartbeat answers received
    "polls_sent",
    "polls_lost",  # a heartbeat poll that could not be written (port closed)
    "rejected_overlong",
    "rejected_garbage",  # a byte outside printable ASCII
    "rejected_unaddressed",  # no @address: prefix on a multi-drop line
    "rejected_unknown_address",
    "garbage_bytes",  # bytes of refused lines
    "bytes_in",
    "opens",
    "losses",
)


# ---------------------------------------------------------------- framing (sans-IO)


@dataclass(frozen=True, slots=True)
class Line:
    """A complete line of printable ASCII, without its terminator."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Literal["overlong", "garbage"]
    nbytes: int
    sample: bytes  # the first bytes, for the log


class LineFramer:
    """Cuts a byte stream into lines ended by CR, CR LF or LF. A line longer than ``max_len`` is refused
    (and not kept: memory stays bounded whatever arrives); a line holding a byte that is not printable
    ASCII is refused. Nothing is decoded here."""

    def __init__(self, max_len: int = MAX_LINE) -> None:
        if max_len < 1:
            raise ValueError("max_len must be positive")
        self.max_len = max_len
        self._buf = bytearray()
        self._overlong = False
        self._dropped = 0
        self._sample = b""
        self._after_cr = False

    def reset(self) -> None:
        self._buf.clear()
        self._overlong = False
        self._dropped = 0
        self._after_cr = False

    def feed(self, data: bytes) -> list[Line | Refused]:
        out: list[Line | Refused] = []
        n = len(data)
        i = 0
        if self._after_cr and n:
            self._after_cr = False
            if data[0] == 0x0A:
                i = 1  # the LF of a CR LF split across two reads
        while i < n:
            cr, lf = data.find(b"\r", i), data.find(b"\n", i)
            j = lf if cr < 0 else cr if lf < 0 else min(cr, lf)
            end = n if j < 0 else j
            if self._overlong:
                self._dropped += end - i
            elif len(self._buf) + (end - i) > self.max_len:
                self._overlong = True
                self._sample = bytes(self._buf[:16]) if self._buf else bytes(data[i : i + 16])
                self._dropped = len(self._buf) + (end - i)
                self._buf.clear()
            else:
                self._buf += data[i:end]
            if j < 0:
                break
            if self._overlong:
                out.append(Refused("overlong", self._dropped, self._sample))
                self._overlong, self._dropped = False, 0
            elif self._buf:
                raw = bytes(self._buf)
                self._buf.clear()
                out.append(Line(raw) if _PRINTABLE.fullmatch(raw) else Refused("garbage", len(raw), raw[:16]))
            if data[j] == 0x0D:
                if j + 1 < n:
                    if data[j + 1] == 0x0A:
                        j += 1
                else:
                    self._after_cr = True
            i = j + 1
        return out


@dataclass(frozen=True, slots=True)
class Parsed:
    """A good line taken apart: who sent it (None: no address) and whether it is a heartbeat answer."""

    address: int | None
    heartbeat: bool
    text: str


def parse_line(data: bytes, addressed: bool) -> Parsed | str:
    """A validated line (printable ASCII) as :class:`Parsed`, or why it is refused
    (``"unaddressed"``). On an unaddressed line everything but a lone ``!`` is scanned text."""
    hb = _HEARTBEAT.fullmatch(data)
    if addressed:
        if hb is not None and hb.group(1) is not None:
            return Parsed(int(hb.group(1)), True, "")
        m = _ADDRESSED.fullmatch(data)
        if m is None:
            return "unaddressed"
        return Parsed(int(m.group(1)), False, m.group(2).decode("ascii"))
    if data == b"!":
        return Parsed(None, True, "")
    return Parsed(None, False, data.decode("ascii"))


def poll_bytes(address: int | None) -> bytes:
    """The heartbeat poll for a reader: ``@<address>?`` or, on an unaddressed line, ``?``; CR LF ended."""
    return (b"?" if address is None else b"@%d?" % address) + b"\r\n"


# ---------------------------------------------------------------- the driver


@dataclass(frozen=True, slots=True)
class ReaderSpec:
    """One reader on a line. ``address`` None: the only reader, unaddressed. ``heartbeat_s`` None: not polled."""

    name: str
    address: int | None = None
    heartbeat_s: float | None = None
    offline_after_misses: int = 3

    def __post_init__(self) -> None:
        if self.address is not None and not 0 <= self.address <= 255:
            raise ValueError(f"reader {self.name!r}: address {self.address} is not 0-255")
        if self.heartbeat_s is not None and self.heartbeat_s <= 0:
            raise ValueError(f"reader {self.name!r}: heartbeat_s must be positive")
        if self.offline_after_misses < 1:
            raise ValueError(f"reader {self.name!r}: offline_after_misses must be at least 1")


@dataclass(slots=True)
class _Reader:
    spec: ReaderSpec
    state: Literal["unknown", "online", "offline"] = "unknown"
    misses: int = 0
    polled: bool = False  # a poll is out and no line has come since
    next_poll: float = 0.0


class QrReaderLine(LineDriver[Line | Refused]):
    """One serial line with one reader, or several addressed readers (RS-485). An async context manager:
    enter starts ``qr[<name>].read`` and ``qr[<name>].supervise``, exit stops them and closes the port.

    ``on_event`` gets each :class:`Scan` and :class:`Availability` synchronously, on the event loop, as
    soon as the line is complete (it should not block). ``clock`` stamps events and drives heartbeats;
    tests inject one, pass a long ``check_interval`` and call :meth:`heartbeat` themselves.
    """

    def __init__(
        self,
        name: str,
        url: str,
        readers: Sequence[ReaderSpec],
        on_event: Callable[[Scan | Availability], object],
        *,
        baudrate: int = 9600,
        check_interval: float = 0.25,
        reconnect_min: float = 0.2,
        reconnect_max: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not readers:
            raise ValueError(f"line {name!r}: no readers")
        addresses = [r.address for r in readers]
        if len(readers) > 1 and (None in addresses or len(set(addresses)) != len(addresses)):
            raise ValueError(f"line {name!r}: readers sharing a line need distinct addresses")
        if len({r.name for r in readers}) != len(readers):
            raise ValueError(f"line {name!r}: duplicate reader names")
        if check_interval <= 0:
            raise ValueError("check_interval must be positive")
        self.name = name
        self.url = url
        self._on_event = on_event
        self._clock = clock
        self._check_interval = check_interval
        self._addressed = any(a is not None for a in addresses)
        self._readers = [_Reader(r) for r in readers]
        self._by_address = {r.spec.address: r for r in self._readers}
        self._label = f"qr[{name}]"
        self._framer = LineFramer()
        super().__init__(
            SerialLine(
                url,
                self._framer,
                self._handle,
                label=self._label,
                on_state=self._port_state,
                baudrate=baudrate,
                reconnect_min=reconnect_min,
                reconnect_max=reconnect_max,
            ),
            STAT_KEYS,
        )
        self._warned: dict[str, float] = {}

    # ------------------------------------------------------------ state

    @property
    def readers(self) -> list[str]:
        return [r.spec.name for r in self._readers]

    def availability(self) -> dict[str, str]:
        return {r.spec.name: r.state for r in self._readers}

    # ------------------------------------------------------------ supervision

    def heartbeat(self) -> None:
        """Judge the readers whose poll is due (one more miss if the last poll went unanswered) and poll
        them again. The supervise task calls this every ``check_interval``."""
        now = self._clock()
        for r in self._readers:
            hb = r.spec.heartbeat_s
            if hb is None or now < r.next_poll:
                continue
            if r.polled:
                r.misses += 1
                if r.misses >= r.spec.offline_after_misses:
                    self._set_state(r, "offline", f"{r.misses} heartbeats unanswered")
            r.next_poll = now + hb
            try:
                self._line.write(poll_bytes(r.spec.address))
            except SerialLineDown:
                self._counts["polls_lost"] += 1
                continue
            r.polled = True
            self._counts["polls_sent"] += 1

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval)
            try:
                self.heartbeat()
            except Exception:
                log.exception("%s: supervision failed", self._label)

    def _set_state(self, r: _Reader, state: Literal["online", "offline"], reason: str) -> None:
        if r.state == state:
            return
        r.state = state
        (log.info if state == "online" else log.warning)(
            "%s: reader %s %s (%s)", self._label, r.spec.name, state, reason
        )
        self._emit(Availability(r.spec.name, state, self._clock(), reason))

    def _port_state(self, is_open: bool, detail: str) -> None:
        now = self._clock()
        for r in self._readers:
            if not is_open:
                r.polled = False
                self._set_state(r, "offline", f"serial port {detail}")
            elif r.spec.heartbeat_s is None:
                self._set_state(r, "online", "serial port open")
            else:
                r.next_poll = now  # ask at once; the answer brings it online

    # ------------------------------------------------------------ lines

    def _emit(self, event: Scan | Availability) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("%s: event consumer failed on %r", self._label, event)

    def _refuse(self, reason: str, nbytes: int, sample: bytes) -> None:
        self._counts[f"rejected_{reason}"] += 1
        self._counts["garbage_bytes"] += nbytes
        now = self._clock()
        last = self._warned.get(reason)
        level = logging.DEBUG if last is not None and now - last < 60.0 else logging.WARNING
        if level == logging.WARNING:
            self._warned[reason] = now
        log.log(level, "%s: refused a line (%s, %d bytes, starting %r)", self._label, reason, nbytes, sample[:16])

    def _handle(self, item: Line | Refused) -> None:
        if isinstance(item, Refused):
            self._refuse(item.reason, item.nbytes, item.sample)
            return
        parsed = parse_line(item.data, self._addressed)
        if isinstance(parsed, str):
            self._refuse(parsed, len(item.data), item.data)
            return
        reader = self._by_address.get(parsed.address)
        if reader is None:
            self._refuse("unknown_address", len(item.data), item.data)
            return
        now = self._clock()
        self._counts["lines"] += 1
        reader.polled = False
        reader.misses = 0
        self._set_state(reader, "online", "heard")
        if parsed.heartbeat:
            self._counts["heartbeats"] += 1
            return
        self._counts["scans"] += 1
        self._emit(Scan(self.name, reader.spec.name, parsed.text, now))
