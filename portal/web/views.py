"""Server-rendered pages: sign-in, password change, the guard console; and the console socket (user accounts:
:mod:`portal.web.users`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp_jinja2
import jinja2
from aiohttp import web

from portal.store import EventQuery
from portal.web import i18n, stations
from portal.web.auth import (
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
from portal.web.bodies import read_form
from portal.web.limits import body_limit
from portal.web.scope import site_of_message, sites_of
from portal.web.services import SERVICES, Services

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
    raw = ev.get("data")
    data: dict[str, Any] = raw if isinstance(raw, dict) else {}
    named = data.get("label")
    if isinstance(named, str) and named.strip():  # a zone's label names the place; its codes are for installers
        rest = {k: v for k, v in ev["place"].items() if k != "zone"}
        where = " ".join(
            x
            for x in (
                named.strip()[:60],
                place_text(rest, tr) if any(rest.get(k) for k in ("building", "unit", "house", "door")) else "",
            )
            if x
        )
        shown_source = ""
    else:
        where, shown_source = place_text(ev["place"], tr), source
    if ev.get("gateway") == "portal":  # raised by the portal (a help call, a report): the house says it all
        shown_source = source = ""
    return {
        "id": ev["id"],
        "ts_local": local_time(ev["ts"], tz),
        "type": ev["type"],
        "label": tr.event_label(ev["type"]),
        "place": where,
        "source": shown_source,
        "codes": source,
        "priority": ev["priority"],
        "level": level,
        "level_label": tr(f"prio.{level}"),
        "gateway": f"{ev['site']}/{ev['gateway']}",
    }


def tz_label(tz: ZoneInfo, at: datetime | None = None) -> str:
    """The site's time zone as people read it next to a time: "Asia/Shanghai (UTC+08:00)"."""
    off = (at or datetime.now(UTC)).astimezone(tz).strftime("%z")
    return f"{tz.key} (UTC{off[:3]}:{off[3:]})"


@jinja2.pass_context
def local_filter(ctx: Any, ts: str | None, minutes: bool = False) -> str:
    """A stored UTC time ("2026-03-01T16:30:05.000000Z") as the site's local time; the page labels the zone."""
    if not ts:
        return ""
    text = local_time(str(ts), ctx.get("tz") or ZoneInfo("UTC"))
    return text[:16] if minutes else text


_STAFF = ("admin", "guard", "installer")


@jinja2.pass_context
def actor_filter(ctx: Any, actor: str | None) -> str:
    """Who did something, as people say it: "guard:bob" → "保安 bob", "resident:12" → "住户 #12"."""
    tr: i18n.Translator = ctx["t"]
    text = str(actor or "")
    if text == "gateway:portal":  # an event the portal raised itself: a resident's phone
        return tr("actor.phone")
    kind, sep, who = text.partition(":")
    if sep and kind in _STAFF:
        return f"{tr(f'role.{kind}')} {who}"
    if sep and kind == "gateway":  # by the name people gave it ("1号楼机房")
        svc = ctx.get("svc_gateways") or {}
        return tr("actor.gateway", v=svc.get(who) or who)
    if sep and tr.has(f"actor.{kind}"):
        return tr(f"actor.{kind}", v=who)
    if not sep and tr.has(f"actor.{text}"):
        return tr(f"actor.{text}")
    return text


@jinja2.pass_context
def audit_action_filter(ctx: Any, action: str) -> str:
    """An audit row's action in words; an alarm step as the board names it; an unknown one as it is."""
    tr: i18n.Translator = ctx["t"]
    if tr.has(f"audit.{action}"):
        return tr(f"audit.{action}")
    family, _, step = action.partition(".")
    if family == "alarm" and tr.has(f"board.action.{step}"):
        return tr("audit.alarm_step", step=tr(f"board.action.{step}"))
    for tail in ("failed", "lock", "refused"):  # reauth.failed, password.current.lock ...
        if action.endswith(f".{tail}") and tr.has(f"audit.{action.removesuffix('.' + tail)}"):
            return tr(f"audit.any_{tail}", what=tr(f"audit.{action.removesuffix('.' + tail)}"))
    return action


@jinja2.pass_context
def audit_target_filter(ctx: Any, target: str | None) -> str:
    """An audit row's object: "house:12" → "房屋 #12", "door:s1/north-gate" → "门 s1/north-gate"."""
    tr: i18n.Translator = ctx["t"]
    text = str(target or "")
    kind, sep, ref = text.partition(":")
    if sep and tr.has(f"audit.target.{kind}"):
        return tr(f"audit.target.{kind}", v=ref)
    return text


def console_config(request: web.Request, session: Any) -> str:
    """The console shell's settings (portal/static/console-shell.js) for a signed-in staff page."""
    svc = request.app[SERVICES]
    tr = translator(request)
    user = session.user
    texts = {k: tr(k) for k in i18n.table(i18n.DEFAULT) if k.startswith(("shell.", "kind.", "conn.", "punct."))}
    return json.dumps(
        {
            "user": user.name,
            "role": user.role,
            "rings": user.role in ("admin", "guard"),
            "lang": tr.lang,
            "tz": svc.cfg.timezone,
            "beat_s": svc.cfg.console.heartbeat_s,
            "stale_s": svc.cfg.console.stale_after_s,
            "station": session.station_id is not None,
            "t": texts,
        },
        ensure_ascii=False,
    ).replace("<", "\\u003c")


