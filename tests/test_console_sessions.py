"""A console socket lives only as long as its session (issue 14 item 9), against a real portal process.

The outsider here is whoever holds a console page open after the session behind it has ended: a guard who
signed out on another tab, a stolen laptop whose owner changed the password, a session that timed out, an account
whose sites were narrowed. Each time the socket must close (code 4401, "session ended"; 1013 for a change of
scope, after which the socket reconnects under the new scope) and carry nothing more.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from gateway import wire
from gateway.tooling.broker import MosquittoProcess
from tests.portal_support import (
    GATEWAY,
    ROOT,
    SITE,
    batch_payload,
    csrf_of,
    event,
    mqtt,
    portal_process,
    sign_in_console,
    write_config,
)

PW = "guard-password-0001"
NEW_PW = "a-new-password-0002"
EXTRA = "console: {heartbeat_s: 0.5, stale_after_s: 2}\n"
EVENTS_TOPIC = wire.topic(SITE, GATEWAY, "events")


def adduser(config: Path, name: str, role: str) -> None:
    f = config.parent / f"{name}.pw"
    f.write_text(PW)
    f.chmod(0o600)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "portal",
            "adduser",
            "--config",
            str(config),
            "--user",
            name,
            "--role",
            role,
            "--password-file",
            str(f),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )


async def socket(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(url.replace("http", "ws") + "ws", headers={"Origin": url.rstrip("/")})
    hello = json.loads((await ws.receive(timeout=10)).data)
    assert hello["kind"] == "hello"
    return ws


async def ended(ws: aiohttp.ClientWebSocketResponse, code: int = 4401, within: float = 5.0) -> list[dict[str, Any]]:
    """Read until the socket closes (within ``within`` s); what it carried, and check the close code."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                seen.append(json.loads(msg.data))
                continue
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING), msg
            break
    assert ws.close_code == code, (ws.close_code, seen[-3:])
    return seen


async def events_on(ws: aiohttp.ClientWebSocketResponse, within: float) -> list[str]:
    ids: list[str] = []
    try:
        async with asyncio.timeout(within):
            while True:
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return ids
                m = json.loads(msg.data)
                if m["kind"] == "event":
                    ids.append(m["event"]["id"])
    except TimeoutError:
        return ids


def _http() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # cookies from 127.0.0.1


async def post(http: aiohttp.ClientSession, url: str, path: str, data: dict[str, str]) -> aiohttp.ClientResponse:
    page = await (await http.get(url + "console")).text()
    return await http.post(
        url + path.lstrip("/"),
        data={**data, "csrf": csrf_of(page)},
        headers={"Origin": url.rstrip("/")},
        allow_redirects=False,
    )


