"""The guard's alarm board: the running part (feeding incidents, escalation, arm/disarm) and its pages and API.

:class:`AlarmBoard` folds every stored event into the incident model (:mod:`portal.alarms`) through a cursor:
a commit that stored new events wakes it, and a timer looks for events the portal stored by other paths. It
pushes each incident, arm-state and command change to every console over the WebSocket (``/ws``) as
``{"kind": "incident" | "group" | "arm_command", ...}`` — the consoles render them, so one guard's action
shows on every other console at once.

Escalation runs on the monotonic clock: an incident is timed from when this process first saw it
unacknowledged (at start-up, from its age by the wall clock, read once), and the timer marks those past
``alarms.escalate_after_s``.

Routes (guards and admins): ``GET /board``, ``GET /board/map``, ``GET /board/alarm.wav``, ``GET /api/board``,
``GET /api/incidents/{id}``, ``POST /api/incidents/{id}/{action}`` (ack, dispatch, on_scene, note, check,
resolve, close; JSON body, CSRF header), ``POST /api/board/arm``. Reports live in :mod:`portal.reports`.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import io
import json
import logging
import math
import time
import wave
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any

from aiohttp import web
from ulid import ULID

from gateway import wire
from portal import alarms, i18n
from portal.api import bad_request, read_json
from portal.auth import SESSION_KEY, roles
from portal.ingest import BrokerUnavailable
from portal.scope import need, sees, sites_of
from portal.services import SERVICES, Services
from portal.sitemap import map_state, render_svg
from portal.store import BatchResult, Op, StoreError, ts_text
from portal.views import render, translator

log = logging.getLogger("portal.board")
routes = web.RouteTableDef()
GUARD_ROLES = ("admin", "guard")
CLOSED_SHOWN = 20
COMMANDS_SHOWN = 20
I18N_PREFIXES = ("board.", "state.", "kind.", "cause.", "prio.", "conn.", "arm.", "map.", "role.", "place.")


def _now_text(wall: Callable[[], float]) -> str:
    return ts_text(datetime.fromtimestamp(wall(), UTC))


class AlarmBoard:
    def __init__(self, svc: Services, *, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.svc = svc
        self.cfg = svc.cfg.alarms
        self.wall = wall
        self.mono = mono
        self._seen: dict[int, float] = {}  # unacknowledged, unescalated incidents: monotonic time first seen
        self._wake = asyncio.Event()
        self._cursor = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.feeds = 0

    # -- lifecycle

    async def start(self) -> None:
        rows = await self.svc.store.read(alarms.open_incidents)
        now_wall, now_mono = self.wall(), self.mono()
        for inc in rows:
            if inc["state"] == "new" and not inc["escalated_at"]:
                age = max(0.0, now_wall - alarms.parse_ts(inc["created_at"]).timestamp())
                self._seen[inc["id"]] = now_mono - age
        self.svc.store.add_commit_listener(self.on_commit)
        self._loops = [asyncio.create_task(self._feed_loop(), name="portal.board.feed"),
                       asyncio.create_task(self._timer(), name="portal.board.timer")]
        self._wake.set()  # catch up with whatever was stored while the portal was away

    async def close(self) -> None:
        tasks = [*self._loops, *self._tasks]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def checklist(self, kind: str, lang: str) -> list[str]:
        return self.cfg.checklist(kind, lang)

    def steps_of(self, kind: str) -> int:
        return len(self.cfg.checklist(kind, "zh-CN"))

    # -- feeding

    def on_commit(self, committed: list[tuple[Op, Any]]) -> None:
        if any(isinstance(res, BatchResult) and res.new_events for _op, res in committed):
            self._wake.set()

    async def feed_now(self) -> alarms.FeedResult:
        """Fold in everything stored so far (the feed task does this on its own; tests call it to wait)."""
        res: alarms.FeedResult = await self.svc.store.write(alarms.FeedIncidents(now=_now_text(self.wall)))
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
                log.warning("alarm: incident %d %s (%s) at %s", inc["id"], inc["type"], inc["kind"],
                            inc["where"]["en"])

    def _track(self, inc: dict[str, Any]) -> None:
        if inc["state"] == "new" and not inc["escalated_at"]:
            self._seen.setdefault(inc["id"], self.mono())
        else:
            self._seen.pop(inc["id"], None)

    async def _timer(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.check_every_s)
            try:
                await self.check_escalations()
                if await self.svc.store.read(alarms.max_event_pk) > self._cursor:
                    self._wake.set()  # events the portal stored by itself (residents' help calls)
            except StoreError as e:
                log.warning("board timer: %s", e)
            except Exception:
                log.exception("board timer failed")

    async def check_escalations(self) -> list[dict[str, Any]]:
        """Escalate what has waited too long unacknowledged (monotonic clock); returns what was escalated."""
        now = self.mono()
        due = [iid for iid, seen in self._seen.items() if now - seen >= self.cfg.escalate_after_s]
        if not due:
            return []
        out: list[dict[str, Any]] = await self.svc.store.write(alarms.Escalate(due, _now_text(self.wall)))
        for iid in due:
            self._seen.pop(iid, None)
        for inc in out:
            log.warning("incident %d escalated: unacknowledged for %.0f s", inc["id"], self.cfg.escalate_after_s)
            self.svc.hub.broadcast({"kind": "incident", "incident": inc})
        return out

    def waiting(self) -> dict[int, float]:
        """Unacknowledged incidents and how long (monotonic seconds) each has waited."""
        now = self.mono()
        return {iid: now - seen for iid, seen in self._seen.items()}

    # -- actions

    async def act(self, incident_id: int, action: str, user: str, **kw: Any) -> dict[str, Any]:
        inc: dict[str, Any] = await self.svc.store.write(alarms.IncidentAction(
            incident_id, action, user, now=_now_text(self.wall), steps_of=self.steps_of, **kw))
        self._track(inc)
        self.svc.hub.broadcast({"kind": "incident", "incident": inc})
        if action == "ack" and inc["engine_incident"] and self.svc.cfg.known(inc["site"], inc["gateway"]):
            self._spawn(self._gateway_ack(inc, user), f"portal.board.ack[{incident_id}]")
        return inc

    def _spawn(self, coro: Any, name: str) -> None:
        t = asyncio.create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _command(self, type_: str, args: dict[str, Any], by: str) -> wire.Command:
        now = datetime.fromtimestamp(self.wall(), UTC)
        return wire.Command(v=wire.SCHEMA_VERSION, id=str(ULID()), type=type_, ts=now,
                            expires=now + timedelta(seconds=self.cfg.command_life_s), by=by, args=args)

    async def _gateway_ack(self, inc: dict[str, Any], user: str) -> None:
        """Tell the gateway the alarm is taken, so it stops sending repeats (best effort)."""
        cmd = self._command("ack", {"incident": inc["engine_incident"]}, user)
        try:
            await self.svc.ingest.send_command(inc["site"], inc["gateway"], cmd)
        except (BrokerUnavailable, ValueError, wire.WireError) as e:
            log.info("ack of incident %d not sent to %s/%s: %s", inc["id"], inc["site"], inc["gateway"], e)

    async def arm(self, site: str, gateway: str, group: str, action: str, user: str, *, mode: str = "away",
                  force: bool = False) -> dict[str, Any]:
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
        log.info("%s %s of %s/%s group %s by %s", action, "sent" if sent else f"not sent ({detail})", site,
                 gateway, group, user)
        after = await self.svc.store.run_write(lambda c: alarms.command_sent(c, cmd.id, sent, detail))
        self.svc.hub.broadcast({"kind": "arm_command", "command": after})
        return after or rec


BOARD = web.AppKey("portal.board", AlarmBoard)


def setup(app: web.Application, *, wall: Callable[[], float] = time.time,
          mono: Callable[[], float] = time.monotonic) -> None:
    """Add the board and report routes and the board's start/stop (after the portal's own start)."""
    from portal import reports

    app.router.add_routes(routes)
    app.router.add_routes(reports.routes)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        b = AlarmBoard(app[SERVICES], wall=wall, mono=mono)
        await b.start()
        app[BOARD] = b
        try:
            yield
        finally:
            await b.close()

    app.cleanup_ctx.append(ctx)


# ---------------------------------------------------------------- the alarm tone


@cache
def alarm_wav(fast: bool = False) -> bytes:
    """A two-tone alarm (8 kHz, 16-bit mono), made here rather than shipped: slow, or fast for escalation."""
    rate = 8000
    pattern = ([(960, 0.16), (770, 0.16)] * 3 + [(0, 0.1)]) if fast else [(960, 0.45), (770, 0.45), (0, 0.6)]
    amp = 0.9 if fast else 0.6
    samples = array.array("h")
    for freq, secs in pattern:
        n = int(rate * secs)
        fade = min(80, n // 4)
        for i in range(n):
            env = min(1.0, i / fade, (n - i) / fade) if fade else 1.0
            v = math.sin(2 * math.pi * freq * i / rate) if freq else 0.0
            samples.append(int(32767 * amp * env * v))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


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
        from portal import doors  # the door pages are another module's; the map only reads their states
        items = doors.door_states(app)
    except Exception:
        return {}
    out: dict[str, dict[str, str]] = {}
    for d in items if isinstance(items, list) else []:
        if isinstance(d, dict) and isinstance(d.get("site"), str) and isinstance(d.get("door"), str):
            out.setdefault(d["site"], {})[d["door"]] = str(d.get("state") or "")
    return out


def site_map_svgs(request: web.Request, incidents: list[dict[str, Any]], only: str | None = None) -> list[Any]:
    svc = request.app[SERVICES]
    tr = translator(request)
    live = door_states(request.app)
    return [render_svg(m, tr, map_state(incidents, m.site), live.get(m.site))
            for m in svc.cfg.site_maps if (only is None or m.site == only) and sees(request, m.site)]


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
        "lang": tr.lang, "tz": svc.cfg.timezone, "user": user.name, "role": user.role, "t": texts,
        "checklists": {k: b.checklist(k, tr.lang) for k in alarms.KINDS},
        "causes": list(alarms.CAUSES), "guards": list(svc.cfg.alarms.guards),
        "groups": [{"site": g.site, "gateway": g.gateway, "group": g.group, "label": g.label}
                   for g in svc.cfg.alarms.groups if sees(request, g.site)],
        "escalate_after_s": svc.cfg.alarms.escalate_after_s,
        "sounds": {"normal": "/board/alarm.wav", "fast": "/board/alarm.wav?fast=1"},
    }


def script_json(value: Any) -> str:
    """JSON to put inside a <script type="application/json"> element: no "<" that could end it early."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")


