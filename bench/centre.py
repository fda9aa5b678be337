"""Monitoring-centre benchmark: 200 simulated gateways across 20 estates into 1, 2 and 3 portal instances on
PostgreSQL and, in the same run, one portal on SQLite.

Every portal is ``python -m portal run``; the instances share a durable PostgreSQL of the run's own (fsync and
synchronous commits on, as SQLite's ``synchronous = FULL`` is) and one Mosquitto, through a shared subscription.
The gateways are simulated in this process as the wire contract has them (gateway.wire): each its own topic, seq
numbers and window of unacknowledged events, re-sent when no ack comes. Measured:

* **stored events per second**, closed loop: every gateway keeps ``--window`` events in flight in batches of
  ``--batch``, and an event counts when the portal's ack for it (sent only once stored) comes back; for SQLite x1
  and PostgreSQL x1, x2, x3, each on fresh instances and a fresh store (a database of its own on the run's one
  server), after a warm-up;
* **alarm latency** to a console WebSocket on every instance (3 more fresh instances on PostgreSQL), p50/p99,
  with 1,000 routine events a second in the background and ``--alarms-per-s`` alarms a second, from the publish
  to each console's receipt, whichever instance stored it;
* **consoles back after a kill**: consoles behind a least-connections balancer, one instance SIGKILLed; for each
  console that was on it, the time from the kill to the first alarm (published after the kill) it receives again.

Aims (issue 19): 3 instances store at least as much per second as the one SQLite portal; alarm p99 under 200 ms;
consoles back within 5 s. Run it on a quiet machine; it ends with one JSON line.

The generator publishes what there is room for in the gateways' windows, ``--publish-window`` batches (512) at a time,
their PUBACKs awaited together. With 8 at a time (the default until stop 24), the generator's own round trips to the
broker bounded every layout at 8-19,000 events/s with the machine half idle, so the figures measured the generator
and not the portals: three instances stored 0.4-0.9x the SQLite portal. With the whole room at once, the SQLite
portal's one process and the two cores shared by the three instances, PostgreSQL and the generator are what bound.
``--broker-conf`` adds a line to the run's Mosquitto, for diagnosis only (the default is the broker as shipped,
saving its store every 30 s); the JSON says so when it is used.

Usage: python bench/centre.py [--seconds 3] [--alarms 200] [--alarms-per-s 50] [--gateways 200] [--estates 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
from ulid import ULID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.children import pct, start  # noqa: E402
from gateway import wire  # noqa: E402
from gateway.tooling.broker import MosquittoProcess  # noqa: E402
from portal.estate.passes_issue import load_or_create_key  # noqa: E402
from portal.store import storekey  # noqa: E402
from tests.balancer import Balancer  # noqa: E402
from tests.centre_support import Console, instance_config, share_keys  # noqa: E402
from tests.pg_support import PostgresServer  # noqa: E402

PY = sys.executable
GUARD, GUARD_PW = "bench-guard", "bench-guard-password"
CLIENTS = 4  # MQTT connections the simulated gateways share (each gateway keeps its own topics and seqs)


def _ts() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class SimGateway:
    site: str
    gateway: str
    seq: int = 0
    inflight: dict[int, tuple[float, str]] = field(default_factory=dict)  # seq -> (sent, event json)
    acked: int = 0

    def events(self, n: int, priority: int = 0) -> list[str]:
        out = []
        for _ in range(n):
            self.seq += 1
            eid = str(ULID())
            etype = "test.alarm" if priority else "test.synthetic"
            body = (
                f'{{"id":"{eid}","seq":{self.seq},"ts":"{_ts()}","type":"{etype}","device":"bench",'
                f'"place":{{"site":"{self.site}"}},"point":"p{self.seq}","priority":{priority},'
                f'"data":{{"n":{self.seq}}}}}'
            )
            self.inflight[self.seq] = (time.monotonic(), body)
            out.append(body)
        return out

    def frame(self, bodies: list[str]) -> bytes:
        return (
            f'{{"v":{wire.SCHEMA_VERSION},"site":"{self.site}","gateway":"{self.gateway}","events":['
            + ",".join(bodies)
            + "]}"
        ).encode()


class Fleet:
    """The simulated gateways and their MQTT connections."""

    def __init__(self, port: int, gateways: int, estates: int) -> None:
        self.port = port
        self.gws = [SimGateway(f"est{i % estates:02d}", f"gw{i:03d}") for i in range(gateways)]
        self.by_key = {(g.site, g.gateway): g for g in self.gws}
        self.index = {id(g): i for i, g in enumerate(self.gws)}
        self.clients: list[aiomqtt.Client] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.acks = 0
        self.sent_at: dict[str, float] = {}  # alarm id -> publish time

    async def __aenter__(self) -> Fleet:
        for i in range(CLIENTS):
            c = aiomqtt.Client(
                "127.0.0.1", self.port, identifier=f"bench-fleet-{i}-{random.random():.6f}", clean_session=True
            )
            await c.__aenter__()
            c.pending_calls_threshold = 100_000
            for g in self.gws[i::CLIENTS]:
                await c.subscribe(wire.topic(g.site, g.gateway, "ack"), qos=1)
            self.clients.append(c)
            self.tasks.append(asyncio.create_task(self._acks(c)))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for c in self.clients:
            try:
                await c.__aexit__(None, None, None)
            except aiomqtt.MqttError:
                pass

    def client(self, g: SimGateway) -> aiomqtt.Client:
        return self.clients[self.index[id(g)] % CLIENTS]

    async def _acks(self, c: aiomqtt.Client) -> None:
        async for m in c.messages:
            site, gw, _ = wire.parse_topic(str(m.topic))
            g = self.by_key[(site, gw)]
            assert isinstance(m.payload, bytes)
            for s in wire.decode_ack(m.payload).seqs:
                if g.inflight.pop(s, None) is not None:
                    g.acked += 1
                    self.acks += 1

    async def publish(self, g: SimGateway, bodies: list[str]) -> None:
        await self.client(g).publish(wire.topic(g.site, g.gateway, "events"), g.frame(bodies), qos=1)

    async def resend_stale(self, older_than_s: float = 5.0) -> None:
        now = time.monotonic()
        for g in self.gws:
            stale = [(s, b) for s, (t, b) in sorted(g.inflight.items()) if now - t > older_than_s]
            for i in range(0, len(stale), 50):
                chunk = stale[i : i + 50]
                for s, b in chunk:
                    g.inflight[s] = (now, b)
                await self.publish(g, [b for _, b in chunk])


# ---------------------------------------------------------------- portals


class Layout:
    """Portal instances on one store (SQLite: one; PostgreSQL: one database they share), started side by side."""

    def __init__(
        self,
        name: str,
        tmp: Path,
        broker: MosquittoProcess,
        gws: list[tuple[str, str]],
        *,
        pg: PostgresServer | None,
        instances: int,
        batch_max: int,
        guard: bool = False,
    ) -> None:
        self.name, self.tmp, self.broker, self.gws, self.pg, self.n = name, tmp / name, broker, gws, pg, instances
        self.batch_max = batch_max
        self.guard = guard  # a guard's account, for consoles (the throughput layouts have none)
        self.procs: list[asyncio.subprocess.Process] = []
        self.urls: list[str] = []

    def _config(self, i: int) -> Path:
        folder = self.tmp / f"p{i}"
        # the same store settings for every layout: the baseline is not tuned apart
        extra = f"ws_queue_max: 100000\nstore: {{batch_max: {self.batch_max}}}\n"
        if self.pg is None:
            folder.mkdir(parents=True, exist_ok=True)
            gws = "\n".join(f"  - {{site: {s}, gateway: {g}}}" for s, g in self.gws)
            path = folder / "portal.yaml"
            path.write_text(
                f"""data_dir: data
