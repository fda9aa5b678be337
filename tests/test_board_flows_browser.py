"""The alarm board's floods and help calls, in real headless Chromium fed by a real Mosquitto.

* A fence that trips again and again while its incident is open is one incident with a count and its first and
  last time; a storm of one kind is acknowledged in one action, audited; a priority alarm cannot be closed before
  its checklist is ticked. The clicks from ringing to closed are counted for one ordinary alarm.
* One SOS from a door plate is one incident (no second 住户求助 item); the guard handling it reveals the
  household's numbers with one click (audited with the reason) and calls from the page; the resident's phone
  follows the call: 已接警, 保安正在赶来, 已处置.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from playwright.async_api import Locator, Page, async_playwright, expect

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from tests.portal_support import add_user, batch_payload, mqtt, running_portal, wait_for, write_config
from tests.registry_support import admin_session, estate_csv, import_csv, plate_code
from tests.test_alarm_board import EVENTS_TOPIC, ZONE, ev
from tests.test_console_shell_browser import CHROMIUM, KIOSK, rings, sign_in, silent

PW = "guard-password-0001"
T = 10_000


class Clicks:
    """Counts the guard's clicks (each a real click in the page)."""

    def __init__(self) -> None:
        self.n = 0

    async def click(self, target: Locator) -> None:
        self.n += 1
        await target.click()


def card(page: Page, iid: int | str) -> Locator:
    return page.locator(f'#incidents li.incident[data-id="{iid}"]')


