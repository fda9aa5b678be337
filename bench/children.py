"""What the benchmarks share: child programs that announce themselves with a JSON ``ready`` line, and
percentiles. Not a benchmark itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from common import children

ROOT = Path(__file__).resolve().parents[1]


async def start(
    name: str, args: list[str], log: Path, *, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """Start a program (in ``env``, default ours), its stderr to ``log``; wait (60 s at most) for its ready line
    and return it."""
    proc = await children.spawn(args, log=log, env=env, cwd=ROOT)
    try:
        return proc, await children.wait_ready(proc, name, 60, log=log)
    except children.NotReady as e:
        raise SystemExit(str(e)) from None


async def stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    await children.stop(proc)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]
