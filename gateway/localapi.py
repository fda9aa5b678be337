"""The gateway's local status and metrics endpoint (loopback only by default).

``GET /status`` is JSON for ``gatehouse status``: buses, devices online and offline, poll rates, the
outbox depth, the broker link, the store and the last event. ``GET /metrics`` is the Prometheus text
format. Both read the running :class:`gateway.app.Gateway` when asked; nothing here sits in the hot
path except :class:`EventLatency`, which the gateway feeds.

What is read from the gateway: ``cfg``, ``store`` (outbox depth, last event, fault), ``uplink.stats``,
``started``, ``ready``, ``drivers`` (the running Modbus buses and Contact ID lines by name) and, when
the gateway has one, ``latency`` (an :class:`EventLatency` it feeds).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from devices.cid_receiver import ContactIdLine
from devices.modbus import BusStats, ModbusBus
from gateway import __version__, wire
from gateway.config import GatewayConfig
from gateway.store import Store
from gateway.uplink import Uplink

log = logging.getLogger(__name__)

#: Latency buckets (seconds) from a device input seen to an event stored / acknowledged by the portal.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class EventLatency:
    """Histograms the gateway feeds: ``stored`` (device input seen → event in the log and outbox) and
    ``acked`` (event sent → acknowledged by the portal). Each gateway has its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.histogram = Histogram(
            "gatehouse_event_latency_seconds", "Event latency by stage (stored: input seen to event committed; "
            "acked: event sent to acknowledged by the portal)", ["stage"], buckets=LATENCY_BUCKETS,
            registry=self.registry)
        self._stored = self.histogram.labels(stage="stored")
        self._acked = self.histogram.labels(stage="acked")

    def stored(self, seconds: float) -> None:
        if seconds >= 0 and math.isfinite(seconds):
            self._stored.observe(seconds)

    def acked(self, seconds: float) -> None:
        if seconds >= 0 and math.isfinite(seconds):
            self._acked.observe(seconds)


class GatewayView(Protocol):
    """What the local API reads of a running gateway (see :class:`gateway.app.Gateway`)."""

    cfg: GatewayConfig
    store: Store
    uplink: Uplink
    started: float
    ready: asyncio.Event
    drivers: Mapping[str, Any]


