"""Doors (gateway.doors): the engine's state machines and access flow with injected clocks and a real
AccessDecider on SQLite; then the service with real parts (a real bus against the door-controller and
Waveshare Relay (D) stubs, a real QR reader line on the reader stub's pseudo-terminal, a real store)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from devices.events import Availability, PointChanged, Scan, WritePoint, WriteResult
from devices.modbus import BusSpec, DeviceSpec, ModbusBus
from devices.profiles import find_profile
from devices.qr_reader import QrReaderLine, ReaderSpec
from gateway import wire
from gateway.access import AccessDecider
from gateway.config import AccessConfig, DeviceConfig, DoorConfig, GatewayConfig, PlaceConfig, ReaderConfig
from gateway.credentials import RevocationStore, SqliteUsedPasses, open_access_db
from gateway.doors import STATE_KEY, UNLOCK_START_WITHIN_MS, DoorEngine, DoorService, Unlock, WriteOutcome
from gateway.events import Draft
from gateway.store import Store
from gateway.wire.passes import (
    PassFields,
    RevocationList,
    generate_keypair,
    keyring,
    sign_pass,
    sign_revocations,
)
from tests.stubs import Stub, run_stub
from tests.waiting import wait_for

SITE = "lakeside"
T0 = 1_780_000_000.0
PRIV, PUB = generate_keypair()
OTHER_PRIV, _ = generate_keypair()

DOORS = [
    DoorConfig(
        name="b3-u2",
        device="ctl-3",
        relay="lock_relay",
        contact="door_open",
        exit_button="exit_button",
        lock_feedback="lock_released",
        tamper="tamper",
        place=PlaceConfig(building="3", unit="2"),
        unlock_ms=3000,
        open_grace_ms=1000,
        held_open_s=30,
    ),
    # Two doors on one Waveshare board: relay1/input1/input2 and relay2/input3 (contact closes while shut).
    DoorConfig(
        name="gate-n",
        device="board",
        relay="relay1",
        contact="input1",
        exit_button="input2",
        gate=True,
        invert=["contact"],
        unlock_ms=2000,
        open_grace_ms=500,
        held_open_s=10,
    ),
    DoorConfig(name="gym", device="board", relay="relay2", contact="input3", unlock_ms=2000),
]
READERS = [
    ReaderConfig(name="qr-b3-u2", serial="/dev/null", door="b3-u2", repeat_ignore_ms=2000),
    ReaderConfig(name="qr-gate", serial="/dev/null", door="gate-n", repeat_ignore_ms=0),
]
ACCESS = AccessConfig(skew_s=30, revocation_max_age_s=3600, burst_count=3, burst_window_s=10.0)


class Clock:
    def __init__(self) -> None:
        self.wall = T0
        self.mono = 5000.0

    def advance(self, s: float) -> None:
        self.wall += s
        self.mono += s


def config(**kw: Any) -> GatewayConfig:
    base: dict[str, Any] = dict(
        site=SITE,
        gateway="gw",
        doors=DOORS,
        readers=READERS,
        access=ACCESS,
        devices=[
            DeviceConfig(name="ctl-3", profile="door-controller", bus="b"),
            DeviceConfig(name="board", profile="waveshare-modbus-rtu-relay-d", bus="b", unit=2),
        ],
    )
    base.update(kw)
    return GatewayConfig(**base)


class Rig:
    def __init__(
        self,
        path: Path,
        clock: Clock,
        cfg: GatewayConfig | None = None,
        state: dict[str, Any] | None = None,
        fresh_list: bool = True,
    ) -> None:
        self.clock = clock
        self.cfg = cfg or config()
        self.db = open_access_db(path)
        self.decider = AccessDecider(
            site=SITE,
            doors=self.cfg.doors,
            public_keys=keyring([PUB]),
            used=SqliteUsedPasses(self.db),
            revocations=RevocationStore(self.db, SITE),
            settings=self.cfg.access,
            wall=lambda: clock.wall,
            mono=lambda: clock.mono,
        )
        if fresh_list:  # a current revocation list, so that the stale warning stays out of the way
            rl = RevocationList(version=1, issued_at=int(clock.wall), site=SITE)
            self.decider.apply_revocations(sign_revocations(PRIV, rl))
        ids = iter(range(1, 1000))
        self.engine = DoorEngine(
            self.cfg, self.decider, mono=lambda: clock.mono, state=state, new_id=lambda: f"inc{next(ids)}"
        )

    def point(self, device: str, point: str, value: bool, initial: bool = False) -> list[Draft]:
        return self.engine.on_device_event(PointChanged(device, point, value, self.clock.mono, initial))

    def scan(self, text: str, reader: str = "qr-b3-u2") -> tuple[list[Draft], Unlock | None]:
        return self.engine.on_reader_event(Scan("line", reader, text, self.clock.mono))

    def ready(self) -> list[Draft]:
        """First readings of every door: shut, locked, no tamper."""
        out = []
        for dev, pt, v in [
            ("ctl-3", "door_open", False),
            ("ctl-3", "exit_button", False),
            ("ctl-3", "lock_released", False),
            ("ctl-3", "tamper", False),
            ("ctl-3", "lock_relay", False),
            ("board", "input1", True),
            ("board", "input2", False),
            ("board", "relay1", False),
            ("board", "input3", False),
            ("board", "relay2", False),
        ]:
            out += self.point(dev, pt, v, initial=True)
        assert self.engine.tick() == []  # the start-up look at the revocation list: it is fresh
        return out


def types(drafts: list[Draft]) -> list[str]:
    return [d.type for d in drafts]


def states(drafts: list[Draft]) -> list[tuple[str, str]]:
    return [(d.data["door"], d.data["state"]) for d in drafts if d.type == "door.state"]


def resident(clock: Clock, **kw: Any) -> str:
    now = int(clock.wall)
    f: dict[str, Any] = dict(
        kind="resident",
        site=SITE,
        subject="P100",
        house="3-2-501",
        units=("3/2",),
        gates=True,
        not_before=now,
        not_after=now + 60,
    )
    f.update(kw)
    return sign_pass(PRIV, PassFields(**f))


def visitor(clock: Clock, **kw: Any) -> str:
    now = int(clock.wall)
    f: dict[str, Any] = dict(
        kind="visitor",
        site=SITE,
        subject="V200",
        house="3-2-501",
        units=("3/2",),
        gates=True,
        not_before=now,
        not_after=now + 86400,
        uses=5,
    )
    f.update(kw)
    return sign_pass(PRIV, PassFields(**f))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def rig(tmp_path: Path, clock: Clock) -> Iterator[Rig]:
    r = Rig(tmp_path / "access.db", clock)
    yield r
    r.db.close()


# ---------------------------------------------------------------- the engine


def test_first_readings_report_each_door_once(rig: Rig) -> None:
    assert states(rig.ready()) == [("b3-u2", "closed"), ("gate-n", "closed"), ("gym", "closed")]
    assert rig.point("ctl-3", "aux_input", True) == []  # a point no door uses
    assert rig.point("ctl-3", "door_open", False) == []  # no change, no event


def test_a_granted_scan_pulses_the_relay_and_the_door_opens_without_alarm(rig: Rig, clock: Clock) -> None:
    rig.ready()
    drafts, unlock = rig.scan(resident(clock))
    assert unlock is not None and unlock.door == "b3-u2" and unlock.reader == "qr-b3-u2"
    assert unlock.write == WritePoint(
        "ctl-3", "lock_relay", True, token=unlock.write.token, pulse_ms=3000, start_within_ms=UNLOCK_START_WITHIN_MS
    )
    assert drafts == []  # nothing is said before the relay is confirmed to have moved
    g = unlock.granted
    assert g is not None
    assert g.type == "access.granted" and g.priority == wire.Priority.ROUTINE and g.device == "qr-b3-u2"
    assert g.place == wire.Place(site=SITE, building="3", unit="2", door="b3-u2")
    assert set(g.data) == {"door", "reader", "pass_id", "kind", "subject", "house", "uses_left"}
    assert (
        g.data["door"],
        g.data["reader"],
        g.data["kind"],
        g.data["subject"],
        g.data["house"],
        g.data["uses_left"],
    ) == ("b3-u2", "qr-b3-u2", "resident", "P100", "3-2-501", 0)
    clock.advance(0.02)
    out = rig.engine.write_done("b3-u2", unlock.write.token, WriteOutcome(True), unlock.reader, unlock.granted)
    assert out[0] is g and states(out) == [("b3-u2", "unlocked")]
    clock.advance(0.5)
    rig.point("ctl-3", "lock_released", True)
    assert states(rig.point("ctl-3", "door_open", True)) == [("b3-u2", "open")]
    clock.advance(4)
    assert rig.engine.tick() == []
    rig.point("ctl-3", "lock_released", False)
    out = rig.point("ctl-3", "door_open", False)
    assert types(out) == ["door.state"] and states(out) == [("b3-u2", "closed")]


def test_the_unlocked_state_ends_with_the_pulse(rig: Rig, clock: Clock) -> None:
    rig.ready()
    _, unlock = rig.scan(resident(clock))
    assert unlock is not None
    rig.engine.write_done("b3-u2", unlock.write.token, WriteOutcome(True))
    deadline = rig.engine.next_deadline()
    assert deadline == pytest.approx(clock.mono + 3.0)
    clock.advance(2.9)
    assert rig.engine.tick() == []
    clock.advance(0.2)
    assert states(rig.engine.tick()) == [("b3-u2", "closed")]


def test_forced_open_is_an_intrusion_until_the_door_shuts(rig: Rig, clock: Clock) -> None:
    rig.ready()
    out = rig.point("ctl-3", "door_open", True)
    assert types(out) == ["door.forced", "door.state"]
    forced = out[0]
    assert forced.priority == wire.Priority.INTRUSION and forced.point == "door_open" and forced.device == "ctl-3"
    assert forced.data == {"door": "b3-u2", "incident": "inc1", "count": 1}
    assert states(out) == [("b3-u2", "forced")]
    clock.advance(60)  # forced and left open: no held-open alarm on top
    assert rig.engine.tick() == []
    out = rig.point("ctl-3", "door_open", False)
    assert types(out) == ["door.forced_restore", "door.state"]
    assert out[0].data == {"door": "b3-u2", "incident": "inc1", "count": 1, "how": "restored"}
    assert out[0].priority == wire.Priority.INTRUSION
    assert states(out) == [("b3-u2", "closed")]


@pytest.mark.parametrize(
    ("before", "gap_s", "forced"),
    [
        ("exit", 0.5, False),  # someone leaving: the button, then the door
        ("exit", 3.9, False),  # within unlock_ms + open_grace_ms (3 + 1 s)
        ("exit", 4.2, True),  # too long after the button
        ("grant", 3.9, False),
        ("grant-failed", 0.5, True),  # the unlock never happened
        ("feedback", 0.5, False),  # the lock reads released (a local unlock)
        ("nothing", 0.0, True),
    ],
)
def test_what_authorises_an_opening(rig: Rig, clock: Clock, before: str, gap_s: float, forced: bool) -> None:
    rig.ready()
    if before == "exit":
        rig.point("ctl-3", "exit_button", True)
        clock.advance(0.3)
        rig.point("ctl-3", "exit_button", False)
    elif before.startswith("grant"):
        _, unlock = rig.scan(resident(clock))
        assert unlock is not None
        ok = before == "grant"
        rig.engine.write_done(
            "b3-u2", unlock.write.token, WriteOutcome(True) if ok else WriteOutcome(False, "bus_down", "link down")
        )
    elif before == "feedback":
        rig.point("ctl-3", "lock_released", True)
    clock.advance(gap_s)
    out = rig.point("ctl-3", "door_open", True)
    assert ("door.forced" in types(out)) is forced


def test_another_persons_failed_unlock_leaves_a_confirmed_unlock_its_window(rig: Rig, clock: Clock) -> None:
    """A's unlock is confirmed (3 s pulse, 1 s grace); B scans 2.5 s later and B's unlock fails: A pushing the door
    at 3.2 s, inside A's own window, is no forced door. B's failure takes back only what B's unlock authorised."""
    rig.ready()
    _, a = rig.scan(resident(clock, subject="PA"))
    assert a is not None
    rig.engine.write_done(a.door, a.write.token, WriteOutcome(True), a.reader, a.granted, a.decision)
    clock.advance(2.5)
    _, b = rig.scan(resident(clock, subject="PB"))
    assert b is not None
    failed = rig.engine.write_done(
        b.door, b.write.token, WriteOutcome(False, "no_answer", "no answer"), b.reader, b.granted, b.decision
    )
    assert types(failed) == ["door.unlock_failed"]
    clock.advance(0.7)
    out = rig.point("ctl-3", "door_open", True)
    assert "door.forced" not in types(out) and states(out) == [("b3-u2", "open")]
    clock.advance(5)  # past A's window too: the next opening is forced
    rig.point("ctl-3", "door_open", False)
    assert "door.forced" in types(rig.point("ctl-3", "door_open", True))