async def test_trips_fold_a_storm_is_acknowledged_at_once_and_checklists_hold(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw, async_playwright() as pw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await add_user(p, "guard1", "guard", PW)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
        try:
            page = await (await browser.new_context(viewport={"width": 1400, "height": 1000})).new_page()
            await sign_in(page, p.origin, "/board")

            # One fence zone trips three times (alarm, restore, alarm again ...): each trip is a new gateway
            # incident, and all of them fold into one open incident on the board.
            seq, batch = 0, []
            for n in range(3):
                t = datetime.now(UTC)
                seq += 1
                batch.append(ev(seq, "zone.alarm", incident=f"T{n}", data=ZONE, ts=t))
                seq += 1
                batch.append(ev(seq, "zone.restore", incident=f"T{n}", data={**ZONE, "how": "restored"}, ts=t))
            await gw.publish(EVENTS_TOPIC, batch_payload(batch), qos=1)
            fence = page.locator("#incidents li.incident")
            await expect(fence).to_have_count(1, timeout=T)
            await expect(fence).to_have_attribute("data-trips", "3", timeout=T)
            await expect(fence.locator(".trips")).to_contain_text("3 次触发")
            await expect(fence.locator(".trips")).to_contain_text("首次")
            fence_id = await fence.get_attribute("data-id")
            assert fence_id is not None

            # The clicks from ringing to closed for this one ordinary alarm: acknowledge, then close as a cause.
            clicks = Clicks()
            assert await rings(page)
            await clicks.click(card(page, fence_id).locator("button[data-act=ack]"))
            await expect(card(page, fence_id)).to_have_attribute("data-state", "acknowledged", timeout=T)
            assert await silent(page)
            await clicks.click(card(page, fence_id).locator("button[data-act=finish][data-cause=false]"))
            await expect(card(page, fence_id)).to_have_count(0, timeout=T)
            await expect(page.locator(f'#closed li.incident[data-id="{fence_id}"]')).to_have_attribute(
                "data-state", "closed"
            )
            assert clicks.n == 2, clicks.n
            print(f"\nclicks from ringing to closed: {clicks.n}")

            # A storm on the cut wires of four fence sections: one action acknowledges all four, and only those.
            storm = []
            for n, zone in enumerate(("P2", "P3", "P4", "P5")):
                seq += 1
                storm.append(
                    ev(
                        seq,
                        "zone.tamper",
                        incident=f"C{n}",
                        prio=wire.Priority.TAMPER,
                        data={**ZONE, "zone": zone, "kind": "cut", "label": f"围栏{zone}"},
                        place={"zone": zone},
                    )
                )
            seq += 1
            fire = ev(
                seq,
                "panel.alarm",
                incident="F1",
                prio=wire.Priority.FIRE,
                data={"kind": "fire", "name_zh": "烟雾火警", "name_en": "Smoke", "code": 111},
                place={"building": "5", "unit": "1", "house": "1201"},
            )
            await gw.publish(EVENTS_TOPIC, batch_payload([*storm, fire]), qos=1)
            await expect(page.locator("#incidents li.incident")).to_have_count(5, timeout=T)
            bulk = page.locator('#bulk button[data-kind="fence_cut"]')
            await expect(bulk).to_contain_text("4")
            await page.screenshot(path=str(artifacts / "board-storm.png"), full_page=True)
            await bulk.click()
            await expect(
                page.locator('#incidents li.incident[data-kind="fence_cut"][data-state="acknowledged"]')
            ).to_have_count(4, timeout=T)
            fire_card = page.locator('#incidents li.incident[data-kind="fire"]')
            await expect(fire_card).to_have_attribute("data-state", "new")  # another kind: still ringing
            assert await rings(page)
            audit = await p.services.store.read(
                lambda c: [
                    tuple(r)
                    for r in c.execute("SELECT actor, action, target FROM audit WHERE action = 'alarm.ack_bulk'")
                ]
            )
            assert audit == [("guard1", "alarm.ack_bulk", "kind fence_cut")]
            logs = await p.services.store.read(
                lambda c: [
                    r[0]
                    for r in c.execute("SELECT detail FROM incident_log WHERE action = 'ack' AND detail LIKE 'bulk%'")
                ]
            )
            assert logs == ["bulk: kind fence_cut"] * 4

            # The fire: its checklist must be ticked to the end before it can be closed.
            await fire_card.locator("button[data-act=ack]").click()
            await expect(fire_card).to_have_attribute("data-state", "acknowledged", timeout=T)
            finish = fire_card.locator("button[data-act=finish][data-cause=real]")
            await expect(finish).to_be_disabled()
            await expect(fire_card.locator(".need-checks")).to_be_visible()
            fire_id = await fire_card.get_attribute("data-id")
            r = await p.client.post(
                f"/api/incidents/{fire_id}/finish", json={"cause": "real"}, headers={"Origin": p.origin}
            )
            assert r.status in (401, 403)  # (this client is not signed in; the page's own call is refused below)
            boxes = fire_card.locator(".checklist input[type=checkbox]")
            n_steps = await boxes.count()
            assert n_steps >= 5
            for i in range(n_steps - 1):
                await boxes.nth(i).check()
                await expect(boxes.nth(i)).to_be_checked()
            await expect(finish).to_be_disabled()
            # The server holds the rule too (a page that enabled the button by hand gets a clear refusal).
            answer = await page.evaluate(
                """id => fetch('/api/incidents/' + id + '/finish', {method: 'POST', credentials: 'same-origin',
                   headers: {'Content-Type': 'application/json', 'X-CSRF-Token':
                   document.querySelector('meta[name=csrf-token]').content}, body: JSON.stringify({cause: 'real'})})
                   .then(r => r.json().then(j => [r.status, j.detail]))""",
                fire_id,
            )
            assert answer == [400, "board.checklist_incomplete"]
            await boxes.nth(n_steps - 1).check()
            await expect(finish).to_be_enabled(timeout=T)
            await finish.click()
            await expect(fire_card).to_have_count(0, timeout=T)
        finally:
            await browser.close()


async def test_one_sos_is_one_incident_the_guard_calls_the_household_and_the_phone_follows(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, async_playwright() as pw:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        code = await plate_code(p, "3", "2", "301")
        await add_user(p, "guard1", "guard", PW)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
        try:
            guard = await (await browser.new_context(viewport={"width": 1400, "height": 1000})).new_page()
            await sign_in(guard, p.origin, "/board")
            phone = await (await browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True)).new_page()
            phone.on("dialog", lambda d: d.accept())
            await phone.goto(f"{p.origin}/p/{code}")
            await phone.click("#sos")
            await expect(phone.locator("#sos-state")).to_be_visible(timeout=T)
            await expect(phone.locator("#message")).to_contain_text("等待保安接警")

            # One incident on the board, ringing; no 住户求助 work item beside it.
            sos = guard.locator('#incidents li.incident[data-kind="panic"]')
            await expect(sos).to_have_count(1, timeout=T)
            await expect(sos).to_contain_text("3幢 2单元 301室")
            assert await rings(guard)
            work = await p.services.store.read(lambda c: c.execute("SELECT count(*) FROM work_items").fetchone()[0])
            assert work == 0
            await phone.click("#back")  # pressed again while it is open: the same incident, counted
            await phone.click("#sos")
            await expect(sos).to_have_attribute("data-trips", "2", timeout=T)
            await expect(guard.locator("#incidents li.incident")).to_have_count(1)

            # The guard takes it; the phone says so.
            await sos.locator("button[data-act=ack]").click()
            await expect(sos).to_have_attribute("data-state", "acknowledged", timeout=T)
            await phone.reload()
            await expect(phone.locator("#message")).to_contain_text("已接警")

            # The household's numbers: masked at first; one click (with the reason preset) shows them as tel: links.
            await sos.locator("button.more").click()
            residents = sos.locator(".detail .residents")
            await expect(residents).to_contain_text("138****5678", timeout=T)
            assert "13812345678" not in await residents.inner_text()
            await sos.locator("button.reveal").click()
            call = residents.locator('a.call[href="tel:13812345678"]')
            await expect(call).to_have_text("13812345678", timeout=T)
            await expect(residents.locator('a.call[href="tel:13987654321"]')).to_be_visible()
            audit = await p.services.store.read(
                lambda c: [
                    tuple(r)
                    for r in c.execute("SELECT actor, action, detail FROM audit WHERE action = 'reveal.phones'")
                ]
            )
            assert audit == [("guard:guard1", "reveal.phones", "2 numbers · 回拨求助住户")]
            await guard.screenshot(path=str(artifacts / "board-sos.png"), full_page=True)

            # On the way, then done: the phone follows each step.
            await sos.locator("input.guard").fill("张三")
            await sos.locator("button[data-act=dispatch]").click()
            await expect(sos).to_have_attribute("data-state", "dispatched", timeout=T)
            await phone.reload()
            await expect(phone.locator("#message")).to_contain_text("保安正在赶来")
            boxes = sos.locator(".checklist input[type=checkbox]")
            for i in range(await boxes.count()):
                await boxes.nth(i).check()
                await expect(boxes.nth(i)).to_be_checked()
            await sos.locator("button[data-act=finish][data-cause=real]").click()
            await expect(sos).to_have_count(0, timeout=T)
            await phone.reload()
            await expect(phone.locator("#message")).to_contain_text("已处置")
            await expect(phone.locator("#sos-state")).to_have_attribute("data-state", "closed")
            await phone.screenshot(path=str(artifacts / "phone-sos.png"), full_page=True)

            # Another phone (a stranger at the plate) sees no one's call.
            other = await (await browser.new_context(is_mobile=True)).new_page()
            resp = await other.goto(f"{p.origin}/p/{code}/sos")
            assert resp is not None and resp.status == 404
        finally:
            await browser.close()
