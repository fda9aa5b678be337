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
Requests and replies are PDU bytes (:mod:`devices.modbus_pdu`): each block's read is built once, and a reply
identical to the block's previous one is not decoded at all. How they reach the devices is the link's
(:mod:`devices.modbus_link`): pymodbus's client for RTU framings; Modbus TCP framed by us, the polls due together sent
one after the other as each answer comes in. A Modbus TCP connection with several devices behind it runs the bus's
poll loop in a thread of its own on a blocking socket, and the event loop hears only of changes and writes' results,
in order, one wake-up per burst: a round's changes at its end (:data:`HOLD_S` at most; the two threads would otherwise
contend for the GIL while both work), a write's result at once. A connection to one device stays on the event loop,
where such buses share its wake-ups (a thread's wake-up per request cost more) and poll from the link's callbacks (the
cruise): one timer of the loop's for all of them, each answer applied and the round finished where it is read, the
device's slower groups asked in the round of its inputs, and the bus's task woken only for what is not plain polling
(a write, a retry, a lost link).

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
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from common.backoff import backoff_delay
from devices.events import Availability, DeviceCheck, DeviceEvent, PointChanged, WritePoint, WriteResult
from devices.modbus_link import (
    BusKind,
    BusSpec,
    DeviceRefused,
    Link,
    LinkLost,
    LoopTcpLink,
    ModbusBusError,
    NoAnswer,
    TcpLink,
    ThreadTcpLink,
    drive,
    quiet_pymodbus,
)
from devices.modbus_pdu import (
    ModbusReplyError,
    check_write_reply,
    exception_code,
    read_values,
    refusal,
    write_coil_raw_request,
    write_coil_request,
    write_registers_request,
)
from devices.modbus_plan import Block, DevicePlan, GroupPlan, PollJob, PollScheduler, plan_blocks
from devices.profiles import PointSpec, Profile, Value, encode_point

__all__ = [
    "BusDown",
    "BusKind",
    "BusSpec",
    "BusStats",
    "DeviceSpec",
    "DeviceStats",
    "ModbusBus",
    "ModbusBusError",
]

log = logging.getLogger("devices.modbus")

MAX_PULSE_MS = 3_600_000


class BusDown(ModbusBusError):
    """The bus has no working link (or is not running): the command was not sent."""


# ---------------------------------------------------------------- specs


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
    stalled_s: float | None = None  # the poll loop is stuck: silent this long (ModbusBus.stalled_for)
    devices: dict[str, DeviceStats] = field(default_factory=dict)


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
    start_by: float | None = None  # the bus's clock: not started by then, it is not made (WritePoint.start_within_ms)


class _Round:
    """Polls due together on Modbus TCP without a gap between frames, as they are asked: by the bus's task
    (:meth:`ModbusBus._poll_many`) or from the answers' callbacks (:meth:`ModbusBus._cruise`), which hand a round
    that needs retries or writes over to the task part-way."""

    __slots__ = ("answered", "bus", "dead", "failure", "jobs", "lost", "mark", "owners", "reqs", "start", "unanswered")

    def __init__(self, bus: ModbusBus, jobs: list[PollJob]) -> None:
        self.bus = bus
        self.jobs = jobs
        # What these jobs ask, built once for each set of jobs (a bus asks the same few sets over and over).
        key = tuple([(job.device, job.group, job.probe) for job in jobs])
        plan = bus._round_plans.get(key)
        if plan is None:
            reqs: list[tuple[int, bytes]] = []
            owners: list[tuple[int, _Device, Block]] = []  # per request: (index of its job, device, block)
            devices = bus._devices
            for k, job in enumerate(jobs):
                dev = devices[job.device]
                blocks = dev.plan.groups[job.group].blocks
                for block in blocks[:1] if job.probe else blocks:
                    reqs.append((dev.spec.unit, block.request))
                    owners.append((k, dev, block))
            plan = (reqs, owners)
            if len(bus._round_plans) < 256:
                bus._round_plans[key] = plan
        self.reqs, self.owners = plan
        self.answered = [False] * len(jobs)
        self.failure = [""] * len(jobs)
        self.dead = [False] * len(jobs)  # silent after its retries: its other blocks are not asked
        self.unanswered: list[int] = []
        self.start = 0  # the first request of the batch under way
        self.mark = 0.0  # when the request just answered went out (the answer before it came)
        self.lost = ""

    def reply(self, i: int, unit: int, reply: bytes) -> None:
        """An answer to the batch's request ``i`` (the link's on_reply)."""
        k, dev, block = self.owners[self.start + i]
        bus = self.bus
        now = bus._clock()
        latency, self.mark = now - self.mark, now
        if unit != dev.spec.unit:
            dev.count_error("wrong_unit")
            self.unanswered.append(self.start + i)
            return
        if reply[0] & 0x80:  # there, but this block is not read: a poll that reads none is missed
            dev.count_error("exception")
            code = exception_code(reply) or 0
            self.failure[k] = self.failure[k] or refusal(code)
            bus._log_refusal(dev, block, code)
            return
        if bus._take_reply(dev, block, reply):
            self.answered[k] = True
            bus._on_success(dev, latency)
        else:
            self.failure[k] = "bad answer"


#: What a set of jobs asks: the requests (unit, PDU), and per request (index of its job, device, block).
_RoundPlan = tuple[list[tuple[int, bytes]], list[tuple[int, _Device, Block]]]
#: A batch's end, as the link reports it: (answers by index, how many were sent, LinkLost or another error).
_Batch = tuple[list[tuple[int, bytes] | None], int, BaseException | None]


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
        quiet_pymodbus()
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
        # socket (ThreadTcpLink); one device: on the event loop, where such buses share its wake-ups.
        link_type = Link if spec.kind != "modbus-tcp" else ThreadTcpLink if len(devices) > 1 else LoopTcpLink
        self._link: Link | TcpLink = link_type(spec, clock, gap_s)
        # Polls due within this much of each other are taken in one wake-up.
        self._slack = min([g.interval_s for d in self._devices for g in d.plan.groups] or [0.0]) / 10
        # Modbus TCP without a silence between frames: the polls taken in one wake-up are sent one after the other
        # from the answers' callback (:meth:`_poll_many`), pipelined when max_in_flight is above 1. Where a device
        # needs a silence before each request (its profile's inter_frame_ms), one request at a time from the task.
        self._chain = isinstance(self._link, TcpLink) and not gap_s
        # What the bus's thread tells the event loop (events, writes' results) goes over in order (_hand).
        self._threaded = isinstance(self._link, ThreadTcpLink)
        if isinstance(self._link, ThreadTcpLink):
            self._link.on_hold_end = self._release_held
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
        # The bus's thread in a round of polls: the changes it finds wait for the round's end (HOLD_S at most) to be
        # handed over, so that the event loop takes them up while the thread sleeps, not while both want the GIL.
        self._holding = False
        self._running = False
        self._beat = 0.0  # when the poll loop last went round (stalled_for)
        #: Longer than the poll loop ever goes without going round when it works: an idle (at most _IDLE_MAX_S), a
        #: connect (the timeout and 5 s; a host name's lookup, the resolver's own timeouts), one request (the
        #: timeout), a restart's pause (at most 5 s).
        self.stall_limit_s = 60.0 + 2 * spec.timeout_ms / 1000
        self._was_up = False
        self._down_reason = "not started"
        self._connect_failures = 0
        self._next_connect = 0.0
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: _WriteJob | None = None
        # Modbus TCP on the event loop without gaps: the polls run from the link's callbacks (_cruise).
        self._cruising = self._chain and isinstance(self._link, LoopTcpLink)
        self._cruise_end: asyncio.Future[tuple[_Round, _Batch | None] | None] | None = None
        self._ticker: _Ticker | None = None
        self._round_plans: dict[tuple[tuple[int, int, bool], ...], _RoundPlan] = {}  # _Round's, by its jobs
        self._cruise_now: _Round | None = None  # the round under way
        self._cruise_ticket = 0  # this bus's next round on the loop's ticker (_Ticker); 0: none
        self._refusals_logged: set[tuple[str, int, int, int]] = set()

    # -- lifecycle

    async def __aenter__(self) -> ModbusBus:
        self._loop = asyncio.get_running_loop()
        if self._cruising:
            self._ticker = _Ticker.of(self._loop)
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
        start_by = None if cmd.start_within_ms is None else self._clock() + cmd.start_within_ms / 1000
        self._writes.append(_WriteJob(cmd, dev, point, encoded, fut, start_by=start_by))
        self._poke()
        return await fut

    def stats(self) -> BusStats:
        """A snapshot of the counters (safe to keep; later polls do not change it)."""
        s = self._stats
        devs = {k: replace(v, errors=dict(v.errors)) for k, v in s.devices.items()}
        return replace(s, connected=self._link.up, stalled_s=self.stalled_for(), devices=devs)

    @property
    def connected(self) -> bool:
        return self._link.up

    @property
    def beating(self) -> bool:
        """The poll loop runs and has gone round at least once (whether it is stuck since: :meth:`stalled_for`)."""
        return self._running and bool(self._beat)

    def stalled_for(self, now: float | None = None) -> float | None:
        """How long the poll loop has not moved (no round, no request ended), when that is longer than it ever should
        (:attr:`stall_limit_s`): its thread or task is stuck, and nothing on the bus is watched. None otherwise, and
        while the bus is not running. Any thread."""
        if not self._running or not self._beat:
            return None
        silent = (self._clock() if now is None else now) - max(self._beat, self._link.last_end)
        return silent if silent > self.stall_limit_s else None

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
                drive(self._run())
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
            if isinstance(self._link, ThreadTcpLink):
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
                # Asked together: one write when pipelining; in the bus's thread, one wake-up of it per round; and a
                # lone device's groups, which fall due together in one round rather than each in a wake-up of its own.
                stagger=self._pipeline == 1 and not self._threaded and len(self._devices) > 1,
                align=not self._threaded,  # buses on the event loop with the same intervals wake in one loop turn
            )
        sched = self._sched
        # pymodbus waits with asyncio.wait_for, which on 3.11 can swallow a cancellation that lands
        # together with a timeout; the flag makes sure the loop still ends when the bus is stopped.
        while self._running:
            now = self._beat = clock()
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
                if self._cruising:
                    await self._cruise(jobs)
                    continue
                if self._chain:
                    self._holding = self._threaded
                    try:
                        await self._poll_many(jobs)
                    finally:
                        self._holding = False
                        self._release_held()
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
            await self._idle(min(_IDLE_MAX_S, max(0.0, min(wake) - now)) if wake else _IDLE_MAX_S)

    def _poke(self) -> None:
        """Wake the owner task if it is idle (a write was queued, a reset scheduled)."""
        if self._threaded:
            self._wake.set()
            return
        if self._cruise_ticket:  # cruising between rounds (in a round, the next request is not sent)
            self._cruise_stop()
        w = self._idle_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _idle(self, wait_s: float) -> None:
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
        timer = loop.call_later(wait_s, _release, fut)
        try:
            await fut
        finally:
            self._idle_waiter = None
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
            except DeviceRefused as e:  # there, but this block is not read: a poll that reads none is missed
                failure = failure or refusal(e.code)
                self._log_refusal(dev, block, e.code)
                continue
            except NoAnswer as e:
                failure = str(e)
                break  # the device is not answering: do not spend the bus on its other blocks
            except LinkLost as e:
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

    def _may_send(self) -> bool:
        """No write waits: a poll's next request may go out."""
        return not self._writes and not (self._timed and self._timed[0][0] <= self._clock())

    async def _poll_many(self, jobs: list[PollJob], r: _Round | None = None, batch: _Batch | None = None) -> None:
        """Polls due together on Modbus TCP without a gap between frames. Each next request is sent from the
        callback that takes the answer before it (``max_in_flight`` outstanding at once: the default, one, is one
        request at a time on the wire as :meth:`_poll` does, without a task switch or a wake-up per request), and
        each answer is applied as it arrives. A request left unanswered gets the bus's retries at once, one at a
        time, as :meth:`_poll` would, and a device that stays silent is not asked for its other blocks; a write
        goes ahead of every request not yet sent. ``r`` and ``batch``: a round the cruise began, and how its
        batch ended (:meth:`_cruise`)."""
        if r is None:
            r = _Round(self, jobs)
        link = self._link
        assert isinstance(link, TcpLink)
        clock = self._clock
        while True:
            if batch is None:
                if r.start >= len(r.reqs):
                    break
                if r.dead[r.owners[r.start][0]]:
                    r.start += 1
                    continue
                if not self._may_send():
                    await self._serve_writes()
                if not link.up:
                    r.lost = f"link down: {self._down_reason}"
                    break
                r.mark = clock()
                try:
                    got, sent = await link.request_many(
                        r.reqs[r.start :] if r.start else r.reqs, r.reply, self._pipeline, self._may_send
                    )
                except LinkLost as e:
                    self._drop_link(str(e))
                    r.lost = f"link down: {e}"
                    break
            else:
                got, sent, error = batch
                batch = None
                if isinstance(error, LinkLost):
                    self._drop_link(str(error))
                    r.lost = f"link down: {error}"
                    break
                if error is not None:
                    raise error
            missing = [r.start + i for i in range(sent) if got[i] is None]
            if missing:
                kind = "bad_frame" if link.garbage else "timeout"
                for n in missing:
                    r.owners[n][1].count_error(kind)
                r.unanswered += missing
            r.start += sent
            for n in r.unanswered:  # the first try is spent: the retries left, one request at a time
                k, dev, block = r.owners[n]
                job = jobs[k]
                if job.probe or not self.spec.retries or not link.up:
                    r.failure[k] = r.failure[k] or "no answer"
                    r.dead[k] = True
                    continue
                try:
                    reply, latency = await link.request(
                        dev.spec.unit, block.request, self.spec.retries - 1, dev.count_error
                    )
                except DeviceRefused as e:
                    r.failure[k] = r.failure[k] or refusal(e.code)
                    self._log_refusal(dev, block, e.code)
                    continue
                except NoAnswer as e:
                    r.failure[k] = str(e)
                    r.dead[k] = True
                    continue
                except LinkLost as e:
                    self._drop_link(str(e))
                    r.lost = f"link down: {e}"
                    break
                if self._take_reply(dev, block, reply):
                    r.answered[k] = True
                    self._on_success(dev, latency)
            r.unanswered.clear()
            if r.lost:
                break
        self._finish_round(r)

    def _finish_round(self, r: _Round) -> None:
        now = self._clock()
        sched = self._sched
        assert sched is not None
        for k, job in enumerate(r.jobs):
            if r.answered[k]:
                dev = self._devices[job.device]
                dev.stats.polls += 1
                if (change := sched.done(job, now, True)) is not None:
                    self._availability(dev, change, "")
            else:
                self._missed(job, r.failure[k] or r.lost or "no answer")

    # -- the cruise: a bus on the event loop polling from its answers' callbacks

    async def _cruise(self, jobs: list[PollJob]) -> None:
        """Modbus TCP on the event loop (:class:`LoopTcpLink`), one device per connection as a rule: the rounds of
        polls are asked and finished from the link's callbacks, and the next round is a timer's, with no task
        switch and no future per round. The task waits here until something is not plain polling: a write queued
        or due, a request unanswered (its retries), the link lost, or an error; then it carries on from where the
        cruise stopped (a round part-way is finished by :meth:`_poll_many`)."""
        loop = self._loop
        assert loop is not None
        fut: asyncio.Future[tuple[_Round, _Batch | None] | None] = loop.create_future()
        self._cruise_end = fut
        try:
            self._cruise_round(jobs)
            handed = await fut
        finally:
            self._cruise_end = None
            self._cruise_ticket = 0  # its turn on the ticker, if any, is passed over
        if handed is not None:
            r, batch = handed
            await self._poll_many(r.jobs, r, batch)

    def _cruise_stop(
        self, handed: tuple[_Round, _Batch | None] | None = None, error: BaseException | None = None
    ) -> None:
        fut = self._cruise_end
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(handed)

    def _cruise_round(self, jobs: list[PollJob]) -> None:
        r = self._cruise_now = _Round(self, jobs)
        r.mark = self._clock()
        link = self._link
        assert isinstance(link, LoopTcpLink)
        try:
            link.start_many(r.reqs, r.reply, self._pipeline, self._may_send, self._cruise_batch)
        except LinkLost:
            self._cruise_stop((r, None))  # the task finds the link down and says so

    def _cruise_batch(self, got: list[tuple[int, bytes] | None], sent: int, error: BaseException | None) -> None:
        """The link's end of the round's batch (in its callback)."""
        r = self._cruise_now
        if self._cruise_end is None or self._cruise_end.done() or r is None:
            return  # the bus is stopping: the task is gone from the cruise
        self._cruise_now = None
        if error is not None or sent < len(r.reqs) or r.unanswered or None in got:
            self._cruise_stop((r, (got, sent, error)))
            return
        try:
            r.start = sent
            self._finish_round(r)
            self._cruise_next()
        except Exception as e:  # the bus's own failure: the task raises it, and the poll loop restarts
            self._cruise_stop(error=e)

    def _cruise_next(self, ticket: int = 0) -> None:
        """The next round when it is due (on the loop's ticker), or back to the task."""
        if ticket != self._cruise_ticket:
            return  # a turn given up (the cruise stopped, or started again since)
        self._cruise_ticket = 0
        if self._cruise_end is None or self._cruise_end.done():
            return
        try:
            self._cruise_turn()
        except Exception as e:  # the bus's own failure: the task raises it, and the poll loop restarts
            self._cruise_stop(error=e)

    def _cruise_turn(self) -> None:
        now = self._beat = self._clock()
        if not self._link.up or not self._may_send():
            self._cruise_stop()
            return
        sched = self._sched
        assert sched is not None
        jobs = sched.take_due(now, self._slack)
        if jobs:
            self._cruise_round(jobs)
            return
        upcoming = sched.next_job()
        wake = upcoming.due if upcoming is not None else now + _IDLE_MAX_S
        if self._timed:
            wake = min(wake, self._timed[0][0])
        ticker = self._ticker
        assert ticker is not None
        self._cruise_ticket = ticker.book(min(_IDLE_MAX_S, max(0.0, wake - now)), self._cruise_next)

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
        """From the bus's thread: ``fn(*args)`` on the event loop, in order; a burst of them costs one wake-up. In a
        round of polls, a change waits for the round's end, HOLD_S at most (the link lets go of it then, even while
        waiting for an answer); a write's result goes at once, with what waited before it."""
        self._handoff.append((fn, args))
        link = self._link
        if self._holding and fn is not _settle and isinstance(link, ThreadTcpLink):
            if not link.hold_until:
                link.hold_until = time.monotonic() + HOLD_S
            return
        self._release_held()

    def _release_held(self) -> None:
        """From the bus's thread: what it handed over reaches the event loop now."""
        if isinstance(self._link, ThreadTcpLink):
            self._link.hold_until = 0.0
        if self._handoff and not self._handoff_pending:
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
        dev, p, cmd = job.device, job.point, job.cmd
        if job.start_by is not None and self._clock() > job.start_by:
            # Decided here, in the bus's own task or thread, where the write would start: whoever asked is told it
            # was not made, and it is not made later behind their back.
            dev.stats.write_errors += 1
            detail = f"not sent: the bus did not reach it within {cmd.start_within_ms} ms"
            result = WriteResult(dev.spec.name, p.name, cmd.token, False, self._clock(), detail, None, "not_sent")
            self._emit(result)
            if job.future is not None:
                self._settle(job.future, result)
            return
        self._current = job
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
        except DeviceRefused as e:
            detail, failure = f"refused: Modbus exception {e.code}", "unconfirmed" if answered else "refused"
        except NoAnswer as e:
            detail, failure = str(e), "no_answer"
        except ModbusReplyError as e:
            self._counter(dev)("bad_answer")
            detail, failure = str(e), "unconfirmed"
        except LinkLost as e:
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
            except DeviceRefused as e:
                return None, f"the write was answered, its read-back refused (Modbus exception {e.code})"
            except NoAnswer as e:
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


