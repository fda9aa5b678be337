"""Access control, table-driven (OWASP ASVS L2 V4): every route of the portal × every kind of user × an object
of their own and someone else's, against a real portal on loopback with a real SQLite store.

The estate has two sites (north, south) with the same building, unit and house codes, an incident, doors, an
access decision, a remote unlock, an arm order, a guard-registered visitor, a resident's visitor pass and a work
item on each. The users: nobody, the resident of north's 3-2-301 (house A), a guard and an installer scoped to
north, and an administrator of every site. "own" is north's object (house A), "other" south's (house B).

:data:`ROWS` enumerates the app's router: a route without a row (or a row without a route) fails the test, so a
new route cannot go in without its access rules being written down. Every state-changing request carries a
valid CSRF token and Origin, so what is tested is authorization. A cell's expected status is what the principal
may do; where a response lists things, the other site's object must not show (and the own one must).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
from PIL import Image
from ulid import ULID
from yarl import URL

from gateway import wire
from gateway.tooling.broker import free_port
from portal.alarms.board import BOARD
from portal.app import Options
from portal.care import model as care_model
from portal.care import watch as care_watch
from portal.config import load
from portal.estate import photos
from portal.estate import registry as reg
from portal.estate.service import MUST_SET_AFTER_CODE
from portal.patrol import model as patrol_model
from portal.store import StoreBatch, get_session, get_user, open_db
from portal.web.auth import hash_token
from tests.grid_support import grid_yaml
from tests.portal_support import ROOT, Portal, csrf_of, running_portal, write_config
from tests.registry_support import HEADER, admin_session, estate, import_csv

PW = "matrix-password-0001"
GW = "gw1"
WHO = ("anon", "resident", "guard", "installer", "admin")
SIDES = ("N", "S")
STAFF_ALL = ("admin", "guard", "installer")
GUARDS = ("admin", "guard")
FITTERS = ("admin", "installer")
ADMIN = ("admin",)

ESTATE_CSV = HEADER + "".join(
    f"{site},{name},{b},{u},{h},{person},{phone},{role},{mi},,\n"
    for site, name, b, u, h, person, phone, role, mi in (
        ("north", "北苑", "3", "2", "301", "张北", "13800000001", "owner", "2020-01-01"),
        ("north", "北苑", "3", "1", "101", "", "", "", ""),
        ("south", "南苑", "3", "2", "301", "李南", "13800000002", "owner", "2020-01-01"),
        ("south", "南苑", "3", "1", "101", "", "", "", ""),
    )
)

SITE_MAPS = """
public_url: https://wy.example.cn
site_maps:
  - {site: north, width: 100, height: 100, doors: [{door: n-gate, x: 10, y: 10}]}
  - {site: south, width: 100, height: 100, doors: [{door: s-gate, x: 10, y: 10}]}
alarms:
  groups: [{site: north, gateway: gw1, group: perimeter}, {site: south, gateway: gw1, group: perimeter}]
"""


# ---------------------------------------------------------------- the estate


@dataclass
class Side:
    """One site's objects (north: the principals' own; south: someone else's)."""

    site: str
    site_name: str
    resident_name: str
    person_id: int = 0
    owner_id: int = 0  # reg_residents.id of the house's owner
    plate_house: str = ""
    plate_entrance: str = ""
    house_id: int = 0
    building_id: int = 0
    unit31_id: int = 0
    door_id: int = 0  # reg_doors.id of the unit door x-u32
    gate: str = ""
    incident_id: int = 0
    alarm_event: str = ""
    access_event: str = ""
    unlock_cmd: str = ""
    visitor_id: int = 0
    work_id: int = 0
    pass_token: str = ""
    vpass_id: int = 0  # visitor_passes.id of the pass behind pass_token
    confirm: list[int] = field(default_factory=list)  # pending residents, for the owner's confirm
    spare_visitors: list[int] = field(default_factory=list)  # guardroom visitors, one revoked per request
    blocks: list[int] = field(default_factory=list)  # blocks in force, one lifted per request
    care_id: int = 0  # the house under care (portal/care), its resident cared for
    care_incident: int = 0  # a care alert's incident
    checkpoint_id: int = 0  # a patrol checkpoint (portal/patrol), on a route, scanned by guard-n
    checkpoint_code: str = ""
    route_id: int = 0
    scan_id: int = 0

    @property
    def contact(self) -> str:
        return f"联系人{self.site_name}"

    @property
    def checkpoint(self) -> str:
        return f"{self.site}-checkpoint"

    @property
    def tag(self) -> str:
        return self.site[0]

    @property
    def fence(self) -> str:
        return f"{self.site}-fence"

    @property
    def visitor_name(self) -> str:
        return f"Visitor-{self.site.title()}"

    @property
    def work_text(self) -> str:
        return f"{self.site}-leak"

    @property
    def pending_name(self) -> str:
        return f"待定{self.site_name}"


@dataclass
class Estate:
    p: Portal
    n: Side
    s: Side
    step: Callable[[], None]  # moves the monotonic clock on: rate limits never decide a cell

    def side(self, side: str) -> Side:
        return self.n if side == "N" else self.s


def _event(
    site: str, seq: int, etype: str, place: dict[str, str], data: dict[str, Any], prio: int = wire.Priority.ROUTINE
) -> wire.Event:
    ts = datetime.now(UTC) + timedelta(milliseconds=seq)
    return wire.Event(
        id=str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type=etype,
        device="dev-1",
        place=wire.Place(site=site, **place),
        point="in1",
        priority=prio,
        data=data,
    )


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


async def _store_events(p: Portal, side: Side) -> None:
    x, t = side.site, side.tag
    events = [
        _event(
            x,
            1,
            "zone.alarm",
            {"zone": f"P-{t}"},
            {"incident": f"I-{t}", "count": 1, "zone": f"P-{t}", "kind": "intrusion", "label": side.fence},
            wire.Priority.INTRUSION,
        ),
        _event(x, 2, "door.state", {"door": side.gate}, {"door": side.gate, "state": "open"}),
        _event(
            x,
            3,
            "access.granted",
            {"door": side.gate},
            {
                "door": side.gate,
                "reader": "r1",
                "pass_id": "ab" * 12,
                "kind": "resident",
                "subject": f"r:{t}",
                "house": "3-2-301",
            },
        ),
        _event(
            x,
            4,
            "group.armed",
            {},
            {"group": "perimeter", "label": "周界", "mode": "away", "by": "x", "source": "panel"},
        ),
    ]
    side.alarm_event, side.access_event = events[0].id, events[2].id
    await p.services.store.write(StoreBatch(wire.batch_events(x, GW, events)))


async def _admin_json(p: Portal, csrf: str, path: str, body: Any) -> tuple[int, Any]:
    r = await p.client.post(path, json=body, headers={"Origin": p.origin, "X-CSRF-Token": csrf})
    return r.status, await r.json()


async def _admin_form(p: Portal, csrf: str, path: str, form: dict[str, str]) -> aiohttp.ClientResponse:
    return await p.client.post(path, data={**form, "csrf": csrf}, headers={"Origin": p.origin}, allow_redirects=False)


