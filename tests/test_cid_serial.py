"""The Contact ID driver on real pseudo-terminals: against raw bytes written by the test, and end to
end against the indoor-panel firmware stub running as a process of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devices.cid_receiver import STAT_KEYS, ContactIdLine
from devices.contact_id import ACK, DC4, NAK
from devices.events import Availability, DeviceEvent, PanelReport, Unreadable
from tests.stubs import Stub, start_stub
from tests.waiting import wait_for

STUB = "firmware_stubs.indoor_panel"
DEADLINE = 15.0  # seconds, for anything that crosses a process boundary


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Sink:
    events: list[DeviceEvent] = field(default_factory=list)

    def __call__(self, event: DeviceEvent) -> None:
        self.events.append(event)

    @property
    def reports(self) -> list[PanelReport]:
        return [e for e in self.events if isinstance(e, PanelReport)]

    @property
    def fresh(self) -> list[PanelReport]:
        """Reports that do not repeat the previous message within the duplicate window."""
        return [r for r in self.reports if not r.repeat]

    @property
    def unreadable(self) -> list[Unreadable]:
        return [e for e in self.events if isinstance(e, Unreadable)]

    @property
    def availability(self) -> list[tuple[str, str]]:
        return [(e.state, e.reason) for e in self.events if isinstance(e, Availability)]


# ---------------------------------------------------------------- a pty driven by the test


class RawPty:
    """The far end of a pty, written and read by the test itself."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.received = bytearray()
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _read(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self.received += os.read(self.master, 4096)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    async def expect(self, reply: bytes) -> None:
        await wait_for(lambda: len(self.received) >= len(reply), 5.0, f"reply {reply!r}", step=0.02)
        got = bytes(self.received[: len(reply)])
        del self.received[: len(reply)]
        assert got == reply

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)
        os.close(self.slave)


@contextlib.asynccontextmanager
async def raw_pty() -> AsyncIterator[RawPty]:
    p = RawPty()
    try:
        yield p
    finally:
        p.close()


async def test_panel_mode_replies_and_counts_on_a_pty() -> None:
    clock = FakeClock()
    sink = Sink()
    async with raw_pty() as pty, ContactIdLine("line-1", pty.path, sink, clock=clock, dedupe_window=20.0) as line:
        async with asyncio.timeout(5):
            await line.wait_open()
        good = b"1234181131010158\r\n"
        # a frame written a byte at a time is one report and one ACK
        for b in good:
            pty.send(bytes([b]))
        await pty.expect(ACK)
        assert [(r.account, r.qualifier, r.code, r.partition, r.zone_or_user) for r in sink.reports] == [
            ("1234", "new", 131, 1, 15)
        ]
        assert sink.availability == [("online", "traffic")]
        # the same frame again (our ACK lost): acknowledged again, reported flagged as a repeat (the engine
        # folds it into the open incident, or raises it if a guard closed that meanwhile)
        clock.advance(5)
        pty.send(good)
        await pty.expect(ACK)
        assert [r.repeat for r in sink.reports] == [False, True] and len(sink.fresh) == 1
        # bad checksum, malformed: NAK; well-formed but unsupported: ACK; over-long: silence
        pty.send(b"1234181131010157\r\n")
        await pty.expect(NAK)
        pty.send(b"12341811\r\n")
        await pty.expect(NAK)
        assert sink.unreadable == []  # the sender repeats a NAKed line: nothing is lost yet
        pty.send(b"1234182131010157\r\n")
        await pty.expect(ACK)
        # ...but an intact line we cannot use is lost once acknowledged: said so, with what it looked like
        assert [(u.device, u.reason, u.sample) for u in sink.unreadable] == [
            ("line-1", "unsupported", "1234182131010157")
        ]
        pty.send(b"\x00" * 500 + b"\r\n")
        # two frames in one write (a repeat only counts as one when it follows its original)
        pty.send(b"1234181602000002\r" + b"1234181131010158\n")
        await pty.expect(ACK + ACK)
        assert [r.code for r in sink.fresh] == [131, 602, 131]
        # after the window has passed, a repeat is a new event
        clock.advance(21)
        pty.send(b"1234181131010158\r\n")
        await pty.expect(ACK)
        assert len(sink.fresh) == 4 and len(sink.reports) == 5
        stats = line.stats()
    assert set(stats) == set(STAT_KEYS)
    assert stats["frames"] == 5 and stats["reports"] == 5 and stats["duplicates"] == 1
    assert stats["unreadable"] == 1
    assert stats["rejected_checksum"] == 1
    assert stats["rejected_malformed"] == 1
    assert stats["rejected_unsupported"] == 1
    assert stats["rejected_overlong"] == 1
    assert stats["garbage_bytes"] == 16 + 8 + 500
    assert stats["acks_sent"] == 6 and stats["naks_sent"] == 2
    assert pty.received == b""  # nothing was answered to the over-long line


