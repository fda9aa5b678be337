"""Revoking passes and blocking people (portal/estate/revocations.py, portal/doors/revocation_views.py) against a real
portal on loopback, a real Mosquitto and a test client in the gateway's place, which checks every signed list it is sent
with the portal's public key, as a gateway does.

The doors' side (a gateway process refusing the scan within seconds) is in tests/test_e2e_revocation.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
from yarl import URL

from gateway import wire
from gateway.wire.passes import RevocationList, keyring, parse_revocations
from portal.estate import revocations as rv
from tests.doors_support import estate_with_doors, guard_session
from tests.portal_support import (
    GATEWAY,
    SITE,
    Portal,
    csrf_of,
    mqtt,
    open_portal_command,
    post_form,
    running_portal,
    wait_for,
    write_config,
)
from tests.registry_support import estate, plate_code, resident_row

OWNER, OWNER_PHONE = "张伟", "13812345678"  # 3-2-301 (tests.registry_support.PEOPLE)
TENANT_PHONE = "13700001111"  # 3-2-302


async def next_list(p: Portal, gw: aiomqtt.Client, timeout: float = 15.0) -> RevocationList:
    """The next revocation list the portal sends the gateway, verified with the portal's public key."""
    ring = keyring([p.services.signing_key.public_key()])
    async with asyncio.timeout(timeout):
        async for m in gw.messages:
            cmd = open_portal_command(p, m.payload)
            if cmd.type == "credentials.sync":
                return parse_revocations(cmd.args["revocations"], ring)
    raise AssertionError("the message stream ended")


async def list_where(p: Portal, gw: aiomqtt.Client, pred: Any, what: str) -> RevocationList:
    """Lists go out on every change and on the timer: the first that satisfies ``pred``."""
    async with asyncio.timeout(15):
        while True:
            rl = await next_list(p, gw)
            if pred(rl):
                return rl
    raise AssertionError(what)


async def guard_visitor(p: Portal, name: str = "刘访客", house: str = "3-2-301") -> dict[str, Any]:
    r = await post_form(
        p, "/visitors", {"name": name, "house": house, "hours": "24", "uses": "3", "start": "", "note": ""}, csrf=p.csrf
    )
    assert r.status == 303, await r.text()
    vid = int(r.headers["Location"].rsplit("/", 1)[1])
    return dict((await (await p.client.get(f"/api/visitors/{vid}")).json())["visitor"])


async def act(p: Portal, action: str, target: str, reason: str, q: str = "3-2-301") -> aiohttp.ClientResponse:
    """Revoke or block as the console does it: the form, then its confirmation page's button (both answered here)."""
    form = {"action": action, "target": target, "reason": reason, "q": q, "site": ""}
    asked = await post_form(p, "/revocations", form, csrf=p.csrf)
    if asked.status != 200 or 'name="confirmed" value="yes"' not in await asked.text():
        return asked  # refused before the question (no reason, no such pass...)
    return await post_form(p, "/revocations", {**form, "confirmed": "yes"}, csrf=p.csrf)


async def audit_rows(p: Portal, action: str) -> list[tuple[str, ...]]:
    return await p.services.store.read(
        lambda c: [
            tuple(r)
            for r in c.execute(
                "SELECT actor, action, target, detail FROM audit WHERE action = ? ORDER BY id", (action,)
            )
        ]
    )


async def resident_browser(p: Portal, phone: str, house: str) -> tuple[aiohttp.ClientSession, str]:
    """A phone signed in as the resident (session made by the portal, as after a sign-in), and its CSRF token."""
    row = await resident_row(p, phone, house)
    http = aiohttp.ClientSession(base_url=p.origin, cookie_jar=aiohttp.CookieJar(unsafe=True))
    token = await estate(p).start_resident_session(int(row["person_id"]))
    http.cookie_jar.update_cookies({"gh_resident": token}, URL(p.origin))
    page = await (await http.get("/m/login")).text()
    return http, csrf_of(page)


async def issue_visitor_pass(p: Portal, http: aiohttp.ClientSession, csrf: str, code: str) -> str:
    """A visitor pass issued from the resident's phone: its share-link token."""
    r = await http.post(
        f"/p/{code}/visitor",
        data={"hours": "24", "uses": "2", "csrf": csrf},
        headers={"Origin": p.origin},
        allow_redirects=False,
    )
    assert r.status == 303, await r.text()
    return r.headers["Location"].rsplit("/", 1)[1]


