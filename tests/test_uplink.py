"""The uplink against a real Mosquitto, with a minimal portal-side acknowledger in the test."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from common.tasks import cancel_and_wait
from gateway import wire
from gateway.config import GatewayConfig, MqttConfig, UplinkConfig
from gateway.events import Draft
from gateway.store import Store
from gateway.tooling.broker import MosquittoProcess
from gateway.uplink import Uplink, backoff_delays

PLACE = wire.Place(site="s1")


def _cfg(broker: MosquittoProcess, **uplink: float) -> GatewayConfig:
    return GatewayConfig(
        site="s1",
        gateway="gw1",
        mqtt=MqttConfig(host="127.0.0.1", port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.5),
        uplink=UplinkConfig(**uplink),
    )  # type: ignore[arg-type]


class Acker:
    """Receives batches like the portal does and acknowledges them (optionally not, or slowly, or not a batch
    holding a seq in ``lose``: the broker dropped it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[int] = []
        self.ack = True
        self.work_s = 0.0  # time spent storing each batch
        self.lose: set[int] = set()

    async def run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="test-acker", clean_session=False) as c:
            await c.subscribe(wire.subscription("events"), qos=1)
            async for msg in c.messages:
                site, gw, _ = wire.parse_topic(str(msg.topic))
                batch = wire.decode_batch(bytes(msg.payload), site=site, gateway=gw)  # type: ignore[arg-type]
                if self.lose & {e.seq for e in batch.events}:
                    self.lose -= {e.seq for e in batch.events}
                    continue
                await asyncio.sleep(self.work_s)
                self.seen.extend(e.seq for e in batch.events)
                if self.ack:
                    ack = wire.Ack(v=1, seqs=[e.seq for e in batch.events])
                    await c.publish(wire.topic(site, gw, "ack"), wire.encode(ack), qos=1)


@contextlib.asynccontextmanager
async def running(*coros: object) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coros]  # type: ignore[arg-type]
    try:
        yield
    finally:
        # Cancelled again until they end: on Python 3.11.2 (Debian 12's) aiomqtt's message loop loses a cancel now
        # and then, and a single cancel hung this test for good (common/tasks.py says why).
        await cancel_and_wait("the test's tasks", tasks)


