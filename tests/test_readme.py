"""The README does not lie: its config example loads, and its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from gateway import cli, config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_example_is_a_valid_gateway_config(tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(site: .*?)```", text, re.S)
    assert block, "the README has a gateway config example"
    path = tmp_path / "gateway.yaml"
    path.write_text(block.group(1), encoding="utf-8")
    cfg = config.load(path)
    assert [z.name for z in cfg.zones] == ["north-fence", "car-park-beam"]
    assert cfg.mqtt.tls is not None


def test_readme_opens_with_the_two_setup_commands_and_names_real_subcommands() -> None:
    text = README.read_text(encoding="utf-8")
    setup = re.search(r"```sh\n(.*?)```", text, re.S)
    assert setup
    assert [ln.split("#")[0].strip() for ln in setup.group(1).splitlines()] == ["make demo", "make test"]
    parser = cli.build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for sub in ("init", "device", "bus", "walktest", "config", "status", "broker", "demo", "gateway", "portal"):
        assert f"gatehouse {sub}" in text or f"`{sub}" in text, sub
        assert sub in commands
    for bench in re.findall(r"`\.venv/bin/python (bench/\w+\.py)`", text):
        assert (README.parent / bench).exists(), bench
