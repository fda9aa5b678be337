"""Patrols' records and rules, on a store connection (the writer thread, or a reader; SQLite or PostgreSQL).

**Checkpoints** are QR plates: a random 128-bit code made and looked up exactly like a door plate's
(:func:`portal.estate.registry.new_plate_code`, looked up by :func:`portal.estate.registry.code_hash`, kept only sealed
with the store key to print the plate again and forgotten when withdrawn), whose QR is the portal's
``/g/c/<code>``, printed on the same A4 sheets (:func:`portal.estate.plates.sheets_pdf`) and placed on the site map.

A **route** lists checkpoints and a shift: rounds start every ``every_min`` minutes from ``starts`` until ``ends``
(site-local; an end not after the start is the next day, so 22:00 to 06:00 is one night: the shift's day is the day
it began). A checkpoint scanned within ``window_min`` of its round's start is on time, within ``late_min`` more
late, and missed if not scanned by then. With ``ordered``, a scan of a point before an earlier one of the same round
is counted but marked out of order.

A **round** (``patrol_rounds``) is written when it begins, with the route's points as they were then (a route
changed later does not rewrite history). When its window ends with points unscanned, an alert is raised
(``patrol.overdue``, an incident of kind ``patrol`` on the board); scanning them all within the late allowance marks it
restored; at the end of the allowance the unscanned points are missed (``patrol.missed`` on the same incident).

A **scan** (``patrol_scans``) is what a guard's phone recorded: counted for the rounds it falls in, ``outside`` any
route's round (recorded as such), or a ``repeat`` of a point already scanned in the round. The checkpoint's page
carries a one-time **token** (``patrol_tokens``, by its hash) bound to the guard's session and the checkpoint, used up
by the scan's own transaction: whichever portal instance shows the page and whichever takes the scan.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from gateway import wire
from portal.estate import registry as reg
from portal.estate.service import PORTAL_GATEWAY, portal_event
from portal.store import Conn, Row, audit, db, event_dict, key_of
from portal.web import i18n
from portal.web.scope import Sites
from portal.web.scope import sql as site_sql

PRIORITY = int(wire.Priority.INTRUSION)  # a guard who does not reach a checkpoint may be in trouble
NAME_MAX = 40
HHMM_RE = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
LOOKBACK = timedelta(hours=24)  # rounds missed while the portal was away are still written down
STALE = timedelta(hours=1)  # a round found overdue later than this after its end rings no more (it is reported)
CHECKPOINT_PATH = "/g/c/"
TAGLINE = "巡更点 · 保安扫码"
_TR = {lang: i18n.Translator(lang) for lang in i18n.LANGUAGES}


class PatrolError(ValueError):
    """A refused change; ``key`` is an i18n key, ``field`` the form field at fault."""

    def __init__(self, key: str, field: str = "") -> None:
        super().__init__(key)
        self.key = key
        self.field = field


def ts_text(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def clean_name(raw: object) -> str | None:
    s = " ".join(str(raw or "").split())
    s = "".join(c for c in s if c.isprintable() and c not in "<>")
    return s if 1 <= len(s) <= NAME_MAX else None


# ---------------------------------------------------------------- checkpoints


@dataclass(frozen=True, slots=True)
class Checkpoint:
    id: int
    site: str
    name: str
    code: str
    x: float | None
    y: float | None
    created_at: str
    withdrawn_at: str | None

    @property
    def marker(self) -> str:
        return f"cp:{self.id}"

    def plate(self, site_name: str) -> reg.PlateSpec:
        return reg.PlateSpec(self.code, "checkpoint", self.name, site_name, path=CHECKPOINT_PATH, tagline=TAGLINE)


def _cp(conn: Conn, row: Row) -> Checkpoint:
    code = key_of(conn).unseal(row["sealed"], row["code_hash"]) if row["sealed"] is not None else ""
    return Checkpoint(
        row["id"], row["site"], row["name"], code, row["x"], row["y"], row["created_at"], row["withdrawn_at"]
    )


def checkpoints(conn: Conn, sites: Sites = None, *, site: str | None = None) -> list[Checkpoint]:
    cond, args = site_sql("site", sites)
    sql = f"SELECT * FROM patrol_checkpoints WHERE withdrawn_at IS NULL AND {cond}"
    if site is not None:
        sql += " AND site = ?"
        args.append(site)
    return [_cp(conn, r) for r in conn.execute(sql + " ORDER BY site, name", args)]


def checkpoint(conn: Conn, cp_id: int) -> Checkpoint | None:
    row = conn.execute("SELECT * FROM patrol_checkpoints WHERE id = ?", (cp_id,)).fetchone()
    return _cp(conn, row) if row else None


def by_code(conn: Conn, code: str) -> Checkpoint | None:
    """The checkpoint in use behind a plate code (by its hash: unknown, malformed and withdrawn codes take one path)."""
    digest = reg.code_hash(code if reg.PLATE_CODE_RE.match(code) else "!" + code[:100])
    row = conn.execute(
        "SELECT * FROM patrol_checkpoints WHERE code_hash = ? AND withdrawn_at IS NULL", (digest,)
    ).fetchone()
    return _cp(conn, row) if row else None


def add_checkpoint(conn: Conn, site: str, name: str, actor: str, now: str) -> Checkpoint:
    clean = clean_name(name)
    if clean is None:
        raise PatrolError("patrol.bad_name", "name")
    if not wire.NAME_RE.match(site):
        raise PatrolError("patrol.bad_site", "site")
    if conn.execute(
        "SELECT 1 FROM patrol_checkpoints WHERE site = ? AND name = ? AND withdrawn_at IS NULL", (site, clean)
    ).fetchone():
        raise PatrolError("patrol.name_taken", "name")
    code = reg.new_plate_code()
    digest = reg.code_hash(code)
    cur = conn.execute(
        "INSERT INTO patrol_checkpoints (site, name, code_hash, sealed, created_at, created_by)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (site, clean, digest, key_of(conn).seal(code, digest), now, actor),
    )
    cp_id = int(cur.fetchone()[0])
    audit.write(conn, actor, "patrol.checkpoint", f"checkpoint:{cp_id}", f"{site} {clean}", at=now)
    got = checkpoint(conn, cp_id)
    assert got is not None
    return got


def change_checkpoint(
    conn: Conn,
    cp_id: int,
    action: str,
    actor: str,
    now: str,
    *,
    name: str = "",
    x: float | None = None,
    y: float | None = None,
) -> Checkpoint:
    """rename, place (x, y on the site map; None and None: take it off), reissue (a new code: the old plate stops
    working at once) or withdraw."""
    cp = checkpoint(conn, cp_id)
    if cp is None or cp.withdrawn_at is not None:
        raise PatrolError("patrol.no_checkpoint")
    if action == "rename":
        clean = clean_name(name)
        if clean is None:
            raise PatrolError("patrol.bad_name", "name")
        if (
            clean != cp.name
            and conn.execute(
                "SELECT 1 FROM patrol_checkpoints WHERE site = ? AND name = ? AND withdrawn_at IS NULL",
                (cp.site, clean),
            ).fetchone()
        ):
            raise PatrolError("patrol.name_taken", "name")
        conn.execute("UPDATE patrol_checkpoints SET name = ? WHERE id = ?", (clean, cp_id))
        detail = clean
    elif action == "place":
        if (x is None) != (y is None):
            raise PatrolError("patrol.bad_position", "x")
        conn.execute("UPDATE patrol_checkpoints SET x = ?, y = ? WHERE id = ?", (x, y, cp_id))
        detail = f"{x},{y}"
    elif action == "reissue":
        code = reg.new_plate_code()
        digest = reg.code_hash(code)
        conn.execute(
            "UPDATE patrol_checkpoints SET sealed = ?, code_hash = ? WHERE id = ?",
            (key_of(conn).seal(code, digest), digest, cp_id),
        )
        detail = "new code"
    elif action == "withdraw":
        conn.execute("UPDATE patrol_checkpoints SET withdrawn_at = ?, sealed = NULL WHERE id = ?", (now, cp_id))
        detail = cp.name
    else:
        raise PatrolError("patrol.bad_action")
    audit.write(conn, actor, f"patrol.{action}", f"checkpoint:{cp_id}", detail, at=now)
    got = checkpoint(conn, cp_id)
    assert got is not None
    return got


# ---------------------------------------------------------------- routes


@dataclass(frozen=True, slots=True)
class Route:
    id: int
    site: str
    name: str
    starts: str
    ends: str
    every_min: int
    window_min: int
    late_min: int
    ordered: bool
    guard: str
    active: bool
    created_at: str
    points: tuple[int, ...] = ()

    def shift_rounds(self, day: date, tz: ZoneInfo) -> list[Round]:
        """The rounds of the shift that begins on ``day`` (site-local), in order."""
        start = datetime.combine(day, time.fromisoformat(self.starts), tz).astimezone(UTC)
        end = datetime.combine(day, time.fromisoformat(self.ends), tz).astimezone(UTC)
        if end <= start:
            end = datetime.combine(day + timedelta(days=1), time.fromisoformat(self.ends), tz).astimezone(UTC)
        out, k = [], 0
        every, window, late = (timedelta(minutes=m) for m in (self.every_min, self.window_min, self.late_min))
        while (at := start + k * every) < end:
            out.append(Round(self.id, at, day, at + window, at + window + late))
            k += 1
        return out

    def rounds_near(self, now: datetime, tz: ZoneInfo) -> list[Round]:
        """Rounds of the shifts that began yesterday and today (site-local) and the day before (a long late
        allowance)."""
        today = now.astimezone(tz).date()
        return [
            r for d in (today - timedelta(days=2), today - timedelta(days=1), today) for r in self.shift_rounds(d, tz)
        ]


@dataclass(frozen=True, slots=True)
class Round:
    route_id: int
    at: datetime  # UTC
    day: date  # the shift's site-local day
    due: datetime
    late: datetime


def _route(conn: Conn, row: Row) -> Route:
    points = tuple(
        int(r[0])
        for r in conn.execute(
            "SELECT checkpoint_id FROM patrol_route_points WHERE route_id = ? ORDER BY position", (row["id"],)
        )
    )
    return Route(
        row["id"],
        row["site"],
        row["name"],
        row["starts"],
        row["ends"],
        row["every_min"],
        row["window_min"],
        row["late_min"],
        bool(row["ordered"]),
        row["guard"],
        bool(row["active"]),
        row["created_at"],
        points,
    )


def routes(conn: Conn, sites: Sites = None, *, active: bool | None = None) -> list[Route]:
    cond, args = site_sql("site", sites)
    sql = f"SELECT * FROM patrol_routes WHERE {cond}"
    if active is not None:
        sql += " AND active = ?"
        args.append(int(active))
    return [_route(conn, r) for r in conn.execute(sql + " ORDER BY site, name", args)]


def route(conn: Conn, route_id: int) -> Route | None:
    row = conn.execute("SELECT * FROM patrol_routes WHERE id = ?", (route_id,)).fetchone()
    return _route(conn, row) if row else None


@dataclass(frozen=True, slots=True)
class RouteForm:
    name: str
    starts: str
    ends: str
    every_min: int
    window_min: int
    late_min: int
    ordered: bool
    guard: str
    active: bool
    points: tuple[int, ...]


def _minutes(form: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    try:
        v = int(str(form.get(key, "")).strip())
    except ValueError:
        raise PatrolError("patrol.bad_minutes", key) from None
    if not lo <= v <= hi:
        raise PatrolError("patrol.bad_minutes", key)
    return v


def parse_route(form: Mapping[str, Any], site_checkpoints: Sequence[Checkpoint]) -> RouteForm:
    """A route form: name, starts/ends (HH:MM), every/window/late minutes, ordered, guard, and ``at-<checkpoint
    id>`` = its position (blank: not on the route). Raises :class:`PatrolError`."""
    name = clean_name(form.get("name", ""))
    if name is None:
        raise PatrolError("patrol.bad_name", "name")
    starts, ends = str(form.get("starts", "")).strip(), str(form.get("ends", "")).strip()
    if not HHMM_RE.match(starts) or not HHMM_RE.match(ends):
        raise PatrolError("patrol.bad_time", "starts")
    every = _minutes(form, "every_min", 10, 1440)
    window = _minutes(form, "window_min", 1, 1440)
    late = _minutes(form, "late_min", 0, 1440)
    if window + late > every + 1440:
        raise PatrolError("patrol.bad_minutes", "late_min")
    guard = clean_name(form.get("guard", "")) or ""
    placed: list[tuple[int, int]] = []
    for cp in site_checkpoints:
        raw = str(form.get(f"at-{cp.id}", "")).strip()
        if not raw:
            continue
        try:
            pos = int(raw)
        except ValueError:
            raise PatrolError("patrol.bad_position_number", f"at-{cp.id}") from None
        if not 1 <= pos <= 999:
            raise PatrolError("patrol.bad_position_number", f"at-{cp.id}")
        placed.append((pos, cp.id))
    if not placed:
        raise PatrolError("patrol.need_points", "points")
    positions = [p for p, _ in placed]
    if len(set(positions)) != len(positions):
        raise PatrolError("patrol.same_position", "points")
    return RouteForm(
        name,
        starts,
        ends,
        every,
        window,
        late,
        str(form.get("ordered", "")) == "1",
        guard,
        str(form.get("active", "")) == "1",  # a checkbox: absent when unticked
        tuple(cp for _, cp in sorted(placed)),
    )


def save_route(conn: Conn, route_id: int | None, site: str, f: RouteForm, actor: str, now: str) -> int:
    """Create (``route_id`` None) or change a route; its rounds already begun keep their points."""
    clash = conn.execute("SELECT id FROM patrol_routes WHERE site = ? AND name = ?", (site, f.name)).fetchone()
    if clash is not None and clash[0] != route_id:
        raise PatrolError("patrol.name_taken", "name")
    ok = {c.id for c in checkpoints(conn, site=site)}
    if any(p not in ok for p in f.points):
        raise PatrolError("patrol.need_points", "points")
    vals = (f.name, f.starts, f.ends, f.every_min, f.window_min, f.late_min, int(f.ordered), f.guard, int(f.active))
    if route_id is None:
        cur = conn.execute(
            "INSERT INTO patrol_routes (name, starts, ends, every_min, window_min, late_min, ordered,"
            " guard, active, site, created_at, created_by, updated_at) VALUES"
            " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (*vals, site, now, actor, now),
        )
        route_id = int(cur.fetchone()[0])
        what = "patrol.route_add"
    else:
        conn.execute(
            "UPDATE patrol_routes SET name = ?, starts = ?, ends = ?, every_min = ?, window_min = ?,"
            " late_min = ?, ordered = ?, guard = ?, active = ?, updated_at = ? WHERE id = ?",
            (*vals, now, route_id),
        )
        what = "patrol.route_change"
    conn.execute("DELETE FROM patrol_route_points WHERE route_id = ?", (route_id,))
    conn.executemany(
        "INSERT INTO patrol_route_points (route_id, position, checkpoint_id) VALUES (?, ?, ?)",
        [(route_id, i, cp) for i, cp in enumerate(f.points)],
    )
    audit.write(
        conn,
        actor,
        what,
        f"route:{route_id}",
        f"{f.name} {f.starts}-{f.ends} every {f.every_min} min, on time {f.window_min}, late {f.late_min},"
        f" {'ordered' if f.ordered else 'any order'}, {len(f.points)} points, {'on' if f.active else 'off'}",
        at=now,
    )
    return route_id


# ---------------------------------------------------------------- rounds and alerts


@dataclass
class Changes:
    """What a write changed for the world outside: events raised (to the console and the board)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    next_at: datetime | None = None