async def build_estate(p: Portal, step: Callable[[], None]) -> Estate:
    """Two sites' worth of objects, made through the portal's own routes and store functions; p.client is the
    site-wide administrator's browser."""
    n, s = Side("north", "北苑", "张北"), Side("south", "南苑", "李南")
    est = estate(p)
    store = p.services.store
    csrf = await admin_session(p)
    status, body = await import_csv(p, csrf, ESTATE_CSV)
    assert status == 200, body

    def registry(c: Any) -> None:
        for side in (n, s):
            x, t = side.site, side.tag
            side.gate = f"{t}-gate"
            reg.add_door(c, x, GW, side.gate, None, None, True, f"{t.upper()}-gate-label")
            side.door_id = reg.add_door(c, x, GW, f"{t}-u32", "3", "2", False, f"{t.upper()}-unit-door")
            row = c.execute(
                "SELECT h.id, b.id AS bid, u.id AS uid FROM reg_houses h JOIN reg_units u"
                " ON u.id = h.unit_id JOIN reg_buildings b ON b.id = u.building_id JOIN reg_sites si"
                " ON si.id = b.site_id WHERE si.code = ? AND h.code = '301'",
                (x,),
            ).fetchone()
            side.house_id, side.building_id = row[0], row["bid"]
            side.unit31_id = c.execute(
                "SELECT u.id FROM reg_units u WHERE u.building_id = ? AND u.code = '1'", (side.building_id,)
            ).fetchone()[0]
            side.plate_house = reg.plate_code(c, "house", side.house_id) or ""
            side.plate_entrance = reg.plate_code(c, "entrance", row["uid"]) or ""
            owner = c.execute("SELECT id, person_id FROM reg_residents WHERE house_id = ?", (side.house_id,)).fetchone()
            side.owner_id, side.person_id = owner["id"], owner["person_id"]
            digit = "1" if t == "n" else "2"
            reg.register(c, side.house_id, f"1390000{digit}999", side.pending_name, "family", None, None)
            for i in range(2):  # two to confirm from the owner's phone
                side.confirm.append(
                    reg.register(c, side.house_id, f"1390000{digit}00{i}", f"确认{t}{i}", "family", None, None)
                )

    await store.run_write(registry)
    for side in (n, s):
        await _store_events(p, side)
    await p.client.server.app[BOARD].feed_now()
    for side in (n, s):
        side.incident_id = await store.read(
            lambda c, side=side: c.execute(
                "SELECT id FROM incidents WHERE site = ? AND engine_incident = ?", (side.site, f"I-{side.tag}")
            ).fetchone()[0]
        )
        # A remote unlock and an arm order (no broker: recorded, not sent), and a visitor at the guardroom.
        status, body = await _admin_json(p, csrf, f"/api/doors/{side.site}/{side.gate}/unlock", {"reason": "setup"})
        assert status == 503, body
        side.unlock_cmd = body["command"]["id"]
        status, body = await _admin_json(
            p, csrf, "/api/board/arm", {"site": side.site, "gateway": GW, "group": "perimeter", "action": "disarm"}
        )
        assert status == 503, body
        r = await _admin_form(
            p,
            csrf,
            "/visitors",
            {
                "name": side.visitor_name,
                "house": "3-2-301",
                "site": side.site,
                "hours": "4",
                "uses": "2",
                "start": "",
                "note": "",
            },
        )
        assert r.status == 303, await r.text()
        side.visitor_id = int(r.headers["Location"].rsplit("/", 1)[1])
        for i in range(len(WHO)):  # one for each principal's revoke request
            r = await _admin_form(
                p,
                csrf,
                "/visitors",
                {
                    "name": f"Spare-{side.tag}{i}",
                    "house": "3-2-301",
                    "site": side.site,
                    "hours": "4",
                    "uses": "1",
                    "start": "",
                    "note": "",
                },
            )
            assert r.status == 303, await r.text()
            side.spare_visitors.append(int(r.headers["Location"].rsplit("/", 1)[1]))

        def blocks(c: Any, side: Side = side) -> list[int]:  # one for each principal's lift request
            return [
                int(
                    c.execute(
                        "INSERT INTO revocations (site, kind, subject, reason, until, created_at, created_by)"
                        " VALUES (?, 'block', ?, 'matrix', NULL, 't', 'admin:office')",
                        (side.site, f"v:matrix-{side.tag}{i}"),
                    ).lastrowid
                )
                for i in range(len(WHO))
            ]

        side.blocks = await store.run_write(blocks)
        place = await store.read(lambda c, side=side: reg.house_place(c, side.house_id))
        assert place is not None
        side.work_id = await est.raise_work_item(
            place, "problem", category="repair", text=side.work_text, photo=photos.clean(_png(), 10**6)
        )
        # The house's own resident issues a visitor pass from the phone (the link is the pass).
        who = await resident_who(p, side.person_id)
        try:
            r2 = await who.http.post(
                f"/p/{side.plate_house}/visitor",
                data={"hours": "2", "uses": "1"},
                headers={"Origin": p.origin, "X-CSRF-Token": who.csrf},
                allow_redirects=False,
            )
            assert r2.status == 303, await r2.text()
            side.pass_token = r2.headers["Location"].rsplit("/", 1)[1]
            side.vpass_id = await store.read(
                lambda c, side=side: c.execute(
                    "SELECT v.id FROM visitor_passes v JOIN reg_residents r ON r.id = v.resident_id WHERE r.house_id ="
                    " ?",
                    (side.house_id,),
                ).fetchone()[0]
            )
        finally:
            await who.http.close()

    for side in (n, s):
        await _care_and_patrol(p, side)

    # Staff accounts through the users page: a guard scoped when created, an installer scoped afterwards.
    r = await _admin_form(p, csrf, "/users", {"name": "guard-n", "role": "guard", "password": PW, "sites": "mars"})
    assert r.status == 400 and "mars" in await r.text()  # the registry knows its sites
    r = await _admin_form(p, csrf, "/users", {"name": "guard-n", "role": "guard", "password": PW, "sites": "north"})
    assert r.status == 200, await r.text()
    r = await _admin_form(p, csrf, "/users", {"name": "fitter-n", "role": "installer", "password": PW, "sites": ""})
    assert r.status == 200
    r = await _admin_form(p, csrf, "/users/fitter-n/sites", {"sites": "north"})
    assert r.status == 303
    r = await _admin_form(p, csrf, "/users/office/sites", {"sites": "north"})
    assert r.status == 400  # administrators see every site
    for name in ("spare-n", "spare-s"):
        await p.services.auth.create_user(name, "guard", PW, must_change=False)

    def ready(c: Any) -> dict[str, Any]:  # the new accounts' first password change is not what is tested here
        c.execute("UPDATE users SET must_change = 0")
        return {u: get_user(c, u) for u in ("guard-n", "fitter-n", "office")}

    users = await store.run_write(ready)
    assert users["guard-n"].sites == ("north",) and users["fitter-n"].sites == ("north",)
    assert users["office"].sites is None
    page = await (await p.client.get("/users/guard-n")).text()
    assert 'action="/users/guard-n/sites"' in page and 'value="north"' in page
    for side in (n, s):  # a plan picture for each site (an 8x8 PNG), drawn on the administrators' page
        upload = aiohttp.FormData({"csrf": csrf})
        upload.add_field("image", _png(), filename="plan.png", content_type="image/png")
        r = await p.client.post(
            f"/admin/sitemap/{side.site}/image", data=upload, headers={"Origin": p.origin}, allow_redirects=False
        )
        assert r.status == 303, await r.text()
    await est.refresh_revocations()
    return Estate(p, n, s, step)