class PollRates:
    """Polls per second of each device over the last ``window_s``, from samples of its counters."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = 60.0) -> None:
        self._clock = clock
        self.window_s = window_s
        self._samples: dict[tuple[str, str], deque[tuple[float, int]]] = {}

    def sample(self, counts: Iterable[tuple[str, str, int]]) -> None:
        now = self._clock()
        for bus, dev, polls in counts:
            q = self._samples.setdefault((bus, dev), deque())
            q.append((now, polls))
            while len(q) > 2 and now - q[1][0] >= self.window_s:
                q.popleft()

    def rate(self, bus: str, dev: str, polls_now: int) -> float | None:
        q = self._samples.get((bus, dev))
        if not q:
            return None
        t0, p0 = q[0]
        dt = self._clock() - t0
        if dt < 0.5 or polls_now < p0:
            return None
        return (polls_now - p0) / dt


class LocalApi:
    """The handlers; :func:`serve_local_api` puts them on a loopback port."""

    def __init__(self, gw: GatewayView, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = wire.utcnow, sample_s: float = 5.0) -> None:
        self.gw = gw
        self._clock = clock
        self._wall = wall
        self.sample_s = sample_s
        self.rates = PollRates(clock)
        latency = getattr(gw, "latency", None)
        self.latency: EventLatency = latency if isinstance(latency, EventLatency) else EventLatency()
        self.registry = CollectorRegistry(auto_describe=False)
        self._snapshot: dict[str, Any] = {}
        self.registry.register(_SnapshotCollector(self))
        self.registry.register(_RegistryBridge(self.latency.registry))
        ProcessCollector(namespace="gatehouse_gateway", registry=self.registry)

    # ------------------------------------------------------------ collecting

    def bus_stats(self) -> list[BusStats]:
        out = []
        for name, drv in list(self.gw.drivers.items()):
            if isinstance(drv, ModbusBus):
                try:
                    out.append(drv.stats())
                except Exception:  # one bad bus must not take the status page down
                    log.exception("reading the stats of bus %s failed", name)
        return out

    def line_stats(self) -> list[dict[str, Any]]:
        out = []
        for name, drv in list(self.gw.drivers.items()):
            if isinstance(drv, ContactIdLine):
                try:
                    out.append({"name": name, "mode": drv.mode, "state": drv.availability, "counts": drv.stats()})
                except Exception:
                    log.exception("reading the stats of line %s failed", name)
        return out

    def sample_rates(self) -> None:
        self.rates.sample((s.bus, d.device, d.polls) for s in self.bus_stats() for d in s.devices.values())

    async def sampler(self) -> None:
        while True:
            self.sample_rates()
            await asyncio.sleep(self.sample_s)

    async def status(self) -> dict[str, Any]:
        gw = self.gw
        cfg = gw.cfg
        now = self._clock()
        devices_cfg = {d.name: d for d in cfg.devices}
        buses = []
        counts = {"online": 0, "offline": 0, "unknown": 0}
        for s in self.bus_stats():
            devs = []
            for d in s.devices.values():
                counts[d.state] = counts.get(d.state, 0) + 1
                dc = devices_cfg.get(d.device)
                rate = self.rates.rate(s.bus, d.device, d.polls)
                devs.append({
                    "name": d.device, "unit": d.unit, "profile": dc.profile if dc else None,
                    "poll_ms": dc.poll_ms if dc else None, "state": d.state, "polls": d.polls,
                    "missed_polls": d.missed_polls, "errors": dict(d.errors), "writes": d.writes,
                    "write_errors": d.write_errors, "poll_rate_hz": None if rate is None else round(rate, 2),
                    "last_latency_ms": None if d.last_latency_ms is None else round(d.last_latency_ms, 1),
                    "last_ok_s_ago": None if d.last_ok_mono is None else round(now - d.last_ok_mono, 1),
                })
            buses.append({"name": s.bus, "kind": s.kind, "endpoint": s.endpoint, "connected": s.connected,
                          "connects": s.connects, "connect_failures": s.connect_failures,
                          "link_drops": s.link_drops, "devices": devs})
        lines = self.line_stats()
        for ln in lines:
            counts[ln["state"]] = counts.get(ln["state"], 0) + 1
        st = gw.uplink.stats
        store = gw.store
        depth: int | None
        try:
            depth = await store.outbox_depth()
        except Exception as e:  # the store may be the thing that is broken; say so rather than fail
            log.warning("status: outbox depth unreadable: %s", e)
            depth = None
        last = None
        if store.last_seq > 0:
            try:
                evs = await store.events(after_seq=store.last_seq - 1, limit=1)
            except Exception as e:
                log.warning("status: last event unreadable: %s", e)
                evs = []
            if evs:
                ev = evs[0]
                last = {"seq": ev.seq, "id": ev.id, "ts": ev.ts.isoformat(), "type": ev.type, "device": ev.device,
                        "point": ev.point, "age_s": round((self._wall() - ev.ts).total_seconds(), 1)}
        return {
            "site": cfg.site, "gateway": cfg.gateway, "version": __version__,
            "ready": gw.ready.is_set(), "uptime_s": round(now - gw.started, 1),
            "broker": {
                "host": cfg.mqtt.host, "port": cfg.mqtt.port, "connected": st.connected, "connects": st.connects,
                "batches_sent": st.batches_sent, "events_sent": st.events_sent, "acks": st.acks,
                "resends": st.resends, "commands": st.commands, "rejected": dict(st.rejected),
                "last_ack_s_ago": None if st.last_ack_mono is None else round(now - st.last_ack_mono, 1),
            },
            "outbox_depth": depth,
            "store": {"fault": store.fault, "pending": store.pending, "dropped": store.dropped,
                      "last_seq": store.last_seq},
            "devices": counts,
            "buses": buses,
            "lines": lines,
            "last_event": last,
        }

    async def metrics(self) -> bytes:
        # Everything async is read first; the collectors then run synchronously over this snapshot.
        self._snapshot = await self.status()
        return generate_latest(self.registry)

    # ------------------------------------------------------------ HTTP

    async def handle_status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.status())

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body = await self.metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/status", self.handle_status)
        app.router.add_get("/metrics", self.handle_metrics)
        return app


class _RegistryBridge:
    """Exposes another registry's metrics (the gateway's latency histogram) through ours."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


