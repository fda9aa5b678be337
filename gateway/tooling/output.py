"""Tables for the terminal, with Chinese text (two columns a character) lined up."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(rows: Sequence[Sequence[str]], indent: str = "") -> None:
    widths = [max(width(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [c + " " * (w - width(c)) for c, w in zip(r, widths, strict=True)]
        print((indent + "  ".join(cells)).rstrip())


def width(text: str) -> int:
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
