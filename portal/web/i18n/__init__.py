"""Translations: one flat JSON file per language beside this module (zh-CN first, English second).

Keys are dotted; ``event.<type>`` keys label event types. A missing key falls back to zh-CN,
then to the key itself, so a new event type still shows as its raw name.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

LANGUAGES = ("zh-CN", "en")
DEFAULT = "zh-CN"
_HERE = Path(__file__).parent


@cache
def table(lang: str) -> dict[str, str]:
    data = json.loads((_HERE / f"{lang}.json").read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{lang}.json must be a flat object of strings")
    return data


def pick(value: str | None, default: str = DEFAULT) -> str:
    """A supported language from a cookie or header value, else ``default``."""
    return value if value in LANGUAGES else default


class Translator:
    def __init__(self, lang: str) -> None:
        self.lang = pick(lang)
        self._t = table(self.lang)
        self._fallback = table(DEFAULT)

    def __call__(self, key: str, **kw: object) -> str:
        text = self._t.get(key) or self._fallback.get(key) or key
        return text.format(**kw) if kw else text

    def has(self, key: str) -> bool:
        return key in self._t

    def event_label(self, event_type: str) -> str:
        key = f"event.{event_type}"
        return self(key) if self.has(key) else event_type