class _SnapshotCollector:
    def __init__(self, api: LocalApi) -> None:
        self.api = api

    def collect(self) -> Iterable[Metric]:
        s = self.api._snapshot
        if not s:
            return []
        out: list[Metric] = []
        info = GaugeMetricFamily("gatehouse_gateway_info", "This gateway", labels=["site", "gateway", "version"])
        info.add_metric([s["site"], s["gateway"], s["version"]], 1)
        out.append(info)
        out.append(GaugeMetricFamily("gatehouse_gateway_ready", "1 once the gateway is serving",
                                     value=1 if s["ready"] else 0))
        out.append(GaugeMetricFamily("gatehouse_gateway_uptime_seconds", "Seconds since start",
                                     value=s["uptime_s"]))
        b = s["broker"]
        out.append(GaugeMetricFamily("gatehouse_broker_connected", "1 while the MQTT link is up",
                                     value=1 if b["connected"] else 0))
        for name, key, doc in (
            ("gatehouse_broker_connects", "connects", "MQTT connections made"),
            ("gatehouse_uplink_events_sent", "events_sent", "Events published (re-sends included)"),
            ("gatehouse_uplink_batches_sent", "batches_sent", "Event batches published"),
            ("gatehouse_uplink_acks", "acks", "Events acknowledged by the portal"),
            ("gatehouse_uplink_resends", "resends", "Times the unacknowledged window was re-sent"),
            ("gatehouse_uplink_commands", "commands", "Commands received"),
        ):
            out.append(CounterMetricFamily(name, doc, value=b[key]))
        rej = CounterMetricFamily("gatehouse_uplink_rejected", "Incoming MQTT messages rejected", labels=["reason"])
        for reason, n in sorted(b["rejected"].items()):
            rej.add_metric([reason], n)
        out.append(rej)
        if s["outbox_depth"] is not None:
            out.append(GaugeMetricFamily("gatehouse_outbox_depth", "Events stored but not yet acknowledged",
                                         value=s["outbox_depth"]))
        st = s["store"]
        out.append(GaugeMetricFamily("gatehouse_store_fault", "1 while the store cannot write (disk full, I/O)",
                                     value=1 if st["fault"] else 0))
        out.append(GaugeMetricFamily("gatehouse_store_pending", "Events waiting in memory to be written",
                                     value=st["pending"]))
        out.append(CounterMetricFamily("gatehouse_store_dropped", "Drafts refused with the backlog full",
                                       value=st["dropped"]))
        out.append(GaugeMetricFamily("gatehouse_last_event_seq", "Sequence number of the last stored event",
                                     value=st["last_seq"]))
        if s["last_event"] is not None:
            out.append(GaugeMetricFamily("gatehouse_last_event_age_seconds", "Age of the last stored event",
                                         value=s["last_event"]["age_s"]))
        bus_up = GaugeMetricFamily("gatehouse_bus_connected", "1 while the bus link is up", labels=["bus", "kind"])
        state = GaugeMetricFamily("gatehouse_device_state", "1 for the device's current state",
                                  labels=["bus", "device", "state"])
        polls = CounterMetricFamily("gatehouse_device_polls", "Group polls answered", labels=["bus", "device"])
        missed = CounterMetricFamily("gatehouse_device_missed_polls", "Group polls not answered",
                                     labels=["bus", "device"])
        errors = CounterMetricFamily("gatehouse_device_errors", "Transaction errors by kind",
                                     labels=["bus", "device", "kind"])
        latency = GaugeMetricFamily("gatehouse_device_last_latency_seconds", "Latency of the last answer",
                                    labels=["bus", "device"])
        for bus in s["buses"]:
            bus_up.add_metric([bus["name"], bus["kind"]], 1 if bus["connected"] else 0)
            for d in bus["devices"]:
                labels = [bus["name"], d["name"]]
                for st_name in ("online", "offline", "unknown"):
                    state.add_metric([*labels, st_name], 1 if d["state"] == st_name else 0)
                polls.add_metric(labels, d["polls"])
                missed.add_metric(labels, d["missed_polls"])
                for kind, n in sorted(d["errors"].items()):
                    errors.add_metric([*labels, kind], n)
                if d["last_latency_ms"] is not None:
                    latency.add_metric(labels, d["last_latency_ms"] / 1000)
        line_state = GaugeMetricFamily("gatehouse_line_state", "1 for the Contact ID line's current state",
                                       labels=["line", "state"])
        line_counts = CounterMetricFamily("gatehouse_line_messages", "Contact ID line counters",
                                          labels=["line", "counter"])
        for ln in s["lines"]:
            for st_name in ("online", "offline", "unknown"):
                line_state.add_metric([ln["name"], st_name], 1 if ln["state"] == st_name else 0)
            for counter, n in sorted(ln["counts"].items()):
                line_counts.add_metric([ln["name"], counter], n)
        out += [bus_up, state, polls, missed, errors, latency, line_state, line_counts]
        return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.asynccontextmanager
async def serve_local_api(gw: GatewayView, host: str = "127.0.0.1", port: int = 9880,
                          *, sample_s: float = 5.0) -> AsyncIterator[LocalApi]:
    """Serve ``/status`` and ``/metrics`` for ``gw`` while the block runs. A port already in use is
    logged and the gateway runs on without the endpoint (the endpoint is for people, not for safety)."""
    api = LocalApi(gw, sample_s=sample_s)
    if not is_loopback(host):
        log.warning("local API on %s:%d is reachable from the network; it has no authentication", host, port)
    runner = web.AppRunner(api.app(), access_log=None, handle_signals=False)
    await runner.setup()
    sampler = asyncio.create_task(api.sampler(), name=f"gateway[{gw.cfg.gateway}].local_api.sampler")
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
            log.info("local API on http://%s:%d (/status, /metrics)", host, port)
        except OSError as e:
            log.error("local API cannot listen on %s:%d: %s; running without it", host, port, e.strerror or e)
        yield api
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await runner.cleanup()
