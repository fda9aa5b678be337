"""Estate plans drawn on the web (``/admin/sitemap``): an administrator or installer sets a site's plan picture and
places the perimeter zones, buildings and doors on it by clicking; the alarm board and the site map draw it.

A plan drawn here replaces the config's ``site_maps`` entry of that site (started from it: the first save of a site
that has one copies its zones, buildings and doors). The picture is taken as JPEG, PNG or WebP only and stored
re-encoded from its pixels (:func:`portal.estate.photos.clean`: no metadata, at most 2560 pixels a side); the plan's
units are then the picture's pixels. Without a picture the plan is a blank ground of the size given.

Marks are named as events name places (``place.zone``, ``place.building``, ``place.door``), so the board can
make them blink: a zone is a line of two or more points, a building two opposite corners, a door one point.
Every change is one transaction with its audit row; removing a mark or the whole plan asks first.
:class:`Plans` keeps what is stored in memory for the board, which draws maps without reading the store. On a store
several instances share (docs/centre.md), each change tells the others with its commit (:data:`CHANGED`), and they
read their plans again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from common.tasks import cancel_and_wait
from portal.config import MapBuilding, MapDoor, MapZone, SiteMapConfig
from portal.estate import photos
from portal.estate.sitemap import render_svg
from portal.store import MISSED, Conn, Notice, Op, StoreError, audit, now_text
from portal.store import engine as db
from portal.web.auth import SESSION_KEY, roles
from portal.web.bodies import read_form
from portal.web.confirm import ask, confirmed
from portal.web.limits import body_limit
from portal.web.scope import need, sees
from portal.web.services import SERVICES
from portal.web.views import render, translator

log = logging.getLogger("portal.plans")
routes = web.RouteTableDef()

KINDS = ("zone", "building", "door")
IMAGE_MAX_BYTES = 8 * 1024 * 1024
SIZE_MAX = 100_000.0
NAME_RE = re.compile(r"^[^\s<>\"'&/\\]{1,64}$")  # as a place is named in events: no spaces, nothing HTML-like
LABEL_MAX = 60
POINTS_MAX = 500
EDIT_ROLES = ("admin", "installer")
#: what the other instances sharing the store hear of a change to a plan (with its commit)
CHANGED = Notice("plans_changed")


class PlanError(ValueError):
    """A refused change; ``key`` is an i18n key."""

    def __init__(self, key: str, **kw: Any) -> None:
        super().__init__(key)
        self.key = key
        self.kw = kw


@dataclass
class StoredPlan:
    site: str
    width: float
    height: float
    has_image: bool
    version: str  # changes with every save (the image's URL carries it, so browsers fetch a new picture)
    marks: list[dict[str, Any]] = field(default_factory=list)  # {kind, name, label, points}

    def as_map(self) -> SiteMapConfig:
        def pts(m: dict[str, Any]) -> list[tuple[float, float]]:
            return [(float(x), float(y)) for x, y in m["points"]]

        zones = [MapZone(zone=m["name"], label=m["label"], points=pts(m)) for m in self.marks if m["kind"] == "zone"]
        buildings = []
        for m in self.marks:
            if m["kind"] == "building":
                (x0, y0), (x1, y1) = pts(m)[:2]
                buildings.append(
                    MapBuilding(
                        code=m["name"],
                        name=m["label"],
                        x=min(x0, x1),
                        y=min(y0, y1),
                        w=max(abs(x1 - x0), 1.0),
                        h=max(abs(y1 - y0), 1.0),
                    )
                )
        doors = [
            MapDoor(door=m["name"], label=m["label"], x=pts(m)[0][0], y=pts(m)[0][1])
            for m in self.marks
            if m["kind"] == "door"
        ]
        return SiteMapConfig(
            site=self.site, width=self.width, height=self.height, buildings=buildings, zones=zones, doors=doors
        )


def _load_all(c: Conn) -> dict[str, StoredPlan]:
    plans = {
        r["site"]: StoredPlan(r["site"], r["width"], r["height"], bool(r["has_image"]), r["updated_at"])
        for r in c.execute("SELECT site, width, height, image IS NOT NULL AS has_image, updated_at FROM site_plans")
    }
    for r in c.execute("SELECT site, kind, name, label, points FROM plan_marks ORDER BY site, kind, name"):
        if r["site"] in plans:
            plans[r["site"]].marks.append(
                {"kind": r["kind"], "name": r["name"], "label": r["label"], "points": json.loads(r["points"])}
            )
    return plans


def marks_of(m: SiteMapConfig) -> list[dict[str, Any]]:
    """A config map's zones, buildings and doors as marks (a new drawn plan starts from them)."""
    out: list[dict[str, Any]] = [
        {"kind": "zone", "name": z.zone, "label": z.label, "points": [list(p) for p in z.points]} for z in m.zones
    ]
    out += [
        {"kind": "building", "name": b.code, "label": b.name, "points": [[b.x, b.y], [b.x + b.w, b.y + b.h]]}
        for b in m.buildings
    ]
    out += [{"kind": "door", "name": d.door, "label": d.label, "points": [[d.x, d.y]]} for d in m.doors]
    return out


