"""`gatehouse device add|list|show|remove`: edits that keep comments, validated before they are written,
and the installer's usual mistakes with their exact messages (on real pseudo-terminals and real
processes holding them)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.profiles import list_profiles
from gateway import cli, config
from gateway.tooling import provision
from tests.privileged import as_root, root_args

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def cfg_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    p = tmp_path / "gateway.yaml"
    rc, _, err = run(
        ["init", "--config", str(p), "--site", "estate-a", "--gateway", "gw-1", "--data-dir", str(tmp_path / "data")],
        capsys,
    )
    assert rc == 0, err
    return p


def add(cfg: Path, name: str, *args: str) -> list[str]:
    return ["device", "add", name, "--config", str(cfg), *args]


@pytest.fixture
def pty() -> Iterator[str]:
    """A real pseudo-terminal: the slave's path is the serial port."""
    master, slave = os.openpty()
    try:
        yield os.ttyname(slave)
    finally:
        os.close(slave)
        os.close(master)


# ---------------------------------------------------------------- the happy path


def test_add_list_show_remove_keeps_comments(cfg_path: Path, capsys: pytest.CaptureFixture[str], pty: str) -> None:
    rc, out, err = run(
        add(
            cfg_path,
            "fence-1",
            "--profile",
            "perimeter-panel-8",
            "--unit",
            "3",
            "--tcp",
            "127.0.0.1:5020",
            "--place",
            "3/2",
            "--zone",
            "zone1_alarm=north-fence,label=北围墙",
            "--zone",
            "zone2_alarm=gate-beam,type=entry",
        ),
        capsys,
    )
    assert rc == 0, err
    assert "added device 'fence-1' on bus 'tcp-127.0.0.1-5020' (new bus), unit 3" in out
    # The installer annotates the file by hand; later edits must keep that.
    text = cfg_path.read_text().replace("devices:\n", "devices:\n  # north side, cabinet B\n")
    cfg_path.write_text(text)
    rc, out, err = run(
        add(
            cfg_path,
            "io-1",
            "--profile",
            "waveshare-modbus-rtu-io-8ch",
            "--unit",
            "1",
            "--serial",
            pty,
            "--baud",
            "19200",
            "--door",
            "output1=b3-u2-door,contact=input1,exit=input2",
            "--place",
            "3/2",
        ),
        capsys,
    )
    assert rc == 0, err
    cfg = config.load(cfg_path)
    assert [(b.name, b.kind, b.serial or f"{b.host}:{b.port}", b.baudrate) for b in cfg.buses] == [
        ("tcp-127.0.0.1-5020", "modbus-tcp", "127.0.0.1:5020", 9600),
        (f"rs485-{Path(pty).name}", "modbus-rtu", pty, 19200),
    ]
    assert [(d.name, d.profile, d.bus, d.unit) for d in cfg.devices] == [
        ("fence-1", "perimeter-panel-8", "tcp-127.0.0.1-5020", 3),
        ("io-1", "waveshare-modbus-rtu-io-8ch", f"rs485-{Path(pty).name}", 1),
    ]
    assert [(z.name, z.device, z.point, z.type, z.label) for z in cfg.zones] == [
        ("north-fence", "fence-1", "zone1_alarm", "perimeter", "北围墙"),
        ("gate-beam", "fence-1", "zone2_alarm", "entry", ""),
    ]
    assert cfg.zones[0].place is not None and (cfg.zones[0].place.building, cfg.zones[0].place.unit) == ("3", "2")
    door = cfg.doors[0]
    assert (door.name, door.device, door.relay, door.contact, door.exit_button) == (
        "b3-u2-door",
        "io-1",
        "output1",
        "input1",
        "input2",
    )
    text = cfg_path.read_text()
    assert "# north side, cabinet B" in text
    assert "# Gatehouse gateway configuration, written by `gatehouse init`" in text

    rc, out, _ = run(["device", "list", "--config", str(cfg_path)], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "PROFILE", "BUS", "UNIT", "ENDPOINT", "PLACE", "ZONES", "DOORS"]
    assert lines[1].split() == [
        "fence-1",
        "perimeter-panel-8",
        "tcp-127.0.0.1-5020",
        "3",
        "127.0.0.1:5020",
        "3/2",
        "north-fence,gate-beam",
        "-",
    ]
    assert lines[2].split() == [
        "io-1",
        "waveshare-modbus-rtu-io-8ch",
        f"rs485-{Path(pty).name}",
        "1",
        pty,
        "19200",
        "8N1",
        "3/2",
        "-",
        "b3-u2-door",
    ]
    rc, out, _ = run(["device", "list", "--config", str(cfg_path), "--json"], capsys)
    assert [d["name"] for d in json.loads(out)] == ["fence-1", "io-1"]

    rc, out, _ = run(["device", "show", "io-1", "--config", str(cfg_path)], capsys)
    assert rc == 0
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert rows["output1"].rstrip().endswith("door b3-u2-door relay")
    assert rows["input1"].rstrip().endswith("door b3-u2-door contact")
    assert rows["input3"].rstrip().endswith("-")

    rc, out, err = run(["device", "remove", "fence-1", "--config", str(cfg_path)], capsys)
    assert rc == 0, err
    assert out.splitlines() == [
        "removed device 'fence-1'",
        "  and zone north-fence",
        "  and zone gate-beam",
        "  and bus tcp-127.0.0.1-5020 (nothing else was on it)",
    ]
    cfg = config.load(cfg_path)
    assert [d.name for d in cfg.devices] == ["io-1"] and not cfg.zones
    assert [b.name for b in cfg.buses] == [f"rs485-{Path(pty).name}"]
    assert "# Gatehouse gateway configuration" in cfg_path.read_text()