async def _care_and_patrol(p: Portal, side: Side) -> None:
    """A flat under care with an alert on the board, and a checkpoint on a route with a scan by guard-n (north's)
    or by someone else (south's)."""
    store, now = p.services.store, datetime.now(UTC)
    when = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    settings = care_model.Settings(
        (side.person_id,), side.contact, "女儿", "13600000009", 24, True, "00:00", "05:00", "本人", "written", when
    )

    def care_setup(c: Any) -> dict[str, Any]:
        side.care_id = care_model.enrol(c, side.house_id, side.site, settings, "admin:office", when)
        h = care_model.household(c, side.care_id)
        assert h is not None
        return care_watch.raise_alert(c, h, "no_activity", when, {"hours": 24, "since": when})

    await store.run_write(care_setup)
    await p.client.server.app[BOARD].feed_now()
    side.care_incident = await store.read(
        lambda c: c.execute(
            "SELECT k.incident_id FROM care_alerts a JOIN incident_keys k ON k.key = a.incident_key WHERE a.care_id ="
            " ?",
            (side.care_id,),
        ).fetchone()[0]
    )

    def patrol_setup(c: Any) -> None:
        cp = patrol_model.add_checkpoint(c, side.site, side.checkpoint, "admin:office", when)
        side.checkpoint_id, side.checkpoint_code = cp.id, cp.code
        form = patrol_model.RouteForm(f"{side.site}-route", "00:00", "23:59", 60, 30, 30, False, "", True, (cp.id,))
        made = (now - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # its round under way is written
        side.route_id = patrol_model.save_route(c, None, side.site, form, "admin:office", made)
        guard = "guard-n" if side.site == "north" else "guard-s"
        side.scan_id = patrol_model.scan(c, cp, guard, f"nonce-{side.site}", now, ZoneInfo("Asia/Shanghai")).scan_id

    await store.run_write(patrol_setup)


# ---------------------------------------------------------------- principals


@dataclass
class Who:
    kind: str
    http: aiohttp.ClientSession
    csrf: str


def _session(p: Portal) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(base_url=p.origin, cookie_jar=aiohttp.CookieJar(unsafe=True))


async def _pre_csrf(p: Portal, http: aiohttp.ClientSession, path: str) -> str:
    async with http.get(path, allow_redirects=False) as r:
        assert r.status == 200, (path, r.status)
        return csrf_of(await r.text())


async def resident_who(p: Portal, person_id: int, must_set_password: int = 0) -> Who:
    http = _session(p)
    token = await estate(p).start_resident_session(person_id, must_set_password=must_set_password)
    http.cookie_jar.update_cookies({"gh_resident": token}, URL(p.origin))
    return Who("resident", http, await _pre_csrf(p, http, "/m/login"))


async def staff_who(p: Portal, kind: str, name: str) -> Who:
    http = _session(p)
    user = await p.services.store.read(lambda c: get_user(c, name))
    assert user is not None
    token = await p.services.auth.start_session(user)
    session = await p.services.store.read(lambda c: get_session(c, hash_token(token)))
    assert session is not None
    http.cookie_jar.update_cookies({"gh_session": token}, URL(p.origin))
    return Who(kind, http, session.csrf_token)


async def make_who(e: Estate, kind: str, *, fresh: bool = False) -> Who:
    if kind == "anon":
        http = _session(e.p)
        return Who("anon", http, await _pre_csrf(e.p, http, "/login"))
    if kind == "resident":  # a principal of its own for one cell: just signed in with the office's one-time code
        return await resident_who(e.p, e.n.person_id, MUST_SET_AFTER_CODE if fresh else 0)
    return await staff_who(e.p, kind, {"guard": "guard-n", "installer": "fitter-n", "admin": "office"}[kind])


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Req:
    method: str
    url: str
    json: Any = None
    form: dict[str, str] | None = None
    body: bytes | None = None
    ctype: str = ""
    ws: bool = False


Expect = Callable[[str, str], int | frozenset[int]]


@dataclass(frozen=True)
class Row:
    method: str
    route: str  # the router's canonical path
    req: Callable[[Side, Estate], Req]
    expect: Expect
    mark: Callable[[Side], str] | None = None  # text that shows this side's object in a 2xx answer
    viewer: str = "staff"  # whose scope decides whether the mark shows: staff sites, or the resident's house
    fresh: bool = False  # the request changes the session itself: a principal of its own for the cell
    note: str = ""


def same(status: int | frozenset[int]) -> Expect:
    return lambda who, side: status


def staff(
    roles: tuple[str, ...],
    ok: int | frozenset[int],
    *,
    api: bool = False,
    scoped: bool = True,
    other: int = 404,
    child: bool = False,
) -> Expect:
    """Signed-in staff of ``roles`` get ``ok`` (for a scoped account, ``other`` for south's object); other
    staff 403; nobody and residents (no staff session) are sent to sign in (pages) or get 401 (API).

    ``child``: the request names a parent and a child by id; side S pairs one site's parent with the other site's
    child, which is ``other`` for everyone (an administrator too: the child is not the parent's)."""

    def f(who: str, side: str) -> int | frozenset[int]:
        if who in ("anon", "resident"):
            return 401 if api else 303
        if who not in roles:
            return 403
        if side == "S" and (child or (scoped and who != "admin")):
            return other
        return ok

    return f


def phone(own: int, other: int, rest: int) -> Expect:
    """The resident of house A gets ``own`` at A and ``other`` at B; everyone else (no resident session)
    gets ``rest``."""
    return lambda who, side: (own if side == "N" else other) if who == "resident" else rest


def sees(row: Row, who: str, side: str) -> bool:
    if row.viewer == "resident":
        return who == "resident" and side == "N"
    return who == "admin" or (who in ("guard", "installer") and side == "N")


_n = itertools.count(1)


def uniq() -> int:
    return next(_n)


def get(url: Callable[[Side, Estate], str]) -> Callable[[Side, Estate], Req]:
    return lambda o, e: Req("GET", url(o, e))


def post(
    url: Callable[[Side, Estate], str],
    *,
    form: Callable[[Side], dict[str, str]] | None = None,
    json_: Callable[[Side], Any] | None = None,
) -> Callable[[Side, Estate], Req]:
    return lambda o, e: Req("POST", url(o, e), form=form(o) if form else None, json=json_(o) if json_ else None)


SHEET = frozenset({200, 503})  # 503: no CJK font on this machine for the PDF; either way, not refused
IMPORT = (HEADER + "north,北苑,9,9,909,,,,,,\n").encode()

ROWS: list[Row] = [
    # -- pages, sign-in and the console (views.py)
    Row("GET", "/", get(lambda o, e: "/"), same(303)),
    Row("GET", "/login", get(lambda o, e: "/login"), lambda who, side: 303 if who in STAFF_ALL else 200),
    Row(
        "POST",
        "/login",
        post(lambda o, e: "/login", form=lambda o: {"user": f"nobody{uniq()}", "password": "wrong-password-1"}),
        same(401),
    ),
    Row("POST", "/logout", post(lambda o, e: "/logout", form=lambda o: {}), same(303), fresh=True),
    Row("GET", "/password", get(lambda o, e: "/password"), staff(STAFF_ALL, 200, scoped=False)),
    Row(
        "POST",
        "/password",
        post(
            lambda o, e: "/password",
            form=lambda o: {
                "current": "not-the-password",
                "new": "another-password-1",
                "confirm": "another-password-1",
            },
        ),
        staff(STAFF_ALL, 400, scoped=False),
        fresh=True,
    ),
    Row("GET", "/lang/{code}", get(lambda o, e: "/lang/en?next=/"), same(303), fresh=True),
    Row(
        "GET",
        "/console",
        get(lambda o, e: "/console"),
        staff(STAFF_ALL, 200, scoped=False),
        mark=lambda o: o.alarm_event,
    ),
    Row("GET", "/users", get(lambda o, e: "/users"), staff(ADMIN, 200)),
    Row(
        "POST",
        "/users",
        post(
            lambda o, e: "/users",
            form=lambda o: {"name": f"web{uniq()}", "role": "guard", "password": PW, "sites": o.site},
        ),
        staff(ADMIN, 200),
    ),
    Row(
        "POST",
        "/users/{name}/sites",
        post(lambda o, e: f"/users/spare-{o.tag}/sites", form=lambda o: {"sites": o.site}),
        staff(ADMIN, 303),
    ),
    Row("GET", "/users/{name}", get(lambda o, e: f"/users/spare-{o.tag}"), staff(ADMIN, 200)),
    Row(
        "POST",
        "/users/{name}/role",
        post(lambda o, e: f"/users/spare-{o.tag}/role", form=lambda o: {"role": "installer"}),
        staff(ADMIN, 200),
        note="a change of role asks first (200: the confirmation page)",
    ),
    Row(
        "POST",
        "/users/{name}/role",
        post(lambda o, e: f"/users/spare-{o.tag}/role", form=lambda o: {"role": "installer", "confirmed": "yes"}),
        staff(ADMIN, 303),
    ),
    Row(
        "POST",
        "/users/{name}/password",
        post(lambda o, e: f"/users/spare-{o.tag}/password", form=lambda o: {"confirmed": "yes"}),
        staff(ADMIN, 303),
        note="to the account's page, which shows the one-time password once",
    ),
    Row(
        "POST",
        "/users/{name}/disable",
        post(lambda o, e: f"/users/spare-{o.tag}/disable", form=lambda o: {"confirmed": "yes"}),
        staff(ADMIN, 303),
    ),
    Row(
        "POST",
        "/users/{name}/enable",
        post(lambda o, e: f"/users/spare-{o.tag}/enable", form=lambda o: {}),
        staff(ADMIN, 303),
    ),
    Row("GET", "/ws", lambda o, e: Req("GET", "/ws", ws=True), staff(STAFF_ALL, 101, api=True, scoped=False)),
    # -- the JSON API (api.py, openapi)
    Row(
        "GET",
        "/api/health",
        get(lambda o, e: "/api/health"),
        same(200),
        mark=lambda o: f'"site": "{o.site}"',
        note="everyone hears ok; only staff see gateways, of their own sites",
    ),
    Row("GET", "/api/openapi.json", get(lambda o, e: "/api/openapi.json"), same(200)),
    Row(
        "GET",
        "/api/events",
        get(lambda o, e: f"/api/events?site={o.site}"),
        staff(STAFF_ALL, 200, api=True, scoped=False),
        mark=lambda o: o.alarm_event,
    ),
    Row(
        "POST",
        "/api/users",
        post(lambda o, e: "/api/users", json_=lambda o: {"name": f"api{uniq()}", "role": "guard", "password": PW}),
        staff(ADMIN, 201, api=True),
    ),
    Row("GET", "/metrics", get(lambda o, e: "/metrics"), staff(STAFF_ALL, 200, api=True, scoped=False)),
    Row("GET", "/static", get(lambda o, e: "/static/app.css"), same(200)),
    # -- residents' phone pages (phone.py): plates are public; a household only to its residents
    Row(
        "GET",
        "/p/{code}",
        get(lambda o, e: f"/p/{o.plate_house}"),
        same(200),
        mark=lambda o: o.resident_name,
        viewer="resident",
    ),
    Row(
        "POST",
        "/p/{code}/open",
        post(lambda o, e: f"/p/{o.plate_entrance}/open", form=lambda o: {"door": str(o.door_id)}),
        phone(200, 403, 303),
        note="another building's entrance: its plate is public, the resident has no right there",
    ),
    Row(
        "POST",
        "/p/{code}/open",
        post(lambda o, e: f"/p/{e.n.plate_entrance}/open", form=lambda o: {"door": str(o.door_id)}),
        phone(200, 404, 303),
        note="the own entrance, another entrance's door id",
    ),
    Row("POST", "/p/{code}/sos", post(lambda o, e: f"/p/{o.plate_house}/sos", form=lambda o: {}), same(303)),
    Row(
        "GET",
        "/p/{code}/sos",
        get(lambda o, e: f"/p/{o.plate_house}/sos"),
        same(frozenset({200, 404})),
        note="a help call's state, only for the phone that made it (every principal here pressed SOS in the row"
        " before, so holds the cookie) or a resident of the house; a stranger's 404: test_board_flows_browser",
    ),
    Row("GET", "/p/{code}/report", get(lambda o, e: f"/p/{o.plate_house}/report"), same(200)),
    Row(
        "POST",
        "/p/{code}/report",
        post(lambda o, e: f"/p/{o.plate_house}/report", form=lambda o: {"category": "repair", "text": "matrix"}),
        same(303),
    ),
    Row(
        "GET",
        "/p/{code}/report/status",
        get(lambda o, e: f"/p/{o.plate_house}/report/status"),
        lambda who, side: 200 if who == "resident" and side == "N" else frozenset({200, 404}),
        note="a report's progress, only for the phone that sent it (every principal here sent one in the row before,"
        " so holds its cookie) or a resident of the house",
    ),
    Row("GET", "/p/{code}/register", get(lambda o, e: f"/p/{o.plate_house}/register"), same(200)),
    Row(
        "POST",
        "/p/{code}/register",
        post(
            lambda o, e: f"/p/{o.plate_house}/register",
            form=lambda o: {
                "name": f"登记{uniq()}",
                "phone": f"1350000{uniq():04d}",
                "role": "family",
                "password": "password-123",
                "confirm": "password-123",
            },
        ),
        same(200),
    ),
    Row(
        "POST",
        "/p/{code}/confirm",
        post(
            lambda o, e: f"/p/{o.plate_house}/confirm",
            form=lambda o: {"resident": str(o.confirm[0]), "action": "approve"},
        ),
        phone(303, 403, 303),
        note="another house's plate: not the owner there",
    ),
    Row(
        "POST",
        "/p/{code}/confirm",
        post(
            lambda o, e: f"/p/{e.n.plate_house}/confirm",
            form=lambda o: {"resident": str(o.confirm[1]), "action": "approve"},
        ),
        phone(303, 404, 303),
        note="the own plate, another house's resident id",
    ),
    Row("GET", "/p/{code}/mypass.json", get(lambda o, e: f"/p/{o.plate_house}/mypass.json"), phone(200, 403, 401)),
    Row(
        "POST",
        "/p/{code}/visitor",
        post(lambda o, e: f"/p/{o.plate_house}/visitor", form=lambda o: {"hours": "2", "uses": "1"}),
        phone(303, 403, 303),
    ),
    Row("GET", "/m/v/{token}", get(lambda o, e: f"/m/v/{o.pass_token}"), same(200), note="a share link: the pass"),
    Row("GET", "/m/v/{token}/qr.png", get(lambda o, e: f"/m/v/{o.pass_token}/qr.png"), same(200)),
    Row("GET", "/m/login", get(lambda o, e: "/m/login"), same(200)),
    Row(
        "POST",
        "/m/login",
        post(lambda o, e: "/m/login", form=lambda o: {"phone": f"1360000{uniq():04d}", "password": "wrong-password"}),
        same(401),
    ),
    Row("POST", "/m/logout", post(lambda o, e: "/m/logout", form=lambda o: {}), same(303), fresh=True),
    Row("GET", "/m/password", get(lambda o, e: "/m/password"), phone(200, 200, 303)),
    Row(
        "POST",
        "/m/password",
        post(lambda o, e: "/m/password", form=lambda o: {"new": "resident-pass-1", "confirm": "resident-pass-1"}),
        same(303),
        fresh=True,
        note="(a resident's session just opened with a one-time code: no current password asked)",
    ),
    Row("GET", "/m", get(lambda o, e: "/m"), phone(200, 200, 303), mark=lambda o: o.site_name, viewer="resident"),
    # -- the grid link (portal/grid/): the platform's callback is signed by the platform, not by a session
    Row(
        "POST",
        "/api/grid/callback",
        post(lambda o, e: "/api/grid/callback", json_=lambda o: {}),
        same(401),
        note="no signature: refused whoever calls (tests/test_grid_callbacks.py plays the platform)",
    ),
    Row("GET", "/grid", get(lambda o, e: "/grid"), staff(GUARDS, 200, scoped=False)),
    Row(
        "POST",
        "/grid/forward/{work_id}",
        post(lambda o, e: f"/grid/forward/{o.work_id}", form=lambda o: {}),
        lambda who, side: (
            303
            if who in ("anon", "resident")
            else 403
            if who == "installer"
            else frozenset({303, 409})
            if side == "N"
            else 404
            if who == "guard"
            else 409
        ),
        note="north reports up (once: then 409); south does not (409 for those who see it)",
    ),
    Row(
        "POST",
        "/grid/outbox/{id}/resend",
        post(lambda o, e: "/grid/outbox/999999999/resend", form=lambda o: {}),
        staff(ADMIN, 404, scoped=False),
    ),
    Row("GET", "/grid/reports", get(lambda o, e: "/grid/reports"), staff(GUARDS, 200, scoped=False)),
    Row("GET", "/grid/reports.csv", get(lambda o, e: "/grid/reports.csv"), staff(GUARDS, 200, scoped=False)),
    Row("GET", "/grid/reports.xlsx", get(lambda o, e: "/grid/reports.xlsx"), staff(GUARDS, 200, scoped=False)),
    # -- the registry (registry_views.py)
    Row(
        "GET",
        "/admin/registry",
        get(lambda o, e: "/admin/registry"),
        staff(STAFF_ALL, 200, scoped=False),
        mark=lambda o: o.site_name,
    ),
    Row(
        "POST",
        "/admin/registry/sites",
        post(lambda o, e: "/admin/registry/sites", form=lambda o: {"code": o.site, "name": o.site_name}),
        staff(ADMIN, 303),
    ),
    Row(
        "POST",
        "/admin/registry/doors",
        post(
            lambda o, e: "/admin/registry/doors",
            form=lambda o: {"gateway_ref": f"{o.site}/{GW}", "door": f"{o.tag}-extra", "gate": "1", "label": "extra"},
        ),
        staff(FITTERS, 303),
    ),
    Row(
        "GET",
        "/admin/registry/buildings/{id}",
        get(lambda o, e: f"/admin/registry/buildings/{o.building_id}"),
        staff(STAFF_ALL, 200),
    ),
    Row(
        "GET",
        "/admin/registry/houses/{id}",
        get(lambda o, e: f"/admin/registry/houses/{o.house_id}"),
        staff(GUARDS, 200),
        mark=lambda o: o.resident_name,
    ),
    Row(
        "POST",
        "/admin/registry/residents/{id}/{action}",
        post(lambda o, e: f"/admin/registry/residents/{o.owner_id}/code", form=lambda o: {}),
        staff(ADMIN, 200),
    ),
    Row(
        "GET",
        "/admin/registry/pending",
        get(lambda o, e: "/admin/registry/pending"),
        staff(ADMIN, 200),
        mark=lambda o: o.pending_name,
    ),
    Row(
        "POST",
        "/admin/registry/plates/reissue",
        post(
            lambda o, e: "/admin/registry/plates/reissue", form=lambda o: {"kind": "entrance", "id": str(o.unit31_id)}
        ),
        staff(ADMIN, 200),
        note="it asks first (200: the confirmation page)",
    ),
    Row(
        "POST",
        "/admin/registry/plates/reissue",
        post(
            lambda o, e: "/admin/registry/plates/reissue",
            form=lambda o: {"kind": "entrance", "id": str(o.unit31_id), "confirmed": "yes"},
        ),
        staff(ADMIN, 303),
    ),
    Row(
        "GET",
        "/admin/registry/plates/{kind}/{id}.{fmt}",
        get(lambda o, e: f"/admin/registry/plates/house/{o.house_id}.svg"),
        staff(FITTERS, 200),
    ),
    Row(
        "GET",
        "/admin/registry/buildings/{id}/sheet.pdf",
        get(lambda o, e: f"/admin/registry/buildings/{o.building_id}/sheet.pdf"),
        staff(FITTERS, SHEET),
    ),
    Row(
        "GET",
        "/admin/registry/buildings/{id}/sheet",
        get(lambda o, e: f"/admin/registry/buildings/{o.building_id}/sheet"),
        staff(FITTERS, 200),
    ),
    # -- child ids (query, form, path): a lookup by a child's id checks that it belongs to the parent in the request
    Row(
        "GET",
        "/admin/registry/buildings/{id}/sheet",
        get(lambda o, e: f"/admin/registry/buildings/{e.n.building_id}/sheet?unit={o.unit31_id}"),
        staff(FITTERS, 200, child=True),
        mark=lambda o: f"{o.site_name}3幢1单元",
        note="own building, another site's unit: its plate codes must not print",
    ),
    Row(
        "GET",
        "/admin/registry/buildings/{id}/sheet",
        get(lambda o, e: f"/admin/registry/buildings/{o.building_id}/sheet?unit={e.n.unit31_id}"),
        staff(FITTERS, 200, child=True),
        note="another site's building, the own unit",
    ),
    Row(
        "GET",
        "/admin/registry/buildings/{id}/sheet.pdf",
        get(lambda o, e: f"/admin/registry/buildings/{e.n.building_id}/sheet.pdf?unit={o.unit31_id}"),
        staff(FITTERS, SHEET, child=True),
        note="own building, another site's unit",
    ),
    Row(
        "POST",
        "/api/doors/{site}/{door}/unlock",
        post(lambda o, e: f"/api/doors/{e.n.site}/{o.gate}/unlock", json_=lambda o: {"reason": "matrix"}),
        staff(GUARDS, 503, api=True, child=True),
        note="own site, another site's door name",
    ),
    Row(
        "GET",
        "/api/access-log",
        get(lambda o, e: f"/api/access-log?door={o.site}/{o.gate}"),
        staff(GUARDS, 200, api=True, scoped=False),
        mark=lambda o: o.access_event,
        note="a door filter naming another site's door",
    ),
    Row(
        "GET",
        "/api/events",
        get(lambda o, e: f"/api/events?site={o.site}&gateway={GW}&after_seq=0"),
        staff(STAFF_ALL, 200, api=True, scoped=False),
        mark=lambda o: o.alarm_event,
        note="a gateway filter under another site",
    ),
    Row(
        "POST",
        "/api/registry/import",
        lambda o, e: Req("POST", "/api/registry/import?dry_run=1", body=IMPORT, ctype="text/csv"),
        staff(ADMIN, 200, api=True),
    ),
    Row("GET", "/admin/registry/export.csv", get(lambda o, e: "/admin/registry/export.csv"), staff(ADMIN, 200)),
    Row("GET", "/admin/registry/audit", get(lambda o, e: "/admin/registry/audit"), staff(ADMIN, 200)),
    Row(
        "GET",
        "/admin/registry/work",
        get(lambda o, e: "/admin/registry/work"),
        staff(GUARDS, 200, scoped=False),
        mark=lambda o: o.work_text,
    ),
    Row(
        "POST",
        "/admin/registry/work/{id}",
        post(
            lambda o, e: f"/admin/registry/work/{o.work_id}", form=lambda o: {"status": "acknowledged", "note": "seen"}
        ),
        staff(GUARDS, 303),
    ),
    Row(
        "GET",
        "/admin/registry/work/{id}/photo",
        get(lambda o, e: f"/admin/registry/work/{o.work_id}/photo"),
        staff(GUARDS, 200),
    ),
    Row(
        "GET",
        "/api/passes/public-key",
        get(lambda o, e: "/api/passes/public-key"),
        staff(FITTERS, 200, api=True, scoped=False),
    ),
    Row(
        "GET",
        "/api/registry/revocations",
        get(lambda o, e: f"/api/registry/revocations?site={o.site}"),
        staff(FITTERS, 200, api=True, scoped=False),
        mark=lambda o: f'"{o.site}"',
    ),
    # -- doors (doors.py)
    Row(
        "GET",
        "/doors",
        get(lambda o, e: "/doors"),
        staff(STAFF_ALL, 200, scoped=False),
        mark=lambda o: f'data-key="{o.site}/{o.gate}"',
    ),
    Row(
        "GET",
        "/api/doors",
        get(lambda o, e: "/api/doors"),
        staff(STAFF_ALL, 200, api=True, scoped=False),
        mark=lambda o: f'"{o.site}/{o.gate}"',
    ),
    Row(
        "POST",
        "/api/doors/{site}/{door}/unlock",
        post(lambda o, e: f"/api/doors/{o.site}/{o.gate}/unlock", json_=lambda o: {"reason": "matrix"}),
        staff(GUARDS, 503, api=True),
        note="503: authorized, and no broker to send it",
    ),
    Row(
        "GET",
        "/api/doors/commands",
        get(lambda o, e: "/api/doors/commands"),
        staff(STAFF_ALL, 200, api=True, scoped=False),
        mark=lambda o: o.unlock_cmd,
    ),
    Row(
        "GET",
        "/api/doors/commands/{id}",
        get(lambda o, e: f"/api/doors/commands/{o.unlock_cmd}"),
        staff(STAFF_ALL, 200, api=True),
    ),
    # -- visitors at the guardroom (visitors.py)
    Row(
        "GET",
        "/visitors",
        get(lambda o, e: "/visitors"),
        staff(GUARDS, 200, scoped=False),
        mark=lambda o: o.visitor_name,
    ),
    Row(
        "POST",
        "/visitors",
        post(
            lambda o, e: "/visitors",
            form=lambda o: {
                "name": "Walk-in",
                "house": "3-2-301",
                "site": o.site,
                "hours": "4",
                "uses": "2",
                "start": "",
                "note": "",
            },
        ),
        staff(GUARDS, 303, other=400),
        note="another site's house: refused as an unknown house (400)",
    ),
    Row("GET", "/visitors/{id}", get(lambda o, e: f"/visitors/{o.visitor_id}"), staff(GUARDS, 200)),
    Row("GET", "/api/visitors/{id}", get(lambda o, e: f"/api/visitors/{o.visitor_id}"), staff(GUARDS, 200, api=True)),
    Row(
        "GET",
        "/api/visitors/house",
        get(lambda o, e: f"/api/visitors/house?house=3-2-301&site={o.site}"),
        staff(GUARDS, 200, api=True, scoped=False),
        mark=lambda o: f'"site": "{o.site}"',
    ),
    # -- revoking passes and blocking people (revocation_views.py)
    Row(
        "GET",
        "/revocations",
        get(lambda o, e: f"/revocations?q=3-2-301&site={o.site}"),
        staff(GUARDS, 200, scoped=False),
        mark=lambda o: o.visitor_name,
        note="another site's house is not found: its visitors do not show",
    ),
    Row(
        "POST",
        "/revocations",
        post(
            lambda o, e: "/revocations",
            form=lambda o: {
                "action": "revoke",
                "target": f"visitor:{o.spare_visitors.pop()}",
                "reason": "matrix",
                "q": "",
                "confirmed": "yes",
            },
        ),
        staff(GUARDS, 303, other=400),
        note="another site's visitor: refused as unknown (400)",
    ),
    Row(
        "POST",
        r"/revocations/{id}/lift",
        post(lambda o, e: f"/revocations/{o.blocks.pop()}/lift", form=lambda o: {"reason": "matrix"}),
        staff(GUARDS, 303),
    ),
    Row(
        "GET",
        "/p/{code}/visitors",
        get(lambda o, e: f"/p/{o.plate_house}/visitors"),
        phone(200, 403, 303),
        mark=lambda o: f'data-vpass="{o.vpass_id}"',
        viewer="resident",
    ),
    Row(
        "POST",
        "/p/{code}/visitors/{id}/cancel",
        post(lambda o, e: f"/p/{o.plate_house}/visitors/{o.vpass_id}/cancel", form=lambda o: {}),
        phone(303, 403, 303),
        note="another house's plate: not a resident there",
    ),
    Row(
        "POST",
        "/p/{code}/visitors/{id}/cancel",
        post(lambda o, e: f"/p/{e.n.plate_house}/visitors/{o.vpass_id}/cancel", form=lambda o: {}),
        phone(303, 404, 303),
        note="the own plate, another house's pass: as if there were none",
    ),
    # -- the access log (access_log.py)
    Row(
        "GET",
        "/api/access-log",
        get(lambda o, e: f"/api/access-log?site={o.site}"),
        staff(GUARDS, 200, api=True, scoped=False),
        mark=lambda o: o.access_event,
    ),
    Row(
        "GET",
        "/access-log",
        get(lambda o, e: "/access-log"),
        staff(GUARDS, 200, scoped=False),
        mark=lambda o: f"{o.tag.upper()}-gate-label",
    ),
    Row(
        "GET",
        "/access-log.csv",
        get(lambda o, e: f"/access-log.csv?site={o.site}"),
        staff(GUARDS, 200, scoped=False),
        mark=lambda o: o.access_event,
    ),
    # -- the alarm board and reports (board.py, reports.py)
    Row(
        "GET",
        "/board",
        get(lambda o, e: "/board"),
        staff(GUARDS, 200, scoped=False),
        mark=lambda o: f'data-site="{o.site}"',
    ),
    Row(
        "GET",
        "/board/map",
        get(lambda o, e: f"/board/map?site={o.site}"),
        staff(GUARDS, 200),
        mark=lambda o: f'data-site="{o.site}"',
    ),
    Row("GET", "/sound", get(lambda o, e: "/sound"), staff(GUARDS, 200, scoped=False)),
    # -- the centre's console (portal/centre/): every estate of the viewer's sites, none of the others
    Row(
        "GET",
        "/centre",
        get(lambda o, e: "/centre"),
        staff(GUARDS, 200, scoped=False),
        mark=lambda o: f'data-site="{o.site}"',
    ),
    Row(
        "GET",
        "/centre/estates",
        get(lambda o, e: "/centre/estates"),
        staff(GUARDS, 200, scoped=False),
        mark=lambda o: f'data-site="{o.site}"',
    ),
    Row(
        "GET",
        "/api/centre",
        get(lambda o, e: "/api/centre"),
        staff(GUARDS, 200, api=True, scoped=False),
        mark=lambda o: f'"site": "{o.site}"',
    ),
    Row("GET", "/board/notifications", get(lambda o, e: "/board/notifications"), staff(GUARDS, 200, scoped=False)),
    Row(
        "POST",
        "/board/notifications/test",
        post(lambda o, e: "/board/notifications/test", form=lambda o: {"channel": "none-configured"}),
        staff(ADMIN, 404, scoped=False),
        note="404: no such channel (none configured here)",
    ),
    Row(
        "POST",
        "/api/board/ack",
        post(lambda o, e: "/api/board/ack", json_=lambda o: {"kind": "fault", "upto": 0}),
        staff(GUARDS, 200, api=True, scoped=False),
    ),
    Row(
        "POST",
        "/api/incidents/{id}/phones",
        post(lambda o, e: f"/api/incidents/{o.incident_id}/phones", json_=lambda o: {"reason": "matrix"}),
        staff(GUARDS, 200, api=True),
        note="a fence incident: no flat, residents null",
    ),
    # -- site plans drawn on the web (plans.py)
    Row(
        "GET",
        "/admin/sitemap",
        get(lambda o, e: "/admin/sitemap"),
        staff(FITTERS, 200, scoped=False),
        mark=lambda o: f'data-site="{o.site}"',
    ),
    Row("GET", "/admin/sitemap/{site}", get(lambda o, e: f"/admin/sitemap/{o.site}"), staff(FITTERS, 200)),
    Row("GET", "/board/plan/{site}/image", get(lambda o, e: f"/board/plan/{o.site}/image"), staff(STAFF_ALL, 200)),
    Row(
        "POST",
        "/admin/sitemap/{site}/image",
        post(lambda o, e: f"/admin/sitemap/{o.site}/image", form=lambda o: {"width": "8", "height": "8"}),
        staff(FITTERS, 400),
        note="400: the picture decides the size (and a plan is at least 10 units a side)",
    ),
    Row(
        "POST",
        "/admin/sitemap/{site}/marks",
        post(
            lambda o, e: f"/admin/sitemap/{o.site}/marks",
            form=lambda o: {"kind": "door", "name": f"{o.tag}-extra", "label": "extra", "points": "4,4"},
        ),
        staff(FITTERS, 303),
    ),
    Row(
        "POST",
        "/admin/sitemap/{site}/marks/delete",
        post(
            lambda o, e: f"/admin/sitemap/{o.site}/marks/delete",
            form=lambda o: {"kind": "door", "name": f"{o.tag}-extra"},
        ),
        staff(FITTERS, 200),
        note="it asks first",
    ),
    Row(
        "POST",
        "/admin/sitemap/{site}/marks/delete",
        post(
            lambda o, e: f"/admin/sitemap/{o.site}/marks/delete",
            form=lambda o: {"kind": "door", "name": f"{o.tag}-extra", "confirmed": "yes"},
        ),
        staff(FITTERS, frozenset({303, 404})),
        note="the first allowed principal removes it; then it is gone (404)",
    ),
    Row(
        "POST",
        "/admin/sitemap/{site}/delete",
        post(lambda o, e: f"/admin/sitemap/{o.site}/delete", form=lambda o: {}),
        staff(FITTERS, 200),
        note="it asks first",
    ),
    # -- guard stations (stations.py)
    Row("GET", "/stations", get(lambda o, e: "/stations"), staff(GUARDS, 200, scoped=False)),
    Row(
        "POST",
        "/stations",
        post(lambda o, e: "/stations", form=lambda o: {"name": f"岗亭{uniq()}"}),
        staff(ADMIN, 303, scoped=False),
        fresh=True,
    ),
    Row(
        "POST",
        "/stations/{id}/revoke",
        post(lambda o, e: "/stations/999999/revoke", form=lambda o: {}),
        staff(ADMIN, 404, scoped=False),
        note="404: no such station",
    ),
    Row(
        "GET",
        "/api/board",
        get(lambda o, e: "/api/board"),
        staff(GUARDS, 200, api=True, scoped=False),
        mark=lambda o: o.fence,
    ),
    Row(
        "GET",
        "/api/incidents/{id}",
        get(lambda o, e: f"/api/incidents/{o.incident_id}"),
        staff(GUARDS, 200, api=True),
        mark=lambda o: o.fence,
    ),
    Row(
        "POST",
        "/api/incidents/{id}/{action}",
        post(lambda o, e: f"/api/incidents/{o.incident_id}/note", json_=lambda o: {"text": "checked"}),
        staff(GUARDS, 200, api=True),
    ),
    Row(
        "POST",
        "/api/board/arm",
        post(
            lambda o, e: "/api/board/arm",
            json_=lambda o: {"site": o.site, "gateway": GW, "group": "perimeter", "action": "disarm"},
        ),
        staff(GUARDS, 503, api=True),
        note="503: authorized, and no broker to send it",
    ),
    Row("GET", "/reports", get(lambda o, e: "/reports"), staff(GUARDS, 200, scoped=False), mark=lambda o: o.fence),
    Row(
        "GET",
        "/reports.csv",
        get(lambda o, e: "/reports.csv"),
        staff(GUARDS, 200, scoped=False),
        mark=lambda o: o.fence,
    ),
    # -- care for residents living alone (portal/care): the office only; residents for their own flat; guards see a
    # household only through an incident at it
    Row("GET", "/care", get(lambda o, e: "/care"), staff(ADMIN, 200, scoped=False), mark=lambda o: o.contact),
    Row(
        "GET",
        "/care/new",
        get(lambda o, e: f"/care/new?site={o.site}&house=3-1-101"),
        staff(ADMIN, 200),
        note="a flat with nobody living there: the form, no one to choose",
    ),
    Row(
        "POST",
        "/care",
        post(
            lambda o, e: "/care",
            form=lambda o: {
                "site": o.site,
                "house": "3-1-101",
                "contact_name": "某人",
                "contact_phone": "13600000009",
                "hours": "24",
            },
        ),
        staff(ADMIN, 400),
        note="400: nobody lives in 3-1-101 to be cared for",
    ),
    Row("GET", "/care/{id}", get(lambda o, e: f"/care/{o.care_id}"), staff(ADMIN, 200), mark=lambda o: o.contact),
    Row(
        "POST",
        "/care/{id}",
        post(lambda o, e: f"/care/{o.care_id}", form=lambda o: {"action": "update", "contact_phone": "12"}),
        staff(ADMIN, 400),
        note="400: a bad number, nothing changed",
    ),
    Row(
        "GET",
        "/p/{code}/care",
        get(lambda o, e: f"/p/{o.plate_house}/care"),
        phone(200, 403, 303),
        mark=lambda o: o.resident_name,
        viewer="resident",
    ),
    Row(
        "POST",
        "/p/{code}/care",
        post(
            lambda o, e: f"/p/{o.plate_house}/care",
            form=lambda o: {"action": "update", "person": "0", "contact_name": "某人", "contact_phone": "1"},
        ),
        phone(400, 403, 303),
        note="400: a bad form from the flat's own resident, nothing changed",
    ),
    Row(
        "POST",
        "/p/{code}/care/ok",
        post(lambda o, e: f"/p/{o.plate_house}/care/ok", form=lambda o: {}),
        phone(303, 403, 303),
    ),
    Row(
        "POST",
        "/api/care/incidents/{id}/contact",
        post(lambda o, e: f"/api/care/incidents/{o.care_incident}/contact", json_=lambda o: {"reason": "matrix"}),
        staff(GUARDS, 200, api=True),
        mark=lambda o: "13600000009",
    ),
    # -- patrols (portal/patrol): the office manages checkpoints and routes; guards scan and read the report
    Row("GET", "/patrol", get(lambda o, e: f"/patrol?site={o.site}"), staff(ADMIN, 200), mark=lambda o: o.checkpoint),
    Row(
        "POST",
        "/patrol/checkpoints",
        post(lambda o, e: "/patrol/checkpoints", form=lambda o: {"site": o.site, "name": f"cp{uniq()}"}),
        staff(ADMIN, 303),
    ),
    Row(
        "POST",
        "/patrol/checkpoints/{id}",
        post(
            lambda o, e: f"/patrol/checkpoints/{o.checkpoint_id}", form=lambda o: {"action": "place", "x": "", "y": ""}
        ),
        staff(ADMIN, 303),
    ),
    Row(
        "GET",
        "/patrol/plates",
        get(lambda o, e: f"/patrol/plates?site={o.site}"),
        staff(ADMIN, 200),
        mark=lambda o: o.checkpoint,
    ),
    Row("GET", "/patrol/plates.pdf", get(lambda o, e: f"/patrol/plates.pdf?site={o.site}"), staff(ADMIN, SHEET)),
    Row(
        "GET",
        "/patrol/routes/{id}",
        get(lambda o, e: f"/patrol/routes/{o.route_id}"),
        staff(ADMIN, 200),
        mark=lambda o: o.checkpoint,
    ),
    Row(
        "POST",
        "/patrol/routes",
        post(lambda o, e: "/patrol/routes", form=lambda o: {"site": o.site, "name": "r"}),
        staff(ADMIN, 400),
        note="400: no times, no checkpoints",
    ),
    Row(
        "POST",
        "/patrol/routes/{id}",
        post(lambda o, e: f"/patrol/routes/{o.route_id}", form=lambda o: {"name": ""}),
        staff(ADMIN, 400),
        note="400: a bad form, nothing changed",
    ),
    Row(
        "GET",
        "/patrol/report",
        get(lambda o, e: "/patrol/report"),
        staff(GUARDS, 200, scoped=False),
        mark=lambda o: f"{o.site}-route",
    ),
    Row(
        "GET",
        "/patrol/report.csv",
        get(lambda o, e: "/patrol/report.csv"),
        staff(GUARDS, 200, scoped=False),
        mark=lambda o: f"{o.site}-route",
    ),
    Row("GET", "/g", get(lambda o, e: "/g"), staff(GUARDS, 200, scoped=False), mark=lambda o: f"{o.site}-route"),
    Row(
        "GET",
        "/g/c/{code}",
        get(lambda o, e: f"/g/c/{o.checkpoint_code}"),
        staff(GUARDS, 200),
        mark=lambda o: o.checkpoint,
    ),
    Row(
        "POST",
        "/g/c/{code}",
        post(lambda o, e: f"/g/c/{o.checkpoint_code}", form=lambda o: {"nonce": "x"}),
        staff(GUARDS, 409),
        note="409: no scan page was opened for this token",
    ),
    Row(
        "GET",
        "/g/scans/{id}",
        get(lambda o, e: f"/g/scans/{o.scan_id}"),
        staff(GUARDS, 200),
        mark=lambda o: o.checkpoint,
        note="a guard sees their own scans only",
    ),
]


def app_routes(p: Portal) -> set[tuple[str, str]]:
    out = set()
    for r in p.client.server.app.router.routes():
        out.add((r.method, r.resource.canonical if r.resource is not None else "?"))
    return out


# ---------------------------------------------------------------- running a cell


async def call(e: Estate, who: Who, req: Req) -> tuple[int, str]:
    e.step()
    headers = {"Origin": e.p.origin, "X-CSRF-Token": who.csrf}
    if req.ws:
        try:
            ws = await who.http.ws_connect(req.url, headers={"Origin": e.p.origin})
        except aiohttp.WSServerHandshakeError as err:
            return err.status, ""
        await ws.close()
        return 101, ""
    kw: dict[str, Any] = {}
    if req.json is not None:
        kw["json"] = req.json
    elif req.form is not None:
        kw["data"] = req.form
    elif req.body is not None:
        kw["data"] = req.body
        headers["Content-Type"] = req.ctype
    async with who.http.request(req.method, req.url, headers=headers, allow_redirects=False, **kw) as r:
        return r.status, (await r.read()).decode("utf-8", "replace")


async def test_every_route_every_role_own_and_someone_elses_object(tmp_path: Path) -> None:
    offset = [0.0]

    def mono() -> float:
        return time.monotonic() + offset[0]

    def step() -> None:
        offset[0] += 3600.0

    grid = grid_yaml(tmp_path, f"http://127.0.0.1:{free_port()}/api/v1", site="north")  # north reports up
    cfg = write_config(tmp_path, None, gateways=[("north", GW), ("south", GW)], extra=SITE_MAPS + grid)
    async with running_portal(cfg, Options(monotonic=mono)) as p:
        e = await build_estate(p, step)
        routes = app_routes(p)
        covered = {(r.method, r.route) for r in ROWS}
        missing = sorted(k for k in routes if k[0] != "HEAD" and k not in covered)
        assert not missing, f"routes without a row in the access table: {missing}"
        stale = sorted(covered - routes)
        assert not stale, f"rows for routes the app does not have: {stale}"
        heads = sorted(k for k in routes if k[0] == "HEAD" and ("GET", k[1]) not in covered)
        assert not heads, f"HEAD routes without their GET row: {heads}"

        main = {k: await make_who(e, k) for k in WHO}
        wrong: list[str] = []
        cells = requests = 0
        try:
            for row in ROWS:
                for kind in WHO:
                    for side in SIDES:
                        who = await make_who(e, kind, fresh=True) if row.fresh else main[kind]
                        try:
                            req = row.req(e.side(side), e)
                            status, text = await call(e, who, req)
                        finally:
                            if row.fresh:
                                await who.http.close()
                        cells += 1
                        requests += 1
                        want = row.expect(kind, side)
                        ok = status in want if isinstance(want, frozenset) else status == want
                        where = f"{row.method} {req.url} as {kind} ({'own' if side == 'N' else 'other'})"
                        if not ok:
                            wrong.append(f"{where}: {status}, expected {want} {row.note}".rstrip())
                        elif row.mark is not None and 200 <= status < 300:
                            shown = row.mark(e.side(side)) in text
                            if shown != sees(row, kind, side):
                                wrong.append(f"{where}: {row.mark(e.side(side))!r} {'shown' if shown else 'missing'}")
                    if row.fresh and kind == "resident":  # a password change ends every session of the person
                        await main["resident"].http.close()
                        main["resident"] = await make_who(e, "resident")
        finally:
            for w in main.values():
                await w.http.close()
        n_routes = len({k for k in routes if k[0] != "HEAD"})
        print(
            f"\naccess matrix: {len(routes)} routes ({n_routes} without HEAD), {len(ROWS)} table rows, "
            f"{cells} cells checked"
        )
        assert not wrong, "access table mismatches:\n" + "\n".join(wrong)


# ---------------------------------------------------------------- the console socket


async def _messages(
    ws: aiohttp.ClientWebSocketResponse, until: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Messages up to and including the first that ``until`` accepts."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            m = json.loads(msg.data)
            out.append(m)
            if until(m):
                return out


def _sites_in(messages: list[dict[str, Any]]) -> set[str]:
    found = set()
    for m in messages:
        body = m.get("event") or m.get("incident") or m.get("door") or m.get("command") or m.get("group") or {}
        if "gateway" in body and isinstance(body.get("gateway"), str) and "/" in body["gateway"]:
            found.add(body["gateway"].split("/", 1)[0])  # a console event row names "site/gateway"
        elif body.get("site"):
            found.add(body["site"])
    return found


async def test_console_socket_pushes_only_the_users_sites(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, None, gateways=[("north", GW), ("south", GW)], extra=SITE_MAPS)
    async with running_portal(cfg) as p:
        e = await build_estate(p, lambda: None)
        first = e.n.alarm_event
        guard = await staff_who(p, "guard", "guard-n")
        admin = await staff_who(p, "admin", "office")
        try:
            # The backlog (what a reconnecting console missed) is filtered too.
            gws = await guard.http.ws_connect(f"/ws?after={first}", headers={"Origin": p.origin})
            aws = await admin.http.ws_connect(f"/ws?after={first}", headers={"Origin": p.origin})
            got = await _messages(gws, lambda m: m.get("kind") == "event" and "north" in m["event"]["gateway"])
            assert _sites_in(got) == {"north"}, got
            # South first, then north: a south message would be queued before the north one that ends the wait.
            for side in (e.s, e.n):
                t = side.tag
                await p.services.store.write(
                    StoreBatch(
                        wire.batch_events(
                            side.site,
                            GW,
                            [
                                _event(
                                    side.site,
                                    10,
                                    "zone.alarm",
                                    {"zone": f"Q-{t}"},
                                    {"incident": f"J-{t}", "count": 1, "label": f"{t}-late"},
                                    wire.Priority.INTRUSION,
                                ),
                                _event(
                                    side.site,
                                    11,
                                    "door.state",
                                    {"door": side.gate},
                                    {"door": side.gate, "state": "forced"},
                                ),
                            ],
                        )
                    )
                )
                await p.client.server.app[BOARD].feed_now()
                place = await p.services.store.read(lambda c, side=side: reg.house_place(c, side.house_id))
                assert place is not None
                await estate(p).raise_sos(place, "matrix-token")  # a portal-raised event goes out on the hub too
            r = await p.client.post(
                "/api/board/arm",
                json={"site": "south", "gateway": GW, "group": "perimeter", "action": "arm"},
                headers={"Origin": p.origin, "X-CSRF-Token": await _csrf(p)},
            )
            assert r.status == 503
            r = await p.client.post(
                "/api/board/arm",
                json={"site": "north", "gateway": GW, "group": "perimeter", "action": "arm"},
                headers={"Origin": p.origin, "X-CSRF-Token": await _csrf(p)},
            )
            assert r.status == 503

            def last_north_arm(m: dict[str, Any]) -> bool:
                c = m.get("command") or {}
                return m.get("kind") == "arm_command" and c.get("site") == "north" and c.get("status") == "unsent"

            seen_guard = await _messages(gws, last_north_arm)
            seen_admin = await _messages(aws, last_north_arm)
            kinds = {m["kind"] for m in seen_guard}
            assert {"incident", "door", "event", "arm_command"} <= kinds, kinds
            assert _sites_in(seen_guard) == {"north"}, [m for m in seen_guard if _sites_in([m]) != {"north"}]
            assert _sites_in(seen_admin) == {"north", "south"}

            # Changing the guard's sites closes their console, which reconnects under the new scope.
            r = await p.client.post(
                "/users/guard-n/sites",
                data={"sites": "north,south", "csrf": await _csrf(p)},
                headers={"Origin": p.origin},
                allow_redirects=False,
            )
            assert r.status == 303
            closing = await gws.receive(timeout=10.0)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closing
            assert gws.close_code == 1013
            await gws.close()
            await aws.close()
        finally:
            await guard.http.close()
            await admin.http.close()


async def _csrf(p: Portal) -> str:
    return csrf_of(await (await p.client.get("/users")).text())


# ---------------------------------------------------------------- python -m portal adduser --sites


def test_adduser_sites_are_checked_against_the_registry(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, None)
    pw = tmp_path / "pw"
    pw.write_text(PW + "\n")

    def adduser(user: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "portal",
                "adduser",
                "--config",
                str(cfg),
                "--user",
                user,
                "--password-file",
                str(pw),
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    # An empty registry: the ids are taken as given (the estate is imported later).
    r = adduser("early", "--role", "guard", "--sites", "north,south")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sites"] == ["north", "south"]
    db = load(cfg).db_path
    conn = open_db(db)
    try:
        reg.ensure_site(conn, "north", "北苑")
        early = get_user(conn, "early")
        assert early is not None and early.sites == ("north", "south")
    finally:
        conn.close()
    r = adduser("late", "--role", "installer", "--sites", "north,mars")
    assert r.returncode == 2 and "unknown site" in r.stderr and "mars" in r.stderr and "north" in r.stderr
    r = adduser("bad", "--role", "guard", "--sites", "no/slash")
    assert r.returncode == 2 and "not a site id" in r.stderr
    r = adduser("boss", "--role", "admin", "--sites", "north")
    assert r.returncode == 2 and "every site" in r.stderr
    r = adduser("late", "--role", "installer", "--sites", "north")
    assert r.returncode == 0, r.stderr
    conn = open_db(db)
    try:
        assert [get_user(conn, u) is None for u in ("bad", "boss")] == [True, True]
        late = get_user(conn, "late")
        assert late is not None and late.sites == ("north",) and late.sees_site("north")
        assert not late.sees_site("south")
    finally:
        conn.close()
