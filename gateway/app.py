"""The gateway daemon: wires the store, the device buses, the engines and the uplink together.

Start-up order: store → uplink → engines → buses (producers last); shutdown is the reverse, each
step tried and logged even if an earlier one failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from common.sdnotify import Notifier
from common.tasks import cancel_and_wait
from devices.events import DeviceEvent, WritePoint, WriteResult
from devices.modbus import ModbusBus
from gateway import wire
from gateway.alarms import COMMANDS as ENGINE_COMMANDS
from gateway.alarms import UNMAPPED_KINDS, AlarmEngine, AlarmStateError, rows_to_snapshot
from gateway.bus_specs import bus_spec, device_spec
from gateway.commands import CommandGuard, Refusal
from gateway.config import ContactIdLineConfig, GatewayConfig, ReaderConfig
from gateway.events import Draft
from gateway.loadgen import run_loadgen
from gateway.localapi import serve_local_api
from gateway.point_events import PointReporter
from gateway.store import STALL_ENV, CorruptReplaced, Store, commit_stall, replace_if_corrupt
from gateway.uplink import Uplink

if TYPE_CHECKING:  # imported by _make_doors when doors or readers are configured (passes bring cryptography, ~7 MB)
    from gateway.access import AccessDecider
    from gateway.doors import DoorService

log = logging.getLogger(__name__)

ENGINE_STATE = "alarm_engine"  # the whole state in one row (before incremental rows; read for an upgrade)
ENGINE_ROWS = "alarm_engine/"  # one row per part of the engine's state (see AlarmEngine.delta)
ENGINE_BATCH = 500
DEVICE_BACKLOG_WARN = 100_000
CLOCK_SYNC_ENV = "GATEHOUSE_CLOCK_SYNC"
CLOCK_CHECK_S = 1.0
BUS_CHECK_S = 5.0  # how often the buses' poll loops are checked for a stall (ModbusBus.stalled_for)
STALLED_STATE = "bus_stalled/"  # the store's state: a stuck bus's open incident, by the bus's name
_TIME_ERROR = 5  # adjtimex(2): the kernel's clock is not synchronised


def kernel_clock_synced() -> bool:
    """The kernel's NTP status (what ``timedatectl`` shows as "System clock synchronized"): adjtimex(2)
    in read-only mode (``modes`` 0), so it needs no privilege."""
    buf = ctypes.create_string_buffer(512)  # struct timex is 208 bytes on 64-bit Linux; zeroed: modes 0
    state = ctypes.CDLL(None, use_errno=True).adjtimex(buf)
    if state < 0:
        raise OSError(ctypes.get_errno(), "adjtimex failed")
    return bool(state != _TIME_ERROR)


def clock_sync_source(spec: str | None) -> Callable[[], bool] | None:
    """How the gateway learns whether its wall clock is synchronised, from ``GATEHOUSE_CLOCK_SYNC``:

    * unset or ``assume``: it is taken as synchronised (None: nothing to watch);
    * ``kernel``: the kernel's NTP status (chrony, ntpd and systemd-timesyncd all set it);
    * ``file:PATH``: synchronised while PATH exists (a time daemon that signals by a file, and tests).

    While it is not, passes are judged by :mod:`gateway.access`'s rules for an unsynchronised clock and a
    command's expiry by a lower bound on the true time (see :class:`ClockWatch`).
    """
    if spec is None or spec in ("", "assume"):
        return None
    if spec == "kernel":
        kernel_clock_synced()  # fails here, at start-up, where adjtimex is missing
        return kernel_clock_synced
    if spec.startswith("file:") and len(spec) > 5:
        return Path(spec[5:]).exists
    raise ValueError(f"{CLOCK_SYNC_ENV}={spec!r}: expected assume, kernel or file:PATH")


class ClockWatch:
    """Whether the wall clock is known to be synchronised, and a lower bound on the true time: the last
    wall reading taken while it was, advanced by the monotonic clock since (0 if it never was)."""

    def __init__(
        self,
        source: Callable[[], bool] | None,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._wall = wall
        self._mono = mono
        self.synced = True
        self._floor, self._floor_mono = 0.0, mono()
        self.check()

    @property
    def watching(self) -> bool:
        return self._source is not None

    def check(self) -> bool:
        """Read the source again; True if the state changed."""
        was = self.synced
        if self._source is not None:
            try:
                self.synced = bool(self._source())
            except OSError as e:
                log.warning("clock sync state unreadable (%s): taken as not synchronised", e)
                self.synced = False
        if self.synced:
            self._floor, self._floor_mono = self._wall(), self._mono()
        if self.synced != was:
            log.warning("wall clock %s", "synchronised" if self.synced else "NOT synchronised")
        return self.synced != was

    def floor(self) -> float:
        return self._floor + (self._mono() - self._floor_mono)


class Gateway:
    def __init__(self, cfg: GatewayConfig, clock_synced: Callable[[], bool] | None = None) -> None:
        self.cfg = cfg
        self.clock = ClockWatch(clock_synced)
        self.store = Store(
            cfg.data_path(cfg.store.path),
            site=cfg.site,
            gateway=cfg.gateway,
            batch_max=cfg.store.batch_max,
            retention_days=cfg.store.retention_days,
            retention_rows=cfg.store.retention_rows,
            ring_max=cfg.store.ring_max,
            stall=commit_stall(os.environ.get(STALL_ENV)),
        )
        self.uplink = Uplink(cfg, self.store, on_command=self._on_command)
        self.commands = CommandGuard(
            cfg.site, cfg.gateway, lambda: _load_public_keys(cfg.access.public_keys), seen=self.store.seen_command
        )
        self._refusal_flush: asyncio.TimerHandle | None = None
        self.store.on_fault = self.uplink.set_fault  # a full disk reaches the portal in the retained status
        self.store.on_urgent = self.uplink.send_now  # alarms go out before their commit
        self.engine: AlarmEngine | None = None  # made once the store has given back its saved state
        self.points = PointReporter(cfg)
        self.doors: DoorService | None = None  # likewise, when doors or readers are configured
        self.decider: AccessDecider | None = None
        # Unbounded: a device event may be the alarm (the sink cannot tell), and the engine that takes them runs on
        # this loop without ever waiting, so only a stalled loop lets it grow; past DEVICE_BACKLOG_WARN it says so.
        self._device_events: asyncio.Queue[DeviceEvent] = asyncio.Queue()
        self._backlog_warned = False
        self.drivers: dict[str, Any] = {}  # name -> running bus or line, for status and metrics
        self.stalled: dict[str, str] = {}  # buses whose poll loop is stuck -> the incident id of their bus.stalled
        self._buses = self._make_buses()
        self._bus_of_device = {name: b for b in self._buses for name in b.device_names}
        self.started = time.monotonic()
        self.ready = asyncio.Event()

    # ------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        async with self.store:
            if self.store.replaced is not None:
                self._report_replaced("store", self.store.replaced)
            self.engine = await self._restore_engine()
            try:
                self.doors = await self._make_doors()
                async with asyncio.TaskGroup() as tg:
                    name = f"gateway[{self.cfg.gateway}]"
                    uplink = tg.create_task(self.uplink.run(), name=f"{name}.uplink")
                    engine = tg.create_task(self._engine_loop(), name=f"{name}.engine")
                    engines = [engine, tg.create_task(self._watch_buses(), name=f"{name}.bus-watch")]
                    if self.clock.watching:
                        engines.append(tg.create_task(self._watch_clock(), name=f"{name}.clock"))
                    if self.doors is not None:
                        engines.append(tg.create_task(self.doors.run(), name=f"{name}.doors"))
                    producers = [
                        tg.create_task(self._run_contact_id_line(c), name=f"{name}.cid[{c.name}]")
                        for c in self.cfg.contact_id_lines
                    ]
                    producers += [
                        tg.create_task(self._run_reader_line(serial, readers), name=f"{name}.qr[{serial}]")
                        for serial, readers in self._reader_lines().items()
                    ]
                    producers += [
                        tg.create_task(self._run_bus(b), name=f"{name}.bus[{b.spec.name}]") for b in self._buses
                    ]
                    if self.cfg.loadgen is not None:
                        producers.append(
                            tg.create_task(
                                run_loadgen(self.cfg.loadgen, self.store, self.cfg.site), name=f"{name}.loadgen"
                            )
                        )
                    self.ready.set()
                    log.info("gateway %s/%s ready", self.cfg.site, self.cfg.gateway)
                    await stop.wait()
                    log.info("gateway stopping")
                    for step, tasks in (("producers", producers), ("engines", engines)):
                        await cancel_and_wait(step, tasks)
                    log.debug("stopping: producers and engines stopped; draining the store")
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.store.drain(), 5)
                    log.debug("stopping: saying offline")
                    with contextlib.suppress(Exception):
                        await self.uplink.close()
                    log.debug("stopping: closing the uplink")
                    await cancel_and_wait("uplink", [uplink])
                    log.debug("stopping: closing the store")
            finally:
                if self._refusal_flush is not None:
                    self._refusal_flush.cancel()
                    self._refusal_flush = None
                if self.decider is not None:
                    self.decider.close()
                log.info("gateway stopped; %d events wait in the outbox", await _safe_depth(self.store))

    async def _watch_clock(self) -> None:
        """Follow the clock's sync state into the access decider (which keeps its own time floor)."""
        while True:
            self.clock.check()
            if self.decider is not None:
                self.decider.set_clock_synced(self.clock.synced)
            await asyncio.sleep(CLOCK_CHECK_S)

    def device_sink(self, ev: DeviceEvent) -> None:
        """Called by the drivers on the loop; never blocks."""
        if self.doors is not None:
            try:
                self.doors.on_device_event(ev)
            except Exception:
                log.exception("doors: failed on %s", ev)
        self._device_events.put_nowait(ev)
        backlog = self._device_events.qsize()
        if backlog >= DEVICE_BACKLOG_WARN and not self._backlog_warned:
            self._backlog_warned = True
            log.warning("%d device events wait for the alarm engine", backlog)
        elif backlog < DEVICE_BACKLOG_WARN // 2:
            self._backlog_warned = False

    def _make_buses(self) -> list[ModbusBus]:
        """One ModbusBus per configured bus, with its devices and their profiles (checked by config.load)."""
        buses = []
        for b in self.cfg.buses:
            devices = [device_spec(d, self.cfg.profiles_dir) for d in self.cfg.devices if d.bus == b.name]
            buses.append(ModbusBus(bus_spec(b), devices, self.device_sink))
        return buses

    async def _watch_buses(self) -> None:
        """A bus whose poll loop has stopped moving (its thread or task stuck: nothing on it is watched any more) is
        a fault incident on the console (``bus.stalled``, restored by ``bus.stalled_restore``), and
        :meth:`problem` stops the systemd watchdog being fed, so that systemd restarts the gateway: a stuck thread
        cannot be stopped from outside.

        The open incidents are kept in the store with their events, so that the gateway restarted for them closes
        them: once the bus has gone round for a whole stall limit since the start (or at once, if the bus is no
        longer configured). A bus stuck again before that carries on its incident, without a second opening."""
        carried: dict[str, str] = await self.store.get_states(STALLED_STATE)
        if carried:
            log.warning("bus stalls open before this start: %s", ", ".join(sorted(carried)))
        loop = asyncio.get_running_loop()
        began = loop.time()
        by_name = {b.spec.name: b for b in self._buses}
        for name in [n for n in carried if n not in by_name]:
            self._bus_draft("bus.stalled_restore", name, [], carried.pop(name), None, removed=True)
        while True:
            await asyncio.sleep(BUS_CHECK_S)
            for bus in self._buses:
                name, silent = bus.spec.name, bus.stalled_for()
                if silent is not None and name not in self.stalled:
                    was = carried.pop(name, None)
                    incident = self.stalled[name] = was or f"bus-{name}-{time.time_ns() // 1_000_000}"
                    log.error(
                        "bus %s: its poll loop has not moved for %.0f s (stuck); devices %s are not watched%s",
                        name,
                        silent,
                        ", ".join(bus.device_names),
                        "; stuck again since the restart (incident still open)" if was else "",
                    )
                    if was is None:
                        self._bus_draft("bus.stalled", name, bus.device_names, incident, silent)
                elif silent is None and name in self.stalled and bus.beating:  # not a bus stopping
                    incident = self.stalled.pop(name)
                    log.warning("bus %s: its poll loop moves again", name)
                    self._bus_draft("bus.stalled_restore", name, bus.device_names, incident, None)
                elif silent is None and name in carried and bus.beating and loop.time() - began >= bus.stall_limit_s:
                    log.warning("bus %s: its poll loop moves since the restart; its stall is restored", name)
                    self._bus_draft(
                        "bus.stalled_restore", name, bus.device_names, carried.pop(name), None, after_restart=True
                    )

    def _bus_draft(
        self, kind: str, bus: str, devices: list[str], incident: str, silent: float | None, **how: bool
    ) -> None:
        """A stalled bus's event, or its restore: paired by their incident id, as the alarm engine's are. The open
        incident is kept in the store's state in the same transaction (:meth:`_watch_buses`)."""
        data: dict[str, Any] = {"incident": incident, "count": 1, "bus": bus, "devices": devices}
        if silent is not None:
            data["silent_s"] = round(silent, 1)
        else:
            data["how"] = "restored"
            data.update(how)
        place = wire.Place(site=self.cfg.site)
        self.store.submit(
            [
                Draft(
                    type=kind,
                    device="gateway",
                    point=bus,
                    place=place,
                    priority=wire.Priority.FAULT,
                    data=data,
                )
            ],
            state={STALLED_STATE + bus: incident if silent is not None else None},
        )

    def problem(self) -> str | None:
        """Why the gateway is not doing its job although its loop runs (a bus stuck), or None: the systemd watchdog
        is fed only while None."""
        if not self.stalled:
            return None
        return "bus poll loop stuck: " + ", ".join(sorted(self.stalled))

    async def _run_bus(self, bus: ModbusBus) -> None:
        async with bus:
            self.drivers[bus.spec.name] = bus
            try:
                await asyncio.Future()
            finally:
                self.drivers.pop(bus.spec.name, None)

    async def write(self, cmd: WritePoint) -> WriteResult:
        """A write to a device's point, ahead of any poll on its bus. Raises BusDown while the link is down."""
        bus = self._bus_of_device.get(cmd.device)
        if bus is None:
            return WriteResult(
                device=cmd.device,
                point=cmd.point,
                token=cmd.token,
                ok=False,
                mono=time.monotonic(),
                detail="no such device",
            )
        return await bus.write(cmd)

    async def _run_contact_id_line(self, c: ContactIdLineConfig) -> None:
        from devices.cid_receiver import ContactIdLine  # serial lines load pyserial only where there are some

        line = ContactIdLine(
            c.name,
            c.serial,
            self.device_sink,
            mode=c.mode,
            baudrate=c.baudrate,
            bytesize=c.bytesize,
            parity=c.parity,
            stopbits=c.stopbits,
            silence_timeout=c.silence_timeout_s,
        )
        async with line:
            self.drivers[c.name] = line
            try:
                await asyncio.Future()  # the line runs its own tasks until we are cancelled
            finally:
                self.drivers.pop(c.name, None)

    async def _make_doors(self) -> DoorService | None:
        """The door engine with its access decider (opened here, on the loop's thread, which then owns
        its SQLite connection) and its saved state."""
        if not self.cfg.doors and not self.cfg.readers:
            return None
        from gateway.access import AccessDecider
        from gateway.doors import STATE_KEY as DOORS_STATE
        from gateway.doors import DoorEngine, DoorService

        replaced = await asyncio.to_thread(replace_if_corrupt, Path(self.cfg.data_dir) / self.cfg.access.db)
        if replaced is not None:
            self._report_replaced("access database", replaced)
        self.decider = AccessDecider.open(self.cfg, wall=time.time, mono=time.monotonic)
        self.decider.set_clock_synced(self.clock.synced)
        engine = DoorEngine(self.cfg, self.decider, mono=time.monotonic, state=await self.store.get_state(DOORS_STATE))
        return DoorService(engine, self.write, self.store.submit)

    def _reader_lines(self) -> dict[str, list[ReaderConfig]]:
        lines: dict[str, list[ReaderConfig]] = {}
        for r in self.cfg.readers:
            lines.setdefault(r.serial, []).append(r)
        return lines

    async def _run_reader_line(self, serial: str, readers: list[ReaderConfig]) -> None:
        doors = self.doors
        assert doors is not None
        from devices.qr_reader import QrReaderLine, ReaderSpec

        specs = [ReaderSpec(r.name, r.address, r.heartbeat_s, r.offline_after_misses) for r in readers]
        name = "+".join(r.name for r in readers)
        line = QrReaderLine(name, serial, specs, doors.on_reader_event, baudrate=readers[0].baudrate)
        async with line:
            self.drivers[name] = line
            try:
                await asyncio.Future()
            finally:
                self.drivers.pop(name, None)

    def _report_replaced(self, what: str, r: CorruptReplaced) -> None:
        # The file was logged when moved; the console must see it too (the old events are gone from view).
        self.store.submit(
            [
                Draft(
                    type="store.corrupt_replaced",
                    device="gateway",
                    place=wire.Place(site=self.cfg.site),
                    priority=wire.Priority.FAULT,
                    data={"what": what, "path": str(r.path), "moved_to": str(r.moved_to), "error": r.error},
                )
            ]
        )

    def unmapped_points(self) -> dict[tuple[str, str], str]:
        """Alarm-class points of the configured devices (by their profiles' kinds) that no zone or door uses."""
        cfg = self.cfg
        used = {
            (d.device, getattr(d, role))
            for d in cfg.doors
            for role in ("relay", "contact", "exit_button", "lock_feedback", "tamper")
            if getattr(d, role)
        }
        for z in cfg.zones:
            used.add((z.device, z.point))
            if z.aux is not None:
                used.update((z.device, p) for p in msgspec.structs.astuple(z.aux) if p)
        return {
            (dev.name, p.name): p.kind
            for bus in self._buses
            for dev in bus.device_specs
            for p in dev.profile.points.values()
            if p.kind in UNMAPPED_KINDS and (dev.name, p.name) not in used
        }

    async def _restore_engine(self) -> AlarmEngine:
        rows = await self.store.get_states(ENGINE_ROWS)
        unmapped = self.unmapped_points()
        try:
            state = rows_to_snapshot(rows) if rows else await self.store.get_state(ENGINE_STATE)
            engine = AlarmEngine(self.cfg, mono=time.monotonic, wall=wire.utcnow, state=state, unmapped=unmapped)
            # No saved state (a first start, or a store replaced): every group starts disarmed, and says so.
            drafts = [] if state is not None else engine.groups_said("no saved state")
        except AlarmStateError as e:
            # A state the engine cannot read (a config change removed its zones, a damaged row): start clean,
            # and say so on the console rather than refuse to guard the estate.
            log.error("alarm engine state not restored: %s", e)
            engine = AlarmEngine(self.cfg, mono=time.monotonic, wall=wire.utcnow, state=None, unmapped=unmapped)
            drafts = [
                Draft(
                    type="gateway.state_lost",
                    device="gateway",
                    place=wire.Place(site=self.cfg.site),
                    priority=wire.Priority.FAULT,
                    data={"what": "alarm engine", "detail": str(e)},
                ),
                *engine.groups_said("state lost"),
            ]
        # Every row once, on this run's clock (and what the engine dropped on restore gone with the rest).
        self.store.submit(
            drafts,
            state={
                ENGINE_STATE: None,
                ENGINE_ROWS + "*": None,
                **{ENGINE_ROWS + k: v for k, v in engine.full_rows().items()},
            },
        )
        return engine

    def _engine_state(self, engine: AlarmEngine) -> dict[str, Any]:
        return {ENGINE_ROWS + k: v for k, v in engine.delta().items()}

    async def _engine_loop(self) -> None:
        """Feed the engine device events and its timers; store its drafts with its state, in one transaction."""
        engine = self.engine
        assert engine is not None
        queue = self._device_events
        while True:
            deadline = engine.next_deadline()
            drafts: list[Draft] = []
            try:
                async with asyncio.timeout_at(None if deadline is None else _loop_time_at(deadline)):
                    ev = await queue.get()
                drafts += engine.on_device_event(ev)
                drafts += self.points.on_device_event(ev)
                while not queue.empty() and len(drafts) < ENGINE_BATCH:  # a burst: one transaction for all
                    ev = queue.get_nowait()
                    drafts += engine.on_device_event(ev)
                    drafts += self.points.on_device_event(ev)
            except TimeoutError:
                pass
            drafts += engine.tick()
            if drafts:
                self.store.submit(drafts, state=self._engine_state(engine))

    async def _on_command(self, payload: bytes) -> None:
        """A payload from the command topic: verified (signature, target, life, replay) before anything runs."""
        got = await self.commands.admit(payload)
        if isinstance(got, Refusal):
            reported = self.commands.report(got)
            if reported:  # folded into the window's count otherwise
                self.store.submit(reported)
            self._schedule_refusal_flush()
            return
        cmd = got
        drafts: list[Draft] = []
        state: dict[str, Any] | None = None
        if self._command_expired(cmd):
            ok, detail, extra = False, "expired before it arrived", {}
        elif cmd.type in ENGINE_COMMANDS and self.engine is not None:
            drafts, outcome = self.engine.command(cmd.type, cmd.args, cmd.by)
            ok, detail, extra = outcome.ok, outcome.detail, outcome.data
            state = self._engine_state(self.engine)
        elif self.doors is not None and cmd.type in _door_commands():
            from gateway.doors import STATE_KEY as DOORS_STATE

            door = await self.doors.command(cmd)
            drafts, ok, detail, extra = door.drafts, door.ok, door.detail, door.data
            state = {DOORS_STATE: self.doors.snapshot()}
        else:
            ok, detail, extra = False, f"unknown command type {cmd.type!r}", {}
        self.store.submit([*drafts, self._result(cmd, ok, detail, **extra)], state=state)

    def _schedule_refusal_flush(self) -> None:
        due = self.commands.next_flush()
        if due is None or self._refusal_flush is not None:
            return
        self._refusal_flush = asyncio.get_running_loop().call_later(
            max(0.0, due - time.monotonic()), self._flush_refusals
        )

    def _flush_refusals(self) -> None:
        self._refusal_flush = None
        drafts = self.commands.flush()
        if drafts:
            self.store.submit(drafts)
        self._schedule_refusal_flush()

    def _command_expired(self, cmd: wire.Command) -> bool:
        if self.clock.synced:
            return cmd.expires < wire.utcnow()
        # A wall clock known to be wrong must neither refuse every command (set ahead) nor run stale ones
        # forever (set back): only a moment certainly past, by the lower bound on the true time, has expired.
        floor = max(self.clock.floor(), self.decider.time_floor() if self.decider is not None else 0.0)
        return cmd.expires.timestamp() < floor

    def _result(self, cmd: wire.Command, ok: bool, detail: str, **extra: Any) -> Draft:
        return Draft(
            type="command.result",
            device="gateway",
            place=wire.Place(site=self.cfg.site),
            data={"command_id": cmd.id, "command": cmd.type, "ok": ok, "detail": detail, "by": cmd.by, **extra},
        )


