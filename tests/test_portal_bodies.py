"""Request bodies are read in one place (portal.web.bodies): what the client got wrong is a 400 that says so, on
every kind of route (JSON API, staff form, streamed upload), an oversized body a 413, and an error of ours behind a
body that was fine stays a 500 (it is never passed off as the client's fault)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from portal.app import create_app
from portal.config import load
from portal.web.auth import public
from portal.web.bodies import read_form, read_json
from tests.portal_support import Portal, csrf_of, running_portal, write_config
from tests.registry_support import admin_session
from tests.test_portal_limits import assert_no_trace, body_of, cookie_header, port_of, raw, status_of


@pytest.fixture
async def portal(tmp_path: Path) -> AsyncIterator[tuple[Portal, str]]:
    async with running_portal(write_config(tmp_path, None)) as p:
        yield p, await admin_session(p)


def _request(p: Portal, csrf: str, target: str, content_type: str, body: bytes, *, chunked: bool = False) -> bytes:
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: 127.0.0.1:{port_of(p)}",
        f"Origin: {p.origin}",
        f"X-CSRF-Token: {csrf}",
        f"Cookie: {cookie_header(p)}",
        "Connection: close",
        f"Content-Type: {content_type}",
        "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_a_body_the_client_got_wrong_is_a_400_that_says_what(portal: tuple[Portal, str]) -> None:
    p, csrf = portal
    port = port_of(p)
    json_cases = [
        ("/api/users", "application/json", b'{"name": ', "malformed JSON: "),
        ("/api/users", "application/json", b'["guard", "guard"]', "expected a JSON object"),
        ("/api/users", "application/json", b'{"name": 7, "role": "guard", "password": "x"}', "name, role and password"),
        ("/api/users", "text/plain", b"{}", "expected Content-Type: application/json"),
        ("/api/doors/s1/d1/unlock", "application/json", b"\xff\xfe", "malformed JSON: "),
        ("/api/board/arm", "application/json", b"[" * 4000 + b"]" * 4000, "malformed JSON: nested too deeply"),
        ("/api/registry/import?dry_run=1", "multipart/form-data; boundary=xx", b"--xx\r\n\r\nabc", "malformed body"),
        (
            "/api/registry/import?dry_run=1",
            "multipart/form-data; boundary=xx",
            b'--xx\r\nContent-Disposition: form-data; name="x\x10\t"\r\n\r\n1\r\n--xx--\r\n',
            "malformed body",
        ),
    ]
    for target, ctype, body, detail in json_cases:
        resp = await raw(port, _request(p, csrf, target, ctype, body))
        assert status_of(resp) == 400, (target, body[:40], resp[:300])
        got = json.loads(body_of(resp))
        assert got["error"] == "bad-request" and got["detail"].startswith(detail), (target, body[:40], got)
        assert_no_trace(resp)
    form_cases = [
        ("/users", "application/x-www-form-urlencoded", b"name=\xff\xfe&role=guard&csrf=" + csrf.encode()),
        ("/users", "multipart/form-data; boundary=xx", b'--xx\r\nContent-Disposition: form-data; name="a"\r\n\r\nab'),
        ("/stations", "multipart/form-data; boundary=xx", b'--xx\r\nContent-Disposition: form-data; name="a"'),
        ("/admin/registry/sites", "application/x-www-form-urlencoded", b"site=s1&name=\xe9t\xe9"),  # Latin-1
    ]
    for target, ctype, body in form_cases:
        resp = await raw(port, _request(p, csrf, target, ctype, body))
        assert status_of(resp) == 400, (target, body[:40], resp[:300])
        assert body_of(resp) == b"400 bad request: malformed body", (target, body, body_of(resp))
    # A CSV streamed in chunks whose framing breaks half-way: refused as the client's, whatever was read before.
    broken = b"8\r\nname,uni\r\nzz\r\n"
    resp = await raw(port, _request(p, csrf, "/api/registry/import?dry_run=1", "text/csv", broken, chunked=True))
    assert status_of(resp) == 400, resp[:300]
    assert_no_trace(resp)


async def test_an_oversized_body_is_a_413_on_json_and_form_routes(portal: tuple[Portal, str]) -> None:
    """Announced (refused before the handler runs) or chunked (refused as the handler reads it), never a 400."""
    p, csrf = portal
    port = port_of(p)
    big = b"x" * 3_000_000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [b"y" * 65536] * 40) + b"0\r\n\r\n"
    for target, ctype in (
        ("/api/users", "application/json"),
        ("/users", "application/x-www-form-urlencoded"),
        ("/api/board/arm", "application/json"),
    ):
        for body, how in ((big, False), (chunked, True)):
            resp = await raw(port, _request(p, csrf, target, ctype, body, chunked=how))
            assert status_of(resp) == 413, (target, how, resp[:300])
            assert_no_trace(resp)


async def test_an_error_of_ours_behind_a_good_body_is_still_a_500(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ValueError (a UnicodeDecodeError too) raised by our code after the body was read is a bug: a 500 and the
    trace in the log, never a 400 that blames the client."""

    @public
    async def bad_number(request: web.Request) -> web.Response:
        form = await read_form(request)
        return web.Response(text=str(int(str(form["n"]))))  # a bug: no check that n is a number

    @public
    async def bad_decode(request: web.Request) -> web.Response:
        data = await read_json(request)
        return web.json_response({"x": bytes.fromhex(data["hex"]).decode("utf-8")})  # a bug: strict decode

    app = create_app(load(write_config(tmp_path, None)))
    app.router.add_post("/api/bug/decode", bad_decode)
    app.router.add_post("/bug/number", bad_number)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        token = csrf_of(await (await client.get("/login")).text())  # the pre-session token: these are public
        origin = {"Origin": f"http://127.0.0.1:{client.server.port}", "X-CSRF-Token": token}
        with caplog.at_level(logging.ERROR):
            r = await client.post("/bug/number", data={"n": "7"}, headers=origin)
            assert r.status == 200 and await r.text() == "7"
            r = await client.post("/bug/number", data={"n": "seven"}, headers=origin)
            assert r.status == 500 and await r.text() == "500 internal server error"
            r = await client.post("/api/bug/decode", json={"hex": "4142"}, headers=origin)
            assert r.status == 200 and await r.json() == {"x": "AB"}
            r = await client.post("/api/bug/decode", json={"hex": "fffe"}, headers=origin)
            assert r.status == 500 and await r.json() == {"error": "internal"}
        failed = [rec for rec in caplog.records if rec.getMessage().endswith("failed") and rec.exc_info]
        assert {rec.getMessage() for rec in failed} == {"POST /bug/number failed", "POST /api/bug/decode failed"}
