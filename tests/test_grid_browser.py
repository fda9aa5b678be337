"""Done means, in real processes: the portal (``python -m portal run``), the grid-platform stub, and Chromium for
a resident's phone and the guard's board. An SOS from a door plate goes up to the grid platform; the guard handles
it on the board (closing it as real, police called) and the platform gets each step; the platform accepts and
closes the case, calling back twice; the guard sees the platform's status on the incident and the resident's
phone shows the closure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
from playwright.async_api import async_playwright, expect

from tests.grid_support import grid_stub, grid_yaml, records
from tests.portal_support import ROOT, portal_process, sign_in_console, wait_for, write_config
from tests.registry_support import estate_csv, stored_plate_code
from tests.test_console_shell_browser import CHROMIUM, KIOSK, PW, sign_in

T = 15_000


def _adduser(cfg: Path, user: str, role: str) -> None:
    pw = cfg.parent / f"{user}.pw"
    pw.write_text(PW)
    pw.chmod(0o600)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "portal",
            "adduser",
            "--config",
            str(cfg),
            "--user",
            user,
            "--role",
            role,
            "--password-file",
            str(pw),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


async def test_an_sos_goes_up_and_its_closure_comes_back_to_the_phone(tmp_path: Path, artifacts: Path) -> None:
    stub = await grid_stub(tmp_path / "platform")
    try:
        cfg = write_config(tmp_path, None, extra=grid_yaml(tmp_path, stub.info["url"], tick_s=0.2, timeout_s=5))
        _adduser(cfg, "office", "admin")
        _adduser(cfg, "guard1", "guard")
        with portal_process(cfg) as portal:
            url = portal.url
            origin = url.rstrip("/")
            await stub.post("/callback-url", {"url": origin + "/api/grid/callback"})
            await stub.post("/callback-twice", {"on": True})
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                await sign_in_console(http, url, "office", PW)
                page = await (await http.get(url + "console")).text()
                csrf = page.split('name="csrf-token" content="')[1].split('"')[0]
                r = await http.post(
                    url + "api/registry/import",
                    data=estate_csv().encode(),
                    headers={"Origin": origin, "X-CSRF-Token": csrf, "Content-Type": "text/csv"},
                )
                assert r.status == 200, await r.text()
            code = stored_plate_code(tmp_path / "data" / "portal.db", "3", "2", "301")
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
                try:
                    guard = await (await browser.new_context(viewport={"width": 1400, "height": 1000})).new_page()
                    await sign_in(guard, origin, "/board")
                    phone = await (
                        await browser.new_context(
                            viewport={"width": 375, "height": 740}, is_mobile=True, locale="zh-CN"
                        )
                    ).new_page()
                    phone.on("dialog", lambda d: d.accept())
                    await phone.goto(f"{origin}/p/{code}")
                    await phone.click("#sos")
                    await expect(phone.locator("#sos-state")).to_be_visible(timeout=T)

                    # On the board: the SOS, and its report on the way up (then taken by the platform).
                    sos = guard.locator('#incidents li.incident[data-kind="panic"]')
                    await expect(sos).to_have_count(1, timeout=T)
                    await expect(sos.locator(".grid")).to_contain_text("网格：已上报", timeout=T)
                    got = await wait_for(lambda: records(stub), what="the SOS at the platform")
                    [number] = got
                    assert got[number]["last"]["source"] == "居民上报"

                    # The guard handles it to a close, marking that the police were called.
                    await sos.locator("button[data-act=ack]").click()
                    await expect(sos).to_have_attribute("data-state", "acknowledged", timeout=T)
                    await sos.locator("input.guard").fill("张三")
                    await sos.locator("button[data-act=dispatch]").click()
                    await expect(sos).to_have_attribute("data-state", "dispatched", timeout=T)
                    boxes = sos.locator(".checklist input[type=checkbox]")
                    for i in range(await boxes.count()):
                        await boxes.nth(i).check()
                        await expect(boxes.nth(i)).to_be_checked()
                    await sos.locator('input.flag[data-flag="police"]').check()
                    await sos.locator("button[data-act=finish][data-cause=real]").click()
                    closed_card = guard.locator('#closed li.incident[data-kind="panic"]')
                    await expect(closed_card).to_have_attribute("data-state", "closed", timeout=T)

                    async def estate_closed() -> bool:
                        last = (await records(stub))[number]["last"]
                        return bool(last["estate"]["closed"]) and last["estate"]["flags"] == ["police"]

                    await wait_for(estate_closed, timeout=20, what="the estate's closure at the platform")
                    # The phone: handled by the estate, still with the grid platform (so it keeps refreshing).
                    await phone.reload()
                    await expect(phone.locator("#message")).to_contain_text("已处置")
                    await expect(phone.locator(".grid-state")).to_have_attribute("data-status", "sent")

                    # The platform accepts, dispatches its grid worker and closes; each status called back twice.
                    for status, by in (
                        ("accepted", "街道指挥中心"),
                        ("dispatched", "网格员 李四"),
                        ("closed", "网格员 李四"),
                    ):
                        res = await stub.post(f"/cases/{number}/status", {"status": status, "by": by})
                        assert [c["answer"]["duplicate"] for c in res["callbacks"]] == [False, True]
                        await expect(closed_card.locator(".grid")).to_contain_text(
                            {"accepted": "已受理", "dispatched": "已派遣", "closed": "已办结"}[status], timeout=T
                        )
                    await expect(closed_card).to_have_attribute("data-grid", "closed")
                    await expect(closed_card.locator(".grid")).to_contain_text("网格员 李四")
                    opener = "e => { const d = e.closest('details'); if (d) d.open = true; }"
                    await guard.locator("#closed").evaluate(opener)
                    await guard.screenshot(path=str(artifacts / "board-grid-closed.png"), full_page=True)

                    await phone.reload()
                    state = phone.locator(".grid-state")
                    await expect(state).to_have_attribute("data-status", "closed")
                    await expect(state).to_contain_text("已办结")
                    await expect(state).to_contain_text("网格员 李四")
                    assert await phone.locator('meta[http-equiv="refresh"]').count() == 0
                    await phone.screenshot(path=str(artifacts / "phone-sos-grid-closed.png"), full_page=True)

                    # In English too.
                    await phone.goto(f"{origin}/lang/en?next=/p/{code}/sos")
                    await expect(phone.locator(".grid-state")).to_contain_text("Closed")
                    # The grid page lists the case for the guard, with its history.
                    await guard.goto(origin + "/grid")
                    row = guard.locator(f'#cases tr[data-number="{number}"]')
                    await expect(row).to_have_attribute("data-status", "closed")
                    await expect(row).to_have_attribute("data-delivery", "sent")
                finally:
                    await browser.close()
    finally:
        await stub.stop()
        await stub.session.close()
