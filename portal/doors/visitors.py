"""Visitor registration at the guardroom: name, the house visited (its registered residents shown), a
validity window and a number of uses; the portal signs a visitor pass for the doors of that house's unit
and the site gates, shown as a QR on screen and on a printable slip.

Passes are signed with the portal's pass-signing key (:func:`portal.estate.passes_issue.load_or_create_key`,
``data_dir/pass_signing_key.pem``, mode 0600), in the format of :mod:`gateway.wire.passes`. The visitor's
name stays in the portal (``guard_visitors``); the pass carries only a random subject, so the access log
can show the name and the QR does not.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.wire.passes import PassFields, sign_pass
from portal.estate import plates
from portal.estate.passes_issue import VISITOR_MAX_S, VISITOR_MAX_USES
from portal.store import Conn, audit, db, key_of, now_text
from portal.web.auth import SESSION_KEY, roles
from portal.web.bodies import read_form
from portal.web.scope import Sites, sees, sites_of
from portal.web.scope import sql as site_sql
from portal.web.services import SERVICES, Services
from portal.web.views import local_time, render

log = logging.getLogger("portal.visitors")
routes = web.RouteTableDef()

HOURS = (1, 2, 4, 8, 12, 24, 48, 72, 168)
MAX_HOURS = VISITOR_MAX_S // 3600
NAME_MAX = 40
NOTE_MAX = 200
LIST_ROWS = 50
PAPERS = ("a4", "80", "58")  # the slip's paper: A4, or an 80 mm / 58 mm receipt roll
#: A start up to this far in the past is taken as "now" (the guard typed the current minute).
START_SLACK_S = 15 * 60
START_AHEAD_MAX_S = 30 * 86400
HOUSE_RE = re.compile(
    r"^\s*([A-Za-z0-9]{1,16})\s*(?:幢|栋|号楼|[-/\s])\s*([A-Za-z0-9]{1,16})\s*(?:单元|[-/\s])\s*([A-Za-z0-9]{1,16})"
    r"\s*(?:室|号)?\s*$"
)


@dataclass(frozen=True, slots=True)
class Desk:
    """What the guardroom desk signs with, and its wall clock."""

    key: Ed25519PrivateKey
    wall: Callable[[], float]


DESK = web.AppKey("portal.visitors", Desk)


class VisitorError(ValueError):
    """A refused registration; ``key`` is an i18n key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


async def start(app: web.Application, *, wall: Callable[[], float] = time.time) -> None:
    """The desk signs with the portal's key (loaded, or on a first start created, by the app's start-up)."""
    app[DESK] = Desk(app[SERVICES].signing_key, wall)


def parse_house(raw: str) -> tuple[str, str, str] | None:
    """``3-2-301``, ``3/2/301``, ``3 2 301`` or ``3幢2单元301室`` → (building, unit, house)."""
    m = HOUSE_RE.match(raw[:64])
    return (m.group(1), m.group(2), m.group(3)) if m else None


# ---------------------------------------------------------------- registry reads (defensive)


def find_houses(
    conn: Conn, building: str, unit: str, house: str, site: str | None = None, sites: Sites = None
) -> list[dict[str, Any]]:
    """Houses by their codes (in ``site`` when given), among the sites ``sites`` only (None: every site)."""
    cond, scope_args = site_sql("s.code", sites)
    sql = (
        "SELECT h.id AS house_id, s.code AS site, s.name AS site_name, b.code AS building, u.code AS unit,"
        " u.id AS unit_id, h.code AS house FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id"
        " JOIN reg_buildings b ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id"
        f" WHERE b.code = ? AND u.code = ? AND h.code = ? AND {cond}"
    )
    args: list[Any] = [building, unit, house, *scope_args]
    if site:
        sql += " AND s.code = ?"
        args.append(site)
    try:
        return [dict(r) for r in conn.execute(sql + " ORDER BY s.code LIMIT 10", args)]
    except db.OperationalError:
        return []


# A registry that is missing or older than this code: no residents to show (mypy cannot read a starred except).
_NO_RESIDENTS: tuple[type[Exception], ...] = (*db.OperationalError, ImportError, AttributeError)


