"""The guard hears every alarm on every console page, in real headless Chromium fed by a real Mosquitto.

What "rings" means here is measured, not assumed: the console shell's siren runs through a WebAudio AnalyserNode
and ``#sound[data-heard-ms]`` counts the milliseconds of non-silent audio the browser actually rendered; a page
rings when that count grows. Nothing here evaluates script in the page before checking whether it may play sound
(Playwright's evaluate counts as a user gesture); attributes are read from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
from playwright.async_api import APIResponse, Browser, Page, Route, async_playwright, expect

from gateway import wire
from gateway.tooling.broker import MosquittoProcess, free_port
from tests.portal_support import (
    GATEWAY,
    ROOT,
    SITE,
    Portal,
    add_user,
    batch_payload,
    mqtt,
    portal_process,
    running_portal,
    wait_for,
    write_config,
)
from tests.test_alarm_board import ZONE, ev

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
KIOSK = [*FLAGS, "--autoplay-policy=no-user-gesture-required"]  # the guardroom's kiosk browser (docs/install.md)
PW = "guard-password-0001"
EVENTS_TOPIC = wire.topic(SITE, GATEWAY, "events")
T = 10_000
#: Every console page a guard can be on (the nav link that leads there, the path).
PAGES = [
    ("/board", "/board"),
    ("/reports", "/reports"),
    ("/board/map", "/board/map"),
    ("/doors", "/doors"),
    ("/visitors", "/visitors"),
    ("/access-log", "/access-log"),
    ("/admin/registry", "/admin/registry"),
    ("/stations", "/stations"),
    ("/patrol/report", "/patrol/report"),
    ("/password", "/password"),
    ("/console", "/console"),
]


async def heard_ms(page: Page) -> int:
    return int(await page.locator("#sound").get_attribute("data-heard-ms") or 0)


async def rings(page: Page, timeout: float = 10.0) -> bool:
    """The siren's played time grows by at least 300 ms: sound is really being rendered on this page."""
    first = await heard_ms(page)
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        await page.wait_for_timeout(200)
        if await heard_ms(page) - first >= 300:
            return True
    return False


async def silent(page: Page, for_ms: int = 800) -> bool:
    first = await heard_ms(page)
    await page.wait_for_timeout(for_ms)
    return await heard_ms(page) == first


async def sign_in(page: Page, origin: str, path: str = "/console") -> None:
    await page.goto(origin + path)
    await page.fill("#user", "guard1")
    await page.fill("#password", PW)
    await page.click("#submit")
    await page.wait_for_url(f"**{path}")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)


async def watch_errors(page: Page, errors: list[str]) -> None:
    page.on(
        "console",
        lambda m: (
            errors.append(m.text) if m.type == "error" and not m.text.startswith("Failed to load resource") else None
        ),
    )
    page.on("pageerror", lambda e: errors.append(str(e)))


