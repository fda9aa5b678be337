"""Each role's main screens in a real Chromium against a real portal process (filled as its people would fill it:
tests/screens_support.py), with screenshots kept in tests/artifacts/.

- The guard: the board and the drawn site map; doors that say why they were never heard from (a gateway never
  switched on, a door its gateway never names) and stop saying it as soon as the gateway speaks; a guardroom visitor
  whose slip prints on A4 and on 80 mm and 58 mm receipt paper (the PDF's page size read back) with the house, the
  window and a QR that decodes to the pass, and no resident's or visitor's name.
- The administrator: disabling a guard ends their open console at once and keeps them out; a password reset shows
  a one-time password once and forces a new one; a change of role asks first; a plate reissue asks first naming the
  consequence, cancelling changes nothing, confirming kills the old plate and writes the audit row; a dry-run import
  says it imported nothing; checkboxes sit beside their labels; a door placed on the plan by clicking shows there on
  the board's map.
- The resident on a 390x844 phone: the plate page names the estate, the office's and the guardroom's phones and the
  emergency numbers; the home page follows their registrations and reports as the office handles them; an owner's
  rejection of a request asks first; nothing is wider than the screen.
- The visitor: the pass link shows the QR (decoded back to the signed pass) and the window.
"""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime
from pathlib import Path

import pypdfium2 as pdfium
import zxingcpp
from PIL import Image
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
from ulid import ULID

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from gateway.wire.passes import keyring, load_public_key, parse_pass
from portal.estate.passes_issue import PUBLIC_KEY_FILE
from tests.portal_support import GATEWAY, SITE, batch_payload, devices, mqtt
from tests.registry_support import HEADER
from tests.screens_support import (
    ADMIN,
    ADMIN_PW,
    GUARD,
    GUARD_PW,
    INSTALLER,
    RESIDENT_PHONE,
    RESIDENT_PW,
    SILENT_GW,
    Seeded,
    plate_of,
    seeded_estate,
)

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
T = 15_000
DESK = {"viewport": {"width": 1280, "height": 900}, "locale": "zh-CN"}
PHONE = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
    "locale": "zh-CN",
}
MM = 72 / 25.4  # PDF points per millimetre


async def launch(pw: object) -> Browser:
    return await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)  # type: ignore[attr-defined]


async def staff(browser: Browser, s: Seeded, user: str, password: str, **ctx: object) -> Page:
    context: BrowserContext = await browser.new_context(**(ctx or DESK))  # type: ignore[arg-type]
    page = await context.new_page()
    await page.goto(s.url + "/login")
    await page.fill("#user", user)
    await page.fill("#password", password)
    await page.click("#submit")
    await page.wait_for_url("**/console")
    return page


def no_errors(page: Page, errors: list[str]) -> None:
    """Script errors and CSP refusals (an inline style, say) show up as console errors."""
    page.on(
        "console", lambda m: errors.append(f"{m.text} ({m.location.get('url', '')})") if m.type == "error" else None
    )
    page.on("pageerror", lambda e: errors.append(str(e)))


def pdf_page(pdf: bytes) -> tuple[tuple[float, float], str, Image.Image]:
    """The only page of a PDF: its size in mm, its text, and a picture of it."""
    doc = pdfium.PdfDocument(pdf)
    assert len(doc) == 1, f"{len(doc)} pages"
    page = doc[0]
    w, h = page.get_size()
    text = page.get_textpage().get_text_range()
    image = page.render(scale=300 / 72).to_pil()
    return (w / MM, h / MM), text, image


async def gateway_says(broker: MosquittoProcess, gateway: str, events: list[wire.Event], online: bool) -> None:
    async with mqtt(broker) as gw:
        if online:
            await gw.publish(
                wire.topic(SITE, gateway, "status"),
                wire.encode(wire.Status(v=1, state="online", version="1.0")),
                qos=1,
                retain=True,
            )
        if events:
            await gw.publish(wire.topic(SITE, gateway, "events"), batch_payload(events, gateway=gateway), qos=1)


