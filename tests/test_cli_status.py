"""`gatehouse status` and the local API (`GET /status`, `GET /metrics`) against a running gateway: a real
store, a real Mosquitto, a real Modbus bus polling a firmware stub in its own process, and the
command run as its own process."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import cli, config, wire
from gateway.app import Gateway
from gateway.events import Draft
from gateway.localapi import serve_local_api
from gateway.tooling.broker import MosquittoProcess, free_port
from tests import procs
from tests.stubs import run_stub
from tests.waiting import wait_for

PANEL = "firmware_stubs.perimeter_panel"
CTRL = ("--control", "127.0.0.1:0")

pytestmark = pytest.mark.timeout(90)


def make_config(tmp_path: Path, broker: MosquittoProcess, panel: tuple[str, int], api_port: int) -> Path:
    """A config made the installer's way: init, then device add."""
    cfg = tmp_path / "gateway.yaml"
    host, port = panel
    assert (
        cli.main(
            [
                "init",
                "--config",
                str(cfg),
                "--site",
                "estate-a",
                "--gateway",
                "gw-1",
                "--broker",
                f"127.0.0.1:{broker.port}",
                "--data-dir",
                str(tmp_path / "data"),
            ]
        )
        == 0
    )
    for name, unit in (("fence-1", 1), ("fence-2", 2)):
        assert (
            cli.main(
                [
                    "device",
                    "add",
                    name,
                    "--config",
                    str(cfg),
                    "--profile",
                    "perimeter-panel-8",
                    "--unit",
                    str(unit),
                    "--tcp",
                    f"{host}:{port}",
                    "--bus",
                    "fence",
                    "--poll-ms",
                    "100",
                ]
            )
            == 0
        )
    text = cfg.read_text().replace("  port: 9880", f"  port: {api_port}")
    cfg.write_text(text)
    (tmp_path / "data").mkdir()
    return cfg


