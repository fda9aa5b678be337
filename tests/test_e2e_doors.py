"""Doors end to end: scans written to a real reader pseudo-terminal (the reader stub) → the gateway process
→ the door-controller stub's lock relay, and the events through a real Mosquitto to the portal process.

Everything is a process of its own: Mosquitto, ``gatehouse gateway run``, ``python -m portal run``, the
door-controller stub (Modbus TCP) and the QR reader stub (a pseudo-terminal). Passes are signed here with a
key pair made for the test, as the portal signs them; the gateway is given only the public key file.
Events are read from the gateway's store and the portal's store (SQLite, read-only).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from gateway.wire.passes import (
    PassFields,
    RevocationList,
    generate_keypair,
    new_pass_id,
    save_public_key,
    sign_pass,
    sign_revocations,
)
from tests import procs
from tests.doors_support import door_gateway_config
from tests.portal_support import signed_command
from tests.portal_support import write_config as write_portal_config
from tests.stubs import Stub, run_stub
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

SITE, GW = "s1", "gw1"
DOOR = "b3-u2"
READER = "qr-b3-u2"


@dataclass
class Site:
    tmp: Path
    broker: MosquittoProcess
    portal: procs.Child
    portal_cfg: Path
    gateway: procs.Child
    door: Stub
    reader: Stub
    keys: tuple[Any, Any]  # (private, public): the portal's signing key, made for this test
    other_key: Any

    # -- passes

    def sign(self, kind: str = "resident", key: Any = None, **kw: Any) -> tuple[str, str]:
        """(pass text, pass id hex)."""
        now = int(time.time())
        f: dict[str, Any] = dict(
            kind=kind,
            site=SITE,
            subject="P100",
            house="3-2-501",
            units=("3/2",),
            not_before=now,
            not_after=now + 60,
            pass_id=new_pass_id(),
        )
        if kind == "visitor":
            f.update(subject="V200", not_after=now + 3600, uses=10)
        f.update(kw)
        return sign_pass(key or self.keys[0], PassFields(**f)), f["pass_id"].hex()

    # -- the stores

    def gw_events(self, *types: str) -> list[dict[str, Any]]:
        rows = procs.read_rows(self.tmp / "gw" / "data" / "gateway.db", "SELECT body FROM events ORDER BY seq")
        evs = [json.loads(r[0]) for r in rows]
        return [e for e in evs if not types or e["type"] in types]

    def portal_events(self, *types: str) -> list[dict[str, Any]]:
        rows = procs.read_rows(
            self.tmp / "portal" / "data" / "portal.db",
            "SELECT type, priority, place, data, seq, device FROM events WHERE gateway = ? ORDER BY seq",
            GW,
        )
        evs = [
            {"type": t, "priority": p, "place": json.loads(pl), "data": json.loads(d), "seq": s, "device": dev}
            for t, p, pl, d, s, dev in rows
        ]
        return [e for e in evs if not types or e["type"] in types]

    # -- the stubs

    async def pulses(self) -> list[dict[str, Any]]:
        hist = (await self.door.state())["panels"][0]["units"]["1"]["relay_history"]
        return [h for h in hist if h["on"] and h["via"] == "pulse"]

    async def scan(self, text: str) -> float:
        return float((await self.reader.post("/scan", {"text": text}))["written"])

    async def command(self, type_: str, **args: Any) -> str:
        """Publish a command signed with the portal's key (as the portal does)."""
        payload, cid = signed_command(self.keys[0], type_, site=SITE, gateway=GW, **args)
        async with aiomqtt.Client("127.0.0.1", self.broker.port) as c:
            await c.publish(wire.topic(SITE, GW, "cmd"), payload, qos=1)
        return cid

    async def result(self, command_id: str, timeout: float = 15.0) -> dict[str, Any]:
        got = await wait_for(
            lambda: [e for e in self.gw_events("command.result") if e["data"]["command_id"] == command_id],
            timeout,
            f"result of {command_id}",
        )
        return dict(got[0]["data"])

    def logs(self) -> str:
        return f"--- gateway\n{self.gateway.tail()}\n--- portal\n{self.portal.tail()}"


