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
from gateway.tooling import scan
from gateway.tooling.scan import ScanProgress
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
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
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
    assert (
        cli.main(
            [
                "init",
                "--config",
                str(cfg),
                "--site",
                "estate-a",
                "--gateway",
                "gw-1",
                "--data-dir",
                str(tmp_path / "data"),
            ]
        )
        == 0
    )
    for d in devices:
        assert cli.main(["device", "add", *d, "--config", str(cfg)]) == 0, d
    return cfg


# ---------------------------------------------------------------- bus scan


async def test_scan_over_a_pseudo_terminal_finds_exactly_the_stubs_units() -> None:
    async with run_stub(PANEL, "--rtu-pty", "--units", "3,7,40", *CTRL) as stub:
        rc, out, err = await run(
            "bus", "scan", "--serial", stub.serial, "--units", "1-40", "--timeout-ms", "100", "--json"
        )
        assert rc == 0, err
        found = json.loads(out)["found"]
        assert [(h["unit"], h["profile"]) for h in found] == [
            (3, "perimeter-panel-8"),
            (7, "perimeter-panel-8"),
            (40, "perimeter-panel-8"),
        ]
        # Progress on stderr (a line every tenth when not on a terminal), ending at the total.
        assert err.splitlines()[0].startswith(f"scanning {stub.serial} 9600 8N1 for unit ids 1-40 (40 ids, 100 ms")
        assert err.splitlines()[-1] == "scanned 40/40"


async def test_scan_says_when_a_relay_d_could_be_an_io_8ch_and_what_it_asked(tmp_path: Path) -> None:
    """Both Waveshare boards answer 0x4000 with their address, and every other read their documents list alike:
    the scan says so, with the probes it asked, instead of naming whichever profile sorts first."""
    async with run_stub(BOARD, "--model", "relay-d", "--tcp", "127.0.0.1:0", "--units", "2,5", *CTRL) as stub:
        rc, out, err = await run("bus", "scan", "--tcp", tcp(stub), "--units", "1-8", "--timeout-ms", "50")
        assert rc == 0, err
        lines = out.splitlines()
        assert lines[0] == f"scanned 8 ids in {lines[0].split(' in ')[1].split(' s')[0]} s: 2 answered"
        rows = [ln.split(None, 2) for ln in lines[2:4]]
        assert [(r[0], r[1]) for r in rows] == [("2", "ambiguous"), ("5", "ambiguous")]
        assert rows[0][2].startswith(
            "ambiguous: waveshare-modbus-rtu-io-8ch or waveshare-modbus-rtu-relay-d answer "
            "the same to every read their makers document (3 probes asked); tell them "
            "apart by eye: "
        )
        assert "Relay (D): 8 relays" in rows[0][2] and "IO 8CH: 8 open-drain outputs" in rows[0][2]
        assert lines[4].startswith("unit 2: probes asked: function 03 at 0x8000 x1: 0x0100; function 03 at 0x1000 x8:")
        rc, out, err = await run("bus", "scan", "--tcp", tcp(stub), "--units", "5", "--timeout-ms", "50", "--json")
        (hit,) = json.loads(out)["found"]
        assert (hit["profile"], hit["candidates"]) == (
            None,
            ["waveshare-modbus-rtu-io-8ch", "waveshare-modbus-rtu-relay-d"],
        )
        assert hit["probes"] == [
            "function 03 at 0x8000 x1: 0x0100",
            "function 03 at 0x1000 x8: 0x0000 0x0000 0x0000 0x0000 0x0000 0x0000 0x0000 0x0000",
            "function 02 at 0x0000 x8: 0x0000 0x0000 0x0000 0x0000 0x0000 0x0000 0x0000 0x0000",
        ]


