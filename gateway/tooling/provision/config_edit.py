"""``gatehouse device add|list|show|remove``: edits of a gateway config through ruamel's round-trip mode, so
the installer's comments and layout survive. Every edited config is validated with
:func:`gateway.config.load` before it replaces the old file (written to a temporary file in the same
folder, then renamed)."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from gateway import config
from gateway.tooling.provision.base import (
    ZONE_TYPES,
    ProvisionError,
    _check_name,
    _validated_write,
    edit_lock,
    parse_host_port,
)
from gateway.tooling.provision.serial_ports import check_serial_port, is_url

# ---------------------------------------------------------------- editing a config


class ConfigDoc:
    """A gateway config opened for editing: the round-trip tree and the validated config."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ProvisionError(f"{self.path} does not exist: create it with `gatehouse init --config {self.path}`")
        try:
            self.cfg = config.load(self.path)
        except config.ConfigError as e:
            raise ProvisionError(
                f"{self.path} has errors; fix them first (`gatehouse config check {self.path}`)", e.problems
            ) from None
        self._yaml = YAML(typ="rt")
        self._yaml.allow_duplicate_keys = False
        self._yaml.indent(mapping=2, sequence=4, offset=2)
        self._yaml.width = 120
        self._yaml.preserve_quotes = True
        self.tree: CommentedMap = self._yaml.load(self.path.read_text(encoding="utf-8"))

    def section(self, key: str) -> CommentedSeq:
        seq = self.tree.get(key)
        if seq is None:
            seq = CommentedSeq()
            self.tree[key] = seq
        elif not isinstance(seq, CommentedSeq):
            raise ProvisionError(f"{self.path}: '{key}' must be a list")
        if not seq:
            seq.fa.set_block_style()
        return seq

    def entries(self, key: str) -> list[CommentedMap]:
        seq = self.tree.get(key)
        return [e for e in seq if isinstance(e, CommentedMap)] if isinstance(seq, list) else []

    def find(self, key: str, name: str) -> CommentedMap | None:
        return next((e for e in self.entries(key) if e.get("name") == name), None)

    def remove(self, key: str, entry: CommentedMap) -> None:
        seq = self.tree[key]
        for i, e in enumerate(seq):
            if e is entry:
                del seq[i]
                return

    def text(self) -> str:
        buf = io.StringIO()
        self._yaml.dump(self.tree, buf)
        return buf.getvalue()

    def save(self) -> config.GatewayConfig:
        self.cfg = _validated_write(self.path, self.text())
        return self.cfg


def _flow(items: Mapping[str, Any]) -> CommentedMap:
    m = CommentedMap(items)
    m.fa.set_flow_style()
    return m


# ---------------------------------------------------------------- devices


@dataclass
class PointMapping:
    point: str
    name: str
    opts: dict[str, str]


def parse_mapping(text: str, what: str, allowed: Mapping[str, bool]) -> PointMapping:
    """``POINT=NAME[,key=value][,flag]``; ``allowed`` maps each option to True if it is a bare flag."""
    head, *rest = text.split(",")
    point, sep, name = head.partition("=")
    if not sep or not point.strip() or not name.strip():
        raise ProvisionError(f"{what} {text!r}: expected POINT=NAME[,option=value...]")
    opts: dict[str, str] = {}
    for item in rest:
        k, eq, v = item.partition("=")
        k = k.strip()
        if k not in allowed:
            raise ProvisionError(f"{what} {text!r}: unknown option {k!r} (options: {', '.join(allowed)})")
        if allowed[k] and eq:
            raise ProvisionError(f"{what} {text!r}: {k} takes no value")
        if not allowed[k] and not eq:
            raise ProvisionError(f"{what} {text!r}: {k} needs a value ({k}=...)")
        opts[k] = v.strip() if eq else "true"
    return PointMapping(point.strip(), name.strip(), opts)


ZONE_OPTIONS = {"type": False, "label": False, "group": False, "invert": True}
DOOR_OPTIONS = {"contact": False, "exit": False, "label": False, "gate": True}


def parse_place(text: str | None) -> dict[str, str] | None:
    """``building[/unit[/house]]``."""
    if not text:
        return None
    parts = text.split("/")
    if len(parts) > 3 or not all(parts):
        raise ProvisionError(f"--place {text!r}: expected BUILDING[/UNIT[/HOUSE]], e.g. 3/2/1201")
    for p in parts:
        _check_name("place", p)
    return dict(zip(("building", "unit", "house"), parts, strict=False))


@dataclass
class BusRequest:
    """Which bus a new device goes on: an existing one by name, or a serial port or TCP endpoint."""

    name: str | None = None
    serial: str | None = None
    tcp: str | None = None
    rtu_over_tcp: bool = False
    baudrate: int | None = None
    parity: str | None = None
    stopbits: int | None = None
    timeout_ms: int | None = None


