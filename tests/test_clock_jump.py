"""Wall-clock jumps under a real gateway process: its CLOCK_REALTIME is moved with libfaketime (an offset
in a file it re-reads on every call; CLOCK_MONOTONIC is left alone), while Mosquitto, the portal process,
the perimeter panel and door controller stubs (Modbus TCP) and the QR reader stub (a pseudo-terminal) run
on the true clock.

A jump must change no poll rate, delay or timer (they run on the monotonic clock); event timestamps follow
the new wall clock (wall time by design) with their sequence numbers gapless. While the clock is known to
be unsynchronised (``GATEHOUSE_CLOCK_SYNC=file:…``, the file removed), passes and command expiry are judged
by gateway.access's rules and the gateway's lower bound on the true time, not by the wrong wall clock.
Durations are measured on this process's monotonic clock (the stubs' ``mono`` is the same clock).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from common.tasks import cancel_and_wait
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

pytestmark = [pytest.mark.timeout(150), pytest.mark.realtime]

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SITE, GW = "s1", "gw1"
DOOR, READER = "b3-u2", "qr-b3-u2"
HOUR, DAY, YEAR = 3600, 86_400, 365 * 86_400
EXIT_S = ENTRY_S = 4
HELD_S = 5
TOL_S = 0.5  # a delay fires within this of its configured length, by the monotonic clock
RATE_WINDOW_S = 3.0
PORTAL_BOUND_S = 5.0  # an event reaches the portal within this (uplink resend 1 s, reconnect at most 1 s)


def _require_libfaketime() -> None:
    if not LIBFAKETIME.exists():
        raise AssertionError(f"{LIBFAKETIME} missing: install the Debian package libfaketime (make test does)")


@dataclass
class Seen:
    mono: float  # this process's monotonic clock when the event was first seen in the store
    real: float  # this process's (true) wall clock then
    body: dict[str, Any]


@dataclass
class Site:
    tmp: Path
    broker: MosquittoProcess
    gateway: procs.Child
    perimeter: Stub
    door: Stub
    reader: Stub
    key: Any
    fake_file: Path
    synced_file: Path
    offset: int = 0
    gw_seen: dict[int, Seen] = field(default_factory=dict)
    portal_seen: dict[int, float] = field(default_factory=dict)  # seq -> mono first seen at the portal

    # -- the gateway's wall clock

    def jump(self, offset: int) -> float:
        """Set the gateway's wall clock to true time + ``offset`` s; the monotonic time of the jump."""
        tmp = self.fake_file.with_suffix(".tmp")
        tmp.write_text(f"{offset:+d}\n", encoding="ascii")
        os.replace(tmp, self.fake_file)  # atomic: the library never reads half a line
        self.offset = offset
        return time.monotonic()

    # -- watching the stores (the gateway's and the portal's SQLite files, read-only)

    def poll_stores(self) -> None:
        now, real = time.monotonic(), time.time()
        top = max(self.gw_seen, default=0)
        for (body,) in procs.read_rows(
            self.tmp / "gw" / "data" / "gateway.db", "SELECT body FROM events WHERE seq > ? ORDER BY seq", top
        ):
            e = json.loads(body)
            self.gw_seen[e["seq"]] = Seen(now, real, e)
        top = max(self.portal_seen, default=0)
        for (seq,) in procs.read_rows(
            self.tmp / "portal" / "data" / "portal.db", "SELECT seq FROM events WHERE gateway = ? AND seq > ?", GW, top
        ):
            self.portal_seen.setdefault(seq, now)

    async def watch(self) -> None:
        while True:
            await asyncio.to_thread(self.poll_stores)
            await asyncio.sleep(0.04)

    def events(self, *types: str, after: int = 0) -> list[Seen]:
        return [s for q, s in sorted(self.gw_seen.items()) if q > after and (not types or s.body["type"] in types)]

    async def next_event(
        self, etype: str, after: int, timeout: float = 15.0, match: Callable[[dict[str, Any]], bool] = lambda e: True
    ) -> Seen:
        got = await until(lambda: [s for s in self.events(etype, after=after) if match(s.body)], timeout, etype)
        return got[0]  # type: ignore[no-any-return]

    @property
    def last_seq(self) -> int:
        return max(self.gw_seen, default=0)

    # -- the outside world

    async def command(self, type_: str, *, expires_in: float = 30.0, **args: Any) -> str:
        """A command signed with the portal's key on the portal's (true) clock."""
        payload, cid = signed_command(self.key, type_, site=SITE, gateway=GW, life_s=expires_in, **args)
        async with aiomqtt.Client("127.0.0.1", self.broker.port) as c:
            await c.publish(wire.topic(SITE, GW, "cmd"), payload, qos=1)
        return cid

    async def result(self, command_id: str, after: int) -> dict[str, Any]:
        s = await self.next_event("command.result", after, match=lambda e: e["data"]["command_id"] == command_id)
        return dict(s.body["data"])

    def sign(self, kind: str = "resident", nb: float = 0, na: float = 60, **kw: Any) -> str:
        """A pass valid from true now + ``nb`` to true now + ``na`` seconds, as the portal signs it."""
        now = int(time.time())
        f: dict[str, Any] = dict(
            kind=kind,
            site=SITE,
            subject="P100",
            house="3-2-501",
            units=("3/2",),
            not_before=now + int(nb),
            not_after=now + int(na),
            pass_id=new_pass_id(),
        )
        if kind == "visitor":
            f.update(subject="V200", uses=10)
        f.update(kw)
        return sign_pass(self.key, PassFields(**f))

    async def decide(self, text: str) -> dict[str, Any]:
        """Scan at the reader; the decision's event data (with ``granted``)."""
        after = self.last_seq
        await self.reader.post("/scan", {"text": text})
        got = await until(lambda: self.events("access.granted", "access.denied", after=after), 10.0, "a decision")
        e = got[0].body
        return {**e["data"], "granted": e["type"] == "access.granted"}

    async def pulses(self) -> int:
        hist = (await self.door.state())["panels"][0]["units"]["1"]["relay_history"]
        return sum(1 for h in hist if h["on"] and h["via"] == "pulse")

    async def poll_rate(self, t0: float, t1: float) -> float:
        """Modbus requests per second the perimeter panel received between monotonic t0 and t1."""
        recent = (await self.perimeter.state(recent=True))["panels"][0]["requests"]["recent"]
        assert recent and recent[0]["mono"] < t0, "the stub's request log does not reach back far enough"
        return sum(1 for r in recent if t0 <= r["mono"] < t1) / (t1 - t0)

    async def polled_for(self, seconds: float) -> bool:
        """True once the perimeter panel's request log reaches back ``seconds``."""
        recent = (await self.perimeter.state(recent=True))["panels"][0]["requests"]["recent"]
        return bool(recent) and recent[0]["mono"] < time.monotonic() - seconds

    def logs(self) -> str:
        return f"--- gateway\n{self.gateway.tail(6000)}"


