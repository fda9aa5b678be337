"""Device profiles: a vendor model's register map as a YAML data file.

A new model is a new file in ``devices/profiles/`` (or in the gateway's ``profiles_dir``). The file is
validated strictly when it is loaded: unknown keys, a data type that does not fit its table or
register count, a point that overlaps another, a group or a pulse command that does not exist are
errors naming the file, the line and the point. The format is described in ``docs/profiles.md``.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

BUILTIN_DIR = Path(__file__).parent / "profiles"

Table = Literal["coil", "discrete", "holding", "input"]
DType = Literal["bool", "bit", "uint16", "int16", "uint32", "int32", "float32"]
WordOrder = Literal["big", "little"]
Kind = Literal[
    "zone_alarm",
    "zone_tamper",
    "zone_fault",
    "fence_touch",
    "fence_cut",
    "fence_short",
    "panel_tamper",
    "panel_power",
    "relay",
    "output",
    "input",
    "value",
    "config",
    "info",
]

TABLES: tuple[str, ...] = get_args(Table)
DTYPES: tuple[str, ...] = get_args(DType)
KINDS: tuple[str, ...] = get_args(Kind)
BIT_TABLES = frozenset({"coil", "discrete"})
REGISTER_TABLES = frozenset({"holding", "input"})
WRITABLE_TABLES = frozenset({"coil", "holding"})
#: How many registers each register data type takes.
DTYPE_REGISTERS: Mapping[str, int] = MappingProxyType(
    {"bit": 1, "uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2}
)
#: The Modbus limits for one read request (bits for FC01/02, registers for FC03/04).
MODBUS_MAX_BITS = 2000
MODBUS_MAX_REGISTERS = 125

PROFILE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
POINT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
GROUP_NAME_RE = POINT_NAME_RE
DEFAULT_GROUP = "default"


class ProfileError(Exception):
    """A profile that cannot be found or is not valid. The message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class PointSpec:
    """One named point of a device: where it lives and how its raw value is decoded."""

    name: str
    table: Table
    address: int
    dtype: DType
    count: int  # bits (bit tables) or registers (register tables) the point occupies
    bit: int | None = None  # dtype "bit": which bit of the register, 0 = least significant
    word_order: WordOrder = "big"  # 32-bit types: "big" = high word at the lower address
    scale: float = 1.0
    writable: bool = False
    kind: Kind = "input"
    group: str = DEFAULT_GROUP
    description: str = ""
    #: Names of the raw values the maker documents (a mode register: 0 normal, 1 linkage ...).
    values: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))
    #: The values the device must hold for the gateway to work (None: anything). A device that reads
    #: otherwise is misconfigured: a device fault at start-up and in ``device test``.
    expect: tuple[int, ...] | None = None

    @property
    def end(self) -> int:
        """One past the last address the point occupies."""
        return self.address + self.count

    def label(self, value: object) -> str:
        """``value`` with its documented name: ``1 (linkage)``."""
        name = self.values.get(int(value)) if isinstance(value, int | bool) else None
        return f"{value} ({name})" if name else str(value)

    def check(self, value: object) -> str | None:
        """Why ``value`` is not what the profile expects, or None."""
        if self.expect is None or (isinstance(value, int | bool) and int(value) in self.expect):
            return None
        wanted = " or ".join(self.label(v) for v in self.expect)
        return f"{self.name} = {self.label(value)}, expected {wanted}"


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """Points polled together. ``poll_ms`` None means the device's own poll interval; a group with
    ``poll`` False is never polled (configuration registers, write-only points)."""

    name: str
    poll_ms: int | None = None
    poll: bool = True