async def run_status(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "status",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return int(proc.returncode or 0), out.decode(), err.decode()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_status_and_metrics_of_a_running_gateway(
    tmp_path: Path, broker: MosquittoProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    api_port = free_port()
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-2", *CTRL) as stub:
        cfg = config.load(make_config(tmp_path, broker, stub.endpoint(), api_port))
        capsys.readouterr()
        gw = Gateway(cfg)
        stop = asyncio.Event()
        async with serve_local_api(gw, "127.0.0.1", api_port, sample_s=0.2) as api:
            runner = asyncio.create_task(gw.run(stop), name="test.gateway")
            try:
                await asyncio.wait_for(gw.ready.wait(), 20)
                await wait_for(lambda: gw.uplink.stats.connected, 20, "the uplink to connect")
                await wait_for(lambda: "fence" in gw.drivers, 20, "the bus to start")
                bus = gw.drivers["fence"]
                await wait_for(
                    lambda: all(d.state == "online" for d in bus.stats().devices.values()), 20, "both panels online"
                )
                stored = await gw.store.append(
                    [
                        Draft(
                            type="test.marker",
                            device="fence-1",
                            point="zone3_alarm",
                            place=wire.Place(site="estate-a", zone="north"),
                        )
                    ]
                )
                await asyncio.sleep(1.0)  # a second of polling for the rates (real time: this is end to end)

                rc, out, err = await run_status("--url", f"http://127.0.0.1:{api_port}", "--json")
                assert rc == 0, err
                st = json.loads(out)
                assert (st["site"], st["gateway"], st["ready"]) == ("estate-a", "gw-1", True)
                assert st["broker"]["connected"] is True and st["broker"]["port"] == broker.port
                # No portal here to acknowledge anything: every event stored is still in the outbox.
                assert st["store"] == {"fault": None, "pending": 0, "dropped": 0, "last_seq": stored[0].seq}
                assert st["outbox_depth"] == stored[0].seq
                assert st["last_event"]["type"] == "test.marker" and st["last_event"]["id"] == stored[0].id
                assert st["lines"] == []
                assert st["devices"] == {"online": 2, "offline": 0, "unknown": 0}
                (b,) = st["buses"]
                assert (b["name"], b["kind"], b["connected"]) == ("fence", "modbus-tcp", True)
                by_name = {d["name"]: d for d in b["devices"]}
                assert set(by_name) == {"fence-1", "fence-2"}
                for d in by_name.values():
                    assert d["profile"] == "perimeter-panel-8" and d["poll_ms"] == 100
                    # 100 ms polls of each group; well above 1/s and bounded by what the schedule asks.
                    assert d["poll_rate_hz"] is not None and 3 <= d["poll_rate_hz"] <= 40, d
                    assert d["polls"] > 0 and d["state"] == "online"

                # One panel goes silent: the status says so, once the engine has noticed.
                await stub.post("/silent", {"on": True, "unit": 2})
                await wait_for(lambda: bus.stats().devices["fence-2"].state == "offline", 20, "fence-2 offline")
                rc, out, err = await run_status("--config", str(cfg.source))
                assert rc == 0, err
                lines = out.splitlines()
                assert lines[0].startswith("gateway  estate-a/gw-1  version ") and lines[0].endswith("ready")
                assert lines[1].startswith(f"broker   127.0.0.1:{broker.port} connected (1 connects)")
                last_seq = gw.store.last_seq  # the engine has stored fence-2 going offline since
                assert last_seq > stored[0].seq
                assert lines[2] == f"outbox   {last_seq} events waiting for the portal"
                assert lines[3] == f"store    ok (last seq {last_seq}, 0 pending, 0 dropped)"
                assert lines[4].startswith(f"last     #{last_seq} device.offline fence-2 ")
                assert lines[5] == "devices  1 online, 1 offline, 0 unknown"
                assert lines[7].startswith("bus fence  modbus-tcp 127.0.0.1:") and "connected" in lines[7]
                rows = {ln.split()[0]: ln.split() for ln in lines[9:]}
                assert rows["fence-1"][1:3] == ["1", "online"]
                assert rows["fence-2"][1:3] == ["2", "OFFLINE"]

                api.latency.stored(0.012)
                api.latency.acked(0.3)
                async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{api_port}/metrics") as r:
                    assert r.status == 200
                    assert r.headers["Content-Type"].startswith("text/plain")
                    text = await r.text()
                m = metric_samples(text)
                assert m[("gatehouse_outbox_depth", ())] == gw.store.last_seq
                assert m[("gatehouse_broker_connected", ())] == 1
                assert m[("gatehouse_store_fault", ())] == 0
                assert m[("gatehouse_last_event_seq", ())] == gw.store.last_seq
                dev1 = (("bus", "fence"), ("device", "fence-1"))
                dev2 = (("bus", "fence"), ("device", "fence-2"))
                assert m[("gatehouse_device_polls_total", dev1)] > 0
                assert m[("gatehouse_device_missed_polls_total", dev2)] > 0
                assert m[("gatehouse_device_state", (*dev1, ("state", "online")))] == 1
                assert m[("gatehouse_device_state", (*dev2, ("state", "offline")))] == 1
                assert m[("gatehouse_device_errors_total", (*dev2, ("kind", "timeout")))] > 0
                assert m[("gatehouse_bus_connected", (("bus", "fence"), ("kind", "modbus-tcp")))] == 1
                assert m[("gatehouse_event_latency_seconds_count", (("stage", "stored"),))] == 1
                assert m[("gatehouse_event_latency_seconds_bucket", (("le", "0.025"), ("stage", "stored")))] == 1
                assert m[("gatehouse_event_latency_seconds_bucket", (("le", "0.01"), ("stage", "stored")))] == 0
                assert m[("gatehouse_event_latency_seconds_count", (("stage", "acked"),))] == 1
                assert m[("gatehouse_gateway_process_resident_memory_bytes", ())] > 10e6
            finally:
                stop.set()
                await asyncio.wait_for(runner, 20)


async def test_status_when_no_gateway_answers(tmp_path: Path) -> None:
    port = free_port()
    rc, out, err = await run_status("--url", f"http://127.0.0.1:{port}")
    assert (rc, out) == (1, "")
    assert err.strip() == (
        f"status: cannot reach the gateway at http://127.0.0.1:{port}: [Errno 111] Connection "
        "refused (is it running? sudo systemctl status gatehouse-gateway; is local_api enabled "
        "in its config?)"
    )


async def test_status_of_a_gateway_process(tmp_path: Path, broker: MosquittoProcess) -> None:
    """The daemon as systemd runs it (`gatehouse gateway run`) serves the local API from its config."""
    api_port = free_port()
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-2", *CTRL) as stub:
        cfg = make_config(tmp_path, broker, stub.endpoint(), api_port)
        child = procs.gateway(cfg, tmp_path / "logs")
        await asyncio.to_thread(child.start)
        try:
            deadline = asyncio.get_running_loop().time() + 20
            st: dict[str, Any] = {}
            while asyncio.get_running_loop().time() < deadline:
                rc, out, err = await run_status("--config", str(cfg), "--json")
                if rc == 0:
                    st = json.loads(out)
                    if st["broker"]["connected"] and st["devices"].get("online") == 2:
                        break
                await asyncio.sleep(0.2)
            assert st, f"the gateway's local API never answered: {err}\n{child.tail()}"
            assert (st["site"], st["gateway"], st["ready"]) == ("estate-a", "gw-1", True)
            assert st["broker"]["connected"] is True
            assert st["devices"] == {"online": 2, "offline": 0, "unknown": 0}, st
        finally:
            await asyncio.to_thread(child.stop)


async def test_status_of_a_config_whose_port_another_gateway_answers(tmp_path: Path, broker: MosquittoProcess) -> None:
    """Two gateways on one machine with the same local_api port: the second cannot bind it, and `status
    --config` of the second must not show the first one's buses as its own."""
    api_port = free_port()
    async with run_stub(PANEL, "--tcp", "127.0.0.1:0", "--units", "1-2", *CTRL) as stub:
        cfg = make_config(tmp_path, broker, stub.endpoint(), api_port)
        other = tmp_path / "gw-2.yaml"
        other.write_text(cfg.read_text().replace("gateway: gw-1", "gateway: gw-2"))
        assert config.load(other).local_api.port == api_port
        child = procs.gateway(cfg, tmp_path / "logs")
        await asyncio.to_thread(child.start)
        try:
            rc, out, err = 1, "", ""
            deadline = asyncio.get_running_loop().time() + 20
            while asyncio.get_running_loop().time() < deadline:
                rc, out, err = await run_status("--config", str(cfg), "--json")
                if rc == 0:
                    break
                await asyncio.sleep(0.2)
            assert rc == 0, f"{err}\n{child.tail()}"
            assert json.loads(out)["gateway"] == "gw-1"
            rc, out, err = await run_status("--config", str(other))
            assert (rc, out) == (1, "")
            assert err.strip() == (
                f"status: the gateway answering at http://127.0.0.1:{api_port} is estate-a/gw-1, not estate-a/gw-2 "
                f"of {other}: another gateway holds local_api port {api_port} (give each gateway on this machine its "
                "own local_api.port); estate-a/gw-2 may not be running, or could not open its local API (see its "
                "journal)"
            )
            rc, out, err = await run_status("--config", str(other), "--json")
            assert (rc, out) == (1, "")
        finally:
            await asyncio.to_thread(child.stop)


@pytest.mark.realtime  # a pause held against resend_after on the wall clock
async def test_uplink_counters_in_metrics_after_the_broker_dropped(tmp_path: Path) -> None:
    """``gatehouse gateway run`` (its load generator making 300 events, each sent alone) behind a Mosquitto that
    keeps 60 messages for an absent portal and drops the rest. Once the portal is back and everything is
    acknowledged, ``GET /metrics`` (a real HTTP request to the daemon) tells what the drop cost: events re-sent
    alone because later ones were acknowledged, the window halved and its size now, acks of earlier copies and
    acks ignored; ``GET /status`` says the same."""
    from tests.test_uplink import Acker

    broker = MosquittoProcess(tmp_path / "broker", max_queued=60).start()
    api_port = free_port()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        "site: estate-a\ngateway: gw-1\n"
        f"data_dir: {tmp_path / 'data'}\n"
        f"mqtt: {{host: 127.0.0.1, port: {broker.port}, reconnect_min_s: 0.1, reconnect_max_s: 1}}\n"
        "uplink: {window: 200, batch_max: 1, resend_after_s: 1.0, resend_max_s: 2.0}\n"
        f"local_api: {{port: {api_port}}}\n"
        "loadgen: {count: 300, rate: 2000, start_after_s: 1.0}\n"
    )
    acker = Acker(broker.port)
    acker_task = asyncio.create_task(acker.run())  # the portal's persistent session, then the portal away
    await asyncio.sleep(0.5)
    acker_task.cancel()
    await asyncio.gather(acker_task, return_exceptions=True)
    child = procs.gateway(cfg, tmp_path / "logs")
    await asyncio.to_thread(child.start)
    base = f"http://127.0.0.1:{api_port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def status() -> dict[str, Any]:
                async with http.get(base + "/status") as r:
                    return dict(await r.json())

            await wait_for(lambda: status_ok(status), timeout=20, what="the window of 200 out to the broker")
            await asyncio.sleep(1.5)  # the portal still away: one probe, no copies of the window
            acker_task = asyncio.create_task(acker.run())
            try:

                async def drained() -> bool:
                    st = await status()
                    return st["outbox_depth"] == 0 and st["broker"]["in_flight"] == 0 and st["broker"]["acks"] >= 300

                await wait_for(drained, timeout=40, what="every event acknowledged")
                async with http.get(base + "/metrics") as r:
                    assert r.status == 200
                    m = metric_samples(await r.text())
                st = await status()
            finally:
                acker_task.cancel()
                await asyncio.gather(acker_task, return_exceptions=True)
    finally:
        await asyncio.to_thread(child.stop)
        broker.stop()

    def metric(name: str) -> float:
        return m[(name, ())]

    b = st["broker"]
    # The broker kept 60 of the first 200 and dropped 140: each sent again once, alone, and no copies of the window.
    assert 140 <= metric("gatehouse_uplink_resent_events_total") == b["resent_events"] <= 140 + 2 + 60, b
    assert metric("gatehouse_uplink_lost_resent_total") == b["lost_resent"] <= b["resent_events"]
    assert metric("gatehouse_uplink_window_shrinks_total") == b["window_shrinks"] >= 1
    assert metric("gatehouse_uplink_window") == b["window"] < 200  # halved to 100, growing back slowly
    assert metric("gatehouse_uplink_in_flight") == b["in_flight"] == 0
    assert st["event_loop"] == "asyncio"  # the default; GATEHOUSE_EVENT_LOOP=uvloop for the other
    assert metric("gatehouse_uplink_late_acks_total") == b["late_acks"]
    assert metric("gatehouse_uplink_ignored_acks_total") == b["ignored_acks"]
    assert metric("gatehouse_uplink_acks_total") == b["acks"] >= 300
    assert metric("gatehouse_uplink_events_sent_total") == b["events_sent"] == b["acks"] + b["resent_events"]
    seqs = sorted(set(acker.seen))
    assert seqs == list(range(1, seqs[-1] + 1)) and len(seqs) >= 300, "every event reached the portal"


async def status_ok(status: Any) -> bool:
    try:
        st = await status()
    except Exception:  # not serving yet
        return False
    return bool(st["broker"]["in_flight"] >= 200)
