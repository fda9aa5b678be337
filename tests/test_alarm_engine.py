"""The alarm engine, table-driven: zone types, aux points, delays, commands, Contact ID families,
periodic test supervision, schedules, restart from a snapshot. Time is driven, never slept."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from devices.events import Availability, DeviceCheck, PanelReport, PointChanged, Unreadable, WriteResult
from gateway import alarms, wire
from gateway.alarms import INCIDENT_TYPES, AlarmEngine, AlarmStateError, is_active
from gateway.config import ConfigError, GatewayConfig, load
from gateway.contact_id_codes import CODES, describe
from gateway.events import Draft

P = wire.Priority
SHANGHAI = timedelta(hours=8)


class Clock:
    """Monotonic and wall time moving together, unless a test jumps the wall clock."""

    def __init__(self, mono: float = 1000.0, wall: datetime | None = None) -> None:
        self.mono = mono
        self.wall = wall or datetime(2025, 3, 3, 4, 0, tzinfo=UTC)  # Monday 12:00 in Shanghai

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += timedelta(seconds=seconds)


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"inc-{self.n:04d}"


def make_cfg(**extra: Any) -> GatewayConfig:
    data: dict[str, Any] = {"site": "estate", "gateway": "gw1"}
    data.update(extra)
    return msgspec.convert(data, GatewayConfig)


class Rig:
    """An engine with a driven clock; every draft it returns is kept with the mono time it came at."""

    def __init__(
        self,
        cfg: GatewayConfig,
        clock: Clock | None = None,
        state: dict | None = None,
        unmapped: dict[tuple[str, str], str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock or Clock()
        self.ids = Ids()
        self.log: list[tuple[float, Draft]] = []
        self.engine = AlarmEngine(
            cfg,
            mono=lambda: self.clock.mono,
            wall=lambda: self.clock.wall,
            state=state,
            new_id=self.ids,
            unmapped=unmapped,
        )

    def _keep(self, drafts: list[Draft]) -> list[Draft]:
        self.log.extend((self.clock.mono, d) for d in drafts)
        return drafts

    def point(self, device: str, point: str, value: Any) -> list[Draft]:
        return self._keep(self.engine.on_device_event(PointChanged(device, point, value, self.clock.mono)))

    def event(self, ev: Any) -> list[Draft]:
        return self._keep(self.engine.on_device_event(ev))

    def report(self, code: int, qualifier: str = "new", zone: int = 1, account: str = "1234") -> list[Draft]:
        return self.event(PanelReport("cid-line", account, qualifier, code, 1, zone, self.clock.mono))  # type: ignore[arg-type]

    def cmd(self, kind: str, **args: Any) -> tuple[list[Draft], Any]:
        drafts, outcome = self.engine.command(kind, args, "guard-7")
        self._keep(drafts)
        return drafts, outcome

    def run(self, seconds: float) -> list[Draft]:
        """Let time pass, waking exactly at each deadline the engine asks for."""
        target = self.clock.mono + seconds
        out: list[Draft] = []
        for _ in range(10_000):
            d = self.engine.next_deadline()
            if d is None or d > target:
                break
            self.clock.advance(max(0.0, d - self.clock.mono))
            out += self._keep(self.engine.tick())
        self.clock.advance(target - self.clock.mono)
        out += self._keep(self.engine.tick())
        return out


def types(drafts: list[Draft]) -> list[str]:
    return [d.type for d in drafts]


def zone(name: str, ztype: str, point: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "device": "io", "point": point, "type": ztype, **kw}


# ---------------------------------------------------------------- zone types


@pytest.mark.parametrize(
    ("ztype", "arm", "want_type", "want_prio", "after_s"),
    [
        ("perimeter", None, None, None, 0),
        ("perimeter", "away", "zone.alarm", P.INTRUSION, 0),
        ("perimeter", "stay", "zone.alarm", P.INTRUSION, 0),
        ("entry", None, None, None, 0),
        ("entry", "away", "zone.alarm", P.INTRUSION, 15),
        ("interior", None, None, None, 0),
        ("interior", "away", "zone.alarm", P.INTRUSION, 0),
        ("interior", "stay", None, None, 0),
        ("panic", None, "zone.alarm", P.PANIC, 0),
        ("panic", "away", "zone.alarm", P.PANIC, 0),
        ("medical", None, "zone.alarm", P.PANIC, 0),
        ("fire", None, "zone.alarm", P.FIRE, 0),
        ("fire", "away", "zone.alarm", P.FIRE, 0),
        ("gas", None, "zone.alarm", P.FIRE, 0),
        ("tamper", None, "zone.tamper", P.TAMPER, 0),
        ("fault", None, "zone.fault", P.FAULT, 0),
    ],
)
def test_zone_type(ztype: str, arm: str | None, want_type: str | None, want_prio: int | None, after_s: int) -> None:
    rig = Rig(make_cfg(zones=[zone("z1", ztype, "in1", group="g", entry_delay_s=15)]))
    if arm:
        drafts, outcome = rig.cmd("arm", group="g", mode=arm)
        assert outcome.ok and types(drafts) == ["group.armed"]
    t0 = rig.clock.mono
    rig.point("io", "in1", True)
    rig.run(60)
    alarms = [(t, d) for t, d in rig.log if d.type in ("zone.alarm", "zone.tamper", "zone.fault")]
    if want_type is None:
        assert alarms == []
        return
    assert len(alarms) == 1
    t, d = alarms[0]
    assert (d.type, d.priority, t - t0) == (want_type, want_prio, after_s)
    assert d.place == wire.Place(site="estate", zone="z1") and d.device == "io" and d.point == "in1"
    assert d.data["zone"] == "z1" and d.data["zone_type"] == ztype and d.data["count"] == 1
    # the restore pairs with it by incident id, once the zone has been quiet for restore_ms (3 s)
    rig.point("io", "in1", False)
    t1 = rig.clock.mono
    rig.run(10)
    closes = [(t, d) for t, d in rig.log if d.type == INCIDENT_TYPES[f"zone.{want_type.split('.')[1]}"][2]]
    assert [(t - t1, d.data["incident"], d.data["how"]) for t, d in closes] == [(3, d.data["incident"], "restored")]


def test_entry_delay_disarmed_in_time_raises_nothing() -> None:
    rig = Rig(make_cfg(zones=[zone("door", "entry", "in1", group="g", entry_delay_s=20)]))
    rig.cmd("arm", group="g")
    rig.point("io", "in1", True)
    assert rig.engine.next_deadline() == pytest.approx(rig.clock.mono + 20)
    rig.run(19.999)
    drafts, outcome = rig.cmd("disarm", group="g")
    assert outcome.ok
    assert types(drafts) == ["group.disarmed"] and drafts[0].data["cancelled_entry"] == ["door"]
    rig.run(100)
    assert "zone.alarm" not in types([d for _, d in rig.log])


def test_entry_alarm_after_the_door_closed_is_restored_in_turn() -> None:
    rig = Rig(make_cfg(zones=[zone("door", "entry", "in1", group="g", entry_delay_s=20, restore_ms=5000)]))
    rig.cmd("arm", group="g")
    rig.point("io", "in1", True)
    rig.run(2)
    rig.point("io", "in1", False)  # in and door shut, but nobody disarms
    t0 = rig.clock.mono
    rig.run(60)
    got = [
        (t - t0, d.type, d.data["incident"])
        for t, d in rig.log
        if d.type.startswith("zone.") and d.type != "zone.entry_delay"
    ]
    assert [(t, ty) for t, ty, _ in got] == [(18, "zone.alarm"), (18, "zone.restore")]  # quiet for 18 s > 5 s
    assert got[0][2] == got[1][2]


def test_disarm_exactly_at_the_deadline_is_too_late() -> None:
    rig = Rig(make_cfg(zones=[zone("door", "entry", "in1", group="g", entry_delay_s=20)]))
    rig.cmd("arm", group="g")
    rig.point("io", "in1", True)
    rig.clock.advance(20)  # the caller overslept: the command still sees the alarm first
    drafts, _ = rig.cmd("disarm", group="g")
    assert types(drafts) == ["zone.alarm", "group.disarmed"]


def test_exit_delay_then_door_left_open_starts_entry_delay() -> None:
    cfg = make_cfg(
        zone_groups=[{"name": "g", "exit_delay_s": 30}],
        zones=[zone("door", "entry", "in1", group="g", entry_delay_s=20), zone("pir", "interior", "in2", group="g")],
    )
    rig = Rig(cfg)
    drafts, _ = rig.cmd("arm", group="g")
    assert types(drafts) == ["group.arming"] and drafts[0].data["exit_delay_s"] == 30
    rig.point("io", "in2", True)  # walking out: interior and entry are ignored during the exit delay
    rig.point("io", "in1", True)
    rig.point("io", "in2", False)
    assert rig.run(29) == []
    drafts = rig.run(1)
    assert types(drafts) == ["group.armed", "zone.entry_delay"]  # door still open at the end
    assert drafts[1].data["zones"] == ["door"]
    drafts = rig.run(20)
    assert types(drafts) == ["zone.alarm"] and drafts[0].data["cause"] == "entry_delay"


def test_perimeter_is_instant_during_exit_delay() -> None:
    cfg = make_cfg(
        zone_groups=[{"name": "g", "exit_delay_s": 30}],
        zones=[zone("win", "perimeter", "in1", group="g")],
    )
    rig = Rig(cfg)
    rig.cmd("arm", group="g")
    rig.run(5)
    assert types(rig.point("io", "in1", 1)) == ["zone.alarm"]


def test_interior_follows_a_running_entry_delay() -> None:
    cfg = make_cfg(
        zones=[zone("door", "entry", "in1", group="g", entry_delay_s=20), zone("pir", "interior", "in2", group="g")]
    )
    rig = Rig(cfg)
    rig.cmd("arm", group="g")
    assert types(rig.point("io", "in1", True)) == ["zone.entry_delay"]
    assert rig.point("io", "in2", True) == []  # follower: no instant alarm
    drafts = rig.run(20)
    assert [(d.type, d.data["zone"]) for d in drafts] == [("zone.alarm", "door"), ("zone.alarm", "pir")]


def test_debounce_short_blip_ignored_long_one_counts_at_exactly_debounce() -> None:
    rig = Rig(make_cfg(zones=[zone("fence", "perimeter", "in1", group="g", debounce_ms=500)]))
    rig.cmd("arm", group="g")
    rig.point("io", "in1", True)
    rig.run(0.499)
    rig.point("io", "in1", False)
    assert rig.run(5) == []
    rig.point("io", "in1", True)
    t0 = rig.clock.mono
    assert rig.engine.next_deadline() == pytest.approx(t0 + 0.5)
    drafts = rig.run(1)
    assert types(drafts) == ["zone.alarm"]
    assert [t for t, d in rig.log if d.type == "zone.alarm"] == [pytest.approx(t0 + 0.5)]


def test_repeats_are_counted_and_throttled() -> None:
    cfg = make_cfg(
        alarm={"repeat_interval_s": 30},
        zones=[zone("fence", "perimeter", "in1", group="g", restore_ms=2000)],
    )
    rig = Rig(cfg)
    rig.cmd("arm", group="g")
    for _ in range(10):  # an intruder shaking the fence: 10 activations in 10 s
        rig.point("io", "in1", True)
        rig.run(0.5)
        rig.point("io", "in1", False)
        rig.run(0.5)
    assert types([d for _, d in rig.log if d.type.startswith("zone.")]) == ["zone.alarm"]
    rig.point("io", "in1", True)  # 11th
    rig.run(40)
    rig.point("io", "in1", False)
    rig.run(5)
    zone_events = [(t, d.type, d.data["count"]) for t, d in rig.log if d.type.startswith("zone.")]
    t0 = zone_events[0][0]
    assert [(round(t - t0, 3), ty, n) for t, ty, n in zone_events] == [
        (0, "zone.alarm", 1),
        (30, "zone.alarm_repeat", 11),
        (52, "zone.restore", 11),
    ]
    assert len({d.data["incident"] for _, d in rig.log if d.type.startswith("zone.")}) == 1


def test_ack_stops_repeats_and_clear_closes() -> None:
    cfg = make_cfg(alarm={"repeat_interval_s": 10}, zones=[zone("sos", "panic", "in1")])
    rig = Rig(cfg)
    (alarm,) = rig.point("io", "in1", True)
    inc = alarm.data["incident"]
    rig.point("io", "in1", False)
    rig.point("io", "in1", True)
    drafts, outcome = rig.cmd("ack", incident=inc)
    assert outcome.ok and drafts == []
    assert rig.run(60) == []  # acknowledged: the second activation is counted, not sent
    drafts, outcome = rig.cmd("clear", incident=inc)
    assert outcome.ok
    assert [(d.type, d.data["how"], d.data["by"], d.data["count"]) for d in drafts] == [
        ("zone.restore", "cleared", "guard-7", 2)
    ]
    _, outcome = rig.cmd("clear", incident=inc)
    assert not outcome.ok and "no open incident" in outcome.detail
    rig.point("io", "in1", False)  # quiet, then a new press is a new incident
    (again,) = rig.point("io", "in1", True)
    assert again.type == "zone.alarm" and again.data["incident"] != inc


def test_a_panic_pressed_again_long_after_its_ack_is_heard_though_its_panel_sends_no_restore() -> None:
    """A Contact ID panel that never reports restores leaves its panic's incident open at the gateway. Acknowledged,
    the incident counts new activations without sending repeats; but one that comes when nothing was said of the
    incident for ACKED_REPORT_MS is reported, so the board can ring again (the guard may have closed it long ago,
    and the portal's clear been lost). Chatter after an ack stays quiet."""
    rig = panel_rig()
    (first,) = rig.report(120, "new", zone=5)
    inc = first.data["incident"]
    assert rig.cmd("ack", incident=inc)[1].ok
    rig.run(60)
    assert rig.report(120, "new", zone=5) == []  # a minute after: counted, not said (a chattering input)
    rig.run(alarms.ACKED_REPORT_MS / 1000)
    (again,) = rig.report(120, "new", zone=5)  # the next day's press
    assert again.type == "panel.alarm_repeat" and again.data["incident"] == inc and again.data["count"] == 3
    assert again.priority == first.priority
    assert rig.report(120, "new", zone=5) == []  # and quiet again for the next ten minutes
    # The board closes it: its clear closes the gateway's incident, and the next press is a new one.
    drafts, outcome = rig.cmd("clear", incident=inc)
    assert outcome.ok and [d.data["how"] for d in drafts] == ["cleared"]
    rig.run(30)
    (fresh,) = rig.report(120, "new", zone=5)
    assert fresh.type == "panel.alarm" and fresh.data["incident"] != inc


@pytest.mark.parametrize(
    ("role", "armed", "want"),
    [
        ("tamper", False, ("zone.tamper", P.TAMPER)),
        ("tamper", True, ("zone.tamper", P.TAMPER)),
        ("fault", False, ("zone.fault", P.FAULT)),
        ("cut", False, ("zone.tamper", P.TAMPER)),
        ("short", False, ("zone.tamper", P.TAMPER)),
        ("touch", False, None),
        ("touch", True, ("zone.alarm", P.INTRUSION)),
    ],
)
def test_aux_points(role: str, armed: bool, want: tuple[str, int] | None) -> None:
    aux = {"tamper": "t1", "fault": "f1", "touch": "to1", "cut": "c1", "short": "s1"}
    rig = Rig(make_cfg(zones=[zone("fence", "perimeter", "a1", group="g", aux=aux)]))
    if armed:
        rig.cmd("arm", group="g")
    drafts = rig.point("io", aux[role], True)
    if want is None:
        assert drafts == []
        return
    assert [(d.type, d.priority, d.point, d.data["kind"]) for d in drafts] == [(*want, aux[role], role)]


def test_bypass_silences_the_zone_but_not_its_tamper() -> None:
    cfg = make_cfg(zones=[zone("fence", "perimeter", "a1", group="g", aux={"tamper": "t1", "touch": "to1"})])
    rig = Rig(cfg)
    rig.cmd("arm", group="g")
    drafts, outcome = rig.cmd("bypass", zone="fence")
    assert outcome.ok and [(d.type, d.data["by"]) for d in drafts] == [("zone.bypassed", "guard-7")]
    assert rig.cmd("bypass", zone="fence")[0] == []  # idempotent, no second event
    assert rig.point("io", "a1", 1) == [] and rig.point("io", "to1", 1) == []
    assert types(rig.point("io", "t1", 1)) == ["zone.tamper"]
    rig.point("io", "a1", 0)
    assert types(rig.cmd("unbypass", zone="fence")[0]) == ["zone.unbypassed"]
    assert rig.point("io", "to1", 1) == []  # still active from before: only a new activation counts
    assert types(rig.point("io", "a1", 1)) == ["zone.alarm"]


@pytest.mark.parametrize("ztype", ["fire", "gas", "panic", "medical", "tamper", "fault"])
def test_a_24_hour_zone_cannot_be_bypassed_and_a_bypass_from_an_old_state_does_not_silence_it(ztype: str) -> None:
    cfg = make_cfg(zones=[zone("z", ztype, "in1", group="g")])
    rig = Rig(cfg)
    drafts, outcome = rig.cmd("bypass", zone="z")
    assert (drafts, outcome.ok) == ([], False) and "24-hour" in outcome.detail
    state = {**rig.engine.snapshot(), "bypassed": ["z"]}  # saved by a gateway that allowed it
    rig2 = Rig(cfg, rig.clock, state)
    assert rig2.engine.bypassed == {"z"}
    (alarm,) = rig2.point("io", "in1", True)
    assert alarm.data["zone"] == "z" and alarm.data["cause"] == "24h"


def test_an_alarm_class_point_no_zone_uses_is_an_incident_while_active() -> None:
    """The perimeter panel's enclosure tamper and a fence zone nobody configured: unknown points become faults."""
    cfg = make_cfg(zones=[zone("beam", "perimeter", "zone1_alarm", group="g")])
    unmapped = {
        ("io", "tamper"): "panel_tamper",
        ("io", "zone3_alarm"): "zone_alarm",
        ("io", "zone1_alarm"): "zone_alarm",
        ("io", "input4"): "input",
    }
    rig = Rig(cfg, unmapped=unmapped)
    (t,) = rig.point("io", "tamper", True)
    assert (t.type, t.priority, t.point, t.data["kind"]) == (
        "device.unmapped_input",
        P.TAMPER,
        "tamper",
        "panel_tamper",
    )
    (z,) = rig.point("io", "zone3_alarm", 1)
    assert (z.type, z.priority) == ("device.unmapped_input", P.FAULT)
    assert rig.point("io", "zone1_alarm", True) == []  # a zone's point: the zone's rules (disarmed here)
    assert rig.point("io", "input4", True) == []  # a plain input says nothing on its own
    assert rig.point("io", "tamper", False)[0].type == "device.unmapped_input_restore"


def test_a_device_set_up_against_its_profile_is_a_fault_until_put_right() -> None:
    rig = Rig(make_cfg())
    (bad,) = rig.event(DeviceCheck("relays", ("relay1_mode = 1 (linkage), expected 0 (normal)",), rig.clock.mono))
    assert (bad.type, bad.priority, bad.device) == ("device.misconfigured", P.FAULT, "relays")
    assert bad.data["problems"] == ["relay1_mode = 1 (linkage), expected 0 (normal)"]
    assert rig.event(DeviceCheck("relays", ("relay1_mode = 2 (toggle), expected 0 (normal)",), rig.clock.mono)) == []
    (fixed,) = rig.event(DeviceCheck("relays", (), rig.clock.mono))
    assert (fixed.type, fixed.data["count"]) == ("device.misconfigured_restore", 2)
    assert fixed.data["problems"] == ["relay1_mode = 2 (toggle), expected 0 (normal)"]


def test_unreadable_messages_on_a_line_are_one_fault_that_closes_after_a_quiet_spell() -> None:
    rig = Rig(make_cfg())
    (first,) = rig.event(Unreadable("cid-1", "unsupported", "SIA DC-09 ...", rig.clock.mono))
    assert (first.type, first.priority, first.data["line"], first.data["reason"]) == (
        "line.unreadable",
        P.FAULT,
        "cid-1",
        "unsupported",
    )
    assert rig.event(Unreadable("cid-1", "checksum", "1234181...", rig.clock.mono)) == []
    rig.run(599)
    assert [d.data["count"] for _, d in rig.log if d.type == "line.unreadable_repeat"] == [2]
    (closed,) = rig.run(2)
    assert (closed.type, closed.data["count"], closed.data["reason"]) == ("line.unreadable_restore", 2, "checksum")
    assert types(rig.event(Unreadable("cid-1", "malformed", "12", rig.clock.mono))) == ["line.unreadable"]


def test_arm_not_ready_unless_forced() -> None:
    rig = Rig(make_cfg(zones=[zone("beam", "perimeter", "in1", group="g"), zone("b2", "perimeter", "in2", group="g")]))
    rig.point("io", "in1", True)
    drafts, outcome = rig.cmd("arm", group="g")
    assert not outcome.ok and drafts == [] and outcome.data["not_ready"] == {"g": ["beam"]}
    assert rig.engine.group_states()["g"]["state"] == "disarmed"
    drafts, outcome = rig.cmd("arm", group="g", force=True)
    assert outcome.ok and types(drafts) == ["group.armed"] and drafts[0].data["not_ready"] == ["beam"]
    assert rig.run(60) == []  # the blocked beam does not alarm ...
    rig.point("io", "in1", False)
    assert types(rig.point("io", "in1", True)) == ["zone.alarm"]  # ... until it trips anew


def test_arm_is_idempotent_and_mode_change_needs_disarm() -> None:
    rig = Rig(make_cfg(zones=[zone("beam", "perimeter", "in1", group="g")]))
    assert rig.cmd("arm", group="g")[1].ok
    drafts, outcome = rig.cmd("arm", group="g")
    assert outcome.ok and drafts == [] and outcome.detail == "already armed"
    drafts, outcome = rig.cmd("arm", group="g", mode="stay")
    assert not outcome.ok and drafts == []
    assert types(rig.cmd("disarm", group="*")[0]) == ["group.disarmed"]
    assert rig.cmd("disarm", group="g")[0] == []


@pytest.mark.parametrize(
    ("kind", "args", "reason"),
    [
        ("arm", {}, "give 'group'"),
        ("arm", {"group": "nope"}, "no such group"),
        ("arm", {"group": 5}, "give 'group'"),
        ("arm", {"groups": []}, "give 'group'"),
        ("arm", {"group": "g", "mode": "night"}, "mode must be"),
        ("arm", {"group": "g", "force": "yes"}, "force must be"),
        ("disarm", {"groups": ["g", 3]}, "give 'group'"),
        ("bypass", {"zone": "ghost"}, "no such zone"),
        ("bypass", {}, "no such zone"),
        ("ack", {"incident": 12}, "give 'incident'"),
        ("clear", {"incident": "01HX"}, "no open incident"),
        ("self-destruct", {}, "unknown alarm command"),
    ],
)
def test_bad_commands_are_refused_cleanly(kind: str, args: dict, reason: str) -> None:
    rig = Rig(make_cfg(zones=[zone("beam", "perimeter", "in1", group="g")]))
    drafts, outcome = rig.cmd(kind, **args)
    assert not outcome.ok and reason in outcome.detail and drafts == []
    assert rig.engine.group_states()["g"]["state"] == "disarmed"


def test_device_offline_and_online_pair() -> None:
    rig = Rig(make_cfg())
    assert rig.event(Availability("panel-1", "online", rig.clock.mono)) == []
    (off,) = rig.event(Availability("panel-1", "offline", rig.clock.mono, reason="3 missed polls"))
    assert (off.type, off.priority, off.device, off.data["reason"]) == (
        "device.offline",
        P.FAULT,
        "panel-1",
        "3 missed polls",
    )
    assert types(rig.event(Availability("panel-1", "offline", rig.clock.mono))) == []  # still the same incident
    (on,) = rig.event(Availability("panel-1", "online", rig.clock.mono))
    assert (on.type, on.data["incident"], on.data["how"]) == ("device.online", off.data["incident"], "restored")


def test_point_values_and_unknown_points() -> None:
    assert [is_active(v) for v in (True, 1, 2.5, "1", "alarm", "ON")] == [True] * 6
    assert [is_active(v) for v in (False, 0, 0.0, "0", "off", " Normal ", "")] == [False] * 7
    rig = Rig(make_cfg(zones=[zone("nc", "tamper", "in1", invert=True)]))
    assert rig.point("io", "other", True) == [] and rig.point("elsewhere", "in1", False) == []
    assert rig.event(WriteResult("io", "relay", "t", True, rig.clock.mono)) == []
    assert types(rig.point("io", "in1", False)) == ["zone.tamper"]  # normally closed: false is active


# ---------------------------------------------------------------- Contact ID

PANEL = {"name": "p-3-1-101", "account": "1234", "place": {"building": "3", "unit": "1", "house": "101"}}


def panel_rig(**panel: Any) -> Rig:
    return Rig(make_cfg(indoor_panels=[{**PANEL, **panel}]))


@pytest.mark.parametrize(
    ("code", "qualifier", "want_type", "want_prio", "kind"),
    [
        (100, "new", "panel.alarm", P.PANIC, "medical"),
        (101, "new", "panel.alarm", P.PANIC, "medical"),
        (110, "new", "panel.alarm", P.FIRE, "fire"),
        (111, "new", "panel.alarm", P.FIRE, "fire"),
        (118, "new", "panel.alarm", P.FIRE, "fire"),
        (120, "new", "panel.alarm", P.PANIC, "panic"),
        (121, "new", "panel.alarm", P.PANIC, "duress"),
        (123, "new", "panel.alarm", P.PANIC, "panic"),
        (126, "new", "panel.alarm", P.PANIC, "panic"),  # not named in the table: its range decides
        (130, "new", "panel.alarm", P.INTRUSION, "burglary"),
        (134, "new", "panel.alarm", P.INTRUSION, "burglary"),
        (139, "new", "panel.alarm", P.INTRUSION, "burglary"),
        (137, "new", "panel.tamper", P.TAMPER, "tamper"),
        (144, "new", "panel.tamper", P.TAMPER, "tamper"),
        (145, "new", "panel.tamper", P.TAMPER, "tamper"),
        (150, "new", "panel.alarm", P.INTRUSION, "non_burglary"),
        (151, "new", "panel.alarm", P.FIRE, "gas"),
        (162, "new", "panel.alarm", P.FIRE, "co"),
        (301, "new", "panel.trouble", P.FAULT, "ac_loss"),
        (302, "new", "panel.trouble", P.FAULT, "low_battery"),
        (309, "new", "panel.trouble", P.FAULT, "low_battery"),
        (321, "new", "panel.trouble", P.FAULT, "bell"),
        (322, "new", "panel.trouble", P.FAULT, "bell"),
        (330, "new", "panel.trouble", P.FAULT, "peripheral"),
        (339, "new", "panel.trouble", P.FAULT, "peripheral"),
        (380, "new", "panel.trouble", P.FAULT, "sensor"),
        (384, "new", "panel.trouble", P.FAULT, "low_battery"),
        (389, "new", "panel.trouble", P.FAULT, "sensor"),
        (401, "new", "house.disarmed", P.ROUTINE, "away"),
        (401, "restore", "house.armed", P.ROUTINE, "away"),
        (403, "restore", "house.armed", P.ROUTINE, "away"),
        (407, "new", "house.disarmed", P.ROUTINE, "away"),
        (441, "restore", "house.armed", P.ROUTINE, "stay"),
        (406, "new", "panel.event", P.ROUTINE, "cancel"),
        (570, "new", "panel.event", P.ROUTINE, "bypass"),
        (601, "new", "panel.event", P.ROUTINE, "manual_test"),
        (602, "new", None, None, None),  # periodic test: supervision only, no event
        (603, "new", None, None, None),
        (750, "new", "panel.event", P.ROUTINE, "other"),
    ],
)
def test_contact_id_families(
    code: int, qualifier: str, want_type: str | None, want_prio: int | None, kind: str
) -> None:
    rig = panel_rig()
    drafts = rig.report(code, qualifier, zone=7)
    if want_type is None:
        assert drafts == []
        return
    (d,) = drafts
    assert (d.type, d.priority, d.data["kind"]) == (want_type, want_prio, kind)
    assert d.place == wire.Place(site="estate", building="3", unit="1", house="101")
    assert d.data["code"] == code and d.data["account"] == "1234" and d.data["panel"] == "p-3-1-101"
    assert d.data["name_en"] and re.search(r"[\u4e00-\u9fff]", d.data["name_zh"])
    who = "user" if describe(code).user else "zone"
    assert d.data[who] == 7
    if want_type == "house.armed":
        assert d.data["mode"] == kind


@pytest.mark.parametrize("code", [100, 110, 121, 130, 137, 151, 301, 384])
def test_contact_id_restore_pairs_with_its_alarm(code: int) -> None:
    rig = panel_rig()
    (opened,) = rig.report(code, "new", zone=3)
    assert rig.report(code, "new", zone=4)[0].data["incident"] != opened.data["incident"]  # another zone
    rig.report(code, "new", zone=3)  # a repeat of the first: counted on it
    rig.report(code, "status", zone=3)  # still present: not a new activation
    (closed,) = rig.report(code, "restore", zone=3)
    assert closed.type == INCIDENT_TYPES[f"panel.{describe(code).family}"][2]
    assert (closed.data["incident"], closed.data["count"]) == (opened.data["incident"], 2)
    assert rig.report(code, "restore", zone=3) == []  # no alarm open: nothing, counted
    assert rig.engine.stats["orphan_restore"] == 1
    (status,) = rig.report(code, "status", zone=9)  # a condition we never heard of opens one
    assert status.type == INCIDENT_TYPES[f"panel.{describe(code).family}"][0]


def test_contact_id_house_state_and_bad_reports() -> None:
    rig = panel_rig()
    rig.report(401, "restore", zone=2)
    assert rig.engine.snapshot()["panels"]["p-3-1-101"]["house"] == {
        "state": "armed",
        "mode": "away",
        "code": 401,
        "user": 2,
    }
    rig.report(401, "new", zone=2)
    assert rig.engine.snapshot()["panels"]["p-3-1-101"]["house"]["state"] == "disarmed"
    assert rig.event(PanelReport("cid-line", "1234", "new", 1200, 1, 1, 0.0)) == []
    assert rig.event(PanelReport("cid-line", "1234", "bogus", 130, 1, 1, 0.0)) == []  # type: ignore[arg-type]
    assert rig.engine.stats["bad_report"] == 2
    assert types(rig.report(130, account="1234")) == ["panel.alarm"]


def test_every_alarm_of_an_unknown_account_reaches_the_console_grouped_by_account() -> None:
    """The panel nobody configured: its first report is a fault to fix, and each of its alarms is an incident
    of its own (code, zone, account), however many came before; arming and tests are in the log."""
    rig = panel_rig()
    first = rig.report(130, account="beef", zone=3)
    assert types(first) == ["panel.unknown_account", "panel.alarm"]
    fault, burglary = first
    assert (fault.priority, fault.data["account"], fault.data["count"]) == (P.FAULT, "BEEF", 1)
    assert burglary.place == wire.Place(site="estate") and burglary.priority == P.INTRUSION
    assert (burglary.data["account"], burglary.data["unknown_account"], burglary.data["panel"]) == ("BEEF", True, None)
    assert (burglary.data["code"], burglary.data["zone"]) == (130, 3)
    assert types(rig.report(130, "restore", account="BEEF", zone=3)) == ["panel.restore"]
    # the later FIRE from the same account: an incident of its own, at once
    (fire,) = rig.report(110, account="BEEF", zone=1)
    assert (fire.type, fire.priority, fire.data["code"], fire.data["zone"]) == ("panel.alarm", P.FIRE, 110, 1)
    assert fire.data["incident"] != burglary.data["incident"]
    # another unknown account is another fault incident; the first one counts every report
    other = rig.report(120, account="0042", zone=2)
    assert types(other) == ["panel.unknown_account", "panel.alarm"] and other[0].data["account"] == "0042"
    rig.run(61)
    repeats = [d for _, d in rig.log if d.type == "panel.unknown_account_repeat"]
    assert [(d.data["account"], d.data["count"]) for d in repeats] == [("BEEF", 3)]
    assert rig.engine.stats["unknown_account"] == 4
    # arming and tests of an unknown account: logged with the account, no house to change
    (arming,) = rig.report(401, "restore", account="BEEF", zone=2)
    assert (arming.type, arming.data["account"], arming.place) == ("panel.event", "BEEF", wire.Place(site="estate"))
    # an hour without a report from it closes its fault, so the next report rings again
    closed = rig.run(3600)
    assert sorted(d.data["account"] for d in closed if d.type == "panel.unknown_account_restore") == ["0042", "BEEF"]
    assert types(rig.report(110, account="BEEF", zone=1))[0] == "panel.unknown_account"


def test_an_unknown_accounts_fault_closes_once_the_account_is_configured(tmp_path: Path) -> None:
    rig = panel_rig()
    rig.report(110, account="4321")
    state = json.loads(json.dumps(rig.engine.snapshot()))
    panels = [
        *rig.cfg.indoor_panels,
        msgspec.convert(
            {"name": "p-new", "account": "4321", "place": {"building": "1", "unit": "1", "house": "1"}},
            type(rig.cfg.indoor_panels[0]),
        ),
    ]
    rig2 = Rig(msgspec.structs.replace(rig.cfg, indoor_panels=panels), rig.clock, state)
    assert types(rig2.run(0.001)) == ["panel.unknown_account_restore"]
    (fire,) = rig2.report(110, account="4321", zone=5)  # now a known panel's
    assert fire.data["panel"] == "p-new" and fire.place.house == "1"


def test_a_flood_of_unknown_accounts_is_bounded_but_every_alarm_still_opens() -> None:
    rig = panel_rig()
    for n in range(300):
        rig.report(120, account=f"{n:04X}")
    faults = [d for _, d in rig.log if d.type == "panel.unknown_account"]
    assert len(faults) == 257 and faults[-1].data["account"] == "*"  # 256 accounts, then one for the rest
    assert len([d for _, d in rig.log if d.type == "panel.alarm"]) == 300


def test_a_report_the_line_saw_twice_folds_or_opens() -> None:
    """A repeat within the line's duplicate window is most likely a resend: it adds nothing to an open incident,
    but when its incident was closed meanwhile (a guard cleared it), it raises again rather than vanish."""
    rig = panel_rig()
    (fire,) = rig.report(110, zone=2)
    assert rig.event(PanelReport("cid-line", "1234", "new", 110, 1, 2, rig.clock.mono, repeat=True)) == []
    rig.cmd("clear", incident=fire.data["incident"])
    (again,) = rig.event(PanelReport("cid-line", "1234", "new", 110, 1, 2, rig.clock.mono, repeat=True))
    assert again.type == "panel.alarm" and again.data["incident"] != fire.data["incident"]
    (closed,) = rig.report(110, "restore", zone=2)
    assert closed.data["count"] == 1
    assert rig.engine.stats["repeat_folded"] == 1


def test_contact_id_table() -> None:
    for code, c in CODES.items():
        assert c.code == code and 100 <= code <= 999 and c.en and re.search(r"[\u4e00-\u9fff]", c.zh)
        assert c.family in ("alarm", "tamper", "trouble", "openclose", "test", "event")
    for code in range(1000):  # every code gets a description, never an error
        c = describe(code)
        assert c.code == code and c.en and c.zh and c.known == (code in CODES)
    assert {describe(c).family for c in range(100, 200)} <= {"alarm", "tamper", "trouble"}


def test_periodic_test_supervision() -> None:
    rig = panel_rig(test_interval_s=3600, test_grace_s=300)
    t0 = rig.clock.mono
    assert rig.engine.next_deadline() == pytest.approx(t0 + 3900)
    rig.run(3000)
    assert rig.report(602) == []  # on time: resets the supervision
    rig.run(3899)
    assert [d.type for _, d in rig.log] == []
    (missed,) = rig.run(1)
    assert (missed.type, missed.priority, missed.device) == ("panel.test_missed", P.FAULT, "p-3-1-101")
    assert missed.data["interval_s"] == 3600 and missed.data["last_test"] is not None
    assert rig.run(100_000) == []  # one incident, not one per interval
    (back,) = rig.report(602)
    assert (back.type, back.data["incident"]) == ("panel.test_restore", missed.data["incident"])
    assert rig.engine.next_deadline() == pytest.approx(rig.clock.mono + 3900)
    (missed,) = rig.run(3900)
    drafts, _ = rig.cmd("clear", incident=missed.data["incident"])  # a guard closes it by hand ...
    assert types(drafts) == ["panel.test_restore"]
    assert types(rig.run(3900)) == ["panel.test_missed"]  # ... and supervision goes on


def test_unsupervised_panel_has_no_timer() -> None:
    rig = panel_rig(test_interval_s=None)
    assert rig.engine.next_deadline() is None


# ---------------------------------------------------------------- wall clock and schedules


def test_delays_ignore_wall_clock_jumps() -> None:
    cfg = make_cfg(
        zones=[
            zone("door", "entry", "in1", group="g", entry_delay_s=30),
            zone("beam", "perimeter", "in2", group="g", debounce_ms=800),
        ]
    )
    rig = Rig(cfg)
    rig.cmd("arm", group="g")
    rig.point("io", "in1", True)
    t0 = rig.clock.mono
    for jump in (timedelta(days=-400), timedelta(hours=5), timedelta(seconds=-3), timedelta(days=3650)):
        rig.clock.wall += jump
        rig.run(7)
    rig.point("io", "in2", True)
    t1 = rig.clock.mono
    rig.clock.wall -= timedelta(days=1)
    rig.run(30)
    times = {d.data["zone"]: t for t, d in rig.log if d.type == "zone.alarm"}
    assert times == {"door": pytest.approx(t0 + 30), "beam": pytest.approx(t1 + 0.8)}


def sched_cfg(**extra: Any) -> GatewayConfig:
    return make_cfg(
        zone_groups=[{"name": "fence", "label": "周界"}],
        zones=[zone("beam", "perimeter", "in1", group="fence")],
        alarm_schedules=[
            {"name": "night", "groups": ["fence"], "windows": [{"days": list(DAYS), "start": "22:00", "end": "06:00"}]}
        ],
        **extra,
    )


DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def local(day: int, hh: int, mm: int = 0) -> datetime:
    """Wall time for March <day> 2025, hh:mm in Shanghai, as UTC."""
    return datetime(2025, 3, day, hh, mm, tzinfo=UTC) - SHANGHAI


def sched_events(rig: Rig) -> list[tuple[str, str]]:
    return [(d.type, d.data.get("source", "")) for _, d in rig.log if d.type.startswith("group.")]


def test_schedule_arms_at_22_and_disarms_at_06() -> None:
    rig = Rig(sched_cfg(), Clock(wall=local(3, 21, 59)))
    rig.run(59)
    assert sched_events(rig) == []
    drafts = rig.run(1)
    assert [(d.type, d.data["source"], d.data["by"], d.data["label"]) for d in drafts] == [
        ("group.armed", "schedule:night", "schedule", "周界")
    ]
    rig.run(8 * 3600 - 1)
    assert types(rig.run(1)) == ["group.disarmed"]
    assert rig.engine.group_states()["fence"]["state"] == "disarmed"


def test_schedule_backward_jump_does_not_refire() -> None:
    rig = Rig(sched_cfg(), Clock(wall=local(3, 21, 50)))
    rig.run(15 * 60)  # 22:05, armed
    rig.cmd("disarm", group="fence")  # a guard disarms for a patrol
    rig.clock.wall = local(3, 21, 30)  # NTP steps the clock back
    rig.run(60 * 60)  # passes 22:00 again
    assert sched_events(rig) == [("group.armed", "schedule:night"), ("group.disarmed", "command")]
    assert rig.engine.stats["clock_backstep_reset"] == 0


def test_schedule_forward_jump_fires_the_missed_transition_once() -> None:
    rig = Rig(sched_cfg(), Clock(wall=local(3, 20, 0)))
    rig.run(1)
    rig.clock.wall = local(3, 23, 0)
    rig.run(1)
    rig.clock.wall = local(6, 23, 30)  # three more days and nights skipped: the last transition (arm) only
    rig.run(1)
    assert sched_events(rig) == [("group.armed", "schedule:night")]
    rig.cmd("disarm", group="fence")
    rig.clock.wall = local(7, 12, 0)  # past 06:00 (disarm) and not yet 22:00
    rig.run(1)
    assert sched_events(rig)[-1] == ("group.disarmed", "command")


def test_schedule_leaves_a_group_armed_stay_by_hand() -> None:
    rig = Rig(sched_cfg(), Clock(wall=local(3, 21, 0)))
    assert rig.cmd("arm", group="fence", mode="stay")[1].ok
    rig.run(2 * 3600)
    assert sched_events(rig) == [("group.armed", "command")]
    assert rig.engine.stats["schedule_skipped"] == 1
    assert rig.engine.group_states()["fence"] == {"state": "armed", "mode": "stay"}


def test_schedule_missed_while_down_applies_after_restart() -> None:
    rig = Rig(sched_cfg(), Clock(wall=local(3, 21, 0)))
    rig.run(1)
    state = json.loads(json.dumps(rig.engine.snapshot()))
    clock = Clock(mono=5.0, wall=local(3, 23, 0))  # rebooted: monotonic time starts over
    rig2 = Rig(sched_cfg(), clock, state=state)
    assert types(rig2.run(0)) == ["group.armed"]
    assert types(rig2.run(3600)) == []


def test_big_backward_jump_resets_the_mark() -> None:
    rig = Rig(sched_cfg(), Clock(wall=local(3, 12, 0)))
    rig.clock.wall = datetime(2040, 1, 1, tzinfo=UTC)  # a bad NTP answer...
    rig.run(1)
    rig.clock.wall = local(3, 21, 59)  # ... corrected
    rig.run(120)
    assert rig.engine.stats["clock_backstep_reset"] == 1
    assert sched_events(rig) == [("group.armed", "schedule:night")]


# ---------------------------------------------------------------- restart


def restart(rig: Rig, mono: float = 3.0) -> Rig:
    state = json.loads(json.dumps(rig.engine.snapshot()))
    clock = Clock(mono=mono, wall=rig.clock.wall)
    new = Rig(rig.cfg, clock, state=state)
    new.ids = rig.ids
    new.engine._new_id = rig.ids  # the same id sequence, as a ULID factory would continue
    assert new.engine.snapshot() == state
    return new


def test_restart_keeps_arming_remaining_entry_delay_and_incidents() -> None:
    cfg = make_cfg(
        zone_groups=[{"name": "g", "exit_delay_s": 10}],
        zones=[
            zone("door", "entry", "in1", group="g", entry_delay_s=30),
            zone("beam", "perimeter", "in2", group="g"),
            zone("sos", "panic", "in3"),
        ],
    )
    rig = Rig(cfg)
    rig.cmd("arm", group="g")
    rig.run(10)
    rig.cmd("bypass", zone="beam")
    (sos,) = rig.point("io", "in3", 1)
    rig.point("io", "in1", 1)
    rig.run(18)  # 12 s of the entry delay left
    rig2 = restart(rig, mono=7.5)
    assert rig2.engine.group_states()["g"] == {"state": "armed", "mode": "away"}
    assert rig2.engine.bypassed == {"beam"}
    assert rig2.engine.next_deadline() == pytest.approx(7.5 + 12)
    assert rig2.run(11.999) == []
    assert [(d.type, d.data["zone"]) for d in rig2.run(0.001)] == [("zone.alarm", "door")]
    assert rig2.point("io", "in3", 0) == []
    (restored,) = rig2.run(3)
    assert (restored.type, restored.data["incident"]) == ("zone.restore", sos.data["incident"])


def test_bad_state_is_a_clear_error_and_stale_entries_are_dropped() -> None:
    cfg = make_cfg(zones=[zone("beam", "perimeter", "in1", group="g")])
    for bad, msg in [
        ({"v": 99}, "version"),
        ({"v": 1, "groups": {"g": {"state": "on-fire", "mode": "away"}}}, "bad alarm state"),
        ({"v": 1, "timers": [["entry", "g"]]}, "bad alarm state"),
        ({"v": 1, "schedule_mark": "yesterday"}, "schedule_mark"),
        ([1, 2], "mapping"),
    ]:
        with pytest.raises(AlarmStateError, match=msg):
            AlarmEngine(cfg, mono=lambda: 0.0, wall=lambda: datetime.now(UTC), state=bad)  # type: ignore[arg-type]
    state = {
        "v": 1,
        "groups": {"g": {"state": "armed", "mode": "away"}, "gone": {"state": "armed", "mode": "away"}},
        "bypassed": ["beam", "gone"],
        "timers": [["debounce", "z:gone:main", 5], ["exit", "g", 0]],
    }
    e = AlarmEngine(cfg, mono=lambda: 0.0, wall=lambda: datetime.now(UTC), state=state)
    assert e.group_states()["g"]["state"] == "armed" and e.bypassed == {"beam"}
    assert e.stats["state_dropped"] == 3 and e.next_deadline() is None


# ---------------------------------------------------------------- contract with the wire and the config


def test_every_draft_is_a_valid_wire_event() -> None:
    cfg = make_cfg(
        zone_groups=[{"name": "g", "exit_delay_s": 5}],
        zones=[zone("door", "entry", "in1", group="g", entry_delay_s=1, aux={"tamper": "t1", "fault": "f1"})],
        indoor_panels=[{**PANEL, "test_interval_s": 60, "test_grace_s": 0}],
    )
    rig = Rig(cfg)
    rig.cmd("arm", group="g")
    rig.run(5)
    for point in ("in1", "t1", "f1"):
        rig.point("io", point, 1)
    rig.run(2)
    rig.cmd("bypass", zone="door")
    rig.cmd("disarm", group="g")
    for code, q in [(130, "new"), (130, "restore"), (401, "restore"), (301, "new"), (570, "new")]:
        rig.report(code, q)
    rig.run(120)
    rig.event(Availability("io", "offline", 0.0))
    got = {d.type for _, d in rig.log}
    assert len(got) >= 14
    events = [
        wire.Event(
            id=f"01J{n:023d}",
            seq=n + 1,
            ts=datetime.now(UTC),
            type=d.type,
            device=d.device,
            place=d.place,
            point=d.point,
            priority=int(d.priority),
            data=d.data,
        )
        for n, (_, d) in enumerate(rig.log)
    ]
    payload = wire.encode(wire.batch_events("estate", "gw1", events))
    assert wire.decode_batch(payload, site="estate", gateway="gw1").events == events


YAML = """\
site: estate
gateway: gw1
buses:
  - {name: rs485-1, kind: modbus-rtu, serial: /dev/ttyUSB0}
devices:
  - {name: perim-1, profile: perimeter-panel-8, bus: rs485-1, unit: 1}
alarm:
  timezone: Asia/Shanghai
  repeat_interval_s: 60
zone_groups:
  - {name: perimeter, label: 周界, exit_delay_s: 0}
zones:
  - name: fence-north
    device: perim-1
    point: zone1_alarm
    type: perimeter
    group: perimeter
    debounce_ms: 300
    aux: {tamper: zone1_tamper, fault: zone1_fault, touch: zone1_touch, cut: zone1_cut, short: zone1_short}
  - {name: gate-sos, device: perim-1, point: zone2_alarm, type: panic}
alarm_schedules:
  - name: night
    groups: [perimeter]
    windows:
      - {days: [mon, tue, wed, thu, fri, sat, sun], start: "22:00", end: "06:00"}
indoor_panels:
  - name: b3-u1-101
    account: "1234"
    place: {building: "3", unit: "1", house: "101"}
    test_interval_s: 86400
    test_grace_s: 900
"""


def test_config_example_loads(tmp_path: Path) -> None:
    p = tmp_path / "gw.yaml"
    p.write_text(YAML, encoding="utf-8")
    cfg = load(p)
    assert cfg.zones[0].aux is not None and cfg.zones[0].aux.cut == "zone1_cut"
    assert cfg.indoor_panels[0].account == "1234" and cfg.alarm_schedules[0].windows[0].start == "22:00"
    AlarmEngine(cfg, mono=lambda: 0.0, wall=lambda: datetime.now(UTC))


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("group: perimeter\n    debounce", "group: nowhere\n    debounce", "group 'nowhere' is not defined"),
        ("groups: [perimeter]", "groups: [nowhere]", "group 'nowhere' is not defined"),
        ("timezone: Asia/Shanghai", "timezone: Mars/Olympus", "unknown timezone"),
        ("touch: zone1_touch", "touch: zone9_touch", "aux.touch: device 'perim-1' has no point 'zone9_touch'"),
        ("point: zone2_alarm", "point: zone1_tamper", "already used by zone 'fence-north'"),
        ('house: "101"}', "}", "needs place.house"),
        ('start: "22:00", end: "06:00"', 'start: "06:00", end: "06:00"', "empty window"),
        ('account: "1234"', "account: 1234", "Expected `str`"),
        ("debounce_ms: 300", "debounce_ms: -1", "Expected `int` >= 0"),
        ("debounce_ms: 300", "debouce_ms: 300", "unknown field"),
    ],
)
def test_config_errors_name_the_line(tmp_path: Path, old: str, new: str, error: str) -> None:
    assert old in YAML
    p = tmp_path / "gw.yaml"
    p.write_text(YAML.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert error in str(e.value)
    assert re.search(rf"{re.escape(str(p))}:\d+", str(e.value))


def test_duplicate_panel_accounts_are_refused(tmp_path: Path) -> None:
    extra = '  - name: b3-u1-102\n    account: "1234"\n    place: {building: "3", unit: "1", house: "102"}\n'
    p = tmp_path / "gw.yaml"
    p.write_text(YAML + extra, encoding="utf-8")
    with pytest.raises(ConfigError, match="duplicate account"):
        load(p)


# ---------------------------------------------------------------- incremental saving


@pytest.mark.parametrize("open_before", [5, 400])
def test_a_commit_writes_what_changed_not_every_open_incident(open_before: int) -> None:
    """With 5 or 400 incidents open, the rows one more alarm changes are the same few, of the same size."""
    zones = [zone(f"z{i}", "fire", f"in{i}", restore_ms=0) for i in range(open_before + 1)]
    rig = Rig(make_cfg(zones=zones))
    rig.engine.full_rows()
    for i in range(open_before):
        rig.point("io", f"in{i}", True)
    rig.engine.delta()
    rig.clock.advance(1)
    drafts = rig.point("io", f"in{open_before}", True)
    assert types(drafts) == ["zone.alarm"]
    rows = rig.engine.delta()
    # the new zone's channel and incident (and its spent debounce timer, deleted), the clock: nothing of the others
    assert sorted(rows) == [
        f"c/z:z{open_before}:main",
        "clock",
        f"i/z:z{open_before}:main",
        f"t/debounce/z:z{open_before}:main",
    ], rows
    assert rows[f"t/debounce/z:z{open_before}:main"] is None
    size = len(msgspec.json.encode(rows))
    assert size < 1500, size
    # ... and none when nothing changed but the clock
    rig.clock.advance(1)
    assert sorted(rig.engine.delta()) == ["clock"]


# ---------------------------------------------------------------- saved state stays readable

GOLDEN = Path(__file__).parent / "data"


def _every_kind_of_state() -> Rig:
    """An engine holding one incident of every kind of key and a timer of every kind, with fixed ids and clock."""
    cfg = make_cfg(
        zone_groups=[{"name": "g", "exit_delay_s": 10}, {"name": "h", "exit_delay_s": 30}],
        zones=[
            zone("door", "entry", "in1", group="g", entry_delay_s=30),
            zone("sos", "panic", "in3"),
            zone("hall", "interior", "in4", group="h", debounce_ms=500),
        ],
        indoor_panels=[{**PANEL, "test_interval_s": 60, "test_grace_s": 0}],
    )
    rig = Rig(cfg, unmapped={("io", "spare"): "zone_tamper"})
    rig.cmd("arm", group="g")
    rig.run(10)
    rig.point("io", "in3", 1)  # z: (repeat timer below)
    rig.run(61)  # t: the panel's test is missed
    rig.point("io", "in1", 1)  # entry timer
    for _ in range(2):  # the first repeat goes out at once, the next waits for its turn: repeat timer
        rig.point("io", "in3", 0)
        rig.point("io", "in3", 1)
    rig.run(1)
    rig.event(Availability("io", "offline", rig.clock.mono, "no answer"))  # d:
    rig.report(130, "new")  # c:
    rig.report(130, "new", account="9999")  # u:
    rig.event(Unreadable("cid-line", "checksum", "0xFFFF", rig.clock.mono))  # r:
    rig.point("io", "spare", 1)  # x:
    rig.event(DeviceCheck("io", ["baud 9600, profile says 19200"], rig.clock.mono))  # m:
    rig.point("io", "in4", 1)  # debounce timer (group h disarmed: no alarm)
    rig.cmd("arm", group="h")  # exit timer
    return rig


def _golden(name: str) -> Any:
    """State saved by the engine of December 2026 (commit 8042784) from :func:`_every_kind_of_state`: never rewrite."""
    return msgspec.json.decode((GOLDEN / name).read_bytes())


def test_saved_rows_and_snapshot_keep_the_form_older_gateways_wrote() -> None:
    """The rows a gateway saves (and the snapshot older ones saved) are the same JSON as before, key for key."""
    rig = _every_kind_of_state()
    rows = msgspec.json.decode(msgspec.json.encode(rig.engine.full_rows()))
    snap = msgspec.json.decode(msgspec.json.encode(rig.engine.snapshot()))
    assert {k.split("/")[1] for k in rows if k.startswith("t/")} == {"debounce", "entry", "exit", "restore", "repeat"}
    assert {k.split("/")[1][0] for k in rows if k.startswith("i/")} == set("zdtcurxm")  # every kind of incident key
    assert rows == _golden("alarm_rows_v1.json")
    assert msgspec.json.encode(rows) == msgspec.json.encode(_golden("alarm_rows_v1.json"))
    assert snap == _golden("alarm_snapshot_v1.json")
    assert msgspec.json.encode(snap) == msgspec.json.encode(_golden("alarm_snapshot_v1.json"))


@pytest.mark.parametrize("form", ["rows", "snapshot"])
def test_state_written_by_older_gateways_loads_and_carries_on(form: str) -> None:
    from gateway.alarms import rows_to_snapshot

    saved = _golden(f"alarm_{form}_v1.json")
    state = rows_to_snapshot(saved) if form == "rows" else saved
    reference = _every_kind_of_state()
    clock = reference.clock
    rig = Rig(reference.cfg, Clock(clock.mono, clock.wall), state=state, unmapped={("io", "spare"): "zone_tamper"})
    rig.ids.n = reference.ids.n  # the same id sequence, as a ULID factory would continue
    assert rig.engine.stats["state_dropped"] == 0
    assert rig.engine.snapshot() == reference.engine.snapshot()
    assert {i["type"] for i in rig.engine.open_incidents()} == {
        "zone.alarm",
        "panel.test_missed",
        "device.offline",
        "panel.alarm",
        "panel.unknown_account",
        "line.unreadable",
        "device.unmapped_input",
        "device.misconfigured",
    }
    # ... and runs on as the engine that saved it would have: the same drafts from here
    for r in (rig, reference):
        r.log.clear()
        (missed,) = [i for i in r.engine.open_incidents() if i["type"] == "panel.test_missed"]
        r.cmd("clear", incident=missed["incident"])
        r.report(602)  # the periodic test
        r.run(3700)
    assert [(d.type, d.data.get("incident"), d.data.get("how")) for _, d in rig.log] == [
        (d.type, d.data.get("incident"), d.data.get("how")) for _, d in reference.log
    ]
    assert rig.engine.snapshot() == reference.engine.snapshot()
