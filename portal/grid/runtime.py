"""The grid link's place in the app: its hooks into the alarm board and the problem reports, and its start/stop."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from portal.grid.cases import Link
from portal.grid.link import GridLink
from portal.web.services import SERVICES


@dataclass(eq=False)
class Grid:
    cases: Link
    link: GridLink | None  # None while grid.url is empty (the link is off)


GRID = web.AppKey("portal.grid", Grid)


def setup(
    app: web.Application,
    *,
    wall: Callable[[], float] = time.time,
    mono: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] | None = None,
) -> None:
    """The link's start/stop (the routes are added by :func:`portal.grid.setup`); call after the board's and the
    estate's setup (it hooks into both, and stops before them)."""
    from portal.alarms.board import BOARD
    from portal.estate.service import ESTATE

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        svc = app[SERVICES]
        cases = Link(svc.cfg)
        link: GridLink | None = None
        if svc.cfg.grid.enabled:

            def changed(inc: dict[str, Any]) -> None:
                svc.hub.broadcast({"kind": "incident", "incident": inc})

            kw: dict[str, Any] = {"wall": wall, "mono": mono}
            if rand is not None:
                kw["rand"] = rand
            link = GridLink(svc, cases, changed, **kw)
            app[BOARD].hooks.append(cases.on_incident)
            app[ESTATE].work_hooks.append(cases.on_work_item)
            app[ESTATE].forwardable = cases.may_forward

            def on_commit(committed: Any) -> None:
                if cases.queued:
                    cases.queued = False
                    assert link is not None
                    link.kick()

            svc.store.add_commit_listener(on_commit)
            await link.start()
        app[GRID] = Grid(cases, link)
        try:
            yield
        finally:
            if link is not None:
                await link.close()

    app.cleanup_ctx.append(ctx)
