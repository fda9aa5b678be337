"""Doors at the console: the live door list, remote unlock with a reason, and the door states the site map reads.

Where the state comes from: every ``door.state``, ``door.tamper``/``_restore``, ``reader.offline``/``online``
and access decision a gateway sends. SQLite triggers on ``events`` (migration "doors" in
:mod:`portal.store`) keep ``door_states`` and ``access_log`` in the same transaction as the event, so a
restart loses nothing; :class:`DoorBoard` keeps the same picture in memory, applies each committed event
with the same rule (newest event time wins, so a late re-send never rolls a door back), and pushes every
change to the consoles over the WebSocket as ``{"kind": "door", "door": {...}}``.

Doors are the registry's (``reg_doors``: label, building/unit or site gate, gateway) merged with every door
seen in events; a door seen but not registered is listed too, marked so.

Remote unlock: ``POST /api/doors/{site}/{door}/unlock`` with ``{"reason": "..."}`` (refused without one)
writes the order and an audit row, then sends a ``wire.Command`` ``unlock {door, reason}`` that expires
when the wait for its answer ends. The gateway's ``command.result`` (matched by command id, by a trigger
as well, so a late answer still lands) turns it from *pending* into *opened* or *failed*; no answer within
``doors.unlock_wait_s`` is *timeout*; a broker that is down makes it *unsent*. Each change goes out as
``{"kind": "unlock", "command": {...}}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from ulid import ULID

from gateway import wire
from portal.store import BatchResult, Conn, FnOp, Op, Row, StatusResult, audit, db, ts_text
from portal.web.auth import SESSION_KEY, roles
from portal.web.bodies import bad_request, read_json
from portal.web.ingest import BrokerUnavailable
from portal.web.scope import Sites, need, sees, sites_of
from portal.web.scope import sql as site_sql
from portal.web.services import SERVICES, Services
from portal.web.views import local_time, render, translator

log = logging.getLogger("portal.doors")
routes = web.RouteTableDef()

DOOR_STATES = ("closed", "open", "unlocked", "forced", "held", "offline")
#: Event types that change what the door list shows.
DOOR_EVENTS = frozenset(
    {
        "door.state",
        "door.tamper",
        "door.tamper_restore",
        "reader.offline",
        "reader.online",
        "access.granted",
        "access.denied",
    }
)
REASON_MAX = 200
RECENT_COMMANDS = 50
COMMANDS_KEPT = 500  # in memory, for answers that come late
MAX_DOORS = 5000  # doors seen in events but never registered stop being added past this


def actor_of(request: web.Request) -> str:
    u = request[SESSION_KEY].user
    return f"{u.role}:{u.name}"


@dataclass(slots=True)
class DoorView:
    site: str
    door: str
    gateway: str
    label: str = ""
    building: str | None = None
    unit: str | None = None
    gate: bool = False
    registered: bool = False
    state: str | None = None  # None: no door.state seen yet
    state_key: tuple[str, str] = ("", "")  # (ts, event id) of the state shown
    tamper: bool = False
    tamper_ts: str = ""
    reader_offline: bool = False
    reader_ts: str = ""
    access: dict[str, Any] | None = None  # the last access decision at this door
    access_key: tuple[str, str] = ("", "")

    @property
    def key(self) -> str:
        return f"{self.site}/{self.door}"

    def as_json(self, tz: Any, gateway_status: str) -> dict[str, Any]:
        access = None
        if self.access is not None:
            access = {**self.access, "ts_local": local_time(self.access["ts"], tz)}
        return {
            "key": self.key,
            "site": self.site,
            "door": self.door,
            "gateway": self.gateway,
            "label": self.label or self.door,
            "building": self.building,
            "unit": self.unit,
            "gate": self.gate,
            "registered": self.registered,
            "state": self.state or "unknown",
            "since": self.state_key[0] or None,
            "since_local": local_time(self.state_key[0], tz) if self.state_key[0] else "",
            "tamper": self.tamper,
            "reader_offline": self.reader_offline,
            "gateway_status": gateway_status,
            "last_access": access,
        }


def _access_summary(ts: str, etype: str, data: dict[str, Any]) -> dict[str, Any]:
    def s(k: str) -> str:
        v = data.get(k)
        return str(v)[:128] if v is not None else ""

    return {
        "ts": ts,
        "result": "granted" if etype == "access.granted" else "denied",
        "reason": s("reason"),
        "kind": s("kind"),
        "subject": s("subject"),
        "house": s("house"),
        "by": s("by"),
    }


@dataclass(slots=True)
class UnlockCommand:
    id: str
    site: str
    gateway: str
    door: str
    reason: str
    by: str
    sent_at: str
    status: str = "pending"
    detail: str = ""
    answered_at: str | None = None

    def as_json(self, tz: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "site": self.site,
            "gateway": self.gateway,
            "door": self.door,
            "key": f"{self.site}/{self.door}",
            "reason": self.reason,
            "by": self.by,
            "sent_at": self.sent_at,
            "sent_local": local_time(self.sent_at, tz),
            "status": self.status,
            "detail": self.detail,
            "answered_at": self.answered_at,
        }


# ---------------------------------------------------------------- reads (reader thread)


def registry_doors(conn: Conn) -> list[dict[str, Any]]:
    """The registry's doors, read defensively: a store without the registry tables has none."""
    try:
        rows = conn.execute(
            "SELECT s.code AS site, d.gateway, d.door, d.gate, d.label, b.code AS building, u.code AS unit"
            " FROM reg_doors d JOIN reg_sites s ON s.id = d.site_id LEFT JOIN reg_units u ON u.id = d.unit_id"
            " LEFT JOIN reg_buildings b ON b.id = u.building_id ORDER BY d.id"
        ).fetchall()
    except db.OperationalError:
        return []
    return [dict(r) for r in rows]


