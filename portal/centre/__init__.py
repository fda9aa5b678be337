"""The monitoring centre (集中监控中心): several portal instances on one PostgreSQL store, estates bridged in over the
WAN (docs/centre.md).

``peers`` lets every instance's consoles see live what another stored or changed (PostgreSQL LISTEN/NOTIFY);
``estates`` is the estates at a glance (bridge links, gateways, faults, open alarms by priority); ``views`` is the
centre's console page and its JSON; ``runtime`` wires them into the app: :func:`setup` adds the routes, and
:func:`start` and :func:`stop` run with the portal's own start-up (before the ingest connects) and shutdown.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from portal.centre import runtime, views
from portal.centre.runtime import CENTRE, Centre, start, stop


def setup(app: web.Application, *, wall: Callable[[], float] = time.time) -> None:
    """Add the centre's console routes (the running part starts with :func:`start`)."""
    app.router.add_routes(views.routes)
    runtime.setup(app, wall=wall)


__all__ = ["CENTRE", "Centre", "setup", "start", "stop"]