async def test_scan_uses_the_probes_that_tell_candidates_apart(tmp_path: Path) -> None:
    """A third model (a site profile) also identifies by 0x4000 but documents 16 inputs: the Relay (D) refuses
    that read (exception 2), so the probe rules it out and the scan names the Waveshare board it asked."""
    extra = tmp_path / "profiles"
    extra.mkdir()
    (extra / "acme-relay-16.yaml").write_text(
        """name: acme-relay-16
description: a 16-input relay board that copies the Waveshare address register
identify:
  table: holding
  address: 0x4000
  count: 1
  unit_at: 0
  probes:
    - {table: discrete, address: 0, count: 16}
points:
  input1: {table: discrete, address: 0}
""",
        encoding="utf-8",
    )
    async with run_stub(BOARD, "--model", "relay-d", "--tcp", "127.0.0.1:0", "--units", "3", *CTRL) as stub:
        host, port = stub.endpoint()
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(
            f"site: s\ngateway: g\nprofiles_dir: profiles\nbuses:\n"
            f"  - {{name: b, kind: modbus-tcp, host: {host}, port: {port}}}\n",
            encoding="utf-8",
        )
        rc, out, err = await run(
            "bus",
            "scan",
            "--config",
            str(cfg),
            "--bus",
            "b",
            "--units",
            "1-4",
            "--timeout-ms",
            "50",
            "--profile",
            "acme-relay-16",
            "--profile",
            "waveshare-modbus-rtu-relay-d",
            "--json",
        )
        assert rc == 0, err
        (hit,) = json.loads(out)["found"]
        assert (hit["unit"], hit["profile"], hit["candidates"]) == (3, "waveshare-modbus-rtu-relay-d", [])
        assert hit["detail"] == "told apart from acme-relay-16 by its probes"
        assert "function 02 at 0x0000 x16: exception 2" in hit["probes"]


async def test_scan_asks_a_silent_unit_again_before_giving_up() -> None:
    """A unit that misses its first request (just powered up, a collision) is found on the second; with one try
    it would have been taken for an empty id."""
    async with run_stub(PANEL, "--rtu-pty", "--units", "4,9", "--deaf-first", "1", *CTRL) as stub:
        rc, out, err = await run(
            "bus",
            "scan",
            "--serial",
            stub.serial,
            "--units",
            "1-10",
            "--timeout-ms",
            "50",
            "--profile",
            "perimeter-panel-8",
            "--tries",
            "1",
            "--json",
        )
        assert (rc, json.loads(out)["found"]) == (1, []), err
        await stub.post("/deaf", {"requests": 1})
        rc, out, err = await run(
            "bus",
            "scan",
            "--serial",
            stub.serial,
            "--units",
            "1-10",
            "--timeout-ms",
            "250",  # a loaded machine's pty and stub may take more than 50 ms to answer; the second try is the point
            "--profile",
            "perimeter-panel-8",
        )
        assert rc == 0, err
        rows = [ln.split(None, 2) for ln in out.splitlines()[2:]]
        assert rows == [
            ["4", "perimeter-panel-8", "answered request 2"],
            ["9", "perimeter-panel-8", "answered request 2"],
        ]
        assert "2 tries" in err.splitlines()[0]
        state = (await stub.state())["panels"][0]
        assert state["missed"] == 4 and state["deaf"] == {}


async def test_scan_says_a_unit_that_only_sends_corrupt_frames_is_there_but_the_line_is_wrong() -> None:
    """Unit 7 answers every request with a broken checksum (a wrong parity, no termination, a second master): it is
    listed as there, with what to check, not as a device no profile matches."""
    async with run_stub(PANEL, "--rtu-pty", "--units", "3,7", *CTRL) as stub:
        await stub.post("/garbage", {"on": True, "unit": 7})
        rc, out, err = await run(
            "bus", "scan", "--serial", stub.serial, "--units", "1-8", "--timeout-ms", "150", "--json"
        )
        assert rc == 0, err
        found = {h["unit"]: h for h in json.loads(out)["found"]}
        assert found[3]["profile"] == "perimeter-panel-8"
        assert found[7]["profile"] is None and found[7]["detail"] == scan.GARBLED, found[7]