def test_second_device_joins_the_existing_serial_bus(
    cfg_path: Path, capsys: pytest.CaptureFixture[str], pty: str
) -> None:
    assert run(add(cfg_path, "p1", "--profile", "perimeter-panel-8", "--unit", "1", "--serial", pty), capsys)[0] == 0
    rc, out, err = run(add(cfg_path, "p2", "--profile", "perimeter-panel-8", "--unit", "2", "--serial", pty), capsys)
    assert rc == 0, err
    assert "(new bus)" not in out
    cfg = config.load(cfg_path)
    assert len(cfg.buses) == 1 and {d.bus for d in cfg.devices} == {cfg.buses[0].name}
    rc, _, err = run(
        add(cfg_path, "p3", "--profile", "perimeter-panel-8", "--unit", "3", "--serial", pty, "--baud", "19200"), capsys
    )
    assert rc == 2
    assert err.strip() == (
        f"device add: bus 'rs485-{Path(pty).name}' on {pty} runs at {pty} 9600 8N1; --baud 19200 "
        "differs, and every device on one RS-485 line must use the same settings"
    )


# ---------------------------------------------------------------- the installer's mistakes


def test_unknown_profile_lists_the_known_ones(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = cfg_path.read_bytes()
    rc, _, err = run(
        add(cfg_path, "x", "--profile", "perimeter-panel-9", "--unit", "1", "--tcp", "127.0.0.1:502"), capsys
    )
    assert rc == 2
    known = list_profiles()
    assert "perimeter-panel-8" in known
    assert err.strip() == f"device add: no profile 'perimeter-panel-9'; known profiles: {', '.join(known)}"
    assert cfg_path.read_bytes() == before


def test_duplicate_unit_id_on_a_bus(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tcp = ["--tcp", "127.0.0.1:502"]
    assert run(add(cfg_path, "a", "--profile", "perimeter-panel-8", "--unit", "5", *tcp), capsys)[0] == 0
    before = cfg_path.read_bytes()
    rc, _, err = run(add(cfg_path, "b", "--profile", "perimeter-panel-16", "--unit", "5", *tcp), capsys)
    assert rc == 2
    assert err.strip() == (
        "device add: unit id 5 on bus 'tcp-127.0.0.1-502' is already used by device 'a'; each "
        "device on a bus needs its own unit id (change it on the device, then add it with that id)"
    )
    assert cfg_path.read_bytes() == before
    # The same unit id on another bus is fine.
    assert (
        run(add(cfg_path, "b", "--profile", "perimeter-panel-16", "--unit", "5", "--tcp", "127.0.0.1:503"), capsys)[0]
        == 0
    )


def test_serial_port_that_does_not_exist(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = "/dev/ttyUSB-gatehouse-test-missing"
    rc, _, err = run(add(cfg_path, "p", "--profile", "perimeter-panel-8", "--unit", "1", "--serial", missing), capsys)
    assert rc == 2
    here = provision.serial_candidates()
    hint = (
        f"serial ports here: {', '.join(here)}"
        if here
        else "no serial ports found: is the adapter plugged in? `dmesg | tail` shows what the kernel saw"
    )
    assert err.strip() == f"device add: serial port {missing} does not exist ({hint})"


@pytest.mark.parametrize("exclusive", [True, False], ids=["flock", "plain-open"])
def test_serial_port_held_by_another_process(
    cfg_path: Path, capsys: pytest.CaptureFixture[str], pty: str, exclusive: bool
) -> None:
    # Another program has the port open: with pyserial's exclusive lock, or plainly (found in /proc).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import serial, sys; p = serial.Serial(sys.argv[1], exclusive={exclusive}); "
            "print('open', flush=True); sys.stdin.read(); p.close()",
            pty,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        before = cfg_path.read_bytes()
        rc, _, err = run(add(cfg_path, "p", "--profile", "perimeter-panel-8", "--unit", "1", "--serial", pty), capsys)
        assert rc == 2
        assert err.strip() == (
            f"device add: serial port {pty} is busy (held by {holder.pid} (python)); stop that "
            "program first (the gateway itself: sudo systemctl stop gatehouse-gateway)"
        )
        assert cfg_path.read_bytes() == before
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
        if holder.stdout:
            holder.stdout.close()
    # Released: now it goes through.
    assert run(add(cfg_path, "p", "--profile", "perimeter-panel-8", "--unit", "1", "--serial", pty), capsys)[0] == 0


def as_nobody(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``gatehouse ARGV`` run by ``nobody``, who keeps one right: to read and search any folder, so the checkout
    and its .venv may sit in a private (0700) home; but not the right to write where it may not. Setting that up
    takes root (tests/privileged: as it is for root, ``sudo -n`` for anyone else)."""
    nobody = pwd.getpwnam("nobody")
    code = f"import sys, gateway.cli; sys.exit(gateway.cli.main({argv!r}))"
    cmd = root_args(
        [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            "--",
            "env",
            "PYTHONDONTWRITEBYTECODE=1",
            sys.executable,
            "-c",
            code,
        ]
    )
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)


def test_no_permission_says_join_the_dialout_group(pty: str) -> None:
    """A port of group dialout (as udev makes /dev/ttyUSB*), and an installer who is not in that group:
    run the real command as another user (``nobody``). Setting that up takes root (tests/privileged: as it is for
    root, ``sudo -n`` for anyone else); ``nobody`` keeps one right, to read and search any folder, so the checkout
    and its .venv may sit in a private (0700) home, but not the right to open a file it may not write."""
    as_root(["chown", "root:dialout", pty])
    as_root(["chmod", "660", pty])
    nobody = pwd.getpwnam("nobody")
    folder = Path(tempfile.mkdtemp(prefix="gatehouse-perm-"))
    try:
        folder.chmod(0o755)
        cfg = folder / "gateway.yaml"
        assert (
            cli.main(
                ["init", "--config", str(cfg), "--site", "s", "--gateway", "g", "--data-dir", str(folder / "data")]
            )
            == 0
        )
        cfg.chmod(0o644)
        done = as_nobody(add(cfg, "p", "--profile", "perimeter-panel-8", "--unit", "1", "--serial", pty), folder)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (
            f"device add: no permission to open {pty} (root:dialout crw-rw----): you ({nobody.pw_name}) are not in "
            "the dialout group; add yourself to the dialout group: sudo usermod -aG dialout $USER (then log out "
            "and back in)"
        )
    finally:
        shutil.rmtree(folder)


def test_permission_message_for_a_session_older_than_the_group() -> None:
    msg = provision.permission_message(
        "/dev/ttyUSB0",
        owner="root",
        group="dialout",
        mode=stat.S_IFCHR | 0o660,
        user="ann",
        session_groups={"ann"},
        member_of={"ann", "dialout"},
    )
    assert msg == (
        "no permission to open /dev/ttyUSB0: you (ann) are in the dialout group, but this login session "
        "started before you were added; log out and back in (or run `newgrp dialout`)"
    )


def test_an_edit_that_would_not_validate_is_not_written(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = cfg_path.read_bytes()
    rc, _, err = run(
        add(
            cfg_path,
            "p",
            "--profile",
            "perimeter-panel-8",
            "--unit",
            "1",
            "--tcp",
            "127.0.0.1:502",
            "--zone",
            "zone1_alarm=z1,group=night",
        ),
        capsys,
    )
    assert rc == 2
    lines = err.splitlines()
    assert lines[0] == "device add: the edited config would not be valid; nothing was written"
    # The problem names the real file (not the temporary one it was checked in) and the zone's line.
    assert len(lines) == 2 and lines[1].startswith(f"  {cfg_path}:")
    assert lines[1].endswith(": zones[0] (z1): group 'night' is not defined under 'zone_groups'")
    assert cfg_path.read_bytes() == before
    # no temporary file left (the edit lock stays: see provision.base.edit_lock)
    assert [p.name for p in cfg_path.parent.iterdir() if p.name.startswith(".")] == [".gateway.yaml.lock"]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--profile", "perimeter-panel-8", "--unit", "0", "--tcp", "127.0.0.1:502"],
            "unit id 0 is out of range: Modbus unit ids are 1-247 (0 is broadcast)",
        ),
        (
            ["--profile", "perimeter-panel-8", "--unit", "1"],
            "say which bus: --bus NAME (buses: none), --serial PORT or --tcp HOST:PORT",
        ),
        (
            ["--profile", "perimeter-panel-8", "--unit", "1", "--bus", "rs485-9"],
            "no bus 'rs485-9' (buses: none); to create it give --serial PORT or --tcp HOST:PORT as well",
        ),
        (
            ["--profile", "perimeter-panel-8", "--unit", "1", "--tcp", "127.0.0.1:502", "--zone", "zone99_alarm=z"],
            "--zone: profile 'perimeter-panel-8' has no point 'zone99_alarm' (points: ",
        ),
        (
            [
                "--profile",
                "perimeter-panel-8",
                "--unit",
                "1",
                "--tcp",
                "127.0.0.1:502",
                "--zone",
                "zone1_alarm=z,type=x",
            ],
            "--zone z: type 'x' is not one of perimeter, entry, interior, panic, medical, fire, gas, tamper, fault",
        ),
        (
            ["--profile", "waveshare-modbus-rtu-io-8ch", "--unit", "1", "--tcp", "127.0.0.1:502", "--door", "input1=d"],
            "--door d: point 'input1' is not writable (a door needs a relay output)",
        ),
        (
            ["--profile", "perimeter-panel-8", "--unit", "1", "--tcp", "127.0.0.1:502", "--baud", "19200"],
            "--baud: serial settings belong to the serial server, not to a TCP bus",
        ),
    ],
)
def test_other_mistakes(cfg_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    before = cfg_path.read_bytes()
    rc, _, err = run(add(cfg_path, "p", *args), capsys)
    assert rc == 2
    assert err.strip().startswith(f"device add: {message}")
    assert cfg_path.read_bytes() == before


def test_remove_and_show_unknown_device(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["device", "remove", "ghost", "--config", str(cfg_path)], capsys)
    assert (rc, err.strip()) == (2, "device remove: no device 'ghost' (devices: none)")
    rc, _, err = run(["device", "show", "ghost", "--config", str(cfg_path)], capsys)
    assert (rc, err.strip()) == (2, "device show: no device 'ghost' (devices: none)")


def test_a_config_with_errors_is_not_edited(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path.write_text(cfg_path.read_text() + "colour: red\n")
    before = cfg_path.read_bytes()
    rc, _, err = run(
        add(cfg_path, "p", "--profile", "perimeter-panel-8", "--unit", "1", "--tcp", "127.0.0.1:502"), capsys
    )
    assert rc == 2
    line = before.decode().splitlines().index("colour: red") + 1
    assert err.splitlines() == [
        f"device add: {cfg_path} has errors; fix them first (`gatehouse config check {cfg_path}`)",
        f"  {cfg_path}:{line}: Object contains unknown field `colour` (at $.colour)",
    ]
    assert cfg_path.read_bytes() == before


# ---------------------------------------------------------------- a config that cannot be written


def _root_owned_config() -> tuple[Path, Path]:
    """/etc/gatehouse as installed: a folder and a config of root's, readable by all; one device on it."""
    folder = Path(tempfile.mkdtemp(prefix="gatehouse-etc-"))
    folder.chmod(0o755)
    cfg = folder / "gateway.yaml"
    init = ["init", "--config", str(cfg), "--site", "s", "--gateway", "g", "--data-dir", str(folder / "data")]
    assert cli.main(init) == 0
    assert cli.main(add(cfg, "p1", "--profile", "perimeter-panel-8", "--unit", "1", "--tcp", "127.0.0.1:502")) == 0
    as_root(["chown", "-R", "root:root", str(folder)])
    as_root(["chmod", "644", str(cfg)])
    return folder, cfg


def test_an_edit_without_sudo_says_run_it_with_sudo_and_leaves_the_file() -> None:
    """The installer forgot sudo: `device add` and `device remove` on root's config say what to do, in one line
    (they used to end in a PermissionError traceback from the temporary file beside the config)."""
    folder, cfg = _root_owned_config()
    try:
        before = cfg.read_bytes()
        for argv, prefix in [
            (add(cfg, "p2", "--profile", "perimeter-panel-8", "--unit", "2", "--tcp", "127.0.0.1:502"), "device add"),
            (["device", "remove", "p1", "--config", str(cfg)], "device remove"),
        ]:
            done = as_nobody(argv, folder)
            assert done.returncode == 2, done.stderr
            assert done.stderr.strip() == f"{prefix}: cannot write {cfg}: permission denied — run it with sudo"
            assert cfg.read_bytes() == before
        assert not [p for p in folder.iterdir() if p.name.startswith(".gateway.yaml.") and p.suffix != ".lock"]
    finally:
        as_root(["rm", "-rf", str(folder)])


def test_an_edit_on_a_full_disk_says_so_and_leaves_the_file(tmp_path: Path) -> None:
    """The config's file system is full (a small tmpfs of the test's own, really filled): `device add` says so
    and what to do; the config is the one it was, and no temporary file is left beside it."""
    from tests.test_disk_full import _fill, _mount_tmpfs, _umount

    etc = tmp_path / "etc"
    _mount_tmpfs(etc)
    try:
        cfg = etc / "gateway.yaml"
        init = ["init", "--config", str(cfg), "--site", "s", "--gateway", "g", "--data-dir", str(tmp_path / "data")]
        assert cli.main(init) == 0
        before = cfg.read_bytes()
        filler = _fill(etc)
        argv = add(cfg, "p1", "--profile", "perimeter-panel-8", "--unit", "1", "--tcp", "127.0.0.1:502")
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (
            f"device add: cannot write {cfg}: no space left on the device — make room (df -h {etc}) and run it again"
        )
        assert cfg.read_bytes() == before
        assert not [p for p in etc.iterdir() if p.name.startswith(".gateway.yaml.") and p.suffix != ".lock"]
        filler.unlink()
        assert subprocess.run([sys.executable, "-m", "gateway.cli", *argv], timeout=60, cwd=tmp_path).returncode == 0
    finally:
        _umount(etc)


# ---------------------------------------------------------------- two installers at once


def test_parallel_edits_lose_nothing_and_never_share_a_unit_id(cfg_path: Path) -> None:
    """Several `device add` processes at once on one config (two terminals, a script in a loop with `&`): each that
    says it added its device has it in the file, and of several asking for the same unit id on the same bus exactly
    one succeeds. Without the lock each read the same file, validated its own edit and replaced the file: all
    exited 0 and only the last one's device was left."""
    procs = []
    for i in range(1, 7):  # distinct units: all must land
        argv = add(cfg_path, f"p{i}", "--profile", "perimeter-panel-8", "--unit", str(i), "--tcp", "127.0.0.1:502")
        procs.append((f"p{i}", i, argv))
    for name in ("q1", "q2", "q3"):  # one unit id asked for three times
        argv = add(cfg_path, name, "--profile", "perimeter-panel-8", "--unit", "9", "--tcp", "127.0.0.1:502")
        procs.append((name, 9, argv))
    running = [
        (name, unit, subprocess.Popen([sys.executable, "-m", "gateway.cli", *argv], stderr=subprocess.PIPE, text=True))
        for name, unit, argv in procs
    ]
    results = [(name, unit, p.wait(60), p.stderr.read() if p.stderr else "") for name, unit, p in running]
    for _, _, p in running:
        if p.stderr:
            p.stderr.close()
    cfg = config.load(cfg_path)
    in_file = {d.name: d.unit for d in cfg.devices}
    succeeded = [(name, unit) for name, unit, rc, _ in results if rc == 0]
    assert all(in_file.get(name) == unit for name, unit in succeeded), (succeeded, in_file)
    assert {f"p{i}" for i in range(1, 7)} <= {name for name, _ in succeeded}, results
    assert [name for name, unit in succeeded if unit == 9] == [n for n in ("q1", "q2", "q3") if n in in_file]
    assert len([1 for _, unit in succeeded if unit == 9]) == 1, results
    for _, unit, rc, err in results:
        if rc != 0:
            assert unit == 9 and "unit id 9" in err, err
