"""Destructive actions ask first, as the person who clicked the first button that looked right would need: every one,
posted as its page's button posts it, answers with a page naming the consequence and changes nothing (its own
state and the audit trail alike); posted again from that page (``confirmed=yes``) it is done, with one audit row.
Without JavaScript: the confirmation is a page with a form.

Staff accounts, played from outside against the real portal process: a disabled account's sessions and open console
end at once and it cannot sign in (its password still checked first, so the refusal tells nothing to a guesser);
a reset password stops working at once and the one-time one forces a new one; a promotion to administrator drops the
account's site scope; nobody disables or demotes their own account; two administrators disabling each other at the
same moment leave one who can sign in; bad input is refused with a message and loses nothing.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from gateway.tooling.broker import MosquittoProcess
from tests.portal_support import Device, devices
from tests.screens_support import (
    ADMIN,
    ADMIN_PW,
    GUARD,
    GUARD_PW,
    INSTALLER,
    INSTALLER_PW,
    RESIDENT_PHONE,
    RESIDENT_PW,
    SITE,
    Seeded,
    plate_of,
    seeded_estate,
    store_connection,
)


def db_rows(s: Seeded, sql: str, *args: object) -> list[tuple[object, ...]]:
    c = store_connection(s.cfg)
    try:
        return [tuple(r) for r in c.execute(sql, args)]
    finally:
        c.close()


def audit_count(s: Seeded, action: str) -> int:
    return int(db_rows(s, "SELECT count(*) FROM audit WHERE action = ?", action)[0][0])  # type: ignore[call-overload]


@dataclass(frozen=True)
class Case:
    name: str
    who: str  # admin | installer | resident
    path: Callable[[Seeded], str]
    form: Callable[[Seeded], dict[str, str]]
    consequence: str  # what the confirmation page must say
    action: str  # the audit row it writes once done
    state: Callable[[Seeded], object]  # what it changes: equal before and after the question, different after


def plate(s: Seeded) -> object:
    return plate_of(s.cfg, "3", "2", "302")


def resident_state(s: Seeded, phone: str, house: str) -> object:
    return db_rows(
        s,
        "SELECT r.status, r.move_out FROM reg_residents r JOIN reg_people p ON p.id = r.person_id"
        " JOIN reg_houses h ON h.id = r.house_id WHERE p.phone = ? AND h.code = ? ORDER BY r.id DESC"
        " LIMIT 1",
        phone,
        house,
    )


def resident_id(s: Seeded, phone: str, house: str) -> int:
    return int(
        db_rows(
            s,
            "SELECT r.id FROM reg_residents r JOIN reg_people p ON p.id = r.person_id"  # type: ignore
            " JOIN reg_houses h ON h.id = r.house_id WHERE p.phone = ? AND h.code = ? ORDER BY r.id DESC"
            " LIMIT 1",
            phone,
            house,
        )[0][0]
    )


def user_state(s: Seeded, name: str) -> object:
    return db_rows(
        s, "SELECT role, disabled_at IS NOT NULL, password_hash, must_change FROM users WHERE name = ?", name
    )


def plan_state(s: Seeded) -> object:
    return db_rows(s, "SELECT kind, name FROM plan_marks ORDER BY kind, name") + db_rows(
        s, "SELECT site FROM site_plans"
    )


def unit_id(s: Seeded) -> int:
    return int(
        db_rows(
            s,
            "SELECT u.id FROM reg_units u JOIN reg_buildings b ON b.id = u.building_id"  # type: ignore
            " WHERE b.code = '3' AND u.code = '1'",
        )[0][0]
    )


CASES = [  # (the plan's first: the account cases end the installer's sessions)
    Case(
        "remove a mark from the plan",
        "installer",
        lambda s: f"/admin/sitemap/{SITE}/marks/delete",
        lambda s: {"kind": "door", "name": "north-gate"},
        "门 north-gate 将从平面图上删除",
        "plan.unmark",
        plan_state,
    ),
    Case(
        "delete the plan",
        "installer",
        lambda s: f"/admin/sitemap/{SITE}/delete",
        lambda s: {},
        "小区 s1 在网页上设置的平面图（图片和全部标注）将被删除",
        "plan.delete",
        plan_state,
    ),
    Case(
        "close a report that is not resolved",
        "admin",
        lambda s: f"/admin/registry/work/{s.work_id}",
        lambda s: {"status": "closed", "note": "住户说不用了"},
        "关闭后这条报事不能再处理，住户手机上会显示“已办结”",
        "work.update",
        lambda s: db_rows(s, "SELECT status FROM work_items WHERE id = ?", s.work_id),
    ),
    Case(
        "reissue a house plate",
        "admin",
        lambda s: "/admin/registry/plates/reissue",
        lambda s: {
            "kind": "house",
            "id": str(
                db_rows(s, "SELECT h.id FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id WHERE h.code = '302'")[
                    0
                ][0]
            ),
        },
        "阳光花园3幢2单元302室 门上现有的门牌二维码会立即失效",
        "plate.reissue",
        plate,
    ),
    Case(
        "reissue an entrance plate",
        "admin",
        lambda s: "/admin/registry/plates/reissue",
        lambda s: {"kind": "entrance", "id": str(unit_id(s))},
        "阳光花园3幢1单元 单元门上现有的门牌二维码会立即失效",
        "plate.reissue",
        lambda s: plate_of(s.cfg, "3", "1"),
    ),
    Case(
        "move a resident out",
        "admin",
        lambda s: f"/admin/registry/residents/{resident_id(s, '13700001111', '302')}/moveout",
        lambda s: {},
        "王芳 从 阳光花园3幢2单元302室 迁出：今天起其通行码和其发出的访客通行证全部失效",
        "resident.moveout",
        lambda s: resident_state(s, "13700001111", "302"),
    ),
    Case(
        "deactivate a resident",
        "admin",
        lambda s: f"/admin/registry/residents/{resident_id(s, '13987654321', '301')}/deactivate",
        lambda s: {},
        "停用 李娜 在 阳光花园3幢2单元301室 的住户身份",
        "resident.deactivate",
        lambda s: resident_state(s, "13987654321", "301"),
    ),
    Case(
        "reject a registration",
        "admin",
        lambda s: f"/admin/registry/residents/{s.pending_id}/reject",
        lambda s: {"back": "pending"},
        "拒绝 陈静 对 阳光花园3幢2单元301室 的住户登记申请",
        "resident.reject",
        lambda s: resident_state(s, "13900001234", "301"),
    ),
    Case(
        "disable an account",
        "admin",
        lambda s: f"/users/{GUARD}/disable",
        lambda s: {},
        f"{GUARD} 将立即退出所有登录（包括值班台），并且不能再登录",
        "user.disable",
        lambda s: user_state(s, GUARD),
    ),
    Case(
        "reset a password",
        "admin",
        lambda s: f"/users/{INSTALLER}/password",
        lambda s: {},
        f"{INSTALLER} 的现有密码立即失效，所有登录都会退出",
        "user.password_reset",
        lambda s: user_state(s, INSTALLER),
    ),
    Case(
        "change a role",
        "admin",
        lambda s: f"/users/{INSTALLER}/role",
        lambda s: {"role": "admin"},
        f"{INSTALLER} 将由安装人员改为管理员",
        "user.role",
        lambda s: user_state(s, INSTALLER),
    ),
    Case(
        "retire a guard station",
        "admin",
        lambda s: f"/stations/{s.extra['station']}/revoke",
        lambda s: {},
        "岗亭“岗亭一号”的浏览器将不能再作为值班岗亭使用",
        "station.revoke",
        lambda s: db_rows(s, "SELECT revoked_at IS NULL FROM stations"),
    ),
]


async def test_every_destructive_action_asks_first_then_does_it_with_an_audit_row(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    async with seeded_estate(tmp_path, broker) as s, devices(s.url) as new:
        people: dict[str, Device] = {"admin": new(), "installer": new()}
        assert (await people["admin"].sign_in(ADMIN, ADMIN_PW)).status == 303
        assert (await people["installer"].sign_in(INSTALLER, INSTALLER_PW)).status == 303
        r = await people["admin"].post("/stations", {"name": "岗亭一号"})
        assert r.status == 303
        s.extra["station"] = db_rows(s, "SELECT id FROM stations")[0][0]
        for case in CASES:
            d = people[case.who]
            before, audits = case.state(s), audit_count(s, case.action)
            r = await d.post(case.path(s), case.form(s))
            page = await r.text()
            assert r.status == 200, (case.name, r.status)
            assert case.consequence in re.sub(r"<[^>]+>", "", page), (case.name, page[-1500:])
            assert 'name="confirmed" value="yes"' in page and 'id="confirm-cancel"' in page, case.name
            assert case.state(s) == before and audit_count(s, case.action) == audits, f"{case.name}: done unasked"
            # The confirmation page's own form: the same fields again, and confirmed=yes.
            fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page))
            assert fields.pop("confirmed") == "yes" and {k: v for k, v in fields.items() if k != "csrf"} == case.form(
                s
            ), case.name
            r = await d.post(case.path(s), {**case.form(s), "confirmed": "yes"})
            assert r.status in (200, 303), (case.name, r.status, (await r.text())[-500:])
            assert case.state(s) != before, f"{case.name}: not done after the confirmation"
            assert audit_count(s, case.action) == audits + 1, case.name
        # The one-time password of the reset works, and only to set a new one; the old one is gone.
        fresh = new()
        assert (await fresh.sign_in(INSTALLER, INSTALLER_PW)).status == 401


async def test_an_owner_rejecting_a_request_on_the_phone_is_asked_first(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    async with seeded_estate(tmp_path, broker) as s, devices(s.url) as new:
        ph = new()
        assert (await ph.resident_sign_in(RESIDENT_PHONE, RESIDENT_PW)).status == 303
        form = {"resident": str(s.pending_id), "action": "reject"}
        r = await ph.post(f"/p/{s.house_code}/confirm", form)
        page = await r.text()
        assert r.status == 200 and "拒绝 陈静 作为本户家庭成员的登记申请。" in page
        assert resident_state(s, "13900001234", "301") == [("pending", None)]
        r = await ph.post(f"/p/{s.house_code}/confirm", {**form, "confirmed": "yes"})
        assert r.status == 303
        assert resident_state(s, "13900001234", "301") == [("rejected", None)]
        # Another house's pending request by id, through this owner's plate: as if there were none.
        other = await ph.post(f"/p/{s.house_code}/confirm", {"resident": "999999", "action": "reject"})
        assert other.status == 404


# ---------------------------------------------------------------- staff accounts


async def _ws(d: Device) -> aiohttp.ClientWebSocketResponse:
    return await d.http.ws_connect("/ws", headers={"Origin": d.origin})


async def _closed(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> int | None:
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return ws.close_code


async def test_disabling_ends_the_sessions_and_the_console_and_keeps_the_account_out(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    async with seeded_estate(tmp_path, broker) as s, devices(s.url) as new:
        admin, guard = new(), new()
        assert (await admin.sign_in(ADMIN, ADMIN_PW)).status == 303
        assert (await guard.sign_in(GUARD, GUARD_PW)).status == 303
        ws = await _ws(guard)
        token = await guard.csrf("/console")  # the page the guard has open, with its session's token
        r = await admin.post(f"/users/{GUARD}/disable", {"confirmed": "yes"})
        assert r.status == 303 and r.headers["Location"] == f"/users/{GUARD}?notice=disabled"
        assert await _closed(ws) == 4401  # the console asks to sign in again
        await ws.close()
        assert not await guard.signed_in()
        # What the open page sends next is told to sign in again (not refused as a forged request), and does nothing.
        r = await guard.post(f"/users/{ADMIN}/disable", {"confirmed": "yes"}, csrf=token)
        assert (r.status, r.headers.get("Location", "").split("?")[0]) == (303, "/login")
        r = await guard.http.post(
            "/api/board/ack", json={"kind": "intrusion"}, headers={**guard.headers(), "X-CSRF-Token": token}
        )
        assert r.status == 401
        assert db_rows(
            s, "SELECT count(*) FROM sessions s JOIN users u ON u.id = s.user_id WHERE u.name = ?", GUARD
        ) == [(0,)]
        # The right password gets a clear refusal (audited); a wrong one the usual failure.
        r = await guard.sign_in(GUARD, GUARD_PW)
        assert r.status == 401 and "该账号已停用" in await r.text()
        r = await guard.sign_in(GUARD, "wrong-password-000")
        assert r.status == 401 and "该账号已停用" not in await r.text()
        assert audit_count(s, "signin.disabled") == 1
        r = await admin.post(f"/users/{GUARD}/enable", {})
        assert r.status == 303
        assert (await guard.sign_in(GUARD, GUARD_PW)).status == 303


async def test_reset_role_sites_and_the_rules_an_administrator_cannot_break(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    async with seeded_estate(tmp_path, broker) as s, devices(s.url) as new:
        admin, fitter, guard = new(), new(), new()
        assert (await admin.sign_in(ADMIN, ADMIN_PW)).status == 303
        assert (await fitter.sign_in(INSTALLER, INSTALLER_PW)).status == 303
        # Reset: every session ends; the old password fails; the one-time one signs in to a forced change.
        r = await admin.post(f"/users/{INSTALLER}/password", {"confirmed": "yes"})
        assert r.status == 303
        page = await (await admin.get(f"/users/{INSTALLER}?notice=reset")).text()
        m = re.search(r'id="one-time-password">([0-9a-f-]+)<', page)
        assert m, "no one-time password"
        again = await (await admin.get(f"/users/{INSTALLER}")).text()
        assert m.group(1) not in again  # shown once
        assert not await fitter.signed_in()
        assert (await fitter.sign_in(INSTALLER, INSTALLER_PW)).status == 401
        r = await fitter.sign_in(INSTALLER, m.group(1))
        assert r.status == 303 and r.headers["Location"] == "/password"
        assert (await fitter.get("/doors")).headers.get("Location") == "/password"  # nothing else until then

        # Sites, then a promotion: an administrator sees every site, so the scope goes.
        sites_rows, role_rows = audit_count(s, "user.sites"), audit_count(s, "user.role")
        assert (await admin.post(f"/users/{GUARD}/sites", {"sites": SITE})).status == 303
        assert db_rows(s, "SELECT sites FROM users WHERE name = ?", GUARD) == [(f'["{SITE}"]',)]
        assert (await admin.post(f"/users/{GUARD}/role", {"role": "admin", "confirmed": "yes"})).status == 303
        assert db_rows(s, "SELECT role, sites FROM users WHERE name = ?", GUARD) == [("admin", None)]
        assert (audit_count(s, "user.sites"), audit_count(s, "user.role")) == (sites_rows + 1, role_rows + 1)

        # Bad input: a clear message, nothing changed.
        r = await admin.post(f"/users/{GUARD}/role", {"role": "root", "confirmed": "yes"})
        assert r.status == 400 and "角色只能是管理员、保安或安装人员" in await r.text()
        r = await admin.post(f"/users/{GUARD}/sites", {"sites": "mars"})
        assert r.status == 400
        r = await admin.post("/users/nobody/disable", {"confirmed": "yes"})
        assert r.status == 404

        # One's own account: neither disabled nor demoted (another administrator does that).
        for path, form in (
            (f"/users/{ADMIN}/disable", {}),
            (f"/users/{ADMIN}/role", {"role": "guard"}),
            (f"/users/{ADMIN}/password", {}),
        ):
            r = await admin.post(path, {**form, "confirmed": "yes"})
            assert r.status == 409 and "不能对自己的账号这样操作" in await r.text(), path
        assert db_rows(s, "SELECT role, disabled_at FROM users WHERE name = ?", ADMIN) == [("admin", None)]

        # Two administrators (office, and guard1 now) disable each other at once: one of them can still sign in.
        assert (await guard.sign_in(GUARD, GUARD_PW)).status == 303
        a, b = await asyncio.gather(
            admin.post(f"/users/{GUARD}/disable", {"confirmed": "yes"}),
            guard.post(f"/users/{ADMIN}/disable", {"confirmed": "yes"}),
        )
        left = db_rows(s, "SELECT name FROM users WHERE role = 'admin' AND disabled_at IS NULL")
        assert len(left) == 1, (a.status, b.status, left)
        outcomes = sorted((x.status, x.headers.get("Location", "").split("?")[0]) for x in (a, b))
        assert outcomes in (
            [(303, f"/users/{GUARD}"), (409, "")],
            [(303, f"/users/{ADMIN}"), (409, "")],
            [(303, "/login"), (303, f"/users/{GUARD}")],
            [(303, "/login"), (303, f"/users/{ADMIN}")],
        ), outcomes  # 409: the last administrator who can sign in; /login: the other's session had just ended