@pytest.mark.parametrize(
    ("outcome", "kept"),
    [
        (WriteOutcome(False, "relay_not_moved", "read-back: off", not_made=True), True),
        (WriteOutcome(False, "bus_down", "not sent", not_made=True), True),
        (WriteOutcome(False, "refused", "Modbus exception 4", not_made=True), True),
        (WriteOutcome(False, "no_answer", "no answer"), False),  # it may have reached the relay
        (WriteOutcome(False, "unconfirmed", "the read-back was not answered"), False),
        (WriteOutcome(True), False),
    ],
)
def test_a_pass_keeps_its_use_only_when_its_door_surely_did_not_open(
    rig: Rig, clock: Clock, outcome: WriteOutcome, kept: bool
) -> None:
    rig.ready()
    text = resident(clock, subject="P1", uses=1)
    _, unlock = rig.scan(text)
    assert unlock is not None
    rig.engine.write_done(unlock.door, unlock.write.token, outcome, unlock.reader, unlock.granted, unlock.decision)
    clock.advance(3)  # past repeat_ignore_ms
    _, again = rig.scan(text)
    assert (again is not None) is kept


def test_held_open_past_its_time(rig: Rig, clock: Clock) -> None:
    rig.ready()
    rig.point("ctl-3", "exit_button", True)
    rig.point("ctl-3", "door_open", True)
    assert rig.engine.next_deadline() == pytest.approx(clock.mono + 30)
    clock.advance(29.9)
    assert rig.engine.tick() == []
    clock.advance(0.2)
    out = rig.engine.tick()
    assert types(out) == ["door.held", "door.state"]
    assert out[0].priority == wire.Priority.TAMPER
    assert out[0].data == {"door": "b3-u2", "held_open_s": 30, "incident": "inc1", "count": 1}
    assert states(out) == [("b3-u2", "held")]
    clock.advance(100)
    assert rig.engine.tick() == []  # raised once
    out = rig.point("ctl-3", "door_open", False)
    assert types(out) == ["door.held_restore", "door.state"] and out[0].data["incident"] == "inc1"


