"""The daemon's way in: its logging, and ``gatehouse gateway run --config FILE`` until SIGTERM. Imported by the
``gatehouse`` entry point (:mod:`gateway.cli`) and by the installer's command line alike; it imports nothing of the
tooling."""

from __future__ import annotations

import asyncio
import logging
import os
import sys


def setup_logging(level: str = "INFO") -> None:
    # Under systemd the journal adds the time and the unit; elsewhere a timestamp helps.
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def run_gateway(config_path: str) -> int:
    """The daemon until SIGTERM. 2 when the config is not valid (each problem with its file and line)."""
    from gateway import app, config

    try:
        cfg = config.load(config_path)
    except config.ConfigError as e:
        print(f"gatehouse: config error:\n{e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    asyncio.run(app.serve(cfg))
    return 0
