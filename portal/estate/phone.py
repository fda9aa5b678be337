"""Residents' phone pages: what a door plate opens (``/p/<code>``) and the resident's own pages (``/m/...``).

Public, mobile-first, Chinese first. The public never sees a resident's name or phone number: the
house page shows the address and the property office. A signed-in resident of the house also sees
the household, issues visitor passes and shows their own access QR (refreshed by ``phone.js``).

Plate codes are looked up by their SHA-256, so an unknown code and a withdrawn one take the same
path and get the same page and status; addresses that try many unknown codes are throttled.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import BodyPartReader, web
from markupsafe import Markup

from portal.estate import photos, plates, revocations
from portal.estate import registry as reg
from portal.estate.service import ESTATE, MUST_SET_AFTER_CODE, Estate, ResidentSession
from portal.store import Conn, key_of
from portal.web import confirm
from portal.web.auth import (
    CSRF_HEADER,
    MAX_PASSWORD,
    MIN_PASSWORD,
    PASSWORD_FORM_BYTES,
    AuthError,
    address_key,
    check_new_password,
    public,
    safe_next,
)
from portal.web.bodies import read_form, reading_body
from portal.web.limits import body_limit
from portal.web.views import Answer, render, translator

log = logging.getLogger("portal.phone")
routes = web.RouteTableDef()

#: A card another package adds to a house plate's page (the care watch's "我很好"): called with the request, the
#: house, the resident's session (or None) and whether they live there today, it answers ("top" | "bottom", the
#: card's HTML) or None. "top" cards go above the help button.
HouseCard = Callable[[web.Request, reg.Place, ResidentSession | None, bool], Awaitable[tuple[str, Markup] | None]]
HOUSE_CARDS = web.AppKey("portal.phone.house_cards", list[HouseCard])

CATEGORIES = ("repair", "noise", "hygiene", "safety", "parking", "other")
VISITOR_HOURS = (2, 8, 24, 72)
VISITOR_PLAIN_HOURS = 24  # longer visitor passes need the resident's secret given again (see _reauth)
MAX_TEXT = 1000


def _est(request: web.Request) -> Estate:
    return request.app[ESTATE]


def _addr(request: web.Request) -> str:
    return request.remote or "?"


def _addr_key(request: web.Request) -> str:
    """What the per-address limits count by: the IPv4 address, or the /64 of an IPv6 one."""
    return address_key(_addr(request))


def base_url(request: web.Request) -> str:
    """Where phones reach the portal: the configured public URL, else the address this request used."""
    cfg = request.app[ESTATE].cfg
    return cfg.public_url.rstrip("/") if cfg.public_url else f"{request.scheme}://{request.host}"


def print_base(request: web.Request) -> str | None:
    """The address printed in every plate's QR code (door plates, checkpoint plates): the configured ``public_url``
    only, never the address this request used (127.0.0.1, a LAN name: a plate printed with it sends every phone that
    scans it nowhere). None: not set, so nothing may be printed (:func:`no_public_url` says why)."""
    url = request.app[ESTATE].cfg.public_url
    return url.rstrip("/") if url else None


def no_public_url(request: web.Request) -> web.Response:
    """The refusal to print a plate while ``public_url`` is not set: what is wrong and what to do."""
    return render(request, "error.html", status=409, message_key="plates.no_public_url")


def page(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    ctx.setdefault("resident", None)
    resp = render(request, template, status=status, **ctx)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def throttled(request: web.Request) -> web.Response:
    return page(request, "phone_message.html", status=429, title_key="phone.busy_title", message_key="phone.busy")


async def _scan_guard(request: web.Request, *, count: bool = True) -> web.Response | None:
    """The per-address limits every plate page passes first (``count=False``: only the guessing limit)."""
    est, addr = _est(request), _addr_key(request)
    if await est.limits["bad-code"].blocked(addr) or (count and not await est.limits["scan"].allow(addr)):
        return throttled(request)
    return None


def _digest(code: str) -> str:
    """The lookup hash of a plate or visitor code; a malformed one hashes to something no code can match."""
    return reg.code_hash(code if reg.PLATE_CODE_RE.match(code) else "!" + code[:100])


async def _place(request: web.Request) -> reg.Place | None:
    digest = _digest(request.match_info["code"])
    place = await _est(request).read(lambda c: reg.lookup_plate(c, digest))
    if place is None:
        await _est(request).limits["bad-code"].spend(_addr_key(request))
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


async def _at_plate(request: web.Request, *, house: bool = False) -> tuple[reg.Place, Estate]:
    """The plate's place (``house``: a house plate only) and the estate; else :class:`Answer` with the page to answer
    with (throttled, or no such plate)."""
    place, resp = await (_house_plate(request) if house else _plate(request))
    if resp is not None:
        raise Answer(resp)
    assert place is not None
    return place, _est(request)


async def _at_my_house(request: web.Request) -> tuple[reg.Place, Estate, ResidentSession, reg.Resident | None]:
    """A house plate page that needs a signed-in resident (else off to sign in), with their residency there; else
    :class:`Answer` (see :func:`_at_plate`)."""
    place, est = await _at_plate(request, house=True)
    rs = await est.resident_session(request)
    if rs is None:
        raise _to_login(request)
    return place, est, rs, await _my_residency(est, rs, place)


def _message(
    request: web.Request, place: reg.Place, title_key: str, message_key: str, status: int = 200, **ctx: Any
) -> web.Response:
    return page(
        request,
        "phone_message.html",
        status=status,
        title_key=title_key,
        message_key=message_key,
        place=place,
        code=request.match_info["code"],
        **ctx,
    )


async def _my_residency(est: Estate, rs: ResidentSession | None, place: reg.Place) -> reg.Resident | None:
    """The signed-in person's latest residency in this house (any status: the current stay or a request), if any."""
    if rs is None or place.house_id is None:
        return None
    hid = place.house_id
    return reg.latest_in(await est.read(lambda c: reg.residencies_of(c, rs.person.id)), hid)