def door_event(seq: int, door: str, state: str) -> wire.Event:
    ts = datetime.now(UTC)
    return wire.Event(
        id=str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type="door.state",
        device=f"ctl-{door}",
        point="contact",
        place=wire.Place(site=SITE, door=door),
        priority=wire.Priority.ROUTINE,
        data={"door": door, "state": state},
    )


# ---------------------------------------------------------------- the guard


async def test_guard_board_doors_and_a_visitor_slip_on_three_papers(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    async with seeded_estate(tmp_path, broker) as s, async_playwright() as pw:
        browser = await launch(pw)
        errors: list[str] = []
        try:
            page = await staff(browser, s, GUARD, GUARD_PW)
            no_errors(page, errors)
            await page.goto(s.url + "/board")
            await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)
            for where in ("北围栏", "南围栏", "3幢 1单元 101室"):  # the fence, the cut fence, the indoor burglary
                await expect(page.locator("#incidents li.incident", has_text=where)).to_have_count(1, timeout=T)
            await expect(page.locator("#groups")).to_contain_text("周界")
            await expect(page.locator("#groups")).not_to_contain_text("perimeter")
            await page.screenshot(path=str(artifacts / "guard_board.png"), full_page=True)
            await page.goto(s.url + "/board/map")
            plan = page.locator("svg.sitemap image.plan")
            await expect(plan).to_have_attribute("href", re.compile(r"^/board/plan/s1/image\?v="))
            assert (
                await page.evaluate(
                    "fetch(document.querySelector('svg.sitemap image').getAttribute('href'))"
                    ".then(r => r.headers.get('content-type'))"
                )
                == "image/png"
            )
            await expect(page.locator('svg.sitemap [data-zone="P1"] text')).to_have_text("北围栏")
            await page.screenshot(path=str(artifacts / "guard_site_map.png"), full_page=True)

            # Doors nobody heard of say why; they stop saying it as soon as the gateway speaks.
            await page.goto(s.url + "/doors")
            silent_door = page.locator('#doors li.door[data-key="s1/b3u1"] .door-why')
            silent_gw = page.locator('#doors li.door[data-key="s1/b5u1"] .door-why')
            await expect(silent_door).to_contain_text("有上报，但从未报告门 b3u1")
            await expect(silent_gw).to_contain_text("网关“5号楼机房”从未上线")
            await expect(page.locator('#doors li.door[data-key="s1/b3u1"] .state')).to_have_text("未知")
            await expect(page.locator('#doors li.door[data-key="s1/north-gate"] .door-why')).to_have_text("")
            await page.screenshot(path=str(artifacts / "guard_doors.png"), full_page=True)
            await gateway_says(broker, GATEWAY, [door_event(11, "b3u1", "closed")], online=False)
            await expect(silent_door).to_have_text("", timeout=T)
            await expect(page.locator('#doors li.door[data-key="s1/b3u1"] .state')).to_have_text("已关")
            await gateway_says(broker, SILENT_GW, [], online=True)
            await expect(silent_gw).to_contain_text("有上报，但从未报告门 b5u1", timeout=T)

            # A visitor at the guardroom: the slip prints the house, the window and the QR, on three papers.
            await page.goto(s.url + "/visitors")
            await page.fill("#v-name", "周访客")
            await page.fill("#v-house", "3-2-301")
            await expect(page.locator("#house-info")).to_contain_text("张伟")  # the guard sees who lives there
            await page.fill("#v-note", "装修")
            await page.click("#v-submit")
            await page.wait_for_url(re.compile(r".*/visitors/\d+$"))
            vid = page.url.rsplit("/", 1)[1]
            pass_text = await page.evaluate(
                f"fetch('/api/visitors/{vid}').then(r => r.json()).then(b => b.visitor.pass_text)"
            )
            await expect(page.locator("#slip")).not_to_contain_text("张伟")
            await expect(page.locator("#slip")).not_to_contain_text("周访客")
            await expect(page.locator("#registration")).to_contain_text("周访客")  # on screen, for the guard
            await expect(page.locator("#slip-by")).to_have_text(re.compile(r"^保安 guard1 · "))
            await page.screenshot(path=str(artifacts / "guard_visitor_slip.png"), full_page=True)
            window = await page.locator("#slip-window").inner_text()
            for paper, size in (("a4", (210, 297)), ("80", (80, 150)), ("58", (58, 120))):
                await page.goto(f"{s.url}/visitors/{vid}?paper={paper}")
                await expect(page.locator(f"#paper-{paper}")).to_have_attribute("aria-current", "page")
                pdf = await page.pdf(prefer_css_page_size=True, print_background=True)
                (w, h), text, image = pdf_page(pdf)
                assert abs(w - size[0]) < 1 and abs(h - size[1]) < 1, (paper, w, h)
                flat = re.sub(r"\s+", "", text)
                assert "阳光花园3幢2单元301室" in flat and re.sub(r"\s+", "", window) in flat, (paper, text)
                for name in ("张伟", "李娜", "周访客", "guard1", "装修"):
                    assert name not in flat, (paper, name)
                found = [b.text for b in zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode)]
                assert found == [pass_text], (paper, found)
                image.convert("L").resize((int(image.width / 3), int(image.height / 3))).save(
                    artifacts / f"visitor_slip_{paper}.png"
                )
        finally:
            await browser.close()
        assert errors == [], errors


