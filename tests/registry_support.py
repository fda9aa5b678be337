"""Helpers for the registry, plate and phone-page tests: an estate CSV, admin sign-in, plate codes."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import ClientResponse

from portal.estate import ESTATE, Estate
from tests.portal_support import Portal, add_user, page_csrf, sign_in

ADMIN = "office"
ADMIN_PW = "office-password-0001"
GUARD = "guard1"
GUARD_PW = "guard-password-0001"
INSTALLER = "fitter1"
INSTALLER_PW = "fitter-password-0001"

HEADER = "site,site_name,building,unit,house,name,phone,role,move_in,move_out,lease_end\n"
PEOPLE = [
    # building, unit, house, name, phone, role, move_in, lease_end
    ("3", "2", "301", "张伟", "13812345678", "owner", "2020-05-01", ""),
    ("3", "2", "301", "李娜", "13987654321", "family", "2020-05-01", ""),
    ("3", "2", "302", "王芳", "13700001111", "tenant", "2025-01-01", "2030-12-31"),
    ("3", "1", "101", "Zhao Lei", "+8613600002222", "owner", "2019-01-01", ""),
]
VACANT = [("3", "1", "102"), ("5", "1", "1201")]


def estate_csv(extra: str = "") -> str:
    lines = [HEADER]
    for b, u, h, name, phone, role, move_in, lease in PEOPLE:
        lines.append(f"s1,阳光花园,{b},{u},{h},{name},{phone},{role},{move_in},,{lease}\n")
    for b, u, h in VACANT:
        lines.append(f"s1,阳光花园,{b},{u},{h},,,,,,\n")
    return "".join(lines) + extra


def estate(p: Portal) -> Estate:
    return p.client.server.app[ESTATE]


async def admin_session(p: Portal, user: str = ADMIN, password: str = ADMIN_PW, role: str = "admin") -> str:
    """Sign ``p.client`` in as a staff user (created here); returns the session's CSRF token."""
    await add_user(p, user, role, password)
    r = await sign_in(p, user, password)
    assert r.status == 303, r.status
    return await page_csrf(p, "/admin/registry" if role != "installer" else "/console")


async def import_csv(p: Portal, csrf: str, text: str, *, dry_run: bool = False) -> tuple[int, dict[str, Any]]:
    r = await p.client.post("/api/registry/import" + ("?dry_run=1" if dry_run else ""), data=text.encode(),
                            headers={"Origin": p.origin, "X-CSRF-Token": csrf, "Content-Type": "text/csv"})
    return r.status, await r.json()


async def plate_code(p: Portal, building: str, unit: str, house: str | None = None) -> str:
    def q(c: Any) -> str:
        if house is None:
            row = c.execute("SELECT p.code FROM plates p JOIN reg_units u ON u.id = p.unit_id JOIN reg_buildings b"
                            " ON b.id = u.building_id WHERE b.code = ? AND u.code = ? AND p.withdrawn_at IS NULL",
                            (building, unit)).fetchone()
        else:
            row = c.execute("SELECT p.code FROM plates p JOIN reg_houses h ON h.id = p.house_id JOIN reg_units u"
                            " ON u.id = h.unit_id JOIN reg_buildings b ON b.id = u.building_id WHERE b.code = ?"
                            " AND u.code = ? AND h.code = ? AND p.withdrawn_at IS NULL",
                            (building, unit, house)).fetchone()
        assert row is not None, (building, unit, house)
        return str(row[0])

    return await p.services.store.read(q)


async def house_id(p: Portal, building: str, unit: str, house: str) -> int:
    return int(await p.services.store.read(lambda c: c.execute(
        "SELECT h.id FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b"
        " ON b.id = u.building_id WHERE b.code = ? AND u.code = ? AND h.code = ?",
        (building, unit, house)).fetchone()[0]))


async def resident_row(p: Portal, phone: str, house: str) -> dict[str, Any]:
    row = await p.services.store.read(lambda c: c.execute(
        "SELECT r.* FROM reg_residents r JOIN reg_people pe ON pe.id = r.person_id JOIN reg_houses h"
        " ON h.id = r.house_id WHERE pe.phone = ? AND h.code = ?", (phone, house)).fetchone())
    assert row is not None
    return dict(row)


CSRF_FIELD_RE = re.compile(r'(name="csrf" value=|name="csrf-token" content=)"[^"]*"')


def without_tokens(html: str) -> str:
    """A page with its per-browser CSRF tokens blanked, to compare two answers."""
    return CSRF_FIELD_RE.sub(r'\1""', html)


async def form(p: Portal, path: str, data: dict[str, str], csrf: str, **headers: str) -> ClientResponse:
    return await p.client.post(path, data={**data, "csrf": csrf}, headers={"Origin": p.origin, **headers},
                               allow_redirects=False)
