"""The alarm board's incident model and API: pairing and idempotency on a real SQLite store, the workflow
with every step recorded, 409 on conflicts, escalation on an injected monotonic clock, residents with
masked phones, and end to end with a real Mosquitto: a gateway's batch → incident on the board JSON and
the WebSocket; arm command → the cmd topic → a command.result back → shown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ulid import ULID

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from portal.alarms import incidents as alarms
from portal.alarms.board import BOARD, AlarmBoard
from portal.app import Options
from portal.config import ConfigError, MapBuilding, MapDoor, MapZone, SiteMapConfig, parse
from portal.estate.sitemap import map_state, render_svg
from portal.store import Store, StoreBatch
from portal.web import i18n
from tests.portal_support import (
    GATEWAY,
    SITE,
    Portal,
    add_user,
    batch_payload,
    csrf_of,
    mqtt,
    open_portal_command,
    running_portal,
    sign_in,
    store_key,
    wait_for,
    write_config,
)

PW = "guard-password-0001"
EVENTS_TOPIC = wire.topic(SITE, GATEWAY, "events")
T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)


def ev(
    seq: int,
    type_: str,
    *,
    incident: str | None = None,
    prio: int = wire.Priority.INTRUSION,
    data: dict[str, Any] | None = None,
    place: dict[str, str] | None = None,
    ts: datetime | None = None,
    device: str = "fence-1",
    point: str | None = "in1",
    site: str = SITE,
) -> wire.Event:
    ts = ts or T0 + timedelta(seconds=seq)
    d = dict(data or {})
    if incident is not None:
        d.setdefault("incident", incident)
        d.setdefault("count", 1)
    return wire.Event(
        id=str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type=type_,
        device=device,
        place=wire.Place(site=site, **(place if place is not None else {"zone": "P1"})),
        point=point,
        priority=prio,
        data=d,
    )


ZONE = {
    "zone": "P1",
    "zone_type": "perimeter",
    "kind": "intrusion",
    "cause": "instant",
    "group": "perimeter",
    "label": "北围栏",
}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "portal.db", key=store_key(tmp_path / "portal.db"))
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def put(store: Store, *events: wire.Event) -> alarms.FeedResult:
    await store.write(StoreBatch(wire.batch_events(SITE, GATEWAY, list(events))))
    res: alarms.FeedResult = await store.write(alarms.FeedIncidents(now="2026-03-01T08:00:30.000000Z"))
    return res


async def incidents(store: Store) -> list[dict[str, Any]]:
    return await store.read(lambda c: [alarms.incident_dict(r) for r in c.execute("SELECT * FROM incidents")])


async def log_of(store: Store, iid: int) -> list[dict[str, Any]]:
    return await store.read(lambda c: alarms.incident_log(c, iid))


# ---------------------------------------------------------------- the model on a real store


async def test_alarm_repeats_and_restore_make_one_incident_and_resent_events_change_nothing(store: Store) -> None:
    alarm = ev(1, "zone.alarm", incident="I-1", data=ZONE)
    repeat = ev(2, "zone.alarm_repeat", incident="I-1", data={**ZONE, "count": 3})
    res = await put(store, alarm, repeat)
    assert len(res.incidents) == 1 and res.new_ids == [res.incidents[0]["id"]]
    [inc] = await incidents(store)
    assert (inc["state"], inc["count"], inc["kind"], inc["type"], inc["engine_incident"]) == (
        "new",
        3,
        "intrusion",
        "zone.alarm",
        "I-1",
    )
    assert inc["key"] == f"{SITE}/{GATEWAY}/I-1" and inc["restored_at"] is None
    assert inc["where"]["zh-CN"] == "北围栏" and inc["where"]["en"] == "北围栏"  # the label names the zone
    assert [e["action"] for e in await log_of(store, inc["id"])] == ["alarm", "repeat"]

    # The gateway re-sends the same batch (no ack arrived): nothing changes, nothing is logged twice.
    again = await put(store, alarm, repeat)
    assert again.incidents == []
    [same] = await incidents(store)
    assert same["version"] == inc["version"] and same["count"] == 3
    assert await store.run_write(lambda c: alarms.apply_event(c, {**_row(alarm)})) is None
    assert len(await log_of(store, inc["id"])) == 2

    # The restore marks it restored but it stays open (and unacknowledged: it still rings).
    restore = ev(3, "zone.restore", incident="I-1", data={**ZONE, "count": 4, "how": "restored"})
    await put(store, restore)
    [after] = await incidents(store)
    assert after["state"] == "new" and after["restored_at"] == "2026-03-01T08:00:03.000000Z"
    assert after["restore_how"] == "restored" and after["count"] == 4
    log = await log_of(store, inc["id"])
    assert [e["action"] for e in log] == ["alarm", "repeat", "restore"]
    assert [e["event_id"] for e in log] == [alarm.id, repeat.id, restore.id]
    assert all(e["actor"] == f"gateway:{GATEWAY}" for e in log)


def _row(e: wire.Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "site": SITE,
        "gateway": GATEWAY,
        "seq": e.seq,
        "ts": e.ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "type": e.type,
        "device": e.device,
        "point": e.point,
        "priority": e.priority,
        "place": {"site": SITE, "zone": "P1"},
        "data": dict(e.data),
    }


async def test_unpaired_alarms_each_open_an_incident_and_routine_events_open_none(store: Store) -> None:
    unknown1 = ev(
        1,
        "panel.unknown_account",
        prio=wire.Priority.FAULT,
        data={"account": "9999", "code": 130},
        place={},
        device="cid-rx",
    )
    unknown2 = ev(
        2,
        "panel.unknown_account",
        prio=wire.Priority.FAULT,
        data={"account": "8888", "code": 130},
        place={},
        device="cid-rx",
    )
    routine = [
        ev(3, "house.problem", prio=wire.Priority.FAULT, data={"work_item": 1}, place={"building": "1"}),
        ev(4, "access.denied", prio=0, data={"reason": "expired"}, place={"door": "D1"}),
        ev(5, "panel.event", prio=wire.Priority.FAULT, data={"code": 624}, place={"house": "301"}),
        ev(
            6,
            "group.armed",
            prio=0,
            data={"group": "perimeter", "label": "周界", "mode": "away", "by": "bob", "source": "command"},
            place={},
        ),
    ]
    door = {"door": "D1", "building": "3", "unit": "1"}
    tamper = ev(7, "door.tamper", prio=wire.Priority.TAMPER, place=door, device="door-ctl", point="tamper")
    tamper_back = ev(8, "door.tamper_restore", prio=wire.Priority.TAMPER, place=door, device="door-ctl", point="tamper")
    blocked = ev(
        9,
        "access.denied",
        prio=wire.Priority.TAMPER,
        data={"reason": "blocked"},
        place=door,
        device="reader-1",
        point=None,
    )
    res = await put(store, unknown1, unknown2, *routine, tamper, tamper_back, blocked)
    incs = await incidents(store)
    assert [(i["type"], i["kind"]) for i in incs] == [
        ("panel.unknown_account", "fault"),
        ("panel.unknown_account", "fault"),
        ("door.tamper", "tamper"),
        ("access.denied", "intrusion"),
    ]
    assert incs[3]["restored_at"] is None
    assert incs[0]["key"] == f"ev:{unknown1.id}" and incs[0]["engine_incident"] is None
    assert incs[2]["restored_at"] is not None  # the unpaired restore found its alarm by device, point and place
    assert [g["group"] for g in res.groups] == ["perimeter"]
    groups = await store.read(alarms.arm_groups)
    assert [(g["group"], g["state"], g["mode"], g["by"]) for g in groups] == [("perimeter", "armed", "away", "bob")]


async def test_a_restore_stored_before_its_alarm_still_makes_one_incident(store: Store) -> None:
    # A gap filled late: seq 2 (the restore) is stored before seq 1 (the alarm).
    restore = ev(
        2,
        "panel.restore",
        incident="C-9",
        prio=wire.Priority.FIRE,
        data={"kind": "fire", "name_zh": "烟雾火警", "name_en": "Smoke", "code": 111, "how": "restored"},
        place={"building": "5", "unit": "1", "house": "1201"},
    )
    alarm = ev(
        1,
        "panel.alarm",
        incident="C-9",
        prio=wire.Priority.FIRE,
        data={"kind": "fire", "name_zh": "烟雾火警", "name_en": "Smoke", "code": 111},
        place={"building": "5", "unit": "1", "house": "1201"},
    )
    await put(store, restore)
    await put(store, alarm)
    [inc] = await incidents(store)
    assert (inc["kind"], inc["type"], inc["state"], inc["first_event"]) == ("fire", "panel.alarm", "new", alarm.id)
    assert inc["opened_at"] == "2026-03-01T08:00:01.000000Z" and inc["restored_at"] is not None
    assert inc["title"] == {"zh-CN": "烟雾火警", "en": "Smoke"}
    assert inc["where"]["zh-CN"] == "5幢 1单元 1201室"
    assert [e["action"] for e in await log_of(store, inc["id"])] == ["restore", "alarm"]


async def test_a_stuck_bus_is_a_fault_incident_of_its_own_closed_by_its_restore(store: Store) -> None:
    # As the gateway sends them (gateway/app.py, _bus_draft): two stuck buses are two incidents, and one moving
    # again restores only its own.
    def stalled(seq: int, bus: str, restore: bool = False) -> wire.Event:
        kind = "bus.stalled" + ("_restore" if restore else "")
        data: dict[str, Any] = {"bus": bus, "devices": [f"{bus}-1"]}
        data |= {"how": "restored"} if restore else {"silent_s": 61.2}
        return ev(
            seq,
            kind,
            incident=f"bus-{bus}-1",
            device="gateway",
            point=bus,
            prio=wire.Priority.FAULT,
            data=data,
            place={},
        )

    await put(store, stalled(1, "fence"), stalled(2, "indoor"))
    incs = sorted(await incidents(store), key=lambda i: i["id"])
    assert [(i["kind"], i["type"], i["restored_at"]) for i in incs] == [("fault", "bus.stalled", None)] * 2
    assert incs[0]["title"]["zh-CN"] == "总线轮询停滞，其设备未受监视"
    assert incs[0]["title"]["en"] == "Bus stuck: its devices are not watched"
    await put(store, stalled(3, "fence", restore=True))
    by_bus = {i["id"]: i for i in await incidents(store)}
    assert by_bus[incs[0]["id"]]["restored_at"] is not None and by_bus[incs[1]["id"]]["restored_at"] is None


async def test_the_workflow_records_every_step_with_who_and_when(store: Store) -> None:
    await put(store, ev(1, "zone.alarm", incident="I-1", data=ZONE))
    [inc] = await incidents(store)
    iid = inc["id"]
    steps = [
        ("ack", "guard1", {}),
        ("dispatch", "guard1", {"guard": "张三"}),
        ("on_scene", "zhangsan", {}),
        ("note", "guard1", {"text": "翻墙痕迹，已拍照"}),
        ("check", "guard1", {"step": 1}),
        ("check", "guard1", {"step": 1, "done": False}),
        ("check", "guard1", {"step": 0}),
        ("resolve", "guard1", {"cause": "false", "text": "树枝碰到围栏"}),
        ("close", "lead", {}),
    ]
    for n, (action, who, kw) in enumerate(steps):
        at = f"2026-03-01T08:0{n + 1}:00.000000Z"
        out = await store.write(alarms.IncidentAction(iid, action, who, now=at, steps_of=lambda k: 5, **kw))
        assert out["version"] > inc["version"]
        inc = out
    assert inc["state"] == "closed"
    assert (inc["owner"], inc["acknowledged_at"]) == ("guard1", "2026-03-01T08:01:00.000000Z")
    assert (inc["dispatched_to"], inc["dispatched_by"]) == ("张三", "guard1")
    assert inc["on_scene_at"] == "2026-03-01T08:03:00.000000Z"
    assert (inc["cause"], inc["resolved_by"], inc["closed_by"]) == ("false", "guard1", "lead")
    assert inc["closed_at"] == "2026-03-01T08:09:00.000000Z"
    assert inc["checks"] == {"0": {"by": "guard1", "at": "2026-03-01T08:07:00.000000Z"}}
    log = [(e["actor"], e["action"], e["detail"], e["at"]) for e in await log_of(store, iid)][1:]
    assert log == [
        ("guard1", "ack", "", "2026-03-01T08:01:00.000000Z"),
        ("guard1", "dispatch", "张三", "2026-03-01T08:02:00.000000Z"),
        ("zhangsan", "on_scene", "", "2026-03-01T08:03:00.000000Z"),
        ("guard1", "note", "翻墙痕迹，已拍照", "2026-03-01T08:04:00.000000Z"),
        ("guard1", "check", "1", "2026-03-01T08:05:00.000000Z"),
        ("guard1", "uncheck", "1", "2026-03-01T08:06:00.000000Z"),
        ("guard1", "check", "0", "2026-03-01T08:07:00.000000Z"),
        ("guard1", "resolve", "false · 树枝碰到围栏", "2026-03-01T08:08:00.000000Z"),
        ("lead", "close", "", "2026-03-01T08:09:00.000000Z"),
    ]


async def test_two_guards_sending_two_people_cannot_both_win(store: Store) -> None:
    """Two guards (at two consoles, or on two instances of a centre, behind one store lock) each send a responder,
    each having seen nobody sent: the second is told who was sent and by whom, not silently put in the first's place.
    Sending someone else having seen the first is a redirect, and goes through."""
    await put(store, ev(1, "zone.alarm", incident="I-1", data=ZONE))
    [inc] = await incidents(store)
    iid = inc["id"]
    await store.write(alarms.IncidentAction(iid, "ack", "guard1"))
    await store.write(alarms.IncidentAction(iid, "dispatch", "guard1", guard="王师傅", seen_guard=""))
    with pytest.raises(alarms.IncidentConflict) as lost:
        await store.write(alarms.IncidentAction(iid, "dispatch", "guard2", guard="李师傅", seen_guard=""))
    assert lost.value.incident["dispatched_to"] == "王师傅"
    assert lost.value.winner is not None and lost.value.winner["actor"] == "guard1"
    moved = await store.write(alarms.IncidentAction(iid, "dispatch", "guard2", guard="李师傅", seen_guard="王师傅"))
    assert (moved["dispatched_to"], moved["dispatched_by"]) == ("李师傅", "guard2")
    assert [e["action"] for e in await log_of(store, iid)] == ["alarm", "ack", "dispatch", "dispatch"]


async def test_actions_out_of_turn_conflict_and_bad_requests_are_refused(store: Store) -> None:
    await put(store, ev(1, "zone.alarm", incident="I-1", data=ZONE))
    [inc] = await incidents(store)
    iid = inc["id"]

    async def do(action: str, who: str = "guard1", **kw: Any) -> dict[str, Any]:
        out: dict[str, Any] = await store.write(alarms.IncidentAction(iid, action, who, steps_of=lambda k: 3, **kw))
        return out

    with pytest.raises(alarms.IncidentConflict):  # checklist before anyone took it
        await do("check", step=0)
    for action in ("dispatch", "on_scene", "resolve", "close"):
        with pytest.raises(alarms.IncidentConflict):
            await do(action, guard="x", cause="real")
    await do("ack")
    with pytest.raises(alarms.IncidentConflict) as e:
        await do("ack", "guard2")
    assert (e.value.incident["owner"], e.value.incident["state"]) == ("guard1", "acknowledged")
    for action, kw, key in (
        ("dispatch", {"guard": "  "}, "board.need_guard"),
        ("resolve", {"cause": "aliens"}, "board.need_cause"),
        ("note", {"text": "\x00\x01"}, "board.need_note"),
        ("check", {"step": 3}, "board.bad_step"),
        ("check", {"step": -1}, "board.bad_step"),
    ):
        with pytest.raises(alarms.IncidentError) as bad:
            await do(action, **kw)
        assert bad.value.key == key
    with pytest.raises(LookupError):
        await store.write(alarms.IncidentAction(iid + 100, "ack", "guard1"))
    await do("resolve", cause="test")
    await do("close")
    with pytest.raises(alarms.IncidentConflict):
        await do("note", text="too late")
    # Refused actions left no trace.
    assert [e["action"] for e in await log_of(store, iid)] == ["alarm", "ack", "resolve", "close"]


@pytest.mark.parametrize(
    ("etype", "data", "prio", "kind"),
    [
        ("zone.alarm", {"kind": "fire"}, 50, "fire"),
        ("zone.alarm", {"kind": "gas"}, 50, "gas"),
        ("zone.alarm", {"kind": "panic"}, 40, "panic"),
        ("zone.alarm", {"kind": "medical"}, 40, "medical"),
        ("zone.alarm", {"kind": "intrusion"}, 30, "intrusion"),
        ("zone.alarm", {"kind": "touch"}, 30, "intrusion"),
        ("zone.tamper", {"kind": "cut"}, 20, "fence_cut"),
        ("zone.tamper", {"kind": "short"}, 20, "fence_cut"),
        ("zone.tamper", {"kind": "tamper"}, 20, "tamper"),
        ("zone.fault", {"kind": "fault"}, 10, "fault"),
        ("panel.alarm", {"kind": "burglary"}, 30, "intrusion"),
        ("panel.alarm", {"kind": "duress"}, 40, "panic"),
        ("panel.alarm", {"kind": "co"}, 50, "fire"),
        ("panel.alarm", {"kind": "water"}, 10, "fault"),
        ("panel.tamper", {"kind": "tamper"}, 20, "tamper"),
        ("panel.trouble", {"kind": "ac_loss"}, 10, "fault"),
        ("panel.test_missed", {}, 10, "fault"),
        ("device.offline", {"reason": "timeout"}, 10, "fault"),
        ("house.sos", {"kind": "sos"}, 40, "panic"),
        ("door.forced", {}, 30, "intrusion"),
        ("door.held", {}, 20, "intrusion"),
        ("door.tamper", {}, 20, "tamper"),
        ("access.denied", {"reason": "blocked"}, 20, "intrusion"),
        ("door.scan_burst", {"count": 8}, 20, "intrusion"),
        ("reader.offline", {"reason": "heartbeat"}, 10, "fault"),
        ("command.rejected", {"reason": "bad-signature"}, 20, "tamper"),
        ("credentials.stale", {"incident": "i1", "count": 1}, 10, "fault"),
    ],
)
def test_alarm_kinds(etype: str, data: dict[str, Any], prio: int, kind: str) -> None:
    assert alarms.classify(etype, data, prio) == kind


@pytest.mark.parametrize(
    ("etype", "data", "prio", "alarm"),
    [
        # a forged command is an alarm; a broker's re-delivery of a real one is not; other command events never are
        ("command.rejected", {"reason": "unsigned"}, 20, True),
        ("command.rejected", {"reason": "replayed"}, 0, False),
        ("command.result", {"ok": False}, 20, False),
        # a stale revocation list: a fault incident until the restore
        ("credentials.stale", {"incident": "i1", "count": 1}, 10, True),
        ("credentials.stale_restore", {"incident": "i1", "count": 1, "how": "restored"}, 10, True),
    ],
)
def test_security_refusals_on_the_board(etype: str, data: dict[str, Any], prio: int, alarm: bool) -> None:
    assert alarms.is_alarm({"type": etype, "data": data, "priority": prio}) is alarm


def test_masked_phones_never_show_the_whole_number() -> None:
    assert alarms.mask_phone("13812345678") == "138****5678"
    assert alarms.mask_phone("+8613812345678") == "861******5678"
    assert alarms.mask_phone("02151234567") == "021****4567"
    assert alarms.mask_phone("12345") == "*2345"
    assert alarms.mask_phone("123") == "***"


# ---------------------------------------------------------------- through the portal


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def _guard_client(p: Portal, name: str) -> tuple[aiohttp.ClientSession, str]:
    """A second browser: its own cookie jar, signed in as ``name``; returns it and its CSRF token."""
    c = aiohttp.ClientSession(base_url=p.origin, cookie_jar=aiohttp.CookieJar(unsafe=True))
    page = await c.get("/login")
    form = {"user": name, "password": PW, "next": "/board", "csrf": csrf_of(await page.text())}
    r = await c.post("/login", data=form, headers={"Origin": p.origin}, allow_redirects=False)
    assert r.status == 303, await r.text()
    r = await c.get("/board")
    assert r.status == 200
    return c, csrf_of_meta(await r.text())


def csrf_of_meta(html: str) -> str:
    marker = '<meta name="csrf-token" content="'
    i = html.index(marker) + len(marker)
    return html[i : html.index('"', i)]


async def _signed_in(p: Portal, name: str) -> str:
    r = await sign_in(p, name, PW)
    assert r.status == 303
    r = await p.client.get("/board")
    assert r.status == 200, r.status
    return csrf_of_meta(await r.text())


async def test_escalation_runs_on_the_injected_monotonic_clock_and_is_pushed(tmp_path: Path) -> None:
    mono = FakeClock()
    extra = "alarms: {escalate_after_s: 60, check_every_s: 30}\n"
    async with running_portal(write_config(tmp_path, None, extra=extra), Options(monotonic=mono)) as p:
        board: AlarmBoard = p.client.app[BOARD]
        await add_user(p, "guard1", "guard", PW)
        csrf = await _signed_in(p, "guard1")
        ws = await p.client.ws_connect("/ws", headers={"Origin": p.origin})
        try:
            await p.services.ingest.handle(
                EVENTS_TOPIC,
                batch_payload(
                    [
                        ev(1, "zone.alarm", incident="A", data=ZONE),
                        ev(2, "zone.alarm", incident="B", data={**ZONE, "zone": "P2"}, place={"zone": "P2"}),
                    ]
                ),
            )
            await p.services.store.flush()
            await board.feed_now()
            incs = {i["engine_incident"]: i for i in await p.services.store.read(alarms.open_incidents)}
            a, b = incs["A"], incs["B"]
            r = await p.client.post(
                f"/api/incidents/{b['id']}/ack", json={}, headers={"Origin": p.origin, "X-CSRF-Token": csrf}
            )
            assert r.status == 200
            mono.t += 59.9
            assert await board.check_escalations() == []
            mono.t += 0.1
            [esc] = await board.check_escalations()
            assert esc["id"] == a["id"] and esc["escalated_at"] is not None and esc["state"] == "new"
            assert await board.check_escalations() == []  # once only
            log = await p.services.store.read(lambda c: alarms.incident_log(c, a["id"]))
            assert (log[-1]["actor"], log[-1]["action"]) == ("system", "escalate")
            b_now = await p.services.store.read(lambda c: alarms.get_incident(c, b["id"]))
            assert b_now is not None and b_now["escalated_at"] is None  # acknowledged in time
            async with asyncio.timeout(5):
                while True:
                    msg = json.loads((await ws.receive()).data)
                    if msg.get("kind") == "incident" and msg["incident"]["escalated_at"]:
                        assert msg["incident"]["id"] == a["id"]
                        break
        finally:
            await ws.close()


async def test_an_unacknowledged_alarm_keeps_its_age_across_a_restart(tmp_path: Path) -> None:
    wall = T0.timestamp() + 3600
    cfg = write_config(tmp_path, None, extra="alarms: {escalate_after_s: 60}\n")
    async with running_portal(cfg, Options(clock=lambda: wall, monotonic=FakeClock(50.0))) as p:
        await p.services.ingest.handle(EVENTS_TOPIC, batch_payload([ev(1, "zone.alarm", incident="R", data=ZONE)]))
        await p.services.store.flush()
        await p.client.app[BOARD].feed_now()
        [inc] = await p.services.store.read(alarms.open_incidents)
    mono = FakeClock(5.0)  # a new process: its monotonic clock starts anywhere
    async with running_portal(cfg, Options(clock=lambda: wall + 45, monotonic=mono)) as p:
        board: AlarmBoard = p.client.app[BOARD]
        assert board.waiting() == {inc["id"]: pytest.approx(45.0)}  # its age, read once from the wall clock
        assert await board.check_escalations() == []
        mono.t += 15
        [esc] = await board.check_escalations()
        assert esc["id"] == inc["id"] and board.waiting() == {}


async def test_api_refuses_without_csrf_answers_409_with_the_owner_and_masks_residents(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        board: AlarmBoard = p.client.app[BOARD]
        for name, role in (("guard1", "guard"), ("guard2", "guard"), ("inst", "installer")):
            await add_user(p, name, role, PW)
        await p.services.store.run_write(_registry)
        flat = {"building": "3", "unit": "2", "house": "301"}
        await p.services.ingest.handle(
            EVENTS_TOPIC,
            batch_payload(
                [
                    ev(
                        1,
                        "panel.alarm",
                        incident="P",
                        prio=40,
                        place=flat,
                        data={"kind": "panic", "name_zh": "紧急求助", "name_en": "Panic", "code": 120},
                    ),
                    ev(2, "zone.alarm", incident="Z", data=ZONE),
                ]
            ),
        )
        await p.services.store.flush()
        await board.feed_now()
        csrf = await _signed_in(p, "guard1")
        body = await (await p.client.get("/api/board")).json()
        # Highest priority first: the panic before the intrusion.
        assert [i["engine_incident"] for i in body["incidents"]] == ["P", "Z"]
        iid = body["incidents"][0]["id"]
        url = f"/api/incidents/{iid}/ack"
        r = await p.client.post(url, json={}, headers={"Origin": p.origin})
        assert r.status == 403 and (await r.json())["error"] == "csrf"
        r = await p.client.post(url, json={}, headers={"Origin": p.origin, "X-CSRF-Token": csrf})
        assert r.status == 200 and (await r.json())["incident"]["owner"] == "guard1"

        other, csrf2 = await _guard_client(p, "guard2")
        try:
            r = await other.post(url, json={}, headers={"Origin": p.origin, "X-CSRF-Token": csrf2})
            assert r.status == 409
            conflict = await r.json()
            assert (conflict["error"], conflict["owner"], conflict["state"]) == ("conflict", "guard1", "acknowledged")
            r = await other.post(
                f"/api/incidents/{iid}/resolve",
                json={"cause": "nonsense"},
                headers={"Origin": p.origin, "X-CSRF-Token": csrf2},
            )
            assert r.status == 400 and (await r.json())["detail"] == "board.need_cause"
            r = await other.post(
                f"/api/incidents/{iid}/check", json={"step": "one"}, headers={"Origin": p.origin, "X-CSRF-Token": csrf2}
            )
            assert r.status == 400
            r = await other.post(
                f"/api/incidents/{iid}/explode", json={}, headers={"Origin": p.origin, "X-CSRF-Token": csrf2}
            )
            assert r.status == 404
        finally:
            await other.close()

        detail = await (await p.client.get(f"/api/incidents/{iid}")).json()
        assert detail["address"] == "阳光花园 3幢 2单元 301室"
        assert detail["residents"] == [
            {"name": "王芳", "role": "owner", "phone": "139****0001"},
            {"name": "李雷", "role": "tenant", "phone": "137****0003"},
        ]
        text = json.dumps(detail, ensure_ascii=False)
        assert "13900000001" not in text and "13700000003" not in text and "13600000002" not in text
        assert [e["action"] for e in detail["log"]] == ["alarm", "ack"]
        assert len(detail["checklist"]) >= 3 and "110" in "".join(detail["checklist"])
        audit = await p.services.store.read(
            lambda c: c.execute("SELECT actor, action, target FROM audit WHERE action = 'view.incident'").fetchall()
        )
        assert [tuple(a) for a in audit] == [("guard:guard1", "view.incident", f"incident:{iid}")]
        zone = await (await p.client.get(f"/api/incidents/{body['incidents'][1]['id']}")).json()
        assert zone["residents"] is None  # not a flat
        other_flat = await p.services.store.read(
            lambda c: alarms.residents_of(
                c, {"site": SITE, "building": "9", "unit": "1", "house": "101"}, date(2026, 3, 1)
            )
        )
        assert other_flat == []

        # An installer does not see the board.
        await p.client.post("/logout", data={"csrf": csrf}, headers={"Origin": p.origin})
        await sign_in(p, "inst", PW)
        assert (await p.client.get("/api/board")).status == 403


def _registry(c: Any) -> None:
    now = "2026-01-01T00:00:00.000000Z"
    c.execute("INSERT INTO reg_sites (id, code, name) VALUES (1, ?, '阳光花园')", (SITE,))
    c.execute("INSERT INTO reg_buildings (id, site_id, code) VALUES (1, 1, '3')")
    c.execute("INSERT INTO reg_units (id, building_id, code) VALUES (1, 1, '2')")
    c.execute("INSERT INTO reg_houses (id, unit_id, code) VALUES (1, 1, '301')")
    people = [
        (1, "13900000001", "王芳", "owner", "active", None),
        (2, "13600000002", "张伟", "family", "pending", None),
        (3, "13700000003", "李雷", "tenant", "active", None),
        (4, "13500000004", "旧租户", "tenant", "active", "2025-12-31"),
    ]
    for pid, phone, name, role, status, move_out in people:
        c.execute("INSERT INTO reg_people (id, phone, name, created_at) VALUES (?, ?, ?, ?)", (pid, phone, name, now))
        c.execute(
            "INSERT INTO reg_residents (person_id, house_id, subject, role, status, move_out, source, created_at)"
            " VALUES (?, 1, ?, ?, ?, ?, 'admin', ?)",
            (pid, f"r:{pid}", role, status, move_out, now),
        )
    # 李雷's earlier stay in the same flat, its lease over: listed once, for the current stay
    c.execute(
        "INSERT INTO reg_residents (person_id, house_id, subject, role, status, lease_end, source, created_at)"
        " VALUES (3, 1, 'r:3-before', 'tenant', 'active', '2024-06-30', 'import', ?)",
        (now,),
    )


async def test_end_to_end_gateway_batch_to_board_and_socket_and_arm_command_round_trip(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    extra = "alarms: {groups: [{site: s1, gateway: gw1, group: perimeter, label: 周界}]}\n"
    async with running_portal(write_config(tmp_path, broker, extra=extra)) as p, mqtt(broker) as gw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await add_user(p, "guard1", "guard", PW)
        csrf = await _signed_in(p, "guard1")
        await gw.subscribe(wire.topic(SITE, GATEWAY, "cmd"), qos=1)
        ws = await p.client.ws_connect("/ws", headers={"Origin": p.origin})
        try:
            alarm = ev(1, "zone.alarm", incident="E2E-1", data=ZONE, ts=datetime.now(UTC))
            await gw.publish(EVENTS_TOPIC, batch_payload([alarm]), qos=1)
            async with asyncio.timeout(10):
                while True:
                    msg = json.loads((await ws.receive()).data)
                    if msg.get("kind") == "incident":
                        break
            inc = msg["incident"]
            assert (inc["engine_incident"], inc["state"], inc["first_event"]) == ("E2E-1", "new", alarm.id)
            board = await (await p.client.get("/api/board")).json()
            assert [i["id"] for i in board["incidents"]] == [inc["id"]]

            # Acknowledging tells the gateway too (it stops repeat events).
            r = await p.client.post(
                f"/api/incidents/{inc['id']}/ack", json={}, headers={"Origin": p.origin, "X-CSRF-Token": csrf}
            )
            assert r.status == 200
            cmd = await _next_command(p, gw)
            assert (cmd.type, cmd.args, cmd.by) == ("ack", {"incident": "E2E-1"}, "guard1")

            # Arm a zone group from the console: the command goes out on the cmd topic...
            r = await p.client.post(
                "/api/board/arm",
                json={"site": SITE, "gateway": GATEWAY, "group": "perimeter", "action": "arm", "mode": "away"},
                headers={"Origin": p.origin, "X-CSRF-Token": csrf},
            )
            assert r.status == 202, await r.text()
            sent = (await r.json())["command"]
            assert (sent["status"], sent["by"], sent["type"]) == ("sent", "guard1", "arm")
            cmd = await _next_command(p, gw)
            assert (cmd.id, cmd.type, cmd.args, cmd.by) == (
                sent["id"],
                "arm",
                {"group": "perimeter", "mode": "away", "force": False},
                "guard1",
            )
            assert cmd.expires > cmd.ts
            # ... and the gateway's answer comes back as an event and shows on the board.
            result = wire.Event(
                id=str(ULID()),
                seq=3,
                ts=datetime.now(UTC),
                type="command.result",
                device="gateway",
                place=wire.Place(site=SITE),
                data={"command_id": cmd.id, "command": "arm", "ok": True, "detail": "armed", "by": "guard1"},
            )
            armed = wire.Event(
                id=str(ULID()),
                seq=2,
                ts=datetime.now(UTC),
                type="group.armed",
                device="gateway",
                place=wire.Place(site=SITE),
                data={"group": "perimeter", "label": "周界", "mode": "away", "by": "guard1", "source": "command"},
            )
            await gw.publish(EVENTS_TOPIC, batch_payload([armed, result]), qos=1)
            seen: dict[str, Any] = {}
            async with asyncio.timeout(10):
                while not ("arm_command" in seen and "group" in seen):
                    msg = json.loads((await ws.receive()).data)
                    if msg.get("kind") == "arm_command" and msg["command"]["status"] == "ok":
                        seen["arm_command"] = msg["command"]
                    elif msg.get("kind") == "group":
                        seen["group"] = msg["group"]
            assert (seen["arm_command"]["id"], seen["arm_command"]["detail"]) == (cmd.id, "armed")
            assert (seen["group"]["group"], seen["group"]["state"]) == ("perimeter", "armed")
            board = await (await p.client.get("/api/board")).json()
            assert [(c["id"], c["status"], c["by"]) for c in board["commands"]] == [(cmd.id, "ok", "guard1")]
            assert [(g["group"], g["state"]) for g in board["groups"]] == [("perimeter", "armed")]

            # A bad request is refused before anything is sent.
            r = await p.client.post(
                "/api/board/arm",
                json={"site": SITE, "gateway": "nope", "group": "perimeter", "action": "arm"},
                headers={"Origin": p.origin, "X-CSRF-Token": csrf},
            )
            assert r.status == 400
        finally:
            await ws.close()


async def test_a_trip_long_after_its_acknowledged_incident_restored_is_a_new_alarm_that_rings(store: Store) -> None:
    """A fire zone is acknowledged at 22:00, restores, and nobody closes the incident. A trip minutes later is the
    same alarm coming back (counted in it); one at 03:00 is a new alarm: a new incident, new, which rings."""
    fire = {**ZONE, "zone": "F1", "zone_type": "fire", "kind": "fire"}

    def trip(seq: int, inc: str, minutes: float, what: str = "zone.alarm") -> wire.Event:
        data = {**fire, "how": "restored"} if what == "zone.restore" else fire
        return ev(seq, what, incident=inc, prio=wire.Priority.FIRE, data=data, ts=T0 + timedelta(minutes=minutes))

    await put(store, trip(1, "Z-1", 0))
    (first,) = await incidents(store)
    await store.write(alarms.IncidentAction(first["id"], "ack", "guard1"))
    await put(store, trip(2, "Z-1", 1, "zone.restore"), trip(3, "Z-2", 5))  # back 4 minutes after: the same alarm
    (inc,) = await incidents(store)
    assert (inc["id"], inc["state"], inc["trips"]) == (first["id"], "acknowledged", 2)
    await put(store, trip(4, "Z-2", 6, "zone.restore"), trip(5, "Z-3", 300))  # five hours later
    old, new = await incidents(store)
    assert (old["id"], old["state"], old["trips"]) == (first["id"], "acknowledged", 2)
    assert new["state"] == "new" and new["engine_incident"] == "Z-3" and new["trips"] == 1


async def test_a_disarm_from_a_gateway_whose_clock_went_back_is_not_lost_behind_the_arm(store: Store) -> None:
    """The board's arm state follows the gateway's own order (its sequence), not its clock: a Pi back from a power
    cut with no network may stamp a disarm earlier than the arm before it. A late re-send (a lower seq) never rolls
    the state back."""
    group = {"group": "perimeter", "label": "周界", "mode": "away", "by": "bob", "source": "command"}

    async def state() -> str:
        return str(
            await store.read(lambda c: c.execute("SELECT state FROM arm_groups WHERE grp = 'perimeter'").fetchone()[0])
        )

    armed = ev(10, "group.armed", prio=0, data=group, place={}, ts=T0 + timedelta(minutes=50))
    await put(store, armed)
    assert await state() == "armed"
    disarmed = ev(11, "group.disarmed", prio=0, data=group, place={}, ts=T0 + timedelta(minutes=10))
    await put(store, disarmed)
    assert await state() == "disarmed"
    late = ev(9, "group.armed", prio=0, data=group, place={}, ts=T0 + timedelta(minutes=60))  # sent again, late
    await put(store, late)
    assert await state() == "disarmed"


@pytest.mark.parametrize("lost", ["store.corrupt_replaced", "gateway.state_lost"])
async def test_a_gateway_that_lost_its_alarm_state_is_an_incident_and_its_groups_show_disarmed(
    store: Store, lost: str
) -> None:
    """The gateway's store was replaced (or its state unreadable): its open alarms are forgotten and its groups
    disarmed. That is an incident for the guard (a fault, unpaired), and the board's arm state follows the
    gateway's word that the perimeter is disarmed, although it showed armed."""
    group = {"group": "perimeter", "label": "周界", "mode": "away", "by": "bob", "source": "command"}
    await put(store, ev(1, "group.armed", prio=0, data=group, place={}))
    fault = ev(2, lost, prio=wire.Priority.FAULT, data={"what": "alarm engine"}, place={}, device="gateway", point=None)
    reset = {**group, "mode": None, "by": "gateway", "source": "start", "reason": "state lost"}
    await put(store, fault, ev(3, "group.disarmed", prio=0, data=reset, place={}))
    (inc,) = await incidents(store)
    assert (inc["type"], inc["kind"], inc["state"]) == (lost, "fault", "new")
    groups = await store.read(lambda c: alarms.arm_groups(c))
    assert [(g["group"], g["state"]) for g in groups] == [("perimeter", "disarmed")]


