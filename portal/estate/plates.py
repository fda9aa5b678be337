"""Door plates: QR codes (qrcode library) of the portal URL for a plate, as PNG and SVG, and print-ready
A4 sheets as PDF, plus the data for an HTML print page.

A sheet page is drawn, not photographed: each QR is one vector path of its dark modules on a grid of
whole 1/300-inch dots (sharp at any printer resolution, the same module size as a 300 dpi raster); the
dashed cut lines are vector strokes; the Chinese address under each code (and the small line under it,
and the page footer) is a 1-bit image mask rendered with a CJK font at 300 dpi. Pages of a large job are
rendered by worker processes, one per core (:func:`render_sheets`; fresh interpreters, a pipe each).

Everything here is CPU work: callers run it on a worker thread, never on the event loop.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import cast

import qrcode
from PIL import Image, ImageDraw, ImageFont
from qrcode import util as qr_util
from qrcode.constants import ERROR_CORRECT_M
from qrcode.image.pil import PilImage

from portal.estate.registry import PlateSpec

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
# A job of at least this many plates is split over worker processes (each costs ~0.2 s to start).
PARALLEL_MIN_PLATES = 200
WORKER_STALL_S = 60.0  # when the workers finish no page for this long the job fails


class SheetError(RuntimeError):
    """Sheets cannot be rendered here (no CJK font, nothing to print, a worker failed)."""


def plate_url(base: str, code: str) -> str:
    """A door plate's address (other plates: :meth:`PlateSpec.url`)."""
    return PlateSpec(code, "house", "", "").url(base)


# ---------------------------------------------------------------- QR matrices


_BITS = bytes.maketrans(b"\x00\x01", b"01")
_UNBITS = bytes.maketrans(b"01", b"\x00\x01")
_INK = bytes.maketrans(b"\x00\x01", b"\xff\x00")  # light module → white, dark → black
_P1, _P2 = "10111010000", "00001011101"  # finder-like 1:1:3:1:1 runs with four light modules after/before


@dataclass(frozen=True, slots=True)
class _Layout:
    """One QR version's geometry for scoring masks on whole symbols packed into ints.

    A symbol of n×n modules is packed twice: by rows (bit r·n+c is module (r, c)) and by columns
    (bit c·n+r). ``flips[k]`` turns a symbol masked with pattern 0 into the same symbol masked with k
    (only data modules flip).
    """

    n: int
    all_: int
    run2: int  # bits whose next module along the line is in the same line
    run11: int  # bits where an 11-module window along the line starts
    not_last: int  # row-packed bits of every row but the last
    flips: tuple[tuple[int, int], ...]  # (row-packed, column-packed) per mask pattern

    @classmethod
    def of(cls, modules: list[list[bool | None]]) -> _Layout:
        """From a symbol as qrcode holds it just before the data goes in: ``None`` marks the data region."""
        n = len(modules)
        region = [(r, c) for r in range(n) for c in range(n) if modules[r][c] is None]
        funcs = [qr_util.mask_func(k) for k in range(8)]
        flips = []
        for k in range(8):
            rows = cols = 0
            for r, c in region:
                if funcs[0](r, c) != funcs[k](r, c):
                    rows |= 1 << (r * n + c)
                    cols |= 1 << (c * n + r)
            flips.append((rows, cols))

        def starts(width: int) -> int:
            line = (1 << (n - width + 1)) - 1
            return sum(line << (i * n) for i in range(n))

        return cls(
            n=n,
            all_=(1 << n * n) - 1,
            run2=starts(2),
            run11=starts(11),
            not_last=(1 << n * (n - 1)) - 1,
            flips=tuple(flips),
        )

    def _runs(self, x: int) -> int:
        """Penalty 1 for every line of ``x``: a run of L ≥ 5 same-coloured modules costs L - 2."""
        same = ~(x ^ (x >> 1)) & self.run2
        four = same & (same >> 1) & (same >> 2) & (same >> 3)  # L - 4 bits for every run of L ≥ 5
        return four.bit_count() + 2 * (four & ~(four >> 1)).bit_count()

    def _finders(self, x: int) -> int:
        """Penalty 3: 40 for every 1:1:3:1:1 finder-like window with four light modules on one side."""
        inv = x ^ self.all_
        m1 = m2 = self.run11
        for j in range(11):
            dark, light = x >> j, inv >> j
            m1 &= dark if _P1[j] == "1" else light
            m2 &= dark if _P2[j] == "1" else light
        return 40 * (m1.bit_count() + m2.bit_count())

    def penalty(self, rows: int, cols: int) -> int:
        """The score :func:`qrcode.util.lost_point` gives the same symbol (ISO/IEC 18004 mask penalties)."""
        n = self.n
        score = self._runs(rows) + self._runs(cols) + self._finders(rows) + self._finders(cols)
        down = ~(rows ^ (rows >> n)) & self.not_last  # module equals the one below it
        blocks = down & (down >> 1) & ~(rows ^ (rows >> 1)) & self.run2
        score += 3 * blocks.bit_count()
        percent = float(rows.bit_count()) / (n**2)
        return score + int(abs(percent * 100 - 50) / 5) * 10


