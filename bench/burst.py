"""Burst benchmark: 1,000 events in one second, alarms and tamper mixed in, through an uplink slower than the burst.

``gatehouse gateway run`` with its synthetic source (``loadgen``: every ``--alarm-every``-th event an alarm or a
tamper, the rest routine) after a quiet spell, a small uplink window, one Mosquitto of our own and
``python -m portal run`` with a guard signed in on the console socket. Measured:

* delivery latency, event time (stamped at the gateway's commit) to the portal's commit, p50/p99, for the alarms
  and for the routine events of the same burst; and for the alarms, to the incident on the console socket;
* how far the alarms jumped the queue: routine events generated before an alarm that reached the portal after it;
* the gateway's resident memory before and at its peak during the burst;
* the portal's response time to ``GET /console`` and ``GET /api/health`` while it ingests the burst.

Usage: python bench/burst.py [--events 1000] [--rate 1000] [--alarm-every 20] [--window 20] [--batch 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.children import pct, start, stop  # noqa: E402
from gateway.tooling.broker import MosquittoProcess  # noqa: E402

PY = sys.executable
QUIET_S = 4.0
GUARD_PW = "bench-guard-password"


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def portal_rows(db: Path) -> list[tuple[int, int, int, str, str]]:
    """(pk, seq, priority, ts, received_at) of the burst's events at the portal, in arrival order."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(
            "SELECT pk, seq, priority, ts, received_at FROM events WHERE type LIKE 'test.%' ORDER BY pk"
        ).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def overtaken(rows: list[tuple[int, int, int, str, str]], urgent: int = 20) -> list[float]:
    """For each alarm, the share of routine events generated before it (lower seq) that arrived after it."""
    pos = {seq: i for i, (_, seq, _, _, _) in enumerate(rows)}
    routine = sorted(seq for _, seq, prio, _, _ in rows if prio < urgent)
    out = []
    for _, seq, prio, _, _ in rows:
        if prio < urgent:
            continue
        before = [s for s in routine if s < seq]
        if before:
            out.append(sum(1 for s in before if pos[s] > pos[seq]) / len(before))
    return out


async def sign_in(http: aiohttp.ClientSession, url: str, user: str) -> None:
    page = await (await http.get(url + "login")).text()
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m, "no sign-in form"
    r = await http.post(
        url + "login",
        data={"user": user, "password": GUARD_PW, "csrf": m.group(1)},
        headers={"Origin": url.rstrip("/")},
    )
    assert r.status == 200, f"sign-in failed: {r.status}"