@pytest.fixture
async def site(tmp_path: Path, broker: MosquittoProcess) -> AsyncIterator[Site]:
    portal_cfg = write_portal_config(tmp_path / "portal", broker, gateways=[(SITE, GW)])
    portal = await asyncio.to_thread(lambda: procs.portal(portal_cfg, tmp_path / "logs").start())
    made: list[Site] = []
    try:
        async with (
            run_stub("firmware_stubs.door_controller", "--tcp", "127.0.0.1:0") as door,
            run_stub("firmware_stubs.qr_reader", "--pty") as reader,
        ):
            priv, pub = generate_keypair()
            (tmp_path / "gw" / "keys").mkdir(parents=True)
            save_public_key(tmp_path / "gw" / "keys" / "pass.pub", pub)
            cfg = door_gateway_config(
                tmp_path / "gw",
                broker.port,
                door,
                reader,
                public_key="keys/pass.pub",
                site=SITE,
                gateway=GW,
                door_name=DOOR,
                reader_name=READER,
            )
            gateway = await asyncio.to_thread(lambda: procs.gateway(cfg, tmp_path / "logs").start())
            s = Site(tmp_path, broker, portal, portal_cfg, gateway, door, reader, (priv, pub), generate_keypair()[0])
            made.append(s)
            try:
                await wait_for(lambda: s.gw_events("door.state"), 20, "the door's first state")
                # The gateway has the reader's port open once the reader hears its heartbeat polls.
                await wait_for(lambda: _polled(reader), 20, "a heartbeat poll at the reader")
                # The portal's current list, signed with the test's key: visitor passes need a fresh one.
                rl = RevocationList(version=1, issued_at=int(time.time()), site=SITE)
                assert (await s.result(await s.command("credentials.sync", revocations=sign_revocations(priv, rl))))[
                    "ok"
                ] is True
                yield s
            finally:
                await asyncio.to_thread(s.gateway.stop)
    finally:
        await asyncio.to_thread(portal.stop)
        for s in made:  # a test may have restarted the portal
            await asyncio.to_thread(s.portal.stop)


async def _polled(reader: Stub) -> bool:
    return bool((await reader.state())["readers"][0]["polls"])


def tampered(text: str) -> str:
    """The same pass with one character of its body changed: the signature no longer matches."""
    i = len(text) // 2
    return text[:i] + ("B" if text[i] != "B" else "C") + text[i + 1 :]


