"""Alarm reports computed from a known set of incidents on a real store: per zone and per day (site-local
days in Asia/Shanghai), false-alarm rate, mean times to acknowledge and to close, closure rate; the page's
figures and SVG bars, the CSV export and the date filter over HTTP."""

from __future__ import annotations

import csv
import io
import re
from datetime import date
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway import wire
from portal.alarms import incidents as alarms
from portal.alarms import reports
from portal.store import Op, Store, StoreBatch, Tx
from tests.portal_support import GATEWAY, SITE, add_user, running_portal, sign_in, store_key, write_config
from tests.test_alarm_board import ZONE, ev

PW = "guard-password-0001"
SHANGHAI = ZoneInfo("Asia/Shanghai")

# (engine incident, event, created at (UTC), [(action, kwargs, at)])
FENCE = {"zone": "P1"}
FLAT = {"building": "5", "unit": "1", "house": "1201"}
CASES: list[tuple[str, str, dict[str, str], int, str, list[tuple[str, dict[str, Any], str]]]] = [
    # 2026-03-01 23:59 in Shanghai: the first day
    (
        "A",
        "zone.alarm",
        FENCE,
        30,
        "2026-03-01T15:59:00.000000Z",
        [
            ("ack", {}, "2026-03-01T15:59:30.000000Z"),
            ("resolve", {"cause": "false"}, "2026-03-01T16:05:00.000000Z"),
            ("close", {}, "2026-03-01T16:09:00.000000Z"),
        ],
    ),
    # 2026-03-02 00:01 in Shanghai: the second day, though the same UTC date as A
    (
        "B",
        "zone.alarm",
        FENCE,
        30,
        "2026-03-01T16:01:00.000000Z",
        [
            ("ack", {}, "2026-03-01T16:02:30.000000Z"),
            ("dispatch", {"guard": "张三"}, "2026-03-01T16:03:00.000000Z"),
            ("resolve", {"cause": "real"}, "2026-03-01T16:20:00.000000Z"),
            ("close", {}, "2026-03-01T16:31:00.000000Z"),
        ],
    ),
    (
        "C",
        "panel.alarm",
        FLAT,
        50,
        "2026-03-02T02:00:00.000000Z",
        [("ack", {}, "2026-03-02T02:01:00.000000Z"), ("resolve", {"cause": "false"}, "2026-03-02T02:30:00.000000Z")],
    ),
    ("D", "device.offline", {}, 10, "2026-03-02T03:00:00.000000Z", []),  # nobody took it: escalated
    ("E", "zone.alarm", {"zone": "P2"}, 30, "2026-03-05T01:00:00.000000Z", []),  # after the range
    ("F", "zone.alarm", {"zone": "P2"}, 30, "2026-02-28T15:59:59.000000Z", []),  # 02-28 23:59:59 local: before
]


class _Seed(Op):
    """Store one event and fold it in at a given time, in one op (a running board's own feed then skips it)."""

    def __init__(self, e: wire.Event, now: str) -> None:
        self.e, self.now = e, now

    def apply(self, tx: Tx) -> int | None:
        res = StoreBatch(wire.batch_events(SITE, GATEWAY, [self.e])).apply(tx)
        return alarms.apply_event(tx.conn, res.new_events[0], now=self.now)


async def seed(store: Store) -> dict[str, int]:
    ids: dict[str, int] = {}
    for seq, (name, etype, place, prio, created, steps) in enumerate(CASES, start=1):
        data = (
            dict(ZONE)
            if etype == "zone.alarm"
            else {"kind": "fire", "name_zh": "火警", "name_en": "Fire"}
            if etype == "panel.alarm"
            else {"reason": "timeout"}
        )
        if "zone" in place:
            data["zone"] = place["zone"]
        e = ev(seq, etype, incident=name, prio=prio, data=data, place=place)
        ids[name] = await store.write(_Seed(e, created))
        for action, kw, at in steps:
            await store.write(alarms.IncidentAction(ids[name], action, "guard1", now=at, **kw))
    await store.write(alarms.Escalate([ids["D"]], "2026-03-02T03:01:00.000000Z"))
    return ids


