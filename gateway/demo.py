"""`gatehouse demo`: the whole system on one machine, with simulated hardware.

Every part runs as its own process, as in production: a Mosquitto broker (unless one is given), the
perimeter-panel stub, the portal and the gateway. A scripted intruder trips a zone now and then
through the stub's control interface. All files live under ``--data``; a second run carries on with
the same data. Ctrl-C (or SIGTERM) stops everything in reverse order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
from ulid import ULID

from gateway import wire
from gateway.broker import MosquittoProcess

log = logging.getLogger("gatehouse.demo")

SITE, GATEWAY = "demo", "gw1"
READY_TIMEOUT_S = 60.0
ZONES = [
    ("north-fence", "北围墙"), ("east-fence", "东围墙"), ("south-gate", "南门"), ("west-fence", "西围墙"),
    ("car-park", "停车场"), ("garden", "中心花园"), ("b3-roof", "3幢屋顶"), ("river-side", "河边步道"),
]


class Proc:
    """A child program that announces itself with one JSON ``ready`` line on stdout."""

    def __init__(self, name: str, args: list[str], logfile: Path) -> None:
        self.name, self.args, self.logfile = name, args, logfile
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self._pump: asyncio.Task[None] | None = None

    async def start(self, echo: bool = False) -> dict[str, Any]:
        err = self.logfile.open("ab")  # a local log file; the child inherits it
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            err.close()
        assert self.proc.stdout is not None
        async with asyncio.timeout(READY_TIMEOUT_S):
            while True:
                line = (await self.proc.stdout.readline()).decode(errors="replace")
                if not line:
                    raise RuntimeError(f"{self.name} exited before it was ready; see {self.logfile}")
                if line.startswith("{") and '"ready"' in line:
                    self.info = json.loads(line)
                    break
                if echo:
                    print(f"[{self.name}] {line.rstrip()}", flush=True)
        self._pump = asyncio.create_task(self._echo(echo), name=f"demo.{self.name}.stdout")
        return self.info

    async def _echo(self, echo: bool) -> None:
        assert self.proc and self.proc.stdout
        while line := await self.proc.stdout.readline():
            if echo:
                print(f"[{self.name}] {line.decode(errors='replace').rstrip()}", flush=True)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                log.warning("%s did not stop within 15 s; killing it", self.name)
                self.proc.kill()
                await self.proc.wait()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump


def _secret_file(path: Path, value: str | None = None) -> str:
    if not path.exists():
        path.write_text(value or secrets.token_urlsafe(12))
    path.chmod(0o600)
    return path.read_text().strip()


def write_configs(data: Path, broker: tuple[str, int], stub_modbus: str, portal_port: int) -> tuple[Path, Path]:
    host, port = stub_modbus.removeprefix("tcp://").rsplit(":", 1)
    gw = data / "gateway.yaml"
    zones = "\n".join(
        f"  - {{name: {name}, device: panel-1, point: zone{i}_alarm, type: perimeter, group: perimeter, "
        f"label: {label}, aux: {{tamper: zone{i}_tamper, fault: zone{i}_fault, cut: zone{i}_cut}}}}"
        for i, (name, label) in enumerate(ZONES, start=1))
    gw.write_text(f"""# written by `gatehouse demo`
site: {SITE}
gateway: {GATEWAY}
data_dir: gateway
mqtt: {{host: {broker[0]}, port: {broker[1]}}}
buses:
  - {{name: fence, kind: modbus-tcp, host: {host}, port: {port}, timeout_ms: 500}}
devices:
  - {{name: panel-1, profile: perimeter-panel-8, bus: fence, unit: 1, poll_ms: 100}}
zone_groups:
  - {{name: perimeter, label: 周界}}
zones:
{zones}
""", encoding="utf-8")
    pt = data / "portal.yaml"
    pt.write_text(f"""# written by `gatehouse demo`
listen: {{host: 127.0.0.1, port: {portal_port}}}
data_dir: portal
site_name: 阳光花园 Sunny Gardens (demo)
mqtt: {{host: {broker[0]}, port: {broker[1]}}}
gateways:
  - {{site: {SITE}, gateway: {GATEWAY}}}
