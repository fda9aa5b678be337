"""`gatehouse demo` as a user runs it, through its real processes: everything starts, each part its own process;
the intruder's alarms and the indoor panel's burglary reach the board; seeded residents' passes scanned at the
readers and a visitor's pass from the owner's phone reach the access log; a guard's remote unlock is answered by
the gateway; the house plate printed from the web encodes the demo's plate URL; on a phone-sized headless
Chromium the owner opens the plate, signs in and presses Open at the entrance; the elder's care alert rings on the
board, goes up to the grid-platform stub and shows the platform's status back, and her "我很好" closes it; the patrol
route's checkpoints sit on the site map and the guard's scans are recorded; Ctrl-C stops every process, and a
second run carries on with the same data."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import sqlite3
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psutil
import pytest
import zxingcpp
from PIL import Image
from playwright.async_api import async_playwright, expect

from gateway.demo.estate import CHECKPOINTS, ELDER, OWNER, PATROL_ROUTE, PEOPLE
from tests import procs
from tests.registry_support import stored_plate_code
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

T = TypeVar("T")
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}


class Staff:
    """A staff member's signed-in HTTP session at the demo's portal."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # IP-address cookies
        self.csrf = ""

    async def sign_in(self, user: str, password: str) -> Staff:
        page = await (await self.http.get(self.url + "login")).text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf
        r = await self.http.post(
            self.url + "login",
            data={"user": user, "password": password, "csrf": csrf.group(1)},
            headers={"Origin": self.url.rstrip("/")},
        )
        assert r.status == 200 and str(r.url).endswith("/console"), await r.text()
        m = re.search(r'name="csrf" value="([^"]+)"', await r.text())
        assert m
        self.csrf = m.group(1)
        return self

    async def json(self, path: str, **params: str) -> Any:
        r = await self.http.get(self.url + path.lstrip("/"), params=params)
        assert r.status == 200, (path, r.status)
        return await r.json()

    async def close(self) -> None:
        await self.http.close()


def _run(tmp_path: Path, name: str, duration: int = 150) -> procs.Child:
    return procs.Child(
        name,
        [
            procs.PY,
            "-m",
            "gateway.cli",
            "demo",
            "--data",
            str(tmp_path / "demo"),
            "--port",
            "0",
            "--intruder-every",
            "2",
            "--duration",
            str(duration),
        ],
        tmp_path / "logs",
    )


async def test_the_demo_is_the_estate_and_ctrl_c_stops_all(tmp_path: Path, artifacts: Path) -> None:
    demo = _run(tmp_path, "demo").start(timeout=90)
    try:
        await _exercise(tmp_path, demo, artifacts)
    finally:
        demo.kill()


