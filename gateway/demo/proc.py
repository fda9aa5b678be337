"""The one way the demo runs a child program: started with its stderr in a log file, ready when it prints its
JSON ``ready`` line, stopped with SIGTERM (then killed after a grace period); or a command run to its end."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from common import children

READY_TIMEOUT_S = 60.0


class Proc:
    """A child program: a service that announces itself with one JSON ``ready`` line on stdout (:meth:`start`,
    :meth:`stop`), or a one-shot command run to its end (:meth:`run`)."""

    def __init__(self, name: str, args: list[str], logfile: Path) -> None:
        self.name, self.args, self.logfile = name, args, logfile
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self._pump: asyncio.Task[None] | None = None

    async def _spawn(self, stdout: int) -> asyncio.subprocess.Process:
        self.proc = await children.spawn(self.args, log=self.logfile, stdout=stdout)
        return self.proc

    def _said_since(self, start: int) -> str:
        with self.logfile.open("rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")

    async def run(self, ok: bytes = b"") -> None:
        """Run to the end; RuntimeError with the tail of its log when it fails (unless the log's new part holds
        ``ok``: "exists", for a step a second run finds done)."""
        start = self.logfile.stat().st_size if self.logfile.exists() else 0
        proc = await self._spawn(asyncio.subprocess.DEVNULL)
        if await proc.wait():
            said = self._said_since(start)
            if not (ok and ok.decode() in said):
                raise RuntimeError(f"{self.name} failed: {said[-2000:]}")

    async def output(self) -> str:
        """Run to the end and answer what it printed; RuntimeError with the tail of its log when it fails."""
        start = self.logfile.stat().st_size if self.logfile.exists() else 0
        proc = await self._spawn(asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{self.name} failed: {self._said_since(start)[-2000:]}")
        return out.decode()

    async def start(self, echo: bool = False) -> dict[str, Any]:
        proc = await self._spawn(asyncio.subprocess.PIPE)
        self.info = await children.wait_ready(
            proc, self.name, READY_TIMEOUT_S, on_line=self._echoed if echo else None, log=self.logfile
        )
        self._pump = asyncio.create_task(self._drain(echo), name=f"demo.{self.name}.stdout")
        return self.info

    def _echoed(self, line: str) -> None:
        print(f"[{self.name}] {line}", flush=True)

    async def _drain(self, echo: bool) -> None:
        assert self.proc and self.proc.stdout
        while line := await self.proc.stdout.readline():
            if echo:
                self._echoed(line.decode(errors="replace").rstrip())

    async def stop(self) -> None:
        if self.proc is not None:
            await children.stop(self.proc, self.name)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
