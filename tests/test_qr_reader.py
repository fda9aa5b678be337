"""QR readers: the line framing from byte tables (sans-IO), the driver on real pseudo-terminals with an
injected clock for its heartbeats, and the reader stub checked against the documented line protocol."""

from __future__ import annotations

import asyncio
import os
import select
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from devices.events import Availability, Scan
from devices.qr_reader import MAX_LINE, Line, LineFramer, Parsed, QrReaderLine, ReaderSpec, Refused, parse_line
from tests.stubs import run_stub
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

PASS = b"GH1:" + b"A" * 200


# ---------------------------------------------------------------- framing


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"ABC\r"], [Line(b"ABC")]),
        ([b"ABC\r\n"], [Line(b"ABC")]),
        ([b"ABC\n"], [Line(b"ABC")]),
        ([b"AB", b"C\r"], [Line(b"ABC")]),  # a line split across reads
        ([b"ABC\r", b"\nDEF\r\n"], [Line(b"ABC"), Line(b"DEF")]),  # CR LF split across reads: one terminator
        ([b"ABC\rDEF\r"], [Line(b"ABC"), Line(b"DEF")]),  # two lines in one read
        ([b"\r\n\r\n\n"], []),  # empty lines are ignored
        ([b"ABC"], []),  # no terminator yet
        ([b"A\x00C\r"], [Refused("garbage", 3, b"A\x00C")]),
        ([b"\xff\xfe\r\nOK\r"], [Refused("garbage", 2, b"\xff\xfe"), Line(b"OK")]),
        ([b"A\tB\r"], [Refused("garbage", 3, b"A\tB")]),  # a tab is not printable
        ([b"caf\xc3\xa9\r"], [Refused("garbage", 5, b"caf\xc3\xa9")]),  # UTF-8 is refused, not decoded
        ([b"A" * MAX_LINE + b"\r"], [Line(b"A" * MAX_LINE)]),
        ([b"A" * (MAX_LINE + 1) + b"\rOK\r"], [Refused("overlong", MAX_LINE + 1, b"A" * 16), Line(b"OK")]),
        ([b"A" * 300, b"B" * 300, b"C" * 300, b"\r\nOK\r\n"], [Refused("overlong", 900, b"A" * 16), Line(b"OK")]),
        ([b"\x00" * 2000 + b"\n"], [Refused("overlong", 2000, b"\x00" * 16)]),
    ],
)
def test_line_framing(chunks: list[bytes], expected: list[Line | Refused]) -> None:
    f = LineFramer()
    got: list[Line | Refused] = []
    for c in chunks:
        got += f.feed(c)
    assert got == expected


def test_an_endless_run_without_terminator_keeps_memory_bounded() -> None:
    f = LineFramer()
    for _ in range(1000):
        assert f.feed(b"X" * 1000) == []
    assert len(f._buf) == 0
    assert f.feed(b"\rOK\r") == [Refused("overlong", 1_000_000, b"X" * 16), Line(b"OK")]


@pytest.mark.parametrize(
    ("data", "addressed", "expected"),
    [
        (PASS, False, Parsed(None, False, PASS.decode())),
        (b"!", False, Parsed(None, True, "")),
        (b"@3:" + PASS, True, Parsed(3, False, PASS.decode())),
        (b"@255:x", True, Parsed(255, False, "x")),
        (b"@3!", True, Parsed(3, True, "")),
        (b"@3:", True, Parsed(3, False, "")),
        (PASS, True, "unaddressed"),
        (b"@x:abc", True, "unaddressed"),
        (b"@3:GH1:@4:x", True, Parsed(3, False, "GH1:@4:x")),
        (b"@3:x", False, Parsed(None, False, "@3:x")),  # a lone reader's text is taken whole
    ],
)
def test_addressed_lines(data: bytes, addressed: bool, expected: Parsed | str) -> None:
    assert parse_line(data, addressed) == expected


# ---------------------------------------------------------------- the driver on a pseudo-terminal


@dataclass
class Recorder:
    events: list[Scan | Availability] = field(default_factory=list)

    def __call__(self, ev: Scan | Availability) -> None:
        self.events.append(ev)

    def scans(self) -> list[tuple[str, str]]:
        return [(e.reader, e.text) for e in self.events if isinstance(e, Scan)]

    def availability(self, reader: str) -> list[str]:
        return [e.state for e in self.events if isinstance(e, Availability) and e.device == reader]


