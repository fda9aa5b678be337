"""An estate as its people made it, for the screen tests: a real portal process with a real Mosquitto, filled through
the portal's own pages and API (the administrator's first sign-in, staff accounts, the registry import, doors, a
plan drawn on the web, a guardroom visitor, a resident signed in with the office's one-time code, their report and
visitor pass, a stranger's registration request) and through MQTT as the gateway speaks (its status, an alarm, door
states, access decisions, a tamper, an indoor panel's burglary, an armed group).

:func:`seeded_estate` yields a :class:`Seeded` with everything a page walk needs: addresses, ids, credentials, and
:attr:`Seeded.data`, every string a person typed in (names, labels, codes), which the translation test allows
through in either language.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image
from ulid import ULID

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from portal.config import load
from portal.patrol import model as patrol_model
from portal.store import connect, storekey
from tests.portal_support import (
    GATEWAY,
    SITE,
    Device,
    PortalProcess,
    batch_payload,
    devices,
    mqtt,
    next_ack,
    portal_process,
    write_config,
)
from tests.registry_support import PEOPLE, estate_csv, plate_code_of

PUBLIC_URL = "https://wy.example.cn"
ADMIN, ADMIN_PW = "office", "office-password-0001"
GUARD, GUARD_PW = "guard1", "guard-password-0001"
INSTALLER, INSTALLER_PW = "fitter1", "fitter-password-0001"
RESIDENT_PHONE, RESIDENT_PW = "13812345678", "resident-password-01"  # 张伟, owner of 3-2-301
OTC_RE = re.compile(r"一次性登录码：([A-Z0-9]{5}-[A-Z0-9]{5})")
GW_NAME = "1号楼机房"
SILENT_GW, SILENT_GW_NAME = "gw2", "5号楼机房"  # installed in the config, never switched on
DOORS = [  # door, building, unit, gate, label, gateway
    ("north-gate", "", "", True, "北门", GATEWAY),
    ("b3u2", "3", "2", False, "3幢2单元门", GATEWAY),
    ("b3u1", "3", "1", False, "3幢1单元门", GATEWAY),  # registered, but the gateway's config names it otherwise
    ("b5u1", "5", "1", False, "5幢1单元门", SILENT_GW),
]
EXTRA = f"""
public_url: {PUBLIC_URL}
doors: {{unlock_wait_s: 1.0}}
sites:
  - site: {SITE}
    office_phone: "0571-8888 1234"
    office_hours: "8:00-20:00"
    guardroom_phone: "0571-8888 1110"
    emergency:
      - {{kind: police, number: "110"}}
      - {{kind: fire, number: "119"}}
      - {{kind: ambulance, number: "120"}}
      - {{kind: other, label: 燃气抢修, number: "96777"}}
notify:
  channels:  # a supervisor's mailbox behind a mail server that is not there: deliveries fail, and say so
    - {{name: boss, kind: email, label: 值班主管邮箱, smtp_host: 127.0.0.1, smtp_port: 1, smtp_security: none,
       sender: gatehouse@example.cn, to: [boss@example.cn], min_priority: 40}}
alarms:
  guards: [张三, 李四]
  groups: [{{site: {SITE}, gateway: {GATEWAY}, group: perimeter, label: 周界}}]