async def test_scan_with_nothing_answering_points_at_wiring_and_baud_rate() -> None:
    async with run_stub(PANEL, "--rtu-pty", "--units", "3", *CTRL) as stub:
        await stub.post("/silent", {"on": True})
        rc, out, err = await run("bus", "scan", "--serial", stub.serial, "--units", "1-5", "--timeout-ms", "30")
        assert rc == 1
        assert out.splitlines()[0].startswith("scanned 5 ids in ")
        assert err.splitlines()[-1] == (
            f"no unit answered on {stub.serial} 9600 8N1: check the wiring (A and B swapped?), the termination, and "
            "the baud rate: every id timing out usually means a wrong speed (try --baud 19200, 38400, 4800 ...)"
        )


async def test_scan_refuses_a_port_the_gateway_holds(tmp_path: Path) -> None:
    async with run_stub(PANEL, "--rtu-pty", "--units", "3", *CTRL) as stub:
        holder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import serial, sys; p = serial.Serial(sys.argv[1], exclusive=True); "
            "print('open', flush=True); sys.stdin.read()",
            stub.serial,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None and (await holder.stdout.readline()).strip() == b"open"
            rc, out, err = await run("bus", "scan", "--serial", stub.serial, "--units", "1-5")
            assert (rc, out) == (2, "")
            assert err.strip() == (
                f"bus scan: serial port {stub.serial} is busy (held by {holder.pid} (python)); "
                "stop that program first (the gateway itself: sudo systemctl stop "
                "gatehouse-gateway)"
            )
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            await holder.wait()


# ---------------------------------------------------------------- device test


async def test_device_test_reads_every_point_and_pulses_a_relay(tmp_path: Path) -> None:
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", *CTRL) as stub:
        cfg = make_config(
            tmp_path,
            ["p1", "--profile", "perimeter-panel-8", "--unit", "1", "--tcp", tcp(stub), "--zone", "zone3_alarm=north"],
        )
        await stub.post("/zones/3/trip")
        await stub.post("/reset-counters")
        rc, out, err = await run("device", "test", "p1", "--config", str(cfg), "--pulse", "siren", "--ms", "300")
        assert rc == 0, err
        lines = out.splitlines()
        assert re.match(
            rf"device p1: perimeter-panel-8, unit 1 on bus tcp-127\.0\.0\.1-\d+ \({tcp(stub)}\): online", lines[0]
        )
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


async def test_device_test_of_a_relay_d_checks_its_control_modes_and_reads_the_pulse_back(tmp_path: Path) -> None:
    """A Relay (D) whose relay 1 was left in linkage mode and relay 4 in toggle mode: the test names both, and a
    pulse on relay 1 is answered by the board but reported as not having moved."""
    async with run_stub(BOARD, "--model", "relay-d", "--tcp", "127.0.0.1:0", *CTRL) as stub:
        cfg = make_config(
            tmp_path, ["b1", "--profile", "waveshare-modbus-rtu-relay-d", "--unit", "1", "--tcp", tcp(stub)]
        )
        await stub.post("/modes", {"channel": 1, "mode": "linkage"})
        await stub.post("/modes", {"channel": 4, "mode": "toggle"})
        rc, out, err = await run("device", "test", "b1", "--config", str(cfg), "--pulse", "relay1", "--ms", "500")
        assert rc == 1, (out, err)
        assert "b1 is not set up as its profile waveshare-modbus-rtu-relay-d expects" in err
        assert "  relay1_mode = 1 (linkage), expected 0 (normal)" in err.splitlines()
        assert "  relay4_mode = 2 (toggle), expected 0 (normal)" in err.splitlines()
        assert (
            "pulse relay1 for 500 ms: FAILED: read-back: relay1 reads off after the write was answered (the relay "
            "did not move)"
        ) in out.splitlines()
        assert "device test: relay1 was answered but did not move: check the board's control mode" in err
        assert (await stub.state())["panels"][0]["units"]["1"]["ignored_writes"] == 1
        # Put right (as an installer would, with function 06 to 0x1000 and 0x1003): the same test passes.
        await stub.post("/modes", {"channel": 1, "mode": "normal"})
        await stub.post("/modes", {"channel": 4, "mode": "normal"})
        rc, out, err = await run("device", "test", "b1", "--config", str(cfg), "--pulse", "relay1", "--ms", "500")
        assert rc == 0, (out, err)
        lines = out.splitlines()
        assert "settings: as the profile expects" in lines and "pulse relay1 for 500 ms: on" in lines
        assert "pulse relay1: off again" in lines


