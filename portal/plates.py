"""Door plates: QR codes (qrcode library) of the portal URL for a plate, as PNG and SVG, and print-ready
A4 sheets (a multi-page PDF of 1-bit 300 dpi pages, CCITT G4 compressed, with the address in Chinese
under each code and dashed cut lines), plus the data for an HTML print page.

Everything here is CPU work: callers run it on a worker thread, never on the event loop.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import qrcode
from PIL import Image, ImageDraw, ImageFont
from qrcode.constants import ERROR_CORRECT_M

from portal.registry import PlateSpec

DPI = 300
A4_MM = (210, 297)
MARGIN_MM = 10
COLS, ROWS = 3, 4
PER_PAGE = COLS * ROWS
QR_MM = 48
FONT_CANDIDATES = (
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 2),  # index 2: Simplified Chinese
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc", 2),
    ("/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc", 2),
    ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc", 2),
    ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", 0),
    ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", 0),
    ("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf", 0),
    ("/usr/share/fonts/truetype/arphic/uming.ttc", 0),
)


class SheetError(RuntimeError):
    """Sheets cannot be rendered here (no CJK font)."""


def plate_url(base: str, code: str) -> str:
    return f"{base.rstrip('/')}/p/{code}"


def matrix(text: str, border: int = 4) -> list[list[bool]]:
    """The QR modules of ``text`` (error correction M: survives a scuffed plate), quiet zone included."""
    qr = qrcode.QRCode(error_correction=ERROR_CORRECT_M, border=border)
    qr.add_data(text)
    qr.make(fit=True)
    return [list(row) for row in qr.get_matrix()]


def svg(text: str, *, size: str = "100%", title: str = "") -> str:
    """An SVG QR: one path of horizontal runs; no styles or scripts, safe to put inline in a page."""
    m = matrix(text)
    n = len(m)
    parts = []
    for y, row in enumerate(m):
        x = 0
        while x < n:
            if row[x]:
                start = x
                while x < n and row[x]:
                    x += 1
                parts.append(f"M{start} {y}h{x - start}v1h-{x - start}z")
            else:
                x += 1
    t = f"<title>{_esc(title)}</title>" if title else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {n} {n}" width="{size}" height="{size}"'
            f' shape-rendering="crispEdges" role="img">{t}<rect width="{n}" height="{n}" fill="#fff"/>'
            f'<path fill="#000" d="{"".join(parts)}"/></svg>')


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def image(text: str, module_px: int = 10) -> Image.Image:
    """A 1-bit image of the QR, ``module_px`` pixels per module."""
    return matrix_image(matrix(text), module_px)


def matrix_image(m: list[list[bool]], module_px: int) -> Image.Image:
    n = len(m)
    raw = bytes(0 if v else 255 for row in m for v in row)
    small = Image.frombytes("L", (n, n), raw)
    return small.resize((n * module_px, n * module_px), Image.Resampling.NEAREST).convert("1", dither=None)


def png(text: str, module_px: int = 10) -> bytes:
    buf = io.BytesIO()
    image(text, module_px).save(buf, "PNG", optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------- sheets


def find_font(configured: str = "") -> tuple[str, int]:
    if configured:
        if not Path(configured).is_file():
            raise SheetError(f"sheet font {configured} not found")
        return configured, 0
    for path, index in FONT_CANDIDATES:
        if Path(path).is_file():
            return path, index
    raise SheetError("no Chinese font found for plate sheets (install fonts-noto-cjk or set phone.sheet_font)")


@lru_cache(maxsize=8)
def _font(path: str, index: int, px: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(path, px, index=index)
    except OSError:
        return ImageFont.truetype(path, px)


def _mm(v: float) -> int:
    return round(v * DPI / 25.4)


def _dashed(draw: ImageDraw.ImageDraw, xy: tuple[int, int, int, int], dash: int = 24, gap: int = 18) -> None:
    x0, y0, x1, y1 = xy
    if y0 == y1:
        for x in range(x0, x1, dash + gap):
            draw.line((x, y0, min(x + dash, x1), y1), fill=0, width=2)
    else:
        for y in range(y0, y1, dash + gap):
            draw.line((x0, y, x1, min(y + dash, y1)), fill=0, width=2)


def _fit(draw: ImageDraw.ImageDraw, text: str, font_path: tuple[str, int], px: int, width: int
         ) -> ImageFont.FreeTypeFont:
    while px > 16:
        f = _font(font_path[0], font_path[1], px)
        if draw.textlength(text, font=f) <= width:
            return f
        px -= 4
    return _font(font_path[0], font_path[1], px)


def render_pages(plates: Sequence[PlateSpec], base_url: str, *, title: str = "", font: str = "",
                 progress: Callable[[int], None] | None = None) -> Iterator[Image.Image]:
    """A4 pages (mode "1", 300 dpi), 12 plates a page, each with its address under it and cut lines between."""
    font_path = find_font(font)
    pw, ph = _mm(A4_MM[0]), _mm(A4_MM[1])
    m = _mm(MARGIN_MM)
    cw, ch = (pw - 2 * m) // COLS, (ph - 2 * m) // ROWS
    qr_px = _mm(QR_MM)
    small = _font(font_path[0], font_path[1], 30)
    for start in range(0, len(plates), PER_PAGE):
        page = Image.new("1", (pw, ph), 1)
        draw = ImageDraw.Draw(page)
        batch = plates[start:start + PER_PAGE]
        for c in range(1, COLS):
            _dashed(draw, (m + c * cw, m, m + c * cw, ph - m))
        for r in range(1, ROWS):
            _dashed(draw, (m, m + r * ch, pw - m, m + r * ch))
        _dashed(draw, (m, m, pw - m, m))
        _dashed(draw, (m, ph - m, pw - m, ph - m))
        _dashed(draw, (m, m, m, ph - m))
        _dashed(draw, (pw - m, m, pw - m, ph - m))
        for i, p in enumerate(batch):
            col, row = i % COLS, i // COLS
            x0, y0 = m + col * cw, m + row * ch
            qm = matrix(plate_url(base_url, p.code))
            q = matrix_image(qm, max(1, qr_px // len(qm)))
            page.paste(q, (x0 + (cw - q.width) // 2, y0 + _mm(4)))
            ty = y0 + _mm(4) + q.height + _mm(2)
            big = _fit(draw, p.address_zh, font_path, 52, cw - _mm(6))
            draw.text((x0 + cw // 2, ty), p.address_zh, font=big, fill=0, anchor="ma")
            sub = (p.label + " · " if p.label else "") + "扫码 · 物业服务"
            draw.text((x0 + cw // 2, ty + _mm(7)), sub, font=small, fill=0, anchor="ma")
        foot = f"{title} · {start // PER_PAGE + 1}/{(len(plates) + PER_PAGE - 1) // PER_PAGE}"
        draw.text((pw // 2, ph - m + _mm(2)), foot, font=small, fill=0, anchor="ma")
        if progress is not None:
            progress(len(batch))
        yield page


def sheets_pdf(plates: Sequence[PlateSpec], base_url: str, *, title: str = "", font: str = "",
               progress: Callable[[int], None] | None = None) -> bytes:
    """Every plate on A4 pages as one PDF (1-bit pages, G4-compressed: a few kB a page)."""
    if not plates:
        raise SheetError("no plates to print")
    pages = render_pages(plates, base_url, title=title, font=font, progress=progress)
    first = next(pages)
    buf = io.BytesIO()
    first.save(buf, "PDF", resolution=DPI, save_all=True, append_images=pages, title=title or "plates")
    return buf.getvalue()
