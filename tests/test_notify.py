"""Escalations reach people through real channels: WeCom and DingTalk group robots, an SMS gateway and e-mail,
driven against real receivers on loopback (aiohttp servers speaking the robots' documented webhook JSON, an
aiosmtpd SMTP server), including receivers that fail, time out and answer errcode != 0. The board's label says
what was delivered and when; the supervisor's page lists every delivery.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email import message_from_bytes
from email.header import decode_header, make_header
from pathlib import Path
from typing import Any

from aiohttp import web
from aiosmtpd.controller import Controller

from gateway import wire
from gateway.tooling.broker import free_port
from portal.alarms import incidents as alarms
from portal.alarms.board import BOARD, AlarmBoard
from portal.alarms.notify import dingtalk_sign
from portal.app import Options
from tests.portal_support import add_user, batch_payload, running_portal, sign_in, wait_for, write_config
from tests.test_alarm_board import EVENTS_TOPIC, ZONE, FakeClock, ev

PW = "guard-password-0001"
DING_SECRET = "SEC0123456789abcdef"


class Receiver:
    """One robot or gateway on loopback: answers from a script (per call), keeps what it received."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.got: list[dict[str, Any]] = []
        self.queries: list[dict[str, str]] = []
        self.headers: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.got.append(body)
        self.queries.append(dict(request.query))
        self.headers.append(dict(request.headers))
        answer = self.answers[min(len(self.got), len(self.answers)) - 1]
        if answer == "hang":
            await asyncio.sleep(3)  # past the notifier's 1.5 s timeout
        if isinstance(answer, int):
            return web.Response(status=answer, text="gateway error")
        if isinstance(answer, tuple):  # ("pieces", answer): the body written in two pieces, 50 ms apart
            raw = json.dumps(answer[1]).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = len(raw)
            await resp.prepare(request)
            await resp.write(raw[:9])
            await asyncio.sleep(0.05)
            await resp.write(raw[9:])
            await resp.write_eof()
            return resp
        return web.json_response(answer)