def test_tamper_controller_offline_and_reader_offline(rig: Rig, clock: Clock) -> None:
    rig.ready()
    out = rig.point("ctl-3", "tamper", True)
    assert types(out) == ["door.tamper"] and out[0].priority == wire.Priority.TAMPER and out[0].point == "tamper"
    assert types(rig.point("ctl-3", "tamper", False)) == ["door.tamper_restore"]
    out = rig.engine.on_device_event(Availability("board", "offline", clock.mono, "no answer"))
    assert states(out) == [("gate-n", "offline"), ("gym", "offline")]
    out = rig.engine.on_device_event(Availability("board", "online", clock.mono))
    assert states(out) == [("gate-n", "closed"), ("gym", "closed")]
    out, unlock = rig.engine.on_reader_event(Availability("qr-gate", "offline", clock.mono, "3 heartbeats unanswered"))
    assert unlock is None and types(out) == ["reader.offline"]
    assert out[0].priority == wire.Priority.FAULT and out[0].device == "qr-gate"
    assert out[0].data == {
        "reader": "qr-gate",
        "door": "gate-n",
        "reason": "3 heartbeats unanswered",
        "incident": "inc2",
        "count": 1,
    }
    assert out[0].place == wire.Place(site=SITE, door="gate-n")
    out, _ = rig.engine.on_reader_event(Availability("qr-gate", "online", clock.mono))
    assert types(out) == ["reader.online"] and out[0].data["incident"] == "inc2"


