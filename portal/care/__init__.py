"""Care for residents living alone (独居老人关爱): a flat under care raises an alert on the guards' board when its
cared-for residents show no activity for too long, are active at unusual night hours, or its indoor panel reports
that nobody has moved; the resident answers from the phone with "我很好". See docs/care.md.

Parts: :mod:`portal.care.model` (the records), :mod:`portal.care.watch` (activity from the field, the rules and
their clocks), :mod:`portal.care.views` (pages: the property office, the resident's phone, the guard's board).

For the upward report (the grid platform), a care alert is an incident of kind ``care`` (types ``care.no_activity``,
``care.night_activity``, ``care.panel_inactive``) whose data names the rule (``rule``) and the household (``care``);
:func:`context` gives the household's context of any incident at a flat under care, care alerts and panics alike.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from aiohttp import web

from portal.alarms import incidents as alarms
from portal.alarms.board import BOARD
from portal.care import model
from portal.care.views import WATCH, routes, setup_hooks
from portal.care.watch import CareWatch
from portal.store import Conn
from portal.web.services import SERVICES

INCIDENT_KIND = "care"
EVENT_TYPES = tuple(f"care.{r}" for r in model.OWN_RULES)


def setup(
    app: web.Application, *, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic
) -> None:
    """Add the care pages and the watch's start/stop (after the alarm board's start: set up after the board)."""
    app.router.add_routes(routes)
    setup_hooks(app)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        watch = CareWatch(app[SERVICES], app[BOARD], wall=wall, mono=mono)
        await watch.start()
        app[WATCH] = watch
        try:
            yield
        finally:
            await watch.close()

    app.cleanup_ctx.append(ctx)


def context(conn: Conn, incident: Mapping[str, Any]) -> dict[str, Any] | None:
    """The care context of an incident (as :func:`portal.alarms.incidents.get_incident` gives it) for forwarding it
    upward:
    None when it is not about a flat under care. Numbers are whole: the receiver is the district's platform.

    ``{"household": id, "address": {site, building, unit, house}, "people": [names], "rule": str | None,
    "raised_at", "cleared_at", "cleared_by", "contact": {name, relation, phone}, "hours": int,
    "last_activity_at": str | None, "consent": {by, how, at}}``"""
    got = model.care_of_incident(conn, incident)
    if got is None:
        return None
    h, alert = got
    return {
        "household": h.id,
        "address": h.place,
        "people": model.people_names(conn, h.people),
        "rule": alert["rule"] if alert else None,
        "raised_at": alert["raised_at"] if alert else None,
        "cleared_at": alert["cleared_at"] if alert else None,
        "cleared_by": alert["cleared_by"] if alert else None,
        "contact": {"name": h.contact_name, "relation": h.contact_relation, "phone": h.contact_phone},
        "hours": h.hours,
        "last_activity_at": h.last_activity_at,
        "consent": {"by": h.consent_by, "how": h.consent_how, "at": h.consent_at},
    }


def incident_context(conn: Conn, incident_id: int) -> dict[str, Any] | None:
    """:func:`context` by incident id."""
    inc = alarms.get_incident(conn, incident_id)
    return context(conn, inc) if inc is not None else None


__all__ = ["EVENT_TYPES", "INCIDENT_KIND", "context", "incident_context", "setup"]
