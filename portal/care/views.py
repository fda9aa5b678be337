"""The care watch's pages: the property office's list and forms, the resident's card and form on the flat's plate
page, the guard's view of a care alert on the board and the contact's number revealed for a call.

Who sees what: the office (administrators) manages households and sees the contacts' numbers, each view audited;
guards see a household only through an incident at that flat (who is cared for, the rule, the last activity, the
contact with the number masked until they reveal it with a reason, audited and logged on the incident); residents of
the flat see their own household on their phone; nobody else sees anything.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from markupsafe import Markup

from portal.alarms import incidents as alarms
from portal.care import model
from portal.care.watch import CareWatch
from portal.doors import visitors
from portal.estate import registry as reg
from portal.estate.phone import _addr, _at_my_house, invalid, page
from portal.estate.service import ESTATE, Estate, ResidentSession
from portal.store import Conn, audit
from portal.web import i18n
from portal.web.auth import CSRF_KEY, SESSION_KEY, public, roles
from portal.web.bodies import bad_request, read_form, read_json
from portal.web.scope import need, sees, sites_of
from portal.web.services import SERVICES
from portal.web.views import Answer, render, translator

log = logging.getLogger("portal.care")
routes = web.RouteTableDef()
WATCH = web.AppKey("portal.care.watch", CareWatch)
PHONE_FIELDS = ("contact_name", "contact_relation", "contact_phone", "hours", "night_watch", "night_from", "night_to")
OFFICE_FIELDS = (*PHONE_FIELDS, "consent_by", "consent_how", "consent_date", "consent_note")


def _watch(request: web.Request) -> CareWatch:
    return request.app[WATCH]


def _actor(request: web.Request) -> str:
    u = request[SESSION_KEY].user
    return f"{u.role}:{u.name}"


def _now(request: web.Request) -> datetime:
    return datetime.fromtimestamp(_watch(request).wall(), UTC)


def _id(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise web.HTTPNotFound()
    return int(raw)


def activity_text(what: str, tr: i18n.Translator) -> str:
    """A household's last activity as people read it ("刷码进出 b3-u2")."""
    kind, _, rest = (what or "").partition(":")
    if not kind:
        return tr("care.activity.none")
    if kind == "phone":
        return tr("care.activity.phone")
    if kind == "panel":
        return (
            tr(f"care.activity.panel.{rest}")
            if tr.has(f"care.activity.panel.{rest}")
            else tr("care.activity.panel.other")
        )
    return tr(f"care.activity.{kind}", where=rest) if tr.has(f"care.activity.{kind}") else what


NOTICES = ("saved", "ended", "ok", "stopped")


def _notice(request: web.Request, name: str = "notice") -> str | None:
    got = request.query.get(name)
    return got if got in NOTICES else None


def _local(ts: str | None, request: web.Request) -> str:
    if not ts:
        return ""
    return model.parse_ts(ts).astimezone(request.app[SERVICES].tz).strftime("%Y-%m-%d %H:%M")


# ---------------------------------------------------------------- the office


@routes.get("/care")
@roles("admin")
async def care_list(request: web.Request) -> web.StreamResponse:
    return await _list_page(request)


