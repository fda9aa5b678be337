"""The access log from a known set of access decisions published by a gateway over a real Mosquitto: each
filter (door, house, person by name / subject / portal user, result and denial reason, site-local time range)
returns exactly the expected events, paging walks them all once, and the CSV export (streamed in chunks)
carries the same rows, names resolved, formula-looking cells defused."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from portal.doors import access_log
from tests.doors_support import door_event, estate_with_doors, guard_session, publish
from tests.portal_support import GATEWAY, SITE, Portal, mqtt, post_form, running_portal, wait_for, write_config

T0 = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)  # 08:00 in Asia/Shanghai


async def subject_of(p: Portal, name: str) -> str:
    return str(
        await p.services.store.read(
            lambda c: c.execute(
                "SELECT r.subject FROM reg_residents r JOIN reg_people p ON p.id = r.person_id WHERE p.name = ?",
                (name,),
            ).fetchone()[0]
        )
    )


async def search(p: Portal, **q: str) -> list[str]:
    """The event ids the API returns for a query, newest first (one page of up to 500)."""
    r = await p.client.get("/api/access-log", params={"limit": "500", **q})
    assert r.status == 200, (q, await r.text())
    return [row["event_id"] for row in (await r.json())["rows"]]


async def test_access_log_filters_pages_and_exports(
    tmp_path: Path, broker: MosquittoProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "ack"), qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await estate_with_doors(p)
        await guard_session(p)
        r = await post_form(
            p, "/visitors", {"name": "刘访客", "house": "3-2-301", "hours": "4", "uses": "2"}, csrf=p.csrf
        )
        assert r.status == 303
        visitor = await p.services.store.read(lambda c: c.execute("SELECT subject FROM guard_visitors").fetchone()[0])
        zhang, wang = await subject_of(p, "张伟"), await subject_of(p, "王芳")

        def at(minutes: int) -> datetime:
            return T0 + timedelta(minutes=minutes)

        granted, denied = "access.granted", "access.denied"
        evs = [
            door_event(
                1,
                granted,
                "b3u2",
                {
                    "reader": "r-b3u2",
                    "pass_id": "01" * 12,
                    "kind": "resident",
                    "subject": zhang,
                    "house": "3-2-301",
                    "uses_left": 0,
                },
                ts=at(0),
            ),
            door_event(
                2,
                denied,
                "b3u2",
                {
                    "reader": "r-b3u2",
                    "reason": "expired",
                    "pass_id": "02" * 12,
                    "subject": zhang,
                    "house": "3-2-301",
                    "detail": "expired 65 s ago",
                },
                ts=at(10),
            ),
            door_event(
                3,
                granted,
                "north-gate",
                {
                    "reader": "r-gate",
                    "pass_id": "03" * 12,
                    "kind": "visitor",
                    "subject": visitor,
                    "house": "3-2-301",
                    "uses_left": 1,
                },
                ts=at(20),
            ),
            door_event(
                4,
                denied,
                "north-gate",
                {
                    "reader": "r-gate",
                    "reason": "wrong-door",
                    "subject": "v:other",
                    "house": "3-1-101",
                    "detail": "unit 3/1 only",
                },
                ts=at(30),
            ),
            door_event(
                5,
                denied,
                "north-gate",
                {"reader": "r-gate", "reason": "malformed", "detail": '=HYPERLINK("x")'},
                ts=at(40),
            ),
            door_event(
                6,
                granted,
                "b3u1",
                {
                    "kind": "remote",
                    "by": "guard:guard1",
                    "reason": "送货",
                    "subject": "",
                    "house": "",
                    "uses_left": 0,
                    "reader": "",
                },
                ts=at(50),
            ),
            door_event(
                7,
                denied,
                "b3u1",
                {
                    "reader": "r-b3u1",
                    "reason": "blocked",
                    "subject": "r:blocked",
                    "house": "3-1-101",
                    "detail": "on the blocklist",
                },
                ts=at(60),
                priority=wire.Priority.TAMPER,
            ),
            door_event(
                8,
                granted,
                "b3u2",
                {
                    "reader": "r-b3u2",
                    "pass_id": "08" * 12,
                    "kind": "resident",
                    "subject": wang,
                    "house": "3-2-302",
                    "uses_left": 0,
                },
                ts=at(70),
            ),
            door_event(9, "door.state", "b3u2", {"state": "open"}, ts=at(71)),  # not an access decision
        ]
        await publish(gw, evs[:4])
        await publish(gw, evs[4:])
        ids = {n + 1: e.id for n, e in enumerate(evs)}

        def want(*ns: int) -> list[str]:
            return [ids[n] for n in sorted(ns, reverse=True)]

        assert await search(p) == want(1, 2, 3, 4, 5, 6, 7, 8)
        assert await search(p, door="b3u2") == want(1, 2, 8)
        assert await search(p, door="s1/north-gate") == want(3, 4, 5)
        assert await search(p, house="3-2-301") == want(1, 2, 3)
        assert await search(p, house="3幢2单元301室") == want(1, 2, 3)
        assert await search(p, person="张伟") == want(1, 2)
        assert await search(p, person="刘访客") == want(3)
        assert await search(p, person="guard1") == want(6)
        assert await search(p, person="v:other") == want(4)
        assert await search(p, person="nobody-by-that-name") == []
        assert await search(p, result="granted") == want(1, 3, 6, 8)
        assert await search(p, result="denied") == want(2, 4, 5, 7)
        assert await search(p, result="expired") == want(2)
        assert await search(p, kind="remote") == want(6)
        assert await search(p, door="north-gate", result="denied") == want(4, 5)
        # Site-local times; "to" is exclusive, a bare date means the whole day.
        assert await search(p, **{"from": "2026-03-01T08:15", "to": "2026-03-01T08:45"}) == want(3, 4, 5)
        assert await search(p, **{"from": "2026-03-01T08:15", "to": "2026-03-01T08:40"}) == want(3, 4)
        assert await search(p, **{"from": "2026-03-01", "to": "2026-03-01"}) == want(1, 2, 3, 4, 5, 6, 7, 8)
        assert await search(p, **{"from": "2026-03-02"}) == []
        for bad in (
            {"result": "nope"},
            {"from": "yesterday"},
            {"before": "x"},
            {"limit": "0"},
            {"door": "a b"},
            {"kind": "robot"},
        ):
            r = await p.client.get("/api/access-log", params=bad)
            assert r.status == 400, bad

        # Paging walks every row once, newest first.
        seen: list[str] = []
        params: dict[str, str] = {"limit": "3"}
        pages = 0
        while True:
            body: dict[str, Any] = await (await p.client.get("/api/access-log", params=params)).json()
            seen += [row["event_id"] for row in body["rows"]]
            pages += 1
            if "next" not in body:
                break
            params = {"limit": "3", "before": body["next"]["before"]}
        assert seen == want(1, 2, 3, 4, 5, 6, 7, 8) and pages == 3

        # The page: names resolved, the filter kept in the export link.
        html = await (await p.client.get("/access-log", params={"door": "s1/b3u2"})).text()
        assert "张伟" in html and "王芳" in html and "刘访客" not in html and "已过期" in html
        assert 'href="/access-log.csv?door=s1%2Fb3u2"' in html
        assert (await p.client.get("/access-log", params={"result": "nope"})).status == 400

        # CSV, read from the store a few rows at a time (chunk of 3 here, 1000 in service).
        monkeypatch.setattr(access_log, "CHUNK", 3)
        r = await p.client.get("/access-log.csv")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
        assert "attachment" in r.headers["Content-Disposition"]
        raw = await r.read()
        assert raw.startswith("\ufeff".encode())
        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"))))
        assert [x["event_id"] for x in rows] == want(1, 2, 3, 4, 5, 6, 7, 8)
        by_id = {x["event_id"]: x for x in rows}
        two = by_id[ids[2]]
        assert two["time_local"] == "2026-03-01 08:10:00" and two["time_utc"] == "2026-03-01T00:10:00.000000Z"
        assert (two["result"], two["reason"], two["person"], two["house"]) == ("拒绝", "已过期", "张伟", "3-2-301")
        assert two["door_label"] == "3幢2单元门" and two["reader"] == "r-b3u2" and two["note"] == "expired 65 s ago"
        assert by_id[ids[3]]["person"] == "刘访客" and by_id[ids[3]]["kind"] == "visitor"
        assert by_id[ids[5]]["note"] == '\'=HYPERLINK("x")'  # not a formula in a spreadsheet
        assert (by_id[ids[6]]["by"], by_id[ids[6]]["note"]) == ("guard:guard1", "送货")
        r = await p.client.get("/access-log.csv", params={"result": "denied", "door": "north-gate"})
        rows = list(csv.DictReader(io.StringIO((await r.read()).decode("utf-8-sig"))))
        assert [x["event_id"] for x in rows] == want(4, 5)
        exports = await p.services.store.read(
            lambda c: [
                tuple(x)
                for x in c.execute("SELECT actor, detail FROM audit WHERE action = 'export.access_log' ORDER BY id")
            ]
        )
        assert exports == [("guard:guard1", ""), ("guard:guard1", "door=north-gate&result=denied")]

        # A pass granted on paper whose door did not open (the relay did not move): found as "not opened", with why.
        failed = door_event(
            10,
            "door.unlock_failed",
            "b3u2",
            {
                "reader": "r-b3u2",
                "reason": "relay_not_moved",
                "detail": "read-back: lock_relay reads off",
                "pass_id": "0a" * 12,
                "kind": "resident",
                "subject": zhang,
                "house": "3-2-301",
            },
            ts=at(80),
        )
        await publish(gw, [failed])
        assert await search(p, result="failed") == [failed.id]
        assert await search(p, result="relay_not_moved") == [failed.id]
        assert await search(p, person="张伟") == [failed.id, *want(1, 2)]
        assert await search(p, result="denied") == want(2, 4, 5, 7)
        html = await (await p.client.get("/access-log", params={"result": "failed"})).text()
        assert "未开门" in html and "门锁未动作" in html and "张伟" in html

        # Installers do not read the access log.
        await guard_session(p, "fitter1", "fitter-password-0001", role="installer")
        assert (await p.client.get("/api/access-log")).status == 403
        assert (await p.client.get("/access-log.csv")).status == 403