def _load_states(conn: Conn) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT d.*, a.result, a.reason, a.kind, a.subject, a.house, a.by_user FROM door_states d"
        " LEFT JOIN access_log a ON a.event_id = d.access_event"
    ).fetchall()
    return [dict(r) for r in rows]


def _load_commands(conn: Conn, limit: int, sites: Sites = None) -> list[UnlockCommand]:
    cond, args = site_sql("site", sites)
    rows = conn.execute(
        f"SELECT * FROM door_commands WHERE {cond} ORDER BY sent_at DESC, id DESC LIMIT ?", (*args, limit)
    ).fetchall()
    return [_command(r) for r in rows]


def _command(r: Row) -> UnlockCommand:
    return UnlockCommand(
        r["id"],
        r["site"],
        r["gateway"],
        r["door"],
        r["reason"],
        r["by_user"],
        r["sent_at"],
        r["status"],
        r["detail"],
        r["answered_at"],
    )


# ---------------------------------------------------------------- the board


@dataclass(eq=False)
class DoorBoard:
    svc: Services
    wait_s: float
    wall: Callable[[], float] = time.time
    doors: dict[tuple[str, str], DoorView] = field(default_factory=dict)
    commands: OrderedDict[str, UnlockCommand] = field(default_factory=OrderedDict)
    _timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    _closed: bool = False

    # -- start and stop

    async def start(self) -> None:
        stale = ts_text(datetime.fromtimestamp(self.wall() - self.wait_s, UTC))
        # Orders left pending by a previous run: their wait is over (an answer may still come, see the trigger).
        await self.svc.store.run_write(
            lambda c: c.execute(
                "UPDATE door_commands SET status = 'timeout' WHERE status = 'pending' AND sent_at < ?", (stale,)
            )
        )
        await self.refresh_registry()
        # The listener is already on (events committed meanwhile are applied): the store's rows win only when newer.
        for r in await self.svc.store.read(_load_states):
            v = self._view(r["site"], r["door"], r["gateway"], {"building": r["building"], "unit": r["unit"]})
            key = (r["state_ts"] or "", r["state_event"] or "")
            if r["state"] in DOOR_STATES and key > v.state_key:
                v.state, v.state_key = r["state"], key
            if (r["tamper_ts"] or "") > v.tamper_ts:
                v.tamper, v.tamper_ts = bool(r["tamper"]), r["tamper_ts"]
            if (r["reader_ts"] or "") > v.reader_ts:
                v.reader_offline, v.reader_ts = bool(r["reader_offline"]), r["reader_ts"]
            key = (r["access_ts"] or "", r["access_event"] or "")
            if r["result"] and key > v.access_key:
                v.access = {
                    "ts": r["access_ts"],
                    "result": r["result"],
                    "reason": r["reason"],
                    "kind": r["kind"],
                    "subject": r["subject"],
                    "house": r["house"],
                    "by": r["by_user"],
                }
                v.access_key = key
        for cmd in reversed(await self.svc.store.read(lambda c: _load_commands(c, RECENT_COMMANDS))):
            self.commands[cmd.id] = cmd

    def close(self) -> None:
        self._closed = True
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()

    # -- the door list

    def _view(self, site: str, door: str, gateway: str, place: dict[str, Any]) -> DoorView:
        v = self.doors.get((site, door))
        if v is None:
            v = self.doors[(site, door)] = DoorView(site, door, gateway)
        if not v.registered:  # a registered door keeps the registry's gateway and place
            v.gateway = gateway
            b, u = place.get("building"), place.get("unit")
            if isinstance(b, str) and b:
                v.building = b
            if isinstance(u, str) and u:
                v.unit = u
        return v

    async def refresh_registry(self) -> None:
        """Take labels, places and gateways from the registry (cheap: a few hundred rows at most)."""
        rows = await self.svc.store.read(registry_doors)
        seen: set[tuple[str, str]] = set()
        for r in rows:
            key = (r["site"], r["door"])
            seen.add(key)
            v = self.doors.get(key)
            if v is None:
                v = self.doors[key] = DoorView(r["site"], r["door"], r["gateway"])
            v.gateway, v.label, v.gate, v.registered = r["gateway"], r["label"] or "", bool(r["gate"]), True
            v.building, v.unit = r["building"], r["unit"]
        for key, v in self.doors.items():
            if v.registered and key not in seen:
                v.registered = False  # removed from the registry: still listed while events name it

    def gateway_status(self, site: str, gateway: str) -> str:
        snap = self.svc.store.gateways.get((site, gateway))
        return snap.status if snap is not None else "unknown"

    def gateway_heard(self, site: str, gateway: str) -> bool:
        """Has the gateway ever reported anything (its status, or an event)?"""
        snap = self.svc.store.gateways.get((site, gateway))
        return snap is not None and (snap.status != "unknown" or snap.events_stored > 0)

    def door_json(self, v: DoorView) -> dict[str, Any]:
        d = v.as_json(self.svc.tz, self.gateway_status(v.site, v.gateway))
        names = {(g.site, g.gateway): g.name for g in self.svc.cfg.gateways}
        d["gateway_name"] = names.get((v.site, v.gateway)) or v.gateway
        # A door nobody has heard of: say why instead of "unknown" for ever (its gateway never reported at all, or
        # it reports but not this door: a name in the registry that is not the one in the gateway's config).
        heard = v.state is not None or v.tamper_ts or v.reader_ts or v.access is not None
        d["silent"] = "" if heard else ("door" if self.gateway_heard(v.site, v.gateway) else "gateway")
        return d

    def listing(self, sites: Sites = None) -> list[dict[str, Any]]:
        """Every door (of ``sites``; None: all), registered first, then by site, building, unit and name."""

        def order(v: DoorView) -> tuple[Any, ...]:
            return (not v.registered, v.site, not v.gate, _num(v.building), _num(v.unit), v.label or v.door)

        shown = [v for v in self.doors.values() if sites is None or v.site in sites]
        return [self.door_json(v) for v in sorted(shown, key=order)]

    def apply(self, e: dict[str, Any]) -> DoorView | None:
        """Apply one stored event; the door it changed, or None. The same rule as the store's triggers."""
        etype = e.get("type")
        if etype not in DOOR_EVENTS:
            return None
        place, data = _part(e, "place"), _part(e, "data")
        name = place.get("door") or data.get("door")
        if not isinstance(name, str) or not name:
            return None
        if (e.get("site"), name) not in self.doors and len(self.doors) >= MAX_DOORS:
            return None
        ts, eid = str(e.get("ts", "")), str(e.get("id", ""))
        if etype == "door.state":
            state = data.get("state")
            if state not in DOOR_STATES:
                return None
            v = self._view(e["site"], name, e["gateway"], place)
            if (ts, eid) <= v.state_key:
                return None
            v.state, v.state_key = state, (ts, eid)
        elif etype in ("door.tamper", "door.tamper_restore"):
            v = self._view(e["site"], name, e["gateway"], place)
            if ts < v.tamper_ts:
                return None
            v.tamper, v.tamper_ts = etype == "door.tamper", ts
        elif etype in ("reader.offline", "reader.online"):
            v = self._view(e["site"], name, e["gateway"], place)
            if ts < v.reader_ts:
                return None
            v.reader_offline, v.reader_ts = etype == "reader.offline", ts
        else:
            v = self._view(e["site"], name, e["gateway"], place)
            if (ts, eid) <= v.access_key:
                return None
            v.access, v.access_key = _access_summary(ts, etype, data), (ts, eid)
        return v

    # -- after each commit (the store's listener: synchronous, on the loop)

    def on_commit(self, committed: list[tuple[Op, Any]]) -> None:
        if self._closed:
            return
        changed: dict[tuple[str, str], DoorView] = {}
        for _op, res in committed:
            if isinstance(res, BatchResult):
                for e in res.new_events:
                    if e["type"] == "command.result":
                        self._answer(res.site, res.gateway, e)
                        continue
                    v = self.apply(e)
                    if v is not None:
                        changed[(v.site, v.door)] = v
            elif isinstance(res, StatusResult) and res.changed:
                snap = res.snapshot
                for v in self.doors.values():
                    if (v.site, v.gateway) == (snap.site, snap.gateway):
                        changed[(v.site, v.door)] = v
        for v in changed.values():
            self.svc.hub.broadcast({"kind": "door", "door": self.door_json(v)})

    # -- remote unlock

    def command(self, cid: str) -> UnlockCommand | None:
        return self.commands.get(cid)

    async def recent_commands(self, limit: int = RECENT_COMMANDS, sites: Sites = None) -> list[dict[str, Any]]:
        """The newest remote unlocks, from the store: those another instance of a centre ordered too. One still
        pending past its wait is shown timed out (the instance that would have said so may be gone)."""
        rows = await self.svc.store.read(lambda c: _load_commands(c, limit, sites))
        stale = ts_text(datetime.fromtimestamp(self.wall() - self.wait_s, UTC))
        out = []
        for cmd in rows:
            mine = self.commands.get(cmd.id)
            if mine is not None and mine.status != "pending" and cmd.status == "pending":
                cmd = mine  # settled here, its row's update still queued
            if cmd.status == "pending" and cmd.sent_at < stale:
                cmd.status = "timeout"
            out.append(cmd.as_json(self.svc.tz))
        return out

    def _remember(self, cmd: UnlockCommand) -> None:
        self.commands[cmd.id] = cmd
        while len(self.commands) > COMMANDS_KEPT:
            self.commands.popitem(last=False)

    def _publish(self, cmd: UnlockCommand) -> None:
        self.svc.hub.broadcast({"kind": "unlock", "command": cmd.as_json(self.svc.tz)})

    async def unlock(self, site: str, door: str, reason: str, actor: str, remote: str = "") -> UnlockCommand:
        """Order a door open. KeyError: no such door; ValueError: no reason. Never raises for a broker outage."""
        reason = " ".join(reason.split())
        if not reason:
            raise ValueError("a reason is required")
        if len(reason) > REASON_MAX:
            raise ValueError(f"the reason is longer than {REASON_MAX} characters")
        await self.refresh_registry()
        v = self.doors.get((site, door))
        if v is None:
            raise KeyError(f"{site}/{door}")
        now = datetime.fromtimestamp(self.wall(), UTC)
        cmd = UnlockCommand(
            id=str(ULID()), site=site, gateway=v.gateway, door=door, reason=reason, by=actor, sent_at=ts_text(now)
        )
        wire_cmd = wire.Command(
            v=wire.COMMAND_VERSION,
            id=cmd.id,
            type="unlock",
            ts=now,
            expires=now + timedelta(seconds=self.wait_s),
            by=actor,
            args={"door": door, "reason": reason},
        )

        def record(c: Conn) -> None:  # the order and its audit row: one transaction
            c.execute(
                "INSERT INTO door_commands (id, site, gateway, door, reason, by_user, remote, sent_at, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                (cmd.id, site, cmd.gateway, door, reason, actor, remote[:64], cmd.sent_at),
            )
            audit.write(c, actor, "door.remote_unlock", f"door:{site}/{door}", reason, remote)

        await self.svc.store.run_write(record)  # before sending: the answer must find the row
        self._remember(cmd)
        loop = asyncio.get_running_loop()
        self._timers[cmd.id] = loop.call_later(self.wait_s, self._expire, cmd.id)
        self._publish(cmd)
        log.info("remote unlock of %s/%s by %s (%s): command %s", site, door, actor, reason, cmd.id)
        try:
            await self.svc.ingest.send_command(site, cmd.gateway, wire_cmd)
        except (BrokerUnavailable, ValueError, wire.WireError) as e:
            self._settle(cmd, "unsent", str(e)[:300])
            cid, detail = cmd.id, cmd.detail
            self.svc.store.enqueue_nowait(
                FnOp(
                    lambda c: c.execute(
                        "UPDATE door_commands SET status = 'unsent', detail = ? WHERE id = ? AND status = 'pending'",
                        (detail, cid),
                    )
                )
            )
            log.warning("remote unlock of %s/%s not sent: %s", site, door, e)
        return cmd

    def _settle(self, cmd: UnlockCommand, status: str, detail: str, at: str | None = None) -> None:
        h = self._timers.pop(cmd.id, None)
        if h is not None:
            h.cancel()
        cmd.status, cmd.detail, cmd.answered_at = status, detail, at
        if not self._closed:
            self._publish(cmd)

    def _expire(self, cid: str) -> None:
        self._timers.pop(cid, None)
        cmd = self.commands.get(cid)
        if cmd is None or cmd.status != "pending" or self._closed:
            return
        self._settle(cmd, "timeout", "")
        self.svc.store.enqueue_nowait(
            FnOp(
                lambda c: c.execute(
                    "UPDATE door_commands SET status = 'timeout' WHERE id = ? AND status = 'pending'", (cid,)
                )
            )
        )
        log.warning("remote unlock %s of %s/%s: no answer within %.0f s", cid, cmd.site, cmd.door, self.wait_s)

    def _answer(self, site: str, gateway: str, e: dict[str, Any]) -> None:
        data = _part(e, "data")
        cid = data.get("command_id")
        cmd = self.commands.get(cid) if isinstance(cid, str) else None
        if cmd is None or (cmd.site, cmd.gateway) != (site, gateway) or cmd.status not in ("pending", "timeout"):
            return
        ok = data.get("ok") is True
        detail = data.get("detail")
        reason = data.get("reason")
        if not ok and reason in wire.UNLOCK_FAILURES:
            detail = reason  # worded for the guard by the page (doors.failed.*): "开门失败：继电器未动作"
        self._settle(cmd, "opened" if ok else "failed", str(detail)[:300] if detail is not None else "", e.get("ts"))
        log.info("remote unlock %s of %s/%s: %s", cmd.id, site, cmd.door, cmd.status)