# ---------------------------------------------------------------- the plate


@routes.get("/p/{code}")
@public
async def plate_page(request: web.Request) -> web.StreamResponse:
    place, est = await _at_plate(request)
    rs = await est.resident_session(request)
    if place.kind == "entrance":
        return await _entrance(request, est, place, rs)
    return await _house(request, est, place, rs)


async def _house(
    request: web.Request, est: Estate, place: reg.Place, rs: ResidentSession | None, **ctx: Any
) -> web.Response:
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
    cards: dict[str, list[Markup]] = {"top": [], "bottom": []}
    for card in request.app.get(HOUSE_CARDS, []):
        got = await card(request, place, rs, active)
        if got is not None:
            cards[got[0]].append(got[1])
    return page(
        request,
        "phone_house.html",
        place=place,
        resident=rs,
        mine=mine,
        active=active,
        cards=cards,
        info=est.cfg.site_info(place.site),
        ended=mine is not None and mine.ended(today),
        household=household,
        pending=pending,
        categories=CATEGORIES,
        visitor_hours=VISITOR_HOURS,
        mask=reg.mask_phone,
        code=request.match_info["code"],
        **ctx,
    )


async def _entrance(
    request: web.Request,
    est: Estate,
    place: reg.Place,
    rs: ResidentSession | None,
    result: str | None = None,
    why: str | None = None,
) -> web.Response:
    doors: list[reg.Door] = []
    allowed = blocked = False
    if rs is not None:
        allowed = place.unit_id in await _my_units(est, rs)
        blocked = allowed and await _blocked(est, rs, place)
        if allowed and not blocked:
            uid = place.unit_id
            doors = await est.read(lambda c: reg.doors(c, unit_id=uid))
    return page(
        request,
        "phone_entrance.html",
        place=place,
        resident=rs,
        allowed=allowed,
        blocked=blocked,
        doors=doors,
        result=result,
        why=why,
        code=request.match_info["code"],
    )


async def _blocked(est: Estate, rs: ResidentSession, place: reg.Place) -> bool:
    """The person's access at the plate's estate is suspended (a guard's block): no pass, no door, no visitor."""
    pid, site = rs.person.id, place.site
    return bool(await est.read(lambda c: revocations.person_blocked(c, pid, site)))


