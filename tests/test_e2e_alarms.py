"""Alarms end to end: a stub's input → the gateway process → a real Mosquitto → the portal → its JSON
API and a signed-in console's WebSocket.

The portal runs in-process on the test's loop (a real aiohttp server and MQTT client); the gateway and
the stubs are processes of their own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from tests import procs
from tests.portal_support import (
    Portal,
    add_user,
    gateway_online,
    portal_public_key,
    running_portal,
    sign_in,
    wait_for,
    write_config,
)
from tests.stubs import Stub, run_stub

SITE, GW = "s1", "gw1"


@dataclass
class Site:
    portal: Portal
    perimeter: Stub
    indoor: Stub
    gateway: procs.Child
    broker: MosquittoProcess

    async def command(self, type_: str, **args: Any) -> None:
        """Sent by the portal (signed with its key), as the console sends it."""
        now = wire.utcnow()
        cmd = wire.Command(
            v=wire.COMMAND_VERSION,
            id=str(ULID()),
            type=type_,
            ts=now,
            expires=now + timedelta(seconds=30),
            by="test",
            args=args,
        )
        await wait_for(lambda: self.portal.services.ingest.connected, what="the portal's broker link")
        await self.portal.services.ingest.send_command(SITE, GW, cmd)

    async def events(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in await self.portal.events(limit=500) if e["type"] == type_]


def gateway_config(folder: Path, broker: MosquittoProcess, perimeter: Stub, indoor: Stub, portal_key: Path) -> Path:
    host, port = perimeter.endpoint()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gateway.yaml"
    path.write_text(
        f"""
site: {SITE}
gateway: {GW}
data_dir: data
mqtt: {{host: 127.0.0.1, port: {broker.port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}
buses:
  - {{name: fence, kind: modbus-tcp, host: {host}, port: {port}, timeout_ms: 300}}
devices:
  - {{name: panel-1, profile: perimeter-panel-8, bus: fence, unit: 1, poll_ms: 100}}
zone_groups:
  - {{name: perimeter, label: 周界}}
zones:
  - {{name: north-fence, device: panel-1, point: zone1_alarm, group: perimeter, label: 北围墙,
      aux: {{tamper: zone1_tamper, cut: zone1_cut}}}}
  - {{name: east-fence, device: panel-1, point: zone2_alarm, group: perimeter, label: 东围墙}}
contact_id_lines:
  - {{name: cid-1, serial: {indoor.serial}, mode: panel}}
indoor_panels:
  - {{name: flat-3-1-101, account: "1234", place: {{building: "3", unit: "1", house: "101"}}, test_interval_s: null}}
access:
  public_keys: [{portal_key}]
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
async def site(tmp_path: Path, broker: MosquittoProcess) -> AsyncIterator[Site]:
    async with running_portal(write_config(tmp_path / "portal", broker, gateways=[(SITE, GW)])) as portal:
        await add_user(portal, "guard1", "guard", "correct horse battery staple")
        r = await sign_in(portal, "guard1", "correct horse battery staple")
        assert r.status == 303
        async with (
            run_stub("firmware_stubs.perimeter_panel", "--tcp", "127.0.0.1:0", "--zones", "8") as perimeter,
            run_stub("firmware_stubs.indoor_panel", "--pty", "--account", "1234") as indoor,
        ):
            portal_key = portal_public_key(portal)
            cfg = gateway_config(tmp_path / "gw", broker, perimeter, indoor, portal_key)
            gateway = await asyncio.to_thread(lambda: procs.gateway(cfg, tmp_path / "logs").start())
            try:
                await wait_for(lambda: gateway_online(portal, GW), timeout=20, what="the gateway online at the portal")
                yield Site(portal, perimeter, indoor, gateway, broker)
            finally:
                await asyncio.to_thread(gateway.stop)


async def test_zone_trip_reaches_api_and_console_websocket(site: Site) -> None:
    ws = await site.portal.client.ws_connect("/ws", headers={"Origin": site.portal.origin})
    try:
        await site.command("arm", group="perimeter")
        await wait_for(lambda: site.events("group.armed"), timeout=20, what="the arm result")
        await site.perimeter.post("/zones/1/trip")
        alarms = await wait_for(lambda: site.events("zone.alarm"), timeout=20, what="zone.alarm in /api/events")
        assert alarms[0]["place"] == {"site": SITE, "zone": "north-fence"}
        assert alarms[0]["priority"] == wire.Priority.INTRUSION
        async with asyncio.timeout(20):
            while True:
                msg = json.loads((await ws.receive()).data)
                if msg.get("kind") == "event" and msg["event"]["type"] == "zone.alarm":
                    break
        assert msg["event"]["id"] == alarms[0]["id"]
        await site.perimeter.post("/zones/1/restore")
        restore = await wait_for(lambda: site.events("zone.restore"), timeout=20, what="zone.restore")
        assert restore[0]["data"]["incident"] == alarms[0]["data"]["incident"]
    finally:
        await ws.close()


async def test_disarmed_perimeter_raises_nothing_but_tamper_does(site: Site) -> None:
    await site.perimeter.post("/zones/2/trip")
    await site.perimeter.post("/zones/1/tamper", {"active": True})
    tamper = await wait_for(lambda: site.events("zone.tamper"), timeout=20, what="zone.tamper")
    assert tamper[0]["priority"] == wire.Priority.TAMPER
    assert await site.events("zone.alarm") == []


@pytest.mark.parametrize(
    ("path", "body", "type_", "priority"),
    [
        ("/alarm/fire", {"zone": 3}, "panel.alarm", wire.Priority.FIRE),
        ("/alarm/panic", {"zone": 4}, "panel.alarm", wire.Priority.PANIC),
        ("/alarm/medical", {"zone": 5}, "panel.alarm", wire.Priority.PANIC),
        ("/alarm/gas", {"zone": 6}, "panel.alarm", wire.Priority.FIRE),
        ("/alarm/burglary", {"zone": 7}, "panel.alarm", wire.Priority.INTRUSION),
        ("/alarm/tamper", {"zone": 8}, "panel.tamper", wire.Priority.TAMPER),
        ("/alarm/ac_loss", {}, "panel.trouble", wire.Priority.FAULT),
        ("/alarm/low_battery", {}, "panel.trouble", wire.Priority.FAULT),
        ("/user/3/close", {}, "house.armed", wire.Priority.ROUTINE),
    ],
)
async def test_indoor_panel_reports_reach_the_portal_with_the_house(
    site: Site, path: str, body: dict[str, Any], type_: str, priority: int
) -> None:
    await site.indoor.post(path, body)
    got = await wait_for(lambda: site.events(type_), timeout=20, what=type_)
    assert got[0]["priority"] == priority
    assert got[0]["place"] == {"site": SITE, "building": "3", "unit": "1", "house": "101"}
    assert got[0]["data"]["account"] == "1234"
