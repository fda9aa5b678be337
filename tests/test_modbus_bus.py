"""The Modbus bus engine: its pure scheduling/backoff core driven by a fake clock, and the real thing
against firmware stubs in child processes (Modbus TCP, RTU over TCP, RTU on a pseudo-terminal)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from common.backoff import backoff_delay
from devices.events import Availability, DeviceCheck, DeviceEvent, PointChanged, WritePoint, WriteResult
from devices.modbus import HOLD_S, BusDown, BusSpec, DeviceSpec, ModbusBus
from devices.modbus_plan import DevicePlan, GroupPlan, PollScheduler
from devices.profiles import find_profile
from gateway.tooling.scan import scan_bus
from tests.stubs import Stub, run_stub, start_stub
from tests.waiting import wait_for

PANEL = "firmware_stubs.perimeter_panel"
BOARD = "firmware_stubs.modbus_device"
CTRL = ("--control", "127.0.0.1:0")

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- the pure core, fake clock


def _plans(n: int, interval: float = 0.1, groups: int = 1) -> list[DevicePlan]:
    return [DevicePlan(f"d{i}", [GroupPlan(f"g{j}", interval, []) for j in range(groups)]) for i in range(n)]


def test_first_polls_are_staggered() -> None:
    s = PollScheduler(_plans(4), now=100.0, offline_after=3, offline_retry_s=5)
    dues = sorted(d.due[0] for d in s.devices)
    assert dues == pytest.approx([100.0, 100.025, 100.05, 100.075])


def test_fixed_rate_without_bursts_after_a_stall() -> None:
    s = PollScheduler(_plans(1), now=0.0, offline_after=3, offline_retry_s=5)
    job = s.next_job()
    assert job is not None and job.due == 0.0
    s.done(job, 0.01, True)
    assert s.next_job().due == pytest.approx(0.1)  # type: ignore[union-attr]
    # The loop stalls for a second: the poll runs once, late, and the next is not in the past.
    job = s.next_job()
    s.done(job, 1.0, True)  # type: ignore[arg-type]
    assert s.next_job().due == pytest.approx(1.0)  # type: ignore[union-attr]
    s.done(s.next_job(), 1.01, True)  # type: ignore[arg-type]
    assert s.next_job().due == pytest.approx(1.1)  # type: ignore[union-attr]


def test_a_late_round_keeps_what_falls_due_together_together() -> None:
    """A round that runs late skips the slots it missed on the same grid: a device's inputs and its status, due
    together, are still due together afterwards (and so still cost one round, not two)."""
    plan = DevicePlan("d0", [GroupPlan("inputs", 0.1, []), GroupPlan("status", 0.5, [])])
    s = PollScheduler([plan], now=0.0, offline_after=3, offline_retry_s=5, stagger=False)
    first = s.take_due(0.0)
    assert [j.group for j in first] == [0, 1]
    for job in first:
        s.done(job, 0.23, True)  # late by 130 ms: the inputs' slots at 0.1 and 0.2 are skipped
    late = s.take_due(0.301)
    assert [(j.group, j.due) for j in late] == [(0, pytest.approx(0.3))]  # back on their grid, not at 0.33
    s.done(late[0], 0.301, True)
    nxt = s.take_due(0.401)
    assert [j.group for j in nxt] == [0]
    s.done(nxt[0], 0.401, True)
    together = s.take_due(0.501)
    assert sorted(j.group for j in together) == [0, 1], together


def test_availability_changes_once_and_offline_devices_are_only_probed() -> None:
    s = PollScheduler(_plans(1, groups=3), now=0.0, offline_after=3, offline_retry_s=2.0)
    changes = []
    t = 0.0
    for _ in range(3):
        job = s.next_job()
        assert job is not None and not job.probe
        t = max(t, job.due)
        changes.append(s.done(job, t, False))
    assert changes == [None, None, "offline"]
    # Offline: one probe every offline_retry_s, whatever the number of groups.
    probe = s.next_job()
    assert probe is not None and probe.probe and probe.due == pytest.approx(t + 2.0)
    assert s.done(probe, probe.due, False) is None  # still offline, not reported again
    probe2 = s.next_job()
    assert probe2.probe and probe2.due == pytest.approx(probe.due + 2.0)  # type: ignore[union-attr]
    assert s.done(probe2, probe2.due, True) == "online"  # type: ignore[arg-type]
    # Back online: every group is due at once.
    assert all(d == pytest.approx(probe2.due) for d in s.devices[0].due)  # type: ignore[union-attr]
    assert s.done(s.next_job(), probe2.due, True) is None  # type: ignore[arg-type, union-attr]


def test_polls_taken_by_a_loop_that_failed_are_put_back() -> None:
    """The poll loop takes the jobs that are due and fails before saying they are done (a decoder raised): on its
    restart they must be on the schedule again, or that device's group is never polled again (its zones silent)."""
    s = PollScheduler(_plans(2, groups=2), now=0.0, offline_after=3, offline_retry_s=2.0)
    taken = s.take_due(1.0)
    assert len(taken) == 4 and s.next_job() is None  # all taken, none done: nothing left to poll
    s.resume(1.5)
    again = s.take_due(1.5)
    assert sorted((j.device, j.group) for j in again) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for j in again:
        s.done(j, 1.5, True)
    assert s.next_job().due == pytest.approx(1.6)  # type: ignore[union-attr]  # and the fixed rate goes on
    # An offline device is put back as its probe only.
    for _ in range(3):
        j = [x for x in s.take_due(10.0) if x.device == 1]
        for x in j:
            s.done(x, 10.0, False)
    assert s.state(1) == "offline"
    s.take_due(20.0)
    s.resume(20.0)
    back = s.take_due(20.0)
    assert sorted((j.device, j.group, j.probe) for j in back) == [(0, 0, False), (0, 1, False), (1, 0, True)]


