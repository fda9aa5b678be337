"""Problem-report photos from a public house plate, sent to a real portal as a phone would (multipart POST) and read
back as the guard sees them: a phone's JPEG with its GPS position, camera and comment, a WebP and a PNG carrying
metadata, a TIFF (and other formats) renamed .jpg, and decompression bombs. Whatever is accepted is stored and served
as pixels only; whatever is refused is refused with a clear page and leaves no report behind. Photos stored before
this are cleaned at the portal's next start."""

from __future__ import annotations

import io
import sqlite3
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image, PngImagePlugin

from portal.config import load
from portal.estate import photos
from tests.portal_support import Portal, running_portal, wait_for, write_config
from tests.registry_support import GUARD, GUARD_PW, admin_session, estate_csv, import_csv, plate_code

CAMERA = "SpyPhone X200"
SERIAL = "SN-4417-0098"
COMMENT = b"shot at home"
GPS = {1: "N", 2: (31.0, 14.0, 12.5), 3: "E", 4: (121.0, 28.0, 45.25)}  # a flat in Shanghai, to the metre
TEXT = "a leak under the kitchen sink"


def _exif(orientation: int = 1) -> Image.Exif:
    ex = Image.Exif()
    ex[0x010F] = CAMERA  # Make
    ex[0xA431] = SERIAL  # BodySerialNumber (in the Exif IFD for real cameras; anywhere is metadata)
    ex[0x0112] = orientation
    ex[0x8825] = GPS  # GPSInfo
    return ex


