"""The yardstick (一把尺子考核): per month and per category, the events reported up, accepted and closed by the
platform, the closure rate, the platform's mean times to accept and to close, and the estate's own mean times to
acknowledge and to close the same events; a page, and CSV and XLSX exports of the same table.

Months are the site's local months of when the estate put the event on its way up. The platform's times run from
when it took the record (the portal's clock at its answer) to the times it reports (the platform's clock); the
estate's from when the incident opened, or the problem report came in, to its acknowledgement and its closing.
"""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import xlsxwriter
from aiohttp import web

from portal.store import Conn
from portal.web import csvcells, i18n
from portal.web.auth import roles
from portal.web.scope import Sites, sites_of
from portal.web.scope import sql as site_sql
from portal.web.services import SERVICES
from portal.web.views import Answer, render, translator

routes = web.RouteTableDef()
MAX_MONTHS = 24
DEFAULT_MONTHS = 3
COLUMNS = (
    "month",
    "category",
    "category_name",
    "subcategory",
    "subcategory_name",
    "reported",
    "delivered",
    "accepted",
    "closed",
    "returned",
    "closure_rate",
    "platform_accept_s",
    "platform_close_s",
    "estate_ack_s",
    "estate_close_s",
)


def _ts(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _secs(a: str | None, b: str | None) -> float | None:
    ta, tb = _ts(a), _ts(b)
    if ta is None or tb is None:
        return None
    return max(0.0, (tb - ta).total_seconds())


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class Row:
    month: str
    category: str
    category_name: str
    subcategory: str
    subcategory_name: str
    reported: int = 0
    delivered: int = 0
    accepted: int = 0
    closed: int = 0
    returned: int = 0
    accept_s: list[float] = field(default_factory=list)
    close_s: list[float] = field(default_factory=list)
    ack_s: list[float] = field(default_factory=list)
    estate_close_s: list[float] = field(default_factory=list)

    @property
    def closure_rate(self) -> float | None:
        return self.closed / self.reported if self.reported else None

    def values(self) -> tuple[Any, ...]:
        return (
            self.month,
            self.category,
            self.category_name,
            self.subcategory,
            self.subcategory_name,
            self.reported,
            self.delivered,
            self.accepted,
            self.closed,
            self.returned,
            self.closure_rate,
            _mean(self.accept_s),
            _mean(self.close_s),
            _mean(self.ack_s),
            _mean(self.estate_close_s),
        )


def month_bounds(first: date, last: date, tz: ZoneInfo) -> tuple[str, str]:
    """UTC text bounds [start, end) of the site-local months from ``first`` to ``last`` (day 1 of each)."""
    start = datetime(first.year, first.month, 1, tzinfo=tz).astimezone(UTC)
    ny, nm = (last.year + 1, 1) if last.month == 12 else (last.year, last.month + 1)
    end = datetime(ny, nm, 1, tzinfo=tz).astimezone(UTC)
    return start.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), end.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _work_times(notes: str, created: str, status: str) -> tuple[str | None, str | None]:
    """When a problem report was first taken up (any step after it came in) and when it was closed."""
    ack = closed = None
    for n in json.loads(notes or "[]"):
        at = n.get("at") if isinstance(n, dict) else None
        if not isinstance(at, str):
            continue
        if ack is None and n.get("status") in ("acknowledged", "dispatched", "resolved", "closed"):
            ack = at
        if n.get("status") == "closed":
            closed = at
    return ack, closed if status == "closed" else None


