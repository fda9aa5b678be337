"""Grid cases: which incidents and problem reports go up (the rules), the record of each revision, and the outbox.

Everything here runs on the store's writer connection, inside the transaction of the change that causes it: an
incident opening, a guard's step, a problem report forwarded, the platform's status coming back. A case is one
incident or one problem report under a stable event number; each change of the estate's handling queues the next
revision of its record. The delivery sends a case's report first and then only the newest revision still waiting
(each carries the whole handling so far), so an outage of hours ends with at most two records per case, not one per
step.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from ulid import ULID

from portal.alarms import incidents as alarms
from portal.config import GridCategory, GridRule, PortalConfig
from portal.grid import contract
from portal.store import Conn, Row, audit, now_text
from portal.web import i18n

log = logging.getLogger("portal.grid")

ZH = i18n.Translator("zh-CN")
#: The estate's steps that the record lists, and the GB/T 30428.8 stage each belongs to.
STAGE_OF: dict[str, contract.Stage] = {
    "alarm": "上报",
    "trip": "上报",
    "repeat": "上报",
    "forward": "上报",
    "ack": "立案",
    "dispatch": "派遣",
    "on_scene": "处置",
    "restore": "处置",
    "note": "处置",
    "resolve": "核查",
    "close": "结案",
}
#: A problem report's statuses (portal/estate/registry_views.py) by stage.
WORK_STAGE: dict[str, contract.Stage] = {
    "open": "处置",
    "acknowledged": "立案",
    "dispatched": "派遣",
    "resolved": "核查",
    "closed": "结案",
}
#: The guards' actions after which a case already up gets its next revision.
UPDATE_ACTIONS = frozenset({"ack", "dispatch", "on_scene", "note", "resolve", "close", "finish"})
#: The "gateway" of events the portal raises itself (portal/estate/service.py): residents' help calls (house.sos),
#: care alerts, patrol alerts. Only a help call is a resident's report; the others are the estate's system's.
PORTAL_GATEWAY = "portal"
_MOBILE = re.compile(r"(?<!\d)(1[3-9]\d)\d{4}(\d{4})(?!\d)")
_ID_CARD = re.compile(r"(?<![0-9])(\d{6})\d{8}(\d{3}[0-9Xx])(?![0-9Xx])")


def mask(text: str) -> str:
    """Free text on its way out of the estate: mobile numbers and ID-card numbers masked (138****5678)."""
    return _ID_CARD.sub(r"\1********\2", _MOBILE.sub(r"\1****\2", text))


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def matches(
    rule: GridRule, *, kind: str, type_: str, priority: int, cause: str | None = None, flags: Sequence[str] = ()
) -> bool:
    if rule.kinds and kind not in rule.kinds:
        return False
    if rule.types and type_ not in rule.types:
        return False
    if priority < rule.min_priority:
        return False
    if rule.causes and cause not in rule.causes:
        return False
    return not rule.flags or bool(set(rule.flags) & set(flags))


@dataclass(eq=False)
class Link:
    """What the in-transaction code needs of the portal's config. ``queued`` is set (in the writer thread) when a
    record was queued, so the delivery wakes after that commit and not after every other one."""

    cfg: PortalConfig
    queued: bool = False

    @property
    def grid(self) -> Any:
        return self.cfg.grid

    def goes_up(self, site: str) -> bool:
        return self.grid.enabled and self.grid.site(site) is not None

    def rules(self, on: str) -> list[GridRule]:
        return [r for r in self.grid.rules if r.on == on]

    # -- the in-transaction hooks

    def on_incident(self, conn: Conn, inc: dict[str, Any], action: str, actor: str) -> None:
        """alarms.IncidentHook: open a case when a rule says so, or queue the next revision of one already up."""
        if not self.goes_up(inc["site"]):
            return
        _guarded(conn, lambda: self._on_incident(conn, inc, action, actor))

    def _on_incident(self, conn: Conn, inc: dict[str, Any], action: str, actor: str) -> None:
        case = conn.execute("SELECT * FROM grid_cases WHERE incident_id = ?", (inc["id"],)).fetchone()
        if case is not None:
            if action in UPDATE_ACTIONS:
                queue_revision(conn, self, case)
            return
        trigger = (
            "open"
            if action == "open"
            else "close"
            if inc["state"] == "closed" and action in ("close", "finish")
            else None
        )
        if trigger is None:
            return
        for rule in self.rules(trigger):
            if matches(
                rule,
                kind=inc["kind"],
                type_=inc["type"],
                priority=int(inc["priority"]),
                cause=inc.get("cause"),
                flags=inc.get("flags") or (),
            ):
                open_case(conn, self, incident_id=inc["id"], trigger=trigger, by="system")
                return

    def lasting_due(self, inc: Mapping[str, Any]) -> float | None:
        """Seconds after which this open, unrestored incident goes up under a lasting rule (None: never)."""
        if not self.goes_up(inc["site"]) or inc["restored_at"]:
            return None
        afters = [
            r.after_s
            for r in self.rules("lasting")
            if r.after_s is not None and matches(r, kind=inc["kind"], type_=inc["type"], priority=int(inc["priority"]))
        ]
        return float(min(afters)) if afters else None

    def may_forward(self, site: str) -> bool:
        return self.goes_up(site) and any(
            matches(r, kind="problem", type_="house.problem", priority=0) for r in self.rules("forward")
        )

    def on_work_item(self, conn: Conn, work_item_id: int) -> None:
        """A problem report's handling changed: the next revision of its case, if it went up."""
        case = conn.execute("SELECT * FROM grid_cases WHERE work_item_id = ?", (work_item_id,)).fetchone()
        if case is not None and self.grid.enabled:
            _guarded(conn, lambda: queue_revision(conn, self, case))


