"""Alarms at the console: the incident model (:mod:`~portal.alarms.incidents`), the live alarm board and its site
map (:mod:`~portal.alarms.board`), shift reports (:mod:`~portal.alarms.reports`) and notifications to people
outside the guardroom (:mod:`~portal.alarms.notify`). It imports the doors, the estate, the web plumbing and the
store; care, patrol, grid and the centre build on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from portal.alarms import board


def setup(
    app: web.Application, *, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic
) -> None:
    """Add the board and report routes and the board's start/stop."""
    board.setup(app, wall=wall, mono=mono)
