"""The JSON API: health (public; details for staff and the scrape token), events (signed in), users (admin), and
Prometheus metrics (staff and the scrape token)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from portal.store import EventQuery
from portal.web import scrape
from portal.web.auth import SESSION_KEY, AuthError, public, roles
from portal.web.bodies import bad_request, read_json
from portal.web.metrics import CONTENT_TYPE
from portal.web.scope import sites_of
from portal.web.services import SERVICES

routes = web.RouteTableDef()
LIMIT_MAX = 500
LIMIT_DEFAULT = 100


@routes.get("/api/health")
@public
async def health(request: web.Request) -> web.StreamResponse:
    """To the public only that the portal answers; the details to staff and the scrape token (portal.web.scrape)."""
    if not scrape.authorised(request):
        return web.json_response({"status": "ok"})
    svc = request.app[SERVICES]
    ing = svc.ingest.health()
    scope = sites_of(request) if SESSION_KEY in request else None  # the token sees every site
    gateways = [g for g in ing["gateways"] if scope is None or g["site"] in scope]
    gaps = sum(g.get("gaps_open", 0) for g in gateways)
    store_ok = svc.store.ok
    status = "ok" if store_ok and ing["connected"] and not gaps else "degraded"
    return web.json_response(
        {
            "status": status,
            "store": {"ok": store_ok, "error": svc.store.last_error, "commits": svc.store.commits},
            "broker": {"connected": ing["connected"], "connects": ing["connects"], "error": ing["last_error"]},
            "acks": {"sent": ing["acks_sent"], "dropped": ing["acks_dropped"]},
            "gateways": gateways,
            "gaps_open": gaps,
            "rejections": ing["rejections"],
            "websocket_clients": svc.hub.clients,
        }
    )


def _int(request: web.Request, name: str, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        v = int(raw)
    except ValueError:
        raise bad_request(f"{name} must be an integer") from None
    if not lo <= v <= hi:
        raise bad_request(f"{name} must be between {lo} and {hi}")
    return v


@routes.get("/api/events")
@roles("admin", "guard", "installer")
async def events(request: web.Request) -> web.StreamResponse:
    """Newest first by default (``before=<id>`` pages back); ``after=<id>`` and ``after_seq`` read forward."""
    q = request.query
    limit = _int(request, "limit", 1, LIMIT_MAX) or LIMIT_DEFAULT
    after_seq = _int(request, "after_seq", 0, 2**62)
    before, after = q.get("before") or None, q.get("after") or None
    gateway, site = q.get("gateway") or None, q.get("site") or None
    types = tuple(t for t in q.getall("type", []) if t)
    if sum(x is not None for x in (before, after, after_seq)) > 1:
        raise bad_request("use only one of before, after, after_seq")
    if after_seq is not None and gateway is None:
        raise bad_request("after_seq needs gateway (and site when gateway names repeat)")
    if len(types) > 20 or any(len(x) > 64 for x in (before or "", after or "", gateway or "", site or "", *types)):
        raise bad_request("filter too long")
    rows = await request.app[SERVICES].store.events(
        EventQuery(
            before=before,
            after=after,
            after_seq=after_seq,
            site=site,
            gateway=gateway,
            types=types,
            limit=limit,
            sites=sites_of(request),
        )
    )  # another site's events: as for an unknown site
    body: dict[str, Any] = {"events": rows, "order": "asc" if (after or after_seq is not None) else "desc"}
    if len(rows) == limit:
        last = rows[-1]
        if after_seq is not None:
            body["next"] = {"after_seq": last["seq"]}
        elif after is not None:
            body["next"] = {"after": last["id"]}
        else:
            body["next"] = {"before": last["id"]}
    return web.json_response(body)


@routes.post("/api/users")
@roles("admin")
async def create_user(request: web.Request) -> web.StreamResponse:
    data = await read_json(request)
    name, role, password = data.get("name"), data.get("role"), data.get("password")
    if not all(isinstance(x, str) for x in (name, role, password)):
        raise bad_request("name, role and password are required strings")
    assert isinstance(name, str) and isinstance(role, str) and isinstance(password, str)
    if role not in ("guard", "installer"):
        return web.json_response({"error": "bad-role"}, status=400)
    try:
        uid = await request.app[SERVICES].auth.create_user(name, role, password, must_change=True)
    except AuthError as e:
        status = 409 if e.key == "users.exists" else 400
        return web.json_response({"error": e.key.split(".", 1)[1].replace("_", "-")}, status=status)
    return web.json_response({"id": uid, "name": name, "role": role, "must_change": True}, status=201)


@routes.get("/metrics")
@public
async def metrics(request: web.Request) -> web.StreamResponse:
    """Prometheus text, for staff and the scrape token (portal.web.scrape); 401 for everyone else."""
    if not scrape.authorised(request):
        return web.json_response(
            {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": 'Bearer realm="gatehouse-metrics"'}
        )
    body = request.app[SERVICES].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
