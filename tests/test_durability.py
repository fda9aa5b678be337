"""Durability end to end: 5,000 events from the gateway's engine to the portal's store, exactly once,
in sequence order, while the gateway, the broker or the portal is killed or stopped mid-stream.

Everything here is a real process: Mosquitto, ``gatehouse gateway run`` (with its synthetic event
source, which resumes after a crash from what its store committed) and ``python -m portal run``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.tooling.broker import MosquittoProcess
from tests import procs
from tests.portal_support import write_config as write_portal_config

pytestmark = pytest.mark.slow

COUNT = 5000
SITE, GW = "s1", "gw1"


def write_gateway_config(folder: Path, broker_port: int, *, rate: float = 500, batch_max: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gateway.yaml"
    path.write_text(
        f"""
site: {SITE}
gateway: {GW}
data_dir: data
mqtt: {{host: 127.0.0.1, port: {broker_port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}
uplink: {{resend_after_s: 1.0, resend_max_s: 4.0, batch_max: {batch_max}}}
loadgen: {{count: {COUNT}, rate: {rate}}}
""",
        encoding="utf-8",
    )
    return path


@dataclass
class Rig:
    tmp: Path
    broker: MosquittoProcess
    portal: procs.Child
    gateway: procs.Child
    gateway_cfg: Path
    portal_cfg: Path

    @property
    def portal_db(self) -> Path:
        return self.tmp / "portal" / "data" / "portal.db"

    @property
    def gateway_db(self) -> Path:
        return self.tmp / "gw" / "data" / "gateway.db"

    def portal_rows(self) -> list[tuple[int, int]]:
        """(seq, loadgen number) of every stored event of our gateway, in seq order."""
        rows = procs.read_rows(
            self.portal_db,
            "SELECT seq, data FROM events WHERE gateway = ? AND type = 'test.synthetic' ORDER BY seq",
            GW,
        )
        return [(s, json.loads(d)["n"]) for s, d in rows]

    def stored(self) -> int:
        """How many events of our gateway the portal stored: a count, polled every 0.1 s (reading and parsing every
        row instead took CPU from the processes under test on a small machine)."""
        rows = procs.read_rows(
            self.portal_db, "SELECT count(*) FROM events WHERE gateway = ? AND type = 'test.synthetic'", GW
        )
        return int(rows[0][0]) if rows else 0

    def _gateway_count(self, table: str) -> int:
        rows = procs.read_rows(self.gateway_db, f"SELECT count(*) FROM {table}")
        return int(rows[0][0]) if rows else 0

    def outbox_depth(self) -> int:
        return self._gateway_count("outbox")

    def produced(self) -> int:
        return self._gateway_count("events")

    def restart_gateway(self) -> None:
        self.gateway = procs.gateway(self.gateway_cfg, self.tmp / "logs", name="gateway-2").start()

    def logs(self) -> str:
        return f"--- gateway\n{self.gateway.tail()}\n--- portal\n{self.portal.tail()}"


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(*, start_portal: bool = True, max_queued: int = 1000, **gw: float) -> Rig:
        broker = MosquittoProcess(tmp_path / "broker", max_queued=max_queued).start()
        pcfg = write_portal_config(tmp_path / "portal", broker, gateways=[(SITE, GW)])
        portal = procs.portal(pcfg, tmp_path / "logs")
        if start_portal:
            portal.start()
        gcfg = write_gateway_config(tmp_path / "gw", broker.port, **gw)  # type: ignore[arg-type]
        gateway = procs.gateway(gcfg, tmp_path / "logs").start()
        rig = Rig(tmp_path, broker, portal, gateway, gcfg, pcfg)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.gateway.stop()
        rig.portal.stop()
        rig.broker.stop()


def assert_exactly_once(rig: Rig) -> None:
    rows = rig.portal_rows()
    seqs = [s for s, _ in rows]
    numbers = [n for _, n in rows]
    assert len(rows) == COUNT, f"{len(rows)} stored\n{rig.logs()}"
    assert seqs == list(range(1, COUNT + 1)), "seqs must be 1..N with no gap or duplicate"
    assert numbers == list(range(1, COUNT + 1)), "each produced event exactly once, in production order"
    procs.wait(lambda: rig.outbox_depth() == 0, 20, "the gateway's outbox to drain after the acks", rig)


def test_gateway_killed_mid_stream(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    procs.wait(lambda: rig.stored() >= 1500, 60, "1500 events", rig)
    rig.gateway.kill()  # SIGKILL: no goodbye, whatever was in memory is gone
    at_kill = rig.stored()
    assert at_kill < COUNT
    rig.restart_gateway()
    procs.wait(lambda: rig.stored() >= COUNT, 90, f"all {COUNT} after the restart", rig)
    assert_exactly_once(rig)


def test_broker_stopped_for_30_seconds(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(rate=150)  # slow enough that the stream is still going when the broker comes back
    procs.wait(lambda: rig.stored() >= 800, 60, "800 events", rig)
    rig.broker.stop()
    time.sleep(30)
    rig.broker.start()
    procs.wait(lambda: rig.stored() >= COUNT, 120, f"all {COUNT} after the broker returned", rig)
    assert_exactly_once(rig)


def test_broker_killed_mid_stream(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    procs.wait(lambda: rig.stored() >= 1500, 60, "1500 events", rig)
    rig.broker.kill()
    time.sleep(2)
    rig.broker.start()
    procs.wait(lambda: rig.stored() >= COUNT, 90, f"all {COUNT} after the broker was killed", rig)
    assert_exactly_once(rig)


def test_portal_away_longer_than_the_broker_queues(rig_factory: Callable[..., Rig]) -> None:
    """One event per MQTT message, so 5,000 pile up: more than the broker queues for an offline client (here 200;
    the rest it drops silently). The outbox re-sends what the broker dropped. (The gateway's window shrinks once it
    sees the broker drop, so against Mosquitto's default 1,000 it may never overflow it: that is the point of the
    adaptive window, and a small queue makes sure this test still sees the drop it is about.)"""
    rig = rig_factory(start_portal=False, max_queued=200, batch_max=1, rate=1000)
    # The portal must have subscribed once (a persistent session) for the broker to queue anything.
    rig.portal.start()
    procs.wait(lambda: rig.stored() >= 100, 60, "the first events", rig)
    assert rig.portal.stop() == 0, "the portal must stop cleanly in the middle of a flood"
    at_stop = rig.stored()
    procs.wait(lambda: rig.produced() >= COUNT, 60, f"all {COUNT} produced while the portal is away", rig)

    # The gateway keeps trying meanwhile (it re-sends what stays unacknowledged); the broker queues what it will and
    # drops the rest.
    def broker_log() -> str:
        return (rig.broker.folder / "mosquitto.log").read_text(errors="replace")

    procs.wait(
        lambda: "Outgoing messages are being dropped" in broker_log(),
        30,
        "the broker's queue for the portal to overflow",
        rig,
    )
    assert rig.outbox_depth() >= COUNT - at_stop - 1, "nothing may leave the outbox without the portal's ack"
    rig.portal = procs.portal(rig.portal_cfg, rig.tmp / "logs", name="portal-2").start()
    procs.wait(lambda: rig.stored() >= COUNT, 240, f"all {COUNT} after the portal returned", rig)
    assert_exactly_once(rig)
