"""Revoking passes and blocking people: the console's ``/revocations`` page (admin, guard) and the residents'
own visitor passes on the phone (``/p/<code>/visitors``). The rules are :mod:`portal.estate.revocations`'.

The console finds what to act on by what a guard has at hand: a house (3-2-301: its residents, the visitor
passes they issued, the guardroom's visitors to it), a pass id or a subject copied from the access log. Every
action needs a reason, is audited, and rebuilds the site's signed list at once; the page shows each gateway's
confirmed list version, so the guard sees the change arrive (within seconds while the gateway is online).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from portal.doors.visitors import find_houses, parse_house
from portal.estate import phone
from portal.estate import revocations as rv
from portal.estate.service import ESTATE, Estate
from portal.store import Conn
from portal.web.auth import SESSION_KEY, public, roles
from portal.web.bodies import read_form
from portal.web.confirm import ask, confirmed
from portal.web.scope import sees, sites_of
from portal.web.views import local_time, render

log = logging.getLogger("portal.revocations")
routes = web.RouteTableDef()


def _est(request: web.Request) -> Estate:
    return request.app[ESTATE]


def _actor(request: web.Request) -> str:
    u = request[SESSION_KEY].user
    return f"{u.role}:{u.name}"


def _publish(est: Estate, site: str) -> None:
    """Rebuild the site's list and send it to its gateways, without holding up the answer."""
    est.spawn(est.refresh_revocations(site), f"portal.revocations.refresh[{site}]")


# ---------------------------------------------------------------- the console page


async def _lookup(request: web.Request, est: Estate, q: str, site: str) -> dict[str, Any]:
    """What ``q`` names among the sites the user sees: {"kind": house|pass|subject|none|ambiguous, ...}."""
    scope = sites_of(request)
    now = int(est.wall())
    q = q.strip()[:80]
    if not q:
        return {"kind": None}
    parsed = parse_house(q)
    if parsed is not None:
        houses = await est.read(lambda c: find_houses(c, *parsed, site=site or None, sites=scope))
        if len(houses) > 1:
            return {"kind": "ambiguous", "sites": [h["site"] for h in houses]}
        if not houses:
            return {"kind": "none"}
        h = houses[0]
        view = await est.read(lambda c: rv.house_view(c, int(h["house_id"]), h["site"], now))
        return {"kind": "house", "site": h["site"], "house": f"{h['building']}-{h['unit']}-{h['house']}", **view}

    def find(c: Conn) -> rv.Target | None:
        return rv.find_pass(c, q) or rv.find_subject(c, q, site)

    t = await est.read(find)
    if t is None or not sees(request, t.site):  # another site's: as if there were none
        return {"kind": "none"}
    return {"kind": "target", "target": t, "ref": _ref(t)}


def _ref(t: rv.Target) -> str:
    """The form value naming a target (resolved again, and checked, when the form comes back)."""
    if t.kind == "resident":
        return f"person:{t.person_id}@{t.site}"
    if t.kind == "guard_visitor":
        return f"visitor:{t.visitor_id}"
    return f"vpass:{t.visitor_pass_id}"


def _resolve(c: Conn, ref: str) -> rv.Target | None:
    kind, _, rest = ref.partition(":")
    try:
        if kind == "person":
            pid, _, site = rest.partition("@")
            return rv.find_resident(c, int(pid), site)
        if kind == "visitor":
            return rv.find_visitor(c, int(rest))
        if kind == "vpass":
            return rv.find_visitor_pass(c, int(rest))
    except ValueError:
        return None
    return None


async def _page(request: web.Request, *, status: int = 200, error: str | None = None) -> web.Response:
    est = _est(request)
    q, site = request.query.get("q", "")[:80], request.query.get("site", "")[:64]
    if request.method == "POST":
        form = await read_form(request)
        q, site = str(form.get("q", ""))[:80], str(form.get("site", ""))[:64]
    scope = sites_of(request)
    now = int(est.wall())
    found = await _lookup(request, est, q, site)
    rows = await est.read(lambda c: rv.in_force(c, scope, now))
    tz = est.svc.tz
    for r in rows:
        r["created_local"] = local_time(r["created_at"], tz)[:16]
    gateways = [g for g in (est.publisher.status() if est.publisher else []) if sees(request, g["site"])]
    done = request.query.get("done", "")
    return render(
        request,
        "revocations.html",
        status=status,
        q=q,
        site=site,
        found=found,
        rows=rows,
        gateways=gateways,
        error=error,
        done=done if done in ("revoked", "blocked", "lifted") else "",
        fmt=lambda t: local_time_unix(t, tz),
    )


def local_time_unix(t: int | None, tz: Any) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(int(t), tz).strftime("%Y-%m-%d %H:%M") if t else ""


@routes.get("/revocations")
@roles("admin", "guard")
async def revocations_page(request: web.Request) -> web.StreamResponse:
    return await _page(request)