async def _my_units(est: Estate, rs: ResidentSession) -> set[int]:
    """The units (entrances) the signed-in person lives in today."""
    today, pid = est.today(), rs.person.id

    def load(c: Conn) -> set[int]:
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
    place, est = await _at_plate(request)
    rs = await est.resident_session(request)
    form = await read_form(request)
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
        return page(
            request, "phone_message.html", status=403, title_key="phone.open_title", message_key="phone.no_right"
        )
    if await _blocked(est, rs, place):  # blocked by a guard: the door stays shut as the readers keep it
        await est.audit(f"resident:{rs.person.id}", "door.unlock", f"unit:{place.unit_id}", "blocked", _addr(request))
        return page(
            request, "phone_message.html", status=403, title_key="phone.open_title", message_key="phone.blocked"
        )
    door = await est.read(lambda c: reg.door(c, door_id))
    if door is None or door.unit_id != place.unit_id:  # another entrance's door: as if there were none
        return invalid(request)
    if not await est.limits["unlock"].allow(f"p{rs.person.id}"):
        return throttled(request)
    result, why = await est.unlock(door, f"resident:{rs.person.id}")
    said = f"{result}:{why}" if why else result
    await est.audit(f"resident:{rs.person.id}", "door.unlock", f"door:{door.site}/{door.door}", said, _addr(request))
    return await _entrance(request, est, place, rs, result=result, why=why)


def _to_login(request: web.Request) -> web.HTTPSeeOther:
    code = request.match_info.get("code", "")
    return web.HTTPSeeOther(f"/m/login?next=/p/{code}" if code else "/m/login")


# ---------------------------------------------------------------- help and reports


@routes.post("/p/{code}/sos")
@public
async def sos(request: web.Request) -> web.StreamResponse:
    place, est = await _at_plate(request, house=True)
    sos = est.limits["sos"]
    rs = await est.resident_session(request)
    mine = await _my_residency(est, rs, place)
    if rs is not None and mine is not None and mine.active(est.today()):
        # A resident of the flat, signed in: counted as themselves, never by what strangers at the plate spent.
        allowed = await sos.allow(f"p{rs.person.id}")
    else:  # the plate is public: its presses are counted per flat and per address
        allowed = await sos.allow(f"h{place.house_id}") and await sos.allow(_addr_key(request))
    if not allowed:
        return _message(request, place, "phone.sos_title", "phone.sos_again", status=429)
    token = secrets.token_urlsafe(24)
    event_id = await est.raise_sos(place, token)
    resp = web.HTTPSeeOther(f"/p/{request.match_info['code']}/sos")  # a reload never presses the button again
    resp.set_cookie(
        SOS_COOKIE,
        f"{event_id}.{token}",
        httponly=True,
        samesite="Lax",
        path="/",
        max_age=86400,
        secure=est.cfg.cookie_secure,
    )
    raise resp


#: what the phone shows for the incident's state (the resident's words, not the board's)
SOS_STATES = {
    "sent": "sos.state_sent",
    "new": "sos.state_sent",
    "acknowledged": "sos.state_taken",
    "dispatched": "sos.state_coming",
    "on_scene": "sos.state_on_scene",
    "resolved": "sos.state_done",
    "closed": "sos.state_done",
}
SOS_COOKIE = "gh_sos"


async def _sos_page(
    request: web.Request, est: Estate, place: reg.Place, event_id: str | None, token: str | None, status: int = 200
) -> web.Response:
    rs = await est.resident_session(request)
    mine = await _my_residency(est, rs, place)
    person = rs.person.id if rs is not None and mine is not None and mine.active(est.today()) else None
    state = await est.sos_state(place, event_id, token, person)
    if state is None:
        return invalid(request)
    grid_open = bool(state["grid_number"]) and state["grid_status"] not in ("closed", "returned")
    return page(
        request,
        "phone_sos.html",
        status=status,
        place=place,
        code=request.match_info["code"],
        sos=state,
        state_key=SOS_STATES.get(str(state["state"]), "sos.state_sent"),
        done=state["state"] in ("resolved", "closed") and not grid_open,
        resident=rs,
    )


@routes.get("/p/{code}/sos")
@public
async def sos_status(request: web.Request) -> web.StreamResponse:
    """Where a help call stands, for the phone that made it (or a resident of the house): it refreshes itself."""
    place, est = await _at_plate(request, house=True)
    event_id, _, token = request.cookies.get(SOS_COOKIE, "")[:100].partition(".")
    return await _sos_page(request, est, place, event_id or None, token or None)