def test_a_dead_unit_does_not_eat_the_poll_budget() -> None:
    """Simulate a serial bus: an answer takes 10 ms, a timeout 100 ms. Once the dead unit is offline
    the healthy one is polled at (nearly) its full rate."""
    s = PollScheduler(_plans(2, interval=0.1), now=0.0, offline_after=3, offline_retry_s=2.0)
    t, polls = 0.0, [0, 0]
    while t < 20.0:
        job = s.next_job()
        assert job is not None
        t = max(t, job.due)
        dead = job.device == 1
        t += 0.1 if dead else 0.01
        s.done(job, t, not dead)
        polls[job.device] += 1
    assert s.state(1) == "offline"
    assert polls[0] >= 0.9 * 200, polls
    assert polls[1] <= 3 + 20 / 2.0 + 1, polls  # three misses, then one probe every 2 s


@pytest.mark.parametrize("devices", [10, 200, 2000])
def test_the_cost_of_a_poll_does_not_grow_with_the_devices_on_the_bus(
    devices: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heap operations per poll stay at a couple whatever the number of devices (no scan of every device to choose
    the next), polls that fall due together come out of one call, and the stagger and the rate are kept."""
    from devices import modbus_plan

    ops = [0]
    push, pop = modbus_plan.heapq.heappush, modbus_plan.heapq.heappop

    def counted_push(h: list[Any], x: Any) -> None:
        ops[0] += 1
        push(h, x)

    def counted_pop(h: list[Any]) -> Any:
        ops[0] += 1
        return pop(h)

    monkeypatch.setattr(modbus_plan.heapq, "heappush", counted_push)
    monkeypatch.setattr(modbus_plan.heapq, "heappop", counted_pop)
    interval = devices / 500  # 500 polls a second on the bus, whatever its size
    s = PollScheduler(_plans(devices, interval=interval), now=0.0, offline_after=3, offline_retry_s=5)
    ops[0] = 0
    t, polls, wakeups = 0.0, [0] * devices, 0
    while t < 10 * interval:
        jobs = s.take_due(t, slack=interval / 10)
        if not jobs:
            t = s.next_job().due  # type: ignore[union-attr]
            continue
        wakeups += 1
        for job in jobs:
            t += 0.0005  # each answer takes half a millisecond
            s.done(job, t, True)
            polls[job.device] += 1
    assert 2 * sum(polls) <= ops[0] <= 3 * sum(polls) + devices, (ops[0], sum(polls))  # a pop and a push a poll
    assert min(polls) >= 9 and max(polls) <= 11, (min(polls), max(polls))  # every device at its rate
    # Polls due within a tenth of the interval of each other come out of one call: one wake-up for several.
    assert wakeups <= sum(polls) * (0.6 if devices < 50 else 0.2), (wakeups, sum(polls))
    first = sorted(
        d.due[0]
        for d in PollScheduler(_plans(devices, interval=interval), now=0.0, offline_after=3, offline_retry_s=5).devices
    )
    assert first[0] == 0.0 and first[-1] == pytest.approx(interval * (devices - 1) / devices)  # still staggered


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(5.0, 0.1 * 2**attempt)
        samples = [backoff_delay(attempt, 0.1, 5.0, rng.random) for _ in range(300)]
        assert all(0.0 <= x <= ceiling for x in samples)
        assert max(samples) > 0.8 * ceiling and min(samples) < 0.2 * ceiling  # spread over the whole range
    assert backoff_delay(10_000, 0.1, 5.0, rng.random) <= 5.0


# ---------------------------------------------------------------- against the stubs


@dataclass
class Recorder:
    events: list[DeviceEvent] = field(default_factory=list)

    def __call__(self, ev: DeviceEvent) -> None:
        self.events.append(ev)

    def changes(
        self, device: str | None = None, point: str | None = None, initial: bool | None = None
    ) -> list[PointChanged]:
        return [
            e
            for e in self.events
            if isinstance(e, PointChanged)
            and (device is None or e.device == device)
            and (point is None or e.point == point)
            and (initial is None or e.initial == initial)
        ]

    def availability(self, device: str) -> list[str]:
        return [e.state for e in self.events if isinstance(e, Availability) and e.device == device]

    def writes(self) -> list[WriteResult]:
        return [e for e in self.events if isinstance(e, WriteResult)]


def tcp_bus(stub: Stub, kind: str = "modbus-tcp", **kw: Any) -> BusSpec:
    host, port = stub.endpoint()
    return BusSpec("t1", kind, host=host, port=port, **kw)  # type: ignore[arg-type]


def panel(name: str, unit: int = 1, poll_ms: int = 50, zones: int = 8, **groups: int) -> DeviceSpec:
    return DeviceSpec(name, find_profile(f"perimeter-panel-{zones}"), unit=unit, poll_ms=poll_ms, groups=groups)


@asynccontextmanager
async def running(spec: BusSpec, devices: list[DeviceSpec], rec: Recorder) -> AsyncIterator[ModbusBus]:
    async with ModbusBus(spec, devices, rec) as bus:
        yield bus


def by_unit(recent: list[dict[str, Any]], unit: int, function: int | None = None) -> list[dict[str, Any]]:
    return [r for r in recent if r["unit"] == unit and (function is None or r["function"] == function)]


async def test_trip_is_one_point_changed_and_reads_are_merged() -> None:
    rec = Recorder()
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--zones", "8", *CTRL) as stub:
        dev = panel("pp1", poll_ms=50, status=200, outputs=200, levels=400)
        async with running(tcp_bus(stub), [dev], rec):
            await wait_for(lambda: len(rec.changes(initial=True)) == 48 + 5 + 3 + 8, 5, "every point read once")
            assert rec.availability("pp1") == ["online"]
            assert [e.value for e in rec.changes(point="zone3_alarm")] == [False]
            await stub.post("/reset-counters")
            t0 = time.monotonic()
            await stub.post("/zones/3/trip")
            await wait_for(lambda: rec.changes(point="zone3_alarm", initial=False), 3, "the trip")
            trip = rec.changes(point="zone3_alarm", initial=False)[0]
            assert trip.value is True and 0 < trip.mono - t0 < 1.0
            await stub.post("/zones/5/cut")
            await stub.post("/panel/power", {"state": "battery-low"})
            await wait_for(lambda: rec.changes(point="power_battery_low", initial=False), 3, "battery low")
            await wait_for(lambda: rec.changes(point="zone5_fence_kv", initial=False), 3, "the fence voltage")
            await asyncio.sleep(0.3)  # several more polls: nothing else changes
            later = {(e.point, e.value) for e in rec.changes(initial=False)}
            assert later == {
                ("zone3_alarm", True),
                ("zone5_cut", True),
                ("zone5_fence_kv", 0.0),
                ("power_ac_ok", False),
                ("power_on_battery", True),
                ("power_battery_low", True),
                ("battery_volts", 11.2),
            }, later
            assert len(rec.changes(initial=False)) == len(later), "a change was reported twice"
        st = await stub.state(recent=True)
    recent = st["panels"][0]["requests"]["recent"]
    reads = {(r["function"], r["address"], r["count"]) for r in recent}
    # One request per group poll: every zone input in one FC02 read of 88 bits (the gaps bridged),
    # status in one FC04 read, the outputs in one FC01, the fence levels in one FC04.
    assert reads == {(2, 0, 88), (4, 0, 2), (1, 0, 3), (4, 16, 8)}, reads
    assert sum(1 for r in recent if r["function"] == 2) >= 10


@pytest.mark.realtime
async def test_write_goes_ahead_of_queued_polls_and_pulses() -> None:
    rec = Recorder()
    units = list(range(1, 9))
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-8", *CTRL) as stub:
        # Eight panels polled every 10 ms with a 5 ms gap between frames: the bus is saturated, so
        # there is always a queue of due polls.
        devs = [panel(f"pp{u}", unit=u, poll_ms=10, status=10, outputs=10, levels=10) for u in units]
        async with running(tcp_bus(stub, inter_frame_ms=5), devs, rec) as bus:
            await wait_for(lambda: all(rec.availability(f"pp{u}") == ["online"] for u in units), 5, "all online")
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            result = await bus.write(WritePoint("pp5", "siren", True, token="w1"))
            t1 = time.monotonic()
            assert result.ok and result.token == "w1" and result.device == "pp5"
            recent = (await stub.state(recent=True))["panels"][0]["requests"]["recent"]
            writes = [r for r in recent if r["function"] == 5]
            assert [(w["unit"], w["address"]) for w in writes] == [(5, 0)]
            before = [r for r in recent if t0 <= r["mono"] < writes[0]["mono"]]
            # At most the transaction already in flight went before it (32 polls were due).
            assert len(before) <= 1, before
            assert t1 - t0 < 0.1
            assert (await stub.state())["panels"][0]["units"]["5"]["outputs"]["siren"] is True

            # A pulse without a flash command in the profile: set, then reset by the bus.
            t0 = time.monotonic()
            result = await bus.write(WritePoint("pp2", "strobe", True, token="p1", pulse_ms=300))
            assert result.ok
            await wait_for(lambda: any(w.token == "p1:reset" for w in rec.writes()), 3, "the reset")
            reset = next(w for w in rec.writes() if w.token == "p1:reset")
            assert reset.ok and 0.28 < reset.mono - t0 < 0.6
            recent = (await stub.state(recent=True))["panels"][0]["requests"]["recent"]
            strobe = [r for r in recent if r["function"] == 5 and r["unit"] == 2]
            assert len(strobe) == 2 and 0.28 < strobe[1]["mono"] - strobe[0]["mono"] < 0.5
            assert (await stub.state())["panels"][0]["units"]["2"]["outputs"]["strobe"] is False

            # Bad commands are rejected and counted, not sent.
            bad = [
                WritePoint("pp1", "zone1_alarm", True),
                WritePoint("pp1", "nope", True),
                WritePoint("nobody", "siren", True),
                WritePoint("pp1", "siren", 7),
                WritePoint("pp1", "siren_hold_s", 70000),
                WritePoint("pp1", "siren_hold_s", 5, pulse_ms=100),
            ]
            for cmd in bad:
                r = await bus.write(cmd)
                assert not r.ok and r.detail, cmd
            assert bus.stats().rejected_writes == len(bad)
            r = await bus.write(WritePoint("pp1", "siren_hold_s", 60, token="h"))
            assert r.ok
            assert (await stub.state())["panels"][0]["units"]["1"]["siren_hold_s"] == 60
    with pytest.raises(BusDown):
        await bus.write(WritePoint("pp1", "siren", True))


async def test_a_device_on_its_own_connection_takes_writes_between_and_during_its_polls() -> None:
    """One device per connection: its polls run from the answers' callbacks (the bus's cruise), with nothing of the
    bus's task awake between them. A write must still go out at once, not at the next poll; a pulse's reset must
    come on time although no poll falls due then; a write asked while a poll's answer is awaited goes out right
    after it; a device gone silent is retried and told offline, and polled again when it is back."""
    rec = Recorder()
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--zones", "8", *CTRL) as stub:
        dev = panel("pp1", poll_ms=1500, status=60000, outputs=60000, levels=60000)
        async with running(tcp_bus(stub, timeout_ms=600, retries=1, offline_after_misses=2), [dev], rec) as bus:
            assert bus._cruising  # the layout under test

            async def a_round_ends() -> None:
                polls = bus.stats().devices["pp1"].polls
                deadline = time.monotonic() + 5
                while bus.stats().devices["pp1"].polls == polls and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)

            await wait_for(lambda: rec.availability("pp1") == ["online"], 5, "online")
            await asyncio.sleep(2.0)  # the first polls of the groups are spread out; then one round each 1.5 s
            await a_round_ends()
            await asyncio.sleep(0.3)  # between two rounds
            t0 = time.monotonic()
            result = await bus.write(WritePoint("pp1", "siren", True, token="w1", pulse_ms=300))
            assert result.ok and time.monotonic() - t0 < 0.1, result
            await wait_for(lambda: any(w.token == "w1:reset" for w in rec.writes()), 2, "the reset")
            reset = next(w for w in rec.writes() if w.token == "w1:reset")
            assert reset.ok and 0.28 < reset.mono - t0 < 0.6, reset.mono - t0
            recent = (await stub.state(recent=True))["panels"][0]["requests"]["recent"]
            sirens = [r for r in recent if r["function"] == 5 and r["address"] == 0]
            assert len(sirens) == 2 and 0.28 < sirens[1]["mono"] - sirens[0]["mono"] < 0.5, sirens

            # A write asked while a round waits for its answer (the device answers 400 ms late).
            await stub.post("/delay", {"ms": 400})
            await a_round_ends()  # 400 ms after the round began
            await asyncio.sleep(1.5 - 0.4 + 0.2)  # the next round's answer is awaited now
            t0 = time.monotonic()
            result = await bus.write(WritePoint("pp1", "strobe", True, token="w2"))
            assert result.ok, result
            assert time.monotonic() - t0 < 1.5, "the write waited for more than the round under way"
            await stub.post("/delay", {"ms": 0})

            # Silent: retried, then offline after two missed polls; back when it answers.
            await stub.post("/silent", {"unit": 1, "on": True})
            await wait_for(lambda: rec.availability("pp1")[-1:] == ["offline"], 8, "offline")
            errors = bus.stats().devices["pp1"].errors
            assert errors.get("timeout", 0) >= 2, errors  # each missed poll: its first try and a retry
            await stub.post("/silent", {"unit": 1, "on": False})
            await wait_for(lambda: rec.availability("pp1")[-1:] == ["online"], 8, "online again")
            await stub.post("/zones/3/trip")
            await wait_for(lambda: rec.changes(point="zone3_alarm", initial=False), 4, "polling again")
            assert bus.stats().restarts == 0 and bus.connected


async def test_a_lone_device_has_its_groups_asked_in_the_round_of_its_inputs() -> None:
    """A device alone on its connection: its slower groups (status, outputs, levels) are asked right after its inputs,
    in the same round, not each staggered into a wake-up of its own (nothing else on the line to spread them from)."""
    rec = Recorder()
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", *CTRL) as stub:
        dev = panel("pp1", poll_ms=100, status=500, outputs=500, levels=1000)
        async with running(tcp_bus(stub), [dev], rec):
            await wait_for(lambda: rec.availability("pp1") == ["online"], 5, "online")
            await stub.post("/reset-counters")
            await asyncio.sleep(1.6)
        recent = (await stub.state(recent=True))["panels"][0]["requests"]["recent"]
    inputs = [r["mono"] for r in recent if r["function"] == 2]
    slower = [r for r in recent if r["function"] != 2]
    assert len(inputs) >= 12 and len(slower) >= 6, (len(inputs), len(slower))
    for r in slower:
        apart = min(abs(r["mono"] - t) for t in inputs)
        assert apart < 0.015, (r, apart)  # in a round with the inputs, one after the other, not 25-75 ms from them


async def test_a_reply_like_the_last_is_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes of an unchanged answer are compared, not decoded: a block is decoded on its first read and when
    the device's answer changes, not at every poll."""
    from devices.modbus_plan import Block

    decoded: list[tuple[str, int]] = []
    real = Block.decode_reply

    def counted(self: Block, reply: bytes) -> Any:
        decoded.append((self.table, self.address))
        return real(self, reply)

    monkeypatch.setattr(Block, "decode_reply", counted)
    rec = Recorder()
    dev = panel("pp1", poll_ms=20, status=20, outputs=20, levels=20)
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", *CTRL) as stub, running(tcp_bus(stub), [dev], rec) as bus:
        await wait_for(lambda: rec.availability("pp1") == ["online"], 5, "online")
        await asyncio.sleep(0.5)
        polls = bus.stats().devices["pp1"].polls
        assert polls >= 40 and len(decoded) == 4, (polls, decoded)  # four blocks, each decoded once
        await stub.post("/zones/2/trip")
        await wait_for(lambda: rec.changes(point="zone2_alarm", initial=False), 3, "the trip")
        await asyncio.sleep(0.2)
        assert decoded.count(("discrete", 0)) == 2 and len(decoded) == 5, decoded


