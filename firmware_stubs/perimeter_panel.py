"""Firmware stub of the Gatehouse perimeter alarm panel (PP-8 / PP-16), written from the register map in
docs/profiles.md ("Perimeter panel"), not from the driver's profile.

Run::

    python -m firmware_stubs.perimeter_panel --tcp 127.0.0.1:5020 [--units 1 | 1-50] [--zones 8|16]
                                             [--count N] --control 127.0.0.1:8081
    python -m firmware_stubs.perimeter_panel --rtu-pty  [...]   # Modbus RTU on a new pseudo-terminal
    python -m firmware_stubs.perimeter_panel --rtu-over-tcp 127.0.0.1:0 [...]   # RTU frames on TCP

Ports may be 0 (the stub picks one). ``--count N`` serves N panels on N consecutive TCP ports (each
with the same ``--units``). When ready it prints one JSON line on stdout::

    {"ready": true, "modbus": "tcp://127.0.0.1:5020", "endpoints": ["tcp://127.0.0.1:5020"],
     "control": "http://127.0.0.1:8081", "pid": 1234, "zones": 16, "units": [1]}

(with ``--rtu-pty``: ``"modbus": "rtu:///dev/pts/7", "serial": "/dev/pts/7"``). SIGTERM or SIGINT
stops it cleanly.

Control API: JSON over HTTP on loopback. Every POST body is optional; ``panel`` is the endpoint index
(default 0, or "all" for /silent, /garbage, /delay, /reset-counters) and ``unit`` the unit id
(default the first). Answers are ``{"ok": true, "mono": <CLOCK_MONOTONIC seconds>}`` or
``{"ok": false, "error": "..."}`` with status 400/404.

==========================================  ===========================================================
``GET  /state[?recent=1]``                  every panel: zones, panel, outputs, silence, garbage,
                                            request counters by function code (and the latest 500
                                            requests with their receive time when ``recent=1``)
``POST /zones/{z}/trip``                    zone z alarm on
``POST /zones/{z}/restore``                 zone z back to normal: every condition of the zone off
``POST /zones/{z}/{condition}``             ``{"active": true|false}`` (default true); condition is
                                            alarm, tamper, fault (line fault), touch, cut, short
                                            (pulse-fence touch / cut / short, GB/T 7946-2015)
``POST /panel/tamper``                      ``{"active": true|false}`` enclosure tamper
``POST /panel/power``                       ``{"state": "ac" | "battery" | "battery-low"}``
``POST /silent``                            ``{"on": true, "unit": 1}`` stop answering (all units when
                                            ``unit`` is omitted); ``{"on": false}`` answers again
``POST /garbage``                           ``{"on": true, "unit": 1}`` answer with a frame that fails
                                            its checksum (RTU) or a mangled MBAP frame (TCP)
``POST /delay``                             ``{"ms": 150}`` answer every request this late
``POST /mangle``                            ``{"mode": "wrong-tid", "unit": 2, "count": 1}`` (Modbus TCP)
                                            spoil the unit's next answers: wrong-tid, truncate,
                                            exception, garbage, close (half a frame, then hang up)
``POST /reset-counters``                    zero the request counters
==========================================  ===========================================================
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from pymodbus.constants import ExcCodes

from firmware_stubs.modbus_device import (
    ControlError,
    StubApp,
    Values,
    endpoints_from_args,
    parse_index,
    standard_coil_value,
    stub_args,
    window,
)

MODEL_ID = 0x5050  # "PP"
FIRMWARE = 0x0102  # 1.2
MAX_ZONES = 16  # the address layout leaves room for 16 zones per kind
CONDITIONS = ("alarm", "tamper", "fault", "touch", "cut", "short")  # discrete-input blocks 0x00, 0x10, ...
DISCRETE_END = MAX_ZONES * len(CONDITIONS)  # 96
REGISTER_END = 32  # input and holding registers 0-31 answer
COIL_END = 16  # coils 0-15 answer; 0 siren, 1 strobe, 2 aux output
COILS = ("siren", "strobe", "aux_output")
FENCE_KV_NORMAL = 80  # 8.0 kV in 0.1 kV
FENCE_KV_SHORT = 3
BATTERY_CV = {"ac": 1350, "battery": 1260, "battery-low": 1120}  # 0.01 V


class Panel:
    """One panel (one unit id). ``conditions[c][z]`` is condition c of zone z+1."""

    def __init__(self, unit: int, zones: int) -> None:
        self.unit = unit
        self.zones = zones
        self.started = time.monotonic()
        self.conditions: dict[str, list[bool]] = {c: [False] * MAX_ZONES for c in CONDITIONS}
        self.tamper = False
        self.power = "ac"
        self.coils = [False] * COIL_END
        self.siren_hold_s = 180
        self.bits: list[bool] = [False] * DISCRETE_END  # the discrete-input image, rebuilt on change

    def set_condition(self, zone: int, condition: str, active: bool) -> None:
        self.conditions[condition][zone - 1] = active
        self.bits[CONDITIONS.index(condition) * MAX_ZONES + zone - 1] = active

    def _status(self) -> int:
        return (
            int(self.tamper)
            | int(self.power == "ac") << 1
            | int(self.power != "ac") << 2
            | int(self.power == "battery-low") << 3
        )

    def _fence_kv(self, z: int) -> int:
        if z >= self.zones or self.conditions["cut"][z]:
            return 0
        return FENCE_KV_SHORT if self.conditions["short"][z] else FENCE_KV_NORMAL

    def _input_registers(self) -> list[int]:
        up = int(time.monotonic() - self.started) & 0xFFFF_FFFF
        regs = [self._status(), BATTERY_CV[self.power], up >> 16, up & 0xFFFF] + [0] * 12
        return regs + [self._fence_kv(z) for z in range(MAX_ZONES)]

    def _holding_registers(self) -> list[int]:
        regs = [MODEL_ID, self.zones, FIRMWARE, self.unit] + [0] * 12
        return regs + [self.siren_hold_s] + [0] * 15

    def read(self, fc: int, address: int, count: int) -> Values | ExcCodes:
        if fc == 2:
            return window(self.bits, address, count, DISCRETE_END)
        if fc == 1:
            return window(self.coils, address, count, COIL_END)
        if fc in (3, 4):
            regs = self._input_registers() if fc == 4 else self._holding_registers()
            return window(regs, address, count, REGISTER_END)
        return ExcCodes.ILLEGAL_FUNCTION

    def write(self, fc: int, address: int, values: Values) -> ExcCodes | None:
        if fc == 15:
            if address + len(values) > len(COILS):
                return ExcCodes.ILLEGAL_ADDRESS
            self.coils[address : address + len(values)] = [bool(v) for v in values]
            return None
        if fc in (6, 16):
            if address != 16 or len(values) != 1:
                return ExcCodes.ILLEGAL_ADDRESS
            self.siren_hold_s = int(values[0])
            return None
        return ExcCodes.ILLEGAL_FUNCTION

    def write_coil_raw(self, address: int, raw: int) -> ExcCodes | None:
        if address >= len(COILS):
            return ExcCodes.ILLEGAL_ADDRESS
        value = standard_coil_value(raw)
        if value is None:
            return ExcCodes.ILLEGAL_VALUE
        self.coils[address] = value
        return None

    def state(self) -> dict[str, Any]:
        zones = []
        for z in range(self.zones):
            zone: dict[str, Any] = {"zone": z + 1}
            zone.update({c: self.conditions[c][z] for c in CONDITIONS})
            zone["fence_kv"] = self._fence_kv(z) / 10
            zones.append(zone)
        return {
            "zones": zones,
            "panel": {"tamper": self.tamper, "power": self.power, "battery_v": BATTERY_CV[self.power] / 100},
            "outputs": {name: self.coils[i] for i, name in enumerate(COILS)},
            "siren_hold_s": self.siren_hold_s,
        }


def build(argv: Sequence[str] | None = None) -> tuple[StubApp, argparse.Namespace]:
    args = stub_args(
        argv,
        "python -m firmware_stubs.perimeter_panel",
        "Perimeter alarm panel firmware stub (Modbus)",
        lambda ap: ap.add_argument("--zones", type=int, choices=(8, 16), default=8),
    )
    stub = StubApp(endpoints_from_args(args, lambda u: Panel(u, args.zones)))

    def panel(body: dict[str, Any]) -> Panel:
        p: Panel = stub.unit_for(body)
        return p

    def zone_of(request: web.Request, p: Panel) -> int:
        return parse_index(request.match_info["zone"], p.zones)

    async def trip(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        p = panel(body)
        p.set_condition(zone_of(request, p), "alarm", True)
        return {}

    async def restore(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        p = panel(body)
        z = zone_of(request, p)
        for c in CONDITIONS:
            p.set_condition(z, c, False)
        return {}

    async def condition(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        cond = request.match_info["condition"]
        if cond not in CONDITIONS:
            raise ControlError(404, f"unknown condition {cond!r} (one of {', '.join(CONDITIONS)}, trip, restore)")
        p = panel(body)
        p.set_condition(zone_of(request, p), cond, stub.flag(body, "active"))
        return {}

    async def tamper(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        panel(body).tamper = stub.flag(body, "active")
        return {}

    async def power(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        state = body.get("state")
        if state not in BATTERY_CV:
            raise ControlError(400, f"'state' must be one of {', '.join(BATTERY_CV)}, not {state!r}")
        panel(body).power = state
        return {}

    stub.route("POST", "/zones/{zone}/trip", trip)
    stub.route("POST", "/zones/{zone}/restore", restore)
    stub.route("POST", "/zones/{zone}/{condition}", condition)
    stub.route("POST", "/panel/tamper", tamper)
    stub.route("POST", "/panel/power", power)
    return stub, args


def main(argv: Sequence[str] | None = None) -> None:
    stub, args = build(argv)
    asyncio.run(stub.run(args.control, {"zones": args.zones, "units": args.units}))


if __name__ == "__main__":
    main()
