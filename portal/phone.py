"""Residents' phone pages: what a door plate opens (``/p/<code>``) and the resident's own pages (``/m/...``).

Public, mobile-first, Chinese first. The public never sees a resident's name or phone number: the
house page shows the address and the property office. A signed-in resident of the house also sees
the household, issues visitor passes and shows their own access QR (refreshed by ``phone.js``).

Plate codes are looked up by their SHA-256, so an unknown code and a withdrawn one take the same
path and get the same page and status; addresses that try many unknown codes are throttled.
"""

from __future__ import annotations

import io
import logging
import secrets
import sqlite3
from datetime import datetime
from typing import Any

from aiohttp import BodyPartReader, web
from PIL import Image, UnidentifiedImageError

from portal import plates
from portal import registry as reg
from portal.auth import CSRF_HEADER, public, safe_next
from portal.estate import ESTATE, RESIDENT_MIN_PASSWORD, Estate, ResidentSession
from portal.limits import body_limit
from portal.views import render

log = logging.getLogger("portal.phone")
routes = web.RouteTableDef()

CATEGORIES = ("repair", "noise", "hygiene", "safety", "parking", "other")
VISITOR_HOURS = (2, 8, 24, 72)
PHOTO_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
MAX_TEXT = 1000


def _est(request: web.Request) -> Estate:
    return request.app[ESTATE]


def _addr(request: web.Request) -> str:
    return request.remote or "?"


def base_url(request: web.Request) -> str:
    """Where phones reach the portal: the configured public URL, else the address this request used."""
    cfg = request.app[ESTATE].cfg
    return cfg.public_url.rstrip("/") if cfg.public_url else f"{request.scheme}://{request.host}"


