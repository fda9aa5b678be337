"""The gateway's configuration: one YAML file, validated once, strictly, at start-up.

Unknown keys are errors, cross-references are checked (a device names a bus that exists, a zone a
device and a point its profile has), and every error names the file, the line and the entity.
Nothing here touches hardware.
"""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from common.configfile import (
    ConfigError,
    Remap,
    convert_all,
    current_user,
    did_you_mean,
    echoes,
    line_of,
    read_secret,
    read_yaml,
)
from gateway.wire import NAME_RE

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]
PositiveMs = Annotated[int, msgspec.Meta(ge=1, le=3_600_000)]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: an unknown key is an error, not a silent no-op."""


class TlsConfig(_Strict):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip hostname checks; only for a broker reached by IP on a private link


class MqttConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1883
    username: str | None = None
    password_file: str | None = None  # a file of mode 0600 holding the password alone
    tls: TlsConfig | None = None
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    reconnect_min_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.5
    reconnect_max_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0


class StoreConfig(_Strict):
    path: str = "gateway.db"  # relative to data_dir
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 500
    # Events held in memory while the disk cannot take them (a full SD card); past it, routine ones are refused.
    ring_max: Annotated[int, msgspec.Meta(ge=100, le=1_000_000)] = 100_000
    # Acknowledged events are deleted past either bound (null: no bound); unacknowledged ones never are.
    # 250,000 events are ~150 MB on the SD card; the portal keeps the estate's history.
    retention_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] | None = 90
    retention_rows: Annotated[int, msgspec.Meta(ge=1000)] | None = 250_000


class UplinkConfig(_Strict):
    window: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 2000  # events in flight, unacknowledged
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=500)] = 200  # events per MQTT message
    resend_after_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 5.0
    resend_max_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0


class BusConfig(_Strict):
    name: Name
    kind: Literal["modbus-tcp", "modbus-rtu", "modbus-rtu-over-tcp"]
    host: str | None = None  # modbus-tcp, modbus-rtu-over-tcp
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    serial: str | None = None  # modbus-rtu: /dev/ttyUSB0, or a pyserial URL
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    timeout_ms: PositiveMs = 300
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 1
    offline_after_misses: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    inter_frame_ms: Annotated[int, msgspec.Meta(ge=0, le=1000)] | None = None  # default: RTU 30, TCP 0
    # modbus-tcp: requests sent before the earlier ones are answered (paired by transaction id); 1 = one at a time
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=255)] = 1


class DeviceConfig(_Strict):
    name: Name
    profile: str
    bus: Name
    unit: Annotated[int, msgspec.Meta(ge=1, le=247)] = 1  # 0 is Modbus's broadcast address: nothing answers it
    poll_ms: PositiveMs = 200
    place: PlaceConfig | None = None  # where it is mounted (shown by `gatehouse device list`)


class PlaceConfig(_Strict):
    building: Name | None = None
    unit: Name | None = None
    house: Name | None = None


class ZoneAuxConfig(_Strict):
    """More points of the zone's device that belong to the zone (perimeter panel, pulse fence)."""

    tamper: str | None = None  # zone tamper: zone.tamper, whatever the arming
    fault: str | None = None  # line fault: zone.fault, whatever the arming
    touch: str | None = None  # fence touched: zone.alarm, follows the arming like the zone itself
    cut: str | None = None  # fence wire cut: zone.tamper, whatever the arming
    short: str | None = None  # fence wires shorted: zone.tamper, whatever the arming


class ZoneConfig(_Strict):
    name: Name
    device: Name
    point: str
    # perimeter: instant once its group is armed; entry: entry delay; interior: instant, but follows a
    # running entry delay and is off in "stay" mode; the rest are 24-hour types that ignore arming.
    type: Literal["perimeter", "entry", "interior", "panic", "medical", "fire", "gas", "tamper", "fault"] = "perimeter"
    label: str = ""
    place: PlaceConfig | None = None
    group: Name = "default"  # zone group it is armed with (see zone_groups; "default" needs no entry)
    invert: bool = False  # the point reads false when active (a normally-closed "ok" input)
    debounce_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 0  # must stay active this long to count
    restore_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 3000  # quiet this long before a restore
    entry_delay_s: Annotated[int, msgspec.Meta(ge=0, le=600)] = 30  # entry zones (and a door open at arming)
    aux: ZoneAuxConfig | None = None