def render(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    svc = request.app[SERVICES]
    tr = translator(request)
    session = request.get(SESSION_KEY)
    staff = session is not None and not session.user.must_change
    base = {
        "t": tr,
        "lang": tr.lang,
        "other_lang": "en" if tr.lang == "zh-CN" else "zh-CN",
        "user": session.user if session else None,
        "csrf": request.get(CSRF_KEY, ""),
        "site_name": svc.cfg.site_name,
        "path": request.path_qs,
        "min_password": MIN_PASSWORD,
        "tz": svc.tz,
        "tz_label": tz_label(svc.tz),
        "shell": console_config(request, session) if staff else None,
        "svc_gateways": {g.gateway: g.name for g in svc.cfg.gateways if g.name},
    }
    base.update(ctx)
    return aiohttp_jinja2.render_template(template, request, base, status=status)


class Answer(Exception):
    """Raised by a handler's helper to answer with ``response`` (a rendered refusal page, say), so the handler reads
    straight: ``place, est = await _at_plate(request)``. :func:`answers` returns it as the handler's own answer."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


@web.middleware
async def answers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The innermost middleware: an :class:`Answer` is the handler's response, seen by every other middleware as
    if returned (the access middleware still sets its cookie on it)."""
    try:
        return await handler(request)
    except Answer as a:
        return a.response


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
    return render(
        request,
        "login.html",
        next=safe_next(request.query.get("next")),
        error=None,
        name="",
        **await stations.login_context(request),
    )


@routes.post("/login")
@public
@body_limit(PASSWORD_FORM_BYTES)
async def login_submit(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    form = await read_form(request)
    name = str(form.get("user", ""))[:64]
    password = str(form.get("password", ""))
    nxt = safe_next(str(form.get("next", "")))
    try:
        user = await svc.auth.authenticate(name, password, request.remote or "?")
    except AuthError as e:
        status = 429 if e.key == "login.throttled" else 401
        resp = render(
            request,
            "login.html",
            status=status,
            next=nxt,
            error=e.key,
            name=name,
            **await stations.login_context(request),
        )
        if "retry_after" in e.kw:
            resp.headers["Retry-After"] = str(e.kw["retry_after"])
        return resp
    station = await stations.station_of(request)
    if station is not None and user.role in stations.STATION_ROLES and not user.must_change:
        hand = stations.sign_on(station, user, str(form.get("handover_note", "")), request.remote or "")
        token = await svc.auth.start_session(user, request.get(SESSION_KEY), station_id=station.id, on_start=hand)
    else:
        token = await svc.auth.start_session(user, request.get(SESSION_KEY))
    resp = _see_other("/password" if user.must_change else nxt)
    svc.auth.set_session_cookie(resp, token)
    raise resp


@routes.post("/logout")
@during_password_change
async def logout(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    session = request[SESSION_KEY]
    await svc.auth.end_session(session, request.remote or "?", on_end=stations.sign_off(session))
    svc.hub.end_sessions([session.id_hash], "signed out")
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
    form = await read_form(request)
    try:
        token = await svc.auth.change_password(
            session,
            str(form.get("current", "")),
            str(form.get("new", "")),
            str(form.get("confirm", "")),
            remote=request.remote or "?",
        )
    except AuthError as e:
        throttled = e.key == "login.throttled"
        resp = render(
            request,
            "password.html",
            status=429 if throttled else 400,
            error=e.key,
            error_kw={k: v for k, v in e.kw.items() if k != "retry_after"},
            forced=session.user.must_change,
        )
        if throttled:
            resp.headers["Retry-After"] = str(e.kw["retry_after"])
        return resp
    svc.hub.end_user(session.user.name, "password changed")  # every other session of the user has ended
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
    resp.set_cookie(
        LANG_COOKIE, code, max_age=365 * 86400, samesite="Lax", path="/", secure=request.app[SERVICES].cfg.cookie_secure
    )
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
        {
            "key": f"{g['site']}/{g['gateway']}",
            "name": g["name"] or f"{g['site']}/{g['gateway']}",
            "status": g["status"] if g["status"] != "unknown" or g.get("events_stored") else "never",
        }
        for g in svc.ingest.health()["gateways"]
        if sites is None or g["site"] in sites
    ]
    return render(
        request,
        "console.html",
        events=events,
        gateways=gateways,
        changed=request.query.get("changed") == "1",
        max_rows=CONSOLE_ROWS,
    )


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

    return await svc.hub.serve(
        request,
        render=render_msg,
        label=user.name,
        backlog=backlog,
        hello={"kind": "hello", "user": user.name},
        wants=wants,
        session=request[SESSION_KEY].id_hash,
    )
