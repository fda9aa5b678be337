"""Alarms do not wait for a slow disk: the gateway's store is made to stall every commit for seconds (a real SQLite
file; the stall is a sleep in its writer thread inside the transaction, where an SD card's fsync would hold it,
switched on and off by a flag file through ``GATEHOUSE_STORE_STALL``), and an alarm still reaches the portal at once.

Real parts: the gateway process, a perimeter panel stub, Mosquitto, and the portal (in-process: its aiohttp server,
MQTT ingest and SQLite store). The outsider here is the disk that stalls, and then the power switch of the process
(SIGKILL) between the alarm's hand-over and its commit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from gateway import wire
from gateway.store import STALL_ENV
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

pytestmark = [pytest.mark.timeout(180), pytest.mark.realtime]

SITE, GW = "s1", "gw1"
STALL_S = 6.0  # every commit stalls this long while the flag file exists


@dataclass
class Rig:
    tmp: Path
    portal: Portal
    panel: Stub
    broker: MosquittoProcess
    config: Path
    flag: Path
    gateway: procs.Child | None = None

    def start_gateway(self, name: str = "gateway") -> None:
        env = {STALL_ENV: f"{STALL_S}:{self.flag}"}
        self.gateway = procs.gateway(self.config, self.tmp / "logs", name=name, env=env).start()

    @property
    def db(self) -> Path:
        return self.tmp / "gw" / "data" / "gateway.db"

    def gateway_events(self, type_: str) -> list[tuple[int, str]]:
        return [
            (int(s), str(i)) for s, i in procs.read_rows(self.db, "SELECT seq, id FROM events WHERE type = ?", type_)
        ]

    def outbox(self) -> int:
        rows = procs.read_rows(self.db, "SELECT count(*) FROM outbox")
        return int(rows[0][0]) if rows else -1

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

    async def armed(self) -> None:
        await wait_for(lambda: gateway_online(self.portal, GW), timeout=20, what="the gateway online at the portal")
        await self.command("arm", group="fence")
        await wait_for(lambda: self.events("group.armed"), timeout=20, what="the perimeter armed")

    def logs(self) -> str:
        return self.gateway.tail() if self.gateway else ""


@pytest.fixture
async def rig(tmp_path: Path, broker: MosquittoProcess) -> AsyncIterator[Rig]:
    async with running_portal(write_config(tmp_path / "portal", broker, gateways=[(SITE, GW)])) as portal:
        await add_user(portal, "guard1", "guard", "correct horse battery staple")
        assert (await sign_in(portal, "guard1", "correct horse battery staple")).status == 303
        async with run_stub("firmware_stubs.perimeter_panel", "--tcp", "127.0.0.1:0", "--zones", "8") as panel:
            host, port = panel.endpoint()
            portal_key = portal_public_key(portal)
            (tmp_path / "gw").mkdir()
            config = tmp_path / "gw" / "gateway.yaml"
            config.write_text(
                f"""
