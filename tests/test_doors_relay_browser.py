"""What the console shows is what the hardware did: a guard opens a gate remotely in real headless Chromium,
through the portal, a real Mosquitto and the gateway process, to a Waveshare Relay (D) board (the firmware stub,
modelled on the maker's documents) whose relay 1 was left in "linkage" control mode. The board answers the
flash command as always; the relay does not move. The page says 开门失败：继电器未动作, the board has the
device faults, nothing says the door opened. Once the installer sets the relay back to normal mode, the same
click opens the door."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import async_playwright, expect

from gateway.tooling.broker import MosquittoProcess
from tests import procs
from tests.doors_support import GUARD, GUARD_PW, estate_with_doors
from tests.portal_support import (
    GATEWAY,
    SITE,
    Portal,
    add_user,
    portal_public_key,
    running_portal,
    wait_for,
    write_config,
)
from tests.stubs import Stub, run_stub

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
T = 15_000  # ms

pytestmark = pytest.mark.timeout(180)


def gateway_yaml(folder: Path, broker: MosquittoProcess, board: Stub, portal_key: Path) -> Path:
    host, port = board.endpoint()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gateway.yaml"
    path.write_text(
        f"""
site: {SITE}
gateway: {GATEWAY}
data_dir: data
mqtt: {{host: 127.0.0.1, port: {broker.port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}
uplink: {{resend_after_s: 1.0, resend_max_s: 2.0}}
local_api: {{enabled: false}}
buses:
  - {{name: rs485, kind: modbus-tcp, host: {host}, port: {port}, timeout_ms: 300}}
devices:
  - {{name: board-3-2, profile: waveshare-modbus-rtu-relay-d, bus: rs485, unit: 1, poll_ms: 100}}
doors:
  - {{name: b3u2, device: board-3-2, relay: relay1, contact: input2, invert: [contact],
      place: {{building: "3", unit: "2"}}, unlock_ms: 1500}}
access: {{public_keys: [{portal_key}]}}
""",
        encoding="utf-8",
    )
    return path


async def incidents(p: Portal) -> list[dict[str, Any]]:
    def load(c: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in c.execute("SELECT type, device, point, data FROM incidents WHERE state != 'closed'")]

    return list(await p.services.store.read(load))


async def typed(p: Portal, *types: str) -> list[dict[str, Any]]:
    def load(c: Any) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in c.execute(f"SELECT type, data FROM events WHERE type IN ({', '.join('?' * len(types))})", types)
        ]

    return list(await p.services.store.read(load))


async def test_a_relay_in_linkage_mode_is_reported_as_a_failed_unlock_and_a_device_fault(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    async with (
        running_portal(write_config(tmp_path / "portal", broker)) as p,
        run_stub("firmware_stubs.modbus_device", "--model", "relay-d", "--tcp", "127.0.0.1:0") as board,
        async_playwright() as pw,
    ):
        await estate_with_doors(p)
        await add_user(p, GUARD, "guard", GUARD_PW)
        await board.post("/inputs/2", {"active": True})  # the door is shut: its contact closes input 2
        await board.post("/modes", {"channel": 1, "mode": "linkage"})  # as an installer (or the factory) left it
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        config = gateway_yaml(tmp_path / "gw", broker, board, portal_public_key(p))
        gateway = await asyncio.to_thread(lambda: procs.gateway(config, tmp_path / "logs").start())
        try:
            # The gateway reads the board's control modes as it starts: a device fault before anyone clicks.
            fault = await wait_for(
                lambda: _of(incidents(p), "device.misconfigured"),
                timeout=20,
                what="the board's modes as a device fault",
            )
            assert fault[0]["device"] == "board-3-2"
            assert "relay1_mode = 1 (linkage), expected 0 (normal)" in fault[0]["data"]

            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(p.origin + "/doors")
            await page.fill("#user", GUARD)
            await page.fill("#password", GUARD_PW)
            await page.click("#submit")
            await page.wait_for_url("**/doors")
            await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)
            unit = page.locator('#doors li.door[data-key="s1/b3u2"]')
            await expect(unit).to_have_attribute("data-state", "closed", timeout=T)

            # A slow network: the unlock POST's answer ("pending") reaches the page only after the socket has told
            # the outcome. The page must keep the outcome, not go back to "waiting for the door".
            held: asyncio.Future[tuple[Any, Any]] = asyncio.get_running_loop().create_future()

            async def hold(route: Any) -> None:
                held.set_result((route, await route.fetch()))

            await page.route("**/unlock", hold)
            await unit.locator("details.unlock summary").click()
            await unit.locator(".reason").fill("快递员送大件")
            await unit.locator(".unlock-go").click()
            result = unit.locator(".unlock-result")
            route, answer = await asyncio.wait_for(held, T / 1000)
            assert (await answer.json())["command"]["status"] == "pending"
            await expect(result).to_have_attribute("data-status", "failed", timeout=T)
            await route.fulfill(response=answer)
            await page.unroute("**/unlock")
            await expect(unit.locator(".reason")).to_have_value("", timeout=T)  # the POST's answer was handled
            await expect(result).to_have_attribute("data-status", "failed")
            await expect(result).to_have_text("开门失败：继电器未动作")
            await expect(page.locator("#commands tr .status").first).to_have_text("开门失败：继电器未动作")
            await expect(unit).to_have_attribute("data-state", "closed")
            relay = await wait_for(
                lambda: _of(incidents(p), "device.relay_fault"), timeout=20, what="the relay fault on the board"
            )
            assert (relay[0]["device"], relay[0]["point"]) == ("board-3-2", "relay1")
            assert await typed(p, "access.granted") == []
            assert [e for e in await typed(p, "door.state") if '"unlocked"' in e["data"]] == []
            unit_state = (await board.state())["panels"][0]["units"]["1"]
            assert unit_state["ignored_writes"] == 1 and unit_state["flashes"] == []
            await page.screenshot(path=str(artifacts / "doors-relay-not-moved.png"), full_page=True)

            # The installer sets relay 1 back to normal mode: the same click opens the door, the faults clear.
            await board.post("/modes", {"channel": 1, "mode": "normal"})
            if not await unit.locator("details.unlock").evaluate("el => el.open"):
                await unit.locator("details.unlock summary").click()
            await unit.locator(".reason").fill("快递员送大件（第二次）")
            await unit.locator(".unlock-go").click()
            await expect(result).to_have_attribute("data-status", "opened", timeout=T)
            await expect(result).to_have_text("门已打开")
            await wait_for(lambda: typed(p, "device.relay_fault_restore"), timeout=20, what="the relay fault restored")
            granted = await wait_for(lambda: typed(p, "access.granted"), timeout=20, what="the grant")
            assert '"remote"' in granted[0]["data"]
        finally:
            await browser.close()
            await asyncio.to_thread(gateway.stop)


async def _of(rows: Any, type_: str) -> list[dict[str, Any]] | None:
    got = [r for r in await rows if r["type"] == type_]
    return got or None
