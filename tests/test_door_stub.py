"""The door-controller firmware stub checked against its documented register map (docs/profiles.md,
"Door controller") with a plain Modbus client and with raw RTU frames on its pseudo-terminal, and its
door model through the control API. The stub is the device side, so it is tested without the driver."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import serial
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.pdu.bit_message import WriteSingleCoilRequest

from devices.profiles import find_profile
from tests.stubs import Stub, run_stub

STUB = "firmware_stubs.door_controller"

pytestmark = pytest.mark.timeout(60)


class RawWriteCoil(WriteSingleCoilRequest):
    """Function 05 with any value field (the pulse commands carry a duration there)."""

    def __init__(self, address: int, raw: int, dev_id: int) -> None:
        super().__init__(dev_id=dev_id, address=address)
        self.raw = raw

    def encode(self) -> bytes:
        return struct.pack(">HH", self.address, self.raw)


@asynccontextmanager
async def controller(*args: str) -> AsyncIterator[tuple[Stub, AsyncModbusTcpClient]]:
    async with run_stub(STUB, "--tcp", "127.0.0.1:0", *args) as stub:
        host, port = stub.endpoint()
        c = AsyncModbusTcpClient(host, port=port, timeout=0.3, retries=0, reconnect_delay=0)
        assert await c.connect()
        try:
            yield stub, c
        finally:
            c.close()


async def unit_state(stub: Stub, unit: int = 1) -> dict[str, Any]:
    st: dict[str, Any] = (await stub.state())["panels"][0]["units"][str(unit)]
    return st


async def inputs(c: AsyncModbusTcpClient, unit: int = 1) -> list[bool]:
    return list((await c.read_discrete_inputs(0, count=8, device_id=unit)).bits[:8])


async def test_the_documented_map() -> None:
    async with controller("--units", "1,9") as (stub, c):
        # Identification: "DC", one door, firmware 1.0, own unit id.
        assert (await c.read_holding_registers(0, count=4, device_id=9)).registers == [0x4443, 1, 0x0100, 9]
        assert (await c.read_holding_registers(4, count=12, device_id=1)).registers == [0] * 12
        assert (await c.read_holding_registers(16, count=1, device_id=1)).registers == [5]
        assert not (await c.write_register(16, 2, device_id=1)).isError()
        assert (await c.read_holding_registers(16, count=1, device_id=1)).registers == [2]
        assert (await c.write_register(16, 0, device_id=1)).exception_code == 3
        assert (await c.write_register(0, 1, device_id=1)).exception_code == 2  # identification is read-only
        assert (await c.read_holding_registers(30, count=4, device_id=1)).exception_code == 2
        # Coils: 0 lock relay, 1 aux output, 2-7 reserved.
        assert (await c.read_coils(0, count=8, device_id=1)).bits[:8] == [False] * 8
        assert not (await c.write_coil(1, True, device_id=1)).isError()
        assert (await c.read_coils(0, count=8, device_id=1)).bits[:8] == [False, True] + [False] * 6
        assert (await c.write_coil(2, True, device_id=1)).exception_code == 2
        assert (await c.execute(False, RawWriteCoil(0, 0x1234, 1))).exception_code == 3
        assert not (await c.write_coils(0, [True, False], device_id=1)).isError()
        assert (await c.read_coils(0, count=2, device_id=1)).bits[:2] == [True, False]
        assert not (await c.write_coil(0, False, device_id=1)).isError()
        # Discrete inputs: 0 door open, 1 exit button, 2 lock released, 3 tamper, 4 aux input.
        assert await inputs(c) == [False] * 8
        await stub.post("/tamper", {"active": True})
        await stub.post("/inputs/aux", {"active": True})
        assert await inputs(c) == [False, False, False, True, True, False, False, False]
        assert await inputs(c, 9) == [False] * 8  # the other controller is untouched
        await stub.post("/tamper", {"active": False, "unit": 1})
        assert (await c.read_discrete_inputs(6, count=4, device_id=1)).exception_code == 2
        assert (await c.read_input_registers(0, count=1, device_id=1)).exception_code == 1


async def test_the_timed_pulse_releases_the_lock_and_ends_by_itself() -> None:
    async with controller() as (stub, c):
        t0 = time.monotonic()
        # 0x0100 + 0: coil 0 on for 25 x 10 ms.
        r = await c.execute(False, RawWriteCoil(0x0100, 25, 1))
        assert not r.isError() and r.address == 0x0100
        assert (await inputs(c))[2] is True  # the lock feedback follows
        assert (await c.read_coils(0, count=1, device_id=1)).bits[0] is True
        await asyncio.sleep(0.4)
        assert (await c.read_coils(0, count=1, device_id=1)).bits[0] is False
        hist = (await unit_state(stub))["relay_history"]
        assert [(h["on"], h["via"], h.get("ms")) for h in hist] == [(True, "pulse", 250), (False, "timer", None)]
        assert t0 < hist[0]["mono"] < hist[1]["mono"] and 0.2 < hist[1]["mono"] - hist[0]["mono"] < 0.35
        assert (await c.execute(False, RawWriteCoil(0x0100, 0, 1))).exception_code == 3
        assert (await c.execute(False, RawWriteCoil(0x0102, 5, 1))).exception_code == 2
        # An off-pulse on the aux output: off for 100 ms, then on again.
        await c.write_coil(1, True, device_id=1)
        assert not (await c.execute(False, RawWriteCoil(0x0201, 10, 1))).isError()
        assert (await c.read_coils(1, count=1, device_id=1)).bits[0] is False
        await asyncio.sleep(0.25)
        assert (await c.read_coils(1, count=1, device_id=1)).bits[0] is True
        # A plain write ends a running pulse; a new pulse replaces one.
        await c.execute(False, RawWriteCoil(0x0100, 100, 1))
        await c.write_coil(0, False, device_id=1)
        await c.execute(False, RawWriteCoil(0x0100, 10, 1))
        await c.execute(False, RawWriteCoil(0x0100, 100, 1))  # 1 s: far past the 100 ms one it replaced
        await asyncio.sleep(0.3)
        assert (await c.read_coils(0, count=1, device_id=1)).bits[0] is True
        await asyncio.sleep(1.0)
        assert (await c.read_coils(0, count=1, device_id=1)).bits[0] is False
        st = await unit_state(stub)
        assert st["relay_sets"] == 4
        await stub.post("/reset")
        assert (await unit_state(stub))["relay_history"] == []


async def test_the_door_opens_only_when_unlocked_or_forced() -> None:
    async with controller() as (stub, c):
        r = await stub.post("/open", expect=409)
        assert "locked" in r["error"]
        assert await inputs(c) == [False] * 8
        await c.execute(False, RawWriteCoil(0x0100, 50, 1))
        assert (await stub.post("/open"))["forced"] is False
        assert (await inputs(c))[:3] == [True, False, True]
        await asyncio.sleep(0.6)  # the lock relocks; the open door stays open
        assert (await inputs(c))[:3] == [True, False, False]
        await stub.post("/close")
        assert (await inputs(c))[0] is False
        assert (await stub.post("/force"))["forced"] is True
        st = await unit_state(stub)
        assert st["door"] == {"open": True, "locked": True, "forced": True, "held": False}
        await stub.post("/close")
        # A door closer: it shuts by itself unless held open.
        await stub.post("/open", {"forced": True, "close_after_ms": 150})
        await asyncio.sleep(0.3)
        assert (await inputs(c))[0] is False
        await stub.post("/hold", {"on": True, "forced": True})
        await asyncio.sleep(0.3)
        assert (await unit_state(stub))["door"]["held"] is True and (await inputs(c))[0] is True
        await stub.post("/hold", {"on": False})
        assert (await inputs(c))[0] is False
        await stub.post("/open", {"forced": "yes"}, expect=400)
        await stub.post("/open", {"unit": 5}, expect=404)


async def test_the_exit_button_releases_the_lock_for_its_time() -> None:
    async with controller() as (stub, c):
        await c.write_register(16, 1, device_id=1)  # exit release time: 1 s
        await stub.post("/exit", {"ms": 200})
        assert (await inputs(c))[:3] == [False, True, True]
        await stub.post("/open")  # from the inside: the lock is released
        await asyncio.sleep(0.3)
        assert (await inputs(c))[:3] == [True, False, True]
        await asyncio.sleep(0.9)
        assert (await inputs(c))[:3] == [True, False, False]
        hist = (await unit_state(stub))["relay_history"]
        assert [(h["on"], h["via"]) for h in hist] == [(True, "exit"), (False, "timer")]
        assert hist[0]["ms"] == 1000


async def test_offline_controller_stops_answering() -> None:
    async with controller("--units", "1-2") as (stub, c):
        await stub.post("/offline", {"on": True, "unit": 2})
        with pytest.raises(ModbusIOException):
            await c.read_discrete_inputs(0, count=8, device_id=2)
        assert await inputs(c, 1) == [False] * 8
        await stub.post("/offline", {"on": False, "unit": 2})
        assert await inputs(c, 2) == [False] * 8


def test_the_profile_matches_the_stub_map() -> None:
    """The shipped profile names the documented addresses (the stub above is the other reading of the map)."""
    p = find_profile("door-controller")
    where = {n: (pt.table, pt.address) for n, pt in p.points.items()}
    assert where["lock_relay"] == ("coil", 0) and where["aux_output"] == ("coil", 1)
    assert [where[n] for n in ("door_open", "exit_button", "lock_released", "tamper", "aux_input")] == [
        ("discrete", i) for i in range(5)
    ]
    assert where["exit_release_s"] == ("holding", 16)
    assert p.pulse is not None and (p.pulse.on_base, p.pulse.off_base, p.pulse.unit_ms) == (0x0100, 0x0200, 10)
    assert p.identify is not None and p.identify.expect == (0x4443, 1, None, None) and p.identify.unit_at == 3


def _crc(frame: bytes) -> bytes:
    crc = 0xFFFF
    for b in frame:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


def _rtu(port: serial.Serial, pdu: bytes, expect: int) -> bytes:
    port.reset_input_buffer()
    port.write(pdu + _crc(pdu))
    answer = port.read(expect)
    assert len(answer) == expect, answer.hex(" ")
    assert _crc(answer[:-2]) == answer[-2:], answer.hex(" ")
    return answer[:-2]


async def test_rtu_frames_on_the_pseudo_terminal() -> None:
    """Byte-level frames, built by hand from the map, on the stub's pseudo-terminal."""
    async with run_stub(STUB, "--rtu-pty", "--units", "3") as stub:
        assert stub.info["modbus"] == f"rtu://{stub.serial}"

        def frames() -> None:
            with serial.Serial(stub.serial, 9600, timeout=1.0) as port:
                assert _rtu(port, bytes.fromhex("03 03 0000 0004"), 13) == bytes.fromhex("03 03 08 4443 0001 0100 0003")
                # The unlock: FC05 to 0x0100 with 300 x 10 ms, echoed; the lock feedback reads released.
                assert _rtu(port, bytes.fromhex("03 05 0100 012c"), 8) == bytes.fromhex("03 05 0100 012c")
                assert _rtu(port, bytes.fromhex("03 02 0000 0008"), 6) == bytes.fromhex("03 02 01 04")
                assert _rtu(port, bytes.fromhex("03 01 0000 0002"), 6) == bytes.fromhex("03 01 01 01")
                assert _rtu(port, bytes.fromhex("03 05 0000 0000"), 8) == bytes.fromhex("03 05 0000 0000")
                assert _rtu(port, bytes.fromhex("03 04 0000 0001"), 5) == bytes.fromhex("03 84 01")

        await asyncio.to_thread(frames)
        hist = (await unit_state(stub, 3))["relay_history"]
        assert [(h["on"], h["via"], h.get("ms")) for h in hist] == [(True, "pulse", 3000), (False, "write", None)]
