"""A monitoring centre under a flood, with instances dying: three portal processes on one PostgreSQL, one Mosquitto,
four real gateways (``gatehouse gateway run`` with its load generator) and guards' consoles, some connected to an
instance of their own, some through a load balancer.

10,000 events (routine, with an alarm or a tamper every 25th) arrive through the broker's shared subscription. When
3,000 are stored, instance A is SIGKILLed; at 6,500, instance B. The gateways keep every event until an instance
has stored it and said so, so whatever A or B held when it died is sent again and stored by whoever is left.
Then: every event is stored exactly once, every gateway's seqs run 1..2500 without a hole and its bookkeeping says
so, every gateway's outbox is empty (every event was acknowledged), every alarm became (part of) an incident, the
console on C saw every alarm live and the one on B every alarm stored before B died, whichever instance stored it,
and the consoles behind the balancer were moved to a living instance each time theirs died and know every incident
(live, or from the reload when they reconnected), as a guard's page does.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.tooling.broker import MosquittoProcess
from portal.store import Postgres, connect
from tests import procs
from tests.balancer import Balancer
from tests.centre_support import Console, instance_config, share_keys
from tests.portal_support import ROOT
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

GATEWAYS = [("s1", "gw1"), ("s1", "gw2"), ("s2", "gw3"), ("s2", "gw4")]
PER_GATEWAY = 2500
TOTAL = PER_GATEWAY * len(GATEWAYS)
ALARM_EVERY = 25
GUARD, GUARD_PW = "guard1", "guard1-centre-password"
KILL_A_AT, KILL_B_AT = 3000, 6500


def gateway_yaml(folder: Path, site: str, gw: str, broker_port: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gateway.yaml"
    path.write_text(
        f"""site: {site}