def _names(conn: Conn, ids: Iterable[int]) -> list[str]:
    wanted = list(ids)
    rows = {
        r["id"]: r["name"]
        for r in conn.execute(
            f"SELECT id, name FROM patrol_checkpoints WHERE {db.in_values(conn, 'id')}", (db.values(conn, wanted),)
        )
    }
    return [str(rows.get(i, f"#{i}")) for i in wanted]


def ensure_rounds(conn: Conn, r: Route, now: datetime, tz: ZoneInfo) -> int:
    """Write down the route's rounds that have begun (since it was made, at most :data:`LOOKBACK` back) and are not
    written yet, each with the route's points now. Returns how many were written."""
    n = 0
    for rd in _begun(r, now, tz):
        cur = conn.execute(
            "INSERT INTO patrol_rounds (route_id, round_at, shift_day, due_at, late_at, points, state)"
            " VALUES (?, ?, ?, ?, ?, ?, 'open') ON CONFLICT DO NOTHING",
            (r.id, ts_text(rd.at), rd.day.isoformat(), ts_text(rd.due), ts_text(rd.late), json.dumps(list(r.points))),
        )
        n += cur.rowcount
    return n


def _begun(r: Route, now: datetime, tz: ZoneInfo) -> list[Round]:
    """The route's rounds that have begun by ``now`` since it was made, at most :data:`LOOKBACK` back, oldest first."""
    if not r.active or not r.points:
        return []
    made = parse_ts(r.created_at)
    got = [rd for rd in r.rounds_near(now, tz) if made <= rd.at <= now and rd.late >= now - LOOKBACK]
    return sorted(got, key=lambda rd: rd.at)