def test_inverted_contact_and_two_doors_on_one_board(rig: Rig, clock: Clock) -> None:
    rig.ready()
    out = rig.point("board", "input1", False)  # the contact opens: inverted, the door is open
    assert types(out) == ["door.forced", "door.state"] and out[0].data["door"] == "gate-n"
    _, unlock = rig.scan(resident(clock), reader="qr-gate")
    assert unlock is not None and unlock.write.point == "relay1" and unlock.write.pulse_ms == 2000
    out = rig.point("board", "input3", True)
    assert types(out) == ["door.forced", "door.state"] and out[0].data["door"] == "gym"
    # Without lock feedback, the relay point is the lock's state.
    rig.point("board", "input3", False)
    rig.point("board", "relay2", True)
    assert states(rig.point("board", "input3", True)) == [("gym", "open")]


def test_refusals_are_events_and_a_burst_alarms(rig: Rig, clock: Clock) -> None:
    rig.ready()
    out, unlock = rig.scan("hello there")
    assert unlock is None and types(out) == ["access.denied"]
    assert out[0].data == {"door": "b3-u2", "reader": "qr-b3-u2", "reason": "malformed", "detail": "not a pass"}
    out, _ = rig.scan(
        sign_pass(
            OTHER_PRIV,
            PassFields(
                kind="resident", site=SITE, subject="P9", not_before=int(T0), not_after=int(T0) + 60, units=("3/2",)
            ),
        )
    )
    assert out[0].data["reason"] == "unknown-key"
    out, _ = rig.scan(resident(clock, units=("9/9",), gates=False, subject="P7"))
    assert types(out) == ["access.denied", "door.scan_burst"]
    assert out[0].data["reason"] == "wrong-door" and out[0].data["subject"] == "P7" and "pass_id" in out[0].data
    assert out[1].priority == wire.Priority.TAMPER
    assert out[1].data == {"door": "b3-u2", "count": 3, "window_s": 10.0}


def test_a_blocked_person_is_a_tamper_event(rig: Rig, clock: Clock) -> None:
    rl = RevocationList(version=2, issued_at=int(clock.wall), site=SITE, blocked=["P666"])
    out = rig.engine.sync_revocations({"revocations": sign_revocations(PRIV, rl)})
    assert out.ok and out.data == {"version": 2}
    drafts, unlock = rig.scan(resident(clock, subject="P666"))
    assert unlock is None
    assert drafts[0].type == "access.denied" and drafts[0].priority == wire.Priority.TAMPER
    assert drafts[0].data["reason"] == "blocked" and drafts[0].data["subject"] == "P666"


def test_a_code_held_in_front_of_the_reader_is_judged_once(rig: Rig, clock: Clock) -> None:
    rig.ready()
    text = resident(clock)
    assert rig.scan(text)[1] is not None
    clock.advance(1.0)
    assert rig.scan(text) == ([], None)
    clock.advance(1.9)  # the window slides with each repeat
    assert rig.scan(text) == ([], None)
    clock.advance(2.1)
    drafts, unlock = rig.scan(text)
    assert unlock is None and drafts[0].data["reason"] == "replayed"
    assert rig.engine.stats["repeats_ignored"] == 2
    assert rig.scan("x", reader="nobody") == ([], None)
    assert rig.engine.stats["unknown_reader"] == 1


def test_remote_unlock_needs_a_reason_and_a_door(rig: Rig, clock: Clock) -> None:
    rig.ready()
    assert rig.engine.prepare_unlock({"door": "b3-u2"}) == "a remote unlock needs a reason"
    assert rig.engine.prepare_unlock({"door": "b3-u2", "reason": "   "}) == "a remote unlock needs a reason"
    assert "no door" in str(rig.engine.prepare_unlock({"door": "nowhere", "reason": "x"}))
    assert "longer than" in str(rig.engine.prepare_unlock({"door": "b3-u2", "reason": "x" * 501}))
    prep = rig.engine.prepare_unlock({"door": "b3-u2", "reason": "delivery at the gate"})
    assert not isinstance(prep, str)
    door, write = prep
    assert (door, write.device, write.point, write.pulse_ms) == ("b3-u2", "ctl-3", "lock_relay", 3000)
    out = rig.engine.unlock_done(door, "guard1", " delivery at the gate ", write.token, WriteOutcome(True))
    assert types(out) == ["access.granted", "door.state"]
    assert out[0].data == {
        "door": "b3-u2",
        "reader": None,
        "pass_id": None,
        "kind": "remote",
        "subject": "guard1",
        "house": None,
        "uses_left": None,
        "by": "guard1",
        "reason": "delivery at the gate",
    }
    clock.advance(1)
    assert "door.forced" not in types(rig.point("ctl-3", "door_open", True))
    rig.point("ctl-3", "door_open", False)
    out = rig.engine.unlock_done(door, "guard1", "again", write.token, WriteOutcome(False, "bus_down", "link down"))
    assert types(out) == ["door.unlock_failed"] and out[0].priority == wire.Priority.FAULT
    assert (out[0].data["reason"], out[0].data["kind"], out[0].data["subject"]) == ("bus_down", "remote", "guard1")


