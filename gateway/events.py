"""Event drafts: what the engines produce before the store gives them an id and a sequence number."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway import wire


@dataclass(frozen=True, slots=True)
class Draft:
    """An event not yet stored. ``ts`` defaults to the wall time at which the store commits it."""

    type: str
    device: str
    place: wire.Place
    point: str | None = None
    priority: int = wire.Priority.ROUTINE
    data: dict[str, Any] = field(default_factory=dict)
    ts: datetime | None = None
