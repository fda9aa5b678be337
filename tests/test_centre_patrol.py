"""Guard patrols on a monitoring centre: two portal instances on one PostgreSQL, a guard's phone and the office behind
a balancer with no sticky sessions (each request to whichever instance), their clocks in the test's hand.

As the outsider: the instance the office saved the route at dies before the round is due, and the round must still
ring, once, from the other; both instances tick the same round at once; the guard's phone opens a checkpoint's page
at one instance and confirms at the other, and a recorded confirmation is sent again to each (or to both at once);
someone tries codes that are no plate, spread over both instances; a checkpoint placed on the map at one instance
must show on the other's consoles.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from portal.alarms import incidents as alarms
from portal.patrol import model as patrol_model
from portal.patrol.engine import CHANGED, TICK_S
from portal.patrol.views import BAD_CODES_PER_10MIN
from portal.store import Notice, Postgres
from tests.care_patrol_support import GUARD, GUARD_PW, TimeMachine, board
from tests.portal_support import Portal, add_user, running_portal, write_config
from tests.registry_support import admin_session
from tests.test_patrol import EXTRA, MIN, add_checkpoint, add_route, at_local, engine, post
from tests.waiting import wait_for

#: a tick is due every TICK_S on every instance: what a test waits for it (a busy 2-core machine included)
TICKED_S = 10 * TICK_S + 5


def _config(folder: Path, target: Postgres, key_file: Path | None) -> Path:
    store = f"store: {{backend: postgresql, dsn: '{target.dsn}', passfile: {target.passfile}" + (
        f", key_file: {key_file}}}\n" if key_file else "}\n"
    )
    return write_config(folder, None, extra=EXTRA + store)


@contextlib.asynccontextmanager
async def centre(tmp_path: Path, target: Postgres, clock: TimeMachine) -> AsyncIterator[tuple[Portal, Any]]:
    """Instance A (signed in as the office, with a guard account) and a way to start B on the same store and key;
    yields A and an exit stack that holds B (so a test may stop A first)."""
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(running_portal(_config(tmp_path / "a", target, None), clock.options()))
        a.csrf = await admin_session(a)
        await add_user(a, GUARD, "guard", GUARD_PW)
        yield a, stack


async def second(tmp_path: Path, target: Postgres, clock: TimeMachine, a: Portal, stack: Any) -> Portal:
    key = tmp_path / "b" / "store.key"  # every instance holds the same store key
    key.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(a.services.cfg.key_path), key)
    key.chmod(0o600)
    b: Portal = await stack.enter_async_context(
        running_portal(_config(tmp_path / "b", target, key), clock.options(), last=False)
    )
    return b


@dataclass
class Phone:
    """A guard's phone behind the balancer: one cookie jar, each request sent to the instance the test names."""

    http: aiohttp.ClientSession
    csrf: str

    @classmethod
    async def sign_in(cls, p: Portal) -> Phone:
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        page = await (await http.get(p.origin + "/login")).text()
        m = re.search(r'name="csrf" value="([^"]+)"', page)
        assert m
        r = await http.post(
            p.origin + "/login",
            data={"user": GUARD, "password": GUARD_PW, "csrf": m.group(1), "next": "/console"},
            headers={"Origin": p.origin},
            allow_redirects=False,
        )
        assert r.status == 303, (r.status, await r.text())
        page = await (await http.get(p.origin + "/console")).text()
        m = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
        assert m
        return cls(http, m.group(1))

    async def open(self, p: Portal, code: str) -> str:
        """The checkpoint's page at ``p``; its one-time token."""
        r = await self.http.get(f"{p.origin}/g/c/{code}")
        m = re.search(r'name="nonce" value="([^"]+)"', await r.text())
        assert r.status == 200 and m, r.status
        return m.group(1)

    async def confirm(self, p: Portal, code: str, token: str) -> tuple[int, str]:
        r = await self.http.post(
            f"{p.origin}/g/c/{code}",
            data={"csrf": self.csrf, "nonce": token},
            headers={"Origin": p.origin},
            allow_redirects=False,
        )
        return r.status, await r.text()


async def patrol_alerts(p: Portal) -> list[str]:
    """The types of every patrol alert stored, in order, whichever instance raised it."""
    rows = await p.services.store.read(
        lambda c: c.execute("SELECT type FROM events WHERE type LIKE 'patrol.%' ORDER BY pk").fetchall()
    )
    return [str(r[0]) for r in rows]


async def patrol_incidents(p: Portal) -> list[dict[str, Any]]:
    await board(p).feed_now()
    return [i for i in await p.services.store.read(alarms.open_incidents) if i["kind"] == "patrol"]


# ---------------------------------------------------------------- rounds


