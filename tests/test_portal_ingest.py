"""Portal ingest against a real Mosquitto: store, ack after commit, idempotent re-sends, rejections,
gaps, status, commands, broker restarts, and one run of the real ``python -m portal run`` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from portal.store import SCHEMA_VERSION, GatewayState, Store, StoreBatch, add_seq
from portal.web.ingest import BrokerUnavailable, backoff_delay
from tests.portal_support import (
    GATEWAY,
    SITE,
    Portal,
    add_user,
    batch_payload,
    csrf_of,
    event,
    mqtt,
    next_ack,
    open_portal_command,
    portal_process,
    running_portal,
    scrape_headers,
    sign_in,
    store_key,
    wait_for,
    write_config,
)

PW = "guard-password-0001"
EVENTS_TOPIC = wire.topic(SITE, GATEWAY, "events")
ACK_TOPIC = wire.topic(SITE, GATEWAY, "ack")


async def _ready(p: Portal) -> None:
    await wait_for(lambda: p.services.ingest.connected, what="portal connected to the broker")
    await add_user(p, "guard1", "guard", PW)
    assert (await sign_in(p, "guard1", PW)).status == 303


# ---------------------------------------------------------------- pure parts


def test_seq_bookkeeping_notices_and_closes_gaps() -> None:
    st = GatewayState(SITE, GATEWAY)
    assert add_seq(st, 1) == (None, [])
    assert add_seq(st, 2) == (None, [])
    assert st.contiguous_seq == 2
    assert add_seq(st, 5) == ((3, 4), [])
    assert add_seq(st, 9) == ((6, 8), [])
    assert (st.contiguous_seq, st.max_seq, st.gaps_noticed) == (2, 9, 2)
    assert st.snapshot().missing == ((3, 4), (6, 8))
    assert add_seq(st, 4) == (None, [])
    assert add_seq(st, 3) == (None, [(3, 4)])
    assert st.contiguous_seq == 5
    for s in (8, 6):
        assert add_seq(st, s) == (None, [])
    assert add_seq(st, 7) == (None, [(6, 8)])
    assert (st.contiguous_seq, st.islands, st.open_gaps, st.gaps_closed) == (9, [], [], 2)


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    assert [backoff_delay(n, 0.5, 30.0, lambda: 1.0) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(3, 0.5, 30.0, lambda: 0.0) == 0.0
    assert backoff_delay(1000, 0.5, 30.0, lambda: 0.5) == 15.0


async def test_writer_commits_queued_batches_in_one_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "p.db", key=store_key(tmp_path / "p.db"))
    await store.start()
    calls: list[int] = []
    store.add_commit_listener(lambda committed: calls.append(len(committed)))
    try:
        futs = [await store.enqueue(StoreBatch(wire.batch_events(SITE, GATEWAY, [event(n)]))) for n in range(1, 6)]
        results = await asyncio.gather(*futs)
        assert calls == [5]  # queued while the writer was idle: one commit, one listener call
        assert [r.ack_seqs for r in results] == [[1], [2], [3], [4], [5]]
        assert results[-1].snapshot.contiguous_seq == 5
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "p.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 5


# ---------------------------------------------------------------- against the broker


async def test_batch_is_stored_then_acked_and_a_resend_is_stored_once(tmp_path: Path, broker: MosquittoProcess) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw:
        await _ready(p)
        await gw.subscribe(ACK_TOPIC, qos=1)
        events = [event(1), event(2, type="access.granted", priority=0), event(3, type="fire.alarm", priority=50)]
        payload = batch_payload(events)
        await gw.publish(EVENTS_TOPIC, payload, qos=1)
        ack = await next_ack(gw)
        assert ack.seqs == [1, 2, 3]
        stored = await p.events()
        assert [e["id"] for e in stored] == sorted((e.id for e in events), reverse=True)  # newest first
        assert stored[-1]["seq"] == 1 and stored[-1]["place"]["building"] == "3" and stored[-1]["data"] == {"n": 1}
        # The gateway did not see the ack and sends the same batch again: stored once, acked again.
        await gw.publish(EVENTS_TOPIC, payload, qos=1)
        ack = await next_ack(gw)
        assert ack.seqs == [1, 2, 3]
        # A batch mixing an old and a new event: both acked, one stored.
        await gw.publish(EVENTS_TOPIC, batch_payload([events[2], event(4)]), qos=1)
        assert (await next_ack(gw)).seqs == [3, 4]
        assert len(await p.events()) == 4
        assert [e["seq"] for e in await p.events(gateway=GATEWAY, after_seq=2)] == [3, 4]
        assert [e["type"] for e in await p.events(type="fire.alarm")] == ["fire.alarm"]
        page = await p.client.get("/api/events", params={"limit": "2"})
        body = await page.json()
        assert len(body["events"]) == 2 and body["next"]["before"] == body["events"][1]["id"]
        older = await p.events(before=body["next"]["before"])
        assert [e["seq"] for e in older] == [2, 1]
        health = await p.health()
        assert health["status"] == "ok" and health["broker"]["connected"] is True
        g = health["gateways"][0]
        assert (g["last_seq"], g["contiguous_seq"], g["gaps_open"], g["events_stored"]) == (4, 4, 0, 4)
        metrics = await (await p.client.get("/metrics", headers=p.scrape)).text()
        assert "gatehouse_portal_events_ingested_total 4.0" in metrics
        assert "gatehouse_portal_events_duplicate_total 4.0" in metrics
        assert "gatehouse_portal_ingest_latency_seconds_count 4.0" in metrics


class SlowLink:
    """A TCP relay that delivers every byte ``delay_s`` late in each direction, in order: the portal's link to a
    broker across a WAN (or a broker that is slow to answer), so that each PUBACK is a round trip away."""

    def __init__(self, port: int, delay_s: float) -> None:
        self.target, self.delay_s = port, delay_s
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> SlowLink:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        for src, dst in ((reader, up_w), (up_r, writer)):
            t = asyncio.create_task(self._pipe(src, dst), name="slow-link")
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        late: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await late.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    dst.close()
                    return
                dst.write(data)
                await dst.drain()

        out = asyncio.create_task(deliver(), name="slow-link.deliver")
        try:
            while True:
                data = await src.read(65536)
                await late.put((loop.time() + self.delay_s, data))
                if not data:
                    break
            await out
        except (ConnectionError, OSError):
            pass
        finally:
            out.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await out
            dst.close()


@pytest.mark.realtime  # the acks' time against the wall clock
async def test_acks_to_many_gateways_are_not_sent_one_puback_at_a_time(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """30 gateways' batches stored together: their 30 acks go out at once, not each after the broker's PUBACK for
    the one before (a round trip apiece: 30 round trips of 0.3 s on this link before the last gateway hears)."""
    gws = [(SITE, f"gw-{i:02d}") for i in range(30)]
    async with SlowLink(broker.port, delay_s=0.15) as link:
        cfg = write_config(tmp_path, broker, gateways=gws)
        cfg.write_text(cfg.read_text(encoding="utf-8").replace(f"port: {broker.port}", f"port: {link.port}"))
        async with running_portal(cfg) as p, mqtt(broker) as gw:
            await wait_for(lambda: p.services.ingest.connected, what="portal connected to the broker")
            await gw.subscribe(wire.subscription("ack"), qos=1)
            await asyncio.sleep(0.5)  # the portal's subscriptions are through the link
            for site, g in gws:
                await gw.publish(wire.topic(site, g, "events"), batch_payload([event(1)], gateway=g), qos=1)
            t0 = asyncio.get_running_loop().time()
            acked: set[str] = set()
            async with asyncio.timeout(30):
                async for m in gw.messages:
                    if str(m.topic).endswith("/ack"):
                        acked.add(wire.parse_topic(str(m.topic))[1])
                        if len(acked) == len(gws):
                            break
            took = asyncio.get_running_loop().time() - t0
            # pipelined: the batches' trip in, a commit, the acks' trip out and a round trip or two (about 1 s);
            # one PUBACK at a time: at least 30 x 0.3 s
            assert took < 4.0, f"30 acks took {took:.1f} s"
            assert p.services.ingest.acks_sent <= len(gws)  # one message per gateway, none lost or doubled


async def test_bad_payloads_are_counted_and_dropped(tmp_path: Path, broker: MosquittoProcess) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw:
        await _ready(p)
        await gw.subscribe(wire.subscription("ack"), qos=1)
        await gw.publish(EVENTS_TOPIC, batch_payload([event(1)]), qos=1)
        assert (await next_ack(gw)).seqs == [1]
        good = msgspec.to_builtins(wire.batch_events(SITE, GATEWAY, [event(2)]))
        bad: list[tuple[str, bytes]] = [
            (EVENTS_TOPIC, b'{"v": 1, "site": "s1", '),  # malformed
            (EVENTS_TOPIC, json.dumps({**good, "v": 2}).encode()),  # bad-version
            (EVENTS_TOPIC, json.dumps({**good, "events": [{**good["events"][0], "seq": "two"}]}).encode()),  # schema
            (EVENTS_TOPIC, b" " * 1_000_000),  # too-large (1 MB; the broker lets it through)
            (wire.topic(SITE, "gw9", "events"), batch_payload([event(1)], gateway="gw9")),  # unknown-gateway
            (EVENTS_TOPIC, json.dumps({**good, "gateway": "gw2"}).encode()),  # topic-mismatch
        ]
        for topic, payload in bad:
            await gw.publish(topic, payload, qos=1)
        expected = {
            "malformed": 1,
            "bad-version": 1,
            "schema": 1,
            "too-large": 1,
            "unknown-gateway": 1,
            "topic-mismatch": 1,
        }

        async def counted() -> dict[str, Any] | None:
            h = await p.health()
            return h if h["rejections"] == expected else None

        health = await wait_for(counted, what="six rejections")
        assert health["gateways"][0]["events_stored"] == 1
        # The portal goes on: a good batch after the bad ones is stored and acked; nothing earlier is lost.
        await gw.publish(EVENTS_TOPIC, batch_payload([event(2)]), qos=1)
        ack = await next_ack(gw)
        assert ack.seqs == [2]  # no ack was ever sent for a rejected payload (next_ack would have seen it)
        assert sorted(e["seq"] for e in await p.events()) == [1, 2]
        metrics = await (await p.client.get("/metrics", headers=p.scrape)).text()
        assert 'gatehouse_portal_rejections_total{reason="too-large"} 1.0' in metrics
    # The counters are in the store: a restarted portal still reports them.
    async with running_portal(write_config(tmp_path, broker)) as p2:
        assert (await p2.health())["rejections"] == expected


async def test_a_gap_is_noticed_and_closes_when_filled(tmp_path: Path, broker: MosquittoProcess) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw:
        await _ready(p)
        await gw.subscribe(ACK_TOPIC, qos=1)
        evs = {n: event(n) for n in range(1, 7)}
        for seqs in ([1, 2], [5, 6]):
            await gw.publish(EVENTS_TOPIC, batch_payload([evs[n] for n in seqs]), qos=1)
            assert (await next_ack(gw)).seqs == seqs
        h = await p.health()
        g = h["gateways"][0]
        assert (g["contiguous_seq"], g["last_seq"], g["gaps_open"], g["missing"], g["gaps_noticed"]) == (
            2,
            6,
            1,
            [[3, 4]],
            1,
        )
        assert h["status"] == "degraded" and h["gaps_open"] == 1
        await gw.publish(EVENTS_TOPIC, batch_payload([evs[3]]), qos=1)
        await next_ack(gw)
        g = (await p.health())["gateways"][0]
        assert (g["contiguous_seq"], g["missing"], g["gaps_open"]) == (3, [[4, 4]], 1)
        await gw.publish(EVENTS_TOPIC, batch_payload([evs[4]]), qos=1)
        await next_ack(gw)
        h = await p.health()
        g = h["gateways"][0]
        assert (g["contiguous_seq"], g["missing"], g["gaps_open"], g["gaps_closed"]) == (6, [], 0, 1)
        assert h["status"] == "ok"


async def test_a_reused_seq_with_a_new_id_is_stored_apart_and_acked(tmp_path: Path, broker: MosquittoProcess) -> None:
    """A gateway whose store was reset numbers from 1 again: its events are stored (under numbers of their own,
    the old rows untouched) and acknowledged, so an alarm is never held back by a number used before."""
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw:
        await _ready(p)
        await gw.subscribe(ACK_TOPIC, qos=1)
        first = event(1)
        await gw.publish(EVENTS_TOPIC, batch_payload([first]), qos=1)
        assert (await next_ack(gw)).seqs == [1]
        again = event(1)  # seq 1 under a new id
        await gw.publish(EVENTS_TOPIC, batch_payload([again, event(2)]), qos=1)
        assert sorted((await next_ack(gw)).seqs) == [1, 2]
        await gw.publish(EVENTS_TOPIC, batch_payload([again]), qos=1)  # its re-send is a duplicate, acked again
        assert (await next_ack(gw)).seqs == [1]
        assert (await p.health())["rejections"] == {"seq-conflict": 1}
        stored = {e["id"]: e["seq"] for e in await p.events()}
        assert len(stored) == 3 and stored[first.id] == 1 and stored[again.id] == -1


async def test_gateway_status_and_commands(tmp_path: Path, broker: MosquittoProcess) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p, mqtt(broker) as gw:
        await _ready(p)
        status_topic = wire.topic(SITE, GATEWAY, "status")
        await gw.publish(status_topic, wire.encode(wire.Status(v=1, state="online", version="1.0")), qos=1, retain=True)

        async def online(value: bool) -> bool:
            return (await p.health())["gateways"][0]["online"] is value

        await wait_for(lambda: online(True), what="gateway online")
        await gw.publish(status_topic, wire.encode(wire.Status(v=1, state="offline")), qos=1, retain=True)
        await wait_for(lambda: online(False), what="gateway offline")
        await gw.publish(status_topic, b"", qos=1, retain=True)  # clear the retained message

        await gw.subscribe(wire.topic(SITE, GATEWAY, "cmd"), qos=1)
        now = wire.utcnow()
        cmd = wire.Command(v=2, id="c1", type="unlock", ts=now, expires=now, by="guard1", args={"door": "d1"})
        await p.services.ingest.send_command(SITE, GATEWAY, cmd)
        async with asyncio.timeout(10):
            async for m in gw.messages:
                # signed with the portal's key, for this gateway alone
                assert open_portal_command(p, m.payload) == msgspec.structs.replace(cmd, site=SITE, gateway=GATEWAY)
                with pytest.raises(wire.WireError, match="wrong-gateway"):
                    open_portal_command(p, m.payload, gateway="gw2")
                break
        with pytest.raises(ValueError, match="unknown gateway"):
            await p.services.ingest.send_command(SITE, "gw9", cmd)


async def test_portal_survives_a_broker_restart(tmp_path: Path, broker: MosquittoProcess) -> None:
    async with running_portal(write_config(tmp_path, broker)) as p:
        await _ready(p)
        broker.stop()
        await wait_for(lambda: not p.services.ingest.connected, what="disconnect noticed")
        h = await p.health()  # still serving
        assert h["status"] == "degraded" and h["broker"]["connected"] is False
        assert (await p.client.get("/console")).status == 200
        now = wire.utcnow()
        with pytest.raises(BrokerUnavailable):
            await p.services.ingest.send_command(
                SITE, GATEWAY, wire.Command(v=2, id="c2", type="unlock", ts=now, expires=now, by="guard1")
            )
        broker.start()
        await wait_for(lambda: p.services.ingest.connected, timeout=15, what="reconnect")
        async with mqtt(broker) as gw:
            await gw.subscribe(ACK_TOPIC, qos=1)
            await gw.publish(EVENTS_TOPIC, batch_payload([event(1)]), qos=1)
            assert (await next_ack(gw)).seqs == [1]
        assert (await p.health())["broker"]["connects"] == 2


async def test_a_password_file_others_can_read_is_told_and_retried_until_it_is_fixed(
    tmp_path: Path, broker: MosquittoProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """The ingest's credentials error is kept for the health page, logged once (not at every retry), and the
    ingest keeps retrying: fixing the file's mode is enough, no restart."""
    secret = tmp_path / "mqtt.pass"
    secret.write_text("pw\n", encoding="utf-8")
    secret.chmod(0o644)
    cfg = write_config(tmp_path, broker, mqtt_extra=("  username: portal", f"  password_file: {secret}"))
    async with running_portal(cfg) as p:
        ingest = p.services.ingest
        await wait_for(lambda: "chmod 600" in (ingest.last_error or ""), what="the credentials error kept")
        first = sum(r.getMessage().startswith("MQTT credentials:") for r in caplog.records)
        await asyncio.sleep(0.5)  # several retries (reconnect_min_s 0.1)
        assert not ingest.connected and ingest.connects == 0
        told = [r for r in caplog.records if r.getMessage().startswith("MQTT credentials:")]
        assert len(told) == first == 1, [r.getMessage() for r in told]
        secret.chmod(0o600)
        await wait_for(lambda: ingest.connected, timeout=15, what="connected once the file is private")
        assert (await p.health())["broker"]["connects"] == 1