def _round_row(conn: Conn, route_id: int, round_at: str) -> Row | None:
    return conn.execute(
        "SELECT * FROM patrol_rounds WHERE route_id = ? AND round_at = ?", (route_id, round_at)
    ).fetchone()


def _visited(conn: Conn, route_id: int, round_at: str) -> set[int]:
    return {
        int(x[0])
        for x in conn.execute(
            "SELECT checkpoint_id FROM patrol_visits WHERE route_id = ? AND round_at = ?", (route_id, round_at)
        )
    }


def _alert(
    conn: Conn, r: Route, rd: Row, etype: str, points: list[int], now: str, tz: ZoneInfo, **extra: Any
) -> dict[str, Any]:
    local = parse_ts(rd["round_at"]).astimezone(tz).strftime("%H:%M")
    names = _names(conn, points)
    rule = etype.split(".", 1)[1].removesuffix("_restore")
    data: dict[str, Any] = {
        "incident": f"patrol:{r.id}:{rd['round_at']}",
        "count": len(points),
        "kind": "patrol",
        "route": r.id,
        "route_name": r.name,
        "round_at": rd["round_at"],
        "due_at": rd["due_at"],
        "late_at": rd["late_at"],
        "checkpoints": names,
        "markers": [f"cp:{i}" for i in points],
        "label": f"{r.name} {local}",
        "name_zh": _TR["zh-CN"](f"patrol.title.{rule}", n=len(points)),
        "name_en": _TR["en"](f"patrol.title.{rule}", n=len(points)),
        **extra,
    }
    # each round its own source: a round's alert never folds into another round's
    row = portal_event(
        conn, {"site": r.site}, etype, PRIORITY, data, device="patrol", point=f"{r.id}:{rd['round_at']}", ts=now
    )
    return event_dict(row)


