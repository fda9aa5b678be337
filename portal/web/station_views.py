"""The guard stations' pages: the stations and their shifts (``GET /stations``), binding this browser to a station
(``POST /stations``) and retiring one. Stations, sign-on and handover are :mod:`portal.web.stations`' (the sign-in
page uses them); these pages render through :mod:`portal.web.views`.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from aiohttp import web

from portal.store import Conn, audit, now_text
from portal.web.auth import SESSION_KEY, STATION_COOKIE, hash_token, roles
from portal.web.bodies import read_form
from portal.web.confirm import ask, confirmed
from portal.web.services import SERVICES
from portal.web.stations import COOKIE_AGE_S, NAME_MAX, SHIFTS_SHOWN, STATION_ROLES, _open_count, on_duty, station_of
from portal.web.views import render

log = logging.getLogger("portal.stations")
routes = web.RouteTableDef()


def _actor(request: web.Request) -> str:
    u = request[SESSION_KEY].user
    return f"{u.role}:{u.name}"


@routes.get("/stations")
@roles(*STATION_ROLES)
async def stations_page(request: web.Request) -> web.StreamResponse:
    def load(c: Conn) -> dict[str, Any]:
        stations = [
            dict(r)
            for r in c.execute("SELECT id, name, created_at, created_by, revoked_at FROM stations ORDER BY name")
        ]
        for s in stations:
            duty = on_duty(c, s["id"])
            s["on_duty"] = duty["user_name"] if duty else None
        shifts = [
            dict(r)
            for r in c.execute(
                "SELECT h.*, s.name AS station FROM station_shifts h JOIN stations s ON s.id = h.station_id"
                " ORDER BY h.id DESC LIMIT ?",
                (SHIFTS_SHOWN,),
            )
        ]
        return {"stations": stations, "shifts": shifts}

    data = await request.app[SERVICES].store.read(load)
    here = await station_of(request)
    return render(request, "stations.html", here=here, error=request.query.get("error"), **data)


@routes.post("/stations")
@roles("admin")
async def bind_station(request: web.Request) -> web.StreamResponse:
    """Make a station of this browser (the guardroom PC an administrator is sitting at)."""
    svc = request.app[SERVICES]
    form = await read_form(request)
    name = " ".join(str(form.get("name", "")).split())[:NAME_MAX]
    if not name:
        raise web.HTTPSeeOther("/stations?error=name")
    token = secrets.token_urlsafe(32)
    actor, remote = _actor(request), request.remote or ""

    def put(c: Conn) -> bool:
        if c.execute("SELECT 1 FROM stations WHERE name = ?", (name,)).fetchone():
            return False
        c.execute(
            "INSERT INTO stations (name, token_hash, created_at, created_by) VALUES (?, ?, ?, ?)",
            (name, hash_token(token), now_text(), actor),
        )
        audit.write(c, actor, "station.bind", f"station:{name}", remote=remote)
        return True

    if not await svc.store.run_write(put):
        raise web.HTTPSeeOther("/stations?error=exists")
    log.info("guard station %s bound by %s", name, actor)
    resp = web.HTTPSeeOther("/stations")
    resp.set_cookie(
        STATION_COOKIE,
        token,
        httponly=True,
        samesite="Strict",
        secure=svc.cfg.cookie_secure,
        path="/",
        max_age=COOKIE_AGE_S,
    )
    raise resp


@routes.post("/stations/{id}/revoke")
@roles("admin")
async def revoke_station(request: web.Request) -> web.StreamResponse:
    """Retire a station (a PC replaced or lost): its cookie stops working and its sessions end."""
    svc = request.app[SERVICES]
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise web.HTTPNotFound()
    sid = int(raw)
    actor, remote = _actor(request), request.remote or ""
    form = await read_form(request)
    if not confirmed(form):  # the guard on duty there is signed out: ask first
        row = await svc.store.read(
            lambda c: c.execute("SELECT name FROM stations WHERE id = ? AND revoked_at IS NULL", (sid,)).fetchone()
        )
        if row is None:
            raise web.HTTPNotFound()
        return ask(
            request,
            form,
            title_key="stations.revoke_title",
            consequence_key="stations.revoke_consequence",
            kw={"name": row["name"]},
            back="/stations",
            button_key="stations.revoke_go",
        )

    def put(c: Conn) -> list[str] | None:
        row = c.execute("SELECT name FROM stations WHERE id = ? AND revoked_at IS NULL", (sid,)).fetchone()
        if row is None:
            return None
        now = now_text()
        ended = [r[0] for r in c.execute("SELECT id_hash FROM sessions WHERE station_id = ?", (sid,))]
        c.execute("UPDATE stations SET revoked_at = ? WHERE id = ?", (now, sid))
        c.execute(
            "UPDATE station_shifts SET ended_at = ?, ended_how = 'revoked', open_at_end = ?"
            " WHERE station_id = ? AND ended_at IS NULL",
            (now, _open_count(c), sid),
        )
        c.execute("DELETE FROM sessions WHERE station_id = ?", (sid,))
        audit.write(c, actor, "station.revoke", f"station:{row['name']}", remote=remote)
        return ended

    ended = await svc.store.run_write(put)
    if ended is None:
        raise web.HTTPNotFound()
    svc.hub.end_sessions(ended, "station retired")
    raise web.HTTPSeeOther("/stations")