@routes.get("/p/{code}/report")
@public
async def report_page(request: web.Request) -> web.StreamResponse:
    place, est = await _at_plate(request, house=True)
    return page(
        request,
        "phone_report.html",
        place=place,
        categories=CATEGORIES,
        code=request.match_info["code"],
        error=None,
        max_photo_mb=est.cfg.phone.photo_max_bytes // (1024 * 1024),
        max_photo_mp=est.cfg.phone.photo_max_pixels // 1_000_000,
    )


async def _read_report(request: web.Request, cap: int) -> tuple[dict[str, str], bytes | None]:
    """The report form's fields and photo. Streams multipart (capped) when the token came in the header."""
    fields: dict[str, str] = {}
    photo: bytes | None = None
    if request.content_type == "multipart/form-data" and request.headers.get(CSRF_HEADER):
        with reading_body():
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
    form = await read_form(request)
    for k, v in form.items():
        if isinstance(v, str):
            fields[k] = v
        elif k == "photo" and hasattr(v, "file"):
            data = v.file.read(cap + 1)
            photo = data or None
    return fields, photo


@routes.post("/p/{code}/report")
@public
@body_limit(lambda cfg: cfg.phone.photo_max_bytes + 16_384)  # the photo and the form around it
async def report_submit(request: web.Request) -> web.StreamResponse:
    place, est = await _at_plate(request, house=True)
    cap = est.cfg.phone.photo_max_bytes
    code = request.match_info["code"]
    ctx = {
        "place": place,
        "categories": CATEGORIES,
        "code": code,
        "max_photo_mb": cap // (1024 * 1024),
        "max_photo_mp": est.cfg.phone.photo_max_pixels // 1_000_000,
    }
    try:
        fields, photo = await _read_report(request, cap)
    except web.HTTPRequestEntityTooLarge:
        return page(request, "phone_report.html", status=413, error="report.too_large", **ctx)
    category = fields.get("category", "")
    text = " ".join(fields.get("text", "").split())[:MAX_TEXT]
    if category not in CATEGORIES or not text:
        return page(request, "phone_report.html", status=400, error="report.incomplete", **ctx)
    if photo and len(photo) > cap:
        return page(request, "phone_report.html", status=413, error="report.too_large", **ctx)
    # Counted before the photo is looked at: a refused report costs the portal nothing but this.
    if not await est.limits["report"].allow(_addr_key(request)):
        return throttled(request)
    cleaned = None
    if photo:
        try:  # JPEG, PNG or WebP only, pixels capped, re-encoded without EXIF/GPS (portal.estate.photos)
            async with est.photo_slot:
                cleaned = await est.cpu(
                    photos.clean, photo, est.cfg.phone.photo_max_pixels, photos.REPORT_FULL_DECODE_MAX
                )
        except photos.PhotoError as e:
            if e.limit:
                ctx["max_photo_mp"] = e.limit // 1_000_000
            return page(
                request, "phone_report.html", status=413 if e.key == "report.photo_pixels" else 415, error=e.key, **ctx
            )
    token = secrets.token_urlsafe(24)
    wid = await est.raise_work_item(place, "problem", category=category, text=text, photo=cleaned, token=token)
    resp = web.HTTPSeeOther(f"/p/{code}/report/status")  # a reload never sends the report again
    resp.set_cookie(
        REPORT_COOKIE,
        f"{wid}.{token}",
        httponly=True,
        samesite="Lax",
        path="/",
        max_age=30 * 86400,
        secure=est.cfg.cookie_secure,
    )
    raise resp


REPORT_COOKIE = "gh_report"


