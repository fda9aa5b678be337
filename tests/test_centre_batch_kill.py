"""An instance killed in the middle of a batch on PostgreSQL: its events were written (one multi-row INSERT per
batch, several batches per transaction) but not committed, and never acknowledged. The gateway sends them again to
the instance that is left, along with a batch it had been acknowledged already; in the end every event is stored
exactly once, every seq is acknowledged, and the gateway's bookkeeping counts each event once.

Real parts: two portal processes on the test's PostgreSQL, one Mosquitto with the shared subscription; the gateway
is this test speaking the wire contract over MQTT (its resends are the test's to time, so the kill lands where the
test says). To stop the first instance inside its transaction, the test holds the row lock of one gateway's row:
the instance's writer inserts the batch's events, then waits on the lock to update the gateway's bookkeeping; the
test sees it waiting (and holding a transaction id: it has written) and SIGKILLs it there.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from ulid import ULID

from common.tasks import cancel_and_wait
from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from portal.store import Postgres, connect
from tests import procs
from tests.centre_support import instance_config, share_keys

pytestmark = pytest.mark.slow

GATEWAYS = [("s1", "gw1"), ("s1", "gw2")]
BATCH = 200  # events per MQTT message: the multi-row path


def query(target: Postgres, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = connect(target, readonly=True)
    try:
        return [tuple(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def frame(site: str, gw: str, seqs: range, ids: dict[tuple[str, int], str]) -> bytes:
    events = []
    for s in seqs:
        eid = ids.setdefault((gw, s), str(ULID()))
        events.append(
            {
                "id": eid,
                "seq": s,
                "ts": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "type": "test.synthetic",
                "device": "d",
                "place": {"site": site},
                "data": {"n": s},
            }
        )
    return json.dumps({"v": wire.SCHEMA_VERSION, "site": site, "gateway": gw, "events": events}).encode()


async def test_an_instance_killed_mid_batch_loses_and_duplicates_nothing(
    tmp_path: Path, broker: MosquittoProcess, pg_target: Postgres
) -> None:
    folders = {name: tmp_path / f"portal-{name}" for name in "ab"}
    configs = {
        name: instance_config(
            f, broker_port=broker.port, target=pg_target, client_id=f"centre-{name}", gateways=GATEWAYS
        )
        for name, f in folders.items()
    }
    portals: dict[str, procs.Child] = {}
    acked: dict[str, set[int]] = {gw: set() for _, gw in GATEWAYS}
    ids: dict[tuple[str, int], str] = {}
    holder = connect(pg_target)  # the test's own connection, holding gw1's row lock

    def logs() -> str:
        return "\n".join(f"--- {c.name}\n{c.tail(2000)}" for c in portals.values())

    async def until(cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await asyncio.to_thread(cond):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs()}")

    try:
        portals["a"] = procs.portal(configs["a"], tmp_path / "logs", "portal-a").start()
        share_keys(folders["a"], [folders["b"]])
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="test-gateways") as mqtt:
            for site, gw in GATEWAYS:
                await mqtt.subscribe(wire.topic(site, gw, "ack"), qos=1)

            async def take_acks() -> None:
                async for m in mqtt.messages:
                    _, gw, _ = wire.parse_topic(str(m.topic))
                    assert isinstance(m.payload, bytes)
                    acked[gw].update(wire.decode_ack(m.payload).seqs)

            reader = asyncio.create_task(take_acks())
            try:
                # 1. a first batch of each gateway, stored and acknowledged by A
                for site, gw in GATEWAYS:
                    await mqtt.publish(wire.topic(site, gw, "events"), frame(site, gw, range(1, BATCH + 1), ids), qos=1)
                await until(
                    lambda: all(acked[gw] >= set(range(1, BATCH + 1)) for _, gw in GATEWAYS),
                    30,
                    "the first batches acknowledged",
                )

                # 2. hold gw1's row; the next batches reach A's writer, which inserts them and then waits
                holder.execute("BEGIN")
                holder.execute("SELECT * FROM gateways WHERE site = 's1' AND gateway = 'gw1' FOR UPDATE")
                second = range(BATCH + 1, 2 * BATCH + 1)
                for site, gw in reversed(GATEWAYS):  # gw2 first: its batch goes in ahead of gw1's, uncommitted
                    await mqtt.publish(wire.topic(site, gw, "events"), frame(site, gw, second, ids), qos=1)

                def stuck() -> bool:  # A's writer waits on the row lock, with rows written in its transaction
                    return bool(
                        query(
                            pg_target,
                            "SELECT count(*) FROM pg_stat_activity WHERE datname ="
                            " current_database() AND wait_event_type = 'Lock' AND query LIKE"
                            " 'UPDATE gateways%' AND backend_xid IS NOT NULL",
                        )[0][0]
                    )

                await until(stuck, 30, "A's writer inside its transaction, its events inserted")
                assert query(pg_target, "SELECT count(*) FROM events WHERE gateway = 'gw1' AND seq > ?", BATCH) == [
                    (0,)
                ]
                portals["a"].kill()  # mid-batch: written, not committed, not acknowledged
                t_kill = time.monotonic()
                holder.execute("ROLLBACK")
                assert not acked["gw1"] & set(second), sorted(acked["gw1"] & set(second))[:5]

                # 3. B takes over; the gateways send again what is unacknowledged, and gw1 its first batch too
                # (as a gateway does that lost an acknowledgement)
                portals["b"] = procs.portal(configs["b"], tmp_path / "logs", "portal-b").start()
                await asyncio.sleep(0.5)  # B subscribed
                for site, gw in GATEWAYS:
                    await mqtt.publish(wire.topic(site, gw, "events"), frame(site, gw, second, ids), qos=1)
                await mqtt.publish(
                    wire.topic("s1", "gw1", "events"), frame("s1", "gw1", range(1, BATCH + 1), ids), qos=1
                )
                everything = set(range(1, 2 * BATCH + 1))
                await until(
                    lambda: all(acked[gw] >= everything for _, gw in GATEWAYS), 60, "every seq acknowledged by B"
                )
                print(f"B acknowledged everything {time.monotonic() - t_kill:.1f} s after the kill")
            finally:
                await cancel_and_wait("the test's reader", [reader])

        total = 2 * BATCH * len(GATEWAYS)
        assert query(pg_target, "SELECT count(*), count(DISTINCT id) FROM events") == [(total, total)]
        for site, gw in GATEWAYS:
            rows = query(pg_target, "SELECT seq, id FROM events WHERE site = ? AND gateway = ? ORDER BY seq", site, gw)
            assert [r[0] for r in rows] == list(range(1, 2 * BATCH + 1))
            assert all(eid == ids[(gw, s)] for s, eid in rows)  # each seq under the id the gateway gave it
            [(contiguous, max_seq, count, gaps)] = query(
                pg_target,
                "SELECT contiguous_seq, max_seq, events_stored, open_gaps FROM gateways WHERE site = ? AND gateway = ?",
                site,
                gw,
            )
            assert (contiguous, max_seq, count, json.loads(gaps)) == (2 * BATCH, 2 * BATCH, 2 * BATCH, [])
    finally:
        holder.close()
        for p in portals.values():
            p.stop()
