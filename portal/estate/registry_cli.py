"""The estate registry from the command line: ``import-estate``, ``export-estate``, ``plates`` and ``visitor-pass``;
the audit trail's ``audit-verify`` and ``audit-anchor export``.

They work on the portal's store file directly and may run beside a running portal: the store is in WAL
mode, reads see one snapshot and take no lock, and the one write of a command is a single short
``BEGIN IMMEDIATE`` transaction that waits for the portal's writer (busy timeout). The import is the web
import's code (:func:`portal.estate.registry.parse_import`, :func:`portal.estate.registry.apply_import`): every line
is checked first, and any bad line means nothing is written. Exports and printed sheets are audited as
the web audits them, by ``cli:<unix user>``; the audit row is committed before the output file appears.

A running portal sends revocation-list changes an import causes (moved-out or inactive residents) to
its gateways on its next refresh (``phone.revocations_every_s``), not at once as after a web import.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from portal.config import PortalConfig
from portal.estate import registry as reg
from portal.store import Conn, Postgres, StoreError, db, key_of, open_db
from portal.store import audit as audit_trail
from portal.store.storekey import StoreKeyError
from portal.web.i18n import Translator

T = TypeVar("T")
COMMANDS = ("import-estate", "export-estate", "plates", "visitor-pass", "audit-verify", "audit-anchor")
IMPORT_MAX_BYTES = 32 * 1024 * 1024  # the web import's upload limit
# What each step may meet, as named tuples (mypy cannot read a starred except clause).
_CANNOT_OPEN: tuple[type[Exception], ...] = (*db.Error, StoreError, StoreKeyError, OSError)
_IMPORT_FAILED: tuple[type[Exception], ...] = (*db.Error, reg.RegistryError)
_CANNOT_READ: tuple[type[Exception], ...] = (*db.Error, StoreError)


class CliError(Exception):
    """A command that cannot go on: the message for stderr and the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i = sub.add_parser(
        "import-estate",
        help="import sites, buildings, units, houses and residents from a CSV (all or nothing, every bad line named)",
    )
    i.add_argument("--config", required=True)
    i.add_argument("csv", metavar="CSV", help="UTF-8 (with or without BOM) or GB18030, the web import's columns")
    i.add_argument("--dry-run", action="store_true", help="check every line, write nothing")
    e = sub.add_parser("export-estate", help="every house and residency as CSV (the web export's file)")
    e.add_argument("--config", required=True)
    e.add_argument(
        "-o",
        "--output",
        metavar="OUT.csv",
        help="a file (mode 0600, with the BOM Excel wants); default: stdout, without BOM",
    )
    p = sub.add_parser("plates", help="print-ready A4 door-plate sheets (PDF) of the estate, a building or a unit")
    p.add_argument("--config", required=True)
    p.add_argument("--site", help="a site code (needed only when two sites have the building code)")
    p.add_argument("--building", help="a building code; default: every building")
    p.add_argument("--unit", help="a unit code of --building")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--output", metavar="OUT.pdf")
    out.add_argument(
        "--urls",
        action="store_true",
        help="no PDF: print CSV rows kind,place,url (for a sign maker), the patrol checkpoints' too "
        "unless --building is given",
    )
    vp = sub.add_parser(
        "visitor-pass",
        help="print a resident's latest visitor pass (the text its share link shows as a QR; audited)",
    )
    vp.add_argument("--config", required=True)
    vp.add_argument("--resident", required=True, type=int, metavar="ID", help="the residency's id (reg_residents)")
    v = sub.add_parser(
        "audit-verify",
        help="check the audit trail's keyed hash chain, and that it still holds the"
        " rows of anchors exported earlier (exit 0 intact, 1 broken)",
    )
    v.add_argument("--config", required=True)
    v.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="FILE",
        help="an anchor from audit-anchor export, kept elsewhere (repeatable; - for stdin)",
    )
    a = sub.add_parser(
        "audit-anchor",
        help="export where the audit chain stands now (its newest row and hash), to"
        " keep elsewhere for audit-verify --anchor",
    )
    a.add_argument("action", choices=["export"])
    a.add_argument("--config", required=True)
    a.add_argument("-o", "--output", metavar="FILE", help="a file to write the anchor to (default: stdout)")


