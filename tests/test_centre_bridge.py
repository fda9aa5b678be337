"""An estate joins the centre over a WAN that goes silent for a minute: nothing is lost.

Two Mosquitto processes: the estate's, with the bridge exactly as scripts/estate-bridge.sh renders it from
systemd/mosquitto-estate-bridge.conf, and the centre's, reached through a relay the test controls (the WAN). A real
gateway (with its load generator: routine events, an alarm or a tamper every 10th) talks to the estate's broker; the
centre's portal talks to the centre's. For a full minute the relay drops every byte both ways and leaves new
connections hanging, as a WAN that loses its packets does: no RST, no FIN, each end must notice by itself. That is
the point of the minute: long enough for the bridge's keepalive to give up and for the gateway to re-send its
unacknowledged window several times into the estate's queue, where the copies wait with the rest. In the middle of
the cut the estate's broker is SIGKILLed and started again: it saves its queues every 30 s, not after every change
(systemd/mosquitto-gatehouse.conf), so part of the backlog dies with it, and the gateway's outbox must make up for it.

Checked: the centre's console shows the estate's link down while the WAN is silent (the bridge's last will) and
up again after; nothing is stored during the cut; afterwards every event is stored exactly once and in sequence,
and the gateway's outbox is empty, so every acknowledgement made its way back across the bridge (an event leaves
the outbox only when the centre's portal has stored it and said so).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from gateway.tooling.broker import MosquittoProcess
from tests import procs
from tests.balancer import Balancer
from tests.portal_support import ROOT, add_user, devices, running_portal, write_config

pytestmark = pytest.mark.slow

SITE, GW = "s1", "gw1"
COUNT = 900
RATE = 10.0  # events a second: the flow goes on through the cut (90 s in all)
CUT_S = 60.0
KEEPALIVE_S = 10


def render_bridge(tmp: Path, centre_port: int) -> Path:
    """The shipped bridge, rendered by the shipped script into a folder the estate's broker includes."""
    pw = tmp / "bridge.password"
    pw.write_text("bridge-secret-pw\n")
    pw.chmod(0o600)
    inc = tmp / "estate-conf.d"
    inc.mkdir()
    out = inc / "centre-bridge.conf"
    r = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "estate-bridge.sh"),
            "--site",
            SITE,
            "--centre",
            f"127.0.0.1:{centre_port}",
            "--user",
            f"bridge-{SITE}",
            "--password-file",
            str(pw),
            "--plain",
            "--keepalive",
            str(KEEPALIVE_S),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert f"user bridge-{SITE}" in r.stdout  # the ACL block for the centre's broker
    return inc