class DoorConfig(_Strict):
    """A door or gate with an electric lock, driven by a relay on a door controller."""

    name: Name
    device: Name  # the door controller
    relay: str  # its output point that releases the lock
    place: PlaceConfig | None = None  # building + unit: the unit's entrance (passes with that unit open it)
    gate: bool = False  # a site gate: passes with the gates right open it
    contact: str | None = None  # its input point for the door contact (active = the door is not shut)
    exit_button: str | None = None  # its input point for the request-to-exit button (active = pressed)
    lock_feedback: str | None = None  # its input point for the lock's feedback (active = lock released)
    tamper: str | None = None  # its input point for the controller's tamper switch (active = tampered)
    # Points that read false when active (a contact that closes an input while the door is shut).
    invert: list[Literal["contact", "exit_button", "lock_feedback", "tamper"]] = []
    # At least half a second: the relay is read back after the unlock write, and a pulse over before that read
    # cannot be confirmed (a door strike needs longer anyway). At most what the controller's flash command times.
    unlock_ms: Annotated[int, msgspec.Meta(ge=500, le=3_600_000)] = 5000
    # The door may open this long after the unlock time (or an exit-button press) ended without being forced.
    open_grace_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 2000
    held_open_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 60  # door open longer: door.held
    label: str = ""


class ReaderConfig(_Strict):
    """A QR reader on a serial line (several may share one RS-485 line, each at its own address)."""

    name: Name
    serial: str  # /dev/ttyUSB1, or a pyserial URL
    door: Name
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 9600
    address: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None  # "@<address>:" prefix on a shared line
    # Heartbeat poll interval (a reader that answers polls); None: a plain scan engine, not polled.
    heartbeat_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    offline_after_misses: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    # A code repeating the reader's previous one within this time is ignored (a code held in front of it).
    repeat_ignore_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 2000


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
ClockTime = Annotated[str, msgspec.Meta(pattern=r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$")]


class ScheduleWindow(_Strict):
    """From ``start`` to ``end`` (local time) on each of ``days``; an ``end`` before ``start`` runs
    past midnight into the next day."""

    days: Annotated[list[Weekday], msgspec.Meta(min_length=1)]
    start: ClockTime
    end: ClockTime


class ScheduleConfig(_Strict):
    name: Name
    windows: Annotated[list[ScheduleWindow], msgspec.Meta(min_length=1)]


class AccessConfig(_Strict):
    public_keys: list[str] = []  # PEM files of the portal's pass-signing public keys (several while rotating)
    db: str = "access.db"  # relative to data_dir: used passes and the revocation list
    skew_s: Annotated[int, msgspec.Meta(ge=0, le=600)] = 30
    # A revocation list older than this (or none yet): visitor passes refused, credentials.stale on the console.
    revocation_max_age_s: Annotated[int, msgspec.Meta(ge=60)] = 86_400
    # A visitor pass's visit: from the opening that spends a use, the other doors of its path open once each.
    visit_window_s: Annotated[int, msgspec.Meta(ge=60, le=86_400)] = 1800
    # While the clock is known to be unsynchronised (see gateway.access):
    unsynced_max_life_s: Annotated[int, msgspec.Meta(ge=10, le=3600)] = 300
    unsynced_skew_s: Annotated[int, msgspec.Meta(ge=0, le=86_400)] = 600
    burst_count: Annotated[int, msgspec.Meta(ge=2, le=1000)] = 5  # refused scans at one door ...
    burst_window_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0  # ... within this many seconds
    timezone: str = "Asia/Shanghai"  # for schedules
    schedules: list[ScheduleConfig] = []


class ZoneGroupConfig(_Strict):
    """Zones armed and disarmed together (a fence line, a clubhouse)."""

    name: Name
    label: str = ""
    exit_delay_s: Annotated[int, msgspec.Meta(ge=0, le=600)] = 0  # entry and interior zones wait this long


class AlarmScheduleConfig(_Strict):
    """Arms ``groups`` at each window's start and disarms them at its end (site local time)."""

    name: Name
    groups: Annotated[list[Name], msgspec.Meta(min_length=1)]
    windows: Annotated[list[ScheduleWindow], msgspec.Meta(min_length=1)]
    enabled: bool = True


class IndoorPanelConfig(_Strict):
    """An in-flat alarm panel reporting Contact ID; its account number names the house."""

    name: Name
    account: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Fa-f]{4}$")]  # quote it in YAML: "0123"
    place: PlaceConfig  # building, unit and house
    label: str = ""
    # A periodic test report (602/603/608) is expected this often; none within interval + grace
    # raises panel.test_missed. None: the panel is not supervised.
    test_interval_s: Annotated[int, msgspec.Meta(ge=60, le=7 * 86_400)] | None = 86_400
    test_grace_s: Annotated[int, msgspec.Meta(ge=0, le=86_400)] = 900


class ContactIdLineConfig(_Strict):
    """A serial line carrying Contact ID: an indoor panel's own port ("panel"), or an alarm receiver's
    automation port ("receiver", Sur-Gard style lines with heartbeats)."""

    name: Name
    serial: str  # /dev/ttyUSB0, or a pyserial URL
    mode: Literal["panel", "receiver"] = "panel"
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 9600
    # The character framing: 8N1 by default; a Sur-Gard MLR2-E's automation port comes set to 7E1 at 19200.
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    # Offline when nothing (no frame, no heartbeat) arrives for this long. Default: 90 s for a receiver,
    # unsupervised for a panel line (its periodic tests are supervised per panel instead).
    silence_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 86_400)] | None = None


