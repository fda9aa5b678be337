"""Unlock latency benchmark: from a scanned pass written to the QR reader's pseudo-terminal to the lock relay
set at the door controller.

Processes: the QR reader stub (a pseudo-terminal), the door-controller stub (Modbus TCP, 32 controllers on one
endpoint) and ``gatehouse gateway run``. Each scan is a fresh resident pass signed here with a key made for
the run (the gateway holds only the public key). The reader stub stamps each line just before writing it,
the controller stub stamps each relay switch (both CLOCK_MONOTONIC, one clock on this machine); scan *i*
is matched with the *i*-th unlock pulse and every scan must have opened the door.

Two runs: the door controller on a bus that also polls 31 other controllers every 100 ms ("loaded"), and
the door controller alone on its bus, polled every 100 ms as usual ("idle"). No broker runs: nothing on
the door path touches MQTT. Each unlock is read back by the gateway before it counts (access.granted): the
number confirmed and not confirmed is given too. The last line of output is one JSON object.

Usage: python bench/unlock_latency.py [--scans 500] [--interval-ms 30] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.children import pct, start, stop  # noqa: E402
from gateway.tooling.broker import free_port  # noqa: E402
from gateway.wire.passes import PassFields, generate_keypair, save_public_key, sign_pass  # noqa: E402

PY = sys.executable
SITE, GW, DOOR = "bench", "gw-bench", "b1-u1"
OTHERS = 31
POLL_MS = 100
UNLOCK_MS = 500  # the shortest a door takes (config): each unlock is read back while its pulse runs
WARMUP = 20


def gateway_yaml(modbus: str, serial: str, others: int) -> str:
    host, port = modbus.split("//", 1)[1].rsplit(":", 1)
    devices = [f"  - {{name: door-ctl, profile: door-controller, bus: rs, unit: 1, poll_ms: {POLL_MS}}}"]
    devices += [
        f"  - {{name: ctl-{u}, profile: door-controller, bus: rs, unit: {u}, poll_ms: {POLL_MS}}}"
        for u in range(2, 2 + others)
    ]
    nl = "\n"
    return f"""
site: {SITE}
gateway: {GW}
data_dir: data
mqtt: {{host: 127.0.0.1, port: {free_port()}, reconnect_min_s: 1.0, reconnect_max_s: 30.0}}
local_api: {{enabled: false}}
log_level: WARNING
buses:
  - {{name: rs, kind: modbus-tcp, host: {host}, port: {port}, timeout_ms: 300}}
devices:
{nl.join(devices)}
doors:
  - {{name: {DOOR}, device: door-ctl, relay: lock_relay, contact: door_open, exit_button: exit_button,
      lock_feedback: lock_released, tamper: tamper, place: {{building: "1", unit: "1"}}, unlock_ms: {UNLOCK_MS}}}
readers:
  - {{name: qr-1, serial: {serial}, door: {DOOR}, heartbeat_s: 1.0, repeat_ignore_ms: 0}}
access:
  public_keys: [pass.pub]
  burst_count: 1000
"""


def count(db: Path, etype: str) -> int:
    """Events of ``etype`` in the gateway's store (0 while it does not exist yet)."""
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM events WHERE type = ?", (etype,)).fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


async def get(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url) as r:
        body: dict[str, Any] = await r.json()
        return body


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, json=body) as r:
        out: dict[str, Any] = await r.json()
        if r.status != 200:
            raise SystemExit(f"{url}: {r.status} {out}")
        return out


