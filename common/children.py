"""Child programs that announce themselves: started with stderr in a log file, ready when they print one JSON line
holding ``"ready"`` on stdout, stopped with SIGTERM and killed after a grace period. The demo, the benchmarks and the
tests' stubs all run their children this way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("gatehouse.children")


class NotReady(RuntimeError):
    """The child exited, or stayed silent, before its ready line."""


async def spawn(
    args: Sequence[str],
    *,
    log: Path | None = None,
    stdout: int = asyncio.subprocess.PIPE,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> asyncio.subprocess.Process:
    """Start ``args`` with stdin closed, stdout to ``stdout`` and stderr appended to ``log`` (inherited when None);
    ``env`` defaults to ours, always unbuffered."""
    err = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        err = log.open("ab")  # the child keeps its own descriptor
    try:
        return await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=err,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
            cwd=cwd,
        )
    finally:
        if err is not None:
            err.close()


async def wait_ready(
    proc: asyncio.subprocess.Process,
    name: str,
    within_s: float,
    *,
    on_line: Callable[[str], None] | None = None,
    log: Path | None = None,
) -> dict[str, Any]:
    """Read ``proc``'s stdout until its JSON ready line and answer it; other lines go to ``on_line``. On EOF or
    timeout the child is killed and :class:`NotReady` says so (with where its log is)."""
    assert proc.stdout is not None, "spawn the child with stdout=PIPE"
    where = f"; see {log}" if log is not None else ""
    try:
        async with asyncio.timeout(within_s):
            while True:
                line = (await proc.stdout.readline()).decode(errors="replace")
                if not line:
                    raise NotReady(f"{name} exited before it was ready{where}")
                if line.startswith("{") and '"ready"' in line:
                    info: dict[str, Any] = json.loads(line)
                    return info
                if on_line is not None:
                    on_line(line.rstrip("\n"))
    except TimeoutError:
        await stop(proc, name, grace=0)
        raise NotReady(f"{name} not ready within {within_s:g} s{where}") from None
    except BaseException:
        await stop(proc, name, grace=0)
        raise


async def stop(
    proc: asyncio.subprocess.Process, name: str = "child", *, grace: float = 15.0, sig: int = signal.SIGTERM
) -> int:
    """Send ``sig`` (SIGTERM), wait ``grace`` seconds, then SIGKILL (``grace=0``: at once); answer the exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig if grace > 0 else signal.SIGKILL)
        try:
            await asyncio.wait_for(proc.wait(), grace if grace > 0 else None)
        except TimeoutError:
            logger.warning("%s did not stop within %g s; killing it", name, grace)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return int(proc.returncode or 0)
