"""Shared machinery of the Modbus firmware stubs, and a stub of a Waveshare-style 8-channel I/O board.

A stub serves one or more *endpoints* (a Modbus TCP port, RTU frames on a TCP port, or Modbus RTU on
a pseudo-terminal it creates). Each endpoint answers for one or more unit ids, each a
:class:`UnitModel` holding the device's registers. On command an endpoint goes silent (stops
answering, per unit or all), answers with garbage (a frame with a broken checksum), answers late, or
lets a unit miss its next few requests (as a unit does after power-up or a collision on the bus;
``--deaf-first N`` makes every unit miss its first N).
Every request it receives is counted per function code, and the latest ones are kept with their
monotonic receive time (CLOCK_MONOTONIC, comparable with other processes on the machine).

Run as the Waveshare board stub::

    python -m firmware_stubs.modbus_device --model relay-d --tcp 127.0.0.1:0 --control 127.0.0.1:0
    python -m firmware_stubs.modbus_device --model io-8ch --rtu-pty --units 1-3 --control 127.0.0.1:0

``--model relay-d`` is a "Modbus RTU Relay (D)" (8 relays, 8 inputs), ``--model io-8ch`` a "Modbus
RTU IO 8CH" (8 outputs, 8 inputs). Both implement, from the vendor's protocol: coils 0-7 (functions
01, 05 with 0xFF00 on / 0x0000 off / 0x5500 toggle, 0F), address 0x00FF (all outputs), discrete
inputs 0-7 (02), holding 0x4000 (own address, 03/06) and 0x8000 (version, 03), the control mode of
each output at holding 0x1000-0x1007 (03/06/10: 0 normal, 1 linkage, 2 toggle, 3 edge trigger), and
for relay-d the flash commands: function 05 to 0x0200+n (on for value x 100 ms) and 0x0400+n (off
for value x 100 ms), value 1-0x7FFF. Anything else is answered with exception 2 (address) or 3
(value), as the boards do for registers their documents do not list.

Control modes as the maker describes them: in *normal* mode an output follows Modbus writes only; in
*linkage* it follows its input (input n active, output n on) and a write to it is answered as usual
but changes nothing (the trap: the echo says yes, the relay does not move); in *toggle* mode each
activation of input n toggles output n; in *edge trigger* mode each change of input n toggles it. The
documents do not say whether writes act in toggle and edge modes; here they do.

Control API (JSON over HTTP on loopback; ``panel`` picks an endpoint by index, default 0; ``unit``
a unit id, default the endpoint's first; bodies are optional where every field has a default)::

    GET  /state                                  everything, incl. request counters
    POST /inputs/{n}        {"active": true}     set digital input n (1-8)
    POST /silent            {"on": true, "unit": 2}   stop answering (all units when unit is omitted)
    POST /deaf              {"requests": 1, "unit": 2}   miss the next N requests (all units when omitted)
    POST /modes             {"channel": 1, "mode": "linkage", "unit": 2}   set a control mode (as 06 would)
    POST /garbage           {"on": true, "unit": 2}   answer with a corrupted frame
    POST /delay             {"ms": 150}          answer every request this late
    POST /mangle            {"mode": "wrong-tid", "unit": 2, "count": 1}   Modbus TCP: spoil the unit's next
                                                 answers: wrong-tid (another transaction id), truncate (the
                                                 header promises bytes that never come), exception (a Modbus
                                                 exception 4 instead), garbage (random bytes after the
                                                 transaction id), close (half the frame, then the
                                                 connection is closed)
    POST /reset-counters                         zero the request counters and log
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import struct
import sys
import time
import tty
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol

from aiohttp import web
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

EndpointKind = Literal["tcp", "rtu-over-tcp", "rtu-pty"]
MANGLE_MODES = ("wrong-tid", "truncate", "exception", "garbage", "close")
Values = list[int] | list[bool]


class UnitModel(Protocol):
    """The registers of one device. ``read``/``write`` get the function code and return the values or a
    Modbus exception code."""

    def read(self, fc: int, address: int, count: int) -> Values | ExcCodes: ...

    def write(self, fc: int, address: int, values: Values) -> ExcCodes | None: ...

    def write_coil_raw(self, address: int, raw: int) -> ExcCodes | None: ...

    def state(self) -> dict[str, Any]: ...


READ_TABLE_OF = {5: 1, 15: 1, 6: 3, 16: 3, 22: 3, 23: 3}


def window(values: Values, address: int, count: int, end: int) -> Values | ExcCodes:
    """``count`` values from ``address``, or ILLEGAL_ADDRESS when they would run past ``end``."""
    if address + count > end:
        return ExcCodes.ILLEGAL_ADDRESS
    return values[address : address + count]


def standard_coil_value(raw: int) -> bool | None:
    """Function 05's value field: 0xFF00 on, 0x0000 off, anything else is not a plain write."""
    return {0xFF00: True, 0x0000: False}.get(raw)


