"""A bus whose poll loop is stuck (its thread or task blocked for good: a bug, a driver that never returns) watches
nothing, and nothing else would say so: its devices keep their last state. Its silence tells it: the bus reports
how long it has been silent once that is longer than a working loop ever is, the gateway raises a fault event for
the console, `gatehouse status` says STUCK, and the systemd watchdog is no longer fed, so systemd restarts the
gateway. Real stub, real broker, real store, a real datagram socket for sd_notify; the loop is made stuck by
blocking the link's wait for its answers (a fault put in, not a peer mocked), and the stall limit is shortened."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from common.sdnotify import Notifier
from devices.modbus import BusSpec, DeviceSpec, ModbusBus
from devices.profiles import find_profile
from gateway import app, config, wire
from gateway.app import Gateway
from gateway.localapi import LocalApi
from gateway.store import Store
from gateway.tooling.broker import MosquittoProcess, free_port
from gateway.tooling.cli import format_status
from tests.stubs import run_stub
from tests.test_cli_status import CTRL, PANEL, make_config, metric_samples
from tests.test_modbus_bus import Recorder
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

#: several devices on the connection (the bus's own thread), or one (the event loop)
LAYOUTS = {"thread": (1, 2), "loop": (1,)}


def _stick(bus: ModbusBus) -> Callable[[], None]:
    """Make the bus's next wait for an answer block its thread (or task) until the returned function is called."""
    link: Any = bus._link
    if bus._threaded:
        gate = threading.Event()

        async def stuck(stream: Any) -> None:
            gate.wait(60)

        release = gate.set
    else:
        agate = asyncio.Event()

        async def stuck(stream: Any) -> None:
            await agate.wait()

        release = agate.set
    link._wait = stuck
    # On the event loop, the polls go out from the answers' callbacks (the bus's cruise): a batch that is never
    # sent is never answered, and nothing moves until it is.
    held: list[tuple[Any, ...]] = []
    if not bus._threaded:
        link.start_many = lambda *args: held.append(args)

    def unstick() -> None:
        link.__dict__.pop("_wait", None)  # the class's own again, then the blocked wait returns
        link.__dict__.pop("start_many", None)
        release()
        for args in held:
            link.start_many(*args)

    return unstick


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
async def test_a_stuck_poll_loop_is_told_by_its_silence(layout: str) -> None:
    units = LAYOUTS[layout]
    rec = Recorder()
    pp = find_profile("perimeter-panel-8")
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-2", *CTRL) as stub:
        host, port = stub.endpoint()
        spec = BusSpec("s1", "modbus-tcp", host=host, port=port, timeout_ms=300)
        devices = [DeviceSpec(f"pp{u}", pp, unit=u, poll_ms=100) for u in units]
        async with ModbusBus(spec, devices, rec) as bus:
            await wait_for(lambda: all(rec.availability(f"pp{u}") == ["online"] for u in units), 5, "all online")
            # A working loop is never silent for long: seen from 2 s short of the limit ahead, it is not stalled.
            limit = bus.stall_limit_s
            for _ in range(10):
                assert bus.stalled_for(time.monotonic() + limit - 2) is None
                await asyncio.sleep(0.1)
            assert bus.stalled_for() is None and bus.stats().stalled_s is None
            unstick = _stick(bus)
            try:
                await asyncio.sleep(3.0)
                silent = bus.stalled_for(time.monotonic() + limit - 2)
                assert silent is not None and silent >= limit + 0.5, silent
                polls = {d: s.polls for d, s in bus.stats().devices.items()}
                await asyncio.sleep(0.5)
                assert {d: s.polls for d, s in bus.stats().devices.items()} == polls  # stuck indeed
            finally:
                unstick()
            await wait_for(lambda: bus.stalled_for(time.monotonic() + limit - 2) is None, 5, "the loop to move again")
            await wait_for(lambda: bus.stats().devices["pp1"].polls > polls["pp1"] + 3, 5, "polls again")


