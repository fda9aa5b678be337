"""Guard patrols (电子巡更): checkpoints are QR plates placed on the site map, routes list them with a shift's rounds
and time windows, guards scan them with their phones, and a checkpoint not scanned in time rings on the console; the
patrol report shows every shift and every guard (on time, late, missed). See docs/patrol.md.

Parts: :mod:`portal.patrol.model` (records, schedule, scans and the scan pages' one-time tokens, report),
:mod:`portal.patrol.engine` (rounds and alerts on time, checkpoints on the maps), :mod:`portal.patrol.views` (pages).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from portal.alarms.board import BOARD
from portal.patrol.engine import PatrolEngine
from portal.patrol.views import BAD_CODES, BAD_CODES_PER_10MIN, ENGINE, routes, setup_hooks
from portal.web.ratelimit import limiter
from portal.web.services import SERVICES

INCIDENT_KIND = "patrol"
EVENT_TYPES = ("patrol.overdue", "patrol.missed")


def setup(
    app: web.Application, *, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic
) -> None:
    """Add the patrol pages and the rounds' start/stop (after the alarm board's start: set up after the board)."""
    app.router.add_routes(routes)
    setup_hooks(app)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        svc = app[SERVICES]
        # one bucket per address for every instance that shares the store
        app[BAD_CODES] = limiter(svc.store, "patrol-bad-code", BAD_CODES_PER_10MIN, 600, clock=mono, wall=wall)
        eng = PatrolEngine(svc, app[BOARD], wall=wall, mono=mono)
        app[ENGINE] = eng
        await eng.start()
        try:
            yield
        finally:
            await eng.close()

    app.cleanup_ctx.append(ctx)


__all__ = ["EVENT_TYPES", "INCIDENT_KIND", "setup"]