@routes.get("/p/{code}/report/status")
@public
async def report_status(request: web.Request) -> web.StreamResponse:
    """Where a problem report stands, for the phone that sent it (or a resident of the house): the property
    office's steps and, when it went up, the grid platform's."""
    place, est = await _at_plate(request, house=True)
    raw_id, _, token = request.cookies.get(REPORT_COOKIE, "")[:100].partition(".")
    wid = int(raw_id) if raw_id.isascii() and raw_id.isdigit() and len(raw_id) <= 12 else None
    rs = await est.resident_session(request)
    mine = await _my_residency(est, rs, place)
    person = rs.person.id if rs is not None and mine is not None and mine.active(est.today()) else None
    reports = await est.report_states(place, wid, token or None, person)
    if not reports:
        return invalid(request)
    return page(
        request,
        "phone_report_status.html",
        place=place,
        code=request.match_info["code"],
        reports=reports,
        resident=rs,
        done=all(
            r["status"] == "closed" and (not r["grid_number"] or r["grid_status"] in ("closed", "returned"))
            for r in reports
        ),
    )


# ---------------------------------------------------------------- "I live here"


def _new_password_error(new: str, confirm: str, phone: str) -> tuple[str, dict[str, Any]] | None:
    """The staff's rule for a new password (12 to 1024 characters, not the phone number), and the repeat."""
    try:
        check_new_password(new, phone)
    except AuthError as e:
        key = "register.password_is_phone" if e.key == "password.is_name" else e.key
        return key, {"n": MAX_PASSWORD if e.key == "password.too_long" else MIN_PASSWORD}
    return ("register.mismatch", {}) if new != confirm else None


@routes.get("/p/{code}/register")
@public
async def register_page(request: web.Request) -> web.StreamResponse:
    place, est = await _at_plate(request, house=True)
    rs = await est.resident_session(request)
    return page(
        request,
        "phone_register.html",
        place=place,
        code=request.match_info["code"],
        error=None,
        error_kw={},
        form={},
        min_password=MIN_PASSWORD,
        resident=rs,
        mask=reg.mask_phone,
        account=rs if request.query.get("for") != "other" else None,
    )


@routes.post("/p/{code}/register")
@public
@body_limit(PASSWORD_FORM_BYTES)
async def register_submit(request: web.Request) -> web.StreamResponse:
    """A request to be linked to this house, answered the same whether or not the phone number is known (see
    :func:`portal.estate.registry.register`); from a signed-in resident (``for=me``), a request for their own
    account."""
    place, est = await _at_plate(request, house=True)
    assert place.house_id is not None
    raw = {k: v for k, v in (await read_form(request)).items() if isinstance(v, str) and k != "csrf"}
    secret = {k: raw.pop(k, "") for k in ("password", "confirm")}
    form = {k: v[:200] for k, v in raw.items()}
    code = request.match_info["code"]
    signed_in = await est.resident_session(request)
    rs = signed_in if form.get("for") == "me" else None  # a request for the signed-in account itself
    if form.get("for") == "me" and rs is None:
        raise _to_login(request)

    def again(key: str, status: int = 400, **kw: Any) -> web.Response:
        return page(
            request,
            "phone_register.html",
            status=status,
            place=place,
            code=code,
            error=key,
            error_kw=kw,
            form=form,
            min_password=MIN_PASSWORD,
            resident=signed_in,
            mask=reg.mask_phone,
            account=rs,
        )

    role = form.get("role", "")
    lease_end = reg.parse_day(form.get("lease_end", "")) if form.get("lease_end") else None
    name = rs.person.name if rs is not None else reg.clean_name(form.get("name", ""))
    phone = rs.person.phone if rs is not None else reg.normalize_phone(form.get("phone", ""))
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
    if rs is None:
        bad = _new_password_error(secret["password"], secret["confirm"], phone)
        if bad is not None:
            return again(bad[0], **bad[1])
    if not await est.limits["register"].allow(_addr_key(request)):
        return throttled(request)
    hid, today = place.house_id, est.today()
    if rs is None:
        # Hashed and checked for every request, known number or not: the same work and the same answer either way.
        # The check: is this the password a pending request for this number here chose (the same person again)?
        new_hash = await est.hash_password(secret["password"])
        waiting = await est.read(lambda c: reg.pending_password(c, hid, phone))
        same = await est.svc.auth.check_password(waiting, secret["password"])
        await est.write(
            lambda c: reg.register(c, hid, phone, name, role, lease_end, new_hash, today=today, same_claimant=same)
        )
        log.info("registration request for %s", place.short_zh)
        return _message(request, place, "register.title", "register.pending", ok=True)
    pid = rs.person.id
    await est.write(lambda c: reg.register(c, hid, phone, name, role, lease_end, None, today=today, person_id=pid))
    log.info("registration request for %s from a signed-in resident", place.short_zh)
    return _message(request, place, "register.title", "register.pending_account", ok=True)