@dataclass
class AddResult:
    device: str
    bus: str
    bus_created: bool
    zones: list[str]
    doors: list[str]


def _known_profiles(extra_dir: str | None) -> str:
    from devices.profiles import list_profiles

    return ", ".join(list_profiles(extra_dir)) or "none"


def _profile(name: str, extra_dir: str | None) -> Any:
    from devices.profiles import ProfileError, find_profile, list_profiles

    if name not in list_profiles(extra_dir):
        raise ProvisionError(f"no profile {name!r}; known profiles: {_known_profiles(extra_dir)}")
    try:
        return find_profile(name, extra_dir=extra_dir)
    except ProfileError as e:
        raise ProvisionError(f"profile {name!r} cannot be used: {e}") from None


def _bus_settings(bus: Mapping[str, Any]) -> str:
    if bus.get("kind") == "modbus-rtu":
        return f"{bus.get('serial')} {bus.get('baudrate', 9600)} 8{bus.get('parity', 'N')}{bus.get('stopbits', 1)}"
    return f"{bus.get('host')}:{bus.get('port')} ({bus.get('kind')})"


def _resolve_bus(doc: ConfigDoc, req: BusRequest) -> tuple[CommentedMap, bool]:
    """The bus entry for ``req``: an existing one, or a new one (not yet added to the tree)."""
    buses = doc.entries("buses")
    names = ", ".join(str(b.get("name")) for b in buses) or "none"
    if req.serial and req.tcp:
        raise ProvisionError("give either --serial or --tcp, not both")
    serial_opts = {"--baud": req.baudrate, "--parity": req.parity, "--stopbits": req.stopbits}
    if not req.serial and not req.tcp:
        if not req.name:
            raise ProvisionError(f"say which bus: --bus NAME (buses: {names}), --serial PORT or --tcp HOST:PORT")
        bus = doc.find("buses", req.name)
        if bus is None:
            raise ProvisionError(
                f"no bus {req.name!r} (buses: {names}); to create it give --serial PORT or --tcp HOST:PORT as well"
            )
        given = [k for k, v in serial_opts.items() if v is not None]
        if given:
            raise ProvisionError(
                f"{', '.join(given)} would change bus {req.name!r} ({_bus_settings(bus)}) for "
                "every device on it; edit the bus in the config instead"
            )
        if bus.get("kind") == "modbus-rtu":
            check_serial_port(str(bus.get("serial")), check_busy=False)
        return bus, False
    if req.serial:
        port = req.serial
        existing = next((b for b in buses if b.get("kind") == "modbus-rtu" and b.get("serial") == port), None)
        if existing is None and not is_url(port):
            real = os.path.realpath(port)
            existing = next(
                (b for b in buses if b.get("kind") == "modbus-rtu" and os.path.realpath(str(b.get("serial"))) == real),
                None,
            )
        if existing is not None:
            if req.name and req.name != existing.get("name"):
                raise ProvisionError(
                    f"{port} is already bus {existing.get('name')!r}; use --bus {existing.get('name')}"
                )
            differ = [
                f"{k} {v}"
                for k, v, cur in (
                    ("--baud", req.baudrate, existing.get("baudrate", 9600)),
                    ("--parity", req.parity, existing.get("parity", "N")),
                    ("--stopbits", req.stopbits, existing.get("stopbits", 1)),
                )
                if v is not None and v != cur
            ]
            if differ:
                raise ProvisionError(
                    f"bus {existing.get('name')!r} on {port} runs at {_bus_settings(existing)}; {', '.join(differ)} "
                    "differs, and every device on one RS-485 line must use the same settings"
                )
            check_serial_port(port, check_busy=False)
            return existing, False
        name = req.name or _free_name(doc, "rs485-" + re.sub(r"[^A-Za-z0-9_.-]", "-", Path(port).name))
        if doc.find("buses", name) is not None:
            raise ProvisionError(f"bus {name!r} already exists on {_bus_settings(doc.find('buses', name) or {})}")
        check_serial_port(port, check_busy=True)
        new: dict[str, Any] = {"name": name, "kind": "modbus-rtu", "serial": port, "baudrate": req.baudrate or 9600}
        if req.parity and req.parity != "N":
            new["parity"] = req.parity
        if req.stopbits and req.stopbits != 1:
            new["stopbits"] = req.stopbits
    else:
        host, tport = parse_host_port(str(req.tcp), "--tcp")
        kind = "modbus-rtu-over-tcp" if req.rtu_over_tcp else "modbus-tcp"
        given = [k for k, v in serial_opts.items() if v is not None]
        if given:
            raise ProvisionError(f"{', '.join(given)}: serial settings belong to the serial server, not to a TCP bus")
        existing = next((b for b in buses if b.get("host") == host and b.get("port") == tport), None)
        if existing is not None:
            if existing.get("kind") != kind:
                raise ProvisionError(
                    f"{host}:{tport} is already bus {existing.get('name')!r} of kind {existing.get('kind')}, not {kind}"
                )
            if req.name and req.name != existing.get("name"):
                raise ProvisionError(
                    f"{host}:{tport} is already bus {existing.get('name')!r}; use --bus {existing.get('name')}"
                )
            return existing, False
        name = req.name or _free_name(doc, f"tcp-{host}-{tport}".replace(":", "-"))
        if doc.find("buses", name) is not None:
            raise ProvisionError(f"bus {name!r} already exists on {_bus_settings(doc.find('buses', name) or {})}")
        new = {"name": name, "kind": kind, "host": host, "port": tport}
    if req.timeout_ms is not None:
        new["timeout_ms"] = req.timeout_ms
    _check_name("bus", name)
    return _flow(new), True


