"""Events up to the district's grid-governance platform, and their status back (docs/grid.md).

``contract`` is the versioned record and its signing; ``cases`` decides what goes up and writes the outbox inside
the transaction of the change that causes it; ``link`` delivers it and polls; ``views`` takes the platform's
callbacks and shows the cases; ``reports`` measures them with the yardstick. :func:`setup` wires it into the app.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from portal.grid import reports, runtime, views
from portal.grid.runtime import GRID, Grid


def setup(
    app: web.Application,
    *,
    wall: Callable[[], float] = time.time,
    mono: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] | None = None,
) -> None:
    """Add the grid routes and the link's start/stop; call after the board's and the estate's setup (it hooks
    into both, and stops before them)."""
    app.router.add_routes(views.routes)
    app.router.add_routes(reports.routes)
    runtime.setup(app, wall=wall, mono=mono, rand=rand)


__all__ = ["GRID", "Grid", "setup"]