async def test_device_test_trip_with_countdown(tmp_path: Path) -> None:
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", *CTRL) as stub:
        cfg = make_config(
            tmp_path,
            [
                "p1",
                "--profile",
                "perimeter-panel-8",
                "--unit",
                "1",
                "--tcp",
                tcp(stub),
                "--zone",
                "zone2_alarm=gate,type=entry",
            ],
        )
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
        assert err.strip() == (
            f"device test: no answer from p9 (unit 9 on bus {bus} ({tcp(stub)})) within 3 s: "
            "check its unit id (gatehouse bus scan), the wiring, and that its baud rate matches "
            "the bus"
        )


# ---------------------------------------------------------------- walk test


async def test_walktest_ticks_off_each_point_and_writes_the_report(tmp_path: Path) -> None:
    async with (
        run_stub(PANEL, "--tcp", "127.0.0.1:0", *CTRL) as panel,
        run_stub(BOARD, "--model", "io-8ch", "--tcp", "127.0.0.1:0", *CTRL) as board,
    ):
        cfg = make_config(
            tmp_path,
            [
                "fence",
                "--profile",
                "perimeter-panel-8",
                "--unit",
                "1",
                "--tcp",
                tcp(panel),
                "--place",
                "3",
                "--zone",
                "zone1_alarm=north,label=北围墙",
                "--zone",
                "zone2_alarm=gate-beam,type=entry",
            ],
            [
                "io",
                "--profile",
                "waveshare-modbus-rtu-io-8ch",
                "--unit",
                "1",
                "--tcp",
                tcp(board),
                "--place",
                "3/2",
                "--door",
                "output1=b3-u2,contact=input1,exit=input2",
            ],
        )
        cfg.write_text(cfg.read_text() + "site_name: 阳光花园\n")
        report = tmp_path / "report.html"
        async with gatehouse(
            "walktest", "--config", str(cfg), "--timeout", "60", "--report", str(report), "--by", "Li Wei"
        ) as c:
            await c.line_with("walk test of estate-a/gw-1: 4 points")
            steps = [
                (panel, "/zones/1/trip", None, "zone north tripped"),
                (panel, "/zones/1/restore", None, "zone north restored"),
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
        # In Chinese, with the estate's name, and no English unless asked for (--english)
        assert "北围墙" in page and "测试人：Li Wei" in page and "— 全部通过" in page and "阳光花园" in page
        assert "防区" in page and "门磁" in page and "出门按钮" in page and "周界" in page and "出入" in page
        visible = re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script)\b.*?</\1>", " ", page, flags=re.S))
        english = (
            r"Tested by|all passed|Commissioning|Points|\bok\b|\bzone\b|\bdoor\b|exit button|"
            r"(?<![\w-])perimeter(?![\w-])|\bentry\b|online"
        )
        assert not re.search(english, visible), visible
        await assert_prints_on_a4(report, ["阳光花园", "调试报告", "北围墙", "全部通过", "安装人员签字"])
        data = json.loads(
            re.search(r'<script type="application/json" id="walktest">(.*)</script>', page, re.S).group(1)
        )  # type: ignore[union-attr]
        assert [(i["key"], i["result"]) for i in data["items"]] == [
            ("zone north", "ok"),
            ("zone gate-beam", "ok"),
            ("door b3-u2 contact", "ok"),
            ("door b3-u2 exit button", "ok"),
        ]
        for i in data["items"]:
            assert i["tripped_at"] <= i["restored_at"]
        assert data["items"][0]["place"] == "3" and data["items"][2]["place"] == "3/2"