class AlarmConfig(_Strict):
    timezone: str = "Asia/Shanghai"  # for alarm_schedules
    repeat_interval_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 60  # at most one *_repeat per incident


class LocalApiConfig(_Strict):
    """The status and metrics endpoint (``GET /status``, ``GET /metrics``); loopback only by default."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 9880


class PointEventsConfig(_Strict):
    """``point.changed`` events for device points that no zone or door uses (see gateway/point_events.py)."""

    enabled: bool = False
    devices: list[Name] = []  # only these devices; empty: every device


class LoadgenConfig(_Strict):
    """A synthetic event source for durability tests and benchmarks: ``count`` events at ``rate``/s,
    resuming after a restart from the last one stored, so each number is produced exactly once."""

    count: Annotated[int, msgspec.Meta(ge=1)]
    rate: Annotated[float, msgspec.Meta(gt=0)] = 500.0
    alarm_every: Annotated[int, msgspec.Meta(ge=0)] = 0  # every n-th event is an alarm or tamper (0: none)
    start_after_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0  # a quiet spell first (burst benchmarks)


class GatewayConfig(_Strict):
    site: Name
    gateway: Name
    site_name: Annotated[str, msgspec.Meta(max_length=120)] = ""  # the estate as people say it (阳光花园): reports
    data_dir: str = "."
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    uplink: UplinkConfig = msgspec.field(default_factory=UplinkConfig)
    profiles_dir: str | None = None  # extra vendor profiles beside the built-in ones
    buses: list[BusConfig] = []
    devices: list[DeviceConfig] = []
    zones: list[ZoneConfig] = []
    zone_groups: list[ZoneGroupConfig] = []
    alarm_schedules: list[AlarmScheduleConfig] = []
    indoor_panels: list[IndoorPanelConfig] = []
    contact_id_lines: list[ContactIdLineConfig] = []
    alarm: AlarmConfig = msgspec.field(default_factory=AlarmConfig)
    doors: list[DoorConfig] = []
    readers: list[ReaderConfig] = []
    access: AccessConfig = msgspec.field(default_factory=AccessConfig)
    point_events: PointEventsConfig = msgspec.field(default_factory=PointEventsConfig)
    loadgen: LoadgenConfig | None = None
    local_api: LocalApiConfig = msgspec.field(default_factory=LocalApiConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Paths in the file are relative to the file's folder; these are resolved by load().
    source: str = ""

    def data_path(self, name: str) -> Path:
        return Path(self.data_dir) / name


# ---------------------------------------------------------------- loading


def load(path: str | os.PathLike[str], *, check_profiles: bool = True, check_files: bool = False) -> GatewayConfig:
    """Read, validate and cross-check a gateway config. Raises :class:`ConfigError` with every problem found,
    in the order of their lines.

    ``check_files``: also read every file the config names, as this process's user, the way the daemon will (the
    MQTT password, the TLS files, the public keys) and check that ``data_dir`` is a folder it can write or create:
    what ``gatehouse config check`` and ``gatehouse gateway run`` do. Without it (the installer's other commands,
    run as whoever) only the public keys' existence is checked."""
    p = Path(path)
    data, tree = read_yaml(p)
    cfg, problems, remap = convert_all(p, GatewayConfig, data, tree)
    if cfg is None:
        raise ConfigError(_by_line(problems))
    base = p.resolve().parent
    cfg = msgspec.structs.replace(
        cfg,
        source=str(p),
        data_dir=str((base / cfg.data_dir).resolve()),
        profiles_dir=str((base / cfg.profiles_dir).resolve()) if cfg.profiles_dir else None,
        mqtt=_resolve_mqtt(cfg.mqtt, base),
        access=msgspec.structs.replace(
            cfg.access, public_keys=[str((base / k).resolve()) for k in cfg.access.public_keys]
        ),
    )
    # Each problem once: not again as "not defined" for an entry dropped for its own error, nor as a missing key.
    problems += [
        c
        for c in cross_check(cfg, tree, check_profiles=check_profiles, check_files=check_files, remap=remap)
        if not echoes(c, data, remap)
    ]
    if problems:
        raise ConfigError(_by_line(problems))
    return cfg


