"""Commissioning: the installer's live checks on real buses, and the walk test's report.

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
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from devices.events import Availability, DeviceCheck, DeviceEvent, PointChanged, WritePoint, WriteResult
from devices.modbus import BusDown, DeviceSpec, ModbusBus
from devices.profiles import GroupSpec, Profile
from gateway import __version__, bus_specs, wire
from gateway.alarms import is_active
from gateway.bus_specs import bus_spec
from gateway.config import BusConfig, DeviceConfig, GatewayConfig
from gateway.tooling.output import print_table


def device_spec(d: DeviceConfig, profiles_dir: str | None = None, *, every_group: bool = False) -> DeviceSpec:
    """The daemon's spec of ``d`` (:func:`gateway.bus_specs.device_spec`), with every group polled if asked."""
    spec = bus_specs.device_spec(d, profiles_dir)
    return dataclasses.replace(spec, profile=poll_every_group(spec.profile)) if every_group else spec


def poll_every_group(profile: Profile) -> Profile:
    """The profile with its unpolled groups (configuration, identification) polled too, for a test
    that reads every point once."""
    groups = {n: g if g.poll else GroupSpec(g.name, g.poll_ms or 1000, True) for n, g in profile.groups.items()}
    return dataclasses.replace(profile, groups=groups)


def point_active(value: object, invert: bool = False) -> bool:
    """Whether a point reads active, exactly as the alarm engine decides (:func:`gateway.alarms.is_active`):
    a walk test or a trip test that disagreed with the daemon would pass a zone the daemon never rings for."""
    return is_active(value) != invert


# ---------------------------------------------------------------- a live session on the configured buses


class Session:
    """The configured buses running outside the daemon, for some or all devices.

    Values, availability and the profile check (problems, or none) are kept per device; every event also goes
    to :attr:`events`."""

    def __init__(
        self,
        cfg: GatewayConfig,
        devices: Sequence[str] | None = None,
        *,
        every_group: bool = False,
        timeout_ms: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        wanted = set(devices) if devices is not None else {d.name for d in cfg.devices}
        self.devices = [d for d in cfg.devices if d.name in wanted]
        self.specs = {d.name: device_spec(d, cfg.profiles_dir, every_group=every_group) for d in self.devices}
        self.values: dict[str, dict[str, Any]] = {d.name: {} for d in self.devices}
        self.states: dict[str, str] = {d.name: "unknown" for d in self.devices}
        self.problems: dict[str, tuple[str, ...]] = {}
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
        elif isinstance(ev, DeviceCheck):
            self.problems[ev.device] = ev.problems
        self.events.put_nowait(ev)
        self.changed.set()

    async def __aenter__(self) -> Session:
        buses = {b.name: b for b in self.cfg.buses}
        try:
            for bus_name in dict.fromkeys(d.bus for d in self.devices):
                specs = [self.specs[d.name] for d in self.devices if d.bus == bus_name]
                bus = ModbusBus(
                    bus_spec(buses[bus_name], timeout_ms=self._timeout_ms), specs, self._sink, clock=self._clock
                )
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
        items.append(
            WalkItem(f"zone {z.name}", "zone", z.name, z.device, z.point, z.invert, z.label, _place(z.place), z.type)
        )
    if doors:
        for d in cfg.doors:
            if d.contact:
                items.append(
                    WalkItem(
                        f"door {d.name} contact",
                        "door contact",
                        d.name,
                        d.device,
                        d.contact,
                        "contact" in d.invert,
                        d.label,
                        _place(d.place),
                        "open the door",
                    )
                )
            if d.exit_button:
                items.append(
                    WalkItem(
                        f"door {d.name} exit button",
                        "exit button",
                        d.name,
                        d.device,
                        d.exit_button,
                        "exit_button" in d.invert,
                        d.label,
                        _place(d.place),
                        "press the button",
                    )
                )
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
                it.active = point_active(v, it.invert)
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
            active = point_active(ev.value, it.invert)
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
            "items": [
                {
                    "key": it.key,
                    "kind": it.kind,
                    "name": it.name,
                    "device": it.device,
                    "point": it.point,
                    "label": it.label,
                    "place": it.place,
                    "detail": it.detail,
                    "result": it.result,
                    "tripped_at": it.tripped_at.isoformat() if it.tripped_at else None,
                    "tripped_after_s": it.tripped_after_s,
                    "restored_at": it.restored_at.isoformat() if it.restored_at else None,
                }
                for it in self.items
            ],
            "tested": sum(it.done for it in self.items),
            "total": len(self.items),
        }