@routes.post("/revocations")
@roles("admin", "guard")
async def revocations_act(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    form = await read_form(request)
    action, ref = str(form.get("action", "")), str(form.get("target", ""))[:120]
    try:
        reason = rv.clean_reason(str(form.get("reason", "")))
        if action not in ("revoke", "block"):
            raise rv.RevocationError("revocations.err.not_found")
        if not confirmed(form):  # at once and on every door: ask first, naming what goes and why
            t0 = await est.read(lambda c: _resolve(c, ref))
            if t0 is None or not sees(request, t0.site) or (action == "revoke" and t0.kind == "resident"):
                raise rv.RevocationError("revocations.err.not_found")
            back = "/revocations?" + urlencode({k: str(form.get(k, ""))[:80] for k in ("q", "site") if form.get(k)})
            return ask(
                request,
                form,
                title_key=f"revocations.confirm_{action}_title",
                consequence_key=f"revocations.confirm_{action}_{t0.kind}",
                kw={"reason": reason},
                back=back,
                button_key=f"revocations.confirm_{action}_go",
            )

        def act(c: Conn) -> str:
            t = _resolve(c, ref)
            if t is None or not sees(request, t.site):
                raise rv.RevocationError("revocations.err.not_found")
            if action == "revoke":
                if t.kind == "resident":  # a resident's own passes live a minute: block the person instead
                    raise rv.RevocationError("revocations.err.not_found")
                rv.revoke_pass(c, t, reason, _actor(request), request.remote or "")
            else:
                rv.block(c, t, reason, _actor(request), request.remote or "")
            return t.site

        site = await est.write(act)
    except rv.RevocationError as e:
        return await _page(request, status=400, error=e.key)
    _publish(est, site)
    log.warning("%s %s by %s: %s", "revoked" if action == "revoke" else "blocked", ref, _actor(request), reason)
    after = {
        "q": str(form.get("q", ""))[:80],
        "site": str(form.get("site", ""))[:64],
        "done": "revoked" if action == "revoke" else "blocked",
    }
    raise web.HTTPSeeOther("/revocations?" + urlencode({k: v for k, v in after.items() if v}))


@routes.post(r"/revocations/{id:\d{1,12}}/lift")
@roles("admin", "guard")
async def revocations_lift(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    rid = int(request.match_info["id"])
    form = await read_form(request)
    scope = sites_of(request)
    try:
        reason = rv.clean_reason(str(form.get("reason", "")))
        site = await est.write(lambda c: rv.lift(c, rid, _actor(request), reason, request.remote or "", scope))
    except rv.RevocationError as e:
        if e.key == "revocations.err.not_found":
            raise web.HTTPNotFound() from None
        return await _page(request, status=400, error=e.key)
    _publish(est, site)
    log.warning("block %d lifted by %s: %s", rid, _actor(request), reason)
    raise web.HTTPSeeOther("/revocations?done=lifted")


# ---------------------------------------------------------------- the resident's own visitor passes (phone)


@routes.get("/p/{code}/visitors")
@public
async def my_visitor_passes(request: web.Request) -> web.StreamResponse:
    place, est, rs, mine = await phone._at_my_house(request)
    if mine is None or not mine.active(est.today()):
        return phone._message(request, place, "visitor.title", "visitor.not_active", status=403)
    rid, now = mine.id, int(est.wall())
    rows = await est.read(lambda c: rv.issued_by(c, rid, now))
    tz = est.svc.tz
    for r in rows:
        r["from_local"], r["to_local"] = local_time_unix(r["not_before"], tz), local_time_unix(r["not_after"], tz)
    return phone.page(
        request,
        "phone_visitors.html",
        place=place,
        resident=rs,
        passes=rows,
        code=request.match_info["code"],
        done=request.query.get("done") == "cancelled",
    )


@routes.post(r"/p/{code}/visitors/{id:\d{1,12}}/cancel")
@public
async def cancel_visitor_pass(request: web.Request) -> web.StreamResponse:
    """The resident who issued a visitor pass cancels it: revoked at every door within seconds."""
    place, est, rs, mine = await phone._at_my_house(request)
    if mine is None or not mine.active(est.today()):
        return phone._message(request, place, "visitor.title", "visitor.not_active", status=403)
    vpid, rid = int(request.match_info["id"]), mine.id
    actor = f"resident:{rs.person.id}"

    def cancel(c: Conn) -> str | None:
        t = rv.find_visitor_pass(c, vpid)
        if t is None or t.resident_id != rid:  # another household's pass: as if there were none
            return None
        try:
            rv.revoke_pass(c, t, "cancelled by the resident who issued it", actor, phone._addr(request))
        except rv.RevocationError:  # already cancelled: the same answer
            pass
        return t.site

    site = await est.write(cancel)
    if site is None:
        return phone.invalid(request)
    _publish(est, site)
    raise web.HTTPSeeOther(f"/p/{request.match_info['code']}/visitors?done=cancelled")
