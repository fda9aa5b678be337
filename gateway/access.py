"""Offline access decisions: may this scanned pass open this door, now?

Everything needed is local: the portal's public keys (never a private key: a stolen gateway cannot
mint passes), the door config, the last revocation list the portal sent, and the record of passes
already used. The portal and the broker may be unreachable.

Reasons (``Decision.reason``):

==============  ==============================================================================
malformed       not a pass of a known format (also: over-long, binary junk, empty)
unknown-key     signed with a key id this gateway does not hold
bad-signature   the signature does not match
wrong-door      a pass for another site, or one whose rights do not cover this door
blocked         the subject is on the list of blocked people
revoked         the pass, or every pass of its subject, has been revoked
stale-list      a visitor pass, and the revocation list is missing or older than
                ``revocation_max_age_s`` (see *Stale list*)
expired         outside its validity window (± ``skew_s``), not yet valid, outside its schedule,
                or older than the replay record remembers (see *Replay*)
replayed        already used as often as it allows
granted         none of the above; the use is recorded durably before the answer is returned
==============  ==============================================================================

Order of the checks (the first that fails gives the reason): format, key, signature, site,
blocked, revoked, stale list, validity window, door rights, schedule, replay. Blocked and revoked
come before the window so that guards learn of a blocked person even when the pass is also stale.

Stale list: a revocation that never reaches the gateway must not leave a long-lived pass working
for ever. The portal re-signs its list every few hours and sends it within seconds of a change, so a
list older than ``access.revocation_max_age_s`` (default 24 h), or none at all (a new gateway, a
replaced SD card), means the gateway cannot know what was revoked since. Then **visitor passes are
refused** (``stale-list``: they live up to 7 days and are what guards revoke), and the door engine
raises a ``credentials.stale`` fault on the console until a fresh list arrives. **Residents' passes
keep opening**: they live a minute and the portal issues one only to a resident whose residency is
active at that moment, so the portal itself is their revocation check, and residents must get home
with the portal or the network down. Blocked people and revoked passes on the old list stay refused.
With an unsynchronised clock the list's age is judged from the time floor (below), a lower bound:
after a reboot without a clock the age counts at least from the gateway's last prune before it.

Rights: a door whose place is building B, unit U opens for a pass listing ``B/U`` in ``units``; a
door with ``gate: true`` opens for a pass with ``gates``; any door opens for a pass naming it in
``doors``. A pass naming a ``schedule`` opens only inside that schedule's weekly windows (local
time in ``access.timezone``); an unknown schedule name opens nothing.

Replay: a resident pass opens each door at most ``uses`` times (normally once) during its life.

Visits: a visitor pass's ``uses`` are *visits*, not door openings. Its path is the doors it names (the
site gates and its house's unit entrance: ``gates`` and ``units``). A visit starts with an opening that
spends a use and lasts ``visit_window_s`` (default 30 minutes); during it, each door of this gateway on
the path opens once more without spending anything (gate, then building entrance). A second opening of
the same door within the visit, or any opening after it, starts a new visit. Each gateway counts the
visits to its own doors from its own record, so the count needs no network: a visit that crosses two
gateways (the gate on one, the building on another) spends one use on each, and neither lets the pass
in more than ``uses`` times; doors on one gateway (several gates) share one count. A door that has a
reader on both sides counts leaving as an opening too. Each opening is a row in the used-pass record,
written before the decision is returned. Rows are pruned once their pass has expired; the prune point is
kept (:meth:`UsedPasses.horizon`) and a pass expiring before it is refused as expired whatever the
clock says, so forgetting a pass never lets it open again. With the file in WAL mode and
synchronous=NORMAL a crash of the process loses nothing; a power cut may lose the last openings.
If the record cannot be written (a full or failing disk) the pass still opens, the opening is kept
in memory until restart, and the decision's ``detail`` says so: a broken SD card must not lock
residents out of their building.

Unsynchronised clock (the caller sets :attr:`AccessDecider.clock_synced` from NTP state): the
decider keeps a *time floor*, a lower bound on the true time built from evidence (the revocation
list's signed ``issued_at``; the not-before, less ``skew_s``, of every resident pass it granted —
the portal issues resident passes with not-before = its own now; the replay record's prune point;
and the wall clock while it was synchronised), advanced by the monotonic clock. At start-up the
floor is the list's ``issued_at`` or the prune point, whichever is later. While unsynchronised:

* a resident pass must have a life of at most ``unsynced_max_life_s``: residents' passes are
  short-lived, and a long one cannot be judged without a clock;
* a pass that expired (+ skew) before the floor is expired: that moment has certainly passed;
* if the wall clock is not behind the floor (less skew) it is believed roughly: the window must
  contain it within the wider ``unsynced_skew_s``;
* if the wall clock is behind the floor (reset to 1970, or a stale saved time) it is ignored and
  the floor alone judges: a resident pass opens if it had not expired at the floor; a visitor pass
  also needs its not-before (less skew) to have passed by the floor;
* a pass with a schedule is refused (expired): the time of day is unknown.

Burst: ``burst_count`` refused scans at one door within ``burst_window_s`` (monotonic) set
``burst`` on the decision that completes them; the caller raises ``door.scan_burst``. Refused scans
count whatever their reason, junk included; this counter lives in memory only.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

from gateway.config import AccessConfig, DoorConfig, GatewayConfig, ScheduleConfig
from gateway.credentials import (
    RevocationStore,
    SqliteUsedPasses,
    UsedPasses,
    open_access_db,
)
from gateway.wire.ed25519 import PublicKey, as_public_key
from gateway.wire.passes import Pass, PassError, load_public_keys, parse_pass, parse_revocations

if TYPE_CHECKING:
    from gateway.wire.passes import VerifyingKey

log = logging.getLogger(__name__)

Reason = Literal[
    "granted",
    "expired",
    "wrong-door",
    "revoked",
    "blocked",
    "bad-signature",
    "unknown-key",
    "replayed",
    "malformed",
    "stale-list",
]
_PRUNE_EVERY_S = 60.0
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class Decision:
    granted: bool
    reason: Reason
    door: str
    pass_id: str | None = None  # hex
    kind: str | None = None
    subject: str | None = None
    house: str | None = None
    uses_left: int | None = None  # after this opening (granted decisions only)
    detail: str = ""
    burst: bool = False  # this refusal completes a burst: raise door.scan_burst
    used_at: float | None = None  # granted: the wall time its opening was recorded at (AccessDecider.release)

    def event_data(self) -> dict[str, Any]:
        """The non-empty fields, as plain values for an event's ``data``."""
        out: dict[str, Any] = {"granted": self.granted, "reason": self.reason}
        for k in ("pass_id", "kind", "subject", "house", "uses_left"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        if self.detail:
            out["detail"] = self.detail
        if self.burst:
            out["burst"] = True
        return out


def count_visits(openings: Sequence[tuple[str, float]], window_s: float) -> tuple[int, float | None, set[str]]:
    """(visits, the current visit's start, its doors) from a visitor pass's openings (door, wall time) in the
    order they were granted: an opening starts a visit unless it falls within ``window_s`` of the current
    visit's start at a door not yet opened in it (see *Visits*)."""
    visits, start, doors = 0, None, set()
    for door, ts in openings:
        if start is not None and door not in doors and 0 <= ts - start < window_s:
            doors.add(door)
        else:
            visits, start, doors = visits + 1, ts, {door}
    return visits, start, doors


class ScanBurst:
    """Counts refused scans per door; True when ``count`` of them fall within ``window_s``, after
    which no new burst is reported at that door for ``window_s``."""

    def __init__(self, count: int = 5, window_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if count < 2 or window_s <= 0:
            raise ValueError("a burst needs count >= 2 and window_s > 0")
        self._count = count
        self._window = window_s
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}
        self._quiet_until: dict[str, float] = {}

    def refused(self, door: str) -> bool:
        now = self._clock()
        q = self._seen.get(door)
        if q is None:
            q = self._seen[door] = deque(maxlen=self._count)
        q.append(now)
        if len(q) < self._count or now - q[0] > self._window:
            return False
        if now < self._quiet_until.get(door, float("-inf")):
            return False
        self._quiet_until[door] = now + self._window
        return True


class Schedule:
    """Weekly windows in local time. Minutes from midnight; an end before the start runs past midnight."""

    def __init__(self, windows: Sequence[tuple[frozenset[int], int, int]]) -> None:
        self._windows = tuple(windows)

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> Schedule:
        def minutes(hhmm: str) -> int:
            h, m = hhmm.split(":")
            return int(h) * 60 + int(m)

        return cls([(frozenset(_DAYS.index(d) for d in w.days), minutes(w.start), minutes(w.end)) for w in cfg.windows])

    def contains(self, local: datetime) -> bool:
        day, minute = local.weekday(), local.hour * 60 + local.minute
        for days, start, end in self._windows:
            if start < end:
                if day in days and start <= minute < end:
                    return True
            elif (day in days and minute >= start) or ((day - 1) % 7 in days and minute < end):
                return True
        return False


@dataclass(frozen=True, slots=True)
class _Door:
    name: str
    unit_ref: str | None  # "building/unit"
    gate: bool

    def opens_for(self, p: Pass) -> bool:
        if self.gate and p.gates:
            return True
        return (self.unit_ref is not None and self.unit_ref in p.units) or self.name in p.doors


class AccessDecider:
    """Judges scans at the doors of one gateway. Synchronous and fast: call it on the event loop.

    ``public_keys`` maps key ids to Ed25519 *public* keys; anything else is refused.
    """

    def __init__(
        self,
        *,
        site: str,
        doors: Sequence[DoorConfig],
        public_keys: Mapping[str, VerifyingKey],
        used: UsedPasses,
        revocations: RevocationStore,
        settings: AccessConfig | None = None,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        keys: dict[str, PublicKey] = {}
        for kid, key in public_keys.items():
            try:
                keys[kid] = as_public_key(key)
            except TypeError:
                raise TypeError(
                    f"key {kid}: the gateway takes Ed25519 public keys only, not {type(key).__name__}"
                ) from None
        s = settings or AccessConfig()
        self._site = site
        self._keys = keys
        self._doors = {
            d.name: _Door(
                d.name,
                f"{d.place.building}/{d.place.unit}" if d.place and d.place.building and d.place.unit else None,
                d.gate,
            )
            for d in doors
        }
        self._used = used
        self._revocations = revocations
        self._s = s
        self._schedules = {sc.name: Schedule.from_config(sc) for sc in s.schedules}
        self._tz = ZoneInfo(s.timezone)
        self._wall = wall
        self._mono = mono
        self._burst = ScanBurst(s.burst_count, s.burst_window_s, mono)
        #: Set False while the wall clock is known not to be synchronised (NTP lost, no RTC).
        self.clock_synced = True
        self._unsaved: dict[bytes, tuple[int, list[tuple[str, float]]]] = {}  # openings the record failed to keep
        self.record_failures = 0
        self._floor = 0.0
        self._floor_mono = mono()
        self._evidence(max(revocations.current.issued_at, used.horizon()))
        self._last_prune = mono()
        self._owned_db: Any = None

    @classmethod
    def open(
        cls,
        cfg: GatewayConfig,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> AccessDecider:
        """A decider on ``data_dir/<access.db>`` with the configured public keys; :meth:`close` it."""
        path = Path(cfg.data_dir) / cfg.access.db
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = load_public_keys(cfg.access.public_keys)
        db = open_access_db(path)
        try:
            d = cls(
                site=cfg.site,
                doors=cfg.doors,
                public_keys=keys,
                used=SqliteUsedPasses(db),
                revocations=RevocationStore(db, cfg.site),
                settings=cfg.access,
                wall=wall,
                mono=mono,
            )
        except BaseException:
            db.close()
            raise
        d._owned_db = db
        return d

    def close(self) -> None:
        if self._owned_db is not None:
            self._owned_db.close()
            self._owned_db = None

    def __enter__(self) -> AccessDecider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ time

    def set_clock_synced(self, synced: bool) -> None:
        """The clock's sync state, from NTP. While synchronised the wall clock is evidence for the floor,
        so the floor is fresh at the moment synchronisation is lost."""
        self.clock_synced = synced
        if synced:
            self._evidence(self._wall())

    def time_floor(self) -> float:
        """A lower bound on the true unix time, from signed evidence and the monotonic clock."""
        return self._floor + (self._mono() - self._floor_mono)

    def _evidence(self, t: float) -> None:
        if t > self.time_floor():
            self._floor = t
            self._floor_mono = self._mono()

    def _time_problem(self, p: Pass, wall: float) -> str:
        """Why the pass is not valid now, or ''."""
        skew = self._s.skew_s
        if p.not_after < self._used.horizon():
            return "expired before the replay record's horizon"
        if self.clock_synced:
            self._evidence(wall)
            if wall < p.not_before - skew:
                return "not yet valid"
            if wall > p.not_after + skew:
                return "expired"
            return ""
        if p.kind == "resident" and p.life_s > self._s.unsynced_max_life_s:
            return "clock unsynchronised: a resident pass this long-lived cannot be judged"
        floor = self.time_floor()
        if p.not_after + skew < floor:
            return "expired (clock unsynchronised; judged by the time floor)"
        if wall >= floor - skew:
            loose = self._s.unsynced_skew_s
            if wall < p.not_before - loose:
                return "not yet valid (clock unsynchronised)"
            if wall > p.not_after + loose:
                return "expired (clock unsynchronised)"
        elif p.kind == "visitor" and p.not_before - skew > floor:
            return "not yet valid (clock unsynchronised; judged by the time floor)"
        return ""

    # ------------------------------------------------------------ decisions

    def decide(self, door: str, scan: str | bytes) -> Decision:
        d = self._doors.get(door)
        if d is None:
            return Decision(False, "wrong-door", door, detail="no such door on this gateway")
        try:
            p = parse_pass(scan, self._keys)
        except PassError as e:
            reason: Reason = "malformed"
            if e.reason == "unknown-key":
                reason = "unknown-key"
            elif e.reason == "bad-signature":
                reason = "bad-signature"
            return self._refuse(d, reason, None, e.detail)
        if p.site != self._site:
            return self._refuse(d, "wrong-door", p, f"a pass for site {p.site!r}")
        rev = self._revocations.current
        if p.subject in rev.blocked:
            return self._refuse(d, "blocked", p)
        if p.pass_id in rev.passes:
            return self._refuse(d, "revoked", p, "pass revoked")
        if p.subject in rev.subjects:
            return self._refuse(d, "revoked", p, "subject's passes revoked")
        if p.kind == "visitor" and self.revocations_stale():
            age = self.list_age_s()
            return self._refuse(
                d,
                "stale-list",
                p,
                "no revocation list received yet"
                if age is None
                else f"revocation list v{rev.version} is {age / 3600:.1f} h old (at most "
                f"{self._s.revocation_max_age_s / 3600:g} h)",
            )
        wall = self._wall()
        problem = self._time_problem(p, wall)
        if problem:
            return self._refuse(d, "expired", p, problem)
        if not d.opens_for(p):
            return self._refuse(d, "wrong-door", p)
        if p.schedule is not None:
            sched = self._schedules.get(p.schedule)
            if sched is None:
                return self._refuse(d, "expired", p, f"unknown schedule {p.schedule!r}")
            if not self.clock_synced:
                return self._refuse(d, "expired", p, "schedule cannot be judged: clock unsynchronised")
            if not sched.contains(datetime.fromtimestamp(wall, self._tz)):
                return self._refuse(d, "expired", p, f"outside schedule {p.schedule!r}")
        try:
            openings = self._used.openings(p.pass_id)
            degraded = ""
        except sqlite3.Error as e:
            openings, degraded = [], f"replay record unreadable: {e}"
        unsaved = self._unsaved.get(p.pass_id)
        if unsaved is not None:
            openings = [*openings, *unsaved[1]]
        if p.kind == "resident":
            used = sum(1 for x, _ in openings if x == door)
            if used >= p.uses:
                return self._refuse(d, "replayed", p, f"used {used} of {p.uses}")
            left = p.uses - used - 1
        else:
            visits, start, doors_in_visit = count_visits(openings, self._s.visit_window_s)
            if start is not None and door not in doors_in_visit and 0 <= wall - start < self._s.visit_window_s:
                left = p.uses - visits  # on the way: the same visit
            elif visits >= p.uses:
                return self._refuse(d, "replayed", p, f"{visits} of {p.uses} visits made")
            else:
                left = p.uses - visits - 1
        try:
            self._used.record(p.pass_id, door, wall, not_before=p.not_before, expires=p.not_after)
        except sqlite3.Error as e:
            self.record_failures += 1
            self._unsaved.setdefault(p.pass_id, (p.not_after, []))[1].append((door, wall))
            degraded = f"use not persisted: {e}"
            log.error("access: could not record the use of pass %s at %s: %s", p.pass_id_hex, door, e)
        if p.kind == "resident":  # issued with not-before = the portal's now, so the true time is past it
            self._evidence(p.not_before - self._s.skew_s)
        if self._mono() - self._last_prune >= _PRUNE_EVERY_S:
            self.prune()
        return Decision(True, "granted", door, p.pass_id_hex, p.kind, p.subject, p.house, left, degraded, used_at=wall)

    def release(self, dec: Decision) -> None:
        """Give back the opening a granted decision recorded: its door is known not to have opened (the relay did not
        move, the write was never made), so the pass keeps that use and its holder may scan again."""
        if not dec.granted or dec.pass_id is None or dec.used_at is None:
            return
        pass_id = bytes.fromhex(dec.pass_id)
        unsaved = self._unsaved.get(pass_id)
        if unsaved is not None and (dec.door, dec.used_at) in unsaved[1]:
            unsaved[1].remove((dec.door, dec.used_at))
            return
        try:
            self._used.forget(pass_id, dec.door, dec.used_at)
        except sqlite3.Error as e:
            log.error("access: could not take back the use of pass %s at %s: %s", dec.pass_id, dec.door, e)

    def _refuse(self, d: _Door, reason: Reason, p: Pass | None, detail: str = "") -> Decision:
        burst = self._burst.refused(d.name)
        if p is None:
            return Decision(False, reason, d.name, detail=detail, burst=burst)
        return Decision(False, reason, d.name, p.pass_id_hex, p.kind, p.subject, p.house, None, detail, burst)

    # ------------------------------------------------------------ upkeep

    def prune(self) -> int:
        """Forget used passes that can no longer be valid. Returns the rows removed."""
        self._last_prune = self._mono()
        skew = self._s.skew_s
        if self.clock_synced:
            self._evidence(self._wall())
        before = self.time_floor() - skew
        if self._unsaved:
            self._unsaved = {k: v for k, v in self._unsaved.items() if v[0] >= before}
        try:
            return self._used.prune(before)
        except sqlite3.Error as e:
            log.error("access: could not prune the used-pass record: %s", e)
            return 0

    def apply_revocations(self, text: str | bytes) -> bool:
        """Verify and install a revocation list from the portal.

        True if it replaced the current list, False if that very version was already held. Raises
        PassError (malformed, unknown-key, bad-signature) or RevocationRefused (older, conflict,
        wrong-site); the current list then stays in force.
        """
        rl = parse_revocations(text, self._keys)
        raw = text if isinstance(text, str) else text.decode("ascii")
        applied = self._revocations.apply(rl, raw.strip(), self._wall())
        self._evidence(rl.issued_at)
        return applied

    @property
    def revocation_max_age_s(self) -> int:
        return self._s.revocation_max_age_s

    @property
    def revocation_version(self) -> int:
        return self._revocations.current.version

    def list_age_s(self) -> float | None:
        """Seconds since the current revocation list was issued (None: never received one)."""
        cur = self._revocations.current
        if cur.version == 0:
            return None
        now = self._wall() if self.clock_synced else max(self._wall(), self.time_floor())
        return max(0.0, now - cur.issued_at)

    def revocations_stale(self) -> bool:
        """True when there is no list or it is older than ``revocation_max_age_s``: visitor passes are refused and
        the guards are warned."""
        age = self.list_age_s()
        return age is None or age > self._s.revocation_max_age_s