async def test_a_guard_revokes_a_guardroom_visitor_pass_and_the_signed_list_carries_it(
    tmp_path: Path, broker: Any
) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "cmd"), qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await estate_with_doors(p)
        await guard_session(p)
        v = await guard_visitor(p)
        page = await (await p.client.get("/revocations", params={"q": "3-2-301"})).text()
        assert f'id="revoke-visitor-{v["id"]}"' in page and "刘访客" in page
        assert "138****5678" in page and OWNER_PHONE not in page  # residents' phones masked for the guard

        # No reason, an unknown target, another kind of action: refused, nothing stored, nothing audited.
        for target, reason, key in (
            (f"visitor:{v['id']}", "  ", "请填写原因"),
            ("visitor:999999", "x", "此处没有"),
            ("pass:00", "x", "此处没有"),
            (f"visitor:{v['id']}", "x" * 201, "原因过长"),
        ):
            r = await act(p, "revoke", target, reason)
            assert r.status == 400 and key in await r.text(), (target, r.status)
        assert await p.services.store.read(lambda c: c.execute("SELECT count(*) FROM revocations").fetchone()[0]) == 0
        assert await audit_rows(p, "revocation.pass") == []

        r = await act(p, "revoke", f"visitor:{v['id']}", "访客与住户发生冲突")
        assert r.status == 303 and r.headers["Location"].endswith("done=revoked"), await r.text()
        rl = await list_where(p, gw, lambda rl: bytes.fromhex(v["pass_id"]) in rl.passes, "the revoked pass listed")
        assert rl.site == SITE and rl.blocked == []
        assert await audit_rows(p, "revocation.pass") == [
            ("guard:guard1", "revocation.pass", f"pass:{v['pass_id']}", f"{SITE} guard_visitor: 访客与住户发生冲突")
        ]
        # The guardroom's list and the slip say so; the console's page lists it as in force.
        assert "已注销" in await (await p.client.get("/visitors")).text()
        assert 'id="slip-status">已注销' in await (await p.client.get(f"/visitors/{v['id']}")).text()
        page = await (await p.client.get("/revocations")).text()
        assert "访客与住户发生冲突" in page and "guard:guard1" in page and 'id="none-in-force"' not in page
        # Revoking it again is refused; a revoked pass cannot be "lifted" back.
        r = await act(p, "revoke", f"visitor:{v['id']}", "again")
        assert r.status == 400 and "已经注销或拉黑" in await r.text()
        rid = await p.services.store.read(lambda c: c.execute("SELECT id FROM revocations").fetchone()[0])
        r = await post_form(p, f"/revocations/{rid}/lift", {"reason": "mistake"}, csrf=p.csrf)
        assert r.status == 400 and "不能恢复" in await r.text()

        # The pass id from the access log finds it too (a guard copies it from a refused scan).
        page = await (await p.client.get("/revocations", params={"q": v["pass_id"]})).text()
        assert 'id="target"' in page and "门岗访客" in page


