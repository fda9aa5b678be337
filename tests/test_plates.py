"""Door plates: every plate (PNG, SVG, printed sheet) decodes with a standard decoder (zxing-cpp) to the
portal URL for that plate; printed sheets are checked as a printer gets them (the PDF rendered by an
independent renderer, PDFium, at 300 dpi): every code in its cell, its address under it, cut lines; the
fast QR encoder makes exactly the qrcode library's symbols; a reissued plate's old URL gets exactly the
answer an unknown code gets; guessing codes is throttled per address; and public pages never show
residents' personal data."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import pypdfium2 as pdfium
import pytest
import qrcode
import zxingcpp
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFont
from playwright.async_api import async_playwright
from qrcode import util as qr_util

from portal.estate import plates
from portal.estate import registry as reg
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
A4_PT = (210 / 25.4 * 72, 297 / 25.4 * 72)
DOT = 25.4 / plates.DPI  # mm


def decode(img: Image.Image) -> list[str]:
    return [r.text for r in zxingcpp.read_barcodes(img) if r.format == zxingcpp.BarcodeFormat.QRCode]


def pdf_pages(pdf: bytes) -> list[tuple[tuple[float, float], Image.Image]]:
    """Each page's size in points and its grey rendering at 300 dpi, by PDFium."""
    doc = pdfium.PdfDocument(pdf)
    try:
        out = []
        for i in range(len(doc)):
            page = doc[i]
            try:
                out.append((page.get_size(), page.render(scale=plates.DPI / 72, grayscale=True).to_pil().convert("L")))
            finally:
                page.close()
        return out
    finally:
        doc.close()


def ink_box(img: Image.Image) -> tuple[int, int, int, int] | None:
    return img.point(lambda v: 255 if v < 128 else 0).getbbox()


def check_sheet_page(size: tuple[float, float], page: Image.Image, specs: Sequence[reg.PlateSpec], base: str) -> None:
    """An A4 page with each plate's code in its own cell of the 3×4 grid in order, reading back to the plate's
    URL, with ink under it as wide as the plate's address set in the sheet font, and dashed cut lines."""
    assert abs(size[0] - A4_PT[0]) < 0.1 and abs(size[1] - A4_PT[1]) < 0.1
    margin = round(plates.MARGIN_MM / DOT)
    cell_w = (page.width - 2 * margin) // plates.COLS
    cell_h = (page.height - 2 * margin) // plates.ROWS
    found = {r.text: r for r in zxingcpp.read_barcodes(page) if r.format == zxingcpp.BarcodeFormat.QRCode}
    assert sorted(found) == sorted(plates.plate_url(base, s.code) for s in specs)
    font_path, index = plates.find_font()
    for i, spec in enumerate(specs):
        col, row = i % plates.COLS, i // plates.COLS
        x0, y0 = margin + col * cell_w, margin + row * cell_h
        pos = found[plates.plate_url(base, spec.code)].position
        xs, ys = [pos.top_left.x, pos.bottom_right.x], [pos.top_left.y, pos.bottom_right.y]
        assert x0 < min(xs) < max(xs) < x0 + cell_w and y0 < min(ys) < max(ys) < y0 + cell_h, spec
        side_mm = (max(xs) - min(xs)) * DOT
        assert 30 < side_mm <= plates.QR_MM, f"{side_mm:.1f} mm"  # big enough to scan from a door
        # The first line of ink under the code is the address, as wide as that text set in the sheet font.
        band = page.crop((x0 + 4, max(ys) + 8, x0 + cell_w - 4, min(max(ys) + 220, y0 + cell_h - 4)))
        rows = [ink_box(band.crop((0, y, band.width, y + 1))) is not None for y in range(band.height)]
        top = rows.index(True)
        bottom = rows.index(False, top)
        box = ink_box(band.crop((0, top, band.width, bottom)))
        assert box is not None
        width = box[2] - box[0]
        left, _, right, _ = ImageFont.truetype(font_path, 52, index=index).getbbox(spec.address_zh, mode="1")
        want = min(right - left, cell_w - round(6 / DOT))
        assert abs(width - want) <= max(4, want * 0.04), (spec.address_zh, width, want)
    # Dashed cut lines around and between the cells: about 24 dots inked in every 42.
    for y in (margin + r * cell_h for r in range(plates.ROWS + 1)):
        line = page.crop((margin, y - 1, page.width - margin, y + 2)).resize((page.width - 2 * margin, 1))
        inked = sum(1 for v in line.tobytes() if v < 160) / line.width
        assert 0.45 < inked < 0.7, (y, inked)
    for x in (margin + c * cell_w for c in range(plates.COLS + 1)):
        line = page.crop((x - 1, margin, x + 2, page.height - margin)).resize((1, page.height - 2 * margin))
        inked = sum(1 for v in line.tobytes() if v < 160) / line.height
        assert 0.45 < inked < 0.7, (x, inked)


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
        bid = await p.services.store.read(
            lambda c: c.execute("SELECT id FROM reg_buildings WHERE code = '3'").fetchone()[0]
        )
        specs = await p.services.store.read(lambda c: reg.plates_for(c, bid))
        assert [s.address_zh for s in specs] == [
            "阳光花园3幢1单元",
            "阳光花园3幢2单元",
            "阳光花园3幢1单元101室",
            "阳光花园3幢1单元102室",
            "阳光花园3幢2单元301室",
            "阳光花园3幢2单元302室",
        ]
        r = await p.client.get(f"/admin/registry/buildings/{bid}/sheet.pdf")
        pdf = await r.read()
        assert r.status == 200 and r.headers["Content-Type"] == "application/pdf" and pdf.startswith(b"%PDF")
        pages = pdf_pages(pdf)
        assert len(pages) == 1
        check_sheet_page(*pages[0], specs, PUBLIC)
        pages[0][1].resize((620, 877)).save(artifacts / "plates_sheet_page1.png")
        html = await (await p.client.get(f"/admin/registry/buildings/{bid}/sheet")).text()
        assert html.count('<div class="plate">') == 6 and "阳光花园3幢2单元301室" in html