async def test_every_console_page_rings_and_shows_the_banner(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw, async_playwright() as pw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await add_user(p, "guard1", "guard", PW)
        browser: Browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        kiosk: Browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
        errors: list[str] = []
        try:
            page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
            await watch_errors(page, errors)
            await sign_in(page, p.origin)
            # The sign-in click carries over to the console (same origin): sound works, nothing rings yet.
            await expect(page.locator("#sound")).to_have_attribute("data-state", "off", timeout=T)
            await expect(page.locator("#sound-blocked")).to_be_hidden()
            assert await silent(page)

            # 值班台 shows the zone's label, not its codes.
            zone = {"zone": "car-park", "kind": "intrusion", "label": "停车场对射", "zone_type": "instant"}
            alarm = ev(1, "zone.alarm", incident="Z1", data=zone, place={"zone": "car-park"}, ts=datetime.now(UTC))
            alarm = wire.Event(
                id=alarm.id,
                seq=1,
                ts=alarm.ts,
                type=alarm.type,
                device="panel-1",
                point="zone1_alarm",
                place=alarm.place,
                priority=alarm.priority,
                data=alarm.data,
            )
            await gw.publish(EVENTS_TOPIC, batch_payload([alarm]), qos=1)
            row = page.locator(f'#events li[data-id="{alarm.id}"]')
            await expect(row).to_contain_text("停车场对射", timeout=T)
            text = await row.inner_text()
            assert "car-park" not in text and "zone1_alarm" not in text and "panel-1" not in text, text

            # The landing page rings and shows the banner; so does every other console page, reached by its link.
            await expect(page.locator("#banner")).to_be_visible(timeout=T)
            await expect(page.locator("#banner .where")).to_contain_text("停车场对射")
            assert await rings(page), "the console page does not ring"
            for link, path in PAGES:
                await page.locator(f'a[href="{link}"]').first.click()
                await page.wait_for_url(f"**{path}")
                await expect(page.locator("#banner")).to_be_visible(timeout=T)
                assert await rings(page), f"{path} does not ring"
                await expect(page.locator("#sound")).to_have_attribute("data-state", "ringing")
            await page.screenshot(path=str(artifacts / "console-ringing.png"), full_page=True)

            # A console opened without any gesture (a reload, a browser started by hand): it may not play; the
            # page says so, is not ready, and stays silent until the one click of the step.
            quiet_ctx = await browser.new_context(viewport={"width": 1100, "height": 800})
            await quiet_ctx.add_cookies(await page.context.cookies())
            quiet = await quiet_ctx.new_page()
            await watch_errors(quiet, errors)
            await quiet.goto(p.origin + "/doors")
            await expect(quiet.locator("#sound-blocked")).to_be_visible(timeout=T)
            await expect(quiet.locator("#sound")).to_have_attribute("data-state", "blocked")
            await expect(quiet.locator("body")).to_have_class("doors-page not-ready")
            assert await silent(quiet)
            await quiet.screenshot(path=str(artifacts / "console-sound-step.png"), full_page=True)
            await quiet.click("#enable-sound")
            assert await rings(quiet), "the one-click step did not unlock the siren"
            await expect(quiet.locator("#sound-blocked")).to_be_hidden()
            # ... and the unlock holds for the rest of the session (links keep it, same origin).
            await quiet.locator('a[href="/board"]').first.click()
            await quiet.wait_for_url("**/board")
            assert await rings(quiet)
            await quiet_ctx.close()

            # The guardroom's kiosk browser (autoplay allowed): every page rings with nobody clicking anything.
            kctx = await kiosk.new_context(viewport={"width": 1280, "height": 900})
            await kctx.add_cookies(await page.context.cookies())
            kpage = await kctx.new_page()
            await watch_errors(kpage, errors)
            for _, path in PAGES:
                await kpage.goto(p.origin + path)
                await expect(kpage.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)
                assert await rings(kpage), f"kiosk {path} does not ring"
            # The sound check page plays the siren on demand once the alarm is taken.
            # Acknowledging from the banner on a page that is not the board stops the siren everywhere.
            await kpage.goto(p.origin + "/doors")
            await kpage.click("#banner button.ack")
            await expect(kpage.locator("#banner")).to_be_hidden(timeout=T)
            await expect(kpage.locator("#sound")).to_have_attribute("data-state", "off", timeout=T)
            assert await silent(kpage)
            await expect(page.locator("#banner")).to_be_hidden(timeout=T)
            await expect(page.locator("#sound")).to_have_attribute("data-state", "off", timeout=T)
            await kpage.goto(p.origin + "/sound")
            assert await silent(kpage)
            await kpage.click("#play-siren")
            assert await rings(kpage), "the sound check page does not play the siren"
            await kctx.close()
            assert errors == []
        finally:
            await browser.close()
            await kiosk.close()


# ---------------------------------------------------------------- a console that cannot prove it is live


def _adduser(config: Path, name: str, role: str) -> None:
    pw_file = config.parent / f"{name}.pw"
    pw_file.write_text(PW)
    pw_file.chmod(0o600)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "portal",
            "adduser",
            "--config",
            str(config),
            "--user",
            name,
            "--role",
            role,
            "--password-file",
            str(pw_file),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )


