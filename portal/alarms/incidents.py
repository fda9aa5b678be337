"""The alarm board's incident model: gateway alarm events in, incidents a guard handles to a close out.

An **incident** is one gateway incident (``data.incident`` pairs an alarm, its repeats and its restore; see
docs/events.md) or, for alarm types the gateway does not pair, one event. Its workflow::

    new → acknowledged → dispatched (to a named guard) → on_scene → resolved (with a cause) → closed

(resolve may follow acknowledge directly, and a dispatched incident may be dispatched again to another guard).
A restore marks it *restored* (the condition cleared) but leaves it open until a guard closes it. Every step
(the gateway's events as well as the guards' actions, checklist ticks, notes and escalation) is one row of
``incident_log`` with who and when.

Events reach the model through a cursor over ``events.pk`` (:class:`FeedIncidents`): whatever the store holds
is looked at exactly once, whichever way it came in (MQTT, or events the portal raises itself), and a
restart resumes where it stopped. Each event is also logged against its incident under a unique event id,
so applying one twice changes nothing.

The same feed keeps the arm state of zone groups (``group.*`` events) and the answers to arm/disarm
commands sent from the console (``command.result``, matched on ``data.command_id``).

Everything here runs on a plain ``Conn`` (the store's writer thread, or a test's own).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from gateway import wire
from portal.config import ALARM_KINDS
from portal.store import Conn, Op, Row, StoreConflict, Tx, audit, db, event_dict, now_text
from portal.store.basics import ts_text
from portal.web import i18n
from portal.web.scope import Sites
from portal.web.scope import sql as site_sql
from portal.web.views import level_of, place_text

STATES = ("new", "acknowledged", "dispatched", "on_scene", "resolved", "closed")
CAUSES = ("real", "false", "test", "device_fault", "unknown")
#: What a guard may mark when resolving: damage done, the police called in (the grid report's rules use them).
FLAGS = ("damage", "police")
KINDS = ALARM_KINDS

#: action: (the states it may be taken from, the state it leads to or None when the state stays)
ACTIONS: dict[str, tuple[frozenset[str], str | None]] = {
    "ack": (frozenset({"new"}), "acknowledged"),
    "dispatch": (frozenset({"acknowledged", "dispatched"}), "dispatched"),
    "on_scene": (frozenset({"dispatched"}), "on_scene"),
    "resolve": (frozenset({"acknowledged", "dispatched", "on_scene"}), "resolved"),
    "close": (frozenset({"resolved"}), "closed"),
    "finish": (frozenset({"acknowledged", "dispatched", "on_scene"}), "closed"),  # resolve with a cause and close
    "note": (frozenset(STATES) - {"closed"}, None),
    "check": (frozenset({"acknowledged", "dispatched", "on_scene", "resolved"}), None),
}
NOTE_MAX = 1000
GUARD_MAX = 40
FEED_CHUNK = 1000

#: Closing types of the gateway's paired families (docs/events.md); any type ending in ``_restore`` too.
RESTORE_TYPES = frozenset({"zone.restore", "device.online", "reader.online", "panel.restore", "panel.test_restore"})
#: Events that open an incident of their own although they are not paired (or are below TAMPER).
UNPAIRED_ALARMS = frozenset(
    {
        "panel.unknown_account",
        "house.sos",
        # a gateway that lost its alarm state (a store replaced, a state it could not read): its groups are
        # disarmed and its open alarms forgotten, whatever the board showed
        "store.corrupt_replaced",
        "gateway.state_lost",
    }
)
#: States whose incident a new trip of the same zone folds into (a resolved or closed one is history: a new one opens).
FOLD_STATES = ("new", "acknowledged", "dispatched", "on_scene")
#: ... and restored no longer than this before the new trip (gateway time, the same clock as the trip's)
FOLD_RESTORED_S = 600
#: Never an incident, whatever their priority: work orders, answers, arming.
NOT_ALARMS = frozenset(
    {
        "house.problem",
        "house.armed",
        "house.disarmed",
        "panel.event",
        "zone.entry_delay",
        "zone.bypassed",
        "zone.unbypassed",
    }
)
NOT_ALARM_PREFIXES = ("command.", "group.", "gateway.")
#: ... except these, alarms by their priority: a gateway refusing a forged command (TAMPER) is someone with a broker
#: credential trying to open a door or disarm the estate.
SECURITY_EVENTS = frozenset({"command.rejected"})

_ZONE_KINDS = {
    "fire": "fire",
    "gas": "gas",
    "panic": "panic",
    "medical": "medical",
    "intrusion": "intrusion",
    "touch": "intrusion",
    "cut": "fence_cut",
    "short": "fence_cut",
    "tamper": "tamper",
    "fault": "fault",
}
_PANEL_KINDS = {
    "fire": "fire",
    "co": "fire",
    "gas": "gas",
    "medical": "medical",
    "panic": "panic",
    "duress": "panic",
    "burglary": "intrusion",
    "general": "intrusion",
    "non_burglary": "intrusion",
    "tamper": "tamper",
}
_P = wire.Priority

#: ``hook(conn, incident, action, actor)`` runs inside the transaction of every op that changed ``incident`` (after
#: the change): ``action`` is "open" for a new incident, "event" for a gateway's event folded into one, or the
#: guard's action (ack, dispatch, on_scene, note, check, uncheck, resolve, close, finish, escalate). The grid link
#: queues its reports here, so a report is written with the state change that causes it.
IncidentHook = Callable[[Conn, dict[str, Any], str, str], None]


class IncidentConflict(StoreConflict):
    """The incident is not in a state that allows the action (someone else got there first). ``incident`` is the
    incident as it is now, ``winner`` the last step a person took on it (actor, action, at), if any."""

    def __init__(self, incident: dict[str, Any], action: str, winner: dict[str, Any] | None = None) -> None:
        super().__init__(f"incident {incident['id']} is {incident['state']}; cannot {action}")
        self.incident = incident
        self.action = action
        self.winner = winner


def _conflict(conn: Conn, incident_id: int, action: str) -> IncidentConflict:
    inc = get_incident(conn, incident_id)
    assert inc is not None
    row = conn.execute(
        "SELECT actor, action, at FROM incident_log WHERE incident_id = ? AND actor NOT LIKE 'gateway:%'"
        " AND actor != 'system' ORDER BY id DESC LIMIT 1",
        (incident_id,),
    ).fetchone()
    return IncidentConflict(inc, action, {"actor": row[0], "action": row[1], "at": row[2]} if row else None)


class IncidentError(ValueError):
    """A bad request for an action; ``key`` is an i18n key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


