"""`gatehouse`: the one command, and the daemon's way in.

``gatehouse gateway run --config FILE`` (what systemd runs) starts the daemon from here and loads nothing of
the installer's tooling. Every other subcommand (init, device, bus, walktest, status, broker, demo, ...) is
:mod:`gateway.tooling.cli`, imported only then.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from gateway.daemon import run_gateway


def _daemon_config(args: Sequence[str]) -> str | None:
    """The FILE of ``gateway run --config FILE`` (or ``--config=FILE``), or None for anything else."""
    if len(args) not in (3, 4) or list(args[:2]) != ["gateway", "run"]:
        return None
    rest = list(args[2:])
    if len(rest) == 2 and rest[0] == "--config":
        return rest[1]
    if len(rest) == 1 and rest[0].startswith("--config="):
        return rest[0].removeprefix("--config=")
    return None


def build_parser() -> Any:
    """The whole command line (from the tooling), for help texts and the README's test."""
    from gateway.tooling.cli import build_parser as tooling_parser

    return tooling_parser()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config_path = _daemon_config(args)
    if config_path is not None:
        return run_gateway(config_path)
    from gateway.tooling.cli import main as tooling_main

    return tooling_main(args)


if __name__ == "__main__":
    sys.exit(main())
