"""The guard's alarm board: the running part (feeding incidents, escalation, arm/disarm) and its pages and API.

:class:`AlarmBoard` folds every stored event into the incident model (:mod:`portal.alarms.incidents`) through a cursor:
a commit that stored new events wakes it, and a timer looks for events the portal stored by other paths. It
pushes each incident, arm-state and command change to every console over the WebSocket (``/ws``) as
``{"kind": "incident" | "group" | "arm_command", ...}`` — the consoles render them, so one guard's action
shows on every other console at once.

Escalation runs on the monotonic clock: an incident is timed from when this process first saw it
unacknowledged (at start-up, from its age by the wall clock, read once), and the timer marks those past
``alarms.escalate_after_s``.

Routes (guards and admins): ``GET /board``, ``GET /board/map``, ``GET /board/alarm.wav``, ``GET /api/board``,
``GET /api/incidents/{id}``, ``POST /api/incidents/{id}/{action}`` (ack, dispatch, on_scene, note, check,
resolve, close; JSON body, CSRF header), ``POST /api/board/arm``. Reports live in :mod:`portal.alarms.reports`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiohttp import web
from ulid import ULID

from gateway import wire
from portal.alarms import incidents as alarms
from portal.alarms import notify
from portal.alarms.notify import Notifier
from portal.estate.plans import plans_of
from portal.estate.sitemap import map_state, render_svg
from portal.store import BatchResult, Op, StoreError, ts_text
from portal.web import i18n
from portal.web.auth import SESSION_KEY, roles
from portal.web.bodies import bad_request, read_form, read_json
from portal.web.ingest import BrokerUnavailable
from portal.web.scope import need, sees, sites_of
from portal.web.services import SERVICES, Services
from portal.web.views import render, translator

log = logging.getLogger("portal.board")
routes = web.RouteTableDef()
GUARD_ROLES = ("admin", "guard")
CLOSED_SHOWN = 20
UPTO_MAX = 10**12 - 1  # incident ids are SQLite row ids; the API's ids have at most 12 digits
COMMANDS_SHOWN = 20
#: The timer moves the feed's cursor past routine events every this many ticks (it feeds at once what it acts on)
CURSOR_EVERY = 10
I18N_PREFIXES = (
    "board.",
    "state.",
    "kind.",
    "cause.",
    "prio.",
    "conn.",
    "arm.",
    "map.",
    "role.",
    "place.",
    "flag.",
    "grid.status.",
    "punct.",
    "actor.",
)


def _now_text(wall: Callable[[], float]) -> str:
    return ts_text(datetime.fromtimestamp(wall(), UTC))


class AlarmBoard:
    def __init__(
        self, svc: Services, *, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic
    ) -> None:
        self.svc = svc
        self.cfg = svc.cfg.alarms
        self.wall = wall
        self.mono = mono
        # unacknowledged, unescalated incidents: (monotonic time first seen, seconds until it escalates)
        self._seen: dict[int, tuple[float, float]] = {}
        self.notifier = Notifier(svc.cfg, svc.store, self.changed, wall=wall)
        self._wake = asyncio.Event()
        self._cursor = 0
        self._ticks = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.feeds = 0
        #: run inside the transaction of every incident change (see alarms.IncidentHook); the grid link adds one
        self.hooks: list[alarms.IncidentHook] = []

    # -- lifecycle

    async def start(self) -> None:
        rows = await self.svc.store.read(alarms.open_incidents)
        now_wall, now_mono = self.wall(), self.mono()
        for inc in rows:
            if inc["state"] == "new" and not inc["escalated_at"]:
                age = max(0.0, now_wall - alarms.parse_ts(inc["created_at"]).timestamp())
                self._seen[inc["id"]] = (now_mono - age, self.cfg.escalate_after(inc["priority"]))
        await self.notifier.start()
        self.svc.store.add_commit_listener(self.on_commit, local_only=True)  # peers: the timer folds theirs
        self._loops = [
            asyncio.create_task(self._feed_loop(), name="portal.board.feed"),
            asyncio.create_task(self._timer(), name="portal.board.timer"),
        ]
        self._wake.set()  # catch up with whatever was stored while the portal was away

    async def close(self) -> None:
        tasks = [*self._loops, *self._tasks]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.notifier.close()

    def changed(self, inc: dict[str, Any]) -> None:
        """An incident changed outside the board's own actions (a notice delivered, a care check answered): its
        escalation timer follows, and every console is told."""
        self._track(inc)
        self.svc.hub.broadcast({"kind": "incident", "incident": inc})

    def follow(self, inc: dict[str, Any]) -> None:
        """An incident another instance changed (portal.centre.peers): its escalation timer follows here too, so
        it escalates even if that instance is gone (escalating is idempotent in the store)."""
        self._track(inc)

    def checklist(self, kind: str, lang: str) -> list[str]:
        return self.cfg.checklist(kind, lang)

    def steps_of(self, kind: str) -> int:
        return len(self.cfg.checklist(kind, "zh-CN"))

    def must_check(self, kind: str) -> bool:
        return kind in self.cfg.checklist_required and self.steps_of(kind) > 0

    # -- feeding

    def on_commit(self, committed: list[tuple[Op, Any]]) -> None:
        """Fold at once what the board shows (alarms, arm states, command answers); routine events only move the
        feed's cursor, which the timer does within a second (each feed is a transaction under the store's whole
        lock: one per commit of routine traffic would hold every other instance's batches back)."""
        if any(isinstance(res, BatchResult) and any(_feeds_now(e) for e in res.new_events) for _op, res in committed):
            self._wake.set()

    async def feed_now(self) -> alarms.FeedResult:
        """Fold in everything stored so far (the feed task does this on its own; tests call it to wait)."""
        res: alarms.FeedResult = await self.svc.store.write(
            alarms.FeedIncidents(now=_now_text(self.wall), hooks=self.hooks)
        )
        self._cursor = max(self._cursor, res.last_pk)
        self.feeds += 1
        self._publish(res)
        if res.more:
            self._wake.set()
        return res

    async def _feed_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.feed_now()
            except StoreError as e:
                log.warning("incident feed failed: %s; retrying", e)
                await asyncio.sleep(1.0)
                self._wake.set()
            except Exception:
                log.exception("incident feed failed; retrying")
                await asyncio.sleep(1.0)
                self._wake.set()

    def _publish(self, res: alarms.FeedResult) -> None:
        hub = self.svc.hub
        for inc in res.incidents:
            self._track(inc)
            hub.broadcast({"kind": "incident", "incident": inc})
        for g in res.groups:
            hub.broadcast({"kind": "group", "group": g})
        for c in res.commands:
            hub.broadcast({"kind": "arm_command", "command": c})
        for inc in res.incidents:
            if inc["id"] in res.new_ids:
                log.warning("alarm: incident %d %s (%s) at %s", inc["id"], inc["type"], inc["kind"], inc["where"]["en"])

    def _track(self, inc: dict[str, Any]) -> None:
        if inc["state"] == "new" and not inc["escalated_at"]:
            after = self.cfg.escalate_after(inc["priority"])
            seen, _ = self._seen.get(inc["id"], (self.mono(), after))
            self._seen[inc["id"]] = (seen, after)  # a trip of higher priority folded in escalates it sooner
        else:
            self._seen.pop(inc["id"], None)

    async def _timer(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.check_every_s)
            try:
                await self.check_escalations()
                # events the portal stored by itself (residents' help calls), and other instances' (if their feed
                # did not fold them); past routine events the cursor moves only now and then: a feed takes the
                # store's whole lock, which holds back every instance's batches, one a second on each instance
                # was most of what kept several instances from storing side by side
                self._ticks += 1
                if await self.svc.store.read(alarms.feed_pending) or (
                    self._ticks % CURSOR_EVERY == 0 and await self.svc.store.read(alarms.max_event_pk) > self._cursor
                ):
                    self._wake.set()
            except StoreError as e:
                log.warning("board timer: %s", e)
            except Exception:
                log.exception("board timer failed")

    async def check_escalations(self) -> list[dict[str, Any]]:
        """Escalate what has waited too long unacknowledged (monotonic clock); returns what was escalated."""
        now = self.mono()
        due = [iid for iid, (seen, after) in self._seen.items() if now - seen >= after]
        if not due:
            return []
        out: list[dict[str, Any]] = await self.svc.store.write(alarms.Escalate(due, _now_text(self.wall), self.hooks))
        for iid in due:
            self._seen.pop(iid, None)
        for inc in out:
            log.warning(
                "incident %d escalated: unacknowledged for %.0f s", inc["id"], self.cfg.escalate_after(inc["priority"])
            )
            self.svc.hub.broadcast({"kind": "incident", "incident": inc})
        if out:
            await self.notifier.escalated(out)
        return out

    def waiting(self) -> dict[int, float]:
        """Unacknowledged incidents and how long (monotonic seconds) each has waited."""
        now = self.mono()
        return {iid: now - seen for iid, (seen, _) in self._seen.items()}

    # -- actions

    async def act(self, incident_id: int, action: str, user: str, **kw: Any) -> dict[str, Any]:
        inc: dict[str, Any] = await self.svc.store.write(
            alarms.IncidentAction(
                incident_id,
                action,
                user,
                self.hooks,
                now=_now_text(self.wall),
                steps_of=self.steps_of,
                must_check=self.must_check,
                **kw,
            )
        )
        self._track(inc)
        self.svc.hub.broadcast({"kind": "incident", "incident": inc})
        if action == "ack":
            self._acked(inc, user)
        elif inc["state"] == "closed" and not inc["restored_at"]:
            self._closed(inc, user)
        return inc

    async def ack_many(self, user: str, *, sites: Any, **kw: Any) -> list[dict[str, Any]]:
        """Acknowledge every unacknowledged incident of one kind or zone in one transaction (see alarms.ack_many)."""
        out: list[dict[str, Any]] = await self.svc.store.write(
            alarms.AckMany(user, self.hooks, sites=sites, now=_now_text(self.wall), **kw)
        )
        for inc in out:
            self._track(inc)
            self.svc.hub.broadcast({"kind": "incident", "incident": inc})
            self._acked(inc, user)
        return out

    def _acked(self, inc: dict[str, Any], user: str) -> None:
        if inc["engine_incident"] and self.svc.cfg.known(inc["site"], inc["gateway"]):
            self._spawn(self._gateway_say("ack", inc, user), f"portal.board.ack[{inc['id']}]")

    def _closed(self, inc: dict[str, Any], user: str) -> None:
        """Closed on the board while the gateway's incident is open (no restore came: a Contact ID panel that
        reports none, a zone still in alarm): the gateway is told to clear it, or it would hold it open and count the
        alarm's next activations into it, unheard."""
        if inc["engine_incident"] and self.svc.cfg.known(inc["site"], inc["gateway"]):
            self._spawn(self._gateway_say("clear", inc, user), f"portal.board.clear[{inc['id']}]")

    def _spawn(self, coro: Any, name: str) -> None:
        t = asyncio.create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _command(self, type_: str, args: dict[str, Any], by: str) -> wire.Command:
        now = datetime.fromtimestamp(self.wall(), UTC)
        return wire.Command(
            v=wire.COMMAND_VERSION,
            id=str(ULID()),
            type=type_,
            ts=now,
            expires=now + timedelta(seconds=self.cfg.command_life_s),
            by=by,
            args=args,
        )

    async def _gateway_say(self, what: str, inc: dict[str, Any], user: str) -> None:
        """Tell the gateway the alarm is taken (``ack``: it stops sending repeats) or closed (``clear``: it closes its
        incident); best effort: a gateway that misses a clear still reports the alarm's next activation, see
        gateway.alarms.ACKED_REPORT_MS, and the board opens a new incident for it (alarms.apply_event)."""
        cmd = self._command(what, {"incident": inc["engine_incident"]}, user)
        try:
            await self.svc.ingest.send_command(inc["site"], inc["gateway"], cmd)
        except (BrokerUnavailable, ValueError, wire.WireError) as e:
            log.info("%s of incident %d not sent to %s/%s: %s", what, inc["id"], inc["site"], inc["gateway"], e)

    async def arm(
        self, site: str, gateway: str, group: str, action: str, user: str, *, mode: str = "away", force: bool = False
    ) -> dict[str, Any]:
        """Send ``arm``/``disarm`` for one zone group; the row is the audit (who, when, what) and its answer."""
        args: dict[str, Any] = {"group": group}
        if action == "arm":
            args.update(mode=mode, force=force)
        cmd = self._command(action, args, user)
        rec: dict[str, Any] = await self.svc.store.run_write(lambda c: alarms.record_command(c, cmd, site, gateway))
        self.svc.hub.broadcast({"kind": "arm_command", "command": rec})
        sent, detail = True, ""
        try:
            await self.svc.ingest.send_command(site, gateway, cmd)
        except (BrokerUnavailable, ValueError, wire.WireError) as e:
            sent, detail = False, str(e)
        log.info(
            "%s %s of %s/%s group %s by %s",
            action,
            "sent" if sent else f"not sent ({detail})",
            site,
            gateway,
            group,
            user,
        )
        after = await self.svc.store.run_write(lambda c: alarms.command_sent(c, cmd.id, sent, detail))
        self.svc.hub.broadcast({"kind": "arm_command", "command": after})
        return after or rec