async def test_panel_mode_silence_timeout_with_injected_clock() -> None:
    clock = FakeClock()
    sink = Sink()
    async with (
        raw_pty() as pty,
        ContactIdLine("line-2", pty.path, sink, clock=clock, silence_timeout=3600.0, check_interval=60.0) as line,
    ):
        async with asyncio.timeout(5):
            await line.wait_open()
        clock.advance(3599)
        line.check_supervision()
        assert line.availability == "unknown"
        clock.advance(2)
        line.check_supervision()
        line.check_supervision()  # logged and emitted once
        assert sink.availability == [("offline", "no message for 3601 s")]
        pty.send(b"1234181602000002\r\n")
        await pty.expect(ACK)
        assert sink.availability[-1] == ("online", "traffic")


async def test_port_lost_then_reopened(tmp_path: Path) -> None:
    """The port disappears (the adapter is unplugged); the driver reports offline, keeps trying,
    and reopens the same name when it comes back (a symlink stands in for /dev/serial/by-id)."""
    sink = Sink()
    link = tmp_path / "ttyCID"
    first = RawPty()
    link.symlink_to(first.path)
    async with ContactIdLine("line-3", str(link), sink, reconnect_min=0.02, reconnect_max=0.1) as line:
        async with asyncio.timeout(5):
            await line.wait_open()
        first.send(b"1234181131010158\r\n")
        await first.expect(ACK)
        first.close()
        await wait_for(lambda: line.availability == "offline", 5.0, "offline after the port went away", step=0.02)
        assert sink.availability[-1][1].startswith("serial port lost")
        async with raw_pty() as second:
            tmp = tmp_path / "ttyCID.new"
            tmp.symlink_to(second.path)
            tmp.replace(link)
            async with asyncio.timeout(5):
                await line.wait_open()
            second.send(b"1234181602000002\r\n")
            await second.expect(ACK)
        assert [r.code for r in sink.reports] == [131, 602]
        assert sink.availability[-1] == ("online", "traffic")
        assert line.stats()["opens"] == 2 and line.stats()["losses"] == 1


async def test_receiver_mode_replies_on_a_pty() -> None:
    clock = FakeClock()
    sink = Sink()
    async with raw_pty() as pty, ContactIdLine("rx-1", pty.path, sink, mode="receiver", clock=clock) as line:
        async with asyncio.timeout(5):
            await line.wait_open()
        pty.send(b"1011           @    " + DC4)
        await pty.expect(ACK)
        pty.send(b"5011 181234E12101001" + DC4)
        await pty.expect(ACK)
        pty.send(b"5011 181234E12101001" + DC4)  # the receiver repeats: our ACK was late
        await pty.expect(ACK)
        pty.send(b"5011 18\x011234E12101001" + DC4)
        await pty.expect(NAK)
        assert [(r.account, r.code, r.zone_or_user) for r in sink.fresh] == [("1234", 121, 1)]
        assert [r.repeat for r in sink.reports] == [False, True]
        assert line.stats()["heartbeats"] == 1 and line.stats()["duplicates"] == 1
        clock.advance(91)
        line.check_supervision()
        assert sink.availability == [("online", "traffic"), ("offline", "no heartbeat for 91 s")]


def _seven_even(data: bytes) -> bytes:
    """Each byte as a 7E1 line carries it when nothing strips the parity bit: even parity in bit 7."""
    return bytes(b | (0x80 if bin(b).count("1") % 2 else 0) for b in data)


