"""Guard patrols against a real portal on loopback (real SQLite store), its clocks in the test's hand.

As the outsider: the guard who scans before the round, skips a point, scans one twice, comes back late, or never;
the phone that sends the same scan again, the page opened by another sign-in or left open too long; someone trying
codes that are no plate (not found, then throttled), the withdrawn plate, the plate of another estate; the office
that types a bad schedule (a clear error, nothing stored). Plates are printed and read back with a standard QR
decoder from the PDF as an independent renderer draws it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pypdfium2
import pytest
import zxingcpp

from portal.alarms import incidents as alarms
from portal.patrol import model as patrol_model
from portal.patrol.views import ENGINE
from tests.care_patrol_support import GUARD, GUARD_PW, TimeMachine, board, estate_with_staff, staff_browser
from tests.portal_support import Portal, running_portal, write_config

TZ = ZoneInfo("Asia/Shanghai")
MIN = 60.0
PUBLIC = "https://wy.example.cn"  # what plates print (public_url)
EXTRA = f"""
public_url: {PUBLIC}
sessions: {{idle_timeout_s: 86400, absolute_timeout_s: 172800}}
site_maps:
  - {{site: s1, width: 400, height: 300, buildings: [{{code: "3", x: 100, y: 100, w: 80, h: 60}}]}}
