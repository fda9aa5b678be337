"""Visitor registration at the guardroom: the house's residents are shown, bad input is refused with a
clear message, and the pass the portal signs verifies against its public key, names the unit's doors and the
site gates with the uses and window asked for, and reads back from the QR as a browser renders it (zxing-cpp);
the slip prints without the page's chrome."""

from __future__ import annotations

import io
import re
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import zxingcpp
from PIL import Image
from playwright.async_api import async_playwright

from gateway.wire.passes import PassError, keyring, load_public_key, parse_pass
from tests.doors_support import estate_with_doors, guard_session
from tests.portal_support import Portal, portal_public_key, post_form, running_portal, write_config

CHROMIUM = "/usr/bin/chromium"
SHANGHAI = ZoneInfo("Asia/Shanghai")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


async def register(p: Portal, **form: str) -> Any:
    data = {"name": "刘访客", "house": "3-2-301", "hours": "4", "uses": "3", "start": "", "note": ""}
    data.update(form)
    return await post_form(p, "/visitors", data, csrf=p.csrf)


async def test_visitor_pass_is_signed_for_the_unit_and_gates_and_reads_back_from_the_qr(
    tmp_path: Path, artifacts: Path
) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:  # no broker needed to register a visitor
        await estate_with_doors(p)
        await guard_session(p)
        ring = keyring([load_public_key(portal_public_key(p))])
        key_file = Path(p.services.cfg.data_dir) / "pass_signing_key.pem"
        assert key_file.stat().st_mode & 0o777 == 0o600

        # While typing the house: its residents (phones masked) and the doors the pass will open.
        r = await p.client.get("/api/visitors/house", params={"house": "3幢2单元301室"})
        info = await r.json()
        assert info["found"] is True and info["address"] == "阳光花园3幢2单元301室"
        assert {x["name"] for x in info["residents"]} == {"张伟", "李娜"}
        assert all("****" in x["phone"] for x in info["residents"])
        assert [d["label"] for d in info["doors"]] == ["3幢2单元门", "北门"]
        r = await p.client.get("/api/visitors/house", params={"house": "3-1-102"})
        assert (await r.json())["residents"] == []  # a vacant flat
        r = await p.client.get("/api/visitors/house", params={"house": "9-9-999"})
        assert (await r.json()) == {"found": False, "error": "unknown-house"}

        # Refused, with the reason on the page and nothing stored.
        for form, key in (
            ({"name": ""}, "请填写访客姓名"),
            ({"house": "301"}, "幢-单元-室"),
            ({"house": "9-9-999"}, "登记中没有这个房屋"),
            ({"uses": "0"}, "可用次数"),
            ({"uses": "21"}, "可用次数"),
            ({"hours": "169"}, "有效时长"),
            ({"start": "2001-01-01T08:00"}, "生效时间"),
        ):
            r = await register(p, **form)
            assert r.status == 400, form
            assert key in await r.text(), (form, key)
        assert (
            await p.services.store.read(lambda c: c.execute("SELECT count(*) FROM guard_visitors").fetchone()[0]) == 0
        )

        before = int(time.time())
        r = await register(p, house="3幢2单元301室", note="送家具")
        assert r.status == 303, await r.text()
        slip_url = r.headers["Location"]
        vid = int(slip_url.rsplit("/", 1)[1])
        body = await (await p.client.get(f"/api/visitors/{vid}")).json()
        v = body["visitor"]
        ps = parse_pass(v["pass_text"], ring)
        assert ps.kind == "visitor" and ps.site == "s1" and ps.subject.startswith("v:")
        assert ps.units == ("3/2",) and ps.gates is True and ps.doors == ()
        assert ps.house == "3-2-301" and ps.uses == 3
        assert before <= ps.not_before <= int(time.time()) and ps.not_after - ps.not_before == 4 * 3600
        assert v["pass_id"] == ps.pass_id_hex and v["name"] == "刘访客"
        assert [d["door"] for d in body["doors"]] == ["b3u2", "north-gate"]
        # The QR text is not the name: the name stays in the portal.
        assert "刘访客" not in v["pass_text"]
        # Another key does not verify it.
        other = keyring([load_public_key(_other_public_key(tmp_path))])
        try:
            parse_pass(v["pass_text"], other)
            raise AssertionError("verified with the wrong key")
        except PassError as e:
            assert e.reason == "unknown-key"

        # A later window starts when asked (site-local time); more than 30 days ahead is refused.
        start = (datetime.now(SHANGHAI) + timedelta(days=1)).replace(second=0, microsecond=0)
        r = await register(p, name="Bob", house="3-1-101", start=start.strftime("%Y-%m-%dT%H:%M"), hours="2", uses="1")
        assert r.status == 303
        later = await (await p.client.get(r.headers["Location"].replace("/visitors/", "/api/visitors/"))).json()
        ps2 = parse_pass(later["visitor"]["pass_text"], ring)
        assert ps2.not_before == int(start.timestamp()) and ps2.life_s == 2 * 3600 and ps2.units == ("3/1",)
        r = await register(p, name="Bob", house="3-1-101", start="2099-01-01T09:00", hours="2", uses="1")
        assert r.status == 400
        audit = await p.services.store.read(
            lambda c: [
                tuple(x) for x in c.execute("SELECT actor, action, target FROM audit WHERE action = 'visitor.register'")
            ]
        )
        assert audit[0] == ("guard:guard1", "visitor.register", f"visitor:{vid}") and len(audit) == 2

        # The slip, in a real browser: the QR read back with a standard decoder, and the print view.
        page_html = await (await p.client.get(slip_url)).text()
        assert "3幢2单元门" in page_html and "送家具" in page_html  # on screen only (tests/test_screens_browser.py)
        assert "张伟" not in page_html and "李娜" not in page_html  # no resident's name, on screen or paper
        assert re.search(r'<div class="qr" id="pass-qr"><svg ', page_html)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                ctx = await browser.new_context(viewport={"width": 900, "height": 1000})
                await ctx.add_cookies(
                    [{"name": c.key, "value": c.value, "url": p.origin} for c in p.client.session.cookie_jar]
                )
                page = await ctx.new_page()
                await page.goto(p.origin + slip_url)
                shot = await page.locator("#pass-qr").screenshot()
                found = [
                    x.text
                    for x in zxingcpp.read_barcodes(Image.open(io.BytesIO(shot)), formats=zxingcpp.BarcodeFormat.QRCode)
                ]
                assert found == [v["pass_text"]]
                assert parse_pass(found[0], ring).pass_id == ps.pass_id
                await page.screenshot(path=str(artifacts / "visitor_slip.png"), full_page=True)
                await page.emulate_media(media="print")
                assert await page.locator("header.top").is_hidden()
                assert await page.locator("#print-slip").is_hidden()
                assert await page.locator("#pass-qr").is_visible()
                # The registration page shows the residents as the guard types the house.
                await page.emulate_media(media="screen")
                await page.goto(p.origin + "/visitors")
                await page.fill("#v-house", "3-2-301")
                info_line = page.locator("#house-info")
                await info_line.filter(has_text="张伟").wait_for(timeout=10_000)
                assert "138****5678" in await info_line.inner_text()
                assert "刘访客" in await page.locator("#visitors").inner_text()
            finally:
                await browser.close()


def _other_public_key(tmp_path: Path) -> Path:
    from gateway.wire.passes import generate_keypair, save_public_key

    path = tmp_path / "other.pub.pem"
    save_public_key(path, generate_keypair()[1])
    return path
