"""Firmware stub of the Gatehouse door controller DC-1, written from the register map in docs/profiles.md
("Door controller"), not from the driver's profile. Each unit id is one controller with its own door.

Run::

    python -m firmware_stubs.door_controller --tcp 127.0.0.1:0 [--units 1 | 1-32] --control 127.0.0.1:0
    python -m firmware_stubs.door_controller --rtu-pty [...]        # Modbus RTU on a new pseudo-terminal
    python -m firmware_stubs.door_controller --rtu-over-tcp 127.0.0.1:0 [...]

When ready it prints one JSON line on stdout (as the other Modbus stubs do)::

    {"ready": true, "modbus": "tcp://127.0.0.1:5020", "endpoints": [...], "control": "http://127.0.0.1:8081",
     "pid": 1234, "units": [1]}

The door model: the door opens only while the lock is released (the lock relay is on: by a Modbus write,
a timed pulse, or the exit button, which pulses it for the exit release time), unless it is forced. A
door that is open stays open until it is closed (or ``close_after_ms`` passes: a door closer), unless
it is held open.

Control API: JSON over HTTP on loopback; ``unit`` picks the controller (default the first), ``panel``
the endpoint (default 0). Answers carry ``mono``, the stub's CLOCK_MONOTONIC, comparable across
processes on the machine.

==========================================  ===========================================================
``GET  /state[?recent=1]``                  every controller: door, lock, inputs, relay history (every
                                            time the lock relay was switched: ``mono``, ``on``, ``via``
                                            ``write``/``pulse``/``exit``/``timer``, ``ms`` for pulses)
``POST /open``                              ``{"forced": false, "close_after_ms": null}`` a person pushes
                                            the door: opens only while unlocked or when forced (409 else)
``POST /close``                             the door shuts (and is no longer held)
``POST /exit``                              ``{"ms": 500}`` press the exit button for ``ms``
``POST /force``                             ``{"close_after_ms": null}`` the door is forced open
``POST /hold``                              ``{"on": true, "forced": false}`` hold the door open (opening
                                            it under the /open rules if shut); ``on: false`` lets it shut
``POST /tamper``                            ``{"active": true}`` enclosure tamper
``POST /inputs/aux``                        ``{"active": true}`` auxiliary input
``POST /offline``                           ``{"on": true}`` the controller stops answering (silent)
``POST /silent``, ``/garbage``, ``/delay``  as every Modbus stub (see firmware_stubs.modbus_device)
``POST /reset``                             zero the request counters and the relay history
==========================================  ===========================================================
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from pymodbus.constants import ExcCodes

from firmware_stubs.modbus_device import (
    ControlError,
    StubApp,
    Values,
    endpoints_from_args,
    standard_coil_value,
    stub_args,
    window,
)

MODEL_ID = 0x4443  # "DC"
FIRMWARE = 0x0100  # 1.0
DOORS = 1
COIL_END = 8  # coils 0-7 answer; 0 lock relay, 1 aux output
WRITABLE_COILS = 2
DISCRETE_END = 8  # 0 door open, 1 exit button, 2 lock released, 3 tamper, 4 aux input
HOLDING_END = 32
EXIT_RELEASE_REG = 16
PULSE_ON_BASE = 0x0100
PULSE_OFF_BASE = 0x0200
PULSE_UNIT_MS = 10
HISTORY = 5000


class DoorController:
    """One controller (one unit id) and the door it guards."""

    def __init__(self, unit: int) -> None:
        self.unit = unit
        self.coils = [False] * COIL_END
        self.exit_release_s = 5
        self.door_open = False
        self.forced = False  # the door was opened while the lock held it
        self.held = False  # held open: it does not shut by itself
        self.exit_pressed = False
        self.tamper = False
        self.aux_input = False
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.relay_sets = 0  # times the lock relay went on (or was pulsed on) since the last reset
        self._timers: dict[str, asyncio.TimerHandle] = {}

    # -- the lock

    @property
    def unlocked(self) -> bool:
        return self.coils[0]

    def _cancel(self, key: str) -> None:
        t = self._timers.pop(key, None)
        if t is not None:
            t.cancel()

    def _later(self, key: str, delay_s: float, fn: Any, *args: Any) -> None:
        self._cancel(key)

        def run() -> None:
            self._timers.pop(key, None)
            fn(*args)

        self._timers[key] = asyncio.get_running_loop().call_later(delay_s, run)

    def _set_coil(self, n: int, on: bool, via: str, ms: int | None = None) -> None:
        now = time.monotonic()
        if n == 0:
            if on:
                self.relay_sets += 1
            entry: dict[str, Any] = {"mono": now, "on": on, "via": via}
            if ms is not None:
                entry["ms"] = ms
            self.history.append(entry)
        self.coils[n] = on

    def _write_coil(self, n: int, on: bool) -> None:
        self._cancel(f"pulse{n}")
        self._set_coil(n, on, "write")

    def _pulse(self, n: int, on: bool, units: int, via: str = "pulse") -> None:
        ms = units * PULSE_UNIT_MS
        self._set_coil(n, on, via, ms)
        self._later(f"pulse{n}", ms / 1000, self._set_coil, n, not on, "timer")

    # -- Modbus

    def read(self, fc: int, address: int, count: int) -> Values | ExcCodes:
        if fc == 1:
            return window(self.coils, address, count, COIL_END)
        if fc == 2:
            bits = [self.door_open, self.exit_pressed, self.unlocked, self.tamper, self.aux_input] + [False] * 3
            return window(bits, address, count, DISCRETE_END)
        if fc == 3:
            regs = [MODEL_ID, DOORS, FIRMWARE, self.unit] + [0] * 12 + [self.exit_release_s] + [0] * 15
            return window(regs, address, count, HOLDING_END)
        return ExcCodes.ILLEGAL_FUNCTION

    def write(self, fc: int, address: int, values: Values) -> ExcCodes | None:
        if fc == 15:
            if address + len(values) > WRITABLE_COILS:
                return ExcCodes.ILLEGAL_ADDRESS
            for i, v in enumerate(values):
                self._write_coil(address + i, bool(v))
            return None
        if fc in (6, 16):
            if address != EXIT_RELEASE_REG or len(values) != 1:
                return ExcCodes.ILLEGAL_ADDRESS
            if not 1 <= int(values[0]) <= 255:
                return ExcCodes.ILLEGAL_VALUE
            self.exit_release_s = int(values[0])
            return None
        return ExcCodes.ILLEGAL_FUNCTION

    def write_coil_raw(self, address: int, raw: int) -> ExcCodes | None:
        base, n = address & 0xFF00, address & 0xFF
        if n >= WRITABLE_COILS or base not in (0, PULSE_ON_BASE, PULSE_OFF_BASE):
            return ExcCodes.ILLEGAL_ADDRESS
        if base == 0:
            value = standard_coil_value(raw)
            if value is None:
                return ExcCodes.ILLEGAL_VALUE
            self._write_coil(n, value)
            return None
        if raw == 0:
            return ExcCodes.ILLEGAL_VALUE
        self._pulse(n, base == PULSE_ON_BASE, raw)
        return None

    # -- the door (control API)

    def open(self, forced: bool, close_after_ms: int | None) -> None:
        if not self.door_open:
            if not self.unlocked and not forced:
                raise ControlError(409, "the door is locked (unlock it, press the exit button, or force it)")
            self.forced = not self.unlocked
            self.door_open = True
        if close_after_ms is not None:
            self._later("closer", close_after_ms / 1000, self._closer)

    def _closer(self) -> None:
        if not self.held:
            self.close()

    def close(self) -> None:
        self._cancel("closer")
        self.door_open = False
        self.forced = False
        self.held = False

    def press_exit(self, ms: int) -> None:
        """The button is down for ``ms``; a locked door is released for the exit release time."""
        self.exit_pressed = True
        if not self.coils[0]:
            self._pulse(0, True, self.exit_release_s * 1000 // PULSE_UNIT_MS, "exit")
        self._later("exit", ms / 1000, self._release_exit)

    def _release_exit(self) -> None:
        self.exit_pressed = False

    def reset(self) -> None:
        self.history.clear()
        self.relay_sets = 0

    def state(self) -> dict[str, Any]:
        return {
            "door": {"open": self.door_open, "locked": not self.unlocked, "forced": self.forced, "held": self.held},
            "lock_relay": self.coils[0],
            "aux_output": self.coils[1],
            "inputs": {
                "door_open": self.door_open,
                "exit_button": self.exit_pressed,
                "lock_released": self.unlocked,
                "tamper": self.tamper,
                "aux_input": self.aux_input,
            },
            "exit_release_s": self.exit_release_s,
            "relay_sets": self.relay_sets,
            "relay_history": list(self.history),
        }


def _ms(body: dict[str, Any], key: str, default: int | None) -> int | None:
    v = body.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 3_600_000:
        raise ControlError(400, f"'{key}' must be a whole number of milliseconds 0-3600000, not {v!r}")
    return v


def build(argv: Sequence[str] | None = None) -> tuple[StubApp, argparse.Namespace]:
    args = stub_args(argv, "python -m firmware_stubs.door_controller", "Door controller firmware stub (Modbus)")
    stub = StubApp(endpoints_from_args(args, DoorController))

    def ctl(body: dict[str, Any]) -> DoorController:
        c: DoorController = stub.unit_for(body)
        return c

    async def open_(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        c = ctl(body)
        c.open(stub.flag(body, "forced", False), _ms(body, "close_after_ms", None))
        return {"forced": c.forced}

    async def force(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        c = ctl(body)
        c.open(True, _ms(body, "close_after_ms", None))
        return {"forced": c.forced}

    async def close(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        ctl(body).close()
        return {}

    async def exit_(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        ctl(body).press_exit(_ms(body, "ms", 500) or 1)
        return {}

    async def hold(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        c = ctl(body)
        if stub.flag(body, "on"):
            c.open(stub.flag(body, "forced", False), None)
            c._cancel("closer")
            c.held = True
        else:
            c.close()
        return {"forced": c.forced}

    async def tamper(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        ctl(body).tamper = stub.flag(body, "active")
        return {}

    async def aux(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        ctl(body).aux_input = stub.flag(body, "active")
        return {}

    async def offline(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        ep = stub.endpoint(body)
        c = ctl(body)
        on = stub.flag(body, "on")
        if on:
            ep.silent.add(c.unit)
        else:
            ep.silent.discard(c.unit)
        return {}

    async def reset(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        for ep in stub.endpoints_for(body):
            ep.reset_counters()
            for u in ep.units.values():
                if isinstance(u, DoorController):  # every unit of this stub is one
                    u.reset()
        return {}

    stub.route("POST", "/open", open_)
    stub.route("POST", "/force", force)
    stub.route("POST", "/close", close)
    stub.route("POST", "/exit", exit_)
    stub.route("POST", "/hold", hold)
    stub.route("POST", "/tamper", tamper)
    stub.route("POST", "/inputs/aux", aux)
    stub.route("POST", "/offline", offline)
    stub.route("POST", "/reset", reset)
    return stub, args


def main(argv: Sequence[str] | None = None) -> None:
    stub, args = build(argv)
    asyncio.run(stub.run(args.control, {"units": args.units, "model": "DC-1"}))


if __name__ == "__main__":
    main()