KIND_ZH = {"zone": "防区", "door contact": "门磁", "exit button": "出门按钮"}
DETAIL_ZH = {
    "perimeter": "周界",
    "entry": "出入",
    "interior": "内部",
    "panic": "紧急",
    "medical": "医疗求助",
    "fire": "火警",
    "gas": "燃气",
    "tamper": "防拆",
    "fault": "故障",
    "open the door": "开门",
    "press the button": "按下按钮",
}
RESULT_ZH = {"ok": "通过", "tripped, not restored": "已触发，未恢复", "not tested": "未测试"}
STATE_ZH = {"online": "在线", "offline": "离线", "unknown": "未知"}
TEMPLATES = Path(__file__).resolve().parent / "templates"


def render_report(
    cfg: GatewayConfig, walk: WalkTest, devices: Sequence[dict[str, Any]], *, english: bool = False
) -> str:
    """A self-contained HTML page (no scripts, no external files) to print on A4 or mail to the property
    office, in Chinese (``english``: English beside it), from ``templates/walktest.html``. The
    machine-readable result is embedded as JSON too."""
    import jinja2
    from markupsafe import Markup

    tz = ZoneInfo(cfg.alarm.timezone)

    def when(t: datetime | None) -> str:
        return t.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S") if t else "—"

    summary = walk.summary()
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    items = [
        {
            "done": it.done,
            "kind": it.kind,
            "kind_zh": KIND_ZH.get(it.kind, it.kind),
            "name": it.name,
            "label": it.label,
            "place": it.place,
            "device": it.device,
            "point": it.point,
            "detail": it.detail,
            "detail_zh": DETAIL_ZH.get(it.detail, it.detail),
            "tripped": when(it.tripped_at),
            "restored": when(it.restored_at),
            "result": it.result,
            "result_zh": RESULT_ZH.get(it.result, it.result),
        }
        for it in walk.items
    ]
    devs = [{**d, "state_zh": STATE_ZH.get(d["state"], d["state"])} for d in devices]
    return (
        env.get_template("walktest.html").render(
            english=english,
            estate=cfg.site_name or cfg.site,
            site=cfg.site,
            gateway=cfg.gateway,
            version=__version__,
            started=when(walk.started_at),
            finished=when(walk.finished_at),
            timezone=cfg.alarm.timezone,
            by=walk.by,
            tested=summary["tested"],
            total=summary["total"],
            complete=summary["tested"] == summary["total"],
            items=items,
            devices=devs,
            data=Markup(json.dumps(summary, ensure_ascii=False).replace("</", "<\\/")),  # JSON with "</" escaped
        )
        + "\n"
    )


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


# ---------------------------------------------------------------- the live loops of `device test` and `walktest`


