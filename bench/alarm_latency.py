"""Alarm latency and the CPU a user pays per input poll: perimeter panels × 16 inputs polled every 100 ms.

Two layouts, each measured in the same run, against the same kind of stub and the same Mosquitto:

* ``one-bus``: 50 panels as unit ids 1-50 behind one Modbus TCP endpoint (one connection: an RS-485 line
  behind a serial server);
* ``per-endpoint``: 50 panels on 50 endpoints (a connection each).

On each layout, one after the other (and interleaved over ``--runs``):

* Gatehouse: the real gateway process, every input a perimeter zone, armed; its events go to a bare MQTT
  subscriber that acknowledges them on the ack topic as the portal does (so the outbox drains and nothing
  is re-sent);
* the naive baseline: pymodbus + paho as anyone would write it, one client per connection reading the 16
  inputs of each unit in turn every 100 ms and publishing each change at QoS 1.

What is counted:

* input polls: the stub's count of FC02 (discrete inputs) requests. Status, output and level reads are not
  polls; what they cost is in the CPU all the same;
* CPU per input poll: the process's user + system CPU over the window in which the flips happen, divided by
  the input polls in that window; resident memory at the end of that window;
* latency: from the stub's monotonic stamp of a flip to the change at the MQTT subscriber (the same clock),
  p50 / p99 / max.

``--stall-s S`` makes every commit of the gateway's store stall S seconds (``GATEHOUSE_STORE_STALL``: a sleep
in the writer thread inside the transaction, as an SD card's fsync can take). ``--scale 10,50,200`` adds
Gatehouse on one bus with that many panels at the same total input rate (500 polls/s), CPU per input poll and
per request at each size. Numbers mean something only on a quiet machine.

``--loops asyncio,uvloop`` runs Gatehouse once on each event loop (``GATEHOUSE_EVENT_LOOP``), in the same run, against
the same naive baseline.

``--in-flight N`` sets the gateway's buses' ``max_in_flight`` (Modbus TCP pipelining: the polls due together go
out in one write; the default, 1, is the configuration's default, one request at a time). The naive loop never
pipelines.

Usage: python bench/alarm_latency.py [--runs 1] [--window 8] [--flips 30] [--panels 50] [--stall-s 0]
                                     [--layouts one-bus,per-endpoint] [--scale 10,50,200] [--floor] [--in-flight 1]
                                     [--loops asyncio,uvloop]

The default (one 8 s window per system and layout, 30 flips: the reference rate of 200 a minute) runs in under a
minute; ``--runs 3 --window 60 --flips 200`` is the reference protocol (three interleaved runs of a minute).
``--floor`` adds the cheapest poll of Gatehouse's shape on this machine, on each layout: a bare asyncio
request/response loop driven by callbacks (one timer for every connection, each answer sending the next request; no
task, no library, no decoding, nothing done with the answers), the CPU per request that only fewer system calls could
go under; and what that would be per input poll at Gatehouse's own mix of requests, against the naive loop. (On one
bus, Gatehouse runs its poll loop in a thread on a blocking socket, under this floor.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
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
from gateway.daemon import DEFAULT_LOOP, LOOP_ENV  # noqa: E402
from gateway.store import STALL_ENV  # noqa: E402
from gateway.tooling.broker import MosquittoProcess  # noqa: E402
from gateway.wire.commands import sign_command  # noqa: E402
from gateway.wire.passes import generate_keypair, save_public_key  # noqa: E402

PY = sys.executable
ZONES = 16
POLL_MS = 100
SETTLE_S = 2.5  # first polls, the arm command, subscriptions
LATE_S = 3.0  # how long after the window a change may still arrive
LAYOUTS = ("one-bus", "per-endpoint")


@dataclass
class Result:
    """One system on one layout, summed over runs."""

    cpu_s: float = 0.0
    input_polls: int = 0
    requests: int = 0
    window_s: float = 0.0
    rss_mb: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    flips: int = 0

    def add(self, other: Result) -> None:
        self.cpu_s += other.cpu_s
        self.input_polls += other.input_polls
        self.requests += other.requests
        self.window_s += other.window_s
        self.rss_mb += other.rss_mb
        self.latencies_ms += other.latencies_ms
        self.flips += other.flips

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "input_polls_per_s": round(self.input_polls / self.window_s) if self.window_s else 0,
            "requests_per_s": round(self.requests / self.window_s) if self.window_s else 0,
            "cpu_pct": round(100 * self.cpu_s / self.window_s, 1) if self.window_s else 0,
            "cpu_ms_per_input_poll": round(1000 * self.cpu_s / max(1, self.input_polls), 4),
            "cpu_ms_per_request": round(1000 * self.cpu_s / max(1, self.requests), 4),
            "rss_mb": round(max(self.rss_mb), 1) if self.rss_mb else 0,
            "flips": self.flips,
            "changes_seen": len(lat),
            "latency_p50_ms": round(pct(lat, 50), 1) if lat else None,
            "latency_p99_ms": round(pct(lat, 99), 1) if lat else None,
            "latency_max_ms": round(max(lat), 1) if lat else None,
            "latency_mean_ms": round(statistics.fmean(lat), 1) if lat else None,
        }


@dataclass
class Layout:
    """Where the panels are: ``panels[i]`` is (endpoint index, unit id) of panel i."""

    name: str
    endpoints: list[str]
    panels: list[tuple[int, int]]
    control: str

    def buses(self) -> list[tuple[str, list[tuple[int, int]]]]:
        """(endpoint url, [(panel index, unit)]) for each connection."""
        out: dict[int, list[tuple[int, int]]] = {}
        for i, (ep, unit) in enumerate(self.panels):
            out.setdefault(ep, []).append((i, unit))
        return [(self.endpoints[ep], members) for ep, members in sorted(out.items())]


async def stub_counts(http: aiohttp.ClientSession, control: str) -> tuple[int, int]:
    """(FC02 requests, all requests) the stub has served, over all its endpoints."""
    async with http.get(control + "/state") as r:
        state = await r.json()
    reqs = [p["requests"] for p in state["panels"]]
    return sum(int(q["by_function"].get("2", 0)) for q in reqs), sum(int(q["total"]) for q in reqs)


async def measured_window(
    http: aiohttp.ClientSession,
    layout: Layout,
    proc: psutil.Process,
    window_s: float,
    flips: int,
    arrived: dict[str, float],
    key_of: Callable[[int, int], str],
) -> Result:
    """Flip ``flips`` distinct inputs spread over ``window_s``; CPU and polls over exactly that window."""
    plan = [(i % len(layout.panels), (i // len(layout.panels)) % ZONES + 1) for i in range(flips)]
    sent: dict[str, float] = {}
    polls0, reqs0 = await stub_counts(http, layout.control)
    c0, t0 = proc.cpu_times(), time.monotonic()
    for k, (panel, zone) in enumerate(plan):
        await asyncio.sleep(max(0.0, t0 + (k + 0.5) * window_s / max(1, flips) - time.monotonic()))
        ep, unit = layout.panels[panel]
        async with http.post(f"{layout.control}/zones/{zone}/trip", json={"panel": ep, "unit": unit}) as r:
            body = await r.json()
        sent[key_of(panel, zone)] = float(body["mono"])
    await asyncio.sleep(max(0.0, t0 + window_s - time.monotonic()))
    c1, t1 = proc.cpu_times(), time.monotonic()
    polls1, reqs1 = await stub_counts(http, layout.control)
    rss = proc.memory_info().rss / 2**20
    deadline = time.monotonic() + LATE_S
    while time.monotonic() < deadline and not all(k in arrived for k in sent):
        await asyncio.sleep(0.05)
    for panel, zone in plan:  # put the inputs back for the next run
        ep, unit = layout.panels[panel]
        async with http.post(f"{layout.control}/zones/{zone}/restore", json={"panel": ep, "unit": unit}):
            pass
    return Result(
        cpu_s=(c1.user + c1.system) - (c0.user + c0.system),
        input_polls=polls1 - polls0,
        requests=reqs1 - reqs0,
        window_s=t1 - t0,
        rss_mb=[rss],
        flips=len(sent),
        latencies_ms=[(arrived[k] - t) * 1000 for k, t in sent.items() if k in arrived],
    )


# ---------------------------------------------------------------- Gatehouse


PORTAL_KEY, PORTAL_PUBLIC = generate_keypair()  # commands are signed by the portal: here, by the bench


def gateway_yaml(layout: Layout, broker_port: int, poll_ms: int, in_flight: int = 1) -> str:
    lines = [
        "site: bench",
        "gateway: gw1",
        "data_dir: data",
        "log_level: WARNING",
        "access: {public_keys: [portal.pub.pem]}",
        f"mqtt: {{host: 127.0.0.1, port: {broker_port}}}",
        "zone_groups: [{name: fence}]",
        "buses:",
    ]
    for b, (url, _) in enumerate(layout.buses()):
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        lines.append(
            f"  - {{name: b{b}, kind: modbus-tcp, host: {host}, port: {port}, timeout_ms: 300, "
            f"max_in_flight: {in_flight}}}"
        )
    lines.append("devices:")
    for b, (_, members) in enumerate(layout.buses()):
        lines += [
            f"  - {{name: p{i}, profile: perimeter-panel-16, bus: b{b}, unit: {unit}, poll_ms: {poll_ms}}}"
            for i, unit in members
        ]
    lines.append("zones:")
    lines += [
        f"  - {{name: p{i}-z{z}, device: p{i}, point: zone{z}_alarm, group: fence, restore_ms: 0}}"
        for i in range(len(layout.panels))
        for z in range(1, ZONES + 1)
    ]
    return "\n".join(lines) + "\n"


async def run_gatehouse(
    tmp: Path,
    broker: MosquittoProcess,
    layout: Layout,
    http: aiohttp.ClientSession,
    window_s: float,
    flips: int,
    stall_s: float,
    poll_ms: int = POLL_MS,
    in_flight: int = 1,
    loop: str = "",
) -> Result:
    (tmp / "gw").mkdir(parents=True)
    (tmp / "gw" / "gateway.yaml").write_text(gateway_yaml(layout, broker.port, poll_ms, in_flight))
    save_public_key(tmp / "gw" / "portal.pub.pem", PORTAL_PUBLIC)
    env = dict(os.environ)
    if stall_s > 0:
        env[STALL_ENV] = str(stall_s)
    if loop:
        env[LOOP_ENV] = loop
    else:
        env.pop(LOOP_ENV, None)  # the daemon's default loop
    arrived: dict[str, float] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"bench-portal-{ULID()}") as c:
        await c.subscribe(wire.topic("bench", "gw1", "events"), qos=1)

        async def listen() -> None:
            async for msg in c.messages:
                now = time.monotonic()
                batch = wire.decode_batch(bytes(msg.payload), site="bench", gateway="gw1")  # type: ignore[arg-type]
                for ev in batch.events:
                    if ev.type == "zone.alarm":
                        arrived.setdefault(f"{ev.device}/{ev.point}", now)
                # Acknowledge as the portal would, so the outbox drains and nothing is sent twice.
                ack = wire.Ack(v=wire.SCHEMA_VERSION, seqs=[ev.seq for ev in batch.events])
                await c.publish(wire.topic("bench", "gw1", "ack"), wire.encode(ack), qos=1)

        listener = asyncio.create_task(listen())
        gateway, _ = await start(
            "gateway",
            [PY, "-m", "gateway.cli", "gateway", "run", "--config", str(tmp / "gw" / "gateway.yaml")],
            tmp / "gateway.log",
            env=env,
        )
        try:
            await asyncio.sleep(SETTLE_S)
            now = wire.utcnow()
            cmd = wire.Command(
                v=wire.COMMAND_VERSION,
                id=str(ULID()),
                type="arm",
                ts=now,
                expires=now + timedelta(minutes=5),
                by="bench",
                args={"group": "fence"},
            )
            await c.publish(
                wire.topic("bench", "gw1", "cmd"), sign_command(PORTAL_KEY, cmd, site="bench", gateway="gw1"), qos=1
            )
            await asyncio.sleep(0.5)
            return await measured_window(
                http, layout, psutil.Process(gateway.pid), window_s, flips, arrived, lambda p, z: f"p{p}/zone{z}_alarm"
            )
        finally:
            await stop(gateway)
            listener.cancel()
            # awaited before the client disconnects: an ack under way would fail, unretrieved, with a traceback
            await asyncio.gather(listener, return_exceptions=True)


# ---------------------------------------------------------------- the naive loop

NAIVE = r"""
import asyncio, sys, json, paho.mqtt.client as mqtt
from pymodbus.client import AsyncModbusTcpClient
buses, port, n, period = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="naive"); c.connect("127.0.0.1", port); c.loop_start()
async def poll(url, members):
    host, p = url.split("//", 1)[1].rsplit(":", 1)
    cl = AsyncModbusTcpClient(host, port=int(p)); await cl.connect()
    last = {}
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        for i, unit in members:
            rr = await cl.read_discrete_inputs(0, count=n, device_id=unit)
            bits = list(rr.bits[:n])
            old = last.get(i)
            if old is not None:
                for z, (a, b) in enumerate(zip(old, bits), 1):
                    if a != b: c.publish(f"naive/p{i}/z{z}", b"1" if b else b"0", qos=1)
            last[i] = bits
        await asyncio.sleep(max(0.0, period - (loop.time() - t0)))
