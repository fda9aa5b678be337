"""The gateway's local status and metrics endpoint (loopback only by default).

``GET /status`` is JSON for ``gatehouse status``: buses, devices online and offline, poll rates, the
outbox depth, the broker link, the store and the last event. ``GET /metrics`` is the Prometheus text
format. Both read the running :class:`gateway.app.Gateway` when asked; nothing here sits in the hot
path except :class:`EventLatency`, which the gateway feeds.

What is read from the gateway: ``cfg``, ``store`` (outbox depth, last event, fault), ``uplink.stats``,
``started``, ``ready``, ``drivers`` (the running Modbus buses and Contact ID lines by name) and, when
the gateway has one, ``latency`` (an :class:`EventLatency` it feeds).

The HTTP side is a deliberately small HTTP/1.1 server on asyncio streams (:class:`LocalHttpServer`),
not a web framework: two GET routes for people and Prometheus do not need one, and on a Raspberry Pi
aiohttp alone costs the daemon about 10 MB of resident memory. One request per connection
(``Connection: close``), the request line and headers capped in size and count and read within a
deadline, bodies refused, a bounded number of connections at a time. The parsing is sans-IO
(:func:`parse_head`), so it is tested from byte tables.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import importlib
import ipaddress
import json
import logging
import math
import re
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

from devices.modbus import BusStats, ModbusBus
from gateway import __version__, wire
from gateway.commands import CommandGuard
from gateway.config import GatewayConfig
from gateway.store import Store
from gateway.uplink import Uplink

if TYPE_CHECKING:  # prometheus_client is imported at the first scrape: about 1 MB resident, often never needed
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

log = logging.getLogger(__name__)

#: Latency buckets (seconds) from a device input seen to an event stored / acknowledged by the portal.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class EventLatency:
    """Histograms the gateway feeds: ``stored`` (device input seen → event in the log and outbox) and
    ``acked`` (event sent → acknowledged by the portal). Plain counters, cheap to feed on the loop;
    :meth:`collect` turns them into the Prometheus histogram ``gatehouse_event_latency_seconds``."""

    STAGES = ("stored", "acked")

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self.created = wall()
        # Per stage: observations in each bucket (not cumulative), the last one above every bound.
        self._counts = {stage: [0] * (len(LATENCY_BUCKETS) + 1) for stage in self.STAGES}
        self._sums = dict.fromkeys(self.STAGES, 0.0)

    def stored(self, seconds: float) -> None:
        self._observe("stored", seconds)

    def acked(self, seconds: float) -> None:
        self._observe("acked", seconds)

    def _observe(self, stage: str, seconds: float) -> None:
        if seconds >= 0 and math.isfinite(seconds):
            self._counts[stage][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._sums[stage] += seconds

    def cumulative(self, stage: str) -> list[int]:
        """Observations at or below each bound of :data:`LATENCY_BUCKETS`, then all of them (``+Inf``)."""
        out, total = [], 0
        for n in self._counts[stage]:
            total += n
            out.append(total)
        return out

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.samples import Sample
        from prometheus_client.utils import floatToGoString

        name = "gatehouse_event_latency_seconds"
        fam = HistogramMetricFamily(
            name,
            "Event latency by stage (stored: input seen to event committed; "
            "acked: event sent to acknowledged by the portal)",
            labels=["stage"],
        )
        bounds = [floatToGoString(b) for b in (*LATENCY_BUCKETS, math.inf)]
        for stage in self.STAGES:
            fam.add_metric([stage], list(zip(bounds, self.cumulative(stage), strict=True)), self._sums[stage])
            fam.samples.append(Sample(f"{name}_created", {"stage": stage}, self.created))
        return [fam]


class GatewayView(Protocol):
    """What the local API reads of a running gateway (see :class:`gateway.app.Gateway`)."""

    cfg: GatewayConfig
    store: Store
    uplink: Uplink
    commands: CommandGuard
    started: float
    ready: asyncio.Event

    @property
    def drivers(self) -> Mapping[str, Any]: ...  # read only here: a property, so a dict satisfies it


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

    def __init__(
        self,
        gw: GatewayView,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = wire.utcnow,
        sample_s: float = 5.0,
    ) -> None:
        self.gw = gw
        self._clock = clock
        self._wall = wall
        self.sample_s = sample_s
        self.rates = PollRates(clock)
        latency = getattr(gw, "latency", None)
        self.latency: EventLatency = latency if isinstance(latency, EventLatency) else EventLatency()
        self._registry: CollectorRegistry | None = None  # made at the first scrape
        self._snapshot: dict[str, Any] = {}
        self.http = LocalHttpServer(self.routes(), name=f"gateway[{gw.cfg.gateway}].local_api")

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
        out: list[dict[str, Any]] = []
        cid = sys.modules.get("devices.cid_receiver")  # loaded by the gateway only where it runs Contact ID lines
        if cid is None:
            return out
        for name, drv in list(self.gw.drivers.items()):
            if isinstance(drv, cid.ContactIdLine):
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
                devs.append(
                    {
                        "name": d.device,
                        "unit": d.unit,
                        "profile": dc.profile if dc else None,
                        "poll_ms": dc.poll_ms if dc else None,
                        "state": d.state,
                        "polls": d.polls,
                        "missed_polls": d.missed_polls,
                        "errors": dict(d.errors),
                        "writes": d.writes,
                        "write_errors": d.write_errors,
                        "poll_rate_hz": None if rate is None else round(rate, 2),
                        "last_latency_ms": None if d.last_latency_ms is None else round(d.last_latency_ms, 1),
                        "last_ok_s_ago": None if d.last_ok_mono is None else round(now - d.last_ok_mono, 1),
                    }
                )
            buses.append(
                {
                    "name": s.bus,
                    "kind": s.kind,
                    "endpoint": s.endpoint,
                    "connected": s.connected,
                    "connects": s.connects,
                    "connect_failures": s.connect_failures,
                    "link_drops": s.link_drops,
                    "stalled_s": None if s.stalled_s is None else round(s.stalled_s, 1),
                    "devices": devs,
                }
            )
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
                last = {
                    "seq": ev.seq,
                    "id": ev.id,
                    "ts": ev.ts.isoformat(),
                    "type": ev.type,
                    "device": ev.device,
                    "point": ev.point,
                    "age_s": round((self._wall() - ev.ts).total_seconds(), 1),
                }
        return {
            "site": cfg.site,
            "gateway": cfg.gateway,
            "version": __version__,
            "ready": gw.ready.is_set(),
            "uptime_s": round(now - gw.started, 1),
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],  # uvloop or asyncio
            "broker": {
                "host": cfg.mqtt.host,
                "port": cfg.mqtt.port,
                "connected": st.connected,
                "connects": st.connects,
                "batches_sent": st.batches_sent,
                "events_sent": st.events_sent,
                "acks": st.acks,
                "resends": st.resends,
                "resent_events": st.resent_events,
                "lost_resent": st.lost_resent,
                "late_acks": st.late_acks,
                "ignored_acks": st.ignored_acks,
                "urgent_sent": st.urgent_sent,
                "fast_sent": st.fast_sent,
                "in_flight": st.in_flight,
                "window": st.window,
                "window_shrinks": st.window_shrinks,
                "commands": st.commands,
                "command_errors": st.command_errors,
                # messages that broke the wire contract, and commands refused (command:<reason>, gateway.commands)
                "rejected": {**st.rejected, **{f"command:{k}": n for k, n in gw.commands.refused.items()}},
                "last_ack_s_ago": None if st.last_ack_mono is None else round(now - st.last_ack_mono, 1),
            },
            "outbox_depth": depth,
            "store": {
                "fault": store.fault,
                "pending": store.pending,
                "dropped": store.dropped,
                "last_seq": store.last_seq,
            },
            "devices": counts,
            "buses": buses,
            "lines": lines,
            "last_event": last,
        }

    async def metrics(self) -> bytes:
        # Everything async is read first; the collectors then run synchronously over this snapshot.
        self._snapshot = await self.status()
        if self._registry is None:
            await asyncio.to_thread(importlib.import_module, "prometheus_client")  # ~12 ms: off the loop
            if self._registry is None:  # another scrape may have made it meanwhile
                self._registry = self._make_registry()
        from prometheus_client.exposition import generate_latest

        return generate_latest(self._registry)

    def _make_registry(self) -> CollectorRegistry:
        from prometheus_client import CollectorRegistry, ProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SnapshotCollector(self))
        registry.register(self.latency)
        ProcessCollector(namespace="gatehouse_gateway", registry=registry)
        return registry

    # ------------------------------------------------------------ HTTP

    async def status_body(self) -> tuple[bytes, str]:
        return json.dumps(await self.status()).encode(), "application/json; charset=utf-8"

    async def metrics_body(self) -> tuple[bytes, str]:
        body = await self.metrics()
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        return body, CONTENT_TYPE_LATEST

    def routes(self) -> dict[str, Route]:
        return {"/status": self.status_body, "/metrics": self.metrics_body}


class _SnapshotCollector:
    def __init__(self, api: LocalApi) -> None:
        self.api = api

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.api._snapshot
        if not s:
            return []
        out: list[Metric] = []
        info = GaugeMetricFamily("gatehouse_gateway_info", "This gateway", labels=["site", "gateway", "version"])
        info.add_metric([s["site"], s["gateway"], s["version"]], 1)
        out.append(info)
        out.append(
            GaugeMetricFamily("gatehouse_gateway_ready", "1 once the gateway is serving", value=1 if s["ready"] else 0)
        )
        out.append(GaugeMetricFamily("gatehouse_gateway_uptime_seconds", "Seconds since start", value=s["uptime_s"]))
        b = s["broker"]
        out.append(
            GaugeMetricFamily(
                "gatehouse_broker_connected", "1 while the MQTT link is up", value=1 if b["connected"] else 0
            )
        )
        for name, key, doc in (
            ("gatehouse_broker_connects", "connects", "MQTT connections made"),
            ("gatehouse_uplink_events_sent", "events_sent", "Events published (re-sends included)"),
            ("gatehouse_uplink_batches_sent", "batches_sent", "Event batches published"),
            ("gatehouse_uplink_acks", "acks", "Events acknowledged by the portal"),
            ("gatehouse_uplink_resends", "resends", "Times unacknowledged events were re-sent"),
            ("gatehouse_uplink_resent_events", "resent_events", "Events sent again (either kind of re-send)"),
            (
                "gatehouse_uplink_lost_resent",
                "lost_resent",
                "Events re-sent alone because something sent after them was acknowledged (the broker dropped them)",
            ),
            ("gatehouse_uplink_late_acks", "late_acks", "Acks of an earlier copy of an event due to be sent again"),
            (
                "gatehouse_uplink_ignored_acks",
                "ignored_acks",
                "Acknowledged seqs that were not sent on this connection (forged, or from before a reconnect)",
            ),
            ("gatehouse_uplink_urgent_sent", "urgent_sent", "Urgent events (alarms, tamper) published"),
            ("gatehouse_uplink_fast_sent", "fast_sent", "Urgent events published before their commit"),
            ("gatehouse_uplink_window_shrinks", "window_shrinks", "Times the broker dropped and the window halved"),
            ("gatehouse_uplink_commands", "commands", "Commands received"),
            ("gatehouse_uplink_command_errors", "command_errors", "Commands whose handling failed"),
        ):
            out.append(CounterMetricFamily(name, doc, value=b[key]))
        out.append(
            GaugeMetricFamily(
                "gatehouse_uplink_in_flight", "Events sent and not yet acknowledged", value=b["in_flight"]
            )
        )
        out.append(
            GaugeMetricFamily(
                "gatehouse_uplink_window", "Events allowed in flight now (the adaptive window)", value=b["window"]
            )
        )
        rej = CounterMetricFamily("gatehouse_uplink_rejected", "Incoming MQTT messages rejected", labels=["reason"])
        for reason, n in sorted(b["rejected"].items()):
            rej.add_metric([reason], n)
        out.append(rej)
        if s["outbox_depth"] is not None:
            out.append(
                GaugeMetricFamily(
                    "gatehouse_outbox_depth", "Events stored but not yet acknowledged", value=s["outbox_depth"]
                )
            )
        st = s["store"]
        out.append(
            GaugeMetricFamily(
                "gatehouse_store_fault",
                "1 while the store cannot write (disk full, I/O)",
                value=1 if st["fault"] else 0,
            )
        )
        out.append(
            GaugeMetricFamily("gatehouse_store_pending", "Events waiting in memory to be written", value=st["pending"])
        )
        out.append(
            CounterMetricFamily("gatehouse_store_dropped", "Drafts refused with the backlog full", value=st["dropped"])
        )
        out.append(
            GaugeMetricFamily(
                "gatehouse_last_event_seq", "Sequence number of the last stored event", value=st["last_seq"]
            )
        )
        if s["last_event"] is not None:
            out.append(
                GaugeMetricFamily(
                    "gatehouse_last_event_age_seconds", "Age of the last stored event", value=s["last_event"]["age_s"]
                )
            )
        bus_up = GaugeMetricFamily("gatehouse_bus_connected", "1 while the bus link is up", labels=["bus", "kind"])
        stuck = GaugeMetricFamily(
            "gatehouse_bus_stalled_seconds",
            "How long the bus's poll loop has been silent once it counts as stuck, else 0",
            labels=["bus"],
        )
        state = GaugeMetricFamily(
            "gatehouse_device_state", "1 for the device's current state", labels=["bus", "device", "state"]
        )
        polls = CounterMetricFamily("gatehouse_device_polls", "Group polls answered", labels=["bus", "device"])
        missed = CounterMetricFamily(
            "gatehouse_device_missed_polls", "Group polls not answered", labels=["bus", "device"]
        )
        errors = CounterMetricFamily(
            "gatehouse_device_errors", "Transaction errors by kind", labels=["bus", "device", "kind"]
        )
        latency = GaugeMetricFamily(
            "gatehouse_device_last_latency_seconds", "Latency of the last answer", labels=["bus", "device"]
        )
        for bus in s["buses"]:
            bus_up.add_metric([bus["name"], bus["kind"]], 1 if bus["connected"] else 0)
            stuck.add_metric([bus["name"]], bus["stalled_s"] or 0.0)
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
        line_state = GaugeMetricFamily(
            "gatehouse_line_state", "1 for the Contact ID line's current state", labels=["line", "state"]
        )
        line_counts = CounterMetricFamily(
            "gatehouse_line_messages", "Contact ID line counters", labels=["line", "counter"]
        )
        for ln in s["lines"]:
            for st_name in ("online", "offline", "unknown"):
                line_state.add_metric([ln["name"], st_name], 1 if ln["state"] == st_name else 0)
            for counter, n in sorted(ln["counts"].items()):
                line_counts.add_metric([ln["name"], counter], n)
        responses = CounterMetricFamily(
            "gatehouse_local_api_responses", "Local API answers by HTTP status", labels=["code"]
        )
        for code, n in sorted(self.api.http.responses.items()):
            responses.add_metric([str(code)], n)
        out += [bus_up, stuck, state, polls, missed, errors, latency, line_state, line_counts, responses]
        return out


# ---------------------------------------------------------------- a small HTTP/1.1 server

#: A route: the body it answers with and that body's Content-Type.
Route = Callable[[], Awaitable[tuple[bytes, str]]]

MAX_HEAD_BYTES = 8192  # the request line and all header lines together
MAX_HEADER_FIELDS = 64
READ_TIMEOUT_S = 5.0  # to receive the request line and headers, all of them
HANDLER_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 10.0  # for a client that does not read its answer
MAX_CONNECTIONS = 16  # at a time; more are answered 503 at once
_CLOSE_S = 1.0
_LINGER_S = 1.0  # after an error answer, how long the rest of a peer's request is read and dropped
_TEXT = "text/plain; charset=utf-8"

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ORIGIN_FORM = re.compile(rb"/[!-~]*")  # visible ASCII: no spaces, controls or 8-bit bytes
_ABSOLUTE_FORM = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://[!-.0-~]*(/[!-~]*)?")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_BAD_FIELD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_SINGLE_FIELDS = frozenset({"host", "content-length"})


class HttpError(Exception):
    """A request that is not served, with the status it is answered with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status} {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    version: str
    headers: Mapping[str, str]  # names in lower case; a repeated field's values joined with ", "

    @property
    def has_body(self) -> bool:
        return "transfer-encoding" in self.headers or self.headers.get("content-length", "0").lstrip("0") != ""


def parse_request_line(line: bytes) -> tuple[str, str, str, str]:
    """``(method, path, query, version)`` of a request line without its line ending."""
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "malformed method")
    v = _VERSION.fullmatch(version)
    if v is None:
        raise HttpError(400, "malformed HTTP version")
    if v[1] != b"1":
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
    if target == b"*":
        path, query = b"*", b""
    else:
        if not _ORIGIN_FORM.fullmatch(target):
            absolute = _ABSOLUTE_FORM.fullmatch(target)
            if absolute is None:
                raise HttpError(400, "malformed request target")
            target = absolute[1] or b"/"
        path, _, query = target.partition(b"?")
    return method.decode("ascii"), path.decode("ascii"), query.decode("ascii"), version.decode("ascii")


