"""Care for residents living alone, against a real portal on loopback (real SQLite store; a real Mosquitto where field
events come in as a gateway sends them), with the portal's clocks in the test's hand.

As the outsider: the office that forgets the consent or types a bad number (a clear error, nothing stored, the form
kept); the household member who is not the one cared for (their pass does not count), the visitor, the guard's remote
unlock and the shared unit door (none of them counts); the gateway clock in the future and the late re-send; the
night wanderer; the panel that says nobody moved; the clock someone sets forward (no alert), the portal that restarts
(the deadline carries on); the resident of the flat next door and the stranger (no care page, no "我很好"); the guard
who sees the contact only masked until a reason is given, audited.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from portal import care
from portal.alarms import incidents as alarms
from portal.care import model as care_model
from portal.care.views import WATCH
from portal.care.watch import CareWatch, in_night
from tests.care_patrol_support import (
    FLAT_301,
    FLAT_302,
    GUARD,
    GUARD_PW,
    TimeMachine,
    board,
    estate_with_staff,
    field_event,
    person,
    resident_browser,
    staff_browser,
)
from tests.doors_support import publish
from tests.portal_support import (
    GATEWAY,
    SITE,
    Portal,
    mqtt,
    page_csrf,
    running_portal,
    sign_in,
    wait_for,
    write_config,
)
from tests.registry_support import ADMIN, ADMIN_PW, house_id, plate_code

HOUR = 3600.0
ZHANG, LI, WANG = "13812345678", "13987654321", "13700001111"  # 3-2-301 owner, 3-2-301 family, 3-2-302 tenant
CONTACT = "13655556666"


def watch(p: Portal) -> CareWatch:
    return p.client.server.app[WATCH]


async def enrol(
    p: Portal, people: list[int], *, hours: int = 24, night: bool = False, house: str = "3-2-301", **extra: str
) -> int:
    """The office puts a flat under care through its form; the household's id."""
    data = {
        "site": SITE,
        "house": house,
        "contact_name": "李娜",
        "contact_relation": "女儿",
        "contact_phone": CONTACT,
        "hours": str(hours),
        "night_from": "00:00",
        "night_to": "05:00",
        "consent_by": "张伟本人",
        "consent_how": "written",
        "consent_date": watch(p).now()[:10],
        **extra,
    }
    if night:
        data["night_watch"] = "1"
    body = aiohttp.FormData()
    for k, v in data.items():
        body.add_field(k, v)
    for pid in people:
        body.add_field("person", str(pid))
    body.add_field("csrf", p.csrf)
    r = await p.client.post("/care", data=body, headers={"Origin": p.origin}, allow_redirects=False)
    assert r.status == 303, await r.text()
    return int(r.headers["Location"].split("/")[2].split("?")[0])


async def household(p: Portal, care_id: int) -> care_model.Household:
    h = await p.services.store.read(lambda c: care_model.household(c, care_id))
    assert h is not None
    return h


async def incidents(p: Portal, kind: str | None = None) -> list[dict[str, Any]]:
    """The open incidents (read from the store: the test's sessions do not outlive the days it steps over)."""
    await board(p).feed_now()
    rows = await p.services.store.read(alarms.open_incidents)
    return [i for i in rows if kind is None or i["kind"] == kind]


async def office_again(p: Portal) -> None:
    """The office signs in again (a day later its session has ended)."""
    r = await sign_in(p, ADMIN, ADMIN_PW)
    assert r.status == 303
    p.csrf = await page_csrf(p, "/care")


async def audit_rows(p: Portal, action: str) -> list[dict[str, Any]]:
    return await p.services.store.read(
        lambda c: [dict(r) for r in c.execute("SELECT * FROM audit WHERE action = ? ORDER BY id", (action,))]
    )


# ---------------------------------------------------------------- the office