# ---------------------------------------------------------------- protocol plumbing


class StubWriteCoil(ModbusPDU):
    """Function 05 keeping the raw value field, so a device can give values other than on/off a meaning
    (Waveshare: toggle, flash durations)."""

    function_code = 5
    rtu_frame_size = 8

    def __init__(self, dev_id: int = 0, transaction_id: int = 0, address: int = 0, raw: int = 0, **_: Any) -> None:
        super().__init__(dev_id=dev_id, transaction_id=transaction_id, address=address)
        self.raw = raw

    def encode(self) -> bytes:
        return struct.pack(">HH", self.address, self.raw)

    def decode(self, data: bytes) -> None:
        self.address, self.raw = struct.unpack(">HH", data[:4])

    async def datastore_update(self, context: Any, device_id: int) -> ModbusPDU:
        rc = await context.write_coil_raw(device_id, self.address, self.raw)
        if rc:
            return ExceptionResponse(self.function_code, rc)
        return StubWriteCoil(device_id, self.transaction_id, self.address, self.raw)


class StubContext(ModbusServerContext):
    """The server's datastore: routes each request to its unit, honours silence and delay. (Only the
    duck-typed interface pymodbus's server calls is implemented.)"""

    def __init__(self, endpoint: Endpoint) -> None:  # no super().__init__: its data model is not used
        self.old_simulator = True
        self.simdevices = []
        self.endpoint = endpoint

    def _unit(self, device_id: int) -> UnitModel:
        ep = self.endpoint
        unit = ep.units.get(device_id)
        if unit is None or ep.silent_all or device_id in ep.silent or ep.missing_this_one:
            raise NoSuchIdException(f"unit {device_id} does not answer")
        return unit

    async def _delay(self) -> None:
        if self.endpoint.delay_s:
            await asyncio.sleep(self.endpoint.delay_s)

    async def async_getValues(self, device_id: int, func_code: int, address: int, count: int = 1) -> Any:
        unit = self._unit(device_id)
        await self._delay()
        # pymodbus reads back after a write with the write's function code: read the same table.
        return unit.read(READ_TABLE_OF.get(func_code, func_code), address, count)

    async def async_setValues(self, device_id: int, func_code: int, address: int, values: Any) -> Any:
        unit = self._unit(device_id)
        await self._delay()
        return unit.write(func_code, address, list(values))

    async def write_coil_raw(self, device_id: int, address: int, raw: int) -> ExcCodes | None:
        unit = self._unit(device_id)
        await self._delay()
        return unit.write_coil_raw(address, raw)

    def device_ids(self) -> list[int]:
        return list(self.endpoint.units)


class _Receiver(Protocol):
    """What :class:`_FdTransport` calls: asyncio.Protocol's callbacks (pymodbus's ModbusProtocol has them, though it
    derives from asyncio.BaseProtocol only)."""

    def connection_made(self, transport: asyncio.BaseTransport, /) -> None: ...
    def data_received(self, data: bytes, /) -> None: ...
    def connection_lost(self, exc: Exception | None, /) -> None: ...