def _free_name(doc: ConfigDoc, base: str) -> str:
    base = base[:60]
    if doc.find("buses", base) is None:
        return base
    for i in range(2, 1000):
        if doc.find("buses", f"{base}-{i}") is None:
            return f"{base}-{i}"
    raise ProvisionError(f"too many buses named {base}-N")


def add_device(
    config_path: str | os.PathLike[str],
    name: str,
    *,
    profile: str,
    unit: int,
    bus: BusRequest,
    poll_ms: int | None = None,
    place: str | None = None,
    zones: Sequence[str] = (),
    doors: Sequence[str] = (),
) -> AddResult:
    """Add a device (with its bus if new, its zones and doors) to the config, holding its edit lock throughout."""
    with edit_lock(Path(config_path)):
        return _add_device(ConfigDoc(config_path), name, profile, unit, bus, poll_ms, place, zones, doors)


def _add_device(
    doc: ConfigDoc,
    name: str,
    profile: str,
    unit: int,
    bus: BusRequest,
    poll_ms: int | None,
    place: str | None,
    zones: Sequence[str],
    doors: Sequence[str],
) -> AddResult:
    _check_name("device", name)
    prof = _profile(profile, doc.cfg.profiles_dir)
    if not 1 <= unit <= 247:
        raise ProvisionError(f"unit id {unit} is out of range: Modbus unit ids are 1-247 (0 is broadcast)")
    old = doc.find("devices", name)
    if old is not None:
        raise ProvisionError(
            f"device {name!r} already exists (bus {old.get('bus')}, unit {old.get('unit', 1)}); "
            f"remove it first with `gatehouse device remove {name}`"
        )
    bus_entry, created = _resolve_bus(doc, bus)
    bus_name = str(bus_entry["name"])
    for other in doc.entries("devices"):
        if other.get("bus") == bus_name and int(other.get("unit", 1)) == unit:
            raise ProvisionError(
                f"unit id {unit} on bus {bus_name!r} is already used by device {other.get('name')!r}; each device on "
                "a bus needs its own unit id (change it on the device, then add it with that id)"
            )
    where = parse_place(place)
    zone_maps = [parse_mapping(z, "--zone", ZONE_OPTIONS) for z in zones]
    door_maps = [parse_mapping(d, "--door", DOOR_OPTIONS) for d in doors]
    points = prof.points

    def point_of(p: str, what: str) -> str:
        if p not in points:
            raise ProvisionError(f"{what}: profile {profile!r} has no point {p!r} (points: {', '.join(points)})")
        return p

    new_zones: list[dict[str, Any]] = []
    for z in zone_maps:
        point_of(z.point, "--zone")
        _check_name("zone", z.name)
        if doc.find("zones", z.name) is not None or any(n["name"] == z.name for n in new_zones):
            raise ProvisionError(f"--zone: a zone named {z.name!r} already exists")
        ztype = z.opts.get("type", "perimeter")
        if ztype not in ZONE_TYPES:
            raise ProvisionError(f"--zone {z.name}: type {ztype!r} is not one of {', '.join(ZONE_TYPES)}")
        entry: dict[str, Any] = {"name": z.name, "device": name, "point": z.point, "type": ztype}
        if "label" in z.opts:
            entry["label"] = z.opts["label"]
        if "group" in z.opts:
            entry["group"] = z.opts["group"]
        if "invert" in z.opts:
            entry["invert"] = True
        if where:
            entry["place"] = _flow(where)
        new_zones.append(entry)
    new_doors: list[dict[str, Any]] = []
    for d in door_maps:
        relay = points[point_of(d.point, "--door")]
        if not relay.writable:
            raise ProvisionError(f"--door {d.name}: point {d.point!r} is not writable (a door needs a relay output)")
        _check_name("door", d.name)
        if doc.find("doors", d.name) is not None or any(n["name"] == d.name for n in new_doors):
            raise ProvisionError(f"--door: a door named {d.name!r} already exists")
        entry = {"name": d.name, "device": name, "relay": d.point}
        if "contact" in d.opts:
            entry["contact"] = point_of(d.opts["contact"], "--door contact")
        if "exit" in d.opts:
            entry["exit_button"] = point_of(d.opts["exit"], "--door exit")
        if "gate" in d.opts:
            entry["gate"] = True
        if "label" in d.opts:
            entry["label"] = d.opts["label"]
        if where and "gate" not in d.opts and "unit" in where:
            entry["place"] = _flow({k: where[k] for k in ("building", "unit")})
        new_doors.append(entry)

    if created:
        doc.section("buses").append(bus_entry)
    dev: dict[str, Any] = {"name": name, "profile": profile, "bus": bus_name, "unit": unit}
    if poll_ms is not None:
        dev["poll_ms"] = poll_ms
    if where:
        dev["place"] = _flow(where)
    doc.section("devices").append(_flow(dev))
    for zone in new_zones:
        doc.section("zones").append(_flow(zone))
    for door in new_doors:
        doc.section("doors").append(_flow(door))
    doc.save()
    return AddResult(name, bus_name, created, [z["name"] for z in new_zones], [d["name"] for d in new_doors])