def page(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    ctx.setdefault("resident", None)
    resp = render(request, template, status=status, **ctx)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def throttled(request: web.Request) -> web.Response:
    return page(request, "phone_message.html", status=429, title_key="phone.busy_title", message_key="phone.busy")


async def _scan_guard(request: web.Request, *, count: bool = True) -> web.Response | None:
    """The per-address limits every plate page passes first (``count=False``: only the guessing limit)."""
    est, addr = _est(request), _addr(request)
    if est.limits["bad-code"].blocked(addr) or (count and not est.limits["scan"].allow(addr)):
        return throttled(request)
    return None


def _digest(code: str) -> str:
    """The lookup hash of a plate or visitor code; a malformed one hashes to something no code can match."""
    return reg.code_hash(code if reg.PLATE_CODE_RE.match(code) else "!" + code[:100])


async def _place(request: web.Request) -> reg.Place | None:
    digest = _digest(request.match_info["code"])
    place = await _est(request).read(lambda c: reg.lookup_plate(c, digest))
    if place is None:
        _est(request).limits["bad-code"].spend(_addr(request))
    return place


def invalid(request: web.Request) -> web.Response:
    """Unknown and withdrawn plates alike."""
    return page(request, "phone_invalid.html", status=404, path="/m/login")  # the code is not even echoed


async def _plate(request: web.Request, *, count: bool = True) -> tuple[reg.Place | None, web.Response | None]:
    guard = await _scan_guard(request, count=count)
    if guard is not None:
        return None, guard
    place = await _place(request)
    if place is None:
        return None, invalid(request)
    return place, None


async def _house_plate(request: web.Request, *, count: bool = True) -> tuple[reg.Place | None, web.Response | None]:
    place, resp = await _plate(request, count=count)
    if place is not None and place.kind != "house":
        return None, invalid(request)
    return place, resp


async def _at_plate(request: web.Request, *, house: bool = False) -> tuple[reg.Place, Estate] | web.Response:
    """The plate's place (``house``: a house plate only) and the estate, else the page to answer with."""
    place, resp = await (_house_plate(request) if house else _plate(request))
    if resp is not None:
        return resp
    assert place is not None
    return place, _est(request)


async def _at_my_house(
        request: web.Request) -> tuple[reg.Place, Estate, ResidentSession, reg.Resident | None] | web.Response:
    """A house plate page that needs a signed-in resident (else off to sign in), with their residency there."""
    got = await _at_plate(request, house=True)
    if isinstance(got, web.Response):
        return got
    place, est = got
    rs = await est.resident_session(request)
    if rs is None:
        raise _to_login(request)
    return place, est, rs, await _my_residency(est, rs, place)


def _message(request: web.Request, place: reg.Place, title_key: str, message_key: str, status: int = 200,
             **ctx: Any) -> web.Response:
    return page(request, "phone_message.html", status=status, title_key=title_key, message_key=message_key,
                place=place, code=request.match_info["code"], **ctx)


async def _my_residency(est: Estate, rs: ResidentSession | None, place: reg.Place) -> reg.Resident | None:
    """The signed-in person's residency in this house (any status), if any."""
    if rs is None or place.house_id is None:
        return None
    mine = await est.read(lambda c: reg.residencies_of(c, rs.person.id))
    return next((r for r in mine if r.house_id == place.house_id), None)


# ---------------------------------------------------------------- the plate


@routes.get("/p/{code}")
@public
async def plate_page(request: web.Request) -> web.StreamResponse:
    got = await _at_plate(request)
    if isinstance(got, web.Response):
        return got
    place, est = got
    rs = await est.resident_session(request)
    if place.kind == "entrance":
        return await _entrance(request, est, place, rs)
    return await _house(request, est, place, rs)


async def _house(request: web.Request, est: Estate, place: reg.Place, rs: ResidentSession | None,
                 **ctx: Any) -> web.Response:
    mine = await _my_residency(est, rs, place)
    today = est.today()
    household: list[reg.Resident] = []
    pending: list[reg.Resident] = []
    active = mine is not None and mine.active(today)
    if active and mine is not None and place.house_id is not None:
        hid = place.house_id
        household = await est.read(lambda c: reg.household(c, hid, statuses=("active",)))
        household = [r for r in household if r.active(today)]
        if mine.role == "owner":
            pending = await est.read(lambda c: reg.household(c, hid, statuses=("pending",)))
        assert rs is not None
        await est.audit(f"resident:{rs.person.id}", "view.household", f"house:{hid}", remote=_addr(request))
    return page(request, "phone_house.html", place=place, resident=rs, mine=mine, active=active,
                household=household, pending=pending, categories=CATEGORIES, visitor_hours=VISITOR_HOURS,
                mask=reg.mask_phone, code=request.match_info["code"], **ctx)


async def _entrance(request: web.Request, est: Estate, place: reg.Place, rs: ResidentSession | None,
                    result: str | None = None) -> web.Response:
    doors: list[reg.Door] = []
    allowed = False
    if rs is not None:
        allowed = place.unit_id in await _my_units(est, rs)
        if allowed:
            uid = place.unit_id
            doors = await est.read(lambda c: reg.doors(c, unit_id=uid))
    return page(request, "phone_entrance.html", place=place, resident=rs, allowed=allowed, doors=doors,
                result=result, code=request.match_info["code"])


async def _my_units(est: Estate, rs: ResidentSession) -> set[int]:
    """The units (entrances) the signed-in person lives in today."""
    today, pid = est.today(), rs.person.id

    def load(c: sqlite3.Connection) -> set[int]:
        out = set()
        for r in reg.residencies_of(c, pid):
            p = reg.house_place(c, r.house_id) if r.active(today) else None
            if p is not None:
                out.add(p.unit_id)
        return out

    return await est.read(load)


@routes.post("/p/{code}/open")
@public
async def open_door(request: web.Request) -> web.StreamResponse:
    got = await _at_plate(request)
    if isinstance(got, web.Response):
        return got
    place, est = got
    rs = await est.resident_session(request)
    form = await request.post()
    if place.kind != "entrance":
        return invalid(request)
    if rs is None:
        raise _to_login(request)
    try:
        door_id = int(str(form.get("door", "")))
    except ValueError:
        raise web.HTTPBadRequest() from None
    ok_units = await _my_units(est, rs)
    if place.unit_id not in ok_units:  # an entrance the resident does not live behind (its plate is public)
        return page(request, "phone_message.html", status=403, title_key="phone.open_title",
                    message_key="phone.no_right")
    door = await est.read(lambda c: reg.door(c, door_id))
    if door is None or door.unit_id != place.unit_id:  # another entrance's door: as if there were none
        return invalid(request)
    if not est.limits["unlock"].allow(f"p{rs.person.id}"):
        return throttled(request)
    result = await est.unlock(door, f"resident:{rs.person.id}")
    await est.audit(f"resident:{rs.person.id}", "door.unlock", f"door:{door.site}/{door.door}", result,
                    _addr(request))
    return await _entrance(request, est, place, rs, result=result)


def _to_login(request: web.Request) -> web.HTTPSeeOther:
    code = request.match_info.get("code", "")
    return web.HTTPSeeOther(f"/m/login?next=/p/{code}" if code else "/m/login")


# ---------------------------------------------------------------- help and reports


@routes.post("/p/{code}/sos")
@public
async def sos(request: web.Request) -> web.StreamResponse:
    got = await _at_plate(request, house=True)
    if isinstance(got, web.Response):
        return got
    place, est = got
    if not est.limits["sos"].allow(f"h{place.house_id}") or not est.limits["sos"].allow(_addr(request)):
        return _message(request, place, "phone.sos_title", "phone.sos_again", status=429)
    await est.raise_work_item(place, "sos")
    return _message(request, place, "phone.sos_title", "phone.sos_sent", ok=True)


@routes.get("/p/{code}/report")
@public
async def report_page(request: web.Request) -> web.StreamResponse:
    got = await _at_plate(request, house=True)
    if isinstance(got, web.Response):
        return got
    place, est = got
    return page(request, "phone_report.html", place=place, categories=CATEGORIES, code=request.match_info["code"],
                error=None, max_photo_mb=est.cfg.phone.photo_max_bytes // (1024 * 1024))


async def _read_report(request: web.Request, cap: int) -> tuple[dict[str, str], bytes | None]:
    """The report form's fields and photo. Streams multipart (capped) when the token came in the header."""
    fields: dict[str, str] = {}
    photo: bytes | None = None
    if request.content_type == "multipart/form-data" and request.headers.get(CSRF_HEADER):
        reader = await request.multipart()
        total = 0
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            buf = bytearray()
            while chunk := await part.read_chunk(65536):
                buf += chunk
                total += len(chunk)
                if total > cap + 16_384:
                    raise web.HTTPRequestEntityTooLarge(max_size=cap, actual_size=total)
            if part.name == "photo":
                photo = bytes(buf) if buf else None
            elif part.name:
                fields[part.name] = buf[:4096].decode("utf-8", "replace")
        return fields, photo
    form = await request.post()
    for k, v in form.items():
        if isinstance(v, str):
            fields[k] = v
        elif k == "photo" and hasattr(v, "file"):
            data = v.file.read(cap + 1)
            photo = data or None
    return fields, photo


def check_photo(data: bytes) -> str | None:
    """The MIME type of an acceptable photo (JPEG, PNG, WebP that Pillow can parse), else None. CPU: a thread."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return PHOTO_TYPES.get(fmt or "")


@routes.post("/p/{code}/report")
@public
@body_limit(lambda cfg: cfg.phone.photo_max_bytes + 16_384)  # the photo and the form around it
async def report_submit(request: web.Request) -> web.StreamResponse:
    got = await _at_plate(request, house=True)
    if isinstance(got, web.Response):
        return got
    place, est = got
    cap = est.cfg.phone.photo_max_bytes
    code = request.match_info["code"]
    ctx = {"place": place, "categories": CATEGORIES, "code": code, "max_photo_mb": cap // (1024 * 1024)}
    try:
        fields, photo = await _read_report(request, cap)
    except web.HTTPRequestEntityTooLarge:
        return page(request, "phone_report.html", status=413, error="report.too_large", **ctx)
    category = fields.get("category", "")
    text = " ".join(fields.get("text", "").split())[:MAX_TEXT]
    if category not in CATEGORIES or not text:
        return page(request, "phone_report.html", status=400, error="report.incomplete", **ctx)
    ptype = None
    if photo:
        if len(photo) > cap:
            return page(request, "phone_report.html", status=413, error="report.too_large", **ctx)
        ptype = await est.cpu(check_photo, photo)
        if ptype is None:
            return page(request, "phone_report.html", status=415, error="report.bad_photo", **ctx)
    if not est.limits["report"].allow(_addr(request)):
        return throttled(request)
    await est.raise_work_item(place, "problem", category=category, text=text, photo=photo, photo_type=ptype)
    return _message(request, place, "report.title", "report.sent", ok=True)


# ---------------------------------------------------------------- "I live here"


@routes.get("/p/{code}/register")
@public
async def register_page(request: web.Request) -> web.StreamResponse:
    got = await _at_plate(request, house=True)
    if isinstance(got, web.Response):
        return got
    place, _ = got
    return page(request, "phone_register.html", place=place, code=request.match_info["code"], error=None,
                form={}, min_password=RESIDENT_MIN_PASSWORD)


@routes.post("/p/{code}/register")
@public
async def register_submit(request: web.Request) -> web.StreamResponse:
    got = await _at_plate(request, house=True)
    if isinstance(got, web.Response):
        return got
    place, est = got
    assert place.house_id is not None
    form = {k: str(v)[:200] for k, v in (await request.post()).items() if isinstance(v, str) and k != "csrf"}
    code = request.match_info["code"]

    def again(key: str, status: int = 400) -> web.Response:
        form.pop("password", None)
        form.pop("confirm", None)
        return page(request, "phone_register.html", status=status, place=place, code=code, error=key, form=form,
                    min_password=RESIDENT_MIN_PASSWORD)

    name = reg.clean_name(form.get("name", ""))
    phone = reg.normalize_phone(form.get("phone", ""))
    role = form.get("role", "")
    lease_end = reg.parse_day(form.get("lease_end", "")) if form.get("lease_end") else None
    password, confirm = form.get("password", ""), form.get("confirm", "")
    if name is None:
        return again("register.bad_name")
    if phone is None:
        return again("register.bad_phone")
    if role not in reg.RESIDENT_ROLES:
        return again("register.bad_role")
    if role == "tenant" and (lease_end is None or lease_end < est.today()):
        return again("register.lease_needed")
    if role != "tenant":
        lease_end = None
    if not est.limits["register"].allow(_addr(request)):
        return throttled(request)
    existing = await est.read(lambda c: reg.person_by_phone(c, phone))
    new_hash: str | None = None
    if existing is not None and existing.password_hash:
        if not await est.verify_password(existing.password_hash, password):
            return again("register.existing_password", 403)
    else:
        if len(password) < RESIDENT_MIN_PASSWORD or len(password) > 200:
            return again("register.short_password")
        if password != confirm:
            return again("register.mismatch")
        new_hash = await est.hash_password(password)
    hid = place.house_id
    try:
        await est.write(lambda c: reg.register(c, hid, phone, name, role, lease_end, new_hash))
    except reg.RegistryError as e:
        return again(e.key, 409)
    log.info("registration for %s pending", place.short_zh)
    return _message(request, place, "register.title", "register.pending", ok=True)


@routes.post("/p/{code}/confirm")
@public
async def owner_confirms(request: web.Request) -> web.StreamResponse:
    """The owner of the house approves or rejects a pending registration from their phone."""
    got = await _at_my_house(request)
    if isinstance(got, web.Response):
        return got
    place, est, rs, mine = got
    if mine is None or mine.role != "owner" or not mine.active(est.today()):
        return _message(request, place, "phone.confirm_title", "phone.not_owner", status=403)
    form = await request.post()
    action = str(form.get("action", ""))
    try:
        rid = int(str(form.get("resident", "")))
    except ValueError:
        raise web.HTTPBadRequest() from None
    if action not in ("approve", "reject"):
        raise web.HTTPBadRequest()
    today, hid, actor = est.today(), place.house_id, f"resident:{rs.person.id}"
    try:
        await est.write(lambda c: reg.decide(c, rid, action, actor, today, house_id=hid))
    except reg.RegistryError as e:
        if e.key == "registry.no_such_resident":  # another house's resident: as if there were none
            return invalid(request)
        return _message(request, place, "phone.confirm_title", e.key, status=409)
    raise web.HTTPSeeOther(f"/p/{request.match_info['code']}")


# ---------------------------------------------------------------- passes


@routes.get("/p/{code}/mypass.json")
@public
async def my_pass(request: web.Request) -> web.StreamResponse:
    """A fresh resident pass as an SVG QR, for phone.js to swap in before the last one expires.

    Not counted as a scan (a household behind one address refreshes often); it needs a resident session.
    """
    place, resp = await _house_plate(request, count=False)
    if resp is not None:
        return web.json_response({"error": "not-found" if resp.status == 404 else "busy"}, status=resp.status)
    assert place is not None
    est = _est(request)
    rs = await est.resident_session(request)
    mine = await _my_residency(est, rs, place)
    if rs is None:
        return web.json_response({"error": "sign-in"}, status=401)
    if mine is None:  # signed in, but not a resident of this house
        return web.json_response({"error": "not-resident"}, status=403)
    if not mine.active(est.today()):
        return web.json_response({"error": "not-active"}, status=403)
    text, fields = est.issuer.resident_pass(place.site, mine.subject, place.unit_ref, place.house_ref)
    svg = await est.cpu(plates.svg, text)
    return web.json_response({"svg": svg, "not_after": fields.not_after, "life_s": fields.not_after -
                              fields.not_before, "pass_id": fields.pass_id.hex()})


@routes.post("/p/{code}/visitor")
@public
async def visitor_issue(request: web.Request) -> web.StreamResponse:
    got = await _at_my_house(request)
    if isinstance(got, web.Response):
        return got
    place, est, _, mine = got
    form = await request.post()
    if mine is None or not mine.active(est.today()):
        return _message(request, place, "visitor.title", "visitor.not_active", status=403)
    try:
        hours = int(str(form.get("hours", "")))
        uses = int(str(form.get("uses", "1")))
    except ValueError:
        raise web.HTTPBadRequest() from None
    if hours not in VISITOR_HOURS or not 1 <= uses <= 10:
        raise web.HTTPBadRequest()
    if not est.limits["visitor"].allow(f"r{mine.id}"):
        return throttled(request)
    subject = reg.new_subject("v")
    text, fields = est.issuer.visitor_pass(place.site, subject, place.unit_ref, place.house_ref, hours * 3600, uses)
    token = secrets.token_urlsafe(16)
    rid, now = mine.id, reg.now_text()

    def put(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO visitor_passes (token_hash, resident_id, pass_id, subject, pass_text, not_before,"
                  " not_after, uses, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (reg.code_hash(token), rid, fields.pass_id.hex(), subject, text, fields.not_before,
                   fields.not_after, uses, now))

    await est.write(put)
    log.info("visitor pass issued for %s (%d h, %d uses)", place.short_zh, hours, uses)
    raise web.HTTPSeeOther(f"/m/v/{token}")


async def _visitor(request: web.Request) -> tuple[sqlite3.Row, reg.Place] | web.Response | None:
    """The visitor pass behind the link and its house; the page to answer with when throttled; None if unknown."""
    guard = await _scan_guard(request)
    if guard is not None:
        return guard
    digest = _digest(request.match_info["token"])

    def load(c: sqlite3.Connection) -> tuple[sqlite3.Row, reg.Place] | None:
        row = c.execute("SELECT v.*, r.house_id FROM visitor_passes v JOIN reg_residents r ON r.id = v.resident_id"
                        " WHERE v.token_hash = ?", (digest,)).fetchone()
        if row is None:
            return None
        place = reg.house_place(c, row["house_id"])
        return (row, place) if place else None

    got = await _est(request).read(load)
    if got is None:
        _est(request).limits["bad-code"].spend(_addr(request))
    return got


@routes.get("/m/v/{token}")
@public
async def visitor_page(request: web.Request) -> web.StreamResponse:
    got = await _visitor(request)
    if isinstance(got, web.Response):
        return got
    if got is None:
        return invalid(request)
    row, place = got
    est = _est(request)
    tz = est.svc.tz
    expired = row["not_after"] < est.wall()
    svg = await est.cpu(plates.svg, row["pass_text"])
    return page(request, "phone_visitor.html", place=place, svg=svg, expired=expired, uses=row["uses"],
                valid_from=datetime.fromtimestamp(row["not_before"], tz).strftime("%Y-%m-%d %H:%M"),
                valid_to=datetime.fromtimestamp(row["not_after"], tz).strftime("%Y-%m-%d %H:%M"),
                share_url=f"{base_url(request)}/m/v/{request.match_info['token']}",
                token=request.match_info["token"])


@routes.get("/m/v/{token}/qr.png")
@public
async def visitor_png(request: web.Request) -> web.StreamResponse:
    got = await _visitor(request)
    if isinstance(got, web.Response):
        return got
    if got is None:
        raise web.HTTPNotFound()
    data = await _est(request).cpu(plates.png, got[0]["pass_text"], 8)
    return web.Response(body=data, content_type="image/png")


# ---------------------------------------------------------------- resident sign-in


async def _signed_in(request: web.Request) -> tuple[Estate, ResidentSession]:
    """The estate and the resident's session; without one, off to the sign-in page."""
    est = _est(request)
    rs = await est.resident_session(request)
    if rs is None:
        raise web.HTTPSeeOther("/m/login")
    return est, rs


@routes.get("/m/login")
@public
async def login_page(request: web.Request) -> web.StreamResponse:
    return page(request, "phone_login.html", error=None, phone="", next=safe_next(request.query.get("next"), "/m"))


@routes.post("/m/login")
@public
async def login_submit(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    form = await request.post()
    phone = str(form.get("phone", ""))[:32]
    secret = str(form.get("password", ""))[:1024]
    nxt = safe_next(str(form.get("next", "")), "/m")
    try:
        person, otc = await est.sign_in(phone, secret, _addr(request))
    except reg.RegistryError as e:
        status = 429 if e.key == "signin.throttled" else 401
        if status == 401:  # (throttled attempts are cheap to send: logged, not audited one by one)
            number = reg.normalize_phone(phone)  # masked as guards see it; never a password typed here
            await est.audit("public", "signin.failed", f"phone:{reg.mask_phone(number) if number else '?'}",
                            e.key, remote=_addr(request))
        else:
            log.info("resident sign-in refused from %s: throttled", _addr(request))
        return page(request, "phone_login.html", status=status, error=e.key, phone=phone, next=nxt)
    old = await est.resident_session(request)
    token = await est.start_resident_session(person.id, must_set_password=otc, old=old)
    resp = web.HTTPSeeOther("/m/password?next=" + nxt if otc else nxt)
    est.set_resident_cookie(resp, token)
    await est.audit(f"resident:{person.id}", "signin", remote=_addr(request), detail="one-time code" if otc else "")
    raise resp


@routes.post("/m/logout")
@public
async def logout(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    rs = await est.resident_session(request)
    if rs is not None:
        await est.end_resident_session(rs)
        await est.audit(f"resident:{rs.person.id}", "signout", remote=_addr(request))
    resp = web.HTTPSeeOther("/m/login")
    resp.del_cookie("gh_resident", path="/")
    raise resp


@routes.get("/m/password")
@public
async def password_page(request: web.Request) -> web.StreamResponse:
    _, rs = await _signed_in(request)
    return page(request, "phone_password.html", resident=rs, error=None, min_password=RESIDENT_MIN_PASSWORD,
                next=safe_next(request.query.get("next"), "/m"))


@routes.post("/m/password")
@public
async def password_submit(request: web.Request) -> web.StreamResponse:
    est, rs = await _signed_in(request)
    form = await request.post()
    new, confirm = str(form.get("new", ""))[:200], str(form.get("confirm", ""))[:200]
    nxt = safe_next(str(form.get("next", "")), "/m")
    if len(new) < RESIDENT_MIN_PASSWORD or new != confirm:
        key = "register.short_password" if len(new) < RESIDENT_MIN_PASSWORD else "register.mismatch"
        return page(request, "phone_password.html", status=400, resident=rs, error=key,
                    min_password=RESIDENT_MIN_PASSWORD, next=nxt)
    h = await est.hash_password(new)
    pid = rs.person.id

    def put(c: sqlite3.Connection) -> None:
        c.execute("UPDATE reg_people SET password_hash = ? WHERE id = ?", (h, pid))
        c.execute("DELETE FROM resident_sessions WHERE person_id = ?", (pid,))

    await est.write(put)
    token = await est.start_resident_session(pid)
    resp = web.HTTPSeeOther(nxt)
    est.set_resident_cookie(resp, token)
    raise resp


@routes.get("/m")
@public
async def my_homes(request: web.Request) -> web.StreamResponse:
    est, rs = await _signed_in(request)
    if rs.must_set_password:
        raise web.HTTPSeeOther("/m/password")
    today = est.today()

    def load(c: sqlite3.Connection) -> list[dict[str, Any]]:
        out = []
        for r in reg.residencies_of(c, rs.person.id):
            p = reg.house_place(c, r.house_id)
            if p is None or r.status == "rejected":
                continue
            out.append({"place": p, "role": r.role, "status": r.status, "active": r.active(today),
                        "code": reg.plate_code(c, "house", r.house_id) if r.active(today) else None})
        return out

    homes = await est.read(load)
    return page(request, "phone_home.html", resident=rs, homes=homes)
