"""Alarm latency benchmark: 50 perimeter panels × 16 inputs on Modbus TCP, polled every 100 ms.

Measures, in one run against the same panel stubs and the same Mosquitto:

* Gatehouse: time from flipping an input at the stub (the stub's own monotonic stamp) to the alarm
  arriving on a signed-in console's WebSocket (gateway process → broker → portal process → browser
  socket), p50/p95/p99 over the flips; polls per second (counted at the stubs); the gateway's CPU per
  poll and resident memory.
* The naive baseline: one plain pymodbus client loop per panel polling the same inputs every 100 ms and
  publishing each change with paho (QoS 1), with an MQTT subscriber timing the changes; its CPU per
  poll and memory. The ratios are printed.

Usage: python bench/alarm_latency.py [--flips 500] [--panels 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import psutil
from ulid import ULID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.children import pct, start, stop  # noqa: E402
from gateway import wire  # noqa: E402
from gateway.broker import MosquittoProcess  # noqa: E402

PY = sys.executable
ZONES = 16
POLL_MS = 100
SETTLE_S = 3.0
WINDOW_S = 6.0  # CPU and poll-rate measurement window, with no flips going on








async def stub_requests(http: aiohttp.ClientSession, control: str) -> int:
    """Total Modbus requests the stub has served, over all its panels."""
    async with http.get(control + "/state") as r:
        state = await r.json()
    return sum(int(p["requests"]["total"]) for p in state["panels"])


async def measure_window(http: aiohttp.ClientSession, control: str, proc: psutil.Process) -> dict[str, float]:
    r0, c0 = await stub_requests(http, control), proc.cpu_times()
    await asyncio.sleep(WINDOW_S)
    r1, c1 = await stub_requests(http, control), proc.cpu_times()
    polls = (r1 - r0) / WINDOW_S
    cpu = (c1.user + c1.system) - (c0.user + c0.system)
    return {"polls_per_s": polls, "cpu_pct": 100 * cpu / WINDOW_S, "cpu_us_per_poll": 1e6 * cpu / max(1, r1 - r0),
            "rss_mb": proc.memory_info().rss / 2**20}


async def flip_all(http: aiohttp.ClientSession, control: str, flips: int, panels: int,
                   arrived: dict[str, float], key_of: Any, rate: float = 40.0) -> list[float]:
    """Trip ``flips`` distinct zones at ``rate``/s; return the latencies (ms) of those that arrived."""
    sent: dict[str, float] = {}
    for i in range(flips):
        panel, zone = i % panels, i // panels + 1
        async with http.post(f"{control}/zones/{zone}/trip", json={"panel": panel}) as r:
            body = await r.json()
        sent[key_of(panel, zone)] = float(body.get("mono", time.monotonic()))
        await asyncio.sleep(1 / rate)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(k in arrived for k in sent):
        await asyncio.sleep(0.1)
    for i in range(flips):  # put the inputs back for the next run
        panel, zone = i % panels, i // panels + 1
        async with http.post(f"{control}/zones/{zone}/restore", json={"panel": panel}):
            pass
    return [(arrived[k] - t) * 1000 for k, t in sent.items() if k in arrived]


def gateway_yaml(endpoints: list[str], broker_port: int) -> str:
    lines = ["site: bench", "gateway: gw1", "data_dir: data", "log_level: WARNING",
             f"mqtt: {{host: 127.0.0.1, port: {broker_port}}}", "zone_groups: [{name: fence}]", "buses:"]
    for i, ep in enumerate(endpoints):
        host, port = ep.split("//", 1)[1].rsplit(":", 1)
        lines.append(f"  - {{name: b{i}, kind: modbus-tcp, host: {host}, port: {port}, timeout_ms: 300}}")
    lines.append("devices:")
    lines += [f"  - {{name: p{i}, profile: perimeter-panel-16, bus: b{i}, unit: 1, poll_ms: {POLL_MS}}}"
              for i in range(len(endpoints))]
    lines.append("zones:")
    lines += [f"  - {{name: p{i}-z{z}, device: p{i}, point: zone{z}_alarm, group: fence, restore_ms: 0}}"
              for i in range(len(endpoints)) for z in range(1, ZONES + 1)]
    return "\n".join(lines) + "\n"


async def run_gatehouse(tmp: Path, broker: MosquittoProcess, stub: dict[str, Any], http: aiohttp.ClientSession,
                        flips: int, panels: int) -> dict[str, Any]:
    (tmp / "gw").mkdir(parents=True)
    (tmp / "portal").mkdir(parents=True)
    (tmp / "gw" / "gateway.yaml").write_text(gateway_yaml(stub["endpoints"], broker.port))
    (tmp / "portal" / "portal.yaml").write_text(
        f"data_dir: data\nlog_level: WARNING\nlisten: {{host: 127.0.0.1, port: 0}}\n"
        f"mqtt: {{host: 127.0.0.1, port: {broker.port}}}\ngateways: [{{site: bench, gateway: gw1}}]\n")
    pw = tmp / "guard.pass"
    pw.write_text("bench-guard-password")
    pw.chmod(0o600)
    add = await asyncio.create_subprocess_exec(PY, "-m", "portal", "adduser", "--config",
                                               str(tmp / "portal" / "portal.yaml"), "--user", "guard", "--role",
                                               "guard", "--password-file", str(pw), stdout=asyncio.subprocess.DEVNULL)
    await add.wait()
    portal, pinfo = await start("portal", [PY, "-m", "portal", "run", "--config", str(tmp / "portal" / "portal.yaml")],
                                tmp / "portal.log")
    gateway, _ = await start("gateway", [PY, "-m", "gateway.cli", "gateway", "run", "--config",
                                         str(tmp / "gw" / "gateway.yaml")], tmp / "gateway.log")
    url = pinfo["url"]
    arrived: dict[str, float] = {}
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as guard:
            page = await (await guard.get(url + "login")).text()
            csrf = re.search(r'name="csrf" value="([^"]+)"', page)
            assert csrf, "no sign-in form"
            r = await guard.post(url + "login", data={"user": "guard", "password": "bench-guard-password",
                                                      "csrf": csrf.group(1)}, headers={"Origin": url.rstrip("/")})
            assert r.status == 200, f"guard sign-in failed: {r.status}"
            async with guard.ws_connect(url + "ws", headers={"Origin": url.rstrip("/")}) as ws:

                async def listen() -> None:
                    async for msg in ws:
                        now = time.monotonic()
                        m = json.loads(msg.data)
                        ev = m.get("event") if isinstance(m, dict) else None
                        if isinstance(ev, dict) and ev.get("type") == "zone.alarm":
                            arrived.setdefault(ev["source"], now)  # the console shows "device / point"

                listener = asyncio.create_task(listen())
                now = wire.utcnow()
                cmd = wire.Command(v=1, id=str(ULID()), type="arm", ts=now, expires=now.replace(year=now.year + 1),
                                   by="bench", args={"group": "fence"})
                async with aiomqtt.Client("127.0.0.1", broker.port) as c:
                    await asyncio.sleep(SETTLE_S)  # first polls, subscriptions
                    await c.publish(wire.topic("bench", "gw1", "cmd"), wire.encode(cmd), qos=1)
                await asyncio.sleep(1)
                window = await measure_window(http, stub["control"], psutil.Process(gateway.pid))
                lat = await flip_all(http, stub["control"], flips, panels, arrived,
                                     lambda p, z: f"p{p} / zone{z}_alarm")
                listener.cancel()
    finally:
        await stop(gateway)
        await stop(portal)
    return {**window, "latencies": lat}


NAIVE = r'''
import asyncio, sys, json, paho.mqtt.client as mqtt
from pymodbus.client import AsyncModbusTcpClient
endpoints, port, n = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="naive"); c.connect("127.0.0.1", port); c.loop_start()
async def poll(i, ep):
    host, p = ep.split("//", 1)[1].rsplit(":", 1)
    cl = AsyncModbusTcpClient(host, port=int(p)); await cl.connect()
    last = None
    while True:
        rr = await cl.read_discrete_inputs(0, count=n, device_id=1)
        bits = list(rr.bits[:n])
        if last is not None:
            for z, (a, b) in enumerate(zip(last, bits), 1):
                if a != b: c.publish(f"naive/p{i}/z{z}", b"1" if b else b"0", qos=1)
        last = bits
        await asyncio.sleep(0.1)
async def main():
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.gather(*(poll(i, ep) for i, ep in enumerate(endpoints)))
asyncio.run(main())
'''


async def run_naive(tmp: Path, broker: MosquittoProcess, stub: dict[str, Any], http: aiohttp.ClientSession,
                    flips: int, panels: int) -> dict[str, Any]:
    tmp.mkdir(parents=True)
    script = tmp / "naive.py"
    script.write_text(NAIVE)
    proc, _ = await start("naive", [PY, str(script), json.dumps(stub["endpoints"]), str(broker.port), str(ZONES)],
                          tmp / "naive.log")
    arrived: dict[str, float] = {}
    try:
        async with aiomqtt.Client("127.0.0.1", broker.port) as sub:
            await sub.subscribe("naive/#", qos=1)

            async def listen() -> None:
                async for msg in sub.messages:
                    if msg.payload == b"1":
                        arrived.setdefault(str(msg.topic), time.monotonic())

            listener = asyncio.create_task(listen())
            await asyncio.sleep(SETTLE_S)
            window = await measure_window(http, stub["control"], psutil.Process(proc.pid))
            lat = await flip_all(http, stub["control"], flips, panels, arrived, lambda p, z: f"naive/p{p}/z{z}")
            listener.cancel()
    finally:
        await stop(proc)
    return {**window, "latencies": lat}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flips", type=int, default=500)
    ap.add_argument("--panels", type=int, default=50)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) and print its path")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gatehouse-bench-"))
    try:
        broker = MosquittoProcess(tmp / "broker").start()
        stub, info = await start("stub", [PY, "-m", "firmware_stubs.perimeter_panel", "--tcp", "127.0.0.1:0",
                                          "--count", str(args.panels), "--zones", str(ZONES), "--control",
                                          "127.0.0.1:0"], tmp / "stub.log")
        try:
            async with aiohttp.ClientSession() as http:
                gh = await run_gatehouse(tmp / "gatehouse", broker, info, http, args.flips, args.panels)
                await asyncio.sleep(1)
                nv = await run_naive(tmp / "naive", broker, info, http, args.flips, args.panels)
        finally:
            await stop(stub)
            broker.stop()
    finally:
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    g, n = gh["latencies"], nv["latencies"]
    if not g or not n:
        raise SystemExit(f"nothing arrived (Gatehouse {len(g)}, naive {len(n)}); run with --keep to see the logs")
    print(f"Gatehouse: {len(g)}/{args.flips} alarms on the console WebSocket: p50 {pct(g, 50):.0f} ms, "
          f"p95 {pct(g, 95):.0f} ms, p99 {pct(g, 99):.0f} ms; {gh['polls_per_s']:.0f} polls/s, "
          f"CPU {gh['cpu_pct']:.1f}% ({gh['cpu_us_per_poll']:.0f} µs/poll), RSS {gh['rss_mb']:.1f} MB")
    print(f"naive loop: {len(n)}/{args.flips} changes at an MQTT subscriber: p50 {pct(n, 50):.0f} ms, "
          f"p99 {pct(n, 99):.0f} ms; {nv['polls_per_s']:.0f} polls/s, CPU {nv['cpu_pct']:.1f}% "
          f"({nv['cpu_us_per_poll']:.0f} µs/poll), RSS {nv['rss_mb']:.1f} MB")
    ratio = gh["cpu_us_per_poll"] / nv["cpu_us_per_poll"]
    print(f"CPU per poll, Gatehouse / naive: {ratio:.2f}")
    print(json.dumps({
        "flips": args.flips, "alarms_delivered": len(g),
        "p50_ms": round(pct(g, 50), 1), "p95_ms": round(pct(g, 95), 1), "p99_ms": round(pct(g, 99), 1),
        "mean_ms": round(statistics.fmean(g), 1),
        "polls_per_s": round(gh["polls_per_s"]), "gateway_cpu_pct": round(gh["cpu_pct"], 1),
        "gateway_cpu_us_per_poll": round(gh["cpu_us_per_poll"], 1), "gateway_rss_mb": round(gh["rss_mb"], 1),
        "naive_p50_ms": round(pct(n, 50), 1), "naive_p99_ms": round(pct(n, 99), 1),
        "naive_polls_per_s": round(nv["polls_per_s"]), "naive_cpu_us_per_poll": round(nv["cpu_us_per_poll"], 1),
        "naive_rss_mb": round(nv["rss_mb"], 1), "cpu_per_poll_ratio_to_naive": round(ratio, 2),
    }))


if __name__ == "__main__":
    asyncio.run(main())
