"""The sans-IO half of the Modbus bus engine: block planning, the poll scheduler with availability,
and reconnect backoff. Pure functions and classes driven by the caller's clock, tested without sockets."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from devices.profiles import BIT_TABLES, BlockLimits, PointSpec, Value, decode_point

TABLE_ORDER = {"discrete": 0, "coil": 1, "input": 2, "holding": 3}
READ_FUNCTION = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` bits or registers from ``address`` in ``table``, and the points
    decoded from it with their offset in the answer."""

    table: str
    address: int
    count: int
    points: tuple[tuple[PointSpec, int], ...]

    @property
    def function(self) -> int:
        return READ_FUNCTION[self.table]

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


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 30)))
    return rng.uniform(0.0, ceiling)


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


class PollScheduler:
    """Which poll is next, and what each outcome does to a device's availability.

    Groups are polled at their own intervals (fixed rate; a late poll does not cause a burst). First
    polls are staggered over the fastest interval so the devices are not all asked at once. After
    ``offline_after`` consecutive missed polls a device is offline: its groups stop and it gets one
    probe every ``offline_retry_s`` instead, so a dead unit does not eat the bus. An answer brings
    it back online and all its groups become due at once."""

    def __init__(
        self, devices: Sequence[DevicePlan], *, now: float, offline_after: int, offline_retry_s: float
    ) -> None:
        if offline_after < 1:
            raise ValueError("offline_after must be at least 1")
        self.offline_after = offline_after
        self.offline_retry_s = offline_retry_s
        self.devices = [_DevState(d) for d in devices]
        owners = [i for i, d in enumerate(devices) for _ in d.groups]
        spread = min((g.interval_s for d in devices for g in d.groups), default=0.0)
        for k, i in enumerate(owners):
            self.devices[i].due.append(now + spread * k / max(1, len(owners)))

    def state(self, device: int) -> State:
        return self.devices[device].state

    def next_job(self) -> PollJob | None:
        """The job due first (it may lie in the future), or None when nothing is ever polled."""
        best: PollJob | None = None
        for i, d in enumerate(self.devices):
            if not d.plan.groups:
                continue
            if d.state == "offline":
                if best is None or d.probe_due < best.due:
                    best = PollJob(i, 0, d.probe_due, probe=True)
                continue
            for j, due in enumerate(d.due):
                if best is None or due < best.due:
                    best = PollJob(i, j, due)
        return best

    def done(self, job: PollJob, now: float, answered: bool) -> State | None:
        """Record a poll's outcome. Returns the device's new availability when it changed."""
        d = self.devices[job.device]
        changed: State | None = None
        if answered:
            d.misses = 0
            if d.state == "offline":
                d.due = [now for _ in d.due]
            if d.state != "online":
                d.state = changed = "online"
        else:
            d.misses += 1
            if d.state != "offline" and d.misses >= self.offline_after:
                d.state = changed = "offline"
            if d.state == "offline":
                d.probe_due = now + self.offline_retry_s
        if not job.probe and d.state != "offline":
            interval = d.plan.groups[job.group].interval_s
            nxt = d.due[job.group] + interval
            d.due[job.group] = nxt if nxt > now else now
        return changed

    def poll_soon(self, device: int, group: int, now: float) -> None:
        """Make a group due now (to confirm a write)."""
        d = self.devices[device]
        if d.state != "offline":
            d.due[group] = min(d.due[group], now)

    def probe_offline_now(self, now: float) -> None:
        """Probe every offline device at once (after a reconnect)."""
        for d in self.devices:
            if d.state == "offline":
                d.probe_due = now

    def all_offline(self) -> bool:
        return bool(self.devices) and all(d.state == "offline" for d in self.devices)
