"""How a Modbus bus's requests reach its devices: the links under :class:`~devices.modbus.ModbusBus`, each with the
same discipline (our own retries, unit-id and answer checks, error kinds: :class:`NoAnswer`, :class:`DeviceRefused`,
:class:`LinkLost`), and :class:`BusSpec`, where a bus is and how to talk on it.

* :class:`Link`: pymodbus's client, for RTU framings (a serial line, a serial server), on the event loop, where the
  wire, not the CPU, is the cost. pymodbus's own retry and reconnect logic is switched off (``retries=0``,
  ``reconnect_delay=0``, no automatic disconnect after missed answers) so that nothing reconnects behind the bus.
* :class:`TcpLink`: Modbus TCP, framed here (:class:`_MbapStream`: no objects per transaction, a receive buffer kept
  for the connection). :class:`LoopTcpLink` waits on the event loop (a connection to one device: such buses share
  the loop's wake-ups); :class:`ThreadTcpLink` on a blocking socket in the bus's own thread (a connection with
  several devices behind it: a request is a ``send`` and a ``recv``, where the event loop also spent an
  ``epoll_wait`` and its own machinery, more than the poll's own work).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import math
import select
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from devices.modbus_pdu import ModbusReplyError, exception_code, mbap_frame, mbap_split
from devices.modbus_plan import Block

if TYPE_CHECKING:
    from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
    from pymodbus.exceptions import ConnectionException, ModbusException
    from pymodbus.framer import FramerType
    from pymodbus.pdu import ModbusPDU
    from pymodbus.pdu.bit_message import WriteSingleCoilRequest as _FlashRequest

BusKind = Literal["modbus-tcp", "modbus-rtu", "modbus-rtu-over-tcp"]

T = TypeVar("T")


class ModbusBusError(Exception):
    """Base of the bus engine's errors."""


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
        """The silence before each request: on RTU framing 30 ms (the slow devices' need), or the 3.5 characters
        the serial-line spec asks where that is longer (1200 baud with parity or two stop bits: 33 ms)."""
        if self.inter_frame_ms is not None:
            return self.inter_frame_ms
        if self.kind == "modbus-tcp":
            return 0
        bits = 1 + 8 + (self.parity != "N") + self.stopbits
        return max(30, math.ceil(3.5 * bits * 1000 / self.baudrate))

    def endpoint(self) -> str:
        return self.serial if self.kind == "modbus-rtu" else f"{self.host}:{self.port}"  # type: ignore[return-value]