def evaluate(conn: Conn, now: datetime, tz: ZoneInfo) -> Changes:
    """Rounds whose window or late allowance has ended: raise what is overdue, mark what is missed."""
    out = Changes()
    now_t = ts_text(now)
    rows = conn.execute(
        "SELECT * FROM patrol_rounds WHERE state != 'done' AND ((state = 'open' AND due_at <= ?)"
        " OR late_at <= ?) ORDER BY round_at",
        (now_t, now_t),
    ).fetchall()
    for rd in rows:
        r = route(conn, rd["route_id"])
        points = [int(p) for p in json.loads(rd["points"])]
        missing = [p for p in points if p not in _visited(conn, rd["route_id"], rd["round_at"])]
        finished = rd["late_at"] <= now_t
        fresh = now - parse_ts(rd["late_at"] if finished else rd["due_at"]) <= STALE
        state, event = rd["state"], rd["alert_event"]
        if not missing:
            state = "done"
        elif not finished:
            state = "overdue"
            if fresh and r is not None:
                ev = _alert(conn, r, rd, "patrol.overdue", missing, now_t, tz)
                event = ev["id"]
                out.events.append(ev)
        else:
            state = "done"
            if fresh and r is not None:
                # on the overdue alert's incident while it is open; a new one when a guard has closed that already
                key = f"patrol:{r.id}:{rd['round_at']}"
                closed = conn.execute(
                    "SELECT 1 FROM incident_keys k JOIN incidents i ON i.id = k.incident_id"
                    " WHERE k.key = ? AND i.state = 'closed'",
                    (f"{r.site}/{PORTAL_GATEWAY}/{key}",),
                ).fetchone()
                ev = _alert(
                    conn, r, rd, "patrol.missed", missing, now_t, tz, incident=f"{key}:missed" if closed else key
                )
                event = event or ev["id"]
                out.events.append(ev)
        conn.execute(
            "UPDATE patrol_rounds SET state = ?, alert_event = ?, missed = ? WHERE route_id = ? AND round_at = ?",
            (state, event, json.dumps(missing if finished else []), rd["route_id"], rd["round_at"]),
        )
    return out