class _Ticker:
    """The event loop's one timer for every cruising bus's next round (:meth:`ModbusBus._cruise_next`). Buses with
    the same intervals fall due together (the scheduler aligns them), so one wake-up serves them all, and a turn is
    a tuple in a heap of floats, not a timer handle of the loop's (a handle each cost an object, and the loop's heap
    compares them in Python). A turn cannot be cancelled: its owner ignores a ticket it no longer holds."""

    _of: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Ticker]] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Callable[[int], None]]] = []
        self._seq = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._at = math.inf  # when the timer fires

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Ticker:
        t = cls._of.get(loop)
        if t is None:
            t = cls._of[loop] = cls(loop)
        return t

    def book(self, delay_s: float, fn: Callable[[int], None]) -> int:
        """``fn(ticket)`` in ``delay_s``; returns the ticket (never 0)."""
        ticket = next(self._seq)
        at = self._loop.time() + delay_s
        heapq.heappush(self._heap, (at, ticket, fn))
        if at < self._at:
            if self._timer is not None:
                self._timer.cancel()
            self._at = at
            self._timer = self._loop.call_at(at, self._fire)
        return ticket

    def _fire(self) -> None:
        self._timer, self._at = None, math.inf
        heap = self._heap
        # The loop runs a timer up to its clock's resolution early: those turns are taken now, not in another wake-up.
        now = self._loop.time() + 0.001
        due = []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap))
        if heap:
            self._at = heap[0][0]
            self._timer = self._loop.call_at(self._at, self._fire)
        for _, ticket, fn in due:
            fn(ticket)


_MISSING = object()
#: The longest a change found by a bus's thread waits for the end of its round of polls before the event loop hears
#: of it (an alarm's latency, against the thread and the loop contending for the GIL while both work).
HOLD_S = 0.01
#: The longest a bus's poll loop idles without going round (stalled_for tells a stuck loop by its silence).
_IDLE_MAX_S = 5.0
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