async def test_closing_an_alarm_its_panel_never_restores_clears_it_at_the_gateway_and_its_next_press_rings(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """A Contact ID panel that sends no restores: the guard finishes the panic on the board, and the gateway, still
    holding its incident open, is told to clear it. Had that clear been lost, the press that comes again (the
    gateway's repeat, with a higher count) opens a new incident that rings; a repeat the closed one had counted does
    not. An incident its source restored is closed without a word to the gateway."""
    panic = {"panel": "house-301", "account": "1234", "code": 120, "kind": "panic", "zone": 5}
    extra = "alarms: {checklist_required: []}\n"  # finished in one step (the checklist has its own tests)
    async with running_portal(write_config(tmp_path, broker, extra=extra)) as p, mqtt(broker) as gw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await add_user(p, "guard1", "guard", PW)
        csrf = await _signed_in(p, "guard1")
        await gw.subscribe(wire.topic(SITE, GATEWAY, "cmd"), qos=1)
        headers = {"Origin": p.origin, "X-CSRF-Token": csrf}

        async def board() -> list[dict[str, Any]]:
            return list((await (await p.client.get("/api/board")).json())["incidents"])

        async def publish(*events: wire.Event) -> None:
            await gw.publish(EVENTS_TOPIC, batch_payload(list(events)), qos=1)

        opening = ev(1, "panel.alarm", incident="CID-1", prio=wire.Priority.PANIC, data=panic, point=None)
        await publish(opening)
        (inc,) = await wait_for(board, what="the panic on the board")
        for action, body in (("ack", {}), ("finish", {"cause": "real"})):
            r = await p.client.post(f"/api/incidents/{inc['id']}/{action}", json=body, headers=headers)
            assert r.status == 200, await r.text()
            cmd = await _next_command(p, gw)
            assert (cmd.type, cmd.args, cmd.by) == (
                action if action == "ack" else "clear",
                {"incident": "CID-1"},
                "guard1",
            )
        assert await board() == []

        # The clear lost: the gateway reports the next press on the incident it holds, and the board rings anew.
        again = ev(2, "panel.alarm_repeat", incident="CID-1", prio=wire.Priority.PANIC, data={**panic, "count": 2})
        await publish(again)
        (fresh,) = await wait_for(board, what="the new press on the board")
        assert fresh["id"] != inc["id"] and fresh["state"] == "new" and fresh["engine_incident"] == "CID-1"
        old = await p.services.store.read(lambda c: alarms.get_incident(c, inc["id"]))
        assert old is not None and old["state"] == "closed"
        # A repeat the open incident already counted goes into it, not into another one.
        await publish(
            ev(3, "panel.alarm_repeat", incident="CID-1", prio=wire.Priority.PANIC, data={**panic, "count": 2})
        )
        await asyncio.sleep(0.5)
        assert [i["id"] for i in await board()] == [fresh["id"]]

        # Restored at its source, then finished: the gateway has nothing open, and is told nothing.
        await publish(
            ev(4, "zone.alarm", incident="Z-1", data=ZONE),
            ev(5, "zone.restore", incident="Z-1", data={**ZONE, "how": "restored"}),
        )
        zone_inc = await wait_for(
            lambda: _first(board(), lambda i: i["engine_incident"] == "Z-1" and i["restored_at"]), what="restored"
        )
        r = await p.client.post(f"/api/incidents/{zone_inc['id']}/ack", json={}, headers=headers)
        assert (await _next_command(p, gw)).type == "ack"
        r = await p.client.post(f"/api/incidents/{zone_inc['id']}/finish", json={"cause": "false"}, headers=headers)
        assert r.status == 200, await r.text()
        with pytest.raises(TimeoutError):
            await _next_command(p, gw, timeout=1.0)


async def test_a_gateway_s_backlog_in_one_commit_drops_no_console(tmp_path: Path, broker: MosquittoProcess) -> None:
    """A gateway back from an outage sends its backlog in batches of up to 500 events. A commit bigger than a
    console's queue (256) must not drop every console as too slow: the console stays connected and hears the
    newest of them (its event list shows a hundred at most) and the alarm among them."""
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await add_user(p, "guard1", "guard", PW)
        await _signed_in(p, "guard1")
        ws = await p.client.ws_connect("/ws", headers={"Origin": p.origin})
        try:
            base = datetime.now(UTC)
            routine = [
                ev(n, "access.granted", prio=0, place={"door": "D1"}, ts=base + timedelta(milliseconds=n))
                for n in range(1, 500)
            ]
            alarm = ev(500, "zone.alarm", incident="B-1", data=ZONE, ts=base + timedelta(seconds=1))
            await gw.publish(EVENTS_TOPIC, batch_payload([*routine, alarm]), qos=1)
            heard: set[str] = set()
            incident = False
            async with asyncio.timeout(15):
                while not (alarm.id in heard and incident):
                    msg = await ws.receive()
                    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, len(heard))
                    body = json.loads(msg.data)
                    if body.get("kind") == "event":
                        heard.add(body["event"]["id"])
                    incident = incident or (
                        body.get("kind") == "incident" and body["incident"]["engine_incident"] == "B-1"
                    )
            assert routine[-1].id in heard  # the newest of the backlog, as the list shows it
            assert p.services.hub.clients >= 1
        finally:
            await ws.close()


