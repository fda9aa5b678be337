"""What the daemon keeps resident: its config read in a child (the same config, the same errors), and nothing of
the parse left behind in the daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from gateway.daemon import load_config_apart
from gateway.demo.estate import gateway_yaml
from gateway.wire.passes import generate_keypair, save_public_key


def demo_config(tmp_path: Path) -> Path:
    """The demo's gateway config: buses, doors, readers, an indoor panel on a Contact ID line, access keys."""
    (tmp_path / "portal").mkdir()
    save_public_key(tmp_path / "portal" / "pass_signing_key.pub.pem", generate_keypair()[1])
    return gateway_yaml(
        tmp_path / "gateway.yaml",
        ("127.0.0.1", 1883),
        "tcp://127.0.0.1:5020",
        "tcp://127.0.0.1:5021",
        "tcp://127.0.0.1:5022",
        "/dev/ttyUSB0",
        "/dev/ttyUSB1",
        8088,
    )


def panels_config(tmp_path: Path, panels: int = 50, zones: int = 16) -> Path:
    lines = [
        "site: bench",
        "gateway: gw1",
        "data_dir: data",
        "mqtt: {host: 127.0.0.1, port: 1883}",
        "zone_groups: [{name: fence}]",
        "buses:",
        "  - {name: b0, kind: modbus-tcp, host: 127.0.0.1, port: 5020, timeout_ms: 300}",
        "devices:",
        *(f"  - {{name: p{i}, profile: perimeter-panel-16, bus: b0, unit: {i + 1}}}" for i in range(panels)),
        "zones:",
        *(
            f"  - {{name: p{i}-z{z}, device: p{i}, point: zone{z}_alarm, group: fence}}"
            for i in range(panels)
            for z in range(1, zones + 1)
        ),
    ]
    path = tmp_path / "panels.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_config_read_apart_is_the_config(tmp_path: Path) -> None:
    for path in (demo_config(tmp_path), panels_config(tmp_path)):
        here = config.load(path)
        apart = load_config_apart(str(path))
        assert apart == here
        assert type(apart) is config.GatewayConfig and apart.doors == here.doors and apart.zones == here.zones


@pytest.mark.parametrize(
    "body",
    [
        "site: x\nbogus: 1\n",  # a missing field and an unknown one, each with its line
        "site: [unclosed\n",  # not YAML
        "site: a\ngateway: b\ndevices:\n  - {name: p1, profile: no-such-profile, bus: nowhere, unit: 1}\n",
    ],
)
def test_config_errors_come_back_from_the_child(tmp_path: Path, body: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(body)
    with pytest.raises(config.ConfigError) as here:
        config.load(path)
    with pytest.raises(config.ConfigError) as apart:
        load_config_apart(str(path))
    assert apart.value.problems == here.value.problems and apart.value.problems
    with pytest.raises(config.ConfigError, match="no such file"):
        load_config_apart(str(tmp_path / "missing.yaml"))


KEPT = """
import gc, json, sys
from gateway import app, config
from gateway.daemon import load_config_apart
def rss():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024
gc.collect(); app.release_startup_memory()
before = rss()
cfg = (load_config_apart if sys.argv[2] == "apart" else config.load)(sys.argv[1])
app.release_startup_memory()
print(json.dumps({"zones": len(cfg.zones), "kept_mb": rss() - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_reading_the_config_leaves_nothing_resident_in_the_daemon(tmp_path: Path) -> None:
    """A config of 50 panels and 800 zones: read in process it leaves megabytes of Python's pools touched for
    good; read apart, the daemon keeps only the config itself (well under a megabyte)."""
    path = panels_config(tmp_path)
    kept = {}
    for how in ("apart", "here"):
        out = subprocess.run(
            [sys.executable, "-c", KEPT, str(path), how], capture_output=True, text=True, timeout=120, check=True
        )
        got = json.loads(out.stdout)
        assert got["zones"] == 800
        kept[how] = got["kept_mb"]
    assert kept["apart"] < 1.5, kept
    assert kept["here"] > kept["apart"] + 2, kept  # what the child takes away: the measure still sees it
