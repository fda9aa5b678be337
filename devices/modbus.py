"""The Modbus bus engine: one task (or thread) owns one bus (a TCP connection, a serial line, or RTU frames
tunnelled through a TCP serial server) and everything on it.

It polls each device's point groups at their own intervals in merged block reads, reports changes
as :class:`~devices.events.PointChanged`, tracks availability, puts writes ahead of polls, paces
serial frames, and is the one place that reconnects (capped exponential backoff, full jitter).

A write is not done when the device echoes it: the bus reads the point back at once (ahead of every
poll) and the write succeeds only if the device holds the value written (``WriteResult.confirmed``).
A board that echoes a relay command while its relay is in another control mode fails here. Points
whose profile gives ``expect`` values are checked as they are read: a :class:`~devices.events.DeviceCheck`
is reported whenever the device's list of problems changes (and once at its first reading).
pymodbus's own retry and reconnect logic is switched off (``retries=0``, ``reconnect_delay=0``, no
automatic disconnect after missed answers) so that nothing reconnects behind our back.

Requests and replies are PDU bytes (:mod:`devices.modbus_pdu`): each block's read is built once, and a reply
identical to the block's previous one is not decoded at all. On Modbus TCP the bus speaks MBAP itself: the polls
due together are sent one after the other as each answer comes in, and the socket is read into one buffer kept for
the connection. A connection with several devices behind it runs its poll loop in a thread of its own on a blocking
socket: a request is a ``send`` and a ``recv`` (on the event loop each also cost an ``epoll_wait`` and the loop's
own machinery, more than the whole poll's work), and the event loop hears only of changes, in order, one wake-up
per burst. A connection to one device stays on the event loop, where such buses share its wake-ups (a thread's
wake-up per request cost more). RTU framings (a serial line, a serial server) keep pymodbus's client for the
framing, on the event loop, where the wire, not the CPU, is the cost.

Usage::

    async with ModbusBus(BusSpec("rs485-1", "modbus-rtu", serial="/dev/ttyUSB0"), devices, sink) as bus:
        result = await bus.write(WritePoint("door-1", "relay1", True, token="t1", pulse_ms=3000))
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from common.backoff import backoff_delay
from devices.events import Availability, DeviceCheck, DeviceEvent, PointChanged, WritePoint, WriteResult
from devices.modbus_pdu import (
    ModbusReplyError,
    check_write_reply,
    exception_code,
    mbap_frame,
    mbap_split,
    read_values,
    write_coil_raw_request,
    write_coil_request,
    write_registers_request,
)
from devices.modbus_plan import Block, DevicePlan, GroupPlan, PollJob, PollScheduler, plan_blocks
from devices.profiles import PointSpec, Profile, Value, encode_point

if TYPE_CHECKING:
    from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
    from pymodbus.exceptions import ConnectionException, ModbusException
    from pymodbus.framer import FramerType
    from pymodbus.pdu import ModbusPDU
    from pymodbus.pdu.bit_message import WriteSingleCoilRequest as _FlashRequest

log = logging.getLogger("devices.modbus")

BusKind = Literal["modbus-tcp", "modbus-rtu", "modbus-rtu-over-tcp"]
MAX_PULSE_MS = 3_600_000

T = TypeVar("T")


class ModbusBusError(Exception):
    """Base of the bus engine's errors."""


class BusDown(ModbusBusError):
    """The bus has no working link (or is not running): the command was not sent."""


# ---------------------------------------------------------------- specs


@dataclass(frozen=True, slots=True)
class BusSpec:
    """One bus. ``serial`` is a device path or a pyserial URL (``/dev/ttyUSB0``, a pseudo-terminal);
    ``inter_frame_ms`` None means 30 ms on RTU framing, 0 on Modbus TCP. ``max_in_flight`` above 1 (Modbus TCP
    only, where the MBAP transaction id pairs each answer with its request) pipelines: of the polls due together,
    that many go out in one write, and each answer sends the next; their devices are not staggered. Off by
    default: some serial servers take one request at a time and drop the rest, and a write waits behind the
    requests already sent (on a serial server's 9600-baud line, some 20 ms each)."""

    name: str
    kind: BusKind
    host: str | None = None
    port: int | None = None
    serial: str | None = None
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1
    timeout_ms: int = 300
    retries: int = 1
    offline_after_misses: int = 3
    inter_frame_ms: int | None = None
    offline_poll_ms: int = 2000  # how often an offline device is probed
    reconnect_min_ms: int = 100
    reconnect_max_ms: int = 10_000
    max_in_flight: int = 1  # modbus-tcp: requests sent without waiting for the answers before them

    def __post_init__(self) -> None:
        if self.kind not in ("modbus-tcp", "modbus-rtu", "modbus-rtu-over-tcp"):
            raise ValueError(f"bus {self.name!r}: unknown kind {self.kind!r}")
        if self.kind == "modbus-rtu":
            if not self.serial:
                raise ValueError(f"bus {self.name!r}: a modbus-rtu bus needs 'serial'")
        elif not self.host or not self.port:
            raise ValueError(f"bus {self.name!r}: a {self.kind} bus needs 'host' and 'port'")
        for fname, lo in (
            ("timeout_ms", 1),
            ("offline_after_misses", 1),
            ("offline_poll_ms", 1),
            ("reconnect_min_ms", 1),
            ("reconnect_max_ms", 1),
            ("retries", 0),
        ):
            if getattr(self, fname) < lo:
                raise ValueError(f"bus {self.name!r}: {fname} must be at least {lo}")
        if self.inter_frame_ms is not None and self.inter_frame_ms < 0:
            raise ValueError(f"bus {self.name!r}: inter_frame_ms must not be negative")
        if not 1 <= self.max_in_flight <= 255:
            raise ValueError(f"bus {self.name!r}: max_in_flight must be 1-255")
        if self.max_in_flight > 1 and self.kind != "modbus-tcp":
            raise ValueError(
                f"bus {self.name!r}: max_in_flight above 1 needs modbus-tcp (transaction ids pair the "
                f"answers; an RTU line answers one request at a time)"
            )

    @property
    def gap_ms(self) -> int:
        if self.inter_frame_ms is not None:
            return self.inter_frame_ms
        return 0 if self.kind == "modbus-tcp" else 30

    def endpoint(self) -> str:
        return self.serial if self.kind == "modbus-rtu" else f"{self.host}:{self.port}"  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device on a bus. ``groups`` overrides the poll interval (ms) of named profile groups."""

    name: str
    profile: Profile
    unit: int = 1
    poll_ms: int = 200
    groups: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.unit <= 247:
            raise ValueError(f"device {self.name!r}: unit id {self.unit} is not 1-247")
        if self.poll_ms < 1:
            raise ValueError(f"device {self.name!r}: poll_ms must be at least 1")
        polled = {g.name for g in self.profile.polled_groups()}
        for g, ms in self.groups.items():
            if g not in polled:
                raise ValueError(f"device {self.name!r}: profile {self.profile.name!r} has no polled group {g!r}")
            if ms < 1:
                raise ValueError(f"device {self.name!r}: group {g!r} poll interval must be at least 1 ms")


# ---------------------------------------------------------------- statistics


@dataclass(slots=True)
class DeviceStats:
    device: str
    unit: int
    state: Literal["unknown", "online", "offline"] = "unknown"
    polls: int = 0  # group polls that got an answer
    missed_polls: int = 0  # group polls that got none
    transactions: int = 0  # requests answered (reads and writes)
    errors: dict[str, int] = field(default_factory=dict)  # timeout, bad_frame, wrong_unit, exception, ...
    writes: int = 0
    write_errors: int = 0
    last_latency_ms: float | None = None
    last_ok_mono: float | None = None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass(slots=True)
class BusStats:
    bus: str
    kind: str
    endpoint: str
    connected: bool = False
    connects: int = 0
    connect_failures: int = 0
    link_drops: int = 0
    restarts: int = 0  # poll loop restarted after an unexpected error
    rejected_writes: int = 0
    sink_errors: int = 0  # the sink raised (the event is lost; only the first few are logged)
    devices: dict[str, DeviceStats] = field(default_factory=dict)


# ---------------------------------------------------------------- the link: one client, paced exchanges


class _NoAnswer(ModbusBusError):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class _DeviceRefused(ModbusBusError):
    """The device answered with a Modbus exception: it is alive, the request failed."""

    def __init__(self, code: int) -> None:
        super().__init__(f"Modbus exception {code}")
        self.code = code


class _LinkLost(ModbusBusError):
    pass


def _load_pymodbus() -> None:
    """Import pymodbus where it is used (RTU framings, scans): a gateway on Modbus TCP alone never loads it (some
    2 MB resident, with pyserial)."""
    global AsyncModbusSerialClient, AsyncModbusTcpClient, ConnectionException, ModbusException, FramerType
    global _FlashRequest
    if "_FlashRequest" in globals():
        return
    from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
    from pymodbus.exceptions import ConnectionException, ModbusException
    from pymodbus.framer import FramerType
    from pymodbus.pdu.bit_message import WriteSingleCoilRequest

    class _FlashRequest(WriteSingleCoilRequest):
        """Function 05 with a raw value field: a vendor's timed-pulse command, not an on/off."""

        def __init__(self, address: int, raw: int, dev_id: int) -> None:
            super().__init__(dev_id=dev_id, address=address)
            self.raw = raw

        def encode(self) -> bytes:
            return struct.pack(">HH", self.address, self.raw)