site: {SITE}
gateway: {GW}
data_dir: data
mqtt: {{host: 127.0.0.1, port: {broker.port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}
uplink: {{resend_after_s: 1.0}}
buses: [{{name: fence, kind: modbus-tcp, host: {host}, port: {port}}}]
devices: [{{name: panel-1, profile: perimeter-panel-8, bus: fence, poll_ms: 100}}]
zone_groups: [{{name: fence}}]
zones:
  - {{name: north, device: panel-1, point: zone1_alarm, group: fence, restore_ms: 0}}
  - {{name: east, device: panel-1, point: zone2_alarm, group: fence, restore_ms: 0}}
access: {{public_keys: [{portal_key}]}}
""",
                encoding="utf-8",
            )
            r = Rig(tmp_path, portal, panel, broker, config, tmp_path / "stall")
            try:
                yield r
            finally:
                r.flag.unlink(missing_ok=True)
                if r.gateway is not None:
                    await asyncio.to_thread(r.gateway.stop)


async def test_an_alarm_reaches_the_portal_while_every_commit_stalls(rig: Rig) -> None:
    rig.start_gateway()
    await rig.armed()
    rig.flag.touch()  # from now on every commit of the gateway's store takes STALL_S seconds
    await asyncio.sleep(0.5)
    tripped = float((await rig.panel.post("/zones/1/trip"))["mono"])
    alarms = await wait_for(lambda: rig.events("zone.alarm"), timeout=STALL_S, what="the alarm at the portal")
    took = time.monotonic() - tripped
    assert took < STALL_S / 3, f"the alarm took {took:.2f} s: it waited for the stalled commit\n{rig.logs()}"
    # It reached the portal before the gateway's own store had it: it did not wait for the disk.
    assert alarms[0]["id"] not in {i for _, i in rig.gateway_events("zone.alarm")}
    # The restore keeps the alarm's priority: it does not wait either.
    await rig.panel.post("/zones/1/restore")
    await wait_for(lambda: rig.events("zone.restore"), timeout=STALL_S / 3, what="the restore")
    assert rig.gateway_events("zone.alarm") == [], "the commit was meant to be stalled still"
    rig.flag.unlink()
    # The durable record has the same id and seq; the portal's ack removed its outbox row after the commit.
    await wait_for(lambda: rig.gateway_events("zone.alarm"), timeout=3 * STALL_S, what="the alarm committed")
    assert rig.gateway_events("zone.alarm") == [(alarms[0]["seq"], alarms[0]["id"])]
    await wait_for(lambda: rig.outbox() == 0, timeout=10, what="the outbox emptied by the portal's acks")
    assert len(await rig.events("zone.alarm")) == 1
    health = await rig.portal.health()
    assert health["rejections"].get("seq-conflict", 0) == 0, health


async def test_a_crash_between_hand_over_and_commit_loses_nothing_and_duplicates_nothing(rig: Rig) -> None:
    rig.start_gateway()
    await rig.armed()
    rig.flag.touch()
    await asyncio.sleep(0.5)
    await rig.panel.post("/zones/1/trip")
    alarms = await wait_for(lambda: rig.events("zone.alarm"), timeout=STALL_S, what="the alarm at the portal")
    assert rig.gateway_events("zone.alarm") == [], "the commit was meant to be stalled still"
    assert rig.gateway is not None
    rig.gateway.kill()  # SIGKILL in the middle of the stalled commit
    rig.flag.unlink()
    rig.start_gateway("gateway-2")
    # The restarted gateway committed the alarm from its journal, with the id and seq the portal has.
    await wait_for(lambda: rig.gateway_events("zone.alarm") or None, timeout=20, what="the alarm in the store")
    assert rig.gateway_events("zone.alarm") == [(alarms[0]["seq"], alarms[0]["id"])]
    # The zone is still tripped: the restored engine knows its incident and raises no second alarm; a new trip
    # and the restores reach the portal under new seqs (a seq given twice would be refused as a conflict).
    await rig.panel.post("/zones/2/trip")
    await wait_for(lambda: _at_least(rig.events("zone.alarm"), 2), timeout=20, what="the second alarm")
    await asyncio.sleep(0.5)  # several polls of the still-tripped zone 1: nothing more may come of it
    await rig.panel.post("/zones/1/restore")
    await rig.panel.post("/zones/2/restore")
    restores = await wait_for(lambda: _at_least(rig.events("zone.restore"), 2), timeout=20, what="both restores")
    by_zone = {e["place"]["zone"]: e for e in await rig.events("zone.alarm")}
    assert sorted(by_zone) == ["east", "north"] and len(await rig.events("zone.alarm")) == 2, by_zone
    assert by_zone["north"]["id"] == alarms[0]["id"]
    assert {r["data"]["incident"] for r in restores} == {e["data"]["incident"] for e in by_zone.values()}
    await wait_for(lambda: rig.outbox() == 0, timeout=10, what="the outbox emptied by the portal's acks")
    health = await rig.portal.health()
    gw = next(g for g in health["gateways"] if g["gateway"] == GW)
    assert health["rejections"].get("seq-conflict", 0) == 0, health
    assert gw["contiguous_seq"] == gw["last_seq"] > alarms[0]["seq"], gw  # every seq once, none missing


async def _at_least(got: Any, n: int) -> Any:
    items = await got
    return items if len(items) >= n else None
