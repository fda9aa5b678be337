"""The residents' walk in a real headless Chromium at a phone's size: scan a flat plate, register, an
administrator approves, sign in, issue a visitor pass, show one's own self-refreshing access QR (read
back from a screenshot with zxing-cpp and verified against the portal's public key), then move out:
issuing fails and the subject is on the signed revocation list sent to the gateway."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import aiohttp
import zxingcpp
from PIL import Image
from playwright.async_api import Page, async_playwright, expect

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from gateway.wire.passes import Pass, keyring, load_public_key, parse_pass, parse_revocations
from portal.estate import registry as reg
from portal.web.auth import PRE_CSRF_COOKIE
from portal.web.i18n import Translator
from tests.doors_support import estate_with_doors
from tests.portal_support import (
    GATEWAY,
    SITE,
    mqtt,
    open_portal_command,
    portal_public_key,
    running_portal,
    wait_for,
    write_config,
)
from tests.registry_support import (
    ADMIN,
    ADMIN_PW,
    admin_session,
    estate_csv,
    house_id,
    import_csv,
    plate_code,
    resident_row,
)
from tests.test_revocations import OWNER_PHONE, resident_browser

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
NAME, MOBILE, PASSWORD = "陈小明", "13566667777", "xiaoming-2026"
T = 10_000  # ms: generous but bounded waits in the page


async def qr_of(page: Page, selector: str, ring: dict[str, object]) -> Pass:
    shot = await page.locator(selector).screenshot()
    found = [
        r.text for r in zxingcpp.read_barcodes(Image.open(io.BytesIO(shot)), formats=zxingcpp.BarcodeFormat.QRCode)
    ]
    assert len(found) == 1, found
    return parse_pass(found[0], ring)  # type: ignore[arg-type]


async def test_resident_walk_at_phone_size(tmp_path: Path, broker: MosquittoProcess, artifacts: Path) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw, async_playwright() as pw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "cmd"), qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        ring = keyring([load_public_key(portal_public_key(p))])
        code = await plate_code(p, "3", "2", "301")
        hid = await house_id(p, "3", "2", "301")
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            phone = await browser.new_context(**PHONE)  # type: ignore[arg-type]
            office = await browser.new_context(viewport={"width": 1280, "height": 900})
            ph = await phone.new_page()

            # 1. Scan the flat's plate: the address and the office, nobody's name.
            await ph.goto(f"{p.origin}/p/{code}")
            await expect(ph.locator("#address")).to_have_text("阳光花园3幢2单元301室")
            assert "张伟" not in await ph.content()
            await ph.screenshot(path=str(artifacts / "phone_house_public.png"), full_page=True)

            # 2. "I live here".
            await ph.click("#register")
            await ph.fill("#reg-name", NAME)
            await ph.fill("#reg-phone", MOBILE)
            await ph.select_option("#reg-role", "family")
            await ph.fill("#reg-password", PASSWORD)
            await ph.fill("#reg-confirm", PASSWORD)
            await ph.click("#reg-submit")
            await expect(ph.locator("#message")).to_contain_text("等待业主或物业确认")
            me = await resident_row(p, MOBILE, "301")
            assert me["status"] == "pending"

            # 3. The property office approves.
            ad = await office.new_page()
            await ad.goto(f"{p.origin}/login")
            await ad.fill("#user", ADMIN)
            await ad.fill("#password", ADMIN_PW)
            await ad.click("#submit")
            await ad.wait_for_url("**/console")
            await ad.goto(f"{p.origin}/admin/registry/pending")
            await expect(ad.locator(f'tr[data-resident="{me["id"]}"] .name')).to_have_text(NAME)
            await ad.click(f"#approve-{me['id']}")
            await expect(ad.locator(f'tr[data-resident="{me["id"]}"]')).to_have_count(0, timeout=T)

            # 4. Sign in on the phone; back on the house page with the household and an access QR.
            await ph.goto(f"{p.origin}/m/login?next=/p/{code}")
            await ph.fill("#login-phone", MOBILE)
            await ph.fill("#login-password", PASSWORD)
            await ph.click("#login-submit")
            await ph.wait_for_url(f"**/p/{code}")
            await expect(ph.locator("#household")).to_contain_text("张伟")
            await expect(ph.locator("#household")).to_contain_text("138****5678")
            await expect(ph.locator("#my-pass")).to_have_attribute("data-state", "ok", timeout=T)
            await ph.screenshot(path=str(artifacts / "phone_house_resident.png"), full_page=True)
            mine = await qr_of(ph, "#my-pass", ring)
            assert mine.kind == "resident" and mine.subject == me["subject"] and mine.site == SITE
            assert mine.units == ("3/2",) and mine.gates and mine.house == "3-2-301" and mine.life_s == 60
            assert abs(mine.not_before - time.time()) < 30
            # It refreshes itself (on the timer, or at once when the page is shown again).
            first = await ph.locator("#my-pass").get_attribute("data-pass-id")
            await ph.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
            await expect(ph.locator("#my-pass")).not_to_have_attribute("data-pass-id", first or "", timeout=T)
            again = await qr_of(ph, "#my-pass", ring)
            assert again.pass_id != mine.pass_id and again.subject == mine.subject

            # 5. A visitor pass: a QR and a link to share, with no names on it.
            await ph.select_option("#visitor-hours", "24")
            await ph.fill("#visitor-uses", "2")
            await ph.click("#visitor-issue")
            await ph.wait_for_url("**/m/v/**")
            visitor = await qr_of(ph, "#visitor-qr", ring)
            assert visitor.kind == "visitor" and visitor.uses == 2 and visitor.life_s == 24 * 3600
            assert visitor.units == ("3/2",) and visitor.subject.startswith("v:")
            share = await ph.locator("#share-url").input_value()
            assert share == ph.url
            for private in (NAME, MOBILE, "张伟", "13812345678"):
                assert private not in await ph.content()
            await ph.screenshot(path=str(artifacts / "phone_visitor_pass.png"), full_page=True)

            # 6. Move out: the office records it; the phone's QR stops, issuing fails, and the
            # subject is on the signed revocation list the gateway is sent.
            await ph.goto(f"{p.origin}/p/{code}")
            await expect(ph.locator("#my-pass")).to_have_attribute("data-state", "ok", timeout=T)
            await ad.goto(f"{p.origin}/admin/registry/houses/{hid}")
            await ad.click(f"#moveout-{me['id']}")
            await expect(ad.locator("#consequence")).to_contain_text("迁出")  # it asks first, naming the consequence
            await ad.click("#confirm-go")
            await expect(ad.locator("#notice")).to_contain_text("已登记迁出")
            await ph.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
            await expect(ph.locator("#my-pass")).to_have_attribute("data-state", "refused", timeout=T)
            await expect(ph.locator("#my-pass-status")).to_contain_text("通行码已失效")
            token = await ph.locator('meta[name="csrf-token"]').get_attribute("content")
            r = await ph.request.post(
                f"{p.origin}/p/{code}/visitor",
                form={"hours": "2", "uses": "1", "csrf": token or ""},
                headers={"Origin": p.origin},
                max_redirects=0,
            )
            assert r.status == 403 and "只有在住住户" in await r.text()
            await ph.reload()
            await expect(ph.locator("#not-active")).to_be_visible()
            assert await ph.locator("#visitor-form").count() == 0

            async with asyncio.timeout(15):
                async for m in gw.messages:
                    cmd = open_portal_command(p, m.payload)
                    if cmd.type != "credentials.sync":
                        continue
                    rl = parse_revocations(cmd.args["revocations"], ring)  # type: ignore[arg-type]
                    if me["subject"] in rl.subjects:
                        assert visitor.pass_id in rl.passes  # the visitor pass they issued goes too
                        break
        finally:
            await browser.close()


async def test_a_plate_page_refused_by_its_guard_is_the_pages_own_answer(tmp_path: Path) -> None:
    """The plate guard's refusals (raised as portal.web.views.Answer) come back as the handler's own answer: an
    unknown plate's page sets the pre-session CSRF cookie as any page does, and a resident of another flat is refused
    this flat's care and visitor-pass pages with the page that says why."""
    async with running_portal(write_config(tmp_path, None)) as p:
        await estate_with_doors(p)
        async with aiohttp.ClientSession() as stranger, stranger.get(f"{p.origin}/p/{reg.new_plate_code()}") as r:
            assert r.status == 404 and r.content_type == "text/html"
            assert PRE_CSRF_COOKIE in r.cookies
        phone, _ = await resident_browser(p, OWNER_PHONE, "301")
        try:
            other = await plate_code(p, "3", "2", "302")
            for path, key in (
                (f"/p/{other}/care", "care.not_resident"),
                (f"/p/{other}/visitors", "visitor.not_active"),
            ):
                async with phone.get(path, allow_redirects=False) as r:
                    text = await r.text()
                    assert r.status == 403, (path, r.status)
                    assert Translator("zh-CN")(key) in text, path
        finally:
            await phone.close()
