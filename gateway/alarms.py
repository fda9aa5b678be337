"""The alarm engine: device events in, event drafts out, all of its state in one JSON-able snapshot.

Pure and synchronous: no I/O, no tasks, no clock of its own. The caller feeds it device events and
commands, calls :meth:`AlarmEngine.tick` when :meth:`AlarmEngine.next_deadline` (monotonic seconds)
passes, and stores :meth:`AlarmEngine.snapshot` in the same transaction as the drafts it got.

Model
-----
* A **zone** is a device point (active = truthy, or falsy with ``invert``), plus optional aux points
  (tamper, line fault, fence touch/cut/short). Each is a *channel*. A channel counts as activated once
  its point has stayed active for the zone's ``debounce_ms``.
* **Groups** are armed ("away" or "stay") and disarmed by command or schedule. Arming starts the exit
  delay; perimeter zones (and fence touch) are instant from the moment of arming; entry and interior
  zones are ignored until the exit delay ends. An entry zone then starts the entry delay: the alarm
  comes only if the group is not disarmed within ``entry_delay_s``; interior zones that break in
  meanwhile follow the delay, otherwise they are instant ("stay" mode ignores them). An entry or
  interior zone still open when the exit delay ends starts the entry delay too.
* 24-hour types (panic, medical, fire, gas, tamper, fault) and the tamper/fault/cut/short aux points
  ignore arming. ``bypass`` silences a zone's own point and fence touch, not its tamper or fault, and
  is refused for a 24-hour zone (one bypassed in a state saved by an older gateway still alarms).
* An **incident** pairs an opening event and its closing event by ``data.incident`` (an id made here,
  since the store assigns event ids later). Activations while it is open are counted on it; at most
  one ``*_repeat`` per ``alarm.repeat_interval_s`` carries the running count; the close carries the
  final count. A zone incident closes once its point has been quiet for ``restore_ms``; a Contact ID
  incident on the panel's restore; ``clear`` closes any incident by hand.

Nothing the field says is swallowed (docs/events.md, "From the field to the console"): a report from a
Contact ID account no panel has is handled like a known panel's (place: the site; data
``unknown_account``), and the account itself is a ``panel.unknown_account`` fault incident counting its
reports; a line's unreadable messages are a ``line.unreadable`` fault; an alarm-class point of a device
that no zone uses (``unmapped`` points, from the profiles) is a ``device.unmapped_input`` incident; a
device whose settings differ from its profile's is ``device.misconfigured``. A report the line saw twice
in its duplicate window (``repeat``) folds into the open incident, or opens one if none is open.

Persistence: :meth:`AlarmEngine.delta` gives what changed since the last call as rows (``{row: value, or
None to delete}``), so a commit writes the incident that changed, not every open incident; the rows hold
times on the engine's clock and a ``clock`` row says where that clock stood, so :func:`rows_to_snapshot`
turns them back into a :meth:`AlarmEngine.snapshot` for a restart. :meth:`AlarmEngine.full_rows` writes
everything once (at start-up, in a new clock's terms).

Time: all timers run on the monotonic clock in whole milliseconds, and the snapshot holds their
*remaining* time, so a restart resumes a running delay with what it had left. Device events are
handled at the engine's clock when they arrive (their own ``mono`` is not used); a first read after a
(re)connect (``initial=True``) is compared with the saved point state like any other change. Only
schedules read the wall clock, through a high-water mark (see :mod:`gateway.alarm_schedule`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple
from zoneinfo import ZoneInfo

import msgspec

from devices.events import Availability, DeviceCheck, DeviceEvent, PanelReport, PointChanged, Unreadable
from gateway import wire
from gateway.alarm_schedule import due as schedules_due
from gateway.alarm_schedule import next_after
from gateway.config import GatewayConfig, IndoorPanelConfig, ZoneConfig
from gateway.contact_id_codes import describe
from gateway.events import Draft

STATE_VERSION = 1
_P = wire.Priority

#: Incident families: (opening type, repeat type, closing type). Every one of these events carries
#: ``data.incident`` and ``data.count``; closings also ``data.how`` ("restored" or "cleared").
INCIDENT_TYPES: dict[str, tuple[str, str, str]] = {
    "zone.alarm": ("zone.alarm", "zone.alarm_repeat", "zone.restore"),
    "zone.tamper": ("zone.tamper", "zone.tamper_repeat", "zone.tamper_restore"),
    "zone.fault": ("zone.fault", "zone.fault_repeat", "zone.fault_restore"),
    "panel.alarm": ("panel.alarm", "panel.alarm_repeat", "panel.restore"),
    "panel.tamper": ("panel.tamper", "panel.tamper_repeat", "panel.tamper_restore"),
    "panel.trouble": ("panel.trouble", "panel.trouble_repeat", "panel.trouble_restore"),
    "device.offline": ("device.offline", "device.offline_repeat", "device.online"),
    "panel.test_missed": ("panel.test_missed", "panel.test_missed_repeat", "panel.test_restore"),
    "panel.unknown_account": ("panel.unknown_account", "panel.unknown_account_repeat", "panel.unknown_account_restore"),
    "line.unreadable": ("line.unreadable", "line.unreadable_repeat", "line.unreadable_restore"),
    "device.unmapped_input": ("device.unmapped_input", "device.unmapped_input_repeat", "device.unmapped_input_restore"),
    "device.misconfigured": ("device.misconfigured", "device.misconfigured_repeat", "device.misconfigured_restore"),
}

#: Zone types that ignore arming.
ZONE_24H = frozenset({"panic", "medical", "fire", "gas", "tamper", "fault"})
COMMANDS = ("arm", "disarm", "bypass", "unbypass", "ack", "clear")
#: An acknowledged incident sends no repeats: a new activation of its alarm is counted, and reported (a repeat event)
#: only when none was for this long. So a zone chattering after the guard's ack stays quiet, while a panic pressed
#: again the next day on a panel that never sends restores is heard, even if the portal's clear never arrived and
#: the board closed the incident long ago (the board then opens a new one).
ACKED_REPORT_MS = 10 * 60 * 1000

# Gas ranks with fire: both threaten life and property at once (explosion, poisoning).
_ZONE_PRIORITY = {
    "perimeter": _P.INTRUSION,
    "entry": _P.INTRUSION,
    "interior": _P.INTRUSION,
    "panic": _P.PANIC,
    "medical": _P.PANIC,
    "fire": _P.FIRE,
    "gas": _P.FIRE,
    "tamper": _P.TAMPER,
    "fault": _P.FAULT,
}
_AUX = {  # role: (family, priority)
    "touch": ("alarm", _P.INTRUSION),
    "tamper": ("tamper", _P.TAMPER),
    "cut": ("tamper", _P.TAMPER),
    "short": ("tamper", _P.TAMPER),
    "fault": ("fault", _P.FAULT),
}
_TIMER_RANK = {"debounce": 0, "entry": 1, "exit": 2, "restore": 3, "repeat": 4, "test": 5}
#: Profile point kinds that say "alarm" on their own: active on a point no zone uses, they are an incident.
UNMAPPED_KINDS = {  # kind: priority
    "zone_alarm": _P.FAULT,
    "zone_fault": _P.FAULT,
    "fence_touch": _P.FAULT,
    "zone_tamper": _P.TAMPER,
    "fence_cut": _P.TAMPER,
    "fence_short": _P.TAMPER,
    "panel_tamper": _P.TAMPER,
}
#: Fault incidents with no restore of their own close after this long without a new occurrence, so the next
#: one opens a new incident (and rings) rather than folding into one a guard has closed.
QUIET_CLOSE_MS = {"line.unreadable": 600_000, "panel.unknown_account": 3_600_000}
MAX_UNKNOWN_ACCOUNTS = 256  # distinct unknown-account fault incidents; more fold into one for "*"
_SCHEDULE_POLL_MS = 60_000  # look at the wall clock at least this often while schedules exist
_BACKSTEP_RESET = timedelta(days=1)  # a wall clock set back further than this was wrong before
_INACTIVE_WORDS = frozenset({"", "0", "false", "off", "no", "normal", "closed", "ok", "inactive"})


class AlarmStateError(ValueError):
    """A saved state that cannot be restored (wrong version or shape)."""


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    ok: bool
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def is_active(value: object) -> bool:
    """A point's value as active/inactive: truthy, except strings such as "0", "off", "normal"."""
    if isinstance(value, str):
        return value.strip().lower() not in _INACTIVE_WORDS
    return bool(value)


