"""The registry from the command line (``python -m portal import-estate|export-estate|plates``, also reached
as ``gatehouse portal ...``): real store files, real child processes, beside a running portal. A CSV with bad
lines imports nothing and names each line; a good one imports and exports back byte for byte; a dry run
writes nothing; plate sheets hold the right plates, read back by zxing-cpp to the portal's plate URLs, with
a progress bar on a terminal and silence otherwise; every export and print is audited as ``cli:<user>``."""

from __future__ import annotations

import csv
import fcntl
import os
import pwd
import re
import select
import sqlite3
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import pypdfium2 as pdfium
import pytest
import zxingcpp

from portal.config import load
from portal.patrol import model as patrol
from portal.store import connect, storekey
from tests.portal_support import ROOT, portal_process, write_config
from tests.registry_support import estate_csv, plate_codes

pytestmark = pytest.mark.timeout(180)

PUBLIC = "https://wy.example.cn/estate"
GATEHOUSE = Path(sys.executable).parent / "gatehouse"
ACTOR = f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
# The export's own form: every column, natural order (building 10 after 5), vacant flats, an ended residency, a phone
# with + kept from running as a formula in a spreadsheet (portal.web.csvcells).
CANONICAL = (
    "site,site_name,building,unit,house,name,phone,role,move_in,move_out,lease_end,status\n"
    "s1,阳光花园,3,1,101,Zhao Lei,'+8613600002222,owner,2019-01-01,,,active\n"
    "s1,阳光花园,3,1,102,,,,,,,\n"
    "s1,阳光花园,3,2,301,张伟,13812345678,owner,2020-05-01,,,active\n"
    "s1,阳光花园,3,2,301,李娜,13987654321,family,2020-05-01,,,active\n"
    "s1,阳光花园,3,2,302,王芳,13700001111,tenant,2025-01-01,,2030-12-31,active\n"
    "s1,阳光花园,5,1,1201,,,,,,,\n"
    "s1,阳光花园,10,1,101,钱七,13811112222,owner,2021-01-01,2024-06-30,,inactive\n"
    "s1,阳光花园,10,1,102,,,,,,,\n"
)


