"""The access log: every access decision the gateways reported, searched by door, house, person, result
and time, a page at a time (newest first, keyset paging), and exported as CSV (streamed in chunks).

Rows come from ``access_log``, which triggers fill from ``access.granted``/``access.denied`` events, and from
``door.unlock_failed`` (a pass or remote unlock granted whose door did not open: result ``failed``, the gateway's
reason), in the same transaction that stores them (see the doors migrations in :mod:`portal.store`). A person is
found by pass subject (``r:...``, ``v:...``), by a portal user name (remote unlocks), or by name: the
names of the registry's residents and of the visitors registered at the guardroom.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from gateway.wire import NAME_RE, UNLOCK_FAILURES
from portal.doors.doors import BOARD
from portal.doors.visitors import parse_house
from portal.store import Conn, audit, db, ts_text
from portal.web import csvcells
from portal.web.auth import SESSION_KEY, roles
from portal.web.bodies import bad_request
from portal.web.scope import Sites, sites_of
from portal.web.scope import sql as site_sql
from portal.web.services import SERVICES
from portal.web.views import local_time, render, translator

log = logging.getLogger("portal.access_log")
routes = web.RouteTableDef()

REASONS = (
    "expired",
    "wrong-door",
    "revoked",
    "blocked",
    "stale-list",
    "bad-signature",
    "unknown-key",
    "replayed",
    "malformed",
)
RESULTS = ("granted", "denied", "failed", *REASONS, *UNLOCK_FAILURES)
KINDS = ("resident", "visitor", "remote")
PAGE_DEFAULT = 50
PAGE_MAX = 500
CHUNK = 1000
EXPORT_MAX = 500_000
SUBJECTS_MAX = 500
CURSOR_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z)\|(\d{1,18})$")
FILTER_KEYS = ("site", "door", "house", "person", "result", "kind", "from", "to")
CSV_COLUMNS = (
    "time_local",
    "time_utc",
    "site",
    "gateway",
    "door",
    "door_label",
    "result",
    "reason",
    "kind",
    "person",
    "subject",
    "house",
    "reader",
    "pass_id",
    "by",
    "note",
    "event_id",
)


@dataclass(frozen=True, slots=True)
class Filter:
    site: str = ""
    door: str = ""
    house: str = ""  # the pass's house reference, "3-2-301"
    person: str = ""
    result: str = ""  # granted, denied, failed, or one denial or failure reason
    kind: str = ""
    since: str = ""  # UTC ts text, inclusive
    until: str = ""  # UTC ts text, exclusive
    raw: dict[str, str] = field(default_factory=dict)  # the query as given, for links and the form
    sites: Sites = None  # the user's scope (None: every site); not part of the query

    def query(self, **extra: str) -> str:
        return urlencode({**{k: v for k, v in self.raw.items() if v}, **extra})


def _local_bound(raw: str, tz: Any, *, end: bool) -> str:
    raw = raw.strip()
    if not raw:
        return ""
    for fmt, step in (
        ("%Y-%m-%dT%H:%M", timedelta(0)),
        ("%Y-%m-%d %H:%M", timedelta(0)),
        ("%Y-%m-%d", timedelta(days=1)),
    ):
        try:
            local = datetime.strptime(raw[:16], fmt).replace(tzinfo=tz)
        except ValueError:
            continue
        return ts_text((local + step if end else local).astimezone(UTC))
    raise bad_request(f"not a time: {raw[:40]!r} (YYYY-MM-DDTHH:MM or YYYY-MM-DD, site-local)")


def parse_filter(q: Any, tz: Any) -> Filter:
    """The search from query parameters (a 400 for nonsense)."""
    raw = {k: str(q.get(k, "")).strip()[:80] for k in FILTER_KEYS}
    site, door = raw["site"], raw["door"]
    if "/" in door:
        site, door = door.split("/", 1)
    for name, v in (("site", site), ("door", door)):
        if v and not NAME_RE.match(v):
            raise bad_request(f"{name} {v!r} is not a valid name")
    house = raw["house"]
    if house:
        parsed = parse_house(house)
        house = "-".join(parsed) if parsed else house
    if raw["result"] and raw["result"] not in RESULTS:
        raise bad_request(f"result must be one of {', '.join(RESULTS)}")
    if raw["kind"] and raw["kind"] not in KINDS:
        raise bad_request(f"kind must be one of {', '.join(KINDS)}")
    return Filter(
        site=site,
        door=door,
        house=house,
        person=raw["person"],
        result=raw["result"],
        kind=raw["kind"],
        since=_local_bound(raw["from"], tz, end=False),
        until=_local_bound(raw["to"], tz, end=True),
        raw=raw,
    )


def subjects_named(conn: Conn, name: str) -> list[str]:
    """Pass subjects of residents and registered visitors whose name contains ``name`` (registry read defensively)."""
    like = "%" + name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    out: list[str] = []
    for sql in (
        "SELECT r.subject FROM reg_residents r JOIN reg_people p ON p.id = r.person_id"
        " WHERE lower(p.name) LIKE lower(?) ESCAPE '\\' LIMIT ?",
        "SELECT subject FROM guard_visitors WHERE lower(name) LIKE lower(?) ESCAPE '\\' LIMIT ?",
    ):
        try:
            out.extend(r[0] for r in conn.execute(sql, (like, SUBJECTS_MAX)))
        except db.OperationalError:
            continue
    return out[:SUBJECTS_MAX]


def names_of(conn: Conn, subjects: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    subs = [s for s in subjects if s]
    for i in range(0, len(subs), 400):
        chunk = subs[i : i + 400]
        marks = ", ".join("?" * len(chunk))
        for sql in (
            f"SELECT r.subject, p.name FROM reg_residents r JOIN reg_people p ON p.id = r.person_id"
            f" WHERE r.subject IN ({marks})",
            f"SELECT subject, name FROM guard_visitors WHERE subject IN ({marks})",
        ):
            try:
                found.update((r[0], r[1]) for r in conn.execute(sql, chunk))
            except db.OperationalError:
                continue
    return found


def search(
    conn: Conn, f: Filter, *, before: tuple[str, int] | None = None, limit: int = PAGE_DEFAULT
) -> list[dict[str, Any]]:
    """One page, newest first; ``before`` = (ts, event_pk) of the last row of the previous page."""
    cond, scope_args = site_sql("site", f.sites)
    where: list[str] = [cond]
    args: list[Any] = [*scope_args]
    for col, v in (("site", f.site), ("door", f.door), ("house", f.house), ("kind", f.kind)):
        if v:
            where.append(f"{col} = ?")
            args.append(v)
    if f.result in ("granted", "denied", "failed"):
        where.append("result = ?")
        args.append(f.result)
    elif f.result:
        where.append(f"result = '{'failed' if f.result in UNLOCK_FAILURES else 'denied'}' AND reason = ?")
        args.append(f.result)
    if f.person:
        subjects = [f.person] if ":" in f.person else subjects_named(conn, f.person)
        cond = "by_user = ? OR by_user LIKE ? ESCAPE '\\'"
        args_p: list[Any] = [f.person, "%:" + f.person.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")]
        if subjects:
            cond = f"subject IN ({', '.join('?' * len(subjects))}) OR " + cond
            args_p = [*subjects, *args_p]
        where.append(f"({cond})")
        args.extend(args_p)
    if f.since:
        where.append("ts >= ?")
        args.append(f.since)
    if f.until:
        where.append("ts < ?")
        args.append(f.until)
    if before is not None:
        where.append("(ts < ? OR (ts = ? AND event_pk < ?))")
        args.extend([before[0], before[0], before[1]])
    sql = "SELECT * FROM access_log WHERE " + " AND ".join(where)
    sql += " ORDER BY ts DESC, event_pk DESC LIMIT ?"
    args.append(limit)
    rows = [dict(r) for r in conn.execute(sql, args)]
    names = names_of(conn, {r["subject"] for r in rows})
    for r in rows:
        r["person"] = names.get(r["subject"], "")
    return rows


def _cursor(raw: str) -> tuple[str, int] | None:
    if not raw:
        return None
    m = CURSOR_RE.match(raw)
    if not m:
        raise bad_request("before must be <ts>|<n> as given in next")
    return m.group(1), int(m.group(2))


def cursor_of(row: dict[str, Any]) -> str:
    return f"{row['ts']}|{row['event_pk']}"


def _labels(request: web.Request) -> dict[tuple[str, str], str]:
    b = request.app.get(BOARD)
    return {k: v.label or v.door for k, v in b.doors.items()} if b is not None else {}


def present(r: dict[str, Any], tz: Any, labels: dict[tuple[str, str], str]) -> dict[str, Any]:
    return {
        "event_id": r["event_id"],
        "ts": r["ts"],
        "ts_local": local_time(r["ts"], tz),
        "site": r["site"],
        "gateway": r["gateway"],
        "door": r["door"],
        "door_label": labels.get((r["site"], r["door"]), r["door"]),
        "result": r["result"],
        "reason": r["reason"],
        "kind": r["kind"],
        "person": r["person"],
        "subject": r["subject"],
        "house": r["house"],
        "reader": r["reader"],
        "pass_id": r["pass_id"],
        "by": r["by_user"],
        "note": r["note"],
    }


async def _page_rows(request: web.Request) -> tuple[Filter, list[dict[str, Any]], str | None, int]:
    svc = request.app[SERVICES]
    f = replace(parse_filter(request.query, svc.tz), sites=sites_of(request))
    before = _cursor(request.query.get("before", ""))
    try:
        limit = int(request.query.get("limit", "") or PAGE_DEFAULT)
    except ValueError:
        raise bad_request("limit must be an integer") from None
    if not 1 <= limit <= PAGE_MAX:
        raise bad_request(f"limit must be between 1 and {PAGE_MAX}")
    rows = await svc.store.read(lambda c: search(c, f, before=before, limit=limit))
    labels = _labels(request)
    out = [present(r, svc.tz, labels) for r in rows]
    nxt = cursor_of(rows[-1]) if len(rows) == limit else None
    return f, out, nxt, limit


@routes.get("/api/access-log")
@roles("admin", "guard")
async def api_search(request: web.Request) -> web.StreamResponse:
    _f, rows, nxt, _limit = await _page_rows(request)
    body: dict[str, Any] = {"rows": rows}
    if nxt:
        body["next"] = {"before": nxt}
    return web.json_response(body)


@routes.get("/access-log")
@roles("admin", "guard")
async def page(request: web.Request) -> web.StreamResponse:
    try:
        f, rows, nxt, _limit = await _page_rows(request)
        error = None
    except web.HTTPBadRequest as e:
        raw = {k: request.query.get(k, "")[:80] for k in FILTER_KEYS}
        f, rows, nxt, error = Filter(raw=raw), [], None, e.text
    b = request.app.get(BOARD)
    sites = sites_of(request)
    doors = (
        sorted(
            ((v.site, v.door, v.label or v.door) for v in b.doors.values() if sites is None or v.site in sites),
            key=lambda d: d[2],
        )
        if b
        else []
    )
    return render(
        request,
        "access_log.html",
        status=400 if error else 200,
        rows=rows,
        f=f,
        next_cursor=nxt,
        error=error,
        reasons=REASONS,
        failures=UNLOCK_FAILURES,
        kinds=KINDS,
        doors=doors,
        paged="before" in request.query,
    )


@routes.get("/access-log.csv")
@roles("admin", "guard")
async def export_csv(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    f = replace(parse_filter(request.query, svc.tz), sites=sites_of(request))
    tr = translator(request)
    labels = _labels(request)
    u = request[SESSION_KEY].user
    actor = f"{u.role}:{u.name}"
    await svc.store.run_write(
        lambda c: audit.write(c, actor, "export.access_log", "access_log", f.query()[:300], request.remote or "")
    )
    stamp = datetime.now(svc.tz).strftime("%Y%m%d-%H%M")
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="access-log-{stamp}.csv"',
        }
    )
    await resp.prepare(request)
    buf = io.StringIO()
    w = csvcells.writer(buf)
    buf.write("\ufeff")  # so spreadsheet programs read the Chinese as UTF-8
    w.writerow(CSV_COLUMNS)
    before: tuple[str, int] | None = None
    n = 0
    while n < EXPORT_MAX:
        limit = min(CHUNK, EXPORT_MAX - n)
        rows = await svc.store.read(partial(search, f=f, before=before, limit=limit))
        for r in rows:
            p = present(r, svc.tz, labels)
            result = tr(f"access.result.{p['result']}")
            reason = tr(f"access.reason.{p['reason']}") if p["reason"] else ""
            w.writerow(
                [
                    p["ts_local"],
                    p["ts"],
                    p["site"],
                    p["gateway"],
                    p["door"],
                    p["door_label"],
                    result,
                    reason,
                    p["kind"],
                    p["person"],
                    p["subject"],
                    p["house"],
                    p["reader"],
                    p["pass_id"],
                    p["by"],
                    p["note"],
                    p["event_id"],
                ]
            )
        await resp.write(buf.getvalue().encode("utf-8"))
        buf.seek(0)
        buf.truncate()
        n += len(rows)
        if len(rows) < limit:
            break
        before = (rows[-1]["ts"], rows[-1]["event_pk"])
    if n >= EXPORT_MAX:
        log.warning("access log export by %s stopped at %d rows", actor, EXPORT_MAX)
    await resp.write_eof()
    return resp