def _feeds_now(e: dict[str, Any]) -> bool:
    etype = str(e.get("type", ""))
    return etype.startswith("group.") or etype == "command.result" or alarms.is_alarm(e)


BOARD = web.AppKey("portal.board", AlarmBoard)

#: A section another package adds to an incident's detail (``GET /api/incidents/{id}``): called with the request
#: and the incident, it returns ``{"key", "title", "rows": [[label, value], ...], "reveal": {"url", "label"} | None}``
#: or None. ``reveal``: a POST (JSON ``{"reason"}``) answering ``{"rows": [...]}`` with numbers to call (audited).
Section = Callable[[web.Request, dict[str, Any]], Awaitable[dict[str, Any] | None]]
DETAIL_SECTIONS = web.AppKey("portal.board.sections", list[Section])


@dataclass(frozen=True, slots=True)
class Marker:
    """A point another package draws on a site's map (a patrol checkpoint): ``key`` names it in incidents'
    ``data.markers``, so the map marks it while such an incident is open."""

    key: str
    label: str
    x: float
    y: float
    kind: str = "marker"


#: Markers of a site's map, from another package (called with the site's id).
MarkerSource = Callable[[str], list[Marker]]
MAP_MARKERS = web.AppKey("portal.board.markers", list[MarkerSource])


