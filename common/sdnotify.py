"""systemd's notify protocol (sd_notify): readiness, status and a watchdog fed from the event loop.

The watchdog is fed by a task on the event loop itself, so a loop that hangs (a blocking call, a
runaway coroutine) stops feeding it and systemd restarts the service after ``WatchdogSec``; so does a
part of the service that the loop sees is stuck (``feed_watchdog``'s ``problem``: a Modbus bus's thread).
Without ``NOTIFY_SOCKET`` (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):  # abstract namespace
            addr = "\0" + addr[1:]
        self.address = addr or None
        self._sock: socket.socket | None = None
        self._failing = False  # a failure is logged once, not at every watchdog tick
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None

    def send(self, *fields: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            if not self._failing:
                log.warning("sd_notify to %r failed: %s (logged again only after it has worked)", self.address, e)
            self._failing = True
            return False
        if self._failing:
            log.warning("sd_notify to %r works again", self.address)
            self._failing = False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    async def feed_watchdog(self, problem: Callable[[], str | None] | None = None) -> None:
        """Feed the watchdog at half its period for as long as the loop runs this task and ``problem()`` (a part of
        the service stuck although the loop runs) says None. While it names one, the watchdog is not fed (systemd
        restarts the service after ``WatchdogSec``) and the service's status says why."""
        if self.watchdog_s is None or self.address is None:
            return
        period = self.watchdog_s / 2
        told: str | None = None
        while True:
            why = problem() if problem is not None else None
            if why is None:
                self.send("WATCHDOG=1")
            elif why != told:
                log.error("not feeding the watchdog: %s", why)
                self.status(f"not feeding the watchdog: {why}")
            told = why
            await asyncio.sleep(period)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
