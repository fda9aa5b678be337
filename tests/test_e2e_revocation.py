"""Revocation that holds, end to end: a real portal, real gateway processes and a real Mosquitto, scans written to
the QR reader stub's pseudo-terminal and the lock relay of the door-controller stub read back.

* a guard revokes a guardroom visitor's pass and blocks a resident in the console (a real Chromium), a resident
  cancels their own visitor pass on the phone, and each scan after that is refused within seconds (issue 14, 5);
* a gateway without a fresh revocation list refuses visitor passes and lets residents in, with the fault on the
  console's board until a fresh list comes (6);
* a 2-use visitor pass through the estate gate (one gateway) and the building entrance (another) opens each twice,
  with the broker down for the second visit, and then neither (7);
* someone holding the portal's broker password publishes unlocks (unsigned, badly signed, signed by another key,
  expired, replayed, for another gateway) on a broker running the shipped ACL: the relay moves only for the
  portal's own, and every refusal is an event at the portal and an alarm on its board (10).

The portal runs in-process on the test's loop (as the registry and phone tests run it); everything else is a process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from playwright.async_api import Page, async_playwright, expect

from gateway import wire
from gateway.tooling import provision
from gateway.tooling.broker import MosquittoProcess
from gateway.wire.passes import (
    PassFields,
    RevocationList,
    generate_keypair,
    new_pass_id,
    save_public_key,
    sign_pass,
    sign_revocations,
)
from portal.estate import registry as reg
from portal.store import Conn, key_of
from tests import procs
from tests.doors_support import door_gateway_config
from tests.portal_support import (
    Portal,
    portal_public_key,
    post_form,
    running_portal,
    sign_in,
    signed_command,
    wait_for,
    write_config,
)
from tests.registry_support import admin_session, estate, estate_csv, import_csv, plate_code, resident_row
from tests.stubs import Stub, run_stub

pytestmark = pytest.mark.timeout(240)

SITE = "s1"
ROOT = Path(__file__).resolve().parents[1]
ACL = ROOT / "systemd" / "gatehouse.acl"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
GUARD, GUARD_PW = "guard1", "guard-password-0001"
T = 15_000  # ms: bounded waits in the page
WITHIN_S = 15.0  # a revocation reaches the door within this (seconds normally; generous on a loaded machine)


# ---------------------------------------------------------------- a gateway with one door and its reader


@dataclass
class Gw:
    name: str
    folder: Path
    proc: procs.Child
    door: Stub
    reader: Stub
    door_name: str

    def events(self, *types: str) -> list[dict[str, Any]]:
        rows = procs.read_rows(self.folder / "data" / "gateway.db", "SELECT body FROM events ORDER BY seq")
        evs = [json.loads(r[0]) for r in rows]
        return [e for e in evs if not types or e["type"] in types]

    async def pulses(self) -> int:
        hist = (await self.door.state())["panels"][0]["units"]["1"]["relay_history"]
        return len([h for h in hist if h["on"] and h["via"] == "pulse"])

    async def decide(self, text: str) -> dict[str, Any]:
        """Scan ``text`` at the reader: the gateway's decision (data of access.granted/denied, plus granted).

        A pseudo-terminal now and then reads as closed for a moment (the serial line then reports the reader
        offline and reopens the port); a line written meanwhile is gone, as on a cable pulled for a second, and
        is scanned again once the reader is back. Nothing lost is ever decided, so this cannot count twice."""
        decisions = ("access.granted", "access.denied")
        for _attempt in range(3):
            before, lost = len(self.events(*decisions)), len(self.events("reader.offline"))
            await self.reader.post("/scan", {"text": text})
            new = await wait_for(
                lambda b=before, n=lost: self.events(*decisions)[b:] or len(self.events("reader.offline")) > n,
                15,
                f"a decision at {self.name}",
            )
            if isinstance(new, list) and new and new[0]["type"] in decisions:
                assert len(new) == 1, new
                return {**new[0]["data"], "granted": new[0]["type"] == "access.granted", "priority": new[0]["priority"]}
            await wait_for(
                lambda: len(self.events("reader.online")) >= len(self.events("reader.offline")),
                15,
                f"{self.name}: the reader back",
            )
            await asyncio.sleep(0.5)
            if len(self.events(*decisions)) > before:  # decided after all: the line got through
                got = self.events(*decisions)[before:]
                assert len(got) == 1, got
                return {**got[0]["data"], "granted": got[0]["type"] == "access.granted", "priority": got[0]["priority"]}
        raise AssertionError(f"{self.name}: no decision after three scans")


@asynccontextmanager
async def door_gateway(
    tmp: Path,
    name: str,
    broker_port: int,
    key: Path,
    *,
    gate: bool = False,
    mqtt_extra: str = "",
    access_extra: str = "",
) -> AsyncIterator[Gw]:
    door_name = "north-gate" if gate else "b3-u2"
    async with (
        run_stub("firmware_stubs.door_controller", "--tcp", "127.0.0.1:0") as door,
        run_stub("firmware_stubs.qr_reader", "--pty") as reader,
    ):
        folder = tmp / name
        cfg = door_gateway_config(
            folder,
            broker_port,
            door,
            reader,
            public_key=key,
            gateway=name,
            gate=gate,
            door_name=door_name,
            reader_name=f"qr-{door_name}",
            held_open_s=30,
            reader_misses=4,
            mqtt_extra=mqtt_extra,
            access_extra=access_extra,
        )
        child = await asyncio.to_thread(lambda: procs.gateway(cfg, tmp / "logs", name=name).start())
        gw = Gw(name, folder, child, door, reader, door_name)
        try:
            await wait_for(lambda: gw.events("door.state"), 20, f"{name}: the door's first state")
            await wait_for(lambda: _polled(reader), 20, f"{name}: a heartbeat poll at the reader")
            yield gw
        finally:
            await asyncio.to_thread(child.stop)


async def _polled(reader: Stub) -> bool:
    return bool((await reader.state())["readers"][0]["polls"])


async def registry(p: Portal, doors: list[tuple[str, str, bool]]) -> None:
    """The estate of tests.registry_support and the doors (gateway, door, gate); p.client is the administrator."""
    csrf = await admin_session(p)
    status, body = await import_csv(p, csrf, estate_csv())
    assert status == 200, body

    def add(c: Any) -> None:
        for gw, door, gate in doors:
            reg.add_door(
                c, SITE, gw, door, None if gate else "3", None if gate else "2", gate, "北门" if gate else "3幢2单元门"
            )

    await p.services.store.run_write(add)


async def list_confirmed(p: Portal, gw: str, version: int = 1) -> None:
    pub = estate(p).publisher
    assert pub is not None

    def confirmed() -> bool:
        return any(s["gateway"] == gw and s["confirmed"] >= max(version, s["version"]) for s in pub.status())

    await wait_for(confirmed, timeout=20, what=f"{gw} confirming revocation list v{version}")


async def sign_in_guard(page: Page, origin: str) -> None:
    await page.goto(f"{origin}/login")
    await page.fill("#user", GUARD)
    await page.fill("#password", GUARD_PW)
    await page.click("#submit")
    await page.wait_for_url("**/console")


# ---------------------------------------------------------------- 5: revoke and block in the console, cancel on a phone


async def test_a_guard_revokes_and_blocks_in_the_console_a_resident_cancels_and_the_door_refuses_within_seconds(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    async with (
        running_portal(write_config(tmp_path / "portal", broker, gateways=[(SITE, "gw1")])) as p,
        async_playwright() as pw,
    ):
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await registry(p, [("gw1", "b3-u2", False)])
        await p.services.auth.create_user(GUARD, "guard", GUARD_PW, must_change=False)
        async with door_gateway(tmp_path, "gw1", broker.port, portal_public_key(p)) as gw:
            await list_confirmed(p, "gw1")
            est = estate(p)
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                office = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
                await sign_in_guard(office, p.origin)

                # A visitor registered at the guardroom gets in.
                await office.goto(f"{p.origin}/visitors")
                await office.fill("#v-name", "刘访客")
                await office.fill("#v-house", "3-2-301")
                await office.select_option("#v-hours", "24")
                await office.fill("#v-uses", "5")
                await office.click("#v-submit")
                await office.wait_for_url("**/visitors/*")
                vid = int(office.url.rsplit("/", 1)[1])
                visitor = (await (await office.request.get(f"{p.origin}/api/visitors/{vid}")).json())["visitor"]
                assert (await gw.decide(visitor["pass_text"]))["granted"]

                # The guard revokes it from the console; the next scan is refused, the lock does not move.
                await office.goto(f"{p.origin}/revocations")
                await office.fill("#q", "3-2-301")
                await office.click("#find-go")
                form = office.locator(f"#revoke-visitor-{vid}")
                await form.locator("input.reason").fill("与住户发生冲突，住户要求不再放行")
                pulses = await gw.pulses()
                await form.locator("button").click()
                await expect(office.locator("#consequence")).to_contain_text("立即在所有门上失效")  # it asks first
                t0 = time.monotonic()
                await office.click("#confirm-go")
                await expect(office.locator("#notice")).to_contain_text("已注销", timeout=T)
                granted = 0  # scans while the list was on its way: let in, and pulsed, as they should be

                async def refused() -> bool:
                    nonlocal granted
                    d = await gw.decide(visitor["pass_text"])
                    granted += d["granted"]
                    return not d["granted"] and d["reason"] == "revoked"

                await wait_for(refused, WITHIN_S, "the revoked pass refused")
                elapsed = time.monotonic() - t0
                d = gw.events("access.denied")[-1]["data"]
                assert (d["reason"], d["pass_id"]) == ("revoked", visitor["pass_id"]), d
                assert await _refused(gw, visitor["pass_text"])  # and again
                await asyncio.sleep(0.3)
                assert await gw.pulses() == pulses + granted  # no refused scan moved the lock
                print(f"\nrevoked in the console → refused at the door: {elapsed:.2f} s")
                await expect(office.locator('#in-force tr[data-kind="pass"]')).to_have_count(1)
                await office.screenshot(path=str(artifacts / "revocations_console.png"), full_page=True)

                # A resident blocked: their pass (fetched a moment before, still in its minute) raises an alarm.
                owner = await resident_row(p, "13812345678", "301")
                text, _ = est.issuer.resident_pass(SITE, owner["subject"], "3/2", "3-2-301")
                assert (await gw.decide(text))["granted"]
                await office.goto(f"{p.origin}/revocations?q=3-2-301")
                form = office.locator(f"#block-person-{owner['person_id']}")
                await form.locator("input.reason").fill("已被法院禁止进入小区")
                await form.locator("button").click()
                await expect(office.locator("#consequence")).to_contain_text("已被法院禁止进入小区")
                await office.click("#confirm-go")
                await expect(office.locator("#notice")).to_contain_text("已拉黑", timeout=T)
                text, _ = est.issuer.resident_pass(SITE, owner["subject"], "3/2", "3-2-301")
                await wait_for(lambda: _refused(gw, text, "blocked"), WITHIN_S, "the blocked resident refused")
                blocked = gw.events("access.denied")[-1]
                assert blocked["priority"] == wire.Priority.TAMPER and blocked["data"]["subject"] == owner["subject"]
                board = await wait_for(lambda: _board(p, "access.denied"), timeout=20, what="the alarm on the board")
                assert board[0]["kind"] == "intrusion"

                # A household member cancels the visitor pass they gave out, on their phone.
                member = await resident_row(p, "13987654321", "301")
                code = await plate_code(p, "3", "2", "301")
                phone_ctx = await browser.new_context(**PHONE)  # type: ignore[arg-type]
                token = await est.start_resident_session(int(member["person_id"]))
                await phone_ctx.add_cookies([{"name": "gh_resident", "value": token, "url": p.origin}])
                ph = await phone_ctx.new_page()
                await ph.goto(f"{p.origin}/p/{code}")
                await ph.select_option("#visitor-hours", "24")
                await ph.fill("#visitor-uses", "3")
                await ph.click("#visitor-issue")
                await ph.wait_for_url("**/m/v/**")
                share = ph.url

                def latest(c: Conn) -> dict[str, Any]:
                    last = "SELECT id, pass_id, sealed FROM visitor_passes ORDER BY id DESC LIMIT 1"
                    row = dict(c.execute(last).fetchone())
                    return {**row, "pass_text": key_of(c).unseal(bytes(row["sealed"]), row["pass_id"])}

                vp = await p.services.store.read(latest)
                assert (await gw.decide(vp["pass_text"]))["granted"]
                await ph.goto(f"{p.origin}/p/{code}")
                await ph.click("#my-visitors")
                await ph.click(f"#cancel-{vp['id']} button")
                await expect(ph.locator("#notice")).to_be_visible(timeout=T)
                await wait_for(lambda: _refused(gw, vp["pass_text"]), WITHIN_S, "the cancelled pass refused")
                await ph.goto(share)
                await expect(ph.locator("#message")).to_contain_text("已取消")
                await ph.screenshot(path=str(artifacts / "phone_visitor_cancelled.png"), full_page=True)

                # The console shows every gateway's list confirmed.
                await list_confirmed(p, "gw1", estate(p).publisher.lists[SITE].version)  # type: ignore[union-attr]
                await office.goto(f"{p.origin}/revocations")
                await expect(office.locator('#gateways tr[data-gateway="s1/gw1"]')).to_contain_text("已是最新")
                await office.click("#lang-switch")
                await expect(office.locator("main h1")).to_have_text("Revoke passes and block people")
            finally:
                await browser.close()
            assert gw.proc.alive, gw.proc.tail()


async def _refused(gw: Gw, text: str, reason: str = "revoked") -> bool:
    """Scan ``text``: True when it is refused for ``reason`` (the list may take a moment to arrive)."""
    d = await gw.decide(text)
    return not d["granted"] and d["reason"] == reason


async def _board(p: Portal, etype: str) -> list[dict[str, Any]]:
    body = await (await p.client.get("/api/board")).json()
    return [i for i in body["incidents"] if i["type"] == etype]


# ---------------------------------------------------------------- 6: a missing or stale list


async def test_a_stale_list_refuses_visitors_admits_residents_and_shows_a_fault_on_the_console(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path
) -> None:
    """The gateway trusts a key of the test's (not the portal's), so only the test can give it a list: none at
    first, then one two days old, then a fresh one."""
    key, pub = generate_keypair()
    save_public_key(tmp_path / "test.pub", pub)
    async with (
        running_portal(write_config(tmp_path / "portal", broker, gateways=[(SITE, "gw1")])) as p,
        async_playwright() as pw,
    ):
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await registry(p, [("gw1", "b3-u2", False)])
        await p.services.auth.create_user(GUARD, "guard", GUARD_PW, must_change=False)
        async with door_gateway(tmp_path, "gw1", broker.port, tmp_path / "test.pub") as gw:

            def sign(kind: str, **kw: Any) -> str:
                now = int(time.time())
                f: dict[str, Any] = dict(
                    kind=kind,
                    site=SITE,
                    subject="V1" if kind == "visitor" else "P1",
                    house="3-2-301",
                    units=("3/2",),
                    not_before=now,
                    not_after=now + (86400 if kind == "visitor" else 60),
                    uses=5,
                    pass_id=new_pass_id(),
                )
                f.update(kw)
                return sign_pass(key, PassFields(**f))

            async def sync(version: int, issued_at: int) -> dict[str, Any]:
                rl = RevocationList(version=version, issued_at=issued_at, site=SITE)
                payload, cid = signed_command(
                    key, "credentials.sync", gateway="gw1", revocations=sign_revocations(key, rl)
                )
                async with aiomqtt.Client("127.0.0.1", broker.port) as c:
                    await c.publish(wire.topic(SITE, "gw1", "cmd"), payload, qos=1)
                got = await wait_for(
                    lambda: [e for e in gw.events("command.result") if e["data"]["command_id"] == cid],
                    15,
                    "the sync's result",
                )
                return dict(got[0]["data"])

            # No list yet (a new gateway, a replaced SD card): visitors refused, residents let in.
            d = await gw.decide(sign("visitor"))
            assert (d["granted"], d["reason"], d["detail"]) == (False, "stale-list", "no revocation list received yet")
            assert (await gw.decide(sign("resident")))["granted"]
            (stale,) = await wait_for(lambda: _board(p, "credentials.stale"), timeout=20, what="the fault")
            assert (stale["kind"], stale["state"], stale["priority"]) == ("fault", "new", wire.Priority.FAULT)

            # A list two days old is no better.
            assert (await sync(1, int(time.time()) - 2 * 86400))["ok"] is True
            d = await gw.decide(sign("visitor"))
            assert (d["reason"], d["detail"]) == ("stale-list", "revocation list v1 is 48.0 h old (at most 24 h)")

            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
                await sign_in_guard(page, p.origin)
                await page.goto(f"{p.origin}/board")
                card = page.locator(f'#incidents li.incident[data-id="{stale["id"]}"]')
                await expect(card).to_contain_text("撤销名单过期", timeout=T)
                await page.screenshot(path=str(artifacts / "board_stale_list.png"), full_page=True)

                # A fresh list: visitors get in again, and the fault is restored on the board.
                assert (await sync(2, int(time.time())))["ok"] is True
                assert (await gw.decide(sign("visitor")))["granted"]
                await wait_for(lambda: _restored(p, stale["id"]), timeout=20, what="the fault restored")
                await expect(card.locator(".tag.restored")).to_be_visible(timeout=T)
            finally:
                await browser.close()
            (restore,) = gw.events("credentials.stale_restore")
            assert restore["data"]["incident"] == gw.events("credentials.stale")[0]["data"]["incident"]


async def _restored(p: Portal, iid: int) -> bool:
    inc = (await (await p.client.get(f"/api/incidents/{iid}")).json())["incident"]
    return bool(inc["restored_at"])


# ---------------------------------------------------------------- 7: visits through two gateways


async def test_a_two_use_visitor_pass_makes_two_visits_through_gate_and_entrance_on_two_gateways(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    gws = [(SITE, "gw-gate"), (SITE, "gw-b3")]
    async with running_portal(write_config(tmp_path / "portal", broker, gateways=gws)) as p:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await registry(p, [("gw-gate", "north-gate", True), ("gw-b3", "b3-u2", False)])
        await p.services.auth.create_user(GUARD, "guard", GUARD_PW, must_change=False)
        async with (
            door_gateway(tmp_path, "gw-gate", broker.port, portal_public_key(p), gate=True) as gate,
            door_gateway(tmp_path, "gw-b3", broker.port, portal_public_key(p)) as entrance,
        ):
            await list_confirmed(p, "gw-gate")
            await list_confirmed(p, "gw-b3")
            # Registered at the guardroom: two uses (two visits), a day.
            assert (await sign_in(p, GUARD, GUARD_PW)).status == 303
            page = await (await p.client.get("/visitors")).text()
            csrf = page.split('name="csrf" value="')[1].split('"')[0]
            r = await post_form(
                p,
                "/visitors",
                {"name": "快递员", "house": "3-2-301", "hours": "24", "uses": "2", "start": "", "note": ""},
                csrf=csrf,
            )
            assert r.status == 303
            vid = int(r.headers["Location"].rsplit("/", 1)[1])
            text = (await (await p.client.get(f"/api/visitors/{vid}")).json())["visitor"]["pass_text"]

            def seen(d: dict[str, Any]) -> tuple[str, int | None]:
                return ("granted" if d["granted"] else d["reason"], d.get("uses_left"))

            walk = [seen(await gate.decide(text)), seen(await entrance.decide(text))]  # visit 1
            broker.stop()  # visit 2 with the broker (and so the portal) out of reach
            walk += [seen(await gate.decide(text)), seen(await entrance.decide(text))]
            walk += [seen(await gate.decide(text)), seen(await entrance.decide(text))]  # a third: no
            assert walk == [
                ("granted", 1),
                ("granted", 1),
                ("granted", 0),
                ("granted", 0),
                ("replayed", None),
                ("replayed", None),
            ], walk
            assert (await gate.pulses(), await entrance.pulses()) == (2, 2)
            (last,) = [e for e in gate.events("access.denied")]
            assert last["data"]["detail"] == "2 of 2 visits made"
            broker.start()
            await wait_for(lambda: _at_portal(p, 2), 30, "both refusals at the portal once the broker is back")


async def _at_portal(p: Portal, n: int) -> bool:
    evs = await p.events(type="access.denied", limit=50)
    return len([e for e in evs if e["data"]["reason"] == "replayed"]) >= n


# ---------------------------------------------------------------- 10: the portal's broker password opens nothing


def _secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n", encoding="utf-8")
    os.chmod(path, 0o600)
    return path


async def test_the_portals_broker_password_alone_opens_nothing(tmp_path: Path) -> None:
    passwd = tmp_path / "broker.passwd"
    pw = {u: provision.add_broker_user(passwd, u) for u in ("portal", f"{SITE}/gw1")}
    broker = MosquittoProcess(tmp_path / "broker", password_file=passwd, acl_file=ACL).start()
    try:
        portal_cfg = write_config(
            tmp_path / "portal",
            broker,
            gateways=[(SITE, "gw1")],
            mqtt_extra=("  username: portal", f"  password_file: {_secret(tmp_path / 'portal.pw', pw['portal'])}"),
        )
        async with running_portal(portal_cfg) as p:
            await wait_for(lambda: p.services.ingest.connected, what="portal connected with its broker user")
            await registry(p, [("gw1", "b3-u2", False)])
            gw_secret = _secret(tmp_path / "gw.pw", pw[f"{SITE}/gw1"])
            async with (
                door_gateway(
                    tmp_path,
                    "gw1",
                    broker.port,
                    portal_public_key(p),
                    mqtt_extra=f"username: {SITE}/gw1, password_file: {gw_secret}",
                ) as gw,
                aiomqtt.Client(
                    "127.0.0.1",
                    broker.port,
                    username=f"{SITE}/gw1",
                    password=pw[f"{SITE}/gw1"],
                    identifier="spy-with-a-stolen-gateway-password",
                ) as spy,
            ):
                await list_confirmed(p, "gw1")
                await spy.subscribe(wire.topic(SITE, "gw1", "cmd"), qos=1)
                # The portal's own remote unlock opens the door (and a spy holding the gateway's password copies it).
                r = await p.client.post(
                    f"/api/doors/{SITE}/b3-u2/unlock",
                    json={"reason": "快递员，已电话核实"},
                    headers={"Origin": p.origin, "X-CSRF-Token": await _csrf(p)},
                )
                assert r.status == 202, await r.text()
                real = await _next_unlock(spy)
                await wait_for(lambda: _pulses_at_least(gw, 1), 15, "the portal's unlock")

                env = json.loads(real)
                body = base64.b64decode(env["body"])
                tampered = json.dumps(
                    {**env, "body": base64.b64encode(body.replace(b'"b3-u2"', b'"b3-u1"')).decode()}
                ).encode()
                now = wire.utcnow()
                unsigned = wire.encode(
                    wire.Command(
                        v=1,
                        id="forged-1",
                        type="unlock",
                        ts=now,
                        expires=now,
                        by="guard:intruder",
                        args={"door": "b3-u2", "reason": "x"},
                    )
                )
                other_key, _ = signed_command(generate_keypair()[0], "unlock", gateway="gw1", door="b3-u2", reason="x")
                key = p.services.signing_key  # what an old, captured command was signed with
                expired, expired_id = signed_command(
                    key, "unlock", gateway="gw1", life_s=-60, door="b3-u2", reason="an old order"
                )
                elsewhere, _ = signed_command(key, "unlock", gateway="gw2", door="b3-u2", reason="for gw2")
                async with aiomqtt.Client(
                    "127.0.0.1",
                    broker.port,
                    username="portal",
                    password=pw["portal"],
                    identifier="attacker-with-the-portal-password",
                ) as attacker:
                    for payload in (unsigned, tampered, other_key, expired, real, elsewhere):
                        await attacker.publish(wire.topic(SITE, "gw1", "cmd"), payload, qos=1)
                # Then the portal's own again: once it has opened, everything before it has been judged.
                r = await p.client.post(
                    f"/api/doors/{SITE}/b3-u2/unlock",
                    json={"reason": "住户忘带钥匙"},
                    headers={"Origin": p.origin, "X-CSRF-Token": await _csrf(p)},
                )
                assert r.status == 202
                await wait_for(lambda: _pulses_at_least(gw, 2), 15, "the portal's second unlock")
                assert await gw.pulses() == 2, "a forged command moved the relay"

                refused = {e["data"]["reason"]: e for e in gw.events("command.rejected")}
                assert sorted(refused) == ["bad-signature", "replayed", "unknown-key", "unsigned", "wrong-gateway"]
                assert refused["unsigned"]["data"]["door"] == "b3-u2" and refused["unsigned"]["priority"] == 20
                assert refused["replayed"]["priority"] == wire.Priority.ROUTINE
                (late,) = [e for e in gw.events("command.result") if e["data"]["command_id"] == expired_id]
                assert (late["data"]["ok"], late["data"]["detail"]) == (False, "expired before it arrived")

                # The grant is recorded once the relay's read-back confirms it moved, a poll after the pulse.
                def remote_grants() -> list[dict[str, Any]]:
                    return [e for e in gw.events("access.granted") if e["data"]["kind"] == "remote"]

                await wait_for(lambda: len(remote_grants()) >= 2, 10, "the second remote grant in the gateway's store")
                remote = remote_grants()
                assert [e["data"]["reason"] for e in remote] == ["快递员，已电话核实", "住户忘带钥匙"]

                # Each refusal is visible at the portal; the forgeries are alarms on the board.
                at_portal = await wait_for(
                    lambda: _rejected_at_portal(p, 5), timeout=20, what="the refusals at the portal"
                )
                assert sorted(e["data"]["reason"] for e in at_portal) == sorted(refused)
                # One tamper incident at the gateway, the forgeries folded into it as trips (the replay rings nothing).
                alarms = await wait_for(lambda: _trips(p, "command.rejected", 4), timeout=20, what="board alarms")
                assert [(i["kind"], i["trips"]) for i in alarms] == [("tamper", 4)], alarms
                assert gw.proc.alive, gw.proc.tail()
    finally:
        broker.stop()


async def _trips(p: Portal, etype: str, n: int) -> list[dict[str, Any]] | None:
    got = await _board(p, etype)
    return got if sum(int(i.get("trips", 1)) for i in got) >= n else None


async def _csrf(p: Portal) -> str:
    page = await (await p.client.get("/doors")).text()
    return page.split('name="csrf-token" content="')[1].split('"')[0]


async def _next_unlock(client: aiomqtt.Client) -> bytes:
    async with asyncio.timeout(15):
        async for m in client.messages:
            assert isinstance(m.payload, bytes | bytearray)
            if b'"type":"unlock"' in base64.b64decode(json.loads(m.payload)["body"]):
                return bytes(m.payload)
    raise AssertionError("no unlock command")


async def _pulses_at_least(gw: Gw, n: int) -> bool:
    return await gw.pulses() >= n


async def _rejected_at_portal(p: Portal, n: int) -> list[dict[str, Any]] | None:
    evs = await p.events(type="command.rejected", limit=50)
    return evs if len(evs) >= n else None


async def test_an_ack_forged_with_the_portals_broker_password_loses_no_event(tmp_path: Path) -> None:
    """Acks are not signed: whoever holds the portal's broker password may publish one. One naming every seq to
    come must not make the gateway drop its next events (a refusal at the door here; a fire the same way) from
    its outbox before they ever leave: the gateway forgets only what it sent and awaits an ack for."""
    passwd = tmp_path / "broker.passwd"
    pw = {u: provision.add_broker_user(passwd, u) for u in ("portal", f"{SITE}/gw1")}
    broker = MosquittoProcess(tmp_path / "broker", password_file=passwd, acl_file=ACL).start()
    try:
        portal_cfg = write_config(
            tmp_path / "portal",
            broker,
            gateways=[(SITE, "gw1")],
            mqtt_extra=("  username: portal", f"  password_file: {_secret(tmp_path / 'portal.pw', pw['portal'])}"),
        )
        async with running_portal(portal_cfg) as p:
            await wait_for(lambda: p.services.ingest.connected, what="portal connected with its broker user")
            await registry(p, [("gw1", "b3-u2", False)])
            gw_secret = _secret(tmp_path / "gw.pw", pw[f"{SITE}/gw1"])
            async with door_gateway(
                tmp_path,
                "gw1",
                broker.port,
                portal_public_key(p),
                mqtt_extra=f"username: {SITE}/gw1, password_file: {gw_secret}",
            ) as gw:
                await list_confirmed(p, "gw1")
                async with aiomqtt.Client(
                    "127.0.0.1",
                    broker.port,
                    username="portal",
                    password=pw["portal"],
                    identifier="attacker-acking-what-is-to-come",
                ) as attacker:
                    ack = json.dumps({"v": 1, "seqs": list(range(1, 3000))}).encode()
                    await attacker.publish(wire.topic(SITE, "gw1", "ack"), ack, qos=1)
                for i in range(3):
                    assert not (await gw.decide(f"GH1:not-a-pass-{i}"))["granted"]
                got = await wait_for(lambda: _denied_at_portal(p, 3), 20, "the three refusals at the portal")
                assert len(got) == 3 and gw.proc.alive
    finally:
        broker.stop()


async def _denied_at_portal(p: Portal, n: int) -> list[dict[str, Any]] | None:
    evs = await p.events(type="access.denied", limit=50)
    return evs if len(evs) >= n else None
