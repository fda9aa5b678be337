"""The running part of the care watch: activity from the field in, care alerts out.

**Activity.** A cursor over ``events.pk`` (:func:`feed`, like the alarm board's) looks once at every event stored,
whichever way it came in, and credits a household under care with what is attributable to it:

* a resident pass used at a door (``access.granted``, kind ``resident``) by a person cared for: the pass subject
  belongs to that person's stay in a flat; another household member's pass, a visitor pass the flat issued or a
  guard's remote unlock is not the cared-for person's activity;
* a door opened from the phone of a person cared for (``access.granted``, kind ``remote``, subject
  ``resident:<id>``);
* the flat's own indoor panel used by a person: armed or disarmed (``house.armed`` / ``house.disarmed``), a keypad
  report naming a user (``panel.event`` with ``user``), a panic or medical button (``panel.alarm``); and a zone whose
  place is the flat (its door contact) reporting.

A unit entrance's door contact (``door.state``) is shared by every flat behind it and credits nobody, nor does a
help call from the flat's plate (anyone at the door can press it). An event's own time counts, never later than the
portal's now: a late re-send moves the clock back to when it happened, and a gateway clock in the future gains
nothing.

**Rules.** No activity for the household's ``hours`` raises ``care.no_activity``; activity between its night hours
(site-local, the event's own time, at most :data:`NIGHT_STALE_S` old when seen) raises ``care.night_activity``
(later ones while it is open are counted in it); the flat's panel reporting Contact ID 641 (senior watch: nobody
moved) raises ``care.panel_inactive``, and its restore marks that restored. Activity after an alert was raised
marks its incident restored (the guard still closes it). A panic from the flat is recorded against its own
incident. "我很好" from the phone (:meth:`CareWatch.check_in`) restarts the clock and settles the open alerts.

**Time.** The no-activity delay runs on the monotonic clock: each household's deadline is set from the age of its
last activity by the wall clock, read when it changes (at start-up, on new activity, after a check-in or a close),
so a clock jump changes no deadline. Night hours are wall time in the site's zone.

**Several instances** (a monitoring centre, docs/centre.md). Each instance keeps every household's clock, and what
moves one (an enrolment, activity another instance's feed credited, "我很好" or a close through another instance)
is learnt by reading every clock again every :data:`RELOAD_S` (one query; an unchanged clock keeps its deadline).
An alert is raised only after the household is read again in the raising transaction, under the store's whole lock
(:func:`raise_no_activity`): a clock that moved meanwhile is refreshed instead, and an alert another instance raised
is not raised twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from portal.alarms import incidents as alarms
from portal.alarms.board import AlarmBoard
from portal.care import model
from portal.estate.service import PORTAL_GATEWAY, portal_event
from portal.store import BatchResult, Conn, Op, StoreError, Tx, audit, event_dict
from portal.web import i18n
from portal.web.services import Services

log = logging.getLogger("portal.care")

TICK_S = 1.0  # how often deadlines are checked and the event cursor looked at
RELOAD_S = 30.0  # how often every household's clock is read again (what other instances sharing the store changed)
CURSOR_EVERY = 10  # ticks: how often the cursor is moved past events the feed does not look at
FEED_CHUNK = 2000
NIGHT_STALE_S = 3600.0  # night activity seen later than this is credited but raises nothing
FEED_TYPES = (
    "access.granted",
    "house.armed",
    "house.disarmed",
    "panel.event",
    "panel.alarm",
    "zone.alarm",
    "house.sos",
)
_TR = {lang: i18n.Translator(lang) for lang in i18n.LANGUAGES}


def now_text(wall: Callable[[], float]) -> str:
    return model.ts_text(datetime.fromtimestamp(wall(), UTC))


def in_night(at: str, tz: ZoneInfo, start: str, end: str) -> bool:
    """Is the UTC time ``at`` within the site-local hours [start, end) (a span past midnight wraps)?"""
    local = model.parse_ts(at).astimezone(tz)
    hm = f"{local.hour:02d}:{local.minute:02d}"
    return start <= hm < end if start < end else (hm >= start or hm < end)


# ---------------------------------------------------------------- raising alerts (in the writer's transaction)


def _titles(key: str, **kw: Any) -> dict[str, str]:
    return {"name_zh": _TR["zh-CN"](key, **kw), "name_en": _TR["en"](key, **kw)}


def raise_alert(conn: Conn, h: model.Household, rule: str, now: str, detail: Mapping[str, Any]) -> dict[str, Any]:
    """A care alert of one of :data:`model.OWN_RULES`: its event (which the board makes an incident of kind care)
    and its row. Returns the stored event."""
    token = secrets.token_hex(8)
    incident = f"care:{token}"
    data: dict[str, Any] = {
        "incident": incident,
        "count": 1,
        "kind": "care",
        "rule": rule,
        "care": h.id,
        **_titles(f"care.title.{rule}", h=h.hours),
        **detail,
    }
    row = portal_event(conn, h.place, f"care.{rule}", model.PRIORITY, data, device="care", ts=now)
    model.add_alert(conn, h.id, rule, row[0], f"{h.site}/{PORTAL_GATEWAY}/{incident}", now, {**detail, "count": 1})
    return event_dict(row)


def _incident_token(alert: Mapping[str, Any]) -> str:
    return str(alert["incident_key"]).rsplit("/", 1)[-1]


def restore_alert(
    conn: Conn, h: model.Household, alert: Mapping[str, Any], now: str, how: str, by: str = ""
) -> dict[str, Any]:
    """The restore event of an alert's incident (marked restored on the board; a guard still closes it)."""
    data: dict[str, Any] = {
        "incident": _incident_token(alert),
        "how": how,
        "count": alert["detail"].get("count", 1),
        "kind": "care",
        "rule": alert["rule"],
        "care": h.id,
    }
    if by:
        data["by"] = by
    row = portal_event(conn, h.place, f"care.{alert['rule']}_restore", model.PRIORITY, data, device="care", ts=now)
    return event_dict(row)


