"""`gatehouse config check FILE`: every error names the file and the line (and the entity)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from common.configfile import current_user
from gateway import cli
from gateway import config as cli_config
from tests.privileged import as_root

HEAD = "site: estate-a\ngateway: gw-1\n"
BUSES = """buses:
  - name: fence
    kind: modbus-tcp
    host: 127.0.0.1
    port: 502
"""


@pytest.mark.parametrize(
    "body,expected",
    [
        # an unknown key, on its own line
        (
            BUSES + "    colour: red\n",
            ["{f}:8: buses[0] (fence): Object contains unknown field `colour` (at $.buses[0].colour)"],
        ),
        # a wrong type
        (
            BUSES.replace("port: 502", "port: '502'"),
            ["{f}:7: buses[0] (fence): Expected `int | null`, got `str` (at $.buses[0].port)"],
        ),
        # duplicate names, and a device on a bus that does not exist: both reported in one run
        (
            BUSES + "  - {name: fence, kind: modbus-tcp, host: 127.0.0.1, port: 503}\n"
            "devices:\n  - {name: p1, profile: perimeter-panel-8, bus: fence, unit: 1}\n"
            "  - {name: p2, profile: perimeter-panel-8, bus: rs485-9, unit: 2}\n",
            [
                "{f}:8: buses[1] (fence): duplicate name",
                "{f}:11: devices[1] (p2): bus 'rs485-9' is not defined under 'buses'",
            ],
        ),
        # a zone on a point its device's profile does not have
        (
            BUSES + "devices:\n  - {name: p1, profile: perimeter-panel-8, bus: fence, unit: 1}\n"
            "zones:\n  - {name: z1, device: p1, point: zone9_alarm}\n",
            ["{f}:11: zones[0] (z1): device 'p1' has no point 'zone9_alarm' (it has: "],
        ),
        # point events for a device that does not exist
        (
            BUSES + "devices:\n  - {name: p1, profile: perimeter-panel-8, bus: fence, unit: 1}\n"
            "point_events:\n  enabled: true\n  devices: [p1, p9]\n",
            ["{f}:12: point_events: device 'p9' is not defined under 'devices'"],
        ),
        # an unlock longer than the board's flash command can time (Waveshare: 0x7FFF x 100 ms), and a gate left
        # open for an hour on the door controller DC-1 (0xFFFF x 10 ms)
        (
            BUSES + "devices:\n  - {name: b1, profile: waveshare-modbus-rtu-relay-d, bus: fence, unit: 1}\n"
            "  - {name: c1, profile: door-controller, bus: fence, unit: 2}\n"
            "doors:\n  - {name: d1, device: b1, relay: relay1, unlock_ms: 3276700}\n"
            "  - {name: d2, device: b1, relay: relay2, unlock_ms: 3276800}\n"
            "  - {name: d3, device: c1, relay: lock_relay, unlock_ms: 3600000}\n",
            [
                "{f}:13: doors[1] (d2): unlock_ms 3276800 is longer than the flash (timed pulse) command of "
                "waveshare-modbus-rtu-relay-d allows: at most 3276700 ms",
                "{f}:14: doors[2] (d3): unlock_ms 3600000 is longer than the flash (timed pulse) command of"
                " door-controller "
                "allows: at most 655350 ms",
            ],
        ),
        # an unlock too short to be read back while it runs
        (
            BUSES + "devices:\n  - {name: c1, profile: door-controller, bus: fence, unit: 2}\n"
            "doors:\n  - {name: d1, device: c1, relay: lock_relay, unlock_ms: 100}\n",
            ["{f}:11: doors[0] (d1): Expected `int` >= 500 (at $.doors[0].unlock_ms)"],
        ),
        # unit 0: Modbus's broadcast address, which no device answers (the daemon would not start on it)
        (
            BUSES + "devices:\n  - {name: p1, profile: perimeter-panel-8, bus: fence, unit: 0}\n",
            ["{f}:9: devices[0] (p1): Expected `int` >= 1 (at $.devices[0].unit)"],
        ),
        # pipelining where the line answers one request at a time
        (
            BUSES + "  - {name: ss1, kind: modbus-rtu-over-tcp, host: 127.0.0.1, port: 4001, max_in_flight: 4}\n",
            ["{f}:8: buses[1] (ss1): max_in_flight above 1 needs a modbus-tcp bus"],
        ),
        # an indoor panel whose place names no flat: its events would reach no house (nor the care of its residents)
        (
            "indoor_panels:\n  - name: flat-1\n    account: '1234'\n    place: {house: '101'}\n"
            "  - name: flat-2\n    account: '1235'\n    place: {building: '3', house: '102'}\n",
            [
                "{f}:6: indoor_panels[0] (flat-1): an indoor panel needs place.house with its "
                "place.building and place.unit (the flat its events belong to); place.building and place.unit are "
                "missing",
                "{f}:9: indoor_panels[1] (flat-2): an indoor panel needs place.house with its "
                "place.building and place.unit (the flat its events belong to); place.unit is missing",
            ],
        ),
        # two owners of one port: a second bus on the same serial port (another name for it), a Contact ID line on a
        # bus's port, and a second bus on the same TCP endpoint spelt another way; readers sharing a line are fine
        (
            "buses:\n  - {name: a, kind: modbus-rtu, serial: /dev/ttyS0}\n"
            "  - {name: b, kind: modbus-rtu, serial: /dev/../dev/ttyS0}\n"
            "  - {name: t1, kind: modbus-tcp, host: localhost, port: 502}\n"
            "  - {name: t2, kind: modbus-tcp, host: 127.0.0.1, port: 502}\n"
            "  - {name: t3, kind: modbus-tcp, host: 127.0.0.1, port: 503}\n"
            "contact_id_lines:\n  - {name: cid, serial: /dev/ttyS0}\n",
            [
                "{f}:5: buses[1] (b): serial port '/dev/../dev/ttyS0' is already used by buses[0] (a) at line 4: one "
                "port, one owner",
                "{f}:7: buses[3] (t2): endpoint 127.0.0.1:502 is already used by buses[2] (t1) at line 6: one port, "
                "one owner",
                "{f}:10: contact_id_lines[0] (cid): serial port '/dev/ttyS0' is already used by buses[0] (a) at "
                "line 4: one port, one owner",
            ],
        ),
        # a panel's account written as digits: read as a number (its leading zero gone); quoting is the fix
        (
            "indoor_panels:\n  - name: flat-1\n    account: 0101\n"
            "    place: {building: '3', unit: '2', house: '101'}\n",
            [
                "{f}:5: indoor_panels[0] (flat-1): Expected `str`, got `int` (at $.indoor_panels[0].account); quote it "
                "('0101', not 0101: unquoted, digits are read as a number and leading zeros are lost)"
            ],
        ),
        # YAML itself
        (
            "site: again\n",
            ['{f}:3: not valid YAML: found duplicate key "site" with value "again" (original value: "estate-a")'],
        ),
    ],
)
def test_each_error_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, expected: list[str]
) -> None:
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


def test_a_file_saved_in_another_encoding_names_the_line_and_says_to_save_it_as_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_bytes((HEAD + BUSES + "# 围栏总线\n").encode("gbk"))
    assert cli.main(["config", "check", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{f}:8: not UTF-8 text (byte 0x") and "): save the file as UTF-8" in err, err


def test_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "nope.yaml"
    assert cli.main(["config", "check", str(f)]) == 2
    assert capsys.readouterr().err.strip() == f"{f}: no such file"


MANY = """site: estate-a
gatway: gw-1
buses:
  - name: fence
    kind: modbus-tpc
    host: 127.0.0.1
    port: 502
  - name: rs485
    kind: modbus-tcp
    host: 127.0.0.1
    port: 503