async def test_a_console_socket_lives_only_as_long_as_its_session(tmp_path: Path, broker: MosquittoProcess) -> None:
    config = write_config(tmp_path, broker, extra=EXTRA)
    with portal_process(config) as first:
        first.stop()
    for name, role in (("guard1", "guard"), ("guard2", "guard"), ("boss", "admin")):
        adduser(config, name, role)
    db = tmp_path / "data" / "portal.db"
    with portal_process(config) as pp:
        url = pp.url
        async with mqtt(broker) as gw, _http() as a, _http() as b1, _http() as b2, _http() as boss:
            # Signed out: the socket closes at once, says why, and nothing published afterwards reaches it.
            await sign_in_console(a, url, "guard1", PW)
            ws = await socket(a, url)
            await gw.publish(EVENTS_TOPIC, batch_payload([event(1)]), qos=1)
            assert await events_on(ws, 5.0) != []
            r = await post(a, url, "/logout", {})
            assert r.status == 303
            seen = await ended(ws, within=3.0)
            assert seen[-1] == {"kind": "session_ended", "why": "signed out"}
            await gw.publish(EVENTS_TOPIC, batch_payload([event(2)]), qos=1)
            try:
                await a.ws_connect(url.replace("http", "ws") + "ws", headers={"Origin": url.rstrip("/")})
                raise AssertionError("a signed-out cookie opened a console socket")
            except aiohttp.WSServerHandshakeError as e:
                assert e.status == 401

            # A password change ends every other session of the user, and their sockets with them.
            await sign_in_console(b1, url, "guard2", PW)
            await sign_in_console(b2, url, "guard2", PW)
            ws1, ws2 = await socket(b1, url), await socket(b2, url)
            r = await post(b1, url, "/password", {"current": PW, "new": NEW_PW, "confirm": NEW_PW})
            assert r.status == 303, await r.text()
            await ended(ws2, within=3.0)
            await ended(ws1, within=3.0)  # the changing browser gets a new session; its old socket goes too

            # A session that timed out (its last activity two hours back, as the clock would have it): the next
            # beat closes its socket.
            await sign_in_console(a, url, "guard1", PW)
            ws = await socket(a, url)
            with sqlite3.connect(db) as c:
                c.execute(
                    "UPDATE sessions SET last_seen = last_seen - 7200, created = created - 7200"
                    " WHERE user_id = (SELECT id FROM users WHERE name = 'guard1')"
                )
            seen = await ended(ws, within=3.0)
            assert seen[-1]["kind"] == "session_ended"
            r = await a.get(url + "api/events?limit=1")
            assert r.status == 401

            # Narrowed to another site: the socket is closed; the one it reconnects gets nothing of the old site.
            await sign_in_console(a, url, "guard1", PW)
            ws = await socket(a, url)
            await sign_in_console(boss, url, "boss", PW)
            r = await post(boss, url, "/users/guard1/sites", {"sites": "elsewhere"})
            assert r.status == 303, await r.text()
            await ended(ws, code=1013, within=3.0)
            ws = await socket(a, url)
            await gw.publish(EVENTS_TOPIC, batch_payload([event(3)]), qos=1)
            assert await events_on(ws, 2.0) == []
            await ws.close()


async def test_a_socket_closes_when_its_role_changes_or_its_account_is_disabled(
    tmp_path: Path, broker: MosquittoProcess
) -> None:
    """The rest of "a socket lives only as long as its session": an administrator makes a guard an installer (the
    socket reconnects under the new role), switches the account off, or resets its password. Each closes the open
    socket at once; after the last two the session is gone with it."""
    config = write_config(tmp_path, broker, extra=EXTRA)
    with portal_process(config) as first:
        first.stop()
    for name, role in (("guard1", "guard"), ("boss", "admin")):
        adduser(config, name, role)
    with portal_process(config) as pp:
        url = pp.url
        async with _http() as a, _http() as boss:
            await sign_in_console(boss, url, "boss", PW)
            await sign_in_console(a, url, "guard1", PW)
            ws = await socket(a, url)
            r = await post(boss, url, "/users/guard1/role", {"role": "installer", "confirmed": "yes"})
            assert r.status == 303, await r.text()
            await ended(ws, code=1013, within=3.0)
            assert (await a.get(url + "revocations", allow_redirects=False)).status == 403  # an installer's rights now

            ws = await socket(a, url)
            r = await post(boss, url, "/users/guard1/disable", {"confirmed": "yes"})
            assert r.status == 303, await r.text()
            assert (await ended(ws, within=3.0))[-1]["kind"] == "session_ended"
            assert (await a.get(url + "api/events?limit=1")).status == 401

            assert (await post(boss, url, "/users/guard1/enable", {})).status == 303
            await sign_in_console(a, url, "guard1", PW)
            ws = await socket(a, url)
            r = await post(boss, url, "/users/guard1/password", {"confirmed": "yes"})
            assert r.status == 303, await r.text()
            assert (await ended(ws, within=3.0))[-1]["kind"] == "session_ended"
            assert (await a.get(url + "api/events?limit=1")).status == 401
