"""The systemd units as scripts/install.sh renders them: `systemd-analyze verify` and `security` pass,
the settings the deployment relies on are there, and the gateway started by the unit's own command
line speaks the notify protocol from its main process (what Type=notify + NotifyAccess=main need).
Nothing is installed on this machine: the script runs with --render and --dry-run only."""

from __future__ import annotations

import array
import os
import shlex
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import cli
from gateway.tooling.broker import MosquittoProcess
from tests import procs

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "scripts" / "install.sh"
BINDIR = Path(sys.executable).parent  # the virtualenv's bin, where `gatehouse` is installed
ANALYZE = "/usr/bin/systemd-analyze"
UNITS = ("gatehouse-gateway.service", "gatehouse-portal.service")

pytestmark = pytest.mark.timeout(120)


def render(dest: Path, confdir: Path) -> dict[str, Path]:
    done = subprocess.run(
        [
            str(INSTALL),
            "--gateway",
            "--portal",
            "--render",
            str(dest),
            "--bindir",
            str(BINDIR),
            "--confdir",
            str(confdir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    paths = {p.name: p for p in (Path(line) for line in done.stdout.split())}
    assert sorted(paths) == sorted(UNITS)
    return paths


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


@pytest.fixture
def units(tmp_path: Path) -> dict[str, Path]:
    return render(tmp_path / "units", tmp_path / "etc")


def test_rendered_units_have_no_placeholders(units: dict[str, Path]) -> None:
    for p in units.values():
        text = p.read_text()
        assert "@BINDIR@" not in text and "@CONFDIR@" not in text
        assert f"{BINDIR}/" in text


def test_systemd_analyze_verify_passes(units: dict[str, Path]) -> None:
    # verify exits 0 on unknown keys and bad values (it only warns), so its output must be empty too.
    # It also checks that every Exec*= command exists and is executable.
    done = subprocess.run(
        [ANALYZE, "verify", *map(str, units.values())],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    assert done.returncode == 0, done.stderr
    ours = [ln for ln in (done.stdout + done.stderr).splitlines() if any(u in ln for u in UNITS)]
    assert ours == [], "\n".join(ours)


def test_verify_would_catch_a_broken_unit(tmp_path: Path, units: dict[str, Path]) -> None:
    bad = tmp_path / "bad" / "gatehouse-gateway.service"
    bad.parent.mkdir()
    bad.write_text(
        units["gatehouse-gateway.service"]
        .read_text()
        .replace(f"{BINDIR}/gatehouse gateway run", "/nonexistent/gatehouse gateway run")
    )
    done = subprocess.run([ANALYZE, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "/nonexistent/gatehouse" in done.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_exposure_is_low(units: dict[str, Path], unit: str) -> None:
    # systemd's own score: 0 (locked down) to 10 (unprotected); the threshold is in tenths.
    done = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--threshold=25", str(units[unit])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


def test_gateway_unit_settings(units: dict[str, Path]) -> None:
    u = parse_unit(units["gatehouse-gateway.service"])
    s = u["Service"]
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["WatchdogSec"].endswith("s") and 10 <= int(one["WatchdogSec"][:-1]) <= 120
    assert one["Restart"] == "on-failure"
    assert (one["User"], one["Group"], one["SupplementaryGroups"]) == ("gatehouse", "gatehouse", "dialout")
    assert one["StateDirectory"] == "gatehouse" and one["ReadWritePaths"] == "/var/lib/gatehouse"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "DevicePolicy": "closed",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "StandardError": "journal",
    }.items():
        assert one[key] == value, key
    assert sorted(s["DeviceAllow"]) == ["char-ttyACM rw", "char-ttyAMA rw", "char-ttyS rw", "char-ttyUSB rw"]
    assert "PrivateDevices" not in s  # it would hide the serial ports
    confdir = units["gatehouse-gateway.service"].parent.parent / "etc"
    assert one["ExecStart"] == f"{BINDIR}/gatehouse gateway run --config {confdir / 'gateway.yaml'}"
    assert one["ExecStartPre"] == f"{BINDIR}/gatehouse config check {confdir / 'gateway.yaml'}"
    assert u["Install"]["WantedBy"] == ["multi-user.target"]


def test_portal_unit_settings(units: dict[str, Path]) -> None:
    s = {k: v[-1] for k, v in parse_unit(units["gatehouse-portal.service"])["Service"].items()}
    # The portal sends READY=1 once it listens and feeds the watchdog from its loop, like the gateway.
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main" and "WatchdogSec" in s
    assert s["PrivateDevices"] == "yes" and "SupplementaryGroups" not in s
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes" and s["Restart"] == "on-failure"


def test_the_units_commands_run_the_gateway_with_notify_from_its_main_process(
    tmp_path: Path, units: dict[str, Path], broker: MosquittoProcess
) -> None:
    """ExecStartPre checks the config; ExecStart's process itself sends READY=1 and feeds the watchdog."""
    svc = {k: v[-1] for k, v in parse_unit(units["gatehouse-gateway.service"])["Service"].items()}
    etc = tmp_path / "etc"
    assert (
        cli.main(
            [
                "init",
                "--config",
                str(etc / "gateway.yaml"),
                "--site",
                "s1",
                "--gateway",
                "gw-1",
                "--broker",
                f"127.0.0.1:{broker.port}",
                "--data-dir",
                str(tmp_path / "data"),
            ]
        )
        == 0
    )
    (tmp_path / "data").mkdir()
    text = (etc / "gateway.yaml").read_text().replace("enabled: true", "enabled: false")  # no fixed port here
    (etc / "gateway.yaml").write_text(text)

    pre = subprocess.run(shlex.split(svc["ExecStartPre"]), capture_output=True, text=True, timeout=60)
    assert pre.returncode == 0, pre.stderr
    (tmp_path / "broken.yaml").write_text(text + "colour: red\n")
    broken = subprocess.run(
        [*shlex.split(svc["ExecStartPre"])[:-1], str(tmp_path / "broken.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert broken.returncode == 2 and "unknown field `colour`" in broken.stderr  # systemd would not start it

    _assert_notifies(svc["ExecStart"], tmp_path, "gateway-unit")


def _assert_notifies(exec_start: str, tmp_path: Path, name: str) -> None:
    """Run a unit's ExecStart under a notify socket: READY=1 and three WATCHDOG=1, all from the main pid."""
    sock_path = tmp_path / f"{name}.notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(str(sock_path))
    sock.settimeout(1.0)
    child = procs.Child(
        name,
        shlex.split(exec_start),
        tmp_path / "logs",
        env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "600000"},
    )
    try:
        child.start(wait_ready=False)
        assert child.proc is not None
        seen: list[tuple[str, int]] = []
        deadline = time.monotonic() + 30
        # Until READY=1 and three pings: a slow start (a loaded machine) may ping the watchdog before it is ready.
        while time.monotonic() < deadline and not (
            ("READY=1", child.proc.pid) in seen and sum(m == "WATCHDOG=1" for m, _ in seen) >= 3
        ):
            try:
                msg, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
            except TimeoutError:
                continue
            pid = next(
                array.array("i", data)[0]
                for level, kind, data in anc
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            seen.extend((field, pid) for field in msg.decode().split("\n"))
        fields = [m for m, _ in seen]
        assert "READY=1" in fields, f"{seen}\n{child.tail()}"
        assert fields.count("WATCHDOG=1") >= 3, f"{seen}\n{child.tail()}"
        # NotifyAccess=main: systemd only listens to the main process, the one ExecStart started.
        assert {pid for _, pid in seen} == {child.proc.pid}
    finally:
        child.stop()
        sock.close()


def test_the_portal_units_command_notifies_from_its_main_process(
    tmp_path: Path, units: dict[str, Path], broker: MosquittoProcess
) -> None:
    svc = {k: v[-1] for k, v in parse_unit(units["gatehouse-portal.service"])["Service"].items()}
    config = Path(shlex.split(svc["ExecStart"])[-1])
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f"data_dir: {tmp_path / 'portal-data'}\nlisten: {{host: 127.0.0.1, port: 0}}\n"
        f"mqtt: {{host: 127.0.0.1, port: {broker.port}}}\n"
    )
    _assert_notifies(svc["ExecStart"], tmp_path, "portal-unit")


def test_install_dry_run_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "opt"
    confdir = tmp_path / "etc"
    done = subprocess.run(
        [
            str(INSTALL),
            "--dry-run",
            "--gateway",
            "--portal",
            "--broker",
            "--prefix",
            str(prefix),
            "--confdir",
            str(confdir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for step in (
        "usermod -aG dialout gatehouse",
        f"-m venv {prefix}/venv",
        f"{prefix}/venv/bin/pip install",
        "/etc/systemd/system/gatehouse-gateway.service",
        "/etc/systemd/system/gatehouse-portal.service",
        "systemctl enable gatehouse-gateway.service",
        "/etc/mosquitto/conf.d/gatehouse.conf",
        "/etc/mosquitto/gatehouse.acl",
        "dry run: nothing was changed",
    ):
        assert step in out, step
    assert not prefix.exists() and not confdir.exists()


def test_make_install_runs_the_script() -> None:
    done = subprocess.run(
        ["make", "-n", "install", "INSTALL_ARGS=--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "scripts/install.sh --dry-run" in done.stdout


def test_the_kiosk_unit_starts_chromium_with_the_flags_the_browser_test_proves() -> None:
    """tests/test_console_shell_browser.py proves that a Chromium started with KIOSK rings on every console page with
    nobody at the keyboard. The guardroom runs the shipped user unit, not that constant: it must start the same
    browser in kiosk mode with every flag KIOSK adds to a plain headless browser (the autoplay policy), or the
    guardroom PC stays silent until someone clicks."""
    from tests.test_console_shell_browser import CHROMIUM, FLAGS, KIOSK

    text = (ROOT / "systemd" / "gatehouse-kiosk.service").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    argv = shlex.split(line.removeprefix("ExecStart="))
    proved = [f for f in KIOSK if f not in FLAGS]
    assert proved == ["--autoplay-policy=no-user-gesture-required"]
    assert argv[0] == CHROMIUM and "--kiosk" in argv and argv[-1] == "${GATEHOUSE_URL}", argv
    assert all(f in argv for f in proved), argv
    assert not any(f.startswith("--autoplay-policy=") and f not in proved for f in argv), argv
    assert parse_unit(ROOT / "systemd" / "gatehouse-kiosk.service")["Service"]["Restart"] == ["always"]
