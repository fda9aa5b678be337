"""Doors: the access flow from a scanned code to the lock's unlock pulse, each door's state from its
controller's points, door alarms, and the door commands (remote unlock, revocation-list sync).

Two layers, as in the alarm engine: :class:`DoorEngine` is synchronous and does no I/O of its own
(its one call out is :meth:`gateway.access.AccessDecider.decide`, which is fast and local); it takes
device events, scans and timer ticks and gives back event drafts and the writes to make.
:class:`DoorService` runs it: it makes the writes (the unlock goes out before the event is even
queued for the store), submits drafts to the store with the engine's snapshot, and fires its timers.
Nothing here touches MQTT: doors keep working with the portal and the broker away.

Access flow: a :class:`~devices.events.Scan` from a reader → the reader's door → ``decide`` → if
granted, a :class:`~devices.events.WritePoint` pulsing the door's relay for ``unlock_ms`` (the bus puts
it ahead of every poll and reads the relay back at once) → ``access.granted`` once the read-back
confirms the relay moved; else ``access.denied`` (TAMPER when the person is blocked) and, when the
refusal completes a burst at that door, ``door.scan_burst``. A code equal to the reader's previous one
within ``repeat_ignore_ms`` is ignored (scan engines resend a code held in front of them). If the write
fails or is not confirmed, ``door.unlock_failed`` (FAULT, with the pass and a ``reason``) follows instead
of ``access.granted``, and a relay that was answered but did not move is a ``device.relay_fault`` incident
on its controller until a later write to it is confirmed. A door is never reported unlocked on an echo.

Door state (``door.state``, on every change): ``offline`` while the controller is offline; with the
door open: ``forced`` while a forced-open incident is open, ``held`` while a held-open one is,
else ``open``; with the door shut: ``unlocked`` during a successful unlock pulse or while the lock
feedback (without feedback: the relay point) reads released, else ``closed``. Nothing is reported
until the first reading of the contact.

Door alarms, each a paired incident carrying ``data.incident`` and ``data.count`` like the alarm
engine's, closed with ``how: "restored"``:

* ``door.forced`` / ``door.forced_restore`` (INTRUSION): the contact opened with no grant, no remote
  unlock, no exit-button press within ``unlock_ms + open_grace_ms`` and the lock not released;
  restored when the door shuts.
* ``door.held`` / ``door.held_restore`` (TAMPER): open longer than ``held_open_s`` (not raised on top
  of a forced incident); restored when the door shuts.
* ``door.tamper`` / ``door.tamper_restore`` (TAMPER): the controller's tamper point.
* ``reader.offline`` / ``reader.online`` (FAULT): from the reader driver's supervision.
* ``device.relay_fault`` / ``device.relay_fault_restore`` (FAULT): a door's relay was commanded, the
  controller answered, and the read-back shows it did not move (a Waveshare board in linkage mode);
  restored by the next confirmed write to it.

A contact already open at the first reading (the gateway started) is not forced. Open incidents
survive a restart in the snapshot and are closed once the first readings show the condition gone.
All timers run on the monotonic clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ulid import ULID

from devices.events import Availability, DeviceEvent, PointChanged, Scan, WritePoint, WriteResult
from devices.modbus import BusDown
from gateway import wire
from gateway.access import AccessDecider, Decision
from gateway.config import DoorConfig, GatewayConfig, ReaderConfig
from gateway.events import Draft
from gateway.wire.passes import PassError

log = logging.getLogger(__name__)

STATE_KEY = "doors"
STATE_VERSION = 1
COMMANDS = ("unlock", "credentials.sync")
#: How often the age of the revocation list is looked at.
STALE_CHECK_S = 60.0
MAX_REASON_CHARS = 500
_P = wire.Priority
_ROLES = ("contact", "exit_button", "lock_feedback", "tamper", "relay")
#: Incident families: (opening type, closing type, priority).
INCIDENTS: dict[str, tuple[str, str, int]] = {
    "forced": ("door.forced", "door.forced_restore", int(_P.INTRUSION)),
    "held": ("door.held", "door.held_restore", int(_P.TAMPER)),
    "tamper": ("door.tamper", "door.tamper_restore", int(_P.TAMPER)),
    "reader": ("reader.offline", "reader.online", int(_P.FAULT)),
    "relay": ("device.relay_fault", "device.relay_fault_restore", int(_P.FAULT)),
    "stale": ("credentials.stale", "credentials.stale_restore", int(_P.FAULT)),
}
STALE_KEY = "stale:revocations"
#: Why an unlock failed (:data:`gateway.wire.UNLOCK_FAILURES`), from the bus's
#: :attr:`devices.events.WriteResult.failure`.
_FAILURE_OF_WRITE = {
    "not_moved": "relay_not_moved",
    "unconfirmed": "unconfirmed",
    "no_answer": "no_answer",
    "link_down": "bus_down",
    "refused": "refused",
    "rejected": "rejected",
    "not_sent": "bus_down",
}
#: An unlock the door's bus could not start within this long (busy, stuck) is not made at all: the person at the door
#: has been told it failed, and it must not open behind them later (:attr:`devices.events.WritePoint.start_within_ms`).
UNLOCK_START_WITHIN_MS = 5000
#: The bus's write failures that prove the door did not open (the read-back shows the relay still; the write was
#: refused, or never sent): the pass's use is given back. After no answer, a link lost under the request, or an answer
#: not confirmed, it may have opened.
_NOT_MADE = frozenset({"not_moved", "not_sent", "refused", "rejected"})
#: How long an unlock under way is waited for before its outcome is reported as unknown (``unconfirmed``). The bus
#: bounds a write it has started by its own timeouts and retries, far below this: it is a backstop for a bus that
#: never answers at all.
UNLOCK_WORD_WITHIN_S = 120.0
DoorStateName = Literal["closed", "open", "unlocked", "forced", "held", "offline"]


def _ulid() -> str:
    return str(ULID())


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to a door command: what ``command.result`` says, and the events that go with it."""

    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)
    drafts: list[Draft] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Unlock:
    """A granted scan's unlock: write ``write`` now, then tell the engine (:meth:`DoorEngine.write_done`),
    which reports ``granted`` (the ``access.granted`` draft) only if the relay is confirmed to have moved."""

    door: str
    reader: str
    write: WritePoint
    granted: Draft | None = None
    decision: Decision | None = None  # the pass's: its use is given back if the door did not open


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """How an unlock write went: ``ok`` only when the relay read back as moved; ``reason`` (one of
    :data:`gateway.wire.UNLOCK_FAILURES`) and ``detail`` say why not."""

    ok: bool
    reason: str = ""
    detail: str = ""
    not_made: bool = False  # the door is known not to have opened (not merely not confirmed)


