"""The Modbus bus engine: one task owns one bus (a TCP connection, a serial line, or RTU frames
tunnelled through a TCP serial server) and everything on it.

It polls each device's point groups at their own intervals in merged block reads, reports changes
as :class:`~devices.events.PointChanged`, tracks availability, puts writes ahead of polls, paces
serial frames, and is the one place that reconnects (capped exponential backoff, full jitter).
pymodbus's own retry and reconnect logic is switched off (``retries=0``, ``reconnect_delay=0``, no
automatic disconnect after missed answers) so that nothing reconnects behind our back.

Usage::

    async with ModbusBus(BusSpec("rs485-1", "modbus-rtu", serial="/dev/ttyUSB0"), devices, sink) as bus:
        result = await bus.write(WritePoint("door-1", "relay1", True, token="t1", pulse_ms=3000))
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import random
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.bit_message import WriteSingleCoilRequest

from devices.events import Availability, DeviceEvent, PointChanged, WritePoint, WriteResult
from devices.modbus_plan import Block, DevicePlan, GroupPlan, PollJob, PollScheduler, backoff_delay, plan_blocks
from devices.profiles import PointSpec, Profile, Value, encode_point

log = logging.getLogger("devices.modbus")

BusKind = Literal["modbus-tcp", "modbus-rtu", "modbus-rtu-over-tcp"]
MAX_PULSE_MS = 3_600_000


class ModbusBusError(Exception):
    """Base of the bus engine's errors."""


class BusDown(ModbusBusError):
    """The bus has no working link (or is not running): the command was not sent."""


# ---------------------------------------------------------------- specs


