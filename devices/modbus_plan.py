"""The sans-IO half of the Modbus bus engine: block planning, the poll scheduler with availability,
and reconnect backoff. Pure functions and classes driven by the caller's clock, tested without sockets."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from devices.modbus_pdu import READ_FUNCTION, read_request, read_values
from devices.profiles import BIT_TABLES, BlockLimits, PointSpec, Value, decode_point

TABLE_ORDER = {"discrete": 0, "coil": 1, "input": 2, "holding": 3}


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` bits or registers from ``address`` in ``table``, and the points
    decoded from it with their offset in the answer."""

    table: str
    address: int
    count: int
    points: tuple[tuple[PointSpec, int], ...]
    request: bytes = b""  # the read's PDU, built once

    def __post_init__(self) -> None:
        if not self.request:
            object.__setattr__(self, "request", read_request(self.table, self.address, self.count))

    @property
    def function(self) -> int:
        return READ_FUNCTION[self.table]

    def decode_reply(self, reply: bytes) -> list[tuple[PointSpec, Value]]:
        """Decode every point from a reply PDU to :attr:`request` (raises ValueError if it does not fit)."""
        return self.decode(read_values(self.request, reply))

    def decode(self, raw: Sequence[int] | Sequence[bool]) -> list[tuple[PointSpec, Value]]:
        """Decode every point of the block. ``raw`` must hold at least ``count`` values."""
        if len(raw) < self.count:
            raise ValueError(f"short answer: {len(raw)} values for a block of {self.count}")
        data = list(raw)
        return [(p, decode_point(p, data, off)) for p, off in self.points]


def plan_blocks(points: Iterable[PointSpec], limits: BlockLimits) -> list[Block]:
    """Merge points of the same table whose addresses are adjacent (or within the allowed gap) into as
    few reads as the size limits allow. Blocks come out ordered by table, then address."""
    by_table: dict[str, list[PointSpec]] = {}
    for p in points:
        by_table.setdefault(p.table, []).append(p)
    blocks: list[Block] = []
    for table in sorted(by_table, key=TABLE_ORDER.__getitem__):
        bits = table in BIT_TABLES
        max_len = limits.max_bits if bits else limits.max_registers
        gap = limits.max_gap_bits if bits else limits.max_gap_registers
        pts = sorted(by_table[table], key=lambda p: (p.address, p.bit or 0))
        start = end = 0
        members: list[PointSpec] = []
        for p in pts:
            if members and p.address - end <= gap and max(end, p.end) - start <= max_len:
                members.append(p)
                end = max(end, p.end)
                continue
            if members:
                blocks.append(_block(table, start, end, members))
            start, end, members = p.address, p.end, [p]
        if members:
            blocks.append(_block(table, start, end, members))
    return blocks


def _block(table: str, start: int, end: int, members: list[PointSpec]) -> Block:
    return Block(table, start, end - start, tuple((p, p.address - start) for p in members))


# ---------------------------------------------------------------- scheduling and availability

State = Literal["unknown", "online", "offline"]


@dataclass(slots=True)
class GroupPlan:
    name: str
    interval_s: float
    blocks: list[Block]


@dataclass(slots=True)
class DevicePlan:
    name: str
    groups: list[GroupPlan]


@dataclass(slots=True)
class PollJob:
    device: int  # index into the scheduler's devices
    group: int  # index into that device's groups
    due: float
    probe: bool = False  # an offline device's single, slow, retry-less check


@dataclass(slots=True)
class _DevState:
    plan: DevicePlan
    state: State = "unknown"
    misses: int = 0
    due: list[float] = field(default_factory=list)
    probe_due: float = 0.0
    gens: list[int] = field(default_factory=list)  # per group: the generation of its live heap entry
    probe_gen: int = 0


