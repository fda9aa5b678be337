"""The demo's people at the portal, over HTTP as their browsers and phones would: the office registers the doors
and hands the owner a one-time code, the owner sets a password on the phone and issues visitor passes, the guard
arms the perimeter and scans checkpoints, the office puts the elder's flat under care and sets up the patrol route,
the elder answers "我很好". The portal's own store is read (read-only, plain columns only) for what no page shows a
script: residents' pass subjects; a visitor pass's text (sealed in the store) comes from the portal's
``visitor-pass`` command, as the visitor's phone would show it as a QR code."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.demo.estate import (
    CARE_CONTACT,
    CARE_HOURS,
    CHECKPOINTS,
    DOORS,
    ELDER,
    GATEWAY,
    OWNER,
    PATROL_ROUTE,
    SITE,
    SITE_NAME,
    Person,
)
from gateway.demo.proc import Proc


class DemoError(RuntimeError):
    """A step of setting up the demo's estate did not work; the message says which."""


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    if m is None:
        raise DemoError("the portal's page has no CSRF token")
    return m.group(1)


class Browser:
    """One person's browser: its own cookies, the portal's origin on every state-changing request."""

    def __init__(self, url: str) -> None:
        self.origin = url.rstrip("/")
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # cookies of an IP address
            timeout=aiohttp.ClientTimeout(total=30),
        )
        self.csrf = ""

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def get(self, path: str) -> tuple[int, str, str]:
        async with self.http.get(self.origin + path) as r:
            return r.status, str(r.url), await r.text()

    async def form(self, path: str, data: Mapping[str, str], page: str | None = None) -> tuple[int, str, str]:
        """POST a form as the page ``page`` (default: the form's own path) would, with that page's CSRF token."""
        _, _, html = await self.get(page or path)
        async with self.http.post(
            self.origin + path, data={**data, "csrf": csrf_of(html)}, headers={"Origin": self.origin}
        ) as r:
            return r.status, str(r.url), await r.text()

    async def staff_sign_in(self, user: str, password: str) -> None:
        status, url, html = await self.form("/login", {"user": user, "password": password})
        if status != 200 or not url.endswith("/console"):
            raise DemoError(f"the demo could not sign in as {user} ({status})")
        self.csrf = csrf_of(html)

    async def api(self, path: str, body: Any) -> tuple[int, Any]:
        async with self.http.post(
            self.origin + path, json=body, headers={"Origin": self.origin, "X-CSRF-Token": self.csrf}
        ) as r:
            return r.status, await r.json(content_type=None)

    async def phone_sign_in(self, phone: str, secret: str) -> str:
        """Sign in on the phone pages; the page it lands on (/m/password after a one-time code)."""
        status, url, _ = await self.form("/m/login", {"phone": phone, "password": secret, "next": "/m"})
        if status != 200 or "/m/login" in url:
            raise DemoError(f"the demo could not sign in as the resident {phone} ({status})")
        return url


@dataclass(frozen=True)
class Resident:
    id: int
    subject: str
    name: str
    phone: str
    role: str
    building: str
    unit: str
    house: str

    @property
    def unit_ref(self) -> str:
        return f"{self.building}/{self.unit}"

    @property
    def house_ref(self) -> str:
        return f"{self.building}-{self.unit}-{self.house}"


def _ro(db: Path) -> sqlite3.Connection:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    c.row_factory = sqlite3.Row
    return c


def residents(db: Path) -> list[Resident]:
    """Every active resident of the demo's site, with their pass subject."""
    c = _ro(db)
    try:
        rows = c.execute(
            "SELECT r.id, r.subject, p.name, p.phone, r.role, b.code AS building, u.code AS unit, h.code AS house"
            " FROM reg_residents r JOIN reg_people p ON p.id = r.person_id JOIN reg_houses h ON h.id = r.house_id"
            " JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b ON b.id = u.building_id"
            " JOIN reg_sites s ON s.id = b.site_id WHERE s.code = ? AND r.status = 'active' ORDER BY r.id",
            (SITE,),
        ).fetchall()
    finally:
        c.close()
    return [Resident(**dict(r)) for r in rows]


async def latest_visitor_pass(python: str, portal_cfg: Path, log_file: Path, resident_id: int) -> str | None:
    """The resident's latest visitor pass, as the visitor's phone would show it as a QR: the store keeps it sealed,
    so the portal's own command prints it (``python -m portal visitor-pass``). None when there is none yet."""
    cmd = [python, "-m", "portal", "visitor-pass", "--config", str(portal_cfg), "--resident", str(resident_id)]
    try:
        out = await Proc("visitor-pass", cmd, log_file).output()
    except RuntimeError:  # none issued yet (the reason is in the log)
        return None
    return out.strip() or None