devices:
  - {name: p0, profile: perimeter-panel-8, bus: 7, unit: 1}
  - {name: p1, profile: perimeter-panel-88, bus: fense, unit: 1}
  - {name: p2, profile: perimeter-panel-8, bus: rs485, unit: 2}
zones:
  - {name: z1, device: p2, point: zone1_alarn, tyep: perimeter}
  - {name: z2, device: p0, point: zone1_alarm}
  - {name: z3, device: p22, point: zone2_alarm, group: nigth}
zone_groups:
  - {name: night}
"""


@pytest.mark.process  # the real command, as its own process
def test_every_problem_in_one_run_with_did_you_mean(tmp_path: Path) -> None:
    """The real command, as an installer runs it: every mistake of the file at once, each on its own line, in
    the order of the file, with a suggestion for a misspelt key, choice or name. An entry dropped for its own
    error does not shift the lines of the entries after it, nor come back as "not defined" where it is named."""
    import subprocess
    import sys

    f = tmp_path / "gateway.yaml"
    f.write_text(MANY)
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "config", "check", str(f)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    expected = [
        "{f}:1: Object missing required field `gateway` (at $)",
        "{f}:2: Object contains unknown field `gatway` (at $.gatway); did you mean 'gateway'?",
        "{f}:5: buses[0] (fence): Invalid enum value 'modbus-tpc' (at $.buses[0].kind); did you mean 'modbus-tcp'?",
        "{f}:13: devices[0] (p0): Expected `str`, got `int` (at $.devices[0].bus)",
        "{f}:14: devices[1] (p1): bus 'fense' is not defined under 'buses'; did you mean 'fence'?",
        "{f}:14: devices[1] (p1): no profile 'perimeter-panel-88' in ",
        "{f}:17: zones[0] (z1): Object contains unknown field `tyep` (at $.zones[0].tyep); did you mean 'type'?",
        "{f}:17: zones[0] (z1): device 'p2' has no point 'zone1_alarn' (it has: ",
        "{f}:19: zones[2] (z3): device 'p22' is not defined under 'devices'; did you mean 'p2'?",
        "{f}:19: zones[2] (z3): group 'nigth' is not defined under 'zone_groups'; did you mean 'night'?",
    ]
    lines = r.stderr.splitlines()
    assert len(lines) == len(expected), r.stderr
    for line, exp in zip(lines, expected, strict=True):
        assert line.startswith(exp.format(f=f)), (line, exp)
    assert lines[5].endswith("did you mean 'perimeter-panel-8'?")
    assert lines[7].endswith("did you mean 'zone1_alarm'?")
    assert "'p0'" not in r.stderr.replace("devices[0] (p0)", "")  # z2 names the dropped p0: said once is enough


def test_a_bad_value_in_a_later_entry_keeps_its_line_after_an_earlier_entry_is_dropped(tmp_path: Path) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_text(
        HEAD + BUSES + "  - {kind: modbus-tcp, host: 127.0.0.1, port: 503}\n"
        "  - {name: b3, kind: modbus-tcp, host: 127.0.0.1, port: 70000}\n"
    )
    with pytest.raises(cli_config.ConfigError) as e:
        cli_config.load(f)
    assert [p.split(" (at")[0] for p in e.value.problems] == [
        f"{f}:8: Object missing required field `name`",
        f"{f}:9: buses[2] (b3): Expected `int` <= 65535",
    ]


# ---------------------------------------------------------------- the files a config names

FILES = """site: estate-a
gateway: gw-1
data_dir: data
mqtt:
  host: 127.0.0.1
  port: 1
  username: estate-a/gw-1
  password_file: secrets/mqtt.password
  tls: {ca_file: keys/ca.pem}
