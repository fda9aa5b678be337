"""The seam between drivers and the gateway: typed events out of a device, commands into it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Value = bool | int | float | str


@dataclass(frozen=True, slots=True)
class PointChanged:
    """A point (an input, a register-backed state) took a new value. Reported on change only;
    the first successful read of a point is reported too, with ``initial=True``."""

    device: str
    point: str
    value: Value
    mono: float  # time.monotonic() when the read that saw it completed
    initial: bool = False


@dataclass(frozen=True, slots=True)
class Availability:
    """A device went online or offline (communication lost after N missed polls, or restored)."""

    device: str
    state: Literal["online", "offline"]
    mono: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of a :class:`WritePoint`, matched by ``token``."""

    device: str
    point: str
    token: str
    ok: bool
    mono: float
    detail: str = ""
    #: The point read back after the write: True it holds the value written, False it does not (``ok`` is
    #: then False: the device echoed the write, but the relay did not move), None not read back.
    confirmed: bool | None = None
    #: Why it failed: ``rejected`` (a bad command, never sent), ``not_sent`` (not started within the command's
    #: ``start_within_ms``), ``refused`` (a Modbus exception), ``no_answer``,
    #: ``link_down``, ``not_moved`` (answered, but the read-back differs), ``unconfirmed`` (answered, the
    #: read-back was not); empty when ``ok``.
    failure: str = ""


@dataclass(frozen=True, slots=True)
class PanelReport:
    """One Ademco Contact ID report from an alarm panel or an alarm receiver's automation port,
    already checked (checksum, framing) by the driver. The panel itself decided it was an alarm."""

    device: str  # the serial line or receiver it came in on
    account: str  # the panel's account number (maps to a house)
    qualifier: Literal["new", "restore", "status"]  # Contact ID 1 / 3 / 6 (receiver E / R / P)
    code: int  # three-digit event code, e.g. 130 burglary
    partition: int
    zone_or_user: int
    mono: float
    #: The line saw this same message within its duplicate window: most likely a resend whose ACK the
    #: sender missed, possibly a second event of the same kind. The driver reports it anyway; the engine
    #: decides (it folds into an open incident, and raises anew when none is open).
    repeat: bool = False


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A message a line received but could not use: a bad checksum, a malformed line, an intact line in
    another protocol, an over-long run. Whatever it said (it may have been an alarm) did not arrive."""

    device: str  # the serial line
    reason: str  # checksum, malformed, unsupported, overlong
    sample: str  # the start of what came in, printable ASCII
    mono: float


@dataclass(frozen=True, slots=True)
class DeviceCheck:
    """How a device's settings compare with what its profile says they must be (``expect`` on points),
    reported whenever that changes. ``problems`` is empty when everything is as expected."""

    device: str
    problems: tuple[str, ...]
    mono: float


@dataclass(frozen=True, slots=True)
class Scan:
    """A code read by a QR reader: one line of printable ASCII, already checked by the driver (length,
    characters, address). ``device`` is the serial line, ``reader`` the reader on it."""

    device: str
    reader: str
    text: str
    mono: float  # time.monotonic() when the line was complete


DeviceEvent = PointChanged | Availability | WriteResult | PanelReport | Scan | Unreadable | DeviceCheck


@dataclass(frozen=True, slots=True)
class WritePoint:
    """Set a writable point (a relay, a coil). ``pulse_ms`` asks for a timed pulse where the profile
    supports one (the device's own flash command, or set-then-reset by the bus task)."""

    device: str
    point: str
    value: Value
    token: str = ""
    pulse_ms: int | None = None
    #: Not started within this long of being asked (the bus busy with other writes, or stuck), the write is not made
    #: at all (failure ``not_sent``): someone waiting at a door is told it did not open, and it does not open later.
    #: None: it waits its turn however long.
    start_within_ms: int | None = None