def _watchdog_pings(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except BlockingIOError:
            return out


async def test_a_stuck_bus_is_a_fault_on_the_console_and_starves_the_watchdog(
    tmp_path: Path, broker: MosquittoProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(app, "BUS_CHECK_S", 0.1)
    sock_path = str(tmp_path / "notify.sock")
    sd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sd.bind(sock_path)
    sd.setblocking(False)
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-2", *CTRL) as stub:
        cfg = config.load(make_config(tmp_path, broker, stub.endpoint(), free_port()))
        gw = Gateway(cfg)
        stop = asyncio.Event()
        runner = asyncio.create_task(gw.run(stop), name="test.gateway")
        notifier = Notifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"})  # fed every 0.1 s
        feeder = asyncio.create_task(notifier.feed_watchdog(gw.problem))
        unstick: Callable[[], None] = lambda: None  # noqa: E731
        try:
            await asyncio.wait_for(gw.ready.wait(), 20)
            await wait_for(lambda: "fence" in gw.drivers, 20, "the bus to start")
            bus = gw.drivers["fence"]
            await wait_for(lambda: all(d.state == "online" for d in bus.stats().devices.values()), 20, "online")
            await asyncio.sleep(0.5)
            assert gw.problem() is None
            assert _watchdog_pings(sd).count("WATCHDOG=1") >= 3  # fed while all is well
            limit, bus.stall_limit_s = bus.stall_limit_s, 1.0  # the time scale shortened: a minute's silence in 1 s
            with caplog.at_level(logging.ERROR):
                unstick = _stick(bus)
                await wait_for(lambda: gw.problem() is not None, 10, "the stuck bus to be seen")
            assert gw.problem() == "bus poll loop stuck: fence"
            assert any("fence: its poll loop has not moved" in r.getMessage() for r in caplog.records)
            _watchdog_pings(sd)
            await asyncio.sleep(0.6)
            starved = _watchdog_pings(sd)
            assert "WATCHDOG=1" not in starved, starved  # systemd would restart the gateway
            # The console hears of it: a fault event naming the bus and its devices, stored for the portal.
            evs = [e for e in await gw.store.events() if e.type == "bus.stalled"]
            assert len(evs) == 1 and evs[0].priority == wire.Priority.FAULT, evs
            assert evs[0].point == "fence" and evs[0].data["bus"] == "fence"
            assert sorted(evs[0].data["devices"]) == ["fence-1", "fence-2"]
            assert evs[0].data["silent_s"] >= 1.0
            # ... and so does an installer at the Pi.
            api = LocalApi(gw)
            status = await api.status()
            (b,) = status["buses"]
            assert b["stalled_s"] is not None and b["stalled_s"] > 1.0
            assert "STUCK: poll loop silent" in format_status(status)
            metrics = metric_samples((await api.metrics()).decode())
            assert metrics[("gatehouse_bus_stalled_seconds", (("bus", "fence"),))] >= 1.0
            unstick()
            await wait_for(lambda: gw.problem() is None, 10, "the bus to move again")
            bus.stall_limit_s = limit
            await asyncio.sleep(0.5)
            assert _watchdog_pings(sd).count("WATCHDOG=1") >= 2  # fed again
            pair = [e for e in await gw.store.events() if e.type.startswith("bus.stalled")]
            assert [e.type for e in pair] == ["bus.stalled", "bus.stalled_restore"], pair
            assert pair[0].data["incident"] == pair[1].data["incident"] and pair[1].data["how"] == "restored"
        finally:
            unstick()
            feeder.cancel()
            stop.set()
            await asyncio.gather(feeder, return_exceptions=True)
            await asyncio.wait_for(runner, 30)
            notifier.close()
            sd.close()


@contextlib.asynccontextmanager
async def _running(cfg_path: Path, *, short: bool = True) -> AsyncIterator[tuple[Gateway, ModbusBus]]:
    """A gateway on ``cfg_path`` until the block ends, with its one bus started and (``short``) its stall limit
    shortened to 1 s; its bus is handed over."""
    gw = Gateway(config.load(cfg_path))
    stop = asyncio.Event()
    runner = asyncio.create_task(gw.run(stop), name="test.gateway")
    try:
        await asyncio.wait_for(gw.ready.wait(), 20)
        await wait_for(lambda: len(gw.drivers) == 1, 20, "the bus to start")
        (bus,) = gw.drivers.values()
        if short:
            bus.stall_limit_s = 1.0  # the time scale shortened: a minute's silence in 1 s
        yield gw, bus
    finally:
        stop.set()
        await asyncio.wait_for(runner, 30)


async def _stalls(gw: Gateway) -> list[wire.Event]:
    return [e for e in await gw.store.events() if e.type.startswith("bus.stalled")]


async def test_a_stall_still_open_when_the_gateway_restarts_is_closed_by_the_gateway_restarted(
    tmp_path: Path, broker: MosquittoProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog's restart is the cure for a stuck bus, so the restarted gateway must close the incident that
    caused it, and only once its bus has proved it moves; stuck again at once, it carries the same incident on."""
    monkeypatch.setattr(app, "BUS_CHECK_S", 0.1)
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-2", *CTRL) as stub:
        cfg_path = make_config(tmp_path, broker, stub.endpoint(), free_port())
        # 1. The bus sticks; the gateway ends with the incident open (systemd would kill it).
        async with _running(cfg_path) as (gw, bus):
            unstick = _stick(bus)
            await wait_for(lambda: gw.problem() is not None, 10, "the stuck bus to be seen")
            await asyncio.wait_for(gw.store.drain(), 10)
        unstick()
        # 2. Restarted, the bus works: its stall is restored, with the same incident, after a stall limit's polling.
        started = wire.utcnow()
        async with _running(cfg_path) as (gw, bus):
            await wait_for(lambda: _is(1, _count_restores(gw)), 10, "the restore")
            first, restore = await _stalls(gw)
            assert restore.type == "bus.stalled_restore" and restore.priority == wire.Priority.FAULT
            assert restore.data["incident"] == first.data["incident"] and restore.data["how"] == "restored"
            assert restore.data["after_restart"] is True and sorted(restore.data["devices"]) == ["fence-1", "fence-2"]
            assert (restore.ts - started).total_seconds() >= 1.0  # not at once: it could stick again
            assert gw.problem() is None
            # 3. It sticks again: a new incident, open when the gateway ends ...
            unstick = _stick(bus)
            await wait_for(lambda: gw.problem() is not None, 10, "the stuck bus to be seen")
            await asyncio.wait_for(gw.store.drain(), 10)
        unstick()
        second = (await _stored_stalls(cfg_path))[-1]
        assert second.type == "bus.stalled" and second.data["incident"] != first.data["incident"]
        # ... and stuck again right after the restart: the same incident carries on, not a second one. (Stuck before
        # the limit is shortened: a loaded machine must not let the restarted bus poll for the whole 1 s first.)
        async with _running(cfg_path, short=False) as (gw, bus):
            unstick = _stick(bus)
            await asyncio.sleep(1.5)  # silent longer than the shortened limit from its first look on
            bus.stall_limit_s = 1.0
            await wait_for(lambda: gw.problem() is not None, 10, "the stuck bus to be seen")
            await asyncio.sleep(0.3)
            assert (await _stalls(gw))[-1] == second  # no new opening
            unstick()
            await wait_for(lambda: gw.problem() is None, 10, "the bus to move again")
            await wait_for(lambda: _is(2, _count_restores(gw)), 10, "the restore")
            last = (await _stalls(gw))[-1]
            assert last.type == "bus.stalled_restore" and last.data["incident"] == second.data["incident"]
            assert "after_restart" not in last.data
            # 4. Stuck once more when the gateway ends; the installer then removes the bus from the configuration.
            unstick = _stick(bus)
            await wait_for(lambda: gw.problem() is not None, 10, "the stuck bus to be seen")
            await asyncio.wait_for(gw.store.drain(), 10)
        unstick()
        third = (await _stored_stalls(cfg_path))[-1]
        text = cfg_path.read_text()
        cfg_path.write_text(
            text.replace("{name: fence,", "{name: perimeter,").replace("bus: fence,", "bus: perimeter,")
        )
        # Restarted without that bus, the incident is closed at once: nothing will ever move on it again.
        async with _running(cfg_path) as (gw, bus):
            await wait_for(lambda: _is(3, _count_restores(gw)), 10, "the restore of the removed bus")
            last = (await _stalls(gw))[-1]
            assert last.data["incident"] == third.data["incident"] and last.data["removed"] is True
            assert last.point == "fence" and last.data["devices"] == []


async def _is(n: int, count: Awaitable[int]) -> bool:
    return await count == n


async def _count_restores(gw: Gateway) -> int:
    return sum(1 for e in await _stalls(gw) if e.type == "bus.stalled_restore")


async def _stored_stalls(cfg_path: Path) -> list[wire.Event]:
    """The stall events in the store of the gateway on ``cfg_path`` (stopped)."""
    cfg = config.load(cfg_path)
    async with Store(cfg.data_path(cfg.store.path), site=cfg.site, gateway=cfg.gateway) as store:
        return [e for e in await store.events() if e.type.startswith("bus.stalled")]