async def run_device_test(
    cfg: GatewayConfig,
    dev: DeviceConfig,
    bus: BusConfig,
    *,
    wait: float,
    pulse: str | None = None,
    ms: int = 1000,
    trip: str | None = None,
    countdown: int = 30,
) -> int:
    """``gatehouse device test``: read every point of one device live, show the profile check, pulse a relay
    (``pulse`` for ``ms``) and wait up to ``countdown`` s for a zone or point to trip and restore (``trip``).
    Prints as it goes; the exit status: 0 when all of it passed."""
    async with Session(cfg, [dev.name], every_group=True) as s:
        spec = s.specs[dev.name]
        where = f"unit {dev.unit} on bus {bus.name} ({s.buses[bus.name].spec.endpoint()})"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await s.wait_first_values()
        values = s.values[dev.name]
        if not values:
            print(
                f"device test: no answer from {dev.name} ({where}) within {wait:g} s: check its unit id "
                "(gatehouse bus scan), the wiring, and that its baud rate matches the bus",
                file=sys.stderr,
            )
            return 1
        stats = s.bus_of(dev.name).stats().devices[dev.name]
        lat = f", last answer in {stats.last_latency_ms:.0f} ms" if stats.last_latency_ms is not None else ""
        print(f"device {dev.name}: {spec.profile.name}, {where}: {s.states[dev.name]}{lat}")
        used = {z.point: f"zone {z.name}" for z in cfg.zones if z.device == dev.name}
        for d in cfg.doors:
            if d.device == dev.name:
                used.update({d.relay: f"door {d.name} relay"})
                if d.contact:
                    used[d.contact] = f"door {d.name} contact"
                if d.exit_button:
                    used[d.exit_button] = f"door {d.name} exit button"
        table = [("  POINT", "KIND", "VALUE", "USED BY")]
        for p in spec.profile.points.values():
            v = values.get(p.name)
            shown = "(not read)" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
            table.append((f"  {p.name}", p.kind, shown, used.get(p.name, "-")))
        print_table(table)
        missing = [p for p in spec.profile.points if p not in values]
        rc = 0
        if missing:
            print(f"{len(missing)} points not read: the device refused or did not answer those reads", file=sys.stderr)
        problems = s.problems.get(dev.name)
        if problems:
            print(
                f"device test: {dev.name} is not set up as its profile {spec.profile.name} expects "
                f"(see docs/profiles.md); the gateway reports it as a device fault:",
                file=sys.stderr,
            )
            for why in problems:
                print(f"  {why}", file=sys.stderr)
            rc = 1
        elif problems is not None:
            print("settings: as the profile expects", flush=True)
        if pulse:
            try:
                res = await s.write(WritePoint(dev.name, pulse, True, token="device-test", pulse_ms=ms))
            except BusDown as e:
                print(f"device test: pulse {pulse}: {e}", file=sys.stderr)
                return 1
            print(f"pulse {pulse} for {ms} ms: {'on' if res.ok else 'FAILED: ' + res.detail}", flush=True)
            if res.ok and not await _pulse_ended(s, dev.name, pulse, ms, own=spec.profile.pulse is not None):
                print(f"device test: {pulse} may still be on: the reset was not confirmed", file=sys.stderr)
                return 1
            rc = rc or (0 if res.ok else 1)
            if not res.ok and res.failure == "not_moved":
                print(
                    f"device test: {pulse} was answered but did not move: check the board's control mode "
                    "for it (a relay in linkage, toggle or edge mode follows its input, not the gateway)",
                    file=sys.stderr,
                )
        if trip:
            zone = next((z for z in cfg.zones if z.device == dev.name and z.name == trip), None)
            point, invert = (zone.point, zone.invert) if zone else (trip, False)
            if point not in spec.profile.points:
                print(
                    f"device test: --trip {trip!r} is neither a zone of {dev.name} nor one of its points",
                    file=sys.stderr,
                )
                return 2
            while not s.events.empty():
                s.events.get_nowait()
            what = f"zone {zone.name} ({point})" if zone else point
            if point_active(values.get(point), invert):
                print(f"{what} is active now; clear it, then trip it", flush=True)
            print(f"trip {what} now: waiting {countdown} s", flush=True)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            deadline = t0 + countdown
            tripped_at = None
            next_tick = t0 + 5
            while loop.time() < deadline:
                try:
                    async with asyncio.timeout(max(0.0, min(deadline, next_tick) - loop.time())):
                        ev = await s.events.get()
                except TimeoutError:
                    if loop.time() >= next_tick:
                        print(f"  {max(0, round(deadline - loop.time()))} s left", flush=True)
                        next_tick += 5
                    continue
                if isinstance(ev, PointChanged) and ev.device == dev.name and ev.point == point:
                    active = point_active(ev.value, invert)
                    if active and tripped_at is None:
                        tripped_at = loop.time()
                        print(
                            f"tripped after {tripped_at - t0:.1f} s ({point} = {str(ev.value).lower()}); "
                            "now let it restore",
                            flush=True,
                        )
                    elif not active and tripped_at is not None:
                        print(f"restored after {loop.time() - tripped_at:.1f} s", flush=True)
                        break
            else:
                state = "tripped but did not restore" if tripped_at is not None else "not tripped"
                print(f"device test: {what} {state} within {countdown} s", file=sys.stderr)
                rc = 1
    return rc


async def _pulse_ended(s: Any, device: str, point: str, ms: int, *, own: bool) -> bool:
    """Wait for the end of a pulse before the test lets go of the bus (which would cancel the reset)."""
    try:
        async with asyncio.timeout(ms / 1000 + 5.0):
            if own:
                # The device times the pulse itself: wait it out, then see the output read back as off.
                await asyncio.sleep(ms / 1000)
                while s.values[device].get(point) not in (False, 0):
                    ev = await s.events.get()
                    if isinstance(ev, PointChanged) and ev.point == point and not ev.value:
                        break
            else:
                while True:
                    ev = await s.events.get()
                    if isinstance(ev, WriteResult) and ev.token == "device-test:reset":
                        if not ev.ok:
                            return False
                        break
    except TimeoutError:
        return False
    print(f"pulse {point}: off again", flush=True)
    return True


