"""Escalation notices of a monitoring centre: two portal instances on one PostgreSQL (in-process) must send each
notice as one portal would, whichever of them began it and whichever of them is still there.

As the adversary: an instance that starts while another's attempt is in flight (the robot must get one message,
not two); an instance that stops after a failed attempt with its retry still to come (the other, running all
along, must send it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from portal.alarms import notify
from portal.alarms.board import BOARD, AlarmBoard
from portal.app import Options
from portal.store import Postgres
from tests.centre_support import in_process_config
from tests.portal_support import Portal, batch_payload, running_portal
from tests.test_alarm_board import EVENTS_TOPIC, ZONE, FakeClock, ev
from tests.test_notify import Receiver, receivers, secret
from tests.waiting import wait_for

SWEEP_S = 0.5  # the notifier's sweep, shortened so the tests wait seconds, not tens of seconds


class SlowRobot(Receiver):
    """A WeCom robot that answers each message after ``delay`` seconds."""

    def __init__(self, answers: list[Any], delay: float) -> None:
        super().__init__(answers)
        self.delay = delay

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(self.delay)
        return await super().handle(request)


def config(folder: Path, target: Postgres, robot_url: str, first: Portal | None, retry_s: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    extra = f"""alarms: {{escalate_after_s: 60, priority_escalate_after_s: 15, check_every_s: 30}}
notify:
  attempts: 5
  retry_first_s: {retry_s}
  retry_max_s: {retry_s}
  timeout_s: 5
  channels:
    - {{name: duty-wecom, kind: wecom, label: 值班主管群, url_file: {secret(folder, "wecom.url", robot_url)}}}
"""
    return in_process_config(folder, target, first, extra=extra)


async def escalate(p: Portal, mono: FakeClock) -> int:
    """A fence alarm at ``p`` that nobody acknowledges: escalated by ``p``, whose notifier begins the notice."""
    board: AlarmBoard = p.client.app[BOARD]
    await p.services.ingest.handle(EVENTS_TOPIC, batch_payload([ev(1, "zone.alarm", incident="Z", data=ZONE)]))
    await p.services.store.flush()
    await board.feed_now()
    mono.t += 61
    (inc,) = await board.check_escalations()
    return int(inc["id"])


async def delivery(p: Portal) -> dict[str, Any]:
    (row,) = await p.services.store.read(lambda c: [dict(r) for r in c.execute("SELECT * FROM notifications")])
    return row


async def test_an_instance_starting_while_another_sends_a_notice_does_not_send_it_again(
    tmp_path: Path, pg_target: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notify, "SWEEP_S", SWEEP_S, raising=False)
    robot = SlowRobot([{"errcode": 0, "errmsg": "ok"}], delay=1.5)
    async with receivers(wecom=robot) as port:
        url = f"http://127.0.0.1:{port}/wecom?key=k"
        mono = FakeClock()
        cfg_a = config(tmp_path / "a", pg_target, url, None, 0.1)
        async with running_portal(cfg_a, Options(monotonic=mono), last=False) as pa:
            await escalate(pa, mono)
            await asyncio.sleep(0.5)  # A's attempt is with the robot, which has not answered yet
            assert (await delivery(pa))["state"] == "pending"
            # B (re)starts now: it takes up pending notices, but not one another living instance holds
            cfg_b = config(tmp_path / "b", pg_target, url, pa, 0.1)
            async with running_portal(cfg_b, Options(monotonic=FakeClock())) as pb:
                row = await wait_for(
                    lambda: _state(pb, "delivered"), 10, "the notice delivered", context=lambda: str(robot.got)
                )
                await asyncio.sleep(robot.delay + 4 * SWEEP_S)  # room for a second message, were one sent
                assert len(robot.got) == 1, robot.got
                assert row["attempts"] == 1
                assert row["owner"] == pa.client.app[BOARD].notifier.me


async def _state(p: Portal, state: str) -> dict[str, Any] | None:
    row = await delivery(p)
    return row if row["state"] == state else None


async def test_a_notice_whose_instance_stopped_before_its_retry_is_sent_by_the_instance_still_running(
    tmp_path: Path, pg_target: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notify, "SWEEP_S", SWEEP_S, raising=False)
    robot = Receiver([500, {"errcode": 0, "errmsg": "ok"}])
    retry_s = 3.0
    async with receivers(wecom=robot) as port:
        url = f"http://127.0.0.1:{port}/wecom?key=k"
        cfg_b = config(tmp_path / "b", pg_target, url, None, retry_s)
        async with running_portal(cfg_b, Options(monotonic=FakeClock())) as pb:  # B runs all along
            mono = FakeClock()
            cfg_a = config(tmp_path / "a", pg_target, url, pb, retry_s)
            async with running_portal(cfg_a, Options(monotonic=mono), last=False) as pa:
                await escalate(pa, mono)
                row = await wait_for(lambda: _attempted(pa), 5, "A's first attempt")
                assert row["state"] == "pending" and "HTTP 500" in row["last_error"]
            # A is gone, its retry (due within retry_s) with it; B sends it once the retry is due
            row = await wait_for(
                lambda: _state(pb, "delivered"),
                retry_s + SWEEP_S + 3,
                "the notice delivered by B",
                context=lambda: str(robot.got),
            )
            assert len(robot.got) == 2 and row["attempts"] == 2
            assert row["owner"] == pb.client.app[BOARD].notifier.me


async def _attempted(p: Portal) -> dict[str, Any] | None:
    row = await delivery(p)
    return row if row["attempts"] >= 1 else None