def _ulid() -> str:
    return wire.new_id()


class _BadArgs(Exception):
    pass


@dataclass(slots=True)
class _Channel:
    key: str
    zone: ZoneConfig
    role: str  # "main" or an aux role
    point: str
    family: Literal["alarm", "tamper", "fault"]
    priority: int
    kind: str
    raw: bool = False
    inactive_since: int | None = None


@dataclass(slots=True)
class _Group:
    name: str
    label: str
    exit_ms: int
    zones: list[ZoneConfig] = field(default_factory=list)
    state: Literal["disarmed", "exit", "armed"] = "disarmed"
    mode: Literal["away", "stay"] = "away"
    by: str = ""
    source: str = ""
    entry_zones: list[str] = field(default_factory=list)  # channel keys waiting on the entry delay


@dataclass(slots=True)
class _Panel:
    cfg: IndoorPanelConfig
    place: wire.Place
    last_test: str | None = None  # UTC ISO time of the last periodic test
    house: dict[str, Any] | None = None  # the house's arm state as the panel last reported it


class _Incident(msgspec.Struct, forbid_unknown_fields=True):
    """An open incident, and as it is its saved row (``i/<key>``). A snapshot holds each the same but for
    ``last_emit`` and ``n`` (see :func:`_aged` and :meth:`AlarmEngine._restore`)."""

    key: str
    id: str
    family: str
    priority: int
    device: str
    place: wire.Place
    point: str | None
    data: dict[str, Any]
    count: int = 1
    sent: int = 1  # the count the last opening/repeat event carried
    last_emit: int = 0  # mono ms of the last opening/repeat event; a snapshot has its age instead, emit_age_ms
    acked: bool = False
    n: int = 0  # opening order, kept across restarts in the saved rows (a snapshot's is its list order)

    def draft(self, which: int, **extra: Any) -> Draft:
        data = {**self.data, "incident": self.id, "count": self.count, **extra}
        return Draft(
            type=INCIDENT_TYPES[self.family][which],
            device=self.device,
            place=self.place,
            point=self.point,
            priority=self.priority,
            data=data,
        )


def _unknown_account(inc: _Incident) -> str | None:
    """The account a ``panel.unknown_account`` incident counts the reports of ("*": every one past the limit);
    None for any other incident."""
    account = inc.data.get("account") if inc.family == "panel.unknown_account" else None
    return account if isinstance(account, str) else None


# ---------------------------------------------------------------- saved state (JSON)


class _S(msgspec.Struct, forbid_unknown_fields=True):
    pass


class _SGroup(_S):
    state: Literal["disarmed", "exit", "armed"]
    mode: Literal["away", "stay"]
    by: str = ""
    source: str = ""
    entry_zones: list[str] = []


class _SChannel(_S):
    raw: bool
    inactive_ms: int | None = None  # how long ago it went quiet


class _SPanel(_S):
    last_test: str | None = None
    house: dict[str, Any] | None = None


def _aged(row: dict[str, Any], now: int) -> dict[str, Any]:
    """An incident's saved row as a snapshot has it: the age of its last event rather than the time, no ``n``."""
    return {
        ("emit_age_ms" if k == "last_emit" else k): now - v if k == "last_emit" else v
        for k, v in row.items()
        if k != "n"
    }


def _unaged(snap: Mapping[str, Any], now: int, n: int) -> dict[str, Any]:
    """The reverse of :func:`_aged`: the row of a snapshot's incident, opened ``n``-th. Raises AlarmStateError."""
    age = snap.get("emit_age_ms")
    if type(age) is not int or "last_emit" in snap or "n" in snap:
        raise AlarmStateError("bad alarm state: an incident needs emit_age_ms (an integer) and no last_emit or n")
    return {
        ("last_emit" if k == "emit_age_ms" else k): now - v if k == "emit_age_ms" else v for k, v in snap.items()
    } | {"n": n}


class _SState(_S):
    v: int
    groups: dict[str, _SGroup] = {}
    bypassed: list[str] = []
    channels: dict[str, _SChannel] = {}
    incidents: list[dict[str, Any]] = []  # each an _Incident's row, _aged
    panels: dict[str, _SPanel] = {}
    timers: list[tuple[str, str, int]] = []  # (kind, key, remaining ms; negative when overdue)
    schedule_mark: str | None = None  # UTC ISO wall time up to which schedules were applied
    schedule_mark_age_ms: int = 0  # how long ago (monotonic) that was
    unknown_accounts: list[str] = []  # no longer used (an incident per account now); kept so older states load


# ---------------------------------------------------------------- saved rows (incremental)

_enc = msgspec.json.Encoder()


class _Row(NamedTuple):
    """A saved row, by what it saves: a channel's or an incident's (by its key), or a timer's (kind and key)."""

    kind: Literal["c", "i", "t"]
    key: str
    timer: str = ""  # a timer's kind

    @property
    def name(self) -> str:
        return f"t/{self.timer}/{self.key}" if self.kind == "t" else f"{self.kind}/{self.key}"