async def test_report_figures_from_a_known_set_of_incidents(tmp_path: Path) -> None:
    store = Store(tmp_path / "portal.db", key=store_key(tmp_path / "portal.db"))
    await store.start()
    try:
        await seed(store)
        start, end = reports.day_bounds(date(2026, 3, 1), date(2026, 3, 3), SHANGHAI)
        assert (start, end) == ("2026-02-28T16:00:00.000000Z", "2026-03-03T16:00:00.000000Z")
        rows = await store.read(lambda c: reports.load_incidents(c, start, end))
    finally:
        await store.close()
    rep = reports.compute(rows, SHANGHAI, date(2026, 3, 1), date(2026, 3, 3))
    assert rep.total == 4
    assert rep.by_day == [(date(2026, 3, 1), 1), (date(2026, 3, 2), 3), (date(2026, 3, 3), 0)]
    assert rep.by_place == [("北围栏", 2), ("5幢 1单元 1201室", 1), ("fence-1", 1)]
    assert rep.by_kind == [("fire", 1), ("intrusion", 2), ("fault", 1)]
    assert (rep.acknowledged, rep.mean_ack_s) == (3, pytest.approx((30 + 90 + 60) / 3))
    assert (rep.closed, rep.mean_close_s) == (2, pytest.approx((600 + 1800) / 2))
    assert (rep.resolved, rep.false_alarms, rep.false_rate) == (3, 2, pytest.approx(2 / 3))
    assert rep.closure_rate == pytest.approx(0.5)
    assert rep.escalated == 1
    assert rep.causes == {"real": 1, "false": 2}
    empty = reports.compute([], SHANGHAI, date(2026, 3, 1), date(2026, 3, 1))
    assert (empty.total, empty.false_rate, empty.closure_rate, empty.mean_ack_s) == (0, None, None, None)


def _figure(html: str, name: str) -> str:
    m = re.search(rf'data-figure="{name}"><span class="n">([^<]*)</span>', html)
    assert m, name
    return m.group(1)


def _bars(html: str, css: str) -> dict[str, int]:
    chart = re.search(rf'<svg[^>]*class="chart [a-z]+ {css}".*?</svg>', html, re.S)
    assert chart, css
    return {
        m.group(1): int(m.group(2)) for m in re.finditer(r'data-label="([^"]*)" data-value="(\d+)"', chart.group(0))
    }


async def test_reports_page_csv_and_date_filter_over_http(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        ids = await seed(p.services.store)
        await add_user(p, "guard1", "guard", PW)
        assert (await sign_in(p, "guard1", PW)).status == 303
        r = await p.client.get("/reports", params={"from": "2026-03-01", "to": "2026-03-03"})
        assert r.status == 200
        html = await r.text()
        assert [
            _figure(html, k) for k in ("total", "false_rate", "mean_ack", "mean_close", "closure_rate", "escalated")
        ] == ["4", "66.7%", "60 秒", "20.0 分钟", "50.0%", "1"]
        assert _bars(html, "days") == {"03-01": 1, "03-02": 3, "03-03": 0}
        assert _bars(html, "places") == {"北围栏": 2, "5幢 1单元 1201室": 1, "fence-1": 1}
        assert _bars(html, "kinds") == {"火警": 1, "入侵": 2, "故障": 1}
        assert 'href="/reports.csv?from=2026-03-01&amp;to=2026-03-03"' in html

        # One day only: A alone (its UTC date is also B's, but not its Shanghai date).
        html = await (await p.client.get("/reports", params={"from": "2026-03-01", "to": "2026-03-01"})).text()
        assert _figure(html, "total") == "1" and _figure(html, "false_rate") == "100.0%"

        r = await p.client.get("/reports.csv", params={"from": "2026-03-01", "to": "2026-03-03"})
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
        assert 'filename="alarms-20260301-20260303.csv"' in r.headers["Content-Disposition"]
        raw = await r.read()
        assert raw.startswith("\ufeff".encode())
        table = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"))))
        assert [int(row["id"]) for row in table] == [ids[k] for k in "ABCD"]
        a, b, c, d = table
        assert (a["opened_local"], a["seconds_to_ack"], a["seconds_to_close"], a["cause"], a["state"]) == (
            "2026-03-01 23:59:00",
            "30",
            "600",
            "false",
            "closed",
        )
        assert (b["dispatched_to"], b["seconds_to_ack"], b["seconds_to_close"]) == ("张三", "90", "1800")
        assert (c["place"], c["seconds_to_close"], c["state"], c["kind"]) == (
            "5幢 1单元 1201室",
            "",
            "resolved",
            "fire",
        )
        assert (d["escalated"], d["seconds_to_ack"], d["owner"]) == ("1", "", "")

        # English, and bad ranges.
        p.client.session.cookie_jar.update_cookies({"lang": "en"})
        html = await (await p.client.get("/reports", params={"from": "2026-03-01", "to": "2026-03-03"})).text()
        assert _figure(html, "mean_ack") == "60 s" and "False-alarm rate" in html
        for bad in (
            {"from": "2026-13-01"},
            {"from": "2026-03-04", "to": "2026-03-01"},
            {"from": "2024-01-01", "to": "2026-01-01"},
        ):
            assert (await p.client.get("/reports", params=bad)).status == 400
            assert (await p.client.get("/reports.csv", params=bad)).status == 400
