"""The care watch of a monitoring centre: two portal instances on one PostgreSQL (in-process, the portals' clocks in
the test's hand) must watch each household as one portal would.

As the adversary: a resident who checks in ("我很好") through one instance seconds before the other instance's clock
comes due (no guard is sent); both instances' clocks coming due together (one alert, not two); a household enrolled
through an instance that then goes away (the other still rings when its time is up).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from portal.store import Postgres
from tests.care_patrol_support import TimeMachine, estate_with_staff, person, resident_browser
from tests.centre_support import in_process_config
from tests.portal_support import Portal, running_portal
from tests.registry_support import plate_code
from tests.test_care import HOUR, ZHANG, enrol, household, incidents, watch


async def no_activity_alerts(p: Portal) -> list[dict[str, object]]:
    return await p.services.store.read(
        lambda c: [dict(r) for r in c.execute("SELECT * FROM care_alerts WHERE rule = 'no_activity' ORDER BY id")]
    )


async def check_in(p: Portal, person_id: int) -> None:
    """The resident presses "我很好" on the flat's plate page, served by ``p``."""
    code = await plate_code(p, "3", "2", "301")
    phone, csrf = await resident_browser(p, person_id)
    try:
        r = await phone.post(
            f"/p/{code}/care/ok", data={"csrf": csrf}, headers={"Origin": p.origin}, allow_redirects=False
        )
        assert r.status == 303 and r.headers["Location"].endswith("?care=ok"), await r.text()
    finally:
        await phone.close()


async def test_a_check_in_at_one_instance_stops_the_others_alarm_and_only_one_instance_raises(
    tmp_path: Path, pg_target: Postgres
) -> None:
    clock = TimeMachine()
    async with running_portal(in_process_config(tmp_path / "a", pg_target), clock.options(), last=False) as pa:
        await estate_with_staff(pa)
        zhang = await person(pa, ZHANG)
        care_id = await enrol(pa, [zhang["id"]], hours=24)
        # B starts (or restarts) after the enrolment: it knows the household, with the same deadline as A
        async with running_portal(in_process_config(tmp_path / "b", pg_target, pa), clock.options()) as pb:
            a, b = watch(pa), watch(pb)
            assert abs((b.remaining(care_id) or 0) - 24 * HOUR) < 1
            clock.step(24 * HOUR - 10)
            assert await a.check_now() == [] and await b.check_now() == []
            # ten seconds before the deadline the resident checks in through A; B hears nothing of it in time
            await check_in(pa, zhang["id"])
            checked_in = (await household(pa, care_id)).watch_from
            clock.step(20)
            await asyncio.gather(a.check_now(), b.check_now())
            assert await incidents(pa, "care") == [] and await no_activity_alerts(pa) == []
            assert abs((b.remaining(care_id) or 0) - (24 * HOUR - 20)) < 1  # B's clock runs from the check-in now
            # a day after the check-in both instances' clocks come due at once: one alert, raised once
            clock.step(24 * HOUR)
            await asyncio.gather(a.check_now(), b.check_now(), a.check_now(), b.check_now())
            (alert,) = await no_activity_alerts(pb)
            assert alert["care_id"] == care_id and json.loads(str(alert["detail"]))["since"] == checked_in
            (inc,) = await incidents(pb, "care")
            assert inc["type"] == "care.no_activity"
            assert await a.check_now() == [] and await b.check_now() == []
            assert len(await no_activity_alerts(pa)) == 1


async def test_an_enrolment_at_one_instance_rings_from_another_when_it_is_gone(
    tmp_path: Path, pg_target: Postgres
) -> None:
    clock = TimeMachine()
    async with running_portal(in_process_config(tmp_path / "a", pg_target), clock.options(), last=False) as pa:
        cfg_b = in_process_config(tmp_path / "b", pg_target, pa)
        async with running_portal(cfg_b, clock.options()) as pb:  # B runs from before the enrolment
            b = watch(pb)
            await estate_with_staff(pa)
            zhang = await person(pa, ZHANG)
            care_id = await enrol(pa, [zhang["id"]], hours=12)  # through A
            await pa.client.close()  # A goes away
            clock.step(12 * HOUR + 60)
            await b.check_now()
            (alert,) = await no_activity_alerts(pb)
            assert alert["care_id"] == care_id
            (inc,) = await incidents(pb, "care")
            assert inc["type"] == "care.no_activity"