async def run_walk_test(
    cfg: GatewayConfig,
    items: list[WalkItem],
    *,
    wait: float,
    give_up_s: float,
    by: str = "",
    report: str | None = None,
    english: bool = False,
) -> int:
    """``gatehouse walktest``: tick off each item as the installer trips and restores it, until all are done,
    ``give_up_s`` have passed or SIGINT/SIGTERM; then write the report (default
    ``walktest-SITE-GATEWAY-DATE.html``). Prints as it goes; the exit status: 0 when every item passed."""
    from gateway import wire

    walk = WalkTest(items, by=by)
    devices = sorted({it.device for it in items})
    report_path = Path(report or f"walktest-{cfg.site}-{cfg.gateway}-{_today()}.html")
    refused = report_unwritable(report_path)
    if refused is not None:  # before the walk, not after half an hour of it
        print(f"walktest: {refused}", file=sys.stderr)
        return 2
    async with stop_on_signals() as stop, Session(cfg, devices) as s:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await s.wait_first_values()
        for d in devices:
            if s.states[d] != "online":
                print(
                    f"warning: device {d} is {s.states[d]}: its points cannot be tested until it answers",
                    file=sys.stderr,
                    flush=True,
                )
        walk.start()
        for it in walk.initial(s.values):
            print(f"  {it.key} is active now: clear it; it counts once it is quiet and trips again", flush=True)
        print(
            f"walk test of {cfg.site}/{cfg.gateway}: {len(items)} points; trip each in turn "
            f"(Ctrl-C ends the test and writes the report)",
            flush=True,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + give_up_s
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not walk.complete and not stop.is_set() and loop.time() < deadline:
                getter = asyncio.ensure_future(s.events.get())
                done, _ = await asyncio.wait(
                    [getter, stopper], timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    continue
                for it, what in walk.feed(getter.result()):
                    n = sum(x.done for x in walk.items)
                    extra = f" after {it.tripped_after_s:.1f} s" if what == "tripped" else " ✓"
                    print(f"  [{n}/{len(items)}] {it.key} {what}{extra}", flush=True)
        finally:
            stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopper
        walk.finished_at = wire.utcnow()
        states = {d: s.states[d] for d in devices}
    dev_rows = [
        {"name": d.name, "profile": d.profile, "bus": d.bus, "unit": d.unit, "state": states[d.name]}
        for d in cfg.devices
        if d.name in states
    ]
    text = render_report(cfg, walk, dev_rows, english=english)
    written = await asyncio.to_thread(write_report, report_path, text)
    summary = walk.summary()
    if written is None:
        print(f"{summary['tested']} of {summary['total']} points tested; the report could not be written anywhere:")
        print(text)
    else:
        print(f"{summary['tested']} of {summary['total']} points tested; report: {written}")
    for it in walk.items:
        if not it.done:
            print(f"  not complete: {it.key} ({it.result})", file=sys.stderr)
    return 0 if walk.complete else 1


def report_unwritable(path: Path) -> str | None:
    """Why the report could not be written at ``path`` (its folder missing, not writable, a folder in its place),
    or None. Tried for real: a file is made beside it and removed, so a read-only or full file system shows too."""
    import tempfile

    folder = path.parent
    if path.is_dir():
        return f"cannot write the report to {path}: it is a folder; name a file (--report {path / 'walktest.html'})"
    if not folder.is_dir():
        return f"cannot write the report to {path}: no folder {folder}; make it first, or name another --report"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        return f"cannot write the report to {path}: {e.strerror or e} in {folder}; name another --report"
    return None


def write_report(path: Path, text: str) -> Path | None:
    """Write the report atomically at ``path``; when that fails (the disk filled up, the stick was pulled), at the
    same name in the temporary folder and then in the home folder, saying why on stderr. The path written, or None
    when nothing could be (the caller then prints the report itself)."""
    import tempfile

    from gateway.tooling.provision.base import write_file

    data = text.encode()
    first_error: OSError | None = None
    for where in (path, Path(tempfile.gettempdir()) / path.name, Path.home() / path.name):
        try:
            write_file(where, data, 0o644)
        except OSError as e:
            first_error = first_error or e
            continue
        if first_error is not None:
            print(
                f"walktest: could not write the report to {path} ({first_error.strerror or first_error}); "
                f"it is in {where} instead",
                file=sys.stderr,
            )
        return where
    print(f"walktest: could not write the report to {path} ({first_error})", file=sys.stderr)
    return None


def _today() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y%m%d-%H%M")