def tick(conn: Conn, now: datetime, tz: ZoneInfo) -> Changes:
    """Write down the rounds begun, evaluate the rounds due; ``next_at``: when there is next something to do.

    Idempotent: instances that share the store tick the same rounds, each in a transaction under the store's whole
    write lock; a round's state moves on once (``open`` → ``overdue`` → ``done``), so only the first raises its
    alert and the others find nothing due."""
    active = routes(conn, active=True)
    for r in active:
        ensure_rounds(conn, r, now, tz)
    out = evaluate(conn, now, tz)
    out.next_at = next_time(conn, now, tz, active)
    return out


def next_time(conn: Conn, now: datetime, tz: ZoneInfo, active: Sequence[Route] | None = None) -> datetime | None:
    """When there is next something to do (a round's start, a window's or an allowance's end; ``now`` when a round
    has begun that nobody wrote down yet), read only: what an instance learns from the store of the routes and rounds
    another instance wrote. A round written means every earlier one was (:func:`ensure_rounds` writes them all)."""
    active = routes(conn, active=True) if active is None else active
    for r in active:
        begun = _begun(r, now, tz)
        if begun and _round_row(conn, r.id, ts_text(begun[-1].at)) is None:
            return now
    today = now.astimezone(tz).date()
    starts = [
        rd.at
        for r in active
        if r.points
        for d in (today, today + timedelta(days=1))
        for rd in r.shift_rounds(d, tz)
        if rd.at > now
    ]
    due = next_deadline(conn)
    times = [*starts, *([parse_ts(due)] if due else [])]
    return min(times) if times else None


