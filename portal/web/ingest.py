"""MQTT ingest: gateway event batches and status in, acknowledgements and commands out.

One supervising task keeps one aiomqtt connection (persistent session: a stable client id and
``clean_session=False``, so the broker queues QoS 1 batches while the portal is away) and
reconnects with capped exponential backoff and full jitter. Each batch is checked against the
wire contract and the list of known gateways, then queued on the store without waiting for it;
the store's commit listener sends one :class:`wire.Ack` per gateway per commit, naming every seq
of the committed batches (new and re-sent alike), and only then. A payload that breaks the
contract is counted by reason, logged once per (gateway, reason), and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import mqtt
from common.backoff import backoff_delay
from common.configfile import read_secret
from common.tasks import cancel_and_wait, run_until_first_ends
from gateway import wire
from gateway.wire.commands import sign_command
from portal.config import ConfigError, PortalConfig
from portal.store import (
    BatchResult,
    CountRejection,
    EnsureGateways,
    GatewaySnapshot,
    Op,
    SetStatus,
    StatusResult,
    Store,
    StoreBatch,
    load_rejections,
)
from portal.store.seqs import load_gateways
from portal.web.metrics import Metrics

log = logging.getLogger("portal.ingest")

#: Most seqs one Ack carries; a commit spanning more for one gateway sends several.
ACK_CHUNK = 5000
ACK_QUEUE_MAX = 10_000
#: gateways whose acks are published at once, before their PUBACKs are awaited together
ACK_PIPELINE = 256
LOG_ONCE_MAX = 1000
#: A seq gap is normal for a moment (a gateway sends alarms ahead of routine events queued before them);
#: it is logged as a warning only if still open after this long.
GAP_GRACE_S = 30.0


class BrokerUnavailable(ConnectionError):
    """The portal is not connected to the MQTT broker right now."""


class Ingest:
    def __init__(
        self,
        cfg: PortalConfig,
        store: Store,
        metrics: Metrics,
        *,
        on_events: Callable[[list[dict[str, Any]]], None] | None = None,
        on_status: Callable[[str, str, str], None] | None = None,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.cfg = cfg
        self._signing_key = signing_key
        self.store = store
        self.metrics = metrics
        self.on_events = on_events
        self.on_status = on_status
        self._rand = rand
        self._sleep = sleep
        self._known = {(g.site, g.gateway) for g in cfg.gateways}
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._acks: asyncio.Queue[tuple[str, str, list[int]]] = asyncio.Queue()
        self._logged: set[tuple[str, str]] = set()
        self.rejections: dict[str, int] = defaultdict(int)  # by reason, since the store began
        self.rejections_by_source: dict[tuple[str, str], int] = {}
        self.connected = False
        self.connects = 0
        self.last_error = ""
        self.acks_sent = 0
        self.acks_dropped = 0
        self._stopping = False
        self.faults: dict[tuple[str, str], str] = {}  # a gateway's standing fault, from its retained status
        self.gap_grace_s = GAP_GRACE_S
        self._gap_timers: dict[tuple[str, str, int, int], asyncio.TimerHandle] = {}
        self._gaps_warned: set[tuple[str, str, int, int]] = set()
        self._gap_checks: set[asyncio.Task[None]] = set()
        self._watches: list[tuple[str, Callable[[str, bytes], None]]] = []
        store.add_commit_listener(self._on_commit, local_only=True)  # acks go from the instance that stored

    def watch(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        """Also subscribe to ``topic_filter`` (on every connection; before :meth:`start`) and hand what arrives on
        it to ``handler`` instead of the wire contract's checks: what the brokers say of themselves (an estate
        bridge's state, portal.centre)."""
        self._watches.append((topic_filter, handler))

    # -- lifecycle

    async def start(self) -> None:
        counts = await self.store.read(load_rejections)
        for (reason, source), n in counts.items():
            self.rejections[reason] += n
            self.rejections_by_source[(reason, source)] = n
        await self.store.write(EnsureGateways(sorted(self._known)))
        self._task = asyncio.create_task(self._supervise(), name="portal.ingest")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await cancel_and_wait("ingest", [self._task])
            self._task = None
        for h in self._gap_timers.values():
            h.cancel()
        self._gap_timers.clear()
        if self._gap_checks:
            await cancel_and_wait("ingest gap checks", list(self._gap_checks))
        self._set_connected(False)

    # -- the connection

    def _client_kwargs(self) -> dict[str, Any]:
        m = self.cfg.mqtt
        kw: dict[str, Any] = dict(
            hostname=m.host,
            port=m.port,
            identifier=m.client_id,
            clean_session=bool(m.share_group),
            keepalive=m.keepalive_s,
            timeout=10.0,
            logger=logging.getLogger("portal.mqtt"),
        )
        if m.username:
            kw["username"] = m.username
            kw["password"] = read_secret(m.password_file) if m.password_file else None
        if m.tls is not None:
            kw["tls_params"] = aiomqtt.TLSParameters(
                ca_certs=m.tls.ca_file, certfile=m.tls.cert_file, keyfile=m.tls.key_file
            )
            kw["tls_insecure"] = m.tls.insecure
        return kw

    async def _supervise(self) -> None:
        m = self.cfg.mqtt
        attempt = 0
        while not self._stopping:
            try:
                client = mqtt.Client(**self._client_kwargs())
                async with client:
                    events = wire.subscription("events")
                    await client.subscribe(f"$share/{m.share_group}/{events}" if m.share_group else events, qos=1)
                    # every instance follows every status (retained; writing one again changes nothing)
                    await client.subscribe(wire.subscription("status"), qos=1)
                    for topic_filter, _ in self._watches:
                        await client.subscribe(topic_filter, qos=1)
                    self._client = client
                    attempt = 0
                    self.connects += 1
                    self._set_connected(True)
                    log.info("connected to MQTT broker %s:%d as %s", m.host, m.port, m.client_id)
                    await run_until_first_ends(
                        "ingest",
                        [
                            asyncio.create_task(self._publish_acks(client), name="portal.ingest.acks"),
                            asyncio.create_task(self._receive(client), name="portal.ingest.receive"),
                        ],
                    )
            except aiomqtt.MqttError as e:
                err = str(e)
                if self.connected or err != self.last_error:
                    log.warning("MQTT broker %s:%d unavailable: %s", m.host, m.port, err)
                self.last_error = err
            except ConfigError as e:
                err = str(e)
                if err != self.last_error:
                    log.error("MQTT credentials: %s", err)
                self.last_error = err
            except Exception as e:  # a bug must not end the ingest for good: log it and reconnect
                log.exception("MQTT ingest failed; reconnecting")
                self.last_error = repr(e)
            finally:
                self._client = None
                self._set_connected(False)
            if self._stopping:
                break
            delay = backoff_delay(attempt, m.reconnect_min_s, m.reconnect_max_s, self._rand)
            attempt += 1
            await self._sleep(delay)

    def _set_connected(self, value: bool) -> None:
        if value != self.connected:
            self.connected = value
            self.metrics.broker_connected.set(1 if value else 0)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            payload = msg.payload
            if isinstance(payload, str):
                payload = payload.encode()
            elif not isinstance(payload, bytes | bytearray):
                payload = b""
            watcher = next((h for f, h in self._watches if msg.topic.matches(f)), None)
            if watcher is not None:
                try:
                    watcher(str(msg.topic), bytes(payload))
                except Exception:
                    log.exception("a watcher of %s failed", msg.topic)
                continue
            try:
                await self.handle(str(msg.topic), bytes(payload))
            except (asyncio.CancelledError, aiomqtt.MqttError):
                raise
            except Exception:  # a bug must not stop the ingest; the gateway re-sends what is not acked
                log.exception("handling a message on %s failed", str(msg.topic)[:200])

    async def _publish_acks(self, client: aiomqtt.Client) -> None:
        """Publish the acks as commits queue them: whatever has queued meanwhile at once, one message per gateway
        (its seqs merged), their PUBACKs awaited together. One ack at a time, each waiting for the broker's PUBACK
        before the next, bounded a busy portal to one ack per round trip to the broker: the acks queued up behind,
        the gateways' windows stayed full, and more instances stored no more (bench/centre.py)."""
        while True:
            first = await self._acks.get()
            merged: dict[tuple[str, str], set[int]] = defaultdict(set)
            merged[(first[0], first[1])].update(first[2])
            while len(merged) < ACK_PIPELINE and not self._acks.empty():
                site, gw, seqs = self._acks.get_nowait()
                merged[(site, gw)].update(seqs)
            sends = []
            for (site, gw), acked in merged.items():
                ordered = sorted(acked)
                for i in range(0, len(ordered), ACK_CHUNK):
                    ack = wire.Ack(v=wire.SCHEMA_VERSION, seqs=ordered[i : i + ACK_CHUNK])
                    sends.append(client.publish(wire.topic(site, gw, "ack"), wire.encode(ack), qos=1))
            results = await asyncio.gather(*sends, return_exceptions=True)
            failed: BaseException | None = None
            for r in results:
                if r is None:
                    self.acks_sent += 1
                    self.metrics.acks_sent.inc()
                    continue
                # The gateway re-sends what stays unacknowledged and gets a fresh ack then.
                self.acks_dropped += 1
                failed = failed or r
            if failed is not None:
                raise failed

    # -- incoming messages

    async def handle(self, topic: str, payload: bytes) -> None:
        """Check one message and queue it for the store, or count why not. Never raises for bad input."""
        try:
            site, gw, suffix = wire.parse_topic(topic)
        except wire.WireError as e:
            await self._reject(e.reason, "", "", e.detail or topic[:200])
            return
        if (site, gw) not in self._known:
            await self._reject("unknown-gateway", site, gw, f"{site}/{gw} is not in the portal's gateway list")
            return
        if suffix == "events":
            try:
                batch = wire.decode_batch(payload, site=site, gateway=gw)
            except wire.WireError as e:
                await self._reject(e.reason, site, gw, e.detail)
                return
            await self.store.enqueue(StoreBatch(batch))
        elif suffix == "status":
            if not payload:  # a retained status being cleared
                return
            try:
                status = wire.decode_status(payload)
            except wire.WireError as e:
                await self._reject(e.reason, site, gw, e.detail)
                return
            await self.store.enqueue(SetStatus(site, gw, status))
        else:
            await self._reject("bad-topic", site, gw, f"unexpected suffix {suffix!r}")

    async def _reject(self, reason: str, site: str, gw: str, detail: str) -> None:
        known = (site, gw) in self._known
        source = f"{site}/{gw}" if known else ""
        self.rejections[reason] += 1
        self.rejections_by_source[(reason, source)] = self.rejections_by_source.get((reason, source), 0) + 1
        self.metrics.rejections.labels(reason=reason).inc()
        who = f"{site}/{gw}" if site else "?"
        key = (who, reason)
        if key not in self._logged:
            if len(self._logged) < LOG_ONCE_MAX:
                self._logged.add(key)
            elif ("*", reason) in self._logged:
                return
            else:
                self._logged.add(("*", reason))
            log.warning("rejected a message from %s: %s (%s); further ones are only counted", who, reason, detail[:200])
        await self.store.enqueue(CountRejection(reason, source, detail))

    # -- after each commit

    def _on_commit(self, committed: list[tuple[Op, Any]]) -> None:
        acks: dict[tuple[str, str], list[int]] = defaultdict(list)
        new: list[dict[str, Any]] = []
        now = datetime.now(UTC)
        for op, res in committed:
            if isinstance(res, BatchResult):
                acks[(res.site, res.gateway)].extend(res.ack_seqs)
                new.extend(res.new_events)
                self._after_batch(res, now)
            elif isinstance(res, StatusResult) and isinstance(op, SetStatus):
                fault_changed = self._note_fault(op)
                if res.changed:
                    log.info("gateway %s/%s is %s", op.site, op.gateway, res.snapshot.status)
                if (res.changed or fault_changed) and self.on_status:
                    self.on_status(op.site, op.gateway, self._shown_status(op.site, op.gateway, res.snapshot.status))
        for (site, gw), seqs in acks.items():
            if not seqs or not self.cfg.mqtt.acknowledge:  # a guardroom portal beside a centre: the centre's acks
                continue
            seqs = sorted(set(seqs))
            for i in range(0, len(seqs), ACK_CHUNK):
                if self._acks.qsize() >= ACK_QUEUE_MAX:
                    self._acks.get_nowait()
                    self.acks_dropped += 1
                self._acks.put_nowait((site, gw, seqs[i : i + ACK_CHUNK]))
        if new and self.on_events:
            self.on_events(new)

    def _note_fault(self, op: SetStatus) -> bool:
        """Keep the fault an online gateway reports (none once it is offline); True if it changed."""
        key = (op.site, op.gateway)
        fault = op.status.fault if op.status.state == "online" else ""
        if fault == self.faults.get(key, ""):
            return False
        if fault:
            self.faults[key] = fault
            log.error("gateway %s/%s reports a fault: %s", op.site, op.gateway, fault[:200])
        else:
            self.faults.pop(key, None)
            log.warning("gateway %s/%s: fault cleared", op.site, op.gateway)
        return True

    def _shown_status(self, site: str, gateway: str, status: str) -> str:
        """What the console shows: "fault" for an online gateway with a standing fault."""
        return "fault" if status == "online" and self.faults.get((site, gateway)) else status

    def _gap_overdue(self, key: tuple[str, str, int, int]) -> None:
        self._gap_timers.pop(key, None)
        if self.store.shared:  # another instance may have filled it: ask the store, not this instance's copy
            t = asyncio.get_running_loop().create_task(self._gap_recheck(key), name="portal.ingest.gap")
            self._gap_checks.add(t)
            t.add_done_callback(self._gap_checks.discard)
            return
        self._gap_warn(key, self.store.gateways.get(key[:2]))

    async def _gap_recheck(self, key: tuple[str, str, int, int]) -> None:
        try:
            states = await self.store.read(load_gateways)
        except Exception as e:  # the store is away: the gap is only a warning, the seqs are still counted
            log.info("gateway %s/%s: seq gap not re-checked: %s", key[0], key[1], e)
            return
        st = states.get(key[:2])
        self._gap_warn(key, st.snapshot() if st is not None else None)

    def _gap_warn(self, key: tuple[str, str, int, int], snap: GatewaySnapshot | None) -> None:
        site, gw, lo, hi = key
        if snap is None or (lo, hi) not in snap.open_gaps:
            return
        self._gaps_warned.add(key)
        log.warning(
            "gateway %s/%s: seq gap %d..%d still open after %.0f s (have up to %d contiguous)",
            site,
            gw,
            lo,
            hi,
            self.gap_grace_s,
            snap.contiguous_seq,
        )

    def _after_batch(self, res: BatchResult, now: datetime) -> None:
        who = f"{res.site}/{res.gateway}"
        self.metrics.events_ingested.inc(len(res.new_events))
        if res.duplicates:
            self.metrics.events_duplicate.inc(res.duplicates)
        for e in res.new_events:
            try:
                ts = datetime.fromisoformat(e["ts"])  # as ts_text wrote it; strptime took 30 times as long
                if ts.tzinfo is None:
                    ts = ts.replace(tzinfo=UTC)
            except ValueError:
                continue
            self.metrics.ingest_latency.observe(max(0.0, (now - ts).total_seconds()))
        loop = asyncio.get_running_loop()
        for lo, hi in res.gap_opened:
            key = (res.site, res.gateway, lo, hi)
            log.debug(
                "gateway %s: seq gap %d..%d noticed (have up to %d contiguous)",
                who,
                lo,
                hi,
                res.snapshot.contiguous_seq,
            )
            old = self._gap_timers.pop(key, None)
            if old is not None:
                old.cancel()
            self._gap_timers[key] = loop.call_later(self.gap_grace_s, self._gap_overdue, key)
        for lo, hi in res.gaps_closed:
            key = (res.site, res.gateway, lo, hi)
            timer = self._gap_timers.pop(key, None)
            if timer is not None:
                timer.cancel()
            if key in self._gaps_warned:
                self._gaps_warned.discard(key)
                log.info("gateway %s: seq gap %d..%d filled", who, lo, hi)
            else:
                log.debug("gateway %s: seq gap %d..%d filled", who, lo, hi)
        if res.conflicts:
            n = len(res.conflicts)
            self.rejections["seq-conflict"] += n
            source = ("seq-conflict", who)
            self.rejections_by_source[source] = self.rejections_by_source.get(source, 0) + n
            self.metrics.rejections.labels(reason="seq-conflict").inc(n)
            if (who, "seq-conflict") not in self._logged:
                self._logged.add((who, "seq-conflict"))
                log.error(
                    "gateway %s re-used seqs %s under new event ids (was the gateway's store reset?): "
                    "stored under numbers of their own and acknowledged",
                    who,
                    res.conflicts[:10],
                )
            self.store.enqueue_nowait(CountRejection("seq-conflict", who, f"seqs {res.conflicts[:10]}", n))

    # -- outgoing commands

    async def send_command(self, site: str, gateway: str, cmd: wire.Command) -> None:
        """Sign a command for ``site``/``gateway`` with the portal's key and publish it at QoS 1 (the one place
        commands leave the portal). Raises :class:`BrokerUnavailable` at once when disconnected, ValueError for
        an unknown gateway or a command no gateway would accept (a life over wire.MAX_COMMAND_LIFE_S)."""
        if (site, gateway) not in self._known:
            raise ValueError(f"unknown gateway {site}/{gateway}")
        if self._signing_key is None:
            raise ValueError("the portal has no signing key: commands cannot be signed")
        payload = sign_command(self._signing_key, cmd, site=site, gateway=gateway)
        client = self._client
        if client is None or not self.connected:
            raise BrokerUnavailable("not connected to the MQTT broker")
        try:
            await client.publish(wire.topic(site, gateway, "cmd"), payload, qos=1)
        except aiomqtt.MqttError as e:
            raise BrokerUnavailable(str(e)) from e

    # -- health

    def health(self) -> dict[str, Any]:
        gws = []
        for g in self.cfg.gateways:
            snap = self.store.gateways.get((g.site, g.gateway))
            item: dict[str, Any] = {
                "site": g.site,
                "gateway": g.gateway,
                "name": g.name,
                "fault": self.faults.get((g.site, g.gateway), ""),
            }
            if snap is None:
                item.update(status="unknown", online=False, last_seq=0, contiguous_seq=0, gaps_open=0)
            else:
                item.update(
                    status=self._shown_status(g.site, g.gateway, snap.status),
                    online=snap.status == "online",
                    last_seq=snap.max_seq,
                    contiguous_seq=snap.contiguous_seq,
                    gaps_open=len(snap.open_gaps),
                    missing=[list(r) for r in snap.missing[:20]],
                    gaps_noticed=snap.gaps_noticed,
                    gaps_closed=snap.gaps_closed,
                    events_stored=snap.events_stored,
                    last_event_at=snap.last_event_at,
                    status_changed_at=snap.status_changed_at,
                    version=snap.version,
                )
            gws.append(item)
        return {
            "connected": self.connected,
            "connects": self.connects,
            "last_error": "" if self.connected else self.last_error,
            "acks_sent": self.acks_sent,
            "acks_dropped": self.acks_dropped,
            "gateways": gws,
            "rejections": dict(sorted(self.rejections.items())),
        }
