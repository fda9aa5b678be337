"""The guard console in real headless Chromium: sign in, live events over the WebSocket, reconnect,
language switch, phone width, and a screenshot for people to look at."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from playwright.async_api import Page, async_playwright, expect

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from tests.portal_support import (
    GATEWAY,
    SITE,
    add_user,
    batch_payload,
    event,
    mqtt,
    next_ack,
    running_portal,
    wait_for,
    write_config,
)

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PW = "guard-password-0001"
EVENTS_TOPIC = wire.topic(SITE, GATEWAY, "events")


async def _row(page: Page, event_id: str) -> str:
    row = page.locator(f'#events li[data-id="{event_id}"]')
    await expect(row).to_have_count(1, timeout=10_000)
    return await row.inner_text()


async def test_console_shows_live_events_and_switches_language(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw, async_playwright() as pw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await add_user(p, "guard1", "guard", PW)
        await gw.subscribe(wire.topic(SITE, GATEWAY, "ack"), qos=1)
        # One event before the page opens: it is rendered by the server.
        first = event(1, type="zone.alarm", priority=30, building="3", unit="2", zone="东侧围墙")
        await gw.publish(EVENTS_TOPIC, batch_payload([first]), qos=1)
        await next_ack(gw)

        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            await page.goto(p.origin + "/console")
            assert "/login" in page.url
            await page.fill("#user", "guard1")
            await page.fill("#password", PW)
            await page.click("#submit")
            await page.wait_for_url("**/console")
            await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=10_000)
            assert "防区报警" in await _row(page, first.id)

            # A new event arrives without a reload (the marker survives), newest first, in Shanghai time.
            await page.evaluate("window.__noReload = 42")
            ts = datetime(2026, 3, 1, 16, 30, 5, tzinfo=UTC)  # 2026-03-02 00:30:05 in Asia/Shanghai
            fire = event(2, type="fire.alarm", priority=50, ts=ts, building="5", unit="1", house="1201")
            await gw.publish(EVENTS_TOPIC, batch_payload([fire]), qos=1)
            text = await _row(page, fire.id)
            assert "火警" in text and "2026-03-02 00:30:05" in text and "5幢 1单元 1201室" in text
            assert "panel-1 / in2" in text
            assert await page.evaluate("window.__noReload") == 42
            assert (
                await page.locator(f'#events li[data-id="{fire.id}"]').get_attribute("class") == "event prio-fire new"
            )
            # Rows stay newest first.
            ids = await page.locator("#events li").evaluate_all("rows => rows.map(r => r.dataset.id)")
            assert ids == sorted(ids, reverse=True)

            # The socket reconnects by itself and catches up on what it missed.
            p.services.hub.kick_all("test")
            third = event(3, type="access.denied", priority=0, door="北门")
            await gw.publish(EVENTS_TOPIC, batch_payload([third]), qos=1)
            await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=10_000)
            assert "通行被拒" in await _row(page, third.id)
            assert await page.evaluate("window.__noReload") == 42

            # English, and back.
            await page.click("#lang-switch")
            await page.wait_for_url("**/console")
            await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=10_000)
            assert "Fire alarm" in await _row(page, fire.id)
            assert "Bldg 5 Unit 1 Flat 1201" in await _row(page, fire.id)
            assert await page.locator("#conn .text").inner_text() == "Live"
            fourth = event(4, type="door.forced", priority=30, door="east-gate")
            await gw.publish(EVENTS_TOPIC, batch_payload([fourth]), qos=1)
            assert "Door forced open" in await _row(page, fourth.id)
            await page.click("#lang-switch")
            await page.wait_for_url("**/console")
            assert "门被强行打开" in await _row(page, fourth.id)
            assert await page.locator("html").get_attribute("lang") == "zh-CN"
            await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=10_000)
            await page.screenshot(path=str(artifacts / "console.png"), full_page=True)

            # Readable on a phone: nothing wider than the screen.
            phone = await browser.new_page(viewport={"width": 375, "height": 740}, is_mobile=True)
            await phone.context.add_cookies(await page.context.cookies())
            await phone.goto(p.origin + "/console")
            await _row(phone, fire.id)
            overflow = await phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, overflow
            await phone.screenshot(path=str(artifacts / "console-phone.png"), full_page=True)
        finally:
            await browser.close()
