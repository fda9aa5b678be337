"""Running firmware stubs as child processes from tests: start, read the ready line, drive the control
API, stop cleanly (SIGTERM, then SIGKILL after a bounded wait)."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from common import children


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
        return await children.stop(self.proc, "stub", grace=10, sig=sig)


async def start_stub(module: str, *args: str, timeout: float = 20.0) -> Stub:
    proc = await children.spawn([sys.executable, "-m", module, *args])
    info = await children.wait_ready(proc, module, timeout)
    return Stub(proc, info, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)))


@asynccontextmanager
async def run_stub(module: str, *args: str) -> AsyncIterator[Stub]:
    stub = await start_stub(module, *args)
    try:
        yield stub
    finally:
        await stub.stop()
        await stub.session.close()
