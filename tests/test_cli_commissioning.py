"""`gatehouse bus scan`, `device test` and `walktest` against firmware stubs in their own processes
(Modbus RTU on a real pseudo-terminal, Modbus TCP), with the command run as its own process too."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from devices.profiles import find_profile
from gateway import cli, config
from tests.stubs import Stub, run_stub

PANEL = "firmware_stubs.perimeter_panel"
BOARD = "firmware_stubs.modbus_device"
CTRL = ("--control", "127.0.0.1:0")

pytestmark = pytest.mark.timeout(120)


class Cli:
    """`python -m gateway.cli ...` as a child process, read line by line with deadlines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []

    async def line_with(self, needle: str, timeout: float = 20.0) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"exited before printing {needle!r}; printed: {self.out}")
                line = raw.decode().rstrip("\n")
                self.out.append(line)
                if needle in line:
                    return line

    async def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        self.out += out.decode().splitlines()
        return int(self.proc.returncode or 0), "\n".join(self.out), err.decode()


@asynccontextmanager
async def gatehouse(*args: str) -> AsyncIterator[Cli]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    try:
        yield Cli(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def run(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    async with gatehouse(*args) as c:
        return await c.finish(timeout)


def tcp(stub: Stub) -> str:
    host, port = stub.endpoint()
    return f"{host}:{port}"


def make_config(tmp_path: Path, *devices: list[str]) -> Path:
    cfg = tmp_path / "gateway.yaml"
    assert cli.main(["init", "--config", str(cfg), "--site", "estate-a", "--gateway", "gw-1",
                     "--data-dir", str(tmp_path / "data")]) == 0
    for d in devices:
        assert cli.main(["device", "add", *d, "--config", str(cfg)]) == 0, d
    return cfg


# ---------------------------------------------------------------- bus scan


async def test_scan_over_a_pseudo_terminal_finds_exactly_the_stubs_units() -> None:
    async with run_stub(PANEL, "--rtu-pty", "--units", "3,7,40", *CTRL) as stub:
        rc, out, err = await run("bus", "scan", "--serial", stub.serial, "--units", "1-40", "--timeout-ms", "30",
                                 "--json")
        assert rc == 0, err
        found = json.loads(out)["found"]
        assert [(h["unit"], h["profile"]) for h in found] == [(3, "perimeter-panel-8"), (7, "perimeter-panel-8"),
                                                             (40, "perimeter-panel-8")]
        # Progress on stderr (a line every tenth when not on a terminal), ending at the total.
        assert err.splitlines()[0].startswith(f"scanning {stub.serial} 9600 8N1 for unit ids 1-40 (40 ids, 30 ms")
        assert err.splitlines()[-1] == "scanned 40/40"


async def test_scan_over_tcp_tells_the_models_apart(tmp_path: Path) -> None:
    async with run_stub(BOARD, "--model", "relay-d", "--tcp", "127.0.0.1:0", "--units", "2,5", *CTRL) as stub:
        rc, out, err = await run("bus", "scan", "--tcp", tcp(stub), "--units", "1-8", "--timeout-ms", "50")
        assert rc == 0, err
        lines = out.splitlines()
        assert lines[0] == f"scanned 8 ids in {lines[0].split(' in ')[1].split(' s')[0]} s: 2 answered"
        rows = [ln.split() for ln in lines[2:]]
        # Both Waveshare models answer the same identification register; the first name that fits is given.
        assert [r[0] for r in rows] == ["2", "5"]
        assert all(r[1].startswith("waveshare-modbus-rtu-") for r in rows)


async def test_scan_with_nothing_answering_points_at_wiring_and_baud_rate() -> None:
    async with run_stub(PANEL, "--rtu-pty", "--units", "3", *CTRL) as stub:
        await stub.post("/silent", {"on": True})
        rc, out, err = await run("bus", "scan", "--serial", stub.serial, "--units", "1-5", "--timeout-ms", "30")
        assert rc == 1
        assert out.splitlines()[0].startswith("scanned 5 ids in ")
        assert err.splitlines()[-1] == (
            f"no unit answered on {stub.serial} 9600 8N1: check the wiring (A and B swapped?), the termination, and "
            "the baud rate: every id timing out usually means a wrong speed (try --baud 19200, 38400, 4800 ...)")


async def test_scan_refuses_a_port_the_gateway_holds(tmp_path: Path) -> None:
    async with run_stub(PANEL, "--rtu-pty", "--units", "3", *CTRL) as stub:
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import serial, sys; p = serial.Serial(sys.argv[1], exclusive=True); "
            "print('open', flush=True); sys.stdin.read()", stub.serial,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        try:
            assert holder.stdout is not None and (await holder.stdout.readline()).strip() == b"open"
            rc, out, err = await run("bus", "scan", "--serial", stub.serial, "--units", "1-5")
            assert (rc, out) == (2, "")
            assert err.strip() == (f"bus scan: serial port {stub.serial} is busy (held by {holder.pid} (python)); "
                                   "stop that program first (the gateway itself: sudo systemctl stop "
                                   "gatehouse-gateway)")
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            await holder.wait()


# ---------------------------------------------------------------- device test


async def test_device_test_reads_every_point_and_pulses_a_relay(tmp_path: Path) -> None:
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", *CTRL) as stub:
        cfg = make_config(tmp_path, ["p1", "--profile", "perimeter-panel-8", "--unit", "1", "--tcp", tcp(stub),
                                     "--zone", "zone3_alarm=north"])
        await stub.post("/zones/3/trip")
        await stub.post("/reset-counters")
        rc, out, err = await run("device", "test", "p1", "--config", str(cfg), "--pulse", "siren", "--ms", "300")
        assert rc == 0, err
        lines = out.splitlines()
        assert re.match(rf"device p1: perimeter-panel-8, unit 1 on bus tcp-127\.0\.0\.1-\d+ \({tcp(stub)}\): online",
                        lines[0])
        assert lines[1].split() == ["POINT", "KIND", "VALUE", "USED", "BY"]
        values = {ln.split()[0]: ln.split()[2] for ln in lines[2:] if ln.startswith("  ")}
        # Every point of the profile, polled groups and configuration registers alike, read live.
        assert list(values) == list(find_profile("perimeter-panel-8").points)
        assert "(not read)" not in values.values()
        assert values["zone3_alarm"] == "true" and values["zone2_alarm"] == "false"
        assert values["model_id"] == str(0x5050) and values["zone_count"] == "8"
        used_by = {ln.split()[0]: " ".join(ln.split()[3:]) for ln in lines[2:] if ln.startswith("  ")}
        assert used_by["zone3_alarm"] == "zone north" and used_by["zone2_alarm"] == "-"
        assert "pulse siren for 300 ms: on" in lines and "pulse siren: off again" in lines
        state = await stub.state()
        writes = state["panels"][0]["requests"]["by_function"].get("5", 0)
        assert writes == 2  # set, then reset by the bus 300 ms later
        assert state["panels"][0]["units"]["1"]["outputs"]["siren"] is False


async def test_device_test_trip_with_countdown(tmp_path: Path) -> None:
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", *CTRL) as stub:
        cfg = make_config(tmp_path, ["p1", "--profile", "perimeter-panel-8", "--unit", "1", "--tcp", tcp(stub),
                                     "--zone", "zone2_alarm=gate,type=entry"])
        async with gatehouse("device", "test", "p1", "--config", str(cfg), "--trip", "gate", "--countdown", "30") as c:
            await c.line_with("trip zone gate (zone2_alarm) now: waiting 30 s")
            await stub.post("/zones/2/trip")
            line = await c.line_with("tripped after")
            assert re.fullmatch(r"tripped after \d+\.\d s \(zone2_alarm = true\); now let it restore", line)
            await stub.post("/zones/2/restore")
            assert re.fullmatch(r"restored after \d+\.\d s", await c.line_with("restored"))
            rc, _, err = await c.finish()
            assert rc == 0, err
        rc, _, err = await run("device", "test", "p1", "--config", str(cfg), "--trip", "gate", "--countdown", "2")
        assert rc == 1
        assert err.strip() == "device test: zone gate (zone2_alarm) not tripped within 2 s"


async def test_device_test_with_a_wrong_unit_id(tmp_path: Path) -> None:
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", *CTRL) as stub:
        cfg = make_config(tmp_path, ["p9", "--profile", "perimeter-panel-8", "--unit", "9", "--tcp", tcp(stub)])
        rc, out, err = await run("device", "test", "p9", "--config", str(cfg), "--wait", "3")
        assert (rc, out) == (1, "")
        bus = config.load(cfg).buses[0].name
        assert err.strip() == (f"device test: no answer from p9 (unit 9 on bus {bus} ({tcp(stub)})) within 3 s: "
                               "check its unit id (gatehouse bus scan), the wiring, and that its baud rate matches "
                               "the bus")


# ---------------------------------------------------------------- walk test


async def test_walktest_ticks_off_each_point_and_writes_the_report(tmp_path: Path) -> None:
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", *CTRL) as panel, \
            run_stub(BOARD, "--model", "io-8ch", "--tcp", "127.0.0.1:0", *CTRL) as board:
        cfg = make_config(
            tmp_path,
            ["fence", "--profile", "perimeter-panel-8", "--unit", "1", "--tcp", tcp(panel), "--place", "3",
             "--zone", "zone1_alarm=north,label=北围墙", "--zone", "zone2_alarm=gate-beam,type=entry"],
            ["io", "--profile", "waveshare-modbus-rtu-io-8ch", "--unit", "1", "--tcp", tcp(board), "--place", "3/2",
             "--door", "output1=b3-u2,contact=input1,exit=input2"])
        report = tmp_path / "report.html"
        async with gatehouse("walktest", "--config", str(cfg), "--timeout", "60", "--report", str(report),
                             "--by", "Li Wei") as c:
            await c.line_with("walk test of estate-a/gw-1: 4 points")
            steps = [
                (panel, "/zones/1/trip", None, "zone north tripped"), (panel, "/zones/1/restore", None,
                                                                      "zone north restored"),
                (board, "/inputs/1", {"active": True}, "door b3-u2 contact tripped"),
                (board, "/inputs/1", {"active": False}, "door b3-u2 contact restored"),
                (panel, "/zones/2/trip", None, "zone gate-beam tripped"),
                (panel, "/zones/2/restore", None, "zone gate-beam restored"),
                (board, "/inputs/2", {"active": True}, "door b3-u2 exit button tripped"),
                (board, "/inputs/2", {"active": False}, "door b3-u2 exit button restored"),
            ]
            for stub, path, body, expect in steps:
                await stub.post(path, body)
                await c.line_with(expect)
            rc, out, err = await c.finish()
        assert rc == 0, err
        assert out.splitlines()[-1] == f"4 of 4 points tested; report: {report}"
        assert "[4/4] door b3-u2 exit button restored ✓" in out
        page = report.read_text()
        assert "北围墙" in page and "Tested by Li Wei" in page and "— all passed" in page
        data = json.loads(re.search(r'<script type="application/json" id="walktest">(.*)</script>', page,
                                    re.S).group(1))  # type: ignore[union-attr]
        assert [(i["key"], i["result"]) for i in data["items"]] == [
            ("zone north", "ok"), ("zone gate-beam", "ok"), ("door b3-u2 contact", "ok"),
            ("door b3-u2 exit button", "ok")]
        for i in data["items"]:
            assert i["tripped_at"] <= i["restored_at"]
        assert data["items"][0]["place"] == "3" and data["items"][2]["place"] == "3/2"


async def test_walktest_that_is_not_finished_says_so(tmp_path: Path) -> None:
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", *CTRL) as panel:
        cfg = make_config(tmp_path, ["fence", "--profile", "perimeter-panel-8", "--unit", "1", "--tcp", tcp(panel),
                                     "--zone", "zone1_alarm=north", "--zone", "zone2_alarm=south"])
        report = tmp_path / "report.html"
        async with gatehouse("walktest", "--config", str(cfg), "--timeout", "3", "--report", str(report)) as c:
            await c.line_with("walk test of estate-a/gw-1: 2 points")
            await panel.post("/zones/2/trip")
            await c.line_with("zone south tripped")
            rc, out, err = await c.finish()
        assert rc == 1
        assert out.splitlines()[-1] == f"0 of 2 points tested; report: {report}"
        assert err.splitlines() == ["  not complete: zone north (not tested)",
                                    "  not complete: zone south (tripped, not restored)"]
        page = report.read_text()
        assert "0 of 2 points tested" in page and "NOT COMPLETE" in page