def parse_head(lines: Sequence[bytes]) -> Request:
    """A request from its request line and header lines, their line endings removed."""
    if not lines:
        raise HttpError(400, "empty request")
    method, path, query, version = parse_request_line(lines[0])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        raw_name, colon, raw_value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(raw_name):  # also refuses folded lines and "Name :"
            raise HttpError(400, "malformed header line")
        raw_value = raw_value.strip(b" \t")
        name = raw_name.decode("ascii").lower()
        if _BAD_FIELD_VALUE.search(raw_value):
            raise HttpError(400, f"control character in the {name} header")
        value = raw_value.decode("latin-1")
        if name not in headers:
            headers[name] = value
        elif name in _SINGLE_FIELDS:
            raise HttpError(400, f"repeated {name} header")
        else:
            headers[name] = f"{headers[name]}, {value}"
    if version == "HTTP/1.1" and "host" not in headers:
        raise HttpError(400, "HTTP/1.1 request without a Host header")
    length = headers.get("content-length")
    if length is not None and not (length.isascii() and length.isdigit()):
        raise HttpError(400, "malformed Content-Length")
    return Request(method, path, query, version, headers)


async def read_head(
    reader: asyncio.StreamReader, max_bytes: int = MAX_HEAD_BYTES, max_fields: int = MAX_HEADER_FIELDS
) -> list[bytes] | None:
    """The request line and header lines up to the blank line, their line endings (CRLF or LF) removed;
    None if the peer closed without sending a byte. The reader's own limit must not exceed ``max_bytes``."""
    lines: list[bytes] = []
    total = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # one line longer than the reader's limit; it has dropped what it buffered
            line = b""
            total = max_bytes + 1
        total += len(line)
        if total > max_bytes:
            raise HttpError(414, "request line too long") if not lines else HttpError(431, "headers too large")
        if not line.endswith(b"\n"):
            if not lines and not line:
                return None
            raise HttpError(400, "the request ended before its headers did")
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if not line:
            if not lines:
                raise HttpError(400, "empty request line")
            return lines
        lines.append(line)
        if len(lines) > max_fields + 1:
            raise HttpError(431, "too many header fields")