def compute(conn: Conn, first: date, last: date, tz: ZoneInfo, sites: Sites = None) -> list[Row]:
    start, end = month_bounds(first, last, tz)
    cond, args = site_sql("c.site", sites)
    rows = conn.execute(
        "SELECT c.*, i.created_at AS i_created, i.acknowledged_at AS i_ack, i.closed_at AS i_closed, i.state AS"
        " i_state, w.created_at AS w_created, w.notes AS w_notes, w.status AS w_status FROM grid_cases c"
        " LEFT JOIN incidents i ON i.id = c.incident_id LEFT JOIN work_items w ON w.id = c.work_item_id"
        f" WHERE c.created_at >= ? AND c.created_at < ? AND {cond} ORDER BY c.created_at, c.id",
        (start, end, *args),
    ).fetchall()
    table: dict[tuple[str, str, str], Row] = {}
    for r in rows:
        created = _ts(r["created_at"])
        assert created is not None
        month = created.astimezone(tz).strftime("%Y-%m")
        key = (month, r["category"], r["subcategory"])
        row = table.get(key)
        if row is None:
            row = table[key] = Row(month, r["category"], r["category_name"], r["subcategory"], r["subcategory_name"])
        row.reported += 1
        row.delivered += r["reported_at"] is not None
        row.accepted += r["accepted_at"] is not None
        row.closed += r["closed_at"] is not None
        row.returned += r["status"] == "returned"
        for bucket, a, b in (
            (row.accept_s, r["reported_at"], r["accepted_at"]),
            (row.close_s, r["reported_at"], r["closed_at"]),
        ):
            s = _secs(a, b)
            if s is not None:
                bucket.append(s)
        if r["incident_id"] is not None:
            opened, ack, closed = r["i_created"], r["i_ack"], r["i_closed"] if r["i_state"] == "closed" else None
        else:
            opened = r["w_created"]
            ack, closed = _work_times(r["w_notes"], r["w_created"], r["w_status"])
        for bucket, a, b in ((row.ack_s, opened, ack), (row.estate_close_s, opened, closed)):
            s = _secs(a, b)
            if s is not None:
                bucket.append(s)
    return sorted(table.values(), key=lambda x: (x.month, x.category, x.subcategory))


def totals(rows: list[Row]) -> Row:
    out = Row("", "", "", "", "")
    for r in rows:
        out.reported += r.reported
        out.delivered += r.delivered
        out.accepted += r.accepted
        out.closed += r.closed
        out.returned += r.returned
        out.accept_s += r.accept_s
        out.close_s += r.close_s
        out.ack_s += r.ack_s
        out.estate_close_s += r.estate_close_s
    return out


# ---------------------------------------------------------------- the page and the exports


class _RangeError(ValueError):
    pass


def _month(raw: str) -> date:
    try:
        y, m = raw.split("-")
        if len(y) != 4 or len(m) != 2:
            raise ValueError(raw)
        return date(int(y), int(m), 1)
    except ValueError:
        raise _RangeError("grid.reports.bad_month") from None