until = functools.partial(wait_for, step=0.02)  # fine-grained: the delays measured are compared within TOL_S


def _gateway_config(folder: Path, broker: MosquittoProcess, perimeter: Stub, door: Stub, reader: Stub) -> Path:
    """The door helper's config (one door, one reader) plus a perimeter panel with an entry zone."""
    path = door_gateway_config(
        folder,
        broker.port,
        door,
        reader,
        public_key="keys/pass.pub",
        site=SITE,
        gateway=GW,
        door_name=DOOR,
        reader_name=READER,
        held_open_s=HELD_S,
    )
    host, port = perimeter.endpoint()
    text = path.read_text(encoding="utf-8")
    text = text.replace(
        "buses:\n", f"buses:\n  - {{name: fence, kind: modbus-tcp, host: {host}, port: {port}, timeout_ms: 300}}\n", 1
    )
    text = text.replace(
        "devices:\n",
        "devices:\n  - {name: panel-1, profile: perimeter-panel-8, bus: fence, unit: 1, poll_ms: 100}\n",
        1,
    )
    text += f"""zone_groups:
  - {{name: house, exit_delay_s: {EXIT_S}}}
zones:
  - {{name: hall, device: panel-1, point: zone1_alarm, type: entry, group: house, entry_delay_s: {ENTRY_S},
      restore_ms: 300}}
"""
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
async def site(tmp_path: Path, broker: MosquittoProcess) -> AsyncIterator[Site]:
    _require_libfaketime()
    portal_cfg = write_portal_config(tmp_path / "portal", broker, gateways=[(SITE, GW)])
    portal = await asyncio.to_thread(lambda: procs.portal(portal_cfg, tmp_path / "logs").start())
    try:
        async with (
            run_stub("firmware_stubs.perimeter_panel", "--tcp", "127.0.0.1:0", "--zones", "8") as perimeter,
            run_stub("firmware_stubs.door_controller", "--tcp", "127.0.0.1:0") as door,
            run_stub("firmware_stubs.qr_reader", "--pty") as reader,
        ):
            priv, pub = generate_keypair()
            (tmp_path / "gw" / "keys").mkdir(parents=True)
            save_public_key(tmp_path / "gw" / "keys" / "pass.pub", pub)
            cfg = _gateway_config(tmp_path / "gw", broker, perimeter, door, reader)
            fake_file, synced_file = tmp_path / "faketime", tmp_path / "clock-synced"
            fake_file.write_text("+0\n", encoding="ascii")
            synced_file.touch()
            env = {
                "LD_PRELOAD": str(LIBFAKETIME),
                "FAKETIME_TIMESTAMP_FILE": str(fake_file),
                "FAKETIME_NO_CACHE": "1",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                "GATEHOUSE_CLOCK_SYNC": f"file:{synced_file}",
            }
            gw = procs.Child(
                "gateway",
                [procs.PY, "-m", "gateway.cli", "gateway", "run", "--config", str(cfg)],
                tmp_path / "logs",
                env=env,
            )
            await asyncio.to_thread(gw.start)
            s = Site(tmp_path, broker, gw, perimeter, door, reader, priv, fake_file, synced_file)
            watcher = asyncio.create_task(s.watch())
            try:
                await until(lambda: s.events("door.state"), 20, "the door's first state")
                await until(lambda: _polled(reader), 20, "a heartbeat poll at the reader")
                await until(lambda: s.portal_seen, 20, "the first event at the portal")
                # The portal's current revocation list (signed with the test's key), as a portal would send it.
                rl = RevocationList(version=1, issued_at=int(time.time()), site=SITE)
                r = await s.result(await s.command("credentials.sync", revocations=sign_revocations(priv, rl)), 0)
                assert r["ok"] is True, r
                yield s
            finally:
                await cancel_and_wait("the test's watcher", [watcher])
                await asyncio.to_thread(gw.stop)
    finally:
        await asyncio.to_thread(portal.stop)