def _part(e: dict[str, Any], key: str) -> dict[str, Any]:
    """An event's ``place`` or ``data`` when it is a mapping; otherwise an empty one."""
    value = e.get(key)
    return value if isinstance(value, dict) else {}


def _num(code: str | None) -> tuple[int, str]:
    if code is None:
        return (0, "")
    return (int(code), "") if code.isdecimal() else (1 << 30, code)


# ---------------------------------------------------------------- wiring


BOARD = web.AppKey("portal.doors", DoorBoard)


def board(app: web.Application) -> DoorBoard:
    return app[BOARD]


def door_states(app: web.Application) -> list[dict[str, Any]]:
    """Every door and its live state, as ``GET /api/doors`` lists them (for the site map's markers).

    Each item: key ("site/door"), site, door, gateway, label, building, unit, gate, registered,
    state (closed|open|unlocked|forced|held|offline|unknown), since (UTC), tamper, reader_offline,
    gateway_status (online|offline|unknown), last_access. Live changes arrive on ``/ws`` as
    ``{"kind": "door", "door": <item>}``.
    """
    b = app.get(BOARD)
    return b.listing() if b is not None else []


def setup(app: web.Application, *, wall: Callable[[], float] = time.time) -> None:
    """Add the door and visitor routes and the board's start/stop (after the portal's own)."""
    from portal.doors import visitors

    app.router.add_routes(routes)
    app.router.add_routes(visitors.routes)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        svc = app[SERVICES]
        b = DoorBoard(svc=svc, wait_s=svc.cfg.doors.unlock_wait_s, wall=wall)
        svc.store.add_commit_listener(b.on_commit)  # first, so nothing committed while loading is missed
        app[BOARD] = b
        await b.start()
        await visitors.start(app, wall=wall)
        try:
            yield
        finally:
            b.close()

    app.cleanup_ctx.append(ctx)