async def run(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    broker = MosquittoProcess(tmp / "broker").start()
    try:
        return await _run(tmp, broker, args)
    finally:
        broker.stop()


async def _run(tmp: Path, broker: MosquittoProcess, args: argparse.Namespace) -> dict[str, Any]:
    (tmp / "gw").mkdir(parents=True)
    (tmp / "portal").mkdir(parents=True)
    (tmp / "gw" / "gateway.yaml").write_text(
        f"site: bench\ngateway: gw1\ndata_dir: data\nlog_level: WARNING\nlocal_api: {{enabled: false}}\n"
        f"mqtt: {{host: 127.0.0.1, port: {broker.port}}}\n"
        f"uplink: {{window: {args.window}, batch_max: {args.batch}}}\n"
        f"loadgen: {{count: {args.events}, rate: {args.rate}, alarm_every: {args.alarm_every}, "
        f"start_after_s: {QUIET_S}}}\n"
    )
    pcfg = tmp / "portal" / "portal.yaml"
    pcfg.write_text(
        f"data_dir: data\nlog_level: WARNING\nlisten: {{host: 127.0.0.1, port: 0}}\n"
        f"mqtt: {{host: 127.0.0.1, port: {broker.port}}}\ngateways: [{{site: bench, gateway: gw1}}]\n"
        "ws_queue_max: 8192\n"
    )
    pw = tmp / "guard.pass"
    pw.write_text(GUARD_PW)
    pw.chmod(0o600)
    add = await asyncio.create_subprocess_exec(
        PY,
        "-m",
        "portal",
        "adduser",
        "--config",
        str(pcfg),
        "--user",
        "guard",
        "--role",
        "guard",
        "--password-file",
        str(pw),
        stdout=asyncio.subprocess.DEVNULL,
    )
    await add.wait()
    portal, pinfo = await start("portal", [PY, "-m", "portal", "run", "--config", str(pcfg)], tmp / "portal.log")
    url = pinfo["url"]
    db = tmp / "portal" / "data" / "portal.db"
    incidents: dict[int, float] = {}  # loadgen number -> wall time the incident reached the console socket
    opened: dict[int, float] = {}
    http_ms: dict[str, list[float]] = {"console": [], "health": []}
    rss: list[float] = []
    gateway = None
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await sign_in(http, url, "guard")
            async with http.ws_connect(url + "ws", headers={"Origin": url.rstrip("/")}) as ws:

                async def listen() -> None:
                    async for msg in ws:
                        m = json.loads(msg.data)
                        inc = m.get("incident") if m.get("kind") == "incident" else None
                        if inc and str(inc.get("type", "")).startswith("test."):
                            n = int(inc["data"]["n"])
                            incidents.setdefault(n, time.time())
                            opened[n] = _ts(inc["opened_at"])

                listener = asyncio.create_task(listen())
                gateway, _ = await start(
                    "gateway",
                    [PY, "-m", "gateway.cli", "gateway", "run", "--config", str(tmp / "gw" / "gateway.yaml")],
                    tmp / "gateway.log",
                )
                proc = psutil.Process(gateway.pid)
                await asyncio.sleep(QUIET_S - 1.0)
                baseline = proc.memory_info().rss / 2**20

                async def sample() -> None:
                    while True:
                        rss.append(proc.memory_info().rss / 2**20)
                        await asyncio.sleep(0.05)

                async def probe() -> None:
                    while True:
                        for name, path in (("console", "console"), ("health", "api/health")):
                            t0 = time.perf_counter()
                            async with http.get(url + path) as r:
                                await r.read()
                                assert r.status == 200, (path, r.status)
                            http_ms[name].append((time.perf_counter() - t0) * 1000)
                        await asyncio.sleep(0.1)

                side = [asyncio.create_task(sample()), asyncio.create_task(probe())]
                t0 = time.monotonic()
                rows: list[tuple[int, int, int, str, str]] = []
                while time.monotonic() - t0 < 120 and gateway.returncode is None:
                    rows = portal_rows(db)
                    if len(rows) >= args.events and len(incidents) >= args.events // max(1, args.alarm_every):
                        break
                    await asyncio.sleep(0.2)
                for t in (*side, listener):
                    t.cancel()
                await asyncio.gather(*side, listener, return_exceptions=True)
    finally:
        if gateway is not None:
            await stop(gateway)
        await stop(portal)
    if len(rows) < args.events:
        raise SystemExit(f"only {len(rows)} of {args.events} events reached the portal; logs in {tmp}")
    lat = {"alarm": [], "routine": []}  # type: dict[str, list[float]]
    for _, _, prio, ts, got in rows:
        lat["alarm" if prio >= 20 else "routine"].append((_ts(got) - _ts(ts)) * 1000)
    console = [(incidents[n] - opened[n]) * 1000 for n in incidents]
    made = sorted(_ts(ts) for _, _, _, ts, _ in rows)
    return {
        "events": len(rows),
        "distinct_seqs": len({r[1] for r in rows}),
        "burst_s": made[-1] - made[0],
        "lat": lat,
        "console": console,
        "jump": overtaken(rows),
        "baseline_mb": baseline,
        "peak_mb": max(rss, default=baseline),
        "http_ms": http_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=1000.0, help="events per second while the burst lasts")
    ap.add_argument("--alarm-every", type=int, default=20, help="every n-th event is an alarm or tamper")
    ap.add_argument("--window", type=int, default=20, help="uplink window: events in flight unacknowledged")
    ap.add_argument("--batch", type=int, default=10, help="uplink batch_max: events per MQTT message")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) and print its path")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gatehouse-bench-"))
    try:
        r = asyncio.run(run(tmp, args))
    finally:
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    a, n, c = r["lat"]["alarm"], r["lat"]["routine"], r["console"]
    hc, hh = r["http_ms"]["console"], r["http_ms"]["health"]
    print(
        f"burst: {r['events']:,} events ({len(a)} alarms/tamper) made in {r['burst_s']:.2f} s, "
        f"{r['distinct_seqs']:,} distinct seqs at the portal; uplink window {args.window}, batch {args.batch}"
    )
    print(
        f"to the portal's store: alarms p50 {pct(a, 50):.0f} ms, p99 {pct(a, 99):.0f} ms; "
        f"routine p50 {pct(n, 50):.0f} ms, p99 {pct(n, 99):.0f} ms"
    )
    print(f"alarm incidents on the console socket: {len(c)}, p50 {pct(c, 50):.0f} ms, p99 {pct(c, 99):.0f} ms")
    print(f"alarms overtook (median) {statistics.median(r['jump']) * 100:.0f}% of the routine events made before them")
    print(
        f"gateway RSS {r['baseline_mb']:.1f} MB before, {r['peak_mb']:.1f} MB at peak "
        f"(+{r['peak_mb'] - r['baseline_mb']:.1f} MB)"
    )
    print(
        f"portal during the burst: GET /console p50 {pct(hc, 50):.0f} ms, max {max(hc):.0f} ms ({len(hc)} requests); "
        f"GET /api/health p50 {pct(hh, 50):.0f} ms, max {max(hh):.0f} ms"
    )
    print(
        json.dumps(
            {
                "events": r["events"],
                "alarms": len(a),
                "burst_s": round(r["burst_s"], 2),
                "window": args.window,
                "alarm_p50_ms": round(pct(a, 50), 1),
                "alarm_p99_ms": round(pct(a, 99), 1),
                "routine_p50_ms": round(pct(n, 50), 1),
                "routine_p99_ms": round(pct(n, 99), 1),
                "console_incident_p50_ms": round(pct(c, 50), 1),
                "console_incident_p99_ms": round(pct(c, 99), 1),
                "incidents_on_console": len(c),
                "alarm_overtook_median": round(statistics.median(r["jump"]), 3),
                "gateway_rss_mb_before": round(r["baseline_mb"], 1),
                "gateway_rss_mb_peak": round(r["peak_mb"], 1),
                "console_get_p50_ms": round(pct(hc, 50), 1),
                "console_get_max_ms": round(max(hc), 1),
                "health_get_p50_ms": round(pct(hh, 50), 1),
                "health_get_max_ms": round(max(hh), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
