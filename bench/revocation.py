"""Revocation benchmark: from a guard's "revoke" in the console to the gateway holding the new signed list (and
refusing the pass), and what signed commands cost a gateway.

1. End to end. Processes: Mosquitto, ``python -m portal run``, ``gatehouse gateway run`` with a door-controller
   stub (Modbus TCP) and a QR reader stub (a pseudo-terminal). For each round a visitor is registered at the
   guardroom (``POST /visitors``), the pass is scanned (granted), the guard revokes it (``POST /revocations``), and
   the time is taken from just before that request to the gateway's ``command.result`` confirming the new list
   version (the gateway's event time and this process's clock are the same clock: one machine). The pass is then
   scanned again and must be refused as revoked. No sleeps between rounds beyond waiting for the confirmation.
2. Per command, in this process: verifying a signed command (``open_command``: Ed25519 and the strict decode) against
   decoding the same command unsigned (``decode_command_body``, what a gateway did before commands were signed).

Final figures should be taken on a quiet machine. The last line of output is one JSON object.

Usage: python bench/revocation.py [--rounds 20] [--commands 3000] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.children import pct, start, stop  # noqa: E402
from gateway import wire  # noqa: E402
from gateway.tooling.broker import MosquittoProcess  # noqa: E402
from gateway.wire.commands import open_command, sign_command  # noqa: E402
from gateway.wire.passes import generate_keypair, keyring  # noqa: E402

PY = sys.executable
SITE, GW, DOOR = "s1", "gw1", "b3-u2"
ADMIN, ADMIN_PW = "office", "bench-office-password-1"
CSV = (
    "site,site_name,building,unit,house,name,phone,role,move_in,move_out,lease_end\n"
    "s1,阳光花园,3,2,301,张伟,13812345678,owner,2020-05-01,,\n"
)


def gateway_yaml(broker_port: int, modbus: str, serial: str, key: Path) -> str:
    host, port = modbus.split("//", 1)[1].rsplit(":", 1)
    return f"""