async def test_office_enrols_with_recorded_consent_and_bad_input_loses_nothing(tmp_path: Path) -> None:
    clock = TimeMachine()
    async with running_portal(write_config(tmp_path, None), clock.options()) as p:
        await estate_with_staff(p)
        zhang, wang = await person(p, ZHANG), await person(p, WANG)
        page = await p.client.get("/care/new?site=s1&house=3-2-301")
        text = await page.text()
        assert page.status == 200 and "张伟" in text and "李娜" in text and "王芳" not in text  # the flat's people only

        async def post(**kw: Any) -> aiohttp.ClientResponse:
            data = {
                "site": SITE,
                "house": "3-2-301",
                "contact_name": "李娜",
                "contact_relation": "女儿",
                "contact_phone": CONTACT,
                "hours": "24",
                "night_from": "00:00",
                "night_to": "05:00",
                "consent_by": "张伟本人",
                "consent_how": "written",
                "consent_date": clock.now().date().isoformat(),
            }
            data.update({k: v for k, v in kw.items() if k != "people"})
            body = aiohttp.FormData()
            for k, v in data.items():
                body.add_field(k, v)
            for pid in kw.get("people", [zhang["id"]]):
                body.add_field("person", str(pid))
            body.add_field("csrf", p.csrf)
            return await p.client.post("/care", data=body, headers={"Origin": p.origin}, allow_redirects=False)

        cases = {
            "care.need_consent": {"consent_by": " "},
            "care.bad_consent_how": {"consent_how": "resident_phone"},  # only a resident gives that, on the phone
            "care.bad_consent_date": {"consent_date": (clock.now().date() + timedelta(days=2)).isoformat()},
            "care.bad_contact_phone": {"contact_phone": "12345"},
            "care.bad_contact_name": {"contact_name": "<script>"},
            "care.bad_hours": {"hours": "0"},
            "care.bad_night": {"night_from": "25:00"},
            "care.need_person": {"people": [wang["id"]]},  # someone of the flat next door
        }
        for key, bad in cases.items():
            r = await post(**bad)
            text = await r.text()
            assert r.status == 400, (key, r.status)
            assert re.search(r'id="error" data-field="[a-z_]*">', text), key
            assert key.split(".")[1] in text or "error" in text
            assert f'value="{CONTACT}"' in text or key == "care.bad_contact_phone", key  # the form is kept
        assert (
            await p.services.store.read(lambda c: c.execute("SELECT count(*) FROM care_households").fetchone()[0]) == 0
        )
        r = await post(people=[zhang["id"]])
        assert r.status == 303
        care_id = int(r.headers["Location"].split("/")[2].split("?")[0])
        h = await household(p, care_id)
        assert (h.consent_by, h.consent_how, h.people, h.hours, h.contact_phone) == (
            "张伟本人",
            "written",
            (zhang["id"],),
            24,
            CONTACT,
        )
        assert h.consent_at[:10] <= clock.now().date().isoformat()
        (row,) = await audit_rows(p, "care.enrol")
        assert CONTACT not in row["detail"] and "136****6666" in row["detail"] and "written" in row["detail"]
        assert row["actor"] == "admin:office"
        # A second enrolment of the same flat sends the office to the household.
        r = await p.client.get("/care/new?site=s1&house=3-2-301", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == f"/care/{care_id}"
        r = await post(people=[zhang["id"]])
        assert r.status == 400 and "该房屋已在关爱中" in await r.text()
        r = await p.client.get("/care/new?site=s1&house=9-9-999")
        assert r.status == 400 and 'id="error"' in await r.text()
        listing = await (await p.client.get("/care")).text()
        assert CONTACT in listing and "张伟本人" in listing  # the office sees the whole number
        assert await audit_rows(p, "view.care")

        # The guard and the installer have no care pages at all.
        await p.services.auth.create_user("fitter1", "installer", GUARD_PW, must_change=False)
        for user in (GUARD, "fitter1"):
            http, _ = await staff_browser(p, user, GUARD_PW)
            try:
                for path in ("/care", f"/care/{care_id}", "/care/new?site=s1&house=3-2-301"):
                    assert (await http.get(path, allow_redirects=False)).status == 403, (user, path)
            finally:
                await http.close()


# ---------------------------------------------------------------- the no-activity rule, "我很好" and the guard


async def test_no_activity_alerts_at_the_configured_hour_and_ok_clears_it(tmp_path: Path) -> None:
    clock = TimeMachine()
    async with running_portal(write_config(tmp_path, None), clock.options()) as p:
        await estate_with_staff(p)
        zhang = await person(p, ZHANG)
        care_id = await enrol(p, [zhang["id"]], hours=24)
        w = watch(p)
        assert abs((w.remaining(care_id) or 0) - 24 * HOUR) < 0.01

        clock.step(24 * HOUR - 60)
        assert await w.check_now() == [] and await incidents(p, "care") == []
        clock.step(120)
        (ev,) = await w.check_now()
        assert ev["type"] == "care.no_activity" and ev["place"] == {"site": SITE, **FLAT_301}
        assert ev["priority"] == care_model.PRIORITY and ev["data"]["hours"] == 24
        (inc,) = await incidents(p, "care")
        assert inc["state"] == "new" and inc["type"] == "care.no_activity"
        assert inc["title"]["zh-CN"] == "独居关爱：已 24 小时无出入活动"
        assert await w.check_now() == []  # one alert, not one a second

        # The guard sees the household, the contact masked; revealing takes a reason and is audited.
        gw, gcsrf = await staff_browser(p, GUARD, GUARD_PW)
        try:
            detail = await (await gw.get(f"/api/incidents/{inc['id']}")).json()
            (section,) = detail["sections"]
            shown = json.dumps(section, ensure_ascii=False)
            assert section["key"] == "care" and "张伟" in shown and "136****6666" in shown and CONTACT not in shown
            url = section["reveal"]["url"]
            r = await gw.post(url, json={"reason": ""}, headers={"Origin": p.origin, "X-CSRF-Token": gcsrf})
            assert r.status == 400
            r = await gw.post(url, json={"reason": "回拨核实"}, headers={"Origin": p.origin, "X-CSRF-Token": gcsrf})
            assert r.status == 200 and CONTACT in json.dumps(await r.json())
        finally:
            await gw.close()
        (rev,) = await audit_rows(p, "reveal.care_contact")
        assert rev["actor"] == "guard:guard1" and "回拨核实" in rev["detail"]
        log = await p.services.store.read(
            lambda c: [
                r["action"] for r in c.execute("SELECT action FROM incident_log WHERE incident_id = ?", (inc["id"],))
            ]
        )
        assert "reveal_contact" in log

        # The resident's phone: the check waits above the help button; "我很好" closes the alert.
        code = await plate_code(p, "3", "2", "301")
        phone, pcsrf = await resident_browser(p, zhang["id"])
        try:
            html = await (await phone.get(f"/p/{code}")).text()
            assert 'id="care-ask"' in html and html.index('id="care-card"') < html.index('id="sos-form"')
            r = await phone.post(
                f"/p/{code}/care/ok", data={"csrf": pcsrf}, headers={"Origin": p.origin}, allow_redirects=False
            )
            assert r.status == 303 and r.headers["Location"].endswith("?care=ok")
            html = await (await phone.get(f"/p/{code}?care=ok")).text()
            assert 'id="care-ask"' not in html and "已报平安" in html
        finally:
            await phone.close()
        assert await incidents(p, "care") == []
        closed = await p.services.store.read(
            lambda c: dict(
                c.execute("SELECT state, cause, closed_by FROM incidents WHERE id = ?", (inc["id"],)).fetchone()
            )
        )
        assert closed == {"state": "closed", "cause": "false", "closed_by": f"resident:{zhang['id']}"}
        (ok,) = await audit_rows(p, "care.ok")
        assert ok["actor"] == f"resident:{zhang['id']}"
        assert await audit_rows(p, "alarm.settle")
        # The clock restarted from the check-in: the next alert comes 24 h after it, not at once.
        clock.step(24 * HOUR - 60)
        await w.check_now()
        assert await incidents(p, "care") == []
        clock.step(120)
        await w.check_now()
        (second,) = await incidents(p, "care")
        assert second["id"] != inc["id"]

        # A guard who went to the door and closes the alert restarts the clock too.
        await office_again(p)
        r = await p.client.post(
            f"/api/incidents/{second['id']}/ack", json={}, headers={"Origin": p.origin, "X-CSRF-Token": p.csrf}
        )
        assert r.status == 200
        r = await p.client.post(
            f"/api/incidents/{second['id']}/finish",
            json={"cause": "false"},
            headers={"Origin": p.origin, "X-CSRF-Token": p.csrf},
        )
        assert r.status == 200, await r.text()
        await wait_for(lambda: (w.remaining(care_id) or 0) > 23 * HOUR, timeout=10, what="the clock restarted")
        clock.step(23 * HOUR)
        assert await w.check_now() == []


async def test_a_wall_clock_jump_changes_no_deadline_and_a_restart_carries_on(tmp_path: Path) -> None:
    clock = TimeMachine()
    cfg = write_config(tmp_path, None)
    async with running_portal(cfg, clock.options()) as p:
        await estate_with_staff(p)
        zhang = await person(p, ZHANG)
        care_id = await enrol(p, [zhang["id"]], hours=12)
        w = watch(p)
        clock.jump(3 * 24 * HOUR)  # someone sets the guardroom PC's clock three days on
        clock.step(HOUR)
        assert await w.check_now() == []
        assert abs((w.remaining(care_id) or 0) - 11 * HOUR) < 1
        clock.jump(-3 * 24 * HOUR)  # and back
        clock.step(HOUR)
    # The portal restarts 2 h later (by the wall clock) with a monotonic clock that starts anywhere.
    clock.step(2 * HOUR)
    clock.mono_s = 5.0
    async with running_portal(cfg, clock.options()) as p:
        w = watch(p)
        assert abs((w.remaining(care_id) or 0) - 8 * HOUR) < 1  # 12 h from enrolment, 4 h gone by the wall clock
        clock.step(8 * HOUR - 30)
        assert await w.check_now() == []
        clock.step(60)
        (ev,) = await w.check_now()
        assert ev["data"]["care"] == care_id


# ---------------------------------------------------------------- what counts as the household's activity


async def test_only_activity_attributable_to_the_cared_for_counts(tmp_path: Path, broker: MosquittoProcess) -> None:
    clock = TimeMachine()
    async with running_portal(write_config(tmp_path, broker), clock.options()) as p, mqtt(broker) as gw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "ack"), qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await estate_with_staff(p)
        zhang, li, wang = [await person(p, n) for n in (ZHANG, LI, WANG)]
        care_id = await enrol(p, [zhang["id"]], hours=24)
        w = watch(p)
        start = (await household(p, care_id)).watch_from
        seq = 0

        async def send(etype: str, *, data: dict[str, Any], ts: datetime | None = None, **place: str) -> None:
            nonlocal seq
            seq += 1
            await publish(gw, [field_event(seq, etype, ts=ts or clock.now(), data=data, **place)])
            await wait_for(lambda: _fed(p, w), timeout=10, what="the care feed")

        def grant(kind: str, subject: str, door: str = "b3u2") -> dict[str, Any]:
            return {
                "door": door,
                "reader": "qr1",
                "pass_id": "ab" * 8,
                "kind": kind,
                "subject": subject,
                "house": "3-2-301",
            }

        clock.step(600)
        # Not the cared-for person's: the family member's pass, a visitor of the flat, a guard's remote unlock, the
        # shared unit door opening, the flat next door's panel, the flat's own help button on its plate.
        await send("access.granted", data=grant("resident", li["subject"]), door="b3u2", building="3", unit="2")
        await send("access.granted", data=grant("visitor", "v:abcdefabcdef"), door="b3u2", building="3", unit="2")
        await send("access.granted", data=grant("remote", "guard:bob"), door="b3u2", building="3", unit="2")
        await send("door.state", data={"door": "b3u2", "state": "open"}, door="b3u2", building="3", unit="2")
        await send("house.disarmed", data={"panel": "p302", "code": 401, "user": 1}, **FLAT_302)
        await send(
            "access.granted", data=grant("remote", f"resident:{wang['id']}"), door="b3u2", building="3", unit="2"
        )
        h = await household(p, care_id)
        assert h.watch_from == start and h.last_activity == ""

        # The cared-for person's own pass, phone unlock, and the flat's panel: each restarts the clock.
        clock.step(600)
        t1 = clock.now()
        await send("access.granted", data=grant("resident", zhang["subject"]), door="b3u2", building="3", unit="2")
        h = await household(p, care_id)
        assert h.watch_from == t1.strftime("%Y-%m-%dT%H:%M:%S.%fZ") and h.last_activity == "pass:b3u2"
        clock.step(600)
        await send("access.granted", data=grant("remote", f"resident:{zhang['id']}", "north-gate"), door="north-gate")
        assert (await household(p, care_id)).last_activity == "remote:north-gate"
        clock.step(600)
        await send("house.armed", data={"panel": "p301", "code": 401, "user": 2, "mode": "away"}, **FLAT_301)
        assert (await household(p, care_id)).last_activity == "panel:house.armed"
        assert abs((w.remaining(care_id) or 0) - 24 * HOUR) < 2

        # A gateway clock an hour ahead gains nothing; a late re-send moves nothing back.
        clock.step(600)
        ahead = clock.now() + timedelta(hours=1)
        await send("house.disarmed", data={"panel": "p301", "code": 401, "user": 2}, ts=ahead, **FLAT_301)
        h = await household(p, care_id)
        assert h.watch_from == clock.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        await send(
            "house.armed",
            data={"panel": "p301", "code": 401, "user": 2},
            ts=clock.now() - timedelta(hours=3),
            **FLAT_301,
        )
        assert (await household(p, care_id)).watch_from == h.watch_from

        # A malformed event is counted and the feed goes on.
        await send("access.granted", data={"kind": "remote", "subject": "resident:" + "9" * 40}, door="x")
        assert (await household(p, care_id)).watch_from == h.watch_from