def test_an_echoed_unlock_whose_relay_did_not_move_is_no_unlock_and_a_relay_fault(rig: Rig, clock: Clock) -> None:
    """The board answered the write, the read-back shows the relay off: no access.granted, the door stays
    closed, the pass holder's attempt is logged, the controller has a relay fault until a write is confirmed."""
    rig.ready()
    _, unlock = rig.scan(resident(clock))
    assert unlock is not None
    why = "read-back: lock_relay reads off after the write was answered (the relay did not move)"
    out = rig.engine.write_done(
        "b3-u2", unlock.write.token, WriteOutcome(False, "relay_not_moved", why), unlock.reader, unlock.granted
    )
    assert types(out) == ["door.unlock_failed", "device.relay_fault"]
    failed, fault = out
    assert (failed.data["reason"], failed.data["subject"], failed.data["house"]) == (
        "relay_not_moved",
        "P100",
        "3-2-501",
    )
    assert (fault.device, fault.point, fault.priority, fault.data["door"]) == (
        "ctl-3",
        "lock_relay",
        wire.Priority.FAULT,
        "b3-u2",
    )
    assert rig.engine.states()["b3-u2"] == "closed"
    clock.advance(0.5)
    assert "door.forced" in types(rig.point("ctl-3", "door_open", True))  # nobody was let in: it was forced
    rig.point("ctl-3", "door_open", False)
    # A second failure adds nothing to the open fault; the next confirmed unlock restores it.
    _, again = rig.scan(resident(clock, subject="P101"))
    assert again is not None
    assert types(rig.engine.write_done("b3-u2", again.write.token, WriteOutcome(False, "relay_not_moved", why))) == [
        "door.unlock_failed"
    ]
    _, third = rig.scan(resident(clock, subject="P102"))
    assert third is not None
    out = rig.engine.write_done("b3-u2", third.write.token, WriteOutcome(True), third.reader, third.granted)
    assert types(out) == ["access.granted", "device.relay_fault_restore", "door.state"]


def test_revocation_sync_and_the_stale_warning(tmp_path: Path, clock: Clock) -> None:
    rig = Rig(tmp_path / "access.db", clock, fresh_list=False)
    try:
        _revocation_sync_and_the_stale_warning(rig, clock)
    finally:
        rig.db.close()


def _revocation_sync_and_the_stale_warning(rig: Rig, clock: Clock) -> None:
    out = rig.engine.tick()
    assert types(out) == ["credentials.stale"]  # no list yet: a fault incident on the console
    stale = out[0]
    assert stale.priority == wire.Priority.FAULT
    assert stale.data == {"version": 0, "age_s": None, "max_age_s": 3600, "incident": "inc1", "count": 1}
    visitor_pass = visitor(clock)
    drafts, unlock = rig.scan(visitor_pass)
    assert unlock is None and (drafts[0].data["reason"], drafts[0].data["detail"]) == (
        "stale-list",
        "no revocation list received yet",
    )
    drafts, unlock = rig.scan(resident(clock, subject="P101"))
    assert unlock is not None  # residents' one-minute passes keep working
    clock.advance(61)
    assert rig.engine.tick() == []  # one incident, not one a minute
    text = resident(clock, subject="P100")
    bad = sign_revocations(OTHER_PRIV, RevocationList(version=5, issued_at=int(clock.wall), site=SITE))
    o = rig.engine.sync_revocations({"revocations": bad})
    assert not o.ok and "unknown-key" in o.detail and o.data == {"version": 0} and o.drafts == []
    assert not rig.engine.sync_revocations({}).ok
    rl = RevocationList(version=2, issued_at=int(clock.wall), site=SITE, subjects=["P100"])
    o = rig.engine.sync_revocations({"revocations": sign_revocations(PRIV, rl)})
    assert (o.ok, o.detail, o.data) == (True, "applied version 2", {"version": 2})
    assert [(d.type, d.data["incident"], d.data["version"], d.data["how"]) for d in o.drafts] == [
        ("credentials.stale_restore", "inc1", 2, "restored")
    ]
    assert rig.engine.sync_revocations({"revocations": sign_revocations(PRIV, rl)}).detail == "version 2 already held"
    drafts, unlock = rig.scan(text)
    assert unlock is None and drafts[0].data["reason"] == "revoked"
    assert rig.scan(visitor_pass)[1] is not None  # the list is fresh: the visitor gets in
    clock.advance(3601)  # the list is now older than revocation_max_age_s
    out = rig.engine.tick()
    assert types(out) == ["credentials.stale"] and out[0].data["version"] == 2 and out[0].data["age_s"] == 3601
    drafts, unlock = rig.scan(visitor_pass)
    assert unlock is None and drafts[0].data["reason"] == "stale-list"
    assert drafts[0].data["detail"] == "revocation list v2 is 1.0 h old (at most 1 h)"
    # The open fault survives a restart of the gateway and closes when the list comes.
    saved = msgspec.json.decode(msgspec.json.encode(rig.engine.snapshot()))
    again = DoorEngine(rig.cfg, rig.decider, mono=lambda: clock.mono, state=saved)
    assert [i["key"] for i in again.open_incidents()] == ["stale:revocations"]
    assert again.tick() == []
    rl = RevocationList(version=3, issued_at=int(clock.wall), site=SITE)
    o = again.sync_revocations({"revocations": sign_revocations(PRIV, rl)})
    assert types(o.drafts) == ["credentials.stale_restore"] and again.open_incidents() == []