@dataclass(slots=True)
class _Door:
    cfg: DoorConfig
    place: wire.Place
    online: bool | None = None  # the controller; None until heard of
    contact: bool | None = None  # True: open
    exit: bool = False
    lock: bool | None = None  # True: released
    relay: bool | None = None
    tamper: bool = False
    opened_at: float | None = None
    grant_until: float = -math.inf  # a grant or remote unlock authorises an opening until then
    confirmed_until: float = -math.inf  # the part of that the confirmed unlocks authorise
    pending: dict[str, float] = field(default_factory=dict)  # unlocks under way: token → the window they opened
    exit_until: float = -math.inf  # the exit button likewise
    unlock_until: float = -math.inf  # a successful unlock pulse runs until then
    state: str | None = None  # last reported

    @property
    def name(self) -> str:
        return self.cfg.name

    def window_s(self) -> float:
        return (self.cfg.unlock_ms + self.cfg.open_grace_ms) / 1000


@dataclass(slots=True)
class _Reader:
    cfg: ReaderConfig
    last_text: str = ""
    last_at: float = -math.inf


@dataclass(slots=True)
class _Incident:
    key: str
    id: str
    family: str
    device: str
    place: wire.Place
    point: str | None
    data: dict[str, Any]
    count: int = 1

    def draft(self, closing: bool) -> Draft:
        opening, close, priority = INCIDENTS[self.family]
        data = {**self.data, "incident": self.id, "count": self.count}
        if closing:
            data["how"] = "restored"
        return Draft(
            type=close if closing else opening,
            device=self.device,
            place=self.place,
            point=self.point,
            priority=priority,
            data=data,
        )

    def saved(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "id": self.id,
            "family": self.family,
            "device": self.device,
            "place": {
                k: v
                for k, v in (("building", self.place.building), ("unit", self.place.unit), ("door", self.place.door))
                if v is not None
            },
            "point": self.point,
            "data": self.data,
            "count": self.count,
        }


