"""From a phone to the door: the resident's walk in a real headless Chromium at a phone's size, and the passes
it yields read at the real reader line of a real gateway, which opens (or keeps shut) the door controller's lock.

Parts: Mosquitto (the ``broker`` fixture); the portal in-process on the test's loop (as the registry and phone
tests run it) with the estate imported and the unit door ``b3-u2`` registered for the gateway; ``gatehouse
gateway run`` as a process, given only the portal's public key file; the door-controller stub (Modbus TCP) and
the QR reader stub (a pseudo-terminal) as processes. Pass texts come from the QR codes the pages show, decoded
from screenshots with zxing-cpp, and are written to the reader stub as scan lines.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import zxingcpp
from PIL import Image
from playwright.async_api import Page, async_playwright, expect

from gateway.tooling.broker import MosquittoProcess
from gateway.wire.passes import Pass, keyring, load_public_key, parse_pass, parse_revocations
from tests import procs
from tests.doors_support import door_gateway_config
from tests.portal_support import SITE, Portal, portal_public_key, running_portal, wait_for, write_config
from tests.registry_support import (
    ADMIN,
    ADMIN_PW,
    admin_session,
    estate,
    estate_csv,
    form,
    house_id,
    import_csv,
    plate_code,
    resident_row,
)
from tests.stubs import Stub, run_stub

pytestmark = pytest.mark.timeout(120)

GW = "gw1"
DOOR, READER = "b3-u2", "qr-b3-u2"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
NAME, MOBILE, PASSWORD = "陈小明", "13566667777", "xiaoming-2026"
T = 10_000  # ms: bounded waits in the page


@asynccontextmanager
async def gateway_process(cfg: Path, logdir: Path) -> AsyncIterator[procs.Child]:
    """``gatehouse gateway run``, started and stopped off the loop (the portal shares it)."""
    child = await asyncio.to_thread(lambda: procs.gateway(cfg, logdir).start())
    try:
        yield child
    finally:
        await asyncio.to_thread(child.stop)


async def qr_text(page: Page, selector: str, ring: dict[str, Any]) -> tuple[str, Pass]:
    """The one QR code shown in ``selector``, read from a screenshot: (its text, the pass it verifies as)."""
    shot = await page.locator(selector).screenshot()
    found = [
        r.text for r in zxingcpp.read_barcodes(Image.open(io.BytesIO(shot)), formats=zxingcpp.BarcodeFormat.QRCode)
    ]
    assert len(found) == 1, found
    return found[0], parse_pass(found[0], ring)


async def pulses(door: Stub) -> list[dict[str, Any]]:
    hist = (await door.state())["panels"][0]["units"]["1"]["relay_history"]
    return [h for h in hist if h["on"] and h["via"] == "pulse"]


async def door_events(p: Portal, etype: str, pass_id: str) -> list[dict[str, Any]]:
    return [e for e in await p.events(type=etype, gateway=GW, limit=200) if e["data"].get("pass_id") == pass_id]


async def scan_opens(p: Portal, door: Stub, reader: Stub, text: str, pass_id: str, n_pulses: int) -> dict[str, Any]:
    """Scan ``text``; the lock is pulsed once more and the grant reaches the portal. Returns the grant."""
    await reader.post("/scan", {"text": text})
    await wait_for(lambda: _at_least(door, n_pulses), timeout=10, what=f"relay pulse {n_pulses}")
    (granted,) = await wait_for(
        lambda: door_events(p, "access.granted", pass_id),
        timeout=15,
        what=f"access.granted for {pass_id} at the portal",
    )
    return granted


async def _at_least(door: Stub, n: int) -> bool:
    return len(await pulses(door)) >= n


async def test_phone_passes_open_the_unit_door_until_move_out(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    async with (
        running_portal(write_config(tmp_path / "portal", broker, gateways=[(SITE, GW)])) as p,
        run_stub("firmware_stubs.door_controller", "--tcp", "127.0.0.1:0") as door,
        run_stub("firmware_stubs.qr_reader", "--pty") as reader,
        async_playwright() as pw,
    ):
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        r = await form(
            p,
            "/admin/registry/doors",
            {"site": SITE, "gateway": GW, "door": DOOR, "building": "3", "unit": "2", "label": "3幢2单元"},
            csrf,
        )
        assert r.status == 303, await r.text()
        public_key = portal_public_key(p)
        ring = keyring([load_public_key(public_key)])
        code = await plate_code(p, "3", "2", "301")
        hid = await house_id(p, "3", "2", "301")
        cfg = door_gateway_config(
            tmp_path / "gw",
            broker.port,
            door,
            reader,
            public_key=public_key,
            gateway=GW,
            door_name=DOOR,
            reader_name=READER,
            held_open_s=30,
            reader_misses=4,
        )
        assert "PRIVATE" not in public_key.read_text() and "pass_signing_key.pem" not in cfg.read_text()

        async with gateway_process(cfg, tmp_path / "logs") as gateway:
            # The registry's door and the gateway's door are one: registered, with the gateway's live state.
            async def door_row() -> dict[str, Any] | None:
                r = await p.client.get("/api/doors")
                rows = [d for d in (await r.json())["doors"] if d["door"] == DOOR]
                return rows[0] if len(rows) == 1 and rows[0]["state"] != "unknown" else None

            row = await wait_for(door_row, timeout=20, what="the gateway's door state at the portal")
            assert (row["registered"], row["gateway"], row["building"], row["unit"]) == (True, GW, "3", "2")
            await wait_for(lambda: _polled(reader), timeout=20, what="a heartbeat poll at the reader")

            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                phone = await browser.new_context(**PHONE)  # type: ignore[arg-type]
                office = await browser.new_context(viewport={"width": 1280, "height": 900})
                ph, ad = await phone.new_page(), await office.new_page()

                # Scan the flat plate, "I live here", the office approves, sign in on the phone.
                await ph.goto(f"{p.origin}/p/{code}")
                await expect(ph.locator("#address")).to_have_text("阳光花园3幢2单元301室")
                await ph.click("#register")
                await ph.fill("#reg-name", NAME)
                await ph.fill("#reg-phone", MOBILE)
                await ph.select_option("#reg-role", "family")
                await ph.fill("#reg-password", PASSWORD)
                await ph.fill("#reg-confirm", PASSWORD)
                await ph.click("#reg-submit")
                await expect(ph.locator("#message")).to_contain_text("等待业主或物业确认")
                me = await resident_row(p, MOBILE, "301")
                await ad.goto(f"{p.origin}/login")
                await ad.fill("#user", ADMIN)
                await ad.fill("#password", ADMIN_PW)
                await ad.click("#submit")
                await ad.wait_for_url("**/console")
                await ad.goto(f"{p.origin}/admin/registry/pending")
                await ad.click(f"#approve-{me['id']}")
                await expect(ad.locator(f'tr[data-resident="{me["id"]}"]')).to_have_count(0, timeout=T)
                await ph.goto(f"{p.origin}/m/login?next=/p/{code}")
                await ph.fill("#login-phone", MOBILE)
                await ph.fill("#login-password", PASSWORD)
                await ph.click("#login-submit")
                await ph.wait_for_url(f"**/p/{code}")

                # The visitor pass, from the page it is shared by, opens the unit door.
                await ph.select_option("#visitor-hours", "24")
                await ph.fill("#visitor-uses", "2")
                await ph.click("#visitor-issue")
                await ph.wait_for_url("**/m/v/**")
                v_text, visitor = await qr_text(ph, "#visitor-qr", ring)
                assert visitor.kind == "visitor" and visitor.uses == 2 and visitor.units == ("3/2",)
                assert len(await pulses(door)) == 0
                g = await scan_opens(p, door, reader, v_text, visitor.pass_id.hex(), 1)
                assert g["data"]["kind"] == "visitor" and g["data"]["subject"] == visitor.subject
                assert g["place"]["door"] == DOOR and g["data"]["house"] == "3-2-301"

                # The resident's own QR does too.
                await ph.goto(f"{p.origin}/p/{code}")
                await expect(ph.locator("#my-pass")).to_have_attribute("data-state", "ok", timeout=T)
                r_text, mine = await qr_text(ph, "#my-pass", ring)
                assert mine.kind == "resident" and mine.subject == me["subject"]
                assert await ph.locator("#my-pass").get_attribute("data-pass-id") == mine.pass_id.hex()
                g = await scan_opens(p, door, reader, r_text, mine.pass_id.hex(), 2)
                assert g["data"]["kind"] == "resident" and g["data"]["subject"] == me["subject"]

                # A fresh own QR, kept unused in its minute of life.
                await ph.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
                await expect(ph.locator("#my-pass")).not_to_have_attribute(
                    "data-pass-id", mine.pass_id.hex(), timeout=T
                )
                kept_text, kept = await qr_text(ph, "#my-pass", ring)
                assert kept.subject == me["subject"] and kept.pass_id != mine.pass_id
                await ph.screenshot(path=str(artifacts / "phone_e2e_door_pass.png"), full_page=True)

                # Move-out, recorded by the office: the new revocation list reaches the gateway.
                await ad.goto(f"{p.origin}/admin/registry/houses/{hid}")
                await ad.click(f"#moveout-{me['id']}")
                await expect(ad.locator("#consequence")).to_contain_text("迁出")  # it asks first
                await ad.click("#confirm-go")
                await expect(ad.locator("#notice")).to_contain_text("已登记迁出")
                pub = estate(p).publisher
                assert pub is not None

                def listed() -> int:
                    sl = pub.lists.get(SITE)
                    if sl is None:
                        return 0
                    rl = parse_revocations(sl.signed, ring)  # type: ignore[arg-type]
                    return sl.version if me["subject"] in rl.subjects and visitor.pass_id in rl.passes else 0

                version = await wait_for(listed, timeout=10, what="a revocation list naming the resident")

                async def synced() -> list[dict[str, Any]]:
                    return [
                        e
                        for e in await p.events(type="command.result", gateway=GW, limit=200)
                        if e["data"].get("command") == "credentials.sync"
                        and e["data"].get("ok") is True
                        and int(e["data"].get("version", 0)) >= version
                    ]

                await wait_for(synced, timeout=15, what=f"the gateway's ok for revocation list v{version}")
                assert next(s for s in pub.status() if s["gateway"] == GW)["confirmed"] >= version

                # The portal no longer issues the resident a pass.
                fresh = await ph.request.get(f"{p.origin}/p/{code}/mypass.json")
                assert fresh.status == 403 and (await fresh.json())["error"] == "not-active"

                # At the door: both passes still within their lives are refused as revoked; no pulse.
                for text, pid in ((kept_text, kept.pass_id.hex()), (v_text, visitor.pass_id.hex())):
                    await reader.post("/scan", {"text": text})
                    (denied,) = await wait_for(
                        lambda pid=pid: door_events(p, "access.denied", pid),
                        timeout=15,
                        what=f"access.denied for {pid} at the portal",
                    )
                    assert denied["data"]["reason"] == "revoked", denied
                    assert denied["place"]["door"] == DOOR
                assert kept.not_after > time.time()  # refused for the revocation, not its age
                assert len(await pulses(door)) == 2
                assert not await door_events(p, "access.granted", kept.pass_id.hex())
            finally:
                await browser.close()
            assert gateway.alive, gateway.tail()


async def _polled(reader: Stub) -> bool:
    return bool((await reader.state())["readers"][0]["polls"])