def residents_of(conn: Conn, house_id: int, today: str) -> list[dict[str, str]]:
    """The house's current residents: name, role and masked phone (what a guard may see)."""
    try:
        from portal.estate import registry as reg

        people = reg.household(conn, house_id, statuses=("active",))
        return [{"name": r.name, "role": r.role, "phone": reg.mask_phone(r.phone)} for r in people if r.active(today)]
    except _NO_RESIDENTS:
        return []


def doors_for(conn: Conn, site: str, building: str, unit: str) -> list[dict[str, Any]]:
    """The registry's doors a visitor pass for this unit opens: the unit's doors and the site gates."""
    try:
        rows = conn.execute(
            "SELECT d.door, d.label, d.gate FROM reg_doors d JOIN reg_sites s ON s.id = d.site_id"
            " LEFT JOIN reg_units u ON u.id = d.unit_id LEFT JOIN reg_buildings b ON b.id = u.building_id"
            " WHERE s.code = ? AND (d.gate = 1 OR (b.code = ? AND u.code = ?)) ORDER BY d.gate, d.id",
            (site, building, unit),
        ).fetchall()
    except db.OperationalError:
        return []
    return [{"door": r["door"], "label": r["label"] or r["door"], "gate": bool(r["gate"])} for r in rows]


def sites(conn: Conn) -> list[dict[str, str]]:
    try:
        return [dict(r) for r in conn.execute("SELECT code, name FROM reg_sites ORDER BY code")]
    except db.OperationalError:
        return []


def _today(tz: Any, wall: float) -> str:
    return datetime.fromtimestamp(wall, tz).date().isoformat()


def address(h: dict[str, Any], lang: str = "zh-CN") -> str:
    from portal.estate import registry as reg

    fmt = reg.address_zh if lang == "zh-CN" else reg.address_en
    return fmt(h.get("site_name") or "", h["building"], h["unit"], h["house"])


# ---------------------------------------------------------------- registering


def _int(form: Any, name: str) -> int:
    try:
        return int(str(form.get(name, "")).strip())
    except ValueError:
        raise VisitorError(f"visitors.bad_{name}") from None


def window(form: Any, tz: Any, now: float) -> tuple[int, int]:
    """(not_before, not_after) from the form's start (site-local ``YYYY-MM-DDTHH:MM``, empty: now) and hours."""
    hours = _int(form, "hours")
    if not 1 <= hours <= MAX_HOURS:
        raise VisitorError("visitors.bad_hours")
    raw = str(form.get("start", "")).strip()
    start = int(now)
    if raw:
        try:
            local = datetime.strptime(raw[:16], "%Y-%m-%dT%H:%M").replace(tzinfo=tz)
        except ValueError:
            raise VisitorError("visitors.bad_start") from None
        ts = int(local.timestamp())
        if ts < now - START_SLACK_S or ts > now + START_AHEAD_MAX_S:
            raise VisitorError("visitors.bad_start")
        start = max(ts, int(now))
    return start, start + hours * 3600