async def test_slow_console_socket_is_dropped_without_holding_up_others(tmp_path: Path) -> None:
    async with running_portal(write_config(tmp_path, None, extra="ws_queue_max: 8\n")) as p:
        await add_user(p, "guard1", "guard", PW)
        await sign_in(p, "guard1", PW)
        hdr = {"Origin": p.origin}
        fast = await p.client.ws_connect("/ws", headers=hdr)
        slow = await p.client.ws_connect("/ws", headers=hdr)
        assert json.loads((await fast.receive()).data)["kind"] == "hello"
        await wait_for(lambda: p.services.hub.clients == 2, what="two consoles")
        big = {"kind": "note", "text": "x" * 60_000}
        got = 0
        for _ in range(400):  # ~24 MB: far beyond what the socket buffers of a reader that never reads hold
            p.services.hub.broadcast(big)
            while True:  # the fast console keeps up
                try:
                    msg = await fast.receive(timeout=0.001)
                except TimeoutError:
                    break
                if json.loads(msg.data).get("kind") == "note":
                    got += 1
            await asyncio.sleep(0)
            if p.services.hub.clients == 1:
                break
        assert p.services.hub.clients == 1, "the slow console was not dropped"
        assert p.services.metrics.registry.get_sample_value("gatehouse_portal_websocket_dropped_total") == 1
        p.services.hub.broadcast({"kind": "note", "text": "after"})
        async with asyncio.timeout(10):
            while True:
                m = json.loads((await fast.receive()).data)
                if m.get("text") == "after":
                    break
        await fast.close()
        await slow.close()
        # An unauthenticated socket and a foreign origin are refused before the upgrade.
        p.client.session.cookie_jar.clear()
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await p.client.ws_connect("/ws", headers=hdr)
        assert e.value.status == 401
        await sign_in(p, "guard1", PW)
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await p.client.ws_connect("/ws", headers={"Origin": "http://evil.example"})
        assert e.value.status == 403