def test_open_incidents_survive_a_restart(tmp_path: Path, clock: Clock) -> None:
    first = Rig(tmp_path / "a.db", clock)
    first.ready()
    opened = first.point("ctl-3", "door_open", True)
    first.point("ctl-3", "tamper", True)
    first.engine.on_reader_event(Availability("qr-gate", "offline", clock.mono, "gone"))
    saved = msgspec.json.decode(msgspec.json.encode(first.engine.snapshot()))
    first.db.close()
    second = Rig(tmp_path / "a.db", clock, state=saved)
    try:
        # The first readings after the restart: the door is shut again, the tamper still active.
        out = second.point("ctl-3", "door_open", False, initial=True)
        assert types(out) == ["door.forced_restore", "door.state"]
        assert out[0].data["incident"] == opened[0].data["incident"]
        assert second.point("ctl-3", "tamper", True, initial=True) == []
        assert [i["key"] for i in second.engine.open_incidents()] == ["tamper:b3-u2", "reader:qr-gate"]
        out, _ = second.engine.on_reader_event(Availability("qr-gate", "online", clock.mono))
        assert types(out) == ["reader.online"]
    finally:
        second.db.close()
    broken = Rig(tmp_path / "b.db", clock, state={"v": 99})
    assert broken.engine.stats["state_dropped"] == 1 and broken.engine.open_incidents() == []
    broken.db.close()


def test_a_door_open_at_start_up_is_not_forced_but_is_timed(rig: Rig, clock: Clock) -> None:
    out = rig.point("ctl-3", "door_open", True, initial=True)
    assert types(out) == ["door.state"] and states(out) == [("b3-u2", "open")]
    clock.advance(31)
    assert types(rig.engine.tick()) == ["door.held", "door.state"]


# ---------------------------------------------------------------- the service, with real parts


@asynccontextmanager
async def service_rig(
    tmp_path: Path,
    door_stub: Stub,
    profile: str,
    door: DoorConfig,
    reader_stub: Stub,
    unit: int = 1,
    timeout_ms: int = 300,
) -> AsyncIterator[tuple[DoorService, Store, ModbusBus, QrReaderLine]]:
    host, port = door_stub.endpoint()
    reader = ReaderConfig(name="qr-1", serial=reader_stub.serial, door=door.name, repeat_ignore_ms=0)
    cfg = config(
        doors=[door], readers=[reader], devices=[DeviceConfig(name=door.device, profile=profile, bus="b", unit=unit)]
    )
    db = open_access_db(tmp_path / "access.db")
    decider = AccessDecider(
        site=SITE,
        doors=cfg.doors,
        public_keys=keyring([PUB]),
        used=SqliteUsedPasses(db),
        revocations=RevocationStore(db, SITE),
        settings=cfg.access,
    )
    # The portal's current list, as it sends it to a gateway that comes online (visitor passes need one).
    decider.apply_revocations(sign_revocations(PRIV, RevocationList(version=1, issued_at=int(time.time()), site=SITE)))
    engine = DoorEngine(cfg, decider)
    store = Store(tmp_path / "gateway.db", site=SITE, gateway="gw")
    bus_ref: list[ModbusBus] = []

    async def write(cmd: WritePoint) -> WriteResult:
        return await bus_ref[0].write(cmd)

    svc = DoorService(engine, write, store.submit)
    bus = ModbusBus(
        BusSpec("b", "modbus-tcp", host=host, port=port, timeout_ms=timeout_ms),
        [DeviceSpec(door.device, find_profile(profile), unit=unit, poll_ms=50)],
        svc.on_device_event,
    )
    bus_ref.append(bus)
    line = QrReaderLine("qr", reader_stub.serial, [ReaderSpec("qr-1")], svc.on_reader_event)
    try:
        async with store, bus, line:
            runner = asyncio.create_task(svc.run(), name="doors")
            try:
                await asyncio.wait_for(line.wait_open(), 5)
                await wait_for(lambda: engine.states()[door.name] is not None, 5, "the first readings")
                yield svc, store, bus, line
            finally:
                runner.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await runner
    finally:
        db.close()


async def stored(store: Store, type_: str) -> list[wire.Event]:
    return [e for e in await store.events(limit=10_000) if e.type == type_]


async def wait_stored(store: Store, type_: str, n: int = 1, timeout: float = 5.0) -> list[wire.Event]:
    deadline = time.monotonic() + timeout
    while True:
        got = await stored(store, type_)
        if len(got) >= n:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{type_}: {len(got)} of {n} stored within {timeout} s")
        await asyncio.sleep(0.02)