async def run(
    name: str, tmp: Path, others: int, scans: int, interval_ms: int, private: Any, http: aiohttp.ClientSession
) -> dict[str, Any]:
    folder = tmp / name
    folder.mkdir()
    logs = folder / "logs"
    logs.mkdir()
    save_public_key(folder / "pass.pub", private.public_key())
    door, dinfo = await start(
        "door stub",
        [PY, "-m", "firmware_stubs.door_controller", "--tcp", "127.0.0.1:0", "--units", f"1-{1 + others}"],
        logs / "door.log",
    )
    reader, rinfo = await start("reader stub", [PY, "-m", "firmware_stubs.qr_reader", "--pty"], logs / "reader.log")
    gateway = None
    try:
        (folder / "gateway.yaml").write_text(gateway_yaml(dinfo["modbus"], rinfo["serial"], others), encoding="utf-8")
        gateway, _ = await start(
            "gateway",
            [PY, "-m", "gateway.cli", "gateway", "run", "--config", str(folder / "gateway.yaml")],
            logs / "gateway.log",
        )
        deadline = time.monotonic() + 30
        while not (
            count(folder / "data" / "gateway.db", "door.state")
            and (await get(http, rinfo["control"] + "/state"))["readers"][0]["polls"]
        ):
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: the gateway did not come up; see {logs}")
            await asyncio.sleep(0.1)

        now = int(time.time())
        texts = [
            sign_pass(
                private,
                PassFields(
                    kind="resident", site=SITE, subject=f"P{i}", units=("1/1",), not_before=now, not_after=now + 600
                ),
            )
            for i in range(WARMUP + scans)
        ]
        await post(http, rinfo["control"] + "/scans", {"texts": texts[:WARMUP], "interval_ms": interval_ms})
        await asyncio.sleep(0.5)
        await post(http, dinfo["control"] + "/reset", {})
        t0 = time.monotonic()
        written = (
            await post(http, rinfo["control"] + "/scans", {"texts": texts[WARMUP:], "interval_ms": interval_ms})
        )["written"]
        pulses: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while len(pulses) < scans and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            st = (await get(http, dinfo["control"] + "/state"))["panels"][0]
            pulses = [h for h in st["units"]["1"]["relay_history"] if h["on"] and h["via"] == "pulse"]
        elapsed = time.monotonic() - t0
        requests = int(st["requests"]["total"])
        if len(pulses) != scans:
            raise SystemExit(f"{name}: {scans} scans but {len(pulses)} unlock pulses; see {logs}")
        lat = [(p["mono"] - w) * 1000 for p, w in zip(pulses, written, strict=True)]
        if min(lat) <= 0:
            raise SystemExit(f"{name}: a pulse before its scan: the scans and pulses do not pair up")
        # Every unlock is read back; one not confirmed is an access.granted short (and a door.unlock_failed).
        db = folder / "data" / "gateway.db"
        await asyncio.sleep(1.0)
        granted, failed = count(db, "access.granted"), count(db, "door.unlock_failed")
        return {
            "devices_on_bus": 1 + others,
            "scans": scans,
            "p50_ms": round(pct(lat, 50), 2),
            "p99_ms": round(pct(lat, 99), 2),
            "max_ms": round(max(lat), 2),
            "mean_ms": round(sum(lat) / len(lat), 2),
            "bus_requests_per_s": round(requests / elapsed),
            "unlocks_confirmed": granted,
            "unlocks_not_confirmed": failed,
        }
    finally:
        for p in (gateway, reader, door):
            if p is not None:
                await stop(p)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=500)
    ap.add_argument("--interval-ms", type=int, default=30, help="time between scans (default 30)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) and print its path")
    args = ap.parse_args()
    if args.scans < 1:
        raise SystemExit("--scans must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="gatehouse-unlock-"))
    private, _ = generate_keypair()
    began = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
            loaded = await run("loaded", tmp, OTHERS, args.scans, args.interval_ms, private, http)
            print(
                f"loaded ({loaded['devices_on_bus']} devices polled every {POLL_MS} ms, "
                f"{loaded['bus_requests_per_s']} requests/s): p50 {loaded['p50_ms']} ms, p99 {loaded['p99_ms']} ms, "
                f"max {loaded['max_ms']} ms over {loaded['scans']} scans; {loaded['unlocks_confirmed']} unlocks "
                f"confirmed by read-back, {loaded['unlocks_not_confirmed']} not",
                flush=True,
            )
            idle = await run("idle", tmp, 0, args.scans, args.interval_ms, private, http)
            print(
                f"idle (the door controller alone, {idle['bus_requests_per_s']} requests/s): "
                f"p50 {idle['p50_ms']} ms, p99 {idle['p99_ms']} ms, max {idle['max_ms']} ms "
                f"over {idle['scans']} scans; {idle['unlocks_confirmed']} unlocks confirmed by read-back, "
                f"{idle['unlocks_not_confirmed']} not",
                flush=True,
            )
    finally:
        if args.keep:
            print(f"logs kept in {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "unlock_latency",
                "scans": args.scans,
                "interval_ms": args.interval_ms,
                "unlock_ms": UNLOCK_MS,
                "loaded": loaded,
                "idle": idle,
                "seconds": round(time.monotonic() - began, 1),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