async def _stale_within(page: Page, since: float, limit_s: float) -> float:
    """Wait for the red takeover; returns how long after ``since`` (monotonic) it covered the page."""
    await expect(page.locator("#stale")).to_be_visible(timeout=int(limit_s * 1000) + 2000)
    took = time.monotonic() - since
    assert took <= limit_s, f"the takeover came after {took:.1f} s"
    return took


async def test_a_console_that_cannot_prove_it_is_live_turns_red_and_rings(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path, broker, port=port)
    with portal_process(config) as first:
        first.stop()  # the store exists now: add the guard with the portal's own command, then start for real
    _adduser(config, "guard1", "guard")
    proc = portal_process(config)
    pp = proc.__enter__()
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
            try:
                ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
                page = await ctx.new_page()
                await sign_in(page, pp.url.rstrip("/"), "/board")
                await expect(page.locator("#stale")).to_be_hidden()
                assert await silent(page)

                # The portal dies (as by the OOM killer: no goodbye on the socket).
                pp.proc.send_signal(signal.SIGKILL)
                pp.proc.wait()
                killed = time.monotonic()
                took = await _stale_within(page, killed, 10.0)
                await expect(page.locator("#stale h1")).to_have_text("报警看板已断开")
                await expect(page.locator("#conn")).to_have_attribute("data-state", "stale")
                assert await rings(page), "the disconnected board does not ring"
                await page.screenshot(path=str(artifacts / "board-disconnected.png"))

                # Alarms keep coming while it is down; the broker keeps them for the portal.
                async with mqtt(broker) as gw:
                    now = datetime.now(UTC)
                    await gw.publish(
                        EVENTS_TOPIC,
                        batch_payload(
                            [
                                ev(1, "zone.alarm", incident="D1", data=ZONE, ts=now),
                                ev(
                                    2,
                                    "zone.alarm",
                                    incident="D2",
                                    data={**ZONE, "zone": "P2", "label": "东围栏"},
                                    place={"zone": "P2"},
                                    ts=now,
                                ),
                            ]
                        ),
                        qos=1,
                    )
                # Back up on the same address: the page reconnects by itself and shows what it missed.
                proc.__exit__(None, None, None)
                proc = portal_process(config)
                pp = proc.__enter__()
                await expect(page.locator("#stale")).to_be_hidden(timeout=20_000)
                await expect(page.locator("#missed")).to_be_visible(timeout=T)
                # Both alarms counted, whether the portal stored them before the page's snapshot or after (it
                # drains the broker's queue once it is up), and the outage's length counted from the last word
                # heard before it (it said 0 s after a takeover).
                await expect(page.locator("#missed")).to_have_attribute("data-count", "2", timeout=T)
                said = await page.locator("#missed").text_content() or ""
                down = re.search(r"断线约 (\d+) 秒", said)
                assert down is not None and int(down.group(1)) >= took - 2, (said, took)
                assert "punct." not in said and said.count("，") >= 2, said  # the two named, one comma between
                await expect(page.locator("#incidents li.incident")).to_have_count(2, timeout=T)
                await expect(page.locator("#banner")).to_be_visible()
                assert await rings(page)
                await expect(page.locator("#conn")).to_have_attribute("data-state", "online")

                # The session ends (signed out in another tab): the board asks for a sign-in, red and ringing.
                other = await ctx.new_page()
                await other.goto(pp.url + "console")
                await other.click("#logout")
                await other.wait_for_url("**/login")
                ended = time.monotonic()
                await _stale_within(page, ended, 10.0)
                await expect(page.locator("#stale .signin")).to_be_visible()
                await expect(page.locator("#stale .why")).to_contain_text("登录已失效")
                assert await rings(page)
                # Signing in again from the takeover brings the board back, with both alarms.
                await page.click("#stale-signin")
                await page.wait_for_url("**/login**")
                await page.fill("#user", "guard1")
                await page.fill("#password", PW)
                await page.click("#submit")
                await page.wait_for_url("**/board")
                await expect(page.locator("#incidents li.incident")).to_have_count(2, timeout=T)
                await expect(page.locator("#stale")).to_be_hidden()
                print(f"\ntakeover {took:.1f} s after the portal was killed")
            finally:
                await browser.close()
    finally:
        proc.__exit__(None, None, None)


