"""The daemon's way in: its logging, and ``gatehouse gateway run --config FILE`` until SIGTERM. Imported by the
``gatehouse`` entry point (:mod:`gateway.cli`) and by the installer's command line alike; it imports nothing of the
tooling."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

#: The event loop the daemon runs on: ``asyncio`` (the standard library's, the default) or ``uvloop`` (libuv, the
#: optional extra ``gatehouse[uvloop]``). Measured side by side (bench/alarm_latency.py --loops asyncio,uvloop, 50
#: panels): uvloop spends 23% less CPU per input poll on one bus and 8% less on 50 endpoints, and keeps ~2 MB more
#: resident (its extension, libuv's thread pool), which takes a 50-device gateway past 40 MB; so it is a choice,
#: not the default.
LOOP_ENV = "GATEHOUSE_EVENT_LOOP"
DEFAULT_LOOP = "asyncio"


def loop_factory(choice: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the configured loop (``choice`` or $GATEHOUSE_EVENT_LOOP or the default); None for the
    standard library's. ValueError for an unknown choice, or for uvloop asked for and not installed."""
    name = choice or os.environ.get(LOOP_ENV) or DEFAULT_LOOP
    if name == "asyncio":
        return None
    if name != "uvloop":
        raise ValueError(f"{LOOP_ENV}: 'uvloop' or 'asyncio', not {name!r}")
    try:
        import uvloop
    except ImportError:
        raise ValueError(f"{LOOP_ENV}=uvloop, but uvloop is not installed (pip install 'gatehouse[uvloop]')") from None
    return uvloop.new_event_loop


def setup_logging(level: str = "INFO") -> None:
    # Under systemd the journal adds the time and the unit; elsewhere a timestamp helps.
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def load_config_apart(config_path: str) -> GatewayConfig:
    """:func:`gateway.config.load` in a forked child, the config handed back as MessagePack: the same config,
    the same :class:`~gateway.config.ConfigError`.

    Reading a config is the daemon's largest allocation and happens once: the YAML tree with every line number,
    the validation, the profiles. Done in the daemon, it leaves ~6 MB of Python's memory pools touched and
    pinned for good by the few objects that outlive it (a config of 50 panels and 800 zones), a seventh of what
    the daemon needs on a Pi. The child takes that with it when it exits. Without ``os.fork``, in process."""
    import msgspec

    from gateway import config

    if not hasattr(os, "fork"):
        return config.load(config_path, check_files=True)
    r, w = os.pipe()
    pid = os.fork()  # before the event loop and any thread
    if pid == 0:
        code = 0
        try:
            os.close(r)
            try:
                out = b"C" + msgspec.msgpack.encode(config.load(config_path, check_files=True))
            except config.ConfigError as e:
                out = b"E" + msgspec.msgpack.encode(e.problems)
            except BaseException:
                out = b"X" + traceback.format_exc().encode()
            with os.fdopen(w, "wb") as f:
                f.write(out)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    kind, body = out[:1], out[1:]
    if kind == b"C":
        return msgspec.msgpack.decode(body, type=config.GatewayConfig)
    if kind == b"E":
        raise config.ConfigError(msgspec.msgpack.decode(body, type=list[str]))
    detail = body.decode(errors="replace") or f"exit status {os.waitstatus_to_exitcode(status)}"
    raise RuntimeError(f"reading the config failed:\n{detail}")


def run_gateway(config_path: str) -> int:
    """The daemon until SIGTERM. 2 when the config is not valid (each problem with its file and line)."""
    from gateway import app, config

    try:
        cfg = load_config_apart(config_path)
    except config.ConfigError as e:
        print(f"gatehouse: config error:\n{e}", file=sys.stderr)
        return 2
    try:
        factory = loop_factory()
    except ValueError as e:
        print(f"gatehouse: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(app.serve(cfg))
    return 0