def _fed(p: Portal, w: CareWatch) -> Any:
    async def check() -> bool:
        top = await p.services.store.read(lambda c: c.execute("SELECT max(pk) FROM events").fetchone()[0])
        cursor = await p.services.store.read(lambda c: c.execute("SELECT last_pk FROM care_feed").fetchone()[0])
        return bool(top is not None and cursor >= top)

    return check()


# ---------------------------------------------------------------- night, the panel's inactivity, a panic


async def test_a_new_silence_after_an_alert_her_activity_answered_rings_again(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """The 24 h alert rings; the guard acknowledges it but does not close it; an hour later her own panel is armed
    (the alert is answered, restored on the board); then nothing for a day and more. That second silence rings a
    new alert: the first, answered and still open, is no bar to it."""
    clock = TimeMachine()
    async with running_portal(write_config(tmp_path, broker), clock.options()) as p, mqtt(broker) as gw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "ack"), qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await estate_with_staff(p)
        zhang = await person(p, ZHANG)
        await enrol(p, [zhang["id"]], hours=24)
        w = watch(p)
        clock.step(24 * HOUR + 60)
        assert len(await w.check_now()) == 1
        (first,) = await incidents(p, "care")
        await board(p).act(first["id"], "ack", "guard1")
        clock.step(HOUR)
        armed = {"panel": "p301", "code": 401, "user": 2, "mode": "away"}
        await publish(gw, [field_event(1, "house.armed", ts=clock.now(), data=armed, **FLAT_301)])
        await wait_for(lambda: _fed(p, w), timeout=10, what="the care feed")
        await board(p).feed_now()
        (first,) = await incidents(p, "care")
        assert first["state"] == "acknowledged" and first["restored_at"]
        raised = []
        for _ in range(26):
            clock.step(HOUR)
            raised += await w.check_now()
        assert [e["type"] for e in raised] == ["care.no_activity"]
        await board(p).feed_now()
        ringing = [i for i in await incidents(p, "care") if i["id"] != first["id"]]
        assert len(ringing) == 1 and ringing[0]["state"] == "new" and not ringing[0]["restored_at"]