async def test_an_alarm_that_arrives_while_the_page_loads_still_rings(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    """The page asks /api/board for what is open when its socket opens; the answer can have been read before an alarm
    the socket then delivers. That late snapshot must not silence the alarm: the shell must still ring."""
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw, async_playwright() as pw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await add_user(p, "guard1", "guard", PW)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
        try:
            page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
            await sign_in(page, p.origin)
            read: list[str] = []
            release = asyncio.Event()
            stale: list[APIResponse] = []
            first = asyncio.Lock()

            async def hold(route: Route) -> None:
                # Every snapshot asked for before the release gets the answer read before the alarm existed,
                # whenever its request comes (the shell's and the board's, in either order).
                if release.is_set():
                    await route.continue_()
                    return
                async with first:
                    if not stale:
                        stale.append(await route.fetch())
                read.append(route.request.url)
                await release.wait()
                await route.fulfill(response=stale[0])

            await page.route("**/api/board*", hold)
            await page.goto(p.origin + "/board")
            await wait_for(lambda: bool(stale), 30, "the first snapshot read")

            alarm = ev(1, "zone.alarm", incident="Z1", data=ZONE, ts=datetime.now(UTC))
            await gw.publish(EVENTS_TOPIC, batch_payload([alarm]), qos=1)
            await expect(page.locator("#incidents li.incident")).to_have_count(1, timeout=T)
            await wait_for(lambda: len(read) >= 2, 30, "the board's and the shell's snapshots held")
            release.set()
            await page.wait_for_timeout(500)  # both stale snapshots have been applied by now
            await expect(page.locator("#incidents li.incident")).to_have_count(1)
            await expect(page.locator("#banner")).to_be_visible(timeout=T)
            assert await rings(page), "a snapshot read before the alarm silenced it"
        finally:
            await browser.close()


async def test_an_incident_stored_after_a_higher_one_is_not_dropped_by_the_snapshot(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    """With several portal instances on PostgreSQL, an incident can commit after one with a higher id, so the board's
    snapshot can hold the higher one and not yet the lower, which the socket tells meanwhile. The board must keep the
    lower one: its card, not only the banner. The snapshot here is the portal's real answer with the lower incident
    taken out (the answer PostgreSQL gives when its transaction commits last; SQLite cannot interleave them)."""
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw, async_playwright() as pw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await add_user(p, "guard1", "guard", PW)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
        try:
            page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
            await sign_in(page, p.origin)
            stored = asyncio.Event()
            held: list[str] = []
            lower: list[int] = []

            async def hold(route: Route) -> None:
                held.append(route.request.url)
                await stored.wait()
                body = await (await route.fetch()).json()
                assert len(body["incidents"]) == 2, body
                lower.append(min(i["id"] for i in body["incidents"]))
                body["incidents"] = [i for i in body["incidents"] if i["id"] != lower[0]]
                await route.fulfill(json=body)

            await page.route("**/api/board*", hold)
            await page.goto(p.origin + "/board")
            await wait_for(lambda: len(held) >= 2, 30, "the board's and the shell's snapshots asked for")
            fence = ev(1, "zone.alarm", incident="Z1", data=ZONE, ts=datetime.now(UTC))
            gate = ev(2, "zone.alarm", incident="Z2", data={**ZONE, "zone": "P2", "label": "东门"}, point="in2")
            await gw.publish(EVENTS_TOPIC, batch_payload([fence, gate]), qos=1)
            await expect(page.locator("#incidents li.incident")).to_have_count(2, timeout=T)
            stored.set()
            await wait_for(lambda: bool(lower), 30, "a snapshot answered")
            await page.wait_for_timeout(500)  # both snapshots have been applied by now
            await page.unroute("**/api/board*")
            await expect(page.locator(f'#incidents li.incident[data-id="{lower[0]}"]')).to_have_count(1)
            await expect(page.locator("#incidents li.incident")).to_have_count(2)
            await expect(page.locator("#open-count")).to_have_text("2")
        finally:
            await browser.close()


NO_WEBSOCKETS = """
// A proxy on the way that refuses WebSockets: every socket fails as the browser reports a refused upgrade.
window.WebSocket = function () {
  var self = this;
  this.readyState = 0;
  this.send = function () {};
  this.close = function () {};
  setTimeout(function () {
    self.readyState = 3;
    if (self.onerror) { self.onerror(new Event("error")); }
    if (self.onclose) { self.onclose({ code: 1006, reason: "" }); }
  }, 20);
};
"""


async def test_the_board_lists_what_is_open_when_its_socket_cannot_connect_or_its_first_answers_fail(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """Two alarms are open before the guard's page loads. Behind a proxy that refuses WebSockets the board must still
    list them (and say it is not live); with the socket fine but /api/board failing its first answers (a portal
    restarting, a balancer's 503), the board and the shell must ask again, list them and ring, not stay silent until
    the next reconnect."""
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw, async_playwright() as pw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await add_user(p, "guard1", "guard", PW)
        fence = ev(1, "zone.alarm", incident="Z1", data=ZONE, ts=datetime.now(UTC))
        gate = ev(2, "zone.alarm", incident="Z2", data={**ZONE, "zone": "P2", "label": "东门"}, point="in2")
        await gw.publish(EVENTS_TOPIC, batch_payload([fence, gate]), qos=1)

        async def open_incidents() -> bool:
            q = "SELECT count(*) FROM incidents WHERE state <> 'closed'"
            return bool(await p.services.store.read(lambda c: c.execute(q).fetchone()[0] == 2))

        await wait_for(open_incidents, 10, "two incidents open")
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            await sign_in(await context.new_page(), p.origin)

            blocked = await context.new_page()
            await blocked.add_init_script(NO_WEBSOCKETS)
            await blocked.goto(p.origin + "/board")
            await expect(blocked.locator("#incidents li.incident")).to_have_count(2, timeout=T)
            await expect(blocked.locator("#conn")).not_to_have_attribute("data-state", "online")

            failed: list[str] = []

            async def fail_first(route: Route) -> None:
                if len(failed) < 3:
                    failed.append(route.request.url)
                    await route.fulfill(status=503, json={"error": "unavailable"})
                else:
                    await route.continue_()

            hiccup = await context.new_page()
            await hiccup.route("**/api/board*", fail_first)
            await hiccup.goto(p.origin + "/board")
            await expect(hiccup.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)
            await expect(hiccup.locator("#incidents li.incident")).to_have_count(2, timeout=T)
            await expect(hiccup.locator("#banner")).to_be_visible(timeout=T)
            assert await rings(hiccup), "the open alarms are listed but do not ring"
            assert len(failed) == 3
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def _guardroom(tmp_path: Path, broker: MosquittoProcess) -> AsyncIterator[tuple[Portal, aiomqtt.Client, Browser]]:
    """A portal on the broker with the guard guard1, a gateway's MQTT client, and the guardroom's kiosk Chromium."""
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw, async_playwright() as pw:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await add_user(p, "guard1", "guard", PW)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=KIOSK, headless=True)
        try:
            yield p, gw, browser
        finally:
            await browser.close()


class _FreezingProxy:
    """A TCP relay in front of the portal whose WebSocket connections can be frozen: kept open, nothing passed either
    way, no close (a laptop that slept, a NAT entry dropped); other and new connections pass."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.sockets = 0  # WebSocket connections made through it
        self._live: list[asyncio.Event] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def freeze(self) -> None:
        for gate in self._live:
            gate.clear()

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        gate = asyncio.Event()
        gate.set()
        first = True

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
            nonlocal first
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    if upstream and first:
                        first = False
                        if data.startswith(b"GET /ws"):
                            self.sockets += 1
                            self._live.append(gate)
                    if not gate.is_set():
                        continue  # frozen: swallowed
                    dst.write(data)
                    await dst.drain()
            if gate.is_set():
                dst.close()

        await asyncio.gather(pump(r, uw, True), pump(ur, w, False))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def test_a_socket_that_dies_without_a_close_is_replaced_and_the_alarm_after_it_rings(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """The console's socket goes silent without closing. The page turns red within stale_after_s (as before), and
    also drops that socket and makes a new one: an alarm raised after the path is back reaches the screen at once,
    not after minutes of TCP giving up."""
    async with _guardroom(tmp_path, broker) as (p, gw, browser):
        proxy = _FreezingProxy(int(p.origin.rsplit(":", 1)[1]))
        origin = f"http://127.0.0.1:{await proxy.start()}"
        try:
            page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
            await sign_in(page, origin, "/board")
            assert proxy.sockets == 1
            proxy.freeze()
            frozen = time.monotonic()
            # Red for a moment (too short to catch reliably: the new socket opens within half a second), then a new
            # socket: after stale_after_s (6 s) of silence, not before, and long before TCP would give up.
            await wait_for(lambda: proxy.sockets >= 2, 15, "a new socket")
            took = time.monotonic() - frozen
            assert 5.0 <= took <= 12.0, took
            await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)
            await expect(page.locator("#stale")).to_be_hidden(timeout=T)
            alarm = ev(1, "zone.alarm", incident="F1", data=ZONE, ts=datetime.now(UTC))
            await gw.publish(EVENTS_TOPIC, batch_payload([alarm]), qos=1)
            await expect(page.locator("#banner")).to_be_visible(timeout=T)
            await expect(page.locator("#incidents li.incident")).to_have_count(1, timeout=T)
            assert await rings(page)
        finally:
            proxy.close()


async def test_in_a_flood_a_fire_takes_the_banner_in_sight_whatever_its_gateway_s_clock_says(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """Ninety-nine fence alarms wait and the guard has scrolled to the bottom of the board (on a phone, and on the
    guardroom's screen); then a fire, from a gateway whose clock is five minutes slow. The banner shows the fire, and
    the banner is on screen."""
    async with _guardroom(tmp_path, broker) as (p, gw, browser):
        pages = []
        for size in ({"width": 390, "height": 844}, {"width": 1920, "height": 1080}):
            page = await (await browser.new_context(viewport=size)).new_page()  # type: ignore[arg-type]
            await sign_in(page, p.origin, "/board")
            pages.append(page)
        now = datetime.now(UTC)
        fence = [
            ev(n, "zone.alarm", incident=f"P{n}", data={**ZONE, "zone": f"P{n}"}, place={"zone": f"P{n}"}, ts=now)
            for n in range(1, 100)
        ]
        await gw.publish(EVENTS_TOPIC, batch_payload(fence), qos=1)
        for page in pages:
            await expect(page.locator("#incidents li.incident")).to_have_count(99, timeout=20_000)
            await page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        fire_data = {**ZONE, "zone": "F1", "zone_type": "fire", "kind": "fire"}
        fire = ev(
            100,
            "zone.alarm",
            incident="F1",
            prio=wire.Priority.FIRE,
            data=fire_data,
            place={"zone": "F1"},
            ts=now - timedelta(minutes=5),
        )
        await gw.publish(EVENTS_TOPIC, batch_payload([fire]), qos=1)
        fire_id = await wait_for(
            lambda: p.services.store.read(
                lambda c: c.execute("SELECT id FROM incidents WHERE first_event = ?", (fire.id,)).fetchone()
            ),
            what="the fire stored",
        )
        for page in pages:
            banner = page.locator("#banner")
            await expect(banner).to_have_attribute("data-id", str(fire_id[0]), timeout=T)
            await expect(banner).to_be_in_viewport()


#: A covered or hidden tab's timers, at their worst: every interval runs once a minute. The siren's gain nodes are
#: kept where the test can read their value (what the audio graph is playing now).
THROTTLED = """
(() => {
  const every = window.setInterval.bind(window);
  window.setInterval = (fn, ms, ...args) => every(fn, Math.max(ms || 0, 60000), ...args);
  const make = AudioContext.prototype.createGain;
  AudioContext.prototype.createGain = function () {
    const g = make.call(this);
    (window.__gains = window.__gains || []).push(g);
    return g;
  };
})();
"""


async def test_the_siren_keeps_its_pattern_when_the_tab_s_timers_are_throttled(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """Behind the CCTV window, Chrome may run the console's timers once a minute. An alarm that comes then must
    sound its pattern at once (on and off, 1.5 s), not one held level until the next tick: the pattern is written
    ahead on the audio clock."""
    async with _guardroom(tmp_path, broker) as (p, gw, browser):
        ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
        await ctx.add_init_script(THROTTLED)
        page = await ctx.new_page()
        await sign_in(page, p.origin, "/board")
        alarm = ev(1, "zone.alarm", incident="S1", data=ZONE, ts=datetime.now(UTC))
        await gw.publish(EVENTS_TOPIC, batch_payload([alarm]), qos=1)
        await expect(page.locator("#banner")).to_be_visible(timeout=T)
        levels = []
        for _ in range(40):  # 4 s: more than two periods of the pattern
            levels.append(await page.evaluate("window.__gains[0].gain.value"))
            await page.wait_for_timeout(100)
        assert max(levels) > 0.2 and min(levels) < 0.05, levels  # on, and off, and on again
        assert sum(1 for a, b in itertools.pairwise(levels) if (a > 0.2) != (b > 0.2)) >= 3, levels


async def test_a_note_being_typed_keeps_its_focus_when_a_graver_alarm_comes_on_top(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """The guard types a note on a fence alarm's card; a fire comes and takes the top of the board. The note keeps
    the focus and what was typed, and the typing goes on into it."""
    async with _guardroom(tmp_path, broker) as (p, gw, browser):
        page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
        await sign_in(page, p.origin, "/board")
        now = datetime.now(UTC)
        await gw.publish(EVENTS_TOPIC, batch_payload([ev(1, "zone.alarm", incident="N1", data=ZONE, ts=now)]))
        fence = page.locator("#incidents li.incident").first
        await expect(fence).to_be_visible(timeout=T)
        fence_id = await fence.get_attribute("data-id")
        note = page.locator(f'#incidents li.incident[data-id="{fence_id}"] input.note')
        await note.click()
        await page.keyboard.type("已派")
        fire = ev(
            2,
            "zone.alarm",
            incident="N2",
            prio=wire.Priority.FIRE,
            data={**ZONE, "zone": "F1", "zone_type": "fire", "kind": "fire"},
            place={"zone": "F1"},
            ts=now,
        )
        await gw.publish(EVENTS_TOPIC, batch_payload([fire]))
        await expect(page.locator("#incidents li.incident")).to_have_count(2, timeout=T)
        await expect(page.locator("#incidents li.incident").first).not_to_have_attribute("data-id", fence_id or "")
        await page.keyboard.type("人前往")
        await expect(note).to_be_focused()
        await expect(note).to_have_value("已派人前往")