# ---------------------------------------------------------------- the real process


async def test_portal_process_end_to_end_with_restart(tmp_path: Path, broker: MosquittoProcess) -> None:
    """``python -m portal run``: ready line, ingest + ack, SIGTERM, and batches queued while it was down."""
    cfg = write_config(tmp_path, broker, client_id="portal-e2e")
    (tmp_path / "pw").write_text(PW)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "portal",
        "adduser",
        "--config",
        str(cfg),
        "--user",
        "guard1",
        "--role",
        "guard",
        "--password-file",
        str(tmp_path / "pw"),
        cwd=Path(__file__).parent.parent,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err

    async def fetch_events(url: str) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(url + "login") as r:
                token = csrf_of(await r.text())
            async with http.post(
                url + "login",
                data={"user": "guard1", "password": PW, "csrf": token},
                headers={"Origin": url.rstrip("/")},
                allow_redirects=False,
            ) as r:
                assert r.status == 303
            async with http.get(url + "api/events") as r:
                assert r.status == 200
                return list((await r.json())["events"])

    async with mqtt(broker) as gw:
        await gw.subscribe(ACK_TOPIC, qos=1)
        with portal_process(cfg) as pp:
            assert pp.url.startswith("http://127.0.0.1:")
            assert pp.first_admin is not None
            otp = Path(pp.first_admin["password_file"]).read_text().strip()
            assert len(otp) >= 12
            async with aiohttp.ClientSession() as http:

                async def connected() -> bool:
                    async with http.get(pp.url + "api/health", headers=scrape_headers(cfg)) as r:
                        return bool((await r.json())["broker"]["connected"])

                await wait_for(connected, what="process connected")
            await gw.publish(EVENTS_TOPIC, batch_payload([event(1), event(2)]), qos=1)
            assert (await next_ack(gw)).seqs == [1, 2]
            assert [e["seq"] for e in await fetch_events(pp.url)] == [2, 1]
            assert pp.stop() == 0
            log = pp.stderr_path.read_text()
            assert "portal stopped" in log and otp not in log
        # Published while the portal is down: the broker keeps it for the portal's persistent session.
        await gw.publish(EVENTS_TOPIC, batch_payload([event(3)]), qos=1)
        with portal_process(cfg) as pp2:
            assert pp2.first_admin is None
            assert (await next_ack(gw, timeout=20)).seqs == [3]
            assert [e["seq"] for e in await fetch_events(pp2.url)] == [3, 2, 1]