class DoorEngine:
    """Door state machines and the access flow. Not thread-safe; call it on the event loop.

    ``mono`` is ``time.monotonic``; ``state`` a former :meth:`snapshot` (unusable parts are dropped);
    ``new_id`` makes incident ids.
    """

    def __init__(
        self,
        cfg: GatewayConfig,
        decider: AccessDecider,
        *,
        mono: Callable[[], float] = time.monotonic,
        state: Mapping[str, Any] | None = None,
        new_id: Callable[[], str] = _ulid,
    ) -> None:
        self._site = cfg.site
        self._decider = decider
        self._mono = mono
        self._new_id = new_id
        self._doors: dict[str, _Door] = {}
        self._points: dict[tuple[str, str], list[tuple[_Door, str]]] = {}
        self._devices: dict[str, list[_Door]] = {}
        for d in cfg.doors:
            p = d.place
            place = wire.Place(
                site=cfg.site, building=p.building if p else None, unit=p.unit if p else None, door=d.name
            )
            door = _Door(d, place)
            self._doors[d.name] = door
            self._devices.setdefault(d.device, []).append(door)
            for role in _ROLES:
                point = getattr(d, role)
                if point is not None:
                    self._points.setdefault((d.device, point), []).append((door, role))
        self._readers = {r.name: _Reader(r) for r in cfg.readers}
        self._incidents: dict[str, _Incident] = {}
        self._tokens = itertools.count(1)
        self._burst = (cfg.access.burst_count, cfg.access.burst_window_s)
        self._next_stale_check = mono()
        #: Counted oddities: scans, repeats_ignored, unknown_reader, granted, denied, unlock_failed,
        #: remote_unlocks, state_dropped.
        self.stats: Counter[str] = Counter()
        if state is not None:
            self._restore(state)

    # ------------------------------------------------------------ inputs

    def on_device_event(self, ev: DeviceEvent) -> list[Draft]:
        """A controller's point change or availability (other devices' events are ignored)."""
        out: list[Draft] = []
        now = self._mono()
        if isinstance(ev, PointChanged):
            for door, role in self._points.get((ev.device, ev.point), ()):
                self._on_point(door, role, bool(ev.value) != (role in door.cfg.invert), ev.initial, now, out)
                self._update_state(door, now, out)
        elif isinstance(ev, Availability):
            for door in self._devices.get(ev.device, ()):
                door.online = ev.state == "online"
                self._update_state(door, now, out)
        return out

    def on_reader_event(self, ev: Scan | Availability) -> tuple[list[Draft], Unlock | None]:
        """A scan (→ the decision's events, and the unlock to write at once if granted) or a reader's
        availability (→ ``reader.offline``/``reader.online``)."""
        if isinstance(ev, Availability):
            return self._reader_availability(ev), None
        return self._on_scan(ev)

    def write_done(
        self,
        door_name: str,
        token: str,
        result: WriteOutcome,
        reader: str | None = None,
        granted: Draft | None = None,
        decision: Decision | None = None,
    ) -> list[Draft]:
        """The unlock write for ``door_name`` is confirmed (``result.ok``: ``granted`` is reported now) or it
        failed (``door.unlock_failed`` with the pass's details instead, and a relay fault if it did not move). A pass's
        use (``decision``) is given back when the door is known not to have opened."""
        out: list[Draft] = []
        door = self._doors.get(door_name)
        if door is None:
            return out
        now = self._mono()
        relay_key = f"relay:{door.cfg.device}:{door.cfg.relay}"
        door.pending.pop(token, None)
        if result.ok:
            door.unlock_until = now + door.cfg.unlock_ms / 1000
            door.confirmed_until = max(door.confirmed_until, now + door.window_s())
            door.grant_until = max(door.grant_until, door.confirmed_until)
            if granted is not None:
                out.append(granted)
            self._close_incident(relay_key, out)
        else:
            self.stats["unlock_failed"] += 1
            # This unlock authorises nothing; another person's, confirmed or under way, still does.
            door.grant_until = max([door.confirmed_until, *door.pending.values()])
            if decision is not None and result.not_made:
                self._decider.release(decision)
            log.warning("door %s: unlock failed (%s): %s", door.name, result.reason, result.detail)
            data: dict[str, Any] = {
                "door": door.name,
                "reader": reader,
                "reason": result.reason,
                "detail": result.detail[:300],
                "token": token,
            }
            if granted is not None:  # who was let in on paper: the access log keeps the attempt
                data.update({k: granted.data.get(k) for k in ("pass_id", "kind", "subject", "house")})
            out.append(
                Draft(
                    type="door.unlock_failed",
                    device=door.cfg.device,
                    place=door.place,
                    point=door.cfg.relay,
                    priority=_P.FAULT,
                    data=data,
                )
            )
            if result.reason == "relay_not_moved":
                self._open_incident(
                    relay_key,
                    "relay",
                    door.cfg.device,
                    door.place,
                    door.cfg.relay,
                    {"door": door.name, "relay": door.cfg.relay, "detail": result.detail[:300]},
                    out,
                )
        self._update_state(door, now, out)
        return out

    def tick(self) -> list[Draft]:
        """Timers that are due: held-open, the end of unlock pulses, the revocation list's age."""
        out: list[Draft] = []
        now = self._mono()
        for door in self._doors.values():
            if (
                door.contact
                and door.online is not False
                and door.opened_at is not None
                and now >= door.opened_at + door.cfg.held_open_s
                and f"forced:{door.name}" not in self._incidents
            ):
                self._open_incident(
                    f"held:{door.name}",
                    "held",
                    door.cfg.device,
                    door.place,
                    door.cfg.contact,
                    {"door": door.name, "held_open_s": door.cfg.held_open_s},
                    out,
                )
            self._update_state(door, now, out)
        if now >= self._next_stale_check:
            self._next_stale_check = now + STALE_CHECK_S
            out += self.check_stale()
        return out

    def next_deadline(self) -> float | None:
        """The monotonic time at which :meth:`tick` has work to do."""
        deadlines = [self._next_stale_check]
        now = self._mono()
        for door in self._doors.values():
            if door.unlock_until > now:
                deadlines.append(door.unlock_until)
            if (
                door.contact
                and door.opened_at is not None
                and f"held:{door.name}" not in self._incidents
                and f"forced:{door.name}" not in self._incidents
            ):
                deadlines.append(door.opened_at + door.cfg.held_open_s)
        return min(deadlines)

    def check_stale(self) -> list[Draft]:
        """``credentials.stale`` (FAULT, a paired incident: the console shows it until it is restored) while the
        revocation list is missing or older than ``access.revocation_max_age_s``, when visitor passes are refused;
        ``credentials.stale_restore`` once a fresh list is in force. Only where readers judge passes."""
        out: list[Draft] = []
        version = self._decider.revocation_version
        if self._readers and self._decider.revocations_stale():
            if STALE_KEY not in self._incidents:
                age = self._decider.list_age_s()
                log.warning(
                    "the revocation list is stale (version %d, age %s s): visitor passes are refused",
                    version,
                    "unknown" if age is None else f"{age:.0f}",
                )
                self._open_incident(
                    STALE_KEY,
                    "stale",
                    "gateway",
                    wire.Place(site=self._site),
                    None,
                    {
                        "version": version,
                        "age_s": None if age is None else round(age),
                        "max_age_s": self._decider.revocation_max_age_s,
                    },
                    out,
                )
        elif STALE_KEY in self._incidents:
            log.info("the revocation list is fresh again (version %d)", version)
            self._incidents[STALE_KEY].data["version"] = version
            self._close_incident(STALE_KEY, out)
        return out

    # ------------------------------------------------------------ commands

    def prepare_unlock(self, args: Mapping[str, Any]) -> tuple[str, WritePoint] | str:
        """Check a remote ``unlock {door, reason}``: the door and the write to make, or why it is refused."""
        door_name, reason = args.get("door"), args.get("reason")
        if not isinstance(door_name, str) or door_name not in self._doors:
            return f"no door {str(door_name)[:64]!r} on this gateway"
        if not isinstance(reason, str) or not reason.strip():
            return "a remote unlock needs a reason"
        if len(reason) > MAX_REASON_CHARS:
            return f"the reason is longer than {MAX_REASON_CHARS} characters"
        door = self._doors[door_name]
        return door_name, self._unlock_write(door, "remote")

    def unlock_done(self, door_name: str, by: str, reason: str, token: str, result: WriteOutcome) -> list[Draft]:
        """A remote unlock's write finished: ``access.granted`` (kind remote) if the relay is confirmed to have
        moved, ``door.unlock_failed`` if not."""
        door = self._doors[door_name]
        if result.ok:
            self.stats["remote_unlocks"] += 1
        granted = Draft(
            type="access.granted",
            device="gateway",
            place=door.place,
            data={
                "door": door.name,
                "reader": None,
                "pass_id": None,
                "kind": "remote",
                "subject": by,
                "house": None,
                "uses_left": None,
                "by": by,
                "reason": reason.strip(),
            },
        )
        return self.write_done(door_name, token, result, granted=granted)

    def sync_revocations(self, args: Mapping[str, Any]) -> Outcome:
        """``credentials.sync {revocations}``: verify and install the signed list."""
        text = args.get("revocations")
        if not isinstance(text, str) or not text:
            return Outcome(False, "give 'revocations' (the signed list)", {"version": self._decider.revocation_version})
        try:
            applied = self._decider.apply_revocations(text)
        except PassError as e:
            return Outcome(False, str(e)[:300], {"version": self._decider.revocation_version})
        version = self._decider.revocation_version
        drafts = self.check_stale()
        return Outcome(
            True,
            f"applied version {version}" if applied else f"version {version} already held",
            {"version": version},
            drafts,
        )

    # ------------------------------------------------------------ state

    def states(self) -> dict[str, str | None]:
        return {name: d.state for name, d in self._doors.items()}

    def open_incidents(self) -> list[dict[str, Any]]:
        return [i.saved() for i in self._incidents.values()]

    def snapshot(self) -> dict[str, Any]:
        return {"v": STATE_VERSION, "incidents": self.open_incidents(), "states": self.states()}

    def _restore(self, state: Mapping[str, Any]) -> None:
        try:
            if state.get("v") != STATE_VERSION:
                raise ValueError(f"version {state.get('v')!r}")
            for s in state.get("incidents", []):
                family, key = str(s["family"]), str(s["key"])
                kind, _, name = key.partition(":")
                if kind == "stale":
                    known_here = bool(self._readers) and key == STALE_KEY
                else:
                    known = (
                        {f"{d.device}:{d.relay}" for d in (x.cfg for x in self._doors.values())}
                        if kind == "relay"
                        else self._readers
                        if kind == "reader"
                        else self._doors
                    )
                    known_here = name in known
                if family not in INCIDENTS or not known_here:
                    self.stats["state_dropped"] += 1
                    continue
                place = wire.Place(site=self._site, **{k: str(v) for k, v in dict(s["place"]).items()})
                self._incidents[key] = _Incident(
                    key, str(s["id"]), family, str(s["device"]), place, s.get("point"), dict(s["data"]), int(s["count"])
                )
            for name, st in dict(state.get("states", {})).items():
                if name in self._doors and st is not None:
                    self._doors[name].state = str(st)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.error("door state not restored: %s", e)
            self.stats["state_dropped"] += 1
            self._incidents.clear()

    # ------------------------------------------------------------ internals

    def _on_point(self, door: _Door, role: str, active: bool, initial: bool, now: float, out: list[Draft]) -> None:
        door.online = True if door.online is None else door.online
        if role == "contact":
            was = door.contact
            door.contact = active
            if active and was is False and not initial:
                door.opened_at = now
                if not self._authorised(door, now):
                    self._open_incident(
                        f"forced:{door.name}",
                        "forced",
                        door.cfg.device,
                        door.place,
                        door.cfg.contact,
                        {"door": door.name},
                        out,
                    )
            elif active and was is None:
                door.opened_at = now  # open at the first reading: not judged, but timed for held-open
            elif not active:
                door.opened_at = None
                self._close_incident(f"forced:{door.name}", out)
                self._close_incident(f"held:{door.name}", out)
        elif role == "exit_button":
            door.exit = active
            if not initial:
                door.exit_until = now + door.window_s()  # from the press, and again from the release
        elif role == "lock_feedback":
            door.lock = active
        elif role == "relay":
            door.relay = active
        elif role == "tamper":
            door.tamper = active
            if active:
                self._open_incident(
                    f"tamper:{door.name}",
                    "tamper",
                    door.cfg.device,
                    door.place,
                    door.cfg.tamper,
                    {"door": door.name},
                    out,
                )
            else:
                self._close_incident(f"tamper:{door.name}", out)

    def _released(self, door: _Door) -> bool:
        """The lock reads released: its feedback, or (without feedback) the relay point."""
        return bool(door.lock) if door.cfg.lock_feedback is not None else bool(door.relay)

    def _authorised(self, door: _Door, now: float) -> bool:
        return now <= door.grant_until or now <= door.exit_until or door.exit or self._released(door)

    def _compute(self, door: _Door, now: float) -> DoorStateName | None:
        if door.online is False:
            return "offline"
        if door.cfg.contact is not None:
            if door.contact is None:
                return None
            if door.contact:
                if f"forced:{door.name}" in self._incidents:
                    return "forced"
                if f"held:{door.name}" in self._incidents:
                    return "held"
                return "open"
        elif door.online is None:
            return None
        if now < door.unlock_until or self._released(door):
            return "unlocked"
        return "closed"

    def _update_state(self, door: _Door, now: float, out: list[Draft]) -> None:
        state = self._compute(door, now)
        if state is None or state == door.state:
            return
        door.state = state
        out.append(
            Draft(
                type="door.state",
                device=door.cfg.device,
                place=door.place,
                point=door.cfg.contact,
                data={"door": door.name, "state": state},
            )
        )

    def _open_incident(
        self,
        key: str,
        family: str,
        device: str,
        place: wire.Place,
        point: str | None,
        data: dict[str, Any],
        out: list[Draft],
    ) -> None:
        if key in self._incidents:
            return
        inc = _Incident(key, self._new_id(), family, device, place, point, data)
        self._incidents[key] = inc
        out.append(inc.draft(closing=False))

    def _close_incident(self, key: str, out: list[Draft]) -> None:
        inc = self._incidents.pop(key, None)
        if inc is not None:
            out.append(inc.draft(closing=True))

    def _reader_availability(self, ev: Availability) -> list[Draft]:
        out: list[Draft] = []
        reader = self._readers.get(ev.device)
        if reader is None:
            return out
        door = self._doors[reader.cfg.door]
        key = f"reader:{reader.cfg.name}"
        if ev.state == "offline":
            self._open_incident(
                key,
                "reader",
                reader.cfg.name,
                door.place,
                None,
                {"reader": reader.cfg.name, "door": door.name, "reason": ev.reason[:200]},
                out,
            )
        else:
            self._close_incident(key, out)
        return out

    def _unlock_write(self, door: _Door, why: str) -> WritePoint:
        """The unlock's write. The door may be opened from now on, while the write is under way (a fast door opens
        before the read-back confirms): until it is known to have failed, when only the unlocks confirmed or still
        under way authorise an opening."""
        token = f"{why}:{door.name}:{next(self._tokens)}"
        until = self._mono() + door.window_s()
        door.pending[token] = until
        door.grant_until = max(door.grant_until, until)
        return WritePoint(
            door.cfg.device,
            door.cfg.relay,
            True,
            token=token,
            pulse_ms=door.cfg.unlock_ms,
            start_within_ms=UNLOCK_START_WITHIN_MS,
        )

    def _on_scan(self, scan: Scan) -> tuple[list[Draft], Unlock | None]:
        out: list[Draft] = []
        self.stats["scans"] += 1
        reader = self._readers.get(scan.reader)
        if reader is None:
            self.stats["unknown_reader"] += 1
            return out, None
        now = self._mono()
        if (
            scan.text == reader.last_text
            and reader.cfg.repeat_ignore_ms
            and now - reader.last_at < reader.cfg.repeat_ignore_ms / 1000
        ):
            reader.last_at = now
            self.stats["repeats_ignored"] += 1
            return out, None
        reader.last_text, reader.last_at = scan.text, now
        door = self._doors[reader.cfg.door]
        dec = self._decider.decide(door.name, scan.text)
        if dec.granted:
            self.stats["granted"] += 1
            write = self._unlock_write(door, "grant")
            granted = Draft(
                type="access.granted",
                device=reader.cfg.name,
                place=door.place,
                data={
                    "door": door.name,
                    "reader": reader.cfg.name,
                    "pass_id": dec.pass_id,
                    "kind": dec.kind,
                    "subject": dec.subject,
                    "house": dec.house,
                    "uses_left": dec.uses_left,
                },
            )
            return out, Unlock(door.name, reader.cfg.name, write, granted, dec)
        self.stats["denied"] += 1
        data: dict[str, Any] = {"door": door.name, "reader": reader.cfg.name, "reason": dec.reason}
        for k in ("pass_id", "subject", "house"):
            v = getattr(dec, k)
            if v is not None:
                data[k] = v
        data["detail"] = dec.detail
        out.append(
            Draft(
                type="access.denied",
                device=reader.cfg.name,
                place=door.place,
                priority=_P.TAMPER if dec.reason == "blocked" else _P.ROUTINE,
                data=data,
            )
        )
        if dec.burst:
            out.append(
                Draft(
                    type="door.scan_burst",
                    device=reader.cfg.name,
                    place=door.place,
                    priority=_P.TAMPER,
                    data={"door": door.name, "count": self._burst[0], "window_s": self._burst[1]},
                )
            )
        return out, None