def next_deadline(conn: Conn) -> str | None:
    """The earliest time a written round needs looking at (its window's or its allowance's end)."""
    row = conn.execute(
        "SELECT min(CASE WHEN state = 'open' THEN due_at ELSE late_at END) FROM patrol_rounds WHERE state != 'done'"
    ).fetchone()
    return row[0] if row else None


# ---------------------------------------------------------------- scanning


@dataclass
class ScanResult:
    scan_id: int
    outcome: str  # counted | outside | repeat
    visits: list[dict[str, Any]] = field(default_factory=list)  # route, round, status, in_order
    events: list[dict[str, Any]] = field(default_factory=list)


class Replayed(PatrolError):
    """The scan's one-time token was used already."""


TOKEN_LIFE_S = 600.0  # a scan page must be confirmed within this of being opened
TOKENS_PER_SESSION = 20  # a session's pages open at once; an older one's token is dropped


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(conn: Conn, session: str, cp_id: int, now: float) -> str:
    """A scan page's one-time token for this session (its id hash) and checkpoint, good for :data:`TOKEN_LIFE_S`
    from ``now`` (unix seconds). Expired tokens, and a session's beyond :data:`TOKENS_PER_SESSION`, go now."""
    conn.execute("DELETE FROM patrol_tokens WHERE expires < ?", (now,))
    conn.execute(
        "DELETE FROM patrol_tokens WHERE session = ? AND token_hash NOT IN (SELECT token_hash FROM patrol_tokens"
        " WHERE session = ? ORDER BY expires DESC LIMIT ?)",
        (session, session, TOKENS_PER_SESSION - 1),
    )
    token = secrets.token_urlsafe(18)
    conn.execute(
        "INSERT INTO patrol_tokens (token_hash, session, checkpoint_id, expires) VALUES (?, ?, ?, ?)",
        (token_hash(token), session, cp_id, now + TOKEN_LIFE_S),
    )
    return token


def redeem_token(conn: Conn, token: str, session: str, cp_id: int, now: float) -> str | None:
    """Use a token up (in the transaction that records the scan): None when it is good, else why not: replayed
    (unknown or used), expired, or issued to another session or checkpoint (used up all the same)."""
    if not isinstance(token, str) or not 1 <= len(token) <= 64:
        return "replayed"
    row = conn.execute(
        "DELETE FROM patrol_tokens WHERE token_hash = ? RETURNING session, checkpoint_id, expires", (token_hash(token),)
    ).fetchone()
    if row is None:
        return "replayed"
    if row[0] != session or int(row[1]) != cp_id:
        return "mismatch"
    if row[2] < now:
        return "expired"
    return None


