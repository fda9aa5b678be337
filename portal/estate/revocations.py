"""Revocations and blocks made by hand: one pass revoked, or one person blocked, on a site's signed list.

What can be revoked or blocked, and by whom (the console's pages and the residents' phones are in
:mod:`portal.doors.revocation_views`):

* a guardroom visitor's pass (``guard_visitors``) and a resident's visitor pass (``visitor_passes``): revoked by
  staff of the site (admin, guard); a resident's visitor pass also by the resident who issued it, from the phone.
  It goes on the list by pass id until it would have expired (plus :data:`PASS_KEEP_S`), and is refused as
  *revoked* at every door from then on;
* a person: a resident (``reg_people``: every subject their residencies on the site carry, now and later; every
  unexpired visitor pass they issued there is revoked with them) or a guardroom visitor (that registration's
  subject). Blocked subjects go on the list's ``blocked`` part: refused as *blocked*, a TAMPER alarm at the door.
  A resident stays blocked until a guard or an administrator lifts it; a guardroom visitor's block leaves the
  list once their pass has expired (their subject opens nothing else).

Only passes and subjects this portal issued can be named (an unknown id is refused), so the list cannot be filled
with junk. Each change is one transaction with its audit row (``revocation.pass``, ``revocation.block``,
``revocation.lift``); the caller then rebuilds the site's list, which reaches the gateways within seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from portal.estate import registry as reg
from portal.store import Conn, audit, now_text
from portal.web.scope import Sites
from portal.web.scope import sql as site_sql

#: A revoked pass stays on the list this long after it would have expired (a gateway with clock trouble).
PASS_KEEP_S = 86_400
REASON_MAX = 200
PASS_ID_RE = re.compile(r"^[0-9a-f]{24,32}$")
SUBJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class RevocationError(ValueError):
    """A refused revocation; ``key`` is an i18n key (``revocations.err.*``)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


@dataclass(frozen=True, slots=True)
class Target:
    """One pass or one person, found by what a guard can name (a pass id, a subject from the access log, a row)."""

    site: str
    kind: str  # guard_visitor | visitor_pass | resident
    pass_id: str | None = None  # hex
    subject: str | None = None
    person_id: int | None = None
    visitor_id: int | None = None
    visitor_pass_id: int | None = None
    not_after: int | None = None  # of the pass (None for a resident)
    resident_id: int | None = None  # the residency that issued a visitor pass


def clean_reason(raw: str) -> str:
    reason = " ".join(str(raw).split())
    if not reason:
        raise RevocationError("revocations.err.reason")
    if len(reason) > REASON_MAX or any(ord(c) < 32 for c in reason):
        raise RevocationError("revocations.err.reason_long")
    return reason


# ---------------------------------------------------------------- finding what is named


def _guard_visitor(conn: Conn, where: str, arg: Any) -> Target | None:
    r = conn.execute(
        f"SELECT id, site, pass_id, subject, not_after FROM guard_visitors WHERE {where}", (arg,)
    ).fetchone()
    return (
        Target(
            r["site"],
            "guard_visitor",
            pass_id=r["pass_id"],
            subject=r["subject"],
            visitor_id=r["id"],
            not_after=r["not_after"],
        )
        if r
        else None
    )


def _visitor_pass(conn: Conn, where: str, arg: Any) -> Target | None:
    r = conn.execute(
        "SELECT v.id, v.pass_id, v.subject, v.not_after, v.resident_id, s.code AS site FROM visitor_passes v"
        " JOIN reg_residents r ON r.id = v.resident_id JOIN reg_houses h ON h.id = r.house_id"
        " JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b ON b.id = u.building_id"
        f" JOIN reg_sites s ON s.id = b.site_id WHERE {where}",
        (arg,),
    ).fetchone()
    return (
        Target(
            r["site"],
            "visitor_pass",
            pass_id=r["pass_id"],
            subject=r["subject"],
            visitor_pass_id=r["id"],
            not_after=r["not_after"],
            resident_id=r["resident_id"],
        )
        if r
        else None
    )