def repeat_alert(
    conn: Conn, h: model.Household, alert: Mapping[str, Any], now: str, detail: Mapping[str, Any]
) -> dict[str, Any]:
    count = int(alert["detail"].get("count", 1)) + 1
    model.set_alert_detail(conn, alert["id"], {**alert["detail"], "count": count, "last": dict(detail)})
    data = {
        "incident": _incident_token(alert),
        "count": count,
        "kind": "care",
        "rule": alert["rule"],
        "care": h.id,
        **detail,
    }
    row = portal_event(conn, h.place, f"care.{alert['rule']}_repeat", model.PRIORITY, data, device="care", ts=now)
    return event_dict(row)


# ---------------------------------------------------------------- the activity feed


@dataclass
class FeedResult:
    last_pk: int = 0
    more: bool = False
    touched: set[int] = field(default_factory=set)  # households whose clock may have moved
    events: list[dict[str, Any]] = field(default_factory=list)  # events raised


def feed_cursor(conn: Conn) -> int:
    row = conn.execute("SELECT last_pk FROM care_feed WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def feed_pending(conn: Conn) -> bool:
    """Is an event of the :data:`FEED_TYPES` stored past the feed's cursor? (A read, as alarms.feed_pending.)"""
    return (
        conn.execute(
            "SELECT 1 FROM events WHERE pk > (SELECT coalesce(max(last_pk), 0) FROM care_feed)"
            f" AND type IN ({', '.join('?' * len(FEED_TYPES))}) LIMIT 1",
            FEED_TYPES,
        ).fetchone()
        is not None
    )


def feed(conn: Conn, now: str, tz: ZoneInfo, limit: int = FEED_CHUNK) -> FeedResult:
    """Look at the events stored since the last call (at most ``limit``) for activity and care rules."""
    last = feed_cursor(conn)
    upto = int(conn.execute("SELECT coalesce(max(pk), 0) FROM events").fetchone()[0])  # all committed: whole lock
    out = FeedResult(last_pk=last)
    if upto <= last:
        return out
    out.last_pk = upto
    if conn.execute("SELECT 1 FROM care_households WHERE status = 'active' LIMIT 1").fetchone() is not None:
        rows = conn.execute(  # other events are passed over in the query (see alarms.feed)
            "SELECT pk, id, site, gateway, seq, ts, type, device, point, priority, place, data, received_at"
            f" FROM events WHERE pk > ? AND pk <= ? AND type IN ({', '.join('?' * len(FEED_TYPES))})"
            " ORDER BY pk LIMIT ?",
            (last, upto, *FEED_TYPES, limit),
        ).fetchall()
        if len(rows) == limit:
            out.more, out.last_pk = True, int(rows[-1][0])
        for r in rows:
            ev = event_dict(tuple(r)[1:])
            try:
                _apply(conn, ev, now, tz, out)
            except (KeyError, TypeError, ValueError) as e:  # a malformed event must not stop the feed
                conn.execute(
                    "INSERT INTO rejections (reason, source, count, first_at, last_at, last_detail)"
                    " VALUES ('care-feed', ?, 1, ?, ?, ?) ON CONFLICT (reason, source) DO UPDATE SET"
                    " count = rejections.count + 1, last_at = excluded.last_at, last_detail = excluded.last_detail",
                    (f"{ev.get('site')}/{ev.get('gateway')}", now, now, f"{ev.get('id')}: {e}"[:300]),
                )
    conn.execute("UPDATE care_feed SET last_pk = ? WHERE id = 1", (out.last_pk,))
    return out


def _cared_by_person(conn: Conn, person_id: int) -> list[model.Household]:
    rows = conn.execute(
        "SELECT c.id FROM care_people p JOIN care_households c ON c.id = p.care_id"
        " WHERE p.person_id = ? AND c.status = 'active'",
        (person_id,),
    ).fetchall()
    return [h for h in (model.household(conn, int(r[0])) for r in rows) if h is not None]


def _of_place(conn: Conn, place: Mapping[str, Any]) -> model.Household | None:
    hid = model.house_of_place(conn, place)
    return model.household_of_house(conn, hid) if hid is not None else None


def _person_of(conn: Conn, data: Mapping[str, Any]) -> int | None:
    """The person a granted opening was for: a resident pass's stay, or a resident's phone unlock."""
    subject, kind = data.get("subject"), data.get("kind")
    if not isinstance(subject, str) or not subject:
        return None
    if kind == "resident":
        row = conn.execute("SELECT person_id FROM reg_residents WHERE subject = ?", (subject[:64],)).fetchone()
        return int(row[0]) if row else None
    if (
        kind == "remote"
        and subject.startswith("resident:")
        and subject[9:].isascii()
        and subject[9:].isdigit()
        and len(subject) <= 30
    ):
        return int(subject[9:])
    return None


def _apply(conn: Conn, ev: Mapping[str, Any], now: str, tz: ZoneInfo, out: FeedResult) -> None:
    etype, place = str(ev["type"]), ev["place"]
    data = ev["data"] if isinstance(ev["data"], dict) else {}
    at = min(str(ev["ts"]), now)
    credited: list[tuple[model.Household, str]] = []
    if etype == "access.granted":
        pid = _person_of(conn, data)
        if pid is not None:
            door = str(place.get("door") or data.get("door") or "")[:40]
            what = f"{'pass' if data.get('kind') == 'resident' else 'remote'}:{door}"
            credited = [(h, what) for h in _cared_by_person(conn, pid)]
    else:
        h = _of_place(conn, place)
        if h is None:
            return
        if etype == "panel.event" and data.get("code") in model.SENIOR_WATCH_CODES:
            _panel_inactive(conn, h, ev, data, now, out)
            return
        if etype == "house.sos" or (etype == "panel.alarm" and data.get("kind") in model.PANIC_KINDS):
            _panic(conn, h, ev, data, now)
        if etype in ("house.armed", "house.disarmed"):
            credited = [(h, f"panel:{etype}")]
        elif etype == "panel.event" and isinstance(data.get("user"), int):
            credited = [(h, "panel:keypad")]
        elif etype == "panel.alarm" and data.get("kind") in model.PANIC_KINDS:
            credited = [(h, f"panel:{data.get('kind')}")]
        elif etype == "zone.alarm":
            credited = [(h, f"zone:{str(place.get('zone') or data.get('zone') or '')[:40]}")]
    for h, what in credited:
        _credit(conn, h, at, what, now, tz, out)


def _credit(conn: Conn, h: model.Household, at: str, what: str, now: str, tz: ZoneInfo, out: FeedResult) -> None:
    model.record_activity(conn, h.id, at, what)
    out.touched.add(h.id)
    for a in model.open_alerts(conn, h.id):
        if a["rule"] in ("no_activity", "panel_inactive") and at >= a["raised_at"] and not a["detail"].get("seen"):
            model.set_alert_detail(conn, a["id"], {**a["detail"], "seen": at, "seen_what": what})
            out.events.append(restore_alert(conn, h, a, now, f"activity {what}"))
    if not h.night_watch or not in_night(at, tz, h.night_from, h.night_to):
        return
    if (model.parse_ts(now) - model.parse_ts(at)).total_seconds() > NIGHT_STALE_S:
        return
    detail = {"at": at, "what": what}
    open_night = model.open_rule(conn, h.id, "night_activity")
    if open_night is None:
        out.events.append(raise_alert(conn, h, "night_activity", now, detail))
    else:
        out.events.append(repeat_alert(conn, h, open_night, now, detail))


def _panel_inactive(
    conn: Conn, h: model.Household, ev: Mapping[str, Any], data: Mapping[str, Any], now: str, out: FeedResult
) -> None:
    open_alert = model.open_rule(conn, h.id, "panel_inactive", unanswered=True)
    if data.get("qualifier") == "restore":
        if open_alert is not None:
            model.set_alert_detail(conn, open_alert["id"], {**open_alert["detail"], "seen": str(ev["ts"])})
            out.events.append(restore_alert(conn, h, open_alert, now, "panel restore"))
        return
    if open_alert is None:
        detail = {
            "panel": str(data.get("panel") or ev["device"])[:40],
            "code": data.get("code"),
            "reported_at": str(ev["ts"]),
        }
        out.events.append(raise_alert(conn, h, "panel_inactive", now, detail))


def _panic(conn: Conn, h: model.Household, ev: Mapping[str, Any], data: Mapping[str, Any], now: str) -> None:
    """A panic (or help call) from a flat under care is an incident of its own: recorded against it, once."""
    engine = data.get("incident")
    if isinstance(engine, str | int) and not isinstance(engine, bool):
        key = f"{ev['site']}/{ev['gateway']}/{str(engine)[:80]}"
    else:
        key = f"ev:{ev['id']}"
    if conn.execute("SELECT 1 FROM care_alerts WHERE incident_key = ?", (key,)).fetchone() is None:
        model.add_alert(
            conn,
            h.id,
            "panic",
            str(ev["id"]),
            key,
            now,
            {"type": str(ev["type"]), "kind": str(data.get("kind") or "")[:20]},
        )


# ---------------------------------------------------------------- the timer's and the phone's writes


@dataclass
class Raised:
    events: list[dict[str, Any]] = field(default_factory=list)  # the alerts raised
    moved: list[int] = field(default_factory=list)  # households whose clock had moved on: read them again


def raise_no_activity(conn: Conn, due: Mapping[int, tuple[str, int]], now: str) -> Raised:
    """Raise the no-activity alerts of the households an instance's clocks say are due, each clock computed from
    the (since, hours) in ``due``. Each is read again here, under the store's whole lock: one whose clock has moved
    on since (activity, "我很好" or a close, at this instance or another; other hours; care ended) is not raised but
    listed in ``moved``; one whose alert is open and unanswered (another instance raised it) is passed over, but not
    one whose earlier alert her activity answered and no guard has closed yet: this is a new silence, a new alert.
    Of several instances whose clocks come due together, one raises, once."""
    out = Raised()
    for cid, basis in due.items():
        if model.clock_bases(conn, cid).get(cid) != basis:
            out.moved.append(cid)
            continue
        h = model.household(conn, cid)
        if h is None or model.open_rule(conn, cid, "no_activity", unanswered=True) is not None:
            continue  # ringing still (another instance raised it); one answered by activity is no bar
        detail = {"hours": h.hours, "since": basis[0], "last": h.last_activity}
        out.events.append(raise_alert(conn, h, "no_activity", now, detail))
    return out


@dataclass
class CheckIn:
    events: list[dict[str, Any]] = field(default_factory=list)
    incidents: list[dict[str, Any]] = field(default_factory=list)
    cleared: int = 0


def check_in(
    conn: Conn, care_id: int, person_id: int, now: str, remote: str = "", hooks: Sequence[alarms.IncidentHook] = ()
) -> CheckIn:
    """ "我很好" from a resident of the flat: the no-activity clock restarts, and every open alert is answered: its
    incident closed while nobody has been sent (else noted for the guard on the way); a panic's incident only gets
    the note. One transaction, audited."""
    h = model.household(conn, care_id)
    if h is None or h.status != "active":
        raise model.CareError("care.not_active")
    actor = f"resident:{person_id}"
    out = CheckIn()
    model.record_activity(conn, care_id, now, f"phone:ok:{person_id}")
    conn.execute("UPDATE care_households SET watch_from = greatest(watch_from, ?) WHERE id = ?", (now, care_id))
    note = _TR["zh-CN"]("care.ok_note")
    for a in model.open_alerts(conn, care_id):
        model.clear_alert(conn, a["id"], actor, now)
        out.cleared += 1
        if a["rule"] in model.OWN_RULES:
            out.events.append(restore_alert(conn, h, a, now, "cleared", actor))
        iid = a["incident_id"]
        if iid is None:
            continue
        before = alarms.get_incident(conn, iid)
        if before is None or before["state"] == "closed":
            continue
        if a["rule"] in model.OWN_RULES:
            inc = alarms.settle(conn, iid, actor, "false", note, now)
        else:
            inc = alarms.act(conn, iid, "note", actor, now=now, text=note)
        if inc is not None:  # the board's hooks (the grid link's reports) see it, in this transaction
            action = "finish" if inc["state"] == "closed" else "note"
            alarms.run_hooks(conn, hooks, [inc], action, actor)
            out.incidents.append(alarms.get_incident(conn, iid) or inc)
    audit.write(conn, actor, "care.ok", f"care:{care_id}", f"{out.cleared} alerts answered", remote, at=now)
    return out


class FeedOp(Op):
    def __init__(self, now: str, tz: ZoneInfo) -> None:
        self.now, self.tz = now, tz

    def apply(self, tx: Tx) -> FeedResult:
        return feed(tx.conn, self.now, self.tz)


# ---------------------------------------------------------------- the watch


@dataclass(frozen=True, slots=True)
class Clock:
    """When a household's no-activity alert is due (monotonic), and what it was computed from."""

    deadline: float
    since: str
    hours: int

    @property
    def basis(self) -> tuple[str, int]:
        return self.since, self.hours


class CareWatch:
    """Open with :meth:`start` (after the alarm board's), close with :meth:`close`."""

    def __init__(
        self,
        svc: Services,
        board: AlarmBoard,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.svc, self.board, self.wall, self.mono = svc, board, wall, mono
        self.clocks: dict[int, Clock] = {}
        self._spent: dict[int, tuple[str, int]] = {}  # alerted from this basis: no clock until it moves
        self._wake = asyncio.Event()
        self._cursor = 0
        self._ticks = 0
        self._next_reload = 0.0
        self._task: asyncio.Task[None] | None = None
        self._refresh: set[int] = set()

    def now(self) -> str:
        return now_text(self.wall)

    async def start(self) -> None:
        await self.refresh()
        self._next_reload = self.mono() + RELOAD_S
        self.svc.store.add_commit_listener(self.on_commit, local_only=True)  # peers: the tick folds theirs
        self._task = asyncio.create_task(self._run(), name="portal.care.watch")
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- the clocks

    async def refresh(self, care_id: int | None = None) -> None:
        """Read the households' clocks again (all, or one). A clock whose basis (since, hours) moved is set anew
        from the wall clock, once; one whose basis is unchanged keeps its deadline (reading the wall clock again
        would let a clock jump move it)."""
        bases = await self.svc.store.read(lambda c: model.clock_bases(c, care_id))
        wall, mono = self.wall(), self.mono()
        for cid in ({*self.clocks, *self._spent} if care_id is None else {care_id}) - set(bases):  # ended
            self.clocks.pop(cid, None)
            self._spent.pop(cid, None)
        for cid, basis in bases.items():
            c = self.clocks.get(cid)
            if (c is not None and c.basis == basis) or self._spent.get(cid) == basis:
                continue
            self._spent.pop(cid, None)
            since, hours = basis
            self.clocks[cid] = Clock(mono + model.parse_ts(since).timestamp() + hours * 3600 - wall, since, hours)

    def due(self) -> list[int]:
        now = self.mono()
        return [cid for cid, c in self.clocks.items() if now >= c.deadline]

    def remaining(self, care_id: int) -> float | None:
        c = self.clocks.get(care_id)
        return None if c is None else c.deadline - self.mono()

    # -- feeding and checking

    def on_commit(self, committed: list[tuple[Op, Any]]) -> None:
        for _op, res in committed:
            if isinstance(res, BatchResult) and any(e["type"] in FEED_TYPES for e in res.new_events):
                self._wake.set()  # the tick moves the cursor past the rest (a feed is a whole-store write)
            elif isinstance(res, dict) and res.get("kind") == "care" and res.get("state") == "closed":
                cid = (res.get("data") or {}).get("care")
                if isinstance(cid, int):  # a guard closed a care alert: the clock restarts from the close
                    self._refresh.add(cid)
                    self._wake.set()

    async def feed_now(self) -> FeedResult:
        res: FeedResult = await self.svc.store.write(FeedOp(self.now(), self.svc.tz))
        self._cursor = max(self._cursor, res.last_pk)
        await self._after(res.events)
        for cid in res.touched:
            await self.refresh(cid)
        if res.more:
            self._wake.set()
        return res

    async def check_now(self) -> list[dict[str, Any]]:
        """Raise the no-activity alerts that are due; returns their events."""
        for cid in list(self._refresh):
            self._refresh.discard(cid)
            await self.refresh(cid)
        mono = self.mono()
        if mono >= self._next_reload:  # what the other instances changed (enrolments, activity, check-ins, closes)
            self._next_reload = mono + RELOAD_S
            await self.refresh()
        due = {cid: self.clocks[cid].basis for cid in self.due()}
        if not due:
            return []
        now = self.now()
        res: Raised = await self.svc.store.run_write(lambda c: raise_no_activity(c, due, now))
        for cid, basis in due.items():  # raised, or one is open already: nothing more until its clock moves
            if cid not in res.moved:
                self.clocks.pop(cid, None)
                self._spent[cid] = basis
        for cid in res.moved:
            await self.refresh(cid)
        events = res.events
        for ev in events:
            log.warning(
                "care alert: no activity at %s since %s",
                json.dumps(ev["place"], ensure_ascii=False),
                ev["data"].get("since"),
            )
        await self._after(events)
        return events

    async def _after(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            self.svc.hub.broadcast({"kind": "event", "event": ev})
        if events:
            await self.board.feed_now()  # on the board at once, not at its next look

    async def check_in(self, care_id: int, person_id: int, remote: str = "") -> CheckIn:
        await self.board.feed_now()  # every alert raised so far has its incident
        now = self.now()
        hooks = list(self.board.hooks)
        res: CheckIn = await self.svc.store.run_write(lambda c: check_in(c, care_id, person_id, now, remote, hooks))
        for inc in res.incidents:
            self.board.changed(inc)
        await self._after(res.events)
        await self.refresh(care_id)
        log.info("care: household %d checked in by resident %d (%d alerts answered)", care_id, person_id, res.cleared)
        return res

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._wake.wait()
            self._wake.clear()
            try:
                self._ticks += 1  # past other events the cursor moves now and then (see AlarmBoard._timer)
                if await self.svc.store.read(feed_pending) or (
                    self._ticks % CURSOR_EVERY == 0 and await self.svc.store.read(alarms.max_event_pk) > self._cursor
                ):
                    await self.feed_now()
                await self.check_now()
            except StoreError as e:
                log.warning("care watch: %s; retrying", e)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("care watch failed; retrying")
                await asyncio.sleep(1.0)