async def main():
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.gather(*(poll(url, members) for url, members in buses))
asyncio.run(main())
"""


async def run_naive(
    tmp: Path,
    broker: MosquittoProcess,
    layout: Layout,
    http: aiohttp.ClientSession,
    window_s: float,
    flips: int,
    poll_ms: int = POLL_MS,
) -> Result:
    tmp.mkdir(parents=True)
    script = tmp / "naive.py"
    script.write_text(NAIVE)
    arrived: dict[str, float] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port) as sub:
        await sub.subscribe("naive/#", qos=1)

        async def listen() -> None:
            async for msg in sub.messages:
                if msg.payload == b"1":
                    arrived.setdefault(str(msg.topic), time.monotonic())

        listener = asyncio.create_task(listen())
        proc, _ = await start(
            "naive",
            [PY, str(script), json.dumps(layout.buses()), str(broker.port), str(ZONES), str(poll_ms / 1000)],
            tmp / "naive.log",
        )
        try:
            await asyncio.sleep(SETTLE_S)
            return await measured_window(
                http, layout, psutil.Process(proc.pid), window_s, flips, arrived, lambda p, z: f"naive/p{p}/z{z}"
            )
        finally:
            await stop(proc)
            listener.cancel()


# ---------------------------------------------------------------- layouts and the run


FLOOR = r"""
import asyncio, json, os, struct, sys, time
n = [0]
class P(asyncio.BufferedProtocol):
    def __init__(s):
        s.buf = bytearray(4096); s.view = memoryview(s.buf); s.end = 0; s.units = []; s.i = 0; s.tid = 0
    def connection_made(s, t): s.t = t
    def get_buffer(s, hint): return s.view[s.end:]
    def buffer_updated(s, k):
        s.end += k
        if s.end >= 7 and s.end >= 6 + struct.unpack_from(">H", s.buf, 4)[0]:
            s.end = 0; n[0] += 1; s.i += 1
            if s.i < len(s.units): s.send()
    def send(s):
        s.tid = s.tid % 65535 + 1
        s.t.write(struct.pack(">HHHBBHH", s.tid, 0, 6, s.units[s.i], 2, 0, 96))