site: {SITE}
gateway: {GW}
data_dir: data
log_level: WARNING
mqtt: {{host: 127.0.0.1, port: {broker_port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}
local_api: {{enabled: false}}
buses:
  - {{name: doors, kind: modbus-tcp, host: {host}, port: {port}, timeout_ms: 300}}
devices:
  - {{name: ctl, profile: door-controller, bus: doors, unit: 1, poll_ms: 100}}
doors:
  - {{name: {DOOR}, device: ctl, relay: lock_relay, contact: door_open, place: {{building: "3", unit: "2"}},
      unlock_ms: 200, held_open_s: 60}}
readers:
  - {{name: qr, serial: {serial}, door: {DOOR}, heartbeat_s: 0.5, repeat_ignore_ms: 0}}
access:
  public_keys: [{key}]
"""


def events(db: Path, *types: str) -> list[dict[str, Any]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT body FROM events ORDER BY seq").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()
    out = [json.loads(r[0]) for r in rows]
    return [e for e in out if e["type"] in types]


async def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    if m is None:
        raise SystemExit("no CSRF token on the page")
    return m.group(1)


async def scan(http: aiohttp.ClientSession, reader: str, db: Path, text: str) -> dict[str, Any]:
    before = len(events(db, "access.granted", "access.denied"))
    async with http.post(reader + "/scan", json={"text": text}) as r:
        assert r.status == 200, await r.text()
    new = await until(lambda: events(db, "access.granted", "access.denied")[before:], 15, "a decision")
    return {"granted": new[0]["type"] == "access.granted", **new[0]["data"]}


async def end_to_end(tmp: Path, rounds: int) -> dict[str, Any]:
    logs = tmp / "logs"
    logs.mkdir()
    broker = MosquittoProcess(tmp / "broker").start()
    procs: list[asyncio.subprocess.Process] = []
    try:
        (tmp / "portal").mkdir()
        (tmp / "portal" / "portal.yaml").write_text(
            f"data_dir: data\nlog_level: WARNING\nlisten: {{host: 127.0.0.1, port: 0}}\nsite_name: 阳光花园\n"
            f"mqtt: {{host: 127.0.0.1, port: {broker.port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}\n"
            f"gateways: [{{site: {SITE}, gateway: {GW}}}]\n",
            encoding="utf-8",
        )
        pw = tmp / "admin.pass"
        pw.write_text(ADMIN_PW)
        pw.chmod(0o600)
        cfg = str(tmp / "portal" / "portal.yaml")
        add = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "portal",
            "adduser",
            "--config",
            cfg,
            "--user",
            ADMIN,
            "--role",
            "admin",
            "--password-file",
            str(pw),
            stdout=asyncio.subprocess.DEVNULL,
        )
        await add.wait()
        portal, pinfo = await start("portal", [PY, "-m", "portal", "run", "--config", cfg], logs / "portal.log")
        procs.append(portal)
        key = (tmp / "portal" / "data" / "pass_signing_key.pub.pem").resolve()
        door, dinfo = await start(
            "door stub", [PY, "-m", "firmware_stubs.door_controller", "--tcp", "127.0.0.1:0"], logs / "door.log"
        )
        procs.append(door)
        reader, rinfo = await start("reader stub", [PY, "-m", "firmware_stubs.qr_reader", "--pty"], logs / "reader.log")
        procs.append(reader)
        (tmp / "gw").mkdir()
        (tmp / "gw" / "gateway.yaml").write_text(
            gateway_yaml(broker.port, dinfo["modbus"], rinfo["serial"], key), encoding="utf-8"
        )
        gateway, _ = await start(
            "gateway",
            [PY, "-m", "gateway.cli", "gateway", "run", "--config", str(tmp / "gw" / "gateway.yaml")],
            logs / "gateway.log",
        )
        procs.append(gateway)
        db = tmp / "gw" / "data" / "gateway.db"
        url = pinfo["url"].rstrip("/")
        origin = {"Origin": url}
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=60)) as http:
            page = await (await http.get(url + "/login")).text()
            r = await http.post(
                url + "/login", data={"user": ADMIN, "password": ADMIN_PW, "csrf": csrf_of(page)}, headers=origin
            )
            if not str(r.url).endswith("/console"):
                raise SystemExit(f"could not sign in ({r.status})")
            csrf = csrf_of(await r.text())
            r = await http.post(
                url + "/api/registry/import",
                data=CSV.encode(),
                headers={**origin, "X-CSRF-Token": csrf, "Content-Type": "text/csv"},
            )
            assert r.status == 200, await r.text()
            r = await http.post(
                url + "/admin/registry/doors",
                data={
                    "gateway_ref": f"{SITE}/{GW}",
                    "door": DOOR,
                    "building": "3",
                    "unit": "2",
                    "label": "3幢2单元",
                    "csrf": csrf,
                },
                headers=origin,
            )
            assert r.status == 200, await r.text()

            def confirmed(version: int) -> list[dict[str, Any]]:
                return [
                    e
                    for e in events(db, "command.result")
                    if e["data"].get("command") == "credentials.sync"
                    and e["data"]["ok"]
                    and int(e["data"].get("version", 0)) >= version
                ]

            await until(lambda: confirmed(1), 30, "the gateway's first revocation list")
            version = max(int(e["data"]["version"]) for e in confirmed(1))
            lat: list[float] = []
            for i in range(rounds):
                r = await http.post(
                    url + "/visitors",
                    data={
                        "name": f"访客{i}",
                        "house": "3-2-301",
                        "hours": "4",
                        "uses": "5",
                        "start": "",
                        "note": "",
                        "csrf": csrf,
                    },
                    headers=origin,
                    allow_redirects=False,
                )
                assert r.status == 303, await r.text()
                vid = int(r.headers["Location"].rsplit("/", 1)[1])
                text = (await (await http.get(f"{url}/api/visitors/{vid}")).json())["visitor"]["pass_text"]
                if not (await scan(http, rinfo["control"], db, text))["granted"]:
                    raise SystemExit(f"round {i}: the fresh visitor pass was refused")
                t0 = time.time()
                r = await http.post(
                    url + "/revocations",
                    data={"action": "revoke", "target": f"visitor:{vid}", "reason": "bench", "q": "", "csrf": csrf},
                    headers=origin,
                    allow_redirects=False,
                )
                assert r.status == 303, await r.text()
                got = await until(lambda v=version: confirmed(v + 1), 30, f"round {i}: the new list confirmed")
                version = max(int(e["data"]["version"]) for e in got)
                at = min(datetime.fromisoformat(e["ts"]).timestamp() for e in got)
                lat.append((at - t0) * 1000)
                d = await scan(http, rinfo["control"], db, text)
                if d["granted"] or d["reason"] != "revoked":
                    raise SystemExit(f"round {i}: the revoked pass was not refused as revoked: {d}")
        return {
            "rounds": rounds,
            "p50_ms": round(pct(lat, 50), 1),
            "p95_ms": round(pct(lat, 95), 1),
            "max_ms": round(max(lat), 1),
        }
    finally:
        for p in reversed(procs):
            await stop(p)
        broker.stop()


def per_command(n: int) -> dict[str, Any]:
    private, public = generate_keypair()
    ring = keyring([public])
    now = datetime.now().astimezone()
    cmds = [
        wire.Command(
            v=wire.COMMAND_VERSION,
            id=f"c{i}",
            type="unlock",
            ts=now,
            expires=now + timedelta(seconds=30),
            by="guard:bench",
            args={"door": DOOR, "reason": "bench"},
        )
        for i in range(n)
    ]
    signed = [sign_command(private, c, site=SITE, gateway=GW) for c in cmds]
    bodies = [wire.encode(c) for c in cmds]
    t = time.perf_counter()
    for p in signed:
        open_command(p, ring, site=SITE, gateway=GW)
    verify_us = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for b in bodies:
        wire.decode_command_body(b)
    plain_us = (time.perf_counter() - t) / n * 1e6
    return {
        "commands": n,
        "signed_verify_us": round(verify_us, 1),
        "unsigned_decode_us": round(plain_us, 1),
        "signed_payload_bytes": len(signed[0]),
        "unsigned_payload_bytes": len(bodies[0]),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--commands", type=int, default=3000)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) and print its path")
    args = ap.parse_args()
    if args.rounds < 1 or args.commands < 1:
        raise SystemExit("--rounds and --commands must be at least 1")
    began = time.monotonic()
    cost = per_command(args.commands)
    print(
        f"per command: verifying a signed command {cost['signed_verify_us']} us, decoding it unsigned "
        f"{cost['unsigned_decode_us']} us ({cost['signed_payload_bytes']} vs {cost['unsigned_payload_bytes']} bytes)",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="gatehouse-revocation-"))
    try:
        e2e = await end_to_end(tmp, args.rounds)
        print(
            f"revoke in the console → gateway holds the new list: p50 {e2e['p50_ms']} ms, p95 {e2e['p95_ms']} ms, "
            f"max {e2e['max_ms']} ms over {e2e['rounds']} rounds (every revoked pass then refused)",
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
                "bench": "revocation",
                "revoke_to_gateway_ms": e2e,
                "per_command": cost,
                "seconds": round(time.monotonic() - began, 1),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