def find_pass(conn: Conn, pass_hex: str) -> Target | None:
    """The guardroom visitor or resident's visitor pass with this id (hex), if this portal issued it."""
    pass_hex = pass_hex.strip().lower()
    if not PASS_ID_RE.match(pass_hex):
        return None
    return _guard_visitor(conn, "pass_id = ?", pass_hex) or _visitor_pass(conn, "v.pass_id = ?", pass_hex)


def find_subject(conn: Conn, subject: str, site: str) -> Target | None:
    """Who a subject (from the access log) is: a resident of ``site``, a guardroom visitor, a visitor pass."""
    subject = subject.strip()
    if not SUBJECT_RE.match(subject):
        return None
    r = conn.execute(
        "SELECT r.person_id, s.code AS site FROM reg_residents r JOIN reg_houses h ON h.id = r.house_id"
        " JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b ON b.id = u.building_id"
        " JOIN reg_sites s ON s.id = b.site_id WHERE r.subject = ?",
        (subject,),
    ).fetchone()
    if r is not None:
        return Target(r["site"], "resident", person_id=r["person_id"]) if r["site"] == site or not site else None
    return _guard_visitor(conn, "subject = ?", subject) or _visitor_pass(conn, "v.subject = ?", subject)


def find_visitor(conn: Conn, visitor_id: int) -> Target | None:
    return _guard_visitor(conn, "id = ?", visitor_id)


def find_visitor_pass(conn: Conn, visitor_pass_id: int) -> Target | None:
    return _visitor_pass(conn, "v.id = ?", visitor_pass_id)


def find_resident(conn: Conn, person_id: int, site: str) -> Target | None:
    """A person with a residency (of any status) on ``site``."""
    r = conn.execute(
        "SELECT 1 FROM reg_residents r JOIN reg_houses h ON h.id = r.house_id JOIN reg_units u ON u.id = h.unit_id"
        " JOIN reg_buildings b ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id"
        " WHERE r.person_id = ? AND s.code = ?",
        (person_id, site),
    ).fetchone()
    return Target(site, "resident", person_id=person_id) if r else None


# ---------------------------------------------------------------- changes (writer thread, one transaction each)


def revoke_pass(conn: Conn, t: Target, reason: str, actor: str, remote: str = "") -> int:
    """Put ``t``'s pass on the list. Revoking a pass already revoked is refused (``revocations.err.already``)."""
    if t.pass_id is None:
        raise RevocationError("revocations.err.not_found")
    if conn.execute(
        "SELECT 1 FROM revocations WHERE kind = 'pass' AND pass_id = ? AND lifted_at IS NULL", (t.pass_id,)
    ).fetchone():
        raise RevocationError("revocations.err.already")
    until = (t.not_after or 0) + PASS_KEEP_S
    rid = int(
        conn.execute(
            "INSERT INTO revocations (site, kind, pass_id, visitor_id, visitor_pass_id, reason, until, created_at,"
            " created_by) VALUES (?, 'pass', ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (t.site, t.pass_id, t.visitor_id, t.visitor_pass_id, reason, until, now_text(), actor),
        ).fetchone()[0]
    )
    audit.write(conn, actor, "revocation.pass", f"pass:{t.pass_id}", f"{t.site} {t.kind}: {reason}", remote)
    return rid


def block(conn: Conn, t: Target, reason: str, actor: str, remote: str = "") -> int:
    """Block ``t``'s person: a resident (every subject on the site, until lifted) or a visitor's subject."""
    if t.kind == "resident":
        if conn.execute(
            "SELECT 1 FROM revocations WHERE kind = 'block' AND person_id = ? AND site = ? AND lifted_at IS NULL",
            (t.person_id, t.site),
        ).fetchone():
            raise RevocationError("revocations.err.already")
        until, target = None, f"person:{t.person_id}"
    else:
        if conn.execute(
            "SELECT 1 FROM revocations WHERE kind = 'block' AND subject = ? AND lifted_at IS NULL", (t.subject,)
        ).fetchone():
            raise RevocationError("revocations.err.already")
        until, target = (t.not_after or 0) + PASS_KEEP_S, f"subject:{t.subject}"
    rid = int(
        conn.execute(
            "INSERT INTO revocations (site, kind, subject, person_id, visitor_id, visitor_pass_id, reason, until,"
            " created_at, created_by) VALUES (?, 'block', ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                t.site,
                None if t.kind == "resident" else t.subject,
                t.person_id,
                t.visitor_id,
                t.visitor_pass_id,
                reason,
                until,
                now_text(),
                actor,
            ),
        ).fetchone()[0]
    )
    audit.write(conn, actor, "revocation.block", target, f"{t.site} {t.kind}: {reason}", remote)
    return rid