def run(args: argparse.Namespace, cfg: PortalConfig) -> int:
    try:
        if args.command == "import-estate":
            return import_estate(cfg, args.csv, dry_run=args.dry_run)
        if args.command == "export-estate":
            return export_estate(cfg, args.output)
        if args.command == "audit-verify":
            return audit_verify(cfg, args.anchor)
        if args.command == "audit-anchor":
            return audit_anchor(cfg, args.output)
        if args.command == "visitor-pass":
            return visitor_pass(cfg, args.resident)
        if args.urls:
            return plate_urls(cfg, site=args.site, building=args.building, unit=args.unit)
        return print_plates(cfg, args.output, site=args.site, building=args.building, unit=args.unit)
    except CliError as e:
        print(f"{args.command}: {e}", file=sys.stderr)
        return e.status


def audit_verify(cfg: PortalConfig, anchor_files: list[str] | None = None) -> int:
    """Walk the audit chain in one read transaction (a consistent snapshot while the portal writes), then hold it
    to each anchor given."""
    anchors = [(name, _read_anchor(name)) for name in anchor_files or []]  # bad anchor files: before any work
    conn = _open(cfg, create=False)
    try:
        db.begin_read(conn)
        try:
            verdict = audit_trail.verify(conn)
            held = [
                (name, audit_trail.check_anchor(conn, a) if verdict.ok else "not checked: the chain is broken")
                for name, a in anchors
            ]
        finally:
            conn.execute("ROLLBACK")
    except db.Error as e:
        raise CliError(f"cannot read the audit trail: {e}") from None
    finally:
        conn.close()
    ok = verdict.ok and not any(why for _, why in held)
    out: dict[str, object] = {"ok": ok, "rows": verdict.rows, "bad_id": verdict.bad_id, "reason": verdict.reason}
    if anchors:
        out["anchors"] = [
            {"file": name, "id": a.id, "at": a.at, "ok": not why, "reason": why}
            for (name, a), (_, why) in zip(anchors, held, strict=True)
        ]
    print(json.dumps(out, ensure_ascii=False))
    if not verdict.ok:
        print(f"audit-verify: broken at row {verdict.bad_id}: {verdict.reason}", file=sys.stderr)
    for (name, a), (_, why) in zip(anchors, held, strict=True):
        if why and verdict.ok:
            print(f"audit-verify: {name} (row {a.id}, exported {a.at}): {why}", file=sys.stderr)
    return 0 if ok else 1


def _read_anchor(name: str) -> audit_trail.Anchor:
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read the anchor {name}: {e}", 2) from None
    try:
        return audit_trail.Anchor.parse(text)
    except ValueError as e:
        raise CliError(f"{name}: {e}", 2) from None


def audit_anchor(cfg: PortalConfig, output: str | None) -> int:
    """Where the chain stands, after a row recording this export (so the anchor pins its own export too)."""
    conn = _open(cfg, create=False)
    try:
        target = str(Path(output).resolve()) if output else "stdout"

        def export(c: Conn) -> audit_trail.Anchor:
            reg.audit(c, cli_actor(), "audit.anchor", target)
            return audit_trail.anchor(c)

        try:
            a = _transaction(conn, export)
        except db.Error as e:
            raise CliError(f"cannot write the audit record ({e}); nothing was exported") from None
    finally:
        conn.close()
    if output is None:
        sys.stdout.write(a.text())
        sys.stdout.flush()
        return 0
    path = Path(output)
    tmp = _staged(path, a.text().encode(), 0o644)
    try:
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None
    print(f"{output}: audit anchor at row {a.id} ({a.count} rows)", file=sys.stderr)
    return 0


def cli_actor() -> str:
    """``cli:<name of the real user id>``; from the password database, not from $USER."""
    uid = os.getuid()
    try:
        return f"cli:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"cli:{uid}"


# ---------------------------------------------------------------- the store


def _open(cfg: PortalConfig, *, create: bool) -> Conn:
    path = cfg.store_target
    if not create and not isinstance(path, Postgres) and not path.exists():
        raise CliError(f"no store at {path} (has the portal run with {cfg.source}?)", 2)
    try:
        return open_db(path, cfg.store_key())
    except _CANNOT_OPEN as e:
        raise CliError(f"cannot open the store {path}: {e}") from None


def _transaction(conn: Conn, fn: Callable[[Conn], T]) -> T:
    """``fn`` in one write transaction (the store's write lock): committed whole or rolled back whole."""
    try:
        conn.begin()
    except db.OperationalError as e:
        raise CliError(f"the store is busy ({e}); nothing was written, try again") from None
    try:
        out = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return out


def _audit(conn: Conn, action: str, target: str = "", detail: str = "") -> None:
    try:
        _transaction(conn, lambda c: reg.audit(c, cli_actor(), action, target, detail))
    except db.Error as e:
        raise CliError(f"cannot write the audit record ({e}); nothing was written") from None


