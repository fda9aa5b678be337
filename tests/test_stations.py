"""Guard stations: a guardroom PC's browser keeps its guard signed in for a whole shift, each guard signs on for the
audit, the next guard's sign-on is a recorded handover; and every time a person reads is in the site's time zone,
labelled (issue 15 items 2 and 11).

The wall clock of sessions is injected (a quiet night is ten hours of it); everything else is the real portal on
loopback with its SQLite store.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import ClientSession

from portal.app import Options
from portal.web.auth import STATION_COOKIE
from tests.portal_support import Portal, add_user, csrf_of, page_csrf, post_form, running_portal, write_config
from tests.registry_support import admin_session, estate_csv, import_csv, plate_code
from tests.test_alarm_board import FakeClock

PW = "guard-password-0001"


async def sign_in(p: Portal, user: str, note: str = "") -> int:
    page = await (await p.client.get("/login")).text()
    r = await post_form(
        p, "/login", {"user": user, "password": PW, "next": "/console", "handover_note": note}, csrf=csrf_of(page)
    )
    return r.status


async def test_a_station_session_lasts_the_shift_and_the_next_sign_on_is_a_handover(tmp_path: Path) -> None:
    wall = FakeClock(1_800_000_000.0)
    async with running_portal(write_config(tmp_path, None), Options(clock=wall)) as p:
        await add_user(p, "boss", "admin", PW)
        for g in ("guard1", "guard2"):
            await add_user(p, g, "guard", PW)
        # The administrator, at the guardroom PC, makes its browser a station.
        assert await sign_in(p, "boss") == 303
        csrf = await page_csrf(p, "/stations")
        r = await post_form(p, "/stations", {"name": "东门岗亭"}, csrf=csrf)
        assert r.status == 303
        cookie = p.client.session.cookie_jar.filter_cookies(p.client.make_url("/"))
        assert STATION_COOKIE in cookie
        station_token = cookie[STATION_COOKIE].value
        r = await post_form(p, "/stations", {"name": "东门岗亭"}, csrf=csrf)
        assert r.headers["Location"] == "/stations?error=exists"
        await post_form(p, "/logout", {}, csrf=csrf)

        # guard1 signs on at the station: a shift starts; the sign-in page said where.
        page = await (await p.client.get("/login")).text()
        assert "值班岗亭：东门岗亭" in page
        assert await sign_in(p, "guard1") == 303
        # A quiet night: ten hours without a click. An ordinary session would have ended after 30 minutes idle.
        wall.t += 10 * 3600
        r = await p.client.get("/console", allow_redirects=False)
        assert r.status == 200
        # The station session is worth nothing in another browser (without the station cookie).
        session = p.client.session.cookie_jar.filter_cookies(p.client.make_url("/"))["gh_session"].value
        async with ClientSession(cookies={"gh_session": session}) as thief:
            r = await thief.get(f"{p.origin}/console", allow_redirects=False)
            assert r.status == 303 and r.headers["Location"].startswith("/login")

        # guard2 takes over: the login page names who is on duty, the handover note is kept with the open count.
        p.client.session.cookie_jar.clear(lambda c: c.key == "gh_session")
        p.client.session.cookie_jar.update_cookies({STATION_COOKIE: station_token})
        page = await (await p.client.get("/login")).text()
        assert "当前值班：guard1" in page and 'name="handover_note"' in page
        assert await sign_in(p, "guard2", "北门道闸故障已报修；3幢漏水待跟进") == 303
        shifts = await p.services.store.read(
            lambda c: [
                dict(r)
                for r in c.execute(
                    "SELECT user_name, ended_how, handed_to, note, open_at_start, open_at_end FROM station_shifts"
                    " ORDER BY id"
                )
            ]
        )
        assert shifts[0] == {
            "user_name": "guard1",
            "ended_how": "handover",
            "handed_to": "guard2",
            "note": "北门道闸故障已报修；3幢漏水待跟进",
            "open_at_start": 0,
            "open_at_end": 0,
        }
        assert shifts[1]["user_name"] == "guard2" and shifts[1]["ended_how"] is None
        left = await p.services.store.read(
            lambda c: c.execute(
                "SELECT count(*) FROM sessions s JOIN users u ON u.id = s.user_id WHERE u.name = 'guard1'"
            ).fetchone()[0]
        )
        assert left == 0  # guard1's station session ended with the handover
        audit = await p.services.store.read(
            lambda c: [r[0] for r in c.execute("SELECT action FROM audit WHERE action LIKE 'station.%' ORDER BY id")]
        )
        assert audit == ["station.bind", "station.signon", "station.handover"]
        # The record is on the stations page, in the site's time, labelled.
        page = await (await p.client.get("/stations")).text()
        assert "交接给 guard2" in page and "北门道闸故障已报修" in page and "Asia/Shanghai (UTC+08:00)" in page
        # Signing out ends the shift.
        await post_form(p, "/logout", {}, csrf=csrf_of(page))
        how = await p.services.store.read(
            lambda c: c.execute("SELECT ended_how FROM station_shifts WHERE user_name = 'guard2'").fetchone()[0]
        )
        assert how == "signout"
        # A shift has an end: past station_timeout_s (14 h) the session is over, however the night went.
        assert await sign_in(p, "guard1") == 303
        wall.t += 15 * 3600
        r = await p.client.get("/console", allow_redirects=False)
        assert r.status == 303


async def test_times_people_read_are_in_the_site_time_zone_and_labelled(tmp_path: Path) -> None:
    wall = FakeClock(1_800_000_000.0)  # 2027-01-15 08:00:00 UTC = 16:00 in Shanghai
    async with running_portal(write_config(tmp_path, None), Options(clock=wall)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        code = await plate_code(p, "3", "2", "302")
        await p.services.store.run_write(
            lambda c: c.execute("UPDATE users SET created_at = '2026-03-01T16:30:05.000000Z'")
        )
        # A problem report (a work item) and a pending registration, stored at a known UTC time.
        page = await (await p.client.get(f"/p/{code}/report")).text()
        r = await post_form(p, f"/p/{code}/report", {"category": "repair", "text": "楼道灯坏了"}, csrf=csrf_of(page))
        assert r.status == 303  # on to the report's progress page
        page = await (await p.client.get(f"/p/{code}/register")).text()
        r = await post_form(
            p,
            f"/p/{code}/register",
            {
                "name": "新住户",
                "phone": "13500001234",
                "role": "family",
                "password": "password-1234",
                "confirm": "password-1234",
            },
            csrf=csrf_of(page),
        )
        assert r.status == 200
        await p.services.store.run_write(
            lambda c: (
                c.execute("UPDATE work_items SET created_at = '2026-03-01T16:30:05.000000Z'"),
                c.execute(
                    "UPDATE reg_residents SET created_at = '2026-03-01T16:30:05.000000Z' WHERE status = 'pending'"
                ),
            )
        )
        label = "Asia/Shanghai (UTC+08:00)"
        for path in ("/users", "/admin/registry/work", "/admin/registry/pending", "/admin/registry/audit"):
            text = await (await p.client.get(path)).text()
            assert label in text, path
            if path != "/admin/registry/audit":
                assert "2026-03-02 00:30" in text, path  # 16:30 UTC is half past midnight the next day there
                assert "2026-03-01 16:30" not in text, path