_LAYOUTS: dict[int, _Layout] = {}


def _pack(modules: Sequence[Sequence[bool]]) -> int:
    return int(b"".join(bytes(row) for row in modules).translate(_BITS)[::-1], 2)


class _Encoder(qrcode.QRCode[PilImage]):  # its images would be Pillow's; it makes matrices only
    """qrcode's own encoder making qrcode's own mask choice and symbol, without building it nine times.

    The library builds a test symbol for each of the eight masks and scores each one module by module in
    Python, then builds the chosen one again: four fifths of the time a plate took. Here the data region
    is learnt once per version from the library itself, one test symbol is built, the other seven are
    derived from it by flipping data modules and scored with whole-symbol integer operations under the
    library's rules, and the library's own format and version information is written onto the winner.
    """

    def map_data(self, data: Sequence[int], mask_pattern: int) -> None:
        if self.version not in _LAYOUTS:
            _LAYOUTS[self.version] = _Layout.of(self.modules)
        super().map_data(data, mask_pattern)

    def _scored(self) -> tuple[int, int]:
        """The best mask pattern and the test symbol it gives (row-packed)."""
        self.makeImpl(True, 0)
        # Every module is set once makeImpl has run (qrcode types them bool | None: None marks the data region
        # while the symbol is built).
        symbol = cast(list[list[bool]], self.modules)
        lay = _LAYOUTS[self.version]
        rows, cols = _pack(symbol), _pack(list(zip(*symbol, strict=True)))
        scores = [lay.penalty(rows ^ fr, cols ^ fc) for fr, fc in lay.flips]
        best = scores.index(min(scores))
        return best, rows ^ lay.flips[best][0]

    def best_mask_pattern(self) -> int:
        return self._scored()[0]

    def make(self, fit: bool = True) -> None:
        if fit or self.version is None:
            self.best_fit(start=self.version)
        if self.mask_pattern is not None:
            self.makeImpl(False, self.mask_pattern)
            return
        best, rows = self._scored()
        n = self.modules_count
        bits = format(rows, f"0{n * n}b")[::-1].encode().translate(_UNBITS)
        self.modules = [list(map(bool, bits[r * n : (r + 1) * n])) for r in range(n)]
        self.setup_type_info(False, best)  # a test symbol has blank format (and version) information
        if self.version >= 7:
            self.setup_type_number(False)


def matrix(text: str, border: int = 4) -> list[list[bool]]:
    """The QR modules of ``text`` (error correction M: survives a scuffed plate), quiet zone included."""
    qr = _Encoder(error_correction=ERROR_CORRECT_M, border=border)
    qr.add_data(text)
    qr.make(fit=True)
    return [list(row) for row in qr.get_matrix()]


def _dark_runs(m: list[list[bool]]) -> list[tuple[int, int, int]]:
    """(row, first column, length) of every horizontal run of dark modules."""
    stride = len(m) + 1  # a light separator ends every row
    flat = b"".join(bytes(row) + b"\x00" for row in m)
    return [(*divmod(run.start(), stride), run.end() - run.start()) for run in re.finditer(b"\x01+", flat)]


