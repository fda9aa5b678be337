"""The alarm board in real headless Chromium, fed by a real Mosquitto: an alarm appears and rings, the banner
shows the newest unacknowledged one, the site map blinks, acknowledging stops the siren, the workflow runs
through to closed, a second console sees who took each alarm, escalation rings faster; screenshots of the
board and the site map are kept in tests/artifacts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from playwright.async_api import Locator, Page, Route, async_playwright, expect

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from portal.alarms.board import BOARD, AlarmBoard
from portal.app import Options
from tests.portal_support import GATEWAY, SITE, add_user, batch_payload, mqtt, running_portal, wait_for, write_config
from tests.test_alarm_board import ZONE, FakeClock, ev
from tests.test_console_shell_browser import rings, silent

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PW = "guard-password-0001"
EVENTS_TOPIC = wire.topic(SITE, GATEWAY, "events")
SITE_MAP = """
alarms:
  escalate_after_s: 30
  guards: [张三, 李四]
  groups: [{site: s1, gateway: gw1, group: perimeter, label: 周界}]
site_maps:
  - site: s1
    width: 800
    height: 500
    zones:
      - {zone: P1, label: 北围栏, points: [[20, 20], [780, 20]]}
      - {zone: P2, label: 东围栏, points: [[780, 20], [780, 480]]}
    buildings:
      - {code: '5', x: 100, y: 120, w: 160, h: 90}
      - {code: '6', x: 400, y: 120, w: 160, h: 90}
    doors:
      - {door: D1, label: 南门, x: 400, y: 480}
