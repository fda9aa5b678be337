"""The estate in the governance loop, against the grid-platform stub as a real process (its own reading of
docs/grid.md) and a real SQLite store: what goes up, when, with what; status back; an outage of an hour with time
controlled; a platform that answers slowly, refuses a record, and calls back twice.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from portal.alarms import incidents as alarms
from portal.alarms.board import BOARD
from portal.app import Options
from portal.grid import GRID
from portal.grid import contract as gc
from portal.web.answers import read_answer
from tests import procs
from tests.care_patrol_support import TimeMachine, estate_with_staff, person
from tests.grid_support import ADDRESS, GRID_CODE, grid_stub, grid_yaml, records
from tests.portal_support import (
    Portal,
    add_user,
    batch_payload,
    portal_public_key,
    running_portal,
    sign_in,
    wait_for,
    write_config,
)
from tests.registry_support import admin_session, estate_csv, form, import_csv, plate_code
from tests.stubs import Stub, run_stub
from tests.test_alarm_board import EVENTS_TOPIC, ZONE, FakeClock, ev
from tests.test_care import CONTACT, HOUR, ZHANG, enrol, incidents, watch
from tests.test_e2e_alarms import gateway_config

PW = "guard-password-0001"


async def _estate(p: Portal) -> str:
    csrf = await admin_session(p)
    assert (await import_csv(p, csrf, estate_csv()))[0] == 200
    return await plate_code(p, "3", "2", "301")


async def _press_sos(p: Portal, code: str) -> None:
    page = await (await p.client.get(f"/p/{code}")).text()
    token = page.split('name="csrf" value="')[1].split('"')[0]
    r = await form(p, f"/p/{code}/sos", {}, token)
    assert r.status == 303, await r.text()
    await p.client.app[BOARD].feed_now()


async def _case(p: Portal, **where: Any) -> dict[str, Any]:
    col, val = next(iter(where.items()))
    row = await p.services.store.read(
        lambda c: c.execute(f"SELECT * FROM grid_cases WHERE {col} = ?", (val,)).fetchone()
    )
    assert row is not None, where
    return dict(row)


async def _sos_incident(p: Portal) -> dict[str, Any]:
    incs = await p.services.store.read(alarms.open_incidents)
    [inc] = [i for i in incs if i["type"] == "house.sos"]
    return inc


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (10, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


async def test_an_sos_goes_up_its_handling_follows_and_the_platform_closure_comes_back(tmp_path: Path) -> None:
    stub = await grid_stub(tmp_path / "platform")
    try:
        extra = grid_yaml(tmp_path, stub.info["url"])
        async with running_portal(write_config(tmp_path, None, extra=extra)) as p:
            await stub.post("/callback-url", {"url": p.origin + "/api/grid/callback"})
            await stub.post("/callback-twice", {"on": True})  # the platform calls back twice, every time
            code = await _estate(p)
            await _press_sos(p, code)
            inc = await _sos_incident(p)
            # The case and its record were written with the incident (the same transaction as the opening).
            case = await _case(p, incident_id=inc["id"])
            assert case["trigger"] == "open" and case["number"].startswith("GH-s1-")
            number = case["number"]
            got = await wait_for(lambda: records(stub), what="the report at the platform")
            rec = got[number]["last"]
            # What the platform took (the stub decoded it with its own reading of the contract).
            assert rec["revision"] == 1 and rec["kind"] == "report"
            assert rec["source"] == "居民上报" and rec["source_code"] == "resident" and rec["urgency"] == "urgent"
            assert rec["subcategory"] == {"code": "0602", "name": "居民紧急求助"}
            assert rec["place"]["grid_code"] == GRID_CODE and rec["place"]["address"] == ADDRESS + "3幢2单元301室"
            assert (rec["place"]["lat"], rec["place"]["lon"], rec["place"]["crs"]) == (28.97, 118.87, "CGCS2000")
            assert rec["reporter"]["type"] == "resident" and rec["reporter"]["name"] == ""  # a plate is anonymous
            assert rec["estate"]["state"] == "new" and rec["estate"]["steps"][0]["stage"] == "上报"
            case_id = got[number]["case_id"]

            # The guard handles it; each step goes up as the next revision under the same number.
            board = p.client.app[BOARD]
            await add_user(p, "guard1", "guard", PW)
            await board.act(inc["id"], "ack", "guard1")
            await board.act(inc["id"], "dispatch", "guard1", guard="张三", text="住户电话 13812345678 已回拨")
            for step in range(board.steps_of("panic")):
                await board.act(inc["id"], "check", "guard1", step=step)
            await board.act(inc["id"], "finish", "guard1", cause="real", flags=["police"])

            async def estate_closed() -> dict[str, Any] | None:
                r = (await records(stub))[number]
                return r if r["last"]["estate"]["closed"] else None

            r = await wait_for(estate_closed, what="the estate's closure at the platform")
            last = r["last"]
            assert last["kind"] == "update" and last["number"] == number and last["revision"] > 1
            assert len(r["revisions"]) == len(set(r["revisions"]))  # no revision taken twice
            stages = [s["stage"] for s in last["estate"]["steps"]]
            assert stages[0] == "上报" and "立案" in stages and "派遣" in stages and stages[-1] == "结案"
            assert last["estate"]["cause"] == "real" and last["estate"]["flags"] == ["police"]
            notes = " ".join(s["note"] for s in last["estate"]["steps"])
            assert "138****5678" in notes and "13812345678" not in notes  # numbers masked on the way out

            # Status back: accepted, dispatched, closed, each called back twice (same callback id).
            for status, by in (("accepted", "街道指挥中心"), ("dispatched", "网格员 李四"), ("closed", "网格员 李四")):
                res = await stub.post(f"/cases/{number}/status", {"status": status, "by": by, "note": "已核实"})
                first, second = res["callbacks"]
                assert first["http"] == 200 and first["answer"]["duplicate"] is False
                assert second["http"] == 200 and second["answer"]["duplicate"] is True
            case = await _case(p, number=number)
            assert (case["status"], case["status_by"], case["platform_case"]) == ("closed", "网格员 李四", case_id)
            assert case["accepted_at"] <= case["closed_at"]
            log = await p.services.store.read(lambda c: alarms.incident_log(c, inc["id"]))
            grid_rows = [e["detail"] for e in log if e["action"] == "grid"]
            assert sum("已受理" in d for d in grid_rows) == 1 and sum("已办结" in d for d in grid_rows) == 1
            n_status = await p.services.store.read(
                lambda c: c.execute("SELECT count(*) FROM grid_status_log").fetchone()[0]
            )
            assert n_status == 3  # called back six times, applied three
            after = await p.services.store.read(lambda c: alarms.get_incident(c, inc["id"]))
            assert after is not None and after["grid"]["status"] == "closed" and after["grid"]["by"] == "网格员 李四"

            # The phone that pressed it sees the platform's closure.
            page = await (await p.client.get(f"/p/{code}/sos")).text()
            assert 'data-status="closed"' in page and "已办结" in page and "网格员 李四" in page
            assert 'http-equiv="refresh"' not in page  # finished: it stops refreshing
    finally:
        await stub.stop()
        await stub.session.close()


async def test_what_goes_up_follows_the_rules(tmp_path: Path) -> None:
    """Default rules: a fence alarm closed as false stays in the estate; one closed as real with damage goes up when
    closed; a guard forwards a problem report (with its photo); a device fault lasting four hours goes up (time
    controlled); another site's events never go up."""
    mono = FakeClock()
    stub = await grid_stub(tmp_path / "platform")
    try:
        extra = grid_yaml(tmp_path, stub.info["url"])
        cfg = write_config(tmp_path, None, gateways=[("s1", "gw1"), ("s2", "gw1")], extra=extra)
        async with running_portal(cfg, Options(monotonic=mono)) as p:
            code = await _estate(p)
            board = p.client.app[BOARD]
            await p.services.ingest.handle(
                EVENTS_TOPIC,
                batch_payload(
                    [
                        ev(1, "zone.alarm", incident="A", data=ZONE),
                        ev(2, "zone.alarm", incident="B", data={**ZONE, "zone": "P2"}, place={"zone": "P2"}),
                        ev(
                            3,
                            "device.offline",
                            incident="F",
                            prio=wire.Priority.FAULT,
                            data={"device": "io-1"},
                            place={"zone": "P3"},
                        ),
                    ]
                ),
            )
            await p.services.ingest.handle(
                wire.topic("s2", "gw1", "events"),
                batch_payload([ev(1, "zone.alarm", incident="X", data=ZONE, site="s2")], site="s2"),
            )
            await p.services.store.flush()
            await board.feed_now()
            incs = {i["engine_incident"]: i for i in await p.services.store.read(alarms.open_incidents)}
            assert (
                await p.services.store.read(lambda c: c.execute("SELECT count(*) FROM grid_cases").fetchone()[0]) == 0
            )  # nothing opens a case by itself here
            for key, cause, flags in (("A", "false", ["damage"]), ("B", "real", ["damage"])):
                await board.act(incs[key]["id"], "ack", "guard1")
                await board.act(incs[key]["id"], "finish", "guard1", cause=cause, flags=flags)
            await board.act(incs["X"]["id"], "ack", "guard1")
            await board.act(incs["X"]["id"], "finish", "guard1", cause="real", flags=["police"])  # site s2
            cases = await p.services.store.read(lambda c: [dict(r) for r in c.execute("SELECT * FROM grid_cases")])
            assert [(c["incident_id"], c["trigger"]) for c in cases] == [(incs["B"]["id"], "close")]
            # The fault: not at three hours, at four (the monotonic clock; the wall clock says it is new).
            link = p.client.app[GRID].link
            assert link is not None

            # (The link's own timer checks too, on the same clock: whichever call gets there first opens the one case.)
            async def lasting() -> list[dict[str, Any]]:
                sql = "SELECT * FROM grid_cases WHERE trigger = 'lasting'"
                return list(await p.services.store.read(lambda c: [dict(r) for r in c.execute(sql)]))

            await link.check_lasting()
            assert await lasting() == []
            mono.t += 3 * 3600
            await link.check_lasting()
            assert await lasting() == []
            mono.t += 3600 + 1
            await link.check_lasting()
            [fault_case] = await lasting()
            assert fault_case["incident_id"] == incs["F"]["id"]

            # A resident's problem report with a photo; a guard forwards it from the work page.
            page = await (await p.client.get(f"/p/{code}/report")).text()
            token = page.split('name="csrf" value="')[1].split('"')[0]
            photo = _png()
            r = await p.client.post(
                f"/p/{code}/report",
                data={"category": "repair", "text": "3楼 楼道灯坏了", "csrf": token, "photo": io.BytesIO(photo)},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            assert r.status == 303 and r.headers["Location"] == f"/p/{code}/report/status", await r.text()
            wid = await p.services.store.read(lambda c: c.execute("SELECT max(id) FROM work_items").fetchone()[0])
            work = await (await p.client.get("/admin/registry/work")).text()
            assert f'action="/grid/forward/{wid}"' in work
            csrf = work.split('name="csrf" value="')[1].split('"')[0]
            r = await form(p, f"/grid/forward/{wid}", {"next": "/admin/registry/work"}, csrf)
            assert r.status == 303 and r.headers["Location"] == "/admin/registry/work"
            r = await form(p, f"/grid/forward/{wid}", {}, csrf)
            assert r.status == 409  # once
            work_case = await _case(p, work_item_id=wid)

            got = await wait_for(lambda: _all_in(stub, 3), what="three cases at the platform")
            rec = got[work_case["number"]]["last"]
            assert rec["source"] == "居民上报" and rec["subcategory"]["name"] == "公共设施报修"
            [att] = rec["attachments"]
            stored = await p.services.store.read(
                lambda c: c.execute("SELECT photo FROM work_items WHERE id = ?", (wid,)).fetchone()[0]
            )
            assert Image.open(io.BytesIO(stored)).size == (24, 16)  # the photo as the portal keeps it (re-encoded)
            assert base64.b64decode(att["data"]) == stored and att["sha256"] == hashlib.sha256(stored).hexdigest()
            assert att["mime"] == "image/png" and rec["description"] == "3楼 楼道灯坏了"
            assert [s["action"] for s in rec["estate"]["steps"]][:2] == ["report", "forward"]
            fault = got[fault_case["number"]]["last"]
            assert fault["source"] == "物联网感知" and fault["reporter"]["type"] == "device"
            assert fault["subcategory"]["name"] == "安防设施故障"
            alarm = got[(await _case(p, incident_id=incs["B"]["id"]))["number"]]["last"]
            assert alarm["estate"]["closed"] and alarm["estate"]["flags"] == ["damage"]

            # The guard moves the report along: the platform gets the next revision.
            r = await form(p, f"/admin/registry/work/{wid}", {"status": "acknowledged", "note": "已派电工"}, csrf)
            assert r.status == 303

            async def moved() -> bool:
                return (await records(stub))[work_case["number"]]["last"]["estate"]["state"] == "acknowledged"

            await wait_for(moved, what="the report's next revision")
            # The resident's phone follows the report, and sees where the platform has it.
            await stub.post("/callback-url", {"url": p.origin + "/api/grid/callback"})
            await stub.post(f"/cases/{work_case['number']}/status", {"status": "dispatched", "by": "网格员 王五"})
            page = await (await p.client.get(f"/p/{code}/report/status")).text()
            assert "已受理" in page and "已派遣" in page and "网格员 王五" in page
    finally:
        await stub.stop()
        await stub.session.close()


async def _all_in(stub: Stub, n: int) -> dict[str, Any] | None:
    got = await records(stub)
    return got if len(got) >= n else None


async def test_an_hour_down_a_restart_slow_answers_and_a_refusal_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """The platform refuses connections for an hour (time controlled), the portal restarts in the middle, the
    platform comes back slow (it takes records but answers past the portal's timeout), then refuses one record
    as invalid: every case arrives, each revision once, the refused one waits for an administrator with the
    platform's reason and goes once sent again."""
    mono = FakeClock()
    rnd = lambda: 0.5  # noqa: E731  (jitter pinned: the backoff's steps are known)
    stub = await grid_stub(tmp_path / "platform")
    cfg = write_config(tmp_path, None, extra=grid_yaml(tmp_path, stub.info["url"], retry_first_s=5, retry_max_s=300))
    numbers: list[str] = []
    try:
        await stub.post("/down", {"on": True, "how": "refuse"})
        async with running_portal(cfg, Options(monotonic=mono, rand=rnd), last=False) as p:
            code = await _estate(p)
            link = p.client.app[GRID].link
            assert link is not None
            await _press_sos(p, code)
            inc = await _sos_incident(p)
            await p.client.app[BOARD].act(inc["id"], "ack", "guard1")
            await wait_for(lambda: link.fails >= 1, what="the first failed attempt")
            # Half an hour of trying: the link backs off (5 s, 10 s, ... up to 300 s), one probe at a time.
            attempts = await _run_clock(mono, link, 1800)
            assert 8 <= attempts <= 16, attempts
            assert "ClientConnectorError" in link.last_error
            page = await (await p.client.get("/grid")).text()
            assert 'data-delivery="pending"' in page and "无法连接" in page
            numbers.append((await _case(p, incident_id=inc["id"]))["number"])
        # The portal restarts with the platform still down; then half an hour more.
        async with running_portal(cfg, Options(monotonic=mono, rand=rnd)) as p:
            link = p.client.app[GRID].link
            assert link is not None
            await _press_sos(p, await plate_code(p, "3", "1", "101"))
            numbers.append(
                (
                    await p.services.store.read(
                        lambda c: c.execute("SELECT number FROM grid_cases ORDER BY id DESC LIMIT 1").fetchone()
                    )
                )[0]
            )
            await wait_for(lambda: link.fails >= 1, what="a failed attempt after the restart")
            await _run_clock(mono, link, 1800)
            assert await records(stub) == {}
            # Back, but slow: each record is taken and answered after the portal has given up on it.
            await stub.post("/slow", {"s": 1.5})
            await stub.post("/down", {"on": False})
            await _run_clock(mono, link, 900, until=lambda: _all_in(stub, 2))
            await stub.post("/slow", {"s": 0})
            await _run_clock(mono, link, 900, until=lambda: _nothing_waiting(p))
            got = await records(stub)
            assert set(got) == set(numbers)
            state = await stub.state()
            assert state["counts"]["duplicates"] >= 1  # the slow answers were re-sent; the platform took each once
            for n in numbers:
                assert len(got[n]["revisions"]) == len(set(got[n]["revisions"]))
            first = got[numbers[0]]
            assert first["revisions"][0] == 1 and first["last"]["estate"]["state"] == "acknowledged"
            # The ack queued during the outage went up as one revision after the report (not one per step).
            assert len(first["revisions"]) == 2

            # A record the platform refuses: failed with its reason, for an administrator; the others go on.
            await stub.post("/reject", {"count": 1, "status": 422, "reason": "事件描述含有不允许的字段"})
            board = p.client.app[BOARD]
            inc2 = next(
                i
                for i in await p.services.store.read(alarms.open_incidents)
                if i["type"] == "house.sos" and i["state"] == "new"
            )
            await board.act(inc2["id"], "ack", "guard1")
            case2 = await _case(p, incident_id=inc2["id"])
            row = await wait_for(
                lambda: p.services.store.read(
                    lambda c: c.execute(
                        "SELECT * FROM grid_outbox WHERE case_id = ? AND state = 'failed'", (case2["id"],)
                    ).fetchone()
                ),
                what="the refused record",
            )
            assert "HTTP 422" in row["last_error"] and "不允许的字段" in row["last_error"]
            await board.act(inc2["id"], "dispatch", "guard1", guard="张三")  # queued behind the refusal
            await asyncio.sleep(0.3)
            assert (await records(stub))[case2["number"]]["revisions"] == [1]
            await add_user(p, "boss", "admin", PW)
            await sign_in(p, "boss", PW)
            page = await (await p.client.get("/grid")).text()
            assert "不允许的字段" in page and f'action="/grid/outbox/{row["id"]}/resend"' in page
            csrf = page.split('name="csrf" value="')[1].split('"')[0]
            r = await form(p, f"/grid/outbox/{row['id']}/resend", {}, csrf)
            assert r.status == 303

            async def dispatched() -> bool:
                last = (await records(stub))[case2["number"]]["last"]
                return last["estate"]["state"] == "dispatched"

            await wait_for(dispatched, what="the refused record sent again with the newest state")
            revs = (await records(stub))[case2["number"]]["revisions"]
            assert revs == sorted(set(revs))
            audit = await p.services.store.read(
                lambda c: [r[0] for r in c.execute("SELECT action FROM audit WHERE action LIKE 'grid.%'")]
            )
            assert "grid.refused" in audit and "grid.resend" in audit
    finally:
        await stub.stop()
        await stub.session.close()


async def _nothing_waiting(p: Portal) -> bool:
    n = await p.services.store.read(
        lambda c: c.execute("SELECT count(*) FROM grid_outbox WHERE state = 'pending'").fetchone()[0]
    )
    return n == 0


async def _run_clock(mono: FakeClock, link: Any, seconds: float, step: float = 30.0, until: Any = None) -> int:
    """Move the monotonic clock on by ``seconds`` in steps, letting the link try at each (an attempt in flight, such
    as a slow answer, ends first); returns how many attempts failed."""
    tries = 0
    t_end = mono.t + seconds
    while mono.t < t_end:
        mono.t += step
        fails = link.fails
        for _ in range(60):
            await asyncio.sleep(0.05)
            if link.fails != fails or link.mono() < link.resume_at or link.fails == 0:
                break
        tries += link.fails > fails
        if until is not None and await until():
            break
    return tries


def test_the_record_round_trips_through_the_contract() -> None:
    raw = json.dumps({"number": "GH-s1-01ABC", "revision": 2, "case_id": "WG1", "duplicate": True}).encode()
    a = gc.decode_answer(raw)
    assert (a.number, a.revision, a.duplicate) == ("GH-s1-01ABC", 2, True)


async def test_a_fence_cut_from_a_gateway_closed_as_real_with_damage_goes_up(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """Real processes from the fence to the district: the perimeter panel stub, the gateway, Mosquitto, the portal
    and the grid-platform stub. A fence zone trips; the guard closes it as real with damage; it goes up as an IoT
    event with the zone's label, the device and the guard's steps."""
    platform = await grid_stub(tmp_path / "platform")
    try:
        extra = grid_yaml(tmp_path / "portal", platform.info["url"])
        async with (
            running_portal(write_config(tmp_path / "portal", broker, extra=extra)) as p,
            run_stub("firmware_stubs.perimeter_panel", "--tcp", "127.0.0.1:0", "--zones", "8") as perimeter,
            run_stub("firmware_stubs.indoor_panel", "--pty", "--account", "1234") as indoor,
        ):
            portal_key = portal_public_key(p)  # the gateway verifies commands
            cfg = gateway_config(tmp_path / "gw", broker, perimeter, indoor, portal_key)
            gw = await asyncio.to_thread(lambda: procs.gateway(cfg, tmp_path / "logs").start())
            try:
                await wait_for(lambda: p.services.ingest.connected, timeout=20, what="the portal on the broker")
                await perimeter.post("/zones/1/tamper", {"active": True})  # a tamper alarms armed or not

                async def incident() -> dict[str, Any] | None:
                    incs = await p.services.store.read(alarms.open_incidents)
                    return next((i for i in incs if i["gateway"] == "gw1"), None)

                inc = await wait_for(incident, timeout=30, what="the gateway's alarm on the board")
                board = p.client.app[BOARD]
                await board.act(inc["id"], "ack", "guard1")
                assert await records(platform) == {}  # an open alarm does not go up by itself
                await board.act(inc["id"], "finish", "guard1", cause="real", flags=["damage"], text="围栏被剪断")
                got = await wait_for(lambda: records(platform), timeout=20, what="the alarm at the platform")
                [r] = got.values()
                rec = r["last"]
                assert rec["source"] == "物联网感知" and rec["reporter"] == {
                    "type": "device",
                    "name": "panel-1",
                    "org": "阳光花园物业服务中心",
                    "org_phone": "",
                }
                assert "北围墙" in rec["place"]["address"] and rec["place"]["grid_code"] == GRID_CODE
                assert rec["estate"]["closed"] and rec["estate"]["flags"] == ["damage"]
                assert any("围栏被剪断" in s["note"] for s in rec["estate"]["steps"])
            finally:
                await asyncio.to_thread(gw.stop)
    finally:
        await platform.stop()
        await platform.session.close()


async def test_status_comes_back_by_polling_when_callbacks_cannot(tmp_path: Path) -> None:
    """A platform that cannot reach the portal (no callback URL): with ``poll_every_s`` the portal asks, signed, and
    applies each status once however often it asks."""
    stub = await grid_stub(tmp_path / "platform")
    try:
        extra = grid_yaml(tmp_path, stub.info["url"], more="  poll_every_s: 3600\n")  # stepped by hand below
        async with running_portal(write_config(tmp_path, None, extra=extra)) as p:
            code = await _estate(p)
            await _press_sos(p, code)
            got = await wait_for(lambda: records(stub), what="the SOS at the platform")
            [number] = got
            link = p.client.app[GRID].link
            assert link is not None

            async def taken() -> bool:
                return bool((await _case(p, number=number))["reported_at"])

            await wait_for(taken, what="the platform's answer recorded")

            async def move(status: str) -> None:
                res = await stub.post(f"/cases/{number}/status", {"status": status, "by": "网格员 赵六"})
                assert "error" in res["callbacks"][0]  # the platform cannot call back

            await move("accepted")
            assert await link.poll_once() == 1
            assert await link.poll_once() == 0  # the same history read again changes nothing
            await move("dispatched")
            await move("closed")
            assert await link.poll_once() == 2
            assert await link.poll_once() == 0  # closed: no longer asked about
            case = await _case(p, number=number)
            assert (case["status"], case["status_by"]) == ("closed", "网格员 赵六")
            sources = await p.services.store.read(
                lambda c: [r[0] for r in c.execute("SELECT source FROM grid_status_log")]
            )
            assert sources == ["poll"] * 3
            assert (await stub.state())["counts"]["polls"] == 3
    finally:
        await stub.stop()
        await stub.session.close()


async def test_answers_that_come_in_pieces_are_read_whole(tmp_path: Path) -> None:
    """A platform whose answers straggle in as over a WAN: the headers (with Content-Length) first, then the body in
    pieces of 16 bytes, to records and to polls alike. Each record is taken once (a first piece alone does not
    decode: read as the answer, the record would be sent again and again and the link would back off for good), and
    a status history of many pieces is read whole and applied."""
    stub = await grid_stub(tmp_path / "platform")
    try:
        await stub.post("/fragment", {"bytes": 16, "pause_s": 0.01})
        extra = grid_yaml(tmp_path, stub.info["url"], timeout_s=5, more="  poll_every_s: 3600\n")
        async with running_portal(write_config(tmp_path, None, extra=extra)) as p:
            link = p.client.app[GRID].link
            assert link is not None
            await _press_sos(p, await _estate(p))
            await wait_for(lambda: _nothing_waiting(p), what="the first report taken")
            inc = await _sos_incident(p)
            await p.client.app[BOARD].act(inc["id"], "ack", "guard1")  # its revision 2
            await _press_sos(p, await plate_code(p, "3", "2", "302"))  # a second case
            await wait_for(lambda: _nothing_waiting(p), what="every record taken")
            got = await records(stub)
            assert sorted(r["revisions"] for r in got.values()) == [[1], [1, 2]]  # each revision once
            assert (await stub.state())["counts"]["duplicates"] == 0
            outbox = await p.services.store.read(
                lambda c: [tuple(r) for r in c.execute("SELECT state, attempts, last_error FROM grid_outbox")]
            )
            assert outbox == [("sent", 1, "")] * 3
            assert link.fails == 0 and link.last_error == ""

            # A history of three statuses, some twenty pieces: read whole, every status applied.
            number = (await _case(p, incident_id=inc["id"]))["number"]
            for status in ("accepted", "dispatched", "handling"):
                await stub.post(f"/cases/{number}/status", {"status": status, "by": "网格员 赵六", "note": "已到场"})
            assert await link.poll_once() == 3
            assert (await _case(p, number=number))["status"] == "handling"
    finally:
        await stub.stop()
        await stub.session.close()


async def test_a_record_the_platform_cannot_take_does_not_hold_up_the_others(tmp_path: Path) -> None:
    """The platform answers 500 to every record of one case (and takes the others): while the link backs off it
    probes with one record at a time, and that is not always the oldest, so the later cases still go up; the
    unlucky one waits, tried again, and goes once the platform can take it."""
    stub = await grid_stub(tmp_path / "platform")
    try:
        await stub.post("/fail-case", {"status": 500})  # the next new case: the first SOS
        extra = grid_yaml(tmp_path, stub.info["url"], retry_first_s=0.2, retry_max_s=0.5)
        async with running_portal(write_config(tmp_path, None, extra=extra)) as p:
            link = p.client.app[GRID].link
            assert link is not None
            await _press_sos(p, await _estate(p))
            await wait_for(lambda: link.fails >= 1, what="the first case's record failing")
            for building, unit, house in (("3", "2", "302"), ("3", "1", "101")):
                await _press_sos(p, await plate_code(p, building, unit, house))
            got = await wait_for(lambda: _all_in(stub, 2), what="the two later cases at the platform")
            numbers = await p.services.store.read(
                lambda c: [r[0] for r in c.execute("SELECT number FROM grid_cases ORDER BY id")]
            )
            assert set(got) == set(numbers[1:])
            stuck = await p.services.store.read(
                lambda c: c.execute("SELECT state, attempts, last_error FROM grid_outbox ORDER BY id").fetchone()
            )
            assert stuck["state"] == "pending" and stuck["attempts"] >= 2 and "HTTP 500" in stuck["last_error"]

            await stub.post("/fail-case", {"status": 0})  # the platform can take it now
            await wait_for(lambda: _nothing_waiting(p), what="the first case taken too")
            got = await records(stub)
            assert set(got) == set(numbers) and all(r["revisions"] == [1] for r in got.values())
    finally:
        await stub.stop()
        await stub.session.close()


async def test_an_answer_is_read_whole_up_to_its_cap_and_a_longer_one_is_refused() -> None:
    """read_answer against a real HTTP server: a body in pieces (with Content-Length, or chunked) is read whole; one
    that says it is longer than the cap, or turns out longer while it comes, is refused (None), never cut."""
    cap = 1000

    async def answer(request: web.Request) -> web.StreamResponse:
        size, declared = int(request.query["size"]), request.query.get("declared") == "1"
        resp = web.StreamResponse()
        if declared:
            resp.content_length = size
        await resp.prepare(request)
        for i in range(0, size, 300):
            await resp.write(b"x" * min(300, size - i))
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    try:
        async with aiohttp.ClientSession() as http:
            for size, declared, whole in (
                (cap, True, True),
                (cap, False, True),
                (cap + 1, True, False),
                (2 * cap, False, False),
            ):
                async with http.get(url, params={"size": str(size), "declared": str(int(declared))}) as r:
                    got = await read_answer(r, cap)
                assert got == (b"x" * size if whole else None), (size, declared)
    finally:
        await runner.cleanup()


async def test_a_care_alert_goes_up_as_what_the_care_watch_found_not_as_a_residents_help_call(tmp_path: Path) -> None:
    """A no-activity care alert is raised by the portal itself, as a resident's help call is, but nobody pressed
    anything: its record says what the care watch found (the rule and its hours) and where, from the estate's own
    sensing (物联网感知, the care watch as the reporter), never 居民上报 or the door plate's 一键求助; the contact's
    number stays in the estate."""
    clock = TimeMachine()
    stub = await grid_stub(tmp_path / "platform")
    try:
        extra = grid_yaml(tmp_path, stub.info["url"])
        async with running_portal(write_config(tmp_path, None, extra=extra), clock.options()) as p:
            await estate_with_staff(p)
            zhang = await person(p, ZHANG)
            await enrol(p, [zhang["id"]], hours=24)
            clock.mono_s += 24 * HOUR + 1  # a day without activity (the watch's clock)
            await watch(p).check_now()
            (inc,) = await incidents(p, "care")
            title = inc["title"]["zh-CN"]
            assert "24" in title
            got = await wait_for(lambda: records(stub), what="the care alert at the platform")
            [rec] = [r["last"] for r in got.values()]
            assert rec["description"].startswith(title) and "3幢 2单元 301室" in rec["description"]
            assert "一键求助" not in rec["description"] and "设备" not in rec["description"]
            assert (rec["source"], rec["source_code"]) == ("物联网感知", "iot")
            assert (rec["reporter"]["type"], rec["reporter"]["name"]) == ("device", "独居关爱")
            assert rec["subcategory"]["name"] == "独居老人关爱"
            assert CONTACT not in json.dumps(rec, ensure_ascii=False)
    finally:
        await stub.stop()
        await stub.session.close()