def svg(text: str, *, size: str = "100%", title: str = "") -> str:
    """An SVG QR: one path of horizontal runs; no styles or scripts, safe to put inline in a page."""
    m = matrix(text)
    n = len(m)
    d = "".join(f"M{x} {y}h{w}v1h-{w}z" for y, x, w in _dark_runs(m))
    t = f"<title>{_esc(title)}</title>" if title else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {n} {n}" width="{size}" height="{size}"'
        f' shape-rendering="crispEdges" role="img">{t}<rect width="{n}" height="{n}" fill="#fff"/>'
        f'<path fill="#000" d="{d}"/></svg>'
    )


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def image(text: str, module_px: int = 10) -> Image.Image:
    """A 1-bit image of the QR, ``module_px`` pixels per module."""
    m = matrix(text)
    n = len(m)
    small = Image.frombytes("L", (n, n), b"".join(bytes(row) for row in m).translate(_INK))
    return small.convert("1", dither=Image.Dither.NONE).resize((n * module_px, n * module_px), Image.Resampling.NEAREST)


def png(text: str, module_px: int = 10) -> bytes:
    buf = io.BytesIO()
    image(text, module_px).save(buf, "PNG", optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------- sheet geometry (1/300-inch dots)


def _mm(v: float) -> int:
    return round(v * DPI / 25.4)


PAGE_W, PAGE_H = _mm(A4_MM[0]), _mm(A4_MM[1])
_M = _mm(MARGIN_MM)
CELL_W, CELL_H = (PAGE_W - 2 * _M) // COLS, (PAGE_H - 2 * _M) // ROWS
_QR_PX = _mm(QR_MM)
_PT = 72 / DPI  # a dot in PDF points
_MEDIA = (A4_MM[0] * 72 / 25.4, A4_MM[1] * 72 / 25.4)
ADDRESS_PX, SMALL_PX, MIN_PX = 52, 30, 16
_DASH, _GAP, _LINE = 24, 18, 2


def find_font(configured: str = "") -> tuple[str, int]:
    if configured:
        if not Path(configured).is_file():
            raise SheetError(f"sheet font {configured} not found")
        return configured, 0
    for path, index in FONT_CANDIDATES:
        if Path(path).is_file():
            return path, index
    raise SheetError("no Chinese font found for plate sheets (install fonts-noto-cjk or set phone.sheet_font)")


@lru_cache(maxsize=32)
def _font(path: str, index: int, px: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(path, px, index=index, layout_engine=ImageFont.Layout.BASIC)
    except OSError:
        pass
    try:
        return ImageFont.truetype(path, px, layout_engine=ImageFont.Layout.BASIC)
    except OSError as e:
        raise SheetError(f"{path} is not a usable font: {e}") from None


@dataclass(frozen=True, slots=True)
class _Mask:
    """A 1-bit image mask (PDF /ImageMask: 0 bits are inked), Flate-compressed; dx, dy: from its anchor."""

    width: int
    height: int
    data: bytes
    dx: int
    dy: int


def _text_mask(text: str, font_path: tuple[str, int], px: int, width: int = PAGE_W) -> _Mask | None:
    """``text`` as a mask anchored at the middle of its top (ascender) line, in ``px`` dots or as much
    smaller (down to ``MIN_PX``) as it takes to fit ``width``."""
    while True:
        font = _font(font_path[0], font_path[1], px)
        # Whole dots: Pillow types the box float for a fractional stroke width, and none is drawn here.
        left, top, right, bottom = map(int, font.getbbox(text, mode="1", anchor="ma"))
        if right - left <= width or px <= MIN_PX:
            break
        px = max(MIN_PX, min(px - 2, px * width // (right - left)))
    if right <= left or bottom <= top:
        return None
    im = Image.new("1", (right - left, bottom - top), 1)
    ImageDraw.Draw(im).text((-left, -top), text, font=font, fill=0, anchor="ma")
    return _Mask(im.width, im.height, zlib.compress(im.tobytes()), left, top)


@lru_cache(maxsize=64)
def _shared_mask(text: str, path: str, index: int, px: int) -> _Mask | None:
    return _text_mask(text, (path, index), px)


# ---------------------------------------------------------------- pages


@dataclass(frozen=True, slots=True)
class _PageJob:
    sheet: int  # index of the sheet in the job
    number: int  # 1-based, within the sheet
    count: int  # pages in the sheet
    title: str
    plates: tuple[tuple[str, str, str, str], ...]  # (path and code, address, label, tagline)


@dataclass(slots=True)
class _Page:
    """One rendered page: its content stream and the image masks it draws (by resource name)."""

    content: bytes  # Flate-compressed
    masks: dict[str, _Mask] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)  # resource name → key in the sheet's shared masks


def _cut_lines() -> bytes:
    xs = [_M + c * CELL_W for c in range(COLS + 1)]
    ys = [_M + r * CELL_H for r in range(ROWS + 1)]
    lines = [f"{x} {_M} m {x} {PAGE_H - _M} l" for x in xs] + [f"{_M} {y} m {PAGE_W - _M} {y} l" for y in ys]
    return f"{_LINE} w [{_DASH} {_GAP}] 0 d\n{chr(10).join(lines)} S [] 0 d\n".encode()


_PROLOGUE = f"{_PT:g} 0 0 -{_PT:g} 0 {_MEDIA[1]:.4f} cm 0 g 0 G\n".encode()  # dots, origin top left, y down
_CUTS = _cut_lines()


def _place(name: str, mask: _Mask, x: int, y: int) -> bytes:
    """Draw ``mask`` with its anchor at dot (x, y)."""
    left, top = x + mask.dx, y + mask.dy
    return f"q {mask.width} 0 0 -{mask.height} {left} {top + mask.height} cm /{name} Do Q\n".encode()


def _render_page(job: _PageJob, base_url: str, font_path: tuple[str, int]) -> tuple[_Page, dict[str, _Mask]]:
    """The page and the shared masks it uses (by key)."""
    page = _Page(b"")
    shared: dict[str, _Mask] = {}
    out = [_PROLOGUE, _CUTS]

    def use_shared(text: str, px: int, x: int, y: int) -> None:
        mask = _shared_mask(text, font_path[0], font_path[1], px)
        if mask is None:
            return
        key = f"{px}:{text}"
        name = f"S{len(page.shared)}"
        page.shared[name] = key
        shared[key] = mask
        out.append(_place(name, mask, x, y))

    for i, (where, address, label, tagline) in enumerate(job.plates):
        col, row = i % COLS, i // COLS
        x0, y0 = _M + col * CELL_W, _M + row * CELL_H
        m = matrix(base_url.rstrip("/") + where)
        n = len(m)
        mod = max(1, _QR_PX // n)
        qx, qy = x0 + (CELL_W - n * mod) // 2, y0 + _mm(4)
        rects = " ".join(f"{x} {y} {w} 1 re" for y, x, w in _dark_runs(m))
        out.append(f"q {mod} 0 0 {mod} {qx} {qy} cm {rects} f Q\n".encode())
        cx, ty = x0 + CELL_W // 2, qy + n * mod + _mm(2)
        mask = _text_mask(address, font_path, ADDRESS_PX, CELL_W - _mm(6))
        if mask is not None:
            page.masks[f"A{i}"] = mask
            out.append(_place(f"A{i}", mask, cx, ty))
        use_shared((label + " · " if label else "") + tagline, SMALL_PX, cx, ty + _mm(7))
    foot = _text_mask(
        f"{job.title} · {job.number}/{job.count}" if job.title else f"{job.number}/{job.count}", font_path, SMALL_PX
    )
    if foot is not None:
        page.masks["F"] = foot
        out.append(_place("F", foot, PAGE_W // 2, PAGE_H - _M + _mm(2)))
    page.content = zlib.compress(b"".join(out))
    return page, shared


def _render_all(
    jobs: Sequence[_PageJob], base_url: str, font_path: tuple[str, int], done: Callable[[_PageJob], None] | None = None
) -> tuple[list[_Page], dict[str, _Mask]]:
    pages: list[_Page] = []
    shared: dict[str, _Mask] = {}
    for job in jobs:
        page, used = _render_page(job, base_url, font_path)
        pages.append(page)
        shared.update(used)
        if done is not None:
            done(job)
    return pages, shared


# ---------------------------------------------------------------- PDF


def _pdf_text(s: str) -> bytes:
    return b"<" + ("\ufeff" + s).encode("utf-16-be").hex().upper().encode() + b">"


def _mask_obj(mask: _Mask) -> bytes:
    return (
        b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ImageMask true /BitsPerComponent 1"
        b" /Filter /FlateDecode /Length %d >>\nstream\n"
        % (mask.width, mask.height, len(mask.data))
        + mask.data
        + b"\nendstream"
    )


def _pdf(pages: Sequence[_Page], shared: dict[str, _Mask], title: str) -> bytes:
    """A PDF 1.4 file of ``pages`` (A4), each shared mask stored once."""
    objects: list[bytes] = [b"", b"", b"<< /Title " + _pdf_text(title) + b" /Producer (Gatehouse) >>"]
    shared_ref: dict[str, int] = {}
    for key in sorted({k for p in pages for k in p.shared.values()}):
        objects.append(_mask_obj(shared[key]))
        shared_ref[key] = len(objects)
    kids = []
    media = f"[0 0 {_MEDIA[0]:.4f} {_MEDIA[1]:.4f}]".encode()
    for p in pages:
        refs = {name: len(objects) + 3 + i for i, name in enumerate(p.masks)}
        refs.update({name: shared_ref[key] for name, key in p.shared.items()})
        xobjects = b" ".join(b"/%s %d 0 R" % (name.encode(), ref) for name, ref in refs.items())
        kids.append(len(objects) + 1)
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox "
            + media
            + b" /Resources << /XObject << "
            + xobjects
            + b" >> >> /Contents %d 0 R >>" % (len(objects) + 2)
        )
        objects.append(b"<< /Filter /FlateDecode /Length %d >>\nstream\n" % len(p.content) + p.content + b"\nendstream")
        objects.extend(_mask_obj(m) for m in p.masks.values())
    objects[0] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 3 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


# ---------------------------------------------------------------- whole jobs


@dataclass(frozen=True, slots=True)
class Sheet:
    """What to print as one PDF: a building's or a unit's plates under one title."""

    title: str
    plates: Sequence[PlateSpec]


@dataclass(frozen=True, slots=True)
class RenderedSheet:
    title: str
    plates: int
    pages: int
    pdf: bytes


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_workers(plates: int) -> int:
    """Worker processes for a job of ``plates`` plates: 0 (render here) for a small one, else one a core."""
    cpus = cpu_count()
    return cpus if cpus > 1 and plates >= PARALLEL_MIN_PLATES else 0


def render_sheets(
    sheets: Sequence[Sheet],
    base_url: str,
    *,
    font: str = "",
    workers: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[RenderedSheet]:
    """Every sheet as an A4 PDF, 12 plates a page in a 3×4 grid with cut lines, the address under each code.

    ``workers``: None picks :func:`auto_workers`; 0 or 1 renders in this thread; more splits the pages
    over that many child processes (fresh interpreters, so it is safe from a threaded server). ``progress``
    is called with the number of plates of each page as it is finished.
    """
    if not sheets or any(not s.plates for s in sheets):
        raise SheetError("no plates to print")
    font_path = find_font(font)
    _font(font_path[0], font_path[1], ADDRESS_PX)  # a bad font fails here, not in every worker
    jobs = []
    for si, s in enumerate(sheets):
        count = math.ceil(len(s.plates) / PER_PAGE)
        for k in range(count):
            batch = s.plates[k * PER_PAGE : (k + 1) * PER_PAGE]
            cells = tuple((p.path + p.code, p.address_zh, p.label, p.tagline) for p in batch)
            jobs.append(_PageJob(si, k + 1, count, s.title, cells))
    total = sum(len(s.plates) for s in sheets)
    n = auto_workers(total) if workers is None else workers
    n = min(n, len(jobs))

    def done(job: _PageJob) -> None:
        if progress is not None:
            progress(len(job.plates))

    if n <= 1:
        pages, shared = _render_all(jobs, base_url, font_path, done)
    else:
        pages, shared = _render_in_workers(jobs, base_url, font_path, n, done)
    out = []
    for si, s in enumerate(sheets):
        mine = [p for p, j in zip(pages, jobs, strict=True) if j.sheet == si]
        out.append(RenderedSheet(s.title, len(s.plates), len(mine), _pdf(mine, shared, s.title or "plates")))
    return out


def sheets_pdf(
    plates: Sequence[PlateSpec],
    base_url: str,
    *,
    title: str = "",
    font: str = "",
    progress: Callable[[int], object] | None = None,
    workers: int | None = None,
) -> bytes:
    """Every plate on A4 pages as one PDF (see :func:`render_sheets`)."""
    return render_sheets([Sheet(title, plates)], base_url, font=font, workers=workers, progress=progress)[0].pdf


# ---------------------------------------------------------------- worker processes


def _render_in_workers(
    jobs: Sequence[_PageJob], base_url: str, font_path: tuple[str, int], workers: int, done: Callable[[_PageJob], None]
) -> tuple[list[_Page], dict[str, _Mask]]:
    """The pages rendered by ``workers`` fresh interpreters (spawned: safe from a threaded server), a page at a time
    each, reported to ``done`` as each is finished. A worker that fails or dies fails the job at once; one that finishes
    no page for ``WORKER_STALL_S`` fails it too; every worker is killed with the job.

    Each worker has its own pipe and shares no lock with this process or another worker: a worker killed halfway
    through writing its answer spoils only its own pipe. (multiprocessing's Pool shares one result queue and its lock,
    and its terminate() waits for ever on a lock that a killed worker held; concurrent.futures cannot stop a hung
    worker before Python 3.14.)"""
    pages: list[_Page | None] = [None] * len(jobs)
    shared: dict[str, _Mask] = {}
    spawn = multiprocessing.get_context("spawn")
    todo = iter(enumerate(jobs))
    busy: dict[Connection, int] = {}  # a worker's end of the pipe -> the page it is rendering
    conns: list[Connection] = []
    procs: list[BaseProcess] = []

    def give(conn: Connection) -> None:
        for i, job in todo:
            try:
                conn.send((job, base_url, font_path))
            except OSError:  # it died after its last answer
                raise SheetError("a sheet worker died before it finished its page") from None
            busy[conn] = i
            return
        conn.close()  # nothing left: the worker sees the end and exits

    finished = False
    try:
        for _ in range(workers):
            mine, theirs = spawn.Pipe()
            proc = spawn.Process(target=_page_worker, args=(theirs,), name="gatehouse-sheet", daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(mine)
            give(mine)
        while busy:
            ready = wait(list(busy), timeout=WORKER_STALL_S)
            if not ready:
                raise SheetError(f"a sheet worker finished no page in {WORKER_STALL_S:g} s")
            for conn in ready:
                assert isinstance(conn, Connection)
                i = busy.pop(conn)
                try:
                    kind, got = conn.recv()
                except (EOFError, OSError):
                    raise SheetError("a sheet worker died before it finished its page") from None
                if kind == "error":
                    raise SheetError(f"a sheet worker failed: {got}")
                pages[i], used = got
                shared.update(used)
                done(jobs[i])
                give(conn)
        finished = True
    finally:
        for conn in conns:
            conn.close()
        for worker in procs:
            worker.join(timeout=5 if finished else 0)  # a worker whose pipe is closed exits by itself
            if worker.is_alive():
                worker.kill()  # SIGKILL: a stopped or hung worker ends too
                worker.join(timeout=5)
    return [p for p in pages if p is not None], shared


def _page_worker(conn: Connection) -> None:
    """A sheet worker's life: render each page it is sent until its pipe is closed."""
    while True:
        try:
            job, base_url, font_path = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("page", _render_page(job, base_url, font_path)))
        except Exception as e:  # the job fails with what went wrong (as text: any exception can be told)
            conn.send(("error", f"{type(e).__name__}: {e}"))