def _by_line(problems: list[str]) -> list[str]:
    def line(p: str) -> int:
        m = re.match(r"[^\n]*?:(\d+): ", p)
        return int(m.group(1)) if m else 0

    return sorted(problems, key=line)


def _resolve_mqtt(m: MqttConfig, base: Path) -> MqttConfig:
    def rel(v: str | None) -> str | None:
        return str((base / v).resolve()) if v else None

    tls = m.tls
    if tls is not None:
        tls = msgspec.structs.replace(
            tls, ca_file=rel(tls.ca_file), cert_file=rel(tls.cert_file), key_file=rel(tls.key_file)
        )
    return msgspec.structs.replace(m, password_file=rel(m.password_file), tls=tls)


def _unique(kind: str, names: list[str], where: Any, problems: list[str], what: str = "name") -> set[str]:
    """The set of ``names``; each repeat is a problem naming its file, line and entry."""
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            problems.append(f"{where(f'$.{kind}[{i}].{what}', f'{kind}[{i}] ({n})')}: duplicate {what}")
        seen.add(n)
    return seen


def cross_check(
    cfg: GatewayConfig, tree: Any, *, check_profiles: bool, check_files: bool = False, remap: Remap | None = None
) -> list[str]:
    """Rules that span entries. Each problem names the file, line and entity (``remap``: where the entries of a
    config repaired by :func:`common.configfile.convert_all` were in the file; ``check_files``: see :func:`load`)."""
    src = cfg.source
    problems: list[str] = []

    def names_of(kind: str, names: set[str]) -> set[str]:
        """``names``, and those of the entries dropped for their own errors (for a "did you mean")."""
        return names | remap.dropped_names(kind) if remap is not None else names

    def where(jp: str, name: str) -> str:
        if remap is not None:
            jp, name = remap.jsonpath(jp), remap.name(jp, name)
        line = line_of(tree, jp)
        return f"{src}:{line}: {name}" if line else f"{src}: {name}"

    buses = _unique("buses", [b.name for b in cfg.buses], where, problems)
    _unique("devices", [d.name for d in cfg.devices], where, problems)
    _unique("zones", [z.name for z in cfg.zones], where, problems)
    _unique("contact_id_lines", [c.name for c in cfg.contact_id_lines], where, problems)

    for i, b in enumerate(cfg.buses):
        tag = where(f"$.buses[{i}]", f"buses[{i}] ({b.name})")
        if b.kind == "modbus-rtu":
            if not b.serial:
                problems.append(f"{tag}: a modbus-rtu bus needs 'serial' (a port such as /dev/ttyUSB0)")
            if b.host or b.port:
                problems.append(f"{tag}: a modbus-rtu bus takes 'serial', not 'host'/'port'")
        else:
            if not b.host or not b.port:
                problems.append(f"{tag}: a {b.kind} bus needs 'host' and 'port'")
            if b.serial:
                problems.append(f"{tag}: a {b.kind} bus takes 'host'/'port', not 'serial'")
        if b.max_in_flight > 1 and b.kind != "modbus-tcp":
            problems.append(
                f"{tag}: max_in_flight above 1 needs a modbus-tcp bus (an RTU line answers one request at a time)"
            )

    seen_units: dict[tuple[str, int], str] = {}
    profiles: dict[str, Any] = {}
    for i, d in enumerate(cfg.devices):
        tag = where(f"$.devices[{i}]", f"devices[{i}] ({d.name})")
        if d.bus not in buses:
            problems.append(
                f"{tag}: bus {d.bus!r} is not defined under 'buses'{did_you_mean(d.bus, names_of('buses', buses))}"
            )
        key = (d.bus, d.unit)
        if key in seen_units:
            problems.append(f"{tag}: unit id {d.unit} on bus {d.bus!r} is already used by {seen_units[key]!r}")
        seen_units[key] = d.name
        if check_profiles:
            from devices.profiles import ProfileError, find_profile, list_profiles

            try:
                profiles[d.name] = find_profile(d.profile, extra_dir=cfg.profiles_dir)
            except ProfileError as e:
                problems.append(f"{tag}: {e}{did_you_mean(d.profile, list_profiles(cfg.profiles_dir))}")

    devices = {d.name for d in cfg.devices}
    for i, name in enumerate(cfg.point_events.devices):
        if name not in devices:
            problems.append(
                f"{where(f'$.point_events.devices[{i}]', 'point_events')}: device {name!r} is not "
                f"defined under 'devices'{did_you_mean(name, names_of('devices', devices))}"
            )
    for i, z in enumerate(cfg.zones):
        tag = where(f"$.zones[{i}]", f"zones[{i}] ({z.name})")
        if z.device not in devices:
            problems.append(
                f"{tag}: device {z.device!r} is not defined under 'devices'"
                f"{did_you_mean(z.device, names_of('devices', devices))}"
            )
        elif z.device in profiles and z.point not in profiles[z.device].points:
            known = ", ".join(sorted(profiles[z.device].points)[:12])
            problems.append(
                f"{tag}: device {z.device!r} has no point {z.point!r} (it has: {known})"
                f"{did_you_mean(z.point, profiles[z.device].points)}"
            )
    problems.extend(_shared_ports(cfg, where))
    if cfg.mqtt.password_file and not cfg.mqtt.username:
        problems.append(f"{where('$.mqtt', 'mqtt')}: password_file given without username")
    problems.extend(_cross_check_access(cfg, where, profiles))
    problems.extend(_cross_check_alarms(cfg, where, profiles))
    if check_files:
        problems.extend(_check_files(cfg, where))
    return problems