"""


def at_local(hour: int, minute: int) -> float:
    return datetime.now(TZ).replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp()


def engine(p: Portal) -> Any:
    return p.client.server.app[ENGINE]


async def post(p: Portal, path: str, data: dict[str, str]) -> aiohttp.ClientResponse:
    return await p.client.post(path, data={**data, "csrf": p.csrf}, headers={"Origin": p.origin}, allow_redirects=False)


async def add_checkpoint(p: Portal, name: str) -> patrol_model.Checkpoint:
    r = await post(p, "/patrol/checkpoints", {"site": "s1", "name": name})
    assert r.status == 303, await r.text()
    cps = await p.services.store.read(lambda c: patrol_model.checkpoints(c, site="s1"))
    return next(cp for cp in cps if cp.name == name)


async def add_route(p: Portal, points: list[patrol_model.Checkpoint], **kw: str) -> int:
    data = {
        "site": "s1",
        "name": "夜间巡逻",
        "starts": "22:00",
        "ends": "06:00",
        "every_min": "120",
        "window_min": "30",
        "late_min": "30",
        "ordered": "1",
        "guard": GUARD,
        "active": "1",
        **kw,
    }
    data.update({f"at-{cp.id}": str(i + 1) for i, cp in enumerate(points)})
    r = await post(p, "/patrol/routes", data)
    assert r.status == 303, await r.text()
    return int(r.headers["Location"].rsplit("route-", 1)[1])


async def scan(http: aiohttp.ClientSession, csrf: str, origin: str, code: str) -> tuple[int, str]:
    """Open the checkpoint's page as the phone's camera would, confirm; (status, the result page or answer)."""
    r = await http.get(f"/g/c/{code}")
    text = await r.text()
    m = re.search(r'name="nonce" value="([^"]+)"', text)
    if m is None:
        return r.status, text
    r = await http.post(
        f"/g/c/{code}", data={"csrf": csrf, "nonce": m.group(1)}, headers={"Origin": origin}, allow_redirects=True
    )
    return r.status, await r.text()


def outcome(html: str) -> str:
    m = re.search(r'id="scan-result" data-outcome="([a-z]+)"', html)
    assert m, html[:2000]
    return m.group(1)


def visits(html: str) -> list[tuple[str, str]]:
    return re.findall(r'<li data-status="([a-z_]+)" data-in-order="(true|false)">', html)


async def patrol_incidents(p: Portal) -> list[dict[str, Any]]:
    await board(p).feed_now()
    return [i for i in await p.services.store.read(alarms.open_incidents) if i["kind"] == "patrol"]


# ---------------------------------------------------------------- checkpoints and their plates


async def test_checkpoint_plates_are_unguessable_printed_and_placed(tmp_path: Path) -> None:
    clock = TimeMachine()
    async with running_portal(write_config(tmp_path, None, extra=EXTRA), clock.options()) as p:
        await estate_with_staff(p)
        gate = await add_checkpoint(p, "北门岗亭")
        garage = await add_checkpoint(p, "3幢地下车库")
        for cp in (gate, garage):
            assert len(cp.code) >= 22 and re.fullmatch(r"[A-Za-z0-9_-]+", cp.code)
            stored = await p.services.store.read(
                lambda c, cp=cp: c.execute(
                    "SELECT code_hash, sealed FROM patrol_checkpoints WHERE id = ?", (cp.id,)
                ).fetchone()
            )
            assert stored[0] != cp.code and len(stored[0]) == 64
            assert cp.code.encode() not in stored[1]  # the database alone prints no plate (sealed with the store key)
        assert gate.code != garage.code
        # Bad input: a clear error, nothing stored.
        for bad in ("北门岗亭", "", "x" * 41):
            r = await post(p, "/patrol/checkpoints", {"site": "s1", "name": bad})
            assert r.status == 400 and 'id="error"' in await r.text()
        r = await post(p, "/patrol/checkpoints", {"site": "mars", "name": "火星"})
        assert r.status == 404
        assert len(await p.services.store.read(lambda c: patrol_model.checkpoints(c))) == 2

        # Printed like door plates: the PDF's QR codes, drawn by an independent renderer, read back as the URLs.
        r = await p.client.get("/patrol/plates.pdf?site=s1")
        assert r.status in (200, 503), await r.text()
        if r.status == 200:
            pdf = pypdfium2.PdfDocument(await r.read())
            image = pdf[0].render(scale=300 / 72).to_pil()
            found = sorted(x.text for x in zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode))
            assert found == sorted(f"{PUBLIC}/g/c/{cp.code}" for cp in (gate, garage))
        sheet = await (await p.client.get(f"/patrol/plates?site=s1&id={gate.id}")).text()
        assert sheet.count("<svg") == 1 and "北门岗亭" in sheet and "巡更点 · 保安扫码" in sheet

        # Placed on the site map: shown on the board's map; a place off the map is refused.
        r = await post(p, f"/patrol/checkpoints/{gate.id}", {"action": "place", "x": "500", "y": "10"})
        assert r.status == 400
        r = await post(p, f"/patrol/checkpoints/{gate.id}", {"action": "place", "x": "20", "y": "280"})
        assert r.status == 303
        svg = await (await p.client.get("/board/map?site=s1")).text()
        assert f'data-marker="cp:{gate.id}"' in svg and "北门岗亭" in svg and f"cp:{garage.id}" not in svg

        # A new code stops the old plate at once; a withdrawn checkpoint's plate is not found.
        gw, _ = await staff_browser(p, GUARD, GUARD_PW)
        try:
            assert (await gw.get(f"/g/c/{gate.code}")).status == 200
            r = await post(p, f"/patrol/checkpoints/{gate.id}", {"action": "reissue"})
            assert r.status == 303
            assert (await gw.get(f"/g/c/{gate.code}")).status == 404
            new = await p.services.store.read(lambda c: patrol_model.checkpoint(c, gate.id))
            assert new is not None and new.code != gate.code and (await gw.get(f"/g/c/{new.code}")).status == 200
            r = await post(p, f"/patrol/checkpoints/{garage.id}", {"action": "withdraw"})
            assert r.status == 303
            assert (await gw.get(f"/g/c/{garage.code}")).status == 404
        finally:
            await gw.close()
        reissued = await p.services.store.read(
            lambda c: [
                r["action"] for r in c.execute("SELECT action FROM audit WHERE action LIKE 'patrol.%' ORDER BY id")
            ]
        )
        assert reissued == [
            "patrol.checkpoint",
            "patrol.checkpoint",
            "patrol.place",
            "patrol.reissue",
            "patrol.withdraw",
        ]


async def test_a_route_with_bad_times_or_points_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    clock = TimeMachine()
    async with running_portal(write_config(tmp_path, None, extra=EXTRA), clock.options()) as p:
        await estate_with_staff(p)
        a = await add_checkpoint(p, "A点")
        b = await add_checkpoint(p, "B点")
        base = {
            "site": "s1",
            "name": "夜巡",
            "starts": "22:00",
            "ends": "06:00",
            "every_min": "120",
            "window_min": "30",
            "late_min": "30",
            f"at-{a.id}": "1",
            f"at-{b.id}": "2",
        }
        cases = {
            "patrol.bad_time": {"starts": "24:00"},
            "patrol.bad_minutes": {"every_min": "5"},
            "patrol.bad_name": {"name": " "},
            "patrol.need_points": {f"at-{a.id}": "", f"at-{b.id}": ""},
            "patrol.same_position": {f"at-{b.id}": "1"},
            "patrol.bad_position_number": {f"at-{a.id}": "first"},
        }
        for key, bad in cases.items():
            r = await post(p, "/patrol/routes", {**base, **bad})
            text = await r.text()
            assert r.status == 400, key
            assert 'id="error"' in text and 'data-field="' in text, key
            assert f'value="{base["ends"]}"' in text, key  # the form is kept
        assert await p.services.store.read(lambda c: patrol_model.routes(c)) == []
        rid = await add_route(p, [b, a])
        (r,) = await p.services.store.read(lambda c: patrol_model.routes(c))
        assert r.id == rid and r.points == (b.id, a.id) and r.ordered
        rounds = r.shift_rounds(datetime.now(TZ).date(), TZ)
        assert [x.at.astimezone(TZ).strftime("%H:%M") for x in rounds] == ["22:00", "00:00", "02:00", "04:00"]
        assert all(x.day == rounds[0].day for x in rounds) and rounds[-1].due - rounds[-1].at == timedelta(minutes=30)


# ---------------------------------------------------------------- a night's rounds


async def test_a_nights_rounds_on_time_late_missed_and_the_report(tmp_path: Path) -> None:
    clock = TimeMachine(wall_s=at_local(21, 58))
    async with running_portal(write_config(tmp_path, None, extra=EXTRA), clock.options()) as p:
        await estate_with_staff(p)
        a, b, c = [await add_checkpoint(p, n) for n in ("A北门", "B车库", "C花园")]
        await add_route(p, [a, b, c])
        eng = engine(p)
        gw, gcsrf = await staff_browser(p, GUARD, GUARD_PW)
        try:
            # Before the first round: recorded as outside any round.
            status, html = await scan(gw, gcsrf, p.origin, a.code)
            assert status == 200 and outcome(html) == "outside" and 'id="outside"' in html
            clock.step(7 * MIN)  # 22:05
            await eng.tick_now()
            status, html = await scan(gw, gcsrf, p.origin, a.code)
            assert outcome(html) == "counted" and visits(html) == [("on_time", "true")]
            status, html = await scan(gw, gcsrf, p.origin, c.code)  # B skipped: out of order on an ordered route
            assert visits(html) == [("on_time", "false")]
            status, html = await scan(gw, gcsrf, p.origin, a.code)
            assert outcome(html) == "repeat"
            phone = await (await gw.get("/g")).text()
            assert f'data-checkpoint="{b.id}" data-status="due"' in phone and "B车库" in phone

            # 22:31: the window is over and B was not reached: an alert on the board, B marked on the map.
            clock.step(26 * MIN)
            await eng.tick_now()
            (inc,) = await patrol_incidents(p)
            assert inc["type"] == "patrol.overdue" and inc["state"] == "new" and inc["data"]["checkpoints"] == ["B车库"]
            assert inc["data"]["markers"] == [f"cp:{b.id}"] and inc["priority"] == patrol_model.PRIORITY
            assert inc["title"]["zh-CN"] == "巡更超时：1 个巡更点未按时到达"
            # 22:40: B late; the round is complete and the alert marked restored.
            clock.step(9 * MIN)
            status, html = await scan(gw, gcsrf, p.origin, b.code)
            assert visits(html) == [("late", "true")]
            (inc,) = await patrol_incidents(p)
            assert inc["restored_at"]

            # The 00:00 round: nobody comes. Overdue at 00:30, missed at 01:00 (the same incident).
            clock.step(80 * MIN)  # 00:00
            await eng.tick_now()
            clock.step(31 * MIN)
            await eng.tick_now()
            second = [i for i in await patrol_incidents(p) if i["id"] != inc["id"]]
            assert len(second) == 1 and second[0]["type"] == "patrol.overdue" and second[0]["count"] == 3
            clock.step(30 * MIN)
            await eng.tick_now()
            (missed,) = [i for i in await patrol_incidents(p) if i["id"] == second[0]["id"]]
            assert missed["type"] == "patrol.missed" and missed["data"]["checkpoints"] == ["A北门", "B车库", "C花园"]
            assert await eng.tick_now() and len(await patrol_incidents(p)) == 2  # nothing raised twice
        finally:
            await gw.close()

        # The report: per shift and per guard, printable, and as CSV.
        day = datetime.fromtimestamp(at_local(21, 58), TZ).date().isoformat()
        html = await (await p.client.get(f"/patrol/report?from={day}&to={day}")).text()
        row = re.search(rf'<tr data-route="\d+" data-day="{day}">(.*?)</tr>', html, re.S)
        assert row, html
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1))
        assert cells[2:8] == ["2", "2", "1", "3", "0", "1"], cells  # rounds, on time, late, missed, pending, order
        g = re.search(r'<tr data-guard="guard1">(.*?)</tr>', html, re.S)
        assert g and re.findall(r"<td[^>]*>([^<]*)</td>", g.group(1))[1:] == ["2", "1", "3", "1", "1", "1"]
        assert 'id="print"' in html and "@media print" not in html  # the print sheet is in patrol.css
        r = await p.client.get(f"/patrol/report.csv?from={day}&to={day}")
        body = (await r.read()).decode("utf-8-sig")
        rows = list(csv.reader(io.StringIO(body)))
        assert rows[0] == list(
            ("shift_day", "route", "round", "checkpoint", "status", "guard", "scanned_local", "in_order")
        )
        statuses = sorted(x[4] for x in rows[1:])
        assert statuses == sorted(["on_time", "on_time", "late", "missed", "missed", "missed", "outside", "repeat"])
        assert any(x[3] == "C花园" and x[4] == "on_time" and x[7] == "0" for x in rows)


@pytest.mark.parametrize("change", ["a point taken off", "switched off"])
async def test_a_route_changed_mid_round_leaves_the_round_under_way_as_it_began(tmp_path: Path, change: str) -> None:
    """The office changes the route while a round is under way (the guard's phone still lists its points): what the
    guard scans of the round's points counts for it, and nothing rings; the next round follows the route as it is."""
    clock = TimeMachine(wall_s=at_local(21, 58))
    async with running_portal(write_config(tmp_path, None, extra=EXTRA), clock.options()) as p:
        await estate_with_staff(p)
        a, b, c = [await add_checkpoint(p, n) for n in ("A北门", "B车库", "C花园")]
        rid = await add_route(p, [a, b, c], ordered="")
        eng = engine(p)
        gw, gcsrf = await staff_browser(p, GUARD, GUARD_PW)
        try:
            clock.step(7 * MIN)  # 22:05
            await eng.tick_now()
            _, html = await scan(gw, gcsrf, p.origin, a.code)
            assert outcome(html) == "counted"
            clock.step(1 * MIN)  # 22:06: the office changes the route
            form = {"site": "s1", "name": "夜间巡逻", "starts": "22:00", "ends": "06:00", "every_min": "120"}
            form |= {"window_min": "30", "late_min": "30", "guard": GUARD, f"at-{a.id}": "1", f"at-{b.id}": "2"}
            # "active" a checkbox, which a browser leaves out of the form when it is unticked
            form |= {f"at-{c.id}": "3"} if change == "switched off" else {"active": "1"}
            assert (await post(p, f"/patrol/routes/{rid}", form)).status == 303
            assert "C花园" in await (await gw.get("/g")).text()
            clock.step(2 * MIN)  # 22:08
            for cp in (b, c):
                _, html = await scan(gw, gcsrf, p.origin, cp.code)
                assert outcome(html) == "counted" and visits(html) == [("on_time", "true")], cp.name
            clock.step(25 * MIN)  # 22:33: the window is over, nothing rings
            await eng.tick_now()
            assert await patrol_incidents(p) == []
            clock.step(88 * MIN)  # 00:01: the allowance is long over, the next round has begun
            await eng.tick_now()
            assert await patrol_incidents(p) == []

            def rounds(conn: Any) -> list[tuple[str, list[int], str, list[int]]]:
                rows = conn.execute("SELECT points, state, missed FROM patrol_rounds ORDER BY round_at").fetchall()
                return [(json.loads(r[0]), r[1], json.loads(r[2] or "[]")) for r in rows]

            first = ([a.id, b.id, c.id], "done", [])
            after = [] if change == "switched off" else [([a.id, b.id], "open", [])]
            assert await p.services.store.read(rounds) == [first, *after]
        finally:
            await gw.close()


# ---------------------------------------------------------------- replays and forged codes


async def test_replayed_scans_and_forged_codes_are_refused(tmp_path: Path) -> None:
    clock = TimeMachine(wall_s=at_local(22, 5))
    async with running_portal(write_config(tmp_path, None, extra=EXTRA), clock.options()) as p:
        await estate_with_staff(p)
        a = await add_checkpoint(p, "A北门")
        b = await add_checkpoint(p, "B车库")
        await add_route(p, [a, b], ordered="")
        await p.services.auth.create_user("guard2", "guard", GUARD_PW, must_change=False)
        g1, c1 = await staff_browser(p, GUARD, GUARD_PW)
        g2, c2 = await staff_browser(p, "guard2", GUARD_PW)
        try:
            page = await (await g1.get(f"/g/c/{a.code}")).text()
            nonce = re.search(r'name="nonce" value="([^"]+)"', page)
            assert nonce
            form = {"csrf": c1, "nonce": nonce.group(1)}
            r = await g1.post(f"/g/c/{a.code}", data=form, headers={"Origin": p.origin}, allow_redirects=False)
            assert r.status == 303
            again = await g1.post(f"/g/c/{a.code}", data=form, headers={"Origin": p.origin}, allow_redirects=False)
            assert again.status == 409 and 'data-problem="patrol.refused.replayed"' in await again.text()
            # Another phone's page, another checkpoint's page, a page left open too long.
            page = await (await g1.get(f"/g/c/{b.code}")).text()
            theirs = re.search(r'name="nonce" value="([^"]+)"', page)
            assert theirs
            r = await g2.post(
                f"/g/c/{b.code}",
                data={"csrf": c2, "nonce": theirs.group(1)},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            assert r.status == 409 and "patrol.refused.mismatch" in await r.text()
            page = await (await g1.get(f"/g/c/{b.code}")).text()
            other = re.search(r'name="nonce" value="([^"]+)"', page)
            assert other
            r = await g1.post(
                f"/g/c/{a.code}",
                data={"csrf": c1, "nonce": other.group(1)},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            assert r.status == 409
            page = await (await g1.get(f"/g/c/{b.code}")).text()
            late = re.search(r'name="nonce" value="([^"]+)"', page)
            assert late
            clock.step(11 * MIN)
            r = await g1.post(
                f"/g/c/{b.code}",
                data={"csrf": c1, "nonce": late.group(1)},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            assert r.status == 409 and "patrol.refused.expired" in await r.text()
            refused = await p.services.store.read(
                lambda c: [
                    r["detail"].split(":")[0]
                    for r in c.execute("SELECT detail FROM audit WHERE action = 'patrol.refused' ORDER BY id")
                ]
            )
            assert refused == ["replayed", "mismatch", "mismatch", "expired"]
            scans = await p.services.store.read(lambda c: c.execute("SELECT count(*) FROM patrol_scans").fetchone()[0])
            assert scans == 1
            # The same token reaching the store twice (a restart between) is refused there too.
            cp = await p.services.store.read(lambda c: patrol_model.checkpoint(c, a.id))
            assert cp is not None
            used = await p.services.store.read(lambda c: c.execute("SELECT nonce FROM patrol_scans").fetchone()[0])
            try:
                await p.services.store.run_write(lambda c: patrol_model.scan(c, cp, GUARD, used, clock.now(), TZ))
            except patrol_model.Replayed:
                pass
            else:
                raise AssertionError("a used token was taken again")

            # Codes that are no plate: not found (never a hint), then throttled.
            for n in range(20):
                r = await g2.get(f"/g/c/{'A' * 22}{n:02d}")
                assert r.status == 404 and "patrol.unknown_code" in await r.text()
            r = await g2.get(f"/g/c/{a.code}")
            assert r.status == 429  # this address tried too many
            # Nobody signed in is sent to sign in first; a resident or the public never reaches the page.
            anon = aiohttp.ClientSession(base_url=p.origin)
            try:
                r = await anon.get(f"/g/c/{b.code}", allow_redirects=False)
                assert r.status == 303 and r.headers["Location"].startswith("/login?next=/g/c/")
            finally:
                await anon.close()
        finally:
            await g1.close()
            await g2.close()