async def test_night_activity_the_panels_senior_watch_and_a_panic(tmp_path: Path, broker: MosquittoProcess) -> None:
    # 02:30 tonight at the site (Asia/Shanghai, UTC+8): the portal's clock starts there.
    night = datetime.now(UTC).replace(hour=18, minute=30, second=0, microsecond=0)  # 02:30 in UTC+8
    clock = TimeMachine(wall_s=night.timestamp())
    async with running_portal(write_config(tmp_path, broker), clock.options()) as p, mqtt(broker) as gw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "ack"), qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await estate_with_staff(p)
        zhang = await person(p, ZHANG)
        await enrol(p, [zhang["id"]], hours=24, night=True)
        w = watch(p)
        assert in_night(clock.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ"), p.services.tz, "00:00", "05:00")
        seq = 0

        async def send(
            etype: str,
            data: dict[str, Any],
            ts: datetime,
            prio: int = wire.Priority.ROUTINE,
            place: dict[str, str] = FLAT_301,
        ) -> None:
            nonlocal seq
            seq += 1
            await publish(gw, [field_event(seq, etype, ts=ts, data=data, priority=prio, **place)])
            await wait_for(lambda: _fed(p, w), timeout=10, what="the care feed")

        await send("house.disarmed", {"panel": "p301", "code": 401, "user": 1}, clock.now())
        (inc,) = await incidents(p, "care")
        assert inc["type"] == "care.night_activity" and inc["count"] == 1
        clock.step(300)
        await send("house.armed", {"panel": "p301", "code": 401, "user": 1}, clock.now())
        (inc,) = await incidents(p, "care")
        assert inc["count"] == 2  # one alert for the night, counted
        # The panel's senior watch (Contact ID 641): nobody moved in the flat; its restore marks it restored.
        await send(
            "panel.event",
            {"panel": "p301", "account": "1234", "code": 641, "qualifier": "new", "zone": 1, "kind": "senior_watch"},
            clock.now(),
        )
        kinds = {i["type"]: i for i in await incidents(p, "care")}
        assert set(kinds) == {"care.night_activity", "care.panel_inactive"}
        await send(
            "panel.event",
            {
                "panel": "p301",
                "account": "1234",
                "code": 641,
                "qualifier": "restore",
                "zone": 1,
                "kind": "senior_watch",
            },
            clock.now(),
        )
        assert {i["type"]: i for i in await incidents(p, "care")}["care.panel_inactive"]["restored_at"]
        # Nobody moved again, while the guard has not closed the first: the alert rings again, not nothing (so soon
        # after its restore, the board counts it as another trip of the same incident).
        await send(
            "panel.event",
            {"panel": "p301", "account": "1234", "code": 641, "qualifier": "new", "zone": 1, "kind": "senior_watch"},
            clock.now(),
        )
        await board(p).feed_now()
        (inactive,) = [i for i in await incidents(p, "care") if i["type"] == "care.panel_inactive"]
        assert inactive["restored_at"] is None and inactive["trips"] == 2
        await send(  # and the panel's next restore answers the new one
            "panel.event",
            {
                "panel": "p301",
                "account": "1234",
                "code": 641,
                "qualifier": "restore",
                "zone": 1,
                "kind": "senior_watch",
            },
            clock.now(),
        )
        await board(p).feed_now()
        (inactive,) = [i for i in await incidents(p, "care") if i["type"] == "care.panel_inactive"]
        assert inactive["restored_at"]
        # A panic from the flat's panel: its own incident (kind panic) with the care context, never a second one.
        await send(
            "panel.alarm",
            {
                "panel": "p301",
                "account": "1234",
                "code": 120,
                "qualifier": "new",
                "zone": 3,
                "kind": "panic",
                "incident": "c:p301:120:1:3",
                "count": 1,
            },
            clock.now(),
            wire.Priority.PANIC,
        )
        panics = await incidents(p, "panic")
        assert len(panics) == 1 and len(await incidents(p, "care")) == 2
        detail = await (await p.client.get(f"/api/incidents/{panics[0]['id']}")).json()
        assert [s["key"] for s in detail["sections"]] == ["care"]
        ctx = await p.services.store.read(lambda c: care.incident_context(c, panics[0]["id"]))
        assert ctx is not None and ctx["rule"] == "panic" and ctx["contact"]["phone"] == CONTACT
        # Night activity seen two hours late is credited and raises nothing more.
        await office_again(p)
        for i in await incidents(p, "care"):
            for act in ("ack", "finish"):
                r = await p.client.post(
                    f"/api/incidents/{i['id']}/{act}",
                    json={"cause": "false"},
                    headers={"Origin": p.origin, "X-CSRF-Token": p.csrf},
                )
                assert r.status == 200, await r.text()
        clock.step(2 * HOUR)
        await send("house.disarmed", {"panel": "p301", "code": 401, "user": 1}, clock.now() - timedelta(hours=2))
        assert await incidents(p, "care") == []
        # "我很好" also notes the open panic for the guard (it stays open: a panic is the guard's to close).
        code = await plate_code(p, "3", "2", "301")
        phone, pcsrf = await resident_browser(p, zhang["id"])
        try:
            r = await phone.post(
                f"/p/{code}/care/ok", data={"csrf": pcsrf}, headers={"Origin": p.origin}, allow_redirects=False
            )
            assert r.status == 303
        finally:
            await phone.close()
        (panic,) = await incidents(p, "panic")
        assert panic["state"] == "new"
        notes = await p.services.store.read(
            lambda c: [
                r["detail"]
                for r in c.execute(
                    "SELECT detail FROM incident_log WHERE incident_id = ? AND action = 'note'", (panic["id"],)
                )
            ]
        )
        assert notes == ["住户报平安：我很好"]
        other = await p.services.store.read(lambda c: care.context(c, {"id": -1, "place": {"site": SITE, **FLAT_302}}))
        assert other is None


# ---------------------------------------------------------------- the resident's phone


async def test_a_resident_signs_the_flat_up_and_nobody_else_can(tmp_path: Path) -> None:
    clock = TimeMachine()
    async with running_portal(write_config(tmp_path, None), clock.options()) as p:
        await estate_with_staff(p)
        zhang, wang = await person(p, ZHANG), await person(p, WANG)
        code = await plate_code(p, "3", "2", "301")
        hid = await house_id(p, "3", "2", "301")
        # A stranger is sent to sign in; the neighbour of 302 is refused at 301's plate.
        anon = aiohttp.ClientSession(base_url=p.origin)
        try:
            r = await anon.get(f"/p/{code}/care", allow_redirects=False)
            assert r.status == 303 and r.headers["Location"].startswith("/m/login")
            html = await (await anon.get(f"/p/{code}")).text()
            assert 'id="care-card"' not in html
        finally:
            await anon.close()
        neighbour, ncsrf = await resident_browser(p, wang["id"])
        try:
            assert (await neighbour.get(f"/p/{code}/care")).status == 403
            r = await neighbour.post(
                f"/p/{code}/care/ok", data={"csrf": ncsrf}, headers={"Origin": p.origin}, allow_redirects=False
            )
            assert r.status == 403
        finally:
            await neighbour.close()

        phone, pcsrf = await resident_browser(p, zhang["id"])
        try:
            html = await (await phone.get(f"/p/{code}")).text()
            assert 'id="care-signup"' in html
            form_page = await (await phone.get(f"/p/{code}/care")).text()
            assert f'id="person-{zhang["id"]}" checked' in form_page
            base = {
                "csrf": pcsrf,
                "action": "enrol",
                "person": str(zhang["id"]),
                "contact_name": "李娜",
                "contact_relation": "女儿",
                "hours": "24",
                "night_watch": "1",
                "night_from": "00:00",
                "night_to": "05:00",
            }
            r = await phone.post(
                f"/p/{code}/care",
                data={**base, "contact_phone": "110"},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            text = await r.text()
            assert r.status == 400 and "联系人电话格式不正确" in text and 'value="李娜"' in text
            r = await phone.post(
                f"/p/{code}/care",
                data={**base, "person": str(wang["id"]), "contact_phone": CONTACT},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            assert r.status == 400  # someone of another flat
            assert await p.services.store.read(lambda c: care_model.household_of_house(c, hid)) is None
            r = await phone.post(
                f"/p/{code}/care",
                data={**base, "contact_phone": CONTACT},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            assert r.status == 303
            h = await p.services.store.read(lambda c: care_model.household_of_house(c, hid))
            assert h is not None and (h.consent_how, h.consent_by, h.enrolled_by) == (
                "resident_phone",
                "张伟",
                f"resident:{zhang['id']}",
            )
            html = await (await phone.get(f"/p/{code}?care=saved")).text()
            assert 'id="care-ok"' in html and "136****6666" in html and 'id="care-ask"' not in html
            # Stopping it is the flat's own choice, audited.
            r = await phone.post(
                f"/p/{code}/care",
                data={"csrf": pcsrf, "action": "stop"},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            assert r.status == 303
            assert await p.services.store.read(lambda c: care_model.household_of_house(c, hid)) is None
            (end,) = await audit_rows(p, "care.end")
            assert end["actor"] == f"resident:{zhang['id']}"
        finally:
            await phone.close()


async def test_translations_have_the_same_keys() -> None:
    root = Path(__file__).resolve().parent.parent / "portal" / "web" / "i18n"
    zh = json.loads((root / "zh-CN.json").read_text(encoding="utf-8"))
    en = json.loads((root / "en.json").read_text(encoding="utf-8"))
    assert set(zh) == set(en)
    odd = [k for k in zh if zh[k].count("{") != en[k].count("{")]
    assert not odd, odd


# ---------------------------------------------------------------- up to the grid platform


async def test_a_care_alert_goes_up_to_the_grid_platform_and_the_residents_ok_follows(tmp_path: Path) -> None:
    """With the default rules a care alert goes up when it opens (category 独居老人关爱), without the contact's
    number; "我很好" closes it at the estate and that goes up as the next revision of the same event."""
    from tests.grid_support import grid_stub, grid_yaml, records

    stub = await grid_stub(tmp_path / "platform")
    clock = TimeMachine()
    try:
        cfg = write_config(tmp_path, None, extra=grid_yaml(tmp_path, stub.info["url"]))
        async with running_portal(cfg, clock.options()) as p:
            await estate_with_staff(p)
            zhang = await person(p, ZHANG)
            await enrol(p, [zhang["id"]], hours=24)
            # A day passes on the monotonic clock the rule runs on; the wall clock stays with the platform's (the
            # stub checks signatures against its own clock).
            clock.mono_s += 24 * HOUR + 1
            await watch(p).check_now()
            (inc,) = await incidents(p, "care")
            number = await p.services.store.read(
                lambda c: c.execute("SELECT number FROM grid_cases WHERE incident_id = ?", (inc["id"],)).fetchone()[0]
            )
            got = await wait_for(lambda: records(stub), what="the care alert at the platform")
            rec = got[number]["last"]
            assert rec["subcategory"]["name"] == "独居老人关爱" and rec["kind"] == "report"
            assert CONTACT not in json.dumps(rec, ensure_ascii=False)
            code = await plate_code(p, "3", "2", "301")
            phone, pcsrf = await resident_browser(p, zhang["id"])
            try:
                r = await phone.post(
                    f"/p/{code}/care/ok", data={"csrf": pcsrf}, headers={"Origin": p.origin}, allow_redirects=False
                )
                assert r.status == 303
            finally:
                await phone.close()

            async def closed() -> dict[str, Any] | None:
                last = (await records(stub))[number]["last"]
                return last if last["estate"]["closed"] else None

            last = await wait_for(closed, what="the estate's closure at the platform")
            assert last["kind"] == "update" and last["estate"]["cause"] == "false"
    finally:
        await stub.stop()
        await stub.session.close()