async def register(app: web.Application, form: Any, actor: str, sites: Sites = None) -> int:
    """Check the form, sign the pass and store the registration; its id. Raises :class:`VisitorError`.

    Only houses of ``sites`` (the guard's scope; None: every site) can be visited: another site's house is
    refused as unknown."""
    svc: Services = app[SERVICES]
    from portal.estate.registry import new_subject

    name = " ".join(str(form.get("name", "")).split())
    if not name or len(name) > NAME_MAX or any(ord(c) < 32 or c in "<>" for c in name):
        raise VisitorError("visitors.bad_name")
    note = " ".join(str(form.get("note", "")).split())[:NOTE_MAX]
    parsed = parse_house(str(form.get("house", "")))
    if parsed is None:
        raise VisitorError("visitors.bad_house")
    site = str(form.get("site", "")).strip() or None
    houses = await svc.store.read(lambda c: find_houses(c, *parsed, site=site, sites=sites))
    if not houses:
        raise VisitorError("visitors.unknown_house")
    if len(houses) > 1:
        raise VisitorError("visitors.pick_site")
    h = houses[0]
    uses = _int(form, "uses")
    if not 1 <= uses <= VISITOR_MAX_USES:
        raise VisitorError("visitors.bad_uses")
    wall = app[DESK].wall()
    not_before, not_after = window(form, svc.tz, wall)
    subject = new_subject("v")
    fields = PassFields(
        kind="visitor",
        site=h["site"],
        subject=subject,
        house=f"{h['building']}-{h['unit']}-{h['house']}",
        units=(f"{h['building']}/{h['unit']}",),
        gates=True,
        not_before=not_before,
        not_after=not_after,
        uses=uses,
    )
    try:
        text = sign_pass(app[DESK].key, fields)
    except ValueError:  # a building or house code that does not fit in a pass
        raise VisitorError("visitors.cannot_sign") from None

    def put(c: Conn) -> int:
        vid = int(
            c.execute(
                "INSERT INTO guard_visitors (subject, name, site, building, unit, house, house_id, pass_id, sealed,"
                " not_before, not_after, uses, note, created_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
                " ?,"
                " ?, ?, ?) RETURNING id",
                (
                    subject,
                    name,
                    h["site"],
                    h["building"],
                    h["unit"],
                    h["house"],
                    h["house_id"],
                    fields.pass_id.hex(),
                    key_of(c).seal(text, fields.pass_id.hex()),  # a copy of the database holds no pass to walk in with
                    not_before,
                    not_after,
                    uses,
                    note,
                    now_text(),
                    actor,
                ),
            ).fetchone()[0]
        )
        audit.write(
            c,
            actor,
            "visitor.register",
            f"visitor:{vid}",
            f"{h['site']} {h['building']}-{h['unit']}-{h['house']} uses={uses}",
        )
        return vid

    vid: int = await svc.store.run_write(put)
    log.info(
        "visitor %d registered for %s/%s-%s-%s by %s (%d uses)",
        vid,
        h["site"],
        h["building"],
        h["unit"],
        h["house"],
        actor,
        uses,
    )
    return vid


#: guard_visitors' columns, and whether the pass (or the visitor) was revoked by hand (portal/estate/revocations.py)
_ROW = (
    "SELECT g.*, EXISTS (SELECT 1 FROM revocations r WHERE r.lifted_at IS NULL AND (r.pass_id = g.pass_id"
    " OR (r.kind = 'block' AND r.subject = g.subject))) AS revoked FROM guard_visitors g"
)


def _opened(conn: Conn, row: Any, with_pass: bool) -> dict[str, Any]:
    """A registration as a dict; with ``pass_text`` (the pass, unsealed with the store key) only when asked: to draw
    its QR or for the API."""
    v = dict(row)
    sealed = v.pop("sealed")
    if with_pass:
        v["pass_text"] = key_of(conn).unseal(bytes(sealed), v["pass_id"])
    return v


def visitor(conn: Conn, vid: int, *, with_pass: bool = False) -> dict[str, Any] | None:
    row = conn.execute(f"{_ROW} WHERE g.id = ?", (vid,)).fetchone()
    return _opened(conn, row, with_pass) if row else None


def recent(conn: Conn, limit: int = LIST_ROWS, sites: Sites = None) -> list[dict[str, Any]]:
    cond, args = site_sql("g.site", sites)
    rows = conn.execute(f"{_ROW} WHERE {cond} ORDER BY g.id DESC LIMIT ?", (*args, limit))
    return [_opened(conn, r, False) for r in rows]


def present(v: dict[str, Any], tz: Any, now: float) -> dict[str, Any]:
    def fmt(t: int) -> str:
        return datetime.fromtimestamp(t, tz).strftime("%Y-%m-%d %H:%M")

    status = (
        "revoked"
        if v.get("revoked")
        else "expired"
        if v["not_after"] <= now
        else ("waiting" if v["not_before"] > now else "valid")
    )
    return {
        **v,
        "from_local": fmt(v["not_before"]),
        "to_local": fmt(v["not_after"]),
        "status": status,
        "house_text": f"{v['building']}幢{v['unit']}单元{v['house']}室",
        "created_local": local_time(v["created_at"], tz)[:16],
    }


# ---------------------------------------------------------------- routes


def _actor(request: web.Request) -> str:
    u = request[SESSION_KEY].user
    return f"{u.role}:{u.name}"


async def _page(request: web.Request, status: int = 200, error: str | None = None, form: Any = None) -> web.Response:
    svc = request.app[SERVICES]
    now = request.app[DESK].wall()
    scope = sites_of(request)
    rows = await svc.store.read(lambda c: recent(c, sites=scope))
    site_list = [s for s in await svc.store.read(sites) if scope is None or s["code"] in scope]
    values = {k: str((form or {}).get(k, "")) for k in ("name", "house", "site", "start", "note")}
    values["hours"] = str((form or {}).get("hours", "4"))
    values["uses"] = str((form or {}).get("uses", "2"))
    return render(
        request,
        "visitors.html",
        status=status,
        error=error,
        visitors=[present(v, svc.tz, now) for v in rows],
        sites=site_list,
        hours=HOURS,
        max_uses=VISITOR_MAX_USES,
        values=values,
    )


