"""The care watch's records, on a store connection (the writer thread, or a reader; SQLite or PostgreSQL).

A **household** (``care_households``) is a flat watched for the wellbeing of the residents living there alone: who is
cared for (``care_people``: only their own passes and phone unlocks count as their activity), a named contact with a
phone (a family member, the grid worker), the consent (who gave it, how, when) and the rules' settings: alert after
``hours`` without activity, and on activity between ``night_from`` and ``night_to`` (site-local) when
``night_watch`` is on. ``watch_from`` is when the no-activity clock last restarted.

An **alert** (``care_alerts``) is one rule firing. It leads to one incident on the alarm board (``incident_key``,
the key :mod:`portal.alarms.incidents` files it under): care alerts are events the portal raises itself (type
``care.<rule>``, data ``incident: "care:<alert id>"``), so the board makes incidents of kind ``care`` of them, rings,
escalates and reports them like any alarm. A panic from the flat's own indoor panel (or a help call from its plate)
is already an incident of its own; it is recorded as an alert of rule ``panic`` pointing at that incident, never a
second one. An alert is open while its incident is not closed and nobody answered it with "我很好".

Phone numbers are kept whole here; whoever shows them to guards masks them (:func:`portal.estate.registry.mask_phone`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from gateway import wire
from portal.estate import registry as reg
from portal.store import Conn, Row, audit, db
from portal.web.scope import Sites
from portal.web.scope import sql as site_sql

RULES = ("no_activity", "night_activity", "panel_inactive", "panic")
#: the rules that raise an incident of their own (a panic is already one)
OWN_RULES = ("no_activity", "night_activity", "panel_inactive")
#: how consent was given: the resident (or family living there) on the phone, or recorded by the property office
CONSENT_HOW = ("resident_phone", "written", "in_person", "phone_call")
OFFICE_CONSENT = ("written", "in_person", "phone_call")
HOURS_MIN, HOURS_MAX, HOURS_DEFAULT = 1, 168, 24
HOURS_CHOICES = (12, 24, 36, 48, 72)  # offered on the phone; the office may set any whole hour in range
NIGHT_DEFAULT = ("00:00", "05:00")
PRIORITY = int(wire.Priority.INTRUSION)  # rings and escalates like an intrusion
RELATION_MAX = 20
NOTE_MAX = 200
HHMM_RE = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
#: Contact ID codes of an indoor panel's inactivity ("senior watch") timer
SENIOR_WATCH_CODES = frozenset({641})
#: panel alarm kinds a person raises by hand: activity, and a panic of the household
PANIC_KINDS = frozenset({"panic", "duress", "medical"})


class CareError(ValueError):
    """A refused enrolment or change; ``key`` is an i18n key, ``field`` the form field at fault (if any)."""

    def __init__(self, key: str, field: str = "") -> None:
        super().__init__(key)
        self.key = key
        self.field = field


@dataclass(frozen=True, slots=True)
class Settings:
    """A validated enrolment (or change): who is cared for, the contact, the rules, the consent."""

    people: tuple[int, ...]
    contact_name: str
    contact_relation: str
    contact_phone: str
    hours: int
    night_watch: bool
    night_from: str
    night_to: str
    consent_by: str
    consent_how: str
    consent_at: str  # UTC text
    consent_note: str = ""


@dataclass(frozen=True, slots=True)
class Household:
    id: int
    house_id: int
    site: str
    building: str
    unit: str
    house: str
    status: str
    hours: int
    night_watch: bool
    night_from: str
    night_to: str
    contact_name: str
    contact_relation: str
    contact_phone: str
    consent_by: str
    consent_how: str
    consent_at: str
    consent_note: str
    enrolled_by: str
    created_at: str
    updated_at: str
    updated_by: str
    ended_at: str | None
    ended_by: str | None
    watch_from: str
    last_activity_at: str | None
    last_activity: str
    people: tuple[int, ...]

    @property
    def place(self) -> dict[str, str]:
        return {"site": self.site, "building": self.building, "unit": self.unit, "house": self.house}

    @property
    def house_ref(self) -> str:
        return f"{self.building}-{self.unit}-{self.house}"


def ts_text(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


# ---------------------------------------------------------------- validating input


def _clean(raw: object, limit: int) -> str:
    s = " ".join(str(raw or "").split())
    return "".join(c for c in s if c.isprintable() and c not in "<>")[:limit]


def parse_settings(
    form: Mapping[str, Any], people: Iterable[int], *, office: bool, now: datetime, tz: ZoneInfo, consent_name: str = ""
) -> Settings:
    """Check an enrolment form. ``people``: who may be cared for (the flat's residents living there today).
    ``office``: the property office records someone else's consent (consent_by, consent_how, consent_date);
    otherwise the signed-in resident gives it on the phone (``consent_name``). Raises :class:`CareError`."""
    allowed = set(people)
    chosen: list[int] = []
    raw_people = form.getall("person", []) if hasattr(form, "getall") else form.get("person", [])
    if isinstance(raw_people, str):
        raw_people = [raw_people]
    for raw in raw_people:
        try:
            pid = int(str(raw))
        except ValueError:
            raise CareError("care.need_person", "person") from None
        if pid not in allowed:
            raise CareError("care.need_person", "person")
        if pid not in chosen:
            chosen.append(pid)
    if not chosen:
        raise CareError("care.need_person", "person")
    name = reg.clean_name(str(form.get("contact_name", "")))
    if name is None:
        raise CareError("care.bad_contact_name", "contact_name")
    phone = reg.normalize_phone(str(form.get("contact_phone", "")))
    if phone is None:
        raise CareError("care.bad_contact_phone", "contact_phone")
    relation = _clean(form.get("contact_relation", ""), RELATION_MAX)
    try:
        hours = int(str(form.get("hours", HOURS_DEFAULT)))
    except ValueError:
        raise CareError("care.bad_hours", "hours") from None
    if not HOURS_MIN <= hours <= HOURS_MAX:
        raise CareError("care.bad_hours", "hours")
    night_watch = str(form.get("night_watch", "")) == "1"
    night_from = str(form.get("night_from", NIGHT_DEFAULT[0])).strip() or NIGHT_DEFAULT[0]
    night_to = str(form.get("night_to", NIGHT_DEFAULT[1])).strip() or NIGHT_DEFAULT[1]
    if not (HHMM_RE.match(night_from) and HHMM_RE.match(night_to)) or night_from == night_to:
        raise CareError("care.bad_night", "night_from")
    if office:
        consent_by = _clean(form.get("consent_by", ""), reg.MAX_NAME)
        if not consent_by:
            raise CareError("care.need_consent", "consent_by")
        how = str(form.get("consent_how", ""))
        if how not in OFFICE_CONSENT:
            raise CareError("care.bad_consent_how", "consent_how")
        day = reg.parse_day(str(form.get("consent_date", "")))
        if day is None:
            raise CareError("care.bad_consent_date", "consent_date")
        given = datetime.combine(date.fromisoformat(day), time(12), tz)
        if given.date() > now.astimezone(tz).date():
            raise CareError("care.bad_consent_date", "consent_date")
        consent_at = ts_text(min(given, now))
        note = _clean(form.get("consent_note", ""), NOTE_MAX)
    else:
        consent_by, how, consent_at, note = consent_name[: reg.MAX_NAME], "resident_phone", ts_text(now), ""
    return Settings(
        tuple(chosen),
        name,
        relation,
        phone,
        hours,
        night_watch,
        night_from,
        night_to,
        consent_by,
        how,
        consent_at,
        note,
    )


# ---------------------------------------------------------------- reading

_HH_SQL = (
    "SELECT c.*, b.code AS building, u.code AS unit, h.code AS house FROM care_households c"
    " JOIN reg_houses h ON h.id = c.house_id JOIN reg_units u ON u.id = h.unit_id"
    " JOIN reg_buildings b ON b.id = u.building_id"
)


def _household(conn: Conn, row: Row) -> Household:
    people = tuple(
        int(r[0])
        for r in conn.execute("SELECT person_id FROM care_people WHERE care_id = ? ORDER BY person_id", (row["id"],))
    )
    return Household(
        row["id"],
        row["house_id"],
        row["site"],
        row["building"],
        row["unit"],
        row["house"],
        row["status"],
        row["hours"],
        bool(row["night_watch"]),
        row["night_from"],
        row["night_to"],
        row["contact_name"],
        row["contact_relation"],
        row["contact_phone"],
        row["consent_by"],
        row["consent_how"],
        row["consent_at"],
        row["consent_note"],
        row["enrolled_by"],
        row["created_at"],
        row["updated_at"],
        row["updated_by"],
        row["ended_at"],
        row["ended_by"],
        row["watch_from"],
        row["last_activity_at"],
        row["last_activity"],
        people,
    )


def household(conn: Conn, care_id: int) -> Household | None:
    row = conn.execute(_HH_SQL + " WHERE c.id = ?", (care_id,)).fetchone()
    return _household(conn, row) if row else None


def household_of_house(conn: Conn, house_id: int) -> Household | None:
    """The flat's household under care now, if any."""
    row = conn.execute(_HH_SQL + " WHERE c.house_id = ? AND c.status = 'active'", (house_id,)).fetchone()
    return _household(conn, row) if row else None


def households(conn: Conn, sites: Sites = None, *, active: bool = True) -> list[Household]:
    cond, args = site_sql("c.site", sites)
    rows = conn.execute(
        _HH_SQL
        + f" WHERE {cond}"
        + (" AND c.status = 'active'" if active else "")
        + " ORDER BY c.site, b.code, u.code, h.code",
        args,
    ).fetchall()
    return sorted(
        (_household(conn, r) for r in rows),
        key=lambda h: (h.site, reg.sort_key(h.building), reg.sort_key(h.unit), reg.sort_key(h.house)),
    )


def house_of_place(conn: Conn, place: Mapping[str, Any]) -> int | None:
    """The registry's house of an event's place (site, building, unit, house), if it names one."""
    site, building, unit, house = (place.get(k) for k in ("site", "building", "unit", "house"))
    if not (isinstance(site, str) and isinstance(building, str) and isinstance(unit, str) and isinstance(house, str)):
        return None
    row = conn.execute(
        "SELECT h.id FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b"
        " ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id WHERE s.code = ? AND b.code = ?"
        " AND u.code = ? AND h.code = ?",
        (site, building, unit, house),
    ).fetchone()
    return int(row[0]) if row else None


def people_names(conn: Conn, person_ids: Iterable[int]) -> list[str]:
    ids = list(person_ids)
    if not ids:
        return []
    rows = conn.execute(
        f"SELECT id, name FROM reg_people WHERE {db.in_values(conn, 'id')}", (db.values(conn, ids),)
    ).fetchall()
    names = {r["id"]: r["name"] for r in rows}
    return [str(names[i]) for i in ids if i in names]


def candidates(conn: Conn, house_id: int, today: str) -> list[reg.Resident]:
    """Who may be cared for: the flat's residents living there today."""
    return [r for r in reg.household(conn, house_id, statuses=("active",)) if r.active(today)]


def alerts(conn: Conn, care_id: int, limit: int = 50) -> list[dict[str, Any]]:
    """The household's alerts, newest first, with their incident's id and state (None: not on the board yet)."""
    rows = conn.execute(
        "SELECT a.*, i.id AS incident_id, i.state AS incident_state, i.closed_at, i.closed_by,"
        " (i.id IS NULL AND EXISTS (SELECT 1 FROM events e WHERE e.id = a.event_id"
        " AND e.pk > coalesce((SELECT last_pk FROM incident_feed WHERE id = 1), 0))) AS unfed FROM care_alerts a"
        " LEFT JOIN incident_keys k ON k.key = a.incident_key LEFT JOIN incidents i ON i.id = k.incident_id"
        " WHERE a.care_id = ? ORDER BY a.id DESC LIMIT ?",
        (care_id, limit),
    ).fetchall()
    out = []
    for r in rows:
        d = dict(r)
        d["detail"] = json.loads(d["detail"] or "{}")
        d["open"] = _is_open(d)
        out.append(d)
    return out


def _is_open(a: Mapping[str, Any]) -> bool:
    """Not answered with "我很好", and its incident open (or not on the board yet: its event not fed to it). An
    alert whose incident is gone (purged with its year-old history) is not open."""
    if a["cleared_at"] is not None:
        return False
    if a["incident_state"] is None:
        return bool(a["unfed"])
    return bool(a["incident_state"] != "closed")


def open_alerts(conn: Conn, care_id: int) -> list[dict[str, Any]]:
    return [a for a in alerts(conn, care_id, 200) if a["open"]]


def open_rule(conn: Conn, care_id: int, rule: str, *, unanswered: bool = False) -> dict[str, Any] | None:
    """An open alert of ``rule``; ``unanswered``: one that no sign of life has answered since (an alert answered
    by activity, restored on the board, stays open until a guard closes it, and a new silence is a new alert)."""
    return next(
        (a for a in open_alerts(conn, care_id) if a["rule"] == rule and not (unanswered and a["detail"].get("seen"))),
        None,
    )


#: the latest close of a household's no-activity or panel-inactivity alert (``c``: its care_households row)
_LAST_CLOSE_SQL = (
    "(SELECT max(i.closed_at) FROM care_alerts a JOIN incident_keys k ON k.key = a.incident_key"
    " JOIN incidents i ON i.id = k.incident_id WHERE a.care_id = c.id AND a.rule IN ('no_activity', 'panel_inactive')"
    " AND i.state = 'closed')"
)


def _since(watch_from: str, closed: str | None) -> str:
    return max(watch_from, closed) if closed else watch_from


def effective_from(conn: Conn, h: Household) -> str:
    """Where the no-activity clock runs from: the household's watch_from, or the close of its latest no-activity or
    panel-inactivity alert when a guard closed one after that (the guard saw the resident: the clock restarts)."""
    row = conn.execute(f"SELECT {_LAST_CLOSE_SQL} FROM care_households c WHERE c.id = ?", (h.id,)).fetchone()
    return _since(h.watch_from, row[0] if row else None)


def clock_bases(conn: Conn, care_id: int | None = None) -> dict[int, tuple[str, int]]:
    """What the no-activity clocks of the households under care (all, or one) run from, in one query: their
    :func:`effective_from` and hours, by household."""
    rows = conn.execute(
        f"SELECT c.id, c.watch_from, c.hours, {_LAST_CLOSE_SQL} FROM care_households c WHERE c.status = 'active'"
        + (" AND c.id = ?" if care_id is not None else ""),
        () if care_id is None else (care_id,),
    ).fetchall()
    return {int(r[0]): (_since(str(r[1]), r[3]), int(r[2])) for r in rows}


def care_of_incident(conn: Conn, incident: Mapping[str, Any]) -> tuple[Household, dict[str, Any] | None] | None:
    """The household an incident is about, and the care alert it is, if any: an alert's incident names it; any other
    incident at a flat under care (a fire, a panic, a fault of its panel) belongs to that flat's household."""
    row = conn.execute(
        "SELECT a.* FROM incident_keys k JOIN care_alerts a ON a.incident_key = k.key WHERE k.incident_id = ?"
        " ORDER BY a.id LIMIT 1",
        (incident["id"],),
    ).fetchone()
    if row is not None:
        h = household(conn, row["care_id"])
        if h is not None:
            a = dict(row)
            a["detail"] = json.loads(a["detail"] or "{}")
            return h, a
    hid = house_of_place(conn, incident.get("place") or {})
    if hid is None:
        return None
    h = household_of_house(conn, hid)
    return (h, None) if h is not None else None


# ---------------------------------------------------------------- writing


def _put_people(conn: Conn, care_id: int, people: Iterable[int]) -> None:
    conn.execute("DELETE FROM care_people WHERE care_id = ?", (care_id,))
    conn.executemany("INSERT INTO care_people (care_id, person_id) VALUES (?, ?)", [(care_id, p) for p in people])


def enrol(conn: Conn, house_id: int, site: str, s: Settings, actor: str, now: str, remote: str = "") -> int:
    """Put a flat under care (one transaction with its audit row); CareError ``care.already`` if it is."""
    if household_of_house(conn, house_id) is not None:
        raise CareError("care.already")
    cur = conn.execute(
        "INSERT INTO care_households (house_id, site, status, hours, night_watch, night_from, night_to, contact_name,"
        " contact_relation, contact_phone, consent_by, consent_how, consent_at, consent_note, enrolled_by, created_at,"
        " updated_at, updated_by, watch_from) VALUES (?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " RETURNING id",
        (
            house_id,
            site,
            s.hours,
            int(s.night_watch),
            s.night_from,
            s.night_to,
            s.contact_name,
            s.contact_relation,
            s.contact_phone,
            s.consent_by,
            s.consent_how,
            s.consent_at,
            s.consent_note,
            actor,
            now,
            now,
            actor,
            now,
        ),
    )
    care_id = int(cur.fetchone()[0])
    _put_people(conn, care_id, s.people)
    audit.write(conn, actor, "care.enrol", f"house:{house_id}", _audit_detail(s), remote, at=now)
    return care_id


def _audit_detail(s: Settings) -> str:
    """What the audit keeps of a change: the consent and the settings; the contact's number only masked."""
    return (
        f"consent {s.consent_how} by {s.consent_by} at {s.consent_at}; people {list(s.people)}; contact"
        f" {s.contact_name} ({s.contact_relation}) {reg.mask_phone(s.contact_phone)}; {s.hours} h;"
        f" night {'on' if s.night_watch else 'off'} {s.night_from}-{s.night_to}"
    )


def update(
    conn: Conn, care_id: int, s: Settings, actor: str, now: str, remote: str = "", *, keep_consent: bool = True
) -> Household:
    """Change who is cared for, the contact or the rules. The recorded consent stays unless ``keep_consent`` is
    False (the office records it again)."""
    h = household(conn, care_id)
    if h is None or h.status != "active":
        raise CareError("care.not_active")
    consent = (
        (h.consent_by, h.consent_how, h.consent_at, h.consent_note)
        if keep_consent
        else (s.consent_by, s.consent_how, s.consent_at, s.consent_note)
    )
    conn.execute(
        "UPDATE care_households SET hours = ?, night_watch = ?, night_from = ?, night_to = ?, contact_name = ?,"
        " contact_relation = ?, contact_phone = ?, consent_by = ?, consent_how = ?, consent_at = ?, consent_note = ?,"
        " updated_at = ?, updated_by = ? WHERE id = ?",
        (
            s.hours,
            int(s.night_watch),
            s.night_from,
            s.night_to,
            s.contact_name,
            s.contact_relation,
            s.contact_phone,
            *consent,
            now,
            actor,
            care_id,
        ),
    )
    _put_people(conn, care_id, s.people)
    shown = Settings(
        s.people,
        s.contact_name,
        s.contact_relation,
        s.contact_phone,
        s.hours,
        s.night_watch,
        s.night_from,
        s.night_to,
        *consent,
    )
    audit.write(conn, actor, "care.update", f"care:{care_id}", _audit_detail(shown), remote, at=now)
    got = household(conn, care_id)
    assert got is not None
    return got


def end(conn: Conn, care_id: int, actor: str, now: str, remote: str = "") -> Household:
    h = household(conn, care_id)
    if h is None or h.status != "active":
        raise CareError("care.not_active")
    conn.execute(
        "UPDATE care_households SET status = 'ended', ended_at = ?, ended_by = ?, updated_at = ?,"
        " updated_by = ? WHERE id = ?",
        (now, actor, now, actor, care_id),
    )
    audit.write(conn, actor, "care.end", f"care:{care_id}", f"house:{h.house_id}", remote, at=now)
    got = household(conn, care_id)
    assert got is not None
    return got


def record_activity(conn: Conn, care_id: int, at: str, what: str) -> None:
    """Activity at ``at`` (never later than now: the caller clamps): the no-activity clock restarts from it, unless
    it restarted later already (an event that arrives late moves nothing back)."""
    conn.execute(
        "UPDATE care_households SET watch_from = greatest(watch_from, ?),"
        " last_activity = CASE WHEN coalesce(last_activity_at, '') <= ? THEN ? ELSE last_activity END,"
        " last_activity_at = greatest(coalesce(last_activity_at, ''), ?) WHERE id = ?",
        (at, at, what[:120], at, care_id),
    )


def add_alert(
    conn: Conn, care_id: int, rule: str, event_id: str, incident_key: str, now: str, detail: Mapping[str, Any]
) -> int:
    cur = conn.execute(
        "INSERT INTO care_alerts (care_id, rule, event_id, incident_key, raised_at, detail)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (care_id, rule, event_id, incident_key, now, json.dumps(dict(detail), ensure_ascii=False)),
    )
    return int(cur.fetchone()[0])


def set_alert_detail(conn: Conn, alert_id: int, detail: Mapping[str, Any]) -> None:
    conn.execute(
        "UPDATE care_alerts SET detail = ? WHERE id = ?", (json.dumps(dict(detail), ensure_ascii=False), alert_id)
    )


def clear_alert(conn: Conn, alert_id: int, by: str, now: str) -> None:
    conn.execute(
        "UPDATE care_alerts SET cleared_at = ?, cleared_by = ? WHERE id = ? AND cleared_at IS NULL", (now, by, alert_id)
    )