def scan(
    conn: Conn,
    cp: Checkpoint,
    guard: str,
    nonce: str,
    now: datetime,
    tz: ZoneInfo,
    remote: str = "",
    *,
    actor: str = "",
) -> ScanResult:
    """A guard's scan of a checkpoint at ``now`` (the portal's clock), recorded once per one-time token (``nonce``: the
    token's hash, used up by :func:`redeem_token` in the same transaction). ``guard``: the user's name (what reports
    show); ``actor``: who the audit names (default ``guard:<name>``)."""
    if conn.execute("SELECT 1 FROM patrol_scans WHERE nonce = ?", (nonce,)).fetchone():
        raise Replayed("patrol.replayed")
    now_t = ts_text(now)
    by_id = {r.id: r for r in routes(conn, (cp.site,))}
    for r in by_id.values():
        if r.active and cp.id in r.points:
            ensure_rounds(conn, r, now, tz)
    # the rounds under way with this point as they were written when they began, whatever their route says now (a
    # point taken off, the route switched off): the round is judged by those points (evaluate)
    rounds = [
        rd
        for rd in conn.execute(
            f"SELECT * FROM patrol_rounds WHERE round_at <= ? AND late_at >= ? AND {db.in_values(conn, 'route_id')}"
            " ORDER BY round_at",
            (now_t, now_t, db.values(conn, list(by_id))),
        )
        if cp.id in json.loads(rd["points"])
    ]
    cur = conn.execute(
        "INSERT INTO patrol_scans (checkpoint_id, site, guard, at, nonce, outcome, remote)"
        " VALUES (?, ?, ?, ?, ?, 'outside', ?) RETURNING id",
        (cp.id, cp.site, guard, now_t, nonce, remote[:64]),
    )
    res = ScanResult(int(cur.fetchone()[0]), "outside")
    for rd in rounds:
        r = by_id[rd["route_id"]]
        visited = _visited(conn, r.id, rd["round_at"])
        if cp.id in visited:
            res.visits.append({"route": r.name, "round_at": rd["round_at"], "status": "repeat", "in_order": True})
            continue
        points = [int(p) for p in json.loads(rd["points"])]
        before = points[: points.index(cp.id)]
        in_order = not r.ordered or all(p in visited for p in before)
        status = "on_time" if now_t <= rd["due_at"] else "late"
        conn.execute(
            "INSERT INTO patrol_visits (route_id, round_at, checkpoint_id, scan_id, guard, at, status,"
            " in_order) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (r.id, rd["round_at"], cp.id, res.scan_id, guard, now_t, status, int(in_order)),
        )
        res.visits.append({"route": r.name, "round_at": rd["round_at"], "status": status, "in_order": in_order})
        if all(p in visited or p == cp.id for p in points):  # the round is complete
            if rd["state"] == "overdue" and rd["alert_event"]:
                res.events.append(
                    _alert(conn, r, rd, "patrol.overdue_restore", points, now_t, tz, how="visited late", by=guard)
                )
            conn.execute(
                "UPDATE patrol_rounds SET state = 'done', missed = '[]' WHERE route_id = ? AND round_at = ?",
                (r.id, rd["round_at"]),
            )
    counted = [v for v in res.visits if v["status"] != "repeat"]
    res.outcome = "counted" if counted else ("repeat" if res.visits else "outside")
    conn.execute("UPDATE patrol_scans SET outcome = ? WHERE id = ?", (res.outcome, res.scan_id))
    shown = ", ".join(f"{v['route']} {v['status']}" + ("" if v["in_order"] else " out of order") for v in res.visits)
    audit.write(
        conn,
        actor or f"guard:{guard}",
        "patrol.scan",
        f"checkpoint:{cp.id}",
        f"{res.outcome}: {shown}",
        remote,
        at=now_t,
    )
    return res


def scan_row(conn: Conn, scan_id: int) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT s.*, c.name AS checkpoint FROM patrol_scans s JOIN patrol_checkpoints c"
        " ON c.id = s.checkpoint_id WHERE s.id = ?",
        (scan_id,),
    ).fetchone()
    if row is None:
        return None
    out = dict(row)
    out["visits"] = [
        dict(v)
        for v in conn.execute(
            "SELECT v.*, r.name AS route FROM patrol_visits v JOIN patrol_routes r ON r.id = v.route_id"
            " WHERE v.scan_id = ? ORDER BY v.round_at",
            (scan_id,),
        )
    ]
    return out


# ---------------------------------------------------------------- what a guard's phone shows


def current_rounds(conn: Conn, now: datetime, sites: Sites = None) -> list[dict[str, Any]]:
    """Rounds under way (begun, allowance not over) with each point's state, for the guard's phone."""
    now_t = ts_text(now)
    cond, args = site_sql("r.site", sites)
    rows = conn.execute(
        "SELECT p.*, r.name AS route_name, r.site, r.ordered FROM patrol_rounds p JOIN patrol_routes r"
        f" ON r.id = p.route_id WHERE p.round_at <= ? AND p.late_at >= ? AND {cond} ORDER BY p.due_at",
        (now_t, now_t, *args),
    ).fetchall()
    out = []
    for rd in rows:
        visits = {
            int(v["checkpoint_id"]): dict(v)
            for v in conn.execute(
                "SELECT * FROM patrol_visits WHERE route_id = ? AND round_at = ?", (rd["route_id"], rd["round_at"])
            )
        }
        ids = [int(p) for p in json.loads(rd["points"])]
        out.append(
            {
                "route": rd["route_name"],
                "site": rd["site"],
                "round_at": rd["round_at"],
                "due_at": rd["due_at"],
                "late_at": rd["late_at"],
                "state": rd["state"],
                "ordered": bool(rd["ordered"]),
                "points": [
                    {"id": i, "name": n, "visit": visits.get(i)} for i, n in zip(ids, _names(conn, ids), strict=True)
                ],
            }
        )
    return out


