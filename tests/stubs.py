"""Running firmware stubs as child processes from tests: start, read the ready line, drive the control
API, stop cleanly (SIGTERM, then SIGKILL after a bounded wait)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp


class Stub:
    def __init__(self, proc: asyncio.subprocess.Process, info: dict[str, Any], session: aiohttp.ClientSession):
        self.proc = proc
        self.info = info
        self.session = session

    @property
    def control(self) -> str:
        return str(self.info["control"])

    def endpoint(self, i: int = 0) -> tuple[str, int]:
        """(host, port) of TCP endpoint i."""
        url = str(self.info["endpoints"][i]).split("//", 1)[1]
        host, port = url.rsplit(":", 1)
        return host, int(port)

    @property
    def serial(self) -> str:
        return str(self.info["serial"])

    async def post(self, path: str, body: dict[str, Any] | None = None, *, expect: int = 200) -> dict[str, Any]:
        async with self.session.post(self.control + path, json=body) as r:
            data: dict[str, Any] = await r.json()
            assert r.status == expect, (path, r.status, data)
            return data

    async def state(self, recent: bool = False) -> dict[str, Any]:
        async with self.session.get(self.control + "/state", params={"recent": "1"} if recent else None) as r:
            assert r.status == 200
            data: dict[str, Any] = await r.json()
            return data

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return int(self.proc.returncode or 0)


async def start_stub(module: str, *args: str, timeout: float = 20.0) -> Stub:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            line = await proc.stdout.readline()
        info = json.loads(line)
        assert info.get("ready") is True, info
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise
    return Stub(proc, info, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)))


@asynccontextmanager
async def run_stub(module: str, *args: str) -> AsyncIterator[Stub]:
    stub = await start_stub(module, *args)
    try:
        yield stub
    finally:
        await stub.stop()
        await stub.session.close()


async def wait_until(pred: Callable[[], object], timeout: float, what: str) -> None:
    """Real-time wait for an end-to-end condition, bounded."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
