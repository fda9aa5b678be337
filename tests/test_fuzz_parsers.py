"""Every parser of outside input, fuzzed with hypothesis in bounded runs: Modbus RTU and MBAP answers (at the
pymodbus protocol object our bus engine reads through, and end to end against a corrupting peer on a real
socket), Contact ID panel and Sur-Gard lines, QR reader lines, GH1:/GR1: passes, MQTT payloads (wire
decoders, the portal's ingest, the gateway's uplink on a real broker) and the two config files.

Each property says three things: no exception but the parser's own error escapes, nothing is ever taken from
input that failed its check, and a good frame after garbage is decoded (the stream resynchronises).
``EXAMPLES`` holds the number of examples each section runs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import string
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pymodbus.exceptions import ModbusException

from common.configfile import ConfigError
from common.tasks import cancel_and_wait
from devices.contact_id import (
    DC4,
    DIGIT_VALUES,
    CidFramer,
    PanelMessage,
    ReceiverMessage,
    Rejected,
    encode_heartbeat,
    encode_panel,
    encode_receiver,
)
from devices.events import DeviceEvent, PointChanged, Scan
from devices.modbus import BusSpec, DeviceSpec, ModbusBus
from devices.modbus_link import Link
from devices.profiles import find_profile
from devices.qr_reader import MAX_LINE, Line, LineFramer, Parsed, QrReaderLine, ReaderSpec, Refused, parse_line
from gateway import config as gateway_config
from gateway import wire
from gateway.commands import CommandGuard
from gateway.config import GatewayConfig, MqttConfig
from gateway.store import Store as GatewayStore
from gateway.tooling.broker import MosquittoProcess
from gateway.uplink import Uplink
from gateway.wire import passes
from gateway.wire.commands import open_command, sign_command
from portal import config as portal_config
from portal.store import Store as PortalStore
from portal.web.ingest import Ingest
from portal.web.metrics import Metrics
from tests.portal_support import batch_payload, event, store_key, write_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # minutes of bounded fuzzing: not in `make check`

#: Examples per property; the counts the closing note reports.
EXAMPLES = {
    "modbus_rtu_framer": 400,
    "modbus_mbap_framer": 300,
    "modbus_rtu_engine": 10,
    "modbus_mbap_engine": 6,
    "cid_panel": 300,
    "cid_receiver": 300,
    "qr_lines": 300,
    "qr_driver": 150,
    "passes_arbitrary": 400,
    "passes_mutated": 300,
    "revocations_mutated": 200,
    "wire_bytes": 400,
    "wire_json": 300,
    "wire_mutated": 300,
    "portal_ingest": 200,
    "config_structures": 150,
    "config_bytes": 150,
    "config_mutated": 200,
}


def fuzz(name: str, **kw: Any) -> Callable[[Any], Any]:
    return settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        derandomize=True,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        **kw,
    )


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length), as reads from a port arrive."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# ================================================================ (a) Modbus


def crc16(data: bytes) -> bytes:
    """Modbus CRC-16 (poly 0xA001, init 0xFFFF), low byte first; written here from the spec, not pymodbus."""
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return bytes((crc & 0xFF, crc >> 8))


def rtu(unit: int, pdu: bytes) -> bytes:
    return bytes([unit]) + pdu + crc16(bytes([unit]) + pdu)


def bits_pdu(fc: int, bits: list[bool]) -> bytes:
    packed = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        if b:
            packed[i // 8] |= 1 << (i % 8)
    return bytes([fc, len(packed)]) + bytes(packed)


def regs_pdu(fc: int, regs: list[int]) -> bytes:
    return bytes([fc, 2 * len(regs)]) + b"".join(r.to_bytes(2, "big") for r in regs)


def mbap(tid: int, unit: int, pdu: bytes, pid: int = 0) -> bytes:
    return tid.to_bytes(2, "big") + pid.to_bytes(2, "big") + (len(pdu) + 1).to_bytes(2, "big") + bytes([unit]) + pdu


class FramerProbe:
    """The pymodbus protocol object our bus engine's client reads through (built by the engine's own
    ``Link``), fed byte chunks as its transport would feed them."""

    def __init__(self, kind: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.link = Link(BusSpec("fuzz", kind, host="127.0.0.1", port=1), time.monotonic, 0.0)  # type: ignore[arg-type]

        async def make() -> Any:  # pymodbus binds its protocol object to the running loop
            return self.link._make_client()

        self.client = self.loop.run_until_complete(make())
        self.ctx = self.client.ctx

    def close(self) -> None:
        self.loop.close()

    def answer(self, chunks: list[bytes], unit: int, tid: int = 0) -> tuple[Any, bool]:
        """(the PDU handed to the waiting request or None, whether the link would be closed)."""
        ctx = self.ctx
        ctx.recv_buffer = b""  # what ``execute`` does before each request
        ctx.response_future = self.loop.create_future()
        ctx.request_dev_id, ctx.request_transaction_id = unit, tid
        for c in chunks:
            try:
                ctx.datagram_received(c, None)
            except ModbusException:
                # Raised out of data_received: asyncio closes the transport and the engine reconnects.
                return None, True
        fut = ctx.response_future
        return (fut.result() if fut.done() else None), False


def crc_valid_bodies(data: bytes) -> set[bytes]:
    """Every ``data[i+1:j-2]`` whose CRC checks: the only spans a PDU may come from."""
    out = set()
    for i in range(len(data)):
        for j in range(i + 4, len(data) + 1):
            if crc16(data[i : j - 2]) == data[j - 2 : j]:
                out.add(data[i + 1 : j - 2])
    return out


def pdu_from_valid_span(probe: FramerProbe, pdu: Any, data: bytes) -> bool:
    frame = probe.ctx.framer.buildFrame(pdu)
    if frame in data:
        return True  # the re-encoded frame (with its own good CRC) is in the input as it stands
    dec = probe.ctx.framer.decoder
    for body in crc_valid_bodies(data):
        other = dec.decode(body)
        if (
            other is not None
            and type(other) is type(pdu)
            and other.bits == pdu.bits
            and other.registers == pdu.registers
        ):
            return True
    return False


UNIT = 7
bits_st = st.lists(st.booleans(), min_size=1, max_size=40)
regs_st = st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20)


@st.composite
def rtu_answer(draw: st.DrawFn) -> tuple[bytes, list[bool] | list[int]]:
    fc = draw(st.sampled_from([1, 2, 3, 4]))
    if fc in (1, 2):
        bits = draw(bits_st)
        return rtu(UNIT, bits_pdu(fc, bits)), bits
    regs = draw(regs_st)
    return rtu(UNIT, regs_pdu(fc, regs)), regs


@st.composite
def rtu_case(draw: st.DrawFn) -> tuple[str, bytes, bytes | None]:
    """(kind, stream bytes, the one frame that may come out or None)."""
    frame, _ = draw(rtu_answer())
    kind = draw(st.sampled_from(["random", "flip", "truncated", "garbage+valid", "flips", "other-unit"]))
    garbage = draw(st.binary(max_size=40))
    if kind == "random":
        return kind, garbage + draw(st.binary(max_size=60)), None
    if kind == "flip":
        bit = draw(st.integers(0, len(frame) * 8 - 1))
        bad = bytearray(frame)
        bad[bit // 8] ^= 1 << (bit % 8)
        return kind, bytes(bad), None
    if kind == "flips":
        bad = bytearray(frame)
        for bit in draw(st.lists(st.integers(0, len(frame) * 8 - 1), min_size=2, max_size=6, unique=True)):
            bad[bit // 8] ^= 1 << (bit % 8)
        return kind, bytes(bad), None
    if kind == "truncated":
        return kind, frame[: draw(st.integers(0, len(frame) - 1))], None
    if kind == "other-unit":
        return kind, rtu(draw(st.integers(1, 247).filter(lambda u: u != UNIT)), frame[1:-2]), None
    return kind, garbage + frame, frame


def test_modbus_rtu_framer_takes_values_only_from_crc_valid_frames_and_resyncs() -> None:
    probe = FramerProbe("modbus-rtu-over-tcp")
    closed = [0]

    @fuzz("modbus_rtu_framer")
    @given(case=rtu_case(), cuts=st.lists(st.integers(0, 200), max_size=4), after=rtu_answer())
    def prop(case: tuple[str, bytes, bytes | None], cuts: list[int], after: tuple[bytes, list[Any]]) -> None:
        kind, data, frame = case
        pdu, link_closed = probe.answer(chunked(data, cuts), UNIT)
        closed[0] += link_closed
        if pdu is not None:
            assert pdu_from_valid_span(probe, pdu, data), (kind, data.hex())
            if frame is not None and frame in data and crc_valid_bodies(data) == {frame[1:-2]}:
                assert probe.ctx.framer.buildFrame(pdu) == frame
        if kind in ("flip", "truncated", "other-unit"):
            assert pdu is None, (kind, data.hex())  # CRC-16 catches every single-bit error
        # Resync: the next request's clean answer is decoded whatever came before it.
        good, values = after
        pdu2, closed2 = probe.answer(chunked(good, cuts), UNIT)
        assert not closed2 and pdu2 is not None
        assert (pdu2.bits[: len(values)] if good[1] in (1, 2) else pdu2.registers) == values

    try:
        prop()
    finally:
        probe.close()
    assert closed[0] < EXAMPLES["modbus_rtu_framer"] // 4


@st.composite
def mbap_case(draw: st.DrawFn) -> tuple[str, bytes, int]:
    tid = draw(st.integers(1, 65000))
    regs = draw(regs_st)
    pdu = regs_pdu(3, regs)
    kind = draw(st.sampled_from(["pid", "long", "tid", "unit", "random"]))
    if kind == "pid":
        return kind, mbap(tid, UNIT, pdu, pid=draw(st.integers(1, 0xFFFF))), tid
    if kind == "long":  # the length field promises more than comes
        frame = bytearray(mbap(tid, UNIT, pdu))
        frame[4:6] = (len(pdu) + 1 + draw(st.integers(1, 300))).to_bytes(2, "big")
        return kind, bytes(frame), tid
    if kind == "tid":
        return kind, mbap(draw(st.integers(1, 65000).filter(lambda t: t != tid)), UNIT, pdu), tid
    if kind == "unit":
        return kind, mbap(tid, draw(st.integers(1, 247).filter(lambda u: u != UNIT)), pdu), tid
    return kind, draw(st.binary(max_size=80)), tid


def test_modbus_mbap_framer_drops_bad_headers_and_resyncs() -> None:
    probe = FramerProbe("modbus-tcp")

    @fuzz("modbus_mbap_framer")
    @given(case=mbap_case(), cuts=st.lists(st.integers(0, 200), max_size=3), regs=regs_st)
    def prop(case: tuple[str, bytes, int], cuts: list[int], regs: list[int]) -> None:
        kind, data, tid = case
        pdu, _closed = probe.answer(chunked(data, cuts), UNIT, tid)
        if kind != "random":
            assert pdu is None, (kind, data.hex())
        elif pdu is not None:  # only a header naming this request's tid, pid 0 and this unit is read
            assert data[:2] == tid.to_bytes(2, "big") and data[2:4] == b"\0\0" and data[6] == UNIT
        good = mbap(tid + 1, UNIT, regs_pdu(3, regs))
        pdu2, closed2 = probe.answer(chunked(good, cuts), UNIT, tid + 1)
        assert not closed2 and pdu2 is not None and pdu2.registers == regs

    try:
        prop()
    finally:
        probe.close()


class CorruptingPeer:
    """A Waveshare-style 8-in/8-out board on the far side of a real loopback socket (RTU over TCP, or MBAP),
    written from the Modbus spec. Each answer takes the next planned corruption; once the plan is used up
    it answers cleanly. ``bits`` is what the board really reads; the test changes it to see a resync."""

    def __init__(self, framing: str, plan: list[tuple[Any, ...]], bits: list[bool]) -> None:
        self.framing = framing
        self.plan = deque(plan)
        self.bits = list(bits)  # coils 0-7 then discrete inputs 0-7
        self.clean_after_plan = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> CorruptingPeer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self._conns):
            w.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = 8 if self.framing == "rtu" else 12
        self._conns.add(writer)
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while True:
                req = await reader.readexactly(size)
                for out in self._answer(req):
                    writer.write(out)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    def _answer(self, req: bytes) -> list[bytes]:
        if self.framing == "rtu":
            assert crc16(req[:-2]) == req[-2:], req.hex()
            unit, pdu, tid = req[0], req[1:-2], 0
        else:
            tid, unit, pdu = int.from_bytes(req[:2], "big"), req[6], req[7:]
        fc, address, count = pdu[0], int.from_bytes(pdu[1:3], "big"), int.from_bytes(pdu[3:5], "big")
        base = 0 if fc == 1 else 8
        body = bits_pdu(fc, self.bits[base + address : base + address + count])
        if not self.plan:
            self.clean_after_plan += 1
            return [rtu(unit, body) if self.framing == "rtu" else mbap(tid, unit, body)]
        what, *arg = self.plan.popleft()
        if self.framing == "rtu":
            frame = rtu(unit, body)
            if what == "flip":
                bad = bytearray(frame)
                bad[arg[0] % len(bad)] ^= 1 << arg[1]
                return [bytes(bad)]
            if what == "truncate":
                return [frame[: arg[0] % len(frame)]]
            if what == "garbage+valid":
                return [arg[0] + frame]
            if what == "valid+garbage":
                return [frame, arg[0]]
            if what == "other-unit":
                return [rtu(arg[0], body)]
            return [arg[0]]  # garbage only
        frame = mbap(tid, unit, body)
        if what == "pid":
            return [mbap(tid, unit, body, pid=arg[0])]
        if what == "tid":
            return [mbap((tid + arg[0]) % 65536, unit, body)]
        if what == "unit":
            return [mbap(tid, arg[0], body)]
        if what == "long":
            return [frame[:4] + (len(body) + 1 + arg[0]).to_bytes(2, "big") + frame[6:]]
        return [arg[0]]


garbage_st = st.binary(min_size=1, max_size=24)
rtu_plan_st = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 64), st.integers(0, 7)),
        st.tuples(st.just("truncate"), st.integers(0, 64)),
        st.tuples(st.just("garbage+valid"), garbage_st),
        st.tuples(st.just("valid+garbage"), garbage_st),
        st.tuples(st.just("other-unit"), st.integers(2, 247)),
        st.tuples(st.just("garbage"), garbage_st),
    ),
    min_size=1,
    max_size=6,
)
mbap_plan_st = st.lists(
    st.one_of(
        st.tuples(st.just("pid"), st.integers(1, 0xFFFF)),
        st.tuples(st.just("tid"), st.integers(1, 1000)),
        st.tuples(st.just("unit"), st.integers(2, 247)),
        st.tuples(st.just("long"), st.integers(1, 200)),
        st.tuples(st.just("garbage"), garbage_st),
    ),
    min_size=1,
    max_size=5,
)


async def _bus_against(framing: str, plan: list[tuple[Any, ...]], truth: list[bool]) -> None:
    """Poll the peer through the real engine while it corrupts answers, then flip every input: no value but
    the peer's real one may ever be reported, and the flipped values must come through (resync)."""
    events: list[DeviceEvent] = []
    points = [f"output{n}" for n in range(1, 9)] + [f"input{n}" for n in range(1, 9)]
    async with CorruptingPeer(framing, plan, truth) as peer:
        kind = "modbus-rtu-over-tcp" if framing == "rtu" else "modbus-tcp"
        spec = BusSpec(
            "fz",
            kind,
            host="127.0.0.1",
            port=peer.port,
            timeout_ms=80,
            retries=1,
            inter_frame_ms=0,
            offline_after_misses=2,
            offline_poll_ms=40,
            reconnect_min_ms=20,
            reconnect_max_ms=100,
        )
        dev = DeviceSpec("io", find_profile("waveshare-modbus-rtu-io-8ch"), unit=1, poll_ms=15, groups={"outputs": 15})

        def latest() -> dict[str, Any]:
            return {e.point: e.value for e in events if isinstance(e, PointChanged)}

        async def until(cond: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + 15.0
            while not cond():
                assert time.monotonic() < deadline, f"{what}: plan left {list(peer.plan)}, seen {latest()}"
                await asyncio.sleep(0.01)

        async with ModbusBus(spec, [dev], events.append):
            await until(lambda: not peer.plan and peer.clean_after_plan >= 4 and len(latest()) == 16, "settle")
            before = len(events)
            flipped = [not b for b in truth]
            peer.bits = flipped
            await until(lambda: latest() == dict(zip(points, flipped, strict=True)), "the flipped inputs")
    changes = [e for e in events if isinstance(e, PointChanged)]
    expect = dict(zip(points, truth, strict=True))
    wrong = [(e.point, e.value) for e in events[:before] if isinstance(e, PointChanged) and e.value != expect[e.point]]
    assert not wrong, f"values from corrupted answers reached the engine: {wrong} (plan {plan})"
    for p in points:  # after the flip each point moved once, to its new value, and never back
        seq = [e.value for e in changes if e.point == p]
        assert seq[0] == expect[p] and seq[-1] == (not expect[p]) and len(seq) == 2, (p, seq)


@fuzz("modbus_rtu_engine")
@given(plan=rtu_plan_st, truth=st.lists(st.booleans(), min_size=16, max_size=16))
def test_modbus_rtu_engine_reports_no_value_from_a_bad_frame_and_resyncs(plan: list[Any], truth: list[bool]) -> None:
    asyncio.run(_bus_against("rtu", plan, truth))


@fuzz("modbus_mbap_engine")
@given(plan=mbap_plan_st, truth=st.lists(st.booleans(), min_size=16, max_size=16))
def test_modbus_tcp_engine_drops_bad_mbap_headers_and_resyncs(plan: list[Any], truth: list[bool]) -> None:
    asyncio.run(_bus_against("mbap", plan, truth))


# ================================================================ (b) Contact ID

hexdig = "0123456789BCDEF"
panel_msg_st = st.builds(
    PanelMessage,
    account=st.text(alphabet=hexdig, min_size=4, max_size=4),
    message_type=st.sampled_from([18, 98]),
    qualifier=st.sampled_from(["new", "restore", "status"]),
    code=st.integers(0, 999),
    partition=st.integers(0, 99),
    zone=st.integers(0, 999),
)
receiver_msg_st = st.builds(
    ReceiverMessage,
    receiver=st.text(alphabet="0123456789ABCDEF", min_size=2, max_size=2),
    line=st.text(alphabet=string.digits + string.ascii_uppercase, min_size=1, max_size=1),
    # no "A": encode_receiver writes it as "0" while parse_receiver keeps it (a spelling, not a fuzzing matter)
    account=st.text(alphabet=hexdig, min_size=4, max_size=4),
    qualifier=st.sampled_from(["new", "restore", "status"]),
    code=st.integers(0, 999),
    partition=st.integers(0, 99),
    zone=st.integers(0, 999),
)


def panel_line_valid(line: bytes) -> bool:
    """Written from docs/contact-id.md: 16 Contact ID digits whose values sum to a multiple of 15."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return False
    return len(text) == 16 and all(c in DIGIT_VALUES for c in text) and sum(DIGIT_VALUES[c] for c in text) % 15 == 0


def checksum_broken(frame: bytes, pos: int, repl: str) -> bytes | None:
    """``frame`` with the digit at ``pos`` replaced by one of a different value (None if that is no change)."""
    body = frame.rstrip(b"\r\n").decode()
    if DIGIT_VALUES[repl] == DIGIT_VALUES[body[pos]]:
        return None
    return (body[:pos] + repl + body[pos + 1 :]).encode() + b"\r\n"


@st.composite
def panel_stream(draw: st.DrawFn) -> tuple[bytes, list[PanelMessage]]:
    parts: list[bytes] = []
    good: list[PanelMessage] = []
    for _ in range(draw(st.integers(1, 8))):
        what = draw(st.sampled_from(["good", "soup", "broken", "overlong"]))
        term = draw(st.sampled_from([b"\r\n", b"\r", b"\n"]))
        if what == "good":
            msg = draw(panel_msg_st)
            parts.append(encode_panel(msg, term))
            good.append(msg)
        elif what == "broken":
            frame = encode_panel(draw(panel_msg_st))
            bad = checksum_broken(frame, draw(st.integers(0, 15)), draw(st.sampled_from(sorted(DIGIT_VALUES))))
            assume(bad is not None)
            parts.append(bad)  # type: ignore[arg-type]
        else:
            soup = draw(st.binary(min_size=33, max_size=90) if what == "overlong" else st.binary(max_size=40))
            assume(not any(panel_line_valid(x) for x in re.split(rb"[\r\n]", soup)))
            parts.append(soup + term)
    return b"".join(parts), good


@fuzz("cid_panel")
@given(stream=panel_stream(), cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_contact_id_panel_stream_yields_exactly_the_valid_frames(
    stream: tuple[bytes, list[PanelMessage]], cuts: list[int]
) -> None:
    data, good = stream
    framer = CidFramer("panel")
    out = [item for c in chunked(data, cuts) for item in framer.feed(c)]
    msgs = [i for i in out if not isinstance(i, Rejected)]
    assert msgs == good
    assert all(i.reason in ("checksum", "malformed", "overlong", "unsupported") for i in out if isinstance(i, Rejected))
    assert len(framer._buf) <= 2 * 32 + 2  # memory stays bounded whatever arrived


@st.composite
def receiver_stream(draw: st.DrawFn) -> tuple[bytes, list[Any]]:
    parts: list[bytes] = []
    good: list[Any] = []
    for _ in range(draw(st.integers(1, 8))):
        what = draw(st.sampled_from(["good", "heartbeat", "soup", "overlong"]))
        if what == "good":
            msg = draw(receiver_msg_st)
            parts.append(encode_receiver(msg))
            good.append(msg)
        elif what == "heartbeat":
            parts.append(encode_heartbeat())
            good.append("heartbeat")
        else:
            soup = draw(st.binary(min_size=129, max_size=300) if what == "overlong" else st.binary(max_size=40))
            for piece in soup.split(DC4):
                text = piece.strip(b"\r\n")
                assume(not (text[:1] in (b"1", b"5") and len(text) in (16, 20)))
            parts.append(soup + DC4)
    return b"".join(parts), good


@fuzz("cid_receiver")
@given(stream=receiver_stream(), cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_contact_id_receiver_stream_yields_exactly_the_valid_lines(
    stream: tuple[bytes, list[Any]], cuts: list[int]
) -> None:
    data, good = stream
    framer = CidFramer("receiver")
    out = [item for c in chunked(data, cuts) for item in framer.feed(c)]
    got = ["heartbeat" if type(i).__name__ == "Heartbeat" else i for i in out if not isinstance(i, Rejected)]
    assert got == good
    assert len(framer._buf) <= 2 * 128 + 2


# ================================================================ (c) QR reader lines

printable_st = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=80)


@st.composite
def qr_stream(draw: st.DrawFn) -> tuple[bytes, bytes]:
    junk = draw(
        st.one_of(
            st.binary(max_size=80),  # anything: NUL, bad UTF-8, stray terminators
            st.binary(min_size=MAX_LINE + 1, max_size=MAX_LINE + 300),  # overlong
            st.text(max_size=40).map(lambda t: t.encode("utf-8")),  # UTF-8 that is not ASCII
            st.builds(lambda a, t: b"@%d:" % a + t.encode(), st.integers(0, 999), printable_st),  # any address
        )
    )
    good = draw(printable_st).encode()
    term = draw(st.sampled_from([b"\r\n", b"\r", b"\n"]))
    return junk + term + good + term, good


@fuzz("qr_lines")
@given(stream=qr_stream(), cuts=st.lists(st.integers(0, 1200), max_size=8))
def test_qr_framer_refuses_junk_and_accepts_the_next_good_line(stream: tuple[bytes, bytes], cuts: list[int]) -> None:
    data, good = stream
    framer = LineFramer()
    out = [item for c in chunked(data, cuts) for item in framer.feed(c)]
    for item in out:
        assert isinstance(item, Line | Refused)
        if isinstance(item, Line):
            assert 1 <= len(item.data) <= MAX_LINE and all(0x20 <= b <= 0x7E for b in item.data)
            for addressed in (False, True):
                assert isinstance(parse_line(item.data, addressed), Parsed | str)
    assert out and out[-1] == Line(good)
    assert len(framer._buf) <= MAX_LINE


@fuzz("qr_driver")
@given(
    junk=st.lists(
        st.one_of(
            st.binary(max_size=60), st.builds(lambda a, t: b"@%d:" % a + t.encode(), st.integers(0, 400), printable_st)
        ),
        max_size=5,
    ),
    address=st.sampled_from([3, 17]),
    text=printable_st,
)
def test_qr_driver_counts_each_refusal_and_scans_the_next_good_line(junk: list[bytes], address: int, text: str) -> None:
    events: list[Any] = []
    line = QrReaderLine("l1", "/dev/null", [ReaderSpec("r3", address=3), ReaderSpec("r17", address=17)], events.append)
    data = b"".join(j.replace(b"\r", b"").replace(b"\n", b"") + b"\n" for j in junk)
    data += b"@%d:%s\r\n" % (address, text.encode())
    framer = LineFramer()
    items = framer.feed(data)
    for item in items:
        line._handle(item)  # the SerialLine's callback for each framed item
    scans = [e for e in events if isinstance(e, Scan)]
    assert scans[-1].reader == f"r{address}" and scans[-1].text == text
    stats = line.stats()
    refused = sum(v for k, v in stats.items() if k.startswith("rejected_"))
    assert stats["lines"] + refused == sum(1 for i in items)  # every line is either taken or counted
    for s in scans:  # a scan comes only from a line addressed to one of the readers
        assert s.reader in ("r3", "r17")


# ================================================================ (d) passes

_PRIV, _PUB = passes.generate_keypair()
_RING = passes.keyring([_PUB])
_FIELDS = passes.PassFields(
    kind="visitor",
    site="s1",
    subject="v-1",
    not_before=1_700_000_000,
    not_after=1_700_086_400,
    house="101",
    units=("3/1",),
    doors=("gate-1",),
    uses=3,
)
_PASS = passes.sign_pass(_PRIV, _FIELDS)
_RL = passes.sign_revocations(
    _PRIV,
    passes.RevocationList(
        version=7, issued_at=1_700_000_000, site="s1", passes=[b"p" * 12], subjects=["alice"], blocked=["bob"]
    ),
)
REASONS = {"malformed", "unknown-key", "bad-signature"}


@fuzz("passes_arbitrary")
@given(
    text=st.one_of(
        st.text(max_size=600),
        st.binary(max_size=600),
        st.text(alphabet=string.ascii_uppercase + "234567=", max_size=300).map(lambda t: "GH1:" + t),
        st.text(alphabet=string.ascii_letters + string.digits + "-_+/=", max_size=300).map(lambda t: "GR1:" + t),
    )
)
def test_arbitrary_text_is_refused_with_a_reason(text: str | bytes) -> None:
    for parse in (passes.parse_pass, passes.parse_revocations):
        with pytest.raises(passes.PassError) as e:
            parse(text, _RING)
        assert e.value.reason in REASONS


def _mutations(valid: str, alphabet: str) -> Any:
    return st.tuples(
        st.integers(0, len(valid) - 1),
        st.sampled_from(alphabet + "=+/-_ !\x00é\n"),
        st.sampled_from(["replace", "insert", "delete"]),
    )


def _mutate(valid: str, m: tuple[int, str, str]) -> str:
    i, c, how = m
    if how == "replace":
        return valid[:i] + c + valid[i + 1 :]
    if how == "insert":
        return valid[:i] + c + valid[i:]
    return valid[:i] + valid[i + 1 :]


@fuzz("passes_mutated")
@given(m=_mutations(_PASS, string.ascii_uppercase + "234567"))
def test_a_pass_changed_in_one_character_never_verifies(m: tuple[int, str, str]) -> None:
    bad = _mutate(_PASS, m)
    assume(bad.strip(" \t\r\n") != _PASS)  # surrounding whitespace is trimmed by design
    with pytest.raises(passes.PassError) as e:
        passes.parse_pass(bad, _RING)
    assert e.value.reason in REASONS
    assert passes.parse_pass(_PASS, _RING).subject == "v-1"


@fuzz("revocations_mutated")
@given(m=_mutations(_RL, string.ascii_letters + string.digits + "-_"))
def test_a_revocation_list_changed_in_one_character_never_verifies(m: tuple[int, str, str]) -> None:
    bad = _mutate(_RL, m)
    assume(bad.strip(" \t\r\n") != _RL)
    with pytest.raises(passes.PassError) as e:
        passes.parse_revocations(bad, _RING)
    assert e.value.reason in REASONS


# ================================================================ (e) MQTT payloads

json_st = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_NOW = "2026-01-02T03:04:05.000006Z"
_SITE, _GW = "s1", "gw1"
_CMD_BODY = {
    "v": 2,
    "id": "c1",
    "type": "unlock",
    "ts": _NOW,
    "expires": _NOW,
    "by": "guard",
    "args": {"door": "d1"},
    "site": _SITE,
    "gateway": _GW,
}
_FUZZ_KEY, _FUZZ_PUB = passes.generate_keypair()
_FUZZ_RING = passes.keyring([_FUZZ_PUB])
_VALID = {
    "cmd": json.loads(
        sign_command(_FUZZ_KEY, wire.decode_command_body(json.dumps(_CMD_BODY).encode()), site=_SITE, gateway=_GW)
    ),
    "cmd-body": _CMD_BODY,
    "ack": {"v": 1, "seqs": [1, 2, 3]},
    "status": {"v": 1, "state": "online", "ts": _NOW, "version": "1.0"},
    "events": json.loads(batch_payload([event(1), event(2)])),
}
_COMMAND_REASONS = {"unsigned", "unknown-key", "bad-signature", "wrong-gateway", "too-long"}


def _decode_any(kind: str, payload: bytes) -> Any:
    if kind == "cmd":
        return open_command(payload, _FUZZ_RING, site=_SITE, gateway=_GW)
    if kind == "cmd-body":
        return wire.decode_command_body(payload)
    if kind == "ack":
        return wire.decode_ack(payload)
    if kind == "status":
        return wire.decode_status(payload)
    return wire.decode_batch(payload, site=_SITE, gateway=_GW)


def _only_wire_error(kind: str, payload: bytes) -> None:
    try:
        msg = _decode_any(kind, payload)
    except wire.WireError as e:
        assert e.reason in {"malformed", "schema", "bad-version", "too-large", "topic-mismatch", *_COMMAND_REASONS}
        return
    assert msgspec.json.decode(wire.encode(msg)) is not None  # what decodes also encodes


kinds_st = st.sampled_from(["cmd", "cmd-body", "ack", "status", "events"])


@fuzz("wire_bytes")
@given(kind=kinds_st, payload=st.binary(max_size=300))
def test_wire_decoders_take_arbitrary_bytes(kind: str, payload: bytes) -> None:
    _only_wire_error(kind, payload)


@fuzz("wire_json")
@given(kind=kinds_st, doc=json_st, depth=st.integers(0, 3000))
def test_wire_decoders_take_arbitrary_json(kind: str, doc: Any, depth: int) -> None:
    _only_wire_error(kind, json.dumps(doc).encode())
    _only_wire_error(kind, json.dumps({**_VALID[kind], "args": doc, "v": 1}).encode())
    _only_wire_error(kind, b'{"v":1,"x":' + b"[" * depth + b"]" * depth + b"}")


def _set_path(doc: Any, path: list[int], value: Any) -> Any:
    """``doc`` with the node reached by following ``path`` (indices into keys or items) replaced."""
    if not path or not isinstance(doc, dict | list) or not doc:
        return value
    if isinstance(doc, dict):
        key = sorted(doc)[path[0] % len(doc)]
        return {**doc, key: _set_path(doc[key], path[1:], value)}
    i = path[0] % len(doc)
    return [*doc[:i], _set_path(doc[i], path[1:], value), *doc[i + 1 :]]


@fuzz("wire_mutated")
@given(kind=kinds_st, path=st.lists(st.integers(0, 50), max_size=5), value=json_st)
def test_wire_decoders_take_mutated_valid_payloads(kind: str, path: list[int], value: Any) -> None:
    _only_wire_error(kind, json.dumps(_set_path(_VALID[kind], path, value)).encode())


def test_portal_ingest_counts_every_bad_payload_and_never_raises(tmp_path: Path) -> None:
    cfg = portal_config.load(write_config(tmp_path / "portal", None))
    topics = [wire.topic(_SITE, _GW, s) for s in ("events", "status", "cmd")] + [
        wire.topic(_SITE, "gw9", "events"),
        "gatehouse/v1/s1",
        "gatehouse/v2/s1/gw1/events",
        "x/y/z/w/v",
    ]

    async def scenario() -> None:
        store = PortalStore(tmp_path / "p.db", key=store_key(tmp_path / "p.db"))
        await store.start()
        ingest = Ingest(cfg, store, Metrics())
        seen = {"n": 0, "bad": 0}

        @fuzz("portal_ingest")
        @given(
            topic=st.sampled_from(topics),
            payload=st.one_of(
                st.binary(max_size=200),
                json_st.map(lambda d: json.dumps(d).encode()),
                st.builds(
                    lambda k, p, v: json.dumps(_set_path(_VALID[k], p, v)).encode(),
                    st.sampled_from(["events", "status"]),
                    st.lists(st.integers(0, 50), max_size=4),
                    json_st,
                ),
            ),
        )
        def prop(topic: str, payload: bytes) -> None:
            before = sum(ingest.rejections.values())
            fut = asyncio.run_coroutine_threadsafe(ingest.handle(topic, payload), loop)
            fut.result(timeout=10)
            seen["n"] += 1
            rejected = sum(ingest.rejections.values()) - before
            assert rejected in (0, 1)
            seen["bad"] += rejected
            if rejected == 0:  # accepted: it must really be a good message for a known gateway
                site, gw, suffix = wire.parse_topic(topic)
                assert (site, gw) == (_SITE, _GW) and suffix in ("events", "status")
                if payload:
                    _decode_any(suffix, payload)

        loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(prop)  # hypothesis drives from a thread; each message is handled on this loop
        finally:
            await store.close()
        assert seen["n"] == EXAMPLES["portal_ingest"] and seen["bad"] > 0

    asyncio.run(scenario())


async def test_gateway_uplink_hands_every_command_to_the_guard_counts_bad_acks_and_stays_connected(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """The uplink is transport only: every payload on the command topic goes to the gateway's command guard as it
    came (only a correctly signed one is admitted there); a bad ack is counted; nothing costs the connection."""
    import aiomqtt

    cfg = GatewayConfig(
        site=_SITE,
        gateway=_GW,
        mqtt=MqttConfig(host="127.0.0.1", port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.5),
    )
    got: list[bytes] = []

    async def on_command(payload: bytes) -> None:
        got.append(payload)

    bad = [
        b"",
        b"\xff\xfe",
        b"null",
        b"[]",
        b'{"v":2}',
        b'{"v":1,"args":' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"{" * 100_000,
        b'{"v": 1, "id": 5}',
        json.dumps({**_CMD_BODY, "v": 1}).encode(),
        json.dumps({**_VALID["cmd"], "sig": _VALID["cmd"]["sig"][::-1]}).encode(),
        b" " * 300_000,
    ]
    now = wire.utcnow()
    good = sign_command(
        _FUZZ_KEY,
        wire.Command(v=2, id="c-good", type="unlock", ts=now, expires=now, by="guard"),
        site=_SITE,
        gateway=_GW,
    )
    bad_acks = [b"{}", b'{"v":1,"seqs":[0]}', b'{"v":1,"seqs":"x"}', b"[" * 3000 + b"]" * 3000]
    async with GatewayStore(tmp_path / "gw.db", site=_SITE, gateway=_GW) as store:
        up = Uplink(cfg, store, on_command)
        task = asyncio.create_task(up.run())
        try:
            deadline = time.monotonic() + 15
            while not up.stats.connected:
                assert time.monotonic() < deadline, "uplink never connected"
                await asyncio.sleep(0.02)
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="fuzz-portal") as c:
                for p in bad:
                    await c.publish(wire.topic(_SITE, _GW, "cmd"), p, qos=1)
                for p in bad_acks:
                    await c.publish(wire.topic(_SITE, _GW, "ack"), p, qos=1)
                await c.publish(wire.topic(_SITE, _GW, "cmd"), good, qos=1)
            deadline = time.monotonic() + 15
            while len(got) < len(bad) + 1:
                assert time.monotonic() < deadline, f"only {len(got)} commands arrived; rejected {up.stats.rejected}"
                await asyncio.sleep(0.02)
            assert got == [*bad, good]
            assert sum(up.stats.rejected.values()) == len(bad_acks), up.stats.rejected
            assert up.stats.commands == len(bad) + 1
            assert up.stats.connects == 1  # no payload cost the uplink its connection
            guard = CommandGuard(_SITE, _GW, _FUZZ_RING, seen=store.seen_command)
            admitted = [r for r in [await guard.admit(p) for p in got] if isinstance(r, wire.Command)]
            assert [c.id for c in admitted] == ["c-good"]
            assert sum(guard.refused.values()) == len(bad)
        finally:
            await cancel_and_wait("the test's task", [task])


# ================================================================ (f) config files

README = Path(__file__).resolve().parents[1] / "README.md"
_GATEWAY_EXAMPLE = re.search(r"```yaml\n(site: .*?)```", README.read_text(encoding="utf-8"), re.S).group(1)  # type: ignore[union-attr]
_WHOLE_FILE = ("cannot read", "not valid YAML")


def _load_checked(path: Path, text: str | bytes) -> None:
    """Both loaders on the file: a valid config, or a ConfigError whose every problem names the file and
    (unless it is about the whole file) the line."""
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    for load in (lambda p: gateway_config.load(p), portal_config.load):
        try:
            load(path)
        except ConfigError as e:
            assert e.problems
            for problem in e.problems:
                assert problem.startswith(f"{path}"), problem
                rest = problem[len(str(path)) :]
                assert re.match(r":\d+: ", rest) or any(w in rest[:40] for w in _WHOLE_FILE), problem


config_keys = st.sampled_from(
    [
        "site",
        "gateway",
        "mqtt",
        "port",
        "host",
        "buses",
        "devices",
        "zones",
        "name",
        "kind",
        "unit",
        "doors",
        "readers",
        "access",
        "timezone",
        "gateways",
        "listen",
        "alarms",
        "site_maps",
        "data_dir",
        "<<",
        "checklists",
        "points",
        "serial",
    ]
)
yaml_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**20)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["s1", "gw1", "modbus-rtu", "/dev/ttyUSB0", "Asia/Shanghai", "12:00", "0123"])
)
yaml_doc = st.recursive(
    yaml_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(config_keys | st.text(max_size=6), inner, max_size=5),
    max_leaves=25,
)


@fuzz("config_structures")
@given(doc=st.dictionaries(config_keys, yaml_doc, max_size=6), flow=st.booleans())
def test_config_loaders_take_arbitrary_yaml_structures(
    tmp_path_factory: pytest.TempPathFactory, doc: Any, flow: bool
) -> None:
    from io import StringIO

    from ruamel.yaml import YAML

    y = YAML(typ="safe")
    y.default_flow_style = flow
    buf = StringIO()
    y.dump(doc, buf)
    _load_checked(tmp_path_factory.mktemp("cfg") / "c.yaml", buf.getvalue())


@fuzz("config_bytes")
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=200)))
def test_config_loaders_take_arbitrary_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes | str) -> None:
    _load_checked(tmp_path_factory.mktemp("cfg") / "c.yaml", data)


def _portal_example() -> str:
    return (
        "site_name: 阳光花园\ndata_dir: data\nlisten: {host: 127.0.0.1, port: 8080}\n"
        "mqtt:\n  host: 127.0.0.1\n  port: 1883\n  reconnect_min_s: 0.1\n  reconnect_max_s: 1.0\n"
        "gateways:\n  - {site: s1, gateway: gw1, name: 'gw1 机房'}\n"
        "alarms:\n  guards: [张三]\n  checklists: {fire: {zh-CN: [a], en: [b]}}\n"
        "site_maps:\n  - site: s1\n    buildings: [{code: '3', x: 10, y: 10, w: 50, h: 40}]\n"
        "    zones: [{zone: north-fence, points: [[0, 0], [100, 0]]}]\n"
        "trusted_proxies: [127.0.0.1]\ntimezone: Asia/Shanghai\n"
    )


_SNIPPETS = [
    "\x00",
    "\t",
    "'",
    '"',
    "{",
    "}",
    "[",
    "]",
    ": ",
    "- ",
    "&a ",
    "*a",
    "<<: *a",
    "!!binary ",
    "!x ",
    "\n  ",
    "\n",
    "# ",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "? ",
    "|",
    ">",
    "\\",
    "\ufeff",
    "é",
    "999999999999",
]


@fuzz("config_mutated")
@given(
    which=st.sampled_from(["gateway", "portal"]),
    edits=st.lists(
        st.tuples(st.integers(0, 5000), st.integers(0, 6), st.sampled_from(_SNIPPETS) | st.text(max_size=5)),
        min_size=1,
        max_size=4,
    ),
)
def test_config_loaders_take_mutated_example_configs(
    tmp_path_factory: pytest.TempPathFactory, which: str, edits: list[tuple[int, int, str]]
) -> None:
    text = _GATEWAY_EXAMPLE if which == "gateway" else _portal_example()
    for pos, cut, ins in edits:
        i = pos % (len(text) + 1)
        text = text[:i] + ins + text[i + cut :]
    _load_checked(tmp_path_factory.mktemp("cfg") / "c.yaml", text)


def test_examples_load_before_mutation(tmp_path: Path) -> None:
    """The seeds of the mutation fuzzing are valid configs, so a mutation starts from something good."""
    (tmp_path / "g.yaml").write_text(_GATEWAY_EXAMPLE, encoding="utf-8")
    (tmp_path / "p.yaml").write_text(_portal_example(), encoding="utf-8")
    assert gateway_config.load(tmp_path / "g.yaml").site == "sunny-gardens"
    assert portal_config.load(tmp_path / "p.yaml").gateways[0].gateway == "gw1"


def test_yaml_alias_bombs_and_cycles_are_refused_with_a_line(tmp_path: Path) -> None:
    laughs = (
        "site: s1\ngateway: gw1\nx0: &a0 ["
        + ",".join(["x"] * 10)
        + "]\n"
        + "".join(f"x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 9))
    )
    for text, what in (
        (laughs, "aliases are expanded"),
        ("&x [*x]\n", "contains it"),
        ('site: "a\\0b"\n', "NUL"),
        ("a: " + "[" * 80 + "]" * 80 + "\n", "nested deeper"),
    ):
        path = tmp_path / "bomb.yaml"
        path.write_text(text, encoding="utf-8")
        t0 = time.monotonic()
        for load in (gateway_config.load, portal_config.load):
            with pytest.raises(ConfigError) as e:
                load(path)
            assert what in str(e.value) and re.match(rf"{re.escape(str(path))}:\d+: ", str(e.value)), str(e.value)
        assert time.monotonic() - t0 < 5.0