@pytest.mark.realtime  # the instances' own ticks (every TICK_S of real time) are what is tested
async def test_a_round_saved_at_one_instance_rings_from_the_other_after_it_died(
    tmp_path: Path, pg_target: Postgres
) -> None:
    clock = TimeMachine(wall_s=at_local(21, 58))
    async with centre(tmp_path, pg_target, clock) as (a, stack):
        b = await second(tmp_path, pg_target, clock, a, stack)
        assert engine(b).next_at is None  # B started with no route to watch
        gate = await add_checkpoint(a, "A北门")
        await add_route(a, [gate])  # saved through A: only A was told, in-process
        await wait_for(lambda: engine(b).next_at is not None, TICKED_S, "B to learn of the route A saved")
        await a.client.close()  # A dies before the first round
        clock.step(33 * MIN)  # 22:31: the 22:00 round's window is over, nobody scanned

        async def rung(kind: str) -> list[dict[str, Any]]:
            return [i for i in await patrol_incidents(b) if i["type"] == kind]

        (overdue,) = await wait_for(lambda: rung("patrol.overdue"), TICKED_S, "B to raise patrol.overdue")
        clock.step(30 * MIN)  # 23:01: the allowance is over too
        (missed,) = await wait_for(lambda: rung("patrol.missed"), TICKED_S, "B to raise patrol.missed")
        assert missed["id"] == overdue["id"] and missed["data"]["checkpoints"] == ["A北门"]
        await asyncio.sleep(3 * TICK_S)  # more of B's ticks raise nothing again
        assert await patrol_alerts(b) == ["patrol.overdue", "patrol.missed"]


