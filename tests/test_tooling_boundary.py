"""The daemon never imports the installer's tooling (gateway.tooling: the CLI's installer commands,
provisioning, commissioning, the broker helper). A check of the architecture's arrow until import-linter
states it as a contract: each test looks at what a fresh interpreter has loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(code: str) -> list[str]:
    probe = (
        f"import atexit, json, sys\n"
        f"atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))\n{code}"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    return json.loads(r.stderr.strip().splitlines()[-1])


def test_the_daemon_modules_import_no_tooling() -> None:
    mods = loaded_after("import gateway.app, gateway.cli, gateway.localapi, gateway.config")
    assert "gateway.app" in mods and "gateway.cli" in mods
    assert [m for m in mods if m.startswith("gateway.tooling")] == []


def test_gatehouse_gateway_run_loads_no_tooling(tmp_path: Path) -> None:
    """The daemon as systemd starts it (`gatehouse gateway run --config FILE`), up to its config error."""
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("site: s\ngateway: g\nbuses: 5\n")
    run = f"['gateway', 'run', '--config', {str(cfg)!r}]"
    mods = loaded_after(f"from gateway.cli import main\nraise SystemExit(main({run}))")
    assert "gateway.config" in mods
    assert [m for m in mods if m.startswith("gateway.tooling")] == []


def test_the_installer_commands_do_load_the_tooling() -> None:
    """The probe sees the tooling when it is there (so the tests above cannot pass by looking at nothing)."""
    mods = loaded_after("from gateway.cli import main\nmain(['bus', 'scan', '--units', 'x'])")
    assert "gateway.tooling.cli" in mods
