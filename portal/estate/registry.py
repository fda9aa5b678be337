"""The estate registry: sites → buildings (幢) → units (单元) → houses (室), the people who live there and
their residencies, the doors gateways own, door plates, and the audit trail of personal data.

Plain functions on a SQLite connection: reads run on the store's reader thread, writes inside one
:class:`portal.store.FnOp` on its writer thread (so one import is one savepoint: all or nothing).

A *residency* (``reg_residents`` row) ties one person to one house with a role and dates for one stay; its
random ``subject`` is what passes name and what the revocation list revokes when the residency ends. An ended
stay is never brought back: a person who returns (a new "I live here" request, an import, an administrator's
"reactivate") gets a new row with a new subject, so the old subject and the visitor passes it issued stay revoked.

People and their passwords. A person is their phone number; their password opens every house they are linked
to, and a person is linked to a house only when the house's owner or an administrator approves a request, or by
an administrator's import. An "I live here" request from someone not signed in never sets, replaces, tests or
reveals a password: for a phone nobody has, it makes a new person with the password typed in it, which works
once that request is approved; for a known phone the typed password is dropped and the answer is the same. A
password chosen that way (``reg_people.password_request``) vouches only for the house of that request: when the
person is later linked to another house by anything but a request made while signed in as them (another
anonymous request approved, an import), the password is withdrawn and the person signs in with a one-time code
from the property office, which makes a password of their own choosing that no request ever chose. A second
anonymous request for the same phone and house while the first waits, with another password, withdraws the first
one's password too: two people may be claiming the number, and the first to type it must not win the account.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from gateway.wire import NAME_RE
from portal.store import Conn, Row, db, key_of, now_text
from portal.store import audit as audit_trail
from portal.web import csvcells

RESIDENT_ROLES = ("owner", "family", "tenant")
ROLE_ALIASES = {"业主": "owner", "家属": "family", "家庭成员": "family", "租户": "tenant", "租客": "tenant"}
STATUSES = ("pending", "active", "rejected", "inactive")
CSV_COLUMNS = (
    "site",
    "site_name",
    "building",
    "unit",
    "house",
    "name",
    "phone",
    "role",
    "move_in",
    "move_out",
    "lease_end",
    "status",
)
REQUIRED_COLUMNS = ("site", "building", "unit", "house")
MAX_IMPORT_ROWS = 200_000
MAX_NAME = 40
PHONE_RE = re.compile(r"^\+?[0-9][0-9 -]{4,22}$")
PLATE_CODE_BYTES = 16  # 128 bits
PLATE_CODE_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class RegistryError(ValueError):
    """A refused registry change; ``key`` is an i18n key."""

    def __init__(self, key: str, **kw: object) -> None:
        super().__init__(key)
        self.key = key
        self.kw = kw


# ---------------------------------------------------------------- small helpers


def normalize_phone(raw: str) -> str | None:
    """Digits (with a leading + kept) or None when it does not look like a phone number."""
    raw = raw.strip()
    if not PHONE_RE.match(raw):
        return None
    digits = re.sub(r"[^0-9]", "", raw)
    if raw.startswith("+"):  # international: 8 to 15 digits
        return "+" + digits if 8 <= len(digits) <= 15 else None
    if digits.startswith("1"):  # a mainland mobile number
        return digits if re.fullmatch(r"1[3-9][0-9]{9}", digits) else None
    return digits if re.fullmatch(r"0[1-9][0-9]{8,10}", digits) else None  # a landline with its area code


def mask_phone(phone: str) -> str:
    """138****5678: what guards see."""
    if len(phone) <= 4:
        return "*" * len(phone)
    head = phone[:3] if len(phone) >= 11 else ""
    return head + "*" * (len(phone) - len(head) - 4) + phone[-4:]


def clean_name(raw: str) -> str | None:
    name = " ".join(raw.split())
    if not name or len(name) > MAX_NAME or any(ord(c) < 32 or c in "<>" for c in name):
        return None
    return name


def parse_day(raw: str) -> str | None:
    """YYYY-MM-DD (or with slashes) as an ISO date string; None when not a date."""
    raw = raw.strip().replace("/", "-")
    try:
        return date.fromisoformat(raw).isoformat() if re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw) else None
    except ValueError:
        return None


def code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def new_plate_code() -> str:
    return secrets.token_urlsafe(PLATE_CODE_BYTES)


def new_subject(prefix: str = "r") -> str:
    return f"{prefix}:{secrets.token_urlsafe(12)}"


def sort_key(code: str) -> tuple[int, str]:
    """Building, unit and house codes in natural order: 2 before 10."""
    return (len(code), code)


def address_zh(site_name: str, building: str, unit: str, house: str | None = None) -> str:
    return f"{site_name}{building}幢{unit}单元" + (f"{house}室" if house else "")


def address_en(site_name: str, building: str, unit: str, house: str | None = None) -> str:
    return (
        (f"Room {house}, " if house else "")
        + f"Building {building} Unit {unit}"
        + (f", {site_name}" if site_name else "")
    )


def is_active(
    status: str, move_in: str | None, move_out: str | None, role: str, lease_end: str | None, today: str
) -> bool:
    """Does this residency open doors today (site-local date, ISO)?"""
    if status != "active":
        return False
    if move_in and move_in > today:
        return False
    if move_out and move_out <= today:
        return False
    return not (role == "tenant" and lease_end and lease_end < today)


def has_ended(status: str, move_out: str | None, role: str, lease_end: str | None, today: str) -> bool:
    """Deactivated, moved out or past the lease: its passes go on the revocation list."""
    if status == "inactive":
        return True
    if status != "active":
        return False
    if move_out and move_out <= today:
        return True
    return bool(role == "tenant" and lease_end and lease_end < today)


def audit(conn: Conn, actor: str, action: str, target: str = "", detail: str = "", remote: str = "") -> None:
    audit_trail.write(conn, actor, action, target, detail, remote)


# ---------------------------------------------------------------- CSV import


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    key: str  # i18n key under import.*
    kw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ImportRow:
    line: int
    site: str
    site_name: str
    building: str
    unit: str
    house: str
    name: str | None = None
    phone: str | None = None
    role: str | None = None
    move_in: str | None = None
    move_out: str | None = None
    lease_end: str | None = None
    status: str = "active"


@dataclass(slots=True)
class ImportReport:
    rows: int = 0
    errors: list[LineError] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def decode_csv(data: bytes) -> str:
    """UTF-8 (with or without the BOM Excel writes) or GB18030 (a Chinese Excel's CSV)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("gb18030")


def parse_import(data: bytes) -> tuple[list[ImportRow], list[LineError]]:
    """Check every line; returns the rows and the problems, each naming its line."""
    errors: list[LineError] = []
    try:
        text = decode_csv(data)
    except UnicodeDecodeError:
        return [], [LineError(1, "import.encoding")]
    if "\x00" in text:
        return [], [LineError(1, "import.encoding")]
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return [], [LineError(1, "import.empty")]
    except csv.Error as e:
        return [], [LineError(1, "import.csv", {"detail": str(e)})]
    cols = [h.strip().lower() for h in header]
    unknown = [c for c in cols if c not in CSV_COLUMNS]
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if unknown or missing or len(set(cols)) != len(cols):
        return [], [
            LineError(1, "import.header", {"unknown": ", ".join(unknown) or "-", "missing": ", ".join(missing) or "-"})
        ]
    rows: list[ImportRow] = []
    seen_res: dict[tuple[str, str, str, str, str], int] = {}
    names: dict[str, tuple[str, int]] = {}
    prev_line = 1
    while True:
        start = prev_line + 1
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            errors.append(LineError(start, "import.csv", {"detail": str(e)}))
            break
        prev_line = reader.line_num
        if not any(v.strip() for v in rec):
            continue
        if len(rows) + len(errors) >= MAX_IMPORT_ROWS:
            errors.append(LineError(start, "import.too_many", {"n": MAX_IMPORT_ROWS}))
            break
        if len(rec) != len(cols):
            errors.append(LineError(start, "import.columns", {"n": len(rec), "want": len(cols)}))
            continue
        v = {c: csvcells.uncell(rec[i]).strip() for i, c in enumerate(cols)}  # an export reads back unchanged
        problems: list[LineError] = []
        for c in REQUIRED_COLUMNS:
            if not NAME_RE.match(v[c]):
                problems.append(LineError(start, "import.bad_code", {"column": c, "value": v[c][:40]}))
        site_name = v.get("site_name", "")
        if len(site_name) > 64:
            problems.append(LineError(start, "import.bad_site_name"))
        person_cols = [v.get(c, "") for c in ("name", "phone", "role", "move_in", "move_out", "lease_end")]
        r: dict[str, Any] = {}
        if any(person_cols):
            name = clean_name(v.get("name", ""))
            phone = normalize_phone(v.get("phone", ""))
            role_raw = v.get("role", "").strip()
            role = ROLE_ALIASES.get(role_raw, role_raw.lower())
            if name is None:
                problems.append(LineError(start, "import.bad_name"))
            if phone is None:
                problems.append(LineError(start, "import.bad_phone", {"value": v.get("phone", "")[:30]}))
            if role not in RESIDENT_ROLES:
                problems.append(LineError(start, "import.bad_role", {"value": role_raw[:20]}))
            days: dict[str, str | None] = {}
            for c in ("move_in", "move_out", "lease_end"):
                raw = v.get(c, "")
                days[c] = parse_day(raw) if raw else None
                if raw and days[c] is None:
                    problems.append(LineError(start, "import.bad_date", {"column": c, "value": raw[:20]}))
            if days["move_in"] and days["move_out"] and days["move_out"] < days["move_in"]:
                problems.append(LineError(start, "import.move_out_before_in"))
            if role == "tenant" and not v.get("lease_end", ""):
                problems.append(LineError(start, "import.tenant_needs_lease"))
            if role in ("owner", "family") and v.get("lease_end", ""):
                problems.append(LineError(start, "import.lease_not_tenant"))
            status = v.get("status", "").lower() or "active"
            if status not in ("active", "inactive"):
                problems.append(LineError(start, "import.bad_status", {"value": status[:20]}))
            if phone and name:
                key = (v["site"], v["building"], v["unit"], v["house"], phone)
                if key in seen_res:
                    problems.append(LineError(start, "import.duplicate", {"other": seen_res[key]}))
                else:
                    seen_res[key] = start
                named = names.get(phone)
                if named is not None and named[0] != name:
                    problems.append(LineError(start, "import.phone_two_names", {"other": named[1]}))
                elif named is None:
                    names[phone] = (name, start)
            r = dict(name=name, phone=phone, role=role, status=status, **days)
        if problems:
            errors.extend(problems)
            continue
        rows.append(
            ImportRow(
                line=start,
                site=v["site"],
                site_name=site_name,
                building=v["building"],
                unit=v["unit"],
                house=v["house"],
                **r,
            )
        )
    if not rows and not errors:
        errors.append(LineError(1, "import.empty"))
    return rows, errors


def _id(conn: Conn, sql: str, args: Sequence[Any]) -> int | None:
    row = conn.execute(sql, args).fetchone()
    return int(row[0]) if row else None


def ensure_site(conn: Conn, code: str, name: str = "", counts: dict[str, int] | None = None) -> int:
    sid = _id(conn, "SELECT id FROM reg_sites WHERE code = ?", (code,))
    if sid is None:
        sid = int(
            conn.execute(
                "INSERT INTO reg_sites (code, name) VALUES (?, ?) RETURNING id", (code, name or code)
            ).fetchone()[0]
        )
        if counts is not None:
            counts["sites"] = counts.get("sites", 0) + 1
    elif name:
        conn.execute("UPDATE reg_sites SET name = ? WHERE id = ? AND name != ?", (name, sid, name))
    return sid


def ensure_house(
    conn: Conn, site_id: int, building: str, unit: str, house: str, counts: dict[str, int] | None = None
) -> tuple[int, int]:
    """(unit id, house id), creating what is missing (and the plates of what it creates)."""

    def bump(k: str) -> None:
        if counts is not None:
            counts[k] = counts.get(k, 0) + 1

    bid = _id(conn, "SELECT id FROM reg_buildings WHERE site_id = ? AND code = ?", (site_id, building))
    if bid is None:
        bid = int(
            conn.execute(
                "INSERT INTO reg_buildings (site_id, code) VALUES (?, ?) RETURNING id", (site_id, building)
            ).fetchone()[0]
        )
        bump("buildings")
    uid = _id(conn, "SELECT id FROM reg_units WHERE building_id = ? AND code = ?", (bid, unit))
    if uid is None:
        uid = int(
            conn.execute(
                "INSERT INTO reg_units (building_id, code) VALUES (?, ?) RETURNING id", (bid, unit)
            ).fetchone()[0]
        )
        issue_plate(conn, "entrance", uid)
        bump("units")
    hid = _id(conn, "SELECT id FROM reg_houses WHERE unit_id = ? AND code = ?", (uid, house))
    if hid is None:
        hid = int(
            conn.execute("INSERT INTO reg_houses (unit_id, code) VALUES (?, ?) RETURNING id", (uid, house)).fetchone()[
                0
            ]
        )
        issue_plate(conn, "house", hid)
        bump("houses")
    return uid, hid


def ensure_person(conn: Conn, phone: str, name: str, *, rename: bool = True) -> int:
    row = conn.execute("SELECT id, name FROM reg_people WHERE phone = ?", (phone,)).fetchone()
    if row is None:
        return int(
            conn.execute(
                "INSERT INTO reg_people (phone, name, created_at) VALUES (?, ?, ?) RETURNING id",
                (phone, name, now_text()),
            ).fetchone()[0]
        )
    if rename and row["name"] != name:
        conn.execute("UPDATE reg_people SET name = ? WHERE id = ?", (name, row["id"]))
    return int(row["id"])


def apply_import(conn: Conn, rows: Iterable[ImportRow], actor: str, today: str | None = None) -> dict[str, int]:
    """Write checked rows (inside the caller's transaction). Each row updates the person's record in that house: the
    latest decided residency, else a waiting request; an ended stay that the row would bring back becomes a new
    residency instead (a new subject: the old one stays revoked). ``today``: the site-local date."""
    today = today or date.today().isoformat()
    counts: dict[str, int] = {
        "sites": 0,
        "buildings": 0,
        "units": 0,
        "houses": 0,
        "residents_new": 0,
        "residents_updated": 0,
    }
    sites: dict[str, int] = {}
    for r in rows:
        sid = sites.get(r.site)
        if sid is None:
            sid = sites[r.site] = ensure_site(conn, r.site, r.site_name, counts)
        elif r.site_name:
            conn.execute("UPDATE reg_sites SET name = ? WHERE id = ? AND name != ?", (r.site_name, sid, r.site_name))
        _uid, hid = ensure_house(conn, sid, r.building, r.unit, r.house, counts)
        if r.phone is None or r.name is None or r.role is None:
            continue
        pid = ensure_person(conn, r.phone, r.name)
        ends = has_ended(r.status, r.move_out, r.role, r.lease_end, today)
        target = _import_target(conn, pid, hid, ends, today)
        now = now_text()
        active = 1 if r.status == "active" else 0
        if target is None:
            rid = int(
                conn.execute(
                    "INSERT INTO reg_residents (person_id, house_id, subject, role, status, move_in, move_out,"
                    " lease_end,"
                    " source, created_at, decided_at, decided_by, ever_active) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
                    " 'import',"
                    " ?, ?, ?, ?) RETURNING id",
                    (
                        pid,
                        hid,
                        new_subject(),
                        r.role,
                        r.status,
                        r.move_in,
                        r.move_out,
                        r.lease_end,
                        now,
                        now,
                        actor,
                        active,
                    ),
                ).fetchone()[0]
            )
            counts["residents_new"] += 1
            linked = bool(active)
        else:
            rid = int(target["id"])
            conn.execute(
                "UPDATE reg_residents SET role = ?, status = ?, move_in = ?, move_out = ?, lease_end = ?,"
                " decided_at = ?, decided_by = ?, ever_active = greatest(ever_active, ?) WHERE id = ?",
                (r.role, r.status, r.move_in, r.move_out, r.lease_end, now, actor, active, rid),
            )
            counts["residents_updated"] += 1
            linked = bool(active) and not target["ever_active"]
        if linked:
            _linked(conn, rid, pid, hid, "import", actor)
    audit(conn, actor, "import.csv", detail=", ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


def _import_target(conn: Conn, person_id: int, house_id: int, ends: bool, today: str) -> Row | None:
    """The residency an import row for this person and house updates (None: a new one). ``ends``: the row
    describes an ended stay, which may update an ended one; a stay that goes on never revives an ended one."""
    rows = conn.execute(
        "SELECT id, status, move_out, role, lease_end, ever_active FROM reg_residents"
        " WHERE person_id = ? AND house_id = ? ORDER BY id DESC",
        (person_id, house_id),
    ).fetchall()
    decided = next((x for x in rows if x["status"] in ("active", "inactive")), None)
    spent = (
        decided is not None
        and bool(decided["ever_active"])
        and has_ended(decided["status"], decided["move_out"], decided["role"], decided["lease_end"], today)
    )
    if decided is not None and (ends or not spent):
        return decided
    return next(
        (x for x in rows if x["status"] in ("pending", "rejected") and (decided is None or x["id"] > decided["id"])),
        None,
    )


def export_csv(conn: Conn) -> str:
    """Every house (a vacant one as one row without a person) and each person's latest decided residency there
    (active or ended; earlier stays are history, not the record an import updates)."""
    out = io.StringIO()
    w = csvcells.writer(out, lineterminator="\n")  # a self-registered name may look like a formula
    w.writerow(CSV_COLUMNS)
    rows = conn.execute(
        "SELECT s.code AS site, s.name AS site_name, b.code AS building, u.code AS unit, h.code AS house,"
        " p.name, p.phone, r.role, r.move_in, r.move_out, r.lease_end, r.status"
        " FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id JOIN reg_buildings b ON b.id = u.building_id"
        " JOIN reg_sites s ON s.id = b.site_id"
        " LEFT JOIN reg_residents r ON r.house_id = h.id AND r.status IN ('active', 'inactive')"
        "  AND r.id = (SELECT max(x.id) FROM reg_residents x WHERE x.person_id = r.person_id"
        "  AND x.house_id = r.house_id AND x.status IN ('active', 'inactive'))"
        " LEFT JOIN reg_people p ON p.id = r.person_id"
    ).fetchall()
    rows.sort(
        key=lambda x: (x["site"], sort_key(x["building"]), sort_key(x["unit"]), sort_key(x["house"]), x["phone"] or "")
    )
    for x in rows:
        w.writerow(
            [
                x["site"],
                x["site_name"],
                x["building"],
                x["unit"],
                x["house"],
                x["name"] or "",
                x["phone"] or "",
                x["role"] or "",
                x["move_in"] or "",
                x["move_out"] or "",
                x["lease_end"] or "",
                x["status"] or "",
            ]
        )
    return out.getvalue()


# ---------------------------------------------------------------- plates


@dataclass(frozen=True, slots=True)
class Place:
    """A house (house_id set) or a unit entrance, with everything its pages and plates show."""

    kind: str  # house | entrance
    site_id: int
    site: str
    site_name: str
    building_id: int
    building: str
    unit_id: int
    unit: str
    house_id: int | None = None
    house: str | None = None

    @property
    def unit_ref(self) -> str:
        return f"{self.building}/{self.unit}"

    @property
    def house_ref(self) -> str:
        return f"{self.building}-{self.unit}-{self.house}" if self.house else ""

    @property
    def address_zh(self) -> str:
        return address_zh(self.site_name, self.building, self.unit, self.house)

    @property
    def address_en(self) -> str:
        return address_en(self.site_name, self.building, self.unit, self.house)

    @property
    def short_zh(self) -> str:
        return address_zh("", self.building, self.unit, self.house)

    def address(self, lang: str) -> str:
        """The address as a page in ``lang`` shows it."""
        return self.address_zh if lang == "zh-CN" else self.address_en

    def short(self, lang: str) -> str:
        """The address without the estate's name."""
        return self.short_zh if lang == "zh-CN" else address_en("", self.building, self.unit, self.house)


_PLACE_SQL = (
    "SELECT s.id AS site_id, s.code AS site, s.name AS site_name,"
    " b.id AS building_id, b.code AS building, u.id AS unit_id, u.code AS unit{house_cols}"
    " FROM reg_units u JOIN reg_buildings b ON b.id = u.building_id JOIN reg_sites s ON s.id = b.site_id{join}"
)
_HOUSE_SQL = _PLACE_SQL.format(
    house_cols=", h.id AS house_id, h.code AS house", join=" JOIN reg_houses h ON h.unit_id = u.id"
)
_UNIT_SQL = _PLACE_SQL.format(house_cols="", join="")


def _place(row: Row, kind: str) -> Place:
    return Place(
        kind=kind,
        site_id=row["site_id"],
        site=row["site"],
        site_name=row["site_name"],
        building_id=row["building_id"],
        building=row["building"],
        unit_id=row["unit_id"],
        unit=row["unit"],
        house_id=row["house_id"] if kind == "house" else None,
        house=row["house"] if kind == "house" else None,
    )


def house_place(conn: Conn, house_id: int) -> Place | None:
    row = conn.execute(_HOUSE_SQL + " WHERE h.id = ?", (house_id,)).fetchone()
    return _place(row, "house") if row else None


def unit_place(conn: Conn, unit_id: int) -> Place | None:
    row = conn.execute(_UNIT_SQL + " WHERE u.id = ?", (unit_id,)).fetchone()
    return _place(row, "entrance") if row else None


def lookup_plate(conn: Conn, digest: str) -> Place | None:
    """The place of a plate in use, by the hash of its code. Unknown and withdrawn codes take the same path."""
    row = conn.execute(
        "SELECT kind, house_id, unit_id FROM plates WHERE code_hash = ? AND withdrawn_at IS NULL", (digest,)
    ).fetchone()
    if row is None:
        return None
    return house_place(conn, row["house_id"]) if row["kind"] == "house" else unit_place(conn, row["unit_id"])


def issue_plate(conn: Conn, kind: str, ref_id: int) -> str:
    """A new plate code for a house or a unit entrance; the old one (if any) stops working in the same commit.

    The store keeps the code only sealed with the store key, to print the plate again, and forgets a withdrawn
    plate's code altogether (its hash stays, so it answers like an unknown code)."""
    col = "house_id" if kind == "house" else "unit_id"
    now = now_text()
    conn.execute(
        f"UPDATE plates SET withdrawn_at = ?, sealed = NULL WHERE {col} = ? AND withdrawn_at IS NULL", (now, ref_id)
    )
    code = new_plate_code()
    digest = code_hash(code)
    conn.execute(
        f"INSERT INTO plates (code_hash, sealed, kind, {col}, created_at) VALUES (?, ?, ?, ?, ?)",
        (digest, key_of(conn).seal(code, digest), kind, ref_id, now),
    )
    return code


def plate_code(conn: Conn, kind: str, ref_id: int) -> str | None:
    """The code of a plate in use, to print it (needs the store key on the connection)."""
    col = "house_id" if kind == "house" else "unit_id"
    row = conn.execute(
        f"SELECT code_hash, sealed FROM plates WHERE {col} = ? AND withdrawn_at IS NULL", (ref_id,)
    ).fetchone()
    return key_of(conn).unseal(row["sealed"], row["code_hash"]) if row else None


@dataclass(frozen=True, slots=True)
class PlateSpec:
    """One plate to print: its code and what is written under it. ``path``: where the code is looked up on the
    portal (``/p/`` for door plates, ``/g/c/`` for patrol checkpoints); ``tagline``: the small line under the text."""

    code: str
    kind: str
    address_zh: str
    label: str
    path: str = "/p/"
    tagline: str = "扫码 · 物业服务"

    def url(self, base: str) -> str:
        return f"{base.rstrip('/')}{self.path}{self.code}"

    address_en: str = ""


def plates_for(conn: Conn, building_id: int, unit_id: int | None = None) -> list[PlateSpec]:
    """The entrance plate(s) then every house plate of a building (or of one of its units), in natural order.

    A unit of another building gives nothing: the unit is looked up under its building, never by its id alone."""
    where, args = "u.building_id = ?", [building_id]
    if unit_id is not None:
        where, args = "u.building_id = ? AND u.id = ?", [building_id, unit_id]
    units = conn.execute(_UNIT_SQL + f" WHERE {where}", args).fetchall()
    houses = conn.execute(_HOUSE_SQL + f" WHERE {where}", args).fetchall()
    key = key_of(conn)
    codes = {
        (r["kind"], r["house_id"] or r["unit_id"]): key.unseal(r["sealed"], r["code_hash"])
        for r in conn.execute(
            "SELECT p.kind, p.house_id, p.unit_id, p.code_hash, p.sealed FROM plates p"
            " LEFT JOIN reg_houses h ON h.id = p.house_id JOIN reg_units u ON u.id = coalesce(p.unit_id, h.unit_id)"
            f" WHERE p.withdrawn_at IS NULL AND {where}",
            args,
        )
    }
    out: list[PlateSpec] = []
    for u in sorted(units, key=lambda r: sort_key(r["unit"])):
        code = codes.get(("entrance", u["unit_id"]))
        if code:
            p = _place(u, "entrance")
            out.append(PlateSpec(code, "entrance", p.address_zh, "单元门", address_en=p.address_en))
    for h in sorted(houses, key=lambda r: (sort_key(r["unit"]), sort_key(r["house"]))):
        code = codes.get(("house", h["house_id"]))
        if code:
            p = _place(h, "house")
            out.append(PlateSpec(code, "house", p.address_zh, "", address_en=p.address_en))
    return out


# ---------------------------------------------------------------- people and residencies


@dataclass(frozen=True, slots=True)
class Resident:
    id: int
    person_id: int
    house_id: int
    subject: str
    name: str
    phone: str
    role: str
    status: str
    move_in: str | None
    move_out: str | None
    lease_end: str | None
    source: str
    created_at: str
    decided_by: str | None
    request_name: str | None  # the name typed in the request (the person's name on file may differ)
    decided_at: str | None = None

    def active(self, today: str) -> bool:
        return is_active(self.status, self.move_in, self.move_out, self.role, self.lease_end, today)

    def ended(self, today: str) -> bool:
        return has_ended(self.status, self.move_out, self.role, self.lease_end, today)

    def current(self, today: str) -> bool:
        """Approved and not ended (it may start on a later move-in day)."""
        return self.status == "active" and not self.ended(today)

    @property
    def shown_name(self) -> str:
        """What someone deciding a request sees: the name the requester typed, never the name on file."""
        return self.request_name if self.status == "pending" and self.request_name else self.name

    @property
    def household_name(self) -> str:
        """What the flat's residents see: for a stay that came from an anonymous request, the name typed in it (the
        name on file is the office's, and anyone can request any number), otherwise the name on file."""
        return self.request_name if self.source == "register" and self.request_name else self.name


_RES_SQL = (
    "SELECT r.id, r.person_id, r.house_id, r.subject, p.name, p.phone, r.role, r.status, r.move_in,"
    " r.move_out, r.lease_end, r.source, r.created_at, r.decided_by, r.request_name, r.decided_at"
    " FROM reg_residents r"
    " JOIN reg_people p ON p.id = r.person_id"
)


def _resident(row: Row) -> Resident:
    return Resident(*tuple(row))


def household(conn: Conn, house_id: int, *, statuses: Sequence[str] = STATUSES) -> list[Resident]:
    rows = conn.execute(
        _RES_SQL + f" WHERE r.house_id = ? AND r.status IN ({', '.join('?' * len(statuses))}) ORDER BY r.id",
        (house_id, *statuses),
    ).fetchall()
    return [_resident(r) for r in rows]


def resident(conn: Conn, resident_id: int) -> Resident | None:
    row = conn.execute(_RES_SQL + " WHERE r.id = ?", (resident_id,)).fetchone()
    return _resident(row) if row else None


def residencies_of(conn: Conn, person_id: int) -> list[Resident]:
    return [_resident(r) for r in conn.execute(_RES_SQL + " WHERE r.person_id = ? ORDER BY r.id", (person_id,))]


def latest_in(residencies: Iterable[Resident], house_id: int) -> Resident | None:
    """The newest of a person's residencies in one house (their current stay, or their request, or the last one)."""
    return max((r for r in residencies if r.house_id == house_id), key=lambda r: r.id, default=None)


def has_home(residencies: Iterable[Resident], today: str) -> bool:
    """Is any of them approved and not ended (what signing in needs)?"""
    return any(r.current(today) for r in residencies)


def pending(conn: Conn) -> list[tuple[Resident, Place]]:
    out = []
    for r in conn.execute(_RES_SQL + " WHERE r.status = 'pending' ORDER BY r.id LIMIT 500").fetchall():
        res = _resident(r)
        place = house_place(conn, res.house_id)
        if place is not None:
            out.append((res, place))
    return out


@dataclass(frozen=True, slots=True)
class Person:
    id: int
    phone: str
    name: str
    password_hash: str | None
    otc_hash: str | None
    otc_expires: float | None
    password_request: int | None  # the request that chose the password (None: chosen after an office code)


_PERSON_SQL = "SELECT id, phone, name, password_hash, otc_hash, otc_expires, password_request FROM reg_people"


def person_by_phone(conn: Conn, phone: str) -> Person | None:
    row = conn.execute(_PERSON_SQL + " WHERE phone = ?", (phone,)).fetchone()
    return Person(*tuple(row)) if row else None


def person(conn: Conn, person_id: int) -> Person | None:
    row = conn.execute(_PERSON_SQL + " WHERE id = ?", (person_id,)).fetchone()
    return Person(*tuple(row)) if row else None


def register(
    conn: Conn,
    house_id: int,
    phone: str,
    name: str,
    role: str,
    lease_end: str | None,
    password_hash: str | None,
    *,
    today: str | None = None,
    person_id: int | None = None,
    same_claimant: bool = False,
) -> int | None:
    """An "I live here" request: a pending residency (its id), or None when the person already has one waiting or
    a current one in this house. The caller answers both alike: nothing here tells a registrant whether the phone
    was known. ``same_claimant``: this anonymous request's password is the one a pending request for the same phone
    and house chose (:func:`pending_password`): the same person asking again, who keeps it; anyone else claiming
    the number withdraws it (:func:`_contest`).

    ``person_id``: the request of a signed-in person, for their own account (``phone`` and ``password_hash``
    unused). Otherwise the phone decides: a phone nobody has yet becomes a new person whose password is
    ``password_hash``, usable once this request is approved; a known person is neither renamed nor given a
    password (see the module docstring). ``name`` is kept on the request for whoever decides it."""
    today = today or date.today().isoformat()
    source = "register" if person_id is None else "account"
    created = False
    if person_id is None:
        row = conn.execute("SELECT id FROM reg_people WHERE phone = ?", (phone,)).fetchone()
        if row is None:
            person_id = int(
                conn.execute(
                    "INSERT INTO reg_people (phone, name, created_at) VALUES (?, ?, ?) RETURNING id",
                    (phone, name, now_text()),
                ).fetchone()[0]
            )
            created = True
        else:
            person_id = int(row["id"])
    actor = "public" if source == "register" else f"resident:{person_id}"
    for r in conn.execute(
        "SELECT id, status, move_out, role, lease_end FROM reg_residents WHERE person_id = ? AND house_id = ?",
        (person_id, house_id),
    ):
        if r["status"] == "pending" or (
            r["status"] == "active" and not has_ended("active", r["move_out"], r["role"], r["lease_end"], today)
        ):
            audit(conn, actor, "register.repeat", f"house:{house_id}", f"person:{person_id}")
            if source == "register" and r["status"] == "pending" and not same_claimant:
                _contest(conn, person_id, int(r["id"]))
            return None
    rid = int(
        conn.execute(
            "INSERT INTO reg_residents (person_id, house_id, subject, role, status, lease_end, source, created_at,"
            " request_name) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?) RETURNING id",
            (person_id, house_id, new_subject(), role, lease_end, source, now_text(), name),
        ).fetchone()[0]
    )
    if created and password_hash is not None:
        conn.execute(
            "UPDATE reg_people SET password_hash = ?, password_request = ? WHERE id = ?",
            (password_hash, rid, person_id),
        )
    audit(conn, actor, "register.request", f"resident:{rid}", "new person" if created else "")
    return rid


def pending_password(conn: Conn, house_id: int, phone: str) -> str | None:
    """The password hash a pending anonymous request for ``phone`` in this house chose, if there is one."""
    row = conn.execute(
        "SELECT p.password_hash FROM reg_people p JOIN reg_residents r ON r.id = p.password_request"
        " WHERE p.phone = ? AND r.house_id = ? AND r.status = 'pending'",
        (phone, house_id),
    ).fetchone()
    return str(row[0]) if row is not None and row[0] is not None else None


def _contest(conn: Conn, person_id: int, request_id: int) -> None:
    """A second anonymous "I live here" for a number whose pending request chose its password: two people may be
    claiming it, and whoever came first must not keep the account (nobody checks a phone number). The password is
    withdrawn; once approved, the person signs in with a one-time code from the property office."""
    withdrawn = conn.execute(
        "UPDATE reg_people SET password_hash = NULL, password_request = NULL"
        " WHERE id = ? AND password_request = ? RETURNING id",
        (person_id, request_id),
    ).fetchone()
    if withdrawn is not None:
        audit(conn, "public", "register.contested", f"resident:{request_id}", f"person:{person_id}")


def _current_elsewhere(conn: Conn, res: Resident, today: str) -> None:
    """Refuse to make a second current residency of one person in one house."""
    for r in conn.execute(
        "SELECT status, move_out, role, lease_end FROM reg_residents WHERE person_id = ?"
        " AND house_id = ? AND id != ? AND status = 'active'",
        (res.person_id, res.house_id, res.id),
    ):
        if not has_ended("active", r["move_out"], r["role"], r["lease_end"], today):
            raise RegistryError("registry.already_resident")


def _linked(conn: Conn, resident_id: int, person_id: int, house_id: int, source: str, actor: str) -> None:
    """A residency just took effect. A password chosen in an anonymous request for another stay stops working (and
    the person's sessions end) unless the person had been approved in this house before or this is a request made
    while signed in as them: it vouches for the house of its own request only."""
    row = conn.execute("SELECT password_hash, password_request FROM reg_people WHERE id = ?", (person_id,)).fetchone()
    if row is None or row["password_hash"] is None or row["password_request"] in (None, resident_id):
        return
    if (
        source == "account"
        or conn.execute(
            "SELECT 1 FROM reg_residents WHERE person_id = ? AND house_id = ? AND ever_active = 1 AND id != ?",
            (person_id, house_id, resident_id),
        ).fetchone()
    ):
        return
    conn.execute("UPDATE reg_people SET password_hash = NULL, password_request = NULL WHERE id = ?", (person_id,))
    conn.execute("DELETE FROM resident_sessions WHERE person_id = ?", (person_id,))
    audit(
        conn,
        actor,
        "resident.password_withdrawn",
        f"person:{person_id}",
        f"resident:{resident_id} linked by {source}; the password came from request {row['password_request']}",
    )


def decide(conn: Conn, resident_id: int, action: str, actor: str, today: str, house_id: int | None = None) -> Resident:
    """approve / reject a pending residency; deactivate or move out an active one (move-out date: today);
    reactivate an inactive one as a new residency with a new subject (the old one stays revoked)."""
    res = resident(conn, resident_id)
    if res is None or (house_id is not None and res.house_id != house_id):
        raise RegistryError("registry.no_such_resident")
    now = now_text()
    out_id = resident_id
    if action in ("approve", "reject"):
        if res.status != "pending":
            raise RegistryError("registry.not_pending")
        if action == "approve":
            _current_elsewhere(conn, res, today)
            conn.execute(
                "UPDATE reg_residents SET status = 'active', move_in = coalesce(move_in, ?), decided_at = ?,"
                " decided_by = ?, ever_active = 1 WHERE id = ?",
                (today, now, actor, resident_id),
            )
            _linked(conn, resident_id, res.person_id, res.house_id, res.source, actor)
        else:
            conn.execute(
                "UPDATE reg_residents SET status = 'rejected', decided_at = ?, decided_by = ? WHERE id = ?",
                (now, actor, resident_id),
            )
    elif action == "deactivate":
        conn.execute(
            "UPDATE reg_residents SET status = 'inactive', decided_at = ?, decided_by = ? WHERE id = ?",
            (now, actor, resident_id),
        )
    elif action == "moveout":
        if res.status != "active":
            raise RegistryError("registry.not_active")
        conn.execute(
            "UPDATE reg_residents SET move_out = ?, decided_at = ?, decided_by = ? WHERE id = ?",
            (today, now, actor, resident_id),
        )
    elif action == "reactivate":
        if res.status != "inactive":
            raise RegistryError("registry.not_inactive")
        _current_elsewhere(conn, res, today)
        out_id = int(
            conn.execute(
                "INSERT INTO reg_residents (person_id, house_id, subject, role, status, move_in, lease_end, source,"
                " created_at, decided_at, decided_by, ever_active)"
                " VALUES (?, ?, ?, ?, 'active', ?, ?, 'admin', ?, ?, ?, 1) RETURNING id",
                (res.person_id, res.house_id, new_subject(), res.role, today, res.lease_end, now, now, actor),
            ).fetchone()[0]
        )
    else:
        raise RegistryError("registry.bad_action")
    audit(
        conn,
        actor,
        f"resident.{action}",
        f"resident:{resident_id}",
        f"as resident:{out_id}" if out_id != resident_id else "",
    )
    out = resident(conn, out_id)
    assert out is not None
    return out


# ---------------------------------------------------------------- doors


@dataclass(frozen=True, slots=True)
class Door:
    id: int
    site: str
    gateway: str
    door: str
    unit_id: int | None
    gate: bool
    label: str
    building: str | None  # the unit's building and unit codes (None for a site gate)
    unit: str | None


def add_door(
    conn: Conn, site: str, gateway: str, door: str, building: str | None, unit: str | None, gate: bool, label: str
) -> int:
    sid = _id(conn, "SELECT id FROM reg_sites WHERE code = ?", (site,))
    if sid is None:
        raise RegistryError("doors.no_site")
    unit_id = None
    if building or unit:
        unit_id = _id(
            conn,
            "SELECT u.id FROM reg_units u JOIN reg_buildings b ON b.id = u.building_id"
            " WHERE b.site_id = ? AND b.code = ? AND u.code = ?",
            (sid, building or "", unit or ""),
        )
        if unit_id is None:
            raise RegistryError("doors.no_unit")
    if unit_id is None and not gate:
        raise RegistryError("doors.no_place")
    try:
        return int(
            conn.execute(
                "INSERT INTO reg_doors (site_id, gateway, door, unit_id, gate, label) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (site_id, door) DO UPDATE SET gateway = excluded.gateway, unit_id = excluded.unit_id,"
                " gate = excluded.gate, label = excluded.label RETURNING id",
                (sid, gateway, door, unit_id, int(gate), label),
            ).fetchone()[0]
        )
    except db.IntegrityError:
        raise RegistryError("doors.invalid") from None


def doors(conn: Conn, *, unit_id: int | None = None) -> list[Door]:
    sql = (
        "SELECT d.id, s.code, d.gateway, d.door, d.unit_id, d.gate, d.label, b.code, u.code"
        " FROM reg_doors d JOIN reg_sites s ON s.id = d.site_id"
        " LEFT JOIN reg_units u ON u.id = d.unit_id LEFT JOIN reg_buildings b ON b.id = u.building_id"
    )
    rows = conn.execute(
        sql + (" WHERE d.unit_id = ?" if unit_id is not None else "") + " ORDER BY d.id",
        (unit_id,) if unit_id is not None else (),
    ).fetchall()
    return [Door(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8]) for r in rows]


def door(conn: Conn, door_id: int) -> Door | None:
    return next((d for d in doors(conn) if d.id == door_id), None)


# ---------------------------------------------------------------- revocations


#: How long an ended residency's subject stays on the list. Its own passes live a minute and the visitor
#: passes it issued are listed by pass id until they expire, so this only has to outlast clock trouble.
REVOKED_KEEP_DAYS = 30


def ended_on(status: str, move_out: str | None, role: str, lease_end: str | None, decided_at: str | None) -> str:
    """The site-local day an ended residency stopped opening doors (for pruning the list)."""
    days = [d for d in (move_out, decided_at[:10] if status == "inactive" and decided_at else None) if d]
    if role == "tenant" and lease_end:
        days.append((date.fromisoformat(lease_end) + timedelta(days=1)).isoformat())
    return min(days) if days else "9999-12-31"


def revoked_for_site(conn: Conn, site_id: int, today: str, now: int) -> tuple[list[str], list[bytes]]:
    """Subjects of residencies that ended in the last :data:`REVOKED_KEEP_DAYS` days, and the unexpired
    visitor passes of every ended residency."""
    subjects: list[str] = []
    ended_ids: list[int] = []
    keep_from = (date.fromisoformat(today) - timedelta(days=REVOKED_KEEP_DAYS)).isoformat()
    for r in conn.execute(
        "SELECT r.id, r.subject, r.status, r.move_out, r.role, r.lease_end, r.decided_at FROM reg_residents r"
        " JOIN reg_houses h ON h.id = r.house_id JOIN reg_units u ON u.id = h.unit_id"
        " JOIN reg_buildings b ON b.id = u.building_id WHERE b.site_id = ? AND r.ever_active = 1",
        (site_id,),
    ):
        if has_ended(r["status"], r["move_out"], r["role"], r["lease_end"], today):
            ended_ids.append(r["id"])
            if ended_on(r["status"], r["move_out"], r["role"], r["lease_end"], r["decided_at"]) >= keep_from:
                subjects.append(r["subject"])
    passes: list[bytes] = []
    for i in range(0, len(ended_ids), 500):
        chunk = ended_ids[i : i + 500]
        marks = ", ".join("?" * len(chunk))
        passes.extend(
            bytes.fromhex(row[0])
            for row in conn.execute(
                f"SELECT pass_id FROM visitor_passes WHERE not_after >= ? AND resident_id IN ({marks})", (now, *chunk)
            )
        )
    return sorted(subjects), sorted(passes)


# ---------------------------------------------------------------- overview (admin)


def overview(conn: Conn) -> list[dict[str, Any]]:
    """Sites with their buildings: counts of units, houses and active residencies."""
    sites = []
    for s in conn.execute("SELECT * FROM reg_sites ORDER BY code").fetchall():
        blds = []
        for b in conn.execute(
            "SELECT b.id, b.code, (SELECT count(*) FROM reg_units u WHERE u.building_id = b.id) AS units,"
            " (SELECT count(*) FROM reg_houses h JOIN reg_units u ON u.id = h.unit_id"
            "  WHERE u.building_id = b.id) AS houses,"
            " (SELECT count(*) FROM reg_residents r JOIN reg_houses h ON h.id = r.house_id"
            "  JOIN reg_units u ON u.id = h.unit_id WHERE u.building_id = b.id AND r.status = 'active') AS people"
            " FROM reg_buildings b WHERE b.site_id = ?",
            (s["id"],),
        ).fetchall():
            blds.append(dict(b))
        blds.sort(key=lambda b: sort_key(b["code"]))
        sites.append({"id": s["id"], "code": s["code"], "name": s["name"], "buildings": blds})
    return sites


def building_houses(conn: Conn, building_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT u.id AS unit_id, u.code AS unit, h.id AS house_id, h.code AS house,"
        " (SELECT count(*) FROM reg_residents r WHERE r.house_id = h.id AND r.status = 'active') AS people,"
        " (SELECT count(*) FROM reg_residents r WHERE r.house_id = h.id AND r.status = 'pending') AS pending"
        " FROM reg_units u JOIN reg_houses h ON h.unit_id = u.id WHERE u.building_id = ?",
        (building_id,),
    ).fetchall()
    out = [dict(r) for r in rows]
    out.sort(key=lambda r: (sort_key(r["unit"]), sort_key(r["house"])))
    return out


def audit_log(conn: Conn, limit: int = 200) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))]


def today_in(tz: Any, wall: float) -> str:
    return datetime.fromtimestamp(wall, tz).date().isoformat()