async def _more_pulses(s: Site, n: int) -> bool:
    return await s.pulses() > n


async def _polled(reader: Stub) -> bool:
    return bool((await reader.state())["readers"][0]["polls"])


def test_libfaketime_moves_the_wall_clock_and_not_the_monotonic_one(tmp_path: Path) -> None:
    """The tool itself, on a tiny child: the wall clock follows the file, the monotonic clock does not."""
    import subprocess

    _require_libfaketime()
    f = tmp_path / "faketime"
    f.write_text("+0\n", encoding="ascii")
    code = (
        "import time, select, sys\n"
        "w0, m0 = time.time(), time.monotonic()\n"
        "print('go', flush=True); sys.stdin.readline()\n"
        "select.select([], [], [], 0.2)\n"
        "print(round(time.time() - w0), round(time.monotonic() - m0, 1), flush=True)\n"
    )
    env = {
        **os.environ,
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(f),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    p = subprocess.Popen([procs.PY, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin and p.stdout
    assert p.stdout.readline().strip() == "go"
    f.write_text("-3600\n", encoding="ascii")
    p.stdin.write("\n")
    p.stdin.flush()
    out = p.stdout.readline().split()
    assert p.wait(10) == 0
    assert int(out[0]) == -3600 and 0.1 <= float(out[1]) < 2.0, out


async def test_jumps_change_no_poll_rate_delay_or_timer(site: Site) -> None:
    s = site
    rates: list[tuple[str, float, float]] = []

    async def rate_around(name: str, t_jump: float) -> None:
        await asyncio.sleep(max(0.0, t_jump + RATE_WINDOW_S - time.monotonic()))
        before = await s.poll_rate(t_jump - RATE_WINDOW_S, t_jump)
        after = await s.poll_rate(t_jump, t_jump + RATE_WINDOW_S)
        rates.append((name, before, after))

    async def held_open(t_jump_after: float, offset: int) -> tuple[float, float]:
        """Open the door with a pass (valid by the gateway's clock, which is synchronised here) and hold it
        open, jump ``t_jump_after`` s later; (seconds from opening to door.held, jump time)."""
        after = s.last_seq
        pulses = await s.pulses()
        await s.reader.post("/scan", {"text": s.sign(nb=s.offset, na=s.offset + 60)})
        await until(lambda: _more_pulses(s, pulses), 5, "the unlock pulse")
        t_open = float((await s.door.post("/hold", {"on": True}))["mono"])
        await asyncio.sleep(max(0.0, t_open + t_jump_after - time.monotonic()))
        t_jump = s.jump(offset)
        held = await s.next_event("door.held", after, HELD_S + 5)
        await s.door.post("/hold", {"on": False})
        await s.next_event("door.held_restore", after)
        return held.mono - t_open, t_jump

    await until(lambda: s.polled_for(RATE_WINDOW_S), 10, "a poll history before the first jump")
    # 1. Forward an hour during the exit delay and during a door's held-open time.
    after = s.last_seq
    await s.command("arm", group="house")
    arming = await s.next_event("group.arming", after)
    held_s_fwd, t_fwd = await held_open(2.0, HOUR)  # the exit delay runs meanwhile
    armed = await s.next_event("group.armed", after)
    exit_s = armed.mono - arming.mono
    await rate_around("+1 h", t_fwd)

    # 2. Back an hour (to the true time) during the entry delay and a held-open time.
    after = s.last_seq
    await s.perimeter.post("/zones/1/trip")
    started = await s.next_event("zone.entry_delay", after)
    held_s_back, t_back = await held_open(1.5, 0)
    alarm = await s.next_event("zone.alarm", after)
    entry_s = alarm.mono - started.mono
    await rate_around("-1 h", t_back)
    await s.perimeter.post("/zones/1/restore")
    await s.next_event("zone.restore", after)

    # 3. Back another hour, behind the true time, during a new entry delay.
    after = s.last_seq
    await s.perimeter.post("/zones/1/trip")
    started2 = await s.next_event("zone.entry_delay", after)
    await asyncio.sleep(1.5)
    t_back2 = s.jump(-HOUR)
    alarm2 = await s.next_event("zone.alarm", after)
    entry2_s = alarm2.mono - started2.mono
    await rate_around("-1 h again", t_back2)
    await s.perimeter.post("/zones/1/restore")
    await s.next_event("zone.restore", after)

    # 4. Forward a day with the broker away: the uplink reconnects and sends with its usual backoff.
    after = s.last_seq
    await asyncio.to_thread(s.broker.stop)
    t_day = s.jump(DAY)
    await s.perimeter.post("/zones/1/trip")
    await s.next_event("zone.entry_delay", after)
    await asyncio.to_thread(s.broker.start)
    t_broker = time.monotonic()
    await until(
        lambda: all(q in s.portal_seen for q in range(1, s.last_seq + 1)),
        PORTAL_BOUND_S + 3,
        "every event at the portal after the broker came back",
    )
    reach_s = max(s.portal_seen[q] for q in range(after + 1, s.last_seq + 1)) - t_broker
    await rate_around("+1 day", t_day)
    await s.next_event("zone.alarm", after)

    # A fresh event after the day's jump reaches the portal within the normal bound.
    after = s.last_seq
    await s.perimeter.post("/zones/1/restore")
    restored = await s.next_event("zone.restore", after)
    await until(lambda: restored.body["seq"] in s.portal_seen, PORTAL_BOUND_S, "the restore at the portal")
    fresh_s = s.portal_seen[restored.body["seq"]] - restored.mono

    figures = (
        f"exit {exit_s:.2f} s, entry {entry_s:.2f}/{entry2_s:.2f} s, held {held_s_fwd:.2f}/{held_s_back:.2f} s,"
        f" portal after broker back {reach_s:.2f} s, fresh event {fresh_s:.2f} s, rates {rates}"
    )
    print(figures)
    assert abs(exit_s - EXIT_S) <= TOL_S, figures
    assert abs(entry_s - ENTRY_S) <= TOL_S and abs(entry2_s - ENTRY_S) <= TOL_S, figures
    # The stub answers its /hold before the gateway's next 100 ms poll sees the door open.
    assert -TOL_S <= held_s_fwd - HELD_S <= TOL_S + 0.1 and -TOL_S <= held_s_back - HELD_S <= TOL_S + 0.1, figures
    assert reach_s < PORTAL_BOUND_S and fresh_s < 2.0, figures
    for name, before, after_rate in rates:
        # A jump that reached a timer would stall the polls for an hour (rate 0) or fire a backlog (a burst of
        # hundreds); a busy machine moves the 3 s count by a third either way, which is not that.
        assert before > 5 and abs(after_rate - before) <= 0.5 * before, (name, figures)

    # Timestamps are the gateway's wall clock at the time (the offset then), and seqs gapless and ordered.
    seqs = sorted(s.gw_seen)
    assert seqs == list(range(1, len(seqs) + 1))
    ids = [s.gw_seen[q].body["id"] for q in seqs]
    assert len(set(ids)) == len(ids)
    expect = {
        arming.body["seq"]: 0,
        armed.body["seq"]: HOUR,
        started.body["seq"]: HOUR,
        alarm.body["seq"]: 0,
        started2.body["seq"]: 0,
        alarm2.body["seq"]: -HOUR,
        restored.body["seq"]: DAY,
    }
    for seq, offset in expect.items():
        seen = s.gw_seen[seq]
        ts = datetime.fromisoformat(seen.body["ts"]).timestamp()
        assert -2.0 <= ts - (seen.real + offset) <= 0.5, (seen.body["type"], offset, ts - seen.real)
    assert all(q in s.portal_seen for q in seqs)


async def test_passes_and_commands_with_an_unsynchronised_clock(site: Site) -> None:
    s = site
    # Synchronised: a valid pass opens (and the gateway learns the true time while it can).
    assert (await s.decide(s.sign()))["granted"]
    # NTP lost, then the clock falls back a year (a stale saved time after a reboot without an RTC).
    s.synced_file.unlink()
    await until(lambda: "NOT synchronised" in s.gateway.tail(20_000), 5, "the gateway noticing the lost sync")
    s.jump(-YEAR)
    pulses = await s.pulses()

    # Judged by the time floor: valid passes open, and no wrong clock makes an expired pass valid.
    d = await s.decide(s.sign())
    assert d["granted"], d
    d = await s.decide(s.sign("visitor", nb=-60, na=HOUR))
    assert d["granted"], d
    d = await s.decide(s.sign(nb=-400, na=-340))
    assert (d["granted"], d["reason"], d["detail"]) == (
        False,
        "expired",
        "expired (clock unsynchronised; judged by the time floor)",
    ), d
    d = await s.decide(s.sign("visitor", nb=-2 * DAY, na=-DAY))
    assert (d["granted"], d["reason"]) == (False, "expired"), d
    d = await s.decide(s.sign("visitor", nb=2 * HOUR, na=3 * HOUR))
    assert (d["granted"], d["detail"]) == (False, "not yet valid (clock unsynchronised; judged by the time floor)"), d
    d = await s.decide(s.sign(nb=0, na=HOUR))
    assert (d["granted"], d["detail"]) == (
        False,
        "clock unsynchronised: a resident pass this long-lived cannot be judged",
    ), d
    assert await s.pulses() == pulses + 2

    # Commands: a live one runs, a stale one is refused, though the wall clock says a year earlier.
    after = s.last_seq
    r = await s.result(await s.command("unlock", door=DOOR, reason="courier, verified by phone"), after)
    assert r["ok"] is True, r
    r = await s.result(await s.command("unlock", expires_in=-60, door=DOOR, reason="stale"), after)
    assert (r["ok"], r["detail"]) == (False, "expired before it arrived"), r

    # A day ahead instead: the clock is believed roughly (unsynced_skew_s), as documented; commands still run.
    s.jump(DAY)
    d = await s.decide(s.sign())
    assert (d["granted"], d["detail"]) == (False, "expired (clock unsynchronised)"), d
    r = await s.result(await s.command("unlock", door=DOOR, reason="guard at the door"), s.last_seq)
    assert r["ok"] is True, r

    # Synchronised again at the true time: judged by the clock as usual.
    s.jump(0)
    s.synced_file.touch()
    await until(lambda: "wall clock synchronised" in s.gateway.tail(20_000), 5, "the gateway noticing the sync")
    assert (await s.decide(s.sign()))["granted"]
    d = await s.decide(s.sign(nb=-400, na=-340))
    assert (d["granted"], d["detail"]) == (False, "expired"), d
    r = await s.result(await s.command("unlock", expires_in=-60, door=DOOR, reason="stale"), s.last_seq)
    assert r["ok"] is False, r
    seqs = sorted(s.gw_seen)
    assert seqs == list(range(1, len(seqs) + 1))


def test_clock_sync_sources(tmp_path: Path) -> None:
    from gateway.app import clock_sync_source

    assert clock_sync_source(None) is None and clock_sync_source("assume") is None
    kernel = clock_sync_source("kernel")
    assert kernel is not None and isinstance(kernel(), bool)
    flag = tmp_path / "synced"
    by_file = clock_sync_source(f"file:{flag}")
    assert by_file is not None and by_file() is False
    flag.touch()
    assert by_file() is True
    for bad in ("ntp", "file:", "Kernel"):
        with pytest.raises(ValueError, match="GATEHOUSE_CLOCK_SYNC"):
            clock_sync_source(bad)


def test_clock_watch_floor_follows_the_monotonic_clock_once_sync_is_lost() -> None:
    from gateway.app import ClockWatch

    synced, wall, mono = [True], [1_800_000_000.0], [100.0]
    w = ClockWatch(lambda: synced[0], wall=lambda: wall[0], mono=lambda: mono[0])
    assert w.synced and w.floor() == wall[0]
    synced[0] = False
    wall[0] -= YEAR  # a stale saved time
    mono[0] += 10
    assert w.check() is True and not w.synced
    assert w.floor() == 1_800_000_010.0
    mono[0] += 5
    assert w.check() is False and w.floor() == 1_800_000_015.0


def test_an_unreadable_sync_state_counts_as_unsynchronised() -> None:
    from gateway.app import ClockWatch

    def broken() -> bool:
        raise OSError(1, "adjtimex failed")

    assert ClockWatch(broken).synced is False
