"""Registry administration (``/admin/registry...``) and its API (``/api/registry/...``, ``/api/passes/...``).

Administrators see and change everything; guards see households with phones masked and handle
residents' help calls and reports; installers print plates and map doors to gateways. Every page
that shows a person's data writes an audit row (who, what, when).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

from aiohttp import web

from gateway.wire import NAME_RE
from portal import plates
from portal import registry as reg
from portal.api import bad_request
from portal.auth import SESSION_KEY, roles
from portal.estate import ESTATE, Estate
from portal.limits import body_limit
from portal.phone import base_url
from portal.scope import keep, need, sees, sites_of
from portal.scope import sql as site_sql
from portal.store import now_text
from portal.views import render, translator

log = logging.getLogger("portal.registry")
routes = web.RouteTableDef()
IMPORT_MAX_BYTES = 32 * 1024 * 1024
WORK_STATUSES = ("open", "acknowledged", "dispatched", "resolved", "closed")
WORK_NEXT = {"open": "acknowledged", "acknowledged": "dispatched", "dispatched": "resolved", "resolved": "closed"}


def _est(request: web.Request) -> Estate:
    return request.app[ESTATE]


def _actor(request: web.Request) -> str:
    u = request[SESSION_KEY].user
    return f"{u.role}:{u.name}"


def _role(request: web.Request) -> str:
    return str(request[SESSION_KEY].user.role)


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise web.HTTPNotFound() from None


def _every_site(request: web.Request) -> None:
    """Estate-wide administration (site records, import, export, the audit trail) needs an unscoped account."""
    if sites_of(request) is not None:
        raise web.HTTPForbidden()


_HOUSE_SITE = ("SELECT s.code FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b"
               " ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id WHERE h.id = ?")
_UNIT_SITE = ("SELECT s.code FROM reg_units u JOIN reg_buildings b ON b.id = u.building_id JOIN reg_sites s"
              " ON s.id = b.site_id WHERE u.id = ?")


def _site_of(c: sqlite3.Connection, sql: str, ref: int) -> str | None:
    row = c.execute(sql, (ref,)).fetchone()
    return str(row[0]) if row else None


# ---------------------------------------------------------------- overview


@routes.get("/admin/registry")
@roles("admin", "guard", "installer")
async def overview(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    scope = sites_of(request)
    cond, args = site_sql("s.code", scope)
    in_scope = (" JOIN reg_houses h ON h.id = x.house_id JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b"
                f" ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id WHERE {cond} AND ")
    sites = keep(scope, await est.read(reg.overview), "code")
    doors = [d for d in await est.read(lambda c: reg.doors(c)) if sees(request, d.site)]
    n_pending = await est.read(lambda c: int(c.execute(
        "SELECT count(*) FROM reg_residents x" + in_scope + "x.status = 'pending'", args).fetchone()[0]))
    n_work = await est.read(lambda c: int(c.execute(
        "SELECT count(*) FROM work_items x" + in_scope + "x.status != 'closed'", args).fetchone()[0]))
    sync = keep(scope, est.publisher.status() if est.publisher else [])
    gateways = [g for g in est.cfg.gateways if sees(request, g.site)]
    return render(request, "registry_index.html", sites=sites, doors=doors, n_pending=n_pending, n_work=n_work,
                  sync=sync, kid=est.issuer.kid, gateways=gateways, role=_role(request),
                  notice=request.query.get("notice"))


@routes.post("/admin/registry/sites")
@roles("admin")
async def save_site(request: web.Request) -> web.StreamResponse:
    _every_site(request)
    form = await request.post()
    code = str(form.get("code", "")).strip()
    name = str(form.get("name", "")).strip()[:64]
    phone = str(form.get("office_phone", "")).strip()[:40]
    hours = str(form.get("office_hours", "")).strip()[:80]
    if not NAME_RE.match(code) or not name:
        raise web.HTTPBadRequest(text="site code (letters, digits, . _ -) and name are required")

    def put(c: sqlite3.Connection) -> None:
        sid = reg.ensure_site(c, code, name)
        c.execute("UPDATE reg_sites SET office_phone = ?, office_hours = ? WHERE id = ?", (phone, hours, sid))

    await _est(request).write(put)
    raise web.HTTPSeeOther("/admin/registry?notice=saved")


@routes.post("/admin/registry/doors")
@roles("admin", "installer")
async def save_door(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    site, gw, door = (str(form.get(k, "")).strip() for k in ("site", "gateway", "door"))
    if "/" in str(form.get("gateway_ref", "")):
        site, gw = str(form.get("gateway_ref")).split("/", 1)
    building = str(form.get("building", "")).strip() or None
    unit = str(form.get("unit", "")).strip() or None
    gate = form.get("gate") == "1"
    label = str(form.get("label", "")).strip()[:60]
    est = _est(request)
    need(request, site)
    if not est.cfg.known(site, gw) or not NAME_RE.match(door):
        raise web.HTTPBadRequest(text="unknown gateway, or a door name that is not a wire name")
    try:
        await est.write(lambda c: reg.add_door(c, site, gw, door, building, unit, gate, label))
    except reg.RegistryError as e:
        raise web.HTTPBadRequest(text=translator(request)(e.key)) from None
    raise web.HTTPSeeOther("/admin/registry?notice=saved")


# ---------------------------------------------------------------- buildings, houses, plates


@routes.get("/admin/registry/buildings/{id}")
@roles("admin", "guard", "installer")
async def building_page(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    bid = _int(request.match_info["id"])

    def load(c: sqlite3.Connection) -> tuple[sqlite3.Row | None, list[dict[str, Any]], list[sqlite3.Row]]:
        b = c.execute("SELECT b.*, s.name AS site_name, s.code AS site FROM reg_buildings b"
                      " JOIN reg_sites s ON s.id = b.site_id WHERE b.id = ?", (bid,)).fetchone()
        units = c.execute("SELECT id, code FROM reg_units WHERE building_id = ?", (bid,)).fetchall()
        return b, reg.building_houses(c, bid), sorted(units, key=lambda u: reg.sort_key(u["code"]))

    b, houses, units = await est.read(load)
    if b is None:
        raise web.HTTPNotFound()
    need(request, b["site"])
    return render(request, "registry_building.html", b=b, houses=houses, units=units, role=_role(request),
                  notice=request.query.get("notice"))


@routes.get("/admin/registry/houses/{id}")
@roles("admin", "guard")
async def house_page(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    hid = _int(request.match_info["id"])
    place = await est.read(lambda c: reg.house_place(c, hid))
    if place is None:
        raise web.HTTPNotFound()
    need(request, place.site)
    people = await est.read(lambda c: reg.household(c, hid))
    role = _role(request)
    await est.audit(_actor(request), "view.house", f"house:{hid}", "masked" if role != "admin" else "full",
                    request.remote or "")
    return render(request, "registry_house.html", place=place, people=people, role=role, today=est.today(),
                  mask=reg.mask_phone, otc=None, notice=request.query.get("notice"))


@routes.post("/admin/registry/residents/{id}/{action}")
@roles("admin")
async def resident_action(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    rid = _int(request.match_info["id"])
    action = request.match_info["action"]
    form = await request.post()
    back = str(form.get("back", ""))
    actor, today = _actor(request), est.today()

    def where(c: sqlite3.Connection) -> str | None:
        r = reg.resident(c, rid)
        return _site_of(c, _HOUSE_SITE, r.house_id) if r is not None else None

    need(request, await est.read(where))  # no such resident, or one of another site
    if action == "code":
        res = await est.read(lambda c: reg.resident(c, rid))
        if res is None:
            raise web.HTTPNotFound()
        code = await est.one_time_code(res.person_id, actor)
        place = await est.read(lambda c: reg.house_place(c, res.house_id))
        people = await est.read(lambda c: reg.household(c, res.house_id))
        return render(request, "registry_house.html", place=place, people=people, role="admin", today=today,
                      mask=reg.mask_phone, otc={"code": code, "name": res.name, "phone": res.phone}, notice=None)
    try:
        res = await est.write(lambda c: reg.decide(c, rid, action, actor, today))
    except reg.RegistryError as e:
        raise web.HTTPConflict(text=translator(request)(e.key)) from None
    if action in ("deactivate", "moveout", "reactivate"):
        est.spawn(est.refresh_revocations(), "portal.revocations.refresh")
    log.info("%s: %s resident %d", actor, action, rid)
    raise web.HTTPSeeOther("/admin/registry/pending" if back == "pending" else
                           f"/admin/registry/houses/{res.house_id}?notice={action}")


@routes.get("/admin/registry/pending")
@roles("admin")
async def pending_page(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    items = [(r, place) for r, place in await est.read(reg.pending) if sees(request, place.site)]
    await est.audit(_actor(request), "view.pending", detail=f"{len(items)} registrations", remote=request.remote or "")
    return render(request, "registry_pending.html", items=items)


@routes.post("/admin/registry/plates/reissue")
@roles("admin")
async def reissue(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    kind = str(form.get("kind", ""))
    ref = _int(str(form.get("id", "")))
    if kind not in ("house", "entrance"):
        raise web.HTTPBadRequest()
    est = _est(request)
    actor = _actor(request)

    def put(c: sqlite3.Connection) -> int | None:
        site = _site_of(c, _HOUSE_SITE if kind == "house" else _UNIT_SITE, ref)
        if site is None or not sees(request, site):
            return None
        reg.issue_plate(c, kind, ref)
        reg.audit(c, actor, "plate.reissue", f"{kind}:{ref}")
        row = c.execute("SELECT b.id FROM reg_buildings b JOIN reg_units u ON u.building_id = b.id"
                        + (" JOIN reg_houses h ON h.unit_id = u.id WHERE h.id = ?" if kind == "house"
                           else " WHERE u.id = ?"), (ref,)).fetchone()
        return int(row[0])

    bid = await est.write(put)
    if bid is None:
        raise web.HTTPNotFound()
    raise web.HTTPSeeOther(f"/admin/registry/buildings/{bid}?notice=reissued")


@routes.get("/admin/registry/plates/{kind}/{id}.{fmt}")
@roles("admin", "installer")
async def plate_image(request: web.Request) -> web.StreamResponse:
    kind, fmt = request.match_info["kind"], request.match_info["fmt"]
    if kind not in ("house", "entrance") or fmt not in ("png", "svg"):
        raise web.HTTPNotFound()
    ref = _int(request.match_info["id"])
    est = _est(request)
    need(request, await est.read(lambda c: _site_of(c, _HOUSE_SITE if kind == "house" else _UNIT_SITE, ref)))
    code = await est.read(lambda c: reg.plate_code(c, kind, ref))
    if code is None:
        raise web.HTTPNotFound()
    url = plates.plate_url(base_url(request), code)
    if fmt == "png":
        return web.Response(body=await est.cpu(plates.png, url, 10), content_type="image/png")
    return web.Response(text=await est.cpu(plates.svg, url), content_type="image/svg+xml")


async def _sheet_specs(request: web.Request) -> tuple[list[reg.PlateSpec], str]:
    est = _est(request)
    bid = _int(request.match_info["id"])
    unit = request.query.get("unit")
    uid = _int(unit) if unit else None

    def load(c: sqlite3.Connection) -> tuple[list[reg.PlateSpec], str] | None:
        b = c.execute("SELECT b.code, s.name, s.code AS site FROM reg_buildings b JOIN reg_sites s"
                      " ON s.id = b.site_id WHERE b.id = ?", (bid,)).fetchone()
        if b is None or not sees(request, b["site"]):
            return None
        return reg.plates_for(c, bid, uid), f"{b['name']} {b['code']}幢"

    got = await est.read(load)
    if got is None or not got[0]:
        raise web.HTTPNotFound()
    return got


@routes.get("/admin/registry/buildings/{id}/sheet.pdf")
@roles("admin", "installer")
async def sheet_pdf(request: web.Request) -> web.StreamResponse:
    specs, title = await _sheet_specs(request)
    est = _est(request)
    try:
        pdf = await est.cpu(lambda: plates.sheets_pdf(specs, base_url(request), title=title,
                                                      font=est.cfg.phone.sheet_font))
    except plates.SheetError as e:
        raise web.HTTPServiceUnavailable(text=str(e)) from None
    await est.audit(_actor(request), "plates.print", title, f"{len(specs)} plates", request.remote or "")
    return web.Response(body=pdf, content_type="application/pdf",
                        headers={"Content-Disposition": 'inline; filename="plates.pdf"'})


@routes.get("/admin/registry/buildings/{id}/sheet")
@roles("admin", "installer")
async def sheet_html(request: web.Request) -> web.StreamResponse:
    """The same sheet as an HTML print page (@page A4), for printing straight from the browser."""
    specs, title = await _sheet_specs(request)
    est = _est(request)
    base = base_url(request)

    def build() -> list[dict[str, str]]:
        return [{"svg": plates.svg(plates.plate_url(base, s.code)), "address": s.address_zh, "label": s.label}
                for s in specs]

    cells = await est.cpu(build)
    pages = [cells[i:i + plates.PER_PAGE] for i in range(0, len(cells), plates.PER_PAGE)]
    return render(request, "plates_sheet.html", pages=pages, sheet_title=title)


# ---------------------------------------------------------------- import and export


@routes.post("/api/registry/import")
@roles("admin")
@body_limit(IMPORT_MAX_BYTES)  # streamed and counted by the handler too
async def import_csv(request: web.Request) -> web.StreamResponse:
    """The body is the CSV (text/csv) or a multipart form with a ``file``; ``?dry_run=1`` only checks.

    One transaction: any bad line and nothing is written; the answer names every bad line.
    """
    _every_site(request)
    data = await _read_upload(request)
    est = _est(request)
    tr = translator(request)
    rows, errors = await est.cpu(reg.parse_import, data)
    body: dict[str, Any] = {"rows": len(rows), "errors": [
        {"line": e.line, "reason": e.key.removeprefix("import."), "message": tr(e.key, **e.kw)} for e in errors]}
    if errors:
        body["imported"] = False
        return web.json_response(body, status=422)
    if request.query.get("dry_run") == "1":
        body["imported"] = False
        return web.json_response(body)
    actor = _actor(request)
    counts = await est.write(lambda c: reg.apply_import(c, rows, actor))
    est.spawn(est.refresh_revocations(), "portal.revocations.refresh")
    log.info("%s imported %d rows: %s", actor, len(rows), counts)
    body.update(imported=True, counts=counts)
    return web.json_response(body)


async def _read_upload(request: web.Request) -> bytes:
    if request.content_type == "multipart/form-data":
        reader = await request.multipart()
        async for part in reader:
            if getattr(part, "name", None) == "file":
                return await _capped(part)  # type: ignore[arg-type]
        raise bad_request("a multipart upload needs a 'file' part")
    if request.content_type not in ("text/csv", "text/plain", "application/octet-stream"):
        raise bad_request("send the CSV as text/csv (or multipart with a 'file' part)")
    buf = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        buf += chunk
        if len(buf) > IMPORT_MAX_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=IMPORT_MAX_BYTES, actual_size=len(buf))
    return bytes(buf)


async def _capped(part: Any) -> bytes:
    buf = bytearray()
    while chunk := await part.read_chunk(65536):
        buf += chunk
        if len(buf) > IMPORT_MAX_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=IMPORT_MAX_BYTES, actual_size=len(buf))
    return bytes(buf)


@routes.get("/admin/registry/export.csv")
@roles("admin")
async def export(request: web.Request) -> web.StreamResponse:
    _every_site(request)
    est = _est(request)
    text = await est.read(reg.export_csv)
    rows = text.count("\n") - 1
    await est.audit(_actor(request), "export.csv", detail=f"{rows} rows", remote=request.remote or "")
    return web.Response(body=("\ufeff" + text).encode("utf-8"), content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition": 'attachment; filename="estate.csv"'})


@routes.get("/admin/registry/audit")
@roles("admin")
async def audit_page(request: web.Request) -> web.StreamResponse:
    _every_site(request)
    rows = await _est(request).read(lambda c: reg.audit_log(c, 300))
    return render(request, "registry_audit.html", rows=rows)


# ---------------------------------------------------------------- residents' help calls and reports


@routes.get("/admin/registry/work")
@roles("admin", "guard")
async def work_page(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    show_closed = request.query.get("closed") == "1"
    cond, args = site_sql("s.code", sites_of(request))

    def load(c: sqlite3.Connection) -> list[dict[str, Any]]:
        rows = c.execute("SELECT w.id, w.kind, w.house_id, w.category, w.text, w.photo IS NOT NULL AS has_photo,"
                         " w.status, w.notes, w.created_at, w.updated_at FROM work_items w"
                         " JOIN reg_houses h ON h.id = w.house_id JOIN reg_units u ON u.id = h.unit_id"
                         " JOIN reg_buildings b ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id"
                         f" WHERE {cond}" + ("" if show_closed else " AND w.status != 'closed'")
                         + " ORDER BY (w.kind = 'sos') DESC, w.id DESC LIMIT 300", args).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["notes"] = json.loads(d["notes"])
            p = reg.house_place(c, r["house_id"])
            d["address"] = p.short_zh if p else "?"
            d["next"] = WORK_NEXT.get(r["status"])
            out.append(d)
        return out

    items = await est.read(load)
    return render(request, "registry_work.html", items=items, show_closed=show_closed)


@routes.post("/admin/registry/work/{id}")
@roles("admin", "guard")
async def work_update(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    wid = _int(request.match_info["id"])
    form = await request.post()
    status = str(form.get("status", ""))
    note = " ".join(str(form.get("note", "")).split())[:500]
    actor = _actor(request)
    if status not in WORK_STATUSES:
        raise web.HTTPBadRequest()

    def where(c: sqlite3.Connection) -> str | None:
        row = c.execute("SELECT house_id FROM work_items WHERE id = ?", (wid,)).fetchone()
        return _site_of(c, _HOUSE_SITE, row[0]) if row else None

    need(request, await est.read(where))  # no such work item, or one of another site

    def put(c: sqlite3.Connection) -> bool:
        row = c.execute("SELECT status, notes FROM work_items WHERE id = ?", (wid,)).fetchone()
        if row is None or row["status"] == "closed":
            return False
        notes = json.loads(row["notes"])
        notes.append({"at": now_text(), "by": actor, "status": status, "note": note})
        c.execute("UPDATE work_items SET status = ?, notes = ?, updated_at = ? WHERE id = ?",
                  (status, json.dumps(notes, ensure_ascii=False), now_text(), wid))
        return True

    if not await est.write(put):
        raise web.HTTPConflict(text="no such open work item")
    raise web.HTTPSeeOther("/admin/registry/work")


@routes.get("/admin/registry/work/{id}/photo")
@roles("admin", "guard")
async def work_photo(request: web.Request) -> web.StreamResponse:
    wid = _int(request.match_info["id"])
    row = await _est(request).read(lambda c: c.execute(
        "SELECT w.photo, w.photo_type, s.code AS site FROM work_items w JOIN reg_houses h ON h.id = w.house_id"
        " JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b ON b.id = u.building_id"
        " JOIN reg_sites s ON s.id = b.site_id WHERE w.id = ?", (wid,)).fetchone())
    if row is None or row["photo"] is None or not sees(request, row["site"]):
        raise web.HTTPNotFound()
    return web.Response(body=row["photo"], content_type=row["photo_type"],
                        headers={"Content-Disposition": "inline", "Content-Security-Policy": "default-src 'none'"})


# ---------------------------------------------------------------- keys and revocations (installers)


@routes.get("/api/passes/public-key")
@roles("admin", "installer")
async def public_key(request: web.Request) -> web.StreamResponse:
    """The pass-signing public key (PEM) for ``gatehouse init``; its key id in ``X-Key-Id``."""
    est = _est(request)
    return web.Response(body=est.issuer.public_pem, content_type="application/x-pem-file",
                        headers={"X-Key-Id": est.issuer.kid})


@routes.get("/api/registry/revocations")
@roles("admin", "installer")
async def revocations(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    site = request.query.get("site") or None
    if site is not None and not NAME_RE.match(site):
        raise bad_request("bad site")
    scope = sites_of(request)
    assert est.publisher is not None
    if site is not None and not sees(request, site):  # another site's lists: as for an unknown site
        return web.json_response({"lists": {}, "gateways": []})
    if site is not None or scope is None:
        await est.refresh_revocations(site)
    else:
        for s in scope:
            await est.refresh_revocations(s)
    lists = {s: {"version": sl.version, "issued_at": sl.issued_at, "signed": sl.signed}
             for s, sl in est.publisher.lists.items() if (site is None or s == site) and sees(request, s)}
    return web.json_response({"lists": lists, "gateways": keep(scope, est.publisher.status())})
