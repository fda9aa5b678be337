"""Commissioning: the installer's live checks on real buses, and the walk test's report.

* :func:`scan` probes unit ids on a serial port or a TCP serial server and says which profile fits.
* :class:`Session` runs the configured buses (or some of their devices) outside the daemon, for
  ``device test`` and ``walktest``: every value read, every change, every availability change.
* :class:`WalkTest` ticks off each zone and door as the installer trips it; :func:`render_report`
  turns the result into an HTML report for the property office.

The daemon must not be running on the same serial port (one owner per bus); the CLI checks that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from devices.events import Availability, DeviceEvent, PointChanged, WritePoint, WriteResult
from devices.modbus import BusSpec, DeviceSpec, ModbusBus, ScanHit, scan_bus
from devices.profiles import GroupSpec, Profile, ProfileError, find_profile, list_profiles
from gateway import __version__, wire
from gateway.config import BusConfig, DeviceConfig, GatewayConfig


def bus_spec(b: BusConfig, *, timeout_ms: int | None = None) -> BusSpec:
    return BusSpec(
        name=b.name, kind=b.kind, host=b.host, port=b.port, serial=b.serial, baudrate=b.baudrate, parity=b.parity,
        stopbits=b.stopbits, timeout_ms=timeout_ms or b.timeout_ms, retries=b.retries,
        offline_after_misses=b.offline_after_misses, inter_frame_ms=b.inter_frame_ms,
    )


def device_spec(d: DeviceConfig, profiles_dir: str | None = None, *, every_group: bool = False) -> DeviceSpec:
    profile = find_profile(d.profile, extra_dir=profiles_dir)
    if every_group:
        profile = poll_every_group(profile)
    return DeviceSpec(name=d.name, profile=profile, unit=d.unit, poll_ms=d.poll_ms)


def poll_every_group(profile: Profile) -> Profile:
    """The profile with its unpolled groups (configuration, identification) polled too, for a test
    that reads every point once."""
    groups = {n: g if g.poll else GroupSpec(g.name, g.poll_ms or 1000, True) for n, g in profile.groups.items()}
    return dataclasses.replace(profile, groups=groups)


def is_active(value: object, invert: bool = False) -> bool:
    active = bool(value) if isinstance(value, bool | int | float) else False
    return active != invert


# ---------------------------------------------------------------- bus scan


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


async def scan(spec: BusSpec, units: Sequence[int], profiles: Sequence[Profile],
               progress: Callable[[int, int], None] | None = None,
               clock: Callable[[], float] = time.monotonic) -> ScanResult:
    """Probe ``units`` one by one; ``progress(done, total)`` as each one is reached."""
    total = len(units)

    def tracked() -> Iterator[int]:
        # scan_bus takes the next id only when it is done with the last one: that is our progress.
        for i, u in enumerate(units):
            if progress is not None:
                progress(i, total)
            yield u

    t0 = clock()
    hits = await scan_bus(spec, tracked(), profiles, clock=clock)
    if progress is not None:
        progress(total, total)
    return ScanResult(hits, total, clock() - t0)


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


# ---------------------------------------------------------------- a live session on the configured buses


class Session:
    """The configured buses running outside the daemon, for some or all devices.

    Values and availability are kept per device; every event also goes to :attr:`events`."""

    def __init__(self, cfg: GatewayConfig, devices: Sequence[str] | None = None, *, every_group: bool = False,
                 timeout_ms: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        wanted = set(devices) if devices is not None else {d.name for d in cfg.devices}
        self.devices = [d for d in cfg.devices if d.name in wanted]
        self.specs = {d.name: device_spec(d, cfg.profiles_dir, every_group=every_group) for d in self.devices}
        self.values: dict[str, dict[str, Any]] = {d.name: {} for d in self.devices}
        self.states: dict[str, str] = {d.name: "unknown" for d in self.devices}
        self.events: asyncio.Queue[DeviceEvent] = asyncio.Queue()
        self.changed = asyncio.Event()
        self._clock = clock
        self._timeout_ms = timeout_ms
        self.buses: dict[str, ModbusBus] = {}
        self._stack = contextlib.AsyncExitStack()

    def _sink(self, ev: DeviceEvent) -> None:
        if isinstance(ev, PointChanged) and ev.device in self.values:
            self.values[ev.device][ev.point] = ev.value
        elif isinstance(ev, Availability) and ev.device in self.states:
            self.states[ev.device] = ev.state
        self.events.put_nowait(ev)
        self.changed.set()

    async def __aenter__(self) -> Session:
        buses = {b.name: b for b in self.cfg.buses}
        try:
            for bus_name in dict.fromkeys(d.bus for d in self.devices):
                specs = [self.specs[d.name] for d in self.devices if d.bus == bus_name]
                bus = ModbusBus(bus_spec(buses[bus_name], timeout_ms=self._timeout_ms), specs, self._sink,
                                clock=self._clock)
                self.buses[bus_name] = await self._stack.enter_async_context(bus)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def expected_points(self, device: str) -> set[str]:
        spec = self.specs[device]
        polled = {g.name for g in spec.profile.polled_groups()}
        return {p.name for p in spec.profile.points.values() if p.group in polled}

    def complete(self, device: str) -> bool:
        return self.expected_points(device) <= set(self.values[device]) or self.states[device] == "offline"

    async def wait_first_values(self) -> None:
        """Until every device has given every point once or has been found offline (bound it with
        ``asyncio.timeout``: a device that refuses some reads never completes)."""
        while not all(self.complete(d.name) for d in self.devices):
            self.changed.clear()
            await self.changed.wait()

    async def write(self, cmd: WritePoint) -> WriteResult:
        dev = next(d for d in self.devices if d.name == cmd.device)
        return await self.buses[dev.bus].write(cmd)

    def bus_of(self, device: str) -> ModbusBus:
        return self.buses[next(d.bus for d in self.devices if d.name == device)]


# ---------------------------------------------------------------- walk test


@dataclass
class WalkItem:
    """One thing to trip: a zone's input, a door's contact or its exit button."""

    key: str  # "zone north-fence", "door b3-u2 contact"
    kind: Literal["zone", "door contact", "exit button"]
    name: str
    device: str
    point: str
    invert: bool = False
    label: str = ""
    place: str = ""
    detail: str = ""  # zone type
    tripped_at: datetime | None = None
    tripped_after_s: float | None = None
    restored_at: datetime | None = None
    active: bool | None = None  # last seen
    initially_active: bool = False

    @property
    def done(self) -> bool:
        return self.tripped_at is not None and self.restored_at is not None

    @property
    def result(self) -> str:
        if self.done:
            return "ok"
        if self.tripped_at is not None:
            return "tripped, not restored"
        return "not tested"


def _place(p: Any) -> str:
    if p is None:
        return ""
    return "/".join(x for x in (p.building, p.unit, p.house) if x)


def walk_items(cfg: GatewayConfig, zones: Iterable[str] | None = None, doors: bool = True) -> list[WalkItem]:
    wanted = set(zones) if zones is not None else None
    items = []
    for z in cfg.zones:
        if wanted is not None and z.name not in wanted:
            continue
        items.append(WalkItem(f"zone {z.name}", "zone", z.name, z.device, z.point, z.invert, z.label,
                              _place(z.place), z.type))
    if doors:
        for d in cfg.doors:
            if d.contact:
                items.append(WalkItem(f"door {d.name} contact", "door contact", d.name, d.device, d.contact,
                                      "contact" in d.invert, d.label, _place(d.place), "open the door"))
            if d.exit_button:
                items.append(WalkItem(f"door {d.name} exit button", "exit button", d.name, d.device, d.exit_button,
                                      "exit_button" in d.invert, d.label, _place(d.place), "press the button"))
    return items


@dataclass
class WalkTest:
    """Feeds point changes to the items; an item is done once it went active and quiet again."""

    items: list[WalkItem]
    wall: Callable[[], datetime] = wire.utcnow
    clock: Callable[[], float] = time.monotonic
    started_mono: float = field(default=0.0)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    by: str = ""
    offline: dict[str, str] = field(default_factory=dict)  # device -> reason, while offline

    def start(self) -> None:
        self.started_mono = self.clock()
        self.started_at = self.wall()

    def initial(self, values: dict[str, dict[str, Any]]) -> list[WalkItem]:
        """Record the first values; returns the items that are already active (to be cleared first)."""
        busy = []
        for it in self.items:
            v = values.get(it.device, {}).get(it.point)
            if v is not None:
                it.active = is_active(v, it.invert)
                if it.active:
                    it.initially_active = True
                    busy.append(it)
        return busy

    def feed(self, ev: DeviceEvent) -> list[tuple[WalkItem, str]]:
        """Apply one device event; returns (item, "tripped" | "restored") for what it changed."""
        out: list[tuple[WalkItem, str]] = []
        if isinstance(ev, Availability):
            if ev.state == "offline":
                self.offline[ev.device] = ev.reason
            else:
                self.offline.pop(ev.device, None)
            return out
        if not isinstance(ev, PointChanged):
            return out
        for it in self.items:
            if it.device != ev.device or it.point != ev.point:
                continue
            active = is_active(ev.value, it.invert)
            was = it.active
            it.active = active
            if active and not was and it.tripped_at is None:
                it.tripped_at = self.wall()
                it.tripped_after_s = round(self.clock() - self.started_mono, 1)
                out.append((it, "tripped"))
            elif not active and was and it.tripped_at is not None and it.restored_at is None:
                it.restored_at = self.wall()
                out.append((it, "restored"))
            elif not active and was:
                it.initially_active = False
        return out

    @property
    def complete(self) -> bool:
        return all(it.done for it in self.items)

    def summary(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "by": self.by,
            "items": [{"key": it.key, "kind": it.kind, "name": it.name, "device": it.device, "point": it.point,
                       "label": it.label, "place": it.place, "detail": it.detail, "result": it.result,
                       "tripped_at": it.tripped_at.isoformat() if it.tripped_at else None,
                       "tripped_after_s": it.tripped_after_s,
                       "restored_at": it.restored_at.isoformat() if it.restored_at else None}
                      for it in self.items],
            "tested": sum(it.done for it in self.items),
            "total": len(self.items),
        }


def render_report(cfg: GatewayConfig, walk: WalkTest, devices: Sequence[dict[str, Any]]) -> str:
    """A self-contained HTML page (no scripts, no external files) to print or mail to the property office.
    The machine-readable result is embedded as JSON too."""
    tz = ZoneInfo(cfg.alarm.timezone)
    esc = html.escape

    def when(t: datetime | None) -> str:
        return t.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S") if t else "—"

    summary = walk.summary()
    rows = []
    for i, it in enumerate(walk.items, 1):
        cls = "ok" if it.done else "bad"
        rows.append(
            f"<tr class='{cls}'><td>{i}</td><td>{esc(it.kind)}</td><td>{esc(it.name)}</td><td>{esc(it.label)}</td>"
            f"<td>{esc(it.place)}</td><td>{esc(it.device)}.{esc(it.point)}</td><td>{esc(it.detail)}</td>"
            f"<td>{when(it.tripped_at)}</td><td>{when(it.restored_at)}</td><td>{esc(it.result)}</td></tr>")
    dev_rows = "".join(
        f"<tr><td>{esc(d['name'])}</td><td>{esc(d['profile'])}</td><td>{esc(d['bus'])}</td><td>{d['unit']}</td>"
        f"<td>{esc(d['state'])}</td></tr>" for d in devices)
    data = json.dumps(summary, ensure_ascii=False).replace("</", "<\\/")
    ok = summary["tested"] == summary["total"]
    return f"""<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8">