@dataclass(frozen=True, slots=True)
class BusSpec:
    """One bus. ``serial`` is a device path or a pyserial URL (``/dev/ttyUSB0``, a pseudo-terminal);
    ``inter_frame_ms`` None means 30 ms on RTU framing, 0 on Modbus TCP."""

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

    def __post_init__(self) -> None:
        if self.kind not in ("modbus-tcp", "modbus-rtu", "modbus-rtu-over-tcp"):
            raise ValueError(f"bus {self.name!r}: unknown kind {self.kind!r}")
        if self.kind == "modbus-rtu":
            if not self.serial:
                raise ValueError(f"bus {self.name!r}: a modbus-rtu bus needs 'serial'")
        elif not self.host or not self.port:
            raise ValueError(f"bus {self.name!r}: a {self.kind} bus needs 'host' and 'port'")
        for fname, lo in (("timeout_ms", 1), ("offline_after_misses", 1), ("offline_poll_ms", 1),
                          ("reconnect_min_ms", 1), ("reconnect_max_ms", 1), ("retries", 0)):
            if getattr(self, fname) < lo:
                raise ValueError(f"bus {self.name!r}: {fname} must be at least {lo}")
        if self.inter_frame_ms is not None and self.inter_frame_ms < 0:
            raise ValueError(f"bus {self.name!r}: inter_frame_ms must not be negative")

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
                str(s.serial), framer=FramerType.RTU, baudrate=s.baudrate, parity=s.parity, stopbits=s.stopbits,
                bytesize=8, **common,
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
        self._link = _Link(spec, clock, gap_s)
        self._stats = BusStats(
            spec.name, spec.kind, spec.endpoint(), devices={d.spec.name: d.stats for d in self._devices}
        )
        self._sched: PollScheduler | None = None
        self._writes: deque[_WriteJob] = deque()
        self._timed: list[tuple[float, int, _WriteJob]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._running = False
        self._was_up = False
        self._down_reason = "not started"
        self._connect_failures = 0
        self._next_connect = 0.0
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._current: _WriteJob | None = None
        self._refusals_logged: set[tuple[str, int, int, int]] = set()

    # -- lifecycle

    async def __aenter__(self) -> ModbusBus:
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
            self._link.close()
            self._was_up = False
            cur, self._current = self._current, None
            if cur is not None and cur.future is not None and not cur.future.done():
                cur.future.set_exception(BusDown(f"bus {self.spec.name!r} stopped during the write"))
            self._fail_queued("bus stopped", include_timed=True)

    # -- public

    @property
    def device_names(self) -> list[str]:
        return [d.spec.name for d in self._devices]

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
            else:
                try:
                    encoded = encode_point(point, cmd.value)
                except ValueError as e:
                    problem = str(e)
        if problem is not None or dev is None or point is None:
            self._stats.rejected_writes += 1
            result = WriteResult(cmd.device, cmd.point, cmd.token, False, self._clock(), problem or "rejected")
            self._emit(result)
            return result
        if not self._running:
            raise BusDown(f"bus {self.spec.name!r} is not running")
        if not self._link.up:
            raise BusDown(f"bus {self.spec.name!r} is down: {self._down_reason}")
        fut: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        self._writes.append(_WriteJob(cmd, dev, point, encoded, fut))
        self._wake.set()
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
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception:
                restarts += 1
                self._stats.restarts += 1
                log.exception("bus %s: poll loop failed (restart %d)", self.spec.name, restarts)
                cur, self._current = self._current, None
                if cur is not None and cur.future is not None and not cur.future.done():
                    cur.future.set_exception(BusDown(f"bus {self.spec.name!r}: internal error"))
                self._drop_link("poll loop restarted")
                await asyncio.sleep(min(5.0, 0.1 * 2**min(restarts, 6)))

    async def _run(self) -> None:
        clock = self._clock
        if self._sched is None:
            self._sched = PollScheduler(
                [d.plan for d in self._devices],
                now=clock(),
                offline_after=self.spec.offline_after_misses,
                offline_retry_s=self.spec.offline_poll_ms / 1000,
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
                _, _, job = heapq.heappop(self._timed)
                await self._do_write(job)
                continue
            if up and self._writes:
                await self._do_write(self._writes.popleft())
                continue
            job = sched.next_job()
            if job is not None and job.due <= now:
                if up:
                    await self._poll(job)
                else:
                    self._missed(job, f"link down: {self._down_reason}")
                continue
            wake = [job.due] if job is not None else []
            if self._timed and up:
                wake.append(self._timed[0][0])
            if not up:
                wake.append(self._next_connect)
            timeout = max(0.0, min(wake) - now) if wake else None
            self._wake.clear()
            if self._writes:
                continue
            # asyncio.timeout, not wait_for: on 3.11 wait_for can turn a cancellation into a timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

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
            self._connect_failures, self.spec.reconnect_min_ms / 1000, self.spec.reconnect_max_ms / 1000, self._rng
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
                self._connect_failures, self.spec.reconnect_min_ms / 1000, self.spec.reconnect_max_ms / 1000,
                self._rng,
            )
            self._connect_failures += 1
            self._next_connect = self._clock() + delay
        self._fail_queued(f"link down: {reason}", include_timed=False)

    def _fail_queued(self, reason: str, *, include_timed: bool) -> None:
        while self._writes:
            job = self._writes.popleft()
            if job.future is not None and not job.future.done():
                job.future.set_exception(BusDown(f"bus {self.spec.name!r}: {reason}"))
        if include_timed:
            for _, _, job in self._timed:
                log.warning("bus %s: pulse reset of %s.%s not sent (%s)", self.spec.name, job.device.spec.name,
                            job.point.name, reason)
            self._timed.clear()

    def _on_success(self, dev: _Device, latency: float) -> None:
        dev.stats.transactions += 1
        dev.stats.last_latency_ms = latency * 1000
        dev.stats.last_ok_mono = self._clock()
        self._connect_failures = 0  # the link demonstrably works: backoff starts again from the bottom

    def _counter(self, dev: _Device) -> Callable[[str], None]:
        def count(kind: str) -> None:
            dev.stats.errors[kind] = dev.stats.errors.get(kind, 0) + 1

        return count

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
                resp, latency = await self._link.exchange(
                    dev.spec.unit, _reader(block, dev.spec.unit), retries, self._counter(dev)
                )
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
            raw = resp.bits if block.table in ("coil", "discrete") else resp.registers
            try:
                values = block.decode(raw)
            except ValueError as e:
                self._counter(dev)("bad_answer")
                failure = str(e)
                continue
            answered = True
            self._on_success(dev, latency)
            self._apply(dev, values)
        if answered:
            dev.stats.polls += 1
            self._availability(dev, self._sched.done(job, self._clock(), True), "")  # type: ignore[union-attr]
        else:
            self._missed(job, failure or "no answer")

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
            log.warning("bus %s: device %s (unit %d) offline: %s", self.spec.name, dev.spec.name, dev.spec.unit,
                        reason)
        else:
            log.info("bus %s: device %s (unit %d) online", self.spec.name, dev.spec.name, dev.spec.unit)
        self._emit(Availability(dev.spec.name, change, self._clock(), reason))  # type: ignore[arg-type]

    def _log_refusal(self, dev: _Device, block: Block, code: int) -> None:
        key = (dev.spec.name, block.function, block.address, code)
        if key not in self._refusals_logged:
            self._refusals_logged.add(key)
            log.warning("bus %s: device %s refuses function %d at %d (+%d): Modbus exception %d", self.spec.name,
                        dev.spec.name, block.function, block.address, block.count, code)

    def _apply(self, dev: _Device, values: Iterable[tuple[PointSpec, Value]]) -> None:
        mono = self._clock()
        cache = dev.values
        for p, v in values:
            old = cache.get(p.name, _MISSING)
            if old is _MISSING:
                cache[p.name] = v
                self._emit(PointChanged(dev.spec.name, p.name, v, mono, initial=True))
            elif old != v or type(old) is not type(v):
                cache[p.name] = v
                self._emit(PointChanged(dev.spec.name, p.name, v, mono))

    def _emit(self, ev: DeviceEvent) -> None:
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
        send: Callable[[Any], Awaitable[ModbusPDU]]
        if use_flash:
            assert pulse is not None and cmd.pulse_ms is not None
            units = min(pulse.max_units, max(1, math.ceil(cmd.pulse_ms / pulse.unit_ms)))
            address = (pulse.on_base if job.encoded else pulse.off_base) + p.address

            def send(c: Any) -> Awaitable[ModbusPDU]:
                return c.execute(False, _FlashRequest(address, units, unit))
        elif p.table == "coil":
            value = bool(job.encoded)

            def send(c: Any) -> Awaitable[ModbusPDU]:
                return c.write_coil(p.address, value, device_id=unit)
        else:
            regs = list(job.encoded)  # type: ignore[arg-type]

            def send(c: Any) -> Awaitable[ModbusPDU]:
                if len(regs) == 1:
                    return c.write_register(p.address, regs[0], device_id=unit)
                return c.write_registers(p.address, regs, device_id=unit)

        ok, detail = False, ""
        try:
            _, latency = await self._link.exchange(unit, send, self.spec.retries, self._counter(dev))
            ok = True
            self._on_success(dev, latency)
        except _DeviceRefused as e:
            detail = f"refused: Modbus exception {e.code}"
        except _NoAnswer as e:
            detail = str(e)
        except _LinkLost as e:
            detail = f"link down: {e}"
            self._drop_link(str(e))
        finally:
            self._current = None
        dev.stats.writes += 1
        if not ok:
            dev.stats.write_errors += 1
        token = f"{cmd.token}:reset" if job.is_reset else cmd.token
        result = WriteResult(dev.spec.name, p.name, token, ok, self._clock(), detail)
        if ok and cmd.pulse_ms is not None and not use_flash and not job.is_reset:
            self._schedule_reset(job)
        if job.is_reset and not ok:
            self._retry_reset(job)
        gi = dev.group_of.get(p.group)
        if ok and gi is not None and self._sched is not None:
            self._sched.poll_soon(dev.index, gi, self._clock())  # confirm the new state soon
        self._emit(result)
        if job.future is not None and not job.future.done():
            job.future.set_result(result)

    def _schedule_reset(self, job: _WriteJob) -> None:
        cmd = job.cmd
        assert cmd.pulse_ms is not None
        # A newer pulse on the same point replaces a pending reset.
        self._timed = [t for t in self._timed if not (t[2].device is job.device and t[2].point is job.point)]
        heapq.heapify(self._timed)
        reset = _WriteJob(cmd, job.device, job.point, not bool(job.encoded), None, is_reset=True)
        heapq.heappush(self._timed, (self._clock() + cmd.pulse_ms / 1000, next(self._seq), reset))
        self._wake.set()

    def _retry_reset(self, job: _WriteJob) -> None:
        job.attempts += 1
        if job.attempts > 20:
            log.error("bus %s: giving up resetting %s.%s after a pulse", self.spec.name, job.device.spec.name,
                      job.point.name)
            return
        delay = backoff_delay(job.attempts, 0.2, 5.0, self._rng)
        log.warning("bus %s: pulse reset of %s.%s failed; retrying", self.spec.name, job.device.spec.name,
                    job.point.name)
        heapq.heappush(self._timed, (self._clock() + delay, next(self._seq), job))


_MISSING = object()


def _reader(block: Block, unit: int) -> Callable[[Any], Awaitable[ModbusPDU]]:
    fn = {"coil": "read_coils", "discrete": "read_discrete_inputs", "holding": "read_holding_registers",
          "input": "read_input_registers"}[block.table]

    def send(client: Any) -> Awaitable[ModbusPDU]:
        return getattr(client, fn)(block.address, count=block.count, device_id=unit)

    return send


def _quiet_pymodbus() -> None:
    """pymodbus logs every missed answer at ERROR; the bus logs availability changes once instead."""
    lg = logging.getLogger("pymodbus")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.CRITICAL)


