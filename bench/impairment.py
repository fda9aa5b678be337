"""Impairment benchmark: event latency from the gateway's engine to the portal's store over a bad link.

Mosquitto, ``python -m portal run`` and ``gatehouse gateway run`` (its synthetic source at a steady
rate) run in a private network namespace; the gateway dials the broker through a relay that delays
each direction, and nftables drops a share of the packets on that hop (this kernel has no netem; see
tests/netns_support.py). One stream runs through six conditions in turn — 0 / 50 / 100 ms each way,
times 0 / 5 % loss each way — and each event is counted under the condition it was made in, after a
settling second. Latency is event time (the gateway's commit) to the portal's commit.

Needs root, iproute2 and nftables (``make test`` installs nftables).
Usage: python bench/impairment.py [--rate 50] [--window 6]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.children import pct  # noqa: E402
from tests import procs  # noqa: E402
from tests.netns_support import Impairment, Netns, NetnsMosquitto, missing_requirements, start_relay  # noqa: E402

CONDITIONS = [(0, 0), (50, 0), (100, 0), (0, 5), (50, 5), (100, 5)]  # (ms each way, % loss each way)
SETTLE_S = 1.5


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _rows(db: Path) -> list[tuple[int, float, float]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT seq, ts, received_at FROM events WHERE gateway = 'gwimp'").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()
    return [(s, _ts(t), _ts(r)) for s, t, r in rows]


def run(tmp: Path, rate: float, window: float) -> list[dict[str, float]]:
    count = int(rate * (window * len(CONDITIONS) + 3))
    with Netns("ghbench") as ns:
        broker = NetnsMosquitto(ns, tmp / "broker").start()
        started: list[procs.Child] = []
        relay = None
        try:
            (tmp / "portal").mkdir()
            pcfg = tmp / "portal" / "portal.yaml"
            pcfg.write_text(f"""data_dir: data
log_level: WARNING
listen: {{host: 127.0.0.1, port: 0}}
mqtt: {{host: 127.0.0.1, port: {broker.port}, client_id: bench-portal-imp}}
gateways: [{{site: bench, gateway: gwimp}}]
""")
            portal = ns.child("portal", [procs.PY, "-m", "portal", "run", "--config", str(pcfg)], tmp / "logs")
            started.append(portal.start())
            relay = start_relay(ns, broker.gateway_port, tmp / "logs")
            imp = Impairment(ns, relay.port)
            (tmp / "gw").mkdir()
            gcfg = tmp / "gw" / "gateway.yaml"
            gcfg.write_text(f"""site: bench
gateway: gwimp
data_dir: data
log_level: WARNING
mqtt: {{host: 127.0.0.1, port: {relay.port}}}
uplink: {{resend_after_s: 2.0, resend_max_s: 8.0}}
loadgen: {{count: {count}, rate: {rate}}}
""")
            gateway = ns.child(
                "gateway", [procs.PY, "-m", "gateway.cli", "gateway", "run", "--config", str(gcfg)], tmp / "logs"
            )
            started.append(gateway.start())
            db = tmp / "portal" / "data" / "portal.db"
            deadline = time.monotonic() + 30
            while not _rows(db):
                if time.monotonic() > deadline or not gateway.alive or not portal.alive:
                    raise SystemExit(
                        f"no event reached the portal\n--- gateway\n{gateway.tail(1500)}\n"
                        f"--- portal\n{portal.tail(1500)}"
                    )
                time.sleep(0.1)
            switches = []
            for delay_ms, loss in CONDITIONS:
                relay.set_delay(delay_ms)
                imp.loss(loss)
                switches.append(time.time())
                time.sleep(window)
            switches.append(time.time())
            imp.clear()
            relay.set_delay(0)
            deadline = time.monotonic() + 30
            while len(rows := _rows(db)) < count and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            for child in reversed(started):
                child.stop()
            if relay is not None:
                relay.stop()
            broker.stop()
    if sorted(s for s, _, _ in rows) != list(range(1, count + 1)):
        raise SystemExit(f"events lost or doubled: {len(rows)} stored of {count}\n{gateway.tail(1500)}")
    results = []
    for i, (delay_ms, loss) in enumerate(CONDITIONS):
        lo, hi = switches[i] + SETTLE_S, switches[i + 1]
        lat = [(got - made) * 1000 for _, made, got in rows if lo <= made < hi]
        results.append(
            {
                "delay_ms": delay_ms,
                "loss_pct": loss,
                "events": len(lat),
                "p50_ms": pct(lat, 50),
                "p95_ms": pct(lat, 95),
                "p99_ms": pct(lat, 99),
                "max_ms": max(lat),
            }
        )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=50.0, help="events per second")
    ap.add_argument("--window", type=float, default=6.0, help="seconds per condition")
    args = ap.parse_args()
    if args.window <= SETTLE_S + 1:
        ap.error(f"--window must be more than {SETTLE_S + 1} s")
    problems = missing_requirements()
    if problems:
        raise SystemExit("bench/impairment.py cannot run here: " + "; ".join(problems))
    with tempfile.TemporaryDirectory(prefix="gatehouse-bench-") as d:
        results = run(Path(d), args.rate, args.window)
    for r in results:
        print(
            f"{r['delay_ms']:>3} ms each way, {r['loss_pct']} % loss: {r['events']} events, "
            f"p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, max {r['max_ms']:.0f} ms"
        )
    out: dict[str, float] = {"rate_per_s": args.rate}
    for r in results:
        key = f"delay{r['delay_ms']}_loss{r['loss_pct']}"
        out[f"{key}_p50_ms"] = round(r["p50_ms"], 1)
        out[f"{key}_p99_ms"] = round(r["p99_ms"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