class NoAnswer(ModbusBusError):
    """No usable answer after the retries; ``kind`` says why (``timeout``, ``bad_frame``, ``wrong_unit``)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class DeviceRefused(ModbusBusError):
    """The device answered with a Modbus exception: it is alive, the request failed."""

    def __init__(self, code: int) -> None:
        super().__init__(f"Modbus exception {code}")
        self.code = code


class LinkLost(ModbusBusError):
    """The connection went away (or was closed) under a request."""


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


class Link:
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
        """One request with up to ``retries`` repeats. Returns (answer, latency_s). Raises NoAnswer,
        DeviceRefused (a Modbus exception answer, not retried) or LinkLost."""
        last = NoAnswer("timeout", "no answer")
        for _ in range(retries + 1):
            client = self.client
            if client is None or not client.connected:
                raise LinkLost("link closed")
            await self._pace()
            self._rx = 0
            t0 = self.clock()
            try:
                async with asyncio.timeout(self.spec.timeout_ms / 1000 + 2.0):
                    resp = await send(client)
            except ConnectionException as e:
                raise LinkLost(str(e)) from None
            except (ModbusException, TimeoutError, OSError, ValueError, struct.error) as e:
                kind = "bad_frame" if self._rx else "timeout"
                last = NoAnswer(kind, f"{kind}: {e}")
                on_error(kind)
                if not client.connected:
                    raise LinkLost(f"link lost: {e}") from None
                continue
            finally:
                self.last_end = self.clock()
            if resp is None:
                last = NoAnswer("bad_frame", "empty answer")
                on_error("bad_frame")
                continue
            if resp.dev_id != unit:
                last = NoAnswer("wrong_unit", f"answer from unit {resp.dev_id}, asked {unit}")
                on_error("wrong_unit")
                continue
            if resp.isError():
                on_error("exception")
                raise DeviceRefused(int(getattr(resp, "exception_code", 0)))
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


class TcpLink(abc.ABC):
    """Modbus TCP with our own MBAP framing (:class:`_MbapStream`): the same discipline as :class:`Link` (our
    retries, unit-id and answer checks, error kinds), none of pymodbus's per-request objects. Two ways to wait for
    the answers, one subclass each: :class:`LoopTcpLink` on the event loop, :class:`ThreadTcpLink` in a thread of
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
        move the deadline: the timeout is a silence of that long, not the batch); LinkLost."""

    def _send(
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
        the timeout, or not sent; no retries here) and how many were sent. Raises LinkLost."""
        stream = self._stream
        if stream is None or stream.closed:
            raise LinkLost("link closed")
        try:
            self._send(stream, reqs, window, on_reply, proceed)
            await self._wait(stream)
        except TimeoutError:
            pass
        finally:
            stream.done = True  # an answer coming later is a late one
            self.last_end = self.clock()
        return stream.got, stream.sent

    async def request(
        self, unit: int, pdu: bytes, retries: int, on_error: Callable[[str], None]
    ) -> tuple[bytes, float]:
        """One request with up to ``retries`` repeats. Returns (reply PDU, latency_s). Raises NoAnswer,
        DeviceRefused (a Modbus exception answer, not retried) or LinkLost."""
        last = NoAnswer("timeout", "no answer")
        req = ((unit, pdu),)
        for _ in range(retries + 1):
            stream = self._stream
            if stream is None or stream.closed:
                raise LinkLost("link closed")
            if self.gap_s:
                wait = self.last_end + self.gap_s - self.clock()
                if wait > 0:
                    await self._pace(wait)
            t0 = self.clock()
            try:
                self._send(stream, req, 1, None, None)
                await self._wait(stream)
            except TimeoutError:
                kind = "bad_frame" if self.garbage else "timeout"
                last = NoAnswer(kind, f"{kind}: no answer within {self.spec.timeout_ms} ms")
                on_error(kind)
                continue
            finally:
                stream.done = True
                self.last_end = self.clock()
            answer = stream.got[0]
            assert answer is not None
            got_unit, reply = answer
            if got_unit != unit:
                last = NoAnswer("wrong_unit", f"answer from unit {got_unit}, asked {unit}")
                on_error("wrong_unit")
                continue
            code = exception_code(reply)
            if code is not None:
                on_error("exception")
                raise DeviceRefused(code)
            return reply, self.last_end - t0
        raise last


