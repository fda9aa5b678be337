"""A burst through an uplink slower than it: alarms and tamper go ahead of routine events queued before them.

First the uplink's two lanes in process, against a real Mosquitto and an acknowledger standing in for the portal
(the window full, a resend, each lane's cursor); then end to end with real processes: ``gatehouse gateway run``
with its synthetic source making 1,000 events in one second (every 20th an alarm or a tamper), Mosquitto, and
``python -m portal run`` with a guard on the console socket, asked for pages all the while.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import psutil
import pytest

from gateway import wire
from gateway.events import Draft
from gateway.store import URGENT_PRIORITY, Store
from gateway.tooling.broker import MosquittoProcess
from gateway.uplink import Uplink
from tests import procs
from tests.portal_support import sign_in_console
from tests.portal_support import write_config as write_portal_config
from tests.test_uplink import Acker, _cfg, _until, running

pytestmark = [pytest.mark.timeout(180), pytest.mark.realtime]

PLACE = wire.Place(site="s1")
EVENTS, RATE, ALARM_EVERY = 1000, 1000, 20
GUARD, GUARD_PW = "guard1", "guard-password-0001"
QUIET_S = 3.0


def _routine(n: int) -> list[Draft]:
    return [Draft(type="access.granted", device="r1", place=PLACE) for _ in range(n)]


async def test_urgent_events_jump_a_full_window_and_resends_cover_both_lanes(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    acker = Acker(broker.port)
    acker.ack = False
    async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
        up = Uplink(_cfg(broker, window=50, batch_max=10, resend_after_s=0.5, resend_max_s=1.0), store)
        async with running(acker.run(), up.run()):
            await store.append(_routine(200))  # seqs 1..200
            await _until(lambda: len(acker.seen) >= 50)
            await asyncio.sleep(0.2)
            assert sorted(acker.seen) == list(range(1, 51))  # the window is full
            urgent = await store.append(
                [
                    Draft(type="zone.tamper", device="p", place=PLACE, priority=wire.Priority.TAMPER),
                    Draft(type="zone.alarm", device="p", place=PLACE, priority=wire.Priority.FIRE),
                    Draft(type="device.offline", device="p", place=PLACE, priority=wire.Priority.FAULT),  # routine lane
                ]
            )
            assert [e.seq for e in urgent] == [201, 202, 203]
            # Nobody acknowledges: the resend starts over, and the urgent lane goes first.
            await _until(lambda: up.stats.resends >= 1 and len(acker.seen) >= 100)
            assert acker.seen[50:52] == [201, 202]
            assert acker.seen[52:54] == [1, 2]
            assert 203 not in acker.seen  # a fault is routine: it waits its turn
            # Acknowledged from now on: every event of both lanes is sent until none is left.
            acker.ack = True
            async with asyncio.timeout(15):
                while await store.outbox_depth():
                    await store.append([])  # the acknowledgements' deletes committed
                    await asyncio.sleep(0.05)
            assert sorted(set(acker.seen)) == list(range(1, 204))
            assert up.stats.urgent_sent >= 4  # 201 and 202, sent and re-sent


# ---------------------------------------------------------------- end to end


def _rows(db: Path) -> list[tuple[int, int, int, str, str, str]]:
    """(pk, seq, priority, type, data, ts) of the burst at the portal, in the order it arrived."""
    return procs.read_rows(
        db, "SELECT pk, seq, priority, type, data, ts FROM events WHERE type LIKE 'test.%' ORDER BY pk"
    )


async def test_a_burst_of_1000_alarms_first_memory_bounded_console_responsive(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    pcfg = write_portal_config(tmp_path / "portal", broker, gateways=[("s1", "gw1")], extra="ws_queue_max: 8192\n")
    pw = tmp_path / "guard.pass"
    pw.write_text(GUARD_PW)
    pw.chmod(0o600)
    await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "portal",
            "adduser",
            "--config",
            str(pcfg),
            "--user",
            GUARD,
            "--role",
            "guard",
            "--password-file",
            str(pw),
        ],
        check=True,
        capture_output=True,
    )
    gcfg = tmp_path / "gw" / "gateway.yaml"
    gcfg.parent.mkdir()
    # A small window: the uplink drains a few hundred events a second, well below the burst's 1,000.
    gcfg.write_text(
        f"site: s1\ngateway: gw1\ndata_dir: data\nlocal_api: {{enabled: false}}\n"
        f"mqtt: {{host: 127.0.0.1, port: {broker.port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}\n"
        "uplink: {window: 20, batch_max: 10}\n"
        f"loadgen: {{count: {EVENTS}, rate: {RATE}, alarm_every: {ALARM_EVERY}, "
        f"start_after_s: {QUIET_S}}}\n"
    )
    portal = await asyncio.to_thread(lambda: procs.portal(pcfg, tmp_path / "logs").start())
    gateway: procs.Child | None = None
    url = portal.info["url"]
    incidents: set[int] = set()
    slowest = {"console": 0.0, "health": 0.0}
    requests = 0
    rss: list[int] = []
    try:
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=aiohttp.ClientTimeout(total=10)
        ) as http:
            await sign_in_console(http, url, GUARD, GUARD_PW)
            async with http.ws_connect(url + "ws", headers={"Origin": url.rstrip("/")}) as ws:

                async def listen() -> None:
                    async for msg in ws:
                        m = json.loads(msg.data)
                        if m.get("kind") == "incident" and str(m["incident"]["type"]).startswith("test."):
                            incidents.add(int(m["incident"]["data"]["n"]))

                async def probe() -> None:
                    nonlocal requests
                    while True:
                        for name, path in (("console", "console"), ("health", "api/health")):
                            t0 = time.perf_counter()
                            async with http.get(url + path, allow_redirects=False) as r:
                                await r.read()
                                assert r.status == 200, (path, r.status)
                            slowest[name] = max(slowest[name], time.perf_counter() - t0)
                            requests += 1
                        await asyncio.sleep(0.05)

                gw = procs.gateway(gcfg, tmp_path / "logs")
                gateway = await asyncio.to_thread(gw.start)
                assert gateway.proc is not None
                proc = psutil.Process(gateway.proc.pid)
                await asyncio.sleep(QUIET_S - 1.5)  # ready and connected, the burst not begun
                baseline = proc.memory_info().rss

                async def sample() -> None:
                    while True:
                        rss.append(proc.memory_info().rss)
                        await asyncio.sleep(0.05)

                tasks = [asyncio.create_task(c) for c in (listen(), probe(), sample())]
                try:
                    deadline = time.monotonic() + 60
                    rows = _rows(tmp_path / "portal" / "data" / "portal.db")
                    while len(rows) < EVENTS or len(incidents) < EVENTS // ALARM_EVERY:
                        assert time.monotonic() < deadline, (len(rows), len(incidents), gateway.tail())
                        assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
                        await asyncio.sleep(0.2)
                        rows = _rows(tmp_path / "portal" / "data" / "portal.db")
                finally:
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                async with http.get(url + "api/health") as r:
                    health = (await r.json())["gateways"][0]
    finally:
        if gateway is not None:
            await asyncio.to_thread(gateway.stop)
        await asyncio.to_thread(portal.stop)

    # Every event exactly once.
    numbers = sorted(json.loads(d)["n"] for _, _, _, _, d, _ in rows)
    assert numbers == list(range(1, EVENTS + 1))
    assert sorted(seq for _, seq, _, _, _, _ in rows) == list(range(1, EVENTS + 1))
    made = [datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() for *_, ts in rows]
    assert max(made) - min(made) < 1.5, "the burst took longer than it should: the test measures nothing"
    # Alarms ahead of the routine events made before them.
    pos = {seq: i for i, (_, seq, *_rest) in enumerate(rows)}
    routine = [seq for _, seq, prio, *_rest in rows if prio < URGENT_PRIORITY]
    alarms = [seq for _, seq, prio, *_rest in rows if prio >= URGENT_PRIORITY]
    assert len(alarms) == EVENTS // ALARM_EVERY
    overtook = [sum(1 for s in routine if s < a and pos[s] > pos[a]) / sum(1 for s in routine if s < a) for a in alarms]
    assert statistics.median(overtook) >= 0.5, overtook
    # The portal noticed the transient gaps, all filled, none taken for a loss.
    assert health["gaps_noticed"] >= 1 and health["gaps_open"] == 0, health
    assert "still open after" not in portal.tail(200_000)
    # Memory bounded, the console responsive, the alarm incidents on its socket.
    assert max(rss) - baseline < 20 * 2**20, (baseline, max(rss))
    assert requests >= 10 and max(slowest.values()) < 1.5, (requests, slowest)
    assert incidents == {n for n in range(1, EVENTS + 1) if n % ALARM_EVERY == 0}
