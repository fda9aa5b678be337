"""Helpers for the door, visitor and access-log tests: an estate with doors, a guard session, door events as
a gateway sends them, and reading the console socket."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
from ulid import ULID

from gateway import wire
from portal.estate import registry as reg
from tests.portal_support import (
    GATEWAY,
    SITE,
    Portal,
    batch_payload,
    next_ack,
    open_portal_command,
    page_csrf,
    sign_in,
)
from tests.registry_support import admin_session, estate_csv, import_csv
from tests.stubs import Stub

GUARD, GUARD_PW = "guard1", "guard-password-0001"
EVENTS_TOPIC = wire.topic(SITE, GATEWAY, "events")
CMD_TOPIC = wire.topic(SITE, GATEWAY, "cmd")
#: (door, building, unit, gate, label) as the installer registered them
DOORS = [
    ("north-gate", None, None, True, "北门"),
    ("b3u2", "3", "2", False, "3幢2单元门"),
    ("b3u1", "3", "1", False, "3幢1单元门"),
]


async def estate_with_doors(p: Portal) -> None:
    """The registry's estate (tests.registry_support) and three doors on gateway s1/gw1; signed in as admin."""
    csrf = await admin_session(p)
    status, body = await import_csv(p, csrf, estate_csv())
    assert status == 200, body

    def add(c: Any) -> None:
        for door, building, unit, gate, label in DOORS:
            reg.add_door(c, SITE, GATEWAY, door, building, unit, gate, label)

    await p.services.store.run_write(add)


async def guard_session(p: Portal, user: str = GUARD, password: str = GUARD_PW, role: str = "guard") -> str:
    """Create a staff user, sign ``p.client`` in as them; the session's CSRF token (also kept in p.csrf)."""
    await p.services.auth.create_user(user, role, password, must_change=False)
    r = await sign_in(p, user, password)
    assert r.status == 303, r.status
    p.csrf = await page_csrf(p, "/doors")
    return p.csrf


def door_event(
    seq: int,
    etype: str,
    door: str,
    data: dict[str, Any] | None = None,
    *,
    ts: datetime | None = None,
    building: str | None = None,
    unit: str | None = None,
    priority: int = wire.Priority.ROUTINE,
    point: str | None = None,
) -> wire.Event:
    ts = ts or datetime.now(UTC)
    place: dict[str, str] = {"door": door}
    if building:
        place["building"] = building
    if unit:
        place["unit"] = unit
    return wire.Event(
        id=str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type=etype,
        device=f"ctl-{door}",
        place=wire.Place(site=SITE, **place),
        point=point,
        priority=priority,
        data={"door": door, **(data or {})},
    )


def result_event(seq: int, command_id: str, ok: bool, door: str, detail: str = "") -> wire.Event:
    ts = datetime.now(UTC)
    return wire.Event(
        id=str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type="command.result",
        device="gateway",
        place=wire.Place(site=SITE, door=door),
        data={"command_id": command_id, "command": "unlock", "ok": ok, "detail": detail, "door": door},
    )


async def publish(gw: aiomqtt.Client, events: list[wire.Event]) -> None:
    """Publish one batch as the gateway and wait for the portal's acknowledgement (stored and committed)."""
    await gw.publish(EVENTS_TOPIC, batch_payload(events), qos=1)
    ack = await next_ack(gw)
    assert sorted(ack.seqs) == sorted(e.seq for e in events), ack


async def next_command(p: Portal, gw: aiomqtt.Client, timeout: float = 10.0) -> wire.Command:
    """The next command the portal ``p`` sends the gateway, verified as the gateway verifies it."""
    async with asyncio.timeout(timeout):
        async for m in gw.messages:
            if str(m.topic) == CMD_TOPIC:
                return open_portal_command(p, m.payload)
    raise AssertionError("message stream ended")


async def ws_wait(
    ws: aiohttp.ClientWebSocketResponse, kind: str, match: dict[str, Any] | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """The next socket message of ``kind`` whose payload (``door`` or ``command``) has every ``match`` item."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            m = json.loads(msg.data)
            if m.get("kind") != kind:
                continue
            body = m.get("door") or m.get("command") or {}
            if all(body.get(k) == v for k, v in (match or {}).items()):
                return dict(body)


async def api_post(p: Portal, path: str, body: Any) -> aiohttp.ClientResponse:
    return await p.client.post(path, json=body, headers={"Origin": p.origin, "X-CSRF-Token": p.csrf})


def door_gateway_config(
    folder: Path,
    broker_port: int,
    door: Stub,
    reader: Stub,
    *,
    public_key: str | Path,
    door_name: str = "b3-u2",
    reader_name: str = "qr-b3-u2",
    site: str = SITE,
    gateway: str = GATEWAY,
    held_open_s: int = 5,
    reader_misses: int = 2,
    gate: bool = False,
    mqtt_extra: str = "",
    access_extra: str = "",
) -> Path:
    """A gateway config with one door on the door-controller stub, the unit door of building 3, unit 2 (``gate``:
    a site gate instead), and its QR reader on the reader stub's pty; the portal's public key only.
    ``mqtt_extra`` and ``access_extra`` are more keys of those sections (``username: ...``)."""
    folder.mkdir(parents=True, exist_ok=True)
    host, port = door.endpoint()
    path = folder / "gateway.yaml"
    place = "gate: true" if gate else 'place: {building: "3", unit: "2"}'
    mqtt_more = f", {mqtt_extra}" if mqtt_extra else ""
    path.write_text(
        f"""
site: {site}
gateway: {gateway}
data_dir: data
mqtt: {{host: 127.0.0.1, port: {broker_port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0{mqtt_more}}}
uplink: {{resend_after_s: 1.0, resend_max_s: 2.0}}
local_api: {{enabled: false}}
buses:
  - {{name: doors, kind: modbus-tcp, host: {host}, port: {port}, timeout_ms: 300}}
devices:
  - {{name: ctl-3-2, profile: door-controller, bus: doors, unit: 1, poll_ms: 100}}
doors:
  - {{name: {door_name}, device: ctl-3-2, relay: lock_relay, contact: door_open, exit_button: exit_button,
      lock_feedback: lock_released, tamper: tamper, {place},
      unlock_ms: 1500, open_grace_ms: 1000, held_open_s: {held_open_s}}}
readers:
  - {{name: {reader_name}, serial: {reader.serial}, door: {door_name}, heartbeat_s: 0.5,
      offline_after_misses: {reader_misses}, repeat_ignore_ms: 0}}
access:
  public_keys: [{public_key}]
  burst_count: 5
  burst_window_s: 60
{access_extra}
""",
        encoding="utf-8",
    )
    return path
