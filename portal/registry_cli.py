"""The estate registry from the command line: ``import-estate``, ``export-estate`` and ``plates``.

They work on the portal's store file directly and may run beside a running portal: the store is in WAL
mode, reads see one snapshot and take no lock, and the one write of a command is a single short
``BEGIN IMMEDIATE`` transaction that waits for the portal's writer (busy timeout). The import is the web
import's code (:func:`portal.registry.parse_import`, :func:`portal.registry.apply_import`): every line
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
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from portal import audit as audit_trail
from portal import registry as reg
from portal.config import PortalConfig
from portal.i18n import Translator
from portal.store import StoreError, open_db

T = TypeVar("T")
COMMANDS = ("import-estate", "export-estate", "plates", "audit-verify")
IMPORT_MAX_BYTES = 32 * 1024 * 1024  # the web import's upload limit


class CliError(Exception):
    """A command that cannot go on: the message for stderr and the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i = sub.add_parser("import-estate", help="import sites, buildings, units, houses and residents from a CSV "
                                             "(all or nothing, every bad line named)")
    i.add_argument("--config", required=True)
    i.add_argument("csv", metavar="CSV", help="UTF-8 (with or without BOM) or GB18030, the web import's columns")
    i.add_argument("--dry-run", action="store_true", help="check every line, write nothing")
    e = sub.add_parser("export-estate", help="every house and residency as CSV (the web export's file)")
    e.add_argument("--config", required=True)
    e.add_argument("-o", "--output", metavar="OUT.csv", help="a file (mode 0600, with the BOM Excel wants); "
                                                             "default: stdout, without BOM")
    p = sub.add_parser("plates", help="print-ready A4 door-plate sheets (PDF) of the estate, a building or a unit")
    p.add_argument("--config", required=True)
    p.add_argument("--site", help="a site code (needed only when two sites have the building code)")
    p.add_argument("--building", help="a building code; default: every building")
    p.add_argument("--unit", help="a unit code of --building")
    p.add_argument("-o", "--output", required=True, metavar="OUT.pdf")
    v = sub.add_parser("audit-verify", help="check the audit trail's hash chain (exit 0 intact, 1 broken)")
    v.add_argument("--config", required=True)


def run(args: argparse.Namespace, cfg: PortalConfig) -> int:
    try:
        if args.command == "import-estate":
            return import_estate(cfg, args.csv, dry_run=args.dry_run)
        if args.command == "export-estate":
            return export_estate(cfg, args.output)
        if args.command == "audit-verify":
            return audit_verify(cfg)
        return print_plates(cfg, args.output, site=args.site, building=args.building, unit=args.unit)
    except CliError as e:
        print(f"{args.command}: {e}", file=sys.stderr)
        return e.status


def audit_verify(cfg: PortalConfig) -> int:
    """Walk the audit chain in one read transaction (a consistent snapshot while the portal writes)."""
    conn = _open(cfg, create=False)
    try:
        conn.execute("BEGIN")
        try:
            verdict = audit_trail.verify(conn)
        finally:
            conn.execute("ROLLBACK")
    except sqlite3.Error as e:
        raise CliError(f"cannot read the audit trail: {e}") from None
    finally:
        conn.close()
    print(json.dumps({"ok": verdict.ok, "rows": verdict.rows, "bad_id": verdict.bad_id, "reason": verdict.reason},
                     ensure_ascii=False))
    if verdict.ok:
        return 0
    print(f"audit-verify: broken at row {verdict.bad_id}: {verdict.reason}", file=sys.stderr)
    return 1


def cli_actor() -> str:
    """``cli:<name of the real user id>``; from the password database, not from $USER."""
    uid = os.getuid()
    try:
        return f"cli:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"cli:{uid}"


# ---------------------------------------------------------------- the store


