"""Scripted life on the estate, through the stubs' control interfaces and the portal's pages: residents scan their
passes at the gate and the entrances and walk through, a visitor comes with a pass from the owner's phone, a door
is held open too long now and then, the indoor panel reports a burglary and, rarely, a fire, an intruder crosses
the perimeter, the elder's panel reports that nobody has moved (a care alert) and she answers "我很好" on her phone,
and the guard's phone walks the patrol route each round (leaving a checkpoint out now and then). Each act prints
one short line in Chinese and English."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.demo.estate import BEAM, CHECKPOINTS, DOORS, ELDER, ELDER_PANEL, SITE, ZONES, Door
from gateway.demo.people import (
    Browser,
    DemoError,
    Resident,
    guard_scan,
    im_fine,
    issue_visitor_pass,
    residents,
)
from gateway.wire.passes import PassFields, load_private_key, sign_pass

log = logging.getLogger("gatehouse.demo")

RESIDENT_PASS_LIFE_S = 60  # as the portal's phone page makes them
HELD_OPEN_S = 8  # the gateway config's held_open_s of every demo door
SENIOR_WATCH = 641  # Contact ID: the panel's inactivity timer ran out
ROUND_S = 600  # the patrol route's rounds: every 10 minutes (estate.PATROL_ROUTE)


@dataclass
class Duties:
    """The guard's phone and the checkpoints' plate addresses in the route's order; the elder's phone and her flat's
    plate path."""

    guard: Browser
    checkpoints: list[str]
    elder: Browser
    elder_plate: str


@dataclass
class Stubs:
    """The control addresses of the simulated hardware."""

    perimeter: str
    board: str
    doors: str
    readers: str
    indoor: str


def say(zh: str, en: str) -> None:
    print(f"  · {zh}  /  {en}", flush=True)


class Life:
    def __init__(
        self,
        stubs: Stubs,
        key_file: Path,
        db: Path,
        owner: Browser,
        plate_path: str,
        every: float,
        duties: Duties,
        visitor_pass: Callable[[int], Awaitable[str | None]],
        rng: random.Random | None = None,
    ) -> None:
        self.stubs, self.key_file, self.db, self.duties = stubs, key_file, db, duties
        self.visitor_pass = visitor_pass  # a resident's latest visitor pass (people.latest_visitor_pass)
        self.owner, self.plate_path = owner, plate_path
        self.every = every
        self.rng = rng or random.Random()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def close(self) -> None:
        await self.http.close()

    async def post(self, base: str, path: str, body: dict[str, Any] | None = None) -> int:
        async with self.http.post(base + path, json=body or {}) as r:
            return r.status

    # ------------------------------------------------------------ the loops

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._loop(stop, self.intruder, self.every, first=self.every / 2), name="demo.intruder")
            tg.create_task(self._loop(stop, self.resident_walks, self.every / 3, first=1), name="demo.residents")
            tg.create_task(self._loop(stop, self.visitor, self.every * 4, first=self.every), name="demo.visitor")
            tg.create_task(self._loop(stop, self.indoor, self.every * 3, first=self.every * 1.5), name="demo.indoor")
            tg.create_task(
                self._loop(stop, self.held_open, self.every * 5, first=self.every * 2), name="demo.held-open"
            )
            tg.create_task(self._loop(stop, self.elder_quiet, self.every * 8, first=self.every), name="demo.care")
            tg.create_task(self.patrols(stop), name="demo.patrol")

    async def _loop(self, stop: asyncio.Event, act: Callable[[], Awaitable[None]], every: float, first: float) -> None:
        wait = first
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                return
            try:
                await act()
            except (aiohttp.ClientError, OSError, TimeoutError, sqlite3.Error, DemoError) as e:
                log.warning("the demo's %s did not happen: %s", act.__name__, e)
            wait = every * self.rng.uniform(0.5, 1.5)

    # ------------------------------------------------------------ acts

    async def intruder(self) -> None:
        """Cross a fence zone, or the beam, and leave a few seconds later."""
        if self.rng.random() < 0.25:
            await self.post(self.stubs.board, "/inputs/1", {"active": True})
            print(f"[intruder] crossing the beam ({BEAM[1]})", flush=True)
            await asyncio.sleep(3)
            await self.post(self.stubs.board, "/inputs/1", {"active": False})
            return
        zone = self.rng.randint(1, len(ZONES))
        await self.post(self.stubs.perimeter, f"/zones/{zone}/trip")
        print(f"[intruder] crossing zone {zone} ({ZONES[zone - 1][1]})", flush=True)
        await asyncio.sleep(3)
        await self.post(self.stubs.perimeter, f"/zones/{zone}/restore")

    def resident_pass(self, r: Resident) -> str:
        """The resident's own QR, as their phone shows it: signed with the portal's key, valid for a minute."""
        now = int(time.time())
        fields = PassFields(
            kind="resident",
            site=SITE,
            subject=r.subject,
            house=r.house_ref,
            units=(r.unit_ref,),
            gates=True,
            not_before=now,
            not_after=now + RESIDENT_PASS_LIFE_S,
            uses=1,
        )
        return sign_pass(load_private_key(self.key_file), fields)

    @staticmethod
    def doors_of(r: Resident) -> list[Door]:
        return [d for d in DOORS if d.gate or (d.building, d.unit) == (r.building, r.unit)]

    async def scan(self, door: Door, text: str) -> None:
        """A code held to the door's reader; the person pushes the door once the lock lets go."""
        await self.post(self.stubs.readers, "/scan", {"text": text, "reader": door.reader})
        await asyncio.sleep(0.8)
        await self.post(self.stubs.doors, "/open", {"unit": door.unit_id, "close_after_ms": 2500})

    async def resident_walks(self) -> None:
        people = await asyncio.to_thread(residents, self.db)
        if not people:
            return
        r = self.rng.choice(people)
        door = self.rng.choice(self.doors_of(r))
        say(f"{r.name}在{door.label}扫码", f"{r.name} scans a pass at {door.name}")
        await self.scan(door, await asyncio.to_thread(self.resident_pass, r))

    async def visitor(self) -> None:
        """The owner issues a visitor pass on the phone; the visitor scans it at the gate, then at the entrance."""
        if not await issue_visitor_pass(self.owner, self.plate_path):
            log.warning("the owner's phone could not issue a visitor pass")
            return
        people = await asyncio.to_thread(residents, self.db)
        owner = next((r for r in people if r.role == "owner"), None)
        text = await self.visitor_pass(owner.id) if owner else None
        if owner is None or text is None:
            return
        route = self.doors_of(owner)
        say(f"访客持{owner.name}发的通行码到访", f"a visitor arrives with a pass from {owner.name}")
        for door in route:
            await self.scan(door, text)
            await asyncio.sleep(2)

    async def held_open(self) -> None:
        """A removal man wedges a door open after a resident's scan; the gateway reports it held open."""
        people = await asyncio.to_thread(residents, self.db)
        r = self.rng.choice(people) if people else None
        if r is None:
            return
        door = self.rng.choice(self.doors_of(r))
        await self.post(
            self.stubs.readers, "/scan", {"text": await asyncio.to_thread(self.resident_pass, r), "reader": door.reader}
        )
        await asyncio.sleep(0.8)
        await self.post(self.stubs.doors, "/hold", {"unit": door.unit_id, "on": True})
        say(f"{door.label}被撑开未关", f"{door.name} is wedged open")
        await asyncio.sleep(HELD_OPEN_S + 4)
        await self.post(self.stubs.doors, "/hold", {"unit": door.unit_id, "on": False})

    async def indoor(self) -> None:
        """The flat's panel reports a burglary (its door sensor) and, rarely, a fire (a smoke detector)."""
        if self.rng.random() < 0.15:
            await self.post(self.stubs.indoor, "/alarm/fire", {"zone": 2})
            say("1幢1单元101室烟感报警", "a smoke detector in 1-1-101 reports a fire")
        else:
            await self.post(self.stubs.indoor, "/alarm/burglary", {"zone": 1})
            say("1幢1单元101室入侵报警", "the panel in 1-1-101 reports a burglary")

    async def elder_quiet(self) -> None:
        """The elder's panel has seen nobody move for too long (its senior-watch timer, Contact ID 641): a care alert
        rings on the console and goes up to the grid platform; a little later she answers "我很好" on her phone."""
        await self.post(
            self.stubs.indoor,
            "/event",
            {"code": SENIOR_WATCH, "qualifier": "new", "zone": 0, "account": ELDER_PANEL[1]},
        )
        say(
            f"{ELDER.name}家室内无人活动（关爱提醒）",
            f"no one has moved in {ELDER.name}'s flat for a while (care alert)",
        )
        await asyncio.sleep(max(20.0, self.every * 2))
        if await im_fine(self.duties.elder, self.duties.elder_plate):
            say(f"{ELDER.name}在手机上按了“我很好”", f"{ELDER.name} presses 我很好 (I am fine) on her phone")

    async def walk_route(self, skip: int | None) -> None:
        """The guard walks the route, scanning each checkpoint's plate (all but ``skip``)."""
        for i, url in enumerate(self.duties.checkpoints):
            if i == skip:
                say(f"保安漏巡{CHECKPOINTS[i][0]}", f"the guard skips the checkpoint {CHECKPOINTS[i][0]}")
                continue
            if await guard_scan(self.duties.guard, url):
                say(f"保安在{CHECKPOINTS[i][0]}打卡", f"the guard scans the checkpoint {CHECKPOINTS[i][0]}")
            await asyncio.sleep(min(self.every, 30.0))

    async def patrols(self, stop: asyncio.Event) -> None:
        """A walk at once (outside a round until the first begins), then one per round; about every third round the
        guard leaves one checkpoint out, and the console rings when its time is up."""
        wait = 1.0
        first = True
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                return
            skip = None if first or self.rng.random() > 0.35 else self.rng.randrange(len(self.duties.checkpoints))
            first = False
            try:
                await self.walk_route(skip)
            except (aiohttp.ClientError, OSError, TimeoutError, DemoError) as e:
                log.warning("the demo's patrol did not happen: %s", e)
            wait = ROUND_S - time.time() % ROUND_S + 15  # rounds begin on the 10 minutes (site-local, whole hours)
