"""The bus's own Modbus TCP framing against a real pymodbus stub that spoils one answer at a time: an answer with
another transaction id, a frame cut short, an exception reply, garbage, a connection closed halfway through an
answer. Each is counted as what it is, the polls around it keep their devices, and no change is lost or told
twice. Both ways the bus waits for answers are run: three devices on the connection (the bus's own thread, on a
blocking socket) and the spoilt one alone (the event loop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from devices.events import Availability
from devices.modbus import BusSpec, DeviceSpec, ModbusBus
from devices.profiles import find_profile
from tests.stubs import run_stub
from tests.test_modbus_bus import Recorder
from tests.waiting import wait_for

PANEL = "firmware_stubs.perimeter_panel"
#: the units on the bus: several (the bus's own thread) or the spoilt one alone (the event loop)
LAYOUTS = {"thread": (1, 2, 3), "loop": (2,)}

pytestmark = pytest.mark.timeout(60)

# What the device whose answer was spoilt counts (a spoilt answer is retried at once and the retry is answered).
EXPECTED = {
    "wrong-tid": {"bad_frame": 1},  # no answer to the request: the frame that came is no answer
    "truncate": {"bad_frame": 1},  # part of a frame came and never the rest
    "garbage": {"bad_frame": 1},
    "exception": {"exception": 1},  # the device is there and refused: not retried; its inputs unread, a missed poll
}
#: Polls missed by the spoilt device: a refused read reads nothing (one miss is no offline: offline_after_misses)
MISSED = {"exception": 1}


def _devices(units: tuple[int, ...]) -> list[DeviceSpec]:
    pp = find_profile("perimeter-panel-8")
    # The inputs every 50 ms; the other groups slowly, so that the spoilt answer is most likely an input poll's.
    slow = {"status": 60_000, "outputs": 60_000, "levels": 60_000}
    return [DeviceSpec(f"pp{u}", pp, unit=u, poll_ms=50, groups=slow) for u in units]


def _in_own_thread(bus: ModbusBus) -> bool:
    return any(t.name == f"bus[{bus.spec.name}]" for t in threading.enumerate())


async def _trips_told_once(rec: Recorder, units: tuple[int, ...]) -> None:
    for u in units:
        await wait_for(
            lambda u=u: rec.changes(device=f"pp{u}", point=f"zone{u}_alarm", initial=False), 5, f"pp{u}'s trip"
        )
    await asyncio.sleep(0.3)  # more polls: nothing else changes, nothing is told twice
    got = sorted((e.device, e.point, e.value) for e in rec.changes(initial=False))
    assert got == [(f"pp{u}", f"zone{u}_alarm", True) for u in units], got


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", sorted(EXPECTED))
async def test_a_spoilt_answer_is_counted_as_what_it_is_and_nothing_is_lost(mode: str, layout: str) -> None:
    units = LAYOUTS[layout]
    rec = Recorder()
    async with run_stub(
        PANEL, "--tcp", "127.0.0.1:0", "--units", "1-3", "--zones", "8", "--control", "127.0.0.1:0"
    ) as stub:
        host, port = stub.endpoint()
        spec = BusSpec("t1", "modbus-tcp", host=host, port=port, timeout_ms=1000, retries=1)
        async with ModbusBus(spec, _devices(units), rec) as bus:
            await wait_for(lambda: all(rec.availability(f"pp{u}") == ["online"] for u in units), 5, "all online")
            assert _in_own_thread(bus) == (layout == "thread")
            await stub.post("/mangle", {"mode": mode, "unit": 2})
            for u in units:
                await stub.post(f"/zones/{u}/trip", {"unit": u})
            await wait_for(lambda: bus.stats().devices["pp2"].errors, 5, "the spoilt answer")
            await _trips_told_once(rec, units)
            st = bus.stats()
            assert (await stub.state())["panels"][0]["requests"]["mangled"] == 1
            assert st.devices["pp2"].errors == EXPECTED[mode], st.devices["pp2"].errors
            for name, d in st.devices.items():
                assert d.missed_polls == (MISSED.get(mode, 0) if name == "pp2" else 0), (name, d)
                if name != "pp2":
                    assert not d.errors, (name, d.errors)
            assert st.link_drops == 0 and st.restarts == 0 and bus.connected
            assert all(rec.availability(f"pp{u}") == ["online"] for u in units)
        assert not _in_own_thread(bus)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
async def test_a_panel_that_refuses_every_read_is_offline_not_online_with_its_zones_unread(layout: str) -> None:
    """A panel whose every input read is answered with Modbus exception 4 (server device failure) answers, but
    tells nothing: a fence trip meanwhile would be lost. It goes offline after the bus's missed polls, with the
    refusal as the reason (the console's fault), its neighbours untouched; answering again, it comes back online and
    the trip it had hidden is told."""
    units = LAYOUTS[layout]
    rec = Recorder()
    async with run_stub(
        PANEL, "--tcp", "127.0.0.1:0", "--units", "1-3", "--zones", "8", "--control", "127.0.0.1:0"
    ) as stub:
        host, port = stub.endpoint()
        spec = BusSpec("t1", "modbus-tcp", host=host, port=port, timeout_ms=1000, retries=1, offline_poll_ms=200)
        async with ModbusBus(spec, _devices(units), rec) as bus:
            await wait_for(lambda: all(rec.availability(f"pp{u}") == ["online"] for u in units), 5, "all online")
            # 20 refusals: three polls' worth to go offline, then the probes' (every 200 ms) until it answers again
            await stub.post("/mangle", {"mode": "exception", "unit": 2, "count": 20})
            await stub.post("/zones/2/trip", {"unit": 2})
            await wait_for(lambda: rec.availability("pp2") == ["online", "offline"], 5, "pp2 offline")
            (off,) = [e for e in rec.events if isinstance(e, Availability) and e.state == "offline"]
            assert off.device == "pp2" and off.reason == "refused: Modbus exception 4 (server device failure)", off
            assert not rec.changes(device="pp2", initial=False)  # nothing was read: nothing told
            assert all(rec.availability(f"pp{u}") == ["online"] for u in units if u != 2)
            assert bus.stats().devices["pp2"].missed_polls >= 3
            await wait_for(lambda: rec.availability("pp2") == ["online", "offline", "online"], 10, "pp2 back")
            await wait_for(lambda: rec.changes(device="pp2", point="zone2_alarm", initial=False), 5, "the trip told")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
async def test_a_connection_closed_halfway_through_an_answer_is_a_dropped_link_and_reconnected(layout: str) -> None:
    units = LAYOUTS[layout]
    rec = Recorder()
    async with run_stub(
        PANEL, "--tcp", "127.0.0.1:0", "--units", "1-3", "--zones", "8", "--control", "127.0.0.1:0"
    ) as stub:
        host, port = stub.endpoint()
        spec = BusSpec(
            "t1",
            "modbus-tcp",
            host=host,
            port=port,
            timeout_ms=1000,
            retries=1,
            reconnect_min_ms=20,
            offline_after_misses=6,
        )
        async with ModbusBus(spec, _devices(units), rec) as bus:
            await wait_for(lambda: all(rec.availability(f"pp{u}") == ["online"] for u in units), 5, "all online")
            assert _in_own_thread(bus) == (layout == "thread")
            await stub.post("/mangle", {"mode": "close", "unit": 2})
            await wait_for(lambda: bus.stats().link_drops == 1, 5, "the dropped link")
            for u in units:
                await stub.post(f"/zones/{u}/trip", {"unit": u})
            await _trips_told_once(rec, units)
            st = bus.stats()
            assert st.link_drops == 1 and st.connects == 2 and st.restarts == 0 and bus.connected
            assert st.devices["pp2"].missed_polls >= 1  # the poll whose answer was cut off
            for name, d in st.devices.items():
                assert not d.errors, (name, d.errors)  # no answer was taken for another, none was garbled
                # The poll the link went down under, and those that fell due before the reconnect (after 0-20 ms,
                # jittered, and a connect, which three test workers beside it slowed to 100 ms in one CI run; the
                # inputs are polled every 50 ms): a poll due while the link is down is missed.
                assert d.missed_polls <= 5, (name, d)
            assert all(rec.availability(f"pp{u}") == ["online"] for u in units)  # six misses in a row make offline
        assert not _in_own_thread(bus)


@asynccontextmanager
async def _silent_bus(timeout_ms: int) -> AsyncIterator[tuple[ModbusBus, Recorder, list[bytes]]]:
    """A bus of two devices (its own thread) on a Modbus TCP endpoint that takes every request and never answers;
    the bus is not started. Yields it, its recorder and what the endpoint took."""
    took: list[bytes] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            took.append(data)
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rec = Recorder()
    try:
        spec = BusSpec("t1", "modbus-tcp", host="127.0.0.1", port=port, timeout_ms=timeout_ms, retries=0)
        yield ModbusBus(spec, _devices((1, 2)), rec), rec, took
    finally:
        server.close()
        await server.wait_closed()


async def test_a_silent_connection_in_the_bus_thread_times_out_at_the_buses_timeout() -> None:
    """The thread's reads are bounded by the kernel (SO_RCVTIMEO): with a 300 ms timeout, each silent poll is a
    timeout, and three make each device offline within about a second, not never and not at once."""
    async with _silent_bus(300) as (bus, rec, _), bus:
        t0 = asyncio.get_running_loop().time()
        await wait_for(lambda: all(rec.availability(f"pp{u}") == ["offline"] for u in (1, 2)), 10, "offline")
        took_s = asyncio.get_running_loop().time() - t0
        assert _in_own_thread(bus)
        st = bus.stats()
    assert 0.6 <= took_s < 4.0, took_s  # three polls of 300 ms each for the first device, at least
    for d in st.devices.values():
        assert d.errors.get("timeout", 0) >= 1 and d.missed_polls >= 3, d


async def test_a_bus_waiting_on_a_silent_device_in_its_thread_stops_at_once() -> None:
    """A connection that takes requests and never answers, with a 5 s timeout: the bus's thread is blocked reading
    when the bus stops, and the stop neither waits out the timeout nor leaves the thread behind."""
    async with _silent_bus(5000) as (bus, rec, took):
        async with bus:
            await wait_for(lambda: bus.connected and took, 5, "a request sent")
            assert _in_own_thread(bus)
            t0 = asyncio.get_running_loop().time()
        assert asyncio.get_running_loop().time() - t0 < 1.0
        assert not _in_own_thread(bus) and not bus.connected
        assert rec.changes() == []  # nothing was answered, nothing told