async def _reauth(
    request: web.Request, est: Estate, rs: ResidentSession, reason_key: str, form: Any
) -> web.Response | None:
    """None when the session gave a secret in the last few minutes, or the form brings one now (checked through the
    one limiter); otherwise the page asking for it, which posts the same form back to the same address."""
    if est.fresh(rs):
        return None
    secret = str(form.get("reauth_secret", ""))
    error: reg.RegistryError | None = None
    if secret:
        try:
            await est.check_secret("", secret, _addr(request), person=rs.person, purpose="reauth")
        except reg.RegistryError as e:
            error = e
        else:
            await est.mark_fresh(rs)
            return None
    keep = [(k, str(v)) for k, v in form.items() if k not in ("csrf", "reauth_secret") and isinstance(v, str)]
    return _refused_secret(
        page(
            request,
            "phone_reauth.html",
            status=401,
            resident=rs,
            reason_key=reason_key,
            error=error.key if error else None,
            action=request.path,
            fields=keep,
            back=f"/p/{request.match_info['code']}",
        ),
        error,
    )


def _refused_secret(resp: web.Response, error: reg.RegistryError | None) -> web.Response:
    """A page answering a refused secret: 429 with Retry-After while the limiter holds, else as it is."""
    if error is not None and error.key == "signin.throttled":
        resp.set_status(429)
        resp.headers["Retry-After"] = str(error.kw.get("retry_after", 1))
    return resp


@routes.post("/p/{code}/confirm")
@public
@body_limit(PASSWORD_FORM_BYTES)
async def owner_confirms(request: web.Request) -> web.StreamResponse:
    """The owner of the house approves (after giving their secret again, if not just now) or rejects a pending
    registration from their phone."""
    place, est, rs, mine = await _at_my_house(request)
    if mine is None or mine.role != "owner" or not mine.active(est.today()):
        return _message(request, place, "phone.confirm_title", "phone.not_owner", status=403)
    form = await read_form(request)
    action = str(form.get("action", ""))
    try:
        rid = int(str(form.get("resident", "")))
    except ValueError:
        raise web.HTTPBadRequest() from None
    if action not in ("approve", "reject"):
        raise web.HTTPBadRequest()
    today, hid, actor = est.today(), place.house_id, f"resident:{rs.person.id}"
    if action == "approve":
        ask = await _reauth(request, est, rs, "reauth.approve", form)
        if ask is not None:
            return ask
    elif not confirm.confirmed(form):  # a rejection asks first, naming who and as what
        res0 = await est.read(lambda c: reg.resident(c, rid))
        if res0 is None or res0.house_id != hid:  # another house's resident: as if there were none
            return invalid(request)
        tr = translator(request)
        return confirm.ask(
            request,
            form,
            title_key="house.reject_title",
            consequence_key="house.reject_consequence",
            kw={"name": res0.shown_name, "role": tr(f"resrole.{res0.role}")},
            back=f"/p/{request.match_info['code']}",
            button_key="house.reject_go",
            phone=True,
            resident=rs,
        )
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
    if await _blocked(est, rs, place):
        return web.json_response({"error": "blocked"}, status=403)
    text, fields = est.issuer.resident_pass(place.site, mine.subject, place.unit_ref, place.house_ref)
    svg = await est.cpu(plates.svg, text)
    return web.json_response(
        {
            "svg": svg,
            "not_after": fields.not_after,
            "life_s": fields.not_after - fields.not_before,
            "pass_id": fields.pass_id.hex(),
        }
    )


