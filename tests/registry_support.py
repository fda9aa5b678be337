"""Helpers for the registry, plate and phone-page tests: an estate CSV, admin sign-in, plate codes."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse

from portal.config import load
from portal.estate import registry as reg
from portal.estate.service import ESTATE, Estate
from portal.store import connect, storekey
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
    r = await p.client.post(
        "/api/registry/import" + ("?dry_run=1" if dry_run else ""),
        data=text.encode(),
        headers={"Origin": p.origin, "X-CSRF-Token": csrf, "Content-Type": "text/csv"},
    )
    return r.status, await r.json()


RESIDENT_ROW = (
    "SELECT r.* FROM reg_residents r JOIN reg_people pe ON pe.id = r.person_id JOIN reg_houses h"
    " ON h.id = r.house_id WHERE pe.phone = ? AND h.code = ? ORDER BY r.id DESC"
)


def plate_code_of(c: sqlite3.Connection, building: str, unit: str, house: str | None = None) -> str:
    """The code on a plate as printed, from a store connection that carries the store key (the store keeps it
    sealed with it)."""
    if house is None:
        row = c.execute(
            "SELECT u.id FROM reg_units u JOIN reg_buildings b ON b.id = u.building_id WHERE b.code = ? AND u.code = ?",
            (building, unit),
        ).fetchone()
    else:
        row = c.execute(
            "SELECT h.id FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b"
            " ON b.id = u.building_id WHERE b.code = ? AND u.code = ? AND h.code = ?",
            (building, unit, house),
        ).fetchone()
    assert row is not None, (building, unit, house)
    code = reg.plate_code(c, "entrance" if house is None else "house", int(row[0]))
    assert code is not None, (building, unit, house)
    return code


async def plate_code(p: Portal, building: str, unit: str, house: str | None = None) -> str:
    """The code on a plate, through the portal's reader (which carries the store key)."""
    return await p.services.store.read(lambda c: plate_code_of(c, building, unit, house))


def stored_plate_code(db: Path, building: str, unit: str, house: str | None = None) -> str:
    """The code on a plate of a portal process's store ``db``, opened with the store key beside it
    (``data_dir/store.key``, where the portal keeps it unless the config says otherwise)."""
    c = connect(db, readonly=True, key=storekey.load(db.parent / storekey.KEY_FILE))
    try:
        return plate_code_of(c, building, unit, house)
    finally:
        c.close()


def plate_codes(cfg: Path) -> dict[tuple[str, str, str | None], str]:
    """Every plate in use of the portal with config ``cfg``, as printed: {(building, unit, house or None): code}.
    Opens the store with its key file, as the portal's own printing does."""
    c = cfg_connection(cfg)
    try:
        out: dict[tuple[str, str, str | None], str] = {}
        for kind, hid, uid, b, u, h in c.execute(
            "SELECT p.kind, p.house_id, p.unit_id, b.code, u.code, h.code FROM plates p"
            " LEFT JOIN reg_houses h ON h.id = p.house_id JOIN reg_units u ON u.id = coalesce(p.unit_id, h.unit_id)"
            " JOIN reg_buildings b ON b.id = u.building_id WHERE p.withdrawn_at IS NULL"
        ):
            code = reg.plate_code(c, kind, hid if kind == "house" else uid)
            assert code is not None
            out[(b, u, h if kind == "house" else None)] = code
        return out
    finally:
        c.close()


def cfg_connection(cfg: Path) -> sqlite3.Connection:
    """A read connection to the store of the portal with config ``cfg``, carrying its store key."""
    conf = load(cfg)
    return connect(conf.db_path, readonly=True, key=storekey.load(conf.key_path))


async def house_id(p: Portal, building: str, unit: str, house: str) -> int:
    return int(
        await p.services.store.read(
            lambda c: c.execute(
                "SELECT h.id FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b"
                " ON b.id = u.building_id WHERE b.code = ? AND u.code = ? AND h.code = ?",
                (building, unit, house),
            ).fetchone()[0]
        )
    )


async def resident_row(p: Portal, phone: str, house: str) -> dict[str, Any]:
    """The latest residency (stay or request) of a phone in a house (by house code: they differ in estate_csv)."""
    row = await p.services.store.read(lambda c: c.execute(RESIDENT_ROW, (phone, house)).fetchone())
    assert row is not None
    return dict(row)


CSRF_FIELD_RE = re.compile(r'(name="csrf" value=|name="csrf-token" content=)"[^"]*"')


def without_tokens(html: str) -> str:
    """A page with its per-browser CSRF tokens blanked, to compare two answers."""
    return CSRF_FIELD_RE.sub(r'\1""', html)


async def form(p: Portal, path: str, data: dict[str, str], csrf: str, **headers: str) -> ClientResponse:
    return await p.client.post(
        path, data={**data, "csrf": csrf}, headers={"Origin": p.origin, **headers}, allow_redirects=False
    )