def _conflict(e: alarms.IncidentConflict) -> web.Response:
    inc = e.incident
    return web.json_response({"error": "conflict", "state": inc["state"], "owner": inc["owner"],
                              "incident": inc}, status=409)


# ---------------------------------------------------------------- pages


@routes.get("/board")
@roles(*GUARD_ROLES)
async def board_page(request: web.Request) -> web.StreamResponse:
    sites = sites_of(request)
    incidents = await request.app[SERVICES].store.read(lambda c: alarms.open_incidents(c, sites=sites))
    return render(request, "board.html", maps=site_map_svgs(request, incidents),
                  config=script_json(page_config(request)))


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


@routes.get("/board/alarm.wav")
@roles(*GUARD_ROLES)
async def alarm_sound(request: web.Request) -> web.StreamResponse:
    return web.Response(body=alarm_wav(request.query.get("fast") == "1"), content_type="audio/wav",
                        headers={"Cache-Control": "private, max-age=86400"})


# ---------------------------------------------------------------- API


@routes.get("/api/board")
@roles(*GUARD_ROLES)
async def board_json(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    sites = sites_of(request)

    def load(c: Any) -> dict[str, Any]:
        return {"incidents": alarms.open_incidents(c, sites=sites),
                "closed": alarms.recent_closed(c, CLOSED_SHOWN, sites=sites),
                "groups": alarms.arm_groups(c, sites=sites),
                "commands": alarms.recent_commands(c, COMMANDS_SHOWN, sites=sites)}

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
        return web.json_response({"error": "bad-request", "detail": e.key,
                                  "message": translator(request)(e.key)}, status=400)
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
    return web.json_response({"command": rec}, status=202 if rec["status"] in ("sent", "ok") else 503,
                             dumps=lambda o: json.dumps(o, ensure_ascii=False))
