"""The centre's console: ``GET /centre`` (the estates at a glance) and ``GET /api/centre`` (the same as JSON).

Guards and administrators see the estates of their sites only (``users.sites``). Each row links to the estate's
own board (``/board?site=<code>``). The page follows the console socket: any incident, status or door message
makes it fetch the overview again (at most once a second); the console shell rings for every estate's alarms.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from portal.centre import estates
from portal.centre.runtime import CENTRE
from portal.web.auth import roles
from portal.web.scope import sites_of
from portal.web.services import SERVICES
from portal.web.views import render

routes = web.RouteTableDef()
GUARD_ROLES = ("admin", "guard")


async def _overview(request: web.Request) -> dict[str, Any]:
    svc = request.app[SERVICES]
    sites = sites_of(request)
    stored = await svc.store.read(lambda c: estates.read(c, sites))
    centre = request.app[CENTRE]
    items = estates.overview(svc.cfg, sites, stored, centre.links, svc.ingest.faults)
    return {
        "estates": items,
        "buckets": [b for b, _ in estates.BUCKETS],
        "totals": {
            "estates": len(items),
            "online": sum(1 for e in items if e["online"]),
            "unacknowledged": sum(e["unacknowledged"] for e in items),
            "open": sum(e["open_total"] for e in items),
            "faults": sum(len(e["faults"]) for e in items),
        },
    }


@routes.get("/api/centre")
@roles(*GUARD_ROLES)
async def centre_json(request: web.Request) -> web.StreamResponse:
    return web.json_response(await _overview(request), dumps=lambda o: json.dumps(o, ensure_ascii=False))


@routes.get("/centre")
@roles(*GUARD_ROLES)
async def centre_page(request: web.Request) -> web.StreamResponse:
    return render(request, "centre.html", overview=await _overview(request))


@routes.get("/centre/estates")
@roles(*GUARD_ROLES)
async def centre_estates(request: web.Request) -> web.StreamResponse:
    """The page's table alone, for its script to swap in when something changed."""
    return render(request, "_centre_estates.html", overview=await _overview(request))
