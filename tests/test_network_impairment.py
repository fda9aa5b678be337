"""A bad link between the gateway and the broker: delay, loss, a blackhole, refused connections.

Broker, portal and gateway run as real processes inside a private network namespace (its own
loopback), the portal on a clean broker listener and the gateway on one of its own whose port is
impaired. This kernel has no ``sch_netem``, so (see tests/netns_support.py) loss is nftables dropping
packets at random in the kernel, delay is a small relay in the namespace holding each chunk D ms per
direction, and connection attempts are read from an nftables set that records every SYN.
The portal's SQLite file is on the shared filesystem, so results are read from it directly.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from tests import procs
from tests.netns_support import Impairment, Netns, NetnsMosquitto, Relay, missing_requirements, start_relay
from tests.portal_support import write_config as write_portal_config

pytestmark = [pytest.mark.slow, pytest.mark.realtime]

SITE, GW = "s1", "gw1"
RATE = 50  # events per second
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.1, 3.0


def write_gateway_config(folder: Path, port: int, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gateway.yaml"
    path.write_text(
        f"""
site: {SITE}
gateway: {GW}
data_dir: data
mqtt: {{host: 127.0.0.1, port: {port}, keepalive_s: 5, reconnect_min_s: {RECONNECT_MIN_S},
        reconnect_max_s: {RECONNECT_MAX_S}}}