@dataclass
class RemoveResult:
    device: str
    zones: list[str]
    doors: list[str]
    bus_removed: str | None


def remove_device(config_path: str | os.PathLike[str], name: str, *, keep_bus: bool = False) -> RemoveResult:
    """Remove a device with the zones and doors mapped to it, and its bus if nothing else is on it (holding the
    config's edit lock throughout)."""
    with edit_lock(Path(config_path)):
        return _remove_device(ConfigDoc(config_path), name, keep_bus)


def _remove_device(doc: ConfigDoc, name: str, keep_bus: bool) -> RemoveResult:
    dev = doc.find("devices", name)
    if dev is None:
        names = ", ".join(str(d.get("name")) for d in doc.entries("devices")) or "none"
        raise ProvisionError(f"no device {name!r} (devices: {names})")
    zones = [z for z in doc.entries("zones") if z.get("device") == name]
    doors = [d for d in doc.entries("doors") if d.get("device") == name]
    for z in zones:
        doc.remove("zones", z)
    for d in doors:
        doc.remove("doors", d)
    doc.remove("devices", dev)
    bus_removed = None
    bus = doc.find("buses", str(dev.get("bus")))
    if bus is not None and not keep_bus and not any(d.get("bus") == bus.get("name") for d in doc.entries("devices")):
        doc.remove("buses", bus)
        bus_removed = str(bus.get("name"))
    doc.save()
    return RemoveResult(name, [str(z["name"]) for z in zones], [str(d["name"]) for d in doors], bus_removed)


def describe_devices(cfg: config.GatewayConfig) -> list[dict[str, Any]]:
    """Each device with its bus endpoint, place, zones and doors (for ``device list`` and ``show``)."""
    buses = {b.name: b for b in cfg.buses}
    out = []
    for d in cfg.devices:
        b = buses.get(d.bus)
        endpoint = ""
        if b is not None:
            endpoint = (
                f"{b.serial} {b.baudrate} 8{b.parity}{b.stopbits}" if b.kind == "modbus-rtu" else f"{b.host}:{b.port}"
            )
        place = "/".join(p for p in (d.place.building, d.place.unit, d.place.house) if p) if d.place else ""
        out.append(
            {
                "name": d.name,
                "profile": d.profile,
                "bus": d.bus,
                "kind": b.kind if b else "",
                "endpoint": endpoint,
                "unit": d.unit,
                "poll_ms": d.poll_ms,
                "place": place,
                "zones": [
                    {"name": z.name, "point": z.point, "type": z.type, "label": z.label}
                    for z in cfg.zones
                    if z.device == d.name
                ],
                "doors": [
                    {"name": x.name, "relay": x.relay, "contact": x.contact, "exit_button": x.exit_button}
                    for x in cfg.doors
                    if x.device == d.name
                ],
            }
        )
    return out


def iter_profile_points(profile: str, extra_dir: str | None) -> Iterator[dict[str, Any]]:
    prof = _profile(profile, extra_dir)
    for p in prof.points.values():
        yield {
            "name": p.name,
            "table": p.table,
            "address": p.address,
            "dtype": p.dtype,
            "kind": p.kind,
            "writable": p.writable,
            "group": p.group,
        }
