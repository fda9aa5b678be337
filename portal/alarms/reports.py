"""Alarm reports: alarms per place and per day, false-alarm rate, mean times to acknowledge and to close,
closure rate; a page with server-drawn SVG bar charts, and a CSV export of the incidents behind them.

Days are the site's local days (``timezone`` in the config). Incidents count on the day the portal opened
them, and times are measured from then (``created_at``: the portal's clock at both ends, so a gateway clock
that is off does not skew them). The false-alarm rate is false alarms among incidents resolved with a cause;
the closure rate is closed incidents among all of the period's.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from html import escape
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web
from markupsafe import Markup

from portal.alarms import incidents as alarms
from portal.store import Conn, ts_text
from portal.web import csvcells, i18n
from portal.web.auth import roles
from portal.web.scope import Sites, sites_of
from portal.web.scope import sql as site_sql
from portal.web.services import SERVICES
from portal.web.views import render, translator

routes = web.RouteTableDef()
MAX_DAYS = 366
DEFAULT_DAYS = 7
PLACES_SHOWN = 15


@dataclass
class Report:
    day_from: date
    day_to: date
    total: int = 0
    by_kind: list[tuple[str, int]] = field(default_factory=list)
    by_place: list[tuple[str, int]] = field(default_factory=list)  # (label, count), most first
    by_day: list[tuple[date, int]] = field(default_factory=list)  # every day of the range
    causes: dict[str, int] = field(default_factory=dict)
    acknowledged: int = 0
    mean_ack_s: float | None = None
    closed: int = 0
    mean_close_s: float | None = None
    resolved: int = 0  # with a cause
    false_alarms: int = 0
    escalated: int = 0

    @property
    def false_rate(self) -> float | None:
        return self.false_alarms / self.resolved if self.resolved else None

    @property
    def closure_rate(self) -> float | None:
        return self.closed / self.total if self.total else None


def day_bounds(day_from: date, day_to: date, tz: ZoneInfo) -> tuple[str, str]:
    """UTC text bounds [start, end) of the site-local days ``day_from`` to ``day_to`` inclusive."""
    start = datetime.combine(day_from, time(0), tz).astimezone(UTC)
    end = datetime.combine(day_to + timedelta(days=1), time(0), tz).astimezone(UTC)
    return ts_text(start), ts_text(end)


def load_incidents(conn: Conn, start: str, end: str, sites: Sites = None) -> list[dict[str, Any]]:
    cond, args = site_sql("site", sites)
    rows = conn.execute(
        f"SELECT * FROM incidents WHERE created_at >= ? AND created_at < ? AND {cond} ORDER BY created_at, id",
        (start, end, *args),
    )
    return [alarms.incident_dict(r) for r in rows]


def place_key(inc: Mapping[str, Any]) -> str:
    """What "per zone" groups by: the zone, else the flat, else the door, else the device."""
    place, data = inc["place"], inc["data"]
    zone = place.get("zone") or data.get("zone")
    if zone:
        return f"zone:{inc['site']}/{zone}"
    if place.get("house"):
        return f"house:{inc['site']}/{place.get('building', '')}/{place.get('unit', '')}/{place['house']}"
    if place.get("door"):
        return f"door:{inc['site']}/{place['door']}"
    return f"device:{inc['site']}/{inc['gateway']}/{inc['device']}"


def _seconds(a: str | None, b: str | None) -> float | None:
    if not a or not b:
        return None
    return max(0.0, (alarms.parse_ts(b) - alarms.parse_ts(a)).total_seconds())


def compute(
    incidents: Iterable[Mapping[str, Any]], tz: ZoneInfo, day_from: date, day_to: date, lang: str = i18n.DEFAULT
) -> Report:
    rep = Report(day_from, day_to)
    kinds: Counter[str] = Counter()
    places: Counter[str] = Counter()
    labels: dict[str, str] = {}
    days: Counter[date] = Counter()
    causes: Counter[str] = Counter()
    ack_times: list[float] = []
    close_times: list[float] = []
    for inc in incidents:
        rep.total += 1
        kinds[inc["kind"]] += 1
        key = place_key(inc)
        places[key] += 1
        labels.setdefault(key, str(inc["where"].get(lang) or key))
        days[alarms.parse_ts(inc["created_at"]).astimezone(tz).date()] += 1
        if inc["cause"]:
            causes[inc["cause"]] += 1
        t = _seconds(inc["created_at"], inc["acknowledged_at"])
        if t is not None:
            ack_times.append(t)
        if inc["state"] == "closed":
            t = _seconds(inc["created_at"], inc["closed_at"])
            if t is not None:
                close_times.append(t)
        if inc["escalated_at"]:
            rep.escalated += 1
    rep.by_kind = [(k, kinds[k]) for k in alarms.KINDS if kinds[k]]
    rep.by_place = [(labels[k], n) for k, n in sorted(places.items(), key=lambda kv: (-kv[1], labels[kv[0]]))]
    n_days = (day_to - day_from).days + 1
    rep.by_day = [(d, days[d]) for d in (day_from + timedelta(days=i) for i in range(max(0, n_days)))]
    rep.causes = {c: causes[c] for c in alarms.CAUSES if causes[c]}
    rep.acknowledged, rep.closed = len(ack_times), len(close_times)
    rep.mean_ack_s = sum(ack_times) / len(ack_times) if ack_times else None
    rep.mean_close_s = sum(close_times) / len(close_times) if close_times else None
    rep.resolved = sum(causes.values())
    rep.false_alarms = causes["false"]
    return rep


# ---------------------------------------------------------------- charts


def hbar_chart(
    items: list[tuple[str, int]], *, label_w: float = 220, width: float = 640, row: float = 26, css: str = ""
) -> Markup:
    """Horizontal bars with their labels on the left and values at the end."""
    top = max((n for _, n in items), default=0) or 1
    h = row * max(1, len(items)) + 4
    span = width - label_w - 50
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart hbar {escape(css)}" viewBox="0 0 {width:g} {h:g}" '
        f'width="{width:g}" height="{h:g}" role="img">'
    ]
    for i, (label, n) in enumerate(items):
        y = 2 + i * row
        w = span * n / top
        out.append(
            f'<g class="bar" data-label="{escape(label)}" data-value="{n}"><title>{escape(label)}: {n}</title>'
            f'<text class="label" x="{label_w - 8:g}" y="{y + row / 2:g}" text-anchor="end" '
            f'dominant-baseline="middle">{escape(label[:28])}</text>'
            f'<rect x="{label_w:g}" y="{y + 3:g}" width="{max(w, 1 if n else 0):.1f}" height="{row - 6:g}" '
            f'rx="3"/><text class="value" x="{label_w + w + 6:.1f}" y="{y + row / 2:g}" '
            f'dominant-baseline="middle">{n}</text></g>'
        )
    out.append("</svg>")
    return Markup("".join(out))


def vbar_chart(items: list[tuple[str, int]], *, height: float = 180, css: str = "") -> Markup:
    """Vertical bars (one per day), labels underneath; every label shown while they fit, else every n-th."""
    top = max((n for _, n in items), default=0) or 1
    col = 44.0 if len(items) <= 31 else max(4.0, 1300 / len(items))  # a year still fits a screen
    width = max(col * len(items), 200) + 10
    base = height - 30
    every = max(1, math.ceil(44 / col))  # a label every n-th bar when they are narrow
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart vbar {escape(css)}" viewBox="0 0 {width:g} '
        f'{height:g}" width="{width:g}" height="{height:g}" role="img">',
        f'<line class="axis" x1="4" y1="{base:g}" x2="{width - 4:g}" y2="{base:g}"/>',
    ]
    for i, (label, n) in enumerate(items):
        x = 6 + i * col
        h = (base - 18) * n / top
        text = (
            (f'<text class="label" x="{x + col / 2:g}" y="{base + 16:g}" text-anchor="middle">{escape(label)}</text>')
            if i % every == 0
            else ""
        )
        value = (
            f'<text class="value" x="{x + col / 2:g}" y="{base - h - 4:.1f}" text-anchor="middle">{n}</text>'
            if n and col >= 20
            else ""
        )
        out.append(
            f'<g class="bar" data-label="{escape(label)}" data-value="{n}"><title>{escape(label)}: {n}</title>'
            f'<rect x="{x + col * 0.1:.1f}" y="{base - h:.1f}" width="{col * 0.8:.1f}" height="{h:.1f}" rx="2"/>'
            f"{value}{text}</g>"
        )
    out.append("</svg>")
    return Markup("".join(out))


# ---------------------------------------------------------------- the page and the export


class _RangeError(ValueError):
    pass


def _range(request: web.Request) -> tuple[date, date]:
    svc = request.app[SERVICES]
    today = datetime.now(svc.tz).date()
    raw_from, raw_to = request.query.get("from", ""), request.query.get("to", "")
    try:
        day_to = date.fromisoformat(raw_to) if raw_to else today
        day_from = date.fromisoformat(raw_from) if raw_from else day_to - timedelta(days=DEFAULT_DAYS - 1)
    except ValueError:
        raise _RangeError("reports.bad_date") from None
    if day_from > day_to:
        raise _RangeError("reports.bad_order")
    if (day_to - day_from).days >= MAX_DAYS:
        raise _RangeError("reports.too_long")
    return day_from, day_to


async def _report(request: web.Request, day_from: date, day_to: date) -> tuple[Report, list[dict[str, Any]]]:
    svc = request.app[SERVICES]
    start, end = day_bounds(day_from, day_to, svc.tz)
    sites = sites_of(request)
    incidents = await svc.store.read(lambda c: load_incidents(c, start, end, sites))
    return compute(incidents, svc.tz, day_from, day_to, translator(request).lang), incidents


def _duration(seconds: float | None, tr: i18n.Translator) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return tr("reports.seconds", n=f"{seconds:.0f}")
    if seconds < 5400:
        return tr("reports.minutes", n=f"{seconds / 60:.1f}")
    return tr("reports.hours", n=f"{seconds / 3600:.1f}")


def _percent(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.1f}%"


@routes.get("/reports")
@roles("admin", "guard")
async def reports_page(request: web.Request) -> web.StreamResponse:
    tr = translator(request)
    try:
        day_from, day_to = _range(request)
    except _RangeError as e:
        today = datetime.now(request.app[SERVICES].tz).date()
        day_from, day_to = today - timedelta(days=DEFAULT_DAYS - 1), today
        error: str | None = str(e)
    else:
        error = None
    rep, _ = await _report(request, day_from, day_to)
    charts = {
        "days": vbar_chart([(d.strftime("%m-%d"), n) for d, n in rep.by_day], css="days"),
        "places": hbar_chart(rep.by_place[:PLACES_SHOWN], css="places"),
        "kinds": hbar_chart([(tr(f"kind.{k}"), n) for k, n in rep.by_kind], label_w=120, css="kinds"),
    }
    figures = {
        "total": str(rep.total),
        "false_rate": _percent(rep.false_rate),
        "mean_ack": _duration(rep.mean_ack_s, tr),
        "mean_close": _duration(rep.mean_close_s, tr),
        "closure_rate": _percent(rep.closure_rate),
        "escalated": str(rep.escalated),
    }
    return render(
        request,
        "reports.html",
        status=400 if error else 200,
        rep=rep,
        charts=charts,
        figures=figures,
        error=error,
        day_from=day_from.isoformat(),
        day_to=day_to.isoformat(),
        query=f"from={day_from.isoformat()}&to={day_to.isoformat()}",
    )


CSV_COLUMNS = (
    "id",
    "opened_local",
    "kind",
    "type",
    "place",
    "priority",
    "state",
    "cause",
    "owner",
    "dispatched_to",
    "acknowledged_local",
    "closed_local",
    "seconds_to_ack",
    "seconds_to_close",
    "escalated",
    "restored",
    "count",
)


@routes.get("/reports.csv")
@roles("admin", "guard")
async def reports_csv(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    try:
        day_from, day_to = _range(request)
    except _RangeError as e:
        return web.Response(status=400, text=translator(request)(str(e)), content_type="text/plain")
    _, incidents = await _report(request, day_from, day_to)
    lang = translator(request).lang

    def local(ts: str | None) -> str:
        return alarms.parse_ts(ts).astimezone(svc.tz).strftime("%Y-%m-%d %H:%M:%S") if ts else ""

    def secs(a: str | None, b: str | None) -> str:
        s = _seconds(a, b)
        return "" if s is None else f"{s:.0f}"

    buf = io.StringIO()
    w = csvcells.writer(buf)
    w.writerow(CSV_COLUMNS)
    for inc in incidents:
        w.writerow(
            (
                inc["id"],
                local(inc["created_at"]),
                inc["kind"],
                inc["type"],
                inc["where"].get(lang, ""),
                inc["priority"],
                inc["state"],
                inc["cause"],
                inc["owner"],
                inc["dispatched_to"],
                local(inc["acknowledged_at"]),
                local(inc["closed_at"]),
                secs(inc["created_at"], inc["acknowledged_at"]),
                secs(inc["created_at"], inc["closed_at"]) if inc["state"] == "closed" else "",
                "1" if inc["escalated_at"] else "0",
                "1" if inc["restored_at"] else "0",
                inc["count"],
            )
        )
    name = f"alarms-{day_from:%Y%m%d}-{day_to:%Y%m%d}.csv"
    return web.Response(
        body=("\ufeff" + buf.getvalue()).encode("utf-8"),  # the BOM: spreadsheets read it as UTF-8
        headers={"Content-Type": "text/csv; charset=utf-8", "Content-Disposition": f'attachment; filename="{name}"'},
    )
