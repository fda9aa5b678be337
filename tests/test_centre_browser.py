"""The centre's console in real headless Chromium: three estates at a glance, live, in Chinese and in English; an
alarm from any estate rings on it; drilling into one estate's board; a guard scoped to one estate sees that one only.

The portal follows a real Mosquitto: the gateways' retained status (one with a fault), an estate's bridge going
down (its last will on the centre's broker, as systemd/mosquitto-estate-bridge.conf sets it), alarms.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Page, Route, async_playwright, expect

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from portal.store import set_user_sites
from tests.portal_support import add_user, batch_payload, mqtt, running_portal, wait_for, write_config
from tests.test_alarm_board import ev
from tests.test_console_shell_browser import CHROMIUM, KIOSK, rings, silent, watch_errors

T = 10_000
PW = "guard-password-0001"
GATEWAYS = [("s1", "gw1"), ("s1", "gw2"), ("s2", "gw3"), ("s3", "gw4")]


async def sign_in(page: Page, origin: str, user: str, path: str) -> None:
    await page.goto(origin + path)
    await page.fill("#user", user)
    await page.fill("#password", PW)
    await page.click("#submit")
    await page.wait_for_url(f"**{path}")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)


def status(fault: str = "") -> bytes:
    return wire.encode(wire.Status(v=wire.SCHEMA_VERSION, state="online", ts=wire.utcnow(), version="t", fault=fault))


async def test_the_centre_console_shows_every_estate_live_and_rings_for_any(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    cfg = write_config(tmp_path, broker, gateways=GATEWAYS)
    async with running_portal(cfg) as p, mqtt(broker) as gw, async_playwright() as pw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await add_user(p, "guard1", "guard", PW)
        await add_user(p, "guard2", "guard", PW)
        await p.services.store.run_write(lambda c: set_user_sites(c, "guard2", ("s2",)))
        browser: Browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
        errors: list[str] = []
        try:
            page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
            await watch_errors(page, errors)
            await sign_in(page, p.origin, "guard1", "/centre")
            await expect(page.locator("#centre-title")).to_have_text("集中监控中心")
            rows = page.locator("tr.estate")
            await expect(rows).to_have_count(3)
            for site in ("s1", "s2", "s3"):  # nothing heard from any gateway yet: every estate offline
                await expect(page.locator(f'tr[data-site="{site}"]')).to_have_attribute("data-online", "false")
            assert await silent(page)

            # the gateways come online (gw2 with a standing fault): the page follows without a reload
            for site, g in GATEWAYS:
                await gw.publish(
                    wire.topic(site, g, "status"), status("store: disk full" if g == "gw2" else ""), qos=1, retain=True
                )
            s1 = page.locator('tr[data-site="s1"]')
            await expect(s1).to_have_attribute("data-online", "true", timeout=T)
            await expect(s1.locator('.gw[data-gateway="gw2"]')).to_contain_text("故障", timeout=T)
            await expect(s1.locator(".gw-count")).to_have_text("2/2")
            await expect(page.locator("#total-faults strong")).to_have_text("1")

            # s2's bridge goes down (its last will on the centre's broker): link down, the estate offline
            await gw.publish("gatehouse/bridge/s2/state", b"1", qos=1, retain=True)
            await expect(page.locator('tr[data-site="s2"] .link')).to_have_text("链路正常", timeout=T)
            await gw.publish("gatehouse/bridge/s2/state", b"0", qos=1, retain=True)
            s2 = page.locator('tr[data-site="s2"]')
            await expect(s2).to_have_attribute("data-online", "false", timeout=T)
            await expect(s2.locator(".link")).to_contain_text("链路自", timeout=T)
            await expect(page.locator('tr[data-site="s3"] .link')).to_have_text("直连")

            # a fire at s3: it rings here, the banner says so, and s3 comes first with its unacknowledged alarm
            fire = ev(1, "zone.alarm", prio=wire.Priority.FIRE, site="s3", ts=datetime.now(UTC))
            await gw.publish(wire.topic("s3", "gw4", "events"), batch_payload([fire], site="s3", gateway="gw4"), qos=1)
            await expect(page.locator("#banner")).to_be_visible(timeout=T)
            assert await rings(page), "the centre's console does not ring for an estate's alarm"
            first = rows.first
            await expect(first).to_have_attribute("data-site", "s3", timeout=T)
            await expect(first.locator(".unacked-pill")).to_have_text("1 条未确认")
            await expect(first.locator('.prio[data-bucket="fire"]')).to_have_text("火警 1")
            await expect(page.locator("#total-unacked strong")).to_have_text("1")
            await page.screenshot(path=str(artifacts / "centre-zh.png"), full_page=True)

            # drill down: s3's own board; an alarm from s1 rings on it but is not listed there
            await first.locator("a.drill").click()
            await page.wait_for_url("**/board?site=s3")
            await expect(page.locator("#only-site")).to_contain_text("s3")
            await expect(page.locator("#incidents li.incident")).to_have_count(1, timeout=T)
            intrusion = ev(1, "zone.alarm", site="s1", ts=datetime.now(UTC), place={"zone": "north"})
            await gw.publish(
                wire.topic("s1", "gw1", "events"), batch_payload([intrusion], site="s1", gateway="gw1"), qos=1
            )
            await expect(page.locator("#banner .more")).not_to_have_text("", timeout=T)  # two wait now
            await page.wait_for_timeout(500)
            await expect(page.locator("#incidents li.incident")).to_have_count(1)
            assert await rings(page)
            # a fire at s1, then a second at s3: s3's board offers to acknowledge its two fires, and doing so leaves
            # s1's fire (an older incident, not on this board) ringing for whoever watches s1
            now = datetime.now(UTC)
            s1_fire = ev(2, "zone.alarm", prio=wire.Priority.FIRE, site="s1", ts=now, place={"zone": "east"})
            await gw.publish(wire.topic("s1", "gw1", "events"), batch_payload([s1_fire], site="s1", gateway="gw1"))
            await wait_for(lambda: _state_of(p, s1_fire.id), what="s1's fire stored")
            s3_fire = ev(2, "zone.alarm", prio=wire.Priority.FIRE, site="s3", ts=now, place={"zone": "P2"})
            await gw.publish(wire.topic("s3", "gw4", "events"), batch_payload([s3_fire], site="s3", gateway="gw4"))
            await expect(page.locator("#incidents li.incident")).to_have_count(2, timeout=T)
            await page.locator('.bulk-kind[data-kind="fire"]').click()
            await wait_for(lambda: _is_state(p, s3_fire.id, "acknowledged"), what="s3's fires acknowledged")
            assert await _state_of(p, fire.id) == "acknowledged"
            assert await _state_of(p, s1_fire.id) == "new"

            # in English
            await page.goto(p.origin + "/centre")
            await page.locator("#lang-switch").click()
            await expect(page.locator("#centre-title")).to_have_text("Monitoring centre", timeout=T)
            await expect(page.locator('tr[data-site="s2"] .link')).to_contain_text("link down since")
            await expect(page.locator('tr[data-site="s1"] .gw[data-gateway="gw2"]')).to_contain_text("fault")
            await expect(page.locator("#total-unacked strong")).to_have_text("2")
            await page.screenshot(path=str(artifacts / "centre-en.png"), full_page=True)

            # a guard of s2 only: s2's row, nothing of the others, and their boards are not there for them
            other = await (await browser.new_context(viewport={"width": 390, "height": 844})).new_page()
            await watch_errors(other, errors)
            await sign_in(other, p.origin, "guard2", "/centre")
            await expect(other.locator("tr.estate")).to_have_count(1)
            await expect(other.locator("tr.estate")).to_have_attribute("data-site", "s2")
            await expect(other.locator("#total-unacked strong")).to_have_text("0")
            assert await silent(other)  # s1's and s3's alarms are not theirs to hear
            r = await other.request.get(p.origin + "/board?site=s3")
            assert r.status == 404
            body = await (await other.request.get(p.origin + "/api/centre")).json()
            assert [e["site"] for e in body["estates"]] == ["s2"]
            assert errors == []
        finally:
            await browser.close()


async def _state_of(p: Any, event_id: str) -> str | None:
    """The state of the incident the event ``event_id`` opened, if it did."""
    row = await p.services.store.read(
        lambda c: c.execute("SELECT state FROM incidents WHERE first_event = ?", (event_id,)).fetchone()
    )
    return None if row is None else str(row[0])


async def _is_state(p: Any, event_id: str, state: str) -> bool:
    return await _state_of(p, event_id) == state


async def test_an_alarm_told_while_the_table_is_being_fetched_is_not_lost(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """The table is fetched again when the socket tells of a change; a change told while that fetch is on its way may
    be missing from its answer, so the page must fetch once more rather than sit on a table that leaves it out."""
    cfg = write_config(tmp_path, broker, gateways=GATEWAYS)
    async with running_portal(cfg) as p, mqtt(broker) as gw, async_playwright() as pw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await add_user(p, "guard1", "guard", PW)
        browser: Browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
        try:
            page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
            await sign_in(page, p.origin, "guard1", "/centre")
            read: list[str] = []
            release = asyncio.Event()

            async def hold_the_first(route: Route) -> None:
                if read:
                    await route.continue_()
                    return
                answer = await route.fetch()
                read.append(route.request.url)
                await release.wait()
                await route.fulfill(response=answer)

            await page.route("**/centre/estates", hold_the_first)
            fire = ev(1, "zone.alarm", prio=wire.Priority.FIRE, site="s3", ts=datetime.now(UTC))
            await gw.publish(wire.topic("s3", "gw4", "events"), batch_payload([fire], site="s3", gateway="gw4"), qos=1)
            await wait_for(lambda: bool(read), what="the table fetched after the fire")
            intrusion = ev(1, "zone.alarm", site="s1", ts=datetime.now(UTC), place={"zone": "north"})
            await gw.publish(
                wire.topic("s1", "gw1", "events"), batch_payload([intrusion], site="s1", gateway="gw1"), qos=1
            )
            await expect(page.locator("#banner .more")).not_to_have_text("", timeout=T)  # the socket told of both
            release.set()
            await expect(page.locator("#total-unacked strong")).to_have_text("2", timeout=T)
            await expect(page.locator('tr[data-site="s1"] .unacked-pill')).to_have_text("1 条未确认")
        finally:
            await browser.close()