def setup(
    app: web.Application, *, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic
) -> None:
    """Add the board and report routes and the board's start/stop (after the portal's own start)."""
    from portal.alarms import reports

    app.router.add_routes(routes)
    app.router.add_routes(reports.routes)
    app[DETAIL_SECTIONS] = []
    app[MAP_MARKERS] = []

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        b = AlarmBoard(app[SERVICES], wall=wall, mono=mono)
        await b.start()
        app[BOARD] = b
        try:
            yield
        finally:
            await b.close()

    app.cleanup_ctx.append(ctx)


# ---------------------------------------------------------------- helpers for the views


def _board(request: web.Request) -> AlarmBoard:
    return request.app[BOARD]


def _user(request: web.Request) -> str:
    return str(request[SESSION_KEY].user.name)


def _site_date(svc: Services, wall: Callable[[], float]) -> date:
    return datetime.fromtimestamp(wall(), svc.tz).date()


def door_states(app: web.Application) -> dict[str, dict[str, str]]:
    """site → door → live state, from the door module when it is there (read defensively)."""
    try:
        from portal.doors import doors  # the door pages are another module's; the map only reads their states

        items = doors.door_states(app)
    except Exception:
        return {}
    out: dict[str, dict[str, str]] = {}
    for d in items if isinstance(items, list) else []:
        if isinstance(d, dict) and isinstance(d.get("site"), str) and isinstance(d.get("door"), str):
            out.setdefault(d["site"], {})[d["door"]] = str(d.get("state") or "")
    return out


