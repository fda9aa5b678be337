"""Weekly arm/disarm schedules for zone groups, as transitions on the wall clock.

A window ``{days, start, end}`` arms its groups at ``start`` on each of ``days`` (site local time) and
disarms them at ``end``, on the same day or, when ``end`` is not after ``start``, on the next; "24:00"
is the next midnight. The engine does not ask "should this group be armed now?" but "which
transitions lie between the last wall time I looked at and now?", so a backwards clock jump does not
repeat a transition and a forwards jump (or a restart after downtime) applies the missed ones once:
only the last one per group counts, since it decides the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from gateway.config import AlarmScheduleConfig

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: Looking further back than this is pointless: every schedule has a transition each week.
_HORIZON = timedelta(days=8)
_RANK = {"disarm": 0, "arm": 1}  # at one instant an arm wins over a disarm


@dataclass(frozen=True, slots=True)
class Transition:
    when: datetime  # UTC
    action: Literal["arm", "disarm"]
    group: str
    schedule: str


def _clock(value: str) -> tuple[time, int]:
    """ "22:00" -> (22:00, 0); "24:00" -> (00:00, 1 day later)."""
    if value == "24:00":
        return time(0, 0), 1
    h, m = value.split(":")
    return time(int(h), int(m)), 0


def _local(day: date, at: time, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, at, tzinfo=tz).astimezone(UTC)


def _between(
    schedules: Sequence[AlarmScheduleConfig], tz: ZoneInfo, start: datetime, end: datetime
) -> list[Transition]:
    """Every transition with ``start < when <= end``, in order."""
    found: list[tuple[datetime, int, int, str, Transition]] = []
    first = start.astimezone(tz).date() - timedelta(days=1)
    last = end.astimezone(tz).date()
    for si, s in enumerate(schedules):
        if not s.enabled:
            continue
        for w in s.windows:
            arm_t, _ = _clock(w.start)
            end_t, end_extra = _clock(w.end)
            next_day = end_extra or end_t <= arm_t
            day = first
            while day <= last:
                if DAYS[day.weekday()] in w.days:
                    arm_at = _local(day, arm_t, tz)
                    disarm_at = _local(day + timedelta(days=1 if next_day else 0), end_t, tz)
                    for when, action in ((arm_at, "arm"), (disarm_at, "disarm")):
                        if start < when <= end:
                            for g in s.groups:
                                t = Transition(when, action, g, s.name)  # type: ignore[arg-type]
                                found.append((when, _RANK[action], si, g, t))
                day += timedelta(days=1)
    found.sort(key=lambda x: x[:4])
    return [x[4] for x in found]


def due(schedules: Sequence[AlarmScheduleConfig], tz: ZoneInfo, start: datetime, end: datetime) -> list[Transition]:
    """The last transition of each group with ``start < when <= end``, in time order."""
    if end <= start:
        return []
    start = max(start, end - _HORIZON)
    last: dict[str, Transition] = {}
    for t in _between(schedules, tz, start, end):
        last[t.group] = t
    return sorted(last.values(), key=lambda t: (t.when, t.group))


def next_after(schedules: Sequence[AlarmScheduleConfig], tz: ZoneInfo, after: datetime) -> datetime | None:
    """The first transition strictly after ``after``, or None when no schedule is enabled."""
    found = _between(schedules, tz, after, after + _HORIZON)
    return found[0].when if found else None
