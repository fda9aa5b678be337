"""Door-plate benchmark: print-ready sheets for a whole estate, and the public house page under load.

1. sheets — an estate of ``--flats`` flats (25 buildings, 2 units each, 4 flats a floor) imported
   from CSV into a fresh portal store, then every building's A4 PDF rendered in one job (entrance
   plates first, 12 plates a page: vector QR codes on a 300 dpi grid, 1-bit address masks, cut lines),
   split over one worker process a core, with a progress bar when run from a terminal;
2. house page — ``python -m portal run`` on that store, and a bounded aiohttp client loop on
   loopback fetching random flats' ``/p/<code>`` for ``--duration`` seconds with ``--concurrency``
   requests in flight: requests per second and p50/p99 latency.

Usage: python bench/plates.py [--flats 5000] [--duration 10] [--concurrency 32] [--workers N] [--keep DIR]
The default run takes about 20 s on two cores (a minute at most). The last line printed is one JSON
object with every figure, its keys named with their units.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from portal.estate import plates  # noqa: E402
from portal.estate import registry as reg  # noqa: E402
from portal.store import open_db, storekey  # noqa: E402

BUILDINGS = 25
UNITS = 2
PER_FLOOR = 4
MAX_REQUESTS = 500_000


def estate_csv(flats: int) -> str:
    per_unit = max(1, -(-flats // (BUILDINGS * UNITS)))
    lines = ["site,site_name,building,unit,house"]
    n = 0
    for b in range(1, BUILDINGS + 1):
        for u in range(1, UNITS + 1):
            for i in range(per_unit):
                if n == flats:
                    break
                floor, pos = divmod(i, PER_FLOOR)
                lines.append(f"s1,阳光花园,{b},{u},{floor + 1}{pos + 1:02d}")
                n += 1
    return "\n".join(lines) + "\n"


def open_store(data_dir: Path) -> sqlite3.Connection:
    """The store the portal started on ``data_dir`` will use, with its store key (sealed plate codes)."""
    return open_db(data_dir / "portal.db", storekey.open_for(data_dir / storekey.KEY_FILE, data_dir / "portal.db"))


def build_store(data_dir: Path, flats: int) -> tuple[float, int]:
    conn = open_store(data_dir)
    try:
        t0 = time.perf_counter()
        rows, errors = reg.parse_import(estate_csv(flats).encode())
        assert not errors, errors[:3]
        conn.execute("BEGIN IMMEDIATE")
        reg.apply_import(conn, rows, "bench")
        conn.execute("COMMIT")
        dt = time.perf_counter() - t0
        n = int(conn.execute("SELECT count(*) FROM reg_houses").fetchone()[0])
    finally:
        conn.close()
    return dt, n


def render_sheets(data_dir: Path, out: Path, base: str, workers: int | None) -> dict[str, float]:
    conn = open_store(data_dir)
    try:
        buildings = conn.execute(
            "SELECT b.id, b.code, s.name FROM reg_buildings b JOIN reg_sites s ON s.id = b.site_id"
        ).fetchall()
        sheets = [plates.Sheet(f"{b['name']} {b['code']}幢", reg.plates_for(conn, b["id"])) for b in buildings]
    finally:
        conn.close()
    total = sum(len(s.plates) for s in sheets)
    used = plates.auto_workers(total) if workers is None else workers
    bar = tqdm(total=total, unit="plate", desc="sheets", disable=not sys.stderr.isatty())
    t0 = time.perf_counter()
    done = plates.render_sheets(sheets, base, workers=used, progress=bar.update)
    for b, sheet in zip(buildings, done, strict=True):
        (out / f"building-{b['code']}.pdf").write_bytes(sheet.pdf)
    dt = time.perf_counter() - t0
    bar.close()
    return {
        "plates": total,
        "pages": sum(s.pages for s in done),
        "pdfs": len(done),
        "seconds": round(dt, 2),
        "plates_per_s": round(total / dt, 1),
        "pdf_mb": round(sum(len(s.pdf) for s in done) / 1e6, 2),
        "worker_processes": used,
    }


def start_portal(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    cfg = folder / "portal.yaml"
    cfg.write_text(
        "\n".join(
            [
                "site_name: 阳光花园",
                "data_dir: data",
                "listen: {host: 127.0.0.1, port: 0}",
                "mqtt: {host: 127.0.0.1, port: 1, reconnect_min_s: 5, reconnect_max_s: 60}",
                "gateways: [{site: s1, gateway: gw1}]",
                "log_level: WARNING",
                "phone: {scans_per_min: 1000000}",  # the per-address limit would otherwise stop a one-address load
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    err = open(folder / "portal.stderr", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "portal", "run", "--config", str(cfg)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=err,
    )
    err.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    buf = b""
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not r:
            continue
        ch = os.read(proc.stdout.fileno(), 1)
        if not ch:
            break
        if ch != b"\n":
            buf += ch
            continue
        line = json.loads(buf)
        buf = b""
        if line.get("ready"):
            return proc, str(line["url"]).rstrip("/")
    proc.kill()
    proc.wait()
    raise SystemExit(f"the portal did not start: {(folder / 'portal.stderr').read_text()[-2000:]}")


async def load(url: str, codes: list[str], duration: float, concurrency: int) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration
    rnd = random.Random(7)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        for code in codes[:20]:  # warm up
            async with session.get(f"{url}/p/{code}") as r:
                await r.read()

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline and len(lat) < MAX_REQUESTS:
                code = rnd.choice(codes)
                t0 = time.perf_counter()
                async with session.get(f"{url}/p/{code}") as r:
                    body = await r.read()
                    ok = r.status == 200 and "阳光花园".encode() in body
                lat.append(time.perf_counter() - t0)
                errors += 0 if ok else 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        dt = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100)
    return {
        "requests": len(lat),
        "errors": errors,
        "seconds": round(dt, 2),
        "rps": round(len(lat) / dt, 1),
        "p50_ms": round(q[49] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
        "concurrency": concurrency,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flats", type=int, default=5000)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--workers", type=int, help="sheet worker processes (0: render in this process; default: one a core)"
    )
    ap.add_argument("--keep", help="keep the store and the PDFs in this folder")
    a = ap.parse_args()
    if not (1 <= a.flats <= 100_000 and 1 <= a.duration <= 120 and 1 <= a.concurrency <= 512):
        raise SystemExit("flats 1..100000, duration 1..120 s, concurrency 1..512")
    if a.workers is not None and not 0 <= a.workers <= 64:
        raise SystemExit("workers 0..64")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-plates-") as tmp:
        folder = Path(a.keep) if a.keep else Path(tmp)
        data = folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        pdfs = folder / "sheets"
        pdfs.mkdir(exist_ok=True)
        import_s, houses = build_store(data, a.flats)
        print(f"estate: {houses} flats imported in {import_s:.2f} s", flush=True)
        sheets = render_sheets(data, pdfs, "https://wy.example.cn", a.workers)
        print(
            f"sheets: {sheets['plates']} plates on {sheets['pages']} A4 pages in {sheets['pdfs']} PDFs in "
            f"{sheets['seconds']} s ({sheets['plates_per_s']} plates/s, {sheets['pdf_mb']} MB of PDF, "
            f"{sheets['worker_processes']} worker processes)",
            flush=True,
        )
        conn = open_store(data)
        codes = [
            reg.plate_code(conn, "house", r[0]) or ""
            for r in conn.execute("SELECT house_id FROM plates WHERE kind = 'house' AND withdrawn_at IS NULL")
        ]
        conn.close()
        proc, url = start_portal(folder)
        try:
            page = asyncio.run(load(url, codes, a.duration, a.concurrency))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        print(
            f"house page: {page['rps']} requests/s, p50 {page['p50_ms']} ms, p99 {page['p99_ms']} ms "
            f"({page['requests']} requests, {page['errors']} errors, {page['concurrency']} in flight)",
            flush=True,
        )
        total = time.perf_counter() - started
        print(f"total: {total:.1f} s", flush=True)
        print(
            json.dumps(
                {
                    "bench": "plates",
                    "cpus": plates.cpu_count(),
                    "flats": houses,
                    "estate_import_s": round(import_s, 2),
                    "sheet_plates": sheets["plates"],
                    "sheet_pages": sheets["pages"],
                    "sheet_pdf_files": sheets["pdfs"],
                    "sheet_pdf_mb": sheets["pdf_mb"],
                    "sheet_render_s": sheets["seconds"],
                    "sheet_plates_per_s": sheets["plates_per_s"],
                    "sheet_worker_processes": sheets["worker_processes"],
                    "house_page_requests": page["requests"],
                    "house_page_errors": page["errors"],
                    "house_page_duration_s": page["seconds"],
                    "house_page_requests_per_s": page["rps"],
                    "house_page_p50_ms": page["p50_ms"],
                    "house_page_p99_ms": page["p99_ms"],
                    "house_page_concurrency": page["concurrency"],
                    "bench_total_s": round(total, 1),
                },
                ensure_ascii=False,
            )
        )


if __name__ == "__main__":
    main()