async def _first(items: Any, pred: Any) -> Any:
    return next((i for i in await items if pred(i)), None)


async def _next_command(p: Portal, client: Any, timeout: float = 10.0) -> wire.Command:
    async with asyncio.timeout(timeout):
        async for m in client.messages:
            if str(m.topic).endswith("/cmd"):
                return open_portal_command(p, m.payload)
    raise AssertionError("message stream ended")


# ---------------------------------------------------------------- the site map and its config


def test_the_site_map_marks_alarming_places_and_escapes_labels() -> None:
    m = SiteMapConfig(
        site=SITE,
        width=400,
        height=300,
        buildings=[
            MapBuilding(code="5", x=10, y=10, w=100, h=60),
            MapBuilding(code="6", name="<b>6号楼</b>", x=200, y=10, w=100, h=60),
        ],
        zones=[
            MapZone(zone="P1", label="北围栏", points=[(0, 0), (400, 0)]),
            MapZone(zone="P2", points=[(400, 0), (400, 300)]),
        ],
        doors=[MapDoor(door="D1", label="南门", x=200, y=290), MapDoor(door="D2", x=10, y=290)],
    )

    def inc(state: str, restored: bool, **place: str) -> dict[str, Any]:
        return {
            "state": state,
            "site": SITE,
            "place": {"site": SITE, **place},
            "data": {},
            "restored_at": "x" if restored else None,
        }

    incs = [
        inc("new", True, zone="P1"),
        inc("acknowledged", True, zone="P2"),
        inc("acknowledged", False, building="5", unit="1", house="1201"),
        inc("closed", False, door="D2"),
        inc("new", False, door="D1"),
        {**inc("new", False, zone="P2"), "site": "other"},
    ]
    svg = str(render_svg(m, i18n.Translator("zh-CN"), map_state(incs, SITE), {"D1": "forced"}))
    assert '<g class="zone alarm" data-zone="P1">' in svg  # unacknowledged, though restored
    assert '<g class="zone open" data-zone="P2">' in svg  # taken and cleared: still open, not blinking
    assert '<g class="building alarm" data-building="5">' in svg and ">1201室</text>" in svg
    assert '<g class="building" data-building="6">' in svg and "&lt;b&gt;6号楼&lt;/b&gt;" in svg
    assert '<g class="door alarm" data-door="D1" data-state="forced">' in svg
    assert '<g class="door" data-door="D2">' in svg  # its incident is closed
    assert 'viewBox="0 0 400 300"' in svg and "防区 P2" in svg and "<b>" not in svg


