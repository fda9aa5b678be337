"""Uplink benchmark: durable events per second from the gateway's engine to rows in the portal's store.

Three measurements in one run, all on this machine and one Mosquitto of our own:

1. ceiling — the raw QoS-1 publish rate of one paho client (one small message per event, waiting for
   every PUBACK), the most one MQTT connection does here;
2. throughput — ``gatehouse gateway run`` with its synthetic source as fast as the store takes it,
   through the outbox, the broker and ``python -m portal run`` to committed rows (and acks back);
3. latency — the same at 1,000 events/s: event time (stamped when the gateway commits it) to the
   portal's commit, p50/p95/p99.

Usage: python bench/uplink.py [--events 30000] [--rate-events 10000]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.tooling.broker import MosquittoProcess  # noqa: E402
from tests import procs  # noqa: E402


def ceiling(port: int, n: int, size: int = 260) -> float:
    done = threading.Event()
    acked = 0

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-ceiling")
    c.on_publish = on_publish
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", port)
    c.loop_start()
    payload = b"x" * size
    t0 = time.perf_counter()
    for _ in range(n):
        c.publish("bench/ceiling", payload, qos=1)
    done.wait(120)
    dt = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    return n / dt


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_pipeline(tmp: Path, broker: MosquittoProcess, name: str, count: int, rate: float) -> dict[str, float]:
    folder = tmp / name
    (folder / "gw").mkdir(parents=True)
    (folder / "portal").mkdir(parents=True)
    gcfg = folder / "gw" / "gateway.yaml"
    gcfg.write_text(f"""site: bench
gateway: {name}
data_dir: data
log_level: WARNING
mqtt: {{host: 127.0.0.1, port: {broker.port}}}
loadgen: {{count: {count}, rate: {rate}}}
""")
    pcfg = folder / "portal" / "portal.yaml"
    pcfg.write_text(f"""data_dir: data
log_level: WARNING
listen: {{host: 127.0.0.1, port: 0}}
mqtt: {{host: 127.0.0.1, port: {broker.port}, client_id: bench-portal-{name}}}
gateways: [{{site: bench, gateway: {name}}}]
""")
    portal = procs.portal(pcfg, folder / "logs").start()
    db = folder / "portal" / "data" / "portal.db"
    gateway = procs.gateway(gcfg, folder / "logs").start()
    try:
        deadline = time.monotonic() + 120
        stored = 0
        while time.monotonic() < deadline:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            stored = conn.execute("SELECT count(*) FROM events WHERE gateway = ?", (name,)).fetchone()[0]
            conn.close()
            if stored >= count:
                break
            time.sleep(0.2)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        rows = conn.execute("SELECT ts, received_at FROM events WHERE gateway = ?", (name,)).fetchall()
        conn.close()
    finally:
        gateway.stop()
        portal.stop()
    if len(rows) < count:
        raise SystemExit(f"{name}: only {len(rows)} of {count} events stored; logs in {folder / 'logs'}")
    made = [_ts(t) for t, _ in rows]
    got = [_ts(r) for _, r in rows]
    lat = sorted((g - m) * 1000 for m, g in zip(made, got, strict=True))
    span = max(got) - min(made)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))]

    return {
        "events": len(rows),
        "events_per_s": len(rows) / span,
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "mean_ms": statistics.fmean(lat),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=30000, help="events for the throughput run")
    ap.add_argument("--rate-events", type=int, default=10000, help="events for the 1,000/s latency run")
    ap.add_argument("--ceiling-messages", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gatehouse-bench-") as d:
        tmp = Path(d)
        broker = MosquittoProcess(tmp / "broker", max_queued=100000).start()
        try:
            ceil = ceiling(broker.port, args.ceiling_messages)
            print(f"ceiling: one paho client, QoS 1, 260-byte messages: {ceil:,.0f} msg/s")
            thr = run_pipeline(tmp, broker, "gwmax", args.events, 1e9)
            print(
                f"durable: {thr['events']:,} events gateway engine -> portal rows: {thr['events_per_s']:,.0f} "
                f"events/s ({thr['events_per_s'] / ceil:.2f}x the ceiling)"
            )
            lat = run_pipeline(tmp, broker, "gw1k", args.rate_events, 1000)
            print(
                f"latency at 1,000 events/s over {lat['events']:,} events: p50 {lat['p50_ms']:.1f} ms, "
                f"p95 {lat['p95_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms"
            )
        finally:
            broker.stop()
    print(
        json.dumps(
            {
                "ceiling_paho_qos1_msgs_per_s": round(ceil),
                "durable_events_per_s": round(thr["events_per_s"]),
                "ratio_to_ceiling": round(thr["events_per_s"] / ceil, 3),
                "throughput_run_p99_ms": round(thr["p99_ms"], 1),
                "at_1000_per_s_p50_ms": round(lat["p50_ms"], 2),
                "at_1000_per_s_p95_ms": round(lat["p95_ms"], 2),
                "at_1000_per_s_p99_ms": round(lat["p99_ms"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