_LOOPBACK = {"localhost", "ip6-localhost", "::1", "0:0:0:0:0:0:0:1"}


def _endpoint_key(host: str, port: int | None) -> str:
    """``tcp:HOST:PORT`` with the loopback's spellings made one (localhost, 127.0.0.1, 127.1, ::1); no lookups."""
    import ipaddress

    h = host.strip().lower().strip("[]").rstrip(".")
    try:
        if ipaddress.ip_address(h).is_loopback:
            h = "loopback"
    except ValueError:
        if h in _LOOPBACK:
            h = "loopback"
    return f"tcp:{h}:{port}"


def _serial_key(serial: str) -> str:
    """One key per serial port however it is named (a /dev/serial/by-id link, a relative path); URLs as written."""
    return f"serial:{serial}" if "://" in serial else f"serial:{os.path.realpath(serial)}"


def _shared_ports(cfg: GatewayConfig, where: Any) -> list[str]:
    """Two owners of one serial port (two buses, a bus and a reader line or a Contact ID line) or two buses on one TCP
    endpoint: each would read the other's replies. Readers sharing one RS-485 line are one owner."""
    problems: list[str] = []
    owners: dict[str, tuple[str, str]] = {}  # key -> (what owns it, "file:line: entity" of that entry)

    def claim(key: str, kind: str, jp: str, name: str, what: str) -> None:
        tag = where(jp, name)
        if key in owners:
            other_kind, other = owners[key]
            if not (kind == other_kind == "readers"):
                m = re.match(r".*?:(\d+): (.*)$", other)
                by = f"{m.group(2)} at line {m.group(1)}" if m else other
                problems.append(f"{tag}: {what} is already used by {by}: one port, one owner")
            return
        owners[key] = (kind, tag)

    for i, b in enumerate(cfg.buses):
        jp, name = f"$.buses[{i}]", f"buses[{i}] ({b.name})"
        if b.serial:
            claim(_serial_key(b.serial), "buses", jp, name, f"serial port {b.serial!r}")
        elif b.host and b.port:
            claim(_endpoint_key(b.host, b.port), "buses", jp, name, f"endpoint {b.host}:{b.port}")
    for i, c in enumerate(cfg.contact_id_lines):
        jp, name = f"$.contact_id_lines[{i}]", f"contact_id_lines[{i}] ({c.name})"
        claim(_serial_key(c.serial), "contact_id_lines", jp, name, f"serial port {c.serial!r}")
    for i, r in enumerate(cfg.readers):
        jp, name = f"$.readers[{i}]", f"readers[{i}] ({r.name})"
        claim(_serial_key(r.serial), "readers", jp, name, f"serial port {r.serial!r}")
    return problems


