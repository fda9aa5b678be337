"""Log lines without the secrets that ride in URLs.

A door plate's code (``/p/<code>``) lets whoever reads it act at that flat's door (register, report, open the
entrance for a resident), a visitor link (``/m/v/<token>``) is a visitor pass, and a patrol checkpoint's code
(``/g/c/<code>``) is what proves a guard stood at the checkpoint. Each would reach the journal
through aiohttp's request log (the request line and the Referer of the next page, ``?next=/p/<code>`` on the
sign-in page) and through any warning that names a request's path. The portal process formats every log line
with :class:`Formatter`, which replaces each such segment with ``#`` and the first 8 hex digits of its SHA-256:
enough to tell requests for the same plate apart (and to find its ``plates.code_hash``), useless for printing
the plate again.
"""

from __future__ import annotations

import hashlib
import logging
import re
from urllib.parse import unquote

#: path prefixes whose next segment is a secret: plate codes, visitor-pass links, patrol checkpoints' codes
_SECRET = re.compile(r"(/p/|/m/v/|/g/c/)([^/?#&\s\"']+)", re.IGNORECASE)
_ENCODED = re.compile(r"%(?:25)*2f", re.IGNORECASE)  # a slash percent-encoded once or more


def short_hash(secret: str) -> str:
    return "#" + hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def redact(text: str) -> str:
    """``text`` with every plate or checkpoint code and visitor token replaced by its short hash; unchanged when it
    has none.

    A line that names one only percent-encoded (``next=%2Fp%2F<code>``, or encoded twice) is decoded first."""
    if _ENCODED.search(text):
        decoded = text
        for _ in range(3):
            decoded, before = unquote(decoded), decoded
            if decoded == before:
                break
        if _SECRET.search(decoded):
            text = decoded
    return _SECRET.sub(lambda m: m.group(1) + short_hash(m.group(2)), text)


class Formatter(logging.Formatter):
    """A :class:`logging.Formatter` whose every line (traceback included) goes through :func:`redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
