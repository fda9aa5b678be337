"""``gatehouse bus scan``: probe unit ids on a serial port or a TCP serial server and say which profile fits.

Installer code, outside the daemon: it opens the line itself with the driver's link (so the daemon must not be
running on the same port; the CLI checks), asks each id for the profiles' identification registers, and tells
candidates apart by their documented probes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from devices.modbus import BusDown
from devices.modbus_link import BusSpec, DeviceRefused, Link, LinkLost, NoAnswer, quiet_pymodbus, reader
from devices.modbus_plan import Block
from devices.profiles import Profile, ProfileError, find_profile, list_profiles

# ---------------------------------------------------------------- bus scan


@dataclass(frozen=True, slots=True)
class ScanHit:
    """A unit id that answered a scan, and the profile it looks like. ``profile`` is None when no profile fits,
    or when several fit and no probe the makers document tells them apart: ``candidates`` names them then,
    ``probes`` says what was asked and answered, and ``detail`` says how to tell them apart by eye.
    ``requests`` counts the requests sent before the unit first answered (more than 1: it missed some)."""

    unit: int
    profile: str | None
    registers: tuple[int, ...] = ()
    detail: str = ""
    candidates: tuple[str, ...] = ()
    probes: tuple[str, ...] = ()
    requests: int = 1


_Read = tuple[str, int, int]  # (table, address, count)
#: Exceptions a Modbus TCP gateway (serial server) answers for a unit it could not reach: gateway path unavailable,
#: gateway target device failed to respond. The unit is as absent as one that does not answer.
GATEWAY_EXCEPTIONS = frozenset({10, 11})
#: A unit whose every answer was a corrupt frame: something is there, but the line is not right.
GARBLED = (
    "answers with corrupt frames only (bad CRC, wrong unit): check the baud rate and parity, the line's termination, "
    "a second master on the bus, or an adapter echoing what is sent"
)
_Answer = tuple[str, Any]  # ("values", tuple) | ("refused", code) | ("silent", "") | ("garbled", kind)


async def scan_bus(
    spec: BusSpec,
    units: Iterable[int],
    profiles: Sequence[Profile],
    *,
    clock: Callable[[], float] = time.monotonic,
    tries: int = 2,
    found: Callable[[ScanHit], None] | None = None,
) -> list[ScanHit]:
    """Ask each unit id for the profiles' identification registers, at the bus's timeout and pacing. Not for a
    bus that a :class:`ModbusBus` is running on. Raises BusDown if the link cannot be opened.

    An id is empty only when it answered none of the distinct identification reads (each asked once, and the
    first ones again until ``tries`` requests were sent): a unit can miss a request after power-up or a
    collision, and some are silent on registers their documents do not list. Every profile whose
    identification fits is a candidate; when several fit, their ``probes`` are asked, and a profile whose
    documented answers disagree drops out. Several left over is said, never guessed. ``found(hit)`` is called
    as each unit is identified."""
    quiet_pymodbus()
    link = Link(spec, clock, spec.gap_ms / 1000)
    why = await link.connect()
    if why is not None:
        raise BusDown(f"bus {spec.name!r}: {why}")
    hits: list[ScanHit] = []
    candidates = [p for p in profiles if p.identify is not None]
    reads: list[_Read] = list(
        dict.fromkeys(
            (p.identify.table, p.identify.address, p.identify.count)  # type: ignore[union-attr]
            for p in candidates
        )
    )
    presence = [reads[i % len(reads)] for i in range(max(tries, len(reads)))] if reads else []
    try:
        for unit in units:
            answers: dict[_Read, _Answer] = {}
            sent = 0

            async def ask(read: _Read, unit: int = unit, answers: dict[_Read, _Answer] = answers) -> _Answer:
                nonlocal sent
                old = answers.get(read)
                if old is not None and old[0] != "silent":
                    return old
                sent += 1
                table, address, count = read
                try:
                    resp, _ = await link.exchange(
                        unit, reader(Block(table, address, count, ()), unit), 0, lambda _k: None
                    )
                except DeviceRefused as e:
                    # 10 and 11 come from a Modbus TCP gateway, not a device: no path, or no answer from the unit
                    ans: _Answer = ("silent", "") if e.code in GATEWAY_EXCEPTIONS else ("refused", e.code)
                except NoAnswer as e:
                    if not link.up:
                        raise BusDown(f"bus {spec.name!r}: link lost during the scan") from None
                    ans = ("silent", "") if e.kind == "timeout" else ("garbled", e.kind)
                except LinkLost as e:
                    raise BusDown(f"bus {spec.name!r}: {e}") from None
                else:
                    raw = resp.bits if table in ("coil", "discrete") else resp.registers
                    ans = ("values", tuple(int(v) for v in raw[:count]))
                answers[read] = ans
                return ans

            first = 0
            for read in presence:
                if (await ask(read))[0] != "silent":
                    first = sent
                    break
            if not first:
                continue  # nothing there
            hits.append(await _identify(unit, candidates, ask, first))
            if found is not None:
                found(hits[-1])
    finally:
        link.close()
    return hits


async def _identify(
    unit: int, candidates: Sequence[Profile], ask: Callable[[_Read], Awaitable[_Answer]], requests: int
) -> ScanHit:
    fits: list[Profile] = []
    regs: tuple[int, ...] = ()
    refused = ""
    garbled = answered = False
    for prof in candidates:
        ident = prof.identify
        assert ident is not None
        kind, value = await ask((ident.table, ident.address, ident.count))
        if kind == "refused":
            refused = refused or f"Modbus exception {value}"
        garbled = garbled or kind == "garbled"
        answered = answered or kind in ("values", "refused")
        if kind != "values":
            continue
        regs = regs or value
        expect = ident.expect or ()
        ok = all(e is None or e == r for e, r in zip(expect, value, strict=False))
        if ident.unit_at is not None and (len(value) <= ident.unit_at or value[ident.unit_at] != unit):
            ok = False
        if ok:
            fits.append(prof)
            regs = value
    if not fits:
        if garbled and not answered:
            why = GARBLED
        else:
            why = "answered, no profile matches" if regs or not refused else refused
        return ScanHit(unit, None, regs, why, requests=requests)
    asked: list[str] = []
    if len(fits) > 1:
        left = []
        for prof in fits:
            agrees = True
            for probe in prof.identify.probes:  # type: ignore[union-attr]
                kind, value = await ask((probe.table, probe.address, probe.count))
                shown = f"{probe.describe()}: " + (
                    f"exception {value}"
                    if kind == "refused"
                    else "no answer"
                    if kind in ("silent", "garbled")
                    else " ".join(f"{v:#06x}" for v in value[:8])
                )
                if shown not in asked:
                    asked.append(shown)
                if kind in ("silent", "garbled"):
                    continue  # no answer tells nothing either way
                if probe.refused:
                    agrees = agrees and kind == "refused"
                else:
                    agrees = (
                        agrees
                        and kind == "values"
                        and all(e is None or e == v for e, v in zip(probe.expect or (), value, strict=False))
                    )
            if agrees:
                left.append(prof)
        dropped = [p.name for p in fits if p not in left]
        if len(left) == 1:
            return ScanHit(
                unit,
                left[0].name,
                regs,
                f"told apart from {', '.join(dropped)} by its probes",
                probes=tuple(asked),
                requests=requests,
            )
        if left:
            fits = left
        names = tuple(sorted(p.name for p in fits))
        hints = "; ".join(p.identify.hint for p in fits if p.identify is not None and p.identify.hint)
        detail = (
            f"ambiguous: {' or '.join(names)} answer the same to every read their makers document "
            f"({len(asked)} probes asked)" + (f"; tell them apart by eye: {hints}" if hints else "")
        )
        return ScanHit(unit, None, regs, detail, names, tuple(asked), requests)
    return ScanHit(unit, fits[0].name, regs, requests=requests)


# ---------------------------------------------------------------- what `bus scan` runs and shows


@dataclass
class ScanResult:
    hits: list[ScanHit]
    scanned: int
    seconds: float


def profiles_for_scan(names: Sequence[str] | None, extra_dir: str | None) -> list[Profile]:
    """The named profiles (default: every one that has an ``identify`` section)."""
    out = []
    for name in names or list_profiles(extra_dir):
        try:
            p = find_profile(name, extra_dir=extra_dir)
        except ProfileError:
            if names:
                raise
            continue  # a broken extra profile does not stop a scan for the others
        if p.identify is not None or names:
            out.append(p)
    return out


async def scan(
    spec: BusSpec,
    units: Sequence[int],
    profiles: Sequence[Profile],
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    tries: int = 2,
    found: Callable[[ScanHit], None] | None = None,
) -> ScanResult:
    """Probe ``units`` one by one (``tries`` requests before an id is taken as empty, see
    :func:`devices.modbus.scan_bus`); ``progress(done, total)`` as each one is reached, ``found(hit)`` as each
    unit is identified."""
    total = len(units)

    def tracked() -> Iterator[int]:
        # scan_bus takes the next id only when it is done with the last one: that is our progress.
        for i, u in enumerate(units):
            if progress is not None:
                progress(i, total)
            yield u

    t0 = clock()
    hits = await scan_bus(spec, tracked(), profiles, clock=clock, tries=tries, found=found)
    if progress is not None:
        progress(total, total)
    return ScanResult(hits, total, clock() - t0)


def describe_hit(hit: ScanHit) -> str:
    if hit.profile:
        return hit.profile
    if hit.candidates:
        return f"ambiguous ({' or '.join(hit.candidates)})"
    return f"? ({hit.detail})" if hit.detail else "?"


def _left(seconds: float) -> str:
    if seconds < 90:
        return f"about {max(1, round(seconds))} s left"
    return f"about {round(seconds / 60)} min left"


class ScanProgress:
    """What ``bus scan`` shows while it runs: each unit the moment it is found, and how far the scan is with an
    estimate of the time left. On a terminal a bar redrawn in place; elsewhere (a log, a pipe) a line every
    tenth of the way. Before the first id is done the estimate is the worst case, every id silent
    (``worst_s_per_id``); after, the pace so far."""

    def __init__(
        self, stream: Any, worst_s_per_id: float, clock: Callable[[], float] = time.monotonic, tty: bool | None = None
    ) -> None:
        self.stream = stream
        self.worst_s_per_id = worst_s_per_id
        self.clock = clock
        self.tty = stream.isatty() if tty is None else tty
        self._t0: float | None = None
        self._last_step = -1
        self._bar = ""
        self._done = 0
        self._total = 0

    def seconds_left(self, done: int, total: int) -> float:
        if self._t0 is None or done == 0:
            return (total - done) * self.worst_s_per_id
        return (self.clock() - self._t0) / done * (total - done)

    def _line(self, done: int, total: int) -> str:
        return f"{done}/{total}" + (f", {_left(self.seconds_left(done, total))}" if done < total else "")

    def progress(self, done: int, total: int) -> None:
        if self._t0 is None:
            self._t0 = self.clock()
        self._done, self._total = done, total
        if self.tty:
            filled = 30 * done // max(total, 1)
            self._bar = f"scanning [{'#' * filled}{'.' * (30 - filled)}] {self._line(done, total)}"
            self.stream.write(f"\r\x1b[K{self._bar}" + ("\n" if done == total else ""))
        else:
            step = 10 * done // max(total, 1)
            if step == self._last_step:
                return
            self._last_step = step
            self.stream.write(f"scanned {self._line(done, total)}\n")
        self.stream.flush()

    def found(self, hit: ScanHit) -> None:
        text = f"found unit {hit.unit}: {describe_hit(hit)}"
        if self.tty:
            self.stream.write(f"\r\x1b[K{text}\n{self._bar}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def parse_units(text: str) -> list[int]:
    """``1-247``, ``5``, ``1,3,10-20``."""
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(f"--units {text!r}: expected ids and ranges like 1-247 or 1,3,10-20") from None
        if not (1 <= a <= 247 and 1 <= b <= 247 and a <= b):
            raise ValueError(f"--units {text!r}: unit ids are 1-247")
        out.extend(range(a, b + 1))
    return sorted(set(out))