""", encoding="utf-8")
    return gw, pt


async def intruder(control: str, every: float, stop: asyncio.Event) -> None:
    """Trip a random zone every so often and restore it a few seconds later."""
    rng = random.Random()
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every * rng.uniform(0.5, 1.5))
            if stop.is_set():
                break
            zone = rng.randint(1, len(ZONES))
            try:
                await http.post(f"{control}/zones/{zone}/trip")
                print(f"[intruder] crossing zone {zone} ({ZONES[zone - 1][1]})", flush=True)
                await asyncio.sleep(3)
                await http.post(f"{control}/zones/{zone}/restore")
            except aiohttp.ClientError as e:
                log.warning("intruder could not reach the stub: %s", e)


async def arm_perimeter(broker: tuple[str, int]) -> None:
    """Arm the perimeter as the guard on the night shift would, so the intruder raises alarms."""
    now = wire.utcnow()
    cmd = wire.Command(v=wire.SCHEMA_VERSION, id=str(ULID()), type="arm", ts=now, expires=now + timedelta(minutes=1),
                       by="demo", args={"group": "perimeter"})
    async with aiomqtt.Client(broker[0], broker[1], identifier="gatehouse-demo") as c:
        # Wait for the gateway's retained "online": its command subscription exists from then on.
        await c.subscribe(wire.topic(SITE, GATEWAY, "status"), qos=1)
        async with asyncio.timeout(READY_TIMEOUT_S):
            async for msg in c.messages:
                if isinstance(msg.payload, bytes) and wire.decode_status(msg.payload).state == "online":
                    break
        await c.publish(wire.topic(SITE, GATEWAY, "cmd"), wire.encode(cmd), qos=1)


async def run_demo(ns: argparse.Namespace, data: Path) -> int:
    py = sys.executable
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    broker: MosquittoProcess | None = None
    procs: list[Proc] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        if ns.broker:
            h, p = ns.broker.rsplit(":", 1)
            broker_addr = (h, int(p))
        else:
            broker = MosquittoProcess(data / "broker")
            await loop.run_in_executor(None, broker.start)
            broker_addr = (broker.host, broker.port)
        print(f"broker      mqtt://{broker_addr[0]}:{broker_addr[1]}", flush=True)

        stub = Proc("perimeter-stub", [py, "-m", "firmware_stubs.perimeter_panel", "--tcp", "127.0.0.1:0",
                                       "--zones", "8", "--control", "127.0.0.1:0"], data / "logs" / "stub.log")
        procs.append(stub)
        info = await stub.start()
        print(f"panel stub  {info['modbus']}  (control {info['control']})", flush=True)

        gw_cfg, portal_cfg = write_configs(data, broker_addr, info["modbus"], ns.port)
        guard_pw = _secret_file(data / "guard.password")
        adduser = await asyncio.create_subprocess_exec(
            py, "-m", "portal", "adduser", "--config", str(portal_cfg), "--user", "guard", "--role", "guard",
            "--password-file", str(data / "guard.password"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await adduser.communicate()
        if adduser.returncode and b"exists" not in err:  # a second run finds the guard from the first
            raise RuntimeError(f"could not create the guard account: {err.decode(errors='replace')}")

        portal = Proc("portal", [py, "-m", "portal", "run", "--config", str(portal_cfg)], data / "logs" / "portal.log")
        procs.append(portal)
        pinfo = await portal.start(echo=True)
        gateway = Proc("gateway", [py, "-m", "gateway.cli", "gateway", "run", "--config", str(gw_cfg)],
                       data / "logs" / "gateway.log")
        procs.append(gateway)
        await gateway.start()

        print(f"""
Gatehouse demo is running. Logs: {data / 'logs'}
  Guard console:  {pinfo['url']}
  Sign in:        guard / {guard_pw}
A scripted intruder trips a perimeter zone every ~{ns.intruder_every:.0f} s. Ctrl-C stops everything.
""", flush=True)
        print(json.dumps({"ready": True, "url": pinfo["url"], "user": "guard", "password": guard_pw,
                          "stub_control": info["control"]}), flush=True)
        await arm_perimeter(broker_addr)
        tasks.append(asyncio.create_task(intruder(info["control"], ns.intruder_every, stop), name="demo.intruder"))
        watch = [asyncio.create_task(p.proc.wait()) for p in procs if p.proc]  # a child that dies ends the demo
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([*watch, stopper], timeout=ns.duration, return_when=asyncio.FIRST_COMPLETED)
        for t in [*watch, stopper]:
            t.cancel()
        died = [p.name for p in procs if p.proc and p.proc.returncode is not None]
        if died:
            print(f"demo: {', '.join(died)} exited; stopping. See {data / 'logs'}", file=sys.stderr)
            return 1
        return 0
    finally:
        stop.set()
        print("stopping…", flush=True)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in reversed(procs):
            try:
                await p.stop()
            except Exception:
                log.exception("stopping %s failed", p.name)
        if broker is not None:
            await loop.run_in_executor(None, broker.stop)
        print("stopped.", flush=True)