class _LoopProtocol(asyncio.BufferedProtocol):
    """A connection on the event loop, read into its stream's buffer; the answers handled from its callback. The
    batch under way ends with one call of ``ender`` (None: done; else TimeoutError, LinkLost, or what the bus's
    handler of an answer raised)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.stream = _MbapStream(self._write, self.end)
        self.ender: Callable[[BaseException | None], None] | None = None

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def end(self, error: BaseException | None = None) -> None:
        ender, self.ender = self.ender, None
        if ender is not None:
            ender(error)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream.closed = True
        self.end(LinkLost(f"connection lost: {exc or 'closed by the peer'}"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.stream.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.stream.feed(nbytes)
        except Exception as e:  # the bus's handler failed: its poll loop restarts
            self.end(e)


class LoopTcpLink(TcpLink):
    """Modbus TCP on the event loop: for a connection to one device, where buses that fall due together share one
    wake-up of the loop (a thread each would cost a thread's wake-up per request)."""

    def __init__(self, spec: BusSpec, clock: Callable[[], float], gap_s: float) -> None:
        super().__init__(spec, clock, gap_s)
        self._proto: _LoopProtocol | None = None
        # One timer for the link, not one per request: it fires at most once per timeout and re-arms itself
        # for the request then outstanding (most answers come long before it is due).
        self._timer: asyncio.TimerHandle | None = None
        self._on_end: Callable[[list[tuple[int, bytes] | None], int, BaseException | None], None] = _ignore_end

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
            proto.ender = None  # whoever waited on it has gone on: its end is not theirs to hear
            proto.transport.abort()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _pace(self, wait_s: float) -> None:
        await asyncio.sleep(wait_s)

    def _check_deadline(self) -> None:
        self._timer = None
        proto = self._proto
        if proto is None or proto.ender is None:
            return
        loop = asyncio.get_running_loop()
        deadline = proto.stream.active + self._timeout_s  # loop.time() is time.monotonic()
        if loop.time() >= deadline:
            proto.end(TimeoutError())
        else:
            self._timer = loop.call_at(deadline, self._check_deadline)

    def _arm(self, stream: _MbapStream) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(stream.active + self._timeout_s, self._check_deadline)

    async def _wait(self, stream: _MbapStream) -> None:
        proto = self._proto
        assert proto is not None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        proto.ender = functools.partial(_settle_end, fut)
        self._arm(stream)
        try:
            await fut
        finally:
            proto.ender = None

    def start_many(
        self,
        reqs: Sequence[tuple[int, bytes]],
        on_reply: Callable[[int, int, bytes], None],
        window: int,
        proceed: Callable[[], bool],
        on_end: Callable[[list[tuple[int, bytes] | None], int, BaseException | None], None],
    ) -> None:
        """:meth:`request_many` without a task: sends the batch and returns at once; ``on_end(answers, sent,
        error)`` is called from the event loop when it ends (error None when it ended or went silent for the
        timeout; LinkLost, or what ``on_reply`` raised). Raises LinkLost if the link is down."""
        stream, proto = self._stream, self._proto
        if stream is None or stream.closed or proto is None:
            raise LinkLost("link closed")
        self._on_end = on_end
        proto.ender = self._end_many
        self._send(stream, reqs, window, on_reply, proceed)
        self._arm(stream)

    def _end_many(self, error: BaseException | None) -> None:
        stream = self._stream
        if stream is None:
            return  # closed: whoever waited on it has gone on
        stream.done = True  # an answer coming later is a late one
        self.last_end = self.clock()
        self._on_end(stream.got, stream.sent, None if isinstance(error, TimeoutError) else error)


def _ignore_end(got: list[tuple[int, bytes] | None], sent: int, error: BaseException | None) -> None:
    pass


def _settle_end(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if not fut.done():
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


class ThreadTcpLink(TcpLink):
    """Modbus TCP on a blocking socket that only the bus's own thread uses: for a connection with several devices
    behind it (a serial server, a panel's many units), where a poll is a ``send`` and a ``recv``, two system calls,
    and the event loop spent three and its own machinery besides (bench/alarm_latency.py).

    Its coroutines never suspend: the bus's poll loop, written as coroutines for the event loop, runs in that thread
    from start to end in one step (:func:`drive`)."""

    def __init__(self, spec: BusSpec, clock: Callable[[], float], gap_s: float) -> None:
        super().__init__(spec, clock, gap_s)
        self._sock: socket.socket | None = None
        self._poll: select.poll | None = None
        # The bus's thread holds something back until then (time.monotonic(); 0: nothing): a wait for an answer past
        # it calls on_hold_end first (and hold_until is 0 again), then waits on.
        self.hold_until = 0.0
        self.on_hold_end: Callable[[], None] = _nothing

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
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
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
        self._poll = None
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
            raise LinkLost(f"connection lost: {e}") from None

    def _readable_by(self, t: float) -> bool:
        """Bytes to read arrive before ``time.monotonic()`` is ``t``: one poll() of the socket."""
        assert self._poll is not None
        return bool(self._poll.poll(max(0, math.ceil((t - time.monotonic()) * 1000))))

    async def _wait(self, stream: _MbapStream) -> None:
        sock = self._sock
        assert sock is not None
        timeout_s = self._timeout_s
        try:
            while not stream.done:
                if self.hold_until and not self._readable_by(self.hold_until):
                    self.hold_until = 0.0
                    self.on_hold_end()
                n = sock.recv_into(stream.buffer())
                if not n:
                    stream.closed = True
                    raise LinkLost("connection lost: closed by the peer")
                stream.feed(n)
                if not stream.done and time.monotonic() - stream.active >= timeout_s:
                    raise TimeoutError()  # bytes came, but no answer (garbage, a stray frame) for the timeout
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO: nothing came for the timeout
            raise TimeoutError() from None
        except OSError as e:
            stream.closed = True
            raise LinkLost(f"connection lost: {e}") from None


def _nothing() -> None:
    pass


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (a Modbus TCP bus's poll loop, in its own thread) to its end."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a Modbus TCP bus's poll loop waited for the event loop in its own thread")


def reader(block: Block, unit: int) -> Callable[[Any], Awaitable[ModbusPDU]]:
    """The pymodbus client call that reads ``block`` from ``unit`` (:meth:`Link.exchange`; the bus scan)."""
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


def quiet_pymodbus() -> None:
    """pymodbus logs every missed answer at ERROR; the bus logs availability changes once instead."""
    lg = logging.getLogger("pymodbus")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.CRITICAL)