@dataclass(frozen=True, slots=True)
class PulseSpec:
    """The device's own timed pulse ("flash") command: a function-05 write to ``on_base + address``
    (or ``off_base + address`` for an off-pulse) whose value field is the duration in ``unit_ms``."""

    on_base: int
    off_base: int
    unit_ms: int
    max_units: int
    table: Table = "coil"


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """A read the maker documents for the model, and its answer: ``expect`` values (None = any value), or
    ``refused`` (the model answers this read with a Modbus exception). A bus scan runs the probes of the
    models that identify alike, to tell them apart."""

    table: Table
    address: int
    count: int
    expect: tuple[int | None, ...] | None = None
    refused: bool = False

    def describe(self) -> str:
        fc = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}[self.table]
        return f"function {fc:02d} at 0x{self.address:04X} x{self.count}"


@dataclass(frozen=True, slots=True)
class IdentifySpec:
    """How a bus scan recognises the model: read ``count`` registers at ``address`` and compare with
    ``expect`` (None = any answer); ``unit_at`` is an offset in the answer that holds the unit id.
    ``probes`` tell it apart from other models that answer the same; ``hint`` says how an installer tells
    it apart by eye when no read the makers document can."""

    table: Table
    address: int
    count: int
    expect: tuple[int | None, ...] | None = None
    unit_at: int | None = None
    probes: tuple[ProbeSpec, ...] = ()
    hint: str = ""


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """How adjacent points are merged into one read: at most ``max_bits``/``max_registers`` per
    request, bridging holes of at most ``max_gap_*`` addresses the device is known to answer."""

    max_bits: int = MODBUS_MAX_BITS
    max_registers: int = MODBUS_MAX_REGISTERS
    max_gap_bits: int = 0
    max_gap_registers: int = 0


@dataclass(frozen=True, slots=True)
class Timings:
    """What the device needs on the wire: a minimum silence before each request and the longest
    time it takes to answer (hints; the bus settings win when they are larger)."""

    inter_frame_ms: int = 0
    response_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    description: str
    points: Mapping[str, PointSpec]
    groups: Mapping[str, GroupSpec]
    vendor: str = ""
    model: str = ""
    source: str = ""  # the file it was loaded from
    references: tuple[str, ...] = ()
    blocks: BlockLimits = field(default_factory=BlockLimits)
    timings: Timings = field(default_factory=Timings)
    pulse: PulseSpec | None = None
    identify: IdentifySpec | None = None

    def point(self, name: str) -> PointSpec:
        try:
            return self.points[name]
        except KeyError:
            raise KeyError(f"profile {self.name!r} has no point {name!r}") from None

    def polled_groups(self) -> list[GroupSpec]:
        """Groups that are polled and have at least one point, in file order."""
        used = {p.group for p in self.points.values()}
        return [g for g in self.groups.values() if g.poll and g.name in used]

    def pulse_limit_ms(self) -> int | None:
        """The longest timed pulse the device's own flash command can make (None: no flash command)."""
        return None if self.pulse is None else self.pulse.max_units * self.pulse.unit_ms


# ---------------------------------------------------------------- finding and caching

_cache: dict[str, tuple[tuple[int, int], Profile]] = {}
_cache_lock = threading.Lock()


def find_profile(name: str, extra_dir: str | None = None) -> Profile:
    """The profile ``name``: ``devices/profiles/<name>.yaml`` first, then ``<extra_dir>/<name>.yaml``."""
    if not isinstance(name, str) or not PROFILE_NAME_RE.match(name):
        raise ProfileError(f"profile name {name!r} is not valid (lower-case letters, digits, '.', '_', '-')")
    dirs = [BUILTIN_DIR] + ([Path(extra_dir)] if extra_dir else [])
    for d in dirs:
        path = d / f"{name}.yaml"
        if path.is_file():
            return load_profile(path)
    known = ", ".join(list_profiles(extra_dir)) or "none"
    where = " or ".join(str(d) for d in dirs)
    raise ProfileError(f"no profile {name!r} in {where} (known: {known})")