async def test_walktest_that_is_not_finished_says_so(tmp_path: Path) -> None:
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", *CTRL) as panel:
        cfg = make_config(
            tmp_path,
            [
                "fence",
                "--profile",
                "perimeter-panel-8",
                "--unit",
                "1",
                "--tcp",
                tcp(panel),
                "--zone",
                "zone1_alarm=north",
                "--zone",
                "zone2_alarm=south",
            ],
        )
        report = tmp_path / "report.html"
        async with gatehouse(
            "walktest", "--config", str(cfg), "--timeout", "3", "--report", str(report), "--english"
        ) as c:
            await c.line_with("walk test of estate-a/gw-1: 2 points")
            await panel.post("/zones/2/trip")
            await c.line_with("zone south tripped")
            rc, out, err = await c.finish()
        assert rc == 1
        assert out.splitlines()[-1] == f"0 of 2 points tested; report: {report}"
        assert err.splitlines() == [
            "  not complete: zone north (not tested)",
            "  not complete: zone south (tripped, not restored)",
        ]
        page = report.read_text()
        assert "0 of 2 points tested" in page and "NOT COMPLETE" in page  # English beside the Chinese
        assert "共 2 个测试点，已通过 0 个" in page and "未完成" in page and "已触发，未恢复" in page
        assert "<b>estate-a</b>" in page  # no site_name in the config: the site's own name


async def assert_prints_on_a4(report: Path, texts: list[str]) -> None:
    """The report as the property office prints it: headless Chromium's print to PDF, read back by an
    independent renderer: A4 pages, and the Chinese text there (a font that has it)."""
    import pypdfium2 as pdfium
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        try:
            page = await browser.new_page()
            await page.goto(report.as_uri())
            pdf = await page.pdf(prefer_css_page_size=True)
        finally:
            await browser.close()
    doc = pdfium.PdfDocument(pdf)
    try:
        assert len(doc) == 1
        w, h = doc[0].get_size()
        assert (round(w / 72 * 25.4), round(h / 72 * 25.4)) == (210, 297)
        flat = re.sub(r"\s+", "", doc[0].get_textpage().get_text_range())
    finally:
        doc.close()
    for t in texts:
        assert t in flat, (t, flat)


async def test_scan_shows_each_unit_as_it_is_found_and_the_time_left() -> None:
    """Each unit is named the moment it answers, between the progress lines of the ids before and after it, and
    every progress line before the end says how long is left."""
    async with run_stub(PANEL, "--rtu-pty", "--units", "3,25", *CTRL) as stub:
        rc, out, err = await run(
            "bus",
            "scan",
            "--serial",
            stub.serial,
            "--units",
            "1-40",
            "--timeout-ms",
            "100",  # a loaded machine's pty and stub took more than 30 ms to answer unit 25 twice in a row (CI)
            "--profile",
            "perimeter-panel-8",
        )
        assert rc == 0, err
        assert [ln.split()[0] for ln in out.splitlines()[2:]] == ["3", "25"]  # the table on stdout, as before
        lines = err.splitlines()[1:]
        progress = [
            (i, int(m.group(1)))
            for i, ln in enumerate(lines)
            if (m := re.fullmatch(r"scanned (\d+)/40(?:, about \d+ (?:s|min) left)?", ln))
        ]
        assert len(progress) == len(lines) - 2, lines  # every other line is a unit found
        for i, done in progress:
            assert lines[i].endswith("left") == (done < 40), lines[i]
        assert lines[-1] == "scanned 40/40"
        for unit in (3, 25):
            at = lines.index(f"found unit {unit}: perimeter-panel-8")
            # after a progress line of fewer ids than it, before one that has passed it
            assert max(d for i, d in progress if i < at) < unit <= min(d for i, d in progress if i > at), lines


def test_scan_estimate_is_the_worst_case_first_then_the_pace_so_far() -> None:
    import io

    now = [100.0]
    buf = io.StringIO()
    show = ScanProgress(buf, worst_s_per_id=0.2, clock=lambda: now[0], tty=False)
    show.progress(0, 100)
    assert buf.getvalue() == "scanned 0/100, about 20 s left\n"  # every id silent: 100 x 0.2 s
    now[0] += 1.0  # ten ids done in a second: 90 left at that pace
    show.progress(10, 100)
    assert buf.getvalue().splitlines()[-1] == "scanned 10/100, about 9 s left"
    now[0] += 59.0  # a slow stretch: 60 s for 20 ids, so 80 more take 240 s
    show.progress(20, 100)
    assert buf.getvalue().splitlines()[-1] == "scanned 20/100, about 4 min left"
    show.progress(100, 100)
    assert buf.getvalue().splitlines()[-1] == "scanned 100/100"