def _cross_check_access(cfg: GatewayConfig, where: Any, profiles: dict[str, Any]) -> list[str]:
    """Doors, readers and the access settings. ``where(jsonpath, entity)`` gives ``file:line: entity``."""
    from zoneinfo import ZoneInfo

    problems: list[str] = []
    devices = {d.name for d in cfg.devices}

    doors = _unique("doors", [d.name for d in cfg.doors], where, problems)
    _unique("readers", [r.name for r in cfg.readers], where, problems)
    for i, d in enumerate(cfg.doors):
        tag = where(f"$.doors[{i}]", f"doors[{i}] ({d.name})")
        if d.device not in devices:
            problems.append(
                f"{tag}: device {d.device!r} is not defined under 'devices'{did_you_mean(d.device, devices)}"
            )
        elif d.device in profiles:
            for field in ("relay", "contact", "exit_button", "lock_feedback", "tamper"):
                point = getattr(d, field)
                if point is not None and point not in profiles[d.device].points:
                    problems.append(
                        f"{tag}: {field}: device {d.device!r} has no point {point!r}"
                        f"{did_you_mean(point, profiles[d.device].points)}"
                    )
            relay = profiles[d.device].points.get(d.relay)
            if relay is not None and not relay.writable:
                problems.append(f"{tag}: relay: point {d.relay!r} of device {d.device!r} is not writable")
            elif relay is not None and relay.table != "coil":
                problems.append(
                    f"{tag}: relay: point {d.relay!r} of device {d.device!r} is not a coil "
                    "(the unlock is a timed pulse on a coil)"
                )
            limit = profiles[d.device].pulse_limit_ms()
            if relay is not None and limit is not None and d.unlock_ms > limit:
                problems.append(
                    f"{tag}: unlock_ms {d.unlock_ms} is longer than the flash (timed pulse) command of "
                    f"{profiles[d.device].name} allows: at most {limit} ms"
                )
        for field in d.invert:
            if getattr(d, field) is None:
                problems.append(f"{tag}: invert: the door has no {field} point")
        if d.place is not None and (d.place.unit is None) != (d.place.building is None):
            problems.append(f"{tag}: a unit's door needs both place.building and place.unit")
        if d.gate and d.place is not None and d.place.unit is not None:
            problems.append(f"{tag}: a site gate belongs to no unit (drop place.unit or gate)")
    lines: dict[str, list[tuple[int, ReaderConfig]]] = {}
    for i, r in enumerate(cfg.readers):
        if r.door not in doors:
            problems.append(
                f"{where(f'$.readers[{i}]', f'readers[{i}] ({r.name})')}: door {r.door!r} is not defined"
                f"{did_you_mean(r.door, doors)}"
            )
        lines.setdefault(r.serial, []).append((i, r))
    for serial, readers in lines.items():
        if len({r.baudrate for _, r in readers}) > 1:
            i, r = readers[1]
            problems.append(
                f"{where(f'$.readers[{i}]', f'readers[{i}] ({r.name})')}: readers sharing {serial!r} "
                "need the same baudrate"
            )
        addresses = [r.address for _, r in readers]
        if len(readers) > 1 and (None in addresses or len(set(addresses)) != len(addresses)):
            i, r = readers[1]
            problems.append(
                f"{where(f'$.readers[{i}]', f'readers[{i}] ({r.name})')}: readers sharing {serial!r} "
                "need distinct addresses"
            )
    a = cfg.access
    try:
        ZoneInfo(a.timezone)
    except (ValueError, OSError, KeyError):  # ZoneInfoNotFoundError is a KeyError
        problems.append(f"{where('$.access.timezone', 'access')}: unknown timezone {a.timezone!r}")
    unique_schedules: set[str] = set()
    for i, s in enumerate(a.schedules):
        if s.name in unique_schedules:
            problems.append(f"{where(f'$.access.schedules[{i}]', f'schedules[{i}] ({s.name})')}: duplicate name")
        unique_schedules.add(s.name)
        for j, w in enumerate(s.windows):
            if w.start == w.end or w.start == "24:00":
                problems.append(
                    f"{where(f'$.access.schedules[{i}].windows[{j}]', f'schedules[{i}] ({s.name})')}: "
                    "an empty window (start == end, or start 24:00)"
                )
    for i, k in enumerate(a.public_keys):
        if not os.path.isfile(k):
            problems.append(f"{where(f'$.access.public_keys[{i}]', 'access')}: no such key file {k!r}")
    if cfg.readers and not a.public_keys:
        problems.append(f"{where('$.access', 'access')}: readers are configured but access.public_keys is empty")
    return problems