@routes.post("/p/{code}/visitor")
@public
@body_limit(PASSWORD_FORM_BYTES)
async def visitor_issue(request: web.Request) -> web.StreamResponse:
    """A visitor pass from a current resident; one valid over a day needs their secret given in the last minutes."""
    place, est, rs, mine = await _at_my_house(request)
    form = await read_form(request)
    if mine is None or not mine.active(est.today()):
        return _message(request, place, "visitor.title", "visitor.not_active", status=403)
    if await _blocked(est, rs, place):
        return _message(request, place, "visitor.title", "phone.blocked", status=403)
    try:
        hours = int(str(form.get("hours", "")))
        uses = int(str(form.get("uses", "1")))
    except ValueError:
        raise web.HTTPBadRequest() from None
    if hours not in VISITOR_HOURS or not 1 <= uses <= 10:
        raise web.HTTPBadRequest()
    if hours > VISITOR_PLAIN_HOURS:
        ask = await _reauth(request, est, rs, "reauth.visitor", form)
        if ask is not None:
            return ask
    if not await est.limits["visitor"].allow(f"r{mine.id}"):
        return throttled(request)
    subject = reg.new_subject("v")
    text, fields = est.issuer.visitor_pass(place.site, subject, place.unit_ref, place.house_ref, hours * 3600, uses)
    token = secrets.token_urlsafe(16)
    rid, now = mine.id, reg.now_text()

    def put(c: Conn) -> None:
        c.execute(
            "INSERT INTO visitor_passes (token_hash, resident_id, pass_id, subject, sealed, not_before,"
            " not_after, uses, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                reg.code_hash(token),
                rid,
                fields.pass_id.hex(),
                subject,
                key_of(c).seal(text, fields.pass_id.hex()),  # a copy of the database holds no pass to walk in with
                fields.not_before,
                fields.not_after,
                uses,
                now,
            ),
        )

    await est.write(put)
    log.info("visitor pass issued for %s (%d h, %d uses)", place.short_zh, hours, uses)
    raise web.HTTPSeeOther(f"/m/v/{token}")


async def _visitor(request: web.Request) -> tuple[dict[str, Any], reg.Place] | None:
    """The visitor pass behind the link (its ``pass_text`` unsealed with the store key, to draw its QR) and its house;
    None if unknown; :class:`Answer` with the page to answer with when throttled."""
    guard = await _scan_guard(request)
    if guard is not None:
        raise Answer(guard)
    digest = _digest(request.match_info["token"])

    def load(c: Conn) -> tuple[dict[str, Any], reg.Place] | None:
        row = c.execute(
            "SELECT v.*, r.house_id FROM visitor_passes v JOIN reg_residents r ON r.id = v.resident_id"
            " WHERE v.token_hash = ?",
            (digest,),
        ).fetchone()
        if row is None:
            return None
        place = reg.house_place(c, row["house_id"])
        if place is None:
            return None
        v = dict(row)
        v["pass_text"] = key_of(c).unseal(bytes(v.pop("sealed")), v["pass_id"])
        return v, place

    got = await _est(request).read(load)
    if got is None:
        await _est(request).limits["bad-code"].spend(_addr_key(request))
    return got


@routes.get("/m/v/{token}")
@public
async def visitor_page(request: web.Request) -> web.StreamResponse:
    got = await _visitor(request)
    if got is None:
        return invalid(request)
    row, place = got
    est = _est(request)
    tz = est.svc.tz
    expired = row["not_after"] < est.wall()
    if await est.read(lambda c: revocations.pass_revoked(c, row["pass_id"])):  # cancelled: no QR to show
        return page(
            request,
            "phone_message.html",
            status=410,
            title_key="visitor.title",
            message_key="visitor.cancelled",
            place=place,
        )
    svg = await est.cpu(plates.svg, row["pass_text"])
    return page(
        request,
        "phone_visitor.html",
        place=place,
        svg=svg,
        expired=expired,
        uses=row["uses"],
        valid_from=datetime.fromtimestamp(row["not_before"], tz).strftime("%Y-%m-%d %H:%M"),
        valid_to=datetime.fromtimestamp(row["not_after"], tz).strftime("%Y-%m-%d %H:%M"),
        share_url=f"{base_url(request)}/m/v/{request.match_info['token']}",
        token=request.match_info["token"],
    )