# ---------------------------------------------------------------- classifying events


def kind_by_priority(priority: int) -> str:
    if priority >= _P.FIRE:
        return "fire"
    if priority >= _P.PANIC:
        return "panic"
    if priority >= _P.INTRUSION:
        return "intrusion"
    if priority >= _P.TAMPER:
        return "tamper"
    return "fault"


def classify(etype: str, data: Mapping[str, Any], priority: int) -> str:
    """The checklist and report kind of an alarm event: one of :data:`KINDS`."""
    family = etype.split(".", 1)[0]
    sub = str(data.get("kind", ""))
    if family == "zone":
        if etype.startswith("zone.fault"):
            return "fault"
        if etype.startswith("zone.tamper"):
            return "fence_cut" if sub in ("cut", "short") else "tamper"
        return _ZONE_KINDS.get(sub) or kind_by_priority(priority)
    if family == "panel":
        if etype.startswith(("panel.trouble", "panel.test", "panel.unknown")):
            return "fault"
        if etype.startswith("panel.tamper"):
            return "tamper"
        if sub in _PANEL_KINDS:
            return _PANEL_KINDS[sub]
        return kind_by_priority(priority)
    if family in ("device", "reader", "gateway", "bus"):
        return "fault"
    if etype == "house.sos":
        return "panic"
    if family in ("care", "patrol"):  # raised by the portal's care watch (portal/care) and patrols (portal/patrol)
        return family
    if family == "door":  # forced or held open, a burst of scans: someone may be getting in
        return "tamper" if etype.startswith("door.tamper") else "intrusion"
    if family == "access":  # a blocked person at a reader
        return "intrusion"
    if etype.endswith(("tamper", "tamper_restore", "tamper_repeat")):
        return "tamper"
    return kind_by_priority(priority)


def _role(etype: str, data: Mapping[str, Any]) -> str:
    if etype in RESTORE_TYPES or etype.endswith("_restore") or "how" in data:
        return "restore"
    if etype.endswith("_repeat"):
        return "repeat"
    return "open"


def _opening_of(etype: str) -> str:
    """The opening type an unpaired closing type answers: ``door.tamper_restore`` → ``door.tamper``."""
    if etype.endswith("_restore"):
        return etype[: -len("_restore")]
    if etype.endswith(".restore"):
        return etype[: -len(".restore")] + ".alarm"
    if etype.endswith(".online"):
        return etype[: -len(".online")] + ".offline"
    return etype


def is_alarm(ev: Mapping[str, Any]) -> bool:
    """Does this event open (or belong to) an incident?"""
    etype = str(ev["type"])
    if etype in NOT_ALARMS or (
        etype.startswith(NOT_ALARM_PREFIXES) and etype not in SECURITY_EVENTS and etype not in UNPAIRED_ALARMS
    ):
        return False
    data = ev.get("data") or {}
    if isinstance(data.get("incident"), str | int) and not isinstance(data.get("incident"), bool):
        return True
    return etype in UNPAIRED_ALARMS or int(ev["priority"]) >= _P.TAMPER or _role(etype, data) == "restore"


# ---------------------------------------------------------------- presenting


_TR = {lang: i18n.Translator(lang) for lang in i18n.LANGUAGES}