async def test_tcp_garbage_is_counted_and_survived() -> None:
    """A Modbus TCP peer that answers with mangled frames: our MBAP framing counts them as bad frames, takes the
    unit offline, keeps the link, and resynchronises as soon as the answers are good again."""
    rec = Recorder()
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-2", *CTRL) as stub:
        devs = [panel(f"pp{u}", unit=u, poll_ms=60) for u in (1, 2)]
        spec = tcp_bus(stub, timeout_ms=100, retries=1, offline_poll_ms=300)
        async with running(spec, devs, rec) as bus:
            await wait_for(lambda: all(rec.availability(f"pp{u}") == ["online"] for u in (1, 2)), 5, "online")
            await stub.post("/garbage", {"on": True, "unit": 2})
            await wait_for(lambda: rec.availability("pp2")[-1:] == ["offline"], 5, "pp2 offline")
            await stub.post("/zones/1/trip", {"unit": 1})
            await wait_for(lambda: rec.changes(device="pp1", point="zone1_alarm", initial=False), 3, "pp1 trip")
            st = bus.stats()
            assert st.devices["pp2"].errors.get("bad_frame", 0) >= 3, st.devices["pp2"].errors
            assert st.devices["pp1"].error_count == 0 and st.restarts == 0 and bus.connected
            await stub.post("/garbage", {"on": False})
            await wait_for(lambda: rec.availability("pp2")[-1:] == ["online"], 3, "pp2 back")
            await stub.post("/zones/3/trip", {"unit": 2})
            await wait_for(lambda: rec.changes(device="pp2", point="zone3_alarm", initial=False), 3, "pp2 trip")