def render_response(
    status: int, body: bytes, content_type: str, *, head_only: bool = False, headers: Mapping[str, str] | None = None
) -> bytes:
    fields = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    head = ("\r\n".join(fields) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


@dataclass(slots=True)
class _Answer:
    status: int
    body: bytes
    content_type: str = _TEXT
    head_only: bool = False
    headers: Mapping[str, str] | None = None


def _error(status: int, detail: str, *, head_only: bool = False, headers: Mapping[str, str] | None = None) -> _Answer:
    body = f"{status} {HTTPStatus(status).phrase}: {detail}\n".encode()
    return _Answer(status, body, head_only=head_only, headers=headers)


class LocalHttpServer:
    """GET and HEAD of a few fixed paths over HTTP/1.1, one request per connection.

    For a loopback port: no TLS, no authentication, no keep-alive, no request bodies. A malformed
    request gets a 4xx answer and is counted in ``responses`` (by status) like every other answer; a
    client too slow to send its headers gets 408 after ``read_timeout_s``."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        name: str = "local_api",
        read_timeout_s: float = READ_TIMEOUT_S,
        handler_timeout_s: float = HANDLER_TIMEOUT_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.routes = dict(routes)
        self.name = name
        self.read_timeout_s = read_timeout_s
        self.handler_timeout_s = handler_timeout_s
        self.write_timeout_s = write_timeout_s
        self.max_connections = max_connections
        self.responses: Counter[int] = Counter()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int | None:
        """The port listened on (useful after starting on port 0), or None when not listening."""
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self, host: str, port: int) -> None:
        """Listen; raises OSError when the address is taken or cannot be bound."""
        self._server = await asyncio.start_server(self._accept, host, port, limit=MAX_HEAD_BYTES, reuse_address=True)

    async def close(self) -> None:
        """Stop listening, then end the connections still open."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= self.max_connections:
            self.responses[503] += 1
            writer.write(render_response(503, b"503 Service Unavailable: too many connections\n", _TEXT))
            writer.transport.close()  # sends what is buffered, then closes
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer), name=f"{self.name}.conn")
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await self._answer(reader)
            if answer is not None:
                self.responses[answer.status] += 1
                if answer.status >= 400:
                    log.debug("local API: %s", answer.body.decode().strip())
                await self._send(writer, answer)
                if answer.status >= 400:
                    await self._linger(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except OSError as e:  # reset by the peer, or a peer that does not read its answer (TimeoutError)
            log.debug("local API: connection dropped: %s", e or type(e).__name__)
            writer.transport.abort()
        except Exception:
            log.exception("local API: a connection failed")
            writer.transport.abort()
        await self._close(writer)

    async def _answer(self, reader: asyncio.StreamReader) -> _Answer | None:
        try:
            async with asyncio.timeout(self.read_timeout_s):
                lines = await read_head(reader)
            if lines is None:
                return None  # connected and closed without a word: a port probe
            req = parse_head(lines)
        except TimeoutError:
            return _error(408, "the request did not arrive in time")
        except HttpError as e:
            return _error(e.status, e.detail)
        head_only = req.method == "HEAD"
        route = self.routes.get(req.path)
        if route is None:
            return _error(404, f"no such path (there are {', '.join(sorted(self.routes))})", head_only=head_only)
        if req.method not in ("GET", "HEAD"):
            return _error(405, f"{req.method} is not allowed here", headers={"Allow": "GET, HEAD"})
        if req.has_body:
            return _error(400, "a GET request has no body here", head_only=head_only)
        try:
            async with asyncio.timeout(self.handler_timeout_s):
                body, content_type = await route()
        except TimeoutError:
            log.warning("local API: %s took longer than %.0f s", req.path, self.handler_timeout_s)
            return _error(503, "the gateway did not answer in time", head_only=head_only)
        except Exception:
            log.exception("local API: %s failed", req.path)
            return _error(500, "see the gateway's log", head_only=head_only)
        return _Answer(200, body, content_type, head_only=head_only)

    async def _send(self, writer: asyncio.StreamWriter, answer: _Answer) -> None:
        writer.write(
            render_response(
                answer.status, answer.body, answer.content_type, head_only=answer.head_only, headers=answer.headers
            )
        )
        async with asyncio.timeout(self.write_timeout_s):
            await writer.drain()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an error answer the peer may still be sending (a head too long, a drip): closing with its bytes
        unread makes the kernel reset the connection, and a reset can destroy the answer before the peer reads it.
        Half-close instead, and drop what still comes for a moment (at most ``_LINGER_S``)."""
        if writer.can_write_eof():
            writer.write_eof()
        try:
            async with asyncio.timeout(_LINGER_S):
                while await reader.read(65536):
                    pass
        except (TimeoutError, OSError):
            pass

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(_CLOSE_S):
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()
        except OSError:
            pass
        except asyncio.CancelledError:
            writer.transport.abort()
            raise


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.asynccontextmanager
async def serve_local_api(
    gw: GatewayView, host: str = "127.0.0.1", port: int = 9880, *, sample_s: float = 5.0
) -> AsyncIterator[LocalApi]:
    """Serve ``/status`` and ``/metrics`` for ``gw`` while the block runs. A port already in use is
    logged and the gateway runs on without the endpoint (the endpoint is for people, not for safety)."""
    api = LocalApi(gw, sample_s=sample_s)
    if not is_loopback(host):
        log.warning("local API on %s:%d is reachable from the network; it has no authentication", host, port)
    sampler = asyncio.create_task(api.sampler(), name=f"gateway[{gw.cfg.gateway}].local_api.sampler")
    try:
        try:
            await api.http.start(host, port)
            log.info("local API on http://%s:%d (/status, /metrics)", host, port)
        except OSError as e:
            log.error("local API cannot listen on %s:%d: %s; running without it", host, port, e.strerror or e)
        yield api
    finally:
        try:
            await api.http.close()
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
