"""The portal's web plumbing, under every domain package: sign-in and sessions (:mod:`~portal.web.auth`), staff scopes
(:mod:`~portal.web.scope`), body limits and rate limits (:mod:`~portal.web.limits`, :mod:`~portal.web.ratelimit`),
page rendering and the staff's own pages (:mod:`~portal.web.views`, :mod:`~portal.web.users`,
:mod:`~portal.web.stations`, :mod:`~portal.web.confirm`), the JSON API's common parts (:mod:`~portal.web.api`),
reading request bodies (:mod:`~portal.web.bodies`), translations (:mod:`~portal.web.i18n`), the console socket
(:mod:`~portal.web.hub`), the gateways' link (:mod:`~portal.web.ingest`), metrics and their scrape token, and the
services every request reaches (:mod:`~portal.web.services`). It imports the store and nothing of the domains above
it.
"""

from __future__ import annotations

from aiohttp import web

from portal.web import api, station_views, users, views


def setup(app: web.Application) -> None:
    """Add the sign-in, staff account, station and common API routes."""
    app.router.add_routes(views.routes)
    users.setup(app)  # staff accounts
    app.router.add_routes(api.routes)
    app.router.add_routes(station_views.routes)