@dataclass
class Pty:
    master: int
    slave: int
    path: str

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_available(self, timeout: float = 1.0) -> bytes:
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.master], [], [], 0.05)
            if r:
                out += os.read(self.master, 4096)
            elif out:
                break
        return out


@pytest.fixture
def pty() -> Iterator[Pty]:
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        yield Pty(master, slave, os.ttyname(slave))
    finally:
        os.close(master)
        os.close(slave)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


async def test_scans_garbage_and_overlong_lines_on_a_real_pty(pty: Pty) -> None:
    rec = Recorder()
    line = QrReaderLine("l1", pty.path, [ReaderSpec("qr-1")], rec)
    async with line:
        await asyncio.wait_for(line.wait_open(), 5)
        assert rec.availability("qr-1") == ["online"]  # a plain scan engine: online while its port is open
        pty.write(PASS + b"\r")
        pty.write(b"\x1b[A\x00\xff junk\r\n" + b"Z" * 700 + b"\r\n")
        pty.write(b"SECOND\n")
        await wait_for(lambda: len(rec.scans()) == 2, 5, "two scans")
        assert rec.scans() == [("qr-1", PASS.decode()), ("qr-1", "SECOND")]
        st = line.stats()
        assert (st["scans"], st["rejected_garbage"], st["rejected_overlong"]) == (2, 1, 1)
        assert st["garbage_bytes"] == len(b"\x1b[A\x00\xff junk") + 700
        assert st["polls_sent"] == 0
        scan = next(e for e in rec.events if isinstance(e, Scan))
        assert scan.device == "l1" and abs(scan.mono - time.monotonic()) < 5


async def test_addressed_readers_and_heartbeats(pty: Pty) -> None:
    rec = Recorder()
    clock = FakeClock()
    readers = [ReaderSpec("qr-a", 1, heartbeat_s=5.0, offline_after_misses=2), ReaderSpec("qr-b", 2, heartbeat_s=5.0)]
    line = QrReaderLine("rs485", pty.path, readers, rec, clock=clock, check_interval=3600)
    async with line:
        await asyncio.wait_for(line.wait_open(), 5)
        assert rec.events == []  # polled readers are unknown until they answer
        line.heartbeat()
        assert pty.read_available() == b"@1?\r\n@2?\r\n"
        pty.write(b"@1!\r\n@2!\r\n")
        await wait_for(lambda: line.availability() == {"qr-a": "online", "qr-b": "online"}, 5, "both online")
        pty.write(b"@2:" + PASS + b"\r@9:" + PASS + b"\r" + PASS + b"\r")
        await wait_for(lambda: rec.scans() == [("qr-b", PASS.decode())], 5, "the scan from reader 2")
        await wait_for(lambda: line.stats()["rejected_unaddressed"] == 1, 5, "the unaddressed line counted")
        assert line.stats()["rejected_unknown_address"] == 1
        # Reader 1 falls silent; reader 2 keeps answering.
        for _ in range(2):
            clock.t += 5.0
            line.heartbeat()
            assert pty.read_available() == b"@1?\r\n@2?\r\n"
            pty.write(b"@2!\r\n")
            await wait_for(lambda: line.stats()["heartbeats"] >= 3, 5, "reader 2's answer")
        assert rec.availability("qr-a") == ["online"]  # one miss so far
        clock.t += 5.0
        line.heartbeat()
        assert rec.availability("qr-a") == ["online", "offline"]
        assert rec.availability("qr-b") == ["online"]
        off = next(e for e in rec.events if isinstance(e, Availability) and e.state == "offline")
        assert off.reason == "2 heartbeats unanswered" and off.mono == clock.t
        assert pty.read_available() == b"@1?\r\n@2?\r\n"  # an offline reader is still asked
        clock.t += 1.0
        line.heartbeat()  # not due yet: nothing sent
        assert pty.read_available(0.2) == b""
        pty.write(b"@1:" + PASS + b"\r\n")  # any line brings it back
        await wait_for(lambda: rec.availability("qr-a") == ["online", "offline", "online"], 5, "reader 1 back")