def test_the_bridge_script_refuses_what_would_leak_or_not_work(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("pw\n")
    pw.chmod(0o644)
    base = [
        "bash",
        str(ROOT / "scripts" / "estate-bridge.sh"),
        "--centre",
        "c.example:8883",
        "--user",
        "bridge-s1",
        "--out",
        str(tmp_path / "out.conf"),
    ]
    cases = {
        "readable by others": [*base, "--site", "s1", "--password-file", str(pw), "--plain"],
        "--site": [*base, "--site", "s1/../#", "--password-file", str(pw), "--plain"],
        "--cafile": [*base, "--site", "s1", "--password-file", str(pw)],
    }
    pw2 = tmp_path / "pw2"
    pw2.write_text("pw\n")
    pw2.chmod(0o600)
    cases["--cafile"][cases["--cafile"].index(str(pw))] = str(pw2)
    for needle, args in cases.items():
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and needle in r.stderr, (needle, r.stderr)
        assert not (tmp_path / "out.conf").exists()


def test_the_bridges_backlog_is_the_one_the_estates_broker_keeps(tmp_path: Path) -> None:
    """The bridge's queue limit is global, and Mosquitto keeps the last value it reads (conf.d in alphabetical order).
    In a conf.d holding the shipped gatehouse.conf's queue settings (10000 a client), the script's bridge must be the
    one that holds: a persistent session away while 11000 messages come gets all 11000 (rendered as centre-bridge.conf,
    read before gatehouse.conf, it got 10000 and the broker dropped the rest). A folder where a file read after the
    bridge sets the limits again is refused."""
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    shipped = (ROOT / "systemd" / "mosquitto-gatehouse.conf").read_text(encoding="utf-8").splitlines()
    keys = ("max_queued_messages ", "max_queued_bytes ", "queue_qos0_messages ", "persistent_client_expiration ")
    queue_lines = [line for line in shipped if line.startswith(keys)]
    assert any(line.startswith("max_queued_messages ") for line in queue_lines)
    (conf_d / "gatehouse.conf").write_text("\n".join(queue_lines) + "\n", encoding="utf-8")
    pw = tmp_path / "bridge.password"
    pw.write_text("bridge-secret-pw\n")
    pw.chmod(0o600)
    script = ["bash", str(ROOT / "scripts" / "estate-bridge.sh"), "--site", SITE, "--centre", "127.0.0.1:1"]
    script += ["--user", f"bridge-{SITE}", "--password-file", str(pw), "--plain", "--conf-dir", str(conf_d)]
    r = subprocess.run([*script, "--max-queued", "12000"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    broker = MosquittoProcess(tmp_path / "estate", extra_conf=f"include_dir {conf_d}").start()
    try:
        n = 11_000
        topic = f"gatehouse/v1/{SITE}/{GW}/ack"
        got: list[int] = []
        away = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="away", clean_session=False)
        away.connect("127.0.0.1", broker.port)
        away.subscribe(topic, qos=1)
        away.loop(1.0)
        away.disconnect()
        sender = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="sender")
        sender.max_inflight_messages_set(1000)
        sender.connect("127.0.0.1", broker.port)
        sender.loop_start()
        infos = [sender.publish(topic, b"x", qos=1) for _ in range(n)]
        for info in infos:
            info.wait_for_publish(30)
        sender.loop_stop()
        sender.disconnect()
        away.on_message = lambda _c, _u, _m: got.append(1)
        away.connect("127.0.0.1", broker.port)
        deadline = time.monotonic() + 30
        last = -1
        while time.monotonic() < deadline and len(got) != last:
            last = len(got)
            for _ in range(20):
                away.loop(0.05)
        away.disconnect()
        assert len(got) == n
    finally:
        broker.stop()
    (conf_d / "zzz-local.conf").write_text("max_queued_messages 500\n", encoding="utf-8")
    r = subprocess.run(script, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "zzz-local.conf is read after" in r.stderr


async def test_an_estate_bridged_in_loses_nothing_while_the_wan_is_silent_for_a_minute(tmp_path: Path) -> None:
    centre = MosquittoProcess(tmp_path / "centre").start()
    wan = await Balancer([("127.0.0.1", centre.port)]).start()
    estate = MosquittoProcess(tmp_path / "estate", extra_conf=f"include_dir {render_bridge(tmp_path, wan.port)}")
    estate.start()
    gw_cfg = tmp_path / "gw" / "gateway.yaml"
    gw_cfg.parent.mkdir()
    gw_cfg.write_text(
        f"""site: {SITE}
gateway: {GW}
data_dir: data
mqtt: {{host: 127.0.0.1, port: {estate.port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}
uplink: {{resend_after_s: 1.0, resend_max_s: 8.0}}
loadgen: {{count: {COUNT}, rate: {RATE}, alarm_every: 10}}
""",
        encoding="utf-8",
    )
    gateway = procs.gateway(gw_cfg, tmp_path / "logs")
    outbox = tmp_path / "gw" / "data" / "gateway.db"
    cfg = write_config(tmp_path / "portal", centre, client_id="centre-portal")
    # The estate's own guardroom portal on its broker: it stores and shows what comes, and acknowledges nothing, so
    # the gateway deletes an event only when the centre has stored it (docs/centre.md).
    local_cfg = write_config(
        tmp_path / "local", estate, client_id="estate-portal", mqtt_extra=("  acknowledge: false",)
    )

    def logs() -> str:
        return f"{gateway.tail()}\n--- estate broker\n" + (estate.folder / "mosquitto.log").read_text()[-3000:]

    try:
        async with running_portal(cfg) as p, running_portal(local_cfg) as local:
            await add_user(p, "guard1", "guard", "guard1-password-long")
            store = p.services.store

            async def alarms_at_the_estate() -> int:
                return int(
                    (
                        await local.services.store.read(
                            lambda c: c.execute("SELECT count(*) FROM events WHERE priority > 0").fetchone()
                        )
                    )[0]
                )

            async def count() -> int:
                return int((await store.read(lambda c: c.execute("SELECT count(*) FROM events").fetchone()))[0])

            async with devices(p) as new:
                guard = new()
                assert (await guard.sign_in("guard1", "guard1-password-long")).status == 303

                async def link() -> str:
                    r = await guard.get("/api/centre")
                    assert r.status == 200
                    [estate_row] = (await r.json())["estates"]
                    return str(estate_row["link"])

                async def until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline:
                        if await cond():
                            return
                        await asyncio.sleep(0.2)
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs()}")

                gateway.start(wait_ready=False)

                async def flowing() -> bool:
                    return await count() >= 50 and await link() == "up"

                await until(flowing, 60, "events across the bridge and its link up")
                wan.blackhole(True)
                cut_at = time.monotonic()

                async def down() -> bool:
                    return await link() == "down"

                await until(down, 3 * KEEPALIVE_S + 10, "the centre to see the estate's link down")
                frozen = await count()
                heard = await alarms_at_the_estate()
                estate.kill()  # a power cut at the estate: what its broker queued since its last save is gone
                estate.start()
                await asyncio.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
                assert await count() == frozen  # nothing crossed the silent WAN
                # The estate's guardroom heard the alarms of the cut; the outbox kept them for the centre all the same.
                assert await alarms_at_the_estate() > heard
                kept = "SELECT count(*) FROM outbox o JOIN events e ON e.seq = o.seq WHERE e.priority > 0"
                assert procs.read_rows(outbox, kept)[0][0] > 0
                wan.blackhole(False)
                wan.cut()  # what hung on the dead link is gone: the bridge reconnects

                async def all_in() -> bool:
                    rows = procs.read_rows(outbox, "SELECT count(*) FROM outbox")
                    return await count() >= COUNT and bool(rows) and rows[0][0] == 0 and await link() == "up"

                await until(all_in, 120, "every event stored and acknowledged across the bridge")

            rows = await store.read(
                lambda c: [
                    tuple(r)
                    for r in c.execute(
                        "SELECT seq, id, data FROM events WHERE site = ? AND gateway = ? ORDER BY seq", (SITE, GW)
                    )
                ]
            )
            assert [r[0] for r in rows] == list(range(1, COUNT + 1))
            assert len({r[1] for r in rows}) == COUNT
            assert frozen < COUNT  # the cut fell in the middle of the flow
            snap = store.gateways[(SITE, GW)]
            assert (snap.contiguous_seq, snap.max_seq, snap.events_stored) == (COUNT, COUNT, COUNT)
            assert p.services.ingest.health()["rejections"] == {}
    finally:
        gateway.stop()
        estate.stop()
        await wan.close()
        centre.stop()
