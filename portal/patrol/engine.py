"""The running part of patrols: rounds written as they begin, overdue and missed checkpoints raised on time, and the
checkpoints drawn on the site maps.

The schedule is wall time in the site's zone (a round at 22:00 is at 22:00 on the guardroom's clock); the engine
writes only when something is due: at the next round's start or the next window's or allowance's end (kept from its
last write), or when a route changes. Rounds that began while the portal was away are written down when it is back
(:data:`portal.patrol.model.LOOKBACK`), and what they missed is reported, but they ring only when still fresh.

Several instances on one store (a monitoring centre) all run the rounds, so a round rings whichever instance is
alive: each reads when it is next due from the store every :data:`TICK_S` (another instance may have saved a route or
written a round), and a route or checkpoint saved at one instance is told to the others with its commit (the notice
:data:`CHANGED`; or :data:`~portal.store.MISSED`, when notices may have been lost: they read the map's markers again
and tick). Ticking is idempotent (:func:`portal.patrol.model.tick`): instances that tick together raise each alert
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from portal.alarms.board import AlarmBoard, Marker
from portal.patrol import model
from portal.store import MISSED, Notice, Op, StoreError
from portal.web.services import Services

log = logging.getLogger("portal.patrol")

TICK_S = 1.0
#: what the other instances sharing the store hear of a change to a checkpoint or route (with its commit)
CHANGED = Notice("patrol.changed")


class PatrolEngine:
    def __init__(
        self,
        svc: Services,
        board: AlarmBoard,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.svc, self.board, self.wall, self.mono = svc, board, wall, mono
        self.next_at: datetime | None = None
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.markers: dict[str, list[Marker]] = {}  # site → placed checkpoints, for the maps
        self._stale = True  # the markers must be read again (another instance changed a checkpoint)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.wall(), UTC)

    async def start(self) -> None:
        await self.refresh_markers()
        self.svc.store.add_commit_listener(self.on_commit)
        self._task = asyncio.create_task(self._run(), name="portal.patrol.rounds")
        self._poke.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def changed(self) -> None:
        """A route or checkpoint was changed here (its write sent :data:`CHANGED` to the other instances): the map's
        markers read again now, the rounds looked at at once."""
        await self.refresh_markers()
        self._poke.set()

    def on_commit(self, committed: list[tuple[Op, Any]]) -> None:
        """A store commit listener: another instance changed a route or checkpoint (or its notices may have been
        lost): markers and rounds looked at again now (by the loop)."""
        if any(isinstance(res, Notice) and res in (CHANGED, MISSED) for _op, res in committed):
            self._stale = True
            self._poke.set()

    async def refresh_markers(self) -> None:
        self._stale = False
        try:
            cps = await self.svc.store.read(lambda c: model.checkpoints(c))
        except BaseException:
            self._stale = True
            raise
        placed: dict[str, list[Marker]] = {}
        for cp in cps:
            if cp.x is not None and cp.y is not None:
                placed.setdefault(cp.site, []).append(marker(cp))
        self.markers = placed

    async def tick_now(self) -> model.Changes:
        now, tz = self.now(), self.svc.tz
        res: model.Changes = await self.svc.store.run_write(lambda c: model.tick(c, now, tz))
        self.next_at = res.next_at
        await self.publish(res.events)
        return res

    async def look(self) -> None:
        """Read from the store when there is next something to do (read only; :meth:`tick_now` writes)."""
        now, tz = self.now(), self.svc.tz
        self.next_at = await self.svc.store.read(lambda c: model.next_time(c, now, tz))

    async def publish(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            self.svc.hub.broadcast({"kind": "event", "event": ev})
            if ev["type"] in ("patrol.overdue", "patrol.missed"):
                log.warning(
                    "patrol: %s %s (%s)",
                    ev["data"].get("label"),
                    ev["type"],
                    ", ".join(ev["data"].get("checkpoints", [])),
                )
        if events:
            await self.board.feed_now()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._poke.wait()
            poked = self._poke.is_set()
            self._poke.clear()
            try:
                if self._stale:
                    await self.refresh_markers()
                if not poked and self.svc.store.shared:  # another instance may have saved a route or ticked
                    await self.look()
                if not poked and (self.next_at is None or self.now() < self.next_at):
                    continue
                await self.tick_now()
            except StoreError as e:
                log.warning("patrol rounds: %s; retrying", e)
                await asyncio.sleep(1.0)
                self._poke.set()
            except Exception:
                log.exception("patrol rounds failed; retrying")
                await asyncio.sleep(1.0)
                self._poke.set()


def marker(cp: model.Checkpoint) -> Marker:
    """A placed checkpoint as the site maps draw it."""
    assert cp.x is not None and cp.y is not None
    return Marker(cp.marker, cp.name, cp.x, cp.y, "checkpoint")