async def test_a_receiver_at_its_factory_7e1_is_understood() -> None:
    """A Sur-Gard MLR2-E's automation port comes set to 19200 7E1. On a line configured so, a byte's eighth bit is
    its parity (a serial server passes it on, as here: pyserial's socket:// to a TCP server standing for one; a
    pseudo-terminal refuses parity settings), never data: heartbeats and alarms are read and acknowledged. The same
    bytes on a line left at 8N1 are refused, as they would be on the wire."""
    heartbeat, alarm = b"1011           @    " + DC4, b"5011 181234E12101001" + DC4
    assert _seven_even(alarm) != alarm  # the parity bit is set in some of its bytes
    for framing, want in (({"bytesize": 7, "parity": "E"}, ACK), ({}, NAK)):
        sink = Sink()
        conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        server = await asyncio.start_server(lambda r, w, q=conns: q.put_nowait((r, w)), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with ContactIdLine(
                "rx-7e1", f"socket://127.0.0.1:{port}", sink, mode="receiver", baudrate=19200, **framing
            ):
                async with asyncio.timeout(5):
                    reader, writer = await conns.get()
                    for frame in (heartbeat, alarm):
                        writer.write(_seven_even(frame))
                        assert await reader.readexactly(1) == want, framing
                writer.close()
        finally:
            server.close()
        assert [(r.account, r.code, r.zone_or_user) for r in sink.fresh] == ([("1234", 121, 1)] if want == ACK else [])


# ---------------------------------------------------------------- against the firmware stub


async def wait_idle(s: Stub, delivered: int) -> dict[str, Any]:
    """Until the stub has nothing left to send and ``delivered`` frames were acknowledged."""
    st: dict[str, Any] = {}
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                st = await s.state()
                if st["idle"] and st["delivered"] >= delivered:
                    return st
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"the stub did not deliver {delivered} frames: {st}") from None


@contextlib.asynccontextmanager
async def stub(*args: str) -> AsyncIterator[Stub]:
    s = await start_stub(STUB, "--pty", "--control", "127.0.0.1:0", *args)
    try:
        assert s.serial.startswith("/dev/pts/") and s.control.startswith("http://127.0.0.1:")
        yield s
    finally:
        code = await s.stop()
        await s.session.close()
    assert code == 0, f"the stub exited with {code} on SIGTERM"


FAMILIES: list[tuple[str, dict[str, Any] | None, tuple[str, int, int]]] = [
    ("/zone/3/trip", None, ("new", 130, 3)),
    ("/zone/3/restore", None, ("restore", 130, 3)),
    ("/alarm/fire", {"zone": 5}, ("new", 110, 5)),
    ("/alarm/panic", {"zone": 9}, ("new", 120, 9)),
    ("/alarm/medical", {"zone": 10}, ("new", 100, 10)),
    ("/alarm/gas", {"zone": 6}, ("new", 151, 6)),
    ("/alarm/tamper", {"zone": 2}, ("new", 137, 2)),
    ("/alarm/ac_loss", None, ("new", 301, 0)),
    ("/alarm/ac_loss", {"restore": True}, ("restore", 301, 0)),
    ("/alarm/low_battery", None, ("new", 302, 0)),
    ("/user/7/open", None, ("new", 401, 7)),
    ("/user/7/close", None, ("restore", 401, 7)),
    (
        "/event",
        {"code": 131, "qualifier": "status", "zone": 15, "partition": 2, "account": "BC12"},
        ("status", 131, 15),
    ),
]


@pytest.mark.parametrize("mode", ["panel", "receiver"])
async def test_each_alarm_family_is_reported_once(mode: str) -> None:
    sink = Sink()
    async with (
        stub("--mode", mode, "--account", "1234", "--heartbeat-interval", "0", "--ack-timeout", "5") as s,
        ContactIdLine(
            "line-1",
            s.serial,
            sink,
            mode=mode,  # type: ignore[arg-type]
        ) as line,
    ):
        async with asyncio.timeout(DEADLINE):
            await line.wait_open()
        for path, body, _ in FAMILIES:
            await s.post(path, body)
        st = await wait_idle(s, len(FAMILIES))
        assert st["resends"] == 0 and st["given_up"] == 0
        got = [(r.qualifier, r.code, r.zone_or_user) for r in sink.reports]
        assert got == [want for _, _, want in FAMILIES]
        assert {r.account for r in sink.reports} == {"1234", "BC12"}
        assert sink.reports[-1].partition == 2 and sink.reports[0].partition == 1
        assert line.stats()["duplicates"] == 0


@pytest.mark.parametrize("mode", ["panel", "receiver"])
async def test_lost_ack_is_resent_and_reported_once(mode: str) -> None:
    sink = Sink()
    async with (
        stub("--mode", mode, "--ack-timeout", "0.4", "--heartbeat-interval", "0") as s,
        ContactIdLine(
            "line-1",
            s.serial,
            sink,
            mode=mode,  # type: ignore[arg-type]
        ) as line,
    ):
        async with asyncio.timeout(DEADLINE):
            await line.wait_open()
        await s.post("/ignore-acks", {"count": 2})
        await s.post("/alarm/panic", {"zone": 4})
        st = await wait_idle(s, 1)
        assert st["acks_ignored"] == 2 and st["resends"] >= 2 and st["given_up"] == 0
        # the NAK path: a corrupted transmission is refused and sent again
        await s.post("/corrupt-next", {"count": 1})
        await s.post("/alarm/fire", {"zone": 1})
        st = await wait_idle(s, 2)
        assert st["corrupted_transmissions"] == 1 and st["resends"] >= 3 and st["given_up"] == 0
        assert [(r.code, r.zone_or_user) for r in sink.fresh] == [(120, 4), (110, 1)]
        # Every intact transmission was ACKed, every one after the first of its frame was a repeat.
        # (Exact counts: a loaded machine may add a resend of its own after a late ACK.)
        stats = line.stats()
        intact = st["transmissions"] - st["corrupted_transmissions"]
        assert stats["acks_sent"] == intact and stats["duplicates"] == intact - 2
        assert stats["naks_sent"] == 1
        assert stats["rejected_checksum" if mode == "panel" else "rejected_malformed"] == 1