async def test_flash_command_pulses_on_the_board() -> None:
    rec = Recorder()
    async with run_stub(BOARD, "--model", "relay-d", "--tcp", "127.0.0.1:0", *CTRL) as stub:
        dev = DeviceSpec(
            "door1", find_profile("waveshare-modbus-rtu-relay-d"), unit=1, poll_ms=50, groups={"relays": 50}
        )
        async with running(tcp_bus(stub, kind="modbus-tcp"), [dev], rec) as bus:
            await wait_for(lambda: len(rec.changes(initial=True)) == 24, 5, "initial reads")  # incl. the modes
            await stub.post("/inputs/4", {"active": True})
            await wait_for(lambda: rec.changes(point="input4", initial=False), 3, "input 4")
            await stub.post("/reset-counters")
            result = await bus.write(WritePoint("door1", "relay2", True, token="open", pulse_ms=450))
            assert result.ok
            st = (await stub.state(recent=True))["panels"][0]
            # One FC05 to 0x0201 carrying 5 x 100 ms: the board times the pulse itself.
            assert [(r["function"], r["address"]) for r in st["requests"]["recent"] if r["function"] == 5] == [
                (5, 0x0201)
            ]
            assert [(f["channel"], f["on"], f["ms"]) for f in st["units"]["1"]["flashes"]] == [(2, True, 500)]
            await wait_for(
                lambda: [e.value for e in rec.changes(point="relay2", initial=False)] == [True, False],
                3,
                "relay 2 on, then off by itself",
            )
            on, off = rec.changes(point="relay2", initial=False)
            assert 0.35 < off.mono - on.mono < 0.75
            assert not any(w.token.endswith(":reset") for w in rec.writes())


