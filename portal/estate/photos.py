"""Problem-report photos from the public plate pages: parsed narrowly, re-encoded without metadata.

An upload is opened only as JPEG, PNG or WebP (Pillow's other parsers, TIFF, EPS through Ghostscript, PSD, ICO,
never see it, whatever the file is called), refused above ``phone.photo_max_pixels`` before a pixel is decoded (a
small file that declares a huge picture, a decompression bomb), then decoded once, turned the way the camera was
held, scaled to at most :data:`MAX_EDGE` pixels a side and encoded afresh in its own format. What is stored and
shown to guards is only pixels: no EXIF (the GPS position of the resident's phone, its make and serial, the time),
no XMP, ICC profile, comment or text chunk, nothing appended after the image.

Photos stored before this (``work_items.photo_clean = 0``) are cleaned the same way by :func:`clean_stored`, which
the portal runs once at start-up, a few at a time; one that is not JPEG, PNG or WebP is dropped from its report.
"""

from __future__ import annotations

import asyncio
import io
import logging
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from portal.store import Conn

log = logging.getLogger("portal.photos")

FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
MAX_EDGE = 2560  # a side of the stored photo: plenty to see a leak or a broken lamp on the console
QUALITY = 85
BATCH = 8  # stored photos cleaned per transaction at start-up
#: A public report's PNG or WebP (a screenshot: a phone's camera gives JPEG) is decoded whole: some 16 Mpx, a second
#: of a Pi's CPU at most. Larger ones are refused as too large, before a pixel is decoded.
REPORT_FULL_DECODE_MAX = 16_000_000


class PhotoError(ValueError):
    """A refused photo; ``key`` is an i18n key (``report.bad_photo``, ``report.photo_pixels``); ``limit``: the
    pixel count it was over (``report.photo_pixels``)."""

    def __init__(self, key: str, limit: int = 0) -> None:
        super().__init__(key)
        self.key = key
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Photo:
    data: bytes
    mime: str
    width: int
    height: int


def clean(data: bytes, max_pixels: int, max_full_decode: int | None = None) -> Photo:
    """The photo re-encoded from its pixels alone, or :class:`PhotoError`. CPU-bound: call it on a worker thread.
    ``max_full_decode``: a lower cap for the formats decoded whole (PNG, WebP; a JPEG is decoded at a fraction of
    its size when that fills :data:`MAX_EDGE`), where the pixels' count is the time spent: a public upload's."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap decides, below
            with Image.open(io.BytesIO(data), formats=tuple(FORMATS)) as im:
                fmt = "JPEG" if im.format == "MPO" else str(im.format)  # MPO: a phone's JPEG with a depth map
                width, height = im.size
                limit = max_pixels if fmt == "JPEG" or max_full_decode is None else min(max_pixels, max_full_decode)
                if width * height > limit:
                    raise PhotoError("report.photo_pixels", limit)
                if fmt == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale when that still fills MAX_EDGE
                    im.draft("RGB", (MAX_EDGE, MAX_EDGE))
                im.load()
                turned = ImageOps.exif_transpose(im) or im
                turned.thumbnail((MAX_EDGE, MAX_EDGE), Image.Resampling.LANCZOS)
                alpha = fmt != "JPEG" and (turned.mode in ("RGBA", "LA", "PA") or "transparency" in turned.info)
                pixels = turned.convert("RGBA" if alpha else "RGB")
    except PhotoError:
        raise
    except Image.DecompressionBombError:  # declares more pixels than even Pillow's own guard lets through
        raise PhotoError("report.photo_pixels") from None
    except Exception as e:  # a broken or hostile file can make a parser raise almost anything: a bad photo
        log.info("refused a photo: %s: %s", type(e).__name__, e)
        raise PhotoError("report.bad_photo") from None
    fresh = Image.frombytes(pixels.mode, pixels.size, pixels.tobytes())  # no info, no EXIF: only the pixels
    out = io.BytesIO()
    if fmt == "PNG":
        fresh.save(out, "PNG", optimize=True)
    else:
        fresh.save(out, fmt, quality=QUALITY)
    return Photo(out.getvalue(), FORMATS[fmt], fresh.width, fresh.height)


# ---------------------------------------------------------------- photos stored before cleaning


async def clean_stored(
    read: Callable[[Callable[[Conn], Any]], Awaitable[Any]],
    write: Callable[[Callable[[Conn], Any]], Awaitable[Any]],
    cpu: Callable[..., Awaitable[Any]],
    max_pixels: int,
) -> int:
    """Clean every stored photo not cleaned yet, :data:`BATCH` at a time (each batch one transaction, each photo
    re-encoded on a worker thread); returns how many were done. The text of a report is never touched."""
    done = 0
    after = 0
    while True:

        def batch(c: Conn, after: int = after) -> list[tuple[int, bytes]]:
            return [
                (r[0], r[1])
                for r in c.execute(
                    "SELECT id, photo FROM work_items WHERE photo_clean = 0 AND photo IS NOT NULL AND id > ? ORDER BY"
                    " id"
                    " LIMIT ?",
                    (after, BATCH),
                )
            ]

        rows: list[tuple[int, bytes]] = await read(batch)
        if not rows:
            return done
        results: list[tuple[int, Photo | None]] = []
        for wid, blob in rows:
            try:
                results.append((wid, await cpu(clean, bytes(blob), max_pixels)))
            except PhotoError:
                log.warning("work item %d: its stored photo is not a JPEG, PNG or WebP photo; dropped", wid)
                results.append((wid, None))

        def put(c: Conn, results: list[tuple[int, Photo | None]] = results) -> None:
            for wid, photo in results:
                c.execute(
                    "UPDATE work_items SET photo = ?, photo_type = ?, photo_clean = 1 WHERE id = ?",
                    (photo.data if photo else None, photo.mime if photo else None, wid),
                )

        await write(put)
        done += len(results)
        after = rows[-1][0]


async def run_cleaning(read: Any, write: Any, cpu: Any, max_pixels: int) -> None:
    """:func:`clean_stored` as a start-up task that logs its outcome and never takes the portal down."""
    try:
        n = await clean_stored(read, write, cpu, max_pixels)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("cleaning stored photos failed; it is tried again at the next start")
        return
    if n:
        log.info("cleaned %d stored problem-report photos of their metadata", n)