class Plans:
    """The site maps the board draws: a plan drawn on the web, else the config's."""

    def __init__(self, config_maps: Iterable[SiteMapConfig]) -> None:
        self._config = {m.site: m for m in config_maps}
        self._stored: dict[str, StoredPlan] = {}
        self._stale = asyncio.Event()

    async def load(self, read: Any) -> None:
        self._stored = await read(_load_all)

    def on_commit(self, committed: list[tuple[Op, Any]]) -> None:
        """A store commit listener: another instance changed a plan (or its notices may have been lost)."""
        if any(isinstance(res, Notice) and res in (CHANGED, MISSED) for _op, res in committed):
            self._stale.set()

    async def follow(self, read: Callable[[Callable[[Conn], Any]], Awaitable[Any]]) -> None:
        """Read the plans again whenever :meth:`on_commit` heard of a change (a task for the portal's life)."""
        while True:
            await self._stale.wait()
            self._stale.clear()
            try:
                await self.load(read)
            except StoreError as e:
                log.warning("site plans not read again: %s; retrying", e)
                self._stale.set()
                await asyncio.sleep(1.0)

    def maps(self) -> list[tuple[SiteMapConfig, str | None]]:
        """Every site's map with its picture's URL (None: no picture), by site."""
        sites = sorted(set(self._config) | set(self._stored))
        return [self.get(s) for s in sites]  # type: ignore[misc]

    def get(self, site: str) -> tuple[SiteMapConfig, str | None] | None:
        p = self._stored.get(site)
        if p is not None:
            return p.as_map(), (f"/board/plan/{site}/image?v={p.version}" if p.has_image else None)
        m = self._config.get(site)
        return (m, None) if m is not None else None

    def stored(self, site: str) -> StoredPlan | None:
        return self._stored.get(site)

    def from_config(self, site: str) -> SiteMapConfig | None:
        return self._config.get(site)

    def sites(self) -> set[str]:
        """The sites that have a map of either kind."""
        return set(self._config) | set(self._stored)


PLANS = web.AppKey("portal.plans", Plans)


def setup(app: web.Application) -> None:
    """Add the plan routes and load the stored plans after the portal's own start."""
    app.router.add_routes(routes)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        svc = app[SERVICES]
        plans = Plans(svc.cfg.site_maps)
        await plans.load(svc.store.read)
        app[PLANS] = plans
        svc.store.add_commit_listener(plans.on_commit)  # another instance's change, told with its commit
        following = asyncio.create_task(plans.follow(svc.store.read), name="portal.plans.follow")
        try:
            yield
        finally:
            await cancel_and_wait("site plans", [following])

    app.cleanup_ctx.append(ctx)


def plans_of(app: web.Application) -> Plans:
    return app[PLANS]


# ---------------------------------------------------------------- checking what the page sends


def parse_points(raw: str, kind: str, width: float, height: float) -> list[list[float]]:
    """``"120,40 300,40"`` (or ``;`` between points) → [[120, 40], [300, 40]], within the plan."""
    pts: list[list[float]] = []
    for part in re.split(r"[;\s]+", raw.strip()):
        if not part:
            continue
        xy = part.split(",")
        try:
            x, y = float(xy[0]), float(xy[1])
        except (ValueError, IndexError):
            raise PlanError("plan.bad_points") from None
        if len(xy) != 2 or not (0 <= x <= width and 0 <= y <= height):
            raise PlanError("plan.outside", width=f"{width:g}", height=f"{height:g}")
        pts.append([round(x, 1), round(y, 1)])
        if len(pts) > POINTS_MAX:
            raise PlanError("plan.bad_points")
    need_n = {"zone": 2, "building": 2, "door": 1}[kind]
    if len(pts) < need_n or (kind != "zone" and len(pts) != need_n):
        raise PlanError(f"plan.points_{kind}")
    return pts