# ---------------------------------------------------------------- the report


@dataclass
class GuardLine:
    guard: str
    on_time: int = 0
    late: int = 0
    missed: int = 0
    out_of_order: int = 0
    outside: int = 0
    repeats: int = 0


@dataclass
class ShiftLine:
    route_id: int
    route: str
    site: str
    day: str
    rounds: int = 0
    on_time: int = 0
    late: int = 0
    missed: int = 0
    pending: int = 0
    out_of_order: int = 0
    guards: list[str] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)  # every round's every point, for the detail


@dataclass
class Report:
    shifts: list[ShiftLine]
    guards: list[GuardLine]
    stray: list[dict[str, Any]]  # scans outside any round, and repeats


def report(
    conn: Conn, day_from: date, day_to: date, tz: ZoneInfo, sites: Sites = None, route_id: int | None = None
) -> Report:
    """Per shift (route and the day it began) and per guard: points on time, late, missed (and still open); out of
    order scans; scans outside any round and repeats (by the site-local day they were made)."""
    cond, args = site_sql("r.site", sites)
    sql = (
        "SELECT p.*, r.name AS route_name, r.site, r.guard AS route_guard FROM patrol_rounds p JOIN patrol_routes r"
        f" ON r.id = p.route_id WHERE p.shift_day >= ? AND p.shift_day <= ? AND {cond}"
    )
    qargs: list[Any] = [day_from.isoformat(), day_to.isoformat(), *args]
    if route_id is not None:
        sql += " AND r.id = ?"
        qargs.append(route_id)
    shifts: dict[tuple[int, str], ShiftLine] = {}
    guards: dict[str, GuardLine] = {}

    def g(name: str) -> GuardLine:
        return guards.setdefault(name, GuardLine(name))

    for rd in conn.execute(sql + " ORDER BY p.shift_day, r.name, p.round_at", qargs).fetchall():
        key = (rd["route_id"], rd["shift_day"])
        sh = shifts.setdefault(key, ShiftLine(rd["route_id"], rd["route_name"], rd["site"], rd["shift_day"]))
        sh.rounds += 1
        ids = [int(p) for p in json.loads(rd["points"])]
        visits = {
            int(v["checkpoint_id"]): dict(v)
            for v in conn.execute(
                "SELECT * FROM patrol_visits WHERE route_id = ? AND round_at = ?", (rd["route_id"], rd["round_at"])
            )
        }
        walkers = sorted({v["guard"] for v in visits.values()})
        answerable = walkers or ([rd["route_guard"]] if rd["route_guard"] else [""])
        for cp_id, name in zip(ids, _names(conn, ids), strict=True):
            v = visits.get(cp_id)
            if v is not None:
                status = v["status"]
                line = g(v["guard"])
                setattr(line, status, getattr(line, status) + 1)
                if not v["in_order"]:
                    sh.out_of_order += 1
                    g(v["guard"]).out_of_order += 1
                if v["guard"] not in sh.guards:
                    sh.guards.append(v["guard"])
            elif rd["state"] == "done":
                status = "missed"
                for who in answerable:
                    g(who).missed += 1
            else:
                status = "pending"
            setattr(sh, status, getattr(sh, status) + 1)
            sh.points.append(
                {
                    "round_at": rd["round_at"],
                    "checkpoint": name,
                    "status": status,
                    "guard": v["guard"] if v else "",
                    "at": v["at"] if v else "",
                    "in_order": bool(v["in_order"]) if v else True,
                }
            )
    start = ts_text(datetime.combine(day_from, time(0), tz))
    end = ts_text(datetime.combine(day_to + timedelta(days=1), time(0), tz))
    cond2, args2 = site_sql("s.site", sites)
    stray = []
    for s in conn.execute(
        "SELECT s.*, c.name AS checkpoint FROM patrol_scans s JOIN patrol_checkpoints c"
        f" ON c.id = s.checkpoint_id WHERE s.at >= ? AND s.at < ? AND s.outcome != 'counted' AND"
        f" {cond2} ORDER BY s.at",
        (start, end, *args2),
    ).fetchall():
        stray.append(dict(s))
        line = g(s["guard"])
        if s["outcome"] == "outside":
            line.outside += 1
        else:
            line.repeats += 1
    return Report(list(shifts.values()), sorted(guards.values(), key=lambda x: (x.guard == "", x.guard)), stray)