async def test_a_write_the_board_echoes_but_does_not_carry_out_fails_its_read_back() -> None:
    """Relay 3 in linkage mode (the maker's mode 1): function 05 is answered like any other, the relay stays
    with its input. The bus reads it back at once and says so; the board's modes are checked as it is polled."""
    rec = Recorder()
    async with run_stub(BOARD, "--model", "relay-d", "--tcp", "127.0.0.1:0", *CTRL) as stub:
        await stub.post("/modes", {"channel": 3, "mode": "linkage"})
        dev = DeviceSpec("board", find_profile("waveshare-modbus-rtu-relay-d"), unit=1, poll_ms=50)
        async with running(tcp_bus(stub), [dev], rec) as bus:
            await wait_for(lambda: any(isinstance(e, DeviceCheck) for e in rec.events), 5, "the modes checked")
            (check,) = [e for e in rec.events if isinstance(e, DeviceCheck)]
            assert check.device == "board"
            assert check.problems == ("relay3_mode = 1 (linkage), expected 0 (normal)",)
            await stub.post("/reset-counters")
            for cmd in (
                WritePoint("board", "relay3", True, token="plain"),
                WritePoint("board", "relay3", True, token="flash", pulse_ms=2000),
            ):
                r = await bus.write(cmd)
                assert (r.ok, r.confirmed, r.failure) == (False, False, "not_moved"), r
                assert r.detail == ("read-back: relay3 reads off after the write was answered (the relay did not move)")
            recent = (await stub.state(recent=True))["panels"][0]["requests"]["recent"]
            # each write, then its read-back (and one more look before it counts as not moved)
            assert [
                (x["function"], x["address"])
                for x in recent
                if x["function"] == 5 or (x["function"], x["count"]) == (1, 1)
            ] == [(5, 2), (1, 2), (1, 2), (5, 0x0202), (1, 2), (1, 2)]
            assert (await stub.state())["panels"][0]["units"]["1"]["ignored_writes"] == 2
            # another relay in normal mode: confirmed by its read-back
            r = await bus.write(WritePoint("board", "relay4", True, token="ok"))
            assert (r.ok, r.confirmed, r.failure) == (True, True, "")
            # the installer puts relay 3 back to normal mode with function 06: the next check says so
            r = await bus.write(WritePoint("board", "relay3_mode", 0, token="mode"))
            assert r.ok and r.confirmed
            await wait_for(
                lambda: [e.problems for e in rec.events if isinstance(e, DeviceCheck)][-1] == (),
                5,
                "the modes checked again",
            )
            # the board's flash command times at most 0x7FFF x 100 ms: a longer pulse is refused, not cut short
            r = await bus.write(WritePoint("board", "relay5", True, token="long", pulse_ms=3_276_800))
            assert (r.ok, r.failure) == (False, "rejected") and "3276700 ms" in r.detail
            assert bus.stats().rejected_writes == 1