def release_startup_memory() -> None:
    """Give back to the system what start-up used and freed (reading the config and the profiles allocates much more
    than the running daemon keeps): a full collection, then glibc's malloc_trim. Without glibc, nothing to do."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load_public_keys(paths: list[str]) -> dict[str, Any]:
    from gateway.wire.passes import load_public_keys  # brings libsodium (~1 MB): only once a command comes

    return load_public_keys(paths)


def _door_commands() -> tuple[str, ...]:
    from gateway.doors import COMMANDS  # loaded by _make_doors whenever there is a door service

    return COMMANDS


def _loop_time_at(mono_deadline: float) -> float:
    """A time.monotonic() deadline on the event loop's clock (the same clock on Linux, but not by contract)."""
    return asyncio.get_running_loop().time() + (mono_deadline - time.monotonic())


async def _safe_depth(store: Store) -> int:
    try:
        return await store.outbox_depth()
    except Exception:
        return -1


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's error handler, less one known race of aiomqtt 2.x: paho asks for a socket to be watched for writing
    from its own callbacks, aiomqtt schedules that for the next loop turn, and when the connection closes in between
    (the broker stopping, as the gateway does) the socket is gone by then: harmless, nothing is lost, and not an
    ERROR for someone to chase."""
    exc = context.get("exception")
    handle = context.get("handle")
    callback = getattr(handle, "_callback", None)
    if (
        isinstance(exc, OSError)
        and exc.errno == errno.EBADF
        and getattr(callback, "__name__", "") in ("add_writer", "add_reader")
    ):
        log.debug("a socket closed before the loop could watch it (aiomqtt's deferred add_writer): %s", exc)
        return
    loop.default_exception_handler(context)


async def serve(cfg: GatewayConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_exception)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gw = Gateway(cfg, clock_sync_source(os.environ.get(CLOCK_SYNC_ENV)))
    notifier = Notifier()
    api = (
        serve_local_api(gw, cfg.local_api.host, cfg.local_api.port)
        if cfg.local_api.enabled
        else contextlib.nullcontext()
    )
    async with api:
        runner = asyncio.create_task(gw.run(stop), name=f"gateway[{cfg.gateway}]")
        ready = asyncio.create_task(gw.ready.wait())
        watchdog = asyncio.create_task(notifier.feed_watchdog(gw.problem), name=f"gateway[{cfg.gateway}].watchdog")
        try:
            await asyncio.wait([runner, ready], return_when=asyncio.FIRST_COMPLETED)
            if gw.ready.is_set():
                # One line for whoever started us (the demo, the tests), and READY=1 for systemd.
                print(json.dumps({"ready": True, "site": cfg.site, "gateway": cfg.gateway}), flush=True)
                notifier.ready(f"serving {cfg.site}/{cfg.gateway}")
                release_startup_memory()
            await stop.wait() if not runner.done() else None
            notifier.stopping()
            await runner
        finally:
            ready.cancel()
            watchdog.cancel()
            notifier.close()
