"""Door plates: every plate (PNG, SVG, printed sheet) decodes with a standard decoder (zxing-cpp) to the
portal URL for that plate; a reissued plate's old URL gets exactly the answer an unknown code gets;
guessing codes is throttled per address; and public pages never show residents' personal data."""

from __future__ import annotations

import io
import re
from pathlib import Path

import zxingcpp
from PIL import Image
from playwright.async_api import async_playwright

from portal import plates
from portal import registry as reg
from tests.portal_support import running_portal, write_config
from tests.registry_support import (
    PEOPLE,
    admin_session,
    estate_csv,
    form,
    house_id,
    import_csv,
    plate_code,
    without_tokens,
)

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PUBLIC = "https://wy.example.cn/portal"


def decode(img: Image.Image) -> list[str]:
    return [r.text for r in zxingcpp.read_barcodes(img) if r.format == zxingcpp.BarcodeFormat.QRCode]


async def test_plates_decode_to_their_urls_as_png_svg_and_printed_sheets(tmp_path: Path, artifacts: Path) -> None:
    extra = f"public_url: {PUBLIC}\n"
    async with running_portal(write_config(tmp_path, None, extra=extra)) as p, async_playwright() as pw:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        hid = await house_id(p, "3", "2", "301")
        code = await plate_code(p, "3", "2", "301")
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", code) and str(hid) != code  # 128 random bits, not a row number
        want = f"{PUBLIC}/p/{code}"

        r = await p.client.get(f"/admin/registry/plates/house/{hid}.png")
        assert r.status == 200 and r.headers["Content-Type"] == "image/png"
        assert decode(Image.open(io.BytesIO(await r.read()))) == [want]

        r = await p.client.get(f"/admin/registry/plates/house/{hid}.svg")
        svg = await r.text()
        assert r.status == 200 and svg.startswith("<svg") and "<script" not in svg and "style=" not in svg
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 400, "height": 400})
            await page.set_content(f'<body style="margin:0;background:#fff"><div style="width:300px">{svg}</div>')
            shot = await page.locator("svg").screenshot()
        finally:
            await browser.close()
        assert decode(Image.open(io.BytesIO(shot))) == [want]

        # The printed sheet of building 3: its two entrances, then its three flats, in order.
        bid = await p.services.store.read(lambda c: c.execute(
            "SELECT id FROM reg_buildings WHERE code = '3'").fetchone()[0])
        specs = await p.services.store.read(lambda c: reg.plates_for(c, bid))
        assert [s.address_zh for s in specs] == ["阳光花园3幢1单元", "阳光花园3幢2单元", "阳光花园3幢1单元101室",
                                                 "阳光花园3幢1单元102室", "阳光花园3幢2单元301室",
                                                 "阳光花园3幢2单元302室"]
        pages = list(plates.render_pages(specs, PUBLIC, title="阳光花园 3幢"))
        assert len(pages) == 1 and pages[0].size == (2480, 3508)
        assert sorted(decode(pages[0])) == sorted(f"{PUBLIC}/p/{s.code}" for s in specs)
        pages[0].convert("L").resize((620, 877)).save(artifacts / "plates_sheet_page1.png")
        r = await p.client.get(f"/admin/registry/buildings/{bid}/sheet.pdf")
        pdf = await r.read()
        assert r.status == 200 and pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page\n") == 1
        html = await (await p.client.get(f"/admin/registry/buildings/{bid}/sheet")).text()
        assert html.count('<div class="plate">') == 6 and "阳光花园3幢2单元301室" in html


def test_a_large_sheet_paginates_and_every_page_decodes() -> None:
    specs = [reg.PlateSpec(reg.new_plate_code(), "house", f"阳光花园9幢1单元{i}室", "") for i in range(1, 27)]
    pages = list(plates.render_pages(specs, "http://127.0.0.1:8080"))
    assert len(pages) == 3
    found = [t for page in pages for t in decode(page)]
    assert sorted(found) == sorted(f"http://127.0.0.1:8080/p/{s.code}" for s in specs)
    pdf = plates.sheets_pdf(specs, "http://127.0.0.1:8080", title="9幢")
    assert pdf.count(b"/Type /Page\n") == 3


