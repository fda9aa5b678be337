"""The estate: its registry of sites, buildings, houses and residents (:mod:`~portal.estate.registry`), CSV import
and export and the installer's commands (:mod:`~portal.estate.registry_cli`), the property office's pages
(:mod:`~portal.estate.registry_views`), the residents' phone pages (:mod:`~portal.estate.phone`), pass signing and
revocation lists (:mod:`~portal.estate.passes_issue`, :mod:`~portal.estate.revocations`), door plates
(:mod:`~portal.estate.plates`), site maps and plans (:mod:`~portal.estate.sitemap`, :mod:`~portal.estate.plans`),
problem-report photos (:mod:`~portal.estate.photos`), data retention (:mod:`~portal.estate.retention`) and the
running part that ties them to the portal (:mod:`~portal.estate.service`). It imports the web plumbing and the
store, nothing of the doors, the alarms or the packages above them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from portal.estate import phone, plans, registry_views, service


def setup(
    app: web.Application, *, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic
) -> None:
    """Add the registry, plate and phone routes, the estate's start/stop and the plans drawn for the maps."""
    app.router.add_routes(phone.routes)
    app.router.add_routes(registry_views.routes)
    service.setup(app, wall=wall, mono=mono)
    plans.setup(app)  # plans drawn on the web: the board's maps