@pytest.mark.parametrize("invert", [False, True])
def test_walk_test_reads_a_point_as_active_exactly_as_the_alarm_engine_does(invert: bool) -> None:
    """A text-valued point ("alarm" / "normal", as some panels' status registers decode) trips and restores in
    the walk test when, and only when, the engine would ring and restore: they share one is_active."""
    from devices.events import PointChanged
    from gateway.alarms import is_active
    from gateway.tooling.commissioning import WalkItem, WalkTest

    values: list[object] = [True, False, 0, 1, 2, 0.0, 0.5, "alarm", "normal", "0", "off", "ON", "tamper", None, ""]
    for v in values:
        item = WalkItem("zone z", "zone", "z", "panel", "status", invert=invert)
        walk = WalkTest([item], clock=lambda: 0.0)
        walk.start()
        walk.initial({"panel": {"status": "normal" if not invert else "alarm"}})  # quiet to start with
        walk.feed(PointChanged("panel", "status", v, 0.0))  # type: ignore[arg-type]
        assert (item.tripped_at is not None) == (is_active(v) != invert), v


async def test_walktest_refuses_a_report_it_cannot_write_before_the_walk(tmp_path: Path) -> None:
    """A --report in a folder that does not exist (a typo, the USB stick not mounted) is refused at once, before
    the installer walks the site for half an hour, and nothing is polled."""
    cfg = make_config(
        tmp_path,
        [
            "fence",
            "--profile",
            "perimeter-panel-8",
            "--unit",
            "1",
            "--tcp",
            "127.0.0.1:9",
            "--zone",
            "zone1_alarm=north",
        ],
    )
    for report, says in [
        (tmp_path / "no-such-folder" / "r.html", f"no folder {tmp_path / 'no-such-folder'}; make it first"),
        (tmp_path, "it is a folder; name a file"),
    ]:
        rc, out, err = await run("walktest", "--config", str(cfg), "--timeout", "600", "--report", str(report))
        assert rc == 2
        assert out == ""
        assert err.strip().startswith(f"walktest: cannot write the report to {report}: "), err
        assert says in err


async def test_walktest_whose_report_folder_went_away_writes_it_elsewhere_and_says_where(tmp_path: Path) -> None:
    """The report's folder was fine at the start and is gone at the end (the stick pulled out, the folder removed):
    the results are not lost with a traceback; they go to the temporary folder, and the output says so."""
    import tempfile
    import uuid

    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", *CTRL) as panel:
        cfg = make_config(
            tmp_path,
            [
                "fence",
                "--profile",
                "perimeter-panel-8",
                "--unit",
                "1",
                "--tcp",
                tcp(panel),
                "--zone",
                "zone1_alarm=north",
            ],
        )
        stick = tmp_path / "stick"
        stick.mkdir()
        name = f"walktest-{uuid.uuid4().hex}.html"
        fallback = Path(tempfile.gettempdir()) / name
        try:
            async with gatehouse(
                "walktest", "--config", str(cfg), "--timeout", "3", "--report", str(stick / name)
            ) as c:
                await c.line_with("walk test of estate-a/gw-1: 1 points")
                stick.rmdir()
                rc, out, err = await c.finish()
            assert rc == 1
            assert "Traceback" not in err
            assert out.splitlines()[-1] == f"0 of 1 points tested; report: {fallback}"
            assert err.splitlines()[0] == (
                f"walktest: could not write the report to {stick / name} (No such file or directory); it is in "
                f"{fallback} instead"
            )
            assert "0 of 1 points tested" in fallback.read_text() or "已通过 0 个" in fallback.read_text()
        finally:
            fallback.unlink(missing_ok=True)