def _open(cfg: PortalConfig, *, create: bool) -> sqlite3.Connection:
    path = cfg.db_path
    if not create and not path.exists():
        raise CliError(f"no store at {path} (has the portal run with {cfg.source}?)", 2)
    try:
        return open_db(path)
    except (sqlite3.Error, StoreError, OSError) as e:
        raise CliError(f"cannot open the store {path}: {e}") from None


def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn`` in one IMMEDIATE transaction: committed whole or rolled back whole."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        raise CliError(f"the store is busy ({e}); nothing was written, try again") from None
    try:
        out = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return out


def _audit(conn: sqlite3.Connection, action: str, target: str = "", detail: str = "") -> None:
    try:
        _transaction(conn, lambda c: reg.audit(c, cli_actor(), action, target, detail))
    except sqlite3.Error as e:
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


def _publish(conn: sqlite3.Connection, tmp: Path, path: Path, action: str, target: str, detail: str) -> None:
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
        for e in errors:
            print(f"{csv_path}:{e.line}: {tr(e.key, **e.kw)}", file=sys.stderr)
        bad = len({e.line for e in errors})
        print(f"{csv_path}: {bad} bad line{'s' if bad != 1 else ''}; nothing imported", file=sys.stderr)
        return 2
    if dry_run:
        print(f"{csv_path}: {len(rows)} rows checked, no problems; nothing written (dry run)")
        return 0
    actor = cli_actor()
    conn = _open(cfg, create=True)
    try:
        counts = _transaction(conn, lambda c: reg.apply_import(c, rows, actor))
    except (sqlite3.Error, reg.RegistryError) as e:
        raise CliError(f"{csv_path}: the import failed and was rolled back; nothing imported ({e})") from None
    finally:
        conn.close()
    summary = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items())
    print(f"{csv_path}: {len(rows)} rows imported into {cfg.db_path} ({summary})")
    return 0


def export_estate(cfg: PortalConfig, output: str | None) -> int:
    conn = _open(cfg, create=False)
    try:
        try:
            text = reg.export_csv(conn)
        except sqlite3.Error as e:
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


# ---------------------------------------------------------------- plates


def _plates_of(conn: sqlite3.Connection, site: str | None, building: str | None,
               unit: str | None) -> tuple[list[reg.PlateSpec], str]:
    """The plates in print order (building by building, as the web prints one) and the sheet's title."""
    sql = ("SELECT b.id, b.code, s.code AS site, s.name AS site_name FROM reg_buildings b"
           " JOIN reg_sites s ON s.id = b.site_id WHERE 1 = 1")
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


def print_plates(cfg: PortalConfig, output: str, *, site: str | None = None, building: str | None = None,
                 unit: str | None = None) -> int:
    from tqdm import tqdm

    from portal import plates

    if unit is not None and building is None:
        raise CliError("--unit needs --building", 2)
    if not cfg.public_url:
        raise CliError(f"set public_url in {cfg.source}: the address residents' phones reach the portal at, "
                       "which every plate's QR code carries", 2)
    conn = _open(cfg, create=False)
    try:
        try:
            specs, title = _plates_of(conn, site, building, unit)
        except sqlite3.Error as e:
            raise CliError(f"cannot read the store: {e}") from None
        if not specs:
            raise CliError("no plates to print (import the estate first)")
        bar = tqdm(total=len(specs), unit="plate", desc="plates", file=sys.stderr, disable=not sys.stderr.isatty())
        try:
            sheet = plates.render_sheets([plates.Sheet(title, specs)], cfg.public_url, font=cfg.phone.sheet_font,
                                         progress=bar.update)[0]
        except plates.SheetError as e:
            raise CliError(str(e)) from None
        finally:
            bar.close()
        path = Path(output)
        tmp = _staged(path, sheet.pdf, 0o666)
        _publish(conn, tmp, path, "plates.print", title, f"{sheet.plates} plates")
    finally:
        conn.close()
    print(f"{output}: {sheet.plates} plate{'s' if sheet.plates != 1 else ''} on {sheet.pages} "
          f"page{'s' if sheet.pages != 1 else ''} ({title})")
    return 0