# ---------------------------------------------------------------- routes


@routes.get("/doors")
@roles("admin", "guard", "installer")
async def doors_page(request: web.Request) -> web.StreamResponse:
    b = board(request.app)
    await b.refresh_registry()
    user = request[SESSION_KEY].user
    sites = sites_of(request)
    doors = b.listing(sites)
    return render(
        request,
        "doors.html",
        doors=doors,
        commands=await b.recent_commands(sites=sites),
        states=DOOR_STATES,
        can_unlock=user.role in ("admin", "guard"),
        wait_s=b.wait_s,
        failures=wire.UNLOCK_FAILURES,
        place=lambda d: door_place(d, translator(request)),
        labels={d["key"]: d["label"] for d in doors},
    )


def door_place(d: dict[str, Any], tr: Any) -> str:
    if d.get("gate"):
        return str(tr("doors.gate"))
    parts = [tr(f"place.{k}", v=d[k]) for k in ("building", "unit") if d.get(k)]
    return " ".join(parts)


@routes.get("/api/doors")
@roles("admin", "guard", "installer")
async def doors_json(request: web.Request) -> web.StreamResponse:
    b = board(request.app)
    await b.refresh_registry()
    return web.json_response({"doors": b.listing(sites_of(request)), "states": list(DOOR_STATES)})


