"""common.mqtt.Client (aiomqtt's client writing on the loop's thread without the self-pipe and the writer dance)
against a real Mosquitto: a burst the socket cannot take at once, a broker that stops answering, one that dies."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiomqtt
import pytest

from common import mqtt
from gateway.tooling.broker import MosquittoProcess

pytestmark = pytest.mark.timeout(60)


async def test_a_burst_larger_than_the_socket_takes_arrives_whole_and_in_order(broker: MosquittoProcess) -> None:
    # 48 MB in flight at once: far past any socket buffer, so most of it waits for the socket to be writable.
    n, size = 48, 1 << 20
    got: list[bytes] = []
    async with (
        aiomqtt.Client("127.0.0.1", broker.port, identifier="sub") as sub,
        mqtt.Client("127.0.0.1", broker.port, identifier="pub", max_inflight_messages=n) as pub,
    ):
        await sub.subscribe("burst", qos=1)

        async def take() -> None:
            async for msg in sub.messages:
                got.append(bytes(msg.payload))  # type: ignore[arg-type]
                if len(got) == n:
                    return

        taker = asyncio.create_task(take())
        bodies = [bytes([i]) * size for i in range(n)]
        async with asyncio.timeout(40):
            await asyncio.gather(*(pub.publish("burst", b, qos=1) for b in bodies))
            await taker
    assert [b[0] for b in got] == list(range(n))
    assert all(len(b) == size and b == bytes([b[0]]) * size for b in got)


async def test_a_publish_the_broker_never_acknowledges_times_out_with_an_mqtt_error(tmp_path: Path) -> None:
    broker = MosquittoProcess(tmp_path / "broker").start()
    assert broker.proc is not None
    try:
        async with mqtt.Client("127.0.0.1", broker.port, identifier="pub", timeout=0.5) as pub:
            os.kill(broker.proc.pid, signal.SIGSTOP)  # there, connected, silent
            try:
                t0 = time.monotonic()
                with pytest.raises(aiomqtt.MqttError, match="timed out"):
                    await pub.publish("t", b"x", qos=1)
                assert 0.4 < time.monotonic() - t0 < 3.0
            finally:
                os.kill(broker.proc.pid, signal.SIGCONT)
    finally:
        broker.stop()


async def test_a_broker_that_dies_under_a_stream_of_publishes_ends_them_in_errors_not_a_hang(tmp_path: Path) -> None:
    broker = MosquittoProcess(tmp_path / "broker").start()
    assert broker.proc is not None
    failed = 0
    async with mqtt.Client("127.0.0.1", broker.port, identifier="pub", timeout=2) as pub:

        async def one(i: int) -> None:
            nonlocal failed
            try:
                await pub.publish("t", bytes(64 * 1024), qos=1)
            except aiomqtt.MqttError:
                failed += 1

        tasks = [asyncio.create_task(one(i)) for i in range(200)]
        await asyncio.sleep(0)
        broker.proc.kill()
        async with asyncio.timeout(20):
            await asyncio.gather(*tasks)
        with pytest.raises(aiomqtt.MqttError):
            await pub.publish("t", b"after", qos=1)
    assert failed > 0


@pytest.mark.slow
async def test_an_idle_connection_keeps_alive_past_the_brokers_deadline(broker: MosquittoProcess) -> None:
    # keepalive 4 s: the broker may drop a client it heard nothing from for 6 s (Mosquitto 2.0 checks coarsely: a
    # client that never pings was seen dropped after 11 s). The client must ping in time, idle.
    got: list[bytes] = []
    async with (
        aiomqtt.Client("127.0.0.1", broker.port, identifier="sub") as sub,
        mqtt.Client("127.0.0.1", broker.port, identifier="idle", keepalive=4) as idle,
    ):
        await idle.subscribe("to-idle", qos=1)
        await asyncio.sleep(14.0)
        await sub.publish("to-idle", b"still there", qos=1)
        async with asyncio.timeout(5):
            async for msg in idle.messages:
                got.append(bytes(msg.payload))  # type: ignore[arg-type]
                break
    assert got == [b"still there"]


async def test_the_hooks_it_overrides_are_still_aiomqtts() -> None:
    # A hook renamed or no longer wired in a later aiomqtt would leave the override unused and the client silently
    # back on aiomqtt's way (correct, only slower), which the tests above cannot tell apart: this one can.
    ours = vars(mqtt.Client)
    for name in ("_on_socket_register_write", "_wait_for", "_misc_loop"):
        assert callable(getattr(aiomqtt.Client, name, None)), f"aiomqtt.Client has no {name} to override"
        assert name in ours, f"common.mqtt.Client no longer overrides {name}"
    client = mqtt.Client("127.0.0.1", 1)  # not connected: only how aiomqtt wires paho to it is read
    hook = client._client.on_socket_register_write
    assert getattr(hook, "__func__", None) is ours["_on_socket_register_write"]