# ---------------------------------------------------------------- the administrator


async def test_administrator_accounts_confirmations_import_and_plan(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    async with seeded_estate(tmp_path, broker) as s, async_playwright() as pw:
        browser = await launch(pw)
        errors: list[str] = []
        try:
            admin = await staff(browser, s, ADMIN, ADMIN_PW)
            no_errors(admin, errors)
            guard = await staff(browser, s, GUARD, GUARD_PW)
            await guard.goto(s.url + "/board")
            await expect(guard.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)

            # Disable the guard: it asks first; then the guard's open board ends at once and they cannot sign in.
            await admin.goto(s.url + "/users")
            await admin.screenshot(path=str(artifacts / "admin_users.png"), full_page=True)
            await admin.click(f"#manage-{GUARD}")
            await admin.click("#disable")
            await expect(admin.locator("#consequence")).to_contain_text(f"{GUARD} 将立即退出所有登录")
            await admin.screenshot(path=str(artifacts / "admin_confirm_disable.png"), full_page=True)
            await admin.click("#confirm-go")
            await expect(admin.locator("#notice")).to_contain_text("账号已停用")
            await expect(admin.locator("#fact-state")).to_have_text("已停用")
            await expect(guard.locator("#stale-signin")).to_be_visible(timeout=T)
            await guard.goto(s.url + "/login")
            await guard.fill("#user", GUARD)
            await guard.fill("#password", GUARD_PW)
            await guard.click("#submit")
            await expect(guard.locator("#error")).to_have_text("该账号已停用，请联系管理员")
            await admin.click("#enable")
            await expect(admin.locator("#fact-state")).to_have_text("在用")
            await guard.fill("#password", GUARD_PW)
            await guard.click("#submit")
            await guard.wait_for_url("**/console")

            # A forgotten password: a one-time password, shown once; its first sign-in must set a new one.
            await admin.goto(f"{s.url}/users/{INSTALLER}")
            await admin.click("#reset")
            await expect(admin.locator("#consequence")).to_contain_text("现有密码立即失效")
            await admin.click("#confirm-go")
            one_time = (await admin.locator("#one-time-password").inner_text()).strip()
            assert re.fullmatch(r"[0-9a-f]{6}(-[0-9a-f]{6}){3}", one_time), one_time
            await admin.screenshot(path=str(artifacts / "admin_one_time_password.png"), full_page=True)
            await admin.reload()  # shown once: not on the page again
            await expect(admin.locator("#one-time")).to_have_count(0)
            fitter = await (await browser.new_context(**DESK)).new_page()  # type: ignore[arg-type]
            await fitter.goto(s.url + "/login")
            await fitter.fill("#user", INSTALLER)
            await fitter.fill("#password", one_time)
            await fitter.click("#submit")
            await fitter.wait_for_url("**/password")
            await expect(fitter.locator("#forced")).to_be_visible()

            # A change of role asks first, naming what the account will and will not do.
            await admin.select_option("#role", "guard")
            await admin.click("#role-save")
            await expect(admin.locator("#consequence")).to_contain_text("改为保安")
            await admin.click("#confirm-go")
            await expect(admin.locator("#fact-role")).to_have_text("保安")
            # One's own account: no disable, no reset (another administrator does that).
            await admin.goto(f"{s.url}/users/{ADMIN}")
            await expect(admin.locator("#own-account")).to_be_visible()
            await expect(admin.locator("#disable")).to_have_count(0)

            # Reissue a plate: it asks first naming the address; cancelling changes nothing; confirming kills it.
            old = plate_of(s.cfg, "3", "2", "302")
            phone = await (await browser.new_context(**PHONE)).new_page()  # type: ignore[arg-type]
            await admin.goto(f"{s.url}/admin/registry/buildings/{s.building_id}")
            row = admin.locator("tr[data-house]", has_text="302室")
            await row.locator("button.reissue").click()
            await expect(admin.locator("#consequence")).to_contain_text(
                "阳光花园3幢2单元302室 门上现有的门牌二维码会立即失效"
            )
            await admin.screenshot(path=str(artifacts / "admin_confirm_reissue.png"), full_page=True)
            await admin.click("#confirm-cancel")
            assert (await phone.goto(f"{s.url}/p/{old}")).status == 200  # type: ignore[union-attr]
            await row.locator("button.reissue").click()
            await admin.click("#confirm-go")
            await expect(admin.locator("#notice")).to_contain_text("旧码立即失效")
            assert (await phone.goto(f"{s.url}/p/{old}")).status == 404  # type: ignore[union-attr]
            await expect(phone.locator("#invalid")).to_be_visible()
            await admin.goto(s.url + "/admin/registry/audit")
            first = admin.locator("#audit tbody tr").first
            await expect(first).to_contain_text("重新生成门牌码")
            await expect(first).to_contain_text(f"管理员 {ADMIN}")
            await admin.screenshot(path=str(artifacts / "admin_audit.png"), full_page=True)

            # A dry-run import says so and imports nothing; the real one imports.
            await admin.goto(s.url + "/admin/registry")
            csv = (HEADER + "s1,阳光花园,8,1,801,孙八,13600008888,owner,2024-01-01,,\n").encode()
            await admin.set_input_files(
                "#import-file", files=[{"name": "e.csv", "mimeType": "text/csv", "buffer": csv}]
            )
            await expect(admin.locator("#import-dry")).to_be_checked()
            await admin.click("#import-submit")
            await expect(admin.locator("#import-result")).to_have_text("预检通过，未导入：共 1 行。")
            await admin.reload()
            await expect(admin.locator("a", has_text="8幢")).to_have_count(0)
            await admin.set_input_files(
                "#import-file", files=[{"name": "e.csv", "mimeType": "text/csv", "buffer": csv}]
            )
            await admin.uncheck("#import-dry")
            await admin.click("#import-submit")
            await expect(admin.locator("#import-result")).to_have_text("导入成功：共 1 行。")
            await expect(admin.locator("#import-counts")).to_contain_text("新增住户 1 人")
            # Checkboxes sit beside their labels: on the label's line, before its words.
            for box in ("#import-dry", "#door-gate"):
                b = await admin.locator(box).bounding_box()
                label = await admin.locator(f"label:has({box})").bounding_box()
                assert b and label, box
                assert label["height"] < 2.2 * max(b["height"], 20), (box, b, label)
                assert label["y"] <= b["y"] + b["height"] / 2 <= label["y"] + label["height"], (box, b, label)
                assert b["x"] - label["x"] < 10 and label["width"] > b["width"] * 3, (box, b, label)
            await admin.screenshot(path=str(artifacts / "admin_registry.png"), full_page=True)

            # Place a door by clicking on the plan; the board's map shows it there.
            await admin.goto(f"{s.url}/admin/sitemap/{SITE}")
            await admin.select_option("#mark-kind", "door")
            await admin.fill("#mark-name", "b3u2")
            await admin.fill("#mark-label", "3幢2单元门")
            svg = admin.locator("#plan svg.sitemap")
            box = await svg.bounding_box()
            assert box
            await admin.mouse.click(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.5)
            points = await admin.locator("#mark-points").input_value()
            x, y = (float(v) for v in points.split(","))
            assert abs(x - 200) < 6 and abs(y - 250) < 6, points  # the plan is the 800x500 picture
            await expect(admin.locator("#preview circle")).to_have_count(1)
            await admin.screenshot(path=str(artifacts / "admin_site_plan.png"), full_page=True)
            await admin.click("#mark-save")
            await expect(admin.locator("#notice")).to_contain_text("位置已保存")
            await admin.goto(s.url + "/board/map")
            circle = admin.locator('svg.sitemap [data-door="b3u2"] circle')
            assert abs(float(await circle.get_attribute("cx") or 0) - x) < 0.2
            assert abs(float(await circle.get_attribute("cy") or 0) - y) < 0.2
        finally:
            await browser.close()
        assert errors == [], errors


# ---------------------------------------------------------------- the resident


async def test_resident_phone_plate_page_registrations_and_reports(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    async with seeded_estate(tmp_path, broker) as s, async_playwright() as pw, devices(s.url) as new:
        office = new()
        assert (await office.sign_in(ADMIN, ADMIN_PW)).status == 303
        guard = new()
        assert (await guard.sign_in(GUARD, GUARD_PW)).status == 303
        browser = await launch(pw)
        errors: list[str] = []
        try:
            ph = await (await browser.new_context(**PHONE)).new_page()  # type: ignore[arg-type]
            no_errors(ph, errors)
            # A stranger at the plate: the estate, the office and the guardroom, the emergency numbers.
            await ph.goto(f"{s.url}/p/{s.house_code}")
            await expect(ph.locator("#estate")).to_have_text("阳光花园")
            await expect(ph.locator("#office-phone")).to_have_attribute("href", "tel:0571-88881234")
            await expect(ph.locator("#contacts")).to_contain_text("物业服务中心：0571-8888 1234 （8:00-20:00）")
            await expect(ph.locator("#guardroom-phone")).to_have_text("0571-8888 1110")
            emergency = ph.locator("#emergency a.tel")
            assert await emergency.all_inner_texts() == ["报警 110", "火警 119", "急救 120", "燃气抢修 96777"]
            assert await emergency.first.get_attribute("href") == "tel:110"
            await expect(ph.locator("main")).not_to_contain_text("未登记")
            await ph.screenshot(path=str(artifacts / "public_plate.png"), full_page=True)

            await ph.goto(f"{s.url}/m/login")
            await ph.fill("#login-phone", RESIDENT_PHONE)
            await ph.fill("#login-password", RESIDENT_PW)
            await ph.click("#login-submit")
            await ph.wait_for_url("**/m")
            homes = ph.locator("#homes")
            await expect(homes.locator('li[data-state="active"]')).to_contain_text("阳光花园3幢2单元301室")
            home = homes.locator('li[data-state="active"]')
            report = home.locator(f'.reports li[data-work="{s.work_id}"]')
            await expect(report.locator(".status")).to_have_text("已受理")  # the guard took it while seeding
            await ph.screenshot(path=str(artifacts / "resident_home.png"), full_page=True)

            # A new report from the phone: its progress page; the guard sends someone; both pages say so.
            await ph.goto(f"{s.url}/p/{s.house_code}/report")
            await ph.select_option("#category", "hygiene")
            await ph.fill("#text", "垃圾桶满了")
            await ph.click("#report-submit")
            await ph.wait_for_url("**/report/status")
            html = await (await guard.get("/admin/registry/work")).text()
            wid = re.search(r'data-work="(\d+)">(?:(?!data-work).)*垃圾桶满了', html, re.S)
            assert wid
            mine = ph.locator(f'article[data-report="{wid.group(1)}"]')
            await expect(mine.locator(".report-now")).to_have_text("待处理")
            r = await guard.post(f"/admin/registry/work/{wid.group(1)}", {"status": "dispatched", "note": ""})
            assert r.status == 303
            await ph.reload()
            await expect(mine.locator(".report-now")).to_have_text("已派人")
            await ph.goto(f"{s.url}/m")
            await expect(home.locator(f'.reports li[data-work="{wid.group(1)}"] .status')).to_have_text("已派人")

            # Asking for another home from the account: waiting, then the office's answer.
            vacant = plate_of(s.cfg, "3", "1", "102")
            await ph.goto(f"{s.url}/p/{vacant}/register")
            await ph.click("#reg-submit")
            await expect(ph.locator("#message")).to_be_visible()
            await ph.goto(f"{s.url}/m")
            asked = homes.locator("li", has_text="3幢1单元102室")
            await expect(asked).to_have_attribute("data-state", "pending")
            await expect(asked.locator(".status")).to_have_text("待确认")
            await expect(asked).to_contain_text("等待业主或物业审核")
            html = await (await office.get("/admin/registry/pending")).text()
            rid = re.search(r'<tr data-resident="(\d+)">(?:(?!data-resident).)*3幢1单元102室', html, re.S)
            assert rid
            r = await office.post(f"/admin/registry/residents/{rid.group(1)}/reject", {"confirmed": "yes"})
            assert r.status == 303
            await ph.reload()
            await expect(asked).to_have_attribute("data-state", "rejected")
            await expect(asked.locator(".status")).to_have_text("已拒绝")

            # The owner turns down a stranger's request for their home: it asks first, naming them.
            await ph.goto(f"{s.url}/p/{s.house_code}")
            await expect(ph.locator("#to-confirm")).to_contain_text("陈静")
            await ph.click(f"#reject-{s.pending_id}")
            await expect(ph.locator("#consequence")).to_have_text("拒绝 陈静 作为本户家庭成员的登记申请。")
            await ph.screenshot(path=str(artifacts / "resident_confirm_reject.png"), full_page=True)
            await ph.click("#confirm-go")
            await ph.wait_for_url(f"**/p/{s.house_code}")
            await expect(ph.locator("#to-confirm")).to_have_count(0)
            await ph.screenshot(path=str(artifacts / "resident_house.png"), full_page=True)
            for path in ("/m", f"/p/{s.house_code}", f"/p/{s.house_code}/report", f"/p/{s.entrance_code}"):
                await ph.goto(s.url + path)
                width = await ph.evaluate("document.scrollingElement.scrollWidth")
                assert width <= 390, (path, width)  # nothing wider than the phone
        finally:
            await browser.close()
        assert errors == [], errors


# ---------------------------------------------------------------- the visitor


async def test_visitor_opens_the_pass_link_on_a_phone(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    async with seeded_estate(tmp_path, broker) as s, async_playwright() as pw:
        browser = await launch(pw)
        errors: list[str] = []
        try:
            ph = await (await browser.new_context(**PHONE)).new_page()  # type: ignore[arg-type]
            no_errors(ph, errors)
            await ph.goto(f"{s.url}/m/v/{s.visitor_token}")
            await expect(ph.locator("#visitor-address")).to_have_text("阳光花园3幢2单元301室")
            await expect(ph.locator("#visitor-window")).to_contain_text("有效期")
            shot = await ph.locator("#visitor-qr").screenshot()
            found = [
                b.text
                for b in zxingcpp.read_barcodes(Image.open(io.BytesIO(shot)), formats=zxingcpp.BarcodeFormat.QRCode)
            ]
            ring = keyring([load_public_key(s.cfg.parent / "data" / PUBLIC_KEY_FILE)])
            signed = parse_pass(found[0], ring)  # what a door's reader would accept
            assert signed.kind == "visitor" and signed.house == "3-2-301" and signed.uses == 1
            await expect(ph.locator("main")).not_to_contain_text("张伟")
            await ph.screenshot(path=str(artifacts / "visitor_pass.png"), full_page=True)
            await ph.goto(f"{s.url}/lang/en?next=/m/v/{s.visitor_token}")
            await expect(ph.locator("#visitor-address")).to_have_text("Room 301, Building 3 Unit 2, 阳光花园")
            await ph.screenshot(path=str(artifacts / "visitor_pass_en.png"), full_page=True)
        finally:
            await browser.close()
        assert errors == [], errors