# ---------------------------------------------------------------- bus scan


@dataclass(frozen=True, slots=True)
class ScanHit:
    """A unit id that answered a scan, and the profile it looks like (None: answered, no profile fits)."""

    unit: int
    profile: str | None
    registers: tuple[int, ...] = ()
    detail: str = ""


async def scan_bus(
    spec: BusSpec,
    units: Iterable[int],
    profiles: Sequence[Profile],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> list[ScanHit]:
    """Ask each unit id for each profile's identification registers (one try each, the bus's timeout
    and pacing). Not for a bus that a :class:`ModbusBus` is running on. Raises BusDown if the link
    cannot be opened."""
    _quiet_pymodbus()
    link = _Link(spec, clock, spec.gap_ms / 1000)
    why = await link.connect()
    if why is not None:
        raise BusDown(f"bus {spec.name!r}: {why}")
    hits: list[ScanHit] = []
    candidates = [p for p in profiles if p.identify is not None]
    try:
        for unit in units:
            answered: ScanHit | None = None
            for prof in candidates:
                ident = prof.identify
                assert ident is not None
                block = Block(ident.table, ident.address, ident.count, ())
                try:
                    resp, _ = await link.exchange(unit, _reader(block, unit), 0, lambda _k: None)
                except _DeviceRefused as e:
                    answered = answered or ScanHit(unit, None, (), f"Modbus exception {e.code}")
                    continue
                except _NoAnswer as e:
                    if not link.up:
                        raise BusDown(f"bus {spec.name!r}: link lost during the scan") from None
                    if e.kind == "timeout" and answered is None:
                        break  # nothing there: do not spend a timeout per profile on it
                    continue
                except _LinkLost as e:
                    raise BusDown(f"bus {spec.name!r}: {e}") from None
                raw = resp.bits if ident.table in ("coil", "discrete") else resp.registers
                regs = tuple(int(v) for v in raw[: ident.count])
                expect = ident.expect or ()
                fits = all(e is None or e == r for e, r in zip(expect, regs, strict=False))
                if ident.unit_at is not None and (len(regs) <= ident.unit_at or regs[ident.unit_at] != unit):
                    fits = False
                if fits:
                    answered = ScanHit(unit, prof.name, regs)
                    break
                answered = answered or ScanHit(unit, None, regs, "answered, no profile matches")
            if answered is not None:
                hits.append(answered)
    finally:
        link.close()
    return hits