@pytest.mark.process  # the sheet's worker processes, started deep in portal.plates
def test_a_large_sheet_paginates_and_worker_processes_print_the_same_pdf() -> None:
    specs = [reg.PlateSpec(reg.new_plate_code(), "house", f"阳光花园9幢1单元{i}室", "") for i in range(1, 27)]
    specs[0] = reg.PlateSpec(specs[0].code, "entrance", "阳光花园9幢1单元", "单元门")
    specs[13] = reg.PlateSpec(specs[13].code, "house", "阳光花园国际社区北苑二期9幢1单元1402室", "")  # must shrink
    base = "http://127.0.0.1:8080"
    done: dict[int, list[int]] = {0: [], 2: []}
    pdfs = {w: plates.sheets_pdf(specs, base, title="阳光花园 9幢", workers=w, progress=done[w].append) for w in done}
    assert pdfs[0] == pdfs[2]  # split over two child interpreters, byte for byte the same file
    assert done[0] == [12, 12, 2] and sorted(done[2]) == [2, 12, 12]  # as the pages are finished
    pages = pdf_pages(pdfs[2])
    assert len(pages) == 3
    for n, (size, page) in enumerate(pages):
        check_sheet_page(size, page, specs[n * plates.PER_PAGE : (n + 1) * plates.PER_PAGE], base)


