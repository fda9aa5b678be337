"""`gatehouse`: the one command. Subcommands run the gateway, the portal, the stubs and the demo.

The portal and the stubs are separate programs (``python -m portal``, ``python -m firmware_stubs.X``);
this command hands over to them with exec, as production's systemd units do, rather than importing them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__

STUBS = {
    "perimeter": "firmware_stubs.perimeter_panel",
    "indoor": "firmware_stubs.indoor_panel",
    "door": "firmware_stubs.door_controller",
    "reader": "firmware_stubs.qr_reader",
}


def setup_logging(level: str = "INFO") -> None:
    # Under systemd the journal adds the time and the unit; elsewhere a timestamp helps.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") \
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def _exec_module(module: str, args: Sequence[str]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def cmd_gateway_run(ns: argparse.Namespace) -> int:
    from gateway import app, config

    try:
        cfg = config.load(ns.config)
    except config.ConfigError as e:
        print(f"gatehouse: config error:\n{e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    asyncio.run(app.serve(cfg))
    return 0


def cmd_config_check(ns: argparse.Namespace) -> int:
    from gateway import config

    try:
        cfg = config.load(ns.config)
    except config.ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 2
    print(f"{ns.config}: ok ({len(cfg.buses)} buses, {len(cfg.devices)} devices, {len(cfg.zones)} zones)")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from gateway import demo

    setup_logging("INFO")
    data = Path(ns.data).resolve()
    (data / "logs").mkdir(parents=True, exist_ok=True)
    return asyncio.run(demo.run_demo(ns, data))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gatehouse", description="Gatehouse estate access control and alarms")
    p.add_argument("--version", action="version", version=f"gatehouse {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    gw = sub.add_parser("gateway", help="the gateway daemon").add_subparsers(dest="action", required=True)
    run = gw.add_parser("run", help="run the gateway until SIGTERM")
    run.add_argument("--config", required=True)
    run.set_defaults(func=cmd_gateway_run)

    pt = sub.add_parser("portal", help="the estate portal (web console)")
    pt.add_argument("portal_args", nargs=argparse.REMAINDER, help="run --config FILE | adduser ...")
    pt.set_defaults(func=lambda ns: _exec_module("portal", ns.portal_args) or 0)

    st = sub.add_parser("stub", help="simulated hardware: " + ", ".join(STUBS))
    st.add_argument("kind", choices=sorted(STUBS))
    st.add_argument("stub_args", nargs=argparse.REMAINDER)
    st.set_defaults(func=lambda ns: _exec_module(STUBS[ns.kind], ns.stub_args) or 0)

    cfg = sub.add_parser("config", help="configuration files").add_subparsers(dest="action", required=True)
    chk = cfg.add_parser("check", help="validate a gateway config; each error names its file and line")
    chk.add_argument("config")
    chk.set_defaults(func=cmd_config_check)

    demo = sub.add_parser("demo", help="run everything on this machine with simulated hardware")
    demo.add_argument("--data", default="demo-data", help="folder for every file of the demo")
    demo.add_argument("--port", type=int, default=8080, help="the portal's port")
    demo.add_argument("--broker", default=None, help="host:port of an existing broker (default: start one)")
    demo.add_argument("--intruder-every", type=float, default=20.0, help="seconds between scripted zone trips")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds (for tests)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return int(ns.func(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())