def _size(raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise PlanError("plan.bad_size") from None
    if not 10 <= v <= SIZE_MAX:
        raise PlanError("plan.bad_size")
    return v


# ---------------------------------------------------------------- writes (one transaction each, audited)


def _ensure(
    c: Conn, site: str, plans: Plans, actor: str, width: float | None = None, height: float | None = None
) -> None:
    """The site's stored plan, made from the config's map (or a blank ground) the first time."""
    if c.execute("SELECT 1 FROM site_plans WHERE site = ?", (site,)).fetchone():
        return
    base = plans.from_config(site)
    w = width or (base.width if base else 1000.0)
    h = height or (base.height if base else 700.0)
    c.execute(
        "INSERT INTO site_plans (site, width, height, updated_at, updated_by) VALUES (?, ?, ?, ?, ?)",
        (site, w, h, now_text(), actor),
    )
    for m in marks_of(base) if base else []:
        c.execute(
            "INSERT INTO plan_marks (site, kind, name, label, points) VALUES (?, ?, ?, ?, ?)",
            (site, m["kind"], m["name"], m["label"], json.dumps(m["points"])),
        )


def _touch(c: Conn, site: str, actor: str) -> None:
    c.execute("UPDATE site_plans SET updated_at = ?, updated_by = ? WHERE site = ?", (now_text(), actor, site))


# ---------------------------------------------------------------- pages


def _actor(request: web.Request) -> str:
    u = request[SESSION_KEY].user
    return f"{u.role}:{u.name}"


def _site(request: web.Request) -> str:
    site = request.match_info["site"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", site):
        raise web.HTTPNotFound()
    need(request, site)
    return site


async def _known_sites(request: web.Request) -> list[dict[str, str]]:
    rows = await request.app[SERVICES].store.read(
        lambda c: [dict(r) for r in c.execute("SELECT code, name FROM reg_sites ORDER BY code")]
    )
    codes = {r["code"] for r in rows}
    rows += [{"code": s, "name": s} for s in sorted(plans_of(request.app).sites() - codes)]
    rows += [
        {"code": g.site, "name": g.site}
        for g in request.app[SERVICES].cfg.gateways
        if g.site not in codes | plans_of(request.app).sites()
    ]
    seen: set[str] = set()
    shown: list[dict[str, str]] = []
    for r in rows:
        if sees(request, r["code"]) and r["code"] not in seen:
            seen.add(r["code"])
            shown.append(r)
    return shown


def _names(c: Conn, site: str) -> dict[str, list[str]]:
    """What can be placed: the registry's buildings and doors, and the zones seen in the site's latest events."""
    buildings = [
        r[0]
        for r in c.execute(
            "SELECT b.code FROM reg_buildings b JOIN reg_sites s ON s.id = b.site_id WHERE s.code = ? ORDER BY b.code",
            (site,),
        )
    ]
    doors = [
        r[0]
        for r in c.execute(
            "SELECT d.door FROM reg_doors d JOIN reg_sites s ON s.id = d.site_id WHERE s.code = ? ORDER BY d.door",
            (site,),
        )
    ]
    zone = f"coalesce({db.json_field(c, 'place', 'zone')}, {db.json_field(c, 'data', 'zone')})"
    zones = [
        r[0]
        for r in c.execute(
            f"SELECT DISTINCT z FROM (SELECT {zone} AS z FROM events WHERE site = ? ORDER BY ts DESC LIMIT 5000) AS"
            f" recent"
            " WHERE z IS NOT NULL ORDER BY z",
            (site,),
        )
    ]
    return {"zone": zones, "building": buildings, "door": doors}


@routes.get("/admin/sitemap")
@roles(*EDIT_ROLES)
async def index_page(request: web.Request) -> web.StreamResponse:
    plans = plans_of(request.app)
    sites = [
        {**s, "stored": plans.stored(s["code"]) is not None, "config": plans.from_config(s["code"]) is not None}
        for s in await _known_sites(request)
    ]
    return render(request, "sitemap_index.html", sites=sites)


async def _editor(
    request: web.Request,
    site: str,
    status: int = 200,
    *,
    error: str | None = None,
    error_kw: dict[str, Any] | None = None,
    values: dict[str, str] | None = None,
) -> web.Response:
    svc = request.app[SERVICES]
    plans = plans_of(request.app)
    got = plans.get(site)
    stored = plans.stored(site)
    tr = translator(request)
    svg = render_svg(got[0], tr, image=got[1]) if got else None
    names = await svc.store.read(lambda c: _names(c, site))
    placed = {(m["kind"], m["name"]) for m in (stored.marks if stored else marks_of(got[0]) if got else [])}
    marks = stored.marks if stored else (marks_of(got[0]) if got else [])
    resp = render(
        request,
        "sitemap_edit.html",
        status=status,
        site=site,
        svg=svg,
        stored=stored,
        plan=got[0] if got else None,
        marks=marks,
        names=names,
        placed=placed,
        kinds=KINDS,
        error=error,
        error_kw=error_kw or {},
        values=values or {},
        notice=request.query.get("notice"),
        max_mb=IMAGE_MAX_BYTES // (1024 * 1024),
    )
    resp.headers["Cache-Control"] = "no-store"
    return resp


@routes.get("/admin/sitemap/{site}")
@roles(*EDIT_ROLES)
async def edit_page(request: web.Request) -> web.StreamResponse:
    site = _site(request)
    if site not in {s["code"] for s in await _known_sites(request)}:
        raise web.HTTPNotFound()
    return await _editor(request, site)


async def _read_image(request: web.Request) -> tuple[dict[str, str], bytes | None]:
    """The upload form's fields and picture (the body is capped by :func:`portal.web.limits.body_limit`)."""
    form = await read_form(request)
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    part = form.get("image")
    data = part.file.read(IMAGE_MAX_BYTES + 1) if isinstance(part, web.FileField) else None
    return fields, data or None


@routes.post("/admin/sitemap/{site}/image")
@roles(*EDIT_ROLES)
@body_limit(IMAGE_MAX_BYTES + 16_384)
async def set_image(request: web.Request) -> web.StreamResponse:
    """The plan's picture (its pixels become the plan's units; marks placed before are scaled with it), or, with no
    picture, a blank plan of the width and height given."""
    site = _site(request)
    svc = request.app[SERVICES]
    plans = plans_of(request.app)
    fields, data = await _read_image(request)
    actor = _actor(request)
    try:
        if data is not None:
            photo = await _clean(request, data)
            width, height, image, mime = float(photo.width), float(photo.height), photo.data, photo.mime
        else:
            stored = plans.stored(site)
            if stored is not None and stored.has_image:  # the picture decides the size; delete the plan first
                raise PlanError("plan.has_image")
            width, height, image, mime = _size(fields.get("width", "")), _size(fields.get("height", "")), None, None
    except PlanError as e:
        return await _editor(request, site, 400, error=e.key, error_kw=e.kw)

    def put(c: Conn) -> None:
        _ensure(c, site, plans, actor, width, height)
        old = c.execute("SELECT width, height FROM site_plans WHERE site = ?", (site,)).fetchone()
        sx, sy = width / old["width"], height / old["height"]
        if (sx, sy) != (1.0, 1.0):  # the marks keep their places on the new picture
            for r in c.execute("SELECT kind, name, points FROM plan_marks WHERE site = ?", (site,)).fetchall():
                pts = [[round(x * sx, 1), round(y * sy, 1)] for x, y in json.loads(r["points"])]
                c.execute(
                    "UPDATE plan_marks SET points = ? WHERE site = ? AND kind = ? AND name = ?",
                    (json.dumps(pts), site, r["kind"], r["name"]),
                )
        c.execute(
            "UPDATE site_plans SET width = ?, height = ?, image = ?, image_type = ? WHERE site = ?",
            (width, height, image, mime, site),
        )
        _touch(c, site, actor)
        audit.write(
            c,
            actor,
            "plan.image" if image else "plan.size",
            f"site:{site}",
            f"{width:g}x{height:g}" + (f" {mime}" if mime else ""),
            request.remote or "",
        )

    await svc.store.run_write(put, notice=CHANGED)
    await plans.load(svc.store.read)
    raise web.HTTPSeeOther(f"/admin/sitemap/{site}?notice=image" if data else f"/admin/sitemap/{site}?notice=size")


async def _clean(request: web.Request, data: bytes) -> photos.Photo:
    svc = request.app[SERVICES]
    try:
        return await asyncio.get_running_loop().run_in_executor(
            svc.cpu, photos.clean, data, svc.cfg.phone.photo_max_pixels
        )
    except photos.PhotoError as e:
        raise PlanError("plan.bad_image" if e.key == "report.bad_photo" else "plan.image_pixels") from None


@routes.post("/admin/sitemap/{site}/marks")
@roles(*EDIT_ROLES)
async def save_mark(request: web.Request) -> web.StreamResponse:
    """Place (or move) a zone, building or door: its name as events give it, a label for people, its points."""
    site = _site(request)
    svc = request.app[SERVICES]
    plans = plans_of(request.app)
    form = await read_form(request)
    values = {k: str(v) for k, v in form.items() if isinstance(v, str) and k != "csrf"}
    kind = values.get("kind", "")
    name = values.get("name", "").strip()
    label = " ".join(values.get("label", "").split())[:LABEL_MAX]
    got = plans.get(site)
    width, height = (got[0].width, got[0].height) if got else (1000.0, 700.0)
    try:
        if kind not in KINDS:
            raise PlanError("plan.bad_kind")
        if not NAME_RE.match(name):
            raise PlanError("plan.bad_name")
        pts = parse_points(values.get("points", ""), kind, width, height)
    except PlanError as e:
        return await _editor(request, site, 400, error=e.key, error_kw=e.kw, values=values)
    actor = _actor(request)

    def put(c: Conn) -> None:
        _ensure(c, site, plans, actor)
        c.execute(
            "INSERT INTO plan_marks (site, kind, name, label, points) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (site, kind, name) DO UPDATE SET label = excluded.label, points = excluded.points",
            (site, kind, name, label, json.dumps(pts)),
        )
        _touch(c, site, actor)
        audit.write(
            c,
            actor,
            "plan.mark",
            f"site:{site}",
            f"{kind} {name} at {msgspec.json.encode(pts).decode()}",
            request.remote or "",
        )

    await svc.store.run_write(put, notice=CHANGED)
    await plans.load(svc.store.read)
    raise web.HTTPSeeOther(f"/admin/sitemap/{site}?notice=placed")


@routes.post("/admin/sitemap/{site}/marks/delete")
@roles(*EDIT_ROLES)
async def delete_mark(request: web.Request) -> web.StreamResponse:
    site = _site(request)
    svc = request.app[SERVICES]
    plans = plans_of(request.app)
    form = await read_form(request)
    kind, name = str(form.get("kind", "")), str(form.get("name", ""))
    if kind not in KINDS or not NAME_RE.match(name):
        raise web.HTTPNotFound()
    tr = translator(request)
    if not confirmed(form):
        return ask(
            request,
            form,
            title_key="plan.remove_title",
            consequence_key="plan.remove_consequence",
            kw={"what": tr(f"plan.kind_{kind}"), "name": name},
            back=f"/admin/sitemap/{site}",
            button_key="plan.remove_go",
        )
    actor = _actor(request)

    def put(c: Conn) -> bool:
        _ensure(c, site, plans, actor)
        gone = c.execute("DELETE FROM plan_marks WHERE site = ? AND kind = ? AND name = ?", (site, kind, name))
        if gone.rowcount:
            _touch(c, site, actor)
            audit.write(c, actor, "plan.unmark", f"site:{site}", f"{kind} {name}", request.remote or "")
        return bool(gone.rowcount)

    if not await svc.store.run_write(put, notice=CHANGED):
        raise web.HTTPNotFound()
    await plans.load(svc.store.read)
    raise web.HTTPSeeOther(f"/admin/sitemap/{site}?notice=removed")


@routes.post("/admin/sitemap/{site}/delete")
@roles(*EDIT_ROLES)
async def delete_plan(request: web.Request) -> web.StreamResponse:
    """Remove the drawn plan (picture and marks); the config's map, if any, is drawn again."""
    site = _site(request)
    svc = request.app[SERVICES]
    plans = plans_of(request.app)
    if plans.stored(site) is None:
        raise web.HTTPNotFound()
    form = await read_form(request)
    if not confirmed(form):
        key = "plan.delete_consequence_config" if plans.from_config(site) else "plan.delete_consequence"
        return ask(
            request,
            form,
            title_key="plan.delete_title",
            consequence_key=key,
            kw={"site": site},
            back=f"/admin/sitemap/{site}",
            button_key="plan.delete_go",
        )
    actor = _actor(request)

    def put(c: Conn) -> None:
        c.execute("DELETE FROM site_plans WHERE site = ?", (site,))
        audit.write(c, actor, "plan.delete", f"site:{site}", "", request.remote or "")

    await svc.store.run_write(put, notice=CHANGED)
    await plans.load(svc.store.read)
    raise web.HTTPSeeOther(f"/admin/sitemap/{site}?notice=deleted")


@routes.get("/board/plan/{site}/image")
@roles("admin", "guard", "installer")
async def plan_image(request: web.Request) -> web.StreamResponse:
    site = request.match_info["site"]
    if not sees(request, site):
        raise web.HTTPNotFound()
    row = await request.app[SERVICES].store.read(
        lambda c: c.execute("SELECT image, image_type FROM site_plans WHERE site = ?", (site,)).fetchone()
    )
    if row is None or row["image"] is None:
        raise web.HTTPNotFound()
    return web.Response(
        body=bytes(row["image"]),
        content_type=row["image_type"],
        headers={"Cache-Control": "private, max-age=86400", "Content-Security-Policy": "default-src 'none'"},
    )
