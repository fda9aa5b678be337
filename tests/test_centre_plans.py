"""Site plans in a monitoring centre: two portal instances on one PostgreSQL (in-process). A plan drawn, a picture
uploaded or a mark moved through one instance shows on the maps of the guards whose consoles reach the other, within
a second, as on one portal (each instance keeps the plans in memory: the change is told with its commit)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import aiohttp
from PIL import Image

from portal.store import Postgres
from tests.care_patrol_support import GUARD, GUARD_PW, estate_with_staff, staff_browser
from tests.centre_support import in_process_config
from tests.portal_support import SITE, Portal, running_portal, wait_for


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 220, 200)).save(out, "PNG")
    return out.getvalue()


async def post(p: Portal, path: str, body: aiohttp.FormData | dict[str, str]) -> None:
    if isinstance(body, dict):
        body = {**body, "csrf": p.csrf}
    else:
        body.add_field("csrf", p.csrf)
    r = await p.client.post(path, data=body, headers={"Origin": p.origin}, allow_redirects=False)
    assert r.status == 303, (r.status, await r.text())


async def test_a_plan_changed_through_one_instance_shows_on_the_others_maps(
    tmp_path: Path, pg_target: Postgres
) -> None:
    async with running_portal(in_process_config(tmp_path / "a", pg_target), last=False) as pa:
        await estate_with_staff(pa)  # the office signed in at A
        async with running_portal(in_process_config(tmp_path / "b", pg_target, pa)) as pb:
            guard, _ = await staff_browser(pb, GUARD, GUARD_PW)  # a guard whose console reaches B
            try:

                async def map_at_b() -> str:
                    r = await guard.get("/board/map")
                    assert r.status == 200
                    return await r.text()

                async def b_shows(text: str) -> str | None:
                    page = await map_at_b()
                    return page if text in page else None

                assert 'data-zone="fence-east"' not in await map_at_b()

                # the office uploads the plan's picture through A
                form = aiohttp.FormData()
                form.add_field("image", png(640, 480), filename="plan.png", content_type="image/png")
                await post(pa, f"/admin/sitemap/{SITE}/image", form)
                picture = f'href="/board/plan/{SITE}/image?v='
                await wait_for(lambda: b_shows(picture), timeout=2, what="B shows the picture uploaded at A")
                r = await guard.get(f"/board/plan/{SITE}/image")
                assert r.status == 200 and r.content_type == "image/png"

                # places a fence zone on it, then moves it
                mark = {"kind": "zone", "name": "fence-east", "label": "东侧围栏"}
                await post(pa, f"/admin/sitemap/{SITE}/marks", {**mark, "points": "10,10 300,10"})
                await wait_for(lambda: b_shows('points="10,10 300,10"'), timeout=2, what="B shows the zone placed at A")
                await post(pa, f"/admin/sitemap/{SITE}/marks", {**mark, "points": "20,400 600,400"})
                page = await wait_for(
                    lambda: b_shows('points="20,400 600,400"'), timeout=2, what="B shows the zone moved at A"
                )
                assert "东侧围栏" in page and 'points="10,10 300,10"' not in page
                assert len(re.findall(r'data-zone="fence-east"', page)) == 1
            finally:
                await guard.close()