@routes.post("/api/doors/{site}/{door}/unlock")
@roles("admin", "guard")
async def unlock(request: web.Request) -> web.StreamResponse:
    site, door = request.match_info["site"], request.match_info["door"]
    if not wire.NAME_RE.match(site) or not wire.NAME_RE.match(door):
        raise web.HTTPNotFound()
    need(request, site)
    data = await read_json(request)
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return web.json_response({"error": "reason-required"}, status=400)
    b = board(request.app)
    try:
        cmd = await b.unlock(site, door, reason, actor_of(request), request.remote or "")
    except KeyError:
        raise web.HTTPNotFound() from None
    except ValueError as e:
        raise bad_request(str(e)) from None
    body = {"command": cmd.as_json(b.svc.tz)}
    if cmd.status == "unsent":
        return web.json_response({"error": "not-sent", **body}, status=503)
    return web.json_response(body, status=202)


@routes.get("/api/doors/commands")
@roles("admin", "guard", "installer")
async def commands_json(request: web.Request) -> web.StreamResponse:
    return web.json_response({"commands": await board(request.app).recent_commands(sites=sites_of(request))})


@routes.get("/api/doors/commands/{id}")
@roles("admin", "guard", "installer")
async def command_json(request: web.Request) -> web.StreamResponse:
    b = board(request.app)
    cid = request.match_info["id"][:40]
    cmd = b.command(cid)
    if cmd is None:
        row = await b.svc.store.read(lambda c: c.execute("SELECT * FROM door_commands WHERE id = ?", (cid,)).fetchone())
        if row is None:
            raise web.HTTPNotFound()
        cmd = _command(row)
    if not sees(request, cmd.site):
        raise web.HTTPNotFound()
    return web.json_response({"command": cmd.as_json(b.svc.tz)})