@asynccontextmanager
async def receivers(**routes: Receiver) -> AsyncIterator[int]:
    app = web.Application()
    for name, r in routes.items():
        app.router.add_post(f"/{name}", r.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # aiosmtpd calls it by this name
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def secret(folder: Path, name: str, text: str) -> str:
    p = folder / name
    p.write_text(text)
    p.chmod(0o600)
    return str(p)


async def test_escalations_are_delivered_retried_and_recorded(tmp_path: Path) -> None:
    mono = FakeClock()
    wecom = Receiver([{"errcode": 45009, "errmsg": "api freq out of limit"}, {"errcode": 0, "errmsg": "ok"}])
    ding = Receiver([("pieces", {"errcode": 0, "errmsg": "ok"})])  # an answer that comes in two pieces is read whole
    sms = Receiver([500, "hang", {"code": 0}])
    dead = Receiver([{"errcode": 93000, "errmsg": "invalid webhook url"}])
    box = Mailbox()
    smtp_port = free_port()
    mail = Controller(box, hostname="127.0.0.1", port=smtp_port)
    mail.start()
    try:
        async with receivers(wecom=wecom, ding=ding, sms=sms, dead=dead) as port:
            base = f"http://127.0.0.1:{port}"
            extra = f"""
alarms: {{escalate_after_s: 60, priority_escalate_after_s: 15, check_every_s: 30}}
notify:
  attempts: 3
  retry_first_s: 0.1
  retry_max_s: 0.2
  timeout_s: 1.5
  channels:
    - {{name: duty-wecom, kind: wecom, label: 值班主管群, mentions: ['13800000001'],
       url_file: {secret(tmp_path, "wecom.url", base + "/wecom?key=wecom-key-0001")}}}
    - {{name: duty-ding, kind: dingtalk, label: 钉钉值班群, url_file: {
                secret(tmp_path, "ding.url", base + "/ding?access_token=ding-token-0001")
            }, secret_file: {secret(tmp_path, "ding.secret", DING_SECRET)}}}
    - {{name: sms, kind: sms, label: 经理短信, to: ['13900000002'], min_priority: 40,
       url_file: {secret(tmp_path, "sms.url", base + "/sms")}, token_file: {secret(tmp_path, "sms.token", "tok-9")}}}
    - {{name: broken-robot, kind: wecom, url_file: {secret(tmp_path, "dead.url", base + "/dead?key=x")}}}
    - {{name: mail, kind: email, label: 主管邮箱, smtp_host: 127.0.0.1, smtp_port: {smtp_port},
       smtp_security: none, sender: alarm@estate.example, to: [boss@estate.example]}}
"""
            async with running_portal(write_config(tmp_path, None, extra=extra), Options(monotonic=mono)) as p:
                board: AlarmBoard = p.client.app[BOARD]
                # A fence alarm (intrusion) and a fire, nobody acknowledging either.
                await p.services.ingest.handle(
                    EVENTS_TOPIC,
                    batch_payload(
                        [
                            ev(1, "zone.alarm", incident="Z", data=ZONE),
                            ev(
                                2,
                                "panel.alarm",
                                incident="F",
                                prio=wire.Priority.FIRE,
                                data={"kind": "fire", "name_zh": "烟雾火警", "name_en": "Smoke", "code": 111},
                                place={"building": "5", "unit": "1", "house": "1201"},
                            ),
                        ]
                    ),
                )
                await p.services.store.flush()
                await board.feed_now()
                incs = {i["engine_incident"]: i for i in await p.services.store.read(alarms.open_incidents)}
                fence, fire = incs["Z"], incs["F"]
                # Priority alarms escalate sooner: at 15 s only the fire goes out.
                mono.t += 16
                assert [i["id"] for i in await board.check_escalations()] == [fire["id"]]

                def deliveries(iid: int) -> Any:
                    return p.services.store.read(
                        lambda c: {
                            r["channel"]: dict(r)
                            for r in c.execute("SELECT * FROM notifications WHERE incident_id = ?", (iid,))
                        }
                    )

                async def settled() -> dict[str, Any] | None:
                    d = await deliveries(fire["id"])
                    return d if d and all(x["state"] != "pending" for x in d.values()) else None

                d = await wait_for(settled, timeout=20, what="every delivery of the fire settled")
                assert {k: (v["state"], v["attempts"]) for k, v in d.items()} == {
                    "duty-wecom": ("delivered", 2),  # rate-limited once (errcode 45009), then delivered
                    "duty-ding": ("delivered", 1),
                    "sms": ("delivered", 3),  # an HTTP 500, then no answer within the timeout, then delivered
                    "broken-robot": ("failed", 3),  # errcode 93000 every time: failed, and said so
                    "mail": ("delivered", 1),
                }
                assert "errcode 93000" in d["broken-robot"]["last_error"]
                # What the receivers got is the documented format, with the alarm in words people read.
                text = wecom.got[-1]["text"]["content"]
                assert wecom.got[-1]["msgtype"] == "text" and wecom.got[-1]["text"]["mentioned_mobile_list"] == [
                    "13800000001"
                ]
                assert "烟雾火警" in text and "5幢 1单元 1201室" in text and "Asia/Shanghai" in text
                assert wecom.queries[-1] == {"key": "wecom-key-0001"}
                q = ding.queries[-1]
                assert q["access_token"] == "ding-token-0001"
                mac = hmac.new(
                    DING_SECRET.encode(), f"{q['timestamp']}\n{DING_SECRET}".encode(), hashlib.sha256
                ).digest()
                assert q["sign"] == base64.b64encode(mac).decode()  # the query string decodes the URL-encoding
                assert urllib.parse.quote_plus(q["sign"]) == dingtalk_sign(DING_SECRET, int(q["timestamp"]))
                assert ding.got[-1]["at"] == {"atMobiles": [], "isAtAll": False}
                assert sms.got[-1] == {"to": ["13900000002"], "text": sms.got[-1]["text"]}
                assert sms.headers[-1]["Authorization"] == "Bearer tok-9"
                [(sender, rcpt, raw)] = box.messages
                msg = message_from_bytes(raw)
                assert (sender, rcpt) == ("alarm@estate.example", ["boss@estate.example"])
                assert "烟雾火警" in str(make_header(decode_header(msg["Subject"])))
                # The incident's log and its label: what was delivered and when, and what failed.
                after = await p.services.store.read(lambda c: alarms.get_incident(c, fire["id"]))
                assert after is not None
                states = {n["channel"]: n["state"] for n in after["notices"]}
                assert states["sms"] == "delivered" and states["broken-robot"] == "failed"
                assert all(n["at"] for n in after["notices"])
                log = await p.services.store.read(lambda c: alarms.incident_log(c, fire["id"]))
                notes = [e["detail"] for e in log if e["action"] == "notify"]
                assert "sms: delivered after 3 attempts" in notes
                assert any(n.startswith("broken-robot: failed after 3 attempts") for n in notes)

                # The fence alarm escalates at 60 s; the SMS channel takes only priority alarms (40 and up).
                mono.t += 60
                assert [i["id"] for i in await board.check_escalations()] == [fence["id"]]
                d = await wait_for(lambda: deliveries(fence["id"]), what="fence deliveries")
                assert "sms" not in d and set(d) == {"duty-wecom", "duty-ding", "broken-robot", "mail"}

                # The supervisor's page lists them; an admin can send a test message down one channel.
                await add_user(p, "boss", "admin", PW)
                await sign_in(p, "boss", PW)
                page = await (await p.client.get("/board/notifications")).text()
                assert "值班主管群" in page and "errcode 93000" in page and "已送达" in page
                csrf = page.split('name="csrf" value="')[1].split('"')[0]
                before = len(ding.got)
                r = await p.client.post(
                    "/board/notifications/test",
                    data={"channel": "duty-ding", "csrf": csrf},
                    headers={"Origin": p.origin},
                    allow_redirects=False,
                )
                assert r.status == 303
                await wait_for(lambda: len(ding.got) > before, what="the test message")
                assert "测试" in ding.got[-1]["text"]["content"]
    finally:
        mail.stop()


async def test_a_channel_whose_secret_file_others_can_read_fails_loudly_and_the_board_says_nobody_was_told(
    tmp_path: Path,
) -> None:
    mono = FakeClock()
    url = tmp_path / "open.url"
    url.write_text("http://127.0.0.1:9/x")
    url.chmod(0o644)  # readable by everyone: refused as a secret
    extra = f"""
alarms: {{escalate_after_s: 60, check_every_s: 30}}
notify: {{attempts: 1, channels: [{{name: w, kind: wecom, url_file: {url}}}]}}
"""
    async with running_portal(write_config(tmp_path, None, extra=extra), Options(monotonic=mono)) as p:
        board: AlarmBoard = p.client.app[BOARD]
        await p.services.ingest.handle(EVENTS_TOPIC, batch_payload([ev(1, "zone.alarm", incident="Z", data=ZONE)]))
        await p.services.store.flush()
        await board.feed_now()
        mono.t += 61
        [inc] = await board.check_escalations()

        async def failed() -> Any:
            i = await p.services.store.read(lambda c: alarms.get_incident(c, inc["id"]))
            return i if i and i["notices"] and i["notices"][0]["state"] == "failed" else None

        i = await wait_for(failed, what="the delivery failed")
        assert "chmod 600" in i["notices"][0]["error"]
    # No channel at all: the escalation label must not claim anyone was told.
    zh = json.loads((Path(__file__).parent.parent / "portal/web/i18n/zh-CN.json").read_text())
    assert "已上报主管" not in zh["board.escalated"] and "未通知任何人" in zh["board.escalated_none"]