def _guarded(conn: Conn, fn: Any) -> None:
    """Run ``fn`` in a savepoint: a record that cannot be built must not undo the guard's step that triggered it.
    It is counted as a rejection (``grid-build``, shown by /api/health) and logged."""
    conn.execute("SAVEPOINT grid")
    try:
        fn()
    except Exception as e:
        conn.execute("ROLLBACK TO grid")
        conn.execute("RELEASE grid")
        log.exception("grid record not built")
        now = now_text()
        conn.execute(
            "INSERT INTO rejections (reason, source, count, first_at, last_at, last_detail)"
            " VALUES ('grid-build', '', 1, ?, ?, ?) ON CONFLICT (reason, source) DO UPDATE SET"
            " count = rejections.count + 1, last_at = excluded.last_at, last_detail = excluded.last_detail",
            (now, now, f"{type(e).__name__}: {e}"[:300]),
        )
        return
    conn.execute("RELEASE grid")


# ---------------------------------------------------------------- cases and the outbox


def open_case(
    conn: Conn,
    link: Link,
    *,
    incident_id: int | None = None,
    work_item_id: int | None = None,
    trigger: str,
    by: str,
    now: str | None = None,
) -> int:
    """Put an incident or a problem report on its way up: the case and its first record (revision 1)."""
    now = now or now_text()
    subject = _Subject.load(conn, incident_id=incident_id, work_item_id=work_item_id)
    cat = link.grid.category(subject.category_key)
    number = f"{link.grid.number_prefix}-{subject.site}-{ULID()}"
    cur = conn.execute(
        "INSERT INTO grid_cases (number, incident_id, work_item_id, site, trigger, created_at, created_by, category,"
        " category_name, subcategory, subcategory_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (
            number,
            incident_id,
            work_item_id,
            subject.site,
            trigger,
            now,
            by,
            cat.category,
            cat.category_name,
            cat.subcategory,
            cat.subcategory_name,
        ),
    )
    case_id = int(cur.fetchone()[0])
    case = conn.execute("SELECT * FROM grid_cases WHERE id = ?", (case_id,)).fetchone()
    body = contract.encode(build(conn, link, case, 1, "report", now))
    conn.execute(
        "INSERT INTO grid_outbox (case_id, revision, kind, body, created_at, state) VALUES"
        " (?, 1, 'report', ?, ?, 'pending')",
        (case_id, body.decode(), now),
    )
    link.queued = True
    detail = f"{number} · {cat.category_name}/{cat.subcategory_name}"
    if incident_id is not None:
        _incident_log(conn, incident_id, now, by, "grid", f"上报网格 {detail}")
    audit.write(conn, by, "grid.report", f"grid:{number}", f"{trigger} · {detail}", at=now)
    return case_id


def queue_revision(conn: Conn, link: Link, case: Row, now: str | None = None) -> None:
    """The estate's handling moved on: queue the next revision of the case's record (the delivery sends only the
    newest of those still waiting, once the report itself is through)."""
    now = now or now_text()
    rev = int(case["revision"]) + 1
    body = contract.encode(build(conn, link, case, rev, "update", now))
    conn.execute(
        "INSERT INTO grid_outbox (case_id, revision, kind, body, created_at, state) VALUES"
        " (?, ?, 'update', ?, ?, 'pending')",
        (case["id"], rev, body.decode(), now),
    )
    conn.execute("UPDATE grid_cases SET revision = ? WHERE id = ?", (rev, case["id"]))
    link.queued = True