class _Tracked(dict):  # type: ignore[type-arg]
    """A dict that notes the saved row of every key set or removed (timers, incidents)."""

    def __init__(self, dirty: set[_Row], row: Callable[[Any], _Row]) -> None:
        super().__init__()
        self._dirty = dirty
        self._row = row

    def __setitem__(self, key: Any, value: Any) -> None:
        self._dirty.add(self._row(key))
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._dirty.add(self._row(key))
        super().__delitem__(key)

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self:
            self._dirty.add(self._row(key))
        return super().pop(key, *default)


def _timer_row(key: tuple[str, str]) -> _Row:
    return _Row("t", key[1], key[0])


def _incident_row(key: str) -> _Row:
    return _Row("i", key)


def rows_to_snapshot(rows: Mapping[str, Any]) -> dict[str, Any]:
    """A :meth:`AlarmEngine.snapshot` from the rows :meth:`AlarmEngine.full_rows` and later
    :meth:`AlarmEngine.delta` calls left (row names without the caller's prefix). Raises AlarmStateError."""
    clock, meta = rows.get("clock"), rows.get("meta")
    if not isinstance(clock, int) or not isinstance(meta, dict):
        raise AlarmStateError("alarm state rows: no clock or meta row")
    try:
        snap: dict[str, Any] = {
            "v": meta["v"],
            "groups": meta["groups"],
            "bypassed": meta["bypassed"],
            "schedule_mark": meta["schedule_mark"],
            "schedule_mark_age_ms": clock - meta["schedule_mark_t"],
            "channels": {},
            "incidents": [],
            "panels": {},
            "timers": [],
        }
        incidents = []
        for name, v in rows.items():
            kind, _, rest = name.partition("/")
            if kind == "c":
                since = v["inactive_since"]
                snap["channels"][rest] = {"raw": v["raw"], "inactive_ms": None if since is None else clock - since}
            elif kind == "i":
                incidents.append((v["n"], _aged(v, clock)))
            elif kind == "p":
                snap["panels"][rest] = v
            elif kind == "t":
                tkind, _, tkey = rest.partition("/")
                snap["timers"].append([tkind, tkey, v - clock])
    except (KeyError, TypeError, AttributeError) as e:
        raise AlarmStateError(f"alarm state rows: {type(e).__name__}: {e}") from None
    snap["incidents"] = [inc for _, inc in sorted(incidents, key=lambda x: x[0])]
    snap["timers"].sort()
    return snap


# ---------------------------------------------------------------- the engine