class PollScheduler:
    """Which polls are due, and what each outcome does to a device's availability.

    Groups are polled at their own intervals (fixed rate; a late poll does not cause a burst: the slots it
    missed are skipped, on the same grid, so what fell due together still does). First
    polls are staggered over the fastest interval so the devices are not all asked at once (unless
    ``stagger`` is off: a bus that pipelines asks them together, in one write); with ``align`` they start on a
    grid of the fastest interval, so that buses with the same intervals fall due together. After
    ``offline_after`` consecutive missed polls a device is offline: its groups stop and it gets one
    probe every ``offline_retry_s`` instead, so a dead unit does not eat the bus. An answer brings
    it back online and all its groups become due at once.

    Due times live in a heap, one live entry per polled group (or per offline device's probe); an entry
    made stale by a later decision is skipped when it surfaces (its generation no longer matches). Taking
    the next poll costs O(log n) whatever the number of devices; :meth:`take_due` hands over every poll due
    within a slack in one call, so polls that fall due together cost one wake-up."""

    def __init__(
        self,
        devices: Sequence[DevicePlan],
        *,
        now: float,
        offline_after: int,
        offline_retry_s: float,
        stagger: bool = True,
        align: bool = False,
    ) -> None:
        if offline_after < 1:
            raise ValueError("offline_after must be at least 1")
        self.offline_after = offline_after
        self.offline_retry_s = offline_retry_s
        self.devices = [_DevState(d, gens=[0] * len(d.groups)) for d in devices]
        self._heap: list[tuple[float, int, int, int, bool, int]] = []  # (due, tie, device, group, probe, gen)
        self._tie = itertools.count()
        self._offline = 0
        owners = [(i, j) for i, d in enumerate(devices) for j in range(len(d.groups))]
        fastest = min((g.interval_s for d in devices for g in d.groups), default=0.0)
        spread = fastest if stagger else 0.0
        if align and fastest > 0:
            # On a grid of the fastest interval of the monotonic clock: buses that share it fall due in the same
            # wake-up of the event loop, and their answers come back in the same few reads.
            now = math.ceil(now / fastest) * fastest
        for k, (i, j) in enumerate(owners):
            due = now + spread * k / max(1, len(owners))
            self.devices[i].due.append(due)
            self._push(i, j, due)

    def _push(self, device: int, group: int, due: float, probe: bool = False) -> None:
        d = self.devices[device]
        if probe:
            d.probe_gen += 1
            d.probe_due = due
            gen = d.probe_gen
        else:
            d.gens[group] += 1
            gen = d.gens[group]
        heapq.heappush(self._heap, (due, next(self._tie), device, group, probe, gen))

    def _head(self) -> tuple[float, int, int, int, bool, int] | None:
        heap = self._heap
        while heap:
            e = heap[0]
            d = self.devices[e[2]]
            if e[4]:
                if d.state == "offline" and e[5] == d.probe_gen:
                    return e
            elif d.state != "offline" and e[5] == d.gens[e[3]]:
                return e
            heapq.heappop(heap)
        return None

    def state(self, device: int) -> State:
        return self.devices[device].state

    def next_job(self) -> PollJob | None:
        """The job due first (it may lie in the future), or None when nothing is ever polled."""
        e = self._head()
        return None if e is None else PollJob(e[2], e[3], e[0], probe=e[4])

    def take_due(self, now: float, slack: float = 0.0) -> list[PollJob]:
        """Every job due by ``now + slack``, earliest first, taken off the schedule until :meth:`done`."""
        jobs = []
        limit = now + slack
        while (e := self._head()) is not None and e[0] <= limit:
            heapq.heappop(self._heap)
            jobs.append(PollJob(e[2], e[3], e[0], probe=e[4]))
        return jobs

    def done(self, job: PollJob, now: float, answered: bool) -> State | None:
        """Record a poll's outcome. Returns the device's new availability when it changed."""
        d = self.devices[job.device]
        changed: State | None = None
        if answered:
            d.misses = 0
            if d.state == "offline":
                self._offline -= 1
                d.state = changed = "online"
                d.due = [now for _ in d.due]
                for j in range(len(d.due)):
                    self._push(job.device, j, now)
                return changed
            if d.state != "online":
                d.state = changed = "online"
        else:
            d.misses += 1
            if d.state != "offline" and d.misses >= self.offline_after:
                d.state = changed = "offline"
                self._offline += 1
            if d.state == "offline":
                self._push(job.device, 0, now + self.offline_retry_s, probe=True)
        if not job.probe and d.state != "offline":
            interval = d.plan.groups[job.group].interval_s
            nxt = d.due[job.group] + interval
            if nxt < now:  # late: the slots missed are skipped, on the same grid, so that what fell due together
                nxt += math.ceil((now - nxt) / interval) * interval  # (a device's groups, buses) still does
            d.due[job.group] = nxt
            self._push(job.device, job.group, d.due[job.group])
        return changed

    def resume(self, now: float) -> None:
        """After the poll loop failed: the jobs it had taken were never :meth:`done` and are off the schedule, so
        every device's groups (an offline device's probe) are put back, due now."""
        for i, d in enumerate(self.devices):
            if d.state == "offline":
                self._push(i, 0, now, probe=True)
                continue
            for j in range(len(d.due)):
                d.due[j] = now
                self._push(i, j, now)

    def poll_soon(self, device: int, group: int, now: float) -> None:
        """Make a group due now (to confirm a write)."""
        d = self.devices[device]
        if d.state != "offline" and d.due[group] > now:
            d.due[group] = now
            self._push(device, group, now)

    def probe_offline_now(self, now: float) -> None:
        """Probe every offline device at once (after a reconnect)."""
        for i, d in enumerate(self.devices):
            if d.state == "offline":
                self._push(i, 0, now, probe=True)

    def all_offline(self) -> bool:
        return bool(self.devices) and self._offline == len(self.devices)