async def test_a_reissued_plate_answers_exactly_like_an_unknown_one(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        hid = await house_id(p, "3", "2", "301")
        old = await plate_code(p, "3", "2", "301")
        before = await p.client.get(f"/p/{old}")
        assert before.status == 200 and "阳光花园3幢2单元301室" in await before.text()
        r = await form(p, "/admin/registry/plates/reissue", {"kind": "house", "id": str(hid)}, csrf)
        assert r.status == 303
        new = await plate_code(p, "3", "2", "301")
        assert new != old
        assert (await p.client.get(f"/p/{new}")).status == 200
        withdrawn = await p.client.get(f"/p/{old}")
        unknown = await p.client.get(f"/p/{reg.new_plate_code()}")
        junk = await p.client.get("/p/' OR 1=1 --")
        w_text, u_text = await withdrawn.text(), await unknown.text()
        assert withdrawn.status == unknown.status == junk.status == 404
        assert without_tokens(w_text) == without_tokens(u_text) == without_tokens(await junk.text())
        assert "无效或已停用" in w_text and "301" not in w_text
        # Posting to a withdrawn plate does nothing either.
        pc = w_text.split('name="csrf-token" content="')[1].split('"')[0]
        r = await form(p, f"/p/{old}/sos", {}, pc)
        assert r.status == 404
        assert await p.services.store.read(lambda c: c.execute("SELECT count(*) FROM work_items").fetchone()[0]) == 0


async def test_guessing_codes_gets_an_address_throttled(tmp_path: Path) -> None:
    extra = "phone: {bad_codes_per_10min: 5, scans_per_min: 1000}\n"
    async with running_portal(write_config(tmp_path, None, extra=extra)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        good = await plate_code(p, "3", "2", "301")
        assert (await p.client.get(f"/p/{good}")).status == 200
        statuses = [(await p.client.get(f"/p/{reg.new_plate_code()}")).status for _ in range(8)]
        assert statuses[:5] == [404] * 5 and set(statuses[5:]) == {429}
        # Now even a real code gets nothing from this address: guessing cannot tell hits from misses.
        assert (await p.client.get(f"/p/{good}")).status == 429


async def test_public_pages_never_show_names_or_phone_numbers(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        await p.client.post("/logout", data={"csrf": csrf}, headers={"Origin": p.origin})
        p.client.session.cookie_jar.clear()
        secrets_ = [x for b, u, h, name, phone, *_ in PEOPLE for x in (name, phone, phone[-8:], reg.mask_phone(phone))]
        pages: dict[str, str] = {}
        for b, u, h in (("3", "2", "301"), ("3", "2", "302"), ("3", "1", "101")):
            code = await plate_code(p, b, u, h)
            for path in (f"/p/{code}", f"/p/{code}/register", f"/p/{code}/report"):
                r = await p.client.get(path)
                assert r.status == 200, path
                pages[path] = await r.text()
            pc = pages[f"/p/{code}"].split('name="csrf" value="')[1].split('"')[0]
            r = await form(p, f"/p/{code}/sos", {}, pc)
            pages[f"/p/{code}/sos"] = await r.text()
            r = await p.client.get(f"/p/{code}/mypass.json")
            assert r.status == 401
        for b, u in (("3", "2"), ("3", "1")):
            code = await plate_code(p, b, u)
            pages[f"/p/{code}"] = await (await p.client.get(f"/p/{code}")).text()
        pages["/m/login"] = await (await p.client.get("/m/login")).text()
        pages["invalid"] = await (await p.client.get(f"/p/{reg.new_plate_code()}")).text()
        for lang in ("en", "zh-CN"):
            await p.client.get(f"/lang/{lang}", allow_redirects=False)
            code = await plate_code(p, "3", "2", "301")
            pages[f"{lang}:/p/{code}"] = await (await p.client.get(f"/p/{code}")).text()
        assert "Building 3 Unit 2" in pages[f"en:/p/{code}"]
        for path, html in pages.items():
            for s in secrets_:
                assert s not in html, f"{s!r} on the public page {path}"