async def test_a_missing_port_is_offline_and_recovers(tmp_path: os.PathLike[str]) -> None:
    rec = Recorder()
    master, slave = os.openpty()
    path = os.ttyname(slave)
    link = f"{tmp_path}/ttyQR"
    line = QrReaderLine("l1", link, [ReaderSpec("qr-1")], rec, reconnect_min=0.05, reconnect_max=0.2)
    try:
        async with line:
            await wait_for(lambda: rec.availability("qr-1") == ["offline"], 5, "offline: no such port")
            os.symlink(path, link)
            await asyncio.wait_for(line.wait_open(), 5)
            assert rec.availability("qr-1") == ["offline", "online"]
            os.write(master, b"HELLO\r")
            await wait_for(lambda: rec.scans() == [("qr-1", "HELLO")], 5, "a scan")
    finally:
        os.close(master)
        os.close(slave)


# ---------------------------------------------------------------- the reader stub


async def test_the_reader_stub_speaks_the_documented_protocol() -> None:
    async with run_stub("firmware_stubs.qr_reader", "--pty", "--addresses", "1,7", "--terminator", "crlf") as stub:
        fd = os.open(stub.serial, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(fd)
            p = Pty(fd, fd, stub.serial)
            await stub.post("/scan", {"text": "GH1:XYZ", "reader": 7})
            assert p.read_available() == b"@7:GH1:XYZ\r\n"
            await stub.post("/scan", {"text": "x"}, expect=400)  # two readers: say which
            await stub.post("/scan", {"text": "x", "reader": 3}, expect=404)
            await stub.post("/overlong", {"reader": 1, "length": 600})
            got = p.read_available()
            assert got == b"@1:" + b"A" * 600 + b"\r\n"
            await stub.post("/garbage", {"reader": 1, "length": 40})
            got = p.read_available()
            assert got.startswith(b"@1:") and got.endswith(b"\r\n") and len(got) == 45
            body = got[3:-2]
            assert b"\r" not in body and b"\n" not in body and any(b < 0x20 or b > 0x7E for b in body)
            os.write(fd, b"@1?\r\n@7?\r\n@9?\r\n?\r\n")
            assert p.read_available() == b"@1!\r\n@7!\r\n"  # reader 9 is not here; a bare ? is not theirs
            await stub.post("/offline", {"reader": 7})
            os.write(fd, b"@1?\r\n@7?\r\n")
            assert p.read_available() == b"@1!\r\n"
            await stub.post("/scan", {"text": "x", "reader": 7}, expect=409)
            r = await stub.post("/scans", {"texts": ["A", "B", "C"], "interval_ms": 30, "reader": 1})
            assert p.read_available() == b"@1:A\r\n@1:B\r\n@1:C\r\n"
            w = r["written"]
            assert len(w) == 3 and 0.05 <= w[2] - w[0] < 0.5
            st = await stub.state()
            assert [(x["address"], x["offline"], x["polls"], x["answers"]) for x in st["readers"]] == [
                (1, False, 2, 2),
                (7, True, 2, 1),
            ]
        finally:
            os.close(fd)


async def test_the_reader_stub_into_the_driver_plain_cr() -> None:
    rec = Recorder()
    async with run_stub("firmware_stubs.qr_reader", "--pty") as stub:
        line = QrReaderLine(
            "l1", stub.serial, [ReaderSpec("qr-1", heartbeat_s=0.2, offline_after_misses=2)], rec, check_interval=0.05
        )
        async with line:
            await wait_for(lambda: rec.availability("qr-1") == ["online"], 5, "the answer to the first poll")
            await stub.post("/garbage")
            await stub.post("/overlong")
            await stub.post("/scan", {"text": "GH1:OK"})
            await wait_for(lambda: rec.scans() == [("qr-1", "GH1:OK")], 5, "the scan")
            await stub.post("/offline", {"on": True})
            await wait_for(lambda: rec.availability("qr-1") == ["online", "offline"], 5, "offline")
            await stub.post("/offline", {"on": False})
            await wait_for(lambda: rec.availability("qr-1") == ["online", "offline", "online"], 5, "back")
            st = line.stats()
            assert (st["rejected_garbage"], st["rejected_overlong"], st["scans"]) == (1, 1, 1)
