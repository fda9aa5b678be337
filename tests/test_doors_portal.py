"""The door list and remote unlock against a real Mosquitto and a real SQLite store: door events change the
list (JSON and the console socket), a late re-send never rolls a door back, state survives a restart; remote
unlock needs a reason, publishes a wire command, and shows the gateway's answer, a refusal, no answer, or a
broker that is down."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from tests.doors_support import (
    CMD_TOPIC,
    api_post,
    door_event,
    estate_with_doors,
    guard_session,
    next_command,
    publish,
    result_event,
    ws_wait,
)
from tests.portal_support import GATEWAY, SITE, Portal, mqtt, running_portal, wait_for, write_config

WAIT_S = 0.6  # doors.unlock_wait_s in these tests: "no answer" comes quickly


def config(tmp_path: Path, broker: MosquittoProcess) -> Path:
    return write_config(tmp_path, broker, extra=f"doors: {{unlock_wait_s: {WAIT_S}}}\n")


async def doors_by_key(p: Portal) -> dict[str, dict[str, Any]]:
    r = await p.client.get("/api/doors")
    assert r.status == 200, await r.text()
    body = await r.json()
    return {d["key"]: d for d in body["doors"]}


async def test_door_events_update_the_list_and_the_socket_and_survive_a_restart(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    cfg = config(tmp_path, broker)
    t0 = datetime.now(UTC).replace(microsecond=0)
    async with running_portal(cfg) as p, mqtt(broker) as gw:
        await gw.subscribe(wire.topic(SITE, GATEWAY, "ack"), qos=1)
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await estate_with_doors(p)
        await guard_session(p)
        doors = await doors_by_key(p)
        assert set(doors) == {"s1/north-gate", "s1/b3u2", "s1/b3u1"}
        assert doors["s1/b3u2"]["state"] == "unknown" and doors["s1/b3u2"]["label"] == "3幢2单元门"
        assert doors["s1/north-gate"]["gate"] is True and doors["s1/b3u2"]["registered"] is True

        ws = await p.client.ws_connect("/ws", headers={"Origin": p.origin})
        try:
            await publish(gw, [door_event(1, "door.state", "b3u2", {"state": "open"}, ts=t0, building="3", unit="2")])
            seen = await ws_wait(ws, "door", {"key": "s1/b3u2"})
            assert seen["state"] == "open" and seen["since"] == t0.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            assert (await doors_by_key(p))["s1/b3u2"]["state"] == "open"

            # A late re-send of something older changes nothing; a newer state does.
            await publish(gw, [door_event(2, "door.state", "b3u2", {"state": "closed"}, ts=t0 - timedelta(seconds=5))])
            await publish(gw, [door_event(3, "door.state", "b3u2", {"state": "forced"}, ts=t0 + timedelta(seconds=2))])
            seen = await ws_wait(ws, "door", {"key": "s1/b3u2"})
            assert seen["state"] == "forced", seen  # the stale "closed" was never broadcast
            # A state outside the contract is ignored, not shown.
            await publish(
                gw, [door_event(4, "door.state", "b3u2", {"state": "exploded"}, ts=t0 + timedelta(seconds=3))]
            )

            # Flags, the last access, and a door no installer registered.
            await publish(
                gw,
                [
                    door_event(
                        5,
                        "door.tamper",
                        "north-gate",
                        {"incident": "i1", "count": 1},
                        ts=t0 + timedelta(seconds=4),
                        priority=wire.Priority.TAMPER,
                    ),
                    door_event(
                        6,
                        "reader.offline",
                        "north-gate",
                        {"incident": "i2", "count": 1},
                        ts=t0 + timedelta(seconds=5),
                        priority=wire.Priority.FAULT,
                    ),
                    door_event(
                        7,
                        "access.granted",
                        "north-gate",
                        {
                            "reader": "r1",
                            "pass_id": "ab" * 12,
                            "kind": "visitor",
                            "subject": "v:x",
                            "house": "3-2-301",
                            "uses_left": 1,
                        },
                        ts=t0 + timedelta(seconds=6),
                    ),
                    door_event(
                        8,
                        "door.state",
                        "side-door",
                        {"state": "held"},
                        ts=t0 + timedelta(seconds=7),
                        building="5",
                        unit="1",
                    ),
                ],
            )
            side = await ws_wait(ws, "door", {"key": "s1/side-door"})
            assert side["state"] == "held" and side["registered"] is False and side["building"] == "5"
            doors = await doors_by_key(p)
            gate = doors["s1/north-gate"]
            assert gate["tamper"] is True and gate["reader_offline"] is True
            assert gate["last_access"]["result"] == "granted" and gate["last_access"]["kind"] == "visitor"
            assert doors["s1/b3u2"]["state"] == "forced"
            await publish(
                gw,
                [
                    door_event(
                        9,
                        "door.tamper_restore",
                        "north-gate",
                        {"incident": "i1", "count": 1},
                        ts=t0 + timedelta(seconds=8),
                    )
                ],
            )
            gate = await ws_wait(ws, "door", {"key": "s1/north-gate", "tamper": False})
            assert gate["reader_offline"] is True
        finally:
            await ws.close()

    # A restart rebuilds the same picture from the store.
    async with running_portal(cfg) as p:
        await guard_session(p, "guard2", "guard-password-0002")
        doors = await doors_by_key(p)
        assert doors["s1/b3u2"]["state"] == "forced"
        assert doors["s1/side-door"]["state"] == "held"
        assert doors["s1/north-gate"]["tamper"] is False and doors["s1/north-gate"]["reader_offline"] is True
        assert doors["s1/north-gate"]["last_access"]["kind"] == "visitor"
        assert doors["s1/b3u1"]["state"] == "unknown"


async def test_remote_unlock_needs_a_reason_and_shows_the_answer(tmp_path: Path, broker: MosquittoProcess) -> None:
    async with running_portal(config(tmp_path, broker)) as p:
        await wait_for(lambda: p.services.ingest.connected, what="portal connected")
        await estate_with_doors(p)
        await guard_session(p)
        url = "/api/doors/s1/b3u2/unlock"
        async with mqtt(broker) as gw:
            await gw.subscribe(wire.topic(SITE, GATEWAY, "ack"), qos=1)
            await gw.subscribe(CMD_TOPIC, qos=1)
            cmd3_id = await _unlock_walk(p, gw, url)

        # The broker down: refused at once as not sent (503), recorded as such.
        broker.stop()
        await wait_for(lambda: not p.services.ingest.connected, what="portal disconnected")
        r = await api_post(p, url, {"reason": "访客"})
        assert r.status == 503
        body = await r.json()
        assert body["error"] == "not-sent" and body["command"]["status"] == "unsent"
        cid = body["command"]["id"]
        await wait_for(
            lambda: p.services.store.read(
                lambda c: c.execute("SELECT status FROM door_commands WHERE id = ?", (cid,)).fetchone()[0] == "unsent"
            ),
            what="unsent stored",
        )
        assert cmd3_id != cid


async def _unlock_walk(p: Portal, gw: Any, url: str) -> str:
    """Refusals, then opened, failed and timeout; audited. Returns the timed-out command's id."""
    # Refused without a reason, whatever the shape.
    for body in ({}, {"reason": ""}, {"reason": "   "}, {"reason": 42}):
        r = await api_post(p, url, body)
        assert r.status == 400, (body, r.status)
        assert (await r.json())["error"] in ("reason-required", "bad-request")
    r = await api_post(p, url, {"reason": "x" * 201})
    assert r.status == 400
    r = await api_post(p, "/api/doors/s1/no-such-door/unlock", {"reason": "送货"})
    assert r.status == 404
    r = await p.client.post(url, json={"reason": "no token"}, headers={"Origin": p.origin})
    assert r.status == 403  # CSRF

    ws = await p.client.ws_connect("/ws", headers={"Origin": p.origin})
    try:
        # With a reason: published at once (nothing was published for the refused ones), pending, then opened.
        r = await api_post(p, url, {"reason": "快递员送货  进门"})
        assert r.status == 202, await r.text()
        sent = (await r.json())["command"]
        assert sent["status"] == "pending" and sent["reason"] == "快递员送货 进门" and sent["by"] == "guard:guard1"
        cmd = await next_command(p, gw)
        assert cmd.id == sent["id"] and cmd.type == "unlock" and cmd.by == "guard:guard1"
        assert cmd.args == {"door": "b3u2", "reason": "快递员送货 进门"}
        life = (cmd.expires - cmd.ts).total_seconds()
        assert abs(life - WAIT_S) < 0.01, life  # a gateway that gets it late does not open
        await publish(gw, [result_event(1, cmd.id, True, "b3u2", "relay pulsed")])
        done = await ws_wait(ws, "unlock", {"id": cmd.id, "status": "opened"})
        assert done["detail"] == "relay pulsed"
        r = await p.client.get(f"/api/doors/commands/{cmd.id}")
        assert (await r.json())["command"]["status"] == "opened"

        # The gateway refuses: failed, with its reason.
        r = await api_post(p, url, {"reason": "住户忘带钥匙"})
        cmd2 = await next_command(p, gw)
        assert (await r.json())["command"]["id"] == cmd2.id
        await publish(gw, [result_event(2, cmd2.id, False, "b3u2", "controller offline")])
        failed = await ws_wait(ws, "unlock", {"id": cmd2.id, "status": "failed"})
        assert failed["detail"] == "controller offline"

        # No answer: timeout after the wait.
        r = await api_post(p, "/api/doors/s1/north-gate/unlock", {"reason": "消防通道检查"})
        cmd3 = await next_command(p, gw)
        assert cmd3.args["door"] == "north-gate"
        await ws_wait(ws, "unlock", {"id": cmd3.id, "status": "timeout"}, timeout=WAIT_S + 5)
    finally:
        await ws.close()

    # Audited: who, when, which door, why; and the orders with their outcomes, in the store.
    def audit(c: Any) -> list[tuple[str, ...]]:
        return [
            tuple(r)
            for r in c.execute(
                "SELECT actor, action, target, detail FROM audit WHERE action = 'door.remote_unlock' ORDER BY id"
            )
        ]

    assert await p.services.store.read(audit) == [
        ("guard:guard1", "door.remote_unlock", "door:s1/b3u2", "快递员送货 进门"),
        ("guard:guard1", "door.remote_unlock", "door:s1/b3u2", "住户忘带钥匙"),
        ("guard:guard1", "door.remote_unlock", "door:s1/north-gate", "消防通道检查"),
    ]
    await wait_for(
        lambda: p.services.store.read(
            lambda c: c.execute("SELECT status FROM door_commands WHERE id = ?", (cmd3.id,)).fetchone()[0] == "timeout"
        ),
        what="timeout stored",
    )
    rows = await p.services.store.read(
        lambda c: [tuple(r) for r in c.execute("SELECT id, status, by_user FROM door_commands ORDER BY sent_at")]
    )
    assert rows == [
        (cmd.id, "opened", "guard:guard1"),
        (cmd2.id, "failed", "guard:guard1"),
        (cmd3.id, "timeout", "guard:guard1"),
    ]
    # A late answer still lands (the gateway's result is an ordinary durable event).
    await publish(gw, [result_event(3, cmd3.id, True, "north-gate")])
    r = await p.client.get(f"/api/doors/commands/{cmd3.id}")
    assert (await r.json())["command"]["status"] == "opened"

    # Installers see doors but do not open them.
    await guard_session(p, "fitter1", "fitter-password-0001", role="installer")
    assert (await p.client.get("/api/doors")).status == 200
    assert (await api_post(p, url, {"reason": "test"})).status == 403
    await guard_session(p, "guard2", "guard-password-0002")
    return cmd3.id