def list_profiles(extra_dir: str | None = None) -> list[str]:
    """Names of the profiles that :func:`find_profile` can find (not validated)."""
    names: set[str] = set()
    for d in [BUILTIN_DIR] + ([Path(extra_dir)] if extra_dir else []):
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml") if PROFILE_NAME_RE.match(p.stem))
    return sorted(names)


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Load and validate one profile file (cached while the file is unchanged)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise ProfileError(f"{p}: cannot read: {e.strerror or e}") from None
    key = str(p.resolve())
    stamp = (st.st_mtime_ns, st.st_size)
    with _cache_lock:
        hit = _cache.get(key)
        if hit and hit[0] == stamp:
            return hit[1]
    profile = _Loader(p).load()
    with _cache_lock:
        _cache[key] = (stamp, profile)
    return profile


# ---------------------------------------------------------------- validation

_TOP_KEYS = {
    "name",
    "description",
    "vendor",
    "model",
    "references",
    "blocks",
    "timings",
    "pulse",
    "identify",
    "groups",
    "points",
    "series",
}
_POINT_KEYS = {
    "table",
    "address",
    "dtype",
    "count",
    "bit",
    "word_order",
    "scale",
    "writable",
    "kind",
    "group",
    "description",
    "values",
    "expect",
}
_SERIES_KEYS = _POINT_KEYS | {"name", "repeat", "first", "step"}
_GROUP_KEYS = {"poll_ms", "poll"}
_BLOCK_KEYS = {"max_bits", "max_registers", "max_gap_bits", "max_gap_registers"}
_TIMING_KEYS = {"inter_frame_ms", "response_ms"}
_PULSE_KEYS = {"method", "table", "on_base", "off_base", "unit_ms", "max_units"}
_IDENTIFY_KEYS = {"table", "address", "count", "expect", "unit_at", "probes", "hint"}
_PROBE_KEYS = {"table", "address", "count", "expect", "refused"}


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tree: Any = None

    # -- helpers

    def _line(self, node: Any, key: str | int | None = None) -> int | None:
        try:
            if key is None:
                return int(node.lc.line) + 1
            if isinstance(node, CommentedMap):
                return int(node.lc.key(key)[0]) + 1
            if isinstance(node, CommentedSeq):
                return int(node.lc.item(key)[0]) + 1
        except (AttributeError, KeyError, IndexError, TypeError):
            return None
        return None

    def error(self, msg: str, node: Any = None, key: str | int | None = None) -> ProfileError:
        line = self._line(node, key) if node is not None else None
        where = f"{self.path}:{line}" if line else str(self.path)
        return ProfileError(f"{where}: {msg}")

    def mapping(self, node: Any, what: str, allowed: set[str], parent: Any = None, key: Any = None) -> CommentedMap:
        if not isinstance(node, dict):
            raise self.error(f"{what} must be a mapping", parent if parent is not None else node, key)
        for k in node:
            if not isinstance(k, str) or k not in allowed:
                raise self.error(f"{what}: unknown key {k!r} (allowed: {', '.join(sorted(allowed))})", node, k)
        return node  # type: ignore[return-value]

    def integer(self, node: Any, key: str, what: str, lo: int, hi: int, default: int | None = None) -> int:
        if key not in node:
            if default is None:
                raise self.error(f"{what}: '{key}' is required", node)
            return default
        v = node[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"{what}: '{key}' must be an integer, not {v!r}", node, key)
        v = int(v)
        if not lo <= v <= hi:
            raise self.error(f"{what}: '{key}' must be between {lo} and {hi}, not {v}", node, key)
        return v

    def string(self, node: Any, key: str, what: str, default: str | None = None) -> str:
        if key not in node:
            if default is None:
                raise self.error(f"{what}: '{key}' is required", node)
            return default
        v = node[key]
        if not isinstance(v, str):
            raise self.error(f"{what}: '{key}' must be a string, not {v!r}", node, key)
        return str(v)

    def choice(self, node: Any, key: str, what: str, options: tuple[str, ...], default: str | None = None) -> str:
        v = self.string(node, key, what, default)
        if v not in options:
            raise self.error(f"{what}: '{key}' must be one of {', '.join(options)}, not {v!r}", node, key)
        return v

    def boolean(self, node: Any, key: str, what: str, default: bool) -> bool:
        if key not in node:
            return default
        v = node[key]
        if not isinstance(v, bool):
            raise self.error(f"{what}: '{key}' must be true or false, not {v!r}", node, key)
        return v

    # -- the file

    def load(self) -> Profile:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"{self.path}: cannot read: {e}") from None
        yaml = YAML(typ="rt")
        yaml.allow_duplicate_keys = False
        try:
            tree = yaml.load(text)
        except MarkedYAMLError as e:
            mark = e.problem_mark
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ProfileError(f"{self.path}{line}: not valid YAML: {e.problem}") from None
        except Exception as e:  # ruamel raises several unrelated types (duplicate keys among them)
            raise ProfileError(f"{self.path}: not valid YAML: {e}") from None
        self.tree = tree
        top = self.mapping(tree, "the profile", _TOP_KEYS)
        name = self.string(top, "name", "the profile")
        if not PROFILE_NAME_RE.match(name):
            raise self.error(f"profile name {name!r} is not valid", top, "name")
        if name != self.path.stem:
            raise self.error(f"profile name {name!r} must match the file name {self.path.stem!r}", top, "name")
        description = self.string(top, "description", "the profile")
        refs = top.get("references", [])
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise self.error("'references' must be a list of strings", top, "references")

        groups = self._groups(top)
        blocks = self._blocks(top)
        timings = self._timings(top)
        points = self._points(top, groups)
        pulse = self._pulse(top)
        identify = self._identify(top)
        if not points:
            raise self.error("the profile has no points (give 'points' or 'series')", top)
        self._check_overlaps(points, top)
        for p in points.values():
            if p.table in REGISTER_TABLES and p.count > blocks.max_registers:
                raise self.error(
                    f"point {p.name!r} takes {p.count} registers but blocks.max_registers is {blocks.max_registers}",
                    top,
                    "blocks",
                )
        if pulse is not None and not any(p.writable and p.table == pulse.table for p in points.values()):
            raise self.error(f"'pulse' is given but no writable {pulse.table} point exists", top, "pulse")
        unused = [g for g in groups if g != DEFAULT_GROUP and not any(p.group == g for p in points.values())]
        if unused:
            raise self.error(f"group(s) {', '.join(unused)} have no points", top, "groups")
        return Profile(
            name=name,
            description=description,
            vendor=self.string(top, "vendor", "the profile", ""),
            model=self.string(top, "model", "the profile", ""),
            source=str(self.path),
            references=tuple(str(r) for r in refs),
            points=MappingProxyType(points),
            groups=MappingProxyType(groups),
            blocks=blocks,
            timings=timings,
            pulse=pulse,
            identify=identify,
        )

    def _groups(self, top: CommentedMap) -> dict[str, GroupSpec]:
        groups: dict[str, GroupSpec] = {DEFAULT_GROUP: GroupSpec(DEFAULT_GROUP)}
        node = top.get("groups")
        if node is None:
            return groups
        if not isinstance(node, dict):
            raise self.error("'groups' must be a mapping of group names", top, "groups")
        for gname, g in node.items():
            what = f"group {gname!r}"
            if not isinstance(gname, str) or not GROUP_NAME_RE.match(gname):
                raise self.error(f"{what}: not a valid group name", node, gname)
            g = {} if g is None else g
            g = self.mapping(g, what, _GROUP_KEYS, node, gname)
            poll_ms = self.integer(g, "poll_ms", what, 1, 3_600_000, 0) or None
            poll = self.boolean(g, "poll", what, True)
            if not poll and poll_ms:
                raise self.error(f"{what}: 'poll_ms' makes no sense with 'poll: false'", g, "poll_ms")
            groups[gname] = GroupSpec(gname, poll_ms, poll)
        return groups

    def _blocks(self, top: CommentedMap) -> BlockLimits:
        node = top.get("blocks")
        if node is None:
            return BlockLimits()
        b = self.mapping(node, "'blocks'", _BLOCK_KEYS, top, "blocks")
        return BlockLimits(
            max_bits=self.integer(b, "max_bits", "'blocks'", 1, MODBUS_MAX_BITS, MODBUS_MAX_BITS),
            max_registers=self.integer(b, "max_registers", "'blocks'", 1, MODBUS_MAX_REGISTERS, MODBUS_MAX_REGISTERS),
            max_gap_bits=self.integer(b, "max_gap_bits", "'blocks'", 0, MODBUS_MAX_BITS, 0),
            max_gap_registers=self.integer(b, "max_gap_registers", "'blocks'", 0, MODBUS_MAX_REGISTERS, 0),
        )

    def _timings(self, top: CommentedMap) -> Timings:
        node = top.get("timings")
        if node is None:
            return Timings()
        t = self.mapping(node, "'timings'", _TIMING_KEYS, top, "timings")
        response = self.integer(t, "response_ms", "'timings'", 1, 60_000, 0)
        return Timings(
            inter_frame_ms=self.integer(t, "inter_frame_ms", "'timings'", 0, 1000, 0),
            response_ms=response or None,
        )

    def _pulse(self, top: CommentedMap) -> PulseSpec | None:
        node = top.get("pulse")
        if node is None:
            return None
        p = self.mapping(node, "'pulse'", _PULSE_KEYS, top, "pulse")
        self.choice(p, "method", "'pulse'", ("flash",))
        table = self.choice(p, "table", "'pulse'", ("coil",), "coil")
        spec = PulseSpec(
            on_base=self.integer(p, "on_base", "'pulse'", 0, 0xFFFF),
            off_base=self.integer(p, "off_base", "'pulse'", 0, 0xFFFF),
            unit_ms=self.integer(p, "unit_ms", "'pulse'", 1, 60_000),
            max_units=self.integer(p, "max_units", "'pulse'", 1, 0xFFFF, 0xFFFF),
            table=table,  # type: ignore[arg-type]
        )
        if spec.on_base == spec.off_base:
            raise self.error("'pulse': on_base and off_base must differ", p, "off_base")
        return spec

    def _identify(self, top: CommentedMap) -> IdentifySpec | None:
        node = top.get("identify")
        if node is None:
            return None
        what = "'identify'"
        i = self.mapping(node, what, _IDENTIFY_KEYS, top, "identify")
        table = self.choice(i, "table", what, TABLES)
        address = self.integer(i, "address", what, 0, 0xFFFF)
        count = self.integer(i, "count", what, 1, MODBUS_MAX_REGISTERS, 1)
        if address + count > 0x10000:
            raise self.error(f"{what}: address {address} + count {count} runs past 65535", i, "count")
        expect = self._answer(i, what, table, count)
        unit_at: int | None = None
        if "unit_at" in i:
            unit_at = self.integer(i, "unit_at", what, 0, count - 1)
            if table in BIT_TABLES:
                raise self.error(f"{what}: 'unit_at' needs a register table", i, "unit_at")
        probes: list[ProbeSpec] = []
        raw_probes = i.get("probes", [])
        if not isinstance(raw_probes, list):
            raise self.error(f"{what}: 'probes' must be a list", i, "probes")
        for n, node in enumerate(raw_probes):
            pwhat = f"{what} probes[{n}]"
            pr = self.mapping(node, pwhat, _PROBE_KEYS, raw_probes, n)
            ptable = self.choice(pr, "table", pwhat, TABLES)
            paddress = self.integer(pr, "address", pwhat, 0, 0xFFFF)
            pcount = self.integer(pr, "count", pwhat, 1, MODBUS_MAX_REGISTERS, 1)
            if paddress + pcount > 0x10000:
                raise self.error(f"{pwhat}: address {paddress} + count {pcount} runs past 65535", pr, "count")
            refused = self.boolean(pr, "refused", pwhat, False)
            pexpect = self._answer(pr, pwhat, ptable, pcount)
            if refused and pexpect is not None:
                raise self.error(f"{pwhat}: 'refused' and 'expect' exclude each other", pr, "refused")
            probes.append(ProbeSpec(ptable, paddress, pcount, pexpect, refused))  # type: ignore[arg-type]
        hint = self.string(i, "hint", what, "")
        return IdentifySpec(table, address, count, expect, unit_at, tuple(probes), hint)  # type: ignore[arg-type]

    def _answer(self, node: Any, what: str, table: str, count: int) -> tuple[int | None, ...] | None:
        """An ``expect`` list of ``count`` register (or bit) values, null for any."""
        if "expect" not in node:
            return None
        raw = node["expect"]
        if not isinstance(raw, list) or len(raw) != count:
            raise self.error(f"{what}: 'expect' must be a list of {count} values (null = any)", node, "expect")
        vals: list[int | None] = []
        for v in raw:
            if v is None:
                vals.append(None)
            elif (isinstance(v, bool) and table in BIT_TABLES) or (
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFFFF
            ):
                vals.append(int(v))
            else:
                raise self.error(f"{what}: 'expect' value {v!r} is not a register value", node, "expect")
        return tuple(vals)

    def _points(self, top: CommentedMap, groups: dict[str, GroupSpec]) -> dict[str, PointSpec]:
        points: dict[str, PointSpec] = {}
        pnode = top.get("points")
        if pnode is not None:
            if not isinstance(pnode, dict):
                raise self.error("'points' must be a mapping of point names", top, "points")
            for pname, body in pnode.items():
                if not isinstance(pname, str) or not POINT_NAME_RE.match(pname):
                    raise self.error(f"point {pname!r}: not a valid point name (a-z, 0-9, _)", pnode, pname)
                body = self.mapping(body, f"point {pname!r}", _POINT_KEYS, pnode, pname)
                self._add(points, self._point(pname, body, body, groups), body)
        snode = top.get("series")
        if snode is not None:
            if not isinstance(snode, list):
                raise self.error("'series' must be a list", top, "series")
            for idx, s in enumerate(snode):
                what = f"series[{idx}]"
                s = self.mapping(s, what, _SERIES_KEYS, snode, idx)
                template = self.string(s, "name", what)
                if "{n}" not in template:
                    raise self.error(f"{what}: 'name' must contain {{n}}", s, "name")
                repeat = self.integer(s, "repeat", what, 1, 4096)
                first = self.integer(s, "first", what, 0, 65535, 1)
                base = self.integer(s, "address", what, 0, 0xFFFF)
                probe = self._point(template.replace("{n}", str(first)), s, s, groups, address=base)
                step = self.integer(s, "step", what, 1, 0xFFFF, probe.count if probe.bit is None else 1)
                for k in range(repeat):
                    pname = template.replace("{n}", str(first + k))
                    if not POINT_NAME_RE.match(pname):
                        raise self.error(f"{what}: point name {pname!r} is not valid", s, "name")
                    self._add(points, self._point(pname, s, s, groups, address=base + k * step), s)
        return points

    def _add(self, points: dict[str, PointSpec], p: PointSpec, node: Any) -> None:
        if p.name in points:
            raise self.error(f"point {p.name!r} is defined twice", node)
        points[p.name] = p

    def _point(
        self, name: str, body: Any, where: Any, groups: dict[str, GroupSpec], address: int | None = None
    ) -> PointSpec:
        what = f"point {name!r}"
        table = self.choice(body, "table", what, TABLES)
        if address is None:
            address = self.integer(body, "address", what, 0, 0xFFFF)
        elif address > 0xFFFF:
            raise self.error(f"{what}: address {address} is past 65535", body, "address")
        is_bits = table in BIT_TABLES
        dtype = self.choice(body, "dtype", what, DTYPES, "bool" if is_bits else "uint16")
        if is_bits and dtype != "bool":
            raise self.error(f"{what}: a {table} holds single bits; dtype must be bool, not {dtype}", body, "dtype")
        if not is_bits and dtype == "bool":
            raise self.error(
                f"{what}: a {table} register is 16 bits; use dtype bit (with 'bit') for one bit of it", body, "dtype"
            )
        need = 1 if is_bits else DTYPE_REGISTERS[dtype]
        count = self.integer(body, "count", what, 1, MODBUS_MAX_REGISTERS, need)
        if count != need:
            unit = "bit" if is_bits else "register"
            raise self.error(
                f"{what}: dtype {dtype} takes {need} {unit}{'s' if need > 1 else ''}, count {count} does not fit",
                body,
                "count",
            )
        if address + count > 0x10000:
            raise self.error(f"{what}: address {address} + count {count} runs past 65535", body, "address")
        bit: int | None = None
        if dtype == "bit":
            bit = self.integer(body, "bit", what, 0, 15)
        elif "bit" in body:
            raise self.error(f"{what}: 'bit' only goes with dtype bit", body, "bit")
        word_order = self.choice(body, "word_order", what, ("big", "little"), "big")
        if "word_order" in body and need != 2:
            raise self.error(f"{what}: 'word_order' only applies to 32-bit types, not {dtype}", body, "word_order")
        scale = 1.0
        if "scale" in body:
            s = body["scale"]
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s == 0:
                raise self.error(f"{what}: 'scale' must be a non-zero number, not {s!r}", body, "scale")
            if dtype in ("bool", "bit"):
                raise self.error(f"{what}: 'scale' does not apply to {dtype}", body, "scale")
            scale = float(s)
        writable = self.boolean(body, "writable", what, False)
        if writable and table not in WRITABLE_TABLES:
            raise self.error(f"{what}: a {table} cannot be written (only coil and holding)", body, "writable")
        if writable and dtype == "bit":
            raise self.error(
                f"{what}: one bit of a register cannot be written safely; map the whole register", body, "writable"
            )
        kind = self.choice(body, "kind", what, KINDS, "input")
        group = self.string(body, "group", what, DEFAULT_GROUP)
        if group not in groups:
            raise self.error(f"{what}: group {group!r} is not defined under 'groups'", body, "group")
        values = self._value_names(body, what, dtype, scale)
        expect: tuple[int, ...] | None = None
        if "expect" in body:
            raw = body["expect"]
            items = raw if isinstance(raw, list) else [raw]
            if dtype == "float32" or scale != 1.0:
                raise self.error(f"{what}: 'expect' needs a whole-number point (no scale, no float)", body, "expect")
            if not items or not all(isinstance(v, int) for v in items):
                raise self.error(
                    f"{what}: 'expect' must be a value or a list of values the point may hold", body, "expect"
                )
            expect = tuple(int(v) for v in items)
        return PointSpec(
            name=name,
            table=table,  # type: ignore[arg-type]
            address=address,
            dtype=dtype,  # type: ignore[arg-type]
            count=count,
            bit=bit,
            word_order=word_order,  # type: ignore[arg-type]
            scale=scale,
            writable=writable,
            kind=kind,  # type: ignore[arg-type]
            group=group,
            description=self.string(body, "description", what, ""),
            values=MappingProxyType(values),
            expect=expect,
        )

    def _value_names(self, body: Any, what: str, dtype: str, scale: float) -> dict[int, str]:
        if "values" not in body:
            return {}
        raw = body["values"]
        if dtype == "float32" or scale != 1.0:
            raise self.error(f"{what}: 'values' names whole-number raw values (no scale, no float)", body, "values")
        if not isinstance(raw, dict) or not raw:
            raise self.error(f"{what}: 'values' must map raw values to names", body, "values")
        out: dict[int, str] = {}
        for k, v in raw.items():
            if isinstance(k, bool) or not isinstance(k, int) or not isinstance(v, str) or not v:
                raise self.error(f"{what}: 'values' maps whole numbers to names, not {k!r}: {v!r}", raw, k)
            out[int(k)] = str(v)
        return out

    def _check_overlaps(self, points: dict[str, PointSpec], top: CommentedMap) -> None:
        by_table: dict[str, list[PointSpec]] = {}
        for p in points.values():
            by_table.setdefault(p.table, []).append(p)
        for table, plist in by_table.items():
            plist.sort(key=lambda p: (p.address, p.bit or 0))
            for a, b in itertools.pairwise(plist):
                if b.address >= a.end:
                    continue
                if a.dtype == "bit" and b.dtype == "bit" and a.address == b.address and a.bit != b.bit:
                    continue
                raise self.error(
                    f"points {a.name!r} and {b.name!r} overlap in the {table} table at address {b.address}",
                    top.get("points") or top.get("series") or top,
                )