def site_map_svgs(request: web.Request, incidents: list[dict[str, Any]], only: str | None = None) -> list[Any]:
    """The site maps (drawn on the web, else the config's) of the sites this user sees."""
    tr = translator(request)
    live = door_states(request.app)
    return [
        render_svg(m, tr, map_state(incidents, m.site), live.get(m.site), markers(request.app, m.site), image=image)
        for m, image in plans_of(request.app).maps()
        if (only is None or m.site == only) and sees(request, m.site)
    ]


def markers(app: web.Application, site: str) -> list[Marker]:
    """The markers other packages draw on ``site``'s map."""
    return [mk for source in app.get(MAP_MARKERS, []) for mk in source(site)]


def page_config(request: web.Request) -> dict[str, Any]:
    """What the board's script needs: texts in the page's language, checklists, the user, the groups."""
    svc = request.app[SERVICES]
    tr = translator(request)
    table = i18n.table(tr.lang)
    texts = {k: tr(k) for k in i18n.table(i18n.DEFAULT) if k.startswith(I18N_PREFIXES)}
    texts.update({k: v for k, v in table.items() if k.startswith(I18N_PREFIXES)})
    b = _board(request)
    user = request[SESSION_KEY].user
    return {
        "lang": tr.lang,
        "tz": svc.cfg.timezone,
        "user": user.name,
        "role": user.role,
        "t": texts,
        "checklists": {k: b.checklist(k, tr.lang) for k in alarms.KINDS},
        "causes": list(alarms.CAUSES),
        "flags": list(alarms.FLAGS),
        "guards": list(svc.cfg.alarms.guards),
        "groups": [
            {"site": g.site, "gateway": g.gateway, "group": g.group, "label": g.label}
            for g in svc.cfg.alarms.groups
            if sees(request, g.site)
        ],
        "escalate_after_s": svc.cfg.alarms.escalate_after_s,
        "gateway_names": {g.gateway: g.name for g in svc.cfg.gateways if g.name and sees(request, g.site)},
        "channels": {c.name: c.shown for c in svc.cfg.notify.channels},
        "required": [k for k in alarms.KINDS if b.must_check(k)],
    }