uplink: {{resend_after_s: 2.0, resend_max_s: 8.0}}
loadgen: {{count: {count}, rate: {RATE}}}
""",
        encoding="utf-8",
    )
    return path


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


@dataclass
class Rig:
    tmp: Path
    ns: Netns
    broker: NetnsMosquitto
    portal: procs.Child
    count: int
    gateway: procs.Child | None = None
    relay: Relay | None = None
    children: list[procs.Child] = field(default_factory=list)

    @property
    def portal_db(self) -> Path:
        return self.tmp / "portal" / "data" / "portal.db"

    @property
    def gateway_db(self) -> Path:
        return self.tmp / "gw" / "data" / "gateway.db"

    def portal_rows(self) -> list[tuple[int, int, float, float]]:
        """(seq, loadgen number, event time, stored time) of each stored event, in seq order."""
        rows = procs.read_rows(
            self.portal_db,
            "SELECT seq, data, ts, received_at FROM events WHERE gateway = ? AND type = 'test.synthetic' ORDER BY seq",
            GW,
        )
        return [(s, json.loads(d)["n"], _ts(t), _ts(r)) for s, d, t, r in rows]

    def stored(self) -> int:
        rows = procs.read_rows(self.portal_db, "SELECT count(*) FROM events WHERE gateway = ?", GW)
        return int(rows[0][0]) if rows else 0

    def produced(self) -> int:
        rows = procs.read_rows(self.gateway_db, "SELECT count(*) FROM events")
        return int(rows[0][0]) if rows else 0

    def outbox_depth(self) -> int:
        rows = procs.read_rows(self.gateway_db, "SELECT count(*) FROM outbox")
        return int(rows[0][0]) if rows else -1

    def open_gaps(self) -> list[list[int]]:
        rows = procs.read_rows(self.portal_db, "SELECT open_gaps FROM gateways WHERE gateway = ?", GW)
        return json.loads(rows[0][0]) if rows else []

    def start_gateway(self, port: int) -> procs.Child:
        cfg = write_gateway_config(self.tmp / "gw", port, self.count)
        self.gateway = self.ns.child(
            "gateway", [procs.PY, "-m", "gateway.cli", "gateway", "run", "--config", str(cfg)], self.tmp / "logs"
        )
        self.children.append(self.gateway)
        return self.gateway.start()

    def gateway_log(self) -> str:
        return self.gateway.tail(10**7) if self.gateway else ""

    def logs(self) -> str:
        gw = self.gateway.tail() if self.gateway else ""
        relay = self.relay.child.tail() if self.relay else ""
        return f"--- gateway\n{gw}\n--- portal\n{self.portal.tail()}\n--- relay\n{relay}"


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Callable[[int], Rig]]:
    problems = missing_requirements()
    if problems:
        pytest.fail("the network impairment tests cannot run here: " + "; ".join(problems), pytrace=False)
    made: list[Rig] = []
    namespaces: list[Netns] = []
    brokers: list[NetnsMosquitto] = []

    def make(count: int) -> Rig:
        ns = Netns()
        namespaces.append(ns)
        ns.create()
        broker = NetnsMosquitto(ns, tmp_path / "broker")
        brokers.append(broker)
        broker.start()
        pcfg = write_portal_config(tmp_path / "portal", broker, gateways=[(SITE, GW)])
        portal = ns.child("portal", [procs.PY, "-m", "portal", "run", "--config", str(pcfg)], tmp_path / "logs")
        rig = Rig(tmp_path, ns, broker, portal, count, children=[portal])
        made.append(rig)
        portal.start()
        return rig

    try:
        yield make
    finally:
        for rig in made:
            for child in reversed(rig.children):
                child.stop()
            if rig.relay:
                rig.relay.stop()
        for broker in brokers:
            broker.stop()
        for ns in namespaces:
            ns.close()


def assert_exactly_once(rig: Rig) -> None:
    rows = rig.portal_rows()
    assert len(rows) == rig.count, f"{len(rows)} of {rig.count} stored\n{rig.logs()}"
    assert [r[0] for r in rows] == list(range(1, rig.count + 1)), "seqs must be 1..N with no gap or duplicate"
    assert [r[1] for r in rows] == list(range(1, rig.count + 1)), "each event exactly once, in production order"
    assert rig.open_gaps() == [], "the portal still counts a gap"
    procs.wait(lambda: rig.outbox_depth() == 0, 20, "the gateway's outbox to drain", rig)


def test_delay_and_loss_latency_degrades_gracefully(rig_factory: Callable[[int], Rig]) -> None:
    """100 ms each way and 5 % loss each way for 20 s at 50 events/s: nothing lost or doubled, p99 a
    few seconds at most; then the link is repaired and the outbox drains."""
    rig = rig_factory(RATE * 20)
    rig.relay = start_relay(rig.ns, rig.broker.gateway_port, rig.tmp / "logs", delay_ms=100)
    imp = Impairment(rig.ns, rig.relay.port)
    imp.loss(5)
    rig.start_gateway(rig.relay.port)
    procs.wait(lambda: rig.produced() >= rig.count, 60, f"all {rig.count} events produced", rig)
    dropped = imp.dropped()
    imp.clear()
    rig.relay.set_delay(0)
    repaired = time.time()
    procs.wait(lambda: rig.stored() >= rig.count, 60, f"all {rig.count} stored after the repair", rig)
    assert_exactly_once(rig)

    lat = [got - made for _, _, made, got in rig.portal_rows() if made < repaired - 1]
    p50, p99 = pct(lat, 50) * 1000, pct(lat, 99) * 1000
    connects = rig.gateway_log().count("uplink connected")
    print(
        f"\n100 ms each way + 5 % loss, {RATE}/s: {len(lat)} events, p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
        f"max {max(lat) * 1000:.0f} ms; {dropped} packets dropped; {connects} connection(s)"
    )
    assert dropped > 0, "the loss rule never dropped a packet: the test did not test anything"
    assert len(lat) >= rig.count // 2
    assert p50 >= 100, f"p50 {p50:.0f} ms is below the one-way delay: the relay was not in the path"
    assert p99 < 3000, f"p99 {p99:.0f} ms: latency did not degrade gracefully"
    assert connects == 1, "5 % loss must not cost the connection"


def test_refused_then_blackholed_reconnects_with_backoff(rig_factory: Callable[[int], Rig]) -> None:
    """Connections refused for 10 s, then a blackhole (every packet dropped) for 15 s, while events keep
    coming. The reconnect attempts (SYNs seen by the kernel) are few and spaced by a capped exponential
    backoff, and once the link is back every event arrives exactly once."""
    rig = rig_factory(RATE * 36)
    port = rig.broker.gateway_port
    imp = Impairment(rig.ns, port)
    rig.start_gateway(port)
    procs.wait(lambda: rig.stored() >= 100, 30, "the first events", rig)

    # Refused: each attempt fails at once, so the spacing is the gateway's backoff and nothing else.
    t0 = time.monotonic()
    imp.refuse()
    time.sleep(10)
    refused = [a for a in imp.attempts() if a >= t0]
    imp.clear()
    procs.wait(lambda: rig.gateway_log().count("uplink connected") >= 2, 15, "the reconnect after the refusal", rig)
    at_reconnect = rig.stored()
    procs.wait(lambda: rig.stored() > at_reconnect + 50, 15, "events flowing again", rig)

    # Blackhole: nothing answers; keepalive (5 s) must notice, and attempts wait out the connect timeout.
    downs_before = rig.gateway_log().count("down:")
    t1 = time.monotonic()
    imp.blackhole()
    time.sleep(15)
    blackholed = [a for a in imp.attempts() if a >= t1]
    noticed = rig.gateway_log().count("down:") - downs_before
    imp.clear()
    procs.wait(lambda: rig.stored() >= rig.count, 60, f"all {rig.count} stored after the blackhole", rig)
    assert_exactly_once(rig)

    gaps = [b - a for a, b in itertools.pairwise(refused)]
    print(
        f"\nrefused 10 s: {len(refused)} attempts, gaps {[round(g, 2) for g in gaps]} s; "
        f"blackhole 15 s: {len(blackholed)} attempts, {noticed} disconnect(s) noticed"
    )
    assert 4 <= len(refused) <= 30, f"{len(refused)} attempts in 10 s: no backoff (or no retrying at all)"
    # Attempt n waits uniform(0, min(max, min * 2**n)); the first attempt's n is 0 or 1, and 0.5 s is slack
    # for a loaded machine. With these settings a fixed retry interval fails one check or the other, and
    # real backoff fails the growth check less than once in 10,000 runs (simulated).
    for j, g in enumerate(gaps, start=1):
        bound = min(RECONNECT_MAX_S, RECONNECT_MIN_S * 2 ** (j + 1)) + 0.5
        assert g <= bound, f"gap {j} was {g:.2f}s, above the backoff's {bound:.2f}s: {gaps}"
    early, late = gaps[:2], gaps[3:]
    assert late and sum(late) / len(late) > sum(early) / len(early) + 0.1, f"the gaps did not grow: {gaps}"
    assert noticed >= 1, "the gateway never noticed the blackhole (keepalive)"
    assert 1 <= len(blackholed) <= 6, f"{len(blackholed)} attempts during a 15 s blackhole"
    broker_log = rig.broker.log_text()
    assert broker_log.count(f"as gatehouse-{SITE}-{GW}") >= 3, "the broker saw fewer than three sessions"
