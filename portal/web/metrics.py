"""Prometheus metrics, one registry per application (so tests may run several portals in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_ingested = Counter("gatehouse_portal_events_ingested", "Events newly stored", registry=r)
        self.events_duplicate = Counter(
            "gatehouse_portal_events_duplicate", "Re-sent events already stored (acknowledged again)", registry=r
        )
        self.rejections = Counter(
            "gatehouse_portal_rejections", "MQTT payloads rejected, by reason", ["reason"], registry=r
        )
        self.acks_sent = Counter("gatehouse_portal_acks_sent", "Acks published to gateways", registry=r)
        self.ws_clients = Gauge("gatehouse_portal_websocket_clients", "Connected console WebSockets", registry=r)
        self.ws_dropped = Counter(
            "gatehouse_portal_websocket_dropped", "Console sockets dropped for falling behind", registry=r
        )
        self.broker_connected = Gauge("gatehouse_portal_broker_connected", "1 while connected to MQTT", registry=r)
        self.ingest_latency = Histogram(
            "gatehouse_portal_ingest_latency_seconds",
            "Event time to stored in the portal",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "gatehouse_portal_store_commit_seconds",
            "Time of one store transaction",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
