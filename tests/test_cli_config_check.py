"""`gatehouse config check FILE`: every error names the file and the line (and the entity)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import cli

HEAD = "site: estate-a\ngateway: gw-1\n"
BUSES = """buses:
  - name: fence
    kind: modbus-tcp
    host: 127.0.0.1
    port: 502
"""


@pytest.mark.parametrize("body,expected", [
    # an unknown key, on its own line
    (BUSES + "    colour: red\n",
     ["{f}:8: buses[0] (fence): Object contains unknown field `colour` (at $.buses[0].colour)"]),
    # a wrong type
    (BUSES.replace("port: 502", "port: '502'"),
     ["{f}:7: buses[0] (fence): Expected `int | null`, got `str` (at $.buses[0].port)"]),
    # duplicate names, and a device on a bus that does not exist: both reported in one run
    (BUSES + "  - {name: fence, kind: modbus-tcp, host: 127.0.0.1, port: 503}\n"
     "devices:\n  - {name: p1, profile: perimeter-panel-8, bus: fence, unit: 1}\n"
     "  - {name: p2, profile: perimeter-panel-8, bus: rs485-9, unit: 2}\n",
     ["{f}:8: buses[1] (fence): duplicate name",
      "{f}:11: devices[1] (p2): bus 'rs485-9' is not defined under 'buses'"]),
    # a zone on a point its device's profile does not have
    (BUSES + "devices:\n  - {name: p1, profile: perimeter-panel-8, bus: fence, unit: 1}\n"
     "zones:\n  - {name: z1, device: p1, point: zone9_alarm}\n",
     ["{f}:11: zones[0] (z1): device 'p1' has no point 'zone9_alarm' (it has: "]),
    # YAML itself
    ("site: again\n", ["{f}:3: not valid YAML: found duplicate key \"site\" with value \"again\" "
                       "(original value: \"estate-a\")"]),
])
def test_each_error_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str,
                                        expected: list[str]) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_text(HEAD + body)
    assert cli.main(["config", "check", str(f)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == len(expected), err
    for line, exp in zip(lines, expected, strict=True):
        assert line.startswith(exp.format(f=f)), (line, exp)


def test_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_text(HEAD + BUSES + "devices:\n  - {name: p1, profile: perimeter-panel-8, bus: fence, unit: 1}\n")
    assert cli.main(["config", "check", str(f)]) == 0
    assert capsys.readouterr().out.strip() == f"{f}: ok (1 buses, 1 devices, 0 zones)"


def test_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "nope.yaml"
    assert cli.main(["config", "check", str(f)]) == 2
    assert capsys.readouterr().err.strip() == f"{f}: no such file"