def resend(conn: Conn, link: Link, outbox_id: int, by: str) -> int | None:
    """An administrator sends a record the platform refused again, rebuilt from today's data and config (after
    fixing what the platform did not like). Returns the case id, None when there is no such failed record."""
    row = conn.execute(
        "SELECT o.*, c.number FROM grid_outbox o JOIN grid_cases c ON c.id = o.case_id"
        " WHERE o.id = ? AND o.state = 'failed'",
        (outbox_id,),
    ).fetchone()
    if row is None:
        return None
    case = conn.execute("SELECT * FROM grid_cases WHERE id = ?", (row["case_id"],)).fetchone()
    subject = _Subject.load(conn, incident_id=case["incident_id"], work_item_id=case["work_item_id"])
    cat = link.grid.category(subject.category_key)
    conn.execute(
        "UPDATE grid_cases SET category = ?, category_name = ?, subcategory = ?, subcategory_name = ? WHERE id = ?",
        (cat.category, cat.category_name, cat.subcategory, cat.subcategory_name, case["id"]),
    )
    case = conn.execute("SELECT * FROM grid_cases WHERE id = ?", (row["case_id"],)).fetchone()
    now = now_text()
    body = contract.encode(build(conn, link, case, row["revision"], row["kind"], now))
    conn.execute("UPDATE grid_outbox SET body = ?, state = 'pending' WHERE id = ?", (body.decode(), outbox_id))
    # Later revisions queued behind the refused one are folded into it (it now carries the newest state).
    conn.execute(
        "UPDATE grid_outbox SET state = 'superseded' WHERE case_id = ? AND state = 'pending' AND id != ?",
        (case["id"], outbox_id),
    )
    audit.write(conn, by, "grid.resend", f"grid:{row['number']}", f"revision {row['revision']}", at=now)
    return int(case["id"])


def _incident_log(conn: Conn, incident_id: int, at: str, actor: str, action: str, detail: str) -> None:
    conn.execute(
        "INSERT INTO incident_log (incident_id, at, actor, action, detail) VALUES (?, ?, ?, ?, ?)",
        (incident_id, at, actor[:80], action, detail[:1000]),
    )
    conn.execute("UPDATE incidents SET version = version + 1, updated_at = ? WHERE id = ?", (at, incident_id))


# ---------------------------------------------------------------- what the record says


@dataclass
class _Subject:
    """An incident or a problem report, read for its record."""

    site: str
    category_key: str
    incident: dict[str, Any] | None
    work: Row | None
    place: dict[str, str]

    @classmethod
    def load(cls, conn: Conn, *, incident_id: int | None, work_item_id: int | None) -> _Subject:
        if incident_id is not None:
            inc = alarms.get_incident(conn, incident_id)
            if inc is None:
                raise LookupError(f"incident {incident_id}")
            key = "sos" if inc["type"] == "house.sos" else inc["kind"]
            place = {k: str(inc["place"].get(k) or "") for k in ("building", "unit", "house", "zone")}
            if not place["zone"] and inc["data"].get("zone"):
                place["zone"] = str(inc["data"]["zone"])
            return cls(inc["site"], key, inc, None, place)
        row = conn.execute(
            "SELECT w.*, s.code AS site, s.name AS site_name, b.code AS building, u.code AS unit,"
            " h.code AS house FROM work_items w JOIN reg_houses h ON h.id = w.house_id JOIN reg_units u"
            " ON u.id = h.unit_id JOIN reg_buildings b ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id"
            " WHERE w.id = ?",
            (work_item_id,),
        ).fetchone()
        if row is None:
            raise LookupError(f"work item {work_item_id}")
        place = {"building": row["building"], "unit": row["unit"], "house": row["house"], "zone": ""}
        return cls(row["site"], f"{row['kind']}.{row['category'] or 'other'}", None, row, place)


def _office(conn: Conn, link: Link, site: str, site_name: str) -> tuple[str, str]:
    """The property office as the platform names it, and its phone (the portal config's ``sites:``)."""
    row = conn.execute("SELECT name FROM reg_sites WHERE code = ?", (site,)).fetchone()
    name = str(row["name"]) if row and row["name"] else site_name
    return f"{name}物业服务中心", link.cfg.site_info(site).office_phone


def _address(link: Link, site: str, site_label: str, place: Mapping[str, str], zone_label: str = "") -> str:
    gs = link.grid.site(site)
    base = (gs.address if gs and gs.address else site_label) or site
    parts = [ZH(f"place.{k}", v=place[k]) for k in ("building", "unit", "house") if place.get(k)]
    if not parts and zone_label:
        parts = [zone_label]
    elif not parts and place.get("zone"):
        parts = [ZH("place.zone", v=place["zone"])]
    return _cut(base + "".join(parts), 200)