@routes.get("/m/v/{token}/qr.png")
@public
async def visitor_png(request: web.Request) -> web.StreamResponse:
    got = await _visitor(request)
    if got is None:
        raise web.HTTPNotFound()
    if await _est(request).read(lambda c: revocations.pass_revoked(c, got[0]["pass_id"])):
        raise web.HTTPGone()
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
@body_limit(PASSWORD_FORM_BYTES)
async def login_submit(request: web.Request) -> web.StreamResponse:
    est = _est(request)
    form = await read_form(request)
    phone = str(form.get("phone", ""))[:32]
    secret = str(form.get("password", ""))
    nxt = safe_next(str(form.get("next", "")), "/m")
    try:
        person, must_set = await est.sign_in(phone, secret, _addr(request))
    except reg.RegistryError as e:
        status = 429 if e.key == "signin.throttled" else 401
        return _refused_secret(page(request, "phone_login.html", status=status, error=e.key, phone=phone, next=nxt), e)
    old = await est.resident_session(request)
    token = await est.start_resident_session(person.id, must_set_password=must_set, old=old)
    resp = web.HTTPSeeOther("/m/password?next=" + nxt if must_set else nxt)
    est.set_resident_cookie(resp, token)
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


def _needs_current(est: Estate, rs: ResidentSession) -> bool:
    """A password change needs the current secret, except just after signing in with the office's one-time code."""
    return not (rs.must_set_password == MUST_SET_AFTER_CODE and est.fresh(rs))


def _password_page(
    request: web.Request,
    est: Estate,
    rs: ResidentSession,
    nxt: str,
    status: int = 200,
    error: str | None = None,
    **kw: Any,
) -> web.Response:
    return page(
        request,
        "phone_password.html",
        status=status,
        resident=rs,
        error=error,
        error_kw=kw,
        min_password=MIN_PASSWORD,
        next=nxt,
        needs_current=_needs_current(est, rs),
        forced=rs.must_set_password,
    )


@routes.get("/m/password")
@public
async def password_page(request: web.Request) -> web.StreamResponse:
    est, rs = await _signed_in(request)
    return _password_page(request, est, rs, safe_next(request.query.get("next"), "/m"))


@routes.post("/m/password")
@public
@body_limit(PASSWORD_FORM_BYTES)
async def password_submit(request: web.Request) -> web.StreamResponse:
    """A new password: with the current secret (a password, or a one-time code from the office), or within minutes
    of signing in with a one-time code. Every other session of the person ends."""
    est, rs = await _signed_in(request)
    form = await read_form(request)
    current, new, confirm = (str(form.get(k, "")) for k in ("current", "new", "confirm"))
    nxt = safe_next(str(form.get("next", "")), "/m")
    after_code = not _needs_current(est, rs)
    if not after_code:
        if not current:
            return _password_page(request, est, rs, nxt, 400, "password.wrong_current")
        try:
            _, otc = await est.check_secret("", current, _addr(request), person=rs.person, purpose="password.current")
        except reg.RegistryError as e:
            key = "password.wrong_current" if e.key == "signin.failed" else e.key
            return _refused_secret(_password_page(request, est, rs, nxt, 401, key), e)
        after_code = otc
    bad = _new_password_error(new, confirm, rs.person.phone)
    if bad is not None:
        return _password_page(request, est, rs, nxt, 400, bad[0], **bad[1])
    if current and new == current:
        return _password_page(request, est, rs, nxt, 400, "password.same")
    token = await est.set_password(rs, await est.hash_password(new), after_code=after_code, remote=_addr(request))
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

    def load(c: Conn) -> list[dict[str, Any]]:
        out = []
        mine = reg.residencies_of(c, rs.person.id)
        for r in (reg.latest_in(mine, hid) for hid in dict.fromkeys(r.house_id for r in mine)):
            p = reg.house_place(c, r.house_id) if r is not None else None
            if r is None or p is None:
                continue
            state = (
                "ended"
                if r.status == "active" and r.ended(today)
                else ("upcoming" if r.status == "active" and not r.active(today) else r.status)
            )
            out.append(
                {
                    "place": p,
                    "role": r.role,
                    "state": state,
                    "active": r.active(today),
                    "created_at": r.created_at,
                    "decided_at": r.decided_at,
                    "reports": [],
                    "code": reg.plate_code(c, "house", r.house_id) if r.active(today) else None,
                }
            )
        return out

    homes = await est.read(load)
    for h in homes:  # the problem reports of each home they live in, as its report page shows them
        if h["active"]:
            h["reports"] = await est.report_states(h["place"], None, None, rs.person.id)
    return page(request, "phone_home.html", resident=rs, homes=homes)