# ---------------------------------------------------------------- decoding and encoding

Value = bool | int | float


def decode_point(p: PointSpec, raw: list[int] | list[bool], offset: int) -> Value:
    """The value of ``p`` from a block read: ``raw`` is the block's bits or registers, ``offset`` the
    index of the point's first address within it."""
    if p.table in BIT_TABLES:
        return bool(raw[offset])
    regs = [int(r) & 0xFFFF for r in raw[offset : offset + p.count]]
    if len(regs) != p.count:
        raise ValueError(f"point {p.name!r} needs {p.count} registers, got {len(regs)}")
    if p.dtype == "bit":
        return bool((regs[0] >> (p.bit or 0)) & 1)
    if p.count == 2:
        hi, lo = (regs[0], regs[1]) if p.word_order == "big" else (regs[1], regs[0])
        word = (hi << 16) | lo
        if p.dtype == "uint32":
            value: int | float = word
        elif p.dtype == "int32":
            value = word - 0x1_0000_0000 if word & 0x8000_0000 else word
        else:
            value = _struct_float(word)
    else:
        value = regs[0] - 0x10000 if p.dtype == "int16" and regs[0] & 0x8000 else regs[0]
    if p.scale != 1.0:
        return _scaled(value, p.scale)
    return value


def _scaled(value: int | float, scale: float) -> float:
    # 1120 x 0.01 is 11.200000000000001 in binary floating point; 1120 / 100 is the nearest double to
    # 11.2. Dividing by the inverse of a decimal scale gives the value the register map means.
    inverse = 1.0 / scale
    if abs(inverse) >= 1.0 and inverse == round(inverse):
        return value / round(inverse)
    return value * scale