@pytest.mark.realtime
async def test_a_scan_on_the_reader_line_opens_the_door_controller(tmp_path: Path) -> None:
    door = DOORS[0]
    async with (
        run_stub("firmware_stubs.door_controller", "--tcp", "127.0.0.1:0") as ctl,
        run_stub("firmware_stubs.qr_reader", "--pty") as qr,
        service_rig(tmp_path, ctl, "door-controller", door, qr) as (svc, store, _bus, _line),
    ):
        now = int(time.time())
        text = sign_pass(
            PRIV,
            PassFields(
                kind="resident",
                site=SITE,
                subject="P1",
                house="3-2-501",
                units=("3/2",),
                not_before=now,
                not_after=now + 60,
            ),
        )
        written = (await qr.post("/scan", {"text": text}))["written"]

        async def relay_sets() -> list[dict[str, Any]]:
            return [h for h in (await ctl.state())["panels"][0]["units"]["1"]["relay_history"] if h["on"]]

        deadline = time.monotonic() + 5
        while not await relay_sets():
            assert time.monotonic() < deadline, "no unlock pulse at the controller"
            await asyncio.sleep(0.02)
        (pulse,) = await relay_sets()
        assert (pulse["via"], pulse["ms"]) == ("pulse", 3000)
        assert 0 < pulse["mono"] - written < 2.0  # milliseconds normally (bench/unlock_latency.py measures it)
        (granted,) = await wait_stored(store, "access.granted")
        assert granted.data["subject"] == "P1" and granted.place.door == "b3-u2"
        await ctl.post("/open")
        await wait_for(lambda: svc.engine.states()["b3-u2"] == "open", 5, "the door open")
        await ctl.post("/close")
        await wait_for(lambda: svc.engine.states()["b3-u2"] in ("closed", "unlocked"), 5, "the door shut")
        assert await stored(store, "door.forced") == []
        await wait_for(lambda: svc.engine.states()["b3-u2"] == "closed", 5, "locked again")
        await asyncio.sleep(max(0.0, written + 4.2 - time.monotonic()))  # past unlock_ms + open_grace_ms
        await ctl.post("/force")
        (forced,) = await wait_stored(store, "door.forced")
        assert forced.priority == wire.Priority.INTRUSION
        await ctl.post("/close")
        (restore,) = await wait_stored(store, "door.forced_restore")
        assert restore.data["incident"] == forced.data["incident"]
        seen = [e.data["state"] for e in await stored(store, "door.state")]
        assert seen[:3] == ["closed", "unlocked", "open"] and seen[-2:] == ["forced", "closed"], seen
        assert seen.count("forced") == 1 and "held" not in seen and "offline" not in seen
        # Someone leaving: the exit button releases the lock by itself; the opening is not forced.
        await ctl.post("/exit", {"ms": 300})
        await wait_for(lambda: svc.engine.states()["b3-u2"] == "unlocked", 5, "released by the exit button")
        await ctl.post("/open", {"close_after_ms": 300})
        await wait_for(lambda: svc.engine.states()["b3-u2"] == "open", 5, "open from inside")
        await wait_for(lambda: svc.engine.states()["b3-u2"] != "open", 5, "shut by its closer")
        assert len(await stored(store, "door.forced")) == 1
        await wait_for(lambda: svc.engine.states()["b3-u2"] == "closed", 5, "locked again")
        await store.drain()  # the last state change is committed with its snapshot
        saved = await store.get_state(STATE_KEY)
        assert saved["states"] == {"b3-u2": "closed"} and saved["incidents"] == []


async def test_a_door_built_from_a_waveshare_relay_d_board(tmp_path: Path) -> None:
    door = DoorConfig(
        name="gate-n",
        device="board",
        relay="relay1",
        contact="input1",
        exit_button="input2",
        gate=True,
        invert=["contact"],
        unlock_ms=1200,
        open_grace_ms=500,
        held_open_s=5,
    )
    async with (
        run_stub("firmware_stubs.modbus_device", "--model", "relay-d", "--tcp", "127.0.0.1:0") as board,
        run_stub("firmware_stubs.qr_reader", "--pty") as qr,
    ):
        await board.post("/inputs/1", {"active": True})  # the contact closes the opto input: the gate is shut
        async with service_rig(tmp_path, board, "waveshare-modbus-rtu-relay-d", door, qr) as (svc, store, _b, _l):
            await wait_for(lambda: svc.engine.states()["gate-n"] == "closed", 5, "the gate shut")
            now = int(time.time())
            text = sign_pass(
                PRIV,
                PassFields(
                    kind="visitor",
                    site=SITE,
                    subject="V1",
                    house="3-2-501",
                    gates=True,
                    not_before=now,
                    not_after=now + 3600,
                    uses=2,
                ),
            )
            written = (await qr.post("/scan", {"text": text}))["written"]
            await wait_stored(store, "access.granted")

            async def flashes() -> list[dict[str, Any]]:
                return list((await board.state())["panels"][0]["units"]["1"]["flashes"])

            deadline = time.monotonic() + 5
            while not await flashes():
                assert time.monotonic() < deadline, "no flash command at the board"
                await asyncio.sleep(0.02)
            # The board's own timed pulse: function 05 to 0x0200 with 12 x 100 ms.
            assert [(f["channel"], f["on"], f["ms"]) for f in await flashes()] == [(1, True, 1200)]
            await board.post("/inputs/1", {"active": False})  # the gate opens while unlocked
            await wait_for(lambda: svc.engine.states()["gate-n"] == "open", 5, "the gate open")
            await board.post("/inputs/1", {"active": True})
            # The relay reads off again (its group is polled once a second), and the grant has run out.
            await wait_for(lambda: svc.engine.states()["gate-n"] == "closed", 5, "locked again")
            await asyncio.sleep(max(0.0, written + 1.8 - time.monotonic()))
            await board.post("/inputs/1", {"active": False})
            (forced,) = await wait_stored(store, "door.forced")
            assert forced.data["door"] == "gate-n" and forced.point == "input1"
            await board.post("/inputs/1", {"active": True})
            await wait_stored(store, "door.forced_restore")
            assert [e.data["reason"] for e in await stored(store, "access.denied")] == []