def lift(conn: Conn, rid: int, actor: str, reason: str, remote: str = "", sites: Sites = None) -> str:
    """Lift a block (a revoked pass stays revoked: issue a new one). The site whose list changes."""
    cond, args = site_sql("site", sites)
    row = conn.execute(f"SELECT * FROM revocations WHERE id = ? AND {cond}", (rid, *args)).fetchone()
    if row is None:
        raise RevocationError("revocations.err.not_found")
    if row["kind"] != "block":
        raise RevocationError("revocations.err.pass_final")
    if row["lifted_at"] is not None:
        raise RevocationError("revocations.err.lifted")
    conn.execute("UPDATE revocations SET lifted_at = ?, lifted_by = ? WHERE id = ?", (now_text(), actor, rid))
    what = f"person:{row['person_id']}" if row["person_id"] is not None else f"subject:{row['subject']}"
    audit.write(conn, actor, "revocation.lift", what, f"{row['site']}: {reason}", remote)
    return str(row["site"])


# ---------------------------------------------------------------- the signed list (writer thread)


def listed(conn: Conn, site: str, now: int) -> tuple[list[bytes], list[str]]:
    """(pass ids, blocked subjects) for ``site``'s list: revoked passes until their ``until``; blocked visitors
    until theirs; blocked residents' subjects on the site and the unexpired visitor passes they issued there."""
    passes: set[bytes] = set()
    blocked: set[str] = set()
    rows = conn.execute(
        "SELECT kind, pass_id, subject, person_id FROM revocations WHERE site = ?"
        " AND lifted_at IS NULL AND (until IS NULL OR until >= ?)",
        (site, now),
    ).fetchall()
    people = []
    for r in rows:
        if r["kind"] == "pass":
            passes.add(bytes.fromhex(r["pass_id"]))
        elif r["person_id"] is not None:
            people.append(int(r["person_id"]))
        elif r["subject"]:
            blocked.add(r["subject"])
    for pid in people:
        for s in conn.execute(
            "SELECT r.subject, r.id FROM reg_residents r JOIN reg_houses h ON h.id = r.house_id"
            " JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b ON b.id = u.building_id"
            " JOIN reg_sites si ON si.id = b.site_id WHERE r.person_id = ? AND si.code = ?",
            (pid, site),
        ):
            blocked.add(s["subject"])
            passes.update(
                bytes.fromhex(v[0])
                for v in conn.execute(
                    "SELECT pass_id FROM visitor_passes WHERE resident_id = ? AND not_after >= ?", (s["id"], now)
                )
            )
    return sorted(passes), sorted(blocked)


def person_blocked(conn: Conn, person_id: int, site: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM revocations WHERE kind = 'block' AND person_id = ? AND site = ? AND lifted_at IS NULL",
            (person_id, site),
        ).fetchone()
        is not None
    )


def pass_revoked(conn: Conn, pass_hex: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM revocations WHERE kind = 'pass' AND pass_id = ? AND lifted_at IS NULL", (pass_hex,)
        ).fetchone()
        is not None
    )


# ---------------------------------------------------------------- what the console shows (reader thread)


