"""Pages of a monitoring centre that any instance may serve: two portal instances on one PostgreSQL (in-process), one
browser whose requests go through either, as behind a balancer with no sticky sessions. A password reset made through
one shows its one-time password on the page the next instance serves; a door ordered open through one is listed by
the other's door page and API, and one left pending by an instance that went away shows timed out."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from gateway.tooling.broker import MosquittoProcess
from portal.doors.doors import BOARD as DOOR_BOARD
from portal.store import Postgres
from tests.centre_support import in_process_config
from tests.portal_support import add_user, batch_payload, csrf_of, running_portal, wait_for
from tests.test_alarm_board import EVENTS_TOPIC, ev

ADMIN, ADMIN_PW = "boss", "boss-password-000001"
FITTER = "fitter"
ONE_TIME = re.compile(r'id="one-time-password">([0-9a-f-]+)<')


async def test_a_reset_and_an_unlock_made_through_one_instance_show_through_the_other(
    tmp_path: Path, pg_target: Postgres, broker: MosquittoProcess
) -> None:
    async with running_portal(in_process_config(tmp_path / "a", pg_target, broker=broker), last=False) as pa:
        cfg_b = in_process_config(tmp_path / "b", pg_target, pa, broker)
        async with running_portal(cfg_b) as pb:
            await add_user(pa, ADMIN, "admin", ADMIN_PW)
            await add_user(pa, FITTER, "installer", "fitter-password-00001")
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                a, b = pa.origin, pb.origin
                page = await (await http.get(a + "/login")).text()
                r = await http.post(
                    a + "/login",
                    data={"user": ADMIN, "password": ADMIN_PW, "csrf": csrf_of(page)},
                    headers={"Origin": a},
                    allow_redirects=False,
                )
                assert r.status == 303

                # The reset is posted to A; the page it redirects to is served by B: the one-time password is there,
                # once, and it signs the fitter in.
                csrf = csrf_of(await (await http.get(a + f"/users/{FITTER}")).text())
                r = await http.post(
                    a + f"/users/{FITTER}/password",
                    data={"confirmed": "yes", "csrf": csrf},
                    headers={"Origin": a},
                    allow_redirects=False,
                )
                assert r.status == 303
                shown = ONE_TIME.search(await (await http.get(b + r.headers["Location"])).text())
                assert shown, "B did not show the one-time password"
                assert not ONE_TIME.search(await (await http.get(b + r.headers["Location"])).text())  # once
                assert not ONE_TIME.search(await (await http.get(a + r.headers["Location"])).text())
                async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as fitter:
                    page = await (await fitter.get(b + "/login")).text()
                    r = await fitter.post(
                        b + "/login",
                        data={"user": FITTER, "password": shown.group(1), "csrf": csrf_of(page)},
                        headers={"Origin": b},
                        allow_redirects=False,
                    )
                    assert r.status == 303 and r.headers["Location"] == "/password"

                # A door ordered open through A is on B's list; with no answer, it shows timed out on both.
                door = ev(1, "door.state", prio=0, data={"state": "closed", "door": "b3u2"}, place={"door": "b3u2"})
                await pa.services.ingest.handle(EVENTS_TOPIC, batch_payload([door]))
                await pa.services.store.flush()

                async def b_knows_the_door() -> bool:
                    doors = (await (await http.get(b + "/api/doors")).json())["doors"]
                    return any(d["door"] == "b3u2" for d in doors)

                await wait_for(b_knows_the_door, timeout=5, what="B knows the door")
                await wait_for(lambda: pa.services.ingest.connected, what="A connected to the broker")
                token = re.search(r'name="csrf-token" content="([^"]+)"', await (await http.get(a + "/doors")).text())
                assert token
                r = await http.post(
                    a + "/api/doors/s1/b3u2/unlock",
                    json={"reason": "住户忘带钥匙"},
                    headers={"Origin": a, "X-CSRF-Token": token.group(1)},
                )
                assert r.status == 202, await r.text()
                cid = (await r.json())["command"]["id"]
                listed = (await (await http.get(b + "/api/doors/commands")).json())["commands"]
                assert [(c["id"], c["status"]) for c in listed] == [(cid, "pending")]
                assert cid in await (await http.get(b + "/doors")).text()
                pa.client.app[DOOR_BOARD].close()  # A's own timer will not say it: B must, from the store alone
                wait_s = pb.services.cfg.doors.unlock_wait_s

                async def timed_out_at_b() -> bool:
                    listed = (await (await http.get(b + "/api/doors/commands")).json())["commands"]
                    return [(c["id"], c["status"]) for c in listed] == [(cid, "timeout")]

                await wait_for(timed_out_at_b, timeout=wait_s + 5, what="B shows the unlock timed out")