listen: {{host: 127.0.0.1, port: 0}}
mqtt: {{host: 127.0.0.1, port: {self.broker.port}, client_id: {self.client_id(i)}, reconnect_min_s: 0.1}}
gateways:
{gws}
log_level: WARNING
{extra}""",
                encoding="utf-8",
            )
            return path
        extra = "ws_queue_max: 100000\n"
        path = instance_config(
            folder,
            broker_port=self.broker.port,
            target=self.target,
            client_id=self.client_id(i),
            gateways=self.gws,
            share_group=self.name,  # a group of its own: nothing queued for an earlier layout reaches it
            log_level="WARNING",
            extra=extra,
        )
        text = path.read_text(encoding="utf-8").replace("passfile:", f"batch_max: {self.batch_max}, passfile:")
        path.write_text(text, encoding="utf-8")
        return path

    def client_id(self, i: int) -> str:
        return f"bench-{self.name}-{i}"

    async def start(self, fleet: Fleet) -> None:
        """Fresh instances on a fresh store: a new PostgreSQL database (the run's one server) or a new SQLite file."""
        if self.pg is not None:
            self.target = await asyncio.to_thread(self.pg.new_database, "bench")
        for g in fleet.gws:  # a new store: the gateways are new to it and number from 1, as after provisioning
            g.seq = 0
            g.inflight.clear()
        configs = [self._config(i) for i in range(self.n)]
        if self.guard:
            await self._adduser(configs[0])
        if self.n > 1:  # the first instance's keys made here, for every instance to hold alike (docs/centre.md)
            await asyncio.to_thread(storekey.open_for, self.tmp / "p0" / "data" / "store.key", self.target)
            await asyncio.to_thread(load_or_create_key, self.tmp / "p0" / "data")
            share_keys(self.tmp / "p0", [self.tmp / f"p{j}" for j in range(1, self.n)])
        started = await asyncio.gather(
            *(
                start(f"portal-{i}", [PY, "-m", "portal", "run", "--config", str(cfg)], self.tmp / f"portal-{i}.log")
                for i, cfg in enumerate(configs)
            )
        )
        for proc, ready in started:
            self.procs.append(proc)
            self.urls.append(ready["url"])
        await asyncio.sleep(0.5)  # subscribed

    async def _adduser(self, config: Path) -> None:
        pw = self.tmp / "guard.pw"
        pw.write_text(GUARD_PW)
        r = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "portal",
            "adduser",
            "--user",
            GUARD,
            "--role",
            "guard",
            "--password-file",
            str(pw),
            "--config",
            str(config),
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert await r.wait() == 0

    async def discard(self) -> None:
        """SIGKILL every instance (what a measured layout still holds is of no further use) and have the broker
        forget the SQLite portal's persistent session, so that nothing is queued for it during later layouts."""
        for p in self.procs:
            if p.returncode is None:
                p.kill()
        await asyncio.gather(*(p.wait() for p in self.procs))
        if self.pg is None:
            for i in range(self.n):
                async with aiomqtt.Client(
                    "127.0.0.1", self.broker.port, identifier=self.client_id(i), clean_session=True
                ):
                    pass


async def throughput(
    name: str, fleet: Fleet, seconds: float, window: int, batch: int, warmup: float, publish_window: int = 512
) -> float:
    """Closed loop: every gateway keeps ``window`` events in flight; acked events per second after a warm-up."""
    running = True

    async def feed() -> None:
        resent = time.monotonic()
        while running:
            # the batches there is room for, ``publish_window`` at a time, their PUBACKs awaited together (the
            # module docstring): a few at a time, the generator's round trips to the broker bound every layout
            sends: list[tuple[SimGateway, list[str]]] = []
            for g in fleet.gws:
                room = window - len(g.inflight)
                while room >= batch:
                    sends.append((g, g.events(batch)))
                    room -= batch
            for i in range(0, len(sends), publish_window):
                await asyncio.gather(*(fleet.publish(g, b) for g, b in sends[i : i + publish_window]))
            if time.monotonic() - resent > 1.0:  # a look at every gateway's window: once a second is enough
                await fleet.resend_stale()
                resent = time.monotonic()
            await asyncio.sleep(0.01)

    task = asyncio.create_task(feed())
    try:
        await asyncio.sleep(warmup)
        a0, t0 = fleet.acks, time.monotonic()
        await asyncio.sleep(seconds)
        rate = (fleet.acks - a0) / (time.monotonic() - t0)
    finally:
        running = False
        await task
    print(f"  {name}: {rate:,.0f} stored events/s", flush=True)
    return rate


async def background(fleet: Fleet, rate: float, stop_at: list[bool]) -> None:
    """Routine events at ``rate``/s spread over the gateways."""
    tick = 0.1
    per_tick = max(1, int(rate * tick))
    gi = 0
    while not stop_at[0]:
        t0 = time.monotonic()
        left = per_tick
        while left > 0:
            g = fleet.gws[gi % len(fleet.gws)]
            gi += 1
            n = min(5, left)
            left -= n
            await fleet.publish(g, g.events(n))
        for g in fleet.gws:  # the simulated gateways forget what was acknowledged long ago
            if len(g.inflight) > 2000:
                for s in sorted(g.inflight)[:1000]:
                    g.inflight.pop(s)
        await asyncio.sleep(max(0.0, tick - (time.monotonic() - t0)))


async def alarms(fleet: Fleet, count: int, per_s: float, ids: list[str]) -> None:
    """``count`` alarms at ``per_s``, each from the next gateway in turn, each alone in its batch."""
    t0 = time.monotonic()
    for i in range(count):
        await asyncio.sleep(max(0.0, t0 + i / per_s - time.monotonic()))
        g = fleet.gws[(i * 7) % len(fleet.gws)]
        [body] = g.events(1, priority=wire.Priority.INTRUSION)
        eid = json.loads(body)["id"]
        fleet.sent_at[eid] = time.monotonic()
        ids.append(eid)
        await fleet.publish(g, [body])


async def latency_and_failover(
    layout: Layout, fleet: Fleet, n_alarms: int, alarms_per_s: float, background_per_s: float
) -> dict[str, Any]:
    t0 = time.monotonic()
    direct = list(
        await asyncio.gather(*(Console(f"direct-{i}", u, GUARD, GUARD_PW).start() for i, u in enumerate(layout.urls)))
    )
    ports = [int(u.rstrip("/").rsplit(":", 1)[1]) for u in layout.urls]
    lb = await Balancer([("127.0.0.1", p) for p in ports]).start()
    behind = []
    for i in range(len(ports)):  # one after another, so that the balancer puts one on each instance
        behind.append(await Console(f"lb-{i}", lb.url, GUARD, GUARD_PW).start())
    print(f"  consoles connected in {time.monotonic() - t0:.1f} s", flush=True)
    flag = [False]
    bg = asyncio.create_task(background(fleet, background_per_s, flag))
    try:
        await asyncio.sleep(0.5)
        ids: list[str] = []
        t0 = time.monotonic()
        await alarms(fleet, n_alarms, alarms_per_s, ids)
        print(f"  {n_alarms} alarms sent in {time.monotonic() - t0:.1f} s", flush=True)
        deadline = time.monotonic() + 2.0  # the last alarms' time to arrive; what has not by then counts as lost
        while time.monotonic() < deadline and not all(e in c.events for e in ids[-20:] for c in direct):
            await asyncio.sleep(0.05)
        lat = []
        for eid in ids:
            sent = fleet.sent_at[eid]
            for c in direct:
                got = c.events.get(eid)
                lat.append((got - sent) * 1000 if got is not None else float("inf"))
        missing = sum(1 for x in lat if x == float("inf"))
        # kill the first instance: its consoles behind the balancer must get alarms again
        victim = layout.procs[0]
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await victim.wait()
        on_victim = [c for c in behind if c.drops and c.drops[-1] >= killed - 0.1]
        post: list[str] = []
        poster = asyncio.create_task(alarms(fleet, 60, 10.0, post))  # an alarm every 100 ms for 6 s
        t_end = killed + 6.5
        while time.monotonic() < t_end:
            on_victim = [c for c in behind if c.drops and c.drops[-1] >= killed - 0.1]
            if on_victim and all(any(e in c.events for e in post) for c in on_victim):
                break
            await asyncio.sleep(0.05)
        poster.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poster
        back = []
        for c in on_victim:
            after = [c.events[e] for e in post if e in c.events]
            back.append((min(after) - killed) if after else float("inf"))
    finally:
        flag[0] = True
        await bg
        for c in [*direct, *behind]:
            await c.close()
        await lb.close()
    finite = [x for x in lat if x != float("inf")]
    return {
        "alarms_sent": n_alarms,
        "alarm_deliveries_measured": len(lat),
        "alarm_deliveries_missing": missing,
        "alarm_latency_ms_p50": round(pct(finite, 50), 1) if finite else None,
        "alarm_latency_ms_p99": round(pct(lat, 99), 1) if lat else None,
        "consoles_on_killed_instance": len(back),
        "consoles_back_s": [round(x, 2) for x in back],
        "consoles_back_s_max": round(max(back), 2) if back else None,
    }


async def measured(
    name: str, tmp: Path, broker: MosquittoProcess, fleet: Fleet, pg: PostgresServer | None, n: int, args: Any
) -> float:
    """Throughput of ``n`` fresh instances on a fresh store, discarded after."""
    t0 = time.monotonic()
    gws = [(g.site, g.gateway) for g in fleet.gws]
    layout = Layout(name, tmp, broker, gws, pg=pg, instances=n, batch_max=args.batch_max)
    try:
        await layout.start(fleet)
        t1 = time.monotonic()
        rate = await throughput(name, fleet, args.seconds, args.window, args.batch, args.warmup, args.publish_window)
    finally:
        await layout.discard()
    print(f"    (started in {t1 - t0:.1f} s, phase {time.monotonic() - t0:.1f} s)", flush=True)
    return rate


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds of throughput per layout")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measurement")
    ap.add_argument("--alarms", type=int, default=200, help="alarms whose latency is measured (p50/p99)")
    ap.add_argument("--alarms-per-s", type=float, default=50.0)
    ap.add_argument("--background", type=float, default=1000.0, help="routine events/s during the alarms")
    ap.add_argument("--gateways", type=int, default=200)
    ap.add_argument("--estates", type=int, default=20)
    ap.add_argument("--window", type=int, default=100, help="events in flight per gateway (throughput)")
    ap.add_argument("--batch", type=int, default=50, help="events per MQTT message (throughput)")
    ap.add_argument(
        "--publish-window", type=int, default=512, help="batches the generator publishes before awaiting their PUBACKs"
    )
    ap.add_argument(
        "--broker-conf",
        action="append",
        default=[],
        help="a line more for the run's Mosquitto (diagnosis, e.g. 'autosave_interval 10000'; said in the JSON)",
    )
    ap.add_argument("--batch-max", type=int, default=256, help="the portals' store.batch_max (every layout)")
    ap.add_argument("--limit", type=float, default=180.0, help="give up (and say so in the JSON) after this long")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gatehouse-bench-centre-"))
    t_start = time.monotonic()
    extra = "\n".join(args.broker_conf)  # diagnosis only: the default is the broker as shipped
    broker = MosquittoProcess(tmp / "broker", max_queued=100_000, extra_conf=extra).start()
    pg = PostgresServer(durable=True)
    pg_up = asyncio.create_task(asyncio.to_thread(pg.start))  # initdb beside the SQLite portal's start
    results: dict[str, Any] = {
        "gateways": args.gateways,
        "estates": args.estates,
        "measured_s_per_layout": args.seconds,
        "publish_window": args.publish_window,
        **({"broker_conf": args.broker_conf} if args.broker_conf else {}),
    }
    rates: dict[str, float] = {}
    try:
        async with asyncio.timeout(args.limit), Fleet(broker.port, args.gateways, args.estates) as fleet:
            # every layout on fresh instances and a fresh store (one PostgreSQL server, a database per layout)
            sqlite = Layout(
                "sqlite_x1",
                tmp,
                broker,
                [(g.site, g.gateway) for g in fleet.gws],
                pg=None,
                instances=1,
                batch_max=args.batch_max,
            )
            t0 = time.monotonic()
            try:
                await sqlite.start(fleet)
                await pg_up  # PostgreSQL ready before anything is measured
                t1 = time.monotonic()
                rates["sqlite_x1"] = await throughput(
                    "sqlite_x1", fleet, args.seconds, args.window, args.batch, args.warmup, args.publish_window
                )
            finally:
                await sqlite.discard()
            print(f"    (started in {t1 - t0:.1f} s, phase {time.monotonic() - t0:.1f} s)", flush=True)
            for n in (1, 2, 3):
                rates[f"postgresql_x{n}"] = await measured(f"postgresql_x{n}", tmp, broker, fleet, pg, n, args)
            # alarms and a kill: three more fresh instances, not the x3 layout with its closed loop's backlog
            t0 = time.monotonic()
            centre = Layout(
                "centre",
                tmp,
                broker,
                [(g.site, g.gateway) for g in fleet.gws],
                pg=pg,
                instances=3,
                batch_max=args.batch_max,
                guard=True,
            )
            try:
                await centre.start(fleet)
                results.update(
                    await latency_and_failover(centre, fleet, args.alarms, args.alarms_per_s, args.background)
                )
            finally:
                await centre.discard()
            print(f"    (alarms and kill phase {time.monotonic() - t0:.1f} s)", flush=True)
    except TimeoutError:
        results["error"] = f"gave up after {args.limit:.0f} s (the broker or a portal stopped answering)"
    finally:
        broker.stop()
        with contextlib.suppress(BaseException):
            await pg_up
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for k in ("sqlite_x1", "postgresql_x1", "postgresql_x2", "postgresql_x3"):
        if k in rates:
            results[f"stored_per_s_{k}"] = round(rates[k])
    for a, b, key in (
        ("postgresql_x2", "postgresql_x1", "x2_over_x1"),
        ("postgresql_x3", "postgresql_x1", "x3_over_x1"),
        ("postgresql_x1", "sqlite_x1", "x1_over_sqlite"),
        ("postgresql_x2", "sqlite_x1", "x2_over_sqlite"),
        ("postgresql_x3", "sqlite_x1", "x3_over_sqlite"),
    ):
        if rates.get(a) is not None and rates.get(b):
            results[key] = round(rates[a] / rates[b], 2)
    results["aims_met"] = {
        "x3_at_least_sqlite": results.get("x3_over_sqlite", 0) >= 1.0,
        "alarm_p99_under_200ms": (results.get("alarm_latency_ms_p99") or 1e9) < 200,
        "consoles_back_within_5s": (results.get("consoles_back_s_max") or 1e9) <= 5.0,
    }
    results["wall_s"] = round(time.monotonic() - t_start, 1)
    print(f"stored/s: {', '.join(f'{k} {v}' for k, v in results.items() if k.startswith('stored_per_s'))}")
    print(
        f"alarm latency to consoles on 3 instances ({results.get('alarms_sent')} alarms): "
        f"p50 {results.get('alarm_latency_ms_p50')} ms, p99 {results.get('alarm_latency_ms_p99')} ms; "
        f"consoles back after a kill: {results.get('consoles_back_s')} s"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