class _Link:
    """One pymodbus client and the transaction discipline on it: pacing, our own retries, unit-id
    and answer checks, error classification."""

    def __init__(self, spec: BusSpec, clock: Callable[[], float], gap_s: float) -> None:
        _load_pymodbus()
        self.spec = spec
        self.clock = clock
        self.gap_s = gap_s
        self.client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self.last_end = -math.inf
        self._rx = 0

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._rx += len(data)
        return data

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        s = self.spec
        common: dict[str, Any] = {
            "name": f"bus[{s.name}]",
            "timeout": s.timeout_ms / 1000,
            "retries": 0,
            "reconnect_delay": 0,  # no reconnect task inside pymodbus: we reconnect
            "trace_packet": self._trace,
        }
        client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if s.kind == "modbus-rtu":
            client = AsyncModbusSerialClient(
                str(s.serial),
                framer=FramerType.RTU,
                baudrate=s.baudrate,
                parity=s.parity,
                stopbits=s.stopbits,
                bytesize=8,
                **common,
            )
        else:
            framer = FramerType.SOCKET if s.kind == "modbus-tcp" else FramerType.RTU
            client = AsyncModbusTcpClient(str(s.host), port=int(s.port or 0), framer=framer, **common)
        client.set_max_no_responses(1 << 30)  # never let pymodbus drop the link on missed answers
        return client

    @property
    def up(self) -> bool:
        return self.client is not None and self.client.connected

    async def connect(self) -> str | None:
        """Open the link. Returns None on success, else why it failed."""
        self.close()
        client = self._make_client()
        try:
            async with asyncio.timeout(self.spec.timeout_ms / 1000 + 5.0):
                ok = await client.connect()
            if ok:
                await asyncio.sleep(0)  # a serial transport finishes its setup on the next loop turn
        except (OSError, ModbusException, TimeoutError) as e:
            client.close()
            return f"{type(e).__name__}: {e}"
        if not ok or not client.connected:
            client.close()
            return f"cannot connect to {self.spec.endpoint()}"
        self.client = client
        self.last_end = -math.inf
        return None

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None

    async def _pace(self) -> None:
        wait = self.last_end + self.gap_s - self.clock()
        if wait > 0:
            await asyncio.sleep(wait)

    async def exchange(
        self,
        unit: int,
        send: Callable[[Any], Awaitable[ModbusPDU]],
        retries: int,
        on_error: Callable[[str], None],
    ) -> tuple[ModbusPDU, float]:
        """One request with up to ``retries`` repeats. Returns (answer, latency_s). Raises _NoAnswer,
        _DeviceRefused (a Modbus exception answer, not retried) or _LinkLost."""
        last = _NoAnswer("timeout", "no answer")
        for _ in range(retries + 1):
            client = self.client
            if client is None or not client.connected:
                raise _LinkLost("link closed")
            await self._pace()
            self._rx = 0
            t0 = self.clock()
            try:
                async with asyncio.timeout(self.spec.timeout_ms / 1000 + 2.0):
                    resp = await send(client)
            except ConnectionException as e:
                raise _LinkLost(str(e)) from None
            except (ModbusException, TimeoutError, OSError, ValueError, struct.error) as e:
                kind = "bad_frame" if self._rx else "timeout"
                last = _NoAnswer(kind, f"{kind}: {e}")
                on_error(kind)
                if not client.connected:
                    raise _LinkLost(f"link lost: {e}") from None
                continue
            finally:
                self.last_end = self.clock()
            if resp is None:
                last = _NoAnswer("bad_frame", "empty answer")
                on_error("bad_frame")
                continue
            if resp.dev_id != unit:
                last = _NoAnswer("wrong_unit", f"answer from unit {resp.dev_id}, asked {unit}")
                on_error("wrong_unit")
                continue
            if resp.isError():
                on_error("exception")
                raise _DeviceRefused(int(getattr(resp, "exception_code", 0)))
            return resp, self.last_end - t0
        raise last

    async def request(
        self, unit: int, pdu: bytes, retries: int, on_error: Callable[[str], None]
    ) -> tuple[bytes, float]:
        """:meth:`exchange` for a request PDU; returns the reply PDU (function code and data) and the latency."""
        resp, latency = await self.exchange(unit, _pymodbus_send(pdu, unit), retries, on_error)
        return bytes([resp.function_code]) + resp.encode(), latency


def _pymodbus_send(pdu: bytes, unit: int) -> Callable[[Any], Awaitable[ModbusPDU]]:
    """The pymodbus client call that sends a request PDU built by :mod:`devices.modbus_pdu`."""
    fc, address, value = struct.unpack_from(">BHH", pdu)
    if fc in (1, 2, 3, 4):
        fn = {1: "read_coils", 2: "read_discrete_inputs", 3: "read_holding_registers", 4: "read_input_registers"}[fc]
        return lambda c: getattr(c, fn)(address, count=value, device_id=unit)
    if fc == 5:
        if value in (0xFF00, 0):
            return lambda c: c.write_coil(address, value == 0xFF00, device_id=unit)
        return lambda c: c.execute(False, _FlashRequest(address, value, unit))
    if fc == 6:
        return lambda c: c.write_register(address, value, device_id=unit)
    regs = list(struct.unpack_from(f">{value}H", pdu, 6))
    return lambda c: c.write_registers(address, regs, device_id=unit)