async def _list_page(request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
    svc = request.app[SERVICES]
    scope = sites_of(request)
    show_ended = request.query.get("ended") == "1"

    def load(c: Conn) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        out = []
        for h in model.households(c, scope, active=not show_ended):
            out.append(
                {
                    "h": h,
                    "names": model.people_names(c, h.people),
                    "open": [a for a in model.open_alerts(c, h.id) if a["rule"] in model.OWN_RULES],
                }
            )
        return out, [s for s in visitors.sites(c) if sees(request, s["code"])]

    rows, sites = await svc.store.read(load)
    actor = _actor(request)
    await svc.store.run_write(
        lambda c: audit.write(c, actor, "view.care", "", f"{len(rows)} households", request.remote or "")
    )
    tr = translator(request)
    return render(
        request,
        "care_index.html",
        status=status,
        rows=rows,
        sites=sites,
        show_ended=show_ended,
        error=tr(error) if error else None,
        activity=lambda w: activity_text(w, tr),
        local=lambda ts: _local(ts, request),
        notice=_notice(request),
    )


async def _house_for(request: web.Request, site: str, ref: str) -> dict[str, Any] | None:
    parsed = visitors.parse_house(ref)
    if parsed is None:
        return None
    found = await request.app[SERVICES].store.read(
        lambda c: visitors.find_houses(c, *parsed, site=site or None, sites=sites_of(request))
    )
    return found[0] if len(found) == 1 else None


async def _form_page(
    request: web.Request,
    *,
    house: dict[str, Any],
    h: model.Household | None,
    values: dict[str, Any] | None = None,
    error: model.CareError | None = None,
    status: int = 200,
) -> web.Response:
    svc = request.app[SERVICES]
    est: Estate = request.app[ESTATE]
    today = est.today()
    hid = int(house["house_id"])

    def load(c: Conn) -> tuple[list[reg.Resident], list[dict[str, Any]]]:
        return model.candidates(c, hid, today), model.alerts(c, h.id) if h is not None else []

    people, history = await svc.store.read(load)
    if values is None:
        values = _values_of(h, request)
    tr = translator(request)
    return render(
        request,
        "care_form.html",
        status=status,
        house=house,
        h=h,
        people=people,
        values=values,
        error=error,
        history=history,
        hours_min=model.HOURS_MIN,
        hours_max=model.HOURS_MAX,
        consent_hows=model.OFFICE_CONSENT,
        activity=lambda w: activity_text(w, tr),
        local=lambda ts: _local(ts, request),
        notice=_notice(request),
    )


def _values_of(h: model.Household | None, request: web.Request) -> dict[str, Any]:
    today = datetime.fromtimestamp(_watch(request).wall(), request.app[SERVICES].tz).date().isoformat()
    if h is None:
        return {
            "person": [],
            "hours": model.HOURS_DEFAULT,
            "night_watch": "1",
            "night_from": model.NIGHT_DEFAULT[0],
            "night_to": model.NIGHT_DEFAULT[1],
            "contact_name": "",
            "contact_relation": "",
            "contact_phone": "",
            "consent_by": "",
            "consent_how": "written",
            "consent_date": today,
            "consent_note": "",
        }
    return {
        "person": list(h.people),
        "hours": h.hours,
        "night_watch": "1" if h.night_watch else "",
        "night_from": h.night_from,
        "night_to": h.night_to,
        "contact_name": h.contact_name,
        "contact_relation": h.contact_relation,
        "contact_phone": h.contact_phone,
        "consent_by": h.consent_by,
        "consent_how": h.consent_how,
        "consent_date": _local(h.consent_at, request)[:10],
        "consent_note": h.consent_note,
    }


def _posted(form: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {k: str(form.get(k, ""))[:200] for k in fields}
    people = []
    for p in form.getall("person", []):
        try:
            people.append(int(str(p)))
        except ValueError:
            continue
    out["person"] = people
    return out


@routes.get("/care/new")
@roles("admin")
async def care_new(request: web.Request) -> web.StreamResponse:
    house = await _house_for(request, request.query.get("site", ""), request.query.get("house", ""))
    if house is None:
        return await _list_page(request, "care.no_house", 400)
    existing = await request.app[SERVICES].store.read(lambda c: model.household_of_house(c, int(house["house_id"])))
    if existing is not None:
        raise web.HTTPSeeOther(f"/care/{existing.id}")
    return await _form_page(request, house=house, h=None)


@routes.post("/care")
@roles("admin")
async def care_create(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    house = await _house_for(request, str(form.get("site", "")), str(form.get("house", "")))
    if house is None:
        return await _list_page(request, "care.no_house", 400)
    svc = request.app[SERVICES]
    est: Estate = request.app[ESTATE]
    hid, site, today = int(house["house_id"]), str(house["site"]), est.today()
    values = _posted(form, OFFICE_FIELDS)
    people = await svc.store.read(lambda c: [r.person_id for r in model.candidates(c, hid, today)])
    actor, now = _actor(request), _now(request)
    try:
        s = model.parse_settings(form, people, office=True, now=now, tz=svc.tz)
        care_id = await svc.store.run_write(
            lambda c: model.enrol(c, hid, site, s, actor, model.ts_text(now), request.remote or "")
        )
    except model.CareError as e:
        return await _form_page(request, house=house, h=None, values=values, error=e, status=400)
    await _watch(request).refresh(care_id)
    log.info("%s put house %d under care (household %d)", actor, hid, care_id)
    raise web.HTTPSeeOther(f"/care/{care_id}?notice=saved")


async def _household(request: web.Request) -> tuple[model.Household, dict[str, Any]]:
    cid = _id(request.match_info["id"])
    svc = request.app[SERVICES]

    def load(c: Conn) -> tuple[model.Household, dict[str, Any]] | None:
        h = model.household(c, cid)
        if h is None:
            return None
        houses = visitors.find_houses(c, h.building, h.unit, h.house, site=h.site)
        return (h, houses[0]) if houses else None

    got = await svc.store.read(load)
    if got is None:
        raise web.HTTPNotFound()
    need(request, got[0].site)
    return got


@routes.get("/care/{id}")
@roles("admin")
async def care_page(request: web.Request) -> web.StreamResponse:
    h, house = await _household(request)
    actor = _actor(request)
    await request.app[SERVICES].store.run_write(
        lambda c: audit.write(c, actor, "view.care_household", f"care:{h.id}", "", request.remote or "")
    )
    return await _form_page(request, house=house, h=h)


@routes.post("/care/{id}")
@roles("admin")
async def care_change(request: web.Request) -> web.StreamResponse:
    h, house = await _household(request)
    form = await read_form(request)
    action = str(form.get("action", ""))
    svc = request.app[SERVICES]
    actor, now = _actor(request), _now(request)
    if action == "end":
        try:
            await svc.store.run_write(lambda c: model.end(c, h.id, actor, model.ts_text(now), request.remote or ""))
        except model.CareError as e:
            return await _form_page(request, house=house, h=h, error=e, status=409)
        await _watch(request).refresh(h.id)
        raise web.HTTPSeeOther("/care?notice=ended")
    if action != "update":
        raise web.HTTPBadRequest(text="action is update or end")
    est: Estate = request.app[ESTATE]
    today = est.today()
    values = _posted(form, OFFICE_FIELDS)
    people = await svc.store.read(lambda c: [r.person_id for r in model.candidates(c, h.house_id, today)])
    renew = str(form.get("renew_consent", "")) == "1"
    try:
        s = model.parse_settings(form, people, office=renew, now=now, tz=svc.tz)
        await svc.store.run_write(
            lambda c: model.update(c, h.id, s, actor, model.ts_text(now), request.remote or "", keep_consent=not renew)
        )
    except model.CareError as e:
        return await _form_page(request, house=house, h=h, values=values, error=e, status=400)
    await _watch(request).refresh(h.id)
    raise web.HTTPSeeOther(f"/care/{h.id}?notice=saved")


# ---------------------------------------------------------------- the resident's phone


async def house_card(
    request: web.Request, place: reg.Place, rs: ResidentSession | None, active: bool
) -> tuple[str, Markup] | None:
    """The care card on the flat's plate page, for the people living there: the household's state and "我很好"
    (above the help button while a check is waiting), or the way to sign up."""
    if rs is None or not active or place.house_id is None:
        return None
    svc = request.app[SERVICES]
    hid = place.house_id

    def load(c: Conn) -> tuple[model.Household | None, list[dict[str, Any]], list[str]]:
        h = model.household_of_house(c, hid)
        if h is None:
            return None, [], []
        pending = [a for a in model.open_alerts(c, h.id) if a["rule"] in model.OWN_RULES]
        return h, pending, model.people_names(c, h.people)

    h, pending, names = await svc.store.read(load)
    tr = translator(request)
    env = aiohttp_jinja2.get_env(request.app)
    html = env.get_template("care_phone_card.html").render(
        t=tr,
        csrf=request.get(CSRF_KEY, ""),
        code=request.match_info["code"],
        h=h,
        pending=pending,
        names=names,
        mask=reg.mask_phone,
        notice=_notice(request, "care"),
        last=activity_text(h.last_activity, tr) if h else "",
        last_at=_local(h.last_activity_at, request) if h else "",
    )
    return ("top" if pending else "bottom"), Markup(html)


async def _my_house(request: web.Request) -> tuple[reg.Place, Estate, ResidentSession]:
    """The plate's flat and a resident session of someone living there today; else :class:`Answer` with the page to
    answer with."""
    place, est, rs, mine = await _at_my_house(request)
    if mine is None or not mine.active(est.today()):
        raise Answer(
            page(
                request,
                "phone_message.html",
                status=403,
                title_key="care.title",
                message_key="care.not_resident",
                place=place,
                code=request.match_info["code"],
            )
        )
    return place, est, rs


async def _phone_form(
    request: web.Request,
    place: reg.Place,
    est: Estate,
    rs: ResidentSession,
    *,
    values: dict[str, Any] | None = None,
    error: model.CareError | None = None,
    status: int = 200,
) -> web.Response:
    hid, today = place.house_id, est.today()
    assert hid is not None

    def load(c: Conn) -> tuple[model.Household | None, list[reg.Resident]]:
        return model.household_of_house(c, hid), model.candidates(c, hid, today)

    h, people = await est.read(load)
    if values is None:
        values = _values_of(h, request)
        if h is None:
            values["person"] = [rs.person.id] if any(p.person_id == rs.person.id for p in people) else []
    return page(
        request,
        "care_phone.html",
        status=status,
        place=place,
        resident=rs,
        h=h,
        people=people,
        values=values,
        error=error,
        hours_choices=sorted({*model.HOURS_CHOICES, int(values["hours"] or 24)}),
        code=request.match_info["code"],
    )


@routes.get("/p/{code}/care")
@public
async def phone_care_page(request: web.Request) -> web.StreamResponse:
    place, est, rs = await _my_house(request)
    return await _phone_form(request, place, est, rs)


@routes.post("/p/{code}/care")
@public
async def phone_care_submit(request: web.Request) -> web.StreamResponse:
    """Sign the flat up (the signed-in resident's own consent), change it, or stop it."""
    place, est, rs = await _my_house(request)
    form = await read_form(request)
    action = str(form.get("action", ""))
    if action not in ("enrol", "update", "stop"):
        raise web.HTTPBadRequest()
    hid, today, svc = place.house_id, est.today(), request.app[SERVICES]
    assert hid is not None
    actor, now, remote = f"resident:{rs.person.id}", _now(request), _addr(request)
    existing = await est.read(lambda c: model.household_of_house(c, hid))
    code = request.match_info["code"]
    if action == "stop":
        if existing is None:
            raise web.HTTPSeeOther(f"/p/{code}")
        await est.write(lambda c: model.end(c, existing.id, actor, model.ts_text(now), remote))
        await _watch(request).refresh(existing.id)
        raise web.HTTPSeeOther(f"/p/{code}?care=stopped")
    values = _posted(form, PHONE_FIELDS)
    people = await est.read(lambda c: [r.person_id for r in model.candidates(c, hid, today)])
    try:
        s = model.parse_settings(form, people, office=False, now=now, tz=svc.tz, consent_name=rs.person.name)
        if existing is None:
            care_id = await est.write(lambda c: model.enrol(c, hid, place.site, s, actor, model.ts_text(now), remote))
        else:
            care_id = existing.id
            await est.write(lambda c: model.update(c, care_id, s, actor, model.ts_text(now), remote))
    except model.CareError as e:
        return await _phone_form(request, place, est, rs, values=values, error=e, status=400)
    await _watch(request).refresh(care_id)
    raise web.HTTPSeeOther(f"/p/{code}?care=saved")


@routes.post("/p/{code}/care/ok")
@public
async def phone_care_ok(request: web.Request) -> web.StreamResponse:
    """ "我很好": the resident answers a pending check (or reports in before one)."""
    place, est, rs = await _my_house(request)
    hid = place.house_id
    assert hid is not None
    h = await est.read(lambda c: model.household_of_house(c, hid))
    if h is None:
        return invalid(request)
    await _watch(request).check_in(h.id, rs.person.id, _addr(request))
    raise web.HTTPSeeOther(f"/p/{request.match_info['code']}?care=ok")


# ---------------------------------------------------------------- the guard's board


RULE_ROWS = ("no_activity", "night_activity", "panel_inactive", "panic")


async def board_section(request: web.Request, inc: dict[str, Any]) -> dict[str, Any] | None:
    """What a guard handling an incident at a flat under care needs: who is cared for, why the alert, the last
    activity, and the contact (number masked; :func:`reveal_contact` shows it)."""
    svc = request.app[SERVICES]
    got = await svc.store.read(lambda c: _section_data(c, inc))
    if got is None:
        return None
    tr = translator(request)
    return {
        "key": "care",
        "title": tr("care.section_title"),
        "rows": _rows(request, *got, revealed=False),
        "reveal": {"url": f"/api/care/incidents/{inc['id']}/contact", "label": tr("care.reveal")},
    }


def _rows(
    request: web.Request, h: model.Household, alert: dict[str, Any] | None, names: list[str], *, revealed: bool
) -> list[list[str]]:
    tr = translator(request)
    rows: list[list[str]] = [[tr("care.people"), "、".join(names) or "—"]]
    if alert is not None:
        rows.append([tr("care.rule"), tr(f"care.rule.{alert['rule']}", h=h.hours)])
        if alert["rule"] == "no_activity" and alert["detail"].get("since"):
            rows.append([tr("care.since"), _local(alert["detail"]["since"], request)])
        if alert["rule"] == "night_activity" and alert["detail"].get("at"):
            rows.append(
                [
                    tr("care.night_at"),
                    f"{_local(alert['detail']['at'], request)} · "
                    f"{activity_text(str(alert['detail'].get('what', '')), tr)}",
                ]
            )
    rows.append(
        [
            tr("care.last_activity"),
            f"{_local(h.last_activity_at, request) or '—'} · {activity_text(h.last_activity, tr)}",
        ]
    )
    if revealed:
        rows.append([tr("care.contact"), _contact(h, "", tr)])
        rows.append([tr("care.contact_phone"), h.contact_phone, "tel"])
    else:
        rows.append([tr("care.contact"), _contact(h, reg.mask_phone(h.contact_phone), tr)])
    return rows


def _contact(h: model.Household, phone: str, tr: i18n.Translator) -> str:
    rel = tr("care.relation", relation=h.contact_relation) if h.contact_relation else ""
    return f"{h.contact_name}{rel} {phone}".strip()


def _section_data(c: Conn, inc: dict[str, Any]) -> tuple[model.Household, dict[str, Any] | None, list[str]] | None:
    got = model.care_of_incident(c, inc)
    if got is None:
        return None
    h, alert = got
    return h, alert, model.people_names(c, h.people)


@routes.post("/api/care/incidents/{id}/contact")
@roles("admin", "guard")
async def reveal_contact(request: web.Request) -> web.StreamResponse:
    """The care contact's whole number, for the guard handling the incident to call: with a reason, audited and
    logged on the incident. 404 when the incident is not about a flat under care (or of another site)."""
    svc = request.app[SERVICES]
    iid = _id(request.match_info["id"])
    data = await read_json(request)
    reason = data.get("reason", "")
    if not isinstance(reason, str):
        raise bad_request("reason must be a string")
    why = " ".join(reason.split())[:200]
    tr = translator(request)
    if not why:
        return web.json_response(
            {"error": "bad-request", "detail": "board.need_reason", "message": tr("board.need_reason")}, status=400
        )
    user = request[SESSION_KEY].user
    actor, remote = f"{user.role}:{user.name}", request.remote or ""
    now = model.ts_text(_now(request))

    def put(c: Conn) -> tuple[model.Household, dict[str, Any] | None, list[str]] | None:
        inc = alarms.get_incident(c, iid)
        if inc is None or not sees(request, inc["site"]):
            return None
        got = _section_data(c, inc)
        if got is None:
            return None
        h = got[0]
        c.execute(
            "INSERT INTO incident_log (incident_id, at, actor, action, detail) VALUES (?, ?, ?, 'reveal_contact', ?)",
            (iid, now, actor[:80], f"care contact · {why}"),
        )
        audit.write(c, actor, "reveal.care_contact", f"incident:{iid}", f"care:{h.id} · {why}", remote, at=now)
        return got

    got = await svc.store.run_write(put)
    if got is None:
        raise web.HTTPNotFound()
    return web.json_response(
        {"rows": _rows(request, *got, revealed=True)}, dumps=lambda o: json.dumps(o, ensure_ascii=False)
    )


def setup_hooks(app: web.Application) -> None:
    from portal.alarms.board import DETAIL_SECTIONS
    from portal.estate.phone import HOUSE_CARDS

    app[DETAIL_SECTIONS].append(board_section)
    if HOUSE_CARDS not in app:
        app[HOUSE_CARDS] = []
    app[HOUSE_CARDS].append(house_card)