async def test_megabyte_of_garbage_and_bad_checksums() -> None:
    sink = Sink()
    async with stub("--mode", "panel", "--ack-timeout", "0.5") as s, ContactIdLine("line-1", s.serial, sink) as line:
        async with asyncio.timeout(DEADLINE):
            await line.wait_open()
        await s.post("/zone/1/trip")
        await s.post("/bad-checksum", {"count": 5, "code": 110, "zone": 8})
        await s.post("/garbage", {"bytes": 1_000_000, "seed": 7})
        await s.post("/garbage", {"bytes": 3000, "seed": 8})  # ends mid-line: the next frame is merged
        await wait_idle(s, 1)
        # Let the driver catch up, so the NAKs it owes the garbage are not taken by the stub as the
        # answer to the next frame (a line without sequence numbers cannot tell them apart).
        sent = 18 + 5 * 18 + 1_003_000
        await wait_for(lambda: line.stats()["bytes_in"] >= sent, DEADLINE, "the driver to read all of it", step=0.02)
        await s.post("/fragment", {"on": True})
        await s.post("/zone/1/restore")
        st = await wait_idle(s, 2)
        assert st["garbage_bytes_sent"] == 1_003_000 and st["bad_frames_sent"] == 5
        stats = line.stats()
        assert [(r.qualifier, r.code, r.zone_or_user) for r in sink.fresh] == [("new", 130, 1), ("restore", 130, 1)]
        assert stats["rejected_checksum"] >= 5  # random lines may add a few of their own
        # the fire that never arrived intact, and the garbage, were said to be lost
        assert stats["unreadable"] >= 2 and sink.unreadable
        assert stats["rejected_malformed"] > 100 and stats["rejected_overlong"] > 100
        assert stats["garbage_bytes"] > 900_000
        assert stats["bytes_in"] >= 1_003_000
        assert line.availability == "online"


async def test_receiver_heartbeats_and_their_loss() -> None:
    clock = FakeClock()
    sink = Sink()
    async with (
        stub("--mode", "receiver", "--heartbeat-interval", "0.1", "--test-interval", "0.15") as s,
        (
            ContactIdLine("rx-1", s.serial, sink, mode="receiver", clock=clock, dedupe_window=0.0, check_interval=60.0)
        ) as line,
    ):
        async with asyncio.timeout(DEADLINE):
            await line.wait_open()
        await wait_for(
            lambda: line.stats()["heartbeats"] >= 2 and len(sink.reports) >= 2,
            DEADLINE,
            "heartbeats and tests",
            step=0.02,
        )
        assert line.availability == "online"
        assert {(r.code, r.partition, r.zone_or_user) for r in sink.reports} == {(602, 0, 0)}
        await s.post("/silent", {"on": True})
        await asyncio.sleep(0.3)  # let frames already on the line arrive: real time, end to end
        before = line.stats()["bytes_in"]
        clock.advance(91)
        line.check_supervision()
        assert line.availability == "offline"
        assert sink.availability[-1] == ("offline", "no heartbeat for 91 s")
        await asyncio.sleep(0.3)
        assert line.stats()["bytes_in"] == before, "a silent stub still talks"
        await s.post("/silent", {"on": False})
        await wait_for(lambda: line.availability == "online", DEADLINE, "online again on the next heartbeat", step=0.02)
        assert [a for a, _ in sink.availability] == ["online", "offline", "online"]


async def test_stub_control_rejects_bad_requests() -> None:
    async with stub() as s:
        for path, body in [
            ("/event", {"qualifier": "new"}),
            ("/event", {"code": 1000}),
            ("/event", {"code": 130, "qualifier": "later"}),
            ("/event", {"code": 130, "account": "12A4"}),
            ("/alarm/flood", {}),
            ("/zone/x/trip", {}),
            ("/garbage", {"bytes": -1}),
        ]:
            assert (await s.post(path, body, expect=400))["ok"] is False
        assert (await s.state())["frames_sent"] == 0
