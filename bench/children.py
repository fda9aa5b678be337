"""What the benchmarks share: child programs that announce themselves with a JSON ``ready`` line, and
percentiles. Not a benchmark itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


async def start(name: str, args: list[str], log: Path) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """Start a program, its stderr to ``log``; wait (60 s at most) for its ready line and return it."""
    err = log.open("ab")
    try:
        proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=err, cwd=ROOT)
    finally:
        err.close()
    assert proc.stdout
    async with asyncio.timeout(60):
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise SystemExit(f"{name} exited before it was ready; see {log}")
            if line.startswith(b"{") and b'"ready"' in line:
                return proc, json.loads(line)


async def stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]
