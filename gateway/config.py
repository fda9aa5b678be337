"""The gateway's configuration: one YAML file, validated once, strictly, at start-up.

Unknown keys are errors, cross-references are checked (a device names a bus that exists, a zone a
device and a point its profile has), and every error names the file, the line and the entity.
Nothing here touches hardware.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from gateway.wire import NAME_RE

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]
PositiveMs = Annotated[int, msgspec.Meta(ge=1, le=3_600_000)]


class ConfigError(Exception):
    """One or more problems in a config file, each with its file and line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


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


class DeviceConfig(_Strict):
    name: Name
    profile: str
    bus: Name
    unit: Annotated[int, msgspec.Meta(ge=0, le=247)] = 1
    poll_ms: PositiveMs = 200


class PlaceConfig(_Strict):
    building: Name | None = None
    unit: Name | None = None
    house: Name | None = None


class ZoneConfig(_Strict):
    name: Name
    device: Name
    point: str
    type: Literal["perimeter", "entry", "interior", "panic", "medical", "fire", "gas", "tamper"] = "perimeter"
    label: str = ""
    place: PlaceConfig | None = None


class LoadgenConfig(_Strict):
    """A synthetic event source for durability tests and benchmarks: ``count`` events at ``rate``/s,
    resuming after a restart from the last one stored, so each number is produced exactly once."""

    count: Annotated[int, msgspec.Meta(ge=1)]
    rate: Annotated[float, msgspec.Meta(gt=0)] = 500.0


class GatewayConfig(_Strict):
    site: Name
    gateway: Name
    data_dir: str = "."
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    uplink: UplinkConfig = msgspec.field(default_factory=UplinkConfig)
    profiles_dir: str | None = None  # extra vendor profiles beside the built-in ones
    buses: list[BusConfig] = []
    devices: list[DeviceConfig] = []
    zones: list[ZoneConfig] = []
    loadgen: LoadgenConfig | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Paths in the file are relative to the file's folder; these are resolved by load().
    source: str = ""

    def data_path(self, name: str) -> Path:
        return Path(self.data_dir) / name


# ---------------------------------------------------------------- loading