class _MbapStream:
    """One Modbus TCP connection's framing: frames out, the answers to the requests outstanding back, paired by
    transaction id. A batch is ``n`` requests with consecutive transaction ids from ``base``: up to ``window`` of
    them are outstanding at once, and each answer sends the next request (``proceed()`` says whether it may: not
    while a write waits), so a run of polls costs no task switch and no extra wake-up per request. Each answer is
    handed to ``on_reply`` as it arrives; the batch is ``done`` (and ``on_done`` is called) when nothing sent is
    outstanding and nothing more may be sent.

    The socket is read into one buffer kept for the connection (``recv_into``): reading with ``recv`` made
    asyncio allocate, shrink and free a 256 KiB bytes object per answer, three system calls of the memory
    allocator each time."""

    def __init__(self, write: Callable[[bytes], object], on_done: Callable[[], None] | None = None) -> None:
        self.write = write
        self.on_done = on_done
        self.closed = False
        self.done = True
        self.garbage = False  # bytes that were no answer arrived since the last send
        self.active = 0.0  # monotonic time of the last answer matched or request sent (the link's silence timer)
        self.got: list[tuple[int, bytes] | None] = []  # the batch's answers: (unit id, reply PDU)
        self.sent = 0  # requests of the batch sent so far
        self._in = bytearray(_RX_SIZE)
        self._view = memoryview(self._in)
        self._end = 0  # bytes held in _in
        self._base = 0
        self._left = 0  # sent and not answered
        self._frames: Sequence[bytes] = ()
        self._window = 1
        self._proceed: Callable[[], bool] | None = None
        self._on_reply: Callable[[int, int, bytes], None] | None = None

    @property
    def partial(self) -> bool:
        """Part of a frame is held, waiting for the rest."""
        return self._end > 0

    def send(
        self,
        base: int,
        frames: Sequence[bytes],
        window: int,
        on_reply: Callable[[int, int, bytes], None] | None,
        proceed: Callable[[], bool] | None,
    ) -> None:
        self._end = 0  # whatever is left is part of an answer to an earlier request that timed out
        self.garbage = False
        n = len(frames)
        first = min(n, window)
        self._base, self._left, self.got, self.sent = base, first, [None] * n, first
        self._frames, self._window, self._proceed, self._on_reply = frames, window, proceed, on_reply
        self.done = False
        self.active = time.monotonic()
        self.write(frames[0] if first == 1 else b"".join(frames[:first]))

    def buffer(self) -> memoryview:
        """Where the next bytes read go."""
        if self._end >= _RX_SIZE - 512:  # a peer that sends and never completes a frame
            self.garbage = True
            self._end = 0
        return self._view[self._end :]

    def feed(self, nbytes: int) -> None:
        """``nbytes`` more were read into :meth:`buffer`: take every whole frame among what is held. What
        ``on_reply`` raises (the bus's own failure) comes out of here."""
        buf = self._in
        end = self._end + nbytes
        pos = 0
        while pos < end:
            try:
                frame = mbap_split(buf, pos, end)
            except ModbusReplyError:
                self.garbage = True  # the stream is lost up to here: start again with the next answer
                pos = end
                break
            if frame is None:
                break
            used, tid, unit, pdu = frame
            pos += used
            self._take(tid, unit, pdu)
        if pos >= end:
            self._end = 0
        else:
            if pos:
                buf[: end - pos] = buf[pos:end]
            self._end = end - pos

    def _take(self, tid: int, unit: int, pdu: bytes) -> None:
        i = (tid - self._base) % 0xFFFF  # transaction ids run 1-65535
        got = self.got
        if not tid or i >= self.sent or got[i] is not None or self.done:
            self.garbage = True  # a late answer (to a request that timed out) or a stray frame
            return
        got[i] = (unit, pdu)
        self.active = time.monotonic()
        if self._on_reply is not None:
            self._on_reply(i, unit, pdu)
        self._left -= 1
        k = self.sent
        if k < len(got) and self._left < self._window and (self._proceed is None or self._proceed()):
            self.sent = k + 1
            self._left += 1
            self.write(self._frames[k])
        elif not self._left:
            self.done = True
            if self.on_done is not None:
                self.on_done()


#: The receive buffer of one connection. A Modbus TCP answer is at most 260 bytes, so 4 KiB holds a pipelined
#: burst of them; a longer burst is read in turns. 64 KiB, zero-filled, cost 3 MB resident on 50 endpoints.
_RX_SIZE = 1 << 12


