"""A TCP load balancer and WAN relay of the tests' own, on the test's event loop.

:class:`Balancer` stands where a centre puts HAProxy (TCP mode) or any HTTP balancer in front of several portal
instances: each new connection goes to the backend with the fewest open connections (ties in turn), and to the next when
one refuses
(an instance that was killed). A connection lives as long as both its ends do: when its instance dies, the client
sees its socket close and connects again, through the balancer, to a living instance.

:meth:`Balancer.blackhole` makes it a WAN link that goes silent (an estate's bridge to the centre): bytes in
either direction are read and thrown away and new connections are accepted and then left hanging, as a link
whose packets are dropped looks to both ends, until they give up on their own keepalives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter


class Balancer:
    def __init__(self, backends: list[tuple[str, int]], host: str = "127.0.0.1", port: int = 0) -> None:
        self.backends = list(backends)
        self.host = host
        self.port = port
        self.active: Counter[int] = Counter()  # backend port -> open connections
        self.connections = 0
        self.refused = 0
        self._next = itertools.cycle(range(len(self.backends)))
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._dark = False

    async def start(self) -> Balancer:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def blackhole(self, on: bool) -> None:
        """Drop every byte (and leave new connections hanging) while ``on``; connections live on meanwhile."""
        self._dark = on

    def cut(self) -> None:
        """Close every connection now (a link that dies loudly: both ends see it at once)."""
        for w in list(self._writers):
            w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self.cut()
            await self._server.wait_closed()
        if self._tasks:  # every pipe ends with its sockets closed; cancelling would only make asyncio log it
            _, late = await asyncio.wait(list(self._tasks), timeout=5.0)
            for t in late:
                t.cancel()
            for t in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    def _order(self) -> list[tuple[str, int]]:
        """Backends to try, least connections first (HAProxy's leastconn, the usual for WebSockets), ties in turn."""
        start = next(self._next)
        turn = self.backends[start:] + self.backends[:start]
        return sorted(turn, key=lambda b: self.active[b[1]])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)
            me.add_done_callback(self._tasks.discard)
        self._writers.add(writer)
        try:
            while self._dark:  # a dead link: the client's connect "succeeds" and nothing ever answers
                if reader.at_eof():
                    return
                await asyncio.sleep(0.05)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.01):
                        await reader.read(65536)
            for host, port in self._order():
                try:
                    async with asyncio.timeout(2.0):
                        up_r, up_w = await asyncio.open_connection(host, port)
                except (OSError, TimeoutError):
                    self.refused += 1
                    continue
                break
            else:
                return
            self.connections += 1
            self.active[port] += 1
            self._writers.add(up_w)
            try:
                await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
            finally:
                self.active[port] -= 1
                self._writers.discard(up_w)
                up_w.close()
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if self._dark:
                    continue
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:  # one side gone: the other is closed too, as a proxy does
            dst.close()
