"""Start-up benchmark: how long a gateway takes to be ready, and what it holds, with 50 devices.

1. ``gatehouse gateway run`` with 50 perimeter panels (16 zones each, 800 zones) on Modbus TCP against
   one stub process: wall time from exec to the ready line (median of several starts), to every device
   online (first successful poll of each), and the process's resident memory once polling.
2. ``gatehouse bus scan`` over a pseudo-terminal: unit ids 1-100 probed (``--scan-ids``), three stub panels
   answering (RTU on the stub's pty), at the CLI's default timeout and tries (``--scan-timeout-ms``): an empty id
   costs two requests, so the whole range 1-247 takes about 2.5 times as long (projected from the measured cost
   of one empty id; scanning it here would not fit the benchmark's minute).

Usage: python bench/startup.py [--starts 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.tooling.broker import MosquittoProcess, free_port  # noqa: E402
from tests import procs  # noqa: E402

PANELS = 50


def config(endpoints: list[str], broker_port: int, api_port: int) -> str:
    lines = [
        "site: bench",
        "gateway: gw1",
        "data_dir: data",
        "log_level: WARNING",
        f"mqtt: {{host: 127.0.0.1, port: {broker_port}}}",
        f"local_api: {{host: 127.0.0.1, port: {api_port}}}",
        "zone_groups: [{name: fence}]",
        "buses:",
    ]
    for i, ep in enumerate(endpoints):
        host, port = ep.split("//", 1)[1].rsplit(":", 1)
        lines.append(f"  - {{name: b{i}, kind: modbus-tcp, host: {host}, port: {port}}}")
    lines.append("devices:")
    lines += [
        f"  - {{name: p{i}, profile: perimeter-panel-16, bus: b{i}, unit: 1, poll_ms: 200}}"
        for i in range(len(endpoints))
    ]
    lines.append("zones:")
    lines += [
        f"  - {{name: p{i}-z{z}, device: p{i}, point: zone{z}_alarm, group: fence}}"
        for i in range(len(endpoints))
        for z in range(1, 17)
    ]
    return "\n".join(lines) + "\n"


def online_count(api_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/status", timeout=2) as r:
            status = json.load(r)
    except OSError:
        return 0
    text = json.dumps(status)
    return text.count('"state": "online"')


def one_start(cfg: Path, logdir: Path, api_port: int, n: int) -> dict[str, float]:
    t0 = time.perf_counter()
    child = procs.gateway(cfg, logdir, name=f"gateway-{n}").start(timeout=60)
    ready = time.perf_counter() - t0
    deadline = time.monotonic() + 30
    while online_count(api_port) < PANELS and time.monotonic() < deadline:
        time.sleep(0.02)
    online = time.perf_counter() - t0
    time.sleep(2)  # polling for a while
    assert child.proc is not None
    rss = psutil.Process(child.proc.pid).memory_info().rss / 2**20
    child.stop()
    return {"ready_s": ready, "all_online_s": online, "rss_mb": rss}


def scan(serial: str, timeout_ms: int, last_id: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "bus",
            "scan",
            "--serial",
            serial,
            "--units",
            f"1-{last_id}",
            "--timeout-ms",
            str(timeout_ms),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.perf_counter() - t0
    if out.returncode not in (0, 1):
        raise SystemExit(f"bus scan failed: {out.stderr[-500:]}")
    return took, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--scan-timeout-ms", type=int, default=100, help="per request, as the CLI's default")
    ap.add_argument("--scan-ids", type=int, default=100, help="scan ids 1 to this (at least 40)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gatehouse-bench-") as d:
        tmp = Path(d)
        broker = MosquittoProcess(tmp / "broker").start()
        stub = procs.Child(
            "stub",
            [
                procs.PY,
                "-m",
                "firmware_stubs.perimeter_panel",
                "--tcp",
                "127.0.0.1:0",
                "--count",
                str(PANELS),
                "--zones",
                "16",
            ],
            tmp / "logs",
        ).start()
        rtu = procs.Child(
            "rtu-stub",
            [procs.PY, "-m", "firmware_stubs.perimeter_panel", "--rtu-pty", "--units", "3,7,40"],
            tmp / "logs",
        ).start()
        try:
            api_port = free_port()
            cfg = tmp / "gateway.yaml"
            cfg.write_text(config(stub.info["endpoints"], broker.port, api_port))
            runs = [one_start(cfg, tmp / "logs", api_port, n) for n in range(args.starts)]
            scan_s, found = scan(rtu.info["serial"], args.scan_timeout_ms, max(40, args.scan_ids))
        finally:
            rtu.stop()
            stub.stop()
            broker.stop()
    ready = statistics.median(r["ready_s"] for r in runs)
    online = statistics.median(r["all_online_s"] for r in runs)
    rss = max(r["rss_mb"] for r in runs)
    units = sorted(h["unit"] for h in json.loads(found)["found"])
    ids = max(40, args.scan_ids)
    # Every id but the three panels' is empty; the panels' own cost is small and counted in with the rest.
    per_empty = scan_s / ids
    print(
        f"gateway with {PANELS} devices ({PANELS * 16} zones): ready in {ready * 1000:.0f} ms (median of "
        f"{args.starts}), every device online in {online * 1000:.0f} ms, {rss:.1f} MB resident while polling"
    )
    print(
        f"bus scan of ids 1-{ids} over a pseudo-terminal at {args.scan_timeout_ms} ms per request, 2 tries: "
        f"{scan_s:.1f} s ({per_empty * 1000:.0f} ms per id); found units {units}; ids 1-247 projected "
        f"{per_empty * 247:.0f} s"
    )
    print(
        json.dumps(
            {
                "devices": PANELS,
                "ready_ms_median": round(ready * 1000),
                "all_online_ms_median": round(online * 1000),
                "rss_mb_max": round(rss, 1),
                "bus_scan_ids": ids,
                "bus_scan_s": round(scan_s, 1),
                "bus_scan_ms_per_id": round(per_empty * 1000),
                "bus_scan_247_ids_projected_s": round(per_empty * 247),
                "bus_scan_tries": 2,
                "bus_scan_timeout_ms": args.scan_timeout_ms,
            }
        )
    )


if __name__ == "__main__":
    main()