@pytest.mark.realtime
async def test_silent_unit_goes_offline_while_its_neighbour_keeps_its_rate() -> None:
    rec = Recorder()
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-2", *CTRL) as stub:
        devs = [panel(f"pp{u}", unit=u, poll_ms=100, status=60_000, outputs=60_000, levels=60_000) for u in (1, 2)]
        spec = tcp_bus(stub, timeout_ms=100, retries=0, offline_after_misses=3, offline_poll_ms=1000)
        async with running(spec, devs, rec) as bus:
            await wait_for(lambda: rec.availability("pp2") == ["online"], 5, "pp2 online")
            await asyncio.sleep(0.3)  # the slow groups have had their first read
            missed0 = bus.stats().devices["pp2"].missed_polls
            t0 = time.monotonic()
            await stub.post("/silent", {"on": True, "unit": 2})
            await wait_for(lambda: rec.availability("pp2") == ["online", "offline"], 3, "pp2 offline")
            went = next(e for e in rec.events if isinstance(e, Availability) and e.state == "offline")
            assert went.mono - t0 < 3 * (0.1 + 0.1) + 0.25
            assert bus.stats().devices["pp2"].missed_polls - missed0 == 3
            # Measure pp1 over two seconds while pp2 is dead.
            await stub.post("/reset-counters")
            t1 = time.monotonic()
            await asyncio.sleep(2.0)
            recent = (await stub.state(recent=True))["panels"][0]["requests"]["recent"]
            elapsed = time.monotonic() - t1
            polls1 = len(by_unit(recent, 1, 2))
            probes2 = len(by_unit(recent, 2))
            assert polls1 >= 0.85 * elapsed / 0.1, (polls1, elapsed)
            assert probes2 <= 3, probes2  # one probe a second, no retries
            assert rec.availability("pp1") == ["online"]
            assert bus.stats().devices["pp1"].missed_polls == 0
            await stub.post("/silent", {"on": False})
            await wait_for(lambda: rec.availability("pp2") == ["online", "offline", "online"], 3, "pp2 back")
            assert bus.connected


async def test_a_change_found_in_a_round_waits_for_its_end_but_never_behind_a_silent_unit() -> None:
    """Several panels on one connection (the bus's own thread): a change waits for the end of the thread's round of
    polls before the event loop hears of it, so that the two do not contend for the GIL; but never more than HOLD_S,
    not even while the round waits out a silent unit's timeout."""
    arrived: list[tuple[float, DeviceEvent]] = []
    rec = Recorder()

    def sink(ev: DeviceEvent) -> None:
        arrived.append((time.monotonic(), ev))
        rec(ev)

    def arrival(point: str) -> tuple[float, PointChanged]:
        return next((t, e) for t, e in arrived if isinstance(e, PointChanged) and e.point == point and not e.initial)

    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-2", *CTRL) as stub:
        devs = [panel(f"pp{u}", unit=u, poll_ms=100, status=60_000, outputs=60_000, levels=60_000) for u in (1, 2)]
        spec = tcp_bus(stub, timeout_ms=400, retries=0, offline_after_misses=50)
        async with ModbusBus(spec, devs, sink):
            await wait_for(lambda: rec.availability("pp2") == ["online"], 5, "both online")
            # Every answer 5 ms late (less than HOLD_S): pp1's change is heard once pp2 has answered too.
            await stub.post("/delay", {"ms": 5})
            await asyncio.sleep(0.3)
            await stub.post("/zones/3/trip", {"unit": 1})
            await wait_for(lambda: rec.changes(point="zone3_alarm", initial=False), 3, "the trip")
            heard, trip = arrival("zone3_alarm")
            recent = (await stub.state(recent=True))["panels"][0]["requests"]["recent"]
            asked = min(r["mono"] for r in by_unit(recent, 2, 2) if r["mono"] > trip.mono)
            assert heard >= asked + 0.004, (heard - trip.mono, asked - trip.mono)  # after pp2's (late) answer
            assert heard - trip.mono < HOLD_S + 0.1
            # pp2 silent: each round now waits 400 ms for it; pp1's next change is not held that long.
            await stub.post("/delay", {"ms": 0})
            await stub.post("/silent", {"on": True, "unit": 2})
            await asyncio.sleep(0.5)
            await stub.post("/zones/4/trip", {"unit": 1})
            await wait_for(lambda: rec.changes(point="zone4_alarm", initial=False), 3, "the second trip")
            heard, trip = arrival("zone4_alarm")
            assert heard - trip.mono < HOLD_S + 0.1, heard - trip.mono


async def test_pipelined_polls_go_out_together_and_each_answer_finds_its_device() -> None:
    rec = Recorder()
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-8", *CTRL) as stub:
        devs = [panel(f"pp{u}", unit=u, poll_ms=50) for u in range(1, 9)]
        async with running(tcp_bus(stub, max_in_flight=16), devs, rec) as bus:
            await wait_for(lambda: all(rec.availability(f"pp{u}") == ["online"] for u in range(1, 9)), 5, "online")
            await stub.post("/reset-counters")
            for u in range(1, 9):  # each unit its own zone: an answer paired with the wrong request shows
                await stub.post(f"/zones/{u}/trip", {"unit": u})
            await wait_for(lambda: len(rec.changes(initial=False)) >= 8, 5, "eight trips")
            await asyncio.sleep(0.3)  # more polls: nothing else changes
            got = sorted((e.device, e.point, e.value) for e in rec.changes(initial=False))
            assert got == [(f"pp{u}", f"zone{u}_alarm", True) for u in range(1, 9)], got
            st = bus.stats()
            assert all(not d.errors and not d.missed_polls for d in st.devices.values()), st.devices
        requests = (await stub.state())["panels"][0]["requests"]
    # The stub saw requests arrive before the earlier ones were answered: they were sent together.
    assert requests["pipelined"] >= requests["total"] // 2, requests