class _TcpLink(abc.ABC):
    """Modbus TCP with our own MBAP framing (:class:`_MbapStream`): the same discipline as :class:`_Link` (our
    retries, unit-id and answer checks, error kinds), none of pymodbus's per-request objects. Two ways to wait for
    the answers, one subclass each: :class:`_LoopTcpLink` on the event loop, :class:`_ThreadTcpLink` in a thread of
    the bus's own."""

    def __init__(self, spec: BusSpec, clock: Callable[[], float], gap_s: float) -> None:
        self.spec = spec
        self.clock = clock
        self.gap_s = gap_s
        self.last_end = -math.inf
        self._stream: _MbapStream | None = None
        self._tid = 0
        self._timeout_s = spec.timeout_ms / 1000

    @property
    def up(self) -> bool:
        return self._stream is not None and not self._stream.closed

    @property
    def garbage(self) -> bool:
        """Bytes that were no answer (or part of a frame never completed) arrived since the last send."""
        return self._stream is not None and (self._stream.garbage or self._stream.partial)

    @abc.abstractmethod
    async def connect(self) -> str | None:
        """Open the link. Returns None on success, else why it failed."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    async def _pace(self, wait_s: float) -> None:
        """Wait ``wait_s`` (a device's silence between frames)."""

    @abc.abstractmethod
    async def _wait(self, stream: _MbapStream) -> None:
        """Until the batch sent is done. TimeoutError after a silence of the timeout (answers coming in, a batch,
        move the deadline: the timeout is a silence of that long, not the batch); _LinkLost."""

    async def _batch(
        self,
        stream: _MbapStream,
        reqs: Sequence[tuple[int, bytes]],
        window: int,
        on_reply: Callable[[int, int, bytes], None] | None,
        proceed: Callable[[], bool] | None,
    ) -> None:
        base = self._tid % 0xFFFF + 1
        frames = [mbap_frame((base - 1 + i) % 0xFFFF + 1, unit, pdu) for i, (unit, pdu) in enumerate(reqs)]
        self._tid = (base - 2 + len(reqs)) % 0xFFFF + 1
        stream.send(base, frames, window, on_reply, proceed)
        await self._wait(stream)

    async def request_many(
        self,
        reqs: Sequence[tuple[int, bytes]],
        on_reply: Callable[[int, int, bytes], None],
        window: int = 1,
        proceed: Callable[[], bool] | None = None,
    ) -> tuple[list[tuple[int, bytes] | None], int]:
        """Send the requests ``(unit, PDU)`` with at most ``window`` outstanding (pipelined when above 1), each
        next one as an answer comes in, while ``proceed()`` allows; each answer goes to ``on_reply(index, unit,
        reply PDU)`` as it arrives. Returns the answers by index (None for those not answered before a silence of
        the timeout, or not sent; no retries here) and how many were sent. Raises _LinkLost."""
        stream = self._stream
        if stream is None or stream.closed:
            raise _LinkLost("link closed")
        try:
            await self._batch(stream, reqs, window, on_reply, proceed)
        except TimeoutError:
            pass
        finally:
            stream.done = True  # an answer coming later is a late one
            self.last_end = self.clock()
        return stream.got, stream.sent

    async def request(
        self, unit: int, pdu: bytes, retries: int, on_error: Callable[[str], None]
    ) -> tuple[bytes, float]:
        """One request with up to ``retries`` repeats. Returns (reply PDU, latency_s). Raises _NoAnswer,
        _DeviceRefused (a Modbus exception answer, not retried) or _LinkLost."""
        last = _NoAnswer("timeout", "no answer")
        req = ((unit, pdu),)
        for _ in range(retries + 1):
            stream = self._stream
            if stream is None or stream.closed:
                raise _LinkLost("link closed")
            if self.gap_s:
                wait = self.last_end + self.gap_s - self.clock()
                if wait > 0:
                    await self._pace(wait)
            t0 = self.clock()
            try:
                await self._batch(stream, req, 1, None, None)
            except TimeoutError:
                kind = "bad_frame" if self.garbage else "timeout"
                last = _NoAnswer(kind, f"{kind}: no answer within {self.spec.timeout_ms} ms")
                on_error(kind)
                continue
            finally:
                stream.done = True
                self.last_end = self.clock()
            answer = stream.got[0]
            assert answer is not None
            got_unit, reply = answer
            if got_unit != unit:
                last = _NoAnswer("wrong_unit", f"answer from unit {got_unit}, asked {unit}")
                on_error("wrong_unit")
                continue
            code = exception_code(reply)
            if code is not None:
                on_error("exception")
                raise _DeviceRefused(code)
            return reply, self.last_end - t0
        raise last


class _LoopProtocol(asyncio.BufferedProtocol):
    """A connection on the event loop, read into its stream's buffer; the answers handled from its callback."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.stream = _MbapStream(self._write, self._done)
        self.waiter: asyncio.Future[None] | None = None

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _done(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(_LinkLost(f"connection lost: {exc or 'closed by the peer'}"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.stream.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.stream.feed(nbytes)
        except Exception as e:  # the bus's handler failed: its poll loop restarts
            w = self.waiter
            if w is not None and not w.done():
                w.set_exception(e)


class _LoopTcpLink(_TcpLink):
    """Modbus TCP on the event loop: for a connection to one device, where buses that fall due together share one
    wake-up of the loop (a thread each would cost a thread's wake-up per request)."""

    def __init__(self, spec: BusSpec, clock: Callable[[], float], gap_s: float) -> None:
        super().__init__(spec, clock, gap_s)
        self._proto: _LoopProtocol | None = None
        # One timer for the link, not one per request: it fires at most once per timeout and re-arms itself
        # for the request then outstanding (most answers come long before it is due).
        self._timer: asyncio.TimerHandle | None = None

    async def connect(self) -> str | None:
        self.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s + 5.0):
                _, proto = await loop.create_connection(_LoopProtocol, str(self.spec.host), int(self.spec.port or 0))
        except (OSError, TimeoutError) as e:
            return f"{type(e).__name__}: {e}"
        self._proto = proto
        self._stream = proto.stream
        self.last_end = -math.inf
        return None

    def close(self) -> None:
        proto, self._proto, self._stream = self._proto, None, None
        if proto is not None and proto.transport is not None:
            proto.stream.closed = True
            proto.transport.abort()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _pace(self, wait_s: float) -> None:
        await asyncio.sleep(wait_s)

    def _check_deadline(self) -> None:
        self._timer = None
        proto = self._proto
        fut = proto.waiter if proto is not None else None
        if fut is None or fut.done() or proto is None:
            return
        loop = fut.get_loop()
        deadline = proto.stream.active + self._timeout_s  # loop.time() is time.monotonic()
        if loop.time() >= deadline:
            fut.set_exception(TimeoutError())
        else:
            self._timer = loop.call_at(deadline, self._check_deadline)

    async def _wait(self, stream: _MbapStream) -> None:
        proto = self._proto
        assert proto is not None
        loop = asyncio.get_running_loop()
        fut = proto.waiter = loop.create_future()
        if self._timer is None:
            self._timer = loop.call_at(stream.active + self._timeout_s, self._check_deadline)
        try:
            await fut
        finally:
            proto.waiter = None


class _ThreadTcpLink(_TcpLink):
    """Modbus TCP on a blocking socket that only the bus's own thread uses: for a connection with several devices
    behind it (a serial server, a panel's many units), where a poll is a ``send`` and a ``recv``, two system calls,
    and the event loop spent three and its own machinery besides (bench/alarm_latency.py).

    Its coroutines never suspend: the bus's poll loop, written as coroutines for the event loop, runs in that thread
    from start to end in one step (:func:`_drive`)."""

    def __init__(self, spec: BusSpec, clock: Callable[[], float], gap_s: float) -> None:
        super().__init__(spec, clock, gap_s)
        self._sock: socket.socket | None = None

    async def connect(self) -> str | None:
        self.close()
        try:
            sock = socket.create_connection((str(self.spec.host), int(self.spec.port or 0)), self._timeout_s + 5.0)
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The kernel bounds each read and write by the timeout (one that waits longer fails with EAGAIN): one system
        # call per read, where Python's own socket timeout adds a poll() before each. A struct timeval is two 64-bit
        # or (32-bit ARM with a 32-bit time_t) two 32-bit numbers: its size is asked of the kernel.
        size = len(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
        tv = struct.pack("qq" if size == 16 else "ii", int(self._timeout_s), int(self._timeout_s % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._sock = sock
        self._stream = _MbapStream(self._sendall)
        self.last_end = -math.inf
        return None

    def interrupt(self) -> None:
        """From another thread: end the reads and writes under way at once (the bus is stopping); the bus's thread
        closes the socket."""
        sock, stream = self._sock, self._stream
        if stream is not None:
            stream.closed = True
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """In the bus's thread, or once it has ended."""
        sock, self._sock, stream, self._stream = self._sock, None, self._stream, None
        if stream is not None:
            stream.closed = True
        if sock is not None:
            sock.close()

    async def _pace(self, wait_s: float) -> None:
        time.sleep(wait_s)  # noqa: ASYNC251 (the bus's own thread: this coroutine never suspends)

    def _sendall(self, data: bytes) -> None:
        sock = self._sock
        assert sock is not None
        try:
            sock.sendall(data)
        except (TimeoutError, BlockingIOError):  # SO_SNDTIMEO: the peer took nothing for the timeout
            raise TimeoutError() from None
        except OSError as e:
            if self._stream is not None:
                self._stream.closed = True
            raise _LinkLost(f"connection lost: {e}") from None

    async def _wait(self, stream: _MbapStream) -> None:
        sock = self._sock
        assert sock is not None
        timeout_s = self._timeout_s
        try:
            while not stream.done:
                n = sock.recv_into(stream.buffer())
                if not n:
                    stream.closed = True
                    raise _LinkLost("connection lost: closed by the peer")
                stream.feed(n)
                if not stream.done and time.monotonic() - stream.active >= timeout_s:
                    raise TimeoutError()  # bytes came, but no answer (garbage, a stray frame) for the timeout
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO: nothing came for the timeout
            raise TimeoutError() from None
        except OSError as e:
            stream.closed = True
            raise _LinkLost(f"connection lost: {e}") from None


def _drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (a Modbus TCP bus's poll loop, in its own thread) to its end."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a Modbus TCP bus's poll loop waited for the event loop in its own thread")


# ---------------------------------------------------------------- the bus


@dataclass(slots=True)
class _Device:
    index: int
    spec: DeviceSpec
    plan: DevicePlan
    group_of: dict[str, int]  # group name -> index in plan.groups
    stats: DeviceStats
    values: dict[str, Value] = field(default_factory=dict)
    gap_s: float = 0.0
    replies: dict[int, bytes] = field(default_factory=dict)  # id(block) -> its last reply, decoded already
    problems: dict[str, str] = field(default_factory=dict)  # point -> why it is not what the profile expects
    checked: bool = False  # a DeviceCheck was reported at least once

    def count_error(self, kind: str) -> None:
        self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1


@dataclass(slots=True)
class _WriteJob:
    cmd: WritePoint
    device: _Device
    point: PointSpec
    encoded: bool | list[int]
    future: asyncio.Future[WriteResult] | None
    is_reset: bool = False
    attempts: int = 0


class ModbusBus:
    """Owns one bus: polls its devices, applies writes, reports :data:`~devices.events.DeviceEvent` to
    ``sink`` (a non-blocking callable, called on the event loop). Use as an async context manager."""

    def __init__(
        self,
        spec: BusSpec,
        devices: Sequence[DeviceSpec],
        sink: Callable[[DeviceEvent], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        _quiet_pymodbus()
        self.spec = spec
        self._sink = sink
        self._clock = clock
        self._rng = rng or random.Random()
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            raise ValueError(f"bus {spec.name!r}: duplicate device names")
        units = [d.unit for d in devices]
        if len(set(units)) != len(units):
            raise ValueError(f"bus {spec.name!r}: two devices share a unit id")
        self._devices: list[_Device] = []
        for i, d in enumerate(devices):
            groups: list[GroupPlan] = []
            for g in d.profile.polled_groups():
                pts = [p for p in d.profile.points.values() if p.group == g.name]
                interval_ms = d.groups.get(g.name) or g.poll_ms or d.poll_ms
                groups.append(GroupPlan(g.name, interval_ms / 1000, plan_blocks(pts, d.profile.blocks)))
            self._devices.append(
                _Device(
                    index=i,
                    spec=d,
                    plan=DevicePlan(d.name, groups),
                    group_of={g.name: j for j, g in enumerate(groups)},
                    stats=DeviceStats(d.name, d.unit),
                    gap_s=d.profile.timings.inter_frame_ms / 1000,
                )
            )
        self._by_name = {d.spec.name: d for d in self._devices}
        gap_s = max([spec.gap_ms / 1000] + [d.gap_s for d in self._devices])
        # Modbus TCP with several devices on the connection: the poll loop in a thread of its own, on a blocking
        # socket (_ThreadTcpLink); one device: on the event loop, where such buses share its wake-ups.
        link_type = _Link if spec.kind != "modbus-tcp" else _ThreadTcpLink if len(devices) > 1 else _LoopTcpLink
        self._link: _Link | _TcpLink = link_type(spec, clock, gap_s)
        # Polls due within this much of each other are taken in one wake-up.
        self._slack = min([g.interval_s for d in self._devices for g in d.plan.groups] or [0.0]) / 10
        # Modbus TCP without a silence between frames: the polls taken in one wake-up are sent one after the other
        # from the answers' callback (:meth:`_poll_many`), pipelined when max_in_flight is above 1. Where a device
        # needs a silence before each request (its profile's inter_frame_ms), one request at a time from the task.
        self._chain = isinstance(self._link, _TcpLink) and not gap_s
        # What the bus's thread tells the event loop (events, writes' results) goes over in order (_hand).
        self._threaded = isinstance(self._link, _ThreadTcpLink)
        self._pipeline = spec.max_in_flight if self._chain else 1
        if spec.max_in_flight > 1 and self._pipeline == 1:
            log.warning(
                "bus %s: max_in_flight %d ignored: a device on it needs %d ms between requests",
                spec.name,
                spec.max_in_flight,
                round(gap_s * 1000),
            )
        self._stats = BusStats(
            spec.name, spec.kind, spec.endpoint(), devices={d.spec.name: d.stats for d in self._devices}
        )
        self._sched: PollScheduler | None = None
        self._writes: deque[_WriteJob] = deque()
        self._timed: list[tuple[float, int, _WriteJob]] = []
        self._seq = itertools.count()
        self._idle_waiter: asyncio.Future[None] | None = None
        self._wake = threading.Event()  # the bus's thread: a write queued, the bus stopping
        self._thread_id = 0  # the bus's thread, while it runs
        self._thread_done: asyncio.Future[None] | None = None
        self._handoff: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._handoff_pending = False
        self._running = False
        self._was_up = False
        self._down_reason = "not started"
        self._connect_failures = 0
        self._next_connect = 0.0
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: _WriteJob | None = None
        self._refusals_logged: set[tuple[str, int, int, int]] = set()

    # -- lifecycle

    async def __aenter__(self) -> ModbusBus:
        self._loop = asyncio.get_running_loop()
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._running = True
        self._down_reason = "connecting"
        self._task = self._tg.create_task(self._supervise(), name=f"bus[{self.spec.name}].poll")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._running = False
        self._down_reason = "bus stopped"
        try:
            if self._task is not None:
                self._task.cancel()
            if self._tg is not None:
                await self._tg.__aexit__(None, None, None)
        finally:
            if self._thread_id:  # the bus's thread did not end in time: it closes its link itself
                log.warning("bus %s: its thread did not stop within %.0f s", self.spec.name, _THREAD_STOP_S)
            else:
                self._link.close()
            self._deliver_handed()
            self._was_up = False
            cur, self._current = self._current, None
            if cur is not None and cur.future is not None and not cur.future.done():
                cur.future.set_exception(BusDown(f"bus {self.spec.name!r} stopped during the write"))
            self._fail_queued("bus stopped", include_timed=True)

    # -- public

    @property
    def device_names(self) -> list[str]:
        return [d.spec.name for d in self._devices]

    @property
    def device_specs(self) -> list[DeviceSpec]:
        return [d.spec for d in self._devices]

    async def write(self, cmd: WritePoint) -> WriteResult:
        """Write a point ahead of every queued poll. ``cmd.pulse_ms`` asks for a timed pulse: the
        profile's own flash command where it has one, else set now and reset after ``pulse_ms`` (the
        reset is prioritised too; its outcome goes to the sink with token ``<token>:reset``).
        Returns after the (first) write; every result also goes to the sink.

        Raises :class:`BusDown` at once while the link is down. A bad command (unknown device or
        point, not writable, a value that does not fit) gives ``ok=False``, counted as rejected."""
        dev = self._by_name.get(cmd.device)
        problem = None
        point: PointSpec | None = None
        encoded: bool | list[int] = False
        if dev is None:
            problem = f"no device {cmd.device!r} on bus {self.spec.name!r}"
        elif cmd.point not in dev.spec.profile.points:
            problem = f"device {cmd.device!r} has no point {cmd.point!r}"
        else:
            point = dev.spec.profile.points[cmd.point]
            if not point.writable:
                problem = f"point {cmd.point!r} of {cmd.device!r} is not writable"
            elif cmd.pulse_ms is not None and (point.table != "coil" or not 1 <= cmd.pulse_ms <= MAX_PULSE_MS):
                problem = f"a pulse needs a coil and 1-{MAX_PULSE_MS} ms (point {cmd.point!r}, {cmd.pulse_ms} ms)"
            elif (
                cmd.pulse_ms is not None
                and (limit := dev.spec.profile.pulse_limit_ms()) is not None
                and cmd.pulse_ms > limit
            ):
                problem = (
                    f"a pulse of {cmd.pulse_ms} ms is longer than {dev.spec.profile.name}'s flash command "
                    f"allows ({limit} ms)"
                )
            else:
                try:
                    encoded = encode_point(point, cmd.value)
                except ValueError as e:
                    problem = str(e)
        if problem is not None or dev is None or point is None:
            self._stats.rejected_writes += 1
            result = WriteResult(
                cmd.device, cmd.point, cmd.token, False, self._clock(), problem or "rejected", failure="rejected"
            )
            self._emit(result)
            return result
        if not self._running:
            raise BusDown(f"bus {self.spec.name!r} is not running")
        if not self._link.up:
            raise BusDown(f"bus {self.spec.name!r} is down: {self._down_reason}")
        fut: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        self._writes.append(_WriteJob(cmd, dev, point, encoded, fut))
        self._poke()
        return await fut

    def stats(self) -> BusStats:
        """A snapshot of the counters (safe to keep; later polls do not change it)."""
        s = self._stats
        devs = {k: replace(v, errors=dict(v.errors)) for k, v in s.devices.items()}
        return replace(s, connected=self._link.up, devices=devs)

    @property
    def connected(self) -> bool:
        return self._link.up

    # -- the owner task

    async def _supervise(self) -> None:
        restarts = 0
        while self._running:
            try:
                await (self._run_in_thread() if self._threaded else self._run())
            except asyncio.CancelledError:
                raise
            except Exception:
                restarts += 1
                self._stats.restarts += 1
                log.exception("bus %s: poll loop failed (restart %d)", self.spec.name, restarts)
                self._deliver_handed()
                cur, self._current = self._current, None
                if cur is not None and cur.future is not None and not cur.future.done():
                    cur.future.set_exception(BusDown(f"bus {self.spec.name!r}: internal error"))
                self._drop_link("poll loop restarted")
                await asyncio.sleep(min(5.0, 0.1 * 2 ** min(restarts, 6)))
                if self._sched is not None:
                    self._sched.resume(self._clock())  # the polls it was making are back on the schedule

    async def _run_in_thread(self) -> None:
        """Modbus TCP: :meth:`_run` in a thread of its own until it ends (the bus stopping) or fails. Cancelled
        (the bus stopping), it stops the thread and waits a while for it."""
        loop = asyncio.get_running_loop()
        done = self._thread_done = loop.create_future()

        def main() -> None:
            self._thread_id = threading.get_ident()
            error: BaseException | None = None
            try:
                _drive(self._run())
            except BaseException as e:  # handed to the event loop: the supervisor logs it and restarts
                error = e
            finally:
                if not self._running:
                    self._link.close()
                self._thread_id = 0
                self._hand(_settle, done, None, error)

        thread = threading.Thread(target=main, name=f"bus[{self.spec.name}]", daemon=True)
        thread.start()
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            self._running = False
            self._wake.set()
            if isinstance(self._link, _ThreadTcpLink):
                self._link.interrupt()
            with contextlib.suppress(TimeoutError, Exception):
                async with asyncio.timeout(_THREAD_STOP_S):
                    await done
            raise
        finally:
            if done.done():
                thread.join(1.0)  # it handed its last word over: it is returning

    async def _run(self) -> None:
        clock = self._clock
        if self._sched is None:
            self._sched = PollScheduler(
                [d.plan for d in self._devices],
                now=clock(),
                offline_after=self.spec.offline_after_misses,
                offline_retry_s=self.spec.offline_poll_ms / 1000,
                # Asked together: one write when pipelining; in the bus's thread, one wake-up of it per round.
                stagger=self._pipeline == 1 and not self._threaded,
                align=not self._threaded,  # buses on the event loop with the same intervals wake in one loop turn
            )
        sched = self._sched
        # pymodbus waits with asyncio.wait_for, which on 3.11 can swallow a cancellation that lands
        # together with a timeout; the flag makes sure the loop still ends when the bus is stopped.
        while self._running:
            now = clock()
            up = self._link.up
            if not up and self._was_up:
                self._drop_link("connection lost")
            if not up and now >= self._next_connect:
                await self._connect()
                continue
            if up and self._timed and self._timed[0][0] <= now:
                _, _, timed = heapq.heappop(self._timed)
                await self._do_write(timed)
                continue
            if up and self._writes:
                await self._do_write(self._writes.popleft())
                continue
            jobs = sched.take_due(now, self._slack)
            if jobs:
                if self._chain:
                    await self._poll_many(jobs)
                    continue
                for job in jobs:  # polls that fell due together: one wake-up, writes still go first
                    if self._link.up:
                        if self._writes or (self._timed and self._timed[0][0] <= clock()):
                            await self._serve_writes()
                        await self._poll(job)
                    else:
                        self._missed(job, f"link down: {self._down_reason}")
                continue
            upcoming = sched.next_job()
            wake = [upcoming.due] if upcoming is not None else []
            if self._timed and up:
                wake.append(self._timed[0][0])
            if not up:
                wake.append(self._next_connect)
            if self._writes:
                continue
            await self._idle(max(0.0, min(wake) - now) if wake else None)

    def _poke(self) -> None:
        """Wake the owner task if it is idle (a write was queued, a reset scheduled)."""
        if self._threaded:
            self._wake.set()
            return
        w = self._idle_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _idle(self, wait_s: float | None) -> None:
        """Wait until :meth:`_poke` or ``wait_s`` have passed: one future and one timer handle, no exception on timeout
        (``asyncio.timeout`` around ``Event.wait`` raised and caught one per wake-up); in the bus's thread, the
        thread waits."""
        if self._threaded:
            self._wake.wait(wait_s)
            self._wake.clear()  # the loop looks at the writes queued before it idles again
            return
        loop = self._loop  # not asyncio.get_running_loop(): each call of that is a getpid() system call
        assert loop is not None
        fut: asyncio.Future[None] = loop.create_future()
        self._idle_waiter = fut
        timer = loop.call_later(wait_s, _release, fut) if wait_s is not None else None
        try:
            await fut
        finally:
            self._idle_waiter = None
            if timer is not None:
                timer.cancel()

    async def _connect(self) -> None:
        self._stats.connects += 1
        why = await self._link.connect()
        if why is None:
            self._was_up = True
            log.info("bus %s: connected to %s", self.spec.name, self.spec.endpoint())
            if self._sched is not None:
                self._sched.probe_offline_now(self._clock())
            return
        self._stats.connect_failures += 1
        delay = backoff_delay(
            self._connect_failures,
            self.spec.reconnect_min_ms / 1000,
            self.spec.reconnect_max_ms / 1000,
            self._rng.random,
        )
        self._connect_failures += 1
        self._next_connect = self._clock() + delay
        self._down_reason = why
        level = logging.WARNING if self._connect_failures == 1 else logging.DEBUG
        log.log(level, "bus %s: cannot connect (%s); retrying in %.2f s", self.spec.name, why, delay)

    def _drop_link(self, reason: str) -> None:
        was_up = self._was_up
        self._link.close()
        self._was_up = False
        self._down_reason = reason
        if was_up:
            self._stats.link_drops += 1
            log.warning("bus %s: link down (%s)", self.spec.name, reason)
            delay = backoff_delay(
                self._connect_failures,
                self.spec.reconnect_min_ms / 1000,
                self.spec.reconnect_max_ms / 1000,
                self._rng.random,
            )
            self._connect_failures += 1
            self._next_connect = self._clock() + delay
        self._fail_queued(f"link down: {reason}", include_timed=False)

    def _fail_queued(self, reason: str, *, include_timed: bool) -> None:
        while self._writes:
            job = self._writes.popleft()
            if job.future is not None:
                self._settle(job.future, error=BusDown(f"bus {self.spec.name!r}: {reason}"))
        if include_timed:
            for _, _, job in self._timed:
                log.warning(
                    "bus %s: pulse reset of %s.%s not sent (%s)",
                    self.spec.name,
                    job.device.spec.name,
                    job.point.name,
                    reason,
                )
            self._timed.clear()

    def _on_success(self, dev: _Device, latency: float) -> None:
        dev.stats.transactions += 1
        dev.stats.last_latency_ms = latency * 1000
        dev.stats.last_ok_mono = self._clock()
        self._connect_failures = 0  # the link demonstrably works: backoff starts again from the bottom

    @staticmethod
    def _counter(dev: _Device) -> Callable[[str], None]:
        return dev.count_error

    async def _poll(self, job: PollJob) -> None:
        dev = self._devices[job.device]
        group = dev.plan.groups[job.group]
        blocks = group.blocks[:1] if job.probe else group.blocks
        retries = 0 if job.probe else self.spec.retries
        answered = False
        failure = ""
        for i, block in enumerate(blocks):
            if i:
                await self._serve_writes()
                if not self._link.up:
                    break
            try:
                reply, latency = await self._link.request(dev.spec.unit, block.request, retries, self._counter(dev))
            except _DeviceRefused as e:
                answered = True
                self._log_refusal(dev, block, e.code)
                continue
            except _NoAnswer as e:
                failure = str(e)
                break  # the device is not answering: do not spend the bus on its other blocks
            except _LinkLost as e:
                self._drop_link(str(e))
                failure = f"link down: {e}"
                break
            key = id(block)
            if dev.replies.get(key) != reply:  # the same bytes as last time decode to the same values
                try:
                    values = block.decode_reply(reply)
                except ValueError as e:
                    self._counter(dev)("bad_answer")
                    failure = str(e)
                    continue
                self._apply(dev, values)
                dev.replies[key] = reply
            answered = True
            self._on_success(dev, latency)
        if answered:
            dev.stats.polls += 1
            self._availability(dev, self._sched.done(job, self._clock(), True), "")  # type: ignore[union-attr]
        else:
            self._missed(job, failure or "no answer")

    async def _poll_many(self, jobs: list[PollJob]) -> None:
        """Polls due together on Modbus TCP without a gap between frames. Each next request is sent from the
        callback that takes the answer before it (``max_in_flight`` outstanding at once: the default, one, is one
        request at a time on the wire as :meth:`_poll` does, without a task switch or a wake-up per request), and
        each answer is applied as it arrives. A request left unanswered gets the bus's retries at once, one at a
        time, as :meth:`_poll` would, and a device that stays silent is not asked for its other blocks; a write
        goes ahead of every request not yet sent."""
        reqs: list[tuple[int, bytes]] = []
        owners: list[tuple[int, _Device, Block]] = []  # per request: (index of its job, device, block)
        for k, job in enumerate(jobs):
            dev = self._devices[job.device]
            blocks = dev.plan.groups[job.group].blocks
            for block in blocks[:1] if job.probe else blocks:
                reqs.append((dev.spec.unit, block.request))
                owners.append((k, dev, block))
        answered = [False] * len(jobs)
        failure = [""] * len(jobs)
        dead = [False] * len(jobs)  # silent after its retries: its other blocks are not asked
        unanswered: list[int] = []
        clock = self._clock
        start = 0
        mark = clock()  # when the request just answered went out (the answer before it came)

        def on_reply(i: int, unit: int, reply: bytes) -> None:
            nonlocal mark
            k, dev, block = owners[start + i]
            now = clock()
            latency, mark = now - mark, now
            if unit != dev.spec.unit:
                dev.count_error("wrong_unit")
                unanswered.append(start + i)
                return
            if reply[0] & 0x80:
                dev.count_error("exception")
                answered[k] = True
                self._log_refusal(dev, block, exception_code(reply) or 0)
                return
            if self._take_reply(dev, block, reply):
                answered[k] = True
                self._on_success(dev, latency)
            else:
                failure[k] = "bad answer"

        def proceed() -> bool:
            return not self._writes and not (self._timed and self._timed[0][0] <= clock())

        link = self._link
        assert isinstance(link, _TcpLink)
        window = self._pipeline
        lost = ""
        while start < len(reqs):
            if dead[owners[start][0]]:
                start += 1
                continue
            if not proceed():
                await self._serve_writes()
            if not link.up:
                lost = f"link down: {self._down_reason}"
                break
            mark = clock()
            try:
                got, sent = await link.request_many(reqs[start:] if start else reqs, on_reply, window, proceed)
            except _LinkLost as e:
                self._drop_link(str(e))
                lost = f"link down: {e}"
                break
            missing = [start + i for i in range(sent) if got[i] is None]
            if missing:
                kind = "bad_frame" if link.garbage else "timeout"
                for n in missing:
                    owners[n][1].count_error(kind)
                unanswered += missing
            start += sent
            for n in unanswered:  # the first try is spent: the retries left, one request at a time
                k, dev, block = owners[n]
                job = jobs[k]
                if job.probe or not self.spec.retries or not link.up:
                    failure[k] = failure[k] or "no answer"
                    dead[k] = True
                    continue
                try:
                    reply, latency = await link.request(
                        dev.spec.unit, block.request, self.spec.retries - 1, dev.count_error
                    )
                except _DeviceRefused as e:
                    answered[k] = True
                    self._log_refusal(dev, block, e.code)
                    continue
                except _NoAnswer as e:
                    failure[k] = str(e)
                    dead[k] = True
                    continue
                except _LinkLost as e:
                    self._drop_link(str(e))
                    lost = f"link down: {e}"
                    break
                if self._take_reply(dev, block, reply):
                    answered[k] = True
                    self._on_success(dev, latency)
            unanswered.clear()
            if lost:
                break
        now = clock()
        for k, job in enumerate(jobs):
            if answered[k]:
                dev = self._devices[job.device]
                dev.stats.polls += 1
                self._availability(dev, self._sched.done(job, now, True), "")  # type: ignore[union-attr]
            else:
                self._missed(job, failure[k] or lost or "no answer")

    def _take_reply(self, dev: _Device, block: Block, reply: bytes) -> bool:
        """Apply a read's reply (not decoded when it equals the block's last one). False: it did not fit."""
        key = id(block)
        if dev.replies.get(key) == reply:
            return True
        try:
            values = block.decode_reply(reply)
        except ValueError:
            dev.count_error("bad_answer")
            return False
        self._apply(dev, values)
        dev.replies[key] = reply
        return True

    def _missed(self, job: PollJob, reason: str) -> None:
        dev = self._devices[job.device]
        dev.stats.missed_polls += 1
        sched = self._sched
        assert sched is not None
        change = sched.done(job, self._clock(), False)
        self._availability(dev, change, reason)
        if change == "offline" and sched.all_offline() and self._link.up:
            self._drop_link("no device answers; recycling the connection")

    def _availability(self, dev: _Device, change: str | None, reason: str) -> None:
        if change is None:
            return
        dev.stats.state = change  # type: ignore[assignment]
        if change == "offline":
            log.warning("bus %s: device %s (unit %d) offline: %s", self.spec.name, dev.spec.name, dev.spec.unit, reason)
        else:
            log.info("bus %s: device %s (unit %d) online", self.spec.name, dev.spec.name, dev.spec.unit)
        self._emit(Availability(dev.spec.name, change, self._clock(), reason))  # type: ignore[arg-type]

    def _log_refusal(self, dev: _Device, block: Block, code: int) -> None:
        key = (dev.spec.name, block.function, block.address, code)
        if key not in self._refusals_logged:
            self._refusals_logged.add(key)
            log.warning(
                "bus %s: device %s refuses function %d at %d (+%d): Modbus exception %d",
                self.spec.name,
                dev.spec.name,
                block.function,
                block.address,
                block.count,
                code,
            )

    def _apply(self, dev: _Device, values: Iterable[tuple[PointSpec, Value]]) -> None:
        mono = self._clock()
        cache = dev.values
        checked = False
        for p, v in values:
            old = cache.get(p.name, _MISSING)
            if old is _MISSING:
                cache[p.name] = v
                self._emit(PointChanged(dev.spec.name, p.name, v, mono, initial=True))
            elif old != v or type(old) is not type(v):
                cache[p.name] = v
                self._emit(PointChanged(dev.spec.name, p.name, v, mono))
            if p.expect is not None:
                checked = True
                why = p.check(v)
                if why != dev.problems.get(p.name):
                    dev.checked = False  # the list of problems changed: report it
                    if why is None:
                        dev.problems.pop(p.name)
                    else:
                        dev.problems[p.name] = why
        if checked and not dev.checked:
            dev.checked = True
            problems = tuple(dev.problems[k] for k in sorted(dev.problems))
            if problems:
                log.warning(
                    "bus %s: device %s is not set up as its profile %s expects: %s",
                    self.spec.name,
                    dev.spec.name,
                    dev.spec.profile.name,
                    "; ".join(problems),
                )
            self._emit(DeviceCheck(dev.spec.name, problems, mono))

    def _emit(self, ev: DeviceEvent) -> None:
        if self._thread_id and threading.get_ident() == self._thread_id:
            self._hand(self._deliver, ev)
        else:
            self._deliver(ev)

    def _settle(self, fut: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
        """Complete a write's future (from the bus's thread: on the event loop, after the events before it)."""
        if self._thread_id and threading.get_ident() == self._thread_id:
            self._hand(_settle, fut, result, error)
        else:
            _settle(fut, result, error)

    def _hand(self, fn: Callable[..., None], *args: Any) -> None:
        """From the bus's thread: ``fn(*args)`` on the event loop, in order; a burst of them costs one wake-up."""
        self._handoff.append((fn, args))
        if not self._handoff_pending:
            self._handoff_pending = True
            loop = self._loop
            assert loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: the bus was never stopped
                loop.call_soon_threadsafe(self._deliver_handed)

    def _deliver_handed(self) -> None:
        self._handoff_pending = False  # before taking: what comes after this is handed again
        q = self._handoff
        while q:
            fn, args = q.popleft()
            fn(*args)

    def _deliver(self, ev: DeviceEvent) -> None:
        try:
            self._sink(ev)
        except Exception:
            self._stats.sink_errors += 1
            if self._stats.sink_errors <= 5:
                log.exception("bus %s: the event sink failed on %r", self.spec.name, ev)

    async def _serve_writes(self) -> None:
        now = self._clock()
        while self._link.up and (self._writes or (self._timed and self._timed[0][0] <= now)):
            due = bool(self._timed) and self._timed[0][0] <= now
            await self._do_write(heapq.heappop(self._timed)[2] if due else self._writes.popleft())
            now = self._clock()

    async def _do_write(self, job: _WriteJob) -> None:
        self._current = job
        dev, p, cmd = job.device, job.point, job.cmd
        unit = dev.spec.unit
        pulse = dev.spec.profile.pulse
        use_flash = cmd.pulse_ms is not None and not job.is_reset and pulse is not None and p.table == pulse.table
        if use_flash:
            assert pulse is not None and cmd.pulse_ms is not None
            units = max(1, math.ceil(cmd.pulse_ms / pulse.unit_ms))  # within max_units: checked by write()
            request = write_coil_raw_request((pulse.on_base if job.encoded else pulse.off_base) + p.address, units)
        elif p.table == "coil":
            request = write_coil_request(p.address, bool(job.encoded))
        else:
            request = write_registers_request(p.address, job.encoded)  # type: ignore[arg-type]

        ok, answered, detail, failure = False, False, "", ""
        confirmed: bool | None = None
        sent = self._clock()
        try:
            reply, latency = await self._link.request(unit, request, self.spec.retries, self._counter(dev))
            answered = True
            check_write_reply(request, reply)
            self._on_success(dev, latency)
            ends = None if cmd.pulse_ms is None or job.is_reset else sent + cmd.pulse_ms / 1000
            confirmed, detail = await self._read_back(dev, p, job.encoded, ends)
            ok = bool(confirmed)
            failure = "" if ok else "unconfirmed" if confirmed is None else "not_moved"
        except _DeviceRefused as e:
            detail, failure = f"refused: Modbus exception {e.code}", "unconfirmed" if answered else "refused"
        except _NoAnswer as e:
            detail, failure = str(e), "no_answer"
        except ModbusReplyError as e:
            self._counter(dev)("bad_answer")
            detail, failure = str(e), "unconfirmed"
        except _LinkLost as e:
            detail, failure = f"link down: {e}", "unconfirmed" if answered else "link_down"
            self._drop_link(str(e))
        finally:
            self._current = None
        dev.stats.writes += 1
        if not ok:
            dev.stats.write_errors += 1
        token = f"{cmd.token}:reset" if job.is_reset else cmd.token
        result = WriteResult(dev.spec.name, p.name, token, ok, self._clock(), detail, confirmed, failure)
        if answered and cmd.pulse_ms is not None and not use_flash and not job.is_reset:
            self._schedule_reset(job)  # even unconfirmed: whatever the relay did, it must not stay on
        if job.is_reset and not ok:
            self._retry_reset(job)
        gi = dev.group_of.get(p.group)
        if ok and gi is not None and self._sched is not None:
            self._sched.poll_soon(dev.index, gi, self._clock())  # confirm the new state soon
        self._emit(result)
        if job.future is not None:
            self._settle(job.future, result)

    async def _read_back(
        self, dev: _Device, p: PointSpec, written: bool | list[int], pulse_ends: float | None = None
    ) -> tuple[bool | None, str]:
        """Read ``p`` back right after its write (ahead of every poll): (True, "") when the device holds what
        was written, (False, why) when it does not, (None, why) when the read-back got no usable answer. A mismatch
        is read once more before it counts (a board may answer the read before it has switched). For a pulse
        (``pulse_ends``: when it would end, counted from before the write was sent), a mismatch read after that
        proves nothing: (None, why)."""
        block = Block(p.table, p.address, p.count, ((p, 0),))
        want = bool(written) if p.table == "coil" else [int(r) & 0xFFFF for r in written]  # type: ignore[union-attr]
        got: object = None
        for _ in range(2):
            try:
                reply, latency = await self._link.request(
                    dev.spec.unit, block.request, self.spec.retries, self._counter(dev)
                )
                raw = read_values(block.request, reply)
            except _DeviceRefused as e:
                return None, f"the write was answered, its read-back refused (Modbus exception {e.code})"
            except _NoAnswer as e:
                return None, f"the write was answered, its read-back was not ({e})"
            except ModbusReplyError as e:
                self._counter(dev)("bad_answer")
                return None, f"the write was answered, its read-back was not understood ({e})"
            self._on_success(dev, latency)
            got = bool(raw[0]) if p.table == "coil" else [int(r) for r in raw[: p.count]]
            if len(raw) >= p.count:
                self._apply(dev, block.decode(raw))
            if got == want:
                return True, ""
            if pulse_ends is not None and self._clock() >= pulse_ends:
                return None, f"read-back: {p.name}'s pulse was over before it could be read back"
        shown = ("on" if got else "off") if p.table == "coil" else got
        return False, (
            f"read-back: {p.name} reads {shown} after the write was answered "
            f"({'the relay did not move' if p.table == 'coil' else 'the value did not take'})"
        )

    def _schedule_reset(self, job: _WriteJob) -> None:
        cmd = job.cmd
        assert cmd.pulse_ms is not None
        # A newer pulse on the same point replaces a pending reset.
        self._timed = [t for t in self._timed if not (t[2].device is job.device and t[2].point is job.point)]
        heapq.heapify(self._timed)
        reset = _WriteJob(cmd, job.device, job.point, not bool(job.encoded), None, is_reset=True)
        heapq.heappush(self._timed, (self._clock() + cmd.pulse_ms / 1000, next(self._seq), reset))
        self._poke()

    def _retry_reset(self, job: _WriteJob) -> None:
        job.attempts += 1
        if job.attempts > 20:
            log.error(
                "bus %s: giving up resetting %s.%s after a pulse", self.spec.name, job.device.spec.name, job.point.name
            )
            return
        delay = backoff_delay(job.attempts, 0.2, 5.0, self._rng.random)
        log.warning(
            "bus %s: pulse reset of %s.%s failed; retrying", self.spec.name, job.device.spec.name, job.point.name
        )
        heapq.heappush(self._timed, (self._clock() + delay, next(self._seq), job))


_MISSING = object()
#: How long a stopping bus waits for its thread (a connect under way is bounded by the timeout and 5 s).
_THREAD_STOP_S = 2.0


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _reader(block: Block, unit: int) -> Callable[[Any], Awaitable[ModbusPDU]]:
    fn = {
        "coil": "read_coils",
        "discrete": "read_discrete_inputs",
        "holding": "read_holding_registers",
        "input": "read_input_registers",
    }[block.table]

    def send(client: Any) -> Awaitable[ModbusPDU]:
        read: Callable[..., Awaitable[ModbusPDU]] = getattr(client, fn)
        return read(block.address, count=block.count, device_id=unit)

    return send


def _quiet_pymodbus() -> None:
    """pymodbus logs every missed answer at ERROR; the bus logs availability changes once instead."""
    lg = logging.getLogger("pymodbus")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.CRITICAL)
