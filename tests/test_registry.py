"""The estate registry: CSV import (all or nothing, every bad line named) and export, roles and masking,
the audit trail, the pass-signing key, revocation lists sent to gateways over a real broker, help calls
and problem reports reaching the console, and door opening from an entrance plate."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from gateway.wire.passes import keyring, load_public_key, parse_revocations
from portal.app import Options
from portal.estate import registry as reg
from portal.estate.passes_issue import KEY_FILE
from tests.care_patrol_support import resident_browser
from tests.portal_support import (
    GATEWAY,
    SITE,
    add_user,
    batch_payload,
    event,
    mqtt,
    open_portal_command,
    page_csrf,
    portal_public_key,
    running_portal,
    sign_in,
    wait_for,
    write_config,
)
from tests.registry_support import (
    ADMIN,
    ADMIN_PW,
    GUARD,
    GUARD_PW,
    INSTALLER,
    INSTALLER_PW,
    PEOPLE,
    admin_session,
    estate,
    estate_csv,
    form,
    house_id,
    import_csv,
    plate_code,
    resident_row,
)


def _counts(c: object) -> tuple[int, ...]:
    q = c.execute  # type: ignore[attr-defined]
    return tuple(
        int(q(f"SELECT count(*) FROM {t}").fetchone()[0])
        for t in ("reg_sites", "reg_buildings", "reg_units", "reg_houses", "reg_people", "reg_residents", "plates")
    )


# ---------------------------------------------------------------- import and export


async def test_csv_with_bad_rows_imports_nothing_and_names_each_bad_line(tmp_path: Path) -> None:
    bad = (
        "s1,阳光花园,3,2,303,赵六,1381234,family,2021-01-01,,\n"  # line 8: phone too short
        "s1,阳光花园,3号楼,2,304,,,,,,\n"  # line 9: building not a code
        "s1,阳光花园,3,2,305,钱七,13811112222,tenant,2021-01-01,,\n"  # line 10: tenant without lease end
        "s1,阳光花园,3,2,301,张伟,13812345678,owner,2020-05-01,,\n"  # line 11: repeats line 2
        "s1,阳光花园,3,2,306,孙八,13833334444,boss,2021-13-01,,\n"  # line 12: role and date
        "s1,阳光花园,3,2,307,周九,13855556666,family\n"  # line 13: too few columns
        "s1,阳光花园,3,2,308,吴十,13877778888,owner,2022-01-01,2021-01-01,\n"  # line 14: out before in
    )
    async with running_portal(write_config(tmp_path, None)) as p:
        csrf = await admin_session(p)
        status, body = await import_csv(p, csrf, estate_csv(bad))
        assert status == 422 and body["imported"] is False
        by_line: dict[int, list[str]] = {}
        for e in body["errors"]:
            by_line.setdefault(e["line"], []).append(e["reason"])
        assert by_line == {
            8: ["bad_phone"],
            9: ["bad_code"],
            10: ["tenant_needs_lease"],
            11: ["duplicate"],
            12: ["bad_role", "bad_date"],
            13: ["columns"],
            14: ["move_out_before_in"],
        }
        assert all(e["message"] for e in body["errors"])
        assert "第 2 行" in next(e["message"] for e in body["errors"] if e["line"] == 11)
        assert await p.services.store.read(_counts) == (0, 0, 0, 0, 0, 0, 0)  # nothing half-imported

        # A dry run of the good file writes nothing either; the real import writes it all.
        status, body = await import_csv(p, csrf, estate_csv(), dry_run=True)
        assert status == 200 and body["imported"] is False and body["rows"] == 6
        assert await p.services.store.read(_counts) == (0, 0, 0, 0, 0, 0, 0)
        status, body = await import_csv(p, csrf, estate_csv())
        assert status == 200 and body["imported"] is True, body
        assert body["counts"] == {
            "sites": 1,
            "buildings": 2,
            "units": 3,
            "houses": 5,
            "residents_new": 4,
            "residents_updated": 0,
        }
        # 5 houses + 3 entrances, each with one plate
        assert await p.services.store.read(_counts) == (1, 2, 3, 5, 4, 4, 8)

        # Export, then import the export: nothing new, and the same export again.
        r = await p.client.get("/admin/registry/export.csv")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
        exported = (await r.read()).decode("utf-8-sig")
        for _b, _u, h, name, phone, role, move_in, lease in PEOPLE:
            shown = "'" + phone if phone.startswith("+") else phone  # a leading + would run as a formula
            assert f",{h},{name},{shown},{role},{move_in},,{lease},active" in exported
        status, body = await import_csv(p, csrf, exported)
        assert status == 200 and body["counts"]["residents_new"] == 0 and body["counts"]["houses"] == 0
        again = (await (await p.client.get("/admin/registry/export.csv")).read()).decode("utf-8-sig")
        assert again == exported
        # Exports and imports are audited.
        actions = await p.services.store.read(lambda c: [r[0] for r in c.execute("SELECT action FROM audit")])
        assert actions.count("export.csv") == 2 and actions.count("import.csv") == 2


def test_parse_import_encodings_and_header() -> None:
    gbk = "site,building,unit,house,name,phone,role,lease_end\ns1,1,1,101,陈一,13800000000,租户,2030-01-01\n"
    rows, errors = reg.parse_import(gbk.encode("gb18030"))
    assert not errors and rows[0].name == "陈一" and rows[0].role == "tenant" and rows[0].lease_end == "2030-01-01"
    rows, errors = reg.parse_import(b"\xef\xbb\xbf" + gbk.encode())  # Excel's UTF-8 BOM
    assert not errors and rows[0].site == "s1"
    _rows, errors = reg.parse_import(b"site,building,flat\ns1,1,1\n")
    assert [(e.line, e.key) for e in errors] == [(1, "import.header")]
    assert "flat" in errors[0].kw["unknown"] and "unit" in errors[0].kw["missing"]
    assert [(e.line, e.key) for e in reg.parse_import(b"")[1]] == [(1, "import.empty")]
    assert [(e.line, e.key) for e in reg.parse_import(b"site,building,unit,house\n\x00\n")[1]] == [
        (1, "import.encoding")
    ]


def test_phone_masks_and_dates() -> None:
    assert reg.mask_phone("13812345678") == "138****5678"
    assert reg.mask_phone("+8613600002222") == "+86*******2222"
    assert reg.normalize_phone("138 1234 5678") == "13812345678"
    assert reg.normalize_phone("call me") is None
    assert reg.is_active("active", "2020-01-01", None, "owner", None, "2026-01-01")
    assert not reg.is_active("active", "2020-01-01", "2026-01-01", "owner", None, "2026-01-01")
    assert not reg.is_active("active", None, None, "tenant", "2025-12-31", "2026-01-01")
    assert reg.is_active("active", None, None, "tenant", "2026-01-01", "2026-01-01")
    assert reg.has_ended("active", None, "tenant", "2025-12-31", "2026-01-01")
    assert not reg.has_ended("pending", None, "tenant", "2025-12-31", "2026-01-01")


# ---------------------------------------------------------------- roles, masking, audit, keys


async def test_guards_see_masked_phones_admins_see_all_and_every_view_is_audited(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        hid = await house_id(p, "3", "2", "301")
        admin_page = await (await p.client.get(f"/admin/registry/houses/{hid}")).text()
        assert "13812345678" in admin_page and "张伟" in admin_page
        await p.client.post("/logout", data={"csrf": csrf}, headers={"Origin": p.origin})

        await add_user(p, GUARD, "guard", GUARD_PW)
        assert (await sign_in(p, GUARD, GUARD_PW)).status == 303
        r = await p.client.get(f"/admin/registry/houses/{hid}")
        guard_page = await r.text()
        assert r.status == 200 and "138****5678" in guard_page and "139****4321" in guard_page
        assert "13812345678" not in guard_page and "13987654321" not in guard_page
        for path in ("/admin/registry/export.csv", "/admin/registry/pending", "/api/passes/public-key"):
            assert (await p.client.get(path, allow_redirects=False)).status == 403, path
        rows = await p.services.store.read(
            lambda c: [
                dict(r)
                for r in c.execute(
                    "SELECT actor, action, target, detail FROM audit WHERE action = 'view.house' ORDER BY id"
                )
            ]
        )
        assert [(r["actor"], r["target"], r["detail"]) for r in rows] == [
            ("admin:office", f"house:{hid}", "full"),
            (f"guard:{GUARD}", f"house:{hid}", "masked"),
        ]


async def test_signing_key_is_0600_and_the_public_key_is_served_to_installers(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path, None)
    async with running_portal(cfg_path) as p:
        data_dir = Path(p.services.cfg.data_dir)
        assert os.stat(data_dir / KEY_FILE).st_mode & 0o777 == 0o600
        await add_user(p, INSTALLER, "installer", INSTALLER_PW)
        assert (await sign_in(p, INSTALLER, INSTALLER_PW)).status == 303
        r = await p.client.get("/api/passes/public-key")
        assert r.status == 200
        pem = await r.read()
        assert b"PRIVATE" not in pem and pem == portal_public_key(p).read_bytes()
        assert r.headers["X-Key-Id"] == estate(p).issuer.kid
        kid = estate(p).issuer.kid
    async with running_portal(cfg_path) as p:  # the same key after a restart
        assert estate(p).issuer.kid == kid


# ---------------------------------------------------------------- revocations reach the gateways


async def test_move_out_and_lease_end_put_subjects_on_the_signed_list_sent_to_gateways(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    now = [time.time()]
    opts = Options(clock=lambda: now[0])
    extra = "phone: {revocations_every_s: 5}\n"
    async with running_portal(write_config(tmp_path, broker, extra=extra), opts) as p, mqtt(broker) as gw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "cmd"), qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        ring = keyring([load_public_key(portal_public_key(p))])

        async def next_list() -> tuple[wire.Command, object]:
            async with asyncio.timeout(15):
                async for m in gw.messages:
                    cmd = open_portal_command(p, m.payload)
                    if cmd.type == "credentials.sync":
                        return cmd, parse_revocations(cmd.args["revocations"], ring)
            raise AssertionError("no command")

        owner = await resident_row(p, "13812345678", "301")
        tenant = await resident_row(p, "13700001111", "302")
        hid = await house_id(p, "3", "2", "301")
        r = await form(p, f"/admin/registry/residents/{owner['id']}/moveout", {"confirmed": "yes"}, csrf)
        assert r.status == 303
        while True:
            cmd, rl = await next_list()
            if owner["subject"] in rl.subjects:  # type: ignore[attr-defined]
                break
        assert tenant["subject"] not in rl.subjects and rl.site == SITE  # type: ignore[attr-defined]
        first_version = rl.version  # type: ignore[attr-defined]
        assert cmd.args["version"] == first_version and cmd.expires > cmd.ts
        house = await (await p.client.get(f"/admin/registry/houses/{hid}")).text()
        assert "已迁出" in house

        # The gateway confirms; then the tenant's lease runs out (the clock moves on): a new version
        # with the tenant, without anyone doing anything.
        ack = event(1, type="command.result", priority=0, site=SITE, building="3", unit="2")
        ack = wire.Event(
            id=ack.id,
            seq=1,
            ts=ack.ts,
            type="command.result",
            device="gateway",
            place=wire.Place(site=SITE),
            data={"command_id": cmd.id, "ok": True, "detail": ""},
        )
        await gw.publish(wire.topic(SITE, GATEWAY, "events"), batch_payload([ack]), qos=1)
        await wait_for(
            lambda: estate(p).publisher.state[(SITE, GATEWAY)].confirmed >= first_version, what="gateway confirmation"
        )
        now[0] = datetime(2031, 1, 2, tzinfo=UTC).timestamp()
        while True:
            cmd, rl = await next_list()
            if tenant["subject"] in rl.subjects:  # type: ignore[attr-defined]
                break
        assert rl.version > first_version  # type: ignore[attr-defined]
        # Years after the move-out, the owner's subject has left the list (its passes died long ago).
        assert owner["subject"] not in rl.subjects  # type: ignore[attr-defined]
        assert rl.issued_at == int(now[0])  # type: ignore[attr-defined]

        # Admins and installers can read the current list too (sign in again: the clock moved years on).
        assert (await sign_in(p, ADMIN, ADMIN_PW)).status == 303
        r = await p.client.get("/api/registry/revocations")
        body = await r.json()
        assert parse_revocations(body["lists"][SITE]["signed"], ring).version == rl.version  # type: ignore


# ---------------------------------------------------------------- help calls, reports, door opening


def _png(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


async def test_strangers_pressing_a_flat_s_help_button_leave_its_residents_their_own_call(tmp_path: Path) -> None:
    """The plate is public: anyone with its photo can press help, and presses are limited per flat (3 in 5 minutes).
    A stranger using that up from another address must not leave the flat's own resident with "please wait": a
    signed-in resident of the flat is counted as themselves."""
    async with running_portal(write_config(tmp_path, None)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        code = await plate_code(p, "3", "2", "301")
        stranger = aiohttp.ClientSession(
            base_url=p.origin,
            connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)),
            cookie_jar=aiohttp.CookieJar(unsafe=True),
        )
        owner = await resident_row(p, "13812345678", "301")
        phone, pcsrf = await resident_browser(p, int(owner["person_id"]))
        try:
            page = await (await stranger.get(f"/p/{code}")).text()
            scsrf = page.split('name="csrf" value="')[1].split('"')[0]
            answers = []
            for _ in range(4):
                r = await stranger.post(
                    f"/p/{code}/sos", data={"csrf": scsrf}, headers={"Origin": p.origin}, allow_redirects=False
                )
                answers.append(r.status)
            assert answers == [303, 303, 303, 429], answers
            r = await phone.post(
                f"/p/{code}/sos", data={"csrf": pcsrf}, headers={"Origin": p.origin}, allow_redirects=False
            )
            assert r.status == 303, await r.text()
            assert len(await p.events(type="house.sos")) == 4  # the stranger's three and the resident's own
        finally:
            await stranger.close()
            await phone.close()


async def test_sos_and_reports_reach_the_console_and_reports_are_work_items_guards_close(tmp_path: Path) -> None:
    extra = "phone: {photo_max_bytes: 65536}\n"
    async with running_portal(write_config(tmp_path, None, extra=extra)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        code = await plate_code(p, "3", "2", "301")
        received: list[dict[str, object]] = []
        hub = p.services.hub
        original = hub.broadcast
        hub.broadcast = lambda m: (received.append(m), original(m))  # type: ignore[method-assign]

        page = await (await p.client.get(f"/p/{code}")).text()
        pub_csrf = page.split('name="csrf" value="')[1].split('"')[0]
        r = await form(p, f"/p/{code}/sos", {}, pub_csrf)
        assert r.status == 303 and r.headers["Location"] == f"/p/{code}/sos"
        r = await p.client.get(r.headers["Location"])  # the call's state, for the phone that made it
        assert r.status == 200 and "已通知保安室" in await r.text()
        sos = received[-1]["event"]
        assert sos["type"] == "house.sos" and sos["priority"] == wire.Priority.PANIC  # type: ignore[index]
        assert sos["place"] == {"site": "s1", "building": "3", "unit": "2", "house": "301"}  # type: ignore[index]
        stored = await p.events(type="house.sos")
        assert [e["id"] for e in stored] == [sos["id"]]  # type: ignore[index]

        # A report with a real photo; a fake one and an oversized one are refused with a clear page.
        async def report(photo: bytes, name: str) -> tuple[int, str]:
            from aiohttp import FormData

            fd = FormData()
            fd.add_field("category", "repair")
            fd.add_field("text", "楼道灯坏了")
            fd.add_field("photo", photo, filename=name, content_type="image/jpeg")
            r = await p.client.post(
                f"/p/{code}/report", data=fd, headers={"Origin": p.origin, "X-CSRF-Token": pub_csrf}
            )
            return r.status, await r.text()

        status, text = await report(b"<?php echo 1; ?>" * 10, "x.jpg")
        assert status == 415 and "JPEG" in text
        status, text = await report(os.urandom(70_000), "big.jpg")
        assert status == 413
        status, text = await report(_png(), "lamp.png")
        assert status == 200 and "已提交" in text
        rep = received[-1]["event"]
        assert rep["type"] == "house.problem" and rep["data"]["category"] == "repair"  # type: ignore[index]
        wid = rep["data"]["work_item"]  # type: ignore[index]

        # Guards handle it to a close.
        await p.client.post("/logout", data={"csrf": csrf}, headers={"Origin": p.origin})
        await add_user(p, GUARD, "guard", GUARD_PW)
        assert (await sign_in(p, GUARD, GUARD_PW)).status == 303
        gcsrf = await page_csrf(p, "/admin/registry/work")
        work = await (await p.client.get("/admin/registry/work")).text()
        assert "楼道灯坏了" in work and "紧急求助" in work
        photo = await p.client.get(f"/admin/registry/work/{wid}/photo")
        assert photo.status == 200 and photo.headers["Content-Type"] == "image/png"
        shown = Image.open(io.BytesIO(await photo.read()))  # re-encoded (portal.estate.photos): the same pixels
        assert shown.convert("RGB").tobytes() == Image.open(io.BytesIO(_png())).convert("RGB").tobytes()
        for status_ in ("acknowledged", "dispatched", "resolved", "closed"):
            r = await form(p, f"/admin/registry/work/{wid}", {"status": status_, "note": f"n-{status_}"}, gcsrf)
            assert r.status == 303
        r = await form(p, f"/admin/registry/work/{wid}", {"status": "open"}, gcsrf)
        assert r.status == 409
        row = await p.services.store.read(
            lambda c: dict(c.execute("SELECT * FROM work_items WHERE id = ?", (wid,)).fetchone())
        )
        assert row["status"] == "closed" and [n["status"] for n in json.loads(row["notes"])] == [
            "acknowledged",
            "dispatched",
            "resolved",
            "closed",
        ]
        assert "楼道灯坏了" not in await (await p.client.get("/admin/registry/work")).text()


@pytest.mark.parametrize(("answer", "why"), [("opened", None), ("failed", "relay_not_moved"), ("unanswered", None)])
async def test_entrance_plate_opens_through_the_gateway_and_shows_its_answer(
    tmp_path: Path, broker: MosquittoProcess, answer: str, why: str | None
) -> None:
    """The phone shows what the gateway answered, with its reason; with no answer in time it says the door may not
    have opened, and the command has expired by then (as the console's): a gateway that gets it later, its link down
    and the broker holding it, does not open the door behind the resident."""
    extra = "phone: {unlock_wait_s: 3}\n"
    async with running_portal(write_config(tmp_path, broker, extra=extra)) as p, mqtt(broker) as gw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "cmd"), qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        r = await form(
            p,
            "/admin/registry/doors",
            {
                "gateway_ref": f"{SITE}/{GATEWAY}",
                "door": "b3u2-entry",
                "building": "3",
                "unit": "2",
                "label": "3幢2单元门",
            },
            csrf,
        )
        assert r.status == 303
        # A one-time code from the admin signs the owner in (and makes them set a password).
        owner = await resident_row(p, "13812345678", "301")
        r = await form(p, f"/admin/registry/residents/{owner['id']}/code", {}, csrf)
        otc = (await r.text()).split("一次性登录码：")[1][:11]
        await p.client.post("/logout", data={"csrf": csrf}, headers={"Origin": p.origin})
        code = await plate_code(p, "3", "2")
        page = await (await p.client.get(f"/p/{code}")).text()
        assert 'id="entrance-sign-in"' in page and "open-" not in page
        login = await (await p.client.get(f"/m/login?next=/p/{code}")).text()
        pcsrf = login.split('name="csrf" value="')[1].split('"')[0]
        r = await form(p, "/m/login", {"phone": "138 1234 5678", "password": otc, "next": f"/p/{code}"}, pcsrf)
        assert r.status == 303 and r.headers["Location"].startswith("/m/password")
        r = await form(
            p, "/m/password", {"new": "zhangwei-2026", "confirm": "zhangwei-2026", "next": f"/p/{code}"}, pcsrf
        )
        assert r.status == 303
        page = await (await p.client.get(f"/p/{code}")).text()
        door_id = page.split('name="door" value="')[1].split('"')[0]

        async def gateway() -> None:
            async with asyncio.timeout(10):
                async for m in gw.messages:
                    cmd = open_portal_command(p, m.payload)
                    if cmd.type != "unlock":
                        continue
                    assert cmd.args["door"] == "b3u2-entry" and cmd.by.startswith("resident:")
                    assert (cmd.expires - cmd.ts).total_seconds() == 3  # phone.unlock_wait_s, no longer
                    if answer == "unanswered":
                        return
                    ev = wire.Event(
                        id=event(1).id,
                        seq=1,
                        ts=datetime.now(UTC),
                        type="command.result",
                        device="gateway",
                        place=wire.Place(site=SITE),
                        data={
                            "command_id": cmd.id,
                            "ok": answer == "opened",
                            "detail": "x",
                            **({"reason": why} if why else {}),
                        },
                    )
                    await gw.publish(wire.topic(SITE, GATEWAY, "events"), batch_payload([ev]), qos=1)
                    return

        task = asyncio.create_task(gateway())
        r = await form(p, f"/p/{code}/open", {"door": door_id}, pcsrf)
        await task
        text = await r.text()
        assert r.status == 200 and f'data-result="{answer}"' in text
        assert (f'data-why="{why}"' in text) is bool(why) and ("门锁没有动作" in text) is (why == "relay_not_moved")
        audit = await p.services.store.read(
            lambda c: c.execute("SELECT detail FROM audit WHERE action = 'door.unlock'").fetchone()[0]
        )
        assert audit == (f"{answer}:{why}" if why else answer)

        # Someone of another unit gets no Open button and cannot open it by posting either.
        other = await plate_code(p, "3", "1")
        assert "open-" not in await (await p.client.get(f"/p/{other}")).text()
        r = await form(p, f"/p/{other}/open", {"door": door_id}, pcsrf)
        assert r.status == 403


async def test_admin_password_still_works_beside_resident_sessions(tmp_path: Path) -> None:
    """The staff session and a resident session live side by side in one browser without mixing."""
    async with running_portal(write_config(tmp_path, None)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        code = await plate_code(p, "3", "2", "301")
        page = await (await p.client.get(f"/p/{code}")).text()
        assert 'id="my-pass"' not in page  # a staff session is not a resident
        r = await p.client.get(f"/p/{code}/mypass.json")
        assert r.status == 401
        assert ADMIN_PW not in page


async def test_owner_confirms_a_registration_from_the_phone_and_a_known_number_changes_nothing(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        csrf = await admin_session(p)
        assert (await import_csv(p, csrf, estate_csv()))[0] == 200
        owner = await resident_row(p, "13812345678", "301")
        r = await form(p, f"/admin/registry/residents/{owner['id']}/code", {}, csrf)
        otc = (await r.text()).split("一次性登录码：")[1][:11]
        await p.client.post("/logout", data={"csrf": csrf}, headers={"Origin": p.origin})
        code = await plate_code(p, "3", "2", "301")
        page = await (await p.client.get(f"/p/{code}/register")).text()
        pc = page.split('name="csrf" value="')[1].split('"')[0]
        new = {
            "name": "刘洋",
            "phone": "13599990000",
            "role": "tenant",
            "lease_end": "2099-01-01",
            "password": "liuyang-2026-x",
            "confirm": "liuyang-2026-x",
        }
        assert (await form(p, f"/p/{code}/register", new, pc)).status == 200
        assert (await form(p, f"/p/{code}/register", new, pc)).status == 200  # again: the same answer, nothing new
        rows = await p.services.store.read(
            lambda c: c.execute(
                "SELECT count(*) FROM reg_residents r JOIN reg_people pe ON pe.id = r.person_id"
                " WHERE pe.phone = '13599990000'"
            ).fetchone()[0]
        )
        assert rows == 1
        # The number is known now: a request elsewhere is taken with any password, which is neither tested nor kept.
        stored = await p.services.store.read(
            lambda c: c.execute("SELECT password_hash FROM reg_people WHERE phone = '13599990000'").fetchone()[0]
        )
        other = await plate_code(p, "3", "1", "102")
        r = await form(
            p,
            f"/p/{other}/register",
            {**new, "role": "family", "password": "wrong-password-1", "confirm": "wrong-password-1"},
            pc,
        )
        assert r.status == 200
        assert (
            await p.services.store.read(
                lambda c: c.execute("SELECT password_hash FROM reg_people WHERE phone = '13599990000'").fetchone()[0]
            )
            == stored
        )
        # A pending registrant cannot sign in yet, and is told no more than a stranger.
        r = await form(p, "/m/login", {"phone": "13599990000", "password": "liuyang-2026-x"}, pc)
        assert r.status == 401 and "还没有经确认的在住房屋" in await r.text()

        # The owner signs in with the one-time code (once), sets a password, and confirms the tenant.
        r = await form(p, "/m/login", {"phone": "13812345678", "password": otc.lower(), "next": f"/p/{code}"}, pc)
        assert r.status == 303
        r = await form(p, "/m/password", {"new": "zhangwei-2026", "confirm": "zhangwei-2026"}, pc)
        assert r.status == 303
        page = await (await p.client.get(f"/p/{code}")).text()
        assert "刘洋" in page and "135****0000" in page and "13599990000" not in page
        tenant = await resident_row(p, "13599990000", "301")
        r = await form(p, f"/p/{code}/confirm", {"resident": str(tenant["id"]), "action": "approve"}, pc)
        assert r.status == 303
        assert (await resident_row(p, "13599990000", "301"))["status"] == "active"
        # Not the owner of the other flat: no say there.
        pending = await resident_row(p, "13599990000", "102")
        r = await form(p, f"/p/{other}/confirm", {"resident": str(pending["id"]), "action": "approve"}, pc)
        assert r.status == 403
        await p.client.post("/m/logout", data={"csrf": pc}, headers={"Origin": p.origin})
        r = await form(p, "/m/login", {"phone": "13812345678", "password": otc}, pc)
        assert r.status == 401  # the one-time code worked once
        # The tenant signs in with the password chosen in their own request, approved now.
        r = await form(p, "/m/login", {"phone": "13599990000", "password": "liuyang-2026-x"}, pc)
        assert r.status == 303
        audit = await p.services.store.read(
            lambda c: [
                tuple(r)
                for r in c.execute(
                    "SELECT actor, action FROM audit WHERE action IN ('resident.approve', 'view.household')"
                )
            ]
        )
        assert (f"resident:{owner['person_id']}", "resident.approve") in audit
        assert (f"resident:{owner['person_id']}", "view.household") in audit


def test_ended_subjects_leave_the_list_after_the_keep_period() -> None:
    assert reg.ended_on("active", "2026-03-01", "owner", None, None) == "2026-03-01"
    assert reg.ended_on("active", None, "tenant", "2026-02-28", None) == "2026-03-01"
    assert reg.ended_on("inactive", None, "family", None, "2026-01-05T10:00:00.000000Z") == "2026-01-05"