class _FdTransport(asyncio.Transport):
    """An asyncio transport on the master side of a pseudo-terminal (the stub's end of the cable)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: _Receiver) -> None:
        super().__init__()
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._out = bytearray()
        self._closing = False
        loop.add_reader(fd, self._read_ready)
        loop.call_soon(protocol.connection_made, self)

    def _read_ready(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO while no one has the other side open: nothing to read
        if data:
            self._protocol.data_received(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        self._out += data
        self._write_ready()

    def _write_ready(self) -> None:
        try:
            n = os.write(self._fd, self._out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._out.clear()
            n = 0
        del self._out[:n]
        if self._out:
            self._loop.add_writer(self._fd, self._write_ready)
        else:
            self._loop.remove_writer(self._fd)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._loop.call_soon(self._protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        self.close()


# ---------------------------------------------------------------- endpoints


class Endpoint:
    """One listening Modbus endpoint and the units behind it."""

    def __init__(self, units: dict[int, UnitModel], kind: EndpointKind, host: str = "127.0.0.1", port: int = 0):
        self.units = units
        self.kind = kind
        self.host = host
        self.port = port
        self.silent: set[int] = set()
        self.silent_all = False
        self.deaf: dict[int, int] = {}  # unit -> requests it will still miss
        self.missed = 0
        self.missing_this_one = False  # the request being handled is one a deaf unit misses
        self.garbage: set[int] = set()
        self.garbage_all = False
        self.delay_s = 0.0
        self.requests_total = 0
        self.requests_by_fc: dict[int, int] = {}
        self.recent: deque[tuple[float, int, int, int, int]] = deque(maxlen=500)
        self.garbage_sent = 0
        self.mangle: dict[int, deque[str]] = {}  # unit -> how its next answers are spoilt (Modbus TCP)
        self.mangled = 0
        self._answering: Any = None  # the connection handler whose answer is being sent (Modbus TCP)
        self.pipelined = 0  # Modbus TCP requests that arrived while an earlier one was still unanswered
        self.url = ""
        self.serial_path = ""
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._pty: tuple[int, int] | None = None
        self._rng = random.Random()

    # -- hooks called by pymodbus for every frame

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests_total += 1
            left = self.deaf.get(pdu.dev_id, 0)
            self.missing_this_one = left > 0 and pdu.dev_id in self.units
            if self.missing_this_one:
                self.deaf[pdu.dev_id] = left - 1
                self.missed += 1
            fc = pdu.function_code
            self.requests_by_fc[fc] = self.requests_by_fc.get(fc, 0) + 1
            self.recent.append((time.monotonic(), pdu.dev_id, fc, pdu.address, pdu.count))
        return pdu

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if sending and self.mangle and self.kind == "tcp" and len(data) > 7:
            modes = self.mangle.get(data[6])
            if modes:
                self.mangled += 1
                return self._spoil(modes.popleft(), data)
        if not sending or not data or not (self.garbage_all or self.garbage):
            return data
        unit = data[6] if self.kind == "tcp" and len(data) > 6 else data[0]
        if not self.garbage_all and unit not in self.garbage:
            return data
        self.garbage_sent += 1
        if self.kind == "tcp":
            return data[:4] + bytes(self._rng.randrange(256) for _ in range(len(data) - 4))
        body = bytes([data[0]]) + bytes(self._rng.randrange(256) for _ in range(max(3, len(data) - 3)))
        crc = _crc16(body) ^ 0x5A5A  # a frame that is guaranteed to fail its checksum
        return body + crc.to_bytes(2, "little")

    def _spoil(self, mode: str, data: bytes) -> bytes:
        """A Modbus TCP answer spoilt as ``mode`` says (see /mangle)."""
        if mode == "wrong-tid":
            tid = (int.from_bytes(data[:2], "big") + 7919) % 0x10000 or 1
            return tid.to_bytes(2, "big") + data[2:]
        if mode == "truncate":
            return data[: max(8, len(data) - 3)]
        if mode == "exception":
            return data[:4] + (3).to_bytes(2, "big") + bytes([data[6], data[7] | 0x80, 4])
        if mode == "garbage":
            return data[:4] + bytes(self._rng.randrange(256) for _ in range(len(data) - 4))
        handler = self._answering  # close: half the frame, then the connection goes
        if handler is not None and handler.transport is not None:
            asyncio.get_running_loop().call_soon(handler.transport.close)
        return data[: len(data) // 2]

    # -- lifecycle

    def _make_server(self) -> ModbusTcpServer | ModbusSerialServer:
        ctx = StubContext(self)
        common: dict[str, Any] = {
            "ignore_missing_devices": True,  # a silent or absent unit simply does not answer
            "trace_packet": self._trace_packet,
            "trace_pdu": self._trace_pdu,
            "custom_pdu": [StubWriteCoil],
        }
        if self.kind == "rtu-pty":
            return ModbusSerialServer(ctx, framer=FramerType.RTU, port="pty", **common)
        framer = FramerType.SOCKET if self.kind == "tcp" else FramerType.RTU
        server = ModbusTcpServer(ctx, framer=framer, address=(self.host, self.port), **common)
        if self.kind == "tcp":
            make = server.handle_new_connection

            def handle_new_connection() -> Any:
                handler = make()
                self._answer_every_request(handler)
                return handler

            server.handle_new_connection = handle_new_connection  # type: ignore[method-assign]
            server.init_setup_connect_listen(self.host, self.port)  # its listener takes the handler made here
        return server

    def _answer_every_request(self, handler: Any) -> None:
        """Modbus TCP: answer every request a client sends, in order, also those it sent before the earlier
        ones were answered (a client may keep several transactions outstanding, paired by transaction id; a
        serial server queues them for its line). pymodbus takes one frame per read and would leave the rest
        in its buffer until more bytes arrive, answering each request one read late."""
        parse = handler.callback_data
        received = handler.datagram_received
        handle = handler.handle_request
        queue: deque[tuple[Any, bool]] = deque()
        worker: list[asyncio.Task[None]] = []
        current: list[Any] = [None, False]  # the request being answered, and whether a deaf unit misses it

        def callback_data(data: bytes, addr: Any = None) -> int:
            used = int(parse(data, addr))
            if handler.last_pdu:
                if queue or current[0] is not None:
                    self.pipelined += 1
                queue.append((handler.last_pdu, self.missing_this_one))
            # pymodbus answers whatever its last_pdu is once the datastore has answered: the request being
            # answered, not the one just read.
            handler.last_pdu, self.missing_this_one = current
            return used

        async def work() -> None:
            while queue:
                if handler.transport is None or handler.transport.is_closing():
                    queue.clear()  # the client has gone: nobody to answer
                    break
                current[:] = queue.popleft()
                handler.last_pdu, self.missing_this_one = current
                self._answering = handler
                await handle()
            current[:] = [None, False]

        def handle_later() -> None:
            if not worker or worker[0].done():
                worker[:] = [asyncio.get_running_loop().create_task(work())]

        def datagram_received(data: bytes, addr: Any) -> None:
            received(data, addr)
            while handler.recv_buffer:  # the next whole frame of the same read, if there is one
                left = len(handler.recv_buffer)
                received(b"", addr)
                if len(handler.recv_buffer) == left:
                    break

        handler.max_buffer_size = 255 * 260  # pymodbus drops a read of more than one frame's worth (516 bytes)
        handler.callback_data = callback_data
        handler.handle_later = handle_later
        handler.datagram_received = datagram_received

    async def start(self) -> str:
        server = self._make_server()
        if self.kind == "rtu-pty":
            master, slave = os.openpty()
            tty.setraw(slave)
            os.set_blocking(master, False)
            self._pty = (master, slave)  # keeping the slave open spares the master EIO between clients
            self.serial_path = os.ttyname(slave)
            loop = asyncio.get_running_loop()

            async def create() -> tuple[asyncio.Transport, Any]:
                protocol = server.handle_new_connection()
                return _FdTransport(loop, master, protocol), protocol

            server.call_create = create
        try:
            await server.serve_forever(background=True)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {self.host}:{self.port}: {e}") from None
        self._server = server
        if self.kind == "rtu-pty":
            self.url = f"rtu://{self.serial_path}"
        else:
            sock = server.transport.sockets[0]  # type: ignore[attr-defined]
            self.port = int(sock.getsockname()[1])
            scheme = "tcp" if self.kind == "tcp" else "rtu+tcp"
            self.url = f"{scheme}://{self.host}:{self.port}"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.shutdown()
            self._server = None
        if self._pty is not None:
            for fd in self._pty:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pty = None

    def state(self, recent: bool = False) -> dict[str, Any]:
        st: dict[str, Any] = {
            "url": self.url,
            "serial": self.serial_path or None,
            "units": {str(u): m.state() for u, m in self.units.items()},
            "silent": "all" if self.silent_all else sorted(self.silent),
            "deaf": {str(u): n for u, n in sorted(self.deaf.items()) if n},
            "missed": self.missed,
            "garbage": "all" if self.garbage_all else sorted(self.garbage),
            "mangle": {str(u): list(m) for u, m in sorted(self.mangle.items()) if m},
            "delay_ms": round(self.delay_s * 1000),
            "requests": {
                "total": self.requests_total,
                "by_function": {str(k): v for k, v in sorted(self.requests_by_fc.items())},
                "garbage_sent": self.garbage_sent,
                "mangled": self.mangled,
                "pipelined": self.pipelined,
            },
        }
        if recent:
            st["requests"]["recent"] = [
                {"mono": t, "unit": u, "function": fc, "address": a, "count": c} for t, u, fc, a, c in self.recent
            ]
        return st

    def reset_counters(self) -> None:
        self.requests_total = 0
        self.requests_by_fc.clear()
        self.recent.clear()
        self.garbage_sent = 0
        self.mangled = 0
        self.pipelined = 0


def _crc16(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


# ---------------------------------------------------------------- control API plumbing


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Handler = Callable[[web.Request, dict[str, Any]], Awaitable[dict[str, Any]]]


class StubApp:
    """The control server and process lifecycle shared by the stubs."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = list(endpoints)
        self.app = web.Application(client_max_size=64 * 1024)
        self.app.router.add_get("/state", self._state)
        self.route("POST", "/silent", self._silent)
        self.route("POST", "/deaf", self._deaf)
        self.route("POST", "/garbage", self._garbage)
        self.route("POST", "/delay", self._delay)
        self.route("POST", "/mangle", self._mangle)
        self.route("POST", "/reset-counters", self._reset)
        self._runner: web.AppRunner | None = None
        self.control_url = ""

    def route(self, method: str, path: str, handler: Handler) -> None:
        async def wrapped(request: web.Request) -> web.Response:
            try:
                body = await _json_body(request)
                result = await handler(request, body)
            except ControlError as e:
                return web.json_response({"ok": False, "error": str(e)}, status=e.status)
            result.setdefault("ok", True)
            result.setdefault("mono", time.monotonic())
            return web.json_response(result)

        self.app.router.add_route(method, path, wrapped)

    # -- selection helpers for handlers

    def endpoint(self, body: dict[str, Any], query: Any = None) -> Endpoint:
        raw = body.get("panel", (query or {}).get("panel", 0))
        try:
            i = int(raw)
        except (TypeError, ValueError):
            raise ControlError(400, f"'panel' must be an index, not {raw!r}") from None
        if not 0 <= i < len(self.endpoints):
            raise ControlError(404, f"no panel {i} (there are {len(self.endpoints)})")
        return self.endpoints[i]

    def endpoints_for(self, body: dict[str, Any]) -> list[Endpoint]:
        return list(self.endpoints) if body.get("panel") == "all" else [self.endpoint(body)]

    def unit_for(self, body: dict[str, Any]) -> Any:
        """The unit a control request names: ``unit`` on the endpoint ``panel`` (both defaulting)."""
        return self.unit(self.endpoint(body), body)

    def unit(self, ep: Endpoint, body: dict[str, Any]) -> Any:
        raw = body.get("unit", next(iter(ep.units)))
        if isinstance(raw, bool) or not isinstance(raw, int) or raw not in ep.units:
            raise ControlError(404, f"no unit {raw!r} on {ep.url} (units: {sorted(ep.units)})")
        return ep.units[raw]

    @staticmethod
    def flag(body: dict[str, Any], key: str, default: bool = True) -> bool:
        v = body.get(key, default)
        if not isinstance(v, bool):
            raise ControlError(400, f"'{key}' must be true or false, not {v!r}")
        return v

    # -- shared handlers

    async def _state(self, request: web.Request) -> web.Response:
        recent = request.query.get("recent") in ("1", "true", "yes")
        return web.json_response({"mono": time.monotonic(), "panels": [ep.state(recent) for ep in self.endpoints]})

    def _unit_set(self, body: dict[str, Any], attr: str) -> dict[str, Any]:
        on = self.flag(body, "on")
        for ep in self.endpoints_for(body):
            units: set[int] = getattr(ep, attr)
            if "unit" in body:
                u = body["unit"]
                if isinstance(u, bool) or not isinstance(u, int) or u not in ep.units:
                    raise ControlError(404, f"no unit {u!r} on {ep.url}")
                if on:
                    units.add(u)
                else:
                    units.discard(u)
            else:
                setattr(ep, f"{attr}_all", on)
                if not on:
                    units.clear()
        return {}

    async def _silent(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        return self._unit_set(body, "silent")

    async def _deaf(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        n = body.get("requests", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 1000:
            raise ControlError(400, "'requests' must be a whole number 0-1000")
        for ep in self.endpoints_for(body):
            units = [self.unit_id(ep, body)] if "unit" in body else list(ep.units)
            for u in units:
                ep.deaf[u] = n
        return {}

    def unit_id(self, ep: Endpoint, body: dict[str, Any]) -> int:
        u = body.get("unit")
        if isinstance(u, bool) or not isinstance(u, int) or u not in ep.units:
            raise ControlError(404, f"no unit {u!r} on {ep.url}")
        return u

    async def _garbage(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        return self._unit_set(body, "garbage")

    async def _delay(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        ms = body.get("ms", 0)
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms <= 60_000:
            raise ControlError(400, "'ms' must be a number 0-60000")
        for ep in self.endpoints_for(body):
            ep.delay_s = ms / 1000
        return {}

    async def _mangle(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        mode = body.get("mode")
        if mode not in MANGLE_MODES:
            raise ControlError(400, f"'mode' must be one of {', '.join(MANGLE_MODES)}")
        n = body.get("count", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1000:
            raise ControlError(400, "'count' must be a whole number 1-1000")
        ep = self.endpoint(body)
        if ep.kind != "tcp":
            raise ControlError(400, "mangle spoils Modbus TCP answers only")
        ep.mangle.setdefault(self.unit_id(ep, body), deque()).extend([mode] * n)
        return {}

    async def _reset(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        for ep in self.endpoints_for(body):
            ep.reset_counters()
        return {}

    # -- lifecycle

    async def run(self, control: tuple[str, int], extra: dict[str, Any]) -> None:
        """Start the endpoints and the control server, print the ready line, serve until SIGTERM/SIGINT."""
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # a silent unit is not an error here
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            urls = [await ep.start() for ep in self.endpoints]
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(control)
            self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            host, port = sock.getsockname()[:2]
            self.control_url = f"http://{host}:{port}"
            ready = {
                "ready": True,
                "modbus": urls[0],
                "endpoints": urls,
                "control": self.control_url,
                "pid": os.getpid(),
                **extra,
            }
            if self.endpoints[0].serial_path:
                ready["serial"] = self.endpoints[0].serial_path
            sys.stdout.write(json.dumps(ready) + "\n")
            sys.stdout.flush()
            await stop.wait()
        finally:
            if self._runner is not None:
                await self._runner.cleanup()
            for ep in self.endpoints:
                await ep.stop()


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ControlError(400, "the body is not valid JSON") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ControlError(400, "the body must be a JSON object")
    return body


# ---------------------------------------------------------------- command line


def parse_units(text: str) -> list[int]:
    """``1``, ``1-50`` or ``1,3,7-9`` to a sorted list of unit ids 1-247."""
    units: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad unit list {text!r}") from None
        if not 1 <= a <= b <= 247:
            raise argparse.ArgumentTypeError(f"unit ids must be 1-247 in {text!r}")
        units.update(range(a, b + 1))
    return sorted(units)


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    try:
        p = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
    if not 0 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}")
    if host not in ("127.0.0.1", "localhost") and not host.startswith("127."):
        raise argparse.ArgumentTypeError(f"stubs listen on loopback only, not {host!r}")
    return ("127.0.0.1" if host == "localhost" else host), p


def add_common_args(ap: argparse.ArgumentParser) -> None:
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", type=parse_hostport, metavar="HOST:PORT", help="Modbus TCP (port 0: pick one)")
    where.add_argument(
        "--rtu-over-tcp",
        type=parse_hostport,
        metavar="HOST:PORT",
        help="Modbus RTU frames on a TCP port (a serial server)",
    )
    where.add_argument("--rtu-pty", action="store_true", help="Modbus RTU on a new pseudo-terminal")
    ap.add_argument("--units", type=parse_units, default=[1], help="unit ids: 1, 1-50 or 1,3,5 (default 1)")
    ap.add_argument("--count", type=int, default=1, help="serve N devices on N consecutive TCP ports")
    ap.add_argument(
        "--deaf-first",
        type=int,
        default=0,
        metavar="N",
        help="every unit misses its first N requests (a unit just powered up)",
    )
    ap.add_argument(
        "--control",
        type=parse_hostport,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="control API address (default 127.0.0.1:0)",
    )


def stub_args(
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    more: Callable[[argparse.ArgumentParser], object] | None = None,
) -> argparse.Namespace:
    """A Modbus stub's command line: the common options, then its own (added by ``more``)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    add_common_args(ap)
    if more is not None:
        more(ap)
    return ap.parse_args(argv)


def endpoints_from_args(args: argparse.Namespace, make_unit: Callable[[int], UnitModel]) -> list[Endpoint]:
    if args.count < 1 or args.count > 1000:
        raise SystemExit("--count must be 1-1000")
    if not 0 <= args.deaf_first <= 1000:
        raise SystemExit("--deaf-first must be 0-1000")
    if args.rtu_pty:
        if args.count != 1:
            raise SystemExit("--count needs --tcp or --rtu-over-tcp")
        eps = [Endpoint({u: make_unit(u) for u in args.units}, "rtu-pty")]
    else:
        kind: EndpointKind = "tcp" if args.tcp else "rtu-over-tcp"
        host, port = args.tcp or args.rtu_over_tcp
        ports = [port] if args.count == 1 else _consecutive_ports(host, port, args.count)
        eps = [Endpoint({u: make_unit(u) for u in args.units}, kind, host, p) for p in ports]
    for ep in eps:
        ep.deaf = dict.fromkeys(ep.units, args.deaf_first)
    return eps


def _consecutive_ports(host: str, first: int, count: int) -> list[int]:
    if first:
        return list(range(first, first + count))
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 60000 - count)
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, p))
            return list(range(base, base + count))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SystemExit(f"no {count} consecutive free ports found on {host}")


# ---------------------------------------------------------------- the Waveshare-style I/O board

#: Output control modes at holding 0x1000 + n, as the maker numbers them.
MODES = {"normal": 0, "linkage": 1, "toggle": 2, "edge_trigger": 3}


class IoBoard:
    """8 outputs (coils 0-7), 8 inputs (discrete 0-7), own address at holding 0x4000, version at 0x8000, an
    output control mode per output at 0x1000-0x1007; ``flash`` adds the timed on/off commands at 0x0200+n /
    0x0400+n (value x 100 ms, 1-0x7FFF)."""

    VERSION = 0x0100
    MAX_FLASH = 0x7FFF

    def __init__(self, unit: int, *, flash: bool) -> None:
        self.unit = unit
        self.flash = flash
        self.outputs = [False] * 8
        self.inputs = [False] * 8
        self.output_modes = [MODES["normal"]] * 8
        self.flashes: list[dict[str, Any]] = []
        self.ignored_writes = 0  # writes answered but not acted on (outputs in linkage mode)
        self._timers: list[asyncio.TimerHandle | None] = [None] * 8

    def read(self, fc: int, address: int, count: int) -> Values | ExcCodes:
        if fc in (1, 2):
            bits = self.outputs if fc == 1 else self.inputs
            if address + count > 8:
                return ExcCodes.ILLEGAL_ADDRESS
            return list(bits[address : address + count])
        if fc == 3:
            if address == 0x4000 and count == 1:
                return [self.unit]
            if address == 0x8000 and count == 1:
                return [self.VERSION]
            if address >= 0x1000 and address + count <= 0x1008:
                return self.output_modes[address - 0x1000 : address - 0x1000 + count]
            return ExcCodes.ILLEGAL_ADDRESS
        return ExcCodes.ILLEGAL_FUNCTION

    def write(self, fc: int, address: int, values: Values) -> ExcCodes | None:
        if fc == 15:
            if address + len(values) > 8:
                return ExcCodes.ILLEGAL_ADDRESS
            for i, v in enumerate(values):
                self._command(address + i, bool(v))
            return None
        if fc in (6, 16):
            if address >= 0x1000 and address + len(values) <= 0x1008:
                if any(int(v) not in MODES.values() for v in values):
                    return ExcCodes.ILLEGAL_VALUE
                for i, v in enumerate(values):
                    self.set_mode(address - 0x1000 + i, int(v))
                return None
            return ExcCodes.ILLEGAL_ADDRESS
        return ExcCodes.ILLEGAL_FUNCTION

    def write_coil_raw(self, address: int, raw: int) -> ExcCodes | None:
        hi, ch = address >> 8, address & 0xFF
        if hi == 0:
            targets = range(8) if ch == 0xFF else [ch] if ch < 8 else None
            if targets is None:
                return ExcCodes.ILLEGAL_ADDRESS
            value = standard_coil_value(raw)
            if raw != 0x5500 and value is None:
                return ExcCodes.ILLEGAL_VALUE
            for i in targets:
                self._command(i, not self.outputs[i] if raw == 0x5500 else bool(value))
            return None
        if self.flash and hi in (0x02, 0x04) and ch < 8:
            if not 1 <= raw <= self.MAX_FLASH:
                return ExcCodes.ILLEGAL_VALUE
            on = hi == 0x02
            if self.output_modes[ch] == MODES["linkage"]:
                self.ignored_writes += 1  # answered like any other: the relay follows its input instead
                return None
            self._set(ch, on)
            ms = raw * 100
            self.flashes.append({"channel": ch + 1, "on": on, "ms": ms, "mono": time.monotonic()})
            self._timers[ch] = asyncio.get_running_loop().call_later(ms / 1000, self._set, ch, not on, False)
            return None
        return ExcCodes.ILLEGAL_ADDRESS

    def set_mode(self, ch: int, mode: int) -> None:
        self.output_modes[ch] = mode
        if mode == MODES["linkage"]:
            self._set(ch, self.inputs[ch])

    def set_input(self, ch: int, active: bool) -> None:
        """Input n changes; the output's control mode decides what output n does."""
        old, self.inputs[ch] = self.inputs[ch], active
        mode = self.output_modes[ch]
        if mode == MODES["linkage"]:
            self._set(ch, active)
        elif (mode == MODES["toggle"] and active and not old) or (mode == MODES["edge_trigger"] and active != old):
            self._set(ch, not self.outputs[ch])

    def _command(self, ch: int, value: bool) -> None:
        if self.output_modes[ch] == MODES["linkage"]:
            self.ignored_writes += 1
            return
        self._set(ch, value)

    def _set(self, ch: int, value: bool, cancel_timer: bool = True) -> None:
        timer = self._timers[ch]
        if cancel_timer and timer is not None:
            timer.cancel()
        if cancel_timer or timer is not None:
            self._timers[ch] = None
        self.outputs[ch] = value

    def state(self) -> dict[str, Any]:
        return {
            "outputs": list(self.outputs),
            "inputs": list(self.inputs),
            "output_modes": list(self.output_modes),
            "flashes": self.flashes[-20:],
            "ignored_writes": self.ignored_writes,
        }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m firmware_stubs.modbus_device", description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("relay-d", "io-8ch"), default="relay-d")
    add_common_args(ap)
    args = ap.parse_args(argv)
    endpoints = endpoints_from_args(args, lambda u: IoBoard(u, flash=args.model == "relay-d"))
    stub = StubApp(endpoints)

    async def set_input(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        n = parse_index(request.match_info["n"], 8)
        board: IoBoard = stub.unit_for(body)
        board.set_input(n - 1, stub.flag(body, "active"))
        return {}

    async def set_mode(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        n = parse_index(str(body.get("channel", "")), 8)
        mode = body.get("mode")
        value = MODES.get(mode) if isinstance(mode, str) else mode
        if isinstance(value, bool) or value not in MODES.values():
            raise ControlError(400, f"'mode' must be one of {', '.join(MODES)} (or 0-3), not {mode!r}")
        board: IoBoard = stub.unit_for(body)
        board.set_mode(n - 1, int(value))  # type: ignore[arg-type]
        return {}

    stub.route("POST", "/inputs/{n}", set_input)
    stub.route("POST", "/modes", set_mode)
    asyncio.run(stub.run(args.control, {"model": args.model, "units": args.units}))


def parse_index(text: str, top: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ControlError(400, f"{text!r} is not a number") from None
    if not 1 <= n <= top:
        raise ControlError(404, f"{n} is not 1-{top}")
    return n


if __name__ == "__main__":
    main()