def encode_point(p: PointSpec, value: Value | str) -> bool | list[int]:
    """The raw bits or registers that write ``value`` to ``p``. Raises ValueError for a value that does
    not fit the point (a command's text value is one)."""
    if p.table == "coil":
        if not isinstance(value, (bool, int)) or (isinstance(value, int) and value not in (0, 1)):
            raise ValueError(f"point {p.name!r} is a coil: the value must be true or false, not {value!r}")
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"point {p.name!r} needs a number, not {value!r}")
    scaled = value / p.scale
    if p.dtype == "float32":
        try:
            word = _float_struct(float(scaled))
        except ValueError as e:
            raise ValueError(f"point {p.name!r}: {e}") from None
    else:
        raw = round(scaled)
        lo, hi = {
            "uint16": (0, 0xFFFF),
            "int16": (-0x8000, 0x7FFF),
            "uint32": (0, 0xFFFF_FFFF),
            "int32": (-0x8000_0000, 0x7FFF_FFFF),
        }[p.dtype]
        if not lo <= raw <= hi:
            raise ValueError(f"point {p.name!r} ({p.dtype}) cannot hold {value!r}")
        word = raw & (0xFFFF_FFFF if p.count == 2 else 0xFFFF)
    if p.count == 1:
        return [word]
    hi_w, lo_w = (word >> 16) & 0xFFFF, word & 0xFFFF
    return [hi_w, lo_w] if p.word_order == "big" else [lo_w, hi_w]


def _struct_float(word: int) -> float:
    return float(struct.unpack(">f", word.to_bytes(4, "big"))[0])


def _float_struct(value: float) -> int:
    try:
        return int.from_bytes(struct.pack(">f", value), "big")
    except OverflowError:
        raise ValueError(f"{value!r} does not fit a float32") from None