async def test_a_silent_unit_does_not_hold_back_the_answers_pipelined_with_it() -> None:
    rec = Recorder()
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-3", *CTRL) as stub:
        devs = [panel(f"pp{u}", unit=u, poll_ms=100, status=60_000, outputs=60_000, levels=60_000) for u in (1, 2, 3)]
        spec = tcp_bus(stub, max_in_flight=8, timeout_ms=1500, retries=0, offline_after_misses=50)
        async with running(spec, devs, rec) as bus:
            await wait_for(lambda: rec.availability("pp3") == ["online"], 5, "online")
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            await stub.post("/zones/4/trip", {"unit": 3})
            await stub.post("/silent", {"on": True, "unit": 2})  # the next batch waits on unit 2's silence
            await wait_for(lambda: rec.changes(device="pp3", point="zone4_alarm", initial=False), 5, "the trip")
            # Taken as it arrived: not after the silence of 1.5 s that ends the batch it came with.
            assert rec.changes(device="pp3", point="zone4_alarm", initial=False)[0].mono - t0 < 1.0
            await wait_for(lambda: bus.stats().devices["pp2"].errors.get("timeout", 0) >= 1, 5, "a timeout")
            assert bus.stats().devices["pp2"].missed_polls >= 1
            assert not bus.stats().devices["pp3"].errors and not bus.stats().devices["pp1"].errors


async def test_serial_server_reboot_is_recovered_and_writes_fail_fast_meanwhile() -> None:
    rec = Recorder()
    stub = await start_stub(PANEL, "--rtu-over-tcp", "127.0.0.1:0", *CTRL)
    host, port = stub.endpoint()
    try:
        spec = BusSpec(
            "gw",
            "modbus-rtu-over-tcp",
            host=host,
            port=port,
            timeout_ms=150,
            retries=0,
            inter_frame_ms=5,
            reconnect_min_ms=50,
            reconnect_max_ms=400,
            offline_poll_ms=500,
        )
        async with running(spec, [panel("pp1", poll_ms=50)], rec) as bus:
            await wait_for(lambda: rec.availability("pp1") == ["online"], 5, "online")
            await stub.stop(signal.SIGKILL)  # the serial server loses power
            await stub.session.close()
            await wait_for(lambda: not bus.connected, 3, "the link to drop")
            t0 = time.monotonic()
            with pytest.raises(BusDown):
                await bus.write(WritePoint("pp1", "siren", True))
            assert time.monotonic() - t0 < 0.05
            await wait_for(lambda: rec.availability("pp1")[-1:] == ["offline"], 3, "offline while down")
            await asyncio.sleep(0.8)  # a few failed reconnects
            failures = bus.stats().connect_failures
            assert failures >= 2
            stub = await start_stub(PANEL, "--rtu-over-tcp", f"127.0.0.1:{port}", *CTRL)
            await wait_for(lambda: rec.availability("pp1")[-1:] == ["online"], 5, "online after the reboot")
            await stub.post("/zones/2/trip")
            await wait_for(lambda: rec.changes(point="zone2_alarm", initial=False), 3, "a trip after the reboot")
            r = await bus.write(WritePoint("pp1", "siren", True, token="after"))
            assert r.ok
            st = bus.stats()
            assert st.link_drops >= 1 and st.connects >= 3 and st.restarts == 0
            # Reconnect attempts were spaced by the backoff, not hammered.
            assert st.connect_failures < 40
    finally:
        await stub.stop()
        await stub.session.close()


@pytest.mark.realtime
async def test_rtu_on_a_pseudo_terminal_paces_frames() -> None:
    rec = Recorder()
    async with run_stub(PANEL, "--rtu-pty", "--units", "1-2", "--zones", "16", *CTRL) as stub:
        assert stub.serial.startswith("/dev/")
        devs = [panel(f"pp{u}", unit=u, zones=16, poll_ms=100) for u in (1, 2)]
        spec = BusSpec("rs485", "modbus-rtu", serial=stub.serial, baudrate=9600, timeout_ms=200)
        assert spec.gap_ms == 30
        async with running(spec, devs, rec) as bus:
            await wait_for(lambda: all(rec.availability(f"pp{u}") == ["online"] for u in (1, 2)), 5, "online")
            await stub.post("/zones/16/touch", {"unit": 2})
            await wait_for(lambda: rec.changes(device="pp2", point="zone16_touch", initial=False), 3, "touch")
            assert not rec.changes(device="pp1", point="zone16_touch", initial=False)
            r = await bus.write(WritePoint("pp1", "aux_output", True, token="a"))
            assert r.ok
            recent = (await stub.state(recent=True))["panels"][0]["requests"]["recent"]
        times = [r["mono"] for r in recent[-40:]]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= 0.029, min(gaps)  # the 30 ms inter-frame silence is kept
        assert (await stub.state())["panels"][0]["units"]["1"]["outputs"]["aux_output"] is True