def read_yaml(path: Path) -> tuple[Any, CommentedMap | CommentedSeq | None]:
    """Read YAML keeping line numbers. Returns (plain data, the ruamel node tree)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read: {e}"]) from None
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        tree = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{path}{line}: not valid YAML: {e.problem}"]) from None
    except Exception as e:  # ruamel raises several unrelated types for duplicate keys and the like
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    return _plain(tree), tree


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


_PATH_RE = re.compile(r"\$((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)")


def line_of(tree: Any, jsonpath: str) -> int | None:
    """The 1-based line of ``$.devices[2].unit`` in a ruamel tree, or of its nearest parent."""
    m = _PATH_RE.match(jsonpath)
    steps = re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", m.group(1)) if m else []
    node, line = tree, None
    for key, idx in steps:
        if isinstance(node, CommentedMap) and key and key in node:
            line = node.lc.key(key)[0] + 1
            node = node[key]
        elif isinstance(node, CommentedSeq) and idx and int(idx) < len(node):
            line = node.lc.item(int(idx))[0] + 1
            node = node[int(idx)]
        else:
            break
    if line is None and hasattr(tree, "lc"):
        line = tree.lc.line + 1
    return line


def entity_of(data: Any, jsonpath: str) -> str:
    """``devices[2] (panel-3)`` for a path inside a named list entry, else ''."""
    m = re.match(r"\$\.([a-z_]+)\[(\d+)\]", jsonpath)
    if not m or not isinstance(data, dict):
        return ""
    items = data.get(m.group(1))
    i = int(m.group(2))
    if isinstance(items, list) and i < len(items) and isinstance(items[i], dict) and "name" in items[i]:
        return f" {m.group(1)}[{i}] ({items[i]['name']})"
    return ""


T = TypeVar("T")


def convert_strict(path: Path, cls: type[T], data: Any, tree: Any) -> T:
    """msgspec.convert with the error turned into ``file:line: entity: message``."""
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: the top level must be a mapping of settings"])
    try:
        return msgspec.convert(data, cls, strict=True)
    except msgspec.ValidationError as e:
        msg = str(e)
        where = msg.rsplit(" - at `", 1)
        jp = where[1].rstrip("`") if len(where) == 2 else "$"
        # For "unknown field" errors msgspec points at the parent; name the field's own line.
        unknown = re.search(r"unknown field `([^`]+)`", msg)
        if unknown:
            jp = f"{jp}.{unknown.group(1)}"
        line = line_of(tree, jp)
        return_loc = f"{path}:{line}" if line else str(path)
        raise ConfigError([f"{return_loc}:{entity_of(data, jp)} {where[0]} (at {jp})"]) from None


def load(path: str | os.PathLike[str], *, check_profiles: bool = True) -> GatewayConfig:
    """Read, validate and cross-check a gateway config. Raises :class:`ConfigError`."""
    p = Path(path)
    data, tree = read_yaml(p)
    cfg = convert_strict(p, GatewayConfig, data, tree)
    base = p.resolve().parent
    cfg = msgspec.structs.replace(
        cfg,
        source=str(p),
        data_dir=str((base / cfg.data_dir).resolve()),
        profiles_dir=str((base / cfg.profiles_dir).resolve()) if cfg.profiles_dir else None,
        mqtt=_resolve_mqtt(cfg.mqtt, base),
    )
    problems = cross_check(cfg, tree, check_profiles=check_profiles)
    if problems:
        raise ConfigError(problems)
    return cfg


def _resolve_mqtt(m: MqttConfig, base: Path) -> MqttConfig:
    def rel(v: str | None) -> str | None:
        return str((base / v).resolve()) if v else None

    tls = m.tls
    if tls is not None:
        tls = msgspec.structs.replace(
            tls, ca_file=rel(tls.ca_file), cert_file=rel(tls.cert_file), key_file=rel(tls.key_file)
        )
    return msgspec.structs.replace(m, password_file=rel(m.password_file), tls=tls)


def cross_check(cfg: GatewayConfig, tree: Any, *, check_profiles: bool) -> list[str]:
    """Rules that span entries. Each problem names the file, line and entity."""
    src = cfg.source
    problems: list[str] = []

    def where(jp: str, name: str) -> str:
        line = line_of(tree, jp)
        return f"{src}:{line}: {name}" if line else f"{src}: {name}"

    def unique(kind: str, names: list[str]) -> set[str]:
        seen: set[str] = set()
        for i, n in enumerate(names):
            if n in seen:
                problems.append(f"{where(f'$.{kind}[{i}].name', f'{kind}[{i}] ({n})')}: duplicate name")
            seen.add(n)
        return seen

    buses = unique("buses", [b.name for b in cfg.buses])
    unique("devices", [d.name for d in cfg.devices])
    unique("zones", [z.name for z in cfg.zones])

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

    seen_units: dict[tuple[str, int], str] = {}
    profiles: dict[str, Any] = {}
    for i, d in enumerate(cfg.devices):
        tag = where(f"$.devices[{i}]", f"devices[{i}] ({d.name})")
        if d.bus not in buses:
            problems.append(f"{tag}: bus {d.bus!r} is not defined under 'buses'")
        key = (d.bus, d.unit)
        if key in seen_units:
            problems.append(f"{tag}: unit id {d.unit} on bus {d.bus!r} is already used by {seen_units[key]!r}")
        seen_units[key] = d.name
        if check_profiles:
            from devices.profiles import ProfileError, find_profile

            try:
                profiles[d.name] = find_profile(d.profile, extra_dir=cfg.profiles_dir)
            except ProfileError as e:
                problems.append(f"{tag}: {e}")

    devices = {d.name for d in cfg.devices}
    for i, z in enumerate(cfg.zones):
        tag = where(f"$.zones[{i}]", f"zones[{i}] ({z.name})")
        if z.device not in devices:
            problems.append(f"{tag}: device {z.device!r} is not defined under 'devices'")
        elif z.device in profiles and z.point not in profiles[z.device].points:
            known = ", ".join(sorted(profiles[z.device].points)[:12])
            problems.append(f"{tag}: device {z.device!r} has no point {z.point!r} (it has: {known})")
    if cfg.mqtt.password_file and not cfg.mqtt.username:
        problems.append(f"{where('$.mqtt', 'mqtt')}: password_file given without username")
    return problems


def read_secret(path: str) -> str:
    """Read a secret file, refusing one that others can read (it must be mode 0600 or stricter)."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise ConfigError([f"{path}: secret file must not be readable by group or others (chmod 600)"])
    return Path(path).read_text(encoding="utf-8").strip()