async def register_doors(office: Browser) -> None:
    """The office registers the gateway's doors with their places (a second run finds them registered)."""
    for d in DOORS:
        data = {"site": SITE, "gateway": GATEWAY, "door": d.name, "label": d.label}
        data |= {"gate": "1"} if d.gate else {"building": d.building or "", "unit": d.unit or ""}
        status, _, html = await office.form("/admin/registry/doors", data, page="/admin/registry")
        if status != 200 and "exists" not in html:
            raise DemoError(f"the office could not register the door {d.name} ({status})")


async def owner_account(url: str, office: Browser, db: Path, password: str, who: Person = OWNER) -> None:
    """A resident's phone account (the owner's by default): signs in with the password when it works (a second
    run), else the office hands out a one-time code and the resident sets the password with it, as a resident who
    imported without one does."""
    async with Browser(url) as phone:
        try:
            await phone.phone_sign_in(who.phone, password)
            return
        except DemoError:
            pass
        me = next((r for r in residents(db) if r.phone == who.phone), None)
        if me is None:
            raise DemoError(f"{who.name} is not in the estate")
        status, _, html = await office.form(f"/admin/registry/residents/{me.id}/code", {}, page="/admin/registry")
        m = re.search(r'id="otc">[^<]*?[：:] ?([A-Z2-9]{5}-?[A-Z2-9]{5})', html)
        if status != 200 or m is None:
            raise DemoError(f"the office could not make a one-time code ({status})")
        landed = await phone.phone_sign_in(who.phone, m.group(1))
        status, url2, _ = await phone.form(
            "/m/password", {"new": password, "confirm": password, "next": "/m"}, page=landed.removeprefix(phone.origin)
        )
        if status != 200 or "/m/password" in url2:
            raise DemoError(f"{who.name} could not set a password ({status})")


async def house_plate(phone: Browser) -> str:
    """The owner's house plate address, from the phone's "my homes" page."""
    _, _, html = await phone.get("/m")
    m = re.search(r'href="(/p/[A-Za-z0-9_-]+)"', html)
    if m is None:
        raise DemoError("the owner's phone shows no house")
    return phone.origin + m.group(1)


def plate_urls(rows: str) -> tuple[str, list[str]]:
    """The owner's entrance plate and the checkpoints' plates (in the route's order), from the CSV rows of the
    portal's ``plates --urls``, as a sign maker gets them to print."""
    table = list(csv.DictReader(io.StringIO(rows)))
    entrance = next(
        (
            r["url"]
            for r in table
            if r["kind"] == "entrance" and r["place"] == f"{SITE_NAME}{OWNER.building}幢{OWNER.unit}单元"
        ),
        None,
    )
    if entrance is None:
        raise DemoError("the plates list has no entrance plate for the owner's unit")
    by_name = {r["place"].removeprefix(f"{SITE_NAME} "): r["url"] for r in table if r["kind"] == "checkpoint"}
    missing = [name for name, _, _ in CHECKPOINTS if name not in by_name]
    if missing:
        raise DemoError(f"the plates list has no checkpoint {', '.join(missing)}")
    return entrance, [by_name[name] for name, _, _ in CHECKPOINTS]


async def issue_visitor_pass(phone: Browser, plate_path: str, hours: int = 2, uses: int = 2) -> bool:
    status, url, _ = await phone.form(
        plate_path + "/visitor", {"hours": str(hours), "uses": str(uses)}, page=plate_path
    )
    return status == 200 and "/m/v/" in url


async def wait_online(office: Browser, within_s: float = 60) -> None:
    """Until the gateway says "online" (its command subscription exists from then on)."""
    async with asyncio.timeout(within_s):
        while True:
            async with office.http.get(office.origin + "/api/health") as r:
                health = await r.json()
            if any(
                g.get("gateway") == GATEWAY and g.get("status") in ("online", "fault")
                for g in health.get("gateways", [])
            ):
                return
            await asyncio.sleep(0.2)


async def arm_perimeter(guard: Browser) -> None:
    """Arm the perimeter as the guard on the night shift would: the portal signs the command (the broker alone
    commands nothing), so the intruder raises alarms."""
    status, body = await guard.api(
        "/api/board/arm", {"site": SITE, "gateway": GATEWAY, "group": "perimeter", "action": "arm"}
    )
    if status != 202:
        raise DemoError(f"the demo could not arm the perimeter: {status} {body}")


# ---------------------------------------------------------------- care and patrol


def _scalar(db: Path, sql: str, args: tuple[Any, ...]) -> Any:
    c = _ro(db)
    try:
        row = c.execute(sql, args).fetchone()
    finally:
        c.close()
    return None if row is None else row[0]