def script_json(value: Any) -> str:
    """JSON to put inside a <script type="application/json"> element: no "<" that could end it early."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")


def _conflict(e: alarms.IncidentConflict) -> web.Response:
    inc = e.incident
    return web.json_response(
        {"error": "conflict", "state": inc["state"], "owner": inc["owner"], "incident": inc, "winner": e.winner},
        status=409,
    )


# ---------------------------------------------------------------- pages


def _one_site(request: web.Request) -> Any:
    """The sites a board request covers: ``?site=`` (one estate, the centre's drill-down; 404 outside the user's
    sites) or all the user's."""
    site = request.query.get("site") or None
    if site is None:
        return sites_of(request)
    need(request, site)
    return (site,)


@routes.get("/board")
@roles(*GUARD_ROLES)
async def board_page(request: web.Request) -> web.StreamResponse:
    sites = _one_site(request)
    site = request.query.get("site") or None
    incidents = await request.app[SERVICES].store.read(lambda c: alarms.open_incidents(c, sites=sites))
    return render(
        request,
        "board.html",
        maps=site_map_svgs(request, incidents, site),
        config=script_json({**page_config(request), "site": site}),
        only_site=site,
    )


@routes.get("/board/map")
@roles(*GUARD_ROLES)
async def map_page(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    site = request.query.get("site") or None
    sites = sites_of(request)
    incidents = await svc.store.read(lambda c: alarms.open_incidents(c, sites=sites))
    maps = site_map_svgs(request, incidents, site)
    if site is not None and not maps:
        raise web.HTTPNotFound()
    return render(request, "board_map.html", maps=maps, config=script_json(page_config(request)))


@routes.get("/sound")
@roles(*GUARD_ROLES)
async def sound_page(request: web.Request) -> web.StreamResponse:
    """The guardroom's sound check: plays the siren on demand and says whether this browser may ring unattended."""
    return render(request, "sound.html")


@routes.get("/board/notifications")
@roles(*GUARD_ROLES)
async def notifications_page(request: web.Request) -> web.StreamResponse:
    """The supervisor's view: what was sent to whom about which incident, and whether it arrived."""
    svc = request.app[SERVICES]
    sites = sites_of(request)
    rows = await svc.store.read(lambda c: notify.recent(c, sites=sites))
    tr = translator(request)
    for r in rows:
        if r["incident_id"] is not None:
            r["title"] = tr.event_label(r["type"])
    return render(
        request,
        "notifications.html",
        rows=rows,
        channels=svc.cfg.notify.channels,
        can_test=request[SESSION_KEY].user.role == "admin" and sites is None,
    )


@routes.post("/board/notifications/test")
@roles("admin")
async def notification_test(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    name = str(form.get("channel", ""))
    b = _board(request)
    if name not in b.notifier.channels or sites_of(request) is not None:
        raise web.HTTPNotFound()
    u = request[SESSION_KEY].user
    await b.notifier.test(name, f"{u.role}:{u.name}")
    raise web.HTTPSeeOther("/board/notifications")


# ---------------------------------------------------------------- API


@routes.get("/api/board")
@roles(*GUARD_ROLES)
async def board_json(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    sites = _one_site(request)

    def load(c: Any) -> dict[str, Any]:
        return {
            "incidents": alarms.open_incidents(c, sites=sites),
            "closed": alarms.recent_closed(c, CLOSED_SHOWN, sites=sites),
            "groups": alarms.arm_groups(c, sites=sites),
            "commands": alarms.recent_commands(c, COMMANDS_SHOWN, sites=sites),
        }

    body = await svc.store.read(load)
    shown = {inc["id"] for inc in body["incidents"]}
    body["waiting_s"] = {str(k): round(v, 1) for k, v in _board(request).waiting().items() if k in shown}
    return web.json_response(body, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def _incident_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:  # "¹" is a digit to str.isdigit, not to int()
        raise web.HTTPNotFound()
    return int(raw)


@routes.get("/api/incidents/{id}")
@roles(*GUARD_ROLES)
async def incident_detail(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    iid = _incident_id(request)
    tr = translator(request)
    today = _site_date(svc, _board(request).wall)

    def load(c: Any) -> dict[str, Any] | None:
        inc = alarms.get_incident(c, iid)
        if inc is None or not sees(request, inc["site"]):  # another site's: as if there were none
            return None
        residents = alarms.residents_of(c, inc["place"], today)
        return {"incident": inc, "log": alarms.incident_log(c, iid), "residents": residents}

    body = await svc.store.read(load)
    if body is None:
        raise web.HTTPNotFound()
    inc = body["incident"]
    body["checklist"] = _board(request).checklist(inc["kind"], tr.lang)
    body["address"] = _address(svc, inc, tr)
    body["sections"] = [s for s in [await f(request, inc) for f in request.app.get(DETAIL_SECTIONS, [])] if s]
    if body["residents"]:  # note in the audit trail that a flat's residents were shown
        user = request[SESSION_KEY].user
        actor = f"{user.role}:{user.name}"
        await svc.store.run_write(lambda c: alarms.audit_view(c, actor, iid, request.remote or ""))
    return web.json_response(body, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def _address(svc: Services, inc: dict[str, Any], tr: i18n.Translator) -> str:
    place = inc["place"]
    parts = [tr(f"place.{k}", v=place[k]) for k in ("building", "unit", "house") if place.get(k)]
    if not parts:
        return str(inc["where"].get(tr.lang, ""))
    return f"{svc.cfg.site_name} " + " ".join(parts)


@routes.post("/api/incidents/{id}/phones")
@roles(*GUARD_ROLES)
async def reveal_phones(request: web.Request) -> web.StreamResponse:
    """The flat's residents' whole numbers, for the guard handling the incident to call (audited with a reason)."""
    svc = request.app[SERVICES]
    iid = _incident_id(request)
    data = await read_json(request)
    reason = data.get("reason", "")
    if not isinstance(reason, str):
        raise bad_request("reason must be a string")
    found = await svc.store.read(lambda c: alarms.get_incident(c, iid))
    if found is None or not sees(request, found["site"]):
        raise web.HTTPNotFound()
    user = request[SESSION_KEY].user
    today = _site_date(svc, _board(request).wall)
    try:
        people = await svc.store.run_write(
            lambda c: alarms.reveal_phones(
                c, iid, f"{user.role}:{user.name}", reason, today, request.remote or "", _now_text(_board(request).wall)
            )
        )
    except alarms.IncidentError as e:
        return web.json_response(
            {"error": "bad-request", "detail": e.key, "message": translator(request)(e.key)}, status=400
        )
    except LookupError:
        raise web.HTTPNotFound() from None
    return web.json_response({"residents": people}, dumps=lambda o: json.dumps(o, ensure_ascii=False))


@routes.post("/api/board/ack")
@roles(*GUARD_ROLES)
async def ack_many(request: web.Request) -> web.StreamResponse:
    """Acknowledge all unacknowledged incidents of one kind or one zone (``upto``: the newest id the guard saw)."""
    data = await read_json(request)
    kind, zone, upto = data.get("kind"), data.get("zone"), data.get("upto")
    if not isinstance(upto, int) or isinstance(upto, bool) or not 0 <= upto <= UPTO_MAX:
        raise bad_request("upto (the newest incident id seen) is an integer")
    if kind is not None and kind not in alarms.KINDS:
        raise bad_request("kind is one of " + ", ".join(alarms.KINDS))
    if zone is not None and (not isinstance(zone, str) or not 1 <= len(zone) <= 200):
        raise bad_request("zone is a string")
    if (kind is None) == (zone is None):
        raise bad_request("give kind or zone")
    site = data.get("site")
    if site is not None and (not isinstance(site, str) or not 1 <= len(site) <= 64):
        raise bad_request("site is a string")
    if site is not None:
        need(request, site)  # one estate's board (the centre's drill-down): that estate's alarms only
    sites = (site,) if site is not None else sites_of(request)
    out = await _board(request).ack_many(_user(request), sites=sites, kind=kind, zone=zone, upto=upto)
    return web.json_response({"incidents": out}, dumps=lambda o: json.dumps(o, ensure_ascii=False))


@routes.post("/api/incidents/{id}/{action}")
@roles(*GUARD_ROLES)
async def incident_action(request: web.Request) -> web.StreamResponse:
    iid = _incident_id(request)
    action = request.match_info["action"]
    if action not in alarms.ACTIONS:
        raise web.HTTPNotFound()
    data = await read_json(request) if request.can_read_body else {}
    kw: dict[str, Any] = {}
    for name in ("guard", "cause", "text"):
        v = data.get(name, "")
        if not isinstance(v, str):
            raise bad_request(f"{name} must be a string")
        kw[name] = v
    if action in ("resolve", "finish"):
        flags = data.get("flags", [])
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise bad_request("flags must be a list of strings")
        kw["flags"] = flags
    if action == "dispatch" and "seen_guard" in data:
        seen = data["seen_guard"]
        if not isinstance(seen, str):
            raise bad_request("seen_guard must be a string")
        kw["seen_guard"] = seen
    if action == "check":
        step, done = data.get("step"), data.get("done", True)
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(done, bool):
            raise bad_request("check needs step (an integer) and done (true or false)")
        kw.update(step=step, done=done)
    found = await request.app[SERVICES].store.read(lambda c: alarms.get_incident(c, iid))
    if found is None or not sees(request, found["site"]):  # an incident's site never changes
        raise web.HTTPNotFound()
    try:
        inc = await _board(request).act(iid, action, _user(request), **kw)
    except LookupError:
        raise web.HTTPNotFound() from None
    except alarms.IncidentConflict as e:
        return _conflict(e)
    except alarms.IncidentError as e:
        return web.json_response(
            {"error": "bad-request", "detail": e.key, "message": translator(request)(e.key)}, status=400
        )
    return web.json_response({"incident": inc}, dumps=lambda o: json.dumps(o, ensure_ascii=False))


@routes.post("/api/board/arm")
@roles(*GUARD_ROLES)
async def arm_group(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    data = await read_json(request)
    site, gateway, group = data.get("site"), data.get("gateway"), data.get("group")
    action, mode, force = data.get("action"), data.get("mode", "away"), data.get("force", False)
    if not all(isinstance(x, str) and wire.NAME_RE.match(x) for x in (site, gateway, group)):
        raise bad_request("site, gateway and group are names")
    if action not in ("arm", "disarm") or mode not in ("away", "stay") or not isinstance(force, bool):
        raise bad_request("action is arm or disarm; mode away or stay; force true or false")
    assert isinstance(site, str) and isinstance(gateway, str) and isinstance(group, str)
    need(request, site)
    if not svc.cfg.known(site, gateway):
        raise bad_request(f"unknown gateway {site}/{gateway}")
    rec = await _board(request).arm(site, gateway, group, str(action), _user(request), mode=str(mode), force=force)
    return web.json_response(
        {"command": rec},
        status=202 if rec["status"] in ("sent", "ok") else 503,
        dumps=lambda o: json.dumps(o, ensure_ascii=False),
    )
