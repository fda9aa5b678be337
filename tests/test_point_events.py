"""Point change events (``point_events``): the points of a device that no zone or door uses reach the portal's
topic as ``point.changed`` with their value, when asked for; never by default; a zone's own point never.

Real parts: the gateway process, a Waveshare-style IO board stub on Modbus TCP, Mosquitto, and a bare MQTT
subscriber on the gateway's events topic (an integration listening)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest

from common.tasks import cancel_and_wait
from devices.events import PointChanged
from gateway import wire
from gateway.config import GatewayConfig
from gateway.point_events import PointReporter
from gateway.tooling.broker import MosquittoProcess
from tests import procs
from tests.stubs import Stub, run_stub
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

SITE, GW = "s1", "gw1"


def config(folder: Path, broker: MosquittoProcess, board: Stub, point_events: str) -> Path:
    host, port = board.endpoint()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gateway.yaml"
    path.write_text(
        f"""
site: {SITE}
gateway: {GW}
data_dir: data
mqtt: {{host: 127.0.0.1, port: {broker.port}}}
buses: [{{name: b1, kind: modbus-tcp, host: {host}, port: {port}}}]
devices:
  - {{name: io-1, profile: waveshare-modbus-rtu-io-8ch, bus: b1, poll_ms: 50, place: {{building: "3", unit: "1"}}}}
zones: [{{name: pump-room, device: io-1, point: input1, type: fault, restore_ms: 0}}]
{point_events}
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
async def listener(broker: MosquittoProcess) -> AsyncIterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    async with aiomqtt.Client("127.0.0.1", broker.port) as c:
        await c.subscribe(wire.topic(SITE, GW, "events"), qos=1)

        async def listen() -> None:
            async for msg in c.messages:
                seen.extend(json.loads(bytes(msg.payload))["events"])  # type: ignore[arg-type]

        task = asyncio.create_task(listen())
        try:
            yield seen
        finally:
            await cancel_and_wait("the test's task", [task])


async def test_an_unclaimed_input_is_reported_with_its_value(
    tmp_path: Path, broker: MosquittoProcess, listener: list[dict[str, Any]]
) -> None:
    async with run_stub("firmware_stubs.modbus_device", "--model", "io-8ch", "--tcp", "127.0.0.1:0") as board:
        cfg = config(tmp_path / "gw", broker, board, "point_events: {enabled: true, devices: [io-1]}")
        gw = await asyncio.to_thread(lambda: procs.gateway(cfg, tmp_path / "logs").start())
        try:
            await asyncio.sleep(1.0)  # first reads: the baseline, not reported
            assert [e for e in listener if e["type"] == "point.changed"] == []
            await board.post("/inputs/3", {"active": True})
            await board.post("/inputs/1", {"active": True})  # the zone's point: a zone.fault, not a point event
            await wait_for(lambda: any(e["type"] == "zone.fault" for e in listener), 10, "the zone's fault")
            await wait_for(lambda: any(e["type"] == "point.changed" for e in listener), 10, "input 3")
            await board.post("/inputs/3", {"active": False})
            changes = lambda: [e for e in listener if e["type"] == "point.changed"]  # noqa: E731
            await wait_for(lambda: len(changes()) >= 2, 10, "input 3 back")
            await asyncio.sleep(0.3)
        finally:
            await asyncio.to_thread(gw.stop)
    got = [(e["device"], e["point"], e["data"], e["place"], e["priority"]) for e in changes()]
    place = {"site": SITE, "building": "3", "unit": "1"}
    assert got == [
        ("io-1", "input3", {"value": True, "kind": "input"}, place, 0),
        ("io-1", "input3", {"value": False, "kind": "input"}, place, 0),
    ]


def test_off_by_default_and_never_for_claimed_points() -> None:
    base: dict[str, Any] = {
        "site": SITE,
        "gateway": GW,
        "buses": [{"name": "b1", "kind": "modbus-tcp", "host": "127.0.0.1", "port": 502}],
        "devices": [
            {"name": "io-1", "profile": "waveshare-modbus-rtu-io-8ch", "bus": "b1"},
            {"name": "io-2", "profile": "waveshare-modbus-rtu-io-8ch", "bus": "b1", "unit": 2},
        ],
        "zones": [{"name": "z", "device": "io-1", "point": "input1"}],
        "doors": [{"name": "d", "device": "io-2", "relay": "output1", "contact": "input2"}],
    }
    change = PointChanged("io-1", "input4", True, 1.0)
    assert PointReporter(msgspec.convert(base, GatewayConfig)).on_device_event(change) == []
    on = msgspec.convert({**base, "point_events": {"enabled": True}}, GatewayConfig)
    reporter = PointReporter(on)
    assert [d.data for d in reporter.on_device_event(change)] == [{"value": True, "kind": "input"}]
    for claimed in (
        PointChanged("io-1", "input1", True, 1.0),
        PointChanged("io-2", "input2", True, 1.0),
        PointChanged("io-2", "output1", True, 1.0),
    ):
        assert reporter.on_device_event(claimed) == [], claimed
    assert reporter.on_device_event(PointChanged("io-2", "input5", 7, 1.0, initial=True)) == []
    only = PointReporter(
        msgspec.convert({**base, "point_events": {"enabled": True, "devices": ["io-2"]}}, GatewayConfig)
    )
    assert only.on_device_event(change) == []
    assert [d.point for d in only.on_device_event(PointChanged("io-2", "input5", True, 1.0))] == ["input5"]