async def test_every_decision_through_the_reader_line(site: Site) -> None:
    cid = await site.command(
        "credentials.sync",
        revocations=sign_revocations(
            site.keys[0],
            RevocationList(
                version=2, issued_at=int(time.time()), site=SITE, subjects=["P-revoked"], blocked=["P-blocked"]
            ),
        ),
    )
    assert await site.result(cid) == {
        "command_id": cid,
        "command": "credentials.sync",
        "ok": True,
        "detail": "applied version 2",
        "by": "guard1",
        "version": 2,
    }
    good, good_id = site.sign()
    now = int(time.time())
    scans = [
        (good, "granted"),
        (good, "replayed"),
        (site.sign(not_before=now - 7200, not_after=now - 3600)[0], "expired"),
        (site.sign(units=("9/9",))[0], "wrong-door"),
        (site.sign(subject="P-revoked")[0], "revoked"),
        (site.sign(subject="P-blocked")[0], "blocked"),
        (tampered(site.sign()[0]), "bad-signature"),
        (site.sign(key=site.other_key)[0], "unknown-key"),
        ("https://estate.example/p/8f3a9c", "malformed"),
    ]
    for text, reason in scans:
        before = len(site.gw_events("access.granted", "access.denied"))
        await site.scan(text)
        evs = await wait_for(lambda b=before: site.gw_events("access.granted", "access.denied")[b:], 10, reason)
        assert len(evs) == 1
        e = evs[0]
        got = "granted" if e["type"] == "access.granted" else e["data"]["reason"]
        assert got == reason, (reason, e)
        assert e["place"] == {"site": SITE, "building": "3", "unit": "2", "door": DOOR}
        assert e["device"] == READER and e["data"]["door"] == DOOR and e["data"]["reader"] == READER

    granted = site.gw_events("access.granted")[0]
    assert granted["data"] == {
        "door": DOOR,
        "reader": READER,
        "pass_id": good_id,
        "kind": "resident",
        "subject": "P100",
        "house": "3-2-501",
        "uses_left": 0,
    }
    blocked = next(e for e in site.gw_events("access.denied") if e["data"]["reason"] == "blocked")
    assert blocked["priority"] == wire.Priority.TAMPER and blocked["data"]["subject"] == "P-blocked"
    assert all(
        e["priority"] == wire.Priority.ROUTINE
        for e in site.gw_events("access.denied")
        if e["data"]["reason"] != "blocked"
    )
    # Eight refusals at one door within a minute: one burst alarm (burst_count 5).
    (burst,) = site.gw_events("door.scan_burst")
    assert burst["priority"] == wire.Priority.TAMPER and burst["data"] == {"door": DOOR, "count": 5, "window_s": 60.0}
    assert len(await site.pulses()) == 1  # only the granted pass moved the lock

    # Garbage and over-long lines change nothing: no decision, no event, no relay.
    events_before = len(site.gw_events())
    await site.reader.post("/garbage", {"length": 64})
    await site.reader.post("/overlong", {"length": 600})
    await site.reader.post("/raw", {"hex": "47483100ff0d0a"})  # "GH1" then a NUL and 0xFF
    text, _ = site.sign(subject="P101")
    await site.scan(text)
    evs = await wait_for(lambda: site.gw_events("access.granted")[1:], 10, "the next good scan")
    assert evs[0]["data"]["subject"] == "P101"
    new = [e["type"] for e in site.gw_events()[events_before:]]
    assert "access.denied" not in new and new.count("access.granted") == 1
    assert len(await site.pulses()) == 2

    # The same decisions at the portal.
    await wait_for(lambda: len(site.portal_events("access.denied")) == 8, 20, "the refusals at the portal")
    at_portal = {e["data"]["reason"]: e for e in site.portal_events("access.denied")}
    assert sorted(at_portal) == sorted(r for _, r in scans if r != "granted")
    assert at_portal["blocked"]["priority"] == wire.Priority.TAMPER
    await wait_for(lambda: len(site.portal_events("access.granted")) == 2, 20, "the grants at the portal")
    await wait_for(lambda: site.portal_events("door.scan_burst"), 20, "the burst at the portal")


async def test_doors_keep_opening_without_the_broker_and_without_the_portal(site: Site) -> None:
    site.broker.stop()
    text, pass_id = site.sign(kind="visitor")
    written = await site.scan(text)
    pulses = await wait_for(site.pulses, 10, "the lock released with the broker stopped")
    assert pulses[0]["mono"] - written < 2.0
    await wait_for(
        lambda: [e for e in site.gw_events("access.granted") if e["data"]["pass_id"] == pass_id],
        10,
        "the decision in the gateway's store",
    )
    assert not [e for e in site.portal_events("access.granted") if e["data"]["pass_id"] == pass_id]
    site.broker.start()
    await wait_for(
        lambda: [e for e in site.portal_events("access.granted") if e["data"]["pass_id"] == pass_id],
        30,
        "the decision at the portal once the broker is back",
    )

    await asyncio.to_thread(site.portal.stop)
    text2, pass_id2 = site.sign(subject="P102")
    written = await site.scan(text2)
    pulses = await wait_for(lambda: _more(site, 2), 10, "the lock released with the portal stopped")
    assert pulses[1]["mono"] - written < 2.0
    await wait_for(
        lambda: [e for e in site.gw_events("access.granted") if e["data"]["pass_id"] == pass_id2],
        10,
        "the decision in the gateway's store",
    )
    site.portal = await asyncio.to_thread(
        lambda: procs.portal(site.portal_cfg, site.tmp / "logs", name="portal-2").start()
    )
    await wait_for(
        lambda: [e for e in site.portal_events("access.granted") if e["data"]["pass_id"] == pass_id2],
        30,
        "the decision at the portal once it is back",
    )
    seqs = [e["seq"] for e in site.portal_events()]
    assert seqs == sorted(set(seqs)) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # nothing lost


async def _more(site: Site, n: int) -> list[dict[str, Any]] | None:
    p = await site.pulses()
    return p if len(p) >= n else None