def _picture(size: tuple[int, int] = (64, 32)) -> Image.Image:
    """Red on the left half, blue on the right: which way up it is stays visible after re-encoding."""
    im = Image.new("RGB", size, (220, 20, 20))
    im.paste((20, 20, 220), (size[0] // 2, 0, size[0], size[1]))
    return im


def phone_jpeg(orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    _picture().save(
        buf,
        "JPEG",
        exif=_exif(orientation),
        comment=COMMENT,
        quality=95,
        xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + CAMERA.encode() + b"</x:xmpmeta>",
    )
    return buf.getvalue()


def phone_mpo() -> bytes:
    """A phone JPEG with a second picture (depth map, as many Android cameras write): Pillow calls it MPO."""
    buf = io.BytesIO()
    _picture().save(buf, "MPO", save_all=True, append_images=[_picture()], exif=_exif())
    return buf.getvalue()


def webp_with_exif() -> bytes:
    buf = io.BytesIO()
    _picture().save(buf, "WEBP", exif=_exif(), quality=90)
    return buf.getvalue()


def png_with_text() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Location", "31.2368N 121.4792E")
    info.add_text("Author", CAMERA, zip=True)
    buf = io.BytesIO()
    _picture().save(buf, "PNG", pnginfo=info, exif=_exif())
    return buf.getvalue() + b"<html>appended after IEND</html>"


def other_format(fmt: str) -> bytes:
    buf = io.BytesIO()
    im = _picture()
    if fmt == "TIFF":
        im.save(buf, "TIFF", tiffinfo={0x010F: CAMERA})  # TIFF tags are where EXIF comes from
    else:
        im.save(buf, fmt)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid greyscale PNG of zeros: a few hundred KB that decode to width x height bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header says width x height (its data is for 16 x 16)."""
    data = bytearray(other_format("JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def metadata_left(photo: bytes) -> list[str]:
    """Everything in a stored photo that is not pixels, as a reader of the file would find it."""
    found = []
    im = Image.open(io.BytesIO(photo))
    if im.getexif():
        found.append(f"exif {dict(im.getexif())}")
    for key in ("exif", "xmp", "XML:com.adobe.xmp", "comment", "icc_profile", "Location", "Author"):
        if key in im.info:
            found.append(f"info[{key}]")
    for needle in (CAMERA.encode(), SERIAL.encode(), COMMENT, b"Exif\0", b"31.2368", b"<html>", b"adobe:ns:meta"):
        if needle in photo:
            found.append(f"bytes {needle!r}")
    return found


# ---------------------------------------------------------------- the portal


async def _setup(p: Portal) -> str:
    """An estate; returns the plate code of flat 3-2-301. p.client ends signed in as a guard."""
    csrf = await admin_session(p)
    assert (await import_csv(p, csrf, estate_csv()))[0] == 200
    await p.client.post("/logout", data={"csrf": csrf}, headers={"Origin": p.origin})
    await admin_session(p, GUARD, GUARD_PW, role="guard")
    return await plate_code(p, "3", "2", "301")


async def report(
    p: Portal, code: str, photo: bytes, filename: str = "IMG_2041.jpg", ctype: str = "image/jpeg"
) -> tuple[int, str]:
    """A phone's report with a photo, from a browser that is not signed in (the plate is public)."""
    async with aiohttp.ClientSession(base_url=p.origin, cookie_jar=aiohttp.CookieJar(unsafe=True)) as phone:
        page = await (await phone.get(f"/p/{code}/report")).text()
        form = aiohttp.FormData()
        form.add_field("csrf", page.split('name="csrf" value="')[1].split('"')[0])
        form.add_field("category", "repair")
        form.add_field("text", TEXT)
        form.add_field("photo", photo, filename=filename, content_type=ctype)
        async with phone.post(f"/p/{code}/report", data=form, headers={"Origin": p.origin}) as r:
            return r.status, await r.text()


async def work_items(p: Portal) -> list[dict[str, Any]]:
    return await p.services.store.read(
        lambda c: [
            dict(r)
            for r in c.execute(
                "SELECT id, text, photo_type, photo IS NOT NULL AS has_photo, photo_clean FROM work_items ORDER BY id"
            )
        ]
    )


async def served(p: Portal, wid: int) -> tuple[str, bytes]:
    """The photo as the guard's console shows it."""
    r = await p.client.get(f"/admin/registry/work/{wid}/photo")
    assert r.status == 200
    return r.headers["Content-Type"], await r.read()


@pytest.mark.parametrize(
    ("name", "make", "mime"),
    [
        ("phone JPEG, turned", lambda: phone_jpeg(orientation=6), "image/jpeg"),
        ("phone MPO", phone_mpo, "image/jpeg"),
        ("WebP", webp_with_exif, "image/webp"),
        ("PNG with text chunks and a tail", png_with_text, "image/png"),
    ],
)
async def test_a_photo_with_gps_and_camera_data_reaches_the_guard_as_pixels_only(
    tmp_path: Path, name: str, make: Any, mime: str
) -> None:
    upload = make()
    with Image.open(io.BytesIO(upload)) as sent:  # the attack's premise: the phone's position is in the file
        assert sent.getexif().get_ifd(0x8825) == GPS and SERIAL.encode() in upload
    async with running_portal(write_config(tmp_path, None)) as p:
        code = await _setup(p)
        status, _ = await report(p, code, upload)
        assert status == 200
        (item,) = await work_items(p)
        assert item["text"] == TEXT and item["photo_type"] == mime and item["photo_clean"] == 1
        ctype, photo = await served(p, item["id"])
        assert ctype == mime
        assert metadata_left(photo) == [], name
        im = Image.open(io.BytesIO(photo))
        im.load()
        if name == "phone JPEG, turned":  # EXIF orientation 6: shown as the camera was held, then forgotten
            assert im.size == (32, 64)
            rgb = im.convert("RGB")  # turned a quarter clockwise: the left (red) half is now on top
            assert rgb.getpixel((16, 4))[0] > 150 and rgb.getpixel((16, 60))[2] > 150
        else:
            assert im.size == (64, 32)
            assert im.convert("RGB").getpixel((4, 16))[0] > 150 and im.convert("RGB").getpixel((60, 16))[2] > 150


@pytest.mark.parametrize("fmt", ["TIFF", "GIF", "BMP", "ICO", "PPM", "HTML"])
async def test_other_formats_named_jpg_are_refused_and_leave_no_report(tmp_path: Path, fmt: str) -> None:
    """A TIFF (or GIF, BMP, ICO, PPM, an HTML page) called IMG_2041.jpg and sent as image/jpeg: never parsed by
    their plugins, refused with the page that says which formats are taken, and no report is stored."""
    data = b"<!doctype html><script>alert(1)</script>" if fmt == "HTML" else other_format(fmt)
    with Image.open(io.BytesIO(other_format(fmt) if fmt != "HTML" else other_format("PNG"))) as im:
        assert im.format in (fmt, "PNG")  # what the file really is
    async with running_portal(write_config(tmp_path, None)) as p:
        code = await _setup(p)
        status, html = await report(p, code, data)
        assert status == 415 and "只能上传 JPEG、PNG 或 WebP 照片" in html
        assert await work_items(p) == []


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("PNG of 60 megapixels in a small file", lambda: png_bomb(10_000, 6_000)),
        ("JPEG claiming 65000 x 65000", lambda: jpeg_claiming(65_000, 65_000)),
    ],
)
async def test_decompression_bombs_are_refused_before_they_are_decoded(tmp_path: Path, name: str, make: Any) -> None:
    bomb = make()
    assert len(bomb) < 1024 * 1024, len(bomb)  # well under the upload limit of 4 MiB
    async with running_portal(write_config(tmp_path, None)) as p:
        code = await _setup(p)
        t0 = time.monotonic()
        status, html = await report(p, code, bomb, filename="IMG_2042.png", ctype="image/png")
        took = time.monotonic() - t0
        cap = "1600" if name.startswith("PNG") else "5000"  # a PNG's cap is the whole-decode one (below)
        assert status == 413 and f"照片像素太多（最多 {cap} 万像素）" in html, name
        assert took < 10, f"{name}: {took:.1f} s: it was decoded"
        assert await work_items(p) == []
    # A PNG is decoded whole, its pixels' count the time spent: even a portal that allows 80 megapixels takes a
    # public report's PNG up to 16 (photos.REPORT_FULL_DECODE_MAX), and says so.
    if name.startswith("PNG"):
        cfg = write_config(tmp_path / "big", None, extra="phone: {photo_max_pixels: 80000000}\n")
        async with running_portal(cfg) as p:
            code = await _setup(p)
            status, html = await report(p, code, bomb, filename="IMG_2042.png", ctype="image/png")
            assert status == 413 and "照片像素太多（最多 1600 万像素）" in html
            status, _ = await report(p, code, png_bomb(4_000, 3_000), filename="IMG_2043.png", ctype="image/png")
            assert status == 200  # 12 megapixels: taken, scaled down
            (item,) = await work_items(p)
            _, photo = await served(p, item["id"])
            assert Image.open(io.BytesIO(photo)).size == (2560, 1920)


async def test_past_the_report_limit_a_phone_s_photos_are_not_even_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding is the costly part of a report (seconds of CPU for a big PNG): one phone posting report after report
    gets its ten an hour decoded, and the rest refused before their photo is looked at."""
    decoded = []
    real = photos.clean

    def counted(data: bytes, *limits: int | None) -> photos.Photo:
        decoded.append(len(data))
        return real(data, *limits)  # type: ignore[arg-type]

    monkeypatch.setattr(photos, "clean", counted)
    async with running_portal(write_config(tmp_path, None)) as p:
        code = await _setup(p)
        answers = [(await report(p, code, phone_jpeg()))[0] for _ in range(13)]
        assert answers == [200] * 10 + [429] * 3, answers
        assert len(decoded) == 10
        assert len(await work_items(p)) == 10


async def test_photos_stored_before_are_cleaned_or_dropped_at_the_next_start(tmp_path: Path) -> None:
    """A store from before: one report's JPEG still has its GPS position, another's 'photo' is a TIFF. After the
    upgrade the first is pixels only, the second report keeps its text and loses the photo."""
    cfg = write_config(tmp_path, None)
    async with running_portal(cfg) as p:
        await _setup(p)
    db = load(cfg).db_path
    conn = sqlite3.connect(db)
    try:
        house = conn.execute("SELECT id FROM reg_houses WHERE code = '301'").fetchone()[0]
        for photo, ptype in ((phone_jpeg(), "image/jpeg"), (other_format("TIFF"), "image/jpeg")):
            conn.execute(
                "INSERT INTO work_items (kind, house_id, category, text, photo, photo_type, photo_clean,"
                " created_at, updated_at) VALUES ('problem', ?, 'repair', ?, ?, ?, 0, '2026-01-01T00:00:00Z',"
                " '2026-01-01T00:00:00Z')",
                (house, TEXT, photo, ptype),
            )
        conn.commit()
    finally:
        conn.close()
    async with running_portal(cfg) as p:
        await admin_session(p, "guard2", GUARD_PW, role="guard")

        async def cleaned() -> list[dict[str, Any]] | None:
            items = await work_items(p)
            return items if all(i["photo_clean"] for i in items) else None

        first, second = await wait_for(cleaned, timeout=30, what="the stored photos cleaned")
        assert first["has_photo"] and metadata_left((await served(p, first["id"]))[1]) == []
        assert not second["has_photo"] and second["text"] == TEXT and second["photo_type"] is None
        r = await p.client.get(f"/admin/registry/work/{second['id']}/photo")
        assert r.status == 404


async def test_only_the_jpeg_png_and_webp_parsers_ever_look_at_an_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow offers an upload to every format plugin it has until one claims it (TIFF, EPS through Ghostscript,
    PSD, FITS, ...). A tripwire format registered first with Pillow sees what it is offered: nothing, whatever the
    upload is, because the portal opens photos as JPEG, PNG or WebP only."""
    offered: list[bytes] = []

    def accept(prefix: bytes) -> bool:
        offered.append(prefix[:8])
        return False

    monkeypatch.setattr(Image, "ID", ["TRIPWIRE", *Image.ID])
    monkeypatch.setitem(Image.OPEN, "TRIPWIRE", (lambda fp, filename: None, accept))
    Image.open(io.BytesIO(other_format("TIFF"))).close()
    assert offered, "the tripwire is not consulted by Pillow: this test could not see a wider parse"
    offered.clear()
    async with running_portal(write_config(tmp_path, None)) as p:
        code = await _setup(p)
        for upload in (phone_jpeg(), other_format("TIFF"), other_format("GIF"), b"%!PS-Adobe-3.0 EPSF-3.0\n"):
            await report(p, code, upload)
    assert offered == []


# ---------------------------------------------------------------- in a phone's browser


async def test_a_phone_sends_its_gps_photo_and_a_bomb_in_a_real_browser(tmp_path: Path, artifacts: Path) -> None:
    """Chromium at a phone's size, the page's own script sending the form: the camera photo goes through (its
    position does not), the bomb is refused with the pixel limit in Chinese and, after the language switch,
    in English."""
    from playwright.async_api import async_playwright, expect

    photo, bomb = tmp_path / "IMG_2041.jpg", tmp_path / "IMG_2042.png"
    photo.write_bytes(phone_jpeg(orientation=6))
    bomb.write_bytes(png_bomb(10_000, 6_000))
    async with running_portal(write_config(tmp_path / "portal", None)) as p, async_playwright() as pw:
        code = await _setup(p)
        browser = await pw.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            ctx = await browser.new_context(
                viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
            )
            page = await ctx.new_page()
            for lang, words in (("zh-CN", "照片像素太多（最多 1600 万像素）"), ("en", "at most 16 megapixels")):
                if lang == "en":
                    await page.goto(f"{p.origin}/lang/en?next=/p/{code}/report")
                else:
                    await page.goto(f"{p.origin}/p/{code}/report")
                await page.fill("#text", TEXT)
                await page.set_input_files("#photo", str(bomb))
                await page.click("#report-submit")
                await expect(page.locator("#error")).to_contain_text(words, timeout=10_000)
                await page.screenshot(path=str(artifacts / f"report-photo-bomb-{lang}.png"), full_page=True)
            assert await work_items(p) == []
            await page.goto(f"{p.origin}/p/{code}/report")
            await page.fill("#text", TEXT)
            await page.set_input_files("#photo", str(photo))
            await page.click("#report-submit")
            await expect(page.locator("#error")).to_have_count(0, timeout=10_000)
            (item,) = await wait_for(lambda: work_items(p), what="the report stored")
            _, stored = await served(p, item["id"])
            assert metadata_left(stored) == [] and Image.open(io.BytesIO(stored)).size == (32, 64)
        finally:
            await browser.close()