def _cross_check_alarms(cfg: GatewayConfig, where: Any, profiles: dict[str, Any]) -> list[str]:
    """Zone points, zone groups, alarm schedules and indoor panels."""
    from zoneinfo import ZoneInfo

    problems: list[str] = []

    groups = _unique("zone_groups", [g.name for g in cfg.zone_groups], where, problems) | {"default"}
    _unique("alarm_schedules", [s.name for s in cfg.alarm_schedules], where, problems)
    _unique("indoor_panels", [p.name for p in cfg.indoor_panels], where, problems)
    _unique("indoor_panels", [p.account.upper() for p in cfg.indoor_panels], where, problems, "account")
    used: dict[tuple[str, str], str] = {}
    for i, z in enumerate(cfg.zones):
        tag = where(f"$.zones[{i}]", f"zones[{i}] ({z.name})")
        if z.group not in groups:
            problems.append(
                f"{tag}: group {z.group!r} is not defined under 'zone_groups'{did_you_mean(z.group, groups)}"
            )
        points = [("point", z.point)]
        if z.aux is not None:
            points += [(f"aux.{k}", v) for k, v in msgspec.structs.asdict(z.aux).items() if v is not None]
        for field, point in points:
            if field != "point" and z.device in profiles and point not in profiles[z.device].points:
                problems.append(
                    f"{tag}: {field}: device {z.device!r} has no point {point!r}"
                    f"{did_you_mean(point, profiles[z.device].points)}"
                )
            other = used.get((z.device, point))
            if other is not None:
                problems.append(f"{tag}: {field}: point {point!r} of {z.device!r} is already used by {other}")
            used[(z.device, point)] = f"zone {z.name!r}"
    try:
        ZoneInfo(cfg.alarm.timezone)
    except (ValueError, KeyError, OSError):  # ZoneInfoNotFoundError is a KeyError
        problems.append(f"{where('$.alarm.timezone', 'alarm')}: unknown timezone {cfg.alarm.timezone!r}")
    for i, s in enumerate(cfg.alarm_schedules):
        tag = where(f"$.alarm_schedules[{i}]", f"alarm_schedules[{i}] ({s.name})")
        for g in s.groups:
            if g not in groups:
                problems.append(f"{tag}: group {g!r} is not defined under 'zone_groups'{did_you_mean(g, groups)}")
        for j, w in enumerate(s.windows):
            if w.start == w.end or w.start == "24:00":
                problems.append(f"{tag}: windows[{j}]: an empty window (start == end, or start 24:00)")
    for i, p in enumerate(cfg.indoor_panels):
        # Its events name a flat only with all three (the portal ties them to a house, its residents and care).
        missing = [f"place.{k}" for k in ("building", "unit", "house") if getattr(p.place, k) is None]
        if missing:
            tag = where(f"$.indoor_panels[{i}].place", f"indoor_panels[{i}] ({p.name})")
            problems.append(
                f"{tag}: an indoor panel needs place.house with its place.building and place.unit (the flat its "
                f"events belong to); {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
            )
    return problems


