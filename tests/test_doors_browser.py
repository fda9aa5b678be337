"""The door list in real headless Chromium: a guard watches a door change state live (no reload), opens a door
remotely with a reason (an empty reason is not sent), the gateway answers through the broker and the page shows
the door opened; a screenshot for people to look at."""

from __future__ import annotations

import asyncio
from pathlib import Path

from playwright.async_api import APIResponse, Browser, Page, Route, async_playwright, expect

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from tests.doors_support import (
    CMD_TOPIC,
    GUARD,
    GUARD_PW,
    door_event,
    estate_with_doors,
    next_command,
    publish,
    result_event,
)
from tests.portal_support import GATEWAY, SITE, add_user, mqtt, running_portal, wait_for, write_config

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
T = 10_000  # ms


async def guard_on_doors(browser: Browser, origin: str) -> Page:
    """A guard signed in on /doors, its live socket online."""
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(origin + "/doors")
    await page.fill("#user", GUARD)
    await page.fill("#password", GUARD_PW)
    await page.click("#submit")
    await page.wait_for_url("**/doors")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)
    return page


async def test_door_list_live_state_and_remote_unlock(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw, async_playwright() as pw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "ack"), qos=1)
        await gw.subscribe(CMD_TOPIC, qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await estate_with_doors(p)
        await add_user(p, GUARD, "guard", GUARD_PW)
        await publish(gw, [door_event(1, "door.state", "north-gate", {"state": "closed"})])

        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = await guard_on_doors(browser, p.origin)
            gate = page.locator('#doors li.door[data-key="s1/north-gate"]')
            unit = page.locator('#doors li.door[data-key="s1/b3u2"]')
            await expect(gate).to_have_attribute("data-state", "closed")
            await expect(gate.locator(".state")).to_have_text("已关")
            await expect(unit).to_have_attribute("data-state", "unknown")
            await page.evaluate("window.__noReload = 7")

            # Live: the gate is forced open, then a door nobody registered shows up.
            await publish(
                gw, [door_event(2, "door.state", "north-gate", {"state": "forced"}, priority=wire.Priority.ROUTINE)]
            )
            await expect(gate).to_have_attribute("data-state", "forced", timeout=T)
            await expect(gate.locator(".state")).to_have_text("被强行打开")
            await publish(
                gw, [door_event(3, "door.tamper", "b3u2", {"incident": "i", "count": 1}, priority=wire.Priority.TAMPER)]
            )
            await expect(unit.locator(".flag-tamper")).to_be_visible(timeout=T)
            await publish(gw, [door_event(4, "door.state", "garage", {"state": "open"})])
            garage = page.locator('#doors li.door[data-key="s1/garage"]')
            await expect(garage).to_have_attribute("data-state", "open", timeout=T)
            assert await page.evaluate("window.__noReload") == 7

            # Remote unlock: an empty reason is not sent; with one, the command goes out and the answer shows.
            await unit.locator("details.unlock summary").click()
            await unit.locator(".unlock-go").click()
            assert await unit.locator(".reason").evaluate("el => !el.validity.valid")
            try:
                sent = await next_command(p, gw, timeout=0.5)
                raise AssertionError(f"a command was sent without a reason: {sent}")
            except TimeoutError:
                pass
            await unit.locator(".reason").fill("快递员送大件")
            await unit.locator(".unlock-go").click()
            cmd = await next_command(p, gw)
            assert cmd.type == "unlock" and cmd.args == {"door": "b3u2", "reason": "快递员送大件"}
            assert cmd.by == f"guard:{GUARD}"
            result = unit.locator(".unlock-result")
            await expect(result).to_have_attribute("data-status", "pending", timeout=T)
            await expect(page.locator(f'#commands tr[data-id="{cmd.id}"]')).to_contain_text("快递员送大件")
            await publish(
                gw, [result_event(5, cmd.id, True, "b3u2"), door_event(6, "door.state", "b3u2", {"state": "unlocked"})]
            )
            await expect(result).to_have_attribute("data-status", "opened", timeout=T)
            await expect(result).to_have_text("门已打开")
            await expect(unit).to_have_attribute("data-state", "unlocked", timeout=T)
            await expect(page.locator(f'#commands tr[data-id="{cmd.id}"] .status')).to_have_text("门已打开")
            assert await page.evaluate("window.__noReload") == 7
            await page.screenshot(path=str(artifacts / "doors.png"), full_page=True)
        finally:
            await browser.close()


async def test_a_resync_answer_older_than_what_the_socket_told_does_not_undo_it(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """After its socket comes back the page asks /api/doors what changed meanwhile; a door the socket tells while that
    answer is on its way must keep the socket's newer state, not go back to the answer's older one."""
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw, async_playwright() as pw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "ack"), qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await estate_with_doors(p)
        await add_user(p, GUARD, "guard", GUARD_PW)
        await publish(gw, [door_event(1, "door.state", "north-gate", {"state": "closed"})])
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = await guard_on_doors(browser, p.origin)
            gate = page.locator('#doors li.door[data-key="s1/north-gate"]')
            await expect(gate).to_have_attribute("data-state", "closed")

            older: list[APIResponse] = []
            release = asyncio.Event()

            async def hold(route: Route) -> None:  # the answer is read now, and arrives after the socket's news
                older.append(await route.fetch())
                await release.wait()
                await route.fulfill(response=older[0])

            await page.route("**/api/doors", hold)
            assert p.services.hub.kick_all("test: reconnect", peers=False) == 1
            await wait_for(lambda: bool(older), 30, "the resync's answer read")
            await publish(gw, [door_event(2, "door.state", "north-gate", {"state": "forced"})])
            await expect(gate).to_have_attribute("data-state", "forced", timeout=T)
            release.set()
            await page.wait_for_timeout(500)  # the older answer has been applied by now
            await expect(gate).to_have_attribute("data-state", "forced")
        finally:
            await browser.close()