def test_alarm_and_map_config_is_checked_at_load(tmp_path: Path) -> None:
    bad = """
gateways: [{site: s1, gateway: gw1}]
alarms:
  checklists:
    fire: {zh-CN: [a, b], en: [a]}
    flood: {zh-CN: [a], en: [a]}
    panic: {zh-CN: [a]}
  groups: [{site: s1, gateway: nope, group: g}]
site_maps:
  - site: s1
    width: 100
    height: 100
    buildings: [{code: '1', x: 50, y: 50, w: 60, h: 10}, {code: '1', x: 0, y: 0, w: 1, h: 1}]
    zones: [{zone: P1, points: [[0, 0], [101, 0]]}]
    doors: [{door: D1, x: 5, y: 500}]
  - {site: s1}
"""
    with pytest.raises(ConfigError) as e:
        parse(tmp_path / "portal.yaml", bad)
    text = "\n".join(e.value.problems)
    for needle in (
        "same number of steps",
        "unknown alarm kind 'flood'",
        "both zh-CN and en",
        "gateway s1/nope is not in gateways",
        "building '1' is drawn twice",
        "building '1' lies outside",
        "zone 'P1' lies outside",
        "door 'D1' lies outside",
        "site s1 has two maps",
    ):
        assert needle in text, needle
    assert all(p.startswith(str(tmp_path / "portal.yaml") + ":") for p in e.value.problems)
    with pytest.raises(ConfigError):
        parse(tmp_path / "portal.yaml", "alarms: {escalate_after_s: 1}\n")
    ok = parse(tmp_path / "portal.yaml", "alarms: {checklists: {fire: {zh-CN: [甲], en: [A]}}}\n")
    assert ok.alarms.checklist("fire", "en") == ["A"] and ok.alarms.checklist("panic", "zh-CN")[0].startswith("回拨")
