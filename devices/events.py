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


DeviceEvent = PointChanged | Availability | WriteResult


@dataclass(frozen=True, slots=True)
class WritePoint:
    """Set a writable point (a relay, a coil). ``pulse_ms`` asks for a timed pulse where the profile
    supports one (the device's own flash command, or set-then-reset by the bus task)."""

    device: str
    point: str
    value: Value
    token: str = ""
    pulse_ms: int | None = None