# ---------------------------------------------------------------- the files a config names


class FileError(ValueError):
    """A file the config names that cannot be used: ``key`` is its setting (``mqtt.tls.ca_file``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def mqtt_password(m: MqttConfig) -> str | None:
    """The broker password from ``mqtt.password_file`` (None without one); :class:`FileError` when unreadable."""
    if not m.password_file:
        return None
    try:
        return read_secret(m.password_file)
    except ConfigError as e:
        raise FileError("mqtt.password_file", e.problems[0]) from None


def mqtt_tls_context(m: MqttConfig) -> ssl.SSLContext | None:
    """The TLS context of ``mqtt.tls`` (None without TLS); :class:`FileError` naming the file that cannot be used."""
    if m.tls is None:
        return None
    t = m.tls
    key = "mqtt.tls.ca_file"
    try:
        ctx = ssl.create_default_context(cafile=t.ca_file)
        if t.cert_file:
            key = "mqtt.tls.cert_file"
            ctx.load_cert_chain(t.cert_file, t.key_file)
    except FileNotFoundError as e:
        raise FileError(key, f"{e.filename or _tls_file(t, key)}: no such file") from None
    except PermissionError as e:
        raise FileError(key, f"{e.filename or _tls_file(t, key)}: cannot read: permission denied") from None
    except (ssl.SSLError, OSError) as e:
        what, fix = (
            ("a CA certificate (PEM)", "copy the site CA's gatehouse-ca.pem here")
            if key.endswith("ca_file")
            else ("a certificate (PEM) with its key_file", "give the gateway's own certificate and key")
        )
        reason = getattr(e, "reason", None) or e
        raise FileError(key, f"{_tls_file(t, key)}: not {what} ({reason}): {fix}") from None
    if t.insecure:
        ctx.check_hostname = False
    return ctx


def _tls_file(t: TlsConfig, key: str) -> str:
    return str(t.ca_file if key.endswith("ca_file") else t.cert_file)


def _writable_folder(folder: str) -> str | None:
    """Why the daemon could not keep its store in ``folder`` (which it creates if missing), or None."""
    p = Path(folder)
    probe = p
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "it" if probe == p else str(probe)
        return f"{p}: not a folder ({where} is a file): name a folder, or move the file away"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "cannot write in it" if probe == p else f"cannot create it: cannot write in {probe}"
        return f"{p}: {what} {_as_user()}"
    return None


def _as_user() -> str:
    return f"(as user {current_user()}): it must be the gateway's user's (sudo chown -R gatehouse: DIR)"


def _check_files(cfg: GatewayConfig, where: Any) -> list[str]:
    """Every file the config names, read the way the daemon will, as this process's user (see :func:`load`)."""
    from gateway.wire.passes import KeyFileError, load_public_key

    problems: list[str] = []
    for step in (mqtt_password, mqtt_tls_context):
        try:
            step(cfg.mqtt)
        except FileError as e:
            problems.append(f"{where(f'$.{e.key}', e.key)}: {e.message}")
    for i, k in enumerate(cfg.access.public_keys):
        if os.path.isfile(k):  # a missing one is already a problem
            try:
                load_public_key(k)
            except KeyFileError as e:
                problems.append(
                    f"{where(f'$.access.public_keys[{i}]', f'access.public_keys[{i}]')}: {e}: copy the portal's "
                    "pass_signing_key.pub.pem here"
                )
    reason = _writable_folder(cfg.data_dir)
    if reason is None:
        for key, name in (("store.path", cfg.store.path), ("access.db", cfg.access.db)):
            f = cfg.data_path(name)
            if f.exists() and not os.access(f, os.R_OK | os.W_OK):
                problems.append(f"{where(f'$.{key}', key)}: {f}: cannot write it {_as_user()}")
    else:
        problems.append(f"{where('$.data_dir', 'data_dir')}: {reason}")
    return problems