def _incident_steps(conn: Conn, incident_id: int) -> list[contract.Step]:
    out = []
    for e in alarms.incident_log(conn, incident_id):
        stage = STAGE_OF.get(e["action"])
        if stage is None:
            continue
        note = ZH(f"board.action.{e['action']}") + (f"：{e['detail']}" if e["detail"] else "")
        out.append(
            contract.Step(
                stage=stage,
                action=e["action"],
                at=_ts(e["at"]),
                by=_cut(str(e["actor"]), 200),
                note=_cut(mask(note), 2000),
            )
        )
    return out[-500:]


def _work_steps(case: Row, work: Row) -> list[contract.Step]:
    out = [
        contract.Step(
            stage="上报", action="report", at=_ts(work["created_at"]), by="resident", note="住户扫门牌二维码报事"
        )
    ]
    out.append(
        contract.Step(
            stage="上报",
            action="forward",
            at=_ts(case["created_at"]),
            by=_cut(str(case["created_by"]), 200),
            note="保安转报网格",
        )
    )
    for n in json.loads(work["notes"] or "[]"):
        status = str(n.get("status", ""))
        note = ZH(f"work.status_{status}") + (f"：{n['note']}" if n.get("note") else "")
        try:
            at = _ts(str(n.get("at")))
        except ValueError:
            continue
        out.append(
            contract.Step(
                stage=WORK_STAGE.get(status, "处置"),
                action=status or "note",
                at=at,
                by=_cut(str(n.get("by", "")), 200),
                note=_cut(mask(note), 2000),
            )
        )
    out.sort(key=lambda s: s.at)
    return out[-500:]


def build(
    conn: Conn, link: Link, case: Row, revision: int, kind: Literal["report", "update"], now: str
) -> contract.Event:
    """The record of ``case`` at ``revision`` as it stands now, in Chinese (the platform's language)."""
    subject = _Subject.load(conn, incident_id=case["incident_id"], work_item_id=case["work_item_id"])
    cfg, grid = link.cfg, link.grid
    gs = grid.site(subject.site)
    cat: GridCategory = grid.category(subject.category_key)
    category = contract.Category(code=case["category"], name=case["category_name"])
    sub = contract.Category(code=case["subcategory"], name=case["subcategory_name"])
    attachments: list[contract.Attachment] = []
    if subject.incident is not None:
        inc = subject.incident
        site_label = cfg.site_name
        org, org_phone = _office(conn, link, subject.site, site_label)
        zone_label = str(inc["data"].get("label") or "")
        address = _address(link, subject.site, site_label, subject.place, zone_label)
        resident = inc["type"] == "house.sos"  # a help call from a door plate; nothing else is a resident's
        system = inc["gateway"] == PORTAL_GATEWAY  # found by the portal (care, patrol) from the estate's signals
        device = str(inc["device"])
        if system:  # the portal's module by its name ("care" → 独居关爱, "patrol" → 电子巡更)
            device = ZH(f"{device}.title") if ZH.has(f"{device}.title") else device
        source = "resident" if resident else "iot"
        reporter = contract.Reporter(
            type="resident" if resident else "device",
            name="" if resident else _cut(device, 200),
            org=org,
            org_phone=org_phone,
        )
        what = inc["title"]["zh-CN"]
        if resident:
            description = f"住户通过门牌二维码一键求助（{address}）"
            if inc.get("trips", 1) > 1:
                description += f"，共按下 {inc['trips']} 次"
        else:
            description = f"{what}（{inc['where']['zh-CN']}）" + ("" if system else f"，设备 {device}")
            if inc.get("count", 1) > 1:
                description += f"，重复 {inc['count']} 次"
        if inc["restored_at"]:
            description += "；现场信号已恢复"
        found = _ts(inc["opened_at"])
        steps = _incident_steps(conn, inc["id"])
        estate = contract.Handling(
            state=inc["state"],
            state_name=ZH(f"state.{inc['state']}"),
            closed=inc["state"] == "closed",
            cause=inc["cause"],
            flags=[f for f in inc.get("flags") or [] if f in ("damage", "police")],
            steps=steps,
        )
        title = f"{address} {sub.name}"
    else:
        work = subject.work
        assert work is not None
        site_label = str(work["site_name"] or cfg.site_name)
        org, org_phone = _office(conn, link, subject.site, site_label)
        address = _address(link, subject.site, site_label, subject.place)
        source = "resident"
        reporter = contract.Reporter(type="resident", org=org, org_phone=org_phone)
        description = mask(str(work["text"] or "")) or sub.name
        found = _ts(work["created_at"])
        if work["photo"] is not None and len(work["photo"]) <= grid.max_attachment_bytes:
            data = bytes(work["photo"])
            mime = str(work["photo_type"] or "image/jpeg")
            ext = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}.get(mime, "jpg")
            attachments.append(
                contract.Attachment(
                    name=f"photo-1.{ext}",
                    mime=mime,  # type: ignore[arg-type]
                    size=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    data=base64.b64encode(data).decode(),
                )
            )
        status = str(work["status"])
        estate = contract.Handling(
            state=status,
            state_name=ZH(f"work.status_{status}"),
            closed=status == "closed",
            steps=_work_steps(case, work),
        )
        title = f"{address} {sub.name}"
    place = contract.Place(
        address=address,
        grid_code=gs.grid_code if gs else "0",
        site=subject.site,
        building=subject.place["building"],
        unit=subject.place["unit"],
        house=subject.place["house"],
        zone=_cut(subject.place["zone"], 200),
        lat=gs.lat if gs else None,
        lon=gs.lon if gs else None,
        crs=gs.crs if gs and gs.lat is not None else None,
    )
    return contract.Event(
        schema=contract.SCHEMA_EVENT,
        v=contract.VERSION,
        number=case["number"],
        revision=revision,
        kind=kind,
        title=_cut(title, 100),
        category=category,
        subcategory=sub,
        source=contract.SOURCES[source],  # type: ignore[arg-type]
        source_code=source,  # type: ignore[arg-type]
        place=place,
        found_at=found,
        reporter=reporter,
        description=_cut(description, 2000),
        attachments=attachments,
        urgency=cat.urgency,
        estate=estate,
        revised_at=_ts(now),
    )