async def test_rtu_garbage_is_counted_and_survived() -> None:
    rec = Recorder()
    async with run_stub(PANEL, "--rtu-pty", "--units", "1-2", *CTRL) as stub:
        devs = [panel(f"pp{u}", unit=u, poll_ms=60) for u in (1, 2)]
        spec = BusSpec(
            "rs485", "modbus-rtu", serial=stub.serial, timeout_ms=100, retries=1, inter_frame_ms=5, offline_poll_ms=300
        )
        async with running(spec, devs, rec) as bus:
            await wait_for(lambda: all(rec.availability(f"pp{u}") == ["online"] for u in (1, 2)), 5, "online")
            await stub.post("/garbage", {"on": True, "unit": 2})
            await wait_for(lambda: rec.availability("pp2")[-1:] == ["offline"], 3, "pp2 offline")
            await stub.post("/zones/1/trip", {"unit": 1})
            await wait_for(lambda: rec.changes(device="pp1", point="zone1_alarm", initial=False), 3, "pp1 trip")
            st = bus.stats()
            assert st.devices["pp2"].errors.get("bad_frame", 0) >= 3, st.devices["pp2"].errors
            assert st.devices["pp1"].error_count == 0
            assert st.restarts == 0 and bus.connected
            assert (await stub.state())["panels"][0]["requests"]["garbage_sent"] >= 3
            await stub.post("/garbage", {"on": False})
            await wait_for(lambda: rec.availability("pp2")[-1:] == ["online"], 3, "pp2 back")


@pytest.mark.parametrize("units", [1, 2], ids=["one-device-on-the-loop", "two-devices-in-the-bus-thread"])
async def test_a_failing_poll_loop_is_restarted(monkeypatch: pytest.MonkeyPatch, units: int) -> None:
    rec = Recorder()
    devs = [panel(f"pp{u}", unit=u, poll_ms=50) for u in range(1, units + 1)]
    async with (
        run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", f"1-{units}", *CTRL) as stub,
        running(tcp_bus(stub), devs, rec) as bus,
    ):
        await wait_for(lambda: rec.availability("pp1") == ["online"], 5, "online")
        real: Callable[..., Any] = bus._apply  # fault injection: the next decode blows up once
        calls = {"n": 0}

        def broken(*a: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected")
            real(*a)

        monkeypatch.setattr(bus, "_apply", broken)
        await stub.post("/zones/1/trip")  # a change: only a reply that differs from the last is decoded and applied
        await wait_for(lambda: bus.stats().restarts == 1, 3, "a restart")
        await stub.post("/zones/4/trip")
        await wait_for(lambda: rec.changes(point="zone4_alarm", initial=False), 5, "polling again")
        assert bus.stats().restarts == 1


async def test_scan_finds_units_and_their_profiles() -> None:
    profiles = [find_profile(n) for n in ("waveshare-modbus-rtu-relay-d", "perimeter-panel-8", "perimeter-panel-16")]
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "2,5", "--zones", "16", *CTRL) as stub:
        hits = await scan_bus(tcp_bus(stub, timeout_ms=80), range(1, 7), profiles)
    assert [(h.unit, h.profile) for h in hits] == [(2, "perimeter-panel-16"), (5, "perimeter-panel-16")]
    async with run_stub(BOARD, "--model", "relay-d", "--tcp", "127.0.0.1:0", "--units", "3", *CTRL) as stub:
        hits = await scan_bus(tcp_bus(stub, timeout_ms=80), range(1, 5), profiles)
    assert [(h.unit, h.profile, h.registers) for h in hits] == [(3, "waveshare-modbus-rtu-relay-d", (3,))]


async def test_a_scan_through_a_serial_server_with_nobody_behind_it_finds_nobody() -> None:
    """A Modbus TCP gateway answers for the units it cannot reach with exception 11 (gateway target device failed to
    respond) or 10 (gateway path unavailable): those are not units that are there."""

    async def serial_server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await r.readexactly(7)
                body = await r.readexactly(int.from_bytes(head[4:6], "big") - 1)
                code = 11 if head[6] % 2 else 10
                w.write(head[:4] + (3).to_bytes(2, "big") + head[6:7] + bytes([body[0] | 0x80, code]))

    server = await asyncio.start_server(serial_server, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        spec = BusSpec("t1", "modbus-tcp", host="127.0.0.1", port=port, timeout_ms=80)
        assert await scan_bus(spec, range(1, 7), [find_profile("perimeter-panel-8")]) == []
    finally:
        server.close()


def test_specs_are_validated() -> None:
    with pytest.raises(ValueError, match="needs 'serial'"):
        BusSpec("b", "modbus-rtu")
    with pytest.raises(ValueError, match="needs 'host' and 'port'"):
        BusSpec("b", "modbus-tcp", host="127.0.0.1")
    with pytest.raises(ValueError, match="unit id 0"):
        DeviceSpec("d", find_profile("perimeter-panel-8"), unit=0)
    with pytest.raises(ValueError, match="no polled group 'config'"):
        DeviceSpec("d", find_profile("perimeter-panel-8"), groups={"config": 100})
    spec = BusSpec("b", "modbus-tcp", host="127.0.0.1", port=1)
    with pytest.raises(ValueError, match="share a unit id"):
        ModbusBus(spec, [panel("a"), panel("b")], Recorder())
    assert spec.gap_ms == 0 and BusSpec("c", "modbus-rtu-over-tcp", host="h", port=1).gap_ms == 30
    # 3.5 characters where that is longer than 30 ms: 1200 baud 8E1 (11 bits a character) is 32.1 ms
    slow = BusSpec("s", "modbus-rtu", serial="/dev/ttyUSB0", baudrate=1200, parity="E")
    assert slow.gap_ms == 33 and BusSpec("s", "modbus-rtu", serial="/dev/ttyUSB0", baudrate=1200).gap_ms == 30
    with pytest.raises(ValueError, match="max_in_flight above 1 needs modbus-tcp"):
        BusSpec("b", "modbus-rtu-over-tcp", host="h", port=1, max_in_flight=2)
    with pytest.raises(ValueError, match="max_in_flight must be 1-255"):
        BusSpec("b", "modbus-tcp", host="h", port=1, max_in_flight=0)
