"""Server-rendered pages: sign-in, password change, the guard console, users; and the console socket."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp_jinja2
from aiohttp import web

from portal import i18n
from portal.auth import (
    CSRF_KEY,
    MIN_PASSWORD,
    PASSWORD_FORM_BYTES,
    SESSION_KEY,
    AuthError,
    during_password_change,
    public,
    roles,
    safe_next,
    wants_json,
)
from portal.limits import body_limit
from portal.scope import site_of_message, sites_of
from portal.services import SERVICES, Services
from portal.store import EventQuery, SitesError, User, list_users, parse_sites, registry_site_codes, set_user_sites

log = logging.getLogger("portal.views")
routes = web.RouteTableDef()
LANG_COOKIE = "lang"
CONSOLE_ROWS = 100
BACKLOG_MAX = 200

# Priority thresholds (wire.Priority) to a style class, most urgent first.
LEVELS = ((50, "fire"), (40, "panic"), (30, "intrusion"), (20, "tamper"), (10, "fault"), (0, "routine"))


def level_of(priority: int) -> str:
    for floor, name in LEVELS:
        if priority >= floor:
            return name
    return "routine"


def lang_of(request: web.Request) -> str:
    return i18n.pick(request.cookies.get(LANG_COOKIE), request.app[SERVICES].cfg.language)


def translator(request: web.Request) -> i18n.Translator:
    return i18n.Translator(lang_of(request))


def place_text(place: dict[str, Any], tr: i18n.Translator) -> str:
    parts = [tr(f"place.{k}", v=place[k]) for k in ("building", "unit", "house", "zone", "door") if place.get(k)]
    return " ".join(parts) if parts else str(place.get("site", ""))


def local_time(ts: str, tz: ZoneInfo) -> str:
    try:
        dt = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return ts
    return dt.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")


def present_event(ev: dict[str, Any], tr: i18n.Translator, tz: ZoneInfo) -> dict[str, Any]:
    """What a console row shows, in one language: the same for the page and the socket."""
    level = level_of(int(ev["priority"]))
    source = ev["device"] + (f" / {ev['point']}" if ev.get("point") else "")
    return {
        "id": ev["id"], "ts_local": local_time(ev["ts"], tz), "type": ev["type"], "label": tr.event_label(ev["type"]),
        "place": place_text(ev["place"], tr), "source": source, "priority": ev["priority"], "level": level,
        "level_label": tr(f"prio.{level}"), "gateway": f"{ev['site']}/{ev['gateway']}",
    }


def render(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    svc = request.app[SERVICES]
    tr = translator(request)
    session = request.get(SESSION_KEY)
    base = {
        "t": tr, "lang": tr.lang, "other_lang": "en" if tr.lang == "zh-CN" else "zh-CN",
        "user": session.user if session else None, "csrf": request.get(CSRF_KEY, ""),
        "site_name": svc.cfg.site_name, "path": request.path_qs, "min_password": MIN_PASSWORD,
    }
    base.update(ctx)
    return aiohttp_jinja2.render_template(template, request, base, status=status)


def deny(request: web.Request, status: int, key: str) -> web.StreamResponse:
    """A refusal as JSON for the API and the socket, as a page otherwise."""
    if wants_json(request):
        code = {401: "unauthorized", 403: "forbidden"}.get(status, "error")
        if key == "error.csrf":
            code = "csrf"
        elif key == "password.forced":
            code = "password-change-required"
        return web.json_response({"error": code}, status=status)
    return render(request, "error.html", status=status, message_key=key)


def _see_other(location: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(location)


# ---------------------------------------------------------------- pages


@routes.get("/")
@during_password_change
async def home(request: web.Request) -> web.StreamResponse:
    raise _see_other("/console")


@routes.get("/login")
@public
async def login_page(request: web.Request) -> web.StreamResponse:
    session = request.get(SESSION_KEY)
    if session is not None and not session.user.must_change:
        raise _see_other(safe_next(request.query.get("next")))
    return render(request, "login.html", next=safe_next(request.query.get("next")), error=None, name="")


@routes.post("/login")
@public
@body_limit(PASSWORD_FORM_BYTES)
async def login_submit(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    form = await request.post()
    name = str(form.get("user", ""))[:64]
    password = str(form.get("password", ""))
    nxt = safe_next(str(form.get("next", "")))
    try:
        user = await svc.auth.authenticate(name, password, request.remote or "?")
    except AuthError as e:
        status = 429 if e.key == "login.throttled" else 401
        resp = render(request, "login.html", status=status, next=nxt, error=e.key, name=name)
        if "retry_after" in e.kw:
            resp.headers["Retry-After"] = str(e.kw["retry_after"])
        return resp
    token = await svc.auth.start_session(user, request.get(SESSION_KEY))
    resp = _see_other("/password" if user.must_change else nxt)
    svc.auth.set_session_cookie(resp, token)
    raise resp


@routes.post("/logout")
@during_password_change
async def logout(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    await svc.auth.end_session(request[SESSION_KEY], request.remote or "?")
    resp = _see_other("/login")
    svc.auth.clear_session_cookie(resp)
    raise resp


@routes.get("/password")
@during_password_change
async def password_page(request: web.Request) -> web.StreamResponse:
    return render(request, "password.html", error=None, forced=request[SESSION_KEY].user.must_change)


@routes.post("/password")
@during_password_change
@body_limit(PASSWORD_FORM_BYTES)
async def password_submit(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    session = request[SESSION_KEY]
    form = await request.post()
    try:
        token = await svc.auth.change_password(session, str(form.get("current", "")), str(form.get("new", "")),
                                               str(form.get("confirm", "")), remote=request.remote or "?")
    except AuthError as e:
        throttled = e.key == "login.throttled"
        resp = render(request, "password.html", status=429 if throttled else 400, error=e.key,
                      error_kw={k: v for k, v in e.kw.items() if k != "retry_after"}, forced=session.user.must_change)
        if throttled:
            resp.headers["Retry-After"] = str(e.kw["retry_after"])
        return resp
    resp = _see_other("/console?changed=1")
    svc.auth.set_session_cookie(resp, token)
    raise resp


@routes.get("/lang/{code}")
@public
@during_password_change
async def switch_language(request: web.Request) -> web.StreamResponse:
    code = request.match_info["code"]
    if code not in i18n.LANGUAGES:
        raise web.HTTPNotFound()
    resp = _see_other(safe_next(request.query.get("next"), "/"))
    resp.set_cookie(LANG_COOKIE, code, max_age=365 * 86400, samesite="Lax", path="/",
                    secure=request.app[SERVICES].cfg.cookie_secure)
    raise resp


@routes.get("/console")
@roles("admin", "guard", "installer")
async def console(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    tr = translator(request)
    sites = sites_of(request)
    rows = await svc.store.events(EventQuery(limit=CONSOLE_ROWS, sites=sites))
    events = [present_event(e, tr, svc.tz) for e in rows]
    gateways = [
        {"key": f"{g['site']}/{g['gateway']}", "name": g["name"] or f"{g['site']}/{g['gateway']}",
         "status": g["status"]}
        for g in svc.ingest.health()["gateways"] if sites is None or g["site"] in sites
    ]
    return render(request, "console.html", events=events, gateways=gateways,
                  changed=request.query.get("changed") == "1", max_rows=CONSOLE_ROWS)


@routes.get("/users")
@roles("admin")
async def users_page(request: web.Request) -> web.StreamResponse:
    return await _users(request)


async def _users(request: web.Request, status: int = 200, **ctx: Any) -> web.Response:
    users: list[User] = await request.app[SERVICES].store.read(list_users)
    ctx.setdefault("error", None)
    ctx.setdefault("created", None)
    return render(request, "users.html", status=status, users=users, **ctx)


@routes.post("/users")
@roles("admin")
async def users_create(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    form = await request.post()
    name = str(form.get("name", "")).strip()
    role = str(form.get("role", ""))
    if role not in ("guard", "installer"):
        return await _users(request, 400, error="users.bad_role", error_kw={})
    try:
        sites = parse_sites(str(form.get("sites", "")), await svc.store.read(registry_site_codes))
    except SitesError as e:
        return await _users(request, 400, error=e.key, error_kw={"sites": ", ".join(e.sites)})
    try:
        await svc.auth.create_user(name, role, str(form.get("password", "")), must_change=True)
    except AuthError as e:
        return await _users(request, 400, error=e.key, error_kw=e.kw)
    if sites is not None:
        await svc.store.run_write(lambda c: set_user_sites(c, name, sites))
    return await _users(request, created=name)


@routes.post(r"/users/{name}/sites")
@roles("admin")
async def users_set_sites(request: web.Request) -> web.StreamResponse:
    """Scope a guard or installer to some sites (blank: every site); their open consoles reconnect."""
    svc = request.app[SERVICES]
    name = request.match_info["name"]
    users: list[User] = await svc.store.read(list_users)
    user = next((u for u in users if u.name.lower() == name.lower()), None)
    if user is None:
        raise web.HTTPNotFound()
    form = await request.post()
    if user.role == "admin":
        return await _users(request, 400, error="users.admin_all_sites", error_kw={})
    try:
        sites = parse_sites(str(form.get("sites", "")), await svc.store.read(registry_site_codes))
    except SitesError as e:
        return await _users(request, 400, error=e.key, error_kw={"sites": ", ".join(e.sites)})
    await svc.store.run_write(lambda c: set_user_sites(c, user.name, sites))
    svc.hub.kick_label(user.name, "sites changed")
    log.info("sites of %s set to %s by %s", user.name, "all" if sites is None else ",".join(sites),
             request[SESSION_KEY].user.name)
    raise _see_other("/users")


# ---------------------------------------------------------------- the console socket


@routes.get("/ws")
@roles("admin", "guard", "installer")
async def console_socket(request: web.Request) -> web.StreamResponse:
    svc: Services = request.app[SERVICES]
    tr = translator(request)
    tz = svc.tz
    after = request.query.get("after", "")[:64] or None

    def render_msg(m: dict[str, Any]) -> str:
        if m.get("kind") == "event":
            return json.dumps({"kind": "event", "event": present_event(m["event"], tr, tz)}, ensure_ascii=False)
        if m.get("kind") == "status":
            return json.dumps({**m, "label": tr(f"gw.{m['status']}")}, ensure_ascii=False)
        return json.dumps(m, ensure_ascii=False)

    async def backlog() -> list[dict[str, Any]]:
        if after is None:
            return []
        rows = await svc.store.events(EventQuery(after=after, limit=BACKLOG_MAX, sites=sites))
        return [{"kind": "event", "event": e} for e in rows]

    user = request[SESSION_KEY].user
    sites = user.sites

    def wants(m: dict[str, Any]) -> bool:  # a scoped console gets only its sites' messages (fail closed)
        return sites is None or site_of_message(m) in sites

    return await svc.hub.serve(request, render=render_msg, label=user.name, backlog=backlog,
                               hello={"kind": "hello", "user": user.name}, wants=wants)