async def _until(cond: object, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_events_are_forgotten_only_when_acknowledged(tmp_path: Path, broker: MosquittoProcess) -> None:
    acker = Acker(broker.port)
    acker.ack = False
    async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
        up = Uplink(_cfg(broker, resend_after_s=0.3, resend_max_s=0.6), store)
        async with running(acker.run(), up.run()):
            await store.append([Draft(type="zone.alarm", device="p", place=PLACE) for _ in range(50)])
            await _until(lambda: len(acker.seen) >= 100)  # sent, then re-sent: nobody acknowledged
            assert await store.outbox_depth() == 50
            assert up.stats.resends >= 1
            acker.ack = True
            await _until(lambda: up.stats.acks >= 50)
            await store.append([])
            assert await store.outbox_depth() == 0
            assert sorted(set(acker.seen)) == list(range(1, 51))


@pytest.mark.realtime
async def test_an_alarm_sent_ahead_of_a_stalled_commit_and_unanswered_is_sent_again_once_committed(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """An alarm goes out before its commit (the disk is slow); nobody answers, and the silence's re-send takes it
    back while its commit still stalls. Once committed, it must be sent again from the outbox, not wait there until
    the next reconnect (the first copy may be the one the portal never stored)."""
    acker = Acker(broker.port)
    acker.ack = False  # the portal receives, but stores and answers nothing (busy, restarting)
    stall = {"s": 0.0}
    async with Store(tmp_path / "gw.db", site="s1", gateway="gw1", stall=lambda: stall["s"]) as store:
        up = Uplink(_cfg(broker, resend_after_s=1.0, resend_max_s=2.0), store)
        store.on_urgent = up.send_now
        async with running(acker.run(), up.run()):
            await store.append([Draft(type="door.opened", device="d", place=PLACE)])  # routine, unanswered
            await _until(lambda: 1 in acker.seen, 5)
            stall["s"] = 3.0  # the SD card: each commit now takes 3 s
            alarm = store.submit([Draft(type="zone.alarm", device="p", place=PLACE, priority=wire.Priority.FIRE)])
            await _until(lambda: 2 in acker.seen, 2)  # ahead of its commit
            assert up.stats.fast_sent == 1
            await _until(lambda: up.stats.resends >= 1, 5)  # the silence: what was in flight is taken back
            acker.ack = True
            await alarm
            stall["s"] = 0.0
            await _until(lambda: 2 in acker.seen[acker.seen.index(2) + 1 :], 5)  # sent again, once committed
            await _until(lambda: not up._inflight, 5)
            await store.drain()
            assert await store.outbox_depth() == 0


@pytest.mark.realtime
async def test_a_portal_working_through_a_backlog_gets_no_resends(tmp_path: Path, broker: MosquittoProcess) -> None:
    """Acks keep coming, each batch slower than the re-send time: the portal is busy, not lost; re-sending the
    window then would only bury it in copies."""
    acker = Acker(broker.port)
    acker.work_s = 0.05
    async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
        up = Uplink(_cfg(broker, batch_max=1, resend_after_s=0.3, resend_max_s=0.6), store)
        async with running(acker.run(), up.run()):
            await store.append([Draft(type="zone.alarm", device="p", place=PLACE) for _ in range(40)])
            await _until(lambda: up.stats.acks >= 40)  # 40 × 50 ms: the last ack comes ~2 s after the send
            assert up.stats.resends == 0
            assert acker.seen == list(range(1, 41))


@pytest.mark.realtime
async def test_a_lost_batch_is_resent_though_later_ones_are_acknowledged(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    acker = Acker(broker.port)
    acker.lose = {5}
    async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
        up = Uplink(_cfg(broker, batch_max=1, resend_after_s=0.3, resend_max_s=0.6), store)
        async with running(acker.run(), up.run()):
            await store.append([Draft(type="zone.alarm", device="p", place=PLACE) for _ in range(10)])
            await _until(lambda: up.stats.acks >= 9)
            for _ in range(60):  # a steady trickle for 3 s: acks never pause for the re-send time
                await store.append([Draft(type="zone.alarm", device="p", place=PLACE)])
                await asyncio.sleep(0.05)
                if 5 in acker.seen:
                    break
            assert 5 in acker.seen, "a lost event must be re-sent while later ones keep being acknowledged"
            await _until(lambda: not up._inflight)
            await store.drain()  # the acks' deletes ride with the next commit; drain makes one
            assert await store.outbox_depth() == 0
            assert acker.seen.count(5) == 1 and up.stats.resends == 1


@pytest.mark.realtime
@pytest.mark.parametrize("priority", [wire.Priority.ROUTINE, wire.Priority.TAMPER], ids=["routine", "urgent"])
async def test_only_the_dropped_event_is_resent_not_what_follows_it(
    tmp_path: Path, broker: MosquittoProcess, priority: wire.Priority
) -> None:
    """The broker dropped one event while the portal works through the ones after it: only that one is sent
    again. Copies of the rest of the window would queue behind the originals in a broker that keeps a bounded
    queue, pushing out events that are not copies (congestion collapse for a portal returning to a backlog)."""
    acker = Acker(broker.port)
    acker.lose = {5}
    acker.work_s = 0.02  # ~50 events/s: the window of 60 is still on its way when 5 is found missing
    async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
        up = Uplink(_cfg(broker, batch_max=1, resend_after_s=0.5, resend_max_s=1.0), store)
        async with running(acker.run(), up.run()):
            await store.append(
                [Draft(type="zone.alarm", device="p", place=PLACE, priority=priority) for _ in range(60)]
            )
            await _until(lambda: up.stats.acks >= 60)
            assert sorted(acker.seen) == list(range(1, 61)), "each event stored once: only the dropped one re-sent"
            assert up.stats.lost_resent == 1


async def test_window_bounds_unacknowledged_events(tmp_path: Path, broker: MosquittoProcess) -> None:
    acker = Acker(broker.port)
    acker.ack = False
    async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
        up = Uplink(_cfg(broker, window=100, batch_max=30, resend_after_s=30), store)
        async with running(acker.run(), up.run()):
            await store.append([Draft(type="zone.alarm", device="p", place=PLACE) for _ in range(500)])
            await _until(lambda: len(acker.seen) >= 100)
            await asyncio.sleep(0.3)
            assert sorted(acker.seen) == list(range(1, 101))
            acker.ack = True
            # an ack for a stale batch opens the window; new batches then flow and get acknowledged
            ack = wire.Ack(v=1, seqs=list(range(1, 101)))
            async with aiomqtt.Client("127.0.0.1", broker.port) as c:
                await c.publish(wire.topic("s1", "gw1", "ack"), wire.encode(ack), qos=1)
            await _until(lambda: up.stats.acks >= 500)


async def test_reconnects_after_broker_restart(tmp_path: Path, broker: MosquittoProcess) -> None:
    acker = Acker(broker.port)
    async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
        up = Uplink(_cfg(broker), store)
        async with running(up.run()):
            await _until(lambda: up.stats.connected)
            broker.kill()
            await _until(lambda: not up.stats.connected)
            await store.append([Draft(type="zone.alarm", device="p", place=PLACE) for _ in range(20)])
            broker.start()
            async with running(acker.run()):
                await _until(lambda: up.stats.acks >= 20)
            assert up.stats.connects >= 2


async def test_bad_acks_are_counted_and_commands_passed_on_not_fatal(tmp_path: Path, broker: MosquittoProcess) -> None:
    """Acks are the uplink's to judge; a command payload goes to the gateway's command guard as it came
    (gateway.commands verifies it), however bad, and a handler that fails costs nothing."""
    got: list[bytes] = []

    async def on_command(payload: bytes) -> None:
        got.append(payload)
        raise RuntimeError("a handler that fails")

    async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
        up = Uplink(_cfg(broker), store, on_command)
        async with running(up.run()):
            await _until(lambda: up.stats.connected)
            async with aiomqtt.Client("127.0.0.1", broker.port) as c:
                await c.publish(wire.topic("s1", "gw1", "ack"), b"{not json", qos=1)
                await c.publish(wire.topic("s1", "gw1", "ack"), b'{"v":9,"seqs":[1]}', qos=1)
                await c.publish(wire.topic("s1", "gw1", "cmd"), b"x" * (wire.MAX_PAYLOAD_BYTES + 1), qos=1)
            await _until(lambda: sum(up.stats.rejected.values()) >= 2 and got)
            assert up.stats.rejected == {"malformed": 1, "bad-version": 1}
            assert got == [b"x" * (wire.MAX_PAYLOAD_BYTES + 1)] and up.stats.command_errors == 1
            assert up.stats.connected


async def test_status_is_retained_and_last_will_says_offline(tmp_path: Path, broker: MosquittoProcess) -> None:
    async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
        up = Uplink(_cfg(broker), store)
        async with running(up.run()):
            await _until(lambda: up.stats.connected)
            async with aiomqtt.Client("127.0.0.1", broker.port) as c:
                await c.subscribe(wire.topic("s1", "gw1", "status"), qos=1)
                async with asyncio.timeout(5):
                    msg = await anext(aiter(c.messages))
                assert wire.decode_status(bytes(msg.payload)).state == "online"  # type: ignore[arg-type]
            await up.close()
    async with aiomqtt.Client("127.0.0.1", broker.port) as c:
        await c.subscribe(wire.topic("s1", "gw1", "status"), qos=1)
        async with asyncio.timeout(5):
            msg = await anext(aiter(c.messages))
        assert wire.decode_status(bytes(msg.payload)).state == "offline"  # type: ignore[arg-type]


@pytest.mark.parametrize("attempt", range(12))
def test_backoff_is_capped_with_full_jitter(attempt: int) -> None:
    import random

    delay = backoff_delays(0.5, 30.0, random.Random(attempt))
    values = [delay(attempt) for _ in range(200)]
    cap = min(30.0, 0.5 * 2**attempt)
    assert all(0 <= v <= cap for v in values)
    assert max(values) > cap * 0.8  # full jitter spans the whole range


# ---------------------------------------------------------------- a broker whose queue for the portal is small


async def _paused_episode(store: Store, up: Uplink, acker: Acker, n: int, pause_s: float = 1.5) -> int:
    """The portal away (its persistent session kept: the broker queues for it, up to max_queued_messages, and drops
    the rest) while ``n`` events are stored; then back. The number of events re-sent meanwhile is returned once all
    are acknowledged."""
    resent0 = up.stats.resent_events
    acks0 = up.stats.acks
    await store.append([Draft(type="zone.alarm", device="p", place=PLACE) for _ in range(n)])
    await _until(lambda: up.stats.in_flight >= min(n, up.stats.window))
    await asyncio.sleep(pause_s)  # the window is out: in the broker's queue, or dropped
    async with running(acker.run()):
        await _until(lambda: up.stats.acks - acks0 >= n, timeout=30)
    return up.stats.resent_events - resent0


@pytest.mark.realtime  # a pause held against resend_after on the wall clock
async def test_the_window_adapts_to_a_broker_that_drops_for_a_paused_portal(tmp_path: Path) -> None:
    """Mosquitto keeps 60 messages for the absent portal (max_queued_messages) and drops the rest; every event rides
    alone (batch_max 1). With a window of 200, the first pause loses what did not fit; the window halves on each
    drop seen, so the re-sends of each pause are bounded by what was in flight, shrink pause after pause, and stop.
    Nothing is lost: every event reaches the portal and leaves the outbox."""
    broker = MosquittoProcess(tmp_path / "broker", max_queued=60).start()
    try:
        acker = Acker(broker.port)
        async with running(acker.run()):  # the portal's persistent session exists before the gateway sends
            await asyncio.sleep(0.5)
        async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
            up = Uplink(_cfg(broker, window=200, batch_max=1, resend_after_s=1.0, resend_max_s=2.0), store)
            async with running(up.run()):
                await _until(lambda: up.stats.connected)
                resent = [await _paused_episode(store, up, acker, 300) for _ in range(4)]
                windows = up.stats.window
            await store.drain()
            assert await store.outbox_depth() == 0
        assert sorted(set(acker.seen)) == list(range(1, 1201)), "every event reached the portal"
        # Re-sends: the first pause loses what did not fit of the 200 in flight (140), and a probe of one event goes
        # out each resend_after while the portal is silent (once in the 1.5 s); no copies of the window. Each later
        # pause loses less; once the window fits the broker's queue, only the probe is re-sent.
        probes = 2
        assert resent[0] <= 200 - 60 + probes, resent
        assert all(later <= earlier for earlier, later in itertools.pairwise(resent)), resent
        assert resent[-1] <= probes and resent[-2] <= probes, resent
        assert up.stats.window_shrinks >= 1 and windows < 100, (up.stats, windows)
    finally:
        broker.stop()