def _staged(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a new file beside ``path`` (fsynced), for :func:`os.replace` once audited."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None
    return tmp


def _publish(conn: Conn, tmp: Path, path: Path, action: str, target: str, detail: str) -> None:
    try:
        _audit(conn, action, target, detail)
        os.replace(tmp, path)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- import and export


def import_estate(cfg: PortalConfig, csv_path: str, *, dry_run: bool = False) -> int:
    try:
        with open(csv_path, "rb") as f:
            data = f.read(IMPORT_MAX_BYTES + 1)
    except OSError as e:
        raise CliError(f"cannot read {csv_path}: {e.strerror or e}", 2) from None
    if len(data) > IMPORT_MAX_BYTES:
        raise CliError(f"{csv_path} is larger than {IMPORT_MAX_BYTES // (1024 * 1024)} MiB; split it", 2)
    rows, errors = reg.parse_import(data)
    if errors:
        tr = Translator(cfg.language)
        for err in errors:
            print(f"{csv_path}:{err.line}: {tr(err.key, **err.kw)}", file=sys.stderr)
        bad = len({err.line for err in errors})
        print(f"{csv_path}: {bad} bad line{'s' if bad != 1 else ''}; nothing imported", file=sys.stderr)
        return 2
    if dry_run:
        print(f"{csv_path}: {len(rows)} rows checked, no problems; nothing written (dry run)")
        return 0
    actor = cli_actor()
    conn = _open(cfg, create=True)
    try:
        today = reg.today_in(cfg.tz, time.time())
        counts = _transaction(conn, lambda c: reg.apply_import(c, rows, actor, today))
    except _IMPORT_FAILED as e:
        raise CliError(f"{csv_path}: the import failed and was rolled back; nothing imported ({e})") from None
    finally:
        conn.close()
    summary = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items())
    print(f"{csv_path}: {len(rows)} rows imported into {cfg.store_target} ({summary})")
    return 0


def export_estate(cfg: PortalConfig, output: str | None) -> int:
    conn = _open(cfg, create=False)
    try:
        try:
            text = reg.export_csv(conn)
        except db.Error as e:
            raise CliError(f"cannot read the store: {e}") from None
        rows = text.count("\n") - 1
        if output is None:
            _audit(conn, "export.csv", "stdout", f"{rows} rows")
            sys.stdout.flush()
            sys.stdout.buffer.write(text.encode("utf-8"))
            sys.stdout.buffer.flush()
            return 0
        path = Path(output)
        tmp = _staged(path, ("\ufeff" + text).encode("utf-8"), 0o600)
        _publish(conn, tmp, path, "export.csv", str(path.resolve()), f"{rows} rows")
    finally:
        conn.close()
    print(f"{output}: {rows} rows")
    return 0


def visitor_pass(cfg: PortalConfig, resident_id: int) -> int:
    """The resident's latest visitor pass, unsealed with the store key, on stdout (exit 1 when there is none)."""
    conn = _open(cfg, create=False)
    try:
        try:
            row = conn.execute(
                "SELECT pass_id, sealed FROM visitor_passes WHERE resident_id = ? ORDER BY id DESC LIMIT 1",
                (resident_id,),
            ).fetchone()
            text = key_of(conn).unseal(bytes(row["sealed"]), row["pass_id"]) if row else None
        except _CANNOT_READ as e:
            raise CliError(f"cannot read the store: {e}") from None
        if text is None:
            raise CliError(f"resident {resident_id} has issued no visitor pass")
        _audit(conn, "visitor_pass.shown", f"resident {resident_id}", row["pass_id"])
    finally:
        conn.close()
    print(text)
    return 0


# ---------------------------------------------------------------- plates