access:
  public_keys: [keys/portal-pass.pub]
"""


def _site_files(folder: Path) -> Path:
    """A gateway config whose password, CA certificate and public key are all good, as ``gatehouse init`` leaves
    them: ``config check`` says ok to it."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from gateway.wire.passes import generate_keypair, save_public_key

    (folder / "secrets").mkdir(mode=0o700)
    (folder / "keys").mkdir()
    pw = folder / "secrets" / "mqtt.password"
    pw.write_text("s3cret-password\n")
    pw.chmod(0o600)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / "keys" / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    save_public_key(folder / "keys" / "portal-pass.pub", generate_keypair()[1])
    f = folder / "gateway.yaml"
    f.write_text(FILES)
    return f


def _line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def _gatehouse(*args: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*(wrap or []), sys.executable, "-m", "gateway.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _password_0644(d: Path) -> str:
    (d / "secrets" / "mqtt.password").chmod(0o644)
    return (
        f"{{f}}:8: mqtt.password_file: {d}/secrets/mqtt.password: secret file must not be readable by group or "
        "others (chmod 600)"
    )


def _password_misspelt(d: Path) -> str:
    f = d / "gateway.yaml"
    f.write_text(f.read_text().replace("secrets/mqtt.password", "secrets/mqtt.pasword"))
    return (
        f"{{f}}:8: mqtt.password_file: {d}/secrets/mqtt.pasword: no such file; did you mean "
        f"'{d}/secrets/mqtt.password'?"
    )


def _ca_missing(d: Path) -> str:
    (d / "keys" / "ca.pem").unlink()
    return f"{{f}}:9: mqtt.tls.ca_file: {d}/keys/ca.pem: no such file"


def _ca_not_a_certificate(d: Path) -> str:
    (d / "keys" / "ca.pem").write_text("not a certificate\n")
    return f"{{f}}:9: mqtt.tls.ca_file: {d}/keys/ca.pem: not a CA certificate (PEM) ("


def _key_not_a_key(d: Path) -> str:
    (d / "keys" / "portal-pass.pub").write_text("not a key\n")
    return f"{{f}}:11: access.public_keys[0]: {d}/keys/portal-pass.pub: "


def _data_dir_a_file(d: Path) -> str:
    (d / "data").write_text("")
    return f"{{f}}:3: data_dir: {d}/data: not a folder (it is a file): name a folder, or move the file away"


def _data_dir_under_a_file(d: Path) -> str:
    f = d / "gateway.yaml"
    f.write_text(f.read_text().replace("data_dir: data", "data_dir: gateway.yaml/data"))
    return f"{{f}}:3: data_dir: {d}/gateway.yaml/data: not a folder ({d}/gateway.yaml is a file): "


@pytest.mark.process  # the real commands, as their own processes
@pytest.mark.parametrize(
    "breaks",
    [
        _password_0644,
        _password_misspelt,
        _ca_missing,
        _ca_not_a_certificate,
        _key_not_a_key,
        _data_dir_a_file,
        _data_dir_under_a_file,
    ],
)
def test_a_file_the_daemon_could_not_use_fails_the_check_and_the_start(tmp_path: Path, breaks: Any) -> None:
    """What the daemon reads at start-up is read by the check too, the same way: each broken file is one line
    naming the config's line and setting, and `gateway run` (what systemd starts after the check) stops on the
    same line with status 2, never with a traceback that systemd would restart for ever."""
    f = _site_files(tmp_path)
    ok = _gatehouse("config", "check", str(f))
    assert (ok.returncode, ok.stderr) == (0, ""), ok.stderr
    expected = breaks(tmp_path).format(f=f)
    check = _gatehouse("config", "check", str(f))
    assert check.returncode == 2
    assert check.stdout == ""
    assert len(check.stderr.splitlines()) == 1, check.stderr
    assert check.stderr.startswith(expected), (check.stderr, expected)
    run = _gatehouse("gateway", "run", "--config", str(f))
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert check.stderr.strip() in run.stderr.splitlines(), run.stderr


@pytest.mark.process
def test_a_check_run_by_a_user_who_cannot_read_the_secrets_fails(tmp_path: Path) -> None:
    """The secrets folder is another user's and 0700 (`init` without `--owner`, the daemon's user not its owner):
    a check run by a user who cannot enter it says so, and who it ran as, instead of ok. Run by a user, the check is
    that user's (the checkout, perhaps in a private home, stays readable to them); run by root, it runs without the
    capabilities that let root read anyone's files: the kernel refuses it the folder exactly as it refuses the
    service's user."""
    f = _site_files(tmp_path)
    for p in ((tmp_path / "secrets"), (tmp_path / "secrets" / "mqtt.password")):
        as_root(["chown", "nobody", str(p)])
    user = current_user()
    wrap = None
    if os.geteuid() == 0:
        wrap = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
        wrap.append("--")
    try:
        for args in (["config", "check", str(f)], ["gateway", "run", "--config", str(f)]):
            r = _gatehouse(*args, wrap=wrap)
            assert r.returncode == 2, r.stderr
            assert "Traceback" not in r.stderr
            assert (
                f"{f}:8: mqtt.password_file: {tmp_path}/secrets/mqtt.password: cannot read secret: permission "
                f"denied (as user {user}): the service's user must be able to read it"
            ) in r.stderr, r.stderr
    finally:
        as_root(["chown", "-R", f"{os.getuid()}", str(tmp_path / "secrets")])