<title>调试报告 Commissioning report — {esc(cfg.site)}/{esc(cfg.gateway)}</title>
<style>
body {{ font-family: "Noto Sans CJK SC", "Noto Sans", sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; width: 100%; margin-bottom: 2em; }}
th, td {{ border: 1px solid #999; padding: .3em .5em; text-align: left; font-size: 90%; }}
tr.bad td {{ background: #fdd; }} tr.ok td:last-child {{ color: #060; }}
.verdict {{ font-size: 120%; font-weight: bold; color: {'#060' if ok else '#a00'}; }}
</style></head><body>
<h1>调试报告 Commissioning report</h1>
<p>Site <b>{esc(cfg.site)}</b>, gateway <b>{esc(cfg.gateway)}</b>, Gatehouse {esc(__version__)}<br>
Walk test from {when(walk.started_at)} to {when(walk.finished_at)} ({esc(cfg.alarm.timezone)})
{f"<br>Tested by {esc(walk.by)}" if walk.by else ""}</p>
<p class="verdict">{summary['tested']} of {summary['total']} points tested
{'— all passed' if ok else '— NOT COMPLETE'}</p>
<h2>Points 测试点</h2>
<table><tr><th>#</th><th>Kind</th><th>Name</th><th>Label</th><th>Place</th><th>Device point</th><th>Type</th>
<th>Tripped</th><th>Restored</th><th>Result</th></tr>
{''.join(rows)}
</table>
<h2>Devices 设备</h2>
<table><tr><th>Device</th><th>Profile</th><th>Bus</th><th>Unit</th><th>State at the end</th></tr>{dev_rows}</table>
<p>Signature of the installer: ____________________ &nbsp; Property office: ____________________</p>
<script type="application/json" id="walktest">{data}</script>
</body></html>
"""


@contextlib.asynccontextmanager
async def stop_on_signals() -> AsyncIterator[asyncio.Event]:
    """An event set by SIGINT or SIGTERM while the block runs (so a report is still written)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGINT, signal.SIGTERM)
    for s in sigs:
        loop.add_signal_handler(s, stop.set)
    try:
        yield stop
    finally:
        for s in sigs:
            loop.remove_signal_handler(s)