"""
#: What people typed in, shown as typed on every page, whatever its language.
TYPED = [
    ADMIN,
    GUARD,
    INSTALLER,
    "admin",
    SITE,
    GATEWAY,
    GW_NAME,
    SILENT_GW,
    SILENT_GW_NAME,
    "阳光花园",
    "北围栏",
    "南围栏",
    "周界",
    "3号楼",
    "值班主管邮箱",
    "北门岗亭",
    "3幢车库",
    "夜间巡逻",
    "女儿",
    "张伟本人",
    "13655556666",
    "张三",
    "李四",
    "刘访客",
    "送家具",
    "陈静",
    "燃气抢修",
    "楼道灯不亮",
    "厨房水管漏水",
    "岗亭一号",
    "P1",
    "P2",
    "perimeter",
    "panel-1",
    "ctl-north-gate",
    "ctl-b3u2",
    "io-1",
    "ipanel-1",
    "快递员送大件",
    "0571-8888 1234",
    "8:00-20:00",
    "0571-8888 1110",
    "客厅红外",
    "qr-1",
    "contact",
    "reader",
    "tamper",
    "in1",
    "zone3",
    *[d[0] for d in DOORS],
    *[d[4] for d in DOORS],
    *[p[3] for p in PEOPLE],
]


@dataclass
class Seeded:
    pp: PortalProcess
    url: str  # the portal's origin, no trailing slash
    cfg: Path
    house_code: str  # the plate on 3-2-301's door
    entrance_code: str  # the plate at 3-2's entrance
    vacant_code: str  # the plate of 3-1-102 (nobody lives there)
    house_id: int
    building_id: int
    visitor_id: int  # the guardroom's visitor
    visitor_token: str  # the resident's visitor pass link
    pending_id: int  # 陈静's request for 3-2-301
    work_id: int
    data: list[str] = field(default_factory=lambda: list(TYPED))
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def users(self) -> dict[str, tuple[str, str]]:
        return {"admin": (ADMIN, ADMIN_PW), "guard": (GUARD, GUARD_PW), "installer": (INSTALLER, INSTALLER_PW)}


def store_connection(cfg: Path) -> Any:
    """A read connection to the store of the portal with config ``cfg``, on whichever engine it runs (the
    GATEHOUSE_TEST_STORE of tests/pg_support.py), carrying its store key."""
    conf = load(cfg)
    return connect(conf.store_target, readonly=True, key=storekey.load(conf.key_path))


def plate_of(cfg: Path, building: str, unit: str, house: str | None = None) -> str:
    """The code printed on a plate of that portal (an entrance's without ``house``)."""
    c = store_connection(cfg)
    try:
        return plate_code_of(c, building, unit, house)
    finally:
        c.close()


def plan_png(width: int = 800, height: int = 500) -> bytes:
    """A plan picture: green ground, grey blocks (a stand-in for the developer's layout drawing)."""
    im = Image.new("RGB", (width, height), (226, 236, 220))
    for x0, y0 in ((100, 120), (400, 120)):
        for x in range(x0, x0 + 160):
            for y in range(y0, y0 + 90):
                im.putpixel((x, y), (200, 205, 214))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _ev(
    seq: int,
    etype: str,
    prio: int,
    place: dict[str, str],
    data: dict[str, Any],
    device: str = "panel-1",
    point: str | None = "in1",
    at: datetime | None = None,
) -> wire.Event:
    ts = (at or datetime.now(UTC)) + timedelta(milliseconds=seq)
    return wire.Event(
        id=str(ULID.from_datetime(ts)),
        seq=seq,
        ts=ts,
        type=etype,
        device=device,
        point=point,
        place=wire.Place(site=SITE, **place),
        priority=prio,
        data=data,
    )


def gateway_events() -> list[wire.Event]:
    """What a gateway of this estate sends in its first minutes: doors, a fence alarm and its restore, a refused and
    an accepted pass, a tamper, a dead input board, an indoor panel's burglary, the perimeter armed."""
    p = wire.Priority
    return [
        _ev(
            1,
            "door.state",
            p.ROUTINE,
            {"door": "north-gate"},
            {"door": "north-gate", "state": "closed"},
            "ctl-north-gate",
            "contact",
        ),
        _ev(
            2,
            "zone.alarm",
            p.INTRUSION,
            {"zone": "P1"},
            {
                "zone": "P1",
                "zone_type": "perimeter",
                "kind": "intrusion",
                "cause": "instant",
                "group": "perimeter",
                "label": "北围栏",
                "incident": "I-P1",
                "count": 1,
            },
        ),
        _ev(
            3,
            "zone.restore",
            p.ROUTINE,
            {"zone": "P1"},
            {"zone": "P1", "kind": "intrusion", "label": "北围栏", "incident": "I-P1", "count": 3, "how": "restored"},
        ),
        _ev(
            4,
            "access.granted",
            p.ROUTINE,
            {"door": "north-gate"},
            {
                "door": "north-gate",
                "reader": "qr-1",
                "pass_id": "ab" * 12,
                "kind": "resident",
                "subject": "r:0a9b8c7d6e5f403122334455",
                "house": "3-2-301",
                "uses_left": None,
            },
            "ctl-north-gate",
            "reader",
        ),
        _ev(
            5,
            "access.denied",
            p.ROUTINE,
            {"door": "north-gate"},
            {
                "door": "north-gate",
                "reader": "qr-1",
                "reason": "expired",
                "pass_id": "cd" * 12,
                "subject": "v:5f1e2d3c4b5a69788796a5b4",
                "house": "3-2-302",
                "detail": "",
            },
            "ctl-north-gate",
            "reader",
        ),
        _ev(
            6,
            "door.tamper",
            p.TAMPER,
            {"door": "b3u2", "building": "3", "unit": "2"},
            {"door": "b3u2"},
            "ctl-b3u2",
            "tamper",
        ),
        _ev(7, "device.offline", p.FAULT, {}, {"reason": "no answer"}, "io-1", None),
        _ev(
            8,
            "panel.alarm",
            p.INTRUSION,
            {"building": "3", "unit": "1", "house": "101"},
            {
                "panel": "ipanel-1",
                "account": "1234",
                "code": 130,
                "qualifier": "new",
                "zone": 3,
                "kind": "intrusion",
                "name_en": "Burglary",
                "name_zh": "盗警",
                "label": "客厅红外",
            },
            "ipanel-1",
            "zone3",
        ),
        _ev(
            9,
            "group.armed",
            p.ROUTINE,
            {},
            {"group": "perimeter", "label": "周界", "mode": "away", "by": "panel", "source": "panel"},
        ),
        _ev(
            10,
            "zone.alarm",
            p.INTRUSION,
            {"zone": "P2"},
            {
                "zone": "P2",
                "zone_type": "perimeter",
                "kind": "fence_cut",
                "cause": "instant",
                "group": "perimeter",
                "label": "南围栏",
                "incident": "I-P2",
                "count": 2,
            },
        ),
    ]


async def _form(d: Device, path: str, data: dict[str, str], *, status: int = 303) -> Any:
    r = await d.post(path, data)
    assert r.status == status, (path, r.status, (await r.text())[-600:])
    return r


async def _first_sign_in(d: Device, user: str, one_time: str, password: str) -> None:
    r = await d.sign_in(user, one_time)
    assert r.status == 303 and r.headers["Location"] == "/password", r.status
    await _form(d, "/password", {"current": one_time, "new": password, "confirm": password})


@contextlib.asynccontextmanager
async def seeded_estate(tmp_path: Path, broker: MosquittoProcess) -> AsyncIterator[Seeded]:
    cfg = write_config(tmp_path / "portal", broker, extra=EXTRA, gateways=[(SITE, GATEWAY), (SITE, SILENT_GW)])
    text = cfg.read_text(encoding="utf-8").replace(f"name: '{GATEWAY} 机房'", f"name: '{GW_NAME}'")
    cfg.write_text(text.replace(f"name: '{SILENT_GW} 机房'", f"name: '{SILENT_GW_NAME}'"), encoding="utf-8")
    with portal_process(cfg) as pp:
        assert pp.first_admin is not None
        url = pp.url.rstrip("/")
        async with devices(url) as new, mqtt(broker) as gw:
            office, guard, fitter = new(), new(), new()
            # The administrator's first sign-in (the one-time password from its 0600 file); the staff's accounts; the
            # office's own administrator account, after which the built-in one is switched off.
            first = Path(pp.first_admin["password_file"]).read_text(encoding="utf-8").strip()
            await _first_sign_in(office, "admin", first, "admin-password-0001")
            for name, role, pw in (
                (GUARD, "guard", GUARD_PW),
                (INSTALLER, "installer", INSTALLER_PW),
                (ADMIN, "guard", ADMIN_PW),
            ):
                await _form(
                    office, "/users", {"name": name, "role": role, "password": pw + "-x", "sites": ""}, status=200
                )
            await _form(office, f"/users/{ADMIN}/role", {"role": "admin", "confirmed": "yes"})
            await _form(office, "/logout", {})
            await _first_sign_in(office, ADMIN, ADMIN_PW + "-x", ADMIN_PW)
            await _form(office, "/users/admin/disable", {"confirmed": "yes"})
            await _first_sign_in(guard, GUARD, GUARD_PW + "-x", GUARD_PW)
            await _first_sign_in(fitter, INSTALLER, INSTALLER_PW + "-x", INSTALLER_PW)

            # The registry: the import, the doors, a plan drawn on the web.
            csrf = await office.csrf("/admin/registry")
            r = await office.http.post(
                "/api/registry/import",
                data=estate_csv().encode(),
                headers={**office.headers(), "X-CSRF-Token": csrf, "Content-Type": "text/csv"},
            )
            assert r.status == 200, await r.text()
            for door, b, u, gate, label, gw_of in DOORS:
                await _form(
                    fitter,
                    "/admin/registry/doors",
                    {
                        "gateway_ref": f"{SITE}/{gw_of}",
                        "door": door,
                        "building": b,
                        "unit": u,
                        "gate": "1" if gate else "",
                        "label": label,
                    },
                )
            csrf = await fitter.csrf(f"/admin/sitemap/{SITE}")
            upload = aiohttp.FormData({"csrf": csrf})
            upload.add_field("image", plan_png(), filename="plan.png", content_type="image/png")
            r = await fitter.http.post(
                f"/admin/sitemap/{SITE}/image", data=upload, headers=fitter.headers(), allow_redirects=False
            )
            assert r.status == 303, await r.text()
            for kind, name, label, points in (
                ("zone", "P1", "北围栏", "20,20 780,20"),
                ("zone", "P2", "南围栏", "20,480 780,480"),
                ("building", "3", "3号楼", "100,120 260,210"),
                ("door", "north-gate", "北门", "400,440"),
            ):
                await _form(
                    fitter,
                    f"/admin/sitemap/{SITE}/marks",
                    {"kind": kind, "name": name, "label": label, "points": points},
                )

            # The gateway: its status (retained, as the gateway publishes it) and its first events.
            await gw.subscribe(wire.topic(SITE, GATEWAY, "ack"), qos=1)
            await gw.publish(
                wire.topic(SITE, GATEWAY, "status"),
                wire.encode(wire.Status(v=1, state="online", version="1.0")),
                qos=1,
                retain=True,
            )
            events = gateway_events()
            await gw.publish(wire.topic(SITE, GATEWAY, "events"), batch_payload(events), qos=1)
            ack = await next_ack(gw)
            assert sorted(ack.seqs) == [e.seq for e in events], ack

            # The guardroom: a visitor, a remote unlock the gateway does not answer.
            r = await _form(
                guard,
                "/visitors",
                {"name": "刘访客", "house": "3-2-301", "hours": "4", "uses": "2", "start": "", "note": "送家具"},
            )
            visitor_id = int(r.headers["Location"].rsplit("/", 1)[1])
            csrf = await guard.csrf("/doors")
            r = await guard.http.post(
                f"/api/doors/{SITE}/b3u2/unlock",
                json={"reason": "快递员送大件"},
                headers={**guard.headers(), "X-CSRF-Token": csrf},
            )
            assert r.status == 202, await r.text()

            # A resident: the office's one-time code, their own password, a report and a visitor pass.
            house_code = plate_of(cfg, "3", "2", "301")
            entrance_code = plate_of(cfg, "3", "2")
            vacant_code = plate_of(cfg, "3", "1", "102")
            hid, owner = await _ids(office, house_code)
            r = await _form(office, f"/admin/registry/residents/{owner}/code", {}, status=200)
            m = OTC_RE.search(await r.text())
            assert m, "no one-time code on the page"
            phone = new()
            r = await phone.resident_sign_in(RESIDENT_PHONE, m.group(1))
            assert r.status == 303 and r.headers["Location"].startswith("/m/password"), r.status
            await _form(phone, "/m/password", {"new": RESIDENT_PW, "confirm": RESIDENT_PW, "next": "/m"})
            await _form(phone, f"/p/{house_code}/report", {"category": "repair", "text": "厨房水管漏水"})
            r = await _form(phone, f"/p/{house_code}/visitor", {"hours": "2", "uses": "1"})
            token = r.headers["Location"].rsplit("/", 1)[1]
            # A stranger asks to be linked to the house; another reports a problem without signing in.
            stranger = new()
            await _form(
                stranger,
                f"/p/{house_code}/register",
                {
                    "name": "陈静",
                    "phone": "13900001234",
                    "role": "family",
                    "password": "stranger-pass-01",
                    "confirm": "stranger-pass-01",
                },
                status=200,
            )
            await _form(stranger, f"/p/{vacant_code}/report", {"category": "safety", "text": "楼道灯不亮"})
            # The guard takes the resident's report.
            work_id = await _work_id(guard, "厨房水管漏水")
            await _form(guard, f"/admin/registry/work/{work_id}", {"status": "acknowledged", "note": ""})
            # Patrols: two checkpoints, a night route through them, and the guard's scan of the first.
            for name in ("北门岗亭", "3幢车库"):
                await _form(office, "/patrol/checkpoints", {"site": SITE, "name": name})
            conn = store_connection(cfg)
            try:
                points = patrol_model.checkpoints(conn, site=SITE)
                zhang = int(conn.execute("SELECT id FROM reg_people WHERE phone = ?", (RESIDENT_PHONE,)).fetchone()[0])
            finally:
                conn.close()
            r = await _form(
                office,
                "/patrol/routes",
                {
                    "site": SITE,
                    "name": "夜间巡逻",
                    "starts": "00:00",
                    "ends": "23:59",
                    "every_min": "120",
                    "window_min": "60",
                    "late_min": "30",
                    "ordered": "1",
                    "guard": GUARD,
                    "active": "1",
                    **{f"at-{cp.id}": str(i + 1) for i, cp in enumerate(points)},
                },
            )
            route_id = int(r.headers["Location"].rsplit("route-", 1)[1])
            page = await (await guard.get(f"/g/c/{points[0].code}")).text()
            nonce = re.search(r'name="nonce" value="([^"]+)"', page)
            assert nonce, "no scan form"
            r = await _form(guard, f"/g/c/{points[0].code}", {"nonce": nonce.group(1)})
            scan_id = int(r.headers["Location"].rsplit("/", 1)[1].split("?")[0])
            # Care: 张伟 lives alone, with his daughter as the contact; he signed the consent.
            body = aiohttp.FormData(
                {
                    "site": SITE,
                    "house": "3-2-301",
                    "contact_name": "李娜",
                    "contact_relation": "女儿",
                    "contact_phone": "13655556666",
                    "hours": "24",
                    "night_from": "00:00",
                    "night_to": "05:00",
                    "consent_by": "张伟本人",
                    "consent_how": "written",
                    "consent_date": datetime.now(UTC).strftime("%Y-%m-%d"),
                    "person": str(zhang),
                    "csrf": await office.csrf("/care"),
                }
            )
            r = await office.http.post("/care", data=body, headers=office.headers(), allow_redirects=False)
            assert r.status == 303, await r.text()
            care_id = int(r.headers["Location"].split("/")[2].split("?")[0])
            pending_id = await _pending_id(office, "陈静")
            bid = await _building_id(office)
            yield Seeded(
                pp=pp,
                url=url,
                cfg=cfg,
                house_code=house_code,
                entrance_code=entrance_code,
                vacant_code=vacant_code,
                house_id=hid,
                building_id=bid,
                visitor_id=visitor_id,
                visitor_token=token,
                pending_id=pending_id,
                work_id=work_id,
                extra={"route": route_id, "checkpoint": points[0].code, "scan": scan_id, "care": care_id},
            )


async def _ids(office: Device, house_code: str) -> tuple[int, int]:
    """(3-2-301's house id, its owner's residency id), read off the administrator's pages."""
    html = await (await office.get("/admin/registry/buildings/" + str(await _building_id(office)))).text()
    hid = int(re.findall(r'<tr data-house="(\d+)">\s*<td><a href="/admin/registry/houses/\d+">301', html)[0])
    page = await (await office.get(f"/admin/registry/houses/{hid}")).text()
    owner = re.search(r'<tr data-resident="(\d+)">\s*<td class="name">张伟', page)
    assert owner, "no owner row"
    return hid, int(owner.group(1))


async def _building_id(d: Device) -> int:
    html = await (await d.get("/admin/registry")).text()
    return int(re.findall(r'href="/admin/registry/buildings/(\d+)">3幢<', html)[0])


async def _work_id(d: Device, text: str) -> int:
    html = await (await d.get("/admin/registry/work")).text()
    m = re.search(r'data-work="(\d+)">(?:(?!data-work).)*' + re.escape(text), html, re.S)
    assert m, "the report is not on the guards' list"
    return int(m.group(1))


async def _pending_id(d: Device, name: str) -> int:
    html = await (await d.get("/admin/registry/pending")).text()
    m = re.search(r'<tr data-resident="(\d+)">(?:(?!data-resident).)*' + re.escape(name), html, re.S)
    assert m, "the request is not pending"
    return int(m.group(1))