@routes.get("/visitors")
@roles("admin", "guard")
async def visitors_page(request: web.Request) -> web.StreamResponse:
    return await _page(request)


@routes.post("/visitors")
@roles("admin", "guard")
async def visitors_submit(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    try:
        vid = await register(request.app, form, _actor(request), sites_of(request))
    except VisitorError as e:
        return await _page(request, 400, e.key, form)
    raise web.HTTPSeeOther(f"/visitors/{vid}")


async def _load(request: web.Request) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the registration, what the slip shows about the house: address, residents, doors)."""
    svc = request.app[SERVICES]
    try:
        vid = int(request.match_info["id"])
    except ValueError:
        raise web.HTTPNotFound() from None
    wall = request.app[DESK].wall()
    today = _today(svc.tz, wall)

    def load(c: Conn) -> tuple[dict[str, Any], dict[str, Any]] | None:
        v = visitor(c, vid, with_pass=True)  # for the slip's QR and the API
        if v is None or not sees(request, v["site"]):  # another site's visitor: as if there were none
            return None
        houses = find_houses(c, v["building"], v["unit"], v["house"], v["site"])
        h = houses[0] if houses else {**v, "site_name": ""}
        info = {
            "address": address(h),
            "address_en": address(h, "en"),
            "residents": residents_of(c, h["house_id"], today) if houses else [],
            "doors": doors_for(c, v["site"], v["building"], v["unit"]),
        }
        return v, info

    got = await svc.store.read(load)
    if got is None:
        raise web.HTTPNotFound()
    return present(got[0], svc.tz, wall), got[1]


@routes.get(r"/visitors/{id:\d{1,12}}")
@roles("admin", "guard")
async def slip(request: web.Request) -> web.StreamResponse:
    """The printable slip: the house, the valid window and the QR only (no resident's or visitor's name), on A4 or a
    58/80 mm receipt printer (``?paper=a4|80|58``)."""
    v, info = await _load(request)
    paper = request.query.get("paper", "a4")
    if paper not in PAPERS:
        paper = "a4"
    svg = await asyncio.get_running_loop().run_in_executor(request.app[SERVICES].cpu, plates.svg, v["pass_text"])
    return render(request, "visitors_slip.html", v=v, info=info, svg=svg, paper=paper, papers=PAPERS)


@routes.get(r"/api/visitors/{id:\d{1,12}}")
@roles("admin", "guard")
async def visitor_json(request: web.Request) -> web.StreamResponse:
    v, info = await _load(request)
    keep = (
        "id",
        "name",
        "site",
        "building",
        "unit",
        "house",
        "pass_id",
        "pass_text",
        "not_before",
        "not_after",
        "uses",
        "note",
        "created_at",
        "created_by",
        "status",
        "from_local",
        "to_local",
    )
    return web.json_response({"visitor": {k: v[k] for k in keep}, **info})


@routes.get("/api/visitors/house")
@roles("admin", "guard")
async def house_lookup(request: web.Request) -> web.StreamResponse:
    """What the registration form shows while the guard types the house: its address and residents."""
    svc = request.app[SERVICES]
    parsed = parse_house(request.query.get("house", ""))
    if parsed is None:
        return web.json_response({"found": False, "error": "bad-house"})
    site = request.query.get("site", "")[:64] or None
    today = _today(svc.tz, request.app[DESK].wall())
    scope = sites_of(request)

    def load(c: Conn) -> dict[str, Any]:
        houses = find_houses(c, *parsed, site=site, sites=scope)
        if len(houses) != 1:
            return {"found": False, "error": "pick-site" if houses else "unknown-house"}
        h = houses[0]
        return {
            "found": True,
            "site": h["site"],
            "address": address(h),
            "address_en": address(h, "en"),
            "residents": residents_of(c, h["house_id"], today),
            "doors": doors_for(c, h["site"], h["building"], h["unit"]),
        }

    return web.json_response(await svc.store.read(load))
