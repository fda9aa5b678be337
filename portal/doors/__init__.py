"""Doors at the console: the door list, live states and remote unlock (:mod:`~portal.doors.doors`), the access log
(:mod:`~portal.doors.access_log`), the guardroom's visitors (:mod:`~portal.doors.visitors`) and passes revoked and
people blocked by hand (:mod:`~portal.doors.revocation_views`). It imports the estate, the web plumbing and the
store; the alarm board reads door states from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from portal.doors import access_log, doors, revocation_views


def setup(app: web.Application, *, wall: Callable[[], float] = time.time) -> None:
    """Add the door, visitor, access-log and revocation routes and the doors' start/stop."""
    doors.setup(app, wall=wall)
    app.router.add_routes(access_log.routes)
    app.router.add_routes(revocation_views.routes)
