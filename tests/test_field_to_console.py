"""Nothing the field says is swallowed: one test per rule of docs/events.md ("From the field to the console"),
each through the real gateway process, a real Mosquitto and the portal's store and console API.

The portal runs in-process on the test's loop (a real aiohttp server and MQTT client) with a guard signed in;
the gateway and the firmware stubs (a perimeter panel on Modbus TCP, an indoor panel on a pseudo-terminal) are
processes of their own. Each test plays what the field does to us: a panel account nobody configured, a panel
that resends after a guard cleared its alarm, a line that garbles a fire, an input no zone uses, a guard who
bypasses a fire zone, a panel unreachable while a fence is cut, a gateway whose SD card was replaced, a portal
that was never told about the gateway, a full disk.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from tests import procs
from tests.portal_support import Portal, add_user, portal_public_key, running_portal, sign_in, wait_for, write_config
from tests.stubs import run_stub
from tests.test_disk_full import _fill, _mount_tmpfs, _umount
from tests.test_e2e_alarms import GW, SITE, Site

pytestmark = pytest.mark.timeout(180)

GUARD, GUARD_PW = "guard1", "correct horse battery staple"


def gateway_yaml(
    folder: Path,
    broker: MosquittoProcess,
    site: Site | None = None,
    *,
    perimeter: Any = None,
    indoor: Any = None,
    extra: str = "",
) -> Path:
    """Zone 1-2 fences, zone 3 a boiler-room smoke detector (fire, 24 hours) on the perimeter panel; zones 4-8
    wired to nothing the config names. One indoor panel, account 1234, on a Contact ID line. With a site, the
    gateway takes the commands its portal signs (arm, disarm, bypass)."""
    perimeter = perimeter or site.perimeter  # type: ignore[union-attr]
    indoor = indoor or site.indoor  # type: ignore[union-attr]
    host, port = perimeter.endpoint()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gateway.yaml"
    path.write_text(
        f"""