async def main():
    buses, secs = json.loads(sys.argv[1]), float(sys.argv[2])
    loop = asyncio.get_running_loop()
    conns = []
    for host, port, units in buses:
        _, p = await loop.create_connection(P, host, port); p.units = units; conns.append(p)
    def tick(at):
        for p in conns:
            p.i = 0; p.send()
        loop.call_at(at + 0.1, tick, at + 0.1)
    tick(loop.time())
    await asyncio.sleep(1.0)  # connected and going round
    n0, c0 = n[0], os.times()
    await asyncio.sleep(secs)
    n1, c1 = n[0], os.times()
    print(1e3 * (c1.user + c1.system - c0.user - c0.system) / (n1 - n0))
asyncio.run(main())
"""


async def floor_ms_per_request(layout: Layout, tmp: Path, secs: float) -> float:
    """CPU (ms) per request of a bare asyncio request/response loop on the layout, driven by callbacks: one timer
    for every connection each 100 ms, each answer sending the connection's next request (no task, no future, no
    library, no decoding, nothing done with the answers)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "floor.py").write_text(FLOOR)
    buses = []
    for url, members in layout.buses():
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        buses.append([host, int(port), [unit for _, unit in members]])
    proc = await asyncio.create_subprocess_exec(
        PY, str(tmp / "floor.py"), json.dumps(buses), str(secs), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return float(out.decode().strip())


async def start_layout(name: str, panels: int, tmp: Path) -> tuple[asyncio.subprocess.Process, Layout]:
    where = ["--units", f"1-{panels}"] if name == "one-bus" else ["--count", str(panels)]
    proc, info = await start(
        f"stub-{name}",
        [
            PY,
            "-m",
            "firmware_stubs.perimeter_panel",
            "--tcp",
            "127.0.0.1:0",
            *where,
            "--zones",
            str(ZONES),
            "--control",
            "127.0.0.1:0",
        ],
        tmp / f"stub-{name}.log",
    )
    if name == "one-bus":
        layout = Layout(name, info["endpoints"], [(0, u) for u in range(1, panels + 1)], info["control"])
    else:
        layout = Layout(name, info["endpoints"], [(i, 1) for i in range(panels)], info["control"])
    return proc, layout


def line(label: str, s: dict[str, Any]) -> str:
    return (
        f"  {label:<18} {s['input_polls_per_s']:>5} input polls/s ({s['requests_per_s']} requests/s), "
        f"CPU {s['cpu_pct']:>5.1f}% = {s['cpu_ms_per_input_poll']:.3f} ms per input poll, "
        f"RSS {s['rss_mb']:.0f} MB; {s['changes_seen']}/{s['flips']} changes, latency p50 "
        f"{s['latency_p50_ms']} / p99 {s['latency_p99_ms']} / max {s['latency_max_ms']} ms"
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1, help="interleaved runs of each system on each layout")
    ap.add_argument("--window", type=float, default=8.0, help="seconds of each measured window (with the flips)")
    ap.add_argument(
        "--flips",
        type=int,
        default=30,
        help="input flips per window (30 in 8 s: the issue's reference rate, 200 a minute)",
    )
    ap.add_argument("--panels", type=int, default=50)
    ap.add_argument("--stall-s", type=float, default=0.0, help="every commit of the gateway's store stalls this long")
    ap.add_argument(
        "--in-flight",
        type=int,
        default=1,
        help="the gateway's buses' max_in_flight (Modbus TCP pipelining; 1, the default, is off)",
    )
    ap.add_argument(
        "--loops",
        default="",
        help=f"Gatehouse on each of these event loops (asyncio,uvloop), in the same run; default: the daemon's own "
        f"({LOOP_ENV} unset: {DEFAULT_LOOP})",
    )
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--scale", default="", help="panel counts on one bus for the scale table, e.g. 10,50,200")
    ap.add_argument(
        "--floor", action="store_true", help="also the CPU per request of a bare asyncio loop on each layout"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) and print its path")
    args = ap.parse_args()
    layouts = [x for x in args.layouts.split(",") if x]
    if any(x not in LAYOUTS for x in layouts) or not 1 <= args.panels <= 247 or args.flips > args.panels * ZONES:
        raise SystemExit(f"layouts are {', '.join(LAYOUTS)}; panels 1-247; at most panels x {ZONES} flips")
    scale = [int(x) for x in args.scale.split(",") if x]
    loops = [x for x in args.loops.split(",") if x] or [""]
    if any(x not in ("asyncio", "uvloop") for x in loops if x):
        raise SystemExit("loops are asyncio, uvloop")
    systems = [f"gatehouse[{x}]" if x else "gatehouse" for x in loops]
    tmp = Path(tempfile.mkdtemp(prefix="gatehouse-bench-"))
    results: dict[str, dict[str, Result]] = {x: {**{g: Result() for g in systems}, "naive": Result()} for x in layouts}
    scale_results: dict[int, dict[str, Result]] = {}
    floors: dict[str, float] = {}
    try:
        broker = MosquittoProcess(tmp / "broker").start()
        try:
            async with aiohttp.ClientSession() as http:
                for run in range(args.runs):
                    for name in layouts:
                        stub, layout = await start_layout(name, args.panels, tmp / f"r{run}")
                        try:
                            order = [*systems, "naive"]
                            order = order[run % len(order) :] + order[: run % len(order)]  # interleaved
                            for system in order:
                                where = tmp / f"r{run}" / name / system
                                if system != "naive":
                                    r = await run_gatehouse(
                                        where,
                                        broker,
                                        layout,
                                        http,
                                        args.window,
                                        args.flips,
                                        args.stall_s,
                                        in_flight=args.in_flight,
                                        loop=loops[systems.index(system)],
                                    )
                                else:
                                    r = await run_naive(where, broker, layout, http, args.window, args.flips)
                                results[name][system].add(r)
                        finally:
                            await stop(stub)
                for name in layouts if args.floor else []:
                    stub, layout = await start_layout(name, args.panels, tmp / "floor")
                    try:
                        floors[name] = await floor_ms_per_request(layout, tmp / "floor" / name, args.window)
                    finally:
                        await stop(stub)
                for n in scale:
                    stub, layout = await start_layout("one-bus", n, tmp / f"scale{n}")
                    try:
                        poll_ms = max(1, round(n * 1000 / 500))  # 500 input polls/s at every size
                        flips = min(n * ZONES, 40)
                        g = await run_gatehouse(
                            tmp / f"scale{n}" / "gatehouse",
                            broker,
                            layout,
                            http,
                            args.window,
                            flips,
                            args.stall_s,
                            poll_ms,
                            args.in_flight,
                        )
                        nv = await run_naive(
                            tmp / f"scale{n}" / "naive", broker, layout, http, args.window, flips, poll_ms
                        )
                        scale_results[n] = {"gatehouse": g, "naive": nv}
                    finally:
                        await stop(stub)
        finally:
            broker.stop()
    finally:
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    out: dict[str, Any] = {
        "panels": args.panels,
        "inputs_per_panel": ZONES,
        "poll_ms": POLL_MS,
        "runs": args.runs,
        "window_s": args.window,
        "flips_per_window": args.flips,
        "store_commit_stall_s": args.stall_s,
        "gatehouse_max_in_flight": args.in_flight,
        "gatehouse_loops": [x or f"default ({DEFAULT_LOOP})" for x in loops],
    }
    stall = f", every store commit stalled {args.stall_s:g} s" if args.stall_s else ""
    pipelined = f", Gatehouse's buses pipelining {args.in_flight} requests" if args.in_flight > 1 else ""
    print(
        f"{args.panels} panels x {ZONES} inputs every {POLL_MS} ms, {args.runs} run(s) of {args.window:g} s with "
        f"{args.flips} flips{stall}{pipelined}"
    )
    for name in layouts:
        nv = results[name]["naive"].summary()
        print(f"{name}:")
        entry: dict[str, Any] = {"naive": nv}
        for system in systems:
            g = results[name][system].summary()
            ratio = g["cpu_ms_per_input_poll"] / nv["cpu_ms_per_input_poll"] if nv["cpu_ms_per_input_poll"] else None
            label = system.replace("gatehouse", "Gatehouse")
            print(line(label, g))
            print(f"    CPU per input poll, {label} / naive: {ratio:.2f}" if ratio else "    no naive CPU figure")
            key = system.replace("[", "_").rstrip("]")
            entry[key] = g
            entry[f"{key}_cpu_per_input_poll_ratio_to_naive"] = round(ratio, 2) if ratio else None
        print(line("naive", nv))
        if name in floors:
            # The floor asks what Gatehouse asked (its requests per input poll: status and outputs reads besides).
            gh = results[name][systems[0]].summary()
            mix = gh["cpu_ms_per_request"] and gh["cpu_ms_per_input_poll"] / gh["cpu_ms_per_request"]
            per_poll = floors[name] * mix
            ratio = per_poll / nv["cpu_ms_per_input_poll"] if nv["cpu_ms_per_input_poll"] else None
            print(
                f"  floor: a bare asyncio loop driven by callbacks, {floors[name]:.4f} ms CPU per request; at "
                f"Gatehouse's {mix:.2f} requests per input poll, {per_poll:.4f} ms per input poll"
                + (f" = {ratio:.2f} x naive" if ratio else "")
            )
            entry["floor_bare_asyncio_cpu_ms_per_request"] = round(floors[name], 4)
            entry["floor_cpu_per_input_poll_ratio_to_naive"] = round(ratio, 2) if ratio else None
        out[name.replace("-", "_")] = entry
    if scale_results:
        print("scale (one bus, 500 input polls/s in all):")
        rows = []
        for n, rs in scale_results.items():
            g, nv = rs["gatehouse"].summary(), rs["naive"].summary()
            print(
                f"  {n:>4} panels: Gatehouse {g['cpu_ms_per_input_poll']:.3f} ms per input poll "
                f"({g['cpu_ms_per_request']:.3f} ms per request, {g['input_polls_per_s']} polls/s, "
                f"RSS {g['rss_mb']:.0f} MB); naive {nv['cpu_ms_per_input_poll']:.3f} ms per input poll "
                f"({nv['input_polls_per_s']} polls/s)"
            )
            rows.append({"panels": n, "gatehouse": g, "naive": nv})
        out["scale_one_bus"] = rows
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