class AlarmEngine:
    """Turns device events and commands into event drafts. Not thread-safe; one caller at a time.

    ``mono`` is ``time.monotonic``; ``wall`` returns an aware datetime (naive is taken as UTC);
    ``state`` is a former :meth:`snapshot` (raises :class:`AlarmStateError` if unusable);
    ``new_id`` makes incident ids (ULIDs by default); ``unmapped`` maps (device, point) to the profile kind of
    each alarm-class point that no zone or door uses (see :data:`UNMAPPED_KINDS`).
    """

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        mono: Callable[[], float],
        wall: Callable[[], datetime],
        state: Mapping[str, Any] | None = None,
        new_id: Callable[[], str] | None = None,
        unmapped: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        self._cfg = cfg
        self._mono = mono
        self._wall = wall
        self._new_id = new_id or _ulid
        self._tz = ZoneInfo(cfg.alarm.timezone)
        self._repeat_ms = cfg.alarm.repeat_interval_s * 1000
        #: Counted rejections and oddities: unknown_account, unknown_code, bad_report, orphan_restore,
        #: repeat_folded, unreadable, state_dropped, clock_backstep_reset, schedule_skipped.
        self.stats: Counter[str] = Counter()
        self._t = 0
        self._t = self._now()

        self._zones = {z.name: z for z in cfg.zones}
        self._groups: dict[str, _Group] = {
            g.name: _Group(g.name, g.label, g.exit_delay_s * 1000) for g in cfg.zone_groups
        }
        for z in cfg.zones:
            self._groups.setdefault(z.group, _Group(z.group, "", 0)).zones.append(z)
        self._schedules = [s for s in cfg.alarm_schedules if s.enabled]
        for s in self._schedules:
            for name in s.groups:
                self._groups.setdefault(name, _Group(name, "", 0))
        self._channels: dict[str, _Channel] = {}
        self._by_point: dict[tuple[str, str], _Channel] = {}
        self._places: dict[str, wire.Place] = {}
        for z in cfg.zones:
            self._places[z.name] = self._place(z.place, zone=z.name)
            family: Literal["alarm", "tamper", "fault"] = (
                "tamper" if z.type == "tamper" else "fault" if z.type == "fault" else "alarm"
            )
            kind = "intrusion" if z.type in ("perimeter", "entry", "interior") else z.type
            self._add(_Channel(f"z:{z.name}:main", z, "main", z.point, family, int(_ZONE_PRIORITY[z.type]), kind))
            if z.aux is not None:
                for role, (fam, prio) in _AUX.items():
                    point = getattr(z.aux, role)
                    if point is not None:
                        self._add(_Channel(f"z:{z.name}:{role}", z, role, point, fam, int(prio), role))  # type: ignore[arg-type]
        self._panels: dict[str, _Panel] = {}
        self._by_account: dict[str, _Panel] = {}
        for p in cfg.indoor_panels:
            panel = _Panel(p, self._place(p.place))
            self._panels[p.name] = panel
            self._by_account[p.account.upper()] = panel

        self._unmapped = {k: v for k, v in (unmapped or {}).items() if v in UNMAPPED_KINDS and k not in self._by_point}
        self._bypassed: set[str] = set()
        self._dirty: set[_Row] = set()  # saved rows changed since the last delta()
        self._saved: dict[str, bytes] = {}  # the small rows (meta, panels) as last saved, to compare
        self._opened = 0
        self._incidents: dict[str, _Incident] = _Tracked(self._dirty, _incident_row)
        self._timers: dict[tuple[str, str], int] = _Tracked(self._dirty, _timer_row)
        self._mark = self._wall_utc()
        self._mark_t = self._t  # mono ms when the mark was last moved
        if state is not None:
            self._restore(state)
        for name, panel in self._panels.items():  # a panel new in the config (or no state): start supervising
            supervised = panel.cfg.test_interval_s is not None
            if not supervised:
                self._timers.pop(("test", name), None)
            elif ("test", name) not in self._timers and f"t:{name}" not in self._incidents:
                self._timers[("test", name)] = self._t + self._test_ms(panel)
        self._next_transition = next_after(self._schedules, self._tz, self._mark)

    # ------------------------------------------------------------ public API

    def on_device_event(self, ev: DeviceEvent) -> list[Draft]:
        """Handle one device event (and any timer already due). Unknown points are ignored."""
        out: list[Draft] = []
        now = self._now()
        self._run(now, out)
        if isinstance(ev, PointChanged):
            self._on_point(ev, now, out)
        elif isinstance(ev, Availability):
            self._on_availability(ev, now, out)
        elif isinstance(ev, PanelReport):
            self._on_report(ev, now, out)
        elif isinstance(ev, Unreadable):
            self._on_unreadable(ev, now, out)
        elif isinstance(ev, DeviceCheck):
            self._on_check(ev, now, out)
        self._run(now, out)
        return out

    def command(self, kind: str, args: Mapping[str, Any], by: str) -> tuple[list[Draft], CommandOutcome]:
        """Carry out an alarm command. Kinds and args:

        * ``arm`` ``{group: name | "*"}`` or ``{groups: [names]}``, ``mode`` "away" (default) or "stay",
          ``force`` (arm although perimeter zones are active; they alarm only when they trip anew)
        * ``disarm`` ``{group | groups}``
        * ``bypass`` / ``unbypass`` ``{zone}`` (a bypass lasts until unbypassed, across arm/disarm)
        * ``ack`` ``{incident}``: no more ``*_repeat`` events for it (the count still grows)
        * ``clear`` ``{incident}``: close it now (closing event with ``how`` "cleared" and ``by``)

        Bad arguments give ``ok=False`` with a reason, never an exception.
        """
        out: list[Draft] = []
        now = self._now()
        self._run(now, out)
        try:
            if not isinstance(args, Mapping):
                raise _BadArgs("args must be a mapping")
            outcome = self._command(kind, args, str(by), now, out)
        except _BadArgs as e:
            outcome = CommandOutcome(False, str(e))
        self._run(now, out)
        return out, outcome

    def tick(self) -> list[Draft]:
        """Run every timer that is due (delays, debounce, repeats, test supervision) and the schedules."""
        out: list[Draft] = []
        self._run(self._now(), out)
        return out

    def next_deadline(self) -> float | None:
        """Monotonic time (seconds) at which :meth:`tick` has work, or None when nothing is pending."""
        best = min(self._timers.values(), default=None)
        if self._schedules:
            now = self._now()
            step = _SCHEDULE_POLL_MS
            if self._next_transition is not None:
                ahead = (self._next_transition - self._wall_utc()).total_seconds() * 1000
                step = min(max(math.ceil(ahead), 0), _SCHEDULE_POLL_MS)
            best = now + step if best is None else min(best, now + step)
        return None if best is None else best / 1000

    def snapshot(self) -> dict[str, Any]:
        """The whole state as plain JSON values; timers as remaining time. Store it with the drafts."""
        now = self._now()
        st = _SState(
            v=STATE_VERSION,
            groups={n: _SGroup(g.state, g.mode, g.by, g.source, list(g.entry_zones)) for n, g in self._groups.items()},
            bypassed=sorted(self._bypassed),
            channels={
                k: _SChannel(c.raw, None if c.inactive_since is None else now - c.inactive_since)
                for k, c in self._channels.items()
                if c.raw or c.inactive_since is not None
            },
            incidents=[_aged(msgspec.to_builtins(i), now) for i in self._incidents.values()],
            panels={
                n: _SPanel(p.last_test, dict(p.house) if p.house else None)
                for n, p in self._panels.items()
                if p.last_test is not None or p.house is not None
            },
            timers=sorted((kind, key, at - now) for (kind, key), at in self._timers.items()),
            schedule_mark=self._mark.isoformat(),
            schedule_mark_age_ms=now - self._mark_t,
        )
        out: dict[str, Any] = msgspec.to_builtins(st)
        out["timers"] = [list(t) for t in out["timers"]]  # JSON has no tuples: same shape after a round trip
        return out

    def delta(self) -> dict[str, Any]:
        """The rows changed since the last :meth:`delta` or :meth:`full_rows` (None: delete the row), and the
        ``clock`` row. Store them with the drafts; their size follows the change, not the open incidents."""
        out: dict[str, Any] = {}
        for row in self._dirty:
            out[row.name] = self._row(row)
        self._dirty.clear()
        for name, value in self._small_rows().items():
            enc = _enc.encode(value)
            if self._saved.get(name) != enc:
                self._saved[name] = enc
                out[name] = value
        out["clock"] = self._now()
        return out

    def full_rows(self) -> dict[str, Any]:
        """Every row (to replace whatever was saved before, e.g. after a restart)."""
        self._dirty.clear()
        rows = self._small_rows()
        self._saved = {row: _enc.encode(v) for row, v in rows.items()}
        for key, ch in self._channels.items():
            if ch.raw or ch.inactive_since is not None:
                rows[f"c/{key}"] = self._row(_Row("c", key))
        for key in self._incidents:
            rows[f"i/{key}"] = self._row(_incident_row(key))
        for timer, due in self._timers.items():
            rows[_timer_row(timer).name] = due
        rows["clock"] = self._now()
        return rows

    def _row(self, row: _Row) -> Any:
        if row.kind == "t":
            return self._timers.get((row.timer, row.key))
        if row.kind == "i":
            i = self._incidents.get(row.key)
            return None if i is None else msgspec.to_builtins(i)
        ch = self._channels.get(row.key)
        if ch is None or not (ch.raw or ch.inactive_since is not None):
            return None
        return {"raw": ch.raw, "inactive_since": ch.inactive_since}

    def _small_rows(self) -> dict[str, Any]:
        rows: dict[str, Any] = {
            "meta": {
                "v": STATE_VERSION,
                "groups": {
                    n: {
                        "state": g.state,
                        "mode": g.mode,
                        "by": g.by,
                        "source": g.source,
                        "entry_zones": list(g.entry_zones),
                    }
                    for n, g in self._groups.items()
                },
                "bypassed": sorted(self._bypassed),
                "schedule_mark": self._mark.isoformat(),
                "schedule_mark_t": self._mark_t,
            }
        }
        for n, p in self._panels.items():
            if p.last_test is not None or p.house is not None:
                rows[f"p/{n}"] = {"last_test": p.last_test, "house": dict(p.house) if p.house else None}
        return rows

    def groups_said(self, why: str) -> list[Draft]:
        """Every group's state as an event (``group.disarmed`` for the disarmed ones, by "gateway", source "start",
        ``reason`` why): for an engine that started without its saved state (a first start, a store replaced, a
        state it could not read), so that the board does not keep showing armed what is not."""
        return [
            self._group_draft("group.disarmed", g, by="gateway", source="start", reason=why, cancelled_entry=False)
            for g in self._groups.values()
            if g.state == "disarmed"
        ]

    def group_states(self) -> dict[str, dict[str, str]]:
        """``{group: {"state": "disarmed"|"exit"|"armed", "mode": "away"|"stay"}}``."""
        return {n: {"state": g.state, "mode": g.mode} for n, g in self._groups.items()}

    def open_incidents(self) -> list[dict[str, Any]]:
        """The incidents not yet closed, oldest first: id, type (of the opening), priority, count, acked, data."""
        return [
            {
                "incident": i.id,
                "type": INCIDENT_TYPES[i.family][0],
                "priority": i.priority,
                "count": i.count,
                "acked": i.acked,
                "device": i.device,
                "data": dict(i.data),
            }
            for i in self._incidents.values()
        ]

    @property
    def bypassed(self) -> frozenset[str]:
        return frozenset(self._bypassed)

    # ------------------------------------------------------------ clock and timers

    def _now(self) -> int:
        t = round(self._mono() * 1000)
        if t > self._t:
            self._t = t
        return self._t

    def _wall_utc(self) -> datetime:
        w = self._wall()
        return w.replace(tzinfo=UTC) if w.tzinfo is None else w.astimezone(UTC)

    def _run(self, now: int, out: list[Draft]) -> None:
        self._run_timers(now, out)
        if self._schedules:
            self._run_schedules(now, out)
            self._run_timers(now, out)

    def _run_timers(self, now: int, out: list[Draft]) -> None:
        while True:
            best: tuple[int, int, str, str] | None = None
            for (kind, key), at in self._timers.items():
                if at <= now:
                    cand = (at, _TIMER_RANK[kind], key, kind)
                    if best is None or cand < best:
                        best = cand
            if best is None:
                return
            at, _, key, kind = best
            del self._timers[(kind, key)]
            self._fire(kind, key, at, out)

    def _fire(self, kind: str, key: str, t: int, out: list[Draft]) -> None:
        """A timer ran out; ``t`` is when it was due, so lateness of the caller shifts nothing."""
        if kind == "debounce":
            ch = self._channels.get(key)
            if ch is not None and ch.raw:
                self._activated(ch, t, out)
        elif kind == "entry":
            g = self._groups.get(key)
            if g is not None:
                keys, g.entry_zones = g.entry_zones, []
                for k in keys:
                    ch = self._channels.get(k)
                    if ch is not None:
                        self._raise_zone(ch, t, out, "entry_delay")
        elif kind == "exit":
            g = self._groups.get(key)
            if g is not None and g.state == "exit":
                g.state = "armed"
                out.append(self._group_draft("group.armed", g, by=g.by, source=g.source, not_ready=[]))
                self._check_open_at_arm(g, t, out)
        elif kind == "restore":
            self._close(key, out, "restored")
        elif kind == "repeat":
            inc = self._incidents.get(key)
            if inc is not None and not inc.acked and inc.count > inc.sent:
                self._emit_repeat(inc, t, out)
        elif kind == "test":
            self._test_missed(key, t, out)

    def _run_schedules(self, now: int, out: list[Draft]) -> None:
        w = self._wall_utc()
        if w <= self._mark:
            if self._mark - w > _BACKSTEP_RESET:
                # The clock was wrong before. The jump happened at the earliest just after the last look,
                # so transitions since then (by the monotonic clock) are still applied.
                self.stats["clock_backstep_reset"] += 1
                self._mark = w - timedelta(milliseconds=now - self._mark_t)
                self._mark_t = now
                self._next_transition = next_after(self._schedules, self._tz, self._mark)
                self._run_schedules(now, out)
            return
        self._mark_t = now
        if self._next_transition is not None and w < self._next_transition:
            self._mark = w
            return
        fired = schedules_due(self._schedules, self._tz, self._mark, w)
        self._mark = w
        self._next_transition = next_after(self._schedules, self._tz, w)
        for tr in fired:
            source = f"schedule:{tr.schedule}"
            if tr.action == "arm":
                if not self._arm([tr.group], "away", True, "schedule", source, now, out).ok:
                    self.stats["schedule_skipped"] += 1  # armed "stay" by hand: left as it is
            else:
                self._disarm([tr.group], "schedule", source, out)

    # ------------------------------------------------------------ zones

    def _add(self, ch: _Channel) -> None:
        self._channels[ch.key] = ch
        self._by_point[(ch.zone.device, ch.point)] = ch

    def _place(self, p: Any, zone: str | None = None) -> wire.Place:
        if p is None:
            return wire.Place(site=self._cfg.site, zone=zone)
        return wire.Place(site=self._cfg.site, building=p.building, unit=p.unit, house=p.house, zone=zone)

    def _on_point(self, ev: PointChanged, now: int, out: list[Draft]) -> None:
        ch = self._by_point.get((ev.device, ev.point))
        if ch is None:
            kind = self._unmapped.get((ev.device, ev.point))
            if kind is not None:
                self._on_unmapped(ev, kind, now, out)
            return
        active = is_active(ev.value) != ch.zone.invert
        if active == ch.raw:
            return
        ch.raw = active
        self._dirty.add(_Row("c", ch.key))
        if active:
            ch.inactive_since = None
            self._timers.pop(("restore", ch.key), None)
            self._timers[("debounce", ch.key)] = now + ch.zone.debounce_ms
        else:
            ch.inactive_since = now
            self._timers.pop(("debounce", ch.key), None)
            if ch.key in self._incidents:
                self._timers[("restore", ch.key)] = now + ch.zone.restore_ms

    def _activated(self, ch: _Channel, t: int, out: list[Draft]) -> None:
        """The channel has been active for its debounce time: decide whether it raises anything."""
        z = ch.zone
        bypassed = z.name in self._bypassed
        if ch.family != "alarm":  # tamper and fault points (and zones of those types, which are 24-hour): always
            self._raise_zone(ch, t, out, "24h")
            return
        if z.type in ZONE_24H:  # never silenced by a bypass (refused for these; one from an older state)
            self._raise_zone(ch, t, out, "24h")
            return
        if bypassed:
            return
        g = self._groups[z.group]
        if g.state == "disarmed":
            return
        if ch.role == "touch" or z.type == "perimeter":
            self._raise_zone(ch, t, out, "instant")
            return
        if g.state == "exit" or (z.type == "interior" and g.mode == "stay"):
            return
        if ("entry", g.name) in self._timers:
            g.entry_zones.append(ch.key)
        elif z.type == "entry":
            self._start_entry(g, [ch.key], t, out)
        else:
            self._raise_zone(ch, t, out, "instant")

    def _start_entry(self, g: _Group, keys: list[str], t: int, out: list[Draft]) -> None:
        first = self._channels[keys[0]]
        z = first.zone
        g.entry_zones = list(keys)
        self._timers[("entry", g.name)] = t + z.entry_delay_s * 1000
        out.append(
            Draft(
                type="zone.entry_delay",
                device=z.device,
                place=self._places[z.name],
                point=first.point,
                data={
                    "group": g.name,
                    "zone": z.name,
                    "label": z.label,
                    "delay_s": z.entry_delay_s,
                    "zones": [self._channels[k].zone.name for k in keys],
                },
            )
        )

    def _check_open_at_arm(self, g: _Group, t: int, out: list[Draft]) -> None:
        """Entry (and, away, interior) zones still open when the group becomes armed start the entry delay."""
        if ("entry", g.name) in self._timers:
            return
        order = {"entry": 0, "interior": 1}
        keys = []
        for z in sorted(g.zones, key=lambda z: order.get(z.type, 2)):
            if z.type == "entry" or (z.type == "interior" and g.mode == "away"):
                ch = self._channels[f"z:{z.name}:main"]
                if ch.raw and ("debounce", ch.key) not in self._timers and z.name not in self._bypassed:
                    keys.append(ch.key)
        if keys:
            self._start_entry(g, keys, t, out)

    def _raise_zone(self, ch: _Channel, t: int, out: list[Draft], cause: str) -> None:
        z = ch.zone

        def make() -> _Incident:
            data = {
                "zone": z.name,
                "zone_type": z.type,
                "kind": ch.kind,
                "cause": cause,
                "group": z.group,
                "label": z.label,
            }
            return _Incident(
                ch.key, self._new_id(), f"zone.{ch.family}", ch.priority, z.device, self._places[z.name], ch.point, data
            )

        if self._raise(ch.key, t, out, make) and not ch.raw:
            # Opened after the point went quiet (an entry delay that ran out): restore in due course.
            since = t if ch.inactive_since is None else ch.inactive_since
            self._timers[("restore", ch.key)] = max(t, since + z.restore_ms)

    def _not_ready(self, g: _Group) -> list[str]:
        """Perimeter zones (and fence touch) of the group active right now, not bypassed."""
        names = []
        for z in g.zones:
            if z.name in self._bypassed:
                continue
            keys = [f"z:{z.name}:touch"] + ([f"z:{z.name}:main"] if z.type == "perimeter" else [])
            if any(k in self._channels and self._channels[k].raw for k in keys):
                names.append(z.name)
        return names

    # ------------------------------------------------------------ incidents

    def _raise(self, key: str, t: int, out: list[Draft], make: Callable[[], _Incident], *, count: bool = True) -> bool:
        """Open the incident ``key`` (True) or count a repeat on the open one (False)."""
        inc = self._incidents.get(key)
        if inc is None:
            inc = make()
            inc.last_emit = t
            self._opened += 1
            inc.n = self._opened
            self._incidents[key] = inc
            out.append(inc.draft(0))
            return True
        if count:
            inc.count += 1
            self._dirty.add(_incident_row(key))
            if not inc.acked and ("repeat", key) not in self._timers:
                if t - inc.last_emit >= self._repeat_ms:
                    self._emit_repeat(inc, t, out)
                else:
                    self._timers[("repeat", key)] = inc.last_emit + self._repeat_ms
            elif inc.acked and t - inc.last_emit >= ACKED_REPORT_MS:
                self._emit_repeat(inc, t, out)  # acknowledged long ago, and the alarm comes again: it is said
        return False

    def _emit_repeat(self, inc: _Incident, t: int, out: list[Draft]) -> None:
        out.append(inc.draft(1))
        inc.sent = inc.count
        inc.last_emit = t
        self._dirty.add(_incident_row(inc.key))

    def _close(self, key: str, out: list[Draft], how: str, **extra: Any) -> bool:
        inc = self._incidents.pop(key, None)
        if inc is None:
            return False
        self._timers.pop(("repeat", key), None)
        self._timers.pop(("restore", key), None)
        out.append(inc.draft(2, how=how, **extra))
        return True

    def _find_incident(self, args: Mapping[str, Any]) -> _Incident:
        ident = args.get("incident")
        if not isinstance(ident, str):
            raise _BadArgs("give 'incident' (the id in data.incident)")
        for inc in self._incidents.values():
            if inc.id == ident:
                return inc
        raise _BadArgs(f"no open incident {ident[:40]!r}")

    # ------------------------------------------------------------ groups and commands

    def _group_draft(self, type_: str, g: _Group, **data: Any) -> Draft:
        return Draft(
            type=type_,
            device="gateway",
            place=wire.Place(site=self._cfg.site),
            data={"group": g.name, "label": g.label, "mode": g.mode, **data},
        )

    def _group_names(self, args: Mapping[str, Any]) -> list[str]:
        one, many = args.get("group"), args.get("groups")
        if one == "*" and many is None:
            return list(self._groups)
        if isinstance(one, str) and many is None:
            names = [one]
        elif one is None and isinstance(many, list) and many and all(isinstance(n, str) for n in many):
            names = list(dict.fromkeys(many))
        else:
            raise _BadArgs("give 'group' (a name, or \"*\" for all) or 'groups' (a list of names)")
        unknown = [n for n in names if n not in self._groups]
        if unknown:
            raise _BadArgs(f"no such group: {', '.join(n[:64] for n in unknown)}")
        return names

    def _command(self, kind: str, args: Mapping[str, Any], by: str, now: int, out: list[Draft]) -> CommandOutcome:
        if kind == "arm":
            names = self._group_names(args)
            mode = args.get("mode", "away")
            force = args.get("force", False)
            if mode not in ("away", "stay"):
                raise _BadArgs("mode must be 'away' or 'stay'")
            if not isinstance(force, bool):
                raise _BadArgs("force must be true or false")
            return self._arm(names, mode, force, by, "command", now, out)
        if kind == "disarm":
            return self._disarm(self._group_names(args), by, "command", out)
        if kind in ("bypass", "unbypass"):
            zone = args.get("zone")
            if not isinstance(zone, str) or zone not in self._zones:
                raise _BadArgs(f"no such zone: {str(zone)[:64]!r}")
            on = kind == "bypass"
            if on and self._zones[zone].type in ZONE_24H:
                return CommandOutcome(
                    False,
                    f"zone {zone} is a 24-hour {self._zones[zone].type} zone and cannot be "
                    "bypassed; acknowledge its incident to stop the repeats",
                )
            if (zone in self._bypassed) == on:
                return CommandOutcome(True, f"zone {zone} already {'bypassed' if on else 'not bypassed'}")
            (self._bypassed.add if on else self._bypassed.discard)(zone)
            z = self._zones[zone]
            out.append(
                Draft(
                    type="zone.bypassed" if on else "zone.unbypassed",
                    device=z.device,
                    place=self._places[zone],
                    point=z.point,
                    data={"zone": zone, "label": z.label, "group": z.group, "by": by},
                )
            )
            return CommandOutcome(True, f"zone {zone} {'bypassed' if on else 'unbypassed'}")
        if kind == "ack":
            inc = self._find_incident(args)
            inc.acked = True
            self._dirty.add(_incident_row(inc.key))
            self._timers.pop(("repeat", inc.key), None)
            return CommandOutcome(True, "acknowledged", {"incident": inc.id})
        if kind == "clear":
            inc = self._find_incident(args)
            self._close(inc.key, out, "cleared", by=by)
            panel = self._panels.get(inc.device) if inc.family == "panel.test_missed" else None
            if panel is not None and panel.cfg.test_interval_s is not None:  # supervise it afresh
                self._timers[("test", panel.cfg.name)] = now + self._test_ms(panel)
            return CommandOutcome(True, "cleared", {"incident": inc.id})
        return CommandOutcome(False, f"unknown alarm command {kind[:40]!r} (known: {', '.join(COMMANDS)})")

    def _arm(
        self,
        names: list[str],
        mode: Literal["away", "stay"],
        force: bool,
        by: str,
        source: str,
        t: int,
        out: list[Draft],
    ) -> CommandOutcome:
        groups = [self._groups[n] for n in names]
        for g in groups:
            if g.state != "disarmed" and g.mode != mode:
                return CommandOutcome(False, f"group {g.name} is armed {g.mode}; disarm it first")
        not_ready = {g.name: self._not_ready(g) for g in groups if g.state == "disarmed"}
        if not force and any(not_ready.values()):
            detail = "; ".join(f"{n}: {', '.join(z)}" for n, z in not_ready.items() if z)
            return CommandOutcome(False, f"not ready (zones active): {detail}", {"not_ready": not_ready})
        armed = []
        for g in groups:
            if g.state != "disarmed":
                continue
            g.mode, g.by, g.source = mode, by, source
            armed.append(g.name)
            if g.exit_ms > 0:
                g.state = "exit"
                self._timers[("exit", g.name)] = t + g.exit_ms
                out.append(
                    self._group_draft(
                        "group.arming",
                        g,
                        by=by,
                        source=source,
                        exit_delay_s=g.exit_ms // 1000,
                        not_ready=not_ready[g.name],
                    )
                )
            else:
                g.state = "armed"
                out.append(self._group_draft("group.armed", g, by=by, source=source, not_ready=not_ready[g.name]))
                self._check_open_at_arm(g, t, out)
        return CommandOutcome(True, "armed" if armed else "already armed", {"groups": armed})

    def _disarm(self, names: list[str], by: str, source: str, out: list[Draft]) -> CommandOutcome:
        done = []
        for name in names:
            g = self._groups[name]
            if g.state == "disarmed":
                continue
            cancelled = []
            if self._timers.pop(("entry", name), None) is not None:
                cancelled = list(dict.fromkeys(self._channels[k].zone.name for k in g.entry_zones))
            self._timers.pop(("exit", name), None)
            g.entry_zones = []
            g.state, g.by, g.source = "disarmed", by, source
            out.append(self._group_draft("group.disarmed", g, by=by, source=source, cancelled_entry=cancelled))
            done.append(name)
        return CommandOutcome(True, "disarmed" if done else "already disarmed", {"groups": done})

    # ------------------------------------------------------------ devices and panels

    def _on_availability(self, ev: Availability, now: int, out: list[Draft]) -> None:
        key = f"d:{ev.device}"
        if ev.state == "offline":

            def make() -> _Incident:
                data = {"reason": ev.reason[:200]}
                return _Incident(
                    key,
                    self._new_id(),
                    "device.offline",
                    int(_P.FAULT),
                    ev.device,
                    wire.Place(site=self._cfg.site),
                    None,
                    data,
                )

            self._raise(key, now, out, make)
        elif ev.state == "online":
            self._close(key, out, "restored")

    def _test_ms(self, panel: _Panel) -> int:
        return ((panel.cfg.test_interval_s or 0) + panel.cfg.test_grace_s) * 1000

    def _test_missed(self, name: str, t: int, out: list[Draft]) -> None:
        panel = self._panels.get(name)
        if panel is None:
            return
        p = panel.cfg

        def make() -> _Incident:
            data = {
                "panel": p.name,
                "account": p.account.upper(),
                "label": p.label,
                "interval_s": p.test_interval_s,
                "grace_s": p.test_grace_s,
                "last_test": panel.last_test,
            }
            return _Incident(
                f"t:{name}", self._new_id(), "panel.test_missed", int(_P.FAULT), p.name, panel.place, None, data
            )

        self._raise(f"t:{name}", t, out, make, count=False)

    def _on_report(self, ev: PanelReport, now: int, out: list[Draft]) -> None:
        account = str(ev.account).upper()[:16]
        if (
            not isinstance(ev.code, int)
            or not 0 <= ev.code <= 999
            or ev.qualifier not in ("new", "restore", "status")
            or not isinstance(ev.zone_or_user, int)
            or not isinstance(ev.partition, int)
        ):
            self.stats["bad_report"] += 1
            return
        panel = self._by_account.get(account)
        if panel is None:
            # Not a filter: the report is handled like a known panel's below, and the account is a fault to fix.
            self.stats["unknown_account"] += 1
            self._unknown_account(account, ev, now, out)
        info = describe(ev.code)
        if not info.known:
            self.stats["unknown_code"] += 1
        # An unknown account's incidents are keyed by "?ACCOUNT" (no panel name has a "?") at the site's place.
        name = panel.cfg.name if panel is not None else f"?{account}"
        place = panel.place if panel is not None else wire.Place(site=self._cfg.site)
        data: dict[str, Any] = {
            "panel": panel.cfg.name if panel is not None else None,
            "account": account,
            "label": panel.cfg.label if panel is not None else "",
            "code": ev.code,
            "qualifier": ev.qualifier,
            "partition": ev.partition,
            "user" if info.user else "zone": ev.zone_or_user,
            "kind": info.kind,
            "name_en": info.en,
            "name_zh": info.zh,
        }
        if panel is None:
            data["unknown_account"] = True
        if info.family in ("alarm", "tamper", "trouble"):
            key = f"c:{name}:{ev.code}:{ev.partition}:{ev.zone_or_user}"
            if ev.qualifier == "restore":
                if not self._close(key, out, "restored"):
                    self.stats["orphan_restore"] += 1
                return
            if ev.repeat and key in self._incidents:
                self.stats["repeat_folded"] += 1  # most likely the sender's resend: not a new activation
                return

            def make() -> _Incident:
                fam = f"panel.{info.family}"
                return _Incident(key, self._new_id(), fam, info.priority, ev.device, place, None, data)

            # "status" (condition still present) opens a missing incident but is not a new activation.
            self._raise(key, now, out, make, count=ev.qualifier == "new")
        elif ev.repeat:
            self.stats["repeat_folded"] += 1
        elif panel is None:  # arming, tests, other events of an account no panel has: in the log, with the account
            out.append(Draft(type="panel.event", device=ev.device, place=place, priority=info.priority, data=data))
        elif info.family == "openclose" and ev.qualifier != "status":
            armed = ev.qualifier == "restore"  # Contact ID: closing = arm, opening = disarm
            state = {"state": "armed" if armed else "disarmed", "mode": info.kind if armed else None}
            panel.house = {**state, "code": ev.code, "user": ev.zone_or_user}
            out.append(
                Draft(
                    type="house.armed" if armed else "house.disarmed",
                    device=ev.device,
                    place=panel.place,
                    data={**data, "mode": state["mode"]} if armed else data,
                )
            )
        elif info.family == "test":
            panel.last_test = self._wall_utc().isoformat()
            if panel.cfg.test_interval_s is not None:
                self._timers[("test", name)] = now + self._test_ms(panel)
            self._close(f"t:{name}", out, "restored")
        else:
            out.append(
                Draft(type="panel.event", device=ev.device, place=panel.place, priority=info.priority, data=data)
            )

    def _unknown_account(self, account: str, ev: PanelReport, now: int, out: list[Draft]) -> None:
        """Count the report on the account's ``panel.unknown_account`` fault incident (closed after a quiet hour,
        so the next report rings again)."""
        known_faults = sum(1 for i in self._incidents.values() if _unknown_account(i) not in (None, "*"))
        key = f"u:{account}"
        if key not in self._incidents and known_faults >= MAX_UNKNOWN_ACCOUNTS:
            key = "u:*"  # a flood of accounts: one more incident for the rest, still counting every report
        place = wire.Place(site=self._cfg.site)

        def make() -> _Incident:
            data = {
                "account": account if key != "u:*" else "*",
                "unknown_account": True,
                "line": ev.device,
                "code": ev.code,
                "qualifier": ev.qualifier,
            }
            return _Incident(key, self._new_id(), "panel.unknown_account", int(_P.FAULT), ev.device, place, None, data)

        if not ev.repeat or key not in self._incidents:
            self._raise(key, now, out, make)
        self._timers[("restore", key)] = now + QUIET_CLOSE_MS["panel.unknown_account"]

    def _on_unreadable(self, ev: Unreadable, now: int, out: list[Draft]) -> None:
        """A message a line could not use: one fault incident per line, counting them, closed after a quiet spell."""
        self.stats["unreadable"] += 1
        key = f"r:{ev.device}"

        def make() -> _Incident:
            data = {"line": ev.device, "reason": str(ev.reason)[:20], "sample": str(ev.sample)[:64]}
            return _Incident(
                key,
                self._new_id(),
                "line.unreadable",
                int(_P.FAULT),
                ev.device,
                wire.Place(site=self._cfg.site),
                None,
                data,
            )

        if not self._raise(key, now, out, make):
            inc = self._incidents[key]
            inc.data["reason"], inc.data["sample"] = str(ev.reason)[:20], str(ev.sample)[:64]
            self._dirty.add(_incident_row(key))
        self._timers[("restore", key)] = now + QUIET_CLOSE_MS["line.unreadable"]

    def _on_unmapped(self, ev: PointChanged, kind: str, now: int, out: list[Draft]) -> None:
        """An alarm-class point no zone uses: an incident while it is active."""
        key = f"x:{ev.device}:{ev.point}"
        if not is_active(ev.value):
            self._close(key, out, "restored")
            return

        def make() -> _Incident:
            data = {"point": ev.point, "kind": kind}
            return _Incident(
                key,
                self._new_id(),
                "device.unmapped_input",
                int(UNMAPPED_KINDS[kind]),
                ev.device,
                wire.Place(site=self._cfg.site),
                ev.point,
                data,
            )

        self._raise(key, now, out, make)

    def _on_check(self, ev: DeviceCheck, now: int, out: list[Draft]) -> None:
        """A device's settings against its profile: ``device.misconfigured`` while they differ."""
        key = f"m:{ev.device}"
        problems = [str(p)[:200] for p in ev.problems[:16]]
        if not problems:
            self._close(key, out, "restored")
            return

        def make() -> _Incident:
            return _Incident(
                key,
                self._new_id(),
                "device.misconfigured",
                int(_P.FAULT),
                ev.device,
                wire.Place(site=self._cfg.site),
                None,
                {"problems": problems},
            )

        if not self._raise(key, now, out, make):
            self._incidents[key].data["problems"] = problems
            self._dirty.add(_incident_row(key))

    # ------------------------------------------------------------ restore

    def _restore(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise AlarmStateError("alarm state must be a mapping")
        if state.get("v") != STATE_VERSION:
            raise AlarmStateError(f"alarm state version {state.get('v')!r}, this engine reads {STATE_VERSION}")
        try:
            st = msgspec.convert(state, _SState)
        except msgspec.ValidationError as e:
            raise AlarmStateError(f"bad alarm state: {e}") from None
        now = self._t
        dropped = 0
        for name, sg in st.groups.items():
            g = self._groups.get(name)
            if g is None:
                dropped += 1
                continue
            g.state, g.mode, g.by, g.source = sg.state, sg.mode, sg.by, sg.source
            g.entry_zones = [k for k in sg.entry_zones if k in self._channels]
        self._bypassed = {z for z in st.bypassed if z in self._zones}
        dropped += len(st.bypassed) - len(self._bypassed)
        for key, sc in st.channels.items():
            ch = self._channels.get(key)
            if ch is None:
                dropped += 1
                continue
            ch.raw = sc.raw
            ch.inactive_since = None if sc.inactive_ms is None else now - sc.inactive_ms
        for saved in st.incidents:
            try:
                inc = msgspec.convert(_unaged(saved, now, len(self._incidents) + 1), _Incident)
            except msgspec.ValidationError as e:
                raise AlarmStateError(f"bad alarm state: {e}") from None
            if inc.family not in INCIDENT_TYPES:
                dropped += 1
                continue
            self._incidents[inc.key] = inc
        for name, sp in st.panels.items():
            panel = self._panels.get(name)
            if panel is None:
                dropped += 1
                continue
            panel.last_test, panel.house = sp.last_test, sp.house
        owners: dict[str, Mapping[str, Any]] = {
            "debounce": self._channels,
            "entry": self._groups,
            "exit": self._groups,
            "restore": self._incidents,
            "repeat": self._incidents,
            "test": self._panels,
        }
        for kind, key, left in st.timers:
            if kind in owners and key in owners[kind]:
                self._timers[(kind, key)] = now + left
            else:
                dropped += 1
        for g in self._groups.values():  # keep the groups consistent with their timers
            if g.state == "exit" and ("exit", g.name) not in self._timers:
                self._timers[("exit", g.name)] = now
            if g.state != "exit":
                self._timers.pop(("exit", g.name), None)
            if g.state != "armed":
                self._timers.pop(("entry", g.name), None)
            if ("entry", g.name) not in self._timers:
                g.entry_zones = []
        if st.schedule_mark is not None:
            try:
                mark = datetime.fromisoformat(st.schedule_mark)
            except ValueError:
                raise AlarmStateError(f"bad schedule_mark {st.schedule_mark[:40]!r}") from None
            self._mark = mark.replace(tzinfo=UTC) if mark.tzinfo is None else mark.astimezone(UTC)
            self._mark_t = now - st.schedule_mark_age_ms
        for key in [k for k, i in self._incidents.items() if _unknown_account(i) in self._by_account]:
            self._timers[("restore", key)] = now  # the account was added to the config meanwhile: close it
        self._opened = len(self._incidents)
        if dropped:
            self.stats["state_dropped"] += dropped