def _plates_of(conn: Conn, site: str | None, building: str | None, unit: str | None) -> tuple[list[reg.PlateSpec], str]:
    """The plates in print order (building by building, as the web prints one) and the sheet's title."""
    sql = (
        "SELECT b.id, b.code, s.code AS site, s.name AS site_name FROM reg_buildings b"
        " JOIN reg_sites s ON s.id = b.site_id WHERE TRUE"
    )
    args: list[str] = []
    if site is not None:
        sql += " AND s.code = ?"
        args.append(site)
    if building is not None:
        sql += " AND b.code = ?"
        args.append(building)
    blds = sorted(conn.execute(sql, args).fetchall(), key=lambda r: (r["site"], reg.sort_key(r["code"])))
    if building is not None:
        if not blds:
            raise CliError(f"no building {building!r}" + (f" in site {site!r}" if site else ""), 2)
        if len(blds) > 1:
            sites = ", ".join(r["site"] for r in blds)
            raise CliError(f"building {building!r} is in sites {sites}: name one with --site", 2)
    elif site is not None and conn.execute("SELECT 1 FROM reg_sites WHERE code = ?", (site,)).fetchone() is None:
        raise CliError(f"no site {site!r}", 2)
    if unit is not None:
        b = blds[0]
        row = conn.execute("SELECT id FROM reg_units WHERE building_id = ? AND code = ?", (b["id"], unit)).fetchone()
        if row is None:
            raise CliError(f"no unit {unit!r} in building {building!r}", 2)
        return reg.plates_for(conn, b["id"], int(row["id"])), f"{b['site_name']} {b['code']}幢{unit}单元"
    specs = [s for b in blds for s in reg.plates_for(conn, b["id"])]
    if building is not None:
        return specs, f"{blds[0]['site_name']} {building}幢"
    return specs, " · ".join(dict.fromkeys(r["site_name"] for r in blds))


def plate_urls(
    cfg: PortalConfig, *, site: str | None = None, building: str | None = None, unit: str | None = None
) -> int:
    """The plates' addresses as CSV on stdout (``kind,place,url``, a header first), in print order: entrance and
    house plates, then (for the estate or a site) the patrol checkpoints, for a sign maker who prints them
    elsewhere. Audited like printing: the rows are the plates."""
    from portal.patrol import model as patrol
    from portal.web import csvcells

    if unit is not None and building is None:
        raise CliError("--unit needs --building", 2)
    if not cfg.public_url:
        raise CliError(
            f"set public_url in {cfg.source}: the address residents' phones reach the portal at, "
            "which every plate's QR code carries",
            2,
        )
    conn = _open(cfg, create=False)
    try:
        try:
            specs, title = _plates_of(conn, site, building, unit)
            rows = [(s.kind, s.address_zh, s.url(cfg.public_url)) for s in specs]
            if building is None:
                names = {r["code"]: r["name"] for r in conn.execute("SELECT code, name FROM reg_sites")}
                for cp in sorted(patrol.checkpoints(conn, site=site), key=lambda c: (c.site, c.id)):
                    site_name = names.get(cp.site, cp.site)
                    spec = cp.plate(site_name)
                    rows.append((spec.kind, f"{site_name} {cp.name}", spec.url(cfg.public_url)))
        except db.Error as e:
            raise CliError(f"cannot read the store: {e}") from None
        if not rows:
            raise CliError("no plates (import the estate first)")
        _audit(conn, "plates.urls", title, f"{len(rows)} plate addresses")
    finally:
        conn.close()
    w = csvcells.writer(sys.stdout, lineterminator="\n")
    w.writerow(["kind", "place", "url"])
    for row in rows:
        w.writerow(list(row))
    sys.stdout.flush()
    return 0


def print_plates(
    cfg: PortalConfig, output: str, *, site: str | None = None, building: str | None = None, unit: str | None = None
) -> int:
    from tqdm import tqdm

    from portal.estate import plates

    if unit is not None and building is None:
        raise CliError("--unit needs --building", 2)
    if not cfg.public_url:
        raise CliError(
            f"set public_url in {cfg.source}: the address residents' phones reach the portal at, "
            "which every plate's QR code carries",
            2,
        )
    conn = _open(cfg, create=False)
    try:
        try:
            specs, title = _plates_of(conn, site, building, unit)
        except db.Error as e:
            raise CliError(f"cannot read the store: {e}") from None
        if not specs:
            raise CliError("no plates to print (import the estate first)")
        bar = tqdm(total=len(specs), unit="plate", desc="plates", file=sys.stderr, disable=not sys.stderr.isatty())
        try:
            sheet = plates.render_sheets(
                [plates.Sheet(title, specs)], cfg.public_url, font=cfg.phone.sheet_font, progress=bar.update
            )[0]
        except plates.SheetError as e:
            raise CliError(str(e)) from None
        finally:
            bar.close()
        path = Path(output)
        tmp = _staged(path, sheet.pdf, 0o666)
        _publish(conn, tmp, path, "plates.print", title, f"{sheet.plates} plates")
    finally:
        conn.close()
    print(
        f"{output}: {sheet.plates} plate{'s' if sheet.plates != 1 else ''} on {sheet.pages} "
        f"page{'s' if sheet.pages != 1 else ''} ({title})"
    )
    return 0