async def test_blocking_a_resident_lists_every_subject_and_their_visitor_passes_until_lifted(
    tmp_path: Path, broker: Any
) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "cmd"), qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await estate_with_doors(p)
        code = await plate_code(p, "3", "2", "301")
        owner = await resident_row(p, OWNER_PHONE, "301")
        phone, pcsrf = await resident_browser(p, OWNER_PHONE, "301")
        try:
            token = await issue_visitor_pass(p, phone, pcsrf, code)
            entrance = await plate_code(p, "3", "2")
            page = await (await phone.get(f"/p/{entrance}")).text()
            door = page.split('name="door" value="')[1].split('"')[0]  # their entrance's Open button, before
            vpass = await p.services.store.read(
                lambda c: dict(c.execute("SELECT id, pass_id FROM visitor_passes").fetchone())
            )
            await guard_session(p)
            page = await (await p.client.get("/revocations", params={"q": "3-2-301"})).text()
            assert f'id="block-person-{owner["person_id"]}"' in page and f'id="revoke-vpass-{vpass["id"]}"' in page
            r = await act(p, "block", f"person:{owner['person_id']}@{SITE}", "多次尾随陌生人进楼")
            assert r.status == 303, await r.text()
            rl = await list_where(p, gw, lambda rl: owner["subject"] in rl.blocked, "the resident blocked")
            assert bytes.fromhex(vpass["pass_id"]) in rl.passes  # the visitor pass they issued goes with them
            assert owner["subject"] not in rl.subjects  # blocked (an alarm at the door), not merely revoked
            assert (await audit_rows(p, "revocation.block"))[0][:3] == (
                "guard:guard1",
                "revocation.block",
                f"person:{owner['person_id']}",
            )

            # The portal stops issuing them passes; their visitor's share link shows it is cancelled.
            r = await phone.get(f"/p/{code}/mypass.json")
            assert r.status == 403 and (await r.json())["error"] == "blocked"
            r = await phone.post(
                f"/p/{code}/visitor",
                data={"hours": "2", "uses": "1", "csrf": pcsrf},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            assert r.status == 403 and "通行权限已暂停" in await r.text()
            # Nor do they open their entrance from the phone: no Open button, and a post of the form is refused with
            # no unlock sent to the gateway (the readers keep the door shut for them; the phone must not open it).
            page = await (await phone.get(f"/p/{entrance}")).text()
            assert 'id="blocked"' in page and 'name="door"' not in page
            r = await phone.post(
                f"/p/{entrance}/open",
                data={"door": door, "csrf": pcsrf},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            assert r.status == 403 and "通行权限已暂停" in await r.text()
            assert (await audit_rows(p, "door.unlock"))[0][3] == "blocked"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    async for m in gw.messages:
                        assert open_portal_command(p, m.payload).type != "unlock"

            # Lifted, with a reason: off the next list (and the resident gets passes again).
            rid = await p.services.store.read(
                lambda c: c.execute("SELECT id FROM revocations WHERE kind = 'block'").fetchone()[0]
            )
            r = await post_form(p, f"/revocations/{rid}/lift", {"reason": ""}, csrf=p.csrf)
            assert r.status == 400
            r = await post_form(p, f"/revocations/{rid}/lift", {"reason": "物业核实后恢复"}, csrf=p.csrf)
            assert r.status == 303
            rl = await list_where(p, gw, lambda rl: owner["subject"] not in rl.blocked, "the block lifted")
            assert bytes.fromhex(vpass["pass_id"]) not in rl.passes
            assert (await phone.get(f"/p/{code}/mypass.json")).status == 200
            assert (await audit_rows(p, "revocation.lift"))[0][3] == f"{SITE}: 物业核实后恢复"
            assert (await phone.get(f"/m/v/{token}")).status == 200
            assert 'name="door"' in await (await phone.get(f"/p/{entrance}")).text()  # and their door again
        finally:
            await phone.close()


async def test_a_resident_cancels_their_own_visitor_pass_and_no_one_elses(tmp_path: Path, broker: Any) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "cmd"), qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await estate_with_doors(p)
        code_301, code_302 = await plate_code(p, "3", "2", "301"), await plate_code(p, "3", "2", "302")
        owner, owner_csrf = await resident_browser(p, OWNER_PHONE, "301")
        tenant, tenant_csrf = await resident_browser(p, TENANT_PHONE, "302")
        try:
            token = await issue_visitor_pass(p, owner, owner_csrf, code_301)
            vp = await p.services.store.read(
                lambda c: dict(c.execute("SELECT id, pass_id FROM visitor_passes").fetchone())
            )
            page = await (await owner.get(f"/p/{code_301}/visitors")).text()
            assert f'id="cancel-{vp["id"]}"' in page
            # The tenant next door, through their own plate or the owner's, cannot cancel it.
            for code in (code_302, code_301):
                r = await tenant.post(
                    f"/p/{code}/visitors/{vp['id']}/cancel",
                    data={"csrf": tenant_csrf},
                    headers={"Origin": p.origin},
                    allow_redirects=False,
                )
                assert r.status in (403, 404), r.status
            assert not await p.services.store.read(lambda c: rv.pass_revoked(c, vp["pass_id"]))
            assert (await (await tenant.get(f"/p/{code_302}/visitors")).text()).count('id="cancel-') == 0
            # Without the CSRF token: refused.
            r = await owner.post(
                f"/p/{code_301}/visitors/{vp['id']}/cancel", headers={"Origin": p.origin}, allow_redirects=False
            )
            assert r.status == 403

            r = await owner.post(
                f"/p/{code_301}/visitors/{vp['id']}/cancel",
                data={"csrf": owner_csrf},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            assert r.status == 303 and r.headers["Location"] == f"/p/{code_301}/visitors?done=cancelled"
            rl = await list_where(p, gw, lambda rl: bytes.fromhex(vp["pass_id"]) in rl.passes, "the cancelled pass")
            assert rl.site == SITE
            page = await (await owner.get(f"/p/{code_301}/visitors?done=cancelled")).text()
            assert "已取消" in page and f'id="cancel-{vp["id"]}"' not in page
            # The share link no longer shows a QR; a second cancel changes nothing.
            r = await owner.get(f"/m/v/{token}")
            assert r.status == 410 and "已取消" in await r.text() and "<svg" not in await r.text()
            assert (await owner.get(f"/m/v/{token}/qr.png")).status == 410
            r = await owner.post(
                f"/p/{code_301}/visitors/{vp['id']}/cancel",
                data={"csrf": owner_csrf},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            assert r.status == 303
            me = await resident_row(p, OWNER_PHONE, "301")
            assert [r[0] for r in await audit_rows(p, "revocation.pass")] == [f"resident:{me['person_id']}"]
        finally:
            await owner.close()
            await tenant.close()


def test_the_list_leaves_out_what_has_run_out_and_what_was_lifted(tmp_path: Path) -> None:
    """portal.estate.revocations.listed on a real store: a revoked pass stays a day past its expiry; a visitor's block
    likewise; a resident's block until lifted, with every residency's subject on the site."""
    from portal.store import open_db

    conn = open_db(tmp_path / "p.db")
    try:
        conn.execute("INSERT INTO reg_sites (code, name) VALUES ('s1', 'x'), ('s2', 'y')")
        now = 1_800_000_000
        rows = [
            ("s1", "pass", "aa" * 12, None, None, now + 10),  # on the list for 10 s more
            ("s1", "pass", "bb" * 12, None, None, now - 1),  # its time on the list is over
            ("s1", "block", None, "v:visitor", None, now + 5),
            ("s2", "pass", "cc" * 12, None, None, now + 100),
        ]  # another site's list
        for site, kind, pid, subject, person, until in rows:
            conn.execute(
                "INSERT INTO revocations (site, kind, pass_id, subject, person_id, reason, until, created_at,"
                " created_by) VALUES (?, ?, ?, ?, ?, 'r', ?, 't', 'guard:x')",
                (site, kind, pid, subject, person, until),
            )
        conn.execute(
            "INSERT INTO revocations (site, kind, subject, reason, until, created_at, created_by, lifted_at)"
            " VALUES ('s1', 'block', 'v:lifted', 'r', NULL, 't', 'g', 't2')"
        )
        passes, blocked = rv.listed(conn, "s1", now)
        assert passes == [bytes.fromhex("aa" * 12)] and blocked == ["v:visitor"]
        assert rv.listed(conn, "s2", now) == ([bytes.fromhex("cc" * 12)], [])
        assert rv.listed(conn, "s1", now + 10) == ([bytes.fromhex("aa" * 12)], [])
        assert rv.listed(conn, "s1", now + 11) == ([], [])
    finally:
        conn.close()


def test_a_reason_is_required_and_bounded() -> None:
    assert rv.clean_reason("  访客  冲突 ") == "访客 冲突"
    for bad, key in (
        ("", "revocations.err.reason"),
        ("   ", "revocations.err.reason"),
        ("x" * 201, "revocations.err.reason_long"),
        ("a\x00b", "revocations.err.reason_long"),
    ):
        try:
            rv.clean_reason(bad)
        except rv.RevocationError as e:
            assert e.key == key
        else:
            raise AssertionError(bad)
    assert re.fullmatch(rv.PASS_ID_RE, "ab" * 12)