def _texts(inc: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    data, place = inc["data"], inc["place"]
    title: dict[str, str] = {}
    where: dict[str, str] = {}
    for lang, tr in _TR.items():
        named = data.get("name_zh" if lang == "zh-CN" else "name_en")
        if isinstance(named, str) and named:
            title[lang] = named[:80]
        elif tr.has(f"event.{inc['type']}"):
            title[lang] = tr.event_label(inc["type"])
        else:
            title[lang] = tr(f"kind.{inc['kind']}")
        label = data.get("label")
        named = isinstance(label, str) and bool(label.strip())
        shown = {k: v for k, v in place.items() if k != "zone"} if named else place  # the label names the zone
        text = place_text(shown, tr) if any(shown.get(k) for k in ("building", "unit", "house", "zone", "door")) else ""
        if named:
            text = f"{label.strip()[:60]} {text}".strip()
        if not text and data.get("unknown_account") is True:  # a panel nobody configured: grouped by its account
            text = tr("place.unknown_account", account=str(data.get("account", "?"))[:16])
        if not text:
            text = str(inc.get("device") or place.get("site", ""))
        where[lang] = text
    return title, where


def incident_dict(row: Row) -> dict[str, Any]:
    """An incident as the board, the API and the socket show it (texts in both languages)."""
    d = {k: row[k] for k in row.keys()}  # noqa: SIM118  (Row is not a mapping)
    d["place"] = json.loads(d["place"])
    d["data"] = json.loads(d["data"])
    d["checks"] = json.loads(d["checks"])
    d["flags"] = json.loads(d.get("flags") or "[]")
    d["level"] = level_of(int(d["priority"]))
    d["title"], d["where"] = _texts(d)
    return d


# ---------------------------------------------------------------- reading


def with_notices(conn: Conn, incs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Attach to each incident what was sent about it to people outside: ``notices`` (channel, state, when) and
    ``grid`` (its report to the grid platform: number, delivery, the platform's status with who and when; None
    when it did not go up)."""
    by_id = {i["id"]: i for i in incs}
    for i in incs:
        i["notices"] = []
        i["grid"] = None
    if not by_id:
        return incs
    ids = db.values(conn, by_id)
    for r in conn.execute(
        "SELECT c.incident_id, c.number, c.status, c.status_at, c.status_by, c.status_note, c.reported_at,"
        " (SELECT o.state FROM grid_outbox o WHERE o.case_id = c.id AND o.state IN ('pending', 'failed')"
        "  ORDER BY o.state = 'failed' DESC LIMIT 1) AS waiting"
        f" FROM grid_cases c WHERE {db.in_values(conn, 'c.incident_id')}",
        (ids,),
    ):
        by_id[r["incident_id"]]["grid"] = {
            "number": r["number"],
            "status": r["status"],
            "at": r["status_at"],
            "by": r["status_by"],
            "note": r["status_note"],
            "reported_at": r["reported_at"],
            "delivery": r["waiting"] or "sent",
        }
    rows = conn.execute(
        "SELECT incident_id, channel, label, state, attempts, last_error, created_at, delivered_at FROM notifications"
        f" WHERE {db.in_values(conn, 'incident_id')} ORDER BY id",
        (ids,),
    )
    for r in rows:
        by_id[r["incident_id"]]["notices"].append(
            {
                "channel": r["channel"],
                "label": r["label"],
                "state": r["state"],
                "attempts": r["attempts"],
                "error": r["last_error"],
                "at": r["delivered_at"] or r["created_at"],
            }
        )
    return incs


def get_incident(conn: Conn, incident_id: int) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM incidents WHERE id = ?", (incident_id,)).fetchone()
    return with_notices(conn, [incident_dict(row)])[0] if row else None


def open_incidents(conn: Conn, limit: int = 500, sites: Sites = None) -> list[dict[str, Any]]:
    """Every incident not closed (of ``sites``; None: all): highest priority first, then newest first."""
    cond, args = site_sql("site", sites)
    rows = conn.execute(
        f"SELECT * FROM incidents WHERE state != 'closed' AND {cond} ORDER BY priority DESC,"
        " opened_at DESC, id DESC LIMIT ?",
        (*args, limit),
    )
    return with_notices(conn, [incident_dict(r) for r in rows])


def recent_closed(conn: Conn, limit: int = 20, sites: Sites = None) -> list[dict[str, Any]]:
    cond, args = site_sql("site", sites)
    rows = conn.execute(
        f"SELECT * FROM incidents WHERE state = 'closed' AND {cond} ORDER BY closed_at DESC, id DESC LIMIT ?",
        (*args, limit),
    )
    return with_notices(conn, [incident_dict(r) for r in rows])


def incident_log(conn: Conn, incident_id: int) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in conn.execute(
            "SELECT at, actor, action, detail, event_id FROM incident_log WHERE incident_id = ? ORDER BY id",
            (incident_id,),
        )
    ]


def arm_groups(conn: Conn, sites: Sites = None) -> list[dict[str, Any]]:
    cond, args = site_sql("site", sites)
    return [
        _group_dict(r) for r in conn.execute(f"SELECT * FROM arm_groups WHERE {cond} ORDER BY site, gateway, grp", args)
    ]


def recent_commands(conn: Conn, limit: int = 20, sites: Sites = None) -> list[dict[str, Any]]:
    cond, args = site_sql("site", sites)
    rows = conn.execute(
        f"SELECT * FROM console_commands WHERE {cond} ORDER BY sent_at DESC, id DESC LIMIT ?", (*args, limit)
    )
    return [command_dict(r) for r in rows]


def get_command(conn: Conn, command_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM console_commands WHERE id = ?", (command_id,)).fetchone()
    return command_dict(row) if row else None


def _group_dict(row: Row) -> dict[str, Any]:
    return {
        "site": row["site"],
        "gateway": row["gateway"],
        "group": row["grp"],
        "label": row["label"],
        "state": row["state"],
        "mode": row["mode"],
        "by": row["by_user"],
        "source": row["source"],
        "at": row["at"],
    }


def command_dict(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "site": row["site"],
        "gateway": row["gateway"],
        "type": row["type"],
        "args": json.loads(row["args"]),
        "by": row["by_user"],
        "sent_at": row["sent_at"],
        "status": row["status"],
        "detail": row["detail"],
        "result_at": row["result_at"],
    }


def max_event_pk(conn: Conn) -> int:
    return int(conn.execute("SELECT coalesce(max(pk), 0) FROM events").fetchone()[0])


def feed_pending(conn: Conn) -> bool:
    """Is anything the feed acts on stored past its cursor? (A read: what other transactions have not committed
    yet is found at a later look, as the cursor moves only under the whole lock.)"""
    sql = (
        "SELECT 1 FROM events WHERE pk > (SELECT coalesce(max(last_pk), 0) FROM incident_feed)"
        f" AND {_FEEDS_SQL} LIMIT 1"
    )
    return conn.execute(sql).fetchone() is not None


def feed_cursor(conn: Conn) -> int:
    row = conn.execute("SELECT last_pk FROM incident_feed WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


# ---------------------------------------------------------------- applying events


def _log(
    conn: Conn, incident_id: int, at: str, actor: str, action: str, detail: str = "", event_id: str | None = None
) -> None:
    conn.execute(
        "INSERT INTO incident_log (incident_id, at, actor, action, detail, event_id) VALUES (?, ?, ?, ?, ?, ?)",
        (incident_id, at, actor[:80], action, detail[:NOTE_MAX], event_id),
    )


def _restore_detail(data: Mapping[str, Any]) -> str:
    how = str(data.get("how", "restored"))[:20]
    by = data.get("by")
    return f"{how} by {str(by)[:60]}" if by else how


def apply_event(conn: Conn, ev: Mapping[str, Any], now: str | None = None) -> int | None:
    """Fold one stored event into the incidents; returns the id of the incident it changed, if any.

    Applying an event a second time changes nothing (its id is logged once, under a unique index).
    """
    if not is_alarm(ev):
        return None
    if conn.execute("SELECT 1 FROM incident_log WHERE event_id = ?", (ev["id"],)).fetchone():
        return None
    now = now or now_text()
    etype, data = str(ev["type"]), dict(ev.get("data") or {})
    prio = int(ev["priority"])
    role = _role(etype, data)
    actor = f"gateway:{ev['gateway']}"
    engine_id = data.get("incident")
    if isinstance(engine_id, str | int) and not isinstance(engine_id, bool):
        engine_id = str(engine_id)[:80]
        key = f"{ev['site']}/{ev['gateway']}/{engine_id}"
        row = conn.execute(
            "SELECT i.id, i.state FROM incident_keys k JOIN incidents i ON i.id = k.incident_id WHERE k.key = ?", (key,)
        ).fetchone()
    else:
        engine_id = None
        if role == "restore":  # an unpaired restore closes the newest matching open incident, if any
            row = conn.execute(
                "SELECT id, state FROM incidents WHERE key LIKE 'ev:%' AND site = ? AND gateway = ? AND type = ?"
                " AND device = ? AND point IS NOT DISTINCT FROM ? AND place = ? AND restored_at IS NULL"
                " AND state != 'closed' ORDER BY id DESC LIMIT 1",
                (
                    ev["site"],
                    ev["gateway"],
                    _opening_of(etype),
                    ev["device"],
                    ev.get("point"),
                    json.dumps(ev["place"], ensure_ascii=False, separators=(",", ":")),
                ),
            ).fetchone()
            if row is None:
                return None
        else:
            key, row = f"ev:{ev['id']}", None
    count = data.get("count")
    count = int(count) if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None
    reopened = ""  # the new incident's own key (incidents.key, unique) when a closed one's key leads to it
    if row is not None and engine_id is not None and role == "repeat" and row["state"] == "closed":
        seen = conn.execute("SELECT count FROM incidents WHERE id = ?", (row["id"],)).fetchone()[0]
        if (count or 1) > seen:
            # Activations the closed incident never counted: the gateway still holds its incident open (no restore
            # came, the guard's clear did not reach it) and the alarm came again. History is not where it goes: a
            # new incident, which the gateway's key leads to from now on.
            conn.execute("DELETE FROM incident_keys WHERE key = ?", (key,))
            row, reopened = None, f"{key}@{ev['id']}"
    folded = False
    if row is None and role != "restore":
        row = _fold_target(conn, ev, etype, role)
        if row is not None:
            folded = True
            conn.execute("INSERT INTO incident_keys (key, incident_id) VALUES (?, ?)", (key, row["id"]))
    if row is None:
        kind = classify(etype, data, prio)
        opening = etype if role == "open" else (etype[: -len("_repeat")] if role == "repeat" else _opening_of(etype))
        cur = conn.execute(
            "INSERT INTO incidents (key, site, gateway, engine_incident, kind, type, priority, place, device, point,"
            " label, data, first_event, opened_at, created_at, last_event_at, count, updated_at, fold_key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                reopened or key,
                ev["site"],
                ev["gateway"],
                engine_id,
                kind,
                opening,
                prio,
                json.dumps(ev["place"], ensure_ascii=False, separators=(",", ":")),
                ev["device"],
                ev.get("point"),
                str(data.get("label") or "")[:100],
                json.dumps(data, ensure_ascii=False),
                ev["id"],
                ev["ts"],
                now,
                ev["ts"],
                count or 1,
                now,
                fold_key(ev, opening),
            ),
        )
        iid = int(cur.fetchone()[0])
        conn.execute("INSERT INTO incident_keys (key, incident_id) VALUES (?, ?)", (key, iid))
    elif folded:  # another trip of a zone whose incident is still open: counted in it, not a new incident
        iid = int(row["id"])
        conn.execute(
            "UPDATE incidents SET trips = trips + 1, last_event_at = greatest(last_event_at, ?),"
            " priority = greatest(priority, ?), restored_at = NULL, restore_how = NULL, version = version + 1,"
            " updated_at = ? WHERE id = ?",
            (ev["ts"], prio, now, iid),
        )
    else:
        iid = int(row["id"])
        if role == "open":  # the opening came after a repeat or restore (a gap filled late): take its details
            conn.execute(
                "UPDATE incidents SET type = ?, data = ?, first_event = ?, opened_at = least(opened_at, ?)"
                " WHERE id = ?",
                (etype, json.dumps(data, ensure_ascii=False), ev["id"], ev["ts"], iid),
            )
        conn.execute(
            "UPDATE incidents SET count = greatest(count, ?), last_event_at = greatest(last_event_at, ?),"
            " priority = greatest(priority, ?), version = version + 1, updated_at = ? WHERE id = ?",
            (count or 1, ev["ts"], prio, now, iid),
        )
    if role == "restore":
        conn.execute(
            "UPDATE incidents SET restored_at = coalesce(restored_at, ?), restore_how = ? WHERE id = ?",
            (ev["ts"], _restore_detail(data), iid),
        )
        if row is None:
            conn.execute("UPDATE incidents SET count = greatest(count, ?) WHERE id = ?", (count or 1, iid))
    detail = _restore_detail(data) if role == "restore" else (f"count {count}" if count else "")
    if folded:
        trips = conn.execute("SELECT trips FROM incidents WHERE id = ?", (iid,)).fetchone()[0]
        _log(conn, iid, now, actor, "trip", f"{trips}", ev["id"])
    else:
        _log(conn, iid, now, actor, {"open": "alarm"}.get(role, role), detail, ev["id"])
    return iid


def fold_key(ev: Mapping[str, Any], opening: str) -> str:
    """What makes two trips "the same alarm of the same zone": the source (site, gateway, device, point), the
    opening type, the place, the kind (a fire never folds into a burglary of the same panel zone) and, for panels,
    the account and zone the report names. A second trip while the first one's incident is open folds into it."""
    data = ev.get("data") or {}
    place = json.dumps(ev["place"], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    kind = classify(opening, data, int(ev["priority"]))
    extra = [str(data.get(k))[:40] if data.get(k) is not None else None for k in ("account", "zone", "user")]
    return json.dumps(
        [ev["site"], ev["gateway"], ev["device"], ev.get("point"), opening, place, kind, *extra],
        ensure_ascii=False,
        separators=(",", ":"),
    )


def _fold_target(conn: Conn, ev: Mapping[str, Any], etype: str, role: str) -> Row | None:
    """The open incident of the same alarm that this trip is counted into, if any: one still active, or restored
    less than :data:`FOLD_RESTORED_S` before it. A trip long after its incident restored is a new alarm, which rings,
    even if nobody closed the old one (acknowledged, it would otherwise only count it, unheard)."""
    opening = etype if role == "open" else etype[: -len("_repeat")]
    since = datetime.fromisoformat(str(ev["ts"]).replace("Z", "+00:00")) - timedelta(seconds=FOLD_RESTORED_S)
    return conn.execute(
        f"SELECT id, state FROM incidents WHERE fold_key = ? AND state IN ({', '.join('?' * len(FOLD_STATES))})"
        " AND (restored_at IS NULL OR restored_at >= ?) ORDER BY id DESC LIMIT 1",
        (fold_key(ev, opening), *FOLD_STATES, ts_text(since)),
    ).fetchone()


def _apply_group(conn: Conn, ev: Mapping[str, Any]) -> dict[str, Any] | None:
    data = ev.get("data") or {}
    grp = data.get("group")
    if not isinstance(grp, str) or not grp:
        return None
    state = {"group.armed": "armed", "group.arming": "arming", "group.disarmed": "disarmed"}[ev["type"]]
    old = conn.execute(
        "SELECT g.at, e.seq FROM arm_groups g LEFT JOIN events e ON e.id = g.event_id"
        " WHERE g.site = ? AND g.gateway = ? AND g.grp = ?",
        (ev["site"], ev["gateway"], grp[:64]),
    ).fetchone()
    # A late re-send never rolls the state back. The gateway's own order is its sequence (a Pi's clock can be set
    # back, as after a power cut without a network: a disarm must not lose to the arm before it for its time).
    if old is not None and (int(old["seq"]) >= int(ev["seq"]) if old["seq"] is not None else old["at"] > ev["ts"]):
        return None
    conn.execute(
        "INSERT INTO arm_groups (site, gateway, grp, label, state, mode, by_user, source, at, event_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site, gateway, grp) DO UPDATE SET"
        " label = excluded.label, state = excluded.state, mode = excluded.mode, by_user = excluded.by_user,"
        " source = excluded.source, at = excluded.at, event_id = excluded.event_id",
        (
            ev["site"],
            ev["gateway"],
            grp[:64],
            str(data.get("label") or "")[:100],
            state,
            str(data.get("mode") or "")[:10] or None,
            str(data.get("by") or "")[:80],
            str(data.get("source") or "")[:20],
            ev["ts"],
            ev["id"],
        ),
    )
    row = conn.execute(
        "SELECT * FROM arm_groups WHERE site = ? AND gateway = ? AND grp = ?", (ev["site"], ev["gateway"], grp[:64])
    ).fetchone()
    return _group_dict(row)


def _apply_command_result(conn: Conn, ev: Mapping[str, Any]) -> dict[str, Any] | None:
    data = ev.get("data") or {}
    cid = data.get("command_id")
    if not isinstance(cid, str):
        return None
    cur = conn.execute(
        "UPDATE console_commands SET status = ?, detail = ?, result_at = ?, result_event = ?"
        " WHERE id = ? AND site = ? AND gateway = ? AND result_event IS NULL",
        (
            "ok" if data.get("ok") is True else "failed",
            str(data.get("detail") or "")[:300],
            ev["ts"],
            ev["id"],
            cid,
            ev["site"],
            ev["gateway"],
        ),
    )
    return get_command(conn, cid) if cur.rowcount else None


@dataclass
class FeedResult:
    incidents: list[dict[str, Any]] = field(default_factory=list)
    new_ids: list[int] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    last_pk: int = 0
    more: bool = False


#: What the feed can act on, as SQL over ``events``: a superset of :func:`is_alarm` and the arm states and command
#: answers (a key's name anywhere in ``data`` stands for the key). Routine events pass the cursor in the database.
_FEEDS_SQL = (
    f"(priority >= {int(_P.TAMPER)} OR type LIKE 'group.%' OR type = 'command.result' OR type LIKE '%_restore'"
    f" OR type IN ({', '.join(repr(t) for t in sorted(UNPAIRED_ALARMS | RESTORE_TYPES))})"
    """ OR data LIKE '%"incident"%' OR data LIKE '%"how"%')"""
)


def feed(conn: Conn, limit: int = FEED_CHUNK, now: str | None = None) -> FeedResult:
    """Apply the events stored since the last call (by ``events.pk``), at most ``limit`` of those it can act on.

    Runs under the store's whole lock (every event below the newest is committed). Routine events are passed over
    in the query (:data:`_FEEDS_SQL`): with several instances, every feed holds back every instance's batches while
    it runs, and reading each routine event to find it is none of the feed's made the feed most of that."""
    last = feed_cursor(conn)
    top_pk = int(conn.execute("SELECT coalesce(max(pk), 0) FROM events").fetchone()[0])
    rows = conn.execute(
        "SELECT pk, id, site, gateway, seq, ts, type, device, point, priority, place, data,"
        f" received_at FROM events WHERE pk > ? AND pk <= ? AND {_FEEDS_SQL} ORDER BY pk LIMIT ?",
        (last, top_pk, limit),
    ).fetchall()
    more = len(rows) == limit
    out = FeedResult(last_pk=int(rows[-1][0]) if more else top_pk, more=more)
    changed: dict[int, None] = {}
    top = int(conn.execute("SELECT coalesce(max(id), 0) FROM incidents").fetchone()[0])
    for r in rows:
        ev = event_dict(tuple(r)[1:])
        try:
            etype = ev["type"]
            if etype in ("group.armed", "group.arming", "group.disarmed"):
                g = _apply_group(conn, ev)
                if g is not None:
                    out.groups.append(g)
            elif etype == "command.result":
                c = _apply_command_result(conn, ev)
                if c is not None:
                    out.commands.append(c)
            else:
                iid = apply_event(conn, ev, now)
                if iid is not None:
                    changed[iid] = None
        except (KeyError, TypeError, ValueError) as e:  # a malformed event must not stop the feed
            conn.execute(
                "INSERT INTO rejections (reason, source, count, first_at, last_at, last_detail)"
                " VALUES ('incident-feed', ?, 1, ?, ?, ?) ON CONFLICT (reason, source) DO UPDATE SET"
                " count = rejections.count + 1, last_at = excluded.last_at, last_detail = excluded.last_detail",
                (f"{ev.get('site')}/{ev.get('gateway')}", now_text(), now_text(), f"{ev.get('id')}: {e}"[:300]),
            )
    if out.last_pk != last:
        conn.execute("UPDATE incident_feed SET last_pk = ? WHERE id = 1", (out.last_pk,))
    for iid in changed:
        inc = get_incident(conn, iid)
        if inc is not None:
            out.incidents.append(inc)
            if iid > top:
                out.new_ids.append(iid)
    return out


# ---------------------------------------------------------------- guards' actions


def _clean(text: object, limit: int) -> str:
    s = " ".join(str(text or "").split())
    return "".join(c for c in s if c.isprintable())[:limit]


def act(
    conn: Conn,
    incident_id: int,
    action: str,
    actor: str,
    *,
    now: str | None = None,
    guard: str = "",
    cause: str = "",
    text: str = "",
    step: int | None = None,
    done: bool = True,
    steps_of: Callable[[str], int] | None = None,
    must_check: Callable[[str], bool] | None = None,
    audit_detail: str = "",
    flags: Sequence[str] = (),
    seen_guard: str | None = None,
) -> dict[str, Any]:
    """Take one workflow action; returns the incident after it.

    Raises :class:`LookupError` (no such incident), :class:`IncidentError` (a bad request) or
    :class:`IncidentConflict` (not allowed in the incident's state: the caller answers 409 with its owner).
    ``steps_of(kind)`` is the length of a kind's checklist (for ``check``); ``must_check(kind)``: the whole
    checklist must be ticked before an incident of that kind is resolved (``resolve`` and ``finish``).
    ``finish`` resolves with a cause and closes in one step (two log rows, one transaction). ``flags`` (resolve and
    finish): marks of :data:`FLAGS`. ``seen_guard`` (dispatch): the responder the guard saw sent ('' for none); one
    sent since by another guard makes it a conflict, so two guards sending two people cannot both win.
    """
    if action not in ACTIONS:
        raise IncidentError("board.bad_action")
    inc = get_incident(conn, incident_id)
    if inc is None:
        raise LookupError(incident_id)
    allowed, to = ACTIONS[action]
    if inc["state"] not in allowed:
        raise _conflict(conn, incident_id, action)
    if action == "dispatch" and seen_guard is not None and (inc["dispatched_to"] or "") != seen_guard:
        raise _conflict(conn, incident_id, action)
    now = now or now_text()
    note = _clean(text, NOTE_MAX)
    sets: dict[str, Any] = {}
    detail = note
    logged = action
    if action == "ack":
        sets = {"owner": actor, "acknowledged_at": now}
    elif action == "dispatch":
        who = _clean(guard, GUARD_MAX)
        if not who:
            raise IncidentError("board.need_guard")
        sets = {"dispatched_to": who, "dispatched_at": now, "dispatched_by": actor}
        detail = f"{who}{' · ' + note if note else ''}"
    elif action == "on_scene":
        sets = {"on_scene_at": now}
    elif action in ("resolve", "finish"):
        if cause not in CAUSES:
            raise IncidentError("board.need_cause")
        if must_check is not None and must_check(inc["kind"]):
            steps = steps_of(inc["kind"]) if steps_of is not None else 0
            if any(str(i) not in inc["checks"] for i in range(steps)):
                raise IncidentError("board.checklist_incomplete")
        if not set(flags) <= set(FLAGS):
            raise IncidentError("board.bad_flags")
        marks = sorted(set(flags))
        sets = {"cause": cause, "resolved_at": now, "resolved_by": actor, "flags": json.dumps(marks)}
        detail = f"{cause}{' · ' + ', '.join(marks) if marks else ''}{' · ' + note if note else ''}"
        if action == "finish":
            sets.update(closed_at=now, closed_by=actor)
            _log(conn, incident_id, now, actor, "resolve", detail)
            audit.write(conn, actor, "alarm.resolve", f"incident:{incident_id}", detail, at=now)
            detail, logged = "", "close"
    elif action == "close":
        sets = {"closed_at": now, "closed_by": actor}
    elif action == "note":
        if not note:
            raise IncidentError("board.need_note")
    elif action == "check":
        steps = steps_of(inc["kind"]) if steps_of is not None else 0
        if step is None or not 0 <= step < steps:
            raise IncidentError("board.bad_step")
        checks = dict(inc["checks"])
        key = str(step)
        if done:
            checks[key] = {"by": actor, "at": now}
        else:
            checks.pop(key, None)
        sets = {"checks": json.dumps(checks, ensure_ascii=False)}
        detail = str(step)
        logged = "check" if done else "uncheck"
    if to is not None:
        sets["state"] = to
    cols = ", ".join(f"{k} = ?" for k in sets)
    # optimistic: only the version read above is changed (a writer that got in between wins; this one is told)
    if not conn.execute(
        f"UPDATE incidents SET {cols}{', ' if cols else ''}version = version + 1, updated_at = ?"
        " WHERE id = ? AND version = ?",
        (*sets.values(), now, incident_id, inc["version"]),
    ).rowcount:
        raise _conflict(conn, incident_id, action)
    _log(conn, incident_id, now, actor, logged, detail)
    audit.write(conn, actor, f"alarm.{logged}", f"incident:{incident_id}", audit_detail or detail, at=now)
    out = get_incident(conn, incident_id)
    assert out is not None
    return out


def zone_of(inc: Mapping[str, Any]) -> str:
    """The zone an incident is about, for acknowledging a zone's incidents together: the site and the zone's name
    (or the door, or the device and point when the place names no zone)."""
    place, data = inc["place"], inc["data"]
    name = place.get("zone") or data.get("zone") or place.get("door")
    if not name:
        name = f"{inc['device']}:{inc['point'] or ''}"
    return f"{inc['site']}/{name}"


def ack_many(
    conn: Conn,
    actor: str,
    *,
    kind: str | None = None,
    zone: str | None = None,
    upto: int,
    sites: Sites = None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """Acknowledge every unacknowledged incident of one kind or one zone (of ``sites``) with an id up to ``upto``
    (what the guard saw: anything newer rings on). One transaction; each incident's log has its ack, and one
    audit row lists them all."""
    if (kind is None) == (zone is None):
        raise IncidentError("board.bulk_what")
    now = now or now_text()
    cond, args = site_sql("site", sites)
    rows = conn.execute(
        f"SELECT * FROM incidents WHERE state = 'new' AND id <= ? AND {cond} ORDER BY id", (upto, *args)
    ).fetchall()
    chosen = [incident_dict(r) for r in rows]
    chosen = [i for i in chosen if (i["kind"] == kind if kind is not None else zone_of(i) == zone)]
    what = f"kind {kind}" if kind is not None else f"zone {zone}"
    out = []
    for inc in chosen:
        conn.execute(
            "UPDATE incidents SET state = 'acknowledged', owner = ?, acknowledged_at = ?,"
            " version = version + 1, updated_at = ? WHERE id = ?",
            (actor, now, now, inc["id"]),
        )
        _log(conn, inc["id"], now, actor, "ack", f"bulk: {what}")
        got = get_incident(conn, inc["id"])
        assert got is not None
        out.append(got)
    if out:
        audit.write(
            conn,
            actor,
            "alarm.ack_bulk",
            what[:200],
            f"{len(out)} incidents: {', '.join(str(i['id']) for i in out)}"[:NOTE_MAX],
            at=now,
        )
    return out


class AckMany(Op):
    def __init__(self, actor: str, hooks: Sequence[IncidentHook] = (), **kw: Any) -> None:
        self.actor, self.hooks, self.kw = actor, hooks, kw

    def apply(self, tx: Tx) -> list[dict[str, Any]]:
        out = ack_many(tx.conn, self.actor, **self.kw)
        run_hooks(tx.conn, self.hooks, out, "ack", self.actor)
        return [get_incident(tx.conn, i["id"]) or i for i in out] if self.hooks else out


#: States from which the incident's own source may still end it (nobody has been sent yet).
SETTLE_STATES = ("new", "acknowledged")


def settle(
    conn: Conn, incident_id: int, actor: str, cause: str, note: str, now: str | None = None
) -> dict[str, Any] | None:
    """The alarm's own source ends it (a resident answering a care check with "我很好"): resolved with ``cause`` and
    closed in one step, by ``actor``, while nobody has been sent (:data:`SETTLE_STATES`). Once a guard is on the
    way the incident stays open with a note, for the guard to finish. Returns the incident after, None if none."""
    inc = get_incident(conn, incident_id)
    if inc is None or inc["state"] == "closed":
        return inc
    if cause not in CAUSES:
        raise IncidentError("board.need_cause")
    now = now or now_text()
    text = _clean(note, NOTE_MAX)
    if inc["state"] in SETTLE_STATES:
        conn.execute(
            "UPDATE incidents SET state = 'closed', cause = ?, resolved_at = ?, resolved_by = ?,"
            " closed_at = ?, closed_by = ?, version = version + 1, updated_at = ? WHERE id = ?",
            (cause, now, actor, now, actor, now, incident_id),
        )
        _log(conn, incident_id, now, actor, "resolve", f"{cause}{' · ' + text if text else ''}")
        _log(conn, incident_id, now, actor, "close")
        audit.write(conn, actor, "alarm.settle", f"incident:{incident_id}", f"{cause} · {text}", at=now)
    else:
        _log(conn, incident_id, now, actor, "note", text)
        audit.write(conn, actor, "alarm.note", f"incident:{incident_id}", text, at=now)
    return get_incident(conn, incident_id)


def escalate(conn: Conn, incident_ids: Sequence[int], now: str | None = None) -> list[dict[str, Any]]:
    """Mark these incidents escalated if they are still unacknowledged; returns the ones marked now."""
    now = now or now_text()
    out = []
    for iid in incident_ids:
        cur = conn.execute(
            "UPDATE incidents SET escalated_at = ?, version = version + 1, updated_at = ?"
            " WHERE id = ? AND state = 'new' AND escalated_at IS NULL",
            (now, now, iid),
        )
        if cur.rowcount:
            _log(conn, iid, now, "system", "escalate")
            audit.write(conn, "system", "alarm.escalate", f"incident:{iid}", at=now)
            inc = get_incident(conn, iid)
            if inc is not None:
                out.append(inc)
    return out


# ---------------------------------------------------------------- console commands (arm / disarm)


def record_command(conn: Conn, cmd: wire.Command, site: str, gateway: str) -> dict[str, Any]:
    conn.execute(
        "INSERT INTO console_commands (id, site, gateway, type, args, by_user, sent_at, status)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 'sending')",
        (
            cmd.id,
            site,
            gateway,
            cmd.type,
            json.dumps(cmd.args, ensure_ascii=False),
            cmd.by,
            cmd.ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        ),
    )
    audit.write(
        conn,
        cmd.by,
        f"alarm.{cmd.type}",
        f"group:{site}/{gateway}/{cmd.args.get('group', '')}",
        json.dumps(cmd.args, ensure_ascii=False, sort_keys=True) + f" command {cmd.id}",
    )
    out = get_command(conn, cmd.id)
    assert out is not None
    return out


def command_sent(conn: Conn, command_id: str, sent: bool, detail: str = "") -> dict[str, Any] | None:
    """After the publish: ``sent`` or ``unsent`` (unless the gateway's answer is already in)."""
    conn.execute(
        "UPDATE console_commands SET status = ?, detail = ? WHERE id = ? AND status = 'sending'",
        ("sent" if sent else "unsent", detail[:300], command_id),
    )
    return get_command(conn, command_id)


# ---------------------------------------------------------------- store ops


def run_hooks(
    conn: Conn, hooks: Sequence[IncidentHook], incs: Sequence[dict[str, Any]], action: str, actor: str
) -> None:
    for hook in hooks:
        for inc in incs:
            hook(conn, inc, action, actor)


class FeedIncidents(Op):
    def __init__(self, limit: int = FEED_CHUNK, now: str | None = None, hooks: Sequence[IncidentHook] = ()) -> None:
        self.limit, self.now, self.hooks = limit, now, hooks

    def apply(self, tx: Tx) -> FeedResult:
        res = feed(tx.conn, self.limit, self.now)
        if self.hooks:
            for inc in res.incidents:
                run_hooks(tx.conn, self.hooks, [inc], "open" if inc["id"] in res.new_ids else "event", "system")
            res.incidents = [get_incident(tx.conn, i["id"]) or i for i in res.incidents]
        return res


class IncidentAction(Op):
    def __init__(
        self, incident_id: int, action: str, actor: str, hooks: Sequence[IncidentHook] = (), **kw: Any
    ) -> None:
        self.incident_id, self.action, self.actor, self.hooks, self.kw = incident_id, action, actor, hooks, kw

    def apply(self, tx: Tx) -> dict[str, Any]:
        inc = act(tx.conn, self.incident_id, self.action, self.actor, **self.kw)
        unchecked = self.action == "check" and not self.kw.get("done", True)
        run_hooks(tx.conn, self.hooks, [inc], "uncheck" if unchecked else self.action, self.actor)
        return (get_incident(tx.conn, self.incident_id) or inc) if self.hooks else inc


class Escalate(Op):
    def __init__(self, incident_ids: Sequence[int], now: str | None = None, hooks: Sequence[IncidentHook] = ()) -> None:
        self.ids, self.now, self.hooks = list(incident_ids), now, hooks

    def apply(self, tx: Tx) -> list[dict[str, Any]]:
        out = escalate(tx.conn, self.ids, self.now)
        run_hooks(tx.conn, self.hooks, out, "escalate", "system")
        return out


# ---------------------------------------------------------------- residents of a flat (read defensively)


def mask_phone(phone: str) -> str:
    """Never the whole number: 138****5678 for a mobile, the last four digits otherwise."""
    digits = "".join(c for c in str(phone) if c.isdigit())
    if len(digits) >= 11:
        return digits[:3] + "*" * (len(digits) - 7) + digits[-4:]
    if len(digits) > 4:
        return "*" * (len(digits) - 4) + digits[-4:]
    return "*" * len(digits)


def residents_of(conn: Conn, place: Mapping[str, Any], today: date, masked: bool = True) -> list[dict[str, str]] | None:
    """The registered residents (masked phones unless ``masked`` is False) of the flat in ``place``; None when the
    place is not a flat, empty when the registry has nobody there (or is not there). Unit may be missing in the
    event; the flat is then matched on building and house number when that is unambiguous."""
    site, building, unit, house = (place.get(k) for k in ("site", "building", "unit", "house"))
    if not (site and building and house):
        return None
    if not db.has_tables(conn, "reg_sites", "reg_buildings", "reg_units", "reg_houses", "reg_residents", "reg_people"):
        return []
    sql = (
        "SELECT h.id FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b"
        " ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id WHERE s.code = ? AND b.code = ?"
        " AND h.code = ?"
    )
    args: list[Any] = [site, building, house]
    if unit:
        sql += " AND u.code = ?"
        args.append(unit)
    try:
        houses = conn.execute(sql + " LIMIT 2", args).fetchall()
        if len(houses) != 1:
            return []
        rows = conn.execute(
            "SELECT p.name, p.phone, r.role, r.move_in, r.move_out, r.lease_end FROM reg_residents r"
            " JOIN reg_people p ON p.id = r.person_id WHERE r.house_id = ? AND r.status = 'active' ORDER BY r.id",
            (houses[0][0],),
        ).fetchall()
    except db.Error:  # a registry of another shape: show nobody rather than fail the alarm
        return []
    day = today.isoformat()
    out = []
    for r in rows:
        if (
            (r["move_in"] and r["move_in"] > day)
            or (r["move_out"] and r["move_out"] <= day)
            or (r["role"] == "tenant" and r["lease_end"] and r["lease_end"] < day)
        ):
            continue  # not yet, moved out, or past the lease (an earlier stay of someone living here again)
        phone = mask_phone(r["phone"]) if masked else "".join(c for c in str(r["phone"]) if c.isdigit() or c == "+")
        out.append({"name": str(r["name"])[:60], "role": str(r["role"]), "phone": phone})
    return out


def reveal_phones(
    conn: Conn, incident_id: int, actor: str, reason: str, today: date, remote: str = "", now: str | None = None
) -> list[dict[str, str]] | None:
    """The flat's residents with their whole phone numbers, for the guard handling the incident to call them;
    audited with the reason and logged on the incident. None when the incident's place is no flat (nothing shown,
    nothing audited). Raises LookupError when there is no such incident."""
    inc = get_incident(conn, incident_id)
    if inc is None:
        raise LookupError(incident_id)
    why = _clean(reason, 200)
    if not why:
        raise IncidentError("board.need_reason")
    people = residents_of(conn, inc["place"], today, masked=False)
    if not people:
        return people
    now = now or now_text()
    _log(conn, incident_id, now, actor, "reveal", why)
    audit.write(
        conn, actor, "reveal.phones", f"incident:{incident_id}", f"{len(people)} numbers · {why}", remote=remote, at=now
    )
    return people


def audit_view(conn: Conn, actor: str, incident_id: int, remote: str = "") -> None:
    """Note in the registry's audit trail (when there is one) that a guard saw a flat's residents."""
    if db.has_tables(conn, "audit", "audit_anchor"):
        audit.write(conn, actor, "view.incident", f"incident:{incident_id}", remote=remote)


def parse_ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