site: {SITE}
gateway: {GW}
data_dir: data
mqtt: {{host: 127.0.0.1, port: {broker.port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}
uplink: {{resend_after_s: 1.0, resend_max_s: 2.0}}
local_api: {{enabled: false}}
alarm: {{repeat_interval_s: 1}}
buses:
  - {{name: fence, kind: modbus-tcp, host: {host}, port: {port}, timeout_ms: 300, offline_after_misses: 2}}
devices:
  - {{name: panel-1, profile: perimeter-panel-8, bus: fence, unit: 1, poll_ms: 100}}
zone_groups:
  - {{name: perimeter, label: 周界}}
zones:
  - {{name: north-fence, device: panel-1, point: zone1_alarm, group: perimeter, label: 北围墙,
      aux: {{tamper: zone1_tamper, cut: zone1_cut}}}}
  - {{name: east-fence, device: panel-1, point: zone2_alarm, group: perimeter, label: 东围墙, restore_ms: 2000}}
  - {{name: boiler-smoke, device: panel-1, point: zone3_alarm, type: fire, group: perimeter, label: 锅炉房烟感}}
contact_id_lines:
  - {{name: cid-1, serial: {indoor.serial}, mode: panel}}
indoor_panels:
  - {{name: flat-3-1-101, account: "1234", place: {{building: "3", unit: "1", house: "101"}}, test_interval_s: null}}
{_access(site)}{extra}""",
        encoding="utf-8",
    )
    return path


def _access(site: Site | None) -> str:
    if site is None:
        return ""
    key = portal_public_key(site.portal)
    return f"access:\n  public_keys: [{key}]\n"


async def board(p: Portal) -> list[dict[str, Any]]:
    """The open incidents as the guard's board shows them."""
    r = await p.client.get("/api/board")
    assert r.status == 200, await r.text()
    return list((await r.json())["incidents"])


async def arrived(
    site: Site,
    type_: str,
    *,
    n: int = 1,
    timeout: float = 20.0,
    where: Callable[[dict[str, Any]], bool] = lambda e: True,
) -> list[dict[str, Any]]:
    """At least ``n`` events of ``type_`` (matching ``where``) in the portal's store."""

    async def got() -> list[dict[str, Any]] | None:
        evs = [e for e in await site.events(type_) if where(e)]
        return evs if len(evs) >= n else None

    return await wait_for(got, timeout=timeout, what=f"{n} x {type_} at the portal")


async def result(site: Site, command: str, timeout: float = 20.0) -> dict[str, Any]:
    got = await arrived(site, "command.result", timeout=timeout, where=lambda e: e["data"]["command"] == command)
    return dict(got[-1]["data"])


async def start_gateway(cfg: Path, logs: Path) -> procs.Child:
    return await asyncio.to_thread(lambda: procs.gateway(cfg, logs).start())


@pytest.fixture
async def field(tmp_path: Path, broker: MosquittoProcess) -> AsyncIterator[Site]:
    async with running_portal(write_config(tmp_path / "portal", broker, gateways=[(SITE, GW)])) as portal:
        await add_user(portal, GUARD, "guard", GUARD_PW)
        assert (await sign_in(portal, GUARD, GUARD_PW)).status == 303
        async with (
            run_stub("firmware_stubs.perimeter_panel", "--tcp", "127.0.0.1:0", "--zones", "8") as perimeter,
            run_stub("firmware_stubs.indoor_panel", "--pty", "--account", "1234", "--ack-timeout", "0.5") as indoor,
        ):
            site = Site(portal, perimeter, indoor, None, broker)  # type: ignore[arg-type]
            site.gateway = await start_gateway(gateway_yaml(tmp_path / "gw", broker, site), tmp_path / "logs")
            try:
                # online (its status comes after it subscribed to its commands), and the panel read once
                await wait_for(lambda: _online(portal), timeout=20, what="the gateway online at the portal")
                await wait_for(lambda: polled_since(perimeter, 0.0), what="the panel polled")
                yield site
            finally:
                await asyncio.to_thread(site.gateway.stop)


# ---------------------------------------------------------------- Contact ID lines


async def test_every_report_of_an_unknown_account_reaches_the_console_grouped_by_account(field: Site) -> None:
    """Item 6: the panel nobody configured. Its burglary, its restore and, later, its FIRE all reach the console
    with code and zone; the account is a fault to fix, shown with the account's incidents."""
    await field.indoor.post("/event", {"account": "9999", "code": 130, "zone": 3})
    await field.indoor.post("/event", {"account": "9999", "code": 130, "zone": 3, "qualifier": "restore"})
    (burglary,) = await arrived(field, "panel.alarm")
    await arrived(field, "panel.restore")
    await field.indoor.post("/event", {"account": "9999", "code": 110, "zone": 1})
    fire = (await arrived(field, "panel.alarm", where=lambda e: e["data"]["code"] == 110))[0]
    for ev, code, zone in ((burglary, 130, 3), (fire, 110, 1)):
        assert (ev["data"]["account"], ev["data"]["code"], ev["data"]["zone"]) == ("9999", code, zone)
        assert ev["data"]["unknown_account"] is True and ev["place"] == {"site": SITE}
    assert fire["priority"] == wire.Priority.FIRE
    (fault,) = await arrived(field, "panel.unknown_account")
    assert (fault["data"]["account"], fault["priority"]) == ("9999", wire.Priority.FAULT)
    # The board: the fire on top, and every incident of the account says which account it is. The board opens an
    # incident after its event is stored: wait for both incidents there, not only for the events in the store.
    incidents = await wait_for(lambda: _with_fire(board(field.portal)), what="the fault and the fire on the board")
    mine = [i for i in incidents if i["data"].get("account") == "9999"]
    assert {i["type"] for i in mine} == {"panel.alarm", "panel.unknown_account"}
    assert incidents[0]["type"] == "panel.alarm" and incidents[0]["data"]["code"] == 110
    assert {i["where"]["zh-CN"] for i in mine} == {"未登记主机 用户号 9999"}
    assert {i["where"]["en"] for i in mine} == {"Unregistered panel, account 9999"}
    # A configured panel's reports are what they were.
    await field.indoor.post("/alarm/panic", {"zone": 4})
    panic = await arrived(field, "panel.alarm", where=lambda e: e["data"]["account"] == "1234")
    assert panic[0]["place"]["house"] == "101" and "unknown_account" not in panic[0]["data"]


async def _with(incidents: Awaitable[list[dict[str, Any]]], type_: str) -> list[dict[str, Any]] | None:
    got = await incidents
    return got if any(i["type"] == type_ for i in got) else None


async def _with_fire(incidents: Awaitable[list[dict[str, Any]]]) -> list[dict[str, Any]] | None:
    got = await _with(incidents, "panel.unknown_account")
    return got if got and any(i["data"].get("code") == 110 for i in got) else None


async def test_a_resent_report_after_a_guard_cleared_its_incident_rings_again(field: Site) -> None:
    """The panel sends the same FIRE again within the line's duplicate window (its ACK was lost, or the fire
    came back) after a guard cleared the first: the gateway raises it again rather than drop it as a duplicate."""
    await field.indoor.post("/alarm/fire", {"zone": 2})
    (first,) = await arrived(field, "panel.alarm")
    await field.command("clear", incident=first["data"]["incident"])
    await arrived(field, "panel.restore", where=lambda e: e["data"]["how"] == "cleared")
    await field.indoor.post("/alarm/fire", {"zone": 2})
    both = await arrived(field, "panel.alarm", n=2)
    assert len({e["data"]["incident"] for e in both}) == 2 and {e["priority"] for e in both} == {wire.Priority.FIRE}


async def test_a_fire_that_never_arrives_intact_is_a_fault_on_the_console(field: Site) -> None:
    """Every transmission of the FIRE is damaged on the line: the panel gives up after its retries. What was
    lost is said: an unreadable-messages fault on the line, on the board."""
    await field.indoor.post("/corrupt-next", {"count": 4})
    await field.indoor.post("/alarm/fire", {"zone": 6})
    (fault,) = await arrived(field, "line.unreadable")
    assert (fault["data"]["line"], fault["data"]["reason"], fault["priority"]) == (
        "cid-1",
        "checksum",
        wire.Priority.FAULT,
    )
    await wait_for(lambda: _with(board(field.portal), "line.unreadable"), what="the fault on the board")
    st = await field.indoor.state()
    assert st["given_up"] == 1 and st["corrupted_transmissions"] == 4


async def test_a_code_the_table_does_not_know_is_an_alarm_by_its_range(field: Site) -> None:
    await field.indoor.post("/event", {"code": 199, "zone": 5})
    (alarm,) = await arrived(field, "panel.alarm")
    assert (alarm["data"]["code"], alarm["priority"]) == (199, wire.Priority.INTRUSION)


# ---------------------------------------------------------------- Modbus inputs


async def test_an_alarm_input_no_zone_uses_is_an_incident(field: Site) -> None:
    """Zone 5 of the panel is wired to nothing the config names, and the panel's own enclosure tamper is in no
    zone: both are heard, as a fault and a tamper, and restored."""
    await field.perimeter.post("/zones/5/trip")
    await field.perimeter.post("/panel/tamper", {"active": True})
    got = await arrived(field, "device.unmapped_input", n=2)
    by_point = {e["data"]["point"]: e for e in got}
    assert by_point["zone5_alarm"]["priority"] == wire.Priority.FAULT
    assert by_point["panel_tamper"]["priority"] == wire.Priority.TAMPER
    assert {e["device"] for e in got} == {"panel-1"}
    await field.perimeter.post("/zones/5/restore")
    (restored,) = await arrived(field, "device.unmapped_input_restore")
    assert restored["data"]["point"] == "zone5_alarm"


async def test_a_fire_zone_alarms_disarmed_and_cannot_be_bypassed(field: Site) -> None:
    await field.command("bypass", zone="boiler-smoke")
    answer = await result(field, "bypass")
    assert answer["ok"] is False and "24-hour" in answer["detail"]
    await field.perimeter.post("/zones/3/trip")  # the perimeter group is disarmed
    (alarm,) = await arrived(field, "zone.alarm")
    assert (alarm["data"]["zone"], alarm["data"]["cause"], alarm["priority"]) == (
        "boiler-smoke",
        "24h",
        wire.Priority.FIRE,
    )


async def test_repeats_fold_into_the_open_incident_and_a_trip_after_its_restore_opens_a_new_one(field: Site) -> None:
    await field.command("arm", group="perimeter")
    await arrived(field, "group.armed")
    await field.perimeter.post("/zones/2/trip")
    (alarm,) = await arrived(field, "zone.alarm")
    restored_at = (await field.perimeter.post("/zones/2/restore"))["mono"]
    await wait_for(lambda: polled_since(field.perimeter, restored_at), what="a poll that sees the zone quiet")
    await field.perimeter.post("/zones/2/trip")  # within restore_ms: the same incident
    (repeat,) = await arrived(field, "zone.alarm_repeat")
    assert (repeat["data"]["incident"], repeat["data"]["count"]) == (alarm["data"]["incident"], 2)
    await field.perimeter.post("/zones/2/restore")
    (restore,) = await arrived(field, "zone.restore")
    assert (restore["data"]["incident"], restore["data"]["count"]) == (alarm["data"]["incident"], 2)
    await field.perimeter.post("/zones/2/trip")
    both = await arrived(field, "zone.alarm", n=2)
    assert len({e["data"]["incident"] for e in both}) == 2


async def test_a_fence_cut_while_its_panel_was_unreachable_alarms_when_it_answers(field: Site) -> None:
    await field.command("arm", group="perimeter")
    await arrived(field, "group.armed")
    await field.perimeter.post("/silent", {"on": True})
    (offline,) = await arrived(field, "device.offline")
    assert (offline["device"], offline["priority"]) == ("panel-1", wire.Priority.FAULT)
    await field.perimeter.post("/zones/1/trip")
    await field.perimeter.post("/zones/1/cut")
    await field.perimeter.post("/silent", {"on": False})
    await arrived(field, "device.online")
    (alarm,) = await arrived(field, "zone.alarm")
    (cut,) = await arrived(field, "zone.tamper")
    assert alarm["data"]["zone"] == cut["data"]["zone"] == "north-fence"


async def polled_since(stub: Any, mono: float) -> bool:
    """The panel answered an input poll after ``mono`` (its inputs are live: a poll must see each state)."""
    recent = (await stub.state(recent=True))["panels"][0]["requests"]["recent"]
    return any(r["function"] == 2 and r["mono"] > mono for r in recent)


# ---------------------------------------------------------------- the gateway and the portal


async def test_a_gateway_whose_store_was_replaced_is_still_heard(field: Site, tmp_path: Path) -> None:
    """A new SD card: the gateway's numbering starts at 1 again, numbers the portal already holds. Its alarms
    are stored and shown all the same."""
    await field.perimeter.post("/zones/3/trip")
    (first,) = await arrived(field, "zone.alarm")
    await field.perimeter.post("/zones/3/restore")
    await arrived(field, "zone.restore")
    await asyncio.to_thread(field.gateway.stop)
    shutil.rmtree(tmp_path / "gw" / "data")
    field.gateway = await start_gateway(tmp_path / "gw" / "gateway.yaml", tmp_path / "logs")
    await field.perimeter.post("/zones/3/trip")
    (second,) = [e for e in await arrived(field, "zone.alarm", n=2) if e["id"] != first["id"]]
    assert second["seq"] < 0  # stored under a number of its own
    await wait_for(lambda: _with(board(field.portal), "zone.alarm"), what="the alarm on the board")
    assert (await field.portal.health())["rejections"].get("seq-conflict", 0) >= 1


async def test_a_gateway_the_portal_was_not_told_of_is_heard_once_added(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """The installer forgot the gateway in the portal's list: its alarm is refused and counted, never
    acknowledged, so the gateway keeps it; once the gateway is added (and the portal restarted), it arrives.
    The portal is a process of its own here, restarted as an administrator would."""
    db = tmp_path / "portal" / "data" / "portal.db"
    async with (
        run_stub("firmware_stubs.perimeter_panel", "--tcp", "127.0.0.1:0", "--zones", "8") as perimeter,
        run_stub("firmware_stubs.indoor_panel", "--pty", "--account", "1234") as indoor,
    ):
        gateway = await start_gateway(
            gateway_yaml(tmp_path / "gw", broker, perimeter=perimeter, indoor=indoor), tmp_path / "logs"
        )
        try:
            cfg = write_config(tmp_path / "portal", broker, gateways=[(SITE, "other")])
            portal = await asyncio.to_thread(lambda: procs.portal(cfg, tmp_path / "logs", "portal-1").start())
            try:
                await perimeter.post("/zones/3/trip")
                await wait_for(
                    lambda: procs.read_rows(
                        db, "SELECT count FROM rejections WHERE reason = ? AND count > 0", "unknown-gateway"
                    ),
                    timeout=20,
                    what="the unknown gateway counted",
                )
                assert procs.read_rows(db, "SELECT id FROM events WHERE type = 'zone.alarm'") == []
            finally:
                await asyncio.to_thread(portal.stop)
            cfg = write_config(tmp_path / "portal", broker, gateways=[(SITE, "other"), (SITE, GW)])
            portal = await asyncio.to_thread(lambda: procs.portal(cfg, tmp_path / "logs", "portal-2").start())
            try:
                rows = await wait_for(
                    lambda: procs.read_rows(db, "SELECT gateway, data FROM events WHERE type = 'zone.alarm'"),
                    timeout=30,
                    what="the alarm once the gateway was added",
                )
                assert rows[0][0] == GW and '"boiler-smoke"' in rows[0][1]
            finally:
                await asyncio.to_thread(portal.stop)
        finally:
            await asyncio.to_thread(gateway.stop)


async def _typed(p: Portal, type_: str) -> list[dict[str, Any]]:
    return await p.events(type=type_)  # by type: a routine flood pushes older events off the newest page


async def test_with_the_disk_full_and_memory_full_of_routine_events_an_alarm_is_still_taken(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """The SD card is full and the store's memory ring is full of routine events (a load generator keeps
    producing them for six seconds): routine ones are refused, the fire is taken, and reaches the console once
    space returns. The fault's record is not urgent: it reaches the portal behind the routine flood the generator
    left in the outbox, so the generator stops soon enough for a loaded machine to drain that in the time allowed."""
    data = tmp_path / "gw" / "data"
    _mount_tmpfs(data)
    try:
        async with (
            running_portal(write_config(tmp_path / "portal", broker, gateways=[(SITE, GW)])) as p,
            run_stub("firmware_stubs.perimeter_panel", "--tcp", "127.0.0.1:0", "--zones", "8") as perimeter,
            run_stub("firmware_stubs.indoor_panel", "--pty", "--account", "1234") as indoor,
        ):
            await add_user(p, GUARD, "guard", GUARD_PW)
            assert (await sign_in(p, GUARD, GUARD_PW)).status == 303
            extra = "store: {ring_max: 100}\nloadgen: {count: 12000, rate: 2000, start_after_s: 3}\n"
            cfg = gateway_yaml(tmp_path / "gw", broker, perimeter=perimeter, indoor=indoor, extra=extra)
            gateway = await start_gateway(cfg, tmp_path / "logs")
            try:
                filler = _fill(data)  # before the load generator starts
                await wait_for(lambda: _fault(p), timeout=30, what="the storage fault")
                await asyncio.sleep(1.0)  # the generator has filled the ring and is being refused
                await perimeter.post("/zones/3/trip")
                await asyncio.sleep(1.0)
                assert await _typed(p, "zone.alarm") == []  # waiting in memory: nothing can be written
                filler.unlink()
                (alarm,) = await wait_for(lambda: _typed(p, "zone.alarm"), timeout=60, what="the fire")
                assert alarm["data"]["zone"] == "boiler-smoke"
                (record,) = await wait_for(lambda: _typed(p, "store.fault"), timeout=60, what="the fault record")
                assert record["data"]["dropped"] > 0  # routine events were refused meanwhile
                # Each refusal is counted, not logged with a traceback (thousands a second on a full SD card).
                assert "never retrieved" not in (tmp_path / "logs" / "gateway.log").read_text(encoding="utf-8")
            finally:
                await asyncio.to_thread(gateway.stop)
    finally:
        _umount(data)


async def _online(p: Portal) -> bool:
    return any(g["status"] == "online" for g in (await p.health())["gateways"])


async def _fault(p: Portal) -> bool:
    return bool((await p.health())["gateways"][0].get("fault"))
