"""The perimeter-panel firmware stub (and the Waveshare board stub) checked against the documented
register map with a plain Modbus client and with raw RTU frames on its pseudo-terminal: the stub is
the device side, so it is tested without the driver."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
import serial
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from tests.stubs import Stub, run_stub

PANEL = "firmware_stubs.perimeter_panel"
CTRL = ("--control", "127.0.0.1:0")
CONDITIONS = ["alarm", "tamper", "fault", "touch", "cut", "short"]  # discrete inputs 0, 16, 32, 48, 64, 80

pytestmark = pytest.mark.timeout(60)


async def _client(stub: Stub, i: int = 0) -> AsyncModbusTcpClient:
    host, port = stub.endpoint(i)
    c = AsyncModbusTcpClient(host, port=port, timeout=0.3, retries=0, reconnect_delay=0)
    assert await c.connect()
    return c


async def test_the_documented_map() -> None:
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--zones", "16", *CTRL) as stub:
        c = await _client(stub)
        try:
            r = await c.read_discrete_inputs(0, count=96, device_id=1)
            assert r.bits[:96] == [False] * 96
            for k, cond in enumerate(CONDITIONS):
                zone = 1 + (5 * k) % 16
                await stub.post(f"/zones/{zone}/{cond}", {"active": True})
                bits = (await c.read_discrete_inputs(0, count=96, device_id=1)).bits
                assert [i for i in range(96) if bits[i]] == [16 * k + zone - 1], cond
                await stub.post(f"/zones/{zone}/{cond}", {"active": False})
            await stub.post("/zones/7/trip")
            await stub.post("/zones/7/tamper")
            assert [i for i, b in enumerate((await c.read_discrete_inputs(0, count=96, device_id=1)).bits) if b] == [
                6,
                22,
            ]
            await stub.post("/zones/7/restore")
            assert not any((await c.read_discrete_inputs(0, count=96, device_id=1)).bits)

            # Input registers: 0 status bits, 1 battery 0.01 V, 2-3 uptime (high word first),
            # 16+z-1 fence voltage of zone z in 0.1 kV.
            expected = {"ac": (0b0010, 1350), "battery": (0b0100, 1260), "battery-low": (0b1100, 1120)}
            for state, (bits, cv) in expected.items():
                await stub.post("/panel/power", {"state": state})
                regs = (await c.read_input_registers(0, count=4, device_id=1)).registers
                assert regs[:2] == [bits, cv], state
            await stub.post("/panel/tamper", {"active": True})
            assert (await c.read_input_registers(0, count=1, device_id=1)).registers == [0b1101]
            await stub.post("/zones/2/cut")
            await stub.post("/zones/3/short")
            fence = (await c.read_input_registers(16, count=16, device_id=1)).registers
            assert fence[:4] == [80, 0, 3, 80]
            t0 = time.monotonic()
            up = (await c.read_input_registers(2, count=2, device_id=1)).registers
            assert 0 <= (up[0] << 16 | up[1]) < 60 + t0  # seconds since start

            # Holding registers: identification, then the writable siren hold time at 16.
            assert (await c.read_holding_registers(0, count=4, device_id=1)).registers == [0x5050, 16, 0x0102, 1]
            assert not (await c.write_register(16, 90, device_id=1)).isError()
            assert (await c.read_holding_registers(16, count=1, device_id=1)).registers == [90]
            assert (await c.write_register(0, 1, device_id=1)).isError()  # identification is read-only

            # Coils: 0 siren, 1 strobe, 2 aux output.
            assert not (await c.write_coils(0, [True, False, True], device_id=1)).isError()
            assert (await c.read_coils(0, count=3, device_id=1)).bits[:3] == [True, False, True]
            st = (await stub.state())["panels"][0]["units"]["1"]
            assert st["outputs"] == {"siren": True, "strobe": False, "aux_output": True}
            assert st["panel"] == {"tamper": True, "power": "battery-low", "battery_v": 11.2}
            assert [z["fence_kv"] for z in st["zones"][:3]] == [8.0, 0.0, 0.3]

            # Past the map: Modbus exception 2 (illegal data address).
            for resp in [
                await c.read_discrete_inputs(90, count=7, device_id=1),
                await c.read_input_registers(30, count=3, device_id=1),
                await c.write_coil(3, True, device_id=1),
            ]:
                assert resp.isError() and resp.exception_code == 2
            counts = (await stub.state())["panels"][0]["requests"]["by_function"]
            assert counts["2"] >= 10 and counts["4"] >= 5 and counts["15"] == 1
        finally:
            c.close()


async def test_control_api_rejects_bad_requests() -> None:
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "3", *CTRL) as stub:
        async with stub.session.post(stub.control + "/zones/1/trip", data=b"{not json") as r:
            assert r.status == 400 and "JSON" in (await r.json())["error"]
        assert "not 1-8" in (await stub.post("/zones/9/trip", expect=404))["error"]
        assert "unknown condition" in (await stub.post("/zones/1/melt", expect=404))["error"]
        assert "'state'" in (await stub.post("/panel/power", {"state": "solar"}, expect=400))["error"]
        assert "no unit 1" in (await stub.post("/zones/1/trip", {"unit": 1}, expect=404))["error"]
        assert "no panel 4" in (await stub.post("/zones/1/trip", {"panel": 4}, expect=404))["error"]
        assert "'active'" in (await stub.post("/zones/1/cut", {"active": "yes"}, expect=400))["error"]
        assert "'ms'" in (await stub.post("/delay", {"ms": -1}, expect=400))["error"]
        ok = await stub.post("/zones/1/trip", {"unit": 3})
        assert ok["ok"] is True and ok["mono"] > 0
        assert (await stub.state())["panels"][0]["units"]["3"]["zones"][0]["alarm"] is True


async def test_silence_and_delay_per_unit() -> None:
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-2", *CTRL) as stub:
        c = await _client(stub)
        try:
            await stub.post("/silent", {"on": True, "unit": 2})
            assert not (await c.read_discrete_inputs(0, count=8, device_id=1)).isError()
            with pytest.raises(ModbusIOException):
                await c.read_discrete_inputs(0, count=8, device_id=2)
            await stub.post("/silent", {"on": False})
            assert not (await c.read_discrete_inputs(0, count=8, device_id=2)).isError()
            await stub.post("/delay", {"ms": 150})
            t0 = time.monotonic()
            assert not (await c.read_coils(0, count=3, device_id=1)).isError()
            assert time.monotonic() - t0 >= 0.15
            state = (await stub.state())["panels"][0]
            assert state["silent"] == [] and state["delay_ms"] == 150
        finally:
            c.close()


async def test_count_serves_panels_on_consecutive_ports() -> None:
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--count", "3", "--zones", "16", *CTRL) as stub:
        ports = [stub.endpoint(i)[1] for i in range(3)]
        assert ports == [ports[0], ports[0] + 1, ports[0] + 2]
        await stub.post("/zones/16/trip", {"panel": 1})
        for i in range(3):
            c = await _client(stub, i)
            try:
                bits = (await c.read_discrete_inputs(0, count=16, device_id=1)).bits
                assert bits[15] is (i == 1)
            finally:
                c.close()
        await stub.post("/silent", {"panel": "all", "on": True})
        assert all(p["silent"] == "all" for p in (await stub.state())["panels"])


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


def _spawn(*args: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        return proc, json.loads(line)
    except json.JSONDecodeError:
        proc.kill()
        proc.wait()
        raise


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_rtu_frames_on_the_pseudo_terminal() -> None:
    """Byte-level frames, built by hand from the map, on the stub's pseudo-terminal."""
    proc, info = _spawn(PANEL, "--rtu-pty", "--units", "1,7", "--zones", "8", *CTRL)
    try:
        assert info["modbus"] == f"rtu://{info['serial']}"
        with serial.Serial(info["serial"], 9600, timeout=1.0) as port:
            # FC03 identification of unit 7: 0x5050, 8 zones, firmware 0x0102, unit 7.
            assert _rtu(port, bytes.fromhex("07 03 0000 0004"), 13) == bytes.fromhex("07 03 08 5050 0008 0102 0007")
            # FC02 of all 96 inputs of unit 1: 12 data bytes, nothing set.
            assert _rtu(port, bytes.fromhex("01 02 0000 0060"), 17) == bytes.fromhex("01 02 0c") + bytes(12)
            # FC05 siren on: echoed.
            assert _rtu(port, bytes.fromhex("01 05 0000 ff00"), 8) == bytes.fromhex("01 05 0000 ff00")
            # FC05 with a value other than on/off: exception 3.
            assert _rtu(port, bytes.fromhex("01 05 0001 1234"), 5) == bytes.fromhex("01 85 03")
            # A unit that is not there does not answer.
            port.write(bytes.fromhex("02 03 0000 0001") + _crc(bytes.fromhex("02 03 0000 0001")))
            port.timeout = 0.3
            assert port.read(5) == b""
            port.timeout = 1.0
            # Garbage: an answer whose checksum fails.
            req = urllib.request.Request(info["control"] + "/garbage", data=b'{"on": true}', method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                assert json.load(r)["ok"] is True
            port.reset_input_buffer()
            port.write(bytes.fromhex("01 01 0000 0003") + _crc(bytes.fromhex("01 01 0000 0003")))
            junk = port.read(64)
            assert junk and _crc(junk[:-2]) != junk[-2:]
        assert _stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_waveshare_board_stub_commands() -> None:
    """The relay board's vendor commands: all-on at 0x00FF, toggle 0x5500, flash 0x0200 + n."""
    proc, info = _spawn("firmware_stubs.modbus_device", "--model", "relay-d", "--rtu-pty", *CTRL)
    try:
        with serial.Serial(info["serial"], 9600, timeout=1.0) as port:
            assert _rtu(port, bytes.fromhex("01 05 00ff ff00"), 8) == bytes.fromhex("01 05 00ff ff00")
            assert _rtu(port, bytes.fromhex("01 01 0000 0008"), 6) == bytes.fromhex("01 01 01 ff")
            assert _rtu(port, bytes.fromhex("01 05 0000 5500"), 8) == bytes.fromhex("01 05 0000 5500")
            assert _rtu(port, bytes.fromhex("01 01 0000 0008"), 6) == bytes.fromhex("01 01 01 fe")
            _rtu(port, bytes.fromhex("01 0f 0000 0008 01 00"), 8)  # all off with FC0F
            assert _rtu(port, bytes.fromhex("01 05 0203 0003"), 8) == bytes.fromhex("01 05 0203 0003")
            assert _rtu(port, bytes.fromhex("01 01 0000 0008"), 6) == bytes.fromhex("01 01 01 08")
            time.sleep(0.45)  # the board switches relay 4 off by itself after 300 ms
            assert _rtu(port, bytes.fromhex("01 01 0000 0008"), 6) == bytes.fromhex("01 01 01 00")
            assert _rtu(port, bytes.fromhex("01 03 4000 0001"), 7) == bytes.fromhex("01 03 02 0001")
            assert _rtu(port, bytes.fromhex("01 02 0000 0008"), 6) == bytes.fromhex("01 02 01 00")
        assert _stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _post(control: str, path: str, body: dict[str, object]) -> None:
    req = urllib.request.Request(control + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.load(r)["ok"] is True


def test_waveshare_board_stub_control_modes_as_the_maker_documents_them() -> None:
    """Holding 0x1000 + n is relay n+1's control mode (function 03, 06, 10): in linkage the relay follows its
    input and a write is answered but changes nothing; toggle flips it on each activation of the input, edge
    trigger on each change. The flash value is 1-0x7FFF."""
    proc, info = _spawn("firmware_stubs.modbus_device", "--model", "relay-d", "--rtu-pty", *CTRL)
    ctl = info["control"]
    try:
        with serial.Serial(info["serial"], 9600, timeout=1.0) as port:
            assert _rtu(port, bytes.fromhex("01 03 1000 0008"), 21) == bytes.fromhex("01 03 10") + bytes(16)
            # relay 1 to linkage (06), relays 2 and 3 to toggle and edge trigger (10)
            assert _rtu(port, bytes.fromhex("01 06 1000 0001"), 8) == bytes.fromhex("01 06 1000 0001")
            assert _rtu(port, bytes.fromhex("01 10 1001 0002 04 0002 0003"), 8) == bytes.fromhex("01 10 1001 0002")
            assert _rtu(port, bytes.fromhex("01 03 1000 0004"), 13) == bytes.fromhex("01 03 08 0001 0002 0003 0000")
            assert _rtu(port, bytes.fromhex("01 06 1000 0004"), 5) == bytes.fromhex("01 86 03")  # no mode 4
            # linkage: the echo says on, the relay stays with its (inactive) input
            assert _rtu(port, bytes.fromhex("01 05 0000 ff00"), 8) == bytes.fromhex("01 05 0000 ff00")
            assert _rtu(port, bytes.fromhex("01 05 0200 000a"), 8) == bytes.fromhex("01 05 0200 000a")
            assert _rtu(port, bytes.fromhex("01 01 0000 0008"), 6) == bytes.fromhex("01 01 01 00")
            _post(ctl, "/inputs/1", {"active": True})
            _post(ctl, "/inputs/2", {"active": True})
            _post(ctl, "/inputs/3", {"active": True})
            assert _rtu(port, bytes.fromhex("01 01 0000 0008"), 6) == bytes.fromhex("01 01 01 07")
            _post(ctl, "/inputs/1", {"active": False})
            _post(ctl, "/inputs/2", {"active": False})  # toggle: only an activation flips it
            _post(ctl, "/inputs/3", {"active": False})  # edge trigger: every change flips it
            assert _rtu(port, bytes.fromhex("01 01 0000 0008"), 6) == bytes.fromhex("01 01 01 02")
            # normal mode again: writes move the relay; the flash value is limited to 0x7FFF
            assert _rtu(port, bytes.fromhex("01 06 1000 0000"), 8) == bytes.fromhex("01 06 1000 0000")
            assert _rtu(port, bytes.fromhex("01 05 0000 ff00"), 8) == bytes.fromhex("01 05 0000 ff00")
            assert _rtu(port, bytes.fromhex("01 01 0000 0008"), 6) == bytes.fromhex("01 01 01 03")
            assert _rtu(port, bytes.fromhex("01 05 0204 8000"), 5) == bytes.fromhex("01 85 03")
            assert _rtu(port, bytes.fromhex("01 05 0204 7fff"), 8) == bytes.fromhex("01 05 0204 7fff")
        assert _stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_exits_cleanly_and_frees_the_port() -> None:
    proc, info = _spawn(PANEL, "--tcp", "127.0.0.1:0", *CTRL)
    port = int(info["modbus"].rsplit(":", 1)[1])
    t0 = time.monotonic()
    assert _stop(proc) == 0
    assert time.monotonic() - t0 < 5
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_stub_refuses_non_loopback_addresses() -> None:
    proc = subprocess.run([sys.executable, "-m", PANEL, "--tcp", "0.0.0.0:5020"], capture_output=True, timeout=30)
    assert proc.returncode == 2 and b"loopback only" in proc.stderr