gateway: {gw}
data_dir: data
mqtt: {{host: 127.0.0.1, port: {broker_port}, reconnect_min_s: 0.1, reconnect_max_s: 1.0}}
uplink: {{resend_after_s: 1.0, resend_max_s: 4.0, batch_max: 100}}
loadgen: {{count: {PER_GATEWAY}, rate: 150, alarm_every: {ALARM_EVERY}}}
""",
        encoding="utf-8",
    )
    return path


def query(target: Postgres, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = connect(target, readonly=True)
    try:
        return [tuple(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


async def stored(target: Postgres) -> int:
    return int((await asyncio.to_thread(query, target, "SELECT count(*) FROM events"))[0][0])


@pytest.mark.realtime  # B's console must see what the others stored within a second of commit-order slack
async def test_three_instances_store_a_flood_exactly_once_while_two_are_killed(
    tmp_path: Path, broker: MosquittoProcess, pg_target: Postgres
) -> None:
    folders = {name: tmp_path / f"portal-{name}" for name in "abc"}
    configs = {
        name: instance_config(
            f,
            broker_port=broker.port,
            target=pg_target,
            client_id=f"centre-{name}",
            gateways=GATEWAYS,
            extra="ws_queue_max: 50000\n",
        )
        for name, f in folders.items()
    }
    pw = tmp_path / "guard.pw"
    pw.write_text(GUARD_PW)
    r = await asyncio.create_subprocess_exec(
        procs.PY,
        "-m",
        "portal",
        "adduser",
        "--user",
        GUARD,
        "--role",
        "guard",
        "--password-file",
        str(pw),
        "--config",
        str(configs["a"]),
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await r.communicate()
    assert r.returncode == 0, err
    portals: dict[str, procs.Child] = {}
    gateways: list[procs.Child] = []
    consoles: list[Console] = []
    balancer: Balancer | None = None

    def logs() -> str:
        return "\n".join(f"--- {c.name}\n{c.tail(1500)}" for c in [*portals.values(), *gateways])

    try:
        portals["a"] = procs.portal(configs["a"], tmp_path / "logs", "portal-a").start()
        share_keys(folders["a"], [folders["b"], folders["c"]])  # made by the first instance, copied to the others
        for name in "bc":
            portals[name] = procs.portal(configs[name], tmp_path / "logs", f"portal-{name}").start()
        urls = {name: p.info["url"] for name, p in portals.items()}
        balancer = await Balancer([("127.0.0.1", int(u.rstrip("/").rsplit(":", 1)[1])) for u in urls.values()]).start()
        direct = {name: await Console(f"direct-{name}", urls[name], GUARD, GUARD_PW).start() for name in "bc"}
        behind = [await Console(f"lb-{i}", balancer.url, GUARD, GUARD_PW).start() for i in range(3)]
        consoles = [*direct.values(), *behind]
        assert sorted(balancer.active.values()) == [1, 1, 1]  # one console behind the balancer on each instance

        for site, gw in GATEWAYS:
            gateways.append(
                procs.gateway(gateway_yaml(tmp_path / gw, site, gw, broker.port), tmp_path / "logs", f"gateway-{gw}")
            )
        for g in gateways:
            g.start(wait_ready=False)

        async def reached(n: int) -> bool:
            return await stored(pg_target) >= n

        await wait_for(lambda: reached(KILL_A_AT), 120, f"{KILL_A_AT} events stored", step=0.2, context=logs)
        portals["a"].kill()
        killed_a = time.monotonic()
        await wait_for(lambda: reached(KILL_B_AT), 120, f"{KILL_B_AT} events stored", step=0.2, context=logs)
        portals["b"].kill()
        assert await stored(pg_target) < TOTAL, "the flood ended before the second kill: it proves nothing"

        def outboxes_empty() -> bool:
            for _, gw in GATEWAYS:
                rows = procs.read_rows(tmp_path / gw / "data" / "gateway.db", "SELECT count(*) FROM outbox")
                if not rows or rows[0][0]:
                    return False
            return True

        async def all_in() -> bool:
            return await stored(pg_target) >= TOTAL and outboxes_empty()

        await wait_for(all_in, 180, "every event stored and acknowledged", step=0.2, context=logs)

        # exactly once, in sequence per gateway, and the bookkeeping agrees
        assert query(pg_target, "SELECT count(*), count(DISTINCT id) FROM events") == [(TOTAL, TOTAL)]
        for site, gw in GATEWAYS:
            seqs = [
                r[0]
                for r in query(
                    pg_target, "SELECT seq FROM events WHERE site = ? AND gateway = ? ORDER BY seq", site, gw
                )
            ]
            assert seqs == list(range(1, PER_GATEWAY + 1)), (gw, len(seqs))
            ns = sorted(
                json.loads(r[0])["n"]
                for r in query(pg_target, "SELECT data FROM events WHERE site = ? AND gateway = ?", site, gw)
            )
            assert ns == list(range(1, PER_GATEWAY + 1))
            [(contiguous, max_seq, count, gaps)] = query(
                pg_target,
                "SELECT contiguous_seq, max_seq, events_stored, open_gaps FROM gateways WHERE site = ? AND gateway = ?",
                site,
                gw,
            )
            assert (contiguous, max_seq, count, json.loads(gaps)) == (PER_GATEWAY, PER_GATEWAY, PER_GATEWAY, [])

        # every alarm is in an incident, once (the survivor's board folds what is stored, whoever stored it)
        async def folded() -> bool:
            rows = await asyncio.to_thread(
                query, pg_target, "SELECT (SELECT last_pk FROM incident_feed), (SELECT max(pk) FROM events)"
            )
            return bool(rows[0][0] == rows[0][1])

        await wait_for(folded, 30, "the incident feed to reach the last event", step=0.2, context=logs)
        alarms = {r[0]: r[1] for r in query(pg_target, "SELECT id, received_at FROM events WHERE priority >= 20")}
        assert len(alarms) == TOTAL // ALARM_EVERY
        logged = {r[0] for r in query(pg_target, "SELECT event_id FROM incident_log WHERE event_id IS NOT NULL")}
        assert set(alarms) <= logged

        async def seen_by(c: Console, ids: set[str]) -> bool:
            return ids <= set(c.events)

        # C lived through it all: its console saw every alarm live, whichever instance stored it
        await wait_for(
            lambda: seen_by(direct["c"], set(alarms)), 30, "C's console to see every alarm", step=0.2, context=logs
        )
        # B's console saw every alarm stored while B lived, whichever instance stored it, with no gap: every alarm
        # stored before the last one B relayed reached it (but for a second of commit-order slack between instances).
        # What was stored in B's last moments may never have reached its socket (C's console saw it); how long that
        # tail is depends on how far behind a starved B was, so it is not bounded here.
        assert direct["b"].drops, "B's console did not notice B's death"
        relayed = sorted(alarms[eid] for eid in direct["b"].events if eid in alarms)
        assert len(relayed) > len(alarms) // 3, len(relayed)
        assert relayed[-1] < _utc_of(direct["b"].drops[0]), "B's console saw an alarm stored after B's death"
        cut = _utc_of(_mono_of(relayed[-1]) - 1.0)
        missed = sorted(eid for eid, at in alarms.items() if at < cut and eid not in direct["b"].events)
        assert not missed, (
            cut,
            [_utc_of(d) for d in direct["b"].drops],
            direct["b"].connects,
            [(eid, alarms[eid], eid in direct["c"].events) for eid in missed[:5]],
        )

        # the consoles behind the balancer: moved to a living instance at each death, every incident known
        incidents = {r[0] for r in query(pg_target, "SELECT id FROM incidents")}
        for c in behind:

            async def connected(c: Console = c) -> bool:
                return c.open.is_set()

            await wait_for(connected, 30, f"{c.name} connected", step=0.2, context=logs)
            assert incidents <= set(c.incidents), (c.name, len(incidents - set(c.incidents)))
        moved = [c for c in behind if c.connects > 1]
        assert len(moved) >= 2, [c.connects for c in behind]  # A's console at A's death, then B's at B's
        assert balancer.active[int(urls["c"].rstrip("/").rsplit(":", 1)[1])] == 3  # all on the survivor now
        assert min(c.drops[0] for c in moved) >= killed_a - 1.0
    finally:
        for c in consoles:
            await c.close()
        if balancer is not None:
            await balancer.close()
        for g in gateways:
            g.stop()
        for p in portals.values():
            p.stop()


def _mono_of(utc: str) -> float:
    """The moment of this process's monotonic clock that a UTC text (the store's received_at) names."""
    return time.monotonic() - (time.time() - datetime.fromisoformat(utc).timestamp())


def _utc_of(mono: float) -> str:
    """The UTC text of a moment of this process's monotonic clock (to compare with the store's received_at)."""
    return datetime.fromtimestamp(time.time() - (time.monotonic() - mono), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