async def test_a_relay_d_in_linkage_mode_echoes_the_unlock_and_the_door_is_not_reported_open(tmp_path: Path) -> None:
    """The board answers the flash command as always, but relay 1 follows input 1 (linkage mode, as the maker
    documents it): the read-back shows the relay off, so no access.granted, no "unlocked", a relay fault; once
    the installer puts it back in normal mode, the next pass opens the gate and the fault is restored."""
    door = DoorConfig(
        name="gate-n", device="board", relay="relay1", contact="input2", gate=True, invert=["contact"], unlock_ms=1200
    )
    async with (
        run_stub("firmware_stubs.modbus_device", "--model", "relay-d", "--tcp", "127.0.0.1:0") as board,
        run_stub("firmware_stubs.qr_reader", "--pty") as qr,
    ):
        await board.post("/inputs/2", {"active": True})  # the gate is shut
        await board.post("/modes", {"channel": 1, "mode": "linkage"})
        async with service_rig(tmp_path, board, "waveshare-modbus-rtu-relay-d", door, qr) as (svc, store, _b, _l):
            await wait_for(lambda: svc.engine.states()["gate-n"] == "closed", 5, "the gate shut")
            now = int(time.time())

            def pass_for(subject: str) -> str:
                return sign_pass(
                    PRIV,
                    PassFields(
                        kind="resident",
                        site=SITE,
                        subject=subject,
                        house="3-2-501",
                        gates=True,
                        not_before=now,
                        not_after=now + 600,
                    ),
                )

            await qr.post("/scan", {"text": pass_for("P1")})
            (failed,) = await wait_stored(store, "door.unlock_failed")
            assert (failed.data["reason"], failed.data["subject"], failed.data["door"]) == (
                "relay_not_moved",
                "P1",
                "gate-n",
            )
            assert "relay1 reads off" in failed.data["detail"]
            (fault,) = await wait_stored(store, "device.relay_fault")
            assert (fault.device, fault.point, fault.priority) == ("board", "relay1", wire.Priority.FAULT)
            assert await stored(store, "access.granted") == []
            unit = (await board.state())["panels"][0]["units"]["1"]
            assert unit["ignored_writes"] == 1 and unit["flashes"] == [] and unit["outputs"][0] is False
            assert "unlocked" not in [e.data["state"] for e in await stored(store, "door.state")]
            # The installer sets relay 1 back to normal mode (function 06 to 0x1000): the next pass opens the gate.
            await board.post("/modes", {"channel": 1, "mode": "normal"})
            await qr.post("/scan", {"text": pass_for("P2")})
            (granted,) = await wait_stored(store, "access.granted")
            assert granted.data["subject"] == "P2"
            await wait_stored(store, "device.relay_fault_restore")
            unit = (await board.state())["panels"][0]["units"]["1"]
            assert [(f["channel"], f["on"], f["ms"]) for f in unit["flashes"]] == [(1, True, 1200)]
            assert "unlocked" in [e.data["state"] for e in await stored(store, "door.state")]


@pytest.mark.realtime
async def test_a_slow_controller_opens_only_the_doors_it_reports_and_reports_every_door_it_opens(
    tmp_path: Path,
) -> None:
    """The controller answers every request after 4 s (a slow serial server, within the bus's 4.5 s timeout). P1's
    unlock takes some 8 s (the write, its read-back): it is waited for and reported granted, not given up on after
    a few seconds while the bus still makes it. P2, scanned just after, cannot start within 5 s: it is not made at
    all, said as failed, and the relay pulses once in all; P2's pass keeps its use and opens the door later."""
    door = msgspec.structs.replace(DOORS[0], unlock_ms=15_000)  # long enough to be read back on this slow line
    async with (
        run_stub("firmware_stubs.door_controller", "--tcp", "127.0.0.1:0") as ctl,
        run_stub("firmware_stubs.qr_reader", "--pty") as qr,
        service_rig(tmp_path, ctl, "door-controller", door, qr, timeout_ms=4500) as (_svc, store, _bus, _line),
    ):
        now = int(time.time())

        def pass_for(subject: str) -> str:
            fields = PassFields(
                kind="resident", site=SITE, subject=subject, units=("3/2",), not_before=now, not_after=now + 600
            )
            return sign_pass(PRIV, fields)

        p1, p2 = pass_for("P1"), pass_for("P2")
        await ctl.post("/delay", {"ms": 4000})
        await qr.post("/scan", {"text": p1})
        await qr.post("/scan", {"text": p2})
        (failed,) = await wait_stored(store, "door.unlock_failed", timeout=25)
        assert (failed.data["subject"], failed.data["reason"]) == ("P2", "bus_down")
        assert "not sent" in failed.data["detail"]
        (granted,) = await wait_stored(store, "access.granted", timeout=25)
        assert granted.data["subject"] == "P1"
        await ctl.post("/delay", {"ms": 0})
        await asyncio.sleep(1.0)  # anything still queued would be made by now
        history = (await ctl.state())["panels"][0]["units"]["1"]["relay_history"]
        assert [h["on"] for h in history if h["on"]] == [True]  # one unlock made: P1's
        await qr.post("/scan", {"text": p2})  # a one-use pass: its use came back with the unlock never made
        got = await wait_stored(store, "access.granted", 2)
        assert got[1].data["subject"] == "P2"
        assert await stored(store, "access.denied") == []


async def test_an_unlock_on_a_dead_bus_is_a_fault_not_a_crash(tmp_path: Path) -> None:
    async with (
        run_stub("firmware_stubs.door_controller", "--tcp", "127.0.0.1:0") as ctl,
        run_stub("firmware_stubs.qr_reader", "--pty") as qr,
        service_rig(tmp_path, ctl, "door-controller", DOORS[0], qr) as (svc, store, bus, _line),
    ):
        await ctl.stop()
        await wait_for(lambda: not bus.connected, 5, "the bus down")
        now = int(time.time())
        text = sign_pass(
            PRIV,
            PassFields(kind="resident", site=SITE, subject="P1", units=("3/2",), not_before=now, not_after=now + 60),
        )
        await qr.post("/scan", {"text": text})
        (failed,) = await wait_stored(store, "door.unlock_failed")
        assert failed.priority == wire.Priority.FAULT and failed.data["reader"] == "qr-1"
        assert (failed.data["reason"], failed.data["subject"]) == ("bus_down", "P1")
        assert await stored(store, "access.granted") == []
        assert svc.engine.stats["unlock_failed"] == 1
