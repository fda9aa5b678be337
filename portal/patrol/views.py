"""Patrol pages: the property office's checkpoints (plates, places on the map) and routes, the guard's phone (scan a
checkpoint, see the rounds under way), and the patrol report per shift and per guard (printable, and CSV).

A checkpoint's QR opens ``/g/c/<code>`` on the guard's phone, signed in as staff (guards and administrators; others are
sent to sign in). The page shows the checkpoint and a one-time token bound to that session and that checkpoint (a row
of the store: any portal instance may take the confirmation); the guard confirms and the scan is recorded at the
portal's time. A code that is unknown, withdrawn or of a site the guard
does not work at answers as not found (and an address that keeps trying unknown codes is throttled); a token used
before, expired or another page's is refused as a replay, audited.
"""

from __future__ import annotations

import asyncio
import io
import logging
from datetime import date, timedelta
from typing import Any

from aiohttp import web

from portal.alarms.board import MAP_MARKERS, Marker
from portal.doors import visitors
from portal.estate import plates
from portal.estate.phone import no_public_url, print_base
from portal.estate.plans import plans_of
from portal.estate.sitemap import render_svg
from portal.patrol import model
from portal.patrol.engine import CHANGED, PatrolEngine, marker
from portal.store import Conn, audit
from portal.web import csvcells
from portal.web.auth import SESSION_KEY, roles
from portal.web.bodies import read_form
from portal.web.ratelimit import Limiter
from portal.web.scope import need, sees, sites_of
from portal.web.services import SERVICES
from portal.web.views import Answer, render, translator

log = logging.getLogger("portal.patrol")
routes = web.RouteTableDef()
ENGINE = web.AppKey("portal.patrol.engine", PatrolEngine)
BAD_CODES = web.AppKey("portal.patrol.bad_codes", Limiter)
BAD_CODES_PER_10MIN = 20
REPORT_MAX_DAYS = 92
REPORT_DEFAULT_DAYS = 7


def _engine(request: web.Request) -> PatrolEngine:
    return request.app[ENGINE]


def _actor(request: web.Request) -> str:
    u = request[SESSION_KEY].user
    return f"{u.role}:{u.name}"