async def enrol_care(office: Browser, db: Path) -> None:
    """The office puts the elder's flat under care, with her written consent and her son as the contact (a second
    run finds it under care)."""
    house = f"{ELDER.building}-{ELDER.unit}-{ELDER.house}"
    if await asyncio.to_thread(
        _scalar,
        db,
        "SELECT c.id FROM care_households c JOIN reg_houses h ON h.id = c.house_id"
        " JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b ON b.id = u.building_id"
        " WHERE c.site = ? AND c.status = 'active' AND b.code = ? AND u.code = ? AND h.code = ?",
        (SITE, ELDER.building, ELDER.unit, ELDER.house),
    ):
        return
    person = await asyncio.to_thread(_scalar, db, "SELECT id FROM reg_people WHERE phone = ?", (ELDER.phone,))
    if person is None:
        raise DemoError(f"{ELDER.name} is not in the estate")
    name, relation, phone = CARE_CONTACT
    status, url, html = await office.form(
        "/care",
        {
            "site": SITE,
            "house": house,
            "person": str(person),
            "contact_name": name,
            "contact_relation": relation,
            "contact_phone": phone,
            "hours": str(CARE_HOURS),
            "night_watch": "1",
            "night_from": "00:00",
            "night_to": "05:00",
            "consent_by": ELDER.name,
            "consent_how": "written",
            "consent_date": time.strftime("%Y-%m-%d"),
            "consent_note": "关爱服务同意书 demo-001",
        },
        page="/care/new",
    )
    if status != 200 or "/care/" not in url:
        raise DemoError(f"the office could not put {house} under care ({status}): {_error_of(html)}")


def _error_of(html: str) -> str:
    m = re.search(r'class="[^"]*error[^"]*"[^>]*>([^<]{0,200})', html)
    return m.group(1).strip() if m else ""


async def setup_patrol(office: Browser, db: Path) -> None:
    """The office adds the checkpoints, places them on the site map and makes the route (a second run finds them)."""
    for name, x, y in CHECKPOINTS:
        cid = await asyncio.to_thread(
            _scalar,
            db,
            "SELECT id FROM patrol_checkpoints WHERE site = ? AND name = ? AND withdrawn_at IS NULL",
            (SITE, name),
        )
        if cid is None:
            status, _, html = await office.form(
                "/patrol/checkpoints", {"site": SITE, "name": name}, page=f"/patrol?site={SITE}"
            )
            cid = await asyncio.to_thread(
                _scalar,
                db,
                "SELECT id FROM patrol_checkpoints WHERE site = ? AND name = ? AND withdrawn_at IS NULL",
                (SITE, name),
            )
            if cid is None:
                raise DemoError(f"the office could not add the checkpoint {name} ({status}): {_error_of(html)}")
            status, _, html = await office.form(
                f"/patrol/checkpoints/{cid}", {"action": "place", "x": str(x), "y": str(y)}, page=f"/patrol?site={SITE}"
            )
            if status != 200:
                raise DemoError(f"the office could not place the checkpoint {name} ({status}): {_error_of(html)}")
    if await asyncio.to_thread(
        _scalar, db, "SELECT id FROM patrol_routes WHERE site = ? AND name = ?", (SITE, PATROL_ROUTE["name"])
    ):
        return
    ids = []
    for name, _, _ in CHECKPOINTS:
        ids.append(
            await asyncio.to_thread(
                _scalar,
                db,
                "SELECT id FROM patrol_checkpoints WHERE site = ? AND name = ? AND withdrawn_at IS NULL",
                (SITE, name),
            )
        )
    form = {**PATROL_ROUTE, "site": SITE, "ordered": "", "guard": "", "active": "1"}
    form |= {f"at-{cid}": str(i) for i, cid in enumerate(ids, start=1)}
    status, _, html = await office.form("/patrol/routes", form, page=f"/patrol?site={SITE}")
    if status != 200 or not await asyncio.to_thread(
        _scalar, db, "SELECT id FROM patrol_routes WHERE site = ? AND name = ?", (SITE, PATROL_ROUTE["name"])
    ):
        raise DemoError(f"the office could not make the patrol route ({status}): {_error_of(html)}")


async def guard_scan(guard: Browser, url: str) -> bool:
    """The guard's phone opens a checkpoint's plate and confirms the scan (一次性令牌 with the page)."""
    path = url.removeprefix(guard.origin)
    _, _, html = await guard.get(path)
    m = re.search(r'name="nonce" value="([^"]+)"', html)
    if m is None:
        return False
    async with guard.http.post(
        guard.origin + path, data={"nonce": m.group(1), "csrf": csrf_of(html)}, headers={"Origin": guard.origin}
    ) as r:
        return r.status == 200 and "/g/scans/" in str(r.url)


async def im_fine(phone: Browser, plate_path: str) -> bool:
    """ "我很好" on the flat's plate page."""
    status, url, _ = await phone.form(plate_path + "/care/ok", {}, page=plate_path)
    return status == 200 and "care=ok" in url