"""


async def sign_in(page: Page, origin: str, user: str) -> None:
    await page.goto(origin + "/board")
    assert "/login" in page.url
    await page.fill("#user", user)
    await page.fill("#password", PW)
    await page.click("#submit")
    await page.wait_for_url("**/board")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=10_000)


async def ringing(page: Page) -> bool:
    """The siren really plays: the audio the page rendered through its analyser grows (console shell)."""
    return await rings(page, timeout=3.0)


def card(page: Page, iid: int) -> Locator:
    return page.locator(f'#incidents li.incident[data-id="{iid}"]')


async def test_alarm_board_rings_is_taken_and_closed_in_chromium(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    mono = FakeClock()
    cfg = write_config(tmp_path, broker, extra=SITE_MAP)
    async with running_portal(cfg, Options(monotonic=mono)) as p, mqtt(broker) as gw, async_playwright() as pw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        board: AlarmBoard = p.client.app[BOARD]
        await add_user(p, "guard1", "guard", PW)
        await add_user(p, "guard2", "guard", PW)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = await (await browser.new_context(viewport={"width": 1400, "height": 900})).new_page()
            other = await (await browser.new_context(viewport={"width": 1100, "height": 800})).new_page()
            errors: list[str] = []  # script errors and CSP refusals (inline styles, say) show up here
            for pg in (page, other):
                pg.on(
                    "console",
                    lambda m: (
                        errors.append(m.text)
                        if m.type == "error" and not m.text.startswith("Failed to load resource")
                        else None
                    ),
                )
                pg.on("pageerror", lambda e: errors.append(str(e)))
                pg.on(
                    "response",
                    lambda r: (
                        errors.append(f"{r.status} {r.url}")
                        if r.status >= 400 and not r.url.endswith("/favicon.ico")
                        else None
                    ),
                )
            await sign_in(page, p.origin, "guard1")
            await sign_in(other, p.origin, "guard2")
            assert await silent(page)
            await expect(page.locator("#banner")).to_be_hidden()
            # A console opened without any click on the site: the browser will refuse to play sound. (Nothing
            # may look into this page until the alarm has reached it: Playwright's queries count as a gesture.)
            quiet_ctx = await browser.new_context(viewport={"width": 1000, "height": 700})
            await quiet_ctx.add_cookies(await page.context.cookies())
            quiet = await quiet_ctx.new_page()
            await quiet.goto(p.origin + "/board")
            await wait_for(lambda: p.services.hub.clients >= 3, what="three consoles connected")
            await expect(page.locator('#groups li[data-key="s1/gw1/perimeter"]')).to_have_attribute(
                "data-state", "unknown"
            )
            if await page.locator("#sound-blocked").is_visible():  # the browser wants a gesture first
                await page.click("#enable-sound")

            now = datetime.now(UTC)
            fire = ev(
                1,
                "panel.alarm",
                incident="F1",
                prio=wire.Priority.FIRE,
                ts=now,
                place={"building": "5", "unit": "1", "house": "1201"},
                data={"kind": "fire", "name_zh": "烟雾火警", "name_en": "Smoke", "code": 111},
            )
            fence = ev(2, "zone.alarm", incident="Z1", data=ZONE, ts=now)
            await gw.publish(EVENTS_TOPIC, batch_payload([fire, fence]), qos=1)
            await expect(page.locator("#incidents li.incident")).to_have_count(2, timeout=10_000)
            ids = [
                int(x)
                for x in await page.locator("#incidents li.incident").evaluate_all(
                    "rows => rows.map(r => r.dataset.id)"
                )
            ]
            fire_id, fence_id = ids  # fire first: priority before time
            fire_card, fence_card = card(page, fire_id), card(page, fence_id)
            await expect(fire_card).to_contain_text("烟雾火警")
            await expect(fire_card).to_contain_text("5幢 1单元 1201室")
            await expect(fence_card).to_contain_text("北围栏")
            await expect(fire_card).to_have_attribute("data-state", "new")
            # It rings, and the banner names the newest unacknowledged alarm.
            await wait_for(lambda: ringing(page), timeout=10, what="the siren playing")
            await expect(page.locator("#sound")).to_have_attribute("data-state", "ringing")
            await expect(page.locator("#banner")).to_be_visible()
            # Where the browser blocked the sound, the console says so plainly, and one click fixes it.
            await expect(quiet.locator("#sound-blocked")).to_be_visible(timeout=10_000)
            await expect(quiet.locator("#sound")).to_have_attribute("data-state", "blocked")
            assert await silent(quiet)
            await quiet.click("#enable-sound")
            await wait_for(lambda: ringing(quiet), timeout=10, what="the siren after the click")
            await expect(quiet.locator("#sound-blocked")).to_be_hidden()
            await quiet_ctx.close()
            # The site map blinks where the alarms are.
            svg = page.locator("svg.sitemap")
            await expect(svg.locator('[data-zone="P1"]')).to_have_attribute("class", "zone alarm")
            await expect(svg.locator('[data-zone="P2"]')).to_have_attribute("class", "zone")
            await expect(svg.locator('[data-building="5"]')).to_have_attribute("class", "building alarm")
            await expect(svg.locator('[data-building="5"] .houses')).to_have_text("1201室")
            await expect(svg.locator('[data-building="6"]')).to_have_attribute("class", "building")
            anim = await svg.locator('[data-zone="P1"] polyline').evaluate("e => getComputedStyle(e).animationName")
            assert anim == "blink"
            await page.screenshot(path=str(artifacts / "board.png"), full_page=True)

            # guard1 takes the fire; guard2's console shows it as theirs at once.
            await fire_card.locator("button[data-act=ack]").click()
            await expect(fire_card).to_have_attribute("data-state", "acknowledged")
            other_fire = card(other, fire_id)
            await expect(other_fire).to_have_attribute("data-owner", "guard1", timeout=10_000)
            await expect(other_fire.locator(".owner")).to_have_text("由 guard1 处理")
            await expect(other_fire.locator("button[data-act=ack]")).to_be_hidden()
            await expect(fire_card.locator(".owner")).to_have_text("由你处理")
            assert await ringing(page)  # the fence alarm is still unacknowledged
            # The banner's button acknowledges the newest one: the fence. Then the siren stops.
            await expect(page.locator("#banner")).to_have_attribute("data-id", str(fence_id))
            await page.click("#banner button.ack")
            await expect(fence_card).to_have_attribute("data-state", "acknowledged")
            await expect(page.locator("#banner")).to_be_hidden()
            await expect(page.locator("#sound")).to_have_attribute("data-state", "off")
            assert await silent(page)
            await expect(svg.locator('[data-zone="P1"]')).to_have_attribute("class", "zone alarm")  # not restored yet

            # The flat's details: address, and nobody registered.
            await fire_card.locator("button.more").click()
            await expect(fire_card.locator(".detail .residents")).to_have_text("无登记住户")
            await expect(fire_card.locator(".detail .address")).to_contain_text("阳光花园 5幢 1单元 1201室")

            # Through to closed, with the checklist ticked; guard2 sees every step.
            await fire_card.locator("input.guard").fill("张三")
            await fire_card.locator("button[data-act=dispatch]").click()
            await expect(fire_card).to_have_attribute("data-state", "dispatched")
            await expect(other_fire.locator(".dispatched")).to_have_text("已派遣 张三", timeout=10_000)
            await fire_card.locator("button[data-act=on_scene]").click()
            await expect(fire_card).to_have_attribute("data-state", "on_scene")
            await fire_card.locator(".checklist input[data-step='0']").check()
            await expect(other_fire.locator(".checklist input[data-step='0']")).to_be_checked(timeout=10_000)
            # A fire's checklist must be complete before it is closed (alarms.checklist_required).
            await expect(fire_card.locator("button[data-act=finish][data-cause=false]")).to_be_disabled()
            steps = fire_card.locator(".checklist input[type=checkbox]")
            n_steps = await steps.count()
            for i in range(1, n_steps):
                await steps.nth(i).check()
                await expect(steps.nth(i)).to_be_checked()
            await fire_card.locator("input.note").fill("厨房油烟，已通风")
            await fire_card.locator("button[data-act=note]").click()
            await expect(fire_card.locator(".detail .log")).to_contain_text("厨房油烟，已通风")
            await fire_card.locator("button[data-act=finish][data-cause=false]").click()  # resolved and closed
            await expect(card(page, fire_id)).to_have_count(0)
            await expect(page.locator(f'#closed li.incident[data-id="{fire_id}"]')).to_have_attribute(
                "data-state", "closed"
            )
            await expect(card(other, fire_id)).to_have_count(0, timeout=10_000)
            await expect(svg.locator('[data-building="5"]')).to_have_attribute("class", "building")
            log = await p.services.store.read(
                lambda c: [
                    (r["actor"], r["action"])
                    for r in c.execute(
                        "SELECT actor, action FROM incident_log WHERE incident_id = ? ORDER BY id", (fire_id,)
                    )
                ]
            )
            assert log == [
                ("gateway:gw1", "alarm"),
                ("guard1", "ack"),
                ("guard1", "dispatch"),
                ("guard1", "on_scene"),
                ("guard1", "check"),
                *[("guard1", "check")] * (n_steps - 1),
                ("guard1", "note"),
                ("guard1", "resolve"),
                ("guard1", "close"),
            ]

            # An alarm nobody takes escalates: highlighted, and the siren goes faster and louder.
            cut = ev(
                3,
                "zone.tamper",
                incident="T1",
                prio=wire.Priority.TAMPER,
                ts=datetime.now(UTC),
                data={**ZONE, "zone": "P2", "kind": "cut", "label": "东围栏"},
                place={"zone": "P2"},
            )
            await gw.publish(EVENTS_TOPIC, batch_payload([cut]), qos=1)
            await expect(page.locator("#incidents li.incident")).to_have_count(2, timeout=10_000)
            await wait_for(lambda: ringing(page), timeout=10, what="the siren again")
            await expect(page.locator("#sound")).to_have_attribute("data-level", "normal")
            mono.t += 31
            assert len(await board.check_escalations()) == 1
            cut_card = page.locator('#incidents li.incident[data-kind="fence_cut"]')
            await expect(cut_card).to_have_class("incident prio-tamper state-new escalated", timeout=10_000)
            await expect(cut_card.locator(".esc")).to_be_visible()
            await expect(page.locator("#sound")).to_have_attribute("data-level", "fast", timeout=10_000)
            await wait_for(lambda: ringing(page), timeout=10, what="the escalated siren")
            # Nobody is told by any channel here, and the label says exactly that.
            await expect(cut_card.locator(".esc")).to_contain_text("未通知任何人")
            await expect(page.locator("#banner")).to_have_class("banner lvl-tamper escalated")

            # Arm a zone group from the console: the command is audited and shown.
            await page.locator('#groups li[data-key="s1/gw1/perimeter"] button.arm.away').click()
            await expect(page.locator("#commands li")).to_have_attribute("data-status", "sent", timeout=10_000)

            # The site map page: the cut fence section blinks.
            await page.goto(p.origin + "/board/map")
            await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=10_000)
            await expect(page.locator('svg.sitemap [data-zone="P2"]')).to_have_attribute("class", "zone alarm")
            await page.screenshot(path=str(artifacts / "sitemap.png"), full_page=True)

            assert errors == []

            # Readable on a phone: nothing wider than the screen.
            phone_ctx = await browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True)
            await phone_ctx.add_cookies(await page.context.cookies())
            phone = await phone_ctx.new_page()
            await phone.goto(p.origin + "/board")
            await expect(phone.locator("#incidents li.incident")).to_have_count(2, timeout=10_000)
            overflow = await phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, overflow
            await phone.screenshot(path=str(artifacts / "board-phone.png"), full_page=True)
        finally:
            await browser.close()
            await asyncio.sleep(0)


async def test_the_guard_who_loses_a_race_is_told_who_got_there_first(tmp_path: Path, broker: MosquittoProcess) -> None:
    """guard2 presses dispatch on an alarm guard1 is closing at the same moment: guard2's request reaches the
    portal after guard1's close (held back in the browser until then), loses on the incident's version, and the
    board says who acted first and what the alarm is now, in Chinese and in English."""
    async with (
        running_portal(write_config(tmp_path, broker), Options(monotonic=FakeClock())) as p,
        mqtt(broker) as gw,
        async_playwright() as pw,
    ):
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        board: AlarmBoard = p.client.app[BOARD]
        for name in ("guard1", "guard2"):
            await add_user(p, name, "guard", PW)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            slow = await (await browser.new_context(viewport={"width": 1100, "height": 800})).new_page()
            await sign_in(slow, p.origin, "guard2")
            await gw.publish(EVENTS_TOPIC, batch_payload([ev(1, "zone.alarm", incident="Z1", data=ZONE)]), qos=1)
            await expect(slow.locator("#incidents li.incident")).to_have_count(1, timeout=10_000)
            iid = int(await slow.locator("#incidents li.incident").get_attribute("data-id") or 0)
            await board.act(iid, "ack", "guard1")
            await expect(card(slow, iid)).to_have_attribute("data-state", "acknowledged", timeout=10_000)
            closed = asyncio.Event()

            async def after_the_close(route: Route) -> None:
                await closed.wait()
                await route.continue_()

            await slow.route(f"**/api/incidents/{iid}/dispatch", after_the_close)
            await card(slow, iid).locator("input.guard").fill("张三")
            await card(slow, iid).locator("button[data-act=dispatch]").click()
            await board.act(iid, "finish", "guard1", cause="false")
            closed.set()
            await expect(slow.locator("#toast")).to_have_text("guard1 已先处理，该报警现为「已关闭」", timeout=10_000)
            log = await p.services.store.read(
                lambda c: [
                    r[0] for r in c.execute("SELECT action FROM incident_log WHERE incident_id = ? ORDER BY id", (iid,))
                ]
            )
            assert "dispatch" not in log  # the loser changed nothing
            # the same in English
            await slow.goto(p.origin + "/lang/en?next=/board")
            await expect(slow.locator("#conn")).to_have_attribute("data-state", "online", timeout=10_000)
            await gw.publish(EVENTS_TOPIC, batch_payload([ev(2, "zone.alarm", incident="Z2", data=ZONE)]), qos=1)
            await expect(slow.locator("#incidents li.incident")).to_have_count(1, timeout=10_000)
            iid2 = int(await slow.locator("#incidents li.incident").get_attribute("data-id") or 0)
            await board.act(iid2, "ack", "guard1")
            await expect(card(slow, iid2)).to_have_attribute("data-state", "acknowledged", timeout=10_000)
            closed.clear()
            await slow.route(f"**/api/incidents/{iid2}/dispatch", after_the_close)
            await card(slow, iid2).locator("input.guard").fill("Zhang")
            await card(slow, iid2).locator("button[data-act=dispatch]").click()
            await board.act(iid2, "finish", "guard1", cause="false")
            closed.set()
            await expect(slow.locator("#toast")).to_contain_text("guard1 got there first", timeout=10_000)
        finally:
            await browser.close()