@pytest.mark.realtime
async def test_two_instances_ticking_the_same_round_at_once_raise_it_once(
    tmp_path: Path, pg_target: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = TimeMachine(wall_s=at_local(21, 58))
    async with centre(tmp_path, pg_target, clock) as (a, stack):
        b = await second(tmp_path, pg_target, clock, a, stack)
        gate = await add_checkpoint(a, "A北门")
        garage = await add_checkpoint(a, "B车库")
        heard = b.services.store.peer_committed  # A's notices lost (B was not listening): B reads the store itself
        monkeypatch.setattr(
            b.services.store,
            "peer_committed",
            lambda got: heard([(op, x) for op, x in got if not isinstance(x, Notice)]),
        )
        await add_route(a, [gate, garage])
        await wait_for(lambda: engine(b).next_at is not None, TICKED_S, "B to learn of the route A saved")
        clock.step(33 * MIN)
        # both instances' own loops, and four explicit ticks at once besides, two on each
        await asyncio.gather(*(engine(p).tick_now() for p in (a, b, a, b)))
        await asyncio.sleep(3 * TICK_S)
        clock.step(30 * MIN)
        await asyncio.gather(*(engine(p).tick_now() for p in (b, a, b, a)))
        await asyncio.sleep(3 * TICK_S)
        assert await patrol_alerts(a) == ["patrol.overdue", "patrol.missed"]
        (inc,) = await patrol_incidents(b)
        assert inc["type"] == "patrol.missed" and inc["count"] == 2


# ---------------------------------------------------------------- the map


async def test_a_checkpoint_placed_at_one_instance_shows_on_the_others_map(tmp_path: Path, pg_target: Postgres) -> None:
    clock = TimeMachine()
    async with centre(tmp_path, pg_target, clock) as (a, stack):
        b = await second(tmp_path, pg_target, clock, a, stack)
        gate = await add_checkpoint(a, "北门岗亭")
        phone = await Phone.sign_in(b)  # a guard's console on B
        try:
            r = await post(a, f"/patrol/checkpoints/{gate.id}", {"action": "place", "x": "20", "y": "280"})
            assert r.status == 303

            async def shown() -> bool:
                svg = await (await phone.http.get(f"{b.origin}/board/map?site=s1")).text()
                return f'data-marker="cp:{gate.id}"' in svg and "北门岗亭" in svg

            await wait_for(shown, 10, "the checkpoint on B's map")
            r = await post(a, f"/patrol/checkpoints/{gate.id}", {"action": "withdraw"})
            assert r.status == 303

            async def gone() -> bool:
                return not await shown()

            await wait_for(gone, 10, "the withdrawn checkpoint gone from B's map")
        finally:
            await phone.http.close()


async def test_a_checkpoint_placed_while_the_other_was_not_listening_shows_once_it_listens_again(
    tmp_path: Path, pg_target: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = TimeMachine()
    async with centre(tmp_path, pg_target, clock) as (a, stack):
        b = await second(tmp_path, pg_target, clock, a, stack)
        gate = await add_checkpoint(a, "北门岗亭")
        # B has heard of the new checkpoint and read the markers again (or that read, late on a loaded machine,
        # would find the place made below and show it: no lost notice then)
        await asyncio.sleep(3 * TICK_S)
        await wait_for(lambda: not engine(b)._stale, 10, "B done with the checkpoint's notice")
        heard = b.services.store.peer_committed  # A's notice lost on its way to B
        monkeypatch.setattr(b.services.store, "peer_committed", lambda got: heard([x for x in got if x[1] != CHANGED]))
        r = await post(a, f"/patrol/checkpoints/{gate.id}", {"action": "place", "x": "20", "y": "280"})
        assert r.status == 303

        def on_bs_map() -> bool:
            return any(m.key == f"cp:{gate.id}" for m in engine(b).markers.get("s1", []))

        await asyncio.sleep(3 * TICK_S)
        assert not on_bs_map()
        # B's listening connection breaks (as in a fail-over) and comes back: what it may have missed, it reads again
        await a.services.store.read(
            lambda c: c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query = 'LISTEN gatehouse_peers' AND pid <> pg_backend_pid()"
            ).fetchall()
        )
        await wait_for(on_bs_map, 10, "the checkpoint on B's map once B listens again")


# ---------------------------------------------------------------- scanning behind the balancer


async def test_a_scan_page_opened_at_one_instance_is_confirmed_at_the_other_once(
    tmp_path: Path, pg_target: Postgres
) -> None:
    clock = TimeMachine(wall_s=at_local(21, 58))
    async with centre(tmp_path, pg_target, clock) as (a, stack):
        b = await second(tmp_path, pg_target, clock, a, stack)
        gate = await add_checkpoint(a, "A北门")
        garage = await add_checkpoint(a, "B车库")
        await add_route(a, [gate, garage], ordered="")
        clock.step(7 * MIN)  # 22:05: the first round is under way
        phone = await Phone.sign_in(a)
        try:
            token = await phone.open(a, gate.code)
            status, _ = await phone.confirm(b, gate.code, token)
            assert status == 303  # the page came from A, the confirmation went to B
            for p in (b, a):  # the recorded request sent again, to either instance
                status, html = await phone.confirm(p, gate.code, token)
                assert status == 409 and 'data-problem="patrol.refused.replayed"' in html
            # one token confirmed at both instances at once: one scan
            token = await phone.open(b, garage.code)
            got = await asyncio.gather(*(phone.confirm(p, garage.code, token) for p in (a, b)))
            assert sorted(s for s, _ in got) == [303, 409]

            def stored(c: Any) -> tuple[list[str], list[str], int]:
                scans = [r[0] for r in c.execute("SELECT outcome FROM patrol_scans ORDER BY id")]
                refused = [
                    r[0].split(":")[0]
                    for r in c.execute("SELECT detail FROM audit WHERE action = 'patrol.refused' ORDER BY id")
                ]
                return scans, refused, c.execute("SELECT count(*) FROM patrol_tokens").fetchone()[0]

            assert await a.services.store.read(stored) == (["counted", "counted"], ["replayed"] * 3, 0)
            # the store holds a token's hash, never the token; a page left open past its life is gone at the next
            held = await phone.open(a, gate.code)
            rows = await a.services.store.read(lambda c: c.execute("SELECT token_hash FROM patrol_tokens").fetchall())
            assert [r[0] for r in rows] == [patrol_model.token_hash(held)] and held not in rows[0][0]
            clock.step(11 * MIN)
            await phone.open(b, gate.code)
            assert (await a.services.store.read(stored))[2] == 1
            status, html = await phone.confirm(b, gate.code, held)
            assert status == 409 and "patrol.refused.replayed" in html  # expired and deleted: unknown now
        finally:
            await phone.http.close()


async def test_codes_that_are_no_plate_are_throttled_across_both_instances(tmp_path: Path, pg_target: Postgres) -> None:
    clock = TimeMachine()
    async with centre(tmp_path, pg_target, clock) as (a, stack):
        b = await second(tmp_path, pg_target, clock, a, stack)
        gate = await add_checkpoint(a, "A北门")
        phone = await Phone.sign_in(a)
        try:
            for n in range(BAD_CODES_PER_10MIN):  # the limit's worth, half at each instance
                r = await phone.http.get(f"{(a, b)[n % 2].origin}/g/c/{'A' * 22}{n:02d}")
                assert r.status == 404 and "patrol.unknown_code" in await r.text()
            for p in (a, b):  # this address tried too many: at every instance, even a good plate waits
                assert (await phone.http.get(f"{p.origin}/g/c/{gate.code}")).status == 429
            clock.step(600 / BAD_CODES_PER_10MIN + 1)  # one try back
            assert (await phone.http.get(f"{b.origin}/g/c/{gate.code}")).status == 200
        finally:
            await phone.http.close()
