"""Properties of the alarm engine over random sequences of inputs, commands, waits, wall-clock jumps
and restarts: no alarm is lost, restores follow their alarms, disarmed zones stay quiet (except the
24-hour types), delays ignore the wall clock, and a restart from a snapshot changes nothing."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.events import Availability, PanelReport, PointChanged
from gateway.alarms import INCIDENT_TYPES, AlarmEngine, rows_to_snapshot
from gateway.config import GatewayConfig
from gateway.events import Draft

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REPEAT_MS = 5000

ZONES: list[dict[str, Any]] = [
    {"name": "p1", "type": "perimeter", "point": "p1", "restore_ms": 1000, "aux": {"tamper": "p1t", "touch": "p1x"}},
    {"name": "p2", "type": "perimeter", "point": "p2", "debounce_ms": 300, "restore_ms": 0},
    {"name": "e1", "type": "entry", "point": "e1", "entry_delay_s": 4, "restore_ms": 500},
    {"name": "i1", "type": "interior", "point": "i1", "debounce_ms": 100},
    {"name": "f1", "type": "fire", "point": "f1", "debounce_ms": 200, "restore_ms": 2000},
    {"name": "k1", "type": "panic", "point": "k1"},
    {"name": "t1", "type": "tamper", "point": "t1", "restore_ms": 100},
]
#: point -> (zone, role, zone type, debounce ms)
CHANNELS = {z["point"]: (z["name"], "main", z["type"], z.get("debounce_ms", 0)) for z in ZONES} | {
    "p1t": ("p1", "tamper", "perimeter", 0),
    "p1x": ("p1", "touch", "perimeter", 0),
}
POINTS = sorted(CHANNELS)
ZONE_NAMES = [z["name"] for z in ZONES]
ZONE_POINT = {z["name"]: z["point"] for z in ZONES}
CODES = [130, 110, 137, 301, 401, 602, 570]
WALL0 = datetime(2025, 3, 3, 13, 58, tzinfo=UTC)  # 21:58 in Shanghai: the night schedule is about to arm


def make_cfg(*, schedules: bool = False, entry_delay_s: int | None = None) -> GatewayConfig:
    zones = [{**z, "device": "io", "group": "g"} for z in ZONES]
    if entry_delay_s is not None:
        zones[2]["entry_delay_s"] = entry_delay_s
    data: dict[str, Any] = {
        "site": "estate",
        "gateway": "gw1",
        "alarm": {"repeat_interval_s": REPEAT_MS // 1000},
        "zone_groups": [{"name": "g", "exit_delay_s": 3}],
        "zones": zones,
        "indoor_panels": [
            {
                "name": "hp",
                "account": "0A1B",
                "place": {"building": "1", "unit": "1", "house": "101"},
                "test_interval_s": 60,
                "test_grace_s": 10,
            }
        ],
    }
    if schedules:
        window = {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "22:00", "end": "22:05"}
        data["alarm_schedules"] = [{"name": "night", "groups": ["g"], "windows": [window]}]
    return msgspec.convert(data, GatewayConfig)


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"inc-{self.n:05d}"


class Sim:
    """One engine under a driven clock (integer milliseconds since the start of the run)."""

    def __init__(self, cfg: GatewayConfig, *, base: float = 1000.0, wall: datetime = WALL0) -> None:
        self.cfg = cfg
        self.ms = 0
        self.base = base
        self.wall = wall
        self.ids = Ids()
        self.log: list[tuple[int, Draft]] = []
        self.values = dict.fromkeys(POINTS, False)
        self.engine = self._engine(None)

    def _engine(self, state: dict | None) -> AlarmEngine:
        return AlarmEngine(
            self.cfg, mono=lambda: self.base + self.ms / 1000, wall=lambda: self.wall, state=state, new_id=self.ids
        )

    def keep(self, drafts: list[Draft]) -> None:
        self.log.extend((self.ms, d) for d in drafts)

    def step_to(self, ms: int) -> None:
        self.wall += timedelta(milliseconds=ms - self.ms)
        self.ms = ms

    def advance(self, wait_ms: int) -> None:
        target = self.ms + wait_ms
        for _ in range(100_000):
            d = self.engine.next_deadline()
            if d is None:
                break
            d_ms = round((d - self.base) * 1000)
            if d_ms > target:
                break
            self.step_to(max(d_ms, self.ms))
            self.keep(self.engine.tick())
        else:
            raise AssertionError("the engine keeps asking for ticks without progress")
        self.step_to(target)
        self.keep(self.engine.tick())

    def restart(self, base: float) -> None:
        before = self.engine.snapshot()
        state = json.loads(json.dumps(before))
        self.base = base  # monotonic time starts over on a reboot
        self.engine = self._engine(state)
        assert self.engine.snapshot() == before

    def apply(self, op: tuple) -> None:
        kind = op[0]
        mono = self.base + self.ms / 1000
        if kind == "wait":
            self.advance(op[1])
        elif kind in ("set", "toggle"):
            value = op[2] if kind == "set" else not self.values[op[1]]
            self.values[op[1]] = value
            self.keep(self.engine.on_device_event(PointChanged("io", op[1], value, mono)))
        elif kind == "arm":
            self.command("arm", {"group": "g", "mode": op[1], "force": True})
        elif kind == "disarm":
            self.command("disarm", {"group": "g"})
        elif kind in ("bypass", "unbypass"):
            self.command(kind, {"zone": op[1]})
        elif kind in ("ack", "clear"):
            open_ = self.engine.open_incidents()
            if open_:
                self.command(kind, {"incident": open_[op[1] % len(open_)]["incident"]})
        elif kind == "cid":
            self.keep(self.engine.on_device_event(PanelReport("line", "0a1b", op[2], op[1], 1, op[3], mono)))
        elif kind == "avail":
            self.keep(self.engine.on_device_event(Availability("io", op[1], mono)))
        elif kind == "wall":
            self.wall += timedelta(seconds=op[1])
        elif kind == "restart":
            self.restart(op[1])

    def command(self, kind: str, args: dict) -> None:
        drafts, outcome = self.engine.command(kind, args, "guard")
        # the refusals these runs can meet: arming "stay" a group armed "away" (or the reverse), and a bypass of a
        # 24-hour zone
        assert outcome.ok or "disarm it first" in outcome.detail or "cannot be bypassed" in outcome.detail, outcome
        self.keep(drafts)


waits = st.tuples(st.just("wait"), st.integers(0, 8000) | st.sampled_from([0, 100, 200, 300, 1000, 3000, 4000, 5000]))
sets = st.tuples(st.just("set"), st.sampled_from(POINTS), st.booleans()) | st.tuples(
    st.just("toggle"), st.sampled_from(POINTS)
)
base_ops = st.one_of(
    waits,
    waits,
    sets,
    sets,
    sets,
    st.tuples(st.just("arm"), st.sampled_from(["away", "stay"])),
    st.tuples(st.just("disarm")),
    st.tuples(st.sampled_from(["bypass", "unbypass"]), st.sampled_from(ZONE_NAMES)),
    st.tuples(st.sampled_from(["ack", "clear"]), st.integers(0, 10)),
    st.tuples(st.just("cid"), st.sampled_from(CODES), st.sampled_from(["new", "restore", "status"]), st.integers(1, 2)),
    st.tuples(st.just("avail"), st.sampled_from(["offline", "online"])),
)
wall_jumps = st.tuples(st.just("wall"), st.integers(-10 * 86_400, 10 * 86_400))


class Model:
    """What the spec says about counts: each debounced activation of a perimeter channel while the
    group is armed (or arming) and its zone is not bypassed, or of a 24-hour channel (which cannot be
    bypassed), is one count on an incident."""

    def __init__(self) -> None:
        self.raw = dict.fromkeys(POINTS, False)
        self.due: dict[str, int] = {}
        self.armed = False
        self.bypassed: set[str] = set()
        self.counts: Counter[str] = Counter()

    def flush(self, ms: int) -> None:
        for point, at in sorted(self.due.items(), key=lambda kv: kv[1]):
            if at <= ms:
                del self.due[point]
                if self.qualifies(point):
                    self.counts[point] += 1

    def qualifies(self, point: str) -> bool:
        zone, role, ztype, _ = CHANNELS[point]
        if role == "tamper" or ztype in ("fire", "panic", "tamper"):
            return True
        if zone in self.bypassed:
            return False
        if ztype == "perimeter":
            return self.armed
        return False  # entry and interior: not modelled (their counts are not compared)

    def apply(self, op: tuple, ms: int) -> None:
        self.flush(ms)
        kind = op[0]
        if kind == "wait":
            self.flush(ms + op[1])
        elif kind in ("set", "toggle"):
            point = op[1]
            value = op[2] if kind == "set" else not self.raw[point]
            if value != self.raw[point]:
                self.raw[point] = value
                if value:
                    self.due[point] = ms + CHANNELS[point][3]
                else:
                    self.due.pop(point, None)
                self.flush(ms)
        elif kind == "arm":
            self.armed = True
        elif kind == "disarm":
            self.armed = False
        elif kind == "bypass" and CHANNELS[ZONE_POINT[op[1]]][2] not in ("fire", "panic", "tamper"):
            self.bypassed.add(op[1])  # refused for a 24-hour zone
        elif kind == "unbypass":
            self.bypassed.discard(op[1])


MODELLED = [p for p in POINTS if CHANNELS[p][2] not in ("entry", "interior")]
OPENING = {v[0]: k for k, v in INCIDENT_TYPES.items()}
REPEAT = {v[1]: k for k, v in INCIDENT_TYPES.items()}
CLOSING = {v[2]: k for k, v in INCIDENT_TYPES.items()}


def check_incidents(log: list[tuple[int, Draft]], engine: AlarmEngine) -> dict[str, int]:
    """Each incident: one opening first, repeats with growing counts at most one per interval, at
    most one closing, last. Returns the final count of each incident."""
    state: dict[str, str] = {}
    counts: dict[str, int] = {}
    last_emit: dict[str, int] = {}
    for ms, d in log:
        inc = d.data.get("incident")
        if d.type in OPENING:
            assert inc not in state, f"{d.type} reopens {inc}"
            assert d.data["count"] == 1
            state[inc], counts[inc], last_emit[inc] = "open", 1, ms
        elif d.type in REPEAT:
            assert state.get(inc) == "open", f"{d.type} for {inc} which is {state.get(inc)}"
            assert d.data["count"] > counts[inc]
            assert ms - last_emit[inc] >= REPEAT_MS, "repeats must be throttled"
            counts[inc], last_emit[inc] = d.data["count"], ms
        elif d.type in CLOSING:
            assert state.get(inc) == "open", f"{d.type} before its opening, or twice, for {inc}"
            assert d.data["count"] >= counts[inc]
            state[inc], counts[inc] = "closed", d.data["count"]
    still_open = {i["incident"]: i["count"] for i in engine.open_incidents()}
    assert set(still_open) == {i for i, s in state.items() if s == "open"}
    for inc, n in still_open.items():
        assert n >= counts[inc]
        counts[inc] = n
    return counts


@SETTINGS
@given(st.lists(base_ops, min_size=5, max_size=60))
def test_no_alarm_lost_restores_follow_alarms_disarmed_is_quiet(ops: list[tuple]) -> None:
    sim = Sim(make_cfg())
    model = Model()
    quiet = [("set", p, False) for p in POINTS] + [("wait", 30_000)]
    for op in ops + quiet:
        model.apply(op, sim.ms)
        sim.apply(op)
    final = check_incidents(sim.log, sim.engine)

    # once every point is quiet, every zone incident has been restored (or cleared)
    assert [i for i in sim.engine.open_incidents() if i["type"].startswith("zone.")] == []

    # every qualifying activation is counted exactly once, on exactly one incident
    got: Counter[str] = Counter()
    for _, d in sim.log:
        if d.type in OPENING and d.device == "io":
            got[d.point or ""] += final[d.data["incident"]]
    assert {p: got[p] for p in MODELLED} == {p: model.counts[p] for p in MODELLED}

    # at most one incident open per channel at any time
    open_by_channel: dict[tuple, str] = {}
    for _, d in sim.log:
        key = (d.device, d.point, d.data.get("code"), d.data.get("zone") if d.type.startswith("panel.") else None)
        if d.type in OPENING:
            assert key not in open_by_channel
            open_by_channel[key] = d.data["incident"]
        elif d.type in CLOSING:
            assert open_by_channel.pop(key) == d.data["incident"]

    # intrusion zones alarm only while their group is armed; entry/interior not during the exit delay
    group = "disarmed"
    for _, d in sim.log:
        if d.type == "group.arming":
            group = "exit"
        elif d.type == "group.armed":
            group = "armed"
        elif d.type == "group.disarmed":
            group = "disarmed"
        elif d.type in ("zone.alarm", "zone.entry_delay") and d.data.get("zone_type", "entry") in ("entry", "interior"):
            assert group == "armed", d
        elif d.type == "zone.alarm" and d.data["zone_type"] == "perimeter" and d.data["kind"] != "tamper":
            assert group != "disarmed", d


@SETTINGS
@given(st.lists(base_ops, min_size=5, max_size=40), st.lists(wall_jumps, min_size=1, max_size=10), st.randoms())
def test_wall_clock_jumps_change_nothing_but_schedules(ops: list[tuple], jumps: list[tuple], rnd: Any) -> None:
    with_jumps = list(ops)
    for j in jumps:
        with_jumps.insert(rnd.randint(0, len(with_jumps)), j)
    steady, jumpy = Sim(make_cfg()), Sim(make_cfg())
    for op in ops:
        steady.apply(op)
    for op in with_jumps:
        jumpy.apply(op)

    def shape(log: list[tuple[int, Draft]]) -> list[tuple]:
        # the last periodic test's wall time is the one wall-derived field
        return [
            (ms, d.type, d.point, d.priority, {k: v for k, v in d.data.items() if k != "last_test"}) for ms, d in log
        ]

    assert shape(jumpy.log) == shape(steady.log)


@SETTINGS
@given(
    st.integers(1, 600),
    st.integers(0, 5000),
    st.lists(st.tuples(st.integers(0, 60_000), st.integers(-30 * 86_400, 30 * 86_400)), max_size=12),
)
def test_entry_delay_fires_exactly_at_activation_plus_delay(delay_s: int, lead_ms: int, steps: list[tuple]) -> None:
    sim = Sim(make_cfg(entry_delay_s=delay_s))
    sim.apply(("arm", "away"))
    sim.apply(("wait", 3000 + lead_ms))  # past the exit delay
    sim.apply(("set", "e1", True))
    t0 = sim.ms
    assert sim.engine.next_deadline() is not None
    for wait_ms, jump_s in steps:
        sim.apply(("wall", jump_s))
        sim.apply(("wait", wait_ms))
    sim.apply(("wait", delay_s * 1000 + 1))
    alarms = [ms for ms, d in sim.log if d.type == "zone.alarm"]
    assert alarms == [t0 + delay_s * 1000]


@SETTINGS
@given(
    st.lists(
        st.one_of(
            base_ops,
            st.tuples(st.just("restart"), st.integers(0, 10**9).map(lambda n: n / 1000)),
            st.tuples(st.just("wall"), st.integers(-3 * 3600, 3 * 3600)),
        ),
        min_size=5,
        max_size=50,
    )
)
def test_restart_from_snapshot_changes_no_future_output(ops: list[tuple]) -> None:
    cfg = make_cfg(schedules=True)
    reference, restarted = Sim(cfg), Sim(cfg)
    for op in ops:
        if op[0] != "restart":
            reference.apply(op)
        restarted.apply(op)
    restarted.apply(("wait", 120_000))
    reference.apply(("wait", 120_000))
    assert restarted.log == reference.log
    assert restarted.engine.snapshot() == reference.engine.snapshot()


class RowSim(Sim):
    """Saves as the gateway does: every full_rows() and delta() into one table of rows (a None deletes a row),
    each through JSON; a restart reads only that table."""

    def __init__(self, cfg: GatewayConfig) -> None:
        super().__init__(cfg)
        self.rows: dict[str, object] = {}
        self.save(self.engine.full_rows(), replace=True)

    def save(self, rows: dict[str, object], *, replace: bool = False) -> None:
        if replace:
            self.rows.clear()
        for k, v in json.loads(json.dumps(rows, default=msgspec.to_builtins)).items():
            if v is None:
                self.rows.pop(k, None)
            else:
                self.rows[k] = v

    def apply(self, op: tuple) -> None:
        super().apply(op)
        self.save(self.engine.delta())

    def restart(self, base: float) -> None:
        before = self.engine.snapshot()
        self.base = base
        self.engine = self._engine(rows_to_snapshot(self.rows))
        assert self.engine.snapshot() == before
        self.save(self.engine.full_rows(), replace=True)


@SETTINGS
@given(
    st.lists(
        st.one_of(
            base_ops,
            st.tuples(st.just("restart"), st.integers(0, 10**9).map(lambda n: n / 1000)),
            st.tuples(st.just("wall"), st.integers(-3 * 3600, 3 * 3600)),
        ),
        min_size=5,
        max_size=50,
    )
)
def test_restart_from_incremental_rows_changes_no_future_output(ops: list[tuple]) -> None:
    """The rows written commit by commit (only what changed) restore the same engine as a full snapshot."""
    cfg = make_cfg(schedules=True)
    reference, restarted = Sim(cfg), RowSim(cfg)
    for op in ops:
        if op[0] != "restart":
            reference.apply(op)
        restarted.apply(op)
    restarted.apply(("wait", 120_000))
    reference.apply(("wait", 120_000))
    assert restarted.log == reference.log
    assert restarted.engine.snapshot() == reference.engine.snapshot()
