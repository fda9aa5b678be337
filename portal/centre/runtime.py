"""The centre's running part: the estates' bridge links and, on a shared store, the other instances."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from portal.centre.estates import BRIDGE_STATE_FILTER, Links
from portal.centre.peers import Peers
from portal.store import Postgres
from portal.web.services import Services

log = logging.getLogger("portal.centre")


@dataclass(eq=False)
class Centre:
    links: Links
    peers: Peers | None  # None: one instance (a SQLite store), nobody to tell


CENTRE = web.AppKey("portal.centre", Centre)
WALL: web.AppKey[Callable[[], float]] = web.AppKey("portal.centre.wall")


def setup(app: web.Application, *, wall: Callable[[], float] = time.time) -> None:
    """Keep the wall clock for the centre's views (the routes are added by :func:`portal.centre.setup`; the running
    part starts with :func:`start`)."""
    app[WALL] = wall


async def start(app: web.Application, svc: Services) -> Centre:
    """Follow the estates' bridges and, on a shared store, the other instances: called by the portal's start-up
    before the ingest connects, so nothing this instance stores escapes the others."""
    from portal.alarms.board import BOARD

    def link_changed(site: str, state: str) -> None:  # every instance hears the bridges itself: not relayed
        svc.hub.broadcast({"kind": "link", "link": {"site": site, "state": state}}, relay=False)

    links = Links(
        {g.site for g in svc.cfg.gateways}, wall=app.get(WALL, time.time), on_change=link_changed, store=svc.store
    )
    svc.ingest.watch(BRIDGE_STATE_FILTER, links.on_message)
    peers: Peers | None = None
    target = svc.cfg.store_target
    if svc.store.shared and isinstance(target, Postgres):

        def follow(inc: dict[str, Any]) -> None:  # the board is set up after the portal's own start
            board = app.get(BOARD)
            if board is not None:
                board.follow(inc)

        peers = Peers(target, svc.store, svc.hub, follow=follow)
        await peers.start()
        log.info("instance %s: telling the other instances through PostgreSQL", peers.me)
    centre = Centre(links, peers)
    app[CENTRE] = centre
    return centre


async def stop(app: web.Application) -> None:
    centre = app.get(CENTRE)
    if centre is not None and centre.peers is not None:
        await centre.peers.stop()