async def test_a_large_building_prints_through_worker_processes_from_the_portal(tmp_path: Path) -> None:
    """The admin's sheet of a 222-plate building: rendered by child interpreters started from the portal's
    worker thread (seen while the request runs), while the portal keeps answering; every page reads back."""
    flats = [f"s1,阳光花园,7,{u},{f}{i:02d},,,,,,\n" for u in (1, 2) for f in range(1, 29) for i in (1, 2, 3, 4)]
    async with running_portal(write_config(tmp_path, None, extra=f"public_url: {PUBLIC}\n")) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv("".join(flats[:220]))))[0] == 200
        bid = await p.services.store.read(
            lambda c: c.execute("SELECT id FROM reg_buildings WHERE code = '7'").fetchone()[0]
        )
        specs = await p.services.store.read(lambda c: reg.plates_for(c, bid))
        assert len(specs) == 222 >= plates.PARALLEL_MIN_PLATES
        me = psutil.Process()
        request = asyncio.create_task(p.client.get(f"/admin/registry/buildings/{bid}/sheet.pdf"))
        workers: set[int] = set()
        slowest = 0.0
        while not request.done():
            for child in me.children():
                with contextlib.suppress(psutil.Error):  # it may have finished meanwhile
                    if "spawn_main" in " ".join(child.cmdline()):  # a ProcessPoolExecutor worker (spawn)
                        workers.add(child.pid)
            t0 = time.perf_counter()
            assert (await p.client.get("/api/health")).status == 200
            slowest = max(slowest, time.perf_counter() - t0)
            await asyncio.sleep(0.02)
        r = await request
        pdf = await r.read()
        assert r.status == 200 and len(workers) == plates.auto_workers(len(specs)) == plates.cpu_count()
        assert slowest < 1.0, slowest
        pages = pdf_pages(pdf)
        assert len(pages) == 19
        for n in (0, 9, 18):
            check_sheet_page(*pages[n], specs[n * plates.PER_PAGE : (n + 1) * plates.PER_PAGE], PUBLIC)


@pytest.mark.process  # the sheet's worker processes, started deep in portal.plates
def test_one_job_prints_a_pdf_a_building() -> None:
    def house(b: int, i: int) -> reg.PlateSpec:
        return reg.PlateSpec(reg.new_plate_code(), "house", f"阳光花园{b}幢1单元{i}室", "")

    sheets = [plates.Sheet(f"阳光花园 {b}幢", [house(b, i) for i in range(1, 2 + 12 * b)]) for b in (1, 2)]
    out = plates.render_sheets(sheets, PUBLIC, workers=2)
    assert [(s.title, s.plates, s.pages) for s in out] == [("阳光花园 1幢", 13, 2), ("阳光花园 2幢", 25, 3)]
    for sheet, rendered in zip(sheets, out, strict=True):
        pages = pdf_pages(rendered.pdf)
        assert len(pages) == rendered.pages
        assert sorted(t for _, page in pages for t in decode(page)) == sorted(
            plates.plate_url(PUBLIC, s.code) for s in sheet.plates
        )
        assert re.search(rb"/Title <FEFF[0-9A-F]+>", rendered.pdf)


def test_sheets_refuse_nothing_to_print_and_a_file_that_is_not_a_font(tmp_path: Path) -> None:
    spec = reg.PlateSpec(reg.new_plate_code(), "house", "阳光花园9幢1单元101室", "")
    with pytest.raises(plates.SheetError, match="no plates"):
        plates.sheets_pdf([], PUBLIC)
    with pytest.raises(plates.SheetError, match="not found"):
        plates.sheets_pdf([spec], PUBLIC, font=str(tmp_path / "missing.ttf"))
    bogus = tmp_path / "bogus.ttf"
    bogus.write_bytes(b"not a font at all")
    with pytest.raises(plates.SheetError, match="not a usable font"):
        plates.sheets_pdf([spec] * 30, PUBLIC, font=str(bogus), workers=2)


@settings(max_examples=40, deadline=None)
@given(
    data=st.one_of(st.binary(min_size=1, max_size=500), st.text(min_size=1, max_size=200)),
    ec=st.sampled_from(
        [qrcode.ERROR_CORRECT_L, qrcode.ERROR_CORRECT_M, qrcode.ERROR_CORRECT_Q, qrcode.ERROR_CORRECT_H]
    ),
)
def test_the_fast_encoder_makes_the_qrcode_librarys_own_symbols(data: bytes | str, ec: int) -> None:
    ref = qrcode.QRCode(error_correction=ec)
    ref.add_data(data)
    ref.make()
    ours = plates._Encoder(error_correction=ec)
    ours.add_data(data)
    ours.make()
    assert ours.version == ref.version and ours.modules == ref.modules
    layout = plates._LAYOUTS[ref.version]
    for mask in range(8):  # every mask's test symbol scores what the library's own scoring gives it
        ref.makeImpl(True, mask)
        rows, cols = plates._pack(ref.modules), plates._pack(list(zip(*ref.modules, strict=True)))
        assert layout.penalty(rows, cols) == qr_util.lost_point(ref.modules)