async def test_door_alarms_and_remote_unlock_reach_the_portal(site: Site) -> None:
    # Forced open: an intrusion until the door shuts.
    await site.door.post("/force")
    (forced,) = await wait_for(lambda: site.portal_events("door.forced"), 20, "door.forced at the portal")
    assert forced["priority"] == wire.Priority.INTRUSION
    assert forced["place"] == {"site": SITE, "building": "3", "unit": "2", "door": DOOR}
    assert set(forced["data"]) == {"door", "incident", "count"}
    await site.door.post("/close")
    (restore,) = await wait_for(lambda: site.portal_events("door.forced_restore"), 20, "door.forced_restore")
    assert restore["data"]["incident"] == forced["data"]["incident"]

    # Held open: a valid opening left open past held_open_s (5 s).
    await site.scan(site.sign()[0])
    await wait_for(lambda: site.gw_events("access.granted"), 10, "the grant")
    await site.door.post("/hold", {"on": True})
    (held,) = await wait_for(lambda: site.portal_events("door.held"), 20, "door.held at the portal")
    assert held["priority"] == wire.Priority.TAMPER and held["data"]["door"] == DOOR
    assert not site.portal_events("door.forced")[1:]  # a granted opening is not forced
    await site.door.post("/hold", {"on": False})
    await wait_for(lambda: site.portal_events("door.held_restore"), 20, "door.held_restore")

    # Controller tamper, then the reader falling silent.
    await site.door.post("/tamper", {"active": True})
    (tamper,) = await wait_for(lambda: site.portal_events("door.tamper"), 20, "door.tamper")
    assert tamper["priority"] == wire.Priority.TAMPER
    await site.reader.post("/offline", {"on": True})
    (off,) = await wait_for(lambda: site.portal_events("reader.offline"), 20, "reader.offline")
    assert off["priority"] == wire.Priority.FAULT and off["data"]["reader"] == READER and off["data"]["door"] == DOOR
    await site.reader.post("/offline", {"on": False})
    await wait_for(lambda: site.portal_events("reader.online"), 20, "reader.online")

    # Remote unlock: refused without a reason; with one, the lock is pulsed and the grant is logged.
    cid = await site.command("unlock", door=DOOR)
    r = await site.result(cid)
    assert (r["ok"], r["detail"], r["door"]) == (False, "a remote unlock needs a reason", DOOR)
    n = len(await site.pulses())
    cid = await site.command("unlock", door=DOOR, reason="courier at the door, verified by phone")
    r = await site.result(cid)
    assert (r["ok"], r["door"], r["by"]) == (True, DOOR, "guard1")
    assert len(await site.pulses()) == n + 1
    remote = [e for e in site.gw_events("access.granted") if e["data"]["kind"] == "remote"]
    assert remote[0]["data"]["by"] == "guard1" and remote[0]["data"]["reason"].startswith("courier")

    states = [e["data"]["state"] for e in await wait_for(lambda: site.portal_events("door.state"), 20, "states")]
    for s in ("closed", "forced", "unlocked", "open", "held"):
        assert s in states, (s, states)


async def test_a_revocation_sync_stops_a_pass_within_seconds(site: Site) -> None:
    text, pass_id = site.sign(kind="visitor")
    await site.scan(text)
    await wait_for(lambda: site.gw_events("access.granted"), 10, "the first opening")
    # A list signed by a key the gateway does not hold changes nothing.
    bad = sign_revocations(
        site.other_key,
        RevocationList(version=7, issued_at=int(time.time()), site=SITE, passes=[bytes.fromhex(pass_id)]),
    )
    r = await site.result(await site.command("credentials.sync", revocations=bad))
    assert r["ok"] is False and r["detail"].startswith("unknown-key") and r["version"] == 1
    t0 = time.monotonic()
    good = sign_revocations(
        site.keys[0], RevocationList(version=2, issued_at=int(time.time()), site=SITE, passes=[bytes.fromhex(pass_id)])
    )
    r = await site.result(await site.command("credentials.sync", revocations=good))
    assert r["ok"] is True and r["version"] == 2
    await site.scan(text)
    denied = await wait_for(lambda: site.gw_events("access.denied"), 10, "the refusal")
    elapsed = time.monotonic() - t0
    assert denied[0]["data"]["reason"] == "revoked" and denied[0]["data"]["pass_id"] == pass_id
    assert elapsed < 5.0, elapsed
    assert len(await site.pulses()) == 1
    await wait_for(
        lambda: [e for e in site.portal_events("access.denied") if e["data"]["reason"] == "revoked"],
        20,
        "the refusal at the portal",
    )
