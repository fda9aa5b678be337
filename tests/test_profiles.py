"""Device profiles: every shipped profile loads, decoding is table-driven per register type, word
order and scale, and bad profiles are refused with the file, the line and the problem."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from devices.modbus_plan import plan_blocks
from devices.profiles import (
    BIT_TABLES,
    BlockLimits,
    PointSpec,
    ProfileError,
    decode_point,
    encode_point,
    find_profile,
    list_profiles,
    load_profile,
)

SHIPPED = ["perimeter-panel-8", "perimeter-panel-16", "waveshare-modbus-rtu-io-8ch", "waveshare-modbus-rtu-relay-d"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads(name: str) -> None:
    p = find_profile(name)
    assert p.name == name
    assert p.description
    assert p.points
    assert p.polled_groups(), "a profile with nothing to poll"
    for point in p.points.values():
        assert point.group in p.groups
    assert set(list_profiles()) >= set(SHIPPED)


def test_perimeter_panel_layout_matches_the_documented_map() -> None:
    """The map in docs/profiles.md: kind-major discrete inputs with a stride of 16 per kind."""
    for zones in (8, 16):
        p = find_profile(f"perimeter-panel-{zones}")
        kinds = [
            ("alarm", "zone_alarm"),
            ("tamper", "zone_tamper"),
            ("fault", "zone_fault"),
            ("touch", "fence_touch"),
            ("cut", "fence_cut"),
            ("short", "fence_short"),
        ]
        for k, (suffix, kind) in enumerate(kinds):
            for z in range(1, zones + 1):
                pt = p.point(f"zone{z}_{suffix}")
                assert (pt.table, pt.address, pt.kind) == ("discrete", 16 * k + z - 1, kind)
            assert f"zone{zones + 1}_{suffix}" not in p.points
        assert p.point("panel_tamper").kind == "panel_tamper"
        assert (p.point("power_battery_low").table, p.point("power_battery_low").bit) == ("input", 3)
        assert p.identify is not None and p.identify.expect == (0x5050, zones, None, None)
        # One request covers every zone input of the panel (the gaps of an 8-zone panel are bridged).
        inputs = [pt for pt in p.points.values() if pt.group == "inputs"]
        blocks = plan_blocks(inputs, p.blocks)
        assert [(b.table, b.address, b.count) for b in blocks] == [("discrete", 0, 80 + zones)]


def test_relay_d_has_the_flash_command() -> None:
    p = find_profile("waveshare-modbus-rtu-relay-d")
    assert p.pulse is not None
    assert (p.pulse.on_base, p.pulse.off_base, p.pulse.unit_ms) == (0x0200, 0x0400, 100)
    assert [p.point(f"relay{n}").address for n in range(1, 9)] == list(range(8))
    assert all(p.point(f"relay{n}").writable for n in range(1, 9))
    assert [p.point(f"input{n}").table for n in range(1, 9)] == ["discrete"] * 8
    io = find_profile("waveshare-modbus-rtu-io-8ch")
    assert io.pulse is None
    assert io.point("output1_mode").address == 0x1000


# ---------------------------------------------------------------- decoding, table-driven


def _pt(table: str, dtype: str, count: int, **kw: object) -> PointSpec:
    return PointSpec(name="p", table=table, address=0, dtype=dtype, count=count, **kw)  # type: ignore[arg-type]


DECODE_CASES = [
    # (table, dtype, extra, raw, expected)
    ("coil", "bool", {}, [True], True),
    ("discrete", "bool", {}, [False], False),
    ("holding", "uint16", {}, [0xFFFF], 65535),
    ("input", "int16", {}, [0xFFFF], -1),
    ("input", "int16", {}, [0x8000], -32768),
    ("holding", "int16", {"scale": 0.1}, [0xFF9C], -10.0),  # -100 x 0.1
    ("input", "uint16", {"scale": 0.01}, [1350], 13.5),  # battery volts in the panel map
    ("input", "bit", {"bit": 0}, [0b1010], False),
    ("input", "bit", {"bit": 3}, [0b1010], True),
    ("holding", "bit", {"bit": 15}, [0x8000], True),
    ("input", "uint32", {"word_order": "big"}, [0x0001, 0x0002], 0x0001_0002),
    ("input", "uint32", {"word_order": "little"}, [0x0001, 0x0002], 0x0002_0001),
    ("holding", "int32", {"word_order": "big"}, [0xFFFF, 0xFFFE], -2),
    ("holding", "int32", {"word_order": "little"}, [0xFFFE, 0xFFFF], -2),
    ("input", "float32", {"word_order": "big"}, [0x4148, 0x0000], 12.5),
    ("input", "float32", {"word_order": "little"}, [0x0000, 0x4148], 12.5),
    ("input", "float32", {"scale": 2.0}, [0xC000, 0x0000], -4.0),
    ("input", "uint32", {"scale": 0.001}, [0x0000, 0x3039], 12.345),
]


@pytest.mark.parametrize(("table", "dtype", "extra", "raw", "expected"), DECODE_CASES)
def test_decode(table: str, dtype: str, extra: dict[str, object], raw: list[int], expected: object) -> None:
    count = 1 if table in BIT_TABLES or dtype in ("bit", "uint16", "int16") else 2
    value = decode_point(_pt(table, dtype, count, **extra), raw, 0)
    if isinstance(expected, float):
        assert math.isclose(value, expected, rel_tol=1e-9)  # type: ignore[arg-type]
    else:
        assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("table", "dtype", "extra", "raw", "expected"),
    [c for c in DECODE_CASES if c[0] in ("coil", "holding") and c[1] != "bit"],
)
def test_encode_round_trips(table: str, dtype: str, extra: dict[str, object], raw: list[int], expected: object) -> None:
    count = 1 if table in BIT_TABLES or dtype in ("uint16", "int16") else 2
    p = _pt(table, dtype, count, **extra)
    encoded = encode_point(p, expected)  # type: ignore[arg-type]
    assert encoded == (raw[0] if table == "coil" else raw)


def test_decode_uses_the_offset_within_a_block() -> None:
    p = PointSpec(name="v", table="input", address=12, dtype="uint32", count=2)
    assert decode_point(p, [9, 9, 0, 7, 9], 2) == 7


@pytest.mark.parametrize(
    ("dtype", "value"),
    [
        ("uint16", -1),
        ("uint16", 65536),
        ("int16", 40000),
        ("uint32", 2**32),
        ("int32", -(2**31) - 1),
        ("uint16", "12"),
        ("uint16", True),
        ("float32", float("nan")),
        ("float32", 1e39),
    ],
)
def test_encode_refuses_values_that_do_not_fit(dtype: str, value: object) -> None:
    count = 1 if dtype in ("uint16", "int16") else 2
    with pytest.raises(ValueError, match="point 'p'"):
        encode_point(_pt("holding", dtype, count), value)  # type: ignore[arg-type]


def test_encode_coil_needs_a_boolean() -> None:
    with pytest.raises(ValueError, match="true or false"):
        encode_point(_pt("coil", "bool", 1), 2)


def test_block_planning_respects_limits_and_gaps() -> None:
    pts = [PointSpec(f"p{a}", "holding", a, "uint16", 1) for a in (0, 1, 2, 5, 6, 40)]
    pts.append(PointSpec("w", "holding", 7, "uint32", 2))
    plan = plan_blocks(pts, BlockLimits(max_registers=125))
    assert [(b.address, b.count) for b in plan] == [(0, 3), (5, 4), (40, 1)]
    plan = plan_blocks(pts, BlockLimits(max_registers=125, max_gap_registers=2))
    assert [(b.address, b.count) for b in plan] == [(0, 9), (40, 1)]
    plan = plan_blocks(pts, BlockLimits(max_registers=4, max_gap_registers=2))
    assert [(b.address, b.count) for b in plan] == [(0, 3), (5, 4), (40, 1)]
    bits = [PointSpec(f"b{a}", "discrete", a, "bool", 1) for a in range(10)]
    plan = plan_blocks(bits + pts[:1], BlockLimits(max_bits=4))
    assert [(b.table, b.address, b.count) for b in plan] == [
        ("discrete", 0, 4),
        ("discrete", 4, 4),
        ("discrete", 8, 2),
        ("holding", 0, 1),
    ]
    # Bits of one register share the read.
    flags = [PointSpec(f"f{b}", "input", 0, "bit", 1, bit=b) for b in range(4)]
    (blk,) = plan_blocks(flags, BlockLimits())
    assert (blk.address, blk.count, len(blk.points)) == (0, 1, 4)
    assert [v for _, v in blk.decode([0b0101])] == [True, False, True, False]


# ---------------------------------------------------------------- bad profiles


GOOD_HEAD = """\
name: {name}
description: test
"""


def _write(tmp: Path, body: str, name: str = "bad") -> Path:
    f = tmp / f"{name}.yaml"
    f.write_text(GOOD_HEAD.format(name=name) + body, encoding="utf-8")
    return f


BAD = [
    ("points:\n  a: {table: holding, address: 0, colour: red}\n", 4, "unknown key 'colour'"),
    (
        "points:\n  a: {table: holding, address: 0, dtype: uint32, count: 1}\n",
        4,
        "dtype uint32 takes 2 registers, count 1 does not fit",
    ),
    ("points:\n  a: {table: coil, address: 0, dtype: uint16}\n", 4, "dtype must be bool"),
    ("points:\n  a: {table: input, address: 0, dtype: bool}\n", 4, "use dtype bit"),
    ("points:\n  a: {table: input, address: 0, dtype: bit}\n", 4, "'bit' is required"),
    ("points:\n  a: {table: input, address: 0, dtype: bit, bit: 16}\n", 4, "between 0 and 15"),
    ("points:\n  a: {table: discrete, address: 0, writable: true}\n", 4, "cannot be written"),
    ("points:\n  a: {table: holding, address: 0, word_order: little}\n", 4, "only applies to 32-bit"),
    ("points:\n  a: {table: holding, address: 65535, dtype: int32}\n", 4, "runs past 65535"),
    ("points:\n  a: {table: holding, address: 0, scale: 0}\n", 4, "non-zero number"),
    ("points:\n  a: {table: holding, address: 0, kind: banana}\n", 4, "'kind' must be one of"),
    ("points:\n  a: {table: holding, address: 0, group: fast}\n", 4, "group 'fast' is not defined"),
    (
        "points:\n  a: {table: holding, address: 4}\n  b: {table: holding, address: 3, dtype: uint32}\n",
        None,
        "points 'b' and 'a' overlap in the holding table at address 4",
    ),
    ("points:\n  a: {table: coil, address: 1}\n  b: {table: coil, address: 1}\n", None, "overlap in the coil table"),
    (
        "points:\n  a: {table: input, address: 0, dtype: bit, bit: 2}\n"
        "  b: {table: input, address: 0, dtype: bit, bit: 2}\n",
        None,
        "overlap",
    ),
    ("points:\n  a: {table: coil, address: 0}\n  a: {table: coil, address: 1}\n", None, "not valid YAML"),
    (
        "series:\n  - {name: 'z{n}', repeat: 2, table: coil, address: 0}\npoints:\n  z2: {table: coil, address: 9}\n",
        None,
        "point 'z2' is defined twice",
    ),
    ("series:\n  - {name: zone, repeat: 2, table: coil, address: 0}\n", 4, "must contain {n}"),
    ("points: {}\n", None, "no points"),
    (
        "pulse: {method: flash, on_base: 512, off_base: 1024, unit_ms: 100}\n"
        "points:\n  a: {table: discrete, address: 0}\n",
        None,
        "no writable coil",
    ),
    (
        "groups:\n  slow: {poll_ms: 1000}\npoints:\n  a: {table: coil, address: 0}\n",
        None,
        "group(s) slow have no points",
    ),
    (
        "groups:\n  cfg: {poll: false, poll_ms: 10}\npoints:\n  a: {table: coil, address: 0, group: cfg}\n",
        4,
        "makes no sense",
    ),
    (
        "blocks: {max_registers: 1}\npoints:\n  a: {table: holding, address: 0, dtype: float32}\n",
        None,
        "takes 2 registers but blocks.max_registers is 1",
    ),
    (
        "identify: {table: holding, address: 0, count: 2, expect: [1]}\npoints:\n  a: {table: coil, address: 0}\n",
        3,
        "list of 2 values",
    ),
    ("colour: red\npoints:\n  a: {table: coil, address: 0}\n", 3, "unknown key 'colour'"),
    ("points:\n  A-1: {table: coil, address: 0}\n", 4, "not a valid point name"),
    # documented values and the settings a device must hold
    ("points:\n  m: {table: holding, address: 0, scale: 0.1, expect: 0}\n", 4, "'expect' needs a whole-number"),
    ("points:\n  m: {table: holding, address: 0, expect: [normal]}\n", 4, "'expect' must be a value or a list"),
    ("points:\n  m: {table: holding, address: 0, expect: []}\n", 4, "'expect' must be a value or a list"),
    ("points:\n  m: {table: holding, address: 0, values: {normal: 0}}\n", 4, "'values' maps whole numbers"),
    ("points:\n  m: {table: holding, address: 0, values: [normal]}\n", 4, "'values' must map raw values"),
    ("points:\n  m: {table: holding, address: 0, dtype: float32, values: {0: off}}\n", 4, "'values' names whole"),
    # probes that tell a model from others answering the same identification
    (
        "identify: {table: holding, address: 0, count: 1, probes: [{table: input, address: 1, refused: true,"
        " expect: [1]}]}\npoints:\n  a: {table: coil, address: 0}\n",
        3,
        "'refused' and 'expect' exclude",
    ),
    (
        "identify: {table: holding, address: 0, count: 1, probes: [{table: input, address: 65535, count: 2}]}\n"
        "points:\n  a: {table: coil, address: 0}\n",
        3,
        "runs past 65535",
    ),
    (
        "identify: {table: holding, address: 0, count: 1, probes: {table: input}}\npoints:\n  a: {table: coil,"
        " address: 0}\n",
        3,
        "'probes' must be a list",
    ),
    (
        "identify: {table: holding, address: 0, count: 1, probes: [{table: input, address: 0, colour: red}]}\n"
        "points:\n  a: {table: coil, address: 0}\n",
        3,
        "unknown key 'colour'",
    ),
]


def test_expected_settings_are_checked_with_the_makers_names() -> None:
    p = find_profile("waveshare-modbus-rtu-relay-d").point("relay3_mode")
    assert (p.address, p.expect, dict(p.values)) == (
        0x1002,
        (0,),
        {0: "normal", 1: "linkage", 2: "toggle", 3: "edge_trigger"},
    )
    assert p.check(0) is None
    assert p.check(1) == "relay3_mode = 1 (linkage), expected 0 (normal)"
    assert p.check(7) == "relay3_mode = 7, expected 0 (normal)"
    relay = find_profile("waveshare-modbus-rtu-relay-d")
    assert relay.pulse_limit_ms() == 0x7FFF * 100 and relay.identify is not None and relay.identify.probes
    assert find_profile("waveshare-modbus-rtu-io-8ch").point("output1_mode").expect == (0,)


@pytest.mark.parametrize(("body", "line", "message"), BAD)
def test_bad_profile_is_refused_naming_file_and_line(tmp_path: Path, body: str, line: int | None, message: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ProfileError) as exc:
        load_profile(path)
    text = str(exc.value)
    assert text.startswith(str(path)), text
    if line is not None:
        assert text.startswith(f"{path}:{line}:"), text
    assert message in text


def test_profile_name_must_match_the_file(tmp_path: Path) -> None:
    f = tmp_path / "one.yaml"
    f.write_text("name: other\ndescription: x\npoints:\n  a: {table: coil, address: 0}\n", encoding="utf-8")
    with pytest.raises(ProfileError, match=r"one.yaml:1: profile name 'other' must match the file name 'one'"):
        load_profile(f)


def test_find_profile_searches_builtin_then_extra_dir(tmp_path: Path) -> None:
    _write(tmp_path, "points:\n  a: {table: coil, address: 3, writable: true, kind: relay}\n", name="site-relay")
    p = find_profile("site-relay", extra_dir=str(tmp_path))
    assert p.point("a").address == 3 and p.source.endswith("site-relay.yaml")
    # The built-in profile wins over a same-named file in the extra folder.
    _write(tmp_path, "points:\n  a: {table: coil, address: 0}\n", name="perimeter-panel-8")
    assert "zone1_alarm" in find_profile("perimeter-panel-8", extra_dir=str(tmp_path)).points
    with pytest.raises(ProfileError, match=r"no profile 'nope'.*known: .*perimeter-panel-8"):
        find_profile("nope", extra_dir=str(tmp_path))
    with pytest.raises(ProfileError, match="not valid"):
        find_profile("../etc/passwd")


def test_an_edited_profile_is_reloaded(tmp_path: Path) -> None:
    f = _write(tmp_path, "points:\n  a: {table: coil, address: 0}\n", name="edit")
    assert load_profile(f).point("a").address == 0
    f.write_text(GOOD_HEAD.format(name="edit") + "points:\n  a: {table: coil, address: 10}\n", encoding="utf-8")
    assert load_profile(f).point("a").address == 10
