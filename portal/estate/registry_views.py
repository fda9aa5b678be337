"""Registry administration (``/admin/registry...``) and its API (``/api/registry/...``, ``/api/passes/...``).

Administrators see and change everything; guards see households with phones masked and handle
residents' help calls and reports; installers print plates and map doors to gateways. Every page
that shows a person's data writes an audit row (who, what, when).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import BodyPartReader, web

from gateway.wire import NAME_RE
from portal.estate import plates
from portal.estate import registry as reg
from portal.estate.phone import no_public_url, print_base
from portal.estate.plans import plans_of
from portal.estate.service import ESTATE, Estate
from portal.store import Conn, Row, now_text
from portal.web import i18n
from portal.web.auth import SESSION_KEY, roles
from portal.web.bodies import bad_request, read_form, reading_body
from portal.web.confirm import ask, confirmed
from portal.web.limits import body_limit
from portal.web.scope import keep, need, sees, sites_of
from portal.web.scope import sql as site_sql
from portal.web.views import render, translator

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


_HOUSE_SITE = (
    "SELECT s.code FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b"
    " ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id WHERE h.id = ?"
)
_UNIT_SITE = (
    "SELECT s.code FROM reg_units u JOIN reg_buildings b ON b.id = u.building_id JOIN reg_sites s"
    " ON s.id = b.site_id WHERE u.id = ?"
)


def _site_of(c: Conn, sql: str, ref: int) -> str | None:
    row = c.execute(sql, (ref,)).fetchone()
    return str(row[0]) if row else None


# ---------------------------------------------------------------- overview


@routes.get("/admin/registry")
@roles("admin", "guard", "installer")
async def overview(request: web.Request) -> web.StreamResponse:
    return await _overview(request)


async def _overview(
    request: web.Request,
    status: int = 200,
    *,
    error: str | None = None,
    error_kw: dict[str, Any] | None = None,
    form: Any = None,
) -> web.Response:
    """The registry's front page; ``error`` (an i18n key) above the form that was refused, its values kept."""
    est = _est(request)
    scope = sites_of(request)
    cond, args = site_sql("s.code", scope)
    in_scope = (
        " JOIN reg_houses h ON h.id = x.house_id JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b"
        f" ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id WHERE {cond} AND "
    )
    sites = keep(scope, await est.read(reg.overview), "code")
    for site in sites:
        site["info"] = est.cfg.site_info(site["code"])
    doors = [d for d in await est.read(lambda c: reg.doors(c)) if sees(request, d.site)]
    n_pending = await est.read(
        lambda c: int(
            c.execute("SELECT count(*) FROM reg_residents x" + in_scope + "x.status = 'pending'", args).fetchone()[0]
        )
    )
    n_work = await est.read(
        lambda c: int(
            c.execute("SELECT count(*) FROM work_items x" + in_scope + "x.status != 'closed'", args).fetchone()[0]
        )
    )
    sync = keep(scope, est.publisher.status() if est.publisher else [])
    gateways = [g for g in est.cfg.gateways if sees(request, g.site)]
    names = {(g.site, g.gateway): g.name or g.gateway for g in est.cfg.gateways}
    values = {k: str(v) for k, v in (form or {}).items() if isinstance(v, str) and k != "csrf"}
    return render(
        request,
        "registry_index.html",
        status=status,
        sites=sites,
        doors=doors,
        n_pending=n_pending,
        n_work=n_work,
        sync=sync,
        kid=est.issuer.kid,
        gateways=gateways,
        gateway_names=names,
        role=_role(request),
        notice=request.query.get("notice"),
        error=error,
        error_kw=error_kw or {},
        values=values,
        plans=plans_of(request.app).sites(),
    )


@routes.post("/admin/registry/sites")
@roles("admin")
async def save_site(request: web.Request) -> web.StreamResponse:
    """A site by its code and name (the import makes them too); the office's phone is in the portal config."""
    _every_site(request)
    form = await read_form(request)
    code = str(form.get("code", "")).strip()
    name = str(form.get("name", "")).strip()[:64]
    if not NAME_RE.match(code) or not name:
        return await _overview(request, 400, error="registry.bad_site", form=form)
    actor = _actor(request)

    def put(c: Conn) -> None:
        reg.ensure_site(c, code, name)
        reg.audit(c, actor, "site.save", f"site:{code}", name, request.remote or "")

    await _est(request).write(put)
    raise web.HTTPSeeOther("/admin/registry?notice=saved")