def test_png_and_svg_of_a_long_text_decode() -> None:
    text = "https://wy.example.cn/portal/p/" + "x" * 200  # version 10 or more: version information modules
    assert plates.matrix(text) == [list(r) for r in _reference(text)]
    assert decode(Image.open(io.BytesIO(plates.png(text, 4)))) == [text]


def _reference(text: str) -> list[list[bool]]:
    qr = qrcode.QRCode(error_correction=qrcode.ERROR_CORRECT_M, border=4)
    qr.add_data(text)
    qr.make(fit=True)
    return qr.get_matrix()


async def test_a_reissued_plate_answers_exactly_like_an_unknown_one(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        hid = await house_id(p, "3", "2", "301")
        old = await plate_code(p, "3", "2", "301")
        before = await p.client.get(f"/p/{old}")
        assert before.status == 200 and "阳光花园3幢2单元301室" in await before.text()
        r = await form(p, "/admin/registry/plates/reissue", {"kind": "house", "id": str(hid), "confirmed": "yes"}, csrf)
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


@pytest.mark.process  # the sheet's worker processes, started deep in portal.plates
@pytest.mark.parametrize(
    ("how", "stall_s", "error"),
    [
        ("killed", 30.0, "a sheet worker died"),  # the OOM killer, or an operator: the job fails at once
        ("stopped", 8.0, "finished no page in 8 s"),  # SIGSTOP, or stuck in the kernel: it fails at the stall limit
    ],
)
def test_a_worker_killed_or_stopped_mid_job_fails_the_job_and_leaves_no_worker_behind(
    monkeypatch: pytest.MonkeyPatch, how: str, stall_s: float, error: str
) -> None:
    """A sheet worker is taken away with its page: the job fails with a clear error (at once when the worker died,
    at the stall limit when it stopped answering) instead of waiting for ever, and no worker process is left, the
    stopped one included (a SIGTERM stays pending on a stopped process)."""
    monkeypatch.setattr(plates, "WORKER_STALL_S", stall_s)  # the first page (two interpreters started) comes within it
    specs = [reg.PlateSpec(reg.new_plate_code(), "house", f"阳光花园9幢1单元{i}室", "") for i in range(1, 241)]
    me = psutil.Process()

    def workers() -> list[psutil.Process]:
        return _sheet_workers(me)

    hit: list[float] = []

    def take_one(_plates: int) -> None:  # as the first page is finished, the workers are busy with the next ones
        if not hit:
            victim = workers()[0]
            victim.kill() if how == "killed" else victim.suspend()
            hit.append(time.monotonic())

    with pytest.raises(plates.SheetError, match=error):
        plates.sheets_pdf(specs, "http://127.0.0.1:8080", workers=2, progress=take_one)
    assert hit, "the job failed before a worker was taken: the stall limit ran out before the first page"
    took = time.monotonic() - hit[0]
    assert took < (10 if how == "killed" else stall_s + 30), f"the job failed {took:.1f} s after its worker was {how}"
    deadline = time.monotonic() + 10
    while workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers() == [], "a sheet worker outlived its failed job"


@pytest.mark.process
def test_a_page_that_fails_in_a_worker_fails_the_job_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """A page a worker cannot draw (here every page: a public URL too long for any QR code) fails the job with the
    worker's reason, not a hang or a dead worker, and the workers end."""
    specs = [reg.PlateSpec(reg.new_plate_code(), "house", f"阳光花园9幢1单元{i}室", "") for i in range(1, 49)]
    me = psutil.Process()
    with pytest.raises(plates.SheetError, match=r"a sheet worker failed: \w+Error: ."):
        plates.sheets_pdf(specs, "http://127.0.0.1:8080/" + "a" * 4000, workers=2)
    deadline = time.monotonic() + 10
    while _sheet_workers(me) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _sheet_workers(me) == []


def _sheet_workers(me: psutil.Process) -> list[psutil.Process]:
    """The sheet workers alive among this process's children (spawned interpreters; not the resource tracker)."""
    found = []
    for child in me.children():
        with contextlib.suppress(psutil.Error):  # it may have ended meanwhile
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
    return found