# ---------------------------------------------------------------- status back


@dataclass(frozen=True)
class Applied:
    """What a status from the platform did: ``new`` False when its callback id was seen before (nothing changed);
    ``incident`` the incident after it (to show on the consoles), when the case is an incident's."""

    case_id: int
    new: bool
    current: bool  # it is now the case's status (one older than that shown is logged, not shown: apply_status)
    incident: dict[str, Any] | None = None


def apply_status(conn: Conn, st: contract.Status, source: str, actor: str) -> Applied | None:
    """Record one status of a case (a callback, or an entry of a poll's history) once, under its callback id.
    None when no case has that number."""
    case = conn.execute("SELECT * FROM grid_cases WHERE number = ?", (st.number,)).fetchone()
    if case is None:
        return None
    at = st.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    now = now_text()
    by, note = _cut(mask(st.by), 200), _cut(mask(st.note), 1000)
    cur = conn.execute(
        "INSERT INTO grid_status_log (case_id, callback_id, status, at, by_name, note, source,"
        " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (case["id"], st.callback_id, st.status, at, by, note, source, now),
    )
    if not cur.rowcount:
        return Applied(int(case["id"]), new=False, current=False)
    # The newest by the platform's time stands. Its times may be whole seconds: of two at the same time, whichever
    # comes first, the later in the case's flow stands (a late 处置中 never undoes an 已办结 of the same second).
    current = (
        case["status_at"] is None
        or at > case["status_at"]
        or (at == case["status_at"] and contract.FLOW_RANK[st.status] >= contract.FLOW_RANK.get(case["status"], -1))
    )
    if current:
        conn.execute(
            "UPDATE grid_cases SET status = ?, status_at = ?, status_by = ?, status_note = ? WHERE id = ?",
            (st.status, at, by, note, case["id"]),
        )
    if st.case_id and not case["platform_case"]:
        conn.execute("UPDATE grid_cases SET platform_case = ? WHERE id = ?", (_cut(st.case_id, 200), case["id"]))
    if st.status != "returned":
        conn.execute(
            "UPDATE grid_cases SET accepted_at = least(coalesce(accepted_at, ?), ?) WHERE id = ?", (at, at, case["id"])
        )
    if st.status == "closed":
        conn.execute("UPDATE grid_cases SET closed_at = coalesce(closed_at, ?) WHERE id = ?", (at, case["id"]))
    label = contract.STATUSES[st.status]
    detail = " · ".join(x for x in (label, by, note) if x)
    audit.write(conn, actor, "grid.status", f"grid:{case['number']}", f"{source} · {detail}"[:500], at=now)
    inc = None
    if case["incident_id"] is not None:
        _incident_log(conn, case["incident_id"], now, actor, "grid", f"网格{detail}")
        inc = alarms.get_incident(conn, case["incident_id"])
    return Applied(int(case["id"]), new=True, current=current, incident=inc)