def _range(request: web.Request) -> tuple[date, date]:
    tz = request.app[SERVICES].tz
    today = datetime.now(tz).date()
    raw_from, raw_to = request.query.get("from", ""), request.query.get("to", "")
    last = _month(raw_to) if raw_to else date(today.year, today.month, 1)
    if raw_from:
        first = _month(raw_from)
    else:
        n = last.year * 12 + last.month - 1 - (DEFAULT_MONTHS - 1)
        first = date(n // 12, n % 12 + 1, 1)
    if first > last:
        raise _RangeError("grid.reports.bad_order")
    if (last.year - first.year) * 12 + last.month - first.month >= MAX_MONTHS:
        raise _RangeError("grid.reports.too_long")
    return first, last


async def _rows(request: web.Request, first: date, last: date) -> list[Row]:
    svc = request.app[SERVICES]
    sites = sites_of(request)
    return await svc.store.read(lambda c: compute(c, first, last, svc.tz, sites))


def duration(seconds: float | None, tr: i18n.Translator) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return tr("reports.seconds", n=f"{seconds:.0f}")
    if seconds < 5400:
        return tr("reports.minutes", n=f"{seconds / 60:.1f}")
    return tr("reports.hours", n=f"{seconds / 3600:.1f}")


def percent(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.1f}%"


@routes.get("/grid/reports")
@roles("admin", "guard")
async def reports_page(request: web.Request) -> web.StreamResponse:
    tr = translator(request)
    error = None
    try:
        first, last = _range(request)
    except _RangeError as e:
        error = str(e)
        today = datetime.now(request.app[SERVICES].tz).date()
        first = last = date(today.year, today.month, 1)
    rows = await _rows(request, first, last)
    return render(
        request,
        "grid_reports.html",
        status=400 if error else 200,
        rows=rows,
        total=totals(rows),
        error=error,
        month_from=first.strftime("%Y-%m"),
        month_to=last.strftime("%Y-%m"),
        query=f"from={first:%Y-%m}&to={last:%Y-%m}",
        duration=lambda s: duration(s, tr),
        percent=percent,
        mean=_mean,
    )


def _headers(tr: i18n.Translator) -> list[str]:
    return [tr(f"grid.col.{c}") for c in COLUMNS]


def _export_values(r: Row) -> list[Any]:
    v = list(r.values())
    v[10] = None if v[10] is None else round(v[10], 4)
    for i in (11, 12, 13, 14):
        v[i] = None if v[i] is None else round(v[i])
    return v


async def _export(request: web.Request) -> tuple[list[Row], str, i18n.Translator]:
    tr = translator(request)
    try:
        first, last = _range(request)
    except _RangeError as e:
        raise Answer(web.Response(status=400, text=tr(str(e)), content_type="text/plain")) from None
    return await _rows(request, first, last), f"grid-{first:%Y%m}-{last:%Y%m}", tr


@routes.get("/grid/reports.csv")
@roles("admin", "guard")
async def reports_csv(request: web.Request) -> web.StreamResponse:
    rows, name, tr = await _export(request)
    buf = io.StringIO()
    w = csvcells.writer(buf)  # no cell a spreadsheet would run as a formula
    w.writerow(_headers(tr))
    for r in rows:
        w.writerow(_export_values(r))
    return web.Response(
        body=("\ufeff" + buf.getvalue()).encode("utf-8"),  # the BOM: spreadsheets read UTF-8
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{name}.csv"',
        },
    )


def xlsx(rows: list[Row], headers: list[str], sheet: str) -> bytes:
    """The table as an XLSX workbook. Text is written as text, never as a formula (xlsxwriter's ``write`` would
    run a cell that starts with "="). CPU: call it on a worker thread."""
    buf = io.BytesIO()
    wb = xlsxwriter.Workbook(buf, {"in_memory": True, "strings_to_formulas": False, "strings_to_urls": False})
    ws = wb.add_worksheet(sheet[:31])
    bold = wb.add_format({"bold": True})
    pct = wb.add_format({"num_format": "0.0%"})
    for j, h in enumerate(headers):
        ws.write_string(0, j, h, bold)
    for i, r in enumerate(rows, start=1):
        for j, v in enumerate(_export_values(r)):
            if v is None:
                ws.write_blank(i, j, None)
            elif isinstance(v, int | float):
                ws.write_number(i, j, v, pct if COLUMNS[j] == "closure_rate" else None)
            else:
                ws.write_string(i, j, str(v))
    ws.freeze_panes(1, 0)
    ws.set_column(0, len(headers) - 1, 14)
    wb.close()
    return buf.getvalue()


@routes.get("/grid/reports.xlsx")
@roles("admin", "guard")
async def reports_xlsx(request: web.Request) -> web.StreamResponse:
    rows, name, tr = await _export(request)
    svc = request.app[SERVICES]
    data = await asyncio.get_running_loop().run_in_executor(svc.cpu, xlsx, rows, _headers(tr), tr("grid.reports.sheet"))
    return web.Response(
        body=data,
        headers={
            "Content-Type": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            "Content-Disposition": f'attachment; filename="{name}.xlsx"',
        },
    )