class DoorService:
    """Runs a :class:`DoorEngine`: makes its writes, stores its drafts, fires its timers.

    ``write`` is :meth:`gateway.app.Gateway.write` (raises on a bus that is down); ``submit(drafts, state)``
    is :meth:`gateway.store.Store.submit`. Use ``async with`` (or call :meth:`run` in a task)."""

    def __init__(
        self,
        engine: DoorEngine,
        write: Callable[[WritePoint], Awaitable[WriteResult]],
        submit: Callable[[Sequence[Draft], dict[str, Any] | None], object],
        *,
        mono: Callable[[], float] = time.monotonic,
        write_word_within_s: float = UNLOCK_WORD_WITHIN_S,
    ) -> None:
        self.engine = engine
        self._write = write
        self._submit = submit
        self._mono = mono
        self._word_within_s = write_word_within_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    # ------------------------------------------------------------ inputs (synchronous, from the drivers)

    def on_device_event(self, ev: DeviceEvent) -> None:
        """Called with every device event (by the gateway's device sink); never blocks."""
        if isinstance(ev, PointChanged | Availability):
            self._store(self.engine.on_device_event(ev))

    def on_reader_event(self, ev: Scan | Availability) -> None:
        """Called by the reader drivers as each line completes. A granted scan's unlock is started
        before its event is handed to the store."""
        drafts, unlock = self.engine.on_reader_event(ev)
        if unlock is not None:
            self._spawn(self._unlock(unlock), f"doors.unlock[{unlock.door}]")
        self._store(drafts)

    async def command(self, cmd: wire.Command) -> Outcome:
        """Carry out ``unlock`` or ``credentials.sync``."""
        if cmd.type == "unlock":
            prep = self.engine.prepare_unlock(cmd.args)
            door_arg = cmd.args.get("door")
            if isinstance(prep, str):
                return Outcome(False, prep, {"door": door_arg if isinstance(door_arg, str) else None})
            door, write = prep
            res = await self._do_write(write)
            drafts = self.engine.unlock_done(door, cmd.by, str(cmd.args["reason"]), write.token, res)
            self._wake.set()
            if res.ok:
                return Outcome(True, "unlocked", {"door": door}, drafts)
            return Outcome(False, f"unlock failed: {res.detail}", {"door": door, "reason": res.reason}, drafts)
        if cmd.type == "credentials.sync":
            return self.engine.sync_revocations(cmd.args)
        return Outcome(False, f"not a door command: {cmd.type!r}")

    def snapshot(self) -> dict[str, Any]:
        return self.engine.snapshot()

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        """Fire the engine's timers until cancelled; then end the writes still running."""
        try:
            while True:
                deadline = self.engine.next_deadline()
                self._wake.clear()
                timeout = None if deadline is None else max(0.0, deadline - self._mono())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                self._store(self.engine.tick())
        finally:
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _do_write(self, write: WritePoint) -> WriteOutcome:
        """The write's true outcome. Not abandoned after a few seconds: the bus would still make a write its caller
        gave up on (the door opening after it was reported failed); the bus itself drops one it could not start in
        time (``start_within_ms``) and bounds one under way by its timeouts."""
        try:
            async with asyncio.timeout(self._word_within_s):
                result = await self._write(write)
        except TimeoutError:
            return WriteOutcome(
                False,
                "unconfirmed",
                f"no word from the bus within {self._word_within_s:.0f} s: whether the relay moved is not known",
            )
        except asyncio.CancelledError:
            raise
        except BusDown as e:  # the link is down: nothing was sent
            return WriteOutcome(False, "bus_down", str(e) or type(e).__name__, not_made=True)
        except Exception as e:  # anything else a bus may raise: the door must not take the loop down
            return WriteOutcome(False, "bus_down", str(e) or type(e).__name__)
        if result.ok:
            return WriteOutcome(True)
        reason = _FAILURE_OF_WRITE.get(result.failure, "no_answer")
        return WriteOutcome(False, reason, result.detail, not_made=result.failure in _NOT_MADE)

    async def _unlock(self, u: Unlock) -> None:
        res = await self._do_write(u.write)
        self._store(self.engine.write_done(u.door, u.write.token, res, u.reader, u.granted, u.decision))

    def _store(self, drafts: list[Draft]) -> None:
        if drafts:
            fut = self._submit(drafts, {STATE_KEY: self.engine.snapshot()})
            if isinstance(fut, asyncio.Future):
                fut.add_done_callback(_log_store_failure)
        self._wake.set()


def _log_store_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("door events not stored: %s", fut.exception())
