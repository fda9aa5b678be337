"""Care and patrols end to end, in real headless Chromium (phones at 390x844, the guardroom's kiosk console).

Care: the portal (on the test's loop, its clocks in the test's hand) with Mosquitto, ``gatehouse gateway run`` as a
process, the door-controller stub (Modbus TCP) and the QR reader stub (a pseudo-terminal). The resident signs the flat
up on the phone, scans his own pass at the real reader (the gateway opens the door and reports the grant: the
household's activity comes from the field), then nothing for 24 hours: nothing rings at 23 h 59 min, the care alert
rings on the guard's console at 24 h, the guard sees the household and reveals the contact's number, and "我很好" on
the phone closes it on the console.

Patrols: the office adds checkpoints, places one on the site map and makes a route in its pages, and prints the plates;
the QR codes read from the printed PDF open the checkpoint's page on the guard's phone, which signs in and records
the scan on time; the checkpoint nobody reaches rings on the console at the end of its window and is missed at the
end of the allowance; the report shows it.

Last, the same pages against ``python -m portal run`` as a process: a scan outside any round, a replayed scan, the
care sign-up and "我很好", and everything still there after a restart.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pypdfium2
import zxingcpp
from PIL import Image
from playwright.async_api import Page, async_playwright, expect

from gateway.tooling.broker import MosquittoProcess
from portal.alarms import incidents as alarms
from portal.care import model as care_model
from portal.patrol import model as patrol_model
from tests import procs
from tests.care_patrol_support import GUARD, GUARD_PW, TimeMachine, board, estate_with_staff, person
from tests.doors_support import door_gateway_config
from tests.portal_support import (
    SITE,
    csrf_of,
    portal_process,
    portal_public_key,
    running_portal,
    wait_for,
    write_config,
)
from tests.registry_support import ADMIN, ADMIN_PW, estate_csv, form, plate_code
from tests.stubs import run_stub
from tests.test_console_shell_browser import CHROMIUM, FLAGS, KIOSK, rings, sign_in, silent

GW = "gw1"
DOOR, READER = "b3-u2", "qr-b3-u2"
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
DESK = {"viewport": {"width": 1400, "height": 1000}}
ZHANG, ZHANG_PW = "13812345678", "zhangwei-password-2026"
CONTACT = "13655556666"
HOUR = 3600.0
T = 10_000
TZ = ZoneInfo("Asia/Shanghai")
PUBLIC = "https://wy.example.cn"  # what plates print (public_url); a phone that scans one reaches this portal there
EXTRA = f"""
public_url: {PUBLIC}
sessions: {{idle_timeout_s: 86400, absolute_timeout_s: 172800}}
site_maps:
  - {{site: s1, width: 400, height: 300, buildings: [{{code: "3", x: 100, y: 100, w: 80, h: 60}}]}}
