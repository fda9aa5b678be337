"""The grid link's routes: the platform's status callbacks, the cases page, forwarding a problem report, sending
a refused record again.

``POST /api/grid/callback`` is the platform's (docs/grid.md, "Status back"): no session; it must carry
``X-Grid-Key-Id`` (ours), ``X-Grid-Timestamp`` within ``grid.callback_window_s`` of our clock and
``X-Grid-Signature`` over the timestamp, method, path and body. Each status is applied once under its
``callback_id``: a callback that comes twice answers ``duplicate`` and changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from portal.grid import cases, contract
from portal.grid.runtime import GRID, Grid
from portal.store import Conn
from portal.web.auth import SESSION_KEY, machine, roles, safe_next
from portal.web.bodies import read_bytes, read_form
from portal.web.scope import need, sites_of
from portal.web.scope import sql as site_sql
from portal.web.services import SERVICES
from portal.web.views import render

log = logging.getLogger("portal.grid")
routes = web.RouteTableDef()
CALLBACK_PATH = "/api/grid/callback"
CASES_SHOWN = 300


def _grid(request: web.Request) -> Grid:
    g = request.app.get(GRID)
    if g is None:
        raise web.HTTPNotFound()
    return g


def _refuse(status: int, error: str, detail: str = "") -> web.Response:
    body: dict[str, str] = {"error": error}
    if detail:
        body["detail"] = detail
    return web.json_response(body, status=status)


@routes.post(CALLBACK_PATH)
@machine
async def callback(request: web.Request) -> web.StreamResponse:
    g = request.app.get(GRID)
    if g is None or g.link is None:
        return _refuse(404, "not-found", "the grid link is off")
    running = g.link
    cfg = running.g
    raw = await read_bytes(request)
    key_id = request.headers.get(contract.KEY_HEADER, "")
    ts = request.headers.get(contract.TS_HEADER, "")
    sig = request.headers.get(contract.SIG_HEADER, "")
    if not running._key:
        return _refuse(503, "unavailable", "the portal cannot read its grid key")
    if key_id != cfg.key_id or not ts or not sig:
        log.info("grid callback refused: key id or signature headers missing or wrong (from %s)", request.remote)
        return _refuse(
            401, "unsigned", f"{contract.KEY_HEADER}, {contract.TS_HEADER} and {contract.SIG_HEADER} are required"
        )
    if not (ts.isascii() and ts.isdigit()) or len(ts) > 12 or abs(int(ts) - running.wall()) > cfg.callback_window_s:
        log.info("grid callback refused: timestamp %r outside the window (from %s)", ts[:20], request.remote)
        return _refuse(401, "stale", f"the timestamp must be within {cfg.callback_window_s} s of the portal's clock")
    if not contract.verify(running._key, ts, request.method, request.path, raw, sig[:200]):
        log.warning("grid callback refused: bad signature (from %s)", request.remote)
        return _refuse(401, "bad-signature")
    try:
        st = contract.decode_status(raw)
    except contract.ContractError as e:
        return _refuse(400, "invalid", str(e)[:300])
    got = await request.app[SERVICES].store.run_write(
        lambda c: cases.apply_status(c, st, "callback", f"grid:{cfg.key_id}")
    )
    if got is None:
        return _refuse(404, "unknown-event", f"no event numbered {st.number}")
    if got.incident is not None:
        running.changed(got.incident)
    return web.json_response(
        {"number": st.number, "callback_id": st.callback_id, "duplicate": not got.new, "current": got.current}
    )


# ---------------------------------------------------------------- the cases page


def load_cases(conn: Conn, sites: Any, limit: int = CASES_SHOWN) -> list[dict[str, Any]]:
    cond, args = site_sql("c.site", sites)
    rows = conn.execute(
        f"SELECT c.*, (SELECT count(*) FROM grid_outbox o WHERE o.case_id = c.id AND o.state = 'pending') AS waiting,"
        " (SELECT o.id FROM grid_outbox o WHERE o.case_id = c.id AND o.state = 'failed' ORDER BY o.id LIMIT 1)"
        "  AS failed_id,"
        " (SELECT o.last_error FROM grid_outbox o WHERE o.case_id = c.id AND o.state IN ('failed', 'pending')"
        "  ORDER BY o.state = 'failed' DESC, o.id LIMIT 1) AS error,"
        " (SELECT max(o.attempts) FROM grid_outbox o WHERE o.case_id = c.id AND o.state = 'pending') AS attempts,"
        " i.type AS inc_type, i.kind AS inc_kind, i.state AS inc_state, w.status AS work_status, w.kind AS work_kind"
        f" FROM grid_cases c LEFT JOIN incidents i ON i.id = c.incident_id LEFT JOIN work_items w ON w.id ="
        f" c.work_item_id WHERE {cond} ORDER BY c.id DESC LIMIT ?",
        (*args, limit),
    ).fetchall()
    out = []
    for r in rows:
        d = dict(r)
        d["delivery"] = "failed" if r["failed_id"] else "pending" if r["waiting"] else "sent"
        d["history"] = [
            dict(h)
            for h in conn.execute(
                "SELECT status, at, by_name, note, source FROM grid_status_log WHERE case_id = ? ORDER BY at, id",
                (r["id"],),
            )
        ]
        out.append(d)
    return out


@routes.get("/grid")
@roles("admin", "guard")
async def cases_page(request: web.Request) -> web.StreamResponse:
    g = _grid(request)
    sites = sites_of(request)
    rows = await request.app[SERVICES].store.read(lambda c: load_cases(c, sites))
    user = request[SESSION_KEY].user
    return render(
        request,
        "grid_cases.html",
        cases=rows,
        health=g.link.health() if g.link else None,
        enabled=g.link is not None,
        can_resend=user.role == "admin",
        statuses=contract.STATUSES,
    )


@routes.post("/grid/outbox/{id}/resend")
@roles("admin")
async def resend(request: web.Request) -> web.StreamResponse:
    g = _grid(request)
    if g.link is None:
        raise web.HTTPNotFound()
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise web.HTTPNotFound()
    oid = int(raw)
    svc = request.app[SERVICES]
    site = await svc.store.read(
        lambda c: c.execute(
            "SELECT c.site FROM grid_outbox o JOIN grid_cases c ON c.id = o.case_id WHERE o.id = ?", (oid,)
        ).fetchone()
    )
    if site is None:
        raise web.HTTPNotFound()
    need(request, site[0])
    user = request[SESSION_KEY].user
    done = await svc.store.run_write(lambda c: cases.resend(c, g.cases, oid, f"{user.role}:{user.name}"))
    if done is None:
        raise web.HTTPConflict(text="no such refused record")
    g.link.kick()
    raise web.HTTPSeeOther("/grid")


@routes.post("/grid/forward/{work_id}")
@roles("admin", "guard")
async def forward(request: web.Request) -> web.StreamResponse:
    """A guard forwards a resident's problem report to the grid platform (once; later steps go up as revisions)."""
    g = _grid(request)
    raw = request.match_info["work_id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise web.HTTPNotFound()
    wid = int(raw)
    svc = request.app[SERVICES]
    row = await svc.store.read(
        lambda c: c.execute(
            "SELECT s.code FROM work_items w JOIN reg_houses h ON h.id = w.house_id JOIN reg_units u ON u.id ="
            " h.unit_id"
            " JOIN reg_buildings b ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id WHERE w.id = ?",
            (wid,),
        ).fetchone()
    )
    site = row[0] if row else None
    if site is None:
        raise web.HTTPNotFound()
    need(request, site)
    if g.link is None or site is None or not g.cases.may_forward(site):
        raise web.HTTPConflict(text="problem reports of this site do not go to the grid platform")
    user = request[SESSION_KEY].user
    actor = f"{user.role}:{user.name}"

    def put(c: Conn) -> int | None:
        if c.execute("SELECT 1 FROM grid_cases WHERE work_item_id = ?", (wid,)).fetchone():
            return None
        return cases.open_case(c, g.cases, work_item_id=wid, trigger="forward", by=actor)

    if await svc.store.run_write(put) is None:
        raise web.HTTPConflict(text="already forwarded")
    g.link.kick()
    form = await read_form(request)
    raise web.HTTPSeeOther(safe_next(str(form.get("next", "")), "/grid"))