def cli(*args: str | Path, gatehouse: bool = False, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    if gatehouse:
        assert GATEHOUSE.exists(), f"{GATEHOUSE} is missing: install the package (make test does)"
        cmd = [str(GATEHOUSE), "portal", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "portal", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def config(folder: Path, extra: str = f"public_url: {PUBLIC}\nlanguage: en\n") -> Path:
    return write_config(folder, None, extra=extra)


def db(cfg: Path) -> Path:
    return cfg.parent / "data" / "portal.db"


def query(cfg: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db(cfg))
    try:
        return [tuple(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def dump(cfg: Path) -> list[str]:
    conn = sqlite3.connect(db(cfg))
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def plate_urls(cfg: Path, building: str | None = None, unit: str | None = None) -> set[str]:
    """The URLs of the plates in use, from the store (entrances and houses), opened with its key file."""
    return {
        f"{PUBLIC}/p/{code}"
        for (b, u, _), code in plate_codes(cfg).items()
        if building in (None, b) and unit in (None, u)
    }


def decoded(pdf: Path) -> list[list[str]]:
    """Each page rendered by PDFium at 300 dpi, its QR codes read by zxing-cpp."""
    doc = pdfium.PdfDocument(pdf.read_bytes())
    try:
        out = []
        for i in range(len(doc)):
            page = doc[i]
            try:
                img = page.render(scale=300 / 72, grayscale=True).to_pil()
            finally:
                page.close()
            out.append([r.text for r in zxingcpp.read_barcodes(img) if r.format == zxingcpp.BarcodeFormat.QRCode])
        return out
    finally:
        doc.close()


def on_a_terminal(*args: str | Path, timeout: float = 90) -> tuple[int, str, bytes]:
    """Run ``python -m portal ...`` with stderr on a pseudo-terminal of 100×24: (status, stdout, terminal bytes)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "portal", *map(str, args)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
        )
    finally:
        os.close(slave)
    screen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return proc.returncode, out.decode(), screen


def audit_rows(cfg: Path) -> list[tuple[object, ...]]:
    return query(cfg, "SELECT actor, action, target, detail FROM audit ORDER BY id")


# ---------------------------------------------------------------- import


def test_a_csv_with_bad_lines_imports_nothing_and_names_each_bad_line(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    first = tmp_path / "first.csv"
    first.write_text(CANONICAL.split("s1,阳光花园,3,1,101")[0] + "s1,阳光花园,10,1,101,,,,,,,\n", encoding="utf-8")
    assert cli("import-estate", "--config", cfg, first).returncode == 0
    before = dump(cfg)

    bad = (
        "s1,阳光花园,3,2,303,赵六,1381234,family,2021-01-01,,\n"  # line 8: phone too short
        "s1,阳光花园,3号楼,2,304,,,,,,\n"  # line 9: building not a code
        "s1,阳光花园,3,2,305,钱七,13811112222,tenant,2021-01-01,,\n"  # line 10: tenant without lease end
        "s1,阳光花园,3,2,301,张伟,13812345678,owner,2020-05-01,,\n"  # line 11: repeats line 2
        "s1,阳光花园,3,2,306,孙八,13833334444,boss,2021-13-01,,\n"  # line 12: role and date
        "s1,阳光花园,3,2,307,周九,13855556666,family\n"  # line 13: too few columns
    )
    path = tmp_path / "estate.csv"
    path.write_text(estate_csv(bad), encoding="utf-8")
    r = cli("import-estate", "--config", cfg, path, gatehouse=True)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    *lines, summary = r.stderr.splitlines()
    named: dict[int, list[str]] = {}
    for line in lines:
        m = re.fullmatch(re.escape(str(path)) + r":(\d+): (.+)", line)
        assert m, line
        named.setdefault(int(m.group(1)), []).append(m.group(2))
    assert sorted(named) == [8, 9, 10, 11, 12, 13]
    assert named[8] == ["phone '1381234' is not valid"]
    assert named[11] == ["repeats line 2 (same flat, same phone)"]
    assert len(named[12]) == 2
    assert summary == f"{path}: 6 bad lines; nothing imported"
    assert dump(cfg) == before  # not one row, not one audit record


# ---------------------------------------------------------------- import and export, beside a running portal


def test_a_good_csv_imports_beside_the_running_portal_and_exports_back_identically(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    src = tmp_path / "estate.csv"
    src.write_bytes(("\ufeff" + CANONICAL).encode("utf-8"))  # as the web export and Excel write it
    with portal_process(cfg) as portal:
        assert query(cfg, "SELECT count(*) FROM reg_houses") == [(0,)]
        r = cli("import-estate", "--config", cfg, src, gatehouse=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{src}: 8 rows imported") and "houses 7, residents new 5" in r.stdout

        # The running portal serves what the command wrote: the plate of flat 3-2-301 opens its page.
        house_code = plate_codes(cfg)[("3", "2", "301")]
        with urllib.request.urlopen(f"{portal.url.rstrip('/')}/p/{house_code}", timeout=10) as resp:
            assert resp.status == 200 and "301" in resp.read().decode()

        out = tmp_path / "out.csv"
        r = cli("export-estate", "--config", cfg, "-o", out)
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"{out}: 8 rows\n"
        assert out.read_bytes() == src.read_bytes()
        assert out.stat().st_mode & 0o777 == 0o600  # residents' phone numbers
        r = cli("export-estate", "--config", cfg, gatehouse=True)
        assert r.returncode == 0 and r.stdout == CANONICAL and r.stderr == ""

        # Importing the export again changes nothing but the residencies' decision stamps.
        r = cli("import-estate", "--config", cfg, out)
        assert r.returncode == 0 and "houses 0" in r.stdout and "residents updated 5" in r.stdout
        assert portal.proc.poll() is None
    assert audit_rows(cfg) == [
        (ACTOR, "import.csv", "", "sites=1, buildings=3, units=4, houses=7, residents_new=5, residents_updated=0"),
        (ACTOR, "export.csv", str(out.resolve()), "8 rows"),
        (ACTOR, "export.csv", "stdout", "8 rows"),
        (ACTOR, "import.csv", "", "sites=0, buildings=0, units=0, houses=0, residents_new=0, residents_updated=5"),
    ]


def test_a_dry_run_writes_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    src = tmp_path / "estate.csv"
    src.write_text(CANONICAL, encoding="utf-8")
    r = cli("import-estate", "--config", cfg, src, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{src}: 8 rows checked, no problems; nothing written (dry run)\n"
    assert not db(cfg).parent.exists()  # not even an empty store

    assert cli("import-estate", "--config", cfg, src).returncode == 0
    before = dump(cfg)
    more = tmp_path / "more.csv"
    more.write_text(estate_csv("s1,阳光花园,7,1,701,,,,,,\n"), encoding="utf-8")
    r = cli("import-estate", "--config", cfg, more, "--dry-run", gatehouse=True)
    assert r.returncode == 0 and "7 rows checked" in r.stdout, r.stderr
    assert dump(cfg) == before
    more.write_text(estate_csv("s1,阳光花园,7,1,701,X,123,owner,,,\n"), encoding="utf-8")
    r = cli("import-estate", "--config", cfg, more, "--dry-run")
    assert r.returncode == 2 and f"{more}:8: phone '123' is not valid" in r.stderr.splitlines()
    assert dump(cfg) == before
    assert cli("import-estate", "--config", cfg, more).returncode == 2
    assert dump(cfg) == before


# ---------------------------------------------------------------- plates


def test_plate_sheets_of_a_building_a_unit_and_the_estate_read_back_to_the_portal_urls(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    src = tmp_path / "estate.csv"
    src.write_text(CANONICAL, encoding="utf-8")
    assert cli("import-estate", "--config", cfg, src).returncode == 0

    # Building 3: two entrances and four flats, on one page; quiet when stderr is not a terminal.
    b3 = tmp_path / "b3.pdf"
    r = cli("plates", "--config", cfg, "--building", "3", "-o", b3, gatehouse=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout == f"{b3}: 6 plates on 1 page (阳光花园 3幢)\n"
    pages = decoded(b3)
    assert len(pages) == 1 and len(pages[0]) == 6
    assert set(pages[0]) == plate_urls(cfg, "3") and len(plate_urls(cfg, "3")) == 6

    u2 = tmp_path / "u2.pdf"
    r = cli("plates", "--config", cfg, "--building", "3", "--unit", "2", "-o", u2)
    assert r.returncode == 0 and r.stdout == f"{u2}: 3 plates on 1 page (阳光花园 3幢2单元)\n", r.stderr
    assert sorted(decoded(u2)[0]) == sorted(plate_urls(cfg, "3", "2"))

    # The whole estate, with a progress bar on a terminal.
    everything = tmp_path / "estate.pdf"
    status, out, screen = on_a_terminal("plates", "--config", cfg, "-o", everything)
    assert status == 0, screen[-2000:]
    assert out == f"{everything}: 11 plates on 1 page (阳光花园)\n"
    assert re.search(rb"plates: 100%\|.*\| 11/11 ", screen), screen[-2000:]
    assert sorted(decoded(everything)[0]) == sorted(plate_urls(cfg))

    assert [a for a in audit_rows(cfg) if a[1] == "plates.print"] == [
        (ACTOR, "plates.print", "阳光花园 3幢", "6 plates"),
        (ACTOR, "plates.print", "阳光花园 3幢2单元", "3 plates"),
        (ACTOR, "plates.print", "阳光花园", "11 plates"),
    ]

    # Clear refusals, and no file left behind.
    nowhere = tmp_path / "nowhere.pdf"
    for args, message in [
        (["--building", "9"], "plates: no building '9'"),
        (["--building", "3", "--unit", "9"], "plates: no unit '9' in building '3'"),
        (["--unit", "2"], "plates: --unit needs --building"),
    ]:
        r = cli("plates", "--config", cfg, *args, "-o", nowhere)
        assert (r.returncode, r.stderr.strip()) == (2, message)
    bare = config(tmp_path / "bare", extra="")
    r = cli("plates", "--config", bare, "-o", nowhere)
    assert r.returncode == 2 and "set public_url" in r.stderr
    assert not nowhere.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_plate_urls_list_every_plate_and_checkpoint_in_use_for_a_sign_maker(tmp_path: Path) -> None:
    """``plates --urls``: CSV rows kind,place,url on stdout, the same addresses the sheets print (the store's codes),
    the site's patrol checkpoints after the door plates (a withdrawn one not), none for one building; audited."""
    cfg = config(tmp_path)
    src = tmp_path / "estate.csv"
    src.write_text(CANONICAL, encoding="utf-8")
    assert cli("import-estate", "--config", cfg, src).returncode == 0
    conf = load(cfg)
    c = connect(conf.db_path, key=storekey.load(conf.key_path))
    try:
        with c:
            gate = patrol.add_checkpoint(c, "s1", "南门岗亭", "office", "2026-01-01T00:00:00Z")
            gone = patrol.add_checkpoint(c, "s1", "旧仓库", "office", "2026-01-01T00:00:00Z")
            patrol.change_checkpoint(c, gone.id, "withdraw", "office", "2026-01-02T00:00:00Z")
    finally:
        c.close()

    r = cli("plates", "--config", cfg, "--urls")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "kind,place,url"
    rows = [tuple(x) for x in csv.reader(lines[1:])]
    doors = [row for row in rows if row[0] != "checkpoint"]
    assert {u for _, _, u in doors} == plate_urls(cfg) and len(doors) == len(plate_urls(cfg)) == 11
    assert {k for k, _, _ in doors} == {"entrance", "house"}
    assert ("entrance", "阳光花园3幢2单元", f"{PUBLIC}/p/{plate_codes(cfg)[('3', '2', None)]}") in doors
    assert ("house", "阳光花园3幢2单元301室", f"{PUBLIC}/p/{plate_codes(cfg)[('3', '2', '301')]}") in doors
    assert rows[len(doors) :] == [("checkpoint", "阳光花园 南门岗亭", f"{PUBLIC}/g/c/{gate.code}")]

    r = cli("plates", "--config", cfg, "--building", "3", "--unit", "2", "--urls")
    assert r.returncode == 0, r.stderr
    assert {row[2] for row in csv.reader(r.stdout.splitlines()[1:])} == plate_urls(cfg, "3", "2")
    assert [a for a in audit_rows(cfg) if a[1] == "plates.urls"] == [
        (ACTOR, "plates.urls", "阳光花园", "12 plate addresses"),
        (ACTOR, "plates.urls", "阳光花园 3幢2单元", "3 plate addresses"),
    ]
    r = cli("plates", "--config", cfg, "--urls", "-o", tmp_path / "x.pdf")
    assert r.returncode == 2 and "not allowed with" in r.stderr
    r = cli("plates", "--config", config(tmp_path / "bare", extra=""), "--urls")
    assert r.returncode == 2 and "set public_url" in r.stderr and r.stdout == ""