@routes.post("/admin/registry/doors")
@roles("admin", "installer")
async def save_door(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    site, gw, door = (str(form.get(k, "")).strip() for k in ("site", "gateway", "door"))
    if "/" in str(form.get("gateway_ref", "")):
        site, gw = str(form.get("gateway_ref")).split("/", 1)
    building = str(form.get("building", "")).strip() or None
    unit = str(form.get("unit", "")).strip() or None
    gate = form.get("gate") == "1"
    label = str(form.get("label", "")).strip()[:60]
    est = _est(request)
    need(request, site)
    if not est.cfg.known(site, gw):
        return await _overview(request, 400, error="registry.bad_gateway", form=form)
    if not NAME_RE.match(door):
        return await _overview(request, 400, error="registry.bad_door_name", form=form)
    actor = _actor(request)

    def put(c: Conn) -> None:
        reg.add_door(c, site, gw, door, building, unit, gate, label)
        reg.audit(c, actor, "door.save", f"door:{site}/{door}", f"gateway {gw}", request.remote or "")

    try:
        await est.write(put)
    except reg.RegistryError as e:
        return await _overview(request, 400, error=e.key, form=form)
    raise web.HTTPSeeOther("/admin/registry?notice=saved")


# ---------------------------------------------------------------- buildings, houses, plates


@routes.get("/admin/registry/buildings/{id}")
@roles("admin", "guard", "installer")
async def building_page(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    bid = _int(request.match_info["id"])

    def load(c: Conn) -> tuple[Row | None, list[dict[str, Any]], list[Row]]:
        b = c.execute(
            "SELECT b.*, s.name AS site_name, s.code AS site FROM reg_buildings b"
            " JOIN reg_sites s ON s.id = b.site_id WHERE b.id = ?",
            (bid,),
        ).fetchone()
        units = c.execute("SELECT id, code FROM reg_units WHERE building_id = ?", (bid,)).fetchall()
        return b, reg.building_houses(c, bid), sorted(units, key=lambda u: reg.sort_key(u["code"]))

    b, houses, units = await est.read(load)
    if b is None:
        raise web.HTTPNotFound()
    need(request, b["site"])
    return render(
        request,
        "registry_building.html",
        b=b,
        houses=houses,
        units=units,
        role=_role(request),
        notice=request.query.get("notice"),
        printable=print_base(request) is not None,
    )


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
    await est.audit(
        _actor(request), "view.house", f"house:{hid}", "masked" if role != "admin" else "full", request.remote or ""
    )
    return render(
        request,
        "registry_house.html",
        place=place,
        people=people,
        role=role,
        today=est.today(),
        mask=reg.mask_phone,
        otc=None,
        notice=request.query.get("notice"),
    )


#: resident actions that end something (a stay, a request) and so ask first
ASKS_FIRST = ("moveout", "deactivate", "reject")


def _resident_at(c: Conn, rid: int) -> tuple[reg.Resident, reg.Place] | None:
    r = reg.resident(c, rid)
    place = reg.house_place(c, r.house_id) if r is not None else None
    return (r, place) if r is not None and place is not None else None


@routes.post("/admin/registry/residents/{id}/{action}")
@roles("admin")
async def resident_action(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    rid = _int(request.match_info["id"])
    action = request.match_info["action"]
    form = await read_form(request)
    back = str(form.get("back", ""))
    actor, today = _actor(request), est.today()

    def where(c: Conn) -> str | None:
        r = reg.resident(c, rid)
        return _site_of(c, _HOUSE_SITE, r.house_id) if r is not None else None

    need(request, await est.read(where))  # no such resident, or one of another site
    if action == "code":
        res = await est.read(lambda c: reg.resident(c, rid))
        if res is None:
            raise web.HTTPNotFound()
        code = await est.one_time_code(res.person_id, actor)
        house_id = res.house_id
        place = await est.read(lambda c: reg.house_place(c, house_id))
        people = await est.read(lambda c: reg.household(c, house_id))
        return render(
            request,
            "registry_house.html",
            place=place,
            people=people,
            role="admin",
            today=today,
            mask=reg.mask_phone,
            otc={"code": code, "name": res.name, "phone": res.phone},
            notice=None,
        )
    if action in ASKS_FIRST and not confirmed(form):
        got = await est.read(lambda c: _resident_at(c, rid))
        if got is None:
            raise web.HTTPNotFound()
        res0, place = got
        return ask(
            request,
            form,
            title_key=f"registry.act_{action}",
            consequence_key=f"registry.confirm_{action}",
            kw={"name": res0.shown_name, "address": place.address(translator(request).lang)},
            back="/admin/registry/pending" if back == "pending" else f"/admin/registry/houses/{res0.house_id}",
            button_key=f"registry.act_{action}_go",
        )
    try:
        res = await est.write(lambda c: reg.decide(c, rid, action, actor, today))
    except reg.RegistryError as e:
        return render(request, "error.html", status=409, message_key=e.key)
    if action in ("deactivate", "moveout", "reactivate"):
        est.spawn(est.refresh_revocations(), "portal.revocations.refresh")
    log.info("%s: %s resident %d", actor, action, rid)
    raise web.HTTPSeeOther(
        "/admin/registry/pending" if back == "pending" else f"/admin/registry/houses/{res.house_id}?notice={action}"
    )


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
    """A new code for a house's or an entrance's plate: the plate on the door stops working at once, so this asks
    first, naming the address."""
    form = await read_form(request)
    kind = str(form.get("kind", ""))
    ref = _int(str(form.get("id", "")))
    if kind not in ("house", "entrance"):
        raise web.HTTPBadRequest()
    est = _est(request)
    actor = _actor(request)
    place = await est.read(lambda c: reg.house_place(c, ref) if kind == "house" else reg.unit_place(c, ref))
    if place is None or not sees(request, place.site):
        raise web.HTTPNotFound()
    if not confirmed(form):
        return ask(
            request,
            form,
            title_key="registry.reissue_title",
            consequence_key=f"registry.reissue_consequence_{kind}",
            kw={"address": place.address(translator(request).lang)},
            back=f"/admin/registry/buildings/{place.building_id}",
            button_key="registry.reissue_go",
        )

    def put(c: Conn) -> None:
        reg.issue_plate(c, kind, ref)
        reg.audit(c, actor, "plate.reissue", f"{kind}:{ref}", "the old plate stopped working", request.remote or "")

    await est.write(put)
    raise web.HTTPSeeOther(f"/admin/registry/buildings/{place.building_id}?notice=reissued")


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
    base = print_base(request)
    if base is None:
        return no_public_url(request)
    url = plates.plate_url(base, code)
    if fmt == "png":
        return web.Response(body=await est.cpu(plates.png, url, 10), content_type="image/png")
    return web.Response(text=await est.cpu(plates.svg, url), content_type="image/svg+xml")


async def _sheet_specs(request: web.Request, lang: str = "zh-CN") -> tuple[list[reg.PlateSpec], str]:
    """The plates of a building (or of one of its units) and the sheet's title in ``lang`` (the PDF: Chinese)."""
    est = _est(request)
    bid = _int(request.match_info["id"])
    unit = request.query.get("unit")
    uid = _int(unit) if unit else None

    def load(c: Conn) -> tuple[list[reg.PlateSpec], str] | None:
        b = c.execute(
            "SELECT b.code, s.name, s.code AS site FROM reg_buildings b JOIN reg_sites s"
            " ON s.id = b.site_id WHERE b.id = ?",
            (bid,),
        ).fetchone()
        if b is None or not sees(request, b["site"]):
            return None
        return reg.plates_for(c, bid, uid), f"{b['name']} {i18n.Translator(lang)('place.building', v=b['code'])}"

    got = await est.read(load)
    if got is None or not got[0]:
        raise web.HTTPNotFound()
    return got


@routes.get("/admin/registry/buildings/{id}/sheet.pdf")
@roles("admin", "installer")
async def sheet_pdf(request: web.Request) -> web.StreamResponse:
    specs, title = await _sheet_specs(request)
    est = _est(request)
    base = print_base(request)
    if base is None:
        return no_public_url(request)
    try:
        pdf = await est.cpu(lambda: plates.sheets_pdf(specs, base, title=title, font=est.cfg.phone.sheet_font))
    except plates.SheetError as e:
        raise web.HTTPServiceUnavailable(text=str(e)) from None
    await est.audit(_actor(request), "plates.print", title, f"{len(specs)} plates", request.remote or "")
    return web.Response(
        body=pdf, content_type="application/pdf", headers={"Content-Disposition": 'inline; filename="plates.pdf"'}
    )


@routes.get("/admin/registry/buildings/{id}/sheet")
@roles("admin", "installer")
async def sheet_html(request: web.Request) -> web.StreamResponse:
    """The same sheet as an HTML print page (@page A4), for printing straight from the browser."""
    tr = translator(request)
    specs, title = await _sheet_specs(request, tr.lang)
    est = _est(request)
    base = print_base(request)
    if base is None:
        return no_public_url(request)
    zh = tr.lang == "zh-CN"

    def build() -> list[dict[str, str]]:
        return [
            {
                "svg": plates.svg(s.url(base)),
                "address": s.address_zh if zh else (s.address_en or s.address_zh),
                "label": tr("plates.entrance") if s.kind == "entrance" else "",
                "tagline": tr("plates.scan"),
            }
            for s in specs
        ]

    cells = await est.cpu(build)
    pages = [cells[i : i + plates.PER_PAGE] for i in range(0, len(cells), plates.PER_PAGE)]
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
    body: dict[str, Any] = {
        "rows": len(rows),
        "errors": [
            {"line": e.line, "reason": e.key.removeprefix("import."), "message": tr(e.key, **e.kw)} for e in errors
        ],
    }
    if errors:
        body["imported"] = False
        return web.json_response(body, status=422)
    if request.query.get("dry_run") == "1":
        body["imported"] = False
        return web.json_response(body)
    actor, today = _actor(request), est.today()
    counts = await est.write(lambda c: reg.apply_import(c, rows, actor, today))
    est.spawn(est.refresh_revocations(), "portal.revocations.refresh")
    log.info("%s imported %d rows: %s", actor, len(rows), counts)
    body.update(imported=True, counts=counts)
    return web.json_response(body)


async def _read_upload(request: web.Request) -> bytes:
    if request.content_type == "multipart/form-data":
        with reading_body():
            reader = await request.multipart()
            async for part in reader:
                if isinstance(part, BodyPartReader) and part.name == "file":  # not a nested multipart
                    return await _capped(part)
        raise bad_request("a multipart upload needs a 'file' part")
    if request.content_type not in ("text/csv", "text/plain", "application/octet-stream"):
        raise bad_request("send the CSV as text/csv (or multipart with a 'file' part)")
    buf = bytearray()
    with reading_body():
        async for chunk in request.content.iter_chunked(65536):
            buf += chunk
            if len(buf) > IMPORT_MAX_BYTES:
                raise web.HTTPRequestEntityTooLarge(max_size=IMPORT_MAX_BYTES, actual_size=len(buf))
    return bytes(buf)


async def _capped(part: BodyPartReader) -> bytes:
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
    return web.Response(
        body=("\ufeff" + text).encode("utf-8"),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": 'attachment; filename="estate.csv"'},
    )


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

    def load(c: Conn) -> list[dict[str, Any]]:
        rows = c.execute(
            "SELECT w.id, w.kind, w.house_id, w.category, w.text, w.photo IS NOT NULL AS has_photo,"
            " w.status, w.notes, w.created_at, w.updated_at, s.code AS site, g.number AS grid_number,"
            " g.status AS grid_status, g.status_at AS grid_at, g.status_by AS grid_by FROM work_items w"
            " JOIN reg_houses h ON h.id = w.house_id JOIN reg_units u ON u.id = h.unit_id"
            " JOIN reg_buildings b ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id"
            " LEFT JOIN grid_cases g ON g.work_item_id = w.id"
            f" WHERE {cond}"
            + ("" if show_closed else " AND w.status != 'closed'")
            + " ORDER BY (w.kind = 'sos') DESC, w.id DESC LIMIT 300",
            args,
        ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["notes"] = json.loads(d["notes"])
            p = reg.house_place(c, r["house_id"])
            d["place"] = p
            d["next"] = WORK_NEXT.get(r["status"])
            d["forward"] = r["kind"] == "problem" and not r["grid_number"] and est.forwardable(r["site"])
            out.append(d)
        return out

    items = await est.read(load)
    return render(request, "registry_work.html", items=items, show_closed=show_closed)


@routes.post("/admin/registry/work/{id}")
@roles("admin", "guard")
async def work_update(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    wid = _int(request.match_info["id"])
    form = await read_form(request)
    status = str(form.get("status", ""))
    note = " ".join(str(form.get("note", "")).split())[:500]
    actor = _actor(request)
    if status not in WORK_STATUSES:
        return render(request, "error.html", status=400, message_key="work.bad_status")

    def where(c: Conn) -> str | None:
        row = c.execute("SELECT house_id FROM work_items WHERE id = ?", (wid,)).fetchone()
        return _site_of(c, _HOUSE_SITE, row[0]) if row else None

    need(request, await est.read(where))  # no such work item, or one of another site
    if status == "closed" and not confirmed(form):  # closing what is not resolved ends it unsolved: ask first
        current = await est.read(
            lambda c: c.execute("SELECT status FROM work_items WHERE id = ?", (wid,)).fetchone()[0]
        )
        if current not in ("resolved", "closed"):
            return ask(
                request,
                form,
                title_key="work.close_title",
                consequence_key="work.close_consequence",
                back="/admin/registry/work",
                button_key="work.close_go",
            )

    def put(c: Conn) -> bool:
        row = c.execute("SELECT status, notes FROM work_items WHERE id = ?", (wid,)).fetchone()
        if row is None or row["status"] == "closed":
            return False
        notes = json.loads(row["notes"])
        notes.append({"at": now_text(), "by": actor, "status": status, "note": note})
        c.execute(
            "UPDATE work_items SET status = ?, notes = ?, updated_at = ? WHERE id = ?",
            (status, json.dumps(notes, ensure_ascii=False), now_text(), wid),
        )
        reg.audit(c, actor, "work.update", f"work:{wid}", f"{row['status']} -> {status}", request.remote or "")
        for hook in est.work_hooks:
            hook(c, wid)
        return True

    if not await est.write(put):
        return render(request, "error.html", status=409, message_key="work.closed_already")
    raise web.HTTPSeeOther("/admin/registry/work")


@routes.get("/admin/registry/work/{id}/photo")
@roles("admin", "guard")
async def work_photo(request: web.Request) -> web.StreamResponse:
    wid = _int(request.match_info["id"])
    row = await _est(request).read(
        lambda c: c.execute(
            "SELECT w.photo, w.photo_type, s.code AS site FROM work_items w JOIN reg_houses h ON h.id = w.house_id"
            " JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b ON b.id = u.building_id"
            " JOIN reg_sites s ON s.id = b.site_id WHERE w.id = ?",
            (wid,),
        ).fetchone()
    )
    if row is None or row["photo"] is None or not sees(request, row["site"]):
        raise web.HTTPNotFound()
    return web.Response(
        body=row["photo"],
        content_type=row["photo_type"],
        headers={"Content-Disposition": "inline", "Content-Security-Policy": "default-src 'none'"},
    )


# ---------------------------------------------------------------- keys and revocations (installers)


@routes.get("/api/passes/public-key")
@roles("admin", "installer")
async def public_key(request: web.Request) -> web.StreamResponse:
    """The pass-signing public key (PEM) for ``gatehouse init``; its key id in ``X-Key-Id``."""
    est = _est(request)
    return web.Response(
        body=est.issuer.public_pem, content_type="application/x-pem-file", headers={"X-Key-Id": est.issuer.kid}
    )


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
    lists = {
        s: {"version": sl.version, "issued_at": sl.issued_at, "signed": sl.signed}
        for s, sl in est.publisher.lists.items()
        if (site is None or s == site) and sees(request, s)
    }
    return web.json_response({"lists": lists, "gateways": keep(scope, est.publisher.status())})