def _id(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise web.HTTPNotFound()
    return int(raw)


def _local(ts: str | None, request: web.Request, fmt: str = "%Y-%m-%d %H:%M") -> str:
    if not ts:
        return ""
    return model.parse_ts(ts).astimezone(request.app[SERVICES].tz).strftime(fmt)


def _sites(request: web.Request, c: Conn) -> list[dict[str, str]]:
    """The sites this user may manage patrols at: the registry's, and any the config names (gateways, maps)."""
    cfg = request.app[SERVICES].cfg
    found = {s["code"]: s["name"] for s in visitors.sites(c)}
    for code in [g.site for g in cfg.gateways] + sorted(plans_of(request.app).sites()):
        found.setdefault(code, code)
    return [{"code": k, "name": v} for k, v in sorted(found.items()) if sees(request, k)]


# ---------------------------------------------------------------- the office: checkpoints and routes


@routes.get("/patrol")
@roles("admin")
async def patrol_page(request: web.Request) -> web.StreamResponse:
    return await _office(request)


async def _office(
    request: web.Request,
    *,
    error: model.PatrolError | None = None,
    status: int = 200,
    values: dict[str, str] | None = None,
) -> web.Response:
    svc = request.app[SERVICES]

    def load(c: Conn) -> tuple[list[dict[str, str]], list[model.Checkpoint], list[model.Route]]:
        sites = _sites(request, c)
        wanted = request.query.get("site") or (sites[0]["code"] if sites else "")
        if not any(s["code"] == wanted for s in sites):
            return sites, [], []
        return sites, model.checkpoints(c, site=wanted), [r for r in model.routes(c) if r.site == wanted]

    sites, cps, rts = await svc.store.read(load)
    site = request.query.get("site") or (sites[0]["code"] if sites else "")
    if request.query.get("site") and not any(s["code"] == site for s in sites):
        raise web.HTTPNotFound()
    tr = translator(request)
    got = plans_of(request.app).get(site)  # the site's plan, drawn on the web or in the config
    svg = (
        render_svg(got[0], tr, None, None, [marker(cp) for cp in cps if cp.x is not None], image=got[1])
        if got
        else None
    )
    names = {cp.id: cp.name for cp in cps}
    return render(
        request,
        "patrol_index.html",
        status=status,
        sites=sites,
        site=site,
        checkpoints=cps,
        routes=rts,
        names=names,
        svg=svg,
        error=error,
        values=values or {},
        notice=request.query.get("notice") if request.query.get("notice") in NOTICES else None,
    )


NOTICES = ("added", "saved", "reissued", "withdrawn", "placed")


@routes.post("/patrol/checkpoints")
@roles("admin")
async def add_checkpoint(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    site = str(form.get("site", ""))
    svc = request.app[SERVICES]
    known = await svc.store.read(lambda c: [s["code"] for s in _sites(request, c)])
    if site not in known:
        raise web.HTTPNotFound()
    actor, now = _actor(request), model.ts_text(_engine(request).now())
    try:
        await svc.store.run_write(
            lambda c: model.add_checkpoint(c, site, str(form.get("name", "")), actor, now), notice=CHANGED
        )
    except model.PatrolError as e:
        return await _office(request, error=e, status=400, values={"name": str(form.get("name", ""))[:80]})
    await _engine(request).changed()
    raise web.HTTPSeeOther(f"/patrol?site={site}&notice=added")


async def _checkpoint(request: web.Request) -> model.Checkpoint:
    cp_id = _id(request.match_info["id"])
    cp = await request.app[SERVICES].store.read(lambda c: model.checkpoint(c, cp_id))
    if cp is None or cp.withdrawn_at is not None:
        raise web.HTTPNotFound()
    need(request, cp.site)
    return cp


def _coord(raw: object) -> float | None:
    text = str(raw or "").strip()
    if not text:
        return None
    try:
        v = float(text)
    except ValueError:
        raise model.PatrolError("patrol.bad_position", "x") from None
    if not 0 <= v <= 100_000:
        raise model.PatrolError("patrol.bad_position", "x")
    return v


@routes.post("/patrol/checkpoints/{id}")
@roles("admin")
async def change_checkpoint(request: web.Request) -> web.StreamResponse:
    cp = await _checkpoint(request)
    form = await read_form(request)
    action = str(form.get("action", ""))
    if action not in ("rename", "place", "reissue", "withdraw"):
        raise web.HTTPBadRequest(text="action is rename, place, reissue or withdraw")
    svc = request.app[SERVICES]
    actor, now = _actor(request), model.ts_text(_engine(request).now())
    try:
        x, y = (_coord(form.get("x")), _coord(form.get("y"))) if action == "place" else (None, None)
        if action == "place" and x is not None and y is not None:
            got = plans_of(request.app).get(cp.site)
            if got is not None and (x > got[0].width or y > got[0].height):
                raise model.PatrolError("patrol.bad_position", "x")
        await svc.store.run_write(
            lambda c: model.change_checkpoint(c, cp.id, action, actor, now, name=str(form.get("name", "")), x=x, y=y),
            notice=CHANGED,
        )
    except model.PatrolError as e:
        return await _office(request, error=e, status=400)
    await _engine(request).changed()
    done = {"rename": "saved", "place": "placed", "reissue": "reissued", "withdraw": "withdrawn"}[action]
    raise web.HTTPSeeOther(f"/patrol?site={cp.site}&notice={done}")


async def _plates(request: web.Request) -> tuple[str, list[Any]]:
    site = request.query.get("site", "")
    svc = request.app[SERVICES]
    wanted = {int(x) for x in request.query.getall("id", []) if x.isascii() and x.isdigit() and len(x) <= 12}

    def load(c: Conn) -> tuple[str, list[model.Checkpoint]] | None:
        sites = {s["code"]: s["name"] for s in _sites(request, c)}
        if site not in sites:
            return None
        cps = [cp for cp in model.checkpoints(c, site=site) if not wanted or cp.id in wanted]
        return sites[site], cps

    got = await svc.store.read(load)
    if got is None or not got[1]:
        raise web.HTTPNotFound()
    name, cps = got
    return f"{name} 巡更点", [cp.plate(name) for cp in cps]


@routes.get("/patrol/plates.pdf")
@roles("admin")
async def plates_pdf(request: web.Request) -> web.StreamResponse:
    title, specs = await _plates(request)
    svc = request.app[SERVICES]
    base = print_base(request)
    if base is None:  # a guard's phone must reach what the plate says: public_url, never this browser's address
        return no_public_url(request)
    try:
        pdf = await _cpu(request, lambda: plates.sheets_pdf(specs, base, title=title, font=svc.cfg.phone.sheet_font))
    except plates.SheetError as e:
        raise web.HTTPServiceUnavailable(text=str(e)) from None
    actor = _actor(request)
    await svc.store.run_write(
        lambda c: audit.write(c, actor, "plates.print", title, f"{len(specs)} checkpoints", request.remote or "")
    )
    return web.Response(
        body=pdf, content_type="application/pdf", headers={"Content-Disposition": 'inline; filename="checkpoints.pdf"'}
    )


async def _cpu(request: web.Request, fn: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(request.app[SERVICES].cpu, fn)


@routes.get("/patrol/plates")
@roles("admin")
async def plates_html(request: web.Request) -> web.StreamResponse:
    """The same sheet as an HTML print page (A4), like the door plates'."""
    title, specs = await _plates(request)
    base = print_base(request)
    if base is None:
        return no_public_url(request)
    tr = translator(request)
    title = f"{title.rsplit(' ', 1)[0]} {tr('patrol.checkpoints')}"

    def build() -> list[dict[str, str]]:
        return [
            {
                "svg": plates.svg(s.url(base)),
                "address": s.address_zh,
                "label": s.label,
                "tagline": tr("patrol.plate_tagline"),
            }
            for s in specs
        ]

    cells = await _cpu(request, build)
    pages = [cells[i : i + plates.PER_PAGE] for i in range(0, len(cells), plates.PER_PAGE)]
    return render(request, "plates_sheet.html", pages=pages, sheet_title=title)


async def _route_form(
    request: web.Request,
    r: model.Route | None,
    site: str,
    *,
    values: dict[str, Any] | None = None,
    error: model.PatrolError | None = None,
    status: int = 200,
) -> web.Response:
    svc = request.app[SERVICES]
    cps = await svc.store.read(lambda c: model.checkpoints(c, site=site))
    if values is None:
        values = {
            "name": "",
            "starts": "22:00",
            "ends": "06:00",
            "every_min": "120",
            "window_min": "60",
            "late_min": "30",
            "ordered": "",
            "guard": "",
            "active": "1",
        }
        if r is not None:
            values = {
                "name": r.name,
                "starts": r.starts,
                "ends": r.ends,
                "every_min": str(r.every_min),
                "window_min": str(r.window_min),
                "late_min": str(r.late_min),
                "ordered": "1" if r.ordered else "",
                "guard": r.guard,
                "active": "1" if r.active else "",
            }
            values.update({f"at-{cp}": str(i + 1) for i, cp in enumerate(r.points)})
    return render(
        request,
        "patrol_route.html",
        status=status,
        r=r,
        site=site,
        checkpoints=cps,
        values=values,
        error=error,
        guards=list(svc.cfg.alarms.guards),
    )


@routes.get("/patrol/routes/{id}")
@roles("admin")
async def route_page(request: web.Request) -> web.StreamResponse:
    if request.match_info["id"] == "new":
        site = request.query.get("site", "")
        known = await request.app[SERVICES].store.read(lambda c: [s["code"] for s in _sites(request, c)])
        if site not in known:
            raise web.HTTPNotFound()
        return await _route_form(request, None, site)
    r = await _route(request)
    return await _route_form(request, r, r.site)


async def _route(request: web.Request) -> model.Route:
    rid = _id(request.match_info["id"])
    r = await request.app[SERVICES].store.read(lambda c: model.route(c, rid))
    if r is None:
        raise web.HTTPNotFound()
    need(request, r.site)
    return r


@routes.post("/patrol/routes")
@roles("admin")
async def route_add(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    site = str(form.get("site", ""))
    known = await request.app[SERVICES].store.read(lambda c: [s["code"] for s in _sites(request, c)])
    if site not in known:
        raise web.HTTPNotFound()
    return await _save_route(request, None, site, form)


@routes.post("/patrol/routes/{id}")
@roles("admin")
async def route_change(request: web.Request) -> web.StreamResponse:
    r = await _route(request)
    return await _save_route(request, r, r.site, await read_form(request))


async def _save_route(request: web.Request, r: model.Route | None, site: str, form: Any) -> web.Response:
    svc = request.app[SERVICES]
    values = {k: str(v)[:80] for k, v in form.items() if isinstance(v, str) and k != "csrf"}
    actor, now = _actor(request), model.ts_text(_engine(request).now())
    try:
        cps = await svc.store.read(lambda c: model.checkpoints(c, site=site))
        f = model.parse_route(form, cps)
        rid = await svc.store.run_write(
            lambda c: model.save_route(c, r.id if r else None, site, f, actor, now), notice=CHANGED
        )
    except model.PatrolError as e:
        return await _route_form(request, r, site, values=values, error=e, status=400)
    await _engine(request).changed()
    raise web.HTTPSeeOther(f"/patrol?site={site}&notice=saved#route-{rid}")


# ---------------------------------------------------------------- the report


def _days(request: web.Request) -> tuple[date, date]:
    today = _engine(request).now().astimezone(request.app[SERVICES].tz).date()
    raw_from, raw_to = request.query.get("from", ""), request.query.get("to", "")
    try:
        day_to = date.fromisoformat(raw_to) if raw_to else today
        day_from = date.fromisoformat(raw_from) if raw_from else day_to - timedelta(days=REPORT_DEFAULT_DAYS - 1)
    except ValueError:
        raise model.PatrolError("reports.bad_date") from None
    if day_from > day_to:
        raise model.PatrolError("reports.bad_order")
    if (day_to - day_from).days >= REPORT_MAX_DAYS:
        raise model.PatrolError("reports.too_long")
    return day_from, day_to


def _route_param(request: web.Request) -> int | None:
    raw = request.query.get("route", "")
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise model.PatrolError("patrol.bad_route")
    return int(raw)


async def _report(request: web.Request) -> tuple[model.Report, date, date, int | None, list[model.Route]]:
    day_from, day_to = _days(request)
    rid = _route_param(request)
    scope, tz = sites_of(request), request.app[SERVICES].tz
    return (
        *await request.app[SERVICES].store.read(
            lambda c: (model.report(c, day_from, day_to, tz, scope, rid), day_from, day_to, rid, model.routes(c, scope))
        ),
    )


@routes.get("/patrol/report")
@roles("admin", "guard")
async def report_page(request: web.Request) -> web.StreamResponse:
    tr = translator(request)
    try:
        rep, day_from, day_to, rid, rts = await _report(request)
    except model.PatrolError as e:
        return web.Response(status=400, text=tr(e.key), content_type="text/plain")
    return render(
        request,
        "patrol_report.html",
        rep=rep,
        day_from=day_from.isoformat(),
        day_to=day_to.isoformat(),
        route_id=rid,
        routes=rts,
        local=lambda ts, f="%Y-%m-%d %H:%M": _local(ts, request, f),
        query=request.query_string,
    )


CSV_COLUMNS = ("shift_day", "route", "round", "checkpoint", "status", "guard", "scanned_local", "in_order")


@routes.get("/patrol/report.csv")
@roles("admin", "guard")
async def report_csv(request: web.Request) -> web.StreamResponse:
    try:
        rep, day_from, day_to, _, _ = await _report(request)
    except model.PatrolError as e:
        return web.Response(status=400, text=translator(request)(e.key), content_type="text/plain")
    buf = io.StringIO()
    w = csvcells.writer(buf)
    w.writerow(CSV_COLUMNS)
    for sh in rep.shifts:
        for p in sh.points:
            w.writerow(
                (
                    sh.day,
                    sh.route,
                    _local(p["round_at"], request, "%Y-%m-%d %H:%M"),
                    p["checkpoint"],
                    p["status"],
                    p["guard"],
                    _local(p["at"], request, "%Y-%m-%d %H:%M:%S"),
                    "" if not p["guard"] else ("1" if p["in_order"] else "0"),
                )
            )
    for s in rep.stray:
        scanned = _local(s["at"], request, "%Y-%m-%d %H:%M:%S")
        w.writerow(("", "", "", s["checkpoint"], s["outcome"], s["guard"], scanned, ""))
    name = f"patrol-{day_from:%Y%m%d}-{day_to:%Y%m%d}.csv"
    return web.Response(
        body=("\ufeff" + buf.getvalue()).encode("utf-8"),
        headers={"Content-Type": "text/csv; charset=utf-8", "Content-Disposition": f'attachment; filename="{name}"'},
    )


# ---------------------------------------------------------------- the guard's phone


def _page(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    resp = render(request, template, status=status, **ctx)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@routes.get("/g")
@roles("admin", "guard")
async def guard_home(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    now, scope = _engine(request).now(), sites_of(request)
    user = request[SESSION_KEY].user.name
    since = model.ts_text(now - timedelta(hours=12))

    def load(c: Conn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        mine = [
            dict(r)
            for r in c.execute(
                "SELECT s.id, s.at, s.outcome, c.name AS checkpoint FROM patrol_scans s JOIN patrol_checkpoints c"
                " ON c.id = s.checkpoint_id WHERE s.guard = ? AND s.at >= ? ORDER BY s.at DESC LIMIT 30",
                (user, since),
            )
        ]
        return model.current_rounds(c, now, scope), mine

    rounds, mine = await svc.store.read(load)
    return _page(
        request, "patrol_phone.html", rounds=rounds, mine=mine, local=lambda ts, f="%H:%M": _local(ts, request, f)
    )


async def _scanned_checkpoint(request: web.Request) -> model.Checkpoint:
    """The checkpoint behind the plate's code, else :class:`Answer` with the page: not found (and counted against the
    address), or throttled after too many unknown codes."""
    limiter = request.app[BAD_CODES]
    addr = request.remote or "?"
    if await limiter.blocked(addr):
        raise Answer(_page(request, "patrol_scan.html", status=429, cp=None, problem="patrol.throttled"))
    code = request.match_info["code"]
    cp = await request.app[SERVICES].store.read(lambda c: model.by_code(c, code))
    if cp is None or not sees(request, cp.site):
        await limiter.spend(addr)
        log.info("patrol: unknown checkpoint code from %s", addr)
        raise Answer(_page(request, "patrol_scan.html", status=404, cp=None, problem="patrol.unknown_code"))
    return cp


@routes.get("/g/c/{code}")
@roles("admin", "guard")
async def scan_page(request: web.Request) -> web.StreamResponse:
    cp = await _scanned_checkpoint(request)
    session, eng = request[SESSION_KEY], _engine(request)
    wall = eng.wall()
    nonce = await request.app[SERVICES].store.run_write(lambda c: model.issue_token(c, session.id_hash, cp.id, wall))
    now = eng.now()
    return _page(
        request,
        "patrol_scan.html",
        cp=cp,
        nonce=nonce,
        problem=None,
        now_local=_local(model.ts_text(now), request, "%H:%M:%S"),
        code=request.match_info["code"],
    )


@routes.post("/g/c/{code}")
@roles("admin", "guard")
async def scan_submit(request: web.Request) -> web.StreamResponse:
    cp = await _scanned_checkpoint(request)
    form = await read_form(request)
    session = request[SESSION_KEY]
    eng = _engine(request)
    token = str(form.get("nonce", ""))
    actor = _actor(request)
    svc = request.app[SERVICES]
    remote = request.remote or ""
    now, wall, tz = eng.now(), eng.wall(), svc.tz

    def record(c: Conn) -> model.ScanResult | str:
        """The scan, or why not (audited): the token used up in the same transaction, whichever instance issued it."""
        why = model.redeem_token(c, token, session.id_hash, cp.id, wall)
        if why is None:
            try:
                return model.scan(c, cp, session.user.name, model.token_hash(token), now, tz, remote, actor=actor)
            except model.Replayed:  # a scan with this token stored already
                why = "replayed"
        audit.write(c, actor, "patrol.refused", f"checkpoint:{cp.id}", f"{why}: checkpoint {cp.site} {cp.name}", remote)
        return why

    res = await svc.store.run_write(record)
    if isinstance(res, str):
        log.info("patrol scan refused (%s) for %s at %s", res, actor, cp.name)
        return _page(
            request,
            "patrol_scan.html",
            status=409,
            cp=cp,
            problem=f"patrol.refused.{res}",
            code=request.match_info["code"],
        )
    await eng.publish(res.events)
    raise web.HTTPSeeOther(f"/g/scans/{res.scan_id}")


@routes.get("/g/scans/{id}")
@roles("admin", "guard")
async def scan_result(request: web.Request) -> web.StreamResponse:
    sid = _id(request.match_info["id"])
    row = await request.app[SERVICES].store.read(lambda c: model.scan_row(c, sid))
    user = request[SESSION_KEY].user
    if row is None or not sees(request, row["site"]) or (user.role != "admin" and row["guard"] != user.name):
        raise web.HTTPNotFound()
    return _page(request, "patrol_result.html", s=row, local=lambda ts, f="%H:%M:%S": _local(ts, request, f))


# ---------------------------------------------------------------- the board's map


def setup_hooks(app: web.Application) -> None:
    def markers(site: str) -> list[Marker]:
        eng = app.get(ENGINE)
        return list(eng.markers.get(site, ())) if eng is not None else []

    app[MAP_MARKERS].append(markers)