async def _exercise(tmp_path: Path, demo: procs.Child, artifacts: Path) -> None:
    info = demo.info
    url = str(info["url"])
    assert set(info["resident"]) == {"phone", "password"} and info["resident"]["phone"] == OWNER.phone
    assert str(info["plate_url"]).startswith(url + "p/")
    children = psutil.Process(demo.proc.pid).children(recursive=True)  # type: ignore[union-attr]
    assert len(children) >= 9, "broker, five hardware stubs, the grid platform, portal and gateway: a process each"
    banner = demo.read_until(str(info["plate_url"]))
    assert banner and "▄" in "".join(demo.lines), "the plate's QR is drawn in the terminal"
    db = tmp_path / "demo" / "portal" / "portal.db"

    guard = await Staff(url).sign_in(str(info["user"]), str(info["password"]))
    admin = await Staff(url).sign_in(info["admin"]["user"], info["admin"]["password"])
    try:
        # The guard's remote unlock of a unit door, answered by the gateway (not a timeout): the relay moved.
        r = await guard.http.post(
            url + "api/doors/demo/b1u1/unlock",
            json={"reason": "快递员进门 courier"},
            headers={"Origin": url.rstrip("/"), "X-CSRF-Token": guard.csrf},
        )
        assert r.status == 202, await r.text()
        cid = (await r.json())["command"]["id"]

        async def settled() -> dict[str, Any] | None:
            c = (await guard.json(f"api/doors/commands/{cid}"))["command"]
            return c if c["status"] not in ("pending", "sent") else None

        cmd = await wait_for(settled, 20, "the gateway's answer to the remote unlock", step=0.5)
        assert cmd["status"] == "opened", cmd

        # Plate printing from the web encodes the demo's public address and the plate the demo printed.
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        (hid,) = c.execute(
            "SELECT h.id FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b"
            " ON b.id = u.building_id WHERE b.code = ? AND u.code = ? AND h.code = ?",
            (OWNER.building, OWNER.unit, OWNER.house),
        ).fetchone()
        c.close()
        png = await admin.http.get(url + f"admin/registry/plates/house/{hid}.png")
        assert png.status == 200
        found = [
            b.text
            for b in zxingcpp.read_barcodes(
                Image.open(io.BytesIO(await png.read())), formats=zxingcpp.BarcodeFormat.QRCode
            )
        ]
        assert found == [info["plate_url"]]

        # Scripted life: the indoor panel's burglary and the intruder reach the board; seeded residents' passes
        # and a visitor's pass open doors in the access log.
        async def board_has() -> list[str] | None:
            types = {i["type"] for i in (await guard.json("api/board"))["incidents"]}
            return sorted(types) if {"panel.alarm", "zone.alarm", "door.held"} <= types else None

        await wait_for(
            board_has, 40, "the indoor panel's burglary, a zone alarm and a door held open on the board", step=0.5
        )
        names = {p.name for p in PEOPLE}

        async def access() -> list[dict[str, Any]] | None:
            rows = (await guard.json("api/access-log"))["rows"]
            granted = [r for r in rows if r["result"] == "granted"]
            kinds = {r["kind"] for r in granted}
            resident = [r for r in granted if r["kind"] == "resident" and r["person"] in names]
            return granted if resident and "visitor" in kinds else None

        granted = await wait_for(
            access, 40, "a seeded resident's and a visitor's pass granted in the access log", step=0.5
        )
        assert {r["door"] for r in granted} & {"main-gate", "b1u1", "b2u1"}
        assert demo.read_until("[intruder] crossing")

        # The elder's care alert rings on the board at her flat, goes up to the grid platform (the stub has the
        # record under the incident's number) and the platform's status comes back onto the incident.
        async def care_alert() -> dict[str, Any] | None:
            incs = (await guard.json("api/board"))["incidents"]
            return next((i for i in incs if i["type"] == "care.panel_inactive"), None)

        alert = await wait_for(care_alert, 40, "the elder's care alert on the board", step=0.5)
        assert alert["kind"] == "care"
        assert (alert["place"]["building"], alert["place"]["unit"], alert["place"]["house"]) == (
            ELDER.building,
            ELDER.unit,
            ELDER.house,
        )

        async def status_back() -> dict[str, Any] | None:
            g = (await guard.json(f"api/incidents/{alert['id']}"))["incident"]["grid"]
            return g if g and g["status"] in ("accepted", "dispatched", "handling", "closed") else None

        up = await wait_for(status_back, 30, "the grid platform's status back on the care alert", step=0.5)
        async with aiohttp.ClientSession() as http:
            got = await (await http.get(info["stubs"]["grid"] + "/state")).json()
        record = got["records"][up["number"]]
        last = record["last"]
        assert last["kind"] in ("report", "update") and last["subcategory"]["name"] == "独居老人关爱", last
        assert last["place"]["house"] == ELDER.house

        # The patrol route: its checkpoints in order, each placed on the site map, and the guard's scans recorded.
        def patrol() -> tuple[list[tuple[str, float | None]], int]:
            c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                points = c.execute(
                    "SELECT cp.name, cp.x FROM patrol_routes r JOIN patrol_route_points p ON"
                    " p.route_id = r.id JOIN patrol_checkpoints cp ON cp.id = p.checkpoint_id"
                    " WHERE r.name = ? ORDER BY p.position",
                    (PATROL_ROUTE["name"],),
                ).fetchall()
                scans = c.execute("SELECT count(*) FROM patrol_scans WHERE guard = ?", (info["user"],)).fetchone()[0]
            finally:
                c.close()
            return points, scans

        async def scanned() -> tuple[list[tuple[str, float | None]], int] | None:
            points, scans = await asyncio.to_thread(patrol)
            return (points, scans) if scans >= 2 else None

        points, _ = await wait_for(scanned, 40, "the guard's checkpoint scans", step=0.5)
        assert [n for n, _ in points] == [n for n, _, _ in CHECKPOINTS]
        assert all(x is not None for _, x in points), "every checkpoint is placed on the site map"
        assert len(info["checkpoints"]) == len(CHECKPOINTS) and all(
            u.startswith(url + "g/c/") for u in info["checkpoints"]
        )

        # The owner on a phone: the plate, sign in, then Open at the entrance plate of the owner's unit.
        entrance = stored_plate_code(db, OWNER.building, OWNER.unit)
        assert info["entrance_url"] == f"{url}p/{entrance}", "the demo's entrance plate URL is the stored plate's"
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                ph = await (await browser.new_context(**PHONE)).new_page()  # type: ignore[arg-type]
                await ph.goto(str(info["plate_url"]))
                await expect(ph.locator("#address")).to_contain_text("1幢1单元101")
                await ph.goto(str(info["entrance_url"]))
                await ph.click("#entrance-sign-in")
                await ph.fill("#login-phone", info["resident"]["phone"])
                await ph.fill("#login-password", info["resident"]["password"])
                await ph.click("#login-submit")
                await ph.wait_for_url(f"**/p/{entrance}")
                await ph.locator(".open-button").first.click()
                await expect(ph.locator("#result")).to_have_attribute("data-result", "opened", timeout=15_000)
                await ph.screenshot(path=str(artifacts / "demo_phone_open.png"), full_page=True)

                # The guard's site map places the zones, the beam and the doors; the office's registry lists the
                # doors. Screenshots of both are kept.
                desk = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
                await desk.goto(f"{url}login")
                await desk.fill("#user", str(info["user"]))
                await desk.fill("#password", str(info["password"]))
                await desk.click("#submit")
                await desk.wait_for_url("**/console")
                await desk.goto(f"{url}board/map")
                for label in ("南大门", "1幢1单元门", "北区红外对射", "北围墙"):
                    await expect(desk.locator(".map-wrap svg").first).to_contain_text(label)
                await desk.screenshot(path=str(artifacts / "demo_guard_map.png"), full_page=True)
                office = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
                await office.goto(f"{url}login")
                await office.fill("#user", info["admin"]["user"])
                await office.fill("#password", info["admin"]["password"])
                await office.click("#submit")
                await office.wait_for_url("**/console")
                await office.goto(f"{url}admin/registry")
                await expect(office.locator("body")).to_contain_text("南大门")
                await office.screenshot(path=str(artifacts / "demo_admin_registry.png"), full_page=True)
            finally:
                await browser.close()
        remote = (await guard.json("api/access-log", kind="remote"))["rows"]
        assert any(r["by"].startswith("resident:") and r["door"] == "b1u1" for r in remote), remote

        # "我很好" from the elder's phone closed her alert.
        async def fine() -> dict[str, Any] | None:
            inc = (await guard.json(f"api/incidents/{alert['id']}"))["incident"]
            return inc if inc["state"] == "closed" else None

        closed = await wait_for(fine, 40, "the elder's 我很好 closing her care alert", step=0.5)
        assert str(closed["closed_by"]).startswith("resident:"), closed
    finally:
        await guard.close()
        await admin.close()

    demo.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
    assert demo.proc.wait(30) == 0  # type: ignore[union-attr]
    demo.stop()
    for c in children:
        assert not c.is_running() or c.status() == psutil.STATUS_ZOMBIE, f"{c.pid} left running"

    again = _run(tmp_path, "demo-2", duration=60).start(timeout=90)
    try:
        assert again.info["password"] == info["password"], "the second run uses the same data and accounts"
        assert again.info["resident"] == info["resident"] and again.info["plate_url"].endswith(
            str(info["plate_url"]).rsplit("/p/", 1)[1]
        )
        guard = await Staff(str(again.info["url"])).sign_in(str(info["user"]), str(info["password"]))
        try:
            before = {r["event_id"] for r in granted}
            rows = (await guard.json("api/access-log", limit="500"))["rows"]
            assert before <= {r["event_id"] for r in rows}
        finally:
            await guard.close()
    finally:
        again.stop()