"""


@asynccontextmanager
async def gateway_process(cfg: Path, logdir: Path) -> AsyncIterator[procs.Child]:
    child = await asyncio.to_thread(lambda: procs.gateway(cfg, logdir).start())
    try:
        yield child
    finally:
        await asyncio.to_thread(child.stop)


async def qr_text(page: Page, selector: str) -> str:
    shot = await page.locator(selector).screenshot()
    found = [
        r.text for r in zxingcpp.read_barcodes(Image.open(io.BytesIO(shot)), formats=zxingcpp.BarcodeFormat.QRCode)
    ]
    assert len(found) == 1, found
    return found[0]


async def resident_sign_in(page: Page, origin: str, code: str) -> None:
    await page.goto(f"{origin}/m/login?next=/p/{code}")
    await page.fill("#login-phone", ZHANG)
    await page.fill("#login-password", ZHANG_PW)
    await page.click("#login-submit")
    await page.wait_for_url(f"**/p/{code}")


async def give_password(p: Any, phone: str, password: str) -> None:
    digest = await p.services.auth.hash_password(password)
    await p.services.store.run_write(
        lambda c: c.execute(
            "UPDATE reg_people SET password_hash = ?, password_request = NULL WHERE phone = ?", (digest, phone)
        )
    )


async def care_incidents(p: Any) -> list[dict[str, Any]]:
    await board(p).feed_now()
    return [i for i in await p.services.store.read(alarms.open_incidents) if i["kind"] == "care"]


# ---------------------------------------------------------------- care, from the field to the phone's "我很好"


async def test_care_alert_from_the_field_at_the_configured_hour_and_ok_clears_it(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    clock = TimeMachine()
    cfg = write_config(tmp_path / "portal", broker, gateways=[(SITE, GW)], extra=EXTRA)
    async with (
        running_portal(cfg, clock.options()) as p,
        run_stub("firmware_stubs.door_controller", "--tcp", "127.0.0.1:0") as door,
        run_stub("firmware_stubs.qr_reader", "--pty") as reader,
        async_playwright() as pw,
    ):
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        csrf = await estate_with_staff(p)
        r = await form(
            p,
            "/admin/registry/doors",
            {"site": SITE, "gateway": GW, "door": DOOR, "building": "3", "unit": "2", "label": "3幢2单元"},
            csrf,
        )
        assert r.status == 303
        await give_password(p, ZHANG, ZHANG_PW)
        zhang = await person(p, ZHANG)
        code = await plate_code(p, "3", "2", "301")
        public_key = portal_public_key(p)
        gcfg = door_gateway_config(
            tmp_path / "gw",
            broker.port,
            door,
            reader,
            public_key=public_key,
            gateway=GW,
            door_name=DOOR,
            reader_name=READER,
            held_open_s=30,
            reader_misses=4,
        )
        async with gateway_process(gcfg, tmp_path / "logs") as gateway:

            async def door_known() -> bool:
                rows = (await (await p.client.get("/api/doors")).json())["doors"]
                return any(d["door"] == DOOR and d["state"] != "unknown" for d in rows)

            await wait_for(door_known, timeout=20, what="the gateway's door at the portal")
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
            try:
                phone = await (await browser.new_context(**PHONE)).new_page()  # type: ignore[arg-type]
                # The resident turns the care service on from the flat's plate page.
                await resident_sign_in(phone, p.origin, code)
                await phone.click("#care-signup")
                await expect(phone.locator(f"#person-{zhang['id']}")).to_be_checked()
                await phone.fill("#contact-name", "李娜")
                await phone.fill("#contact-relation", "女儿")
                await phone.fill("#contact-phone", CONTACT)
                await phone.select_option("#care-hours", "24")
                await phone.uncheck("#night-watch")  # the test runs at any hour: the no-activity rule only
                await phone.click("#care-submit")
                await phone.wait_for_url(f"**/p/{code}?care=saved")
                await expect(phone.locator("#care-notice")).to_have_text("已保存")
                await expect(phone.locator("#care-contact")).to_contain_text("136****6666")
                await phone.screenshot(path=str(artifacts / "care_phone_signed_up.png"), full_page=True)
                hid = zhang["house_id"]
                h = await p.services.store.read(lambda c: care_model.household_of_house(c, hid))
                assert h is not None and h.consent_how == "resident_phone"

                # His own pass at the unit door's reader: the door opens, the grant reaches the portal, and the
                # household's clock restarts from it.
                await expect(phone.locator("#my-pass")).to_have_attribute("data-state", "ok", timeout=T)
                text = await qr_text(phone, "#my-pass")
                await reader.post("/scan", {"text": text})

                async def credited() -> bool:
                    got = await p.services.store.read(lambda c: care_model.household(c, h.id))
                    return got is not None and got.last_activity == f"pass:{DOOR}"

                await wait_for(credited, timeout=20, what="the pass scan credited to the household")
                t_scan = clock.now()
                assert gateway.alive, gateway.tail()
                await phone.reload()
                await expect(phone.locator("#care-last")).to_contain_text(f"刷码通行（{DOOR}）")

                # Nothing at 23 h 59 min; the alert at 24 h.
                clock.step(24 * HOUR - 60)
                await asyncio.sleep(3.0)  # the watch looks every second
                assert await care_incidents(p) == []
                clock.step(120)
                (inc,) = await wait_for(lambda: care_incidents(p), timeout=10, what="the care alert")
                assert inc["type"] == "care.no_activity" and inc["data"]["since"] >= t_scan.strftime("%Y-%m-%dT%H")

                # The guard of the day signs in at the guardroom: it rings, the household and its contact. (Whatever
                # else the gateway reported meanwhile, a day later, is taken first: only the care alert rings.)
                for other in await p.services.store.read(alarms.open_incidents):
                    if other["kind"] != "care" and other["state"] == "new":
                        await board(p).act(other["id"], "ack", GUARD)
                console = await (await browser.new_context(**DESK)).new_page()
                await sign_in(console, p.origin, "/board")
                card = console.locator(f'#incidents li.incident[data-id="{inc["id"]}"]')
                await expect(card).to_have_attribute("data-kind", "care", timeout=T)
                await expect(card.locator(".title")).to_have_text("独居关爱：已 24 小时无出入活动")
                await expect(card.locator(".tag.restored")).to_be_hidden()  # no activity since: not restored
                assert await rings(console)
                await expect(console.locator("#banner .badge")).to_have_text("独居关爱")
                await card.locator("button.more").click()
                section = card.locator(".detail section.context-care")
                await expect(section).to_contain_text("张伟")
                await expect(section).to_contain_text("136****6666")
                await expect(section).to_contain_text(f"刷码通行（{DOOR}）")
                await section.locator("button.reveal-section").click()
                await expect(section.locator(f'a.call[href="tel:{CONTACT}"]')).to_be_visible(timeout=T)
                await expect(section).to_contain_text("张伟")  # the rest of the household stays shown
                await console.screenshot(path=str(artifacts / "care_board_alert.png"), full_page=True)

                # "我很好" on the phone: the check waits above the help button; answered, the console falls silent.
                await phone.goto(f"{p.origin}/p/{code}")
                await expect(phone.locator("#care-ask")).to_be_visible()
                box_ok = await phone.locator("#care-ok").bounding_box()
                box_sos = await phone.locator("#sos").bounding_box()
                assert box_ok and box_sos and box_ok["y"] < box_sos["y"]
                await phone.screenshot(path=str(artifacts / "care_phone_check.png"), full_page=True)
                for other in await p.services.store.read(alarms.open_incidents):
                    if other["kind"] != "care" and other["state"] == "new":
                        await board(p).act(other["id"], "ack", GUARD)
                await phone.click("#care-ok")
                await phone.wait_for_url(f"**/p/{code}?care=ok")
                await expect(phone.locator("#care-notice")).to_have_text("已报平安，谢谢！")
                await expect(phone.locator("#care-ask")).to_have_count(0)
                await expect(card).to_have_count(0, timeout=T)
                assert await silent(console)
                # In English too.
                await phone.click("#lang-switch")
                await expect(phone.locator("#care-ok")).to_have_text("I am fine")
                audit = await p.services.store.read(
                    lambda c: [
                        r[0]
                        for r in c.execute(
                            "SELECT action FROM audit WHERE action IN ('care.enrol', 'reveal.care_contact', 'care.ok',"
                            " 'alarm.settle') ORDER BY id"
                        )
                    ]
                )
                assert audit == ["care.enrol", "reveal.care_contact", "alarm.settle", "care.ok"]
            finally:
                await browser.close()
            assert gateway.alive, gateway.tail()


# ---------------------------------------------------------------- patrols, from the printed plate to the report


def pdf_codes(data: bytes) -> list[str]:
    pdf = pypdfium2.PdfDocument(data)
    return sorted(
        r.text
        for i in range(len(pdf))
        for r in zxingcpp.read_barcodes(pdf[i].render(scale=300 / 72).to_pil(), formats=zxingcpp.BarcodeFormat.QRCode)
    )


async def test_a_patrol_from_the_printed_plates_to_the_missed_alert_and_the_report(
    tmp_path: Path, artifacts: Path
) -> None:
    start = datetime.now(TZ).replace(hour=21, minute=50, second=0, microsecond=0)
    clock = TimeMachine(wall_s=start.timestamp())
    async with (
        running_portal(write_config(tmp_path, None, extra=EXTRA), clock.options()) as p,
        async_playwright() as pw,
    ):
        await estate_with_staff(p)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
        try:
            office = await (await browser.new_context(**DESK)).new_page()
            await office.goto(f"{p.origin}/login")
            await office.fill("#user", ADMIN)
            await office.fill("#password", ADMIN_PW)
            await office.click("#submit")
            await office.wait_for_url("**/console")
            await office.click("#nav-patrol")
            await office.wait_for_url("**/patrol")
            for name in ("北门岗亭", "3幢车库"):
                await office.fill("#checkpoint-name", name)
                await office.click("#checkpoint-submit")
                await expect(office.locator("#notice")).to_contain_text("已添加巡更点")
            ids = [
                int(x)
                for x in await office.locator("#checkpoints tr[data-checkpoint]").evaluate_all(
                    "rows => rows.map(r => r.getAttribute('data-checkpoint'))"
                )
            ]
            names = await office.locator("#checkpoints tr[data-checkpoint] input[name=name]").evaluate_all(
                "inputs => inputs.map(i => i.value)"
            )
            by_name = dict(zip(names, ids, strict=True))
            garage = by_name["3幢车库"]
            # Placed on the site map with a click.
            await office.click(f"#pick-{garage}")
            box = await office.locator("#patrol-map svg.sitemap").bounding_box()
            assert box is not None
            await office.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
            await expect(office.locator("#notice")).to_contain_text("位置已保存")
            await expect(office.locator(f'#patrol-map [data-marker="cp:{garage}"]')).to_have_count(1)
            assert abs(float(await office.locator(f"#x-{garage}").input_value()) - 200) < 5
            # A route: 22:00 to 06:00, a round every 2 hours, on time within 30 minutes, late within 30 more.
            await office.click("#route-new")
            await office.fill("#route-name", "夜间巡逻")
            await office.fill("#route-starts", "22:00")
            await office.fill("#route-ends", "06:00")
            await office.fill("#route-every", "120")
            await office.fill("#route-window", "30")
            await office.fill("#route-late", "30")
            await office.fill("#route-guard", GUARD)
            await office.fill(f"#at-{by_name['北门岗亭']}", "1")
            await office.fill(f"#at-{garage}", "2")
            await office.click("#route-save")
            await expect(office.locator("#notice")).to_have_text("已保存")
            # The plates as printed: their QR codes are the checkpoints' pages.
            pdf = await office.request.get(f"{p.origin}/patrol/plates.pdf?site={SITE}")
            assert pdf.status == 200, await pdf.text()
            urls = pdf_codes(await pdf.body())
            assert len(urls) == 2 and all(u.startswith(f"{PUBLIC}/g/c/") for u in urls)
            codes = await p.services.store.read(lambda c: {cp.id: cp.code for cp in patrol_model.checkpoints(c)})
            assert f"{PUBLIC}/g/c/{codes[by_name['北门岗亭']]}" in urls
            gate_url = f"{p.origin}/g/c/{codes[by_name['北门岗亭']]}"  # the phone reaches public_url: this portal

            # 22:05: the guard's phone opens the gate's plate, signs in, confirms: on time.
            clock.step(15 * 60)
            phone = await (await browser.new_context(**PHONE)).new_page()  # type: ignore[arg-type]
            await phone.goto(gate_url)
            await phone.wait_for_url("**/login?next=**")
            await phone.fill("#user", GUARD)
            await phone.fill("#password", GUARD_PW)
            await phone.click("#submit")
            await phone.wait_for_url("**/g/c/**")
            await expect(phone.locator("#checkpoint")).to_have_text("北门岗亭")
            await phone.click("#scan-confirm")
            await phone.wait_for_url("**/g/scans/**")
            await expect(phone.locator("#scan-result")).to_have_attribute("data-outcome", "counted")
            await expect(phone.locator("#visits li")).to_have_attribute("data-status", "on_time")
            await phone.screenshot(path=str(artifacts / "patrol_phone_scan.png"), full_page=True)
            await phone.goto(f"{p.origin}/g")
            await expect(phone.locator(f'li[data-checkpoint="{garage}"]')).to_have_attribute("data-status", "due")

            # The console: at 22:31 the garage is overdue; it rings and blinks on the map.
            console = await (await browser.new_context(**DESK)).new_page()
            await sign_in(console, p.origin, "/board")
            assert await silent(console)
            clock.step(26 * 60)
            card = console.locator("#incidents li.incident[data-kind=patrol]")
            await expect(card).to_have_count(1, timeout=T)
            await expect(card.locator(".title")).to_have_text("巡更超时：1 个巡更点未按时到达")
            await expect(card.locator(".where")).to_contain_text("夜间巡逻 22:00")
            assert await rings(console)
            await expect(console.locator(f'svg.sitemap [data-marker="cp:{garage}"]')).to_have_class(
                re.compile(r"\balarm\b"), timeout=T
            )
            await console.screenshot(path=str(artifacts / "patrol_board_overdue.png"), full_page=True)
            await card.locator("button.ack").click()
            await expect(card).to_have_attribute("data-state", "acknowledged", timeout=T)
            # 23:01: not reached within the allowance either: missed.
            clock.step(30 * 60)
            await expect(card.locator(".title")).to_have_text("巡更漏巡：1 个巡更点未巡", timeout=T)

            # The report: the shift, the guard, printable and as CSV.
            await office.goto(f"{p.origin}/patrol/report")
            shift = office.locator("#shifts tbody tr").first
            await expect(shift.locator("td.c-on_time")).to_have_text("1")
            await expect(shift.locator("td.c-missed")).to_have_text("1")
            await expect(office.locator(f'#guards tr[data-guard="{GUARD}"] td.c-missed')).to_have_text("1")
            await office.emulate_media(media="print")
            await expect(office.locator("header.top")).to_be_hidden()
            await expect(shift.locator("td.c-missed")).to_be_visible()  # printed, every column
            await office.screenshot(path=str(artifacts / "patrol_report_print.png"), full_page=True)
            await office.emulate_media(media="screen")
            csv_text = (await (await office.request.get(f"{p.origin}/patrol/report.csv")).body()).decode("utf-8-sig")
            assert "北门岗亭,on_time" in csv_text and "3幢车库,missed" in csv_text
        finally:
            await browser.close()


# ---------------------------------------------------------------- the same, against a portal process


async def test_patrol_scan_and_care_in_a_real_portal_process(tmp_path: Path, artifacts: Path) -> None:
    from tests.test_console_shell_browser import _adduser

    cfg = write_config(tmp_path, None, extra=EXTRA)
    db = tmp_path / "data" / "portal.db"
    _adduser(cfg, "office2", "admin")
    _adduser(cfg, GUARD, "guard")
    with portal_process(cfg) as proc:
        url = proc.url.rstrip("/")
        async with aiohttp.ClientSession(base_url=url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as admin:
            page = await (await admin.get("/login")).text()
            r = await admin.post(
                "/login",
                data={"user": "office2", "password": GUARD_PW, "csrf": csrf_of(page), "next": "/care"},
                headers={"Origin": url},
            )
            assert r.status == 200 and str(r.url).endswith("/care")
            m = re.search(r'<meta name="csrf-token" content="([^"]+)">', await r.text())
            assert m
            csrf = m.group(1)
            r = await admin.post(
                "/api/registry/import",
                data=estate_csv().encode(),
                headers={"Origin": url, "X-CSRF-Token": csrf, "Content-Type": "text/csv"},
            )
            assert r.status == 200, await r.text()
            # A checkpoint on a route whose rounds have not begun yet.
            r = await admin.post(
                "/patrol/checkpoints",
                data={"site": SITE, "name": "北门岗亭", "csrf": csrf},
                headers={"Origin": url},
                allow_redirects=False,
            )
            assert r.status == 303
            later = (datetime.now(TZ).hour + 3) % 24
            r = await admin.post(
                "/patrol/routes",
                data={
                    "site": SITE,
                    "name": "夜间巡逻",
                    "starts": f"{later:02d}:00",
                    "ends": f"{later:02d}:30",
                    "every_min": "30",
                    "window_min": "10",
                    "late_min": "5",
                    "at-1": "1",
                    "active": "1",
                    "csrf": csrf,
                },
                headers={"Origin": url},
                allow_redirects=False,
            )
            assert r.status == 303, await r.text()
            pdf = await admin.get(f"/patrol/plates.pdf?site={SITE}")
            assert pdf.status == 200, await pdf.text()
            (printed,) = pdf_codes(await pdf.read())
            assert printed.startswith(PUBLIC + "/g/c/")
            gate_url = url + printed.removeprefix(PUBLIC)  # the phone reaches public_url: this portal
            # The office gives 张伟 a one-time sign-in code.
            (rid,) = procs.read_rows(
                db, "SELECT r.id FROM reg_residents r JOIN reg_people p ON p.id = r.person_id WHERE p.phone = ?", ZHANG
            )[0]
            r = await admin.post(f"/admin/registry/residents/{rid}/code", data={"csrf": csrf}, headers={"Origin": url})
            otc = re.search(r"([A-Z0-9]{5}-[A-Z0-9]{5})", await r.text())
            assert r.status == 200 and otc
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                guard = await (await browser.new_context(**PHONE)).new_page()  # type: ignore[arg-type]
                await guard.goto(gate_url)
                await guard.fill("#user", GUARD)
                await guard.fill("#password", GUARD_PW)
                await guard.click("#submit")
                await guard.wait_for_url("**/g/c/**")
                form_html = await guard.content()
                await guard.click("#scan-confirm")
                await guard.wait_for_url("**/g/scans/**")
                await expect(guard.locator("#scan-result")).to_have_attribute("data-outcome", "outside")
                await expect(guard.locator("#outside")).to_be_visible()
                await guard.click("#lang-switch")  # and in English
                await expect(guard.locator("#scan-result h1")).to_have_text("Recorded (outside any round)")
                # The same confirmation sent again (the back button, a recorded request): refused.
                nonce = re.search(r'name="nonce" value="([^"]+)"', form_html)
                assert nonce
                token = await guard.evaluate("document.querySelector('meta[name=csrf-token]').content")
                again = await guard.request.post(
                    gate_url, form={"nonce": nonce.group(1), "csrf": token}, headers={"Origin": url}
                )
                assert again.status == 409 and "patrol.refused.replayed" in await again.text()
                await guard.screenshot(path=str(artifacts / "patrol_phone_outside.png"), full_page=True)

                # 张伟 signs in with the code, sets a password, opens his flat's page, turns care on and reports in.
                phone = await (await browser.new_context(**PHONE)).new_page()  # type: ignore[arg-type]
                await phone.goto(f"{url}/m/login")
                await phone.fill("#login-phone", ZHANG)
                await phone.fill("#login-password", otc.group(1))
                await phone.click("#login-submit")
                await phone.wait_for_url("**/m/password**")
                await phone.fill("#new-password", ZHANG_PW)
                await phone.fill("#confirm-password", ZHANG_PW)
                await phone.click("#password-submit")
                await phone.wait_for_url(f"{url}/m")
                await phone.locator("#homes a").first.click()
                await phone.wait_for_url("**/p/**")
                plate = phone.url.rsplit("/p/", 1)[1]
                await phone.click("#care-signup")
                await phone.fill("#contact-name", "李娜")
                await phone.fill("#contact-phone", CONTACT)
                await phone.click("#care-submit")
                await phone.wait_for_url(f"**/p/{plate}?care=saved")
                await expect(phone.locator("#care-ask")).to_have_count(0)
                await phone.click("#care-ok")
                await phone.wait_for_url(f"**/p/{plate}?care=ok")
                await expect(phone.locator("#care-last")).to_contain_text("手机报平安")
            finally:
                await browser.close()
        assert procs.read_rows(db, "SELECT outcome FROM patrol_scans") == [("outside",)]
        assert procs.read_rows(db, "SELECT consent_how, status FROM care_households") == [("resident_phone", "active")]
    # After a restart: the scan is in the report, the flat still under care.
    with portal_process(cfg) as proc:
        url = proc.url.rstrip("/")
        async with aiohttp.ClientSession(base_url=url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as g:
            page = await (await g.get("/login")).text()
            r = await g.post(
                "/login",
                data={"user": "office2", "password": GUARD_PW, "csrf": csrf_of(page), "next": "/patrol/report"},
                headers={"Origin": url},
            )
            text = await r.text()
            assert r.status == 200 and 'data-outcome="outside"' in text and "北门岗亭" in text
            listing = await (await g.get("/care")).text()
            assert CONTACT in listing and "手机报平安" in listing
