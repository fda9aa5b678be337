"""Helpers for the care and patrol tests: a clock the test moves (wall and monotonic, together or the wall alone),
the estate of tests.registry_support with staff and residents' sessions, and field events of a flat's indoor panel."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from ulid import ULID
from yarl import URL

from gateway import wire
from portal.alarms.board import BOARD, AlarmBoard
from portal.app import Options
from portal.estate.service import RESIDENT_COOKIE
from tests.portal_support import GATEWAY, SITE, Portal, add_user
from tests.registry_support import admin_session, estate, estate_csv, import_csv

GUARD, GUARD_PW = "guard1", "guard-password-0001"


@dataclass
class TimeMachine:
    """The portal's clocks under the test's hand: :meth:`step` moves both (time passes), :meth:`jump` the wall
    clock alone (someone sets the clock). Starts at the real time so field events line up."""

    wall_s: float = 0.0
    mono_s: float = 0.0

    def __post_init__(self) -> None:
        self.wall_s = self.wall_s or time.time()
        self.mono_s = self.mono_s or 10_000.0

    def wall(self) -> float:
        return self.wall_s

    def mono(self) -> float:
        return self.mono_s

    def step(self, seconds: float) -> None:
        self.wall_s += seconds
        self.mono_s += seconds

    def jump(self, seconds: float) -> None:
        self.wall_s += seconds

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.wall_s, UTC)

    def options(self) -> Options:
        return Options(clock=self.wall, monotonic=self.mono)


def board(p: Portal) -> AlarmBoard:
    return p.client.server.app[BOARD]


async def estate_with_staff(p: Portal) -> str:
    """The registry's estate imported, a guard account, ``p.client`` signed in as the office; its CSRF token."""
    csrf = await admin_session(p)
    status, body = await import_csv(p, csrf, estate_csv())
    assert status == 200, body
    await add_user(p, GUARD, "guard", GUARD_PW)
    p.csrf = csrf
    return csrf


async def person(p: Portal, phone: str) -> dict[str, Any]:
    """A registered person's id and their current stay's subject and house (by phone)."""
    row = await p.services.store.read(
        lambda c: c.execute(
            "SELECT pe.id, r.subject, r.house_id FROM reg_people pe JOIN reg_residents r ON r.person_id = pe.id"
            " WHERE pe.phone = ? AND r.status = 'active' ORDER BY r.id DESC",
            (phone,),
        ).fetchone()
    )
    assert row is not None, phone
    return {"id": row[0], "subject": row[1], "house_id": row[2]}


async def resident_browser(p: Portal, person_id: int) -> tuple[aiohttp.ClientSession, str]:
    """A phone signed in as a resident (a session made by the portal itself); its CSRF token (the pre-session one)."""
    http = aiohttp.ClientSession(base_url=p.origin, cookie_jar=aiohttp.CookieJar(unsafe=True))
    token = await estate(p).start_resident_session(person_id)
    http.cookie_jar.update_cookies({RESIDENT_COOKIE: token}, URL(p.origin))
    page = await (await http.get("/m/login")).text()
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert m
    return http, m.group(1)


async def staff_browser(p: Portal, user: str, password: str) -> tuple[aiohttp.ClientSession, str]:
    """Another browser signed in as a staff user through the form; its session's CSRF token."""
    http = aiohttp.ClientSession(base_url=p.origin, cookie_jar=aiohttp.CookieJar(unsafe=True))
    page = await (await http.get("/login")).text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf
    r = await http.post(
        "/login",
        data={"user": user, "password": password, "csrf": csrf.group(1), "next": "/console"},
        headers={"Origin": p.origin},
        allow_redirects=False,
    )
    assert r.status == 303, (r.status, await r.text())
    page = await (await http.get("/console")).text()
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert m
    return http, m.group(1)


def field_event(
    seq: int,
    etype: str,
    *,
    ts: datetime | None = None,
    data: dict[str, Any] | None = None,
    priority: int = wire.Priority.ROUTINE,
    device: str = "cid",
    **place: str,
) -> wire.Event:
    """An event as gateway s1/gw1 sends it (a flat's panel: place building, unit, house)."""
    ts = ts or datetime.now(UTC)
    return wire.Event(
        id=str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type=etype,
        device=device,
        place=wire.Place(site=SITE, **place),
        priority=priority,
        data=data or {},
    )


FLAT_301 = {"building": "3", "unit": "2", "house": "301"}
FLAT_302 = {"building": "3", "unit": "2", "house": "302"}
__all__ = ["GATEWAY", "SITE"]