def in_force(conn: Conn, sites: Sites, now: int, limit: int = 200) -> list[dict[str, Any]]:
    """Revocations and blocks not lifted and not run out, newest first, with what they name (masked phones)."""
    cond, args = site_sql("v.site", sites)
    rows = conn.execute(
        "SELECT v.*, g.name AS visitor_name, g.building AS g_building, g.unit AS g_unit, g.house AS g_house,"
        " p.name AS person_name, p.phone AS person_phone FROM revocations v"
        " LEFT JOIN guard_visitors g ON g.id = v.visitor_id LEFT JOIN reg_people p ON p.id = v.person_id"
        f" WHERE v.lifted_at IS NULL AND (v.until IS NULL OR v.until >= ?) AND {cond} ORDER BY v.id DESC LIMIT ?",
        (now, *args, limit),
    ).fetchall()
    out = []
    for r in rows:
        d = dict(r)
        d["person_phone"] = reg.mask_phone(r["person_phone"]) if r["person_phone"] else ""
        d["house_text"] = f"{r['g_building']}-{r['g_unit']}-{r['g_house']}" if r["g_building"] else ""
        if r["visitor_pass_id"] is not None:
            d["house_text"] = _visitor_pass_house(conn, int(r["visitor_pass_id"]))
        d["what"] = (
            "resident"
            if r["person_id"] is not None
            else "guard_visitor"
            if r["visitor_id"] is not None
            else "visitor_pass"
        )
        out.append(d)
    return out


def _visitor_pass_house(conn: Conn, vpid: int) -> str:
    r = conn.execute(
        "SELECT b.code AS b, u.code AS u, h.code AS h FROM visitor_passes v JOIN reg_residents r"
        " ON r.id = v.resident_id JOIN reg_houses h ON h.id = r.house_id JOIN reg_units u"
        " ON u.id = h.unit_id JOIN reg_buildings b ON b.id = u.building_id WHERE v.id = ?",
        (vpid,),
    ).fetchone()
    return f"{r['b']}-{r['u']}-{r['h']}" if r else ""


def house_view(conn: Conn, house_id: int, site: str, now: int) -> dict[str, Any]:
    """What a guard can revoke or block at one house: its residents (phones masked), the unexpired visitor passes
    they issued, and the unexpired guardroom visitors to it; each with its state."""
    residents = []
    for r in reg.household(conn, house_id, statuses=("active", "inactive", "pending")):
        residents.append(
            {
                "person_id": r.person_id,
                "name": r.name,
                "role": r.role,
                "status": r.status,
                "phone": reg.mask_phone(r.phone),
                "blocked": person_blocked(conn, r.person_id, site),
            }
        )
    passes = [
        dict(v) | {"revoked": pass_revoked(conn, v["pass_id"])}
        for v in conn.execute(
            "SELECT v.id, v.pass_id, v.not_before, v.not_after, v.uses, p.name AS issuer FROM visitor_passes v"
            " JOIN reg_residents r ON r.id = v.resident_id JOIN reg_people p ON p.id = r.person_id"
            " WHERE r.house_id = ? AND v.not_after >= ? ORDER BY v.id DESC LIMIT 50",
            (house_id, now),
        )
    ]
    visitors = [
        dict(g)
        | {
            "revoked": pass_revoked(conn, g["pass_id"]),
            "blocked": conn.execute(
                "SELECT 1 FROM revocations WHERE kind = 'block' AND subject = ? AND lifted_at IS NULL", (g["subject"],)
            ).fetchone()
            is not None,
        }
        for g in conn.execute(
            "SELECT id, name, pass_id, subject, not_before, not_after, uses FROM guard_visitors"
            " WHERE house_id = ? AND not_after >= ? ORDER BY id DESC LIMIT 50",
            (house_id, now),
        )
    ]
    return {"residents": residents, "passes": passes, "visitors": visitors}


def issued_by(conn: Conn, resident_id: int, now: int) -> list[dict[str, Any]]:
    """A residency's visitor passes not yet expired, newest first, each with ``revoked``."""
    return [
        dict(v) | {"revoked": pass_revoked(conn, v["pass_id"])}
        for v in conn.execute(
            "SELECT id, pass_id, not_before, not_after, uses, created_at FROM visitor_passes"
            " WHERE resident_id = ? AND not_after >= ? ORDER BY id DESC LIMIT 50",
            (resident_id, now),
        )
    ]
