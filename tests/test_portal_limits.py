"""Body caps per route, malformed requests answered with a 4xx and never a stack trace, the compiled parser.

Malformed HTTP goes over raw loopback sockets: a client library would refuse to send most of it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.http_parser
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from portal.app import create_app
from portal.config import load
from portal.web import limits
from portal.web.auth import public
from tests.portal_support import ROOT, Portal, running_portal, write_config
from tests.registry_support import admin_session, estate_csv, import_csv

TRACE_MARKS = (b"Traceback", b'File "', b"site-packages", b'.py", line')


# ---------------------------------------------------------------- helpers


async def raw(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data`` as is and read the answer until the server closes (or a whole response is in)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        buf = b""
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                buf += chunk
                if _complete(buf):
                    break
        return buf
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


def _complete(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def status_of(resp: bytes) -> int:
    assert resp[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 "), resp[:200]
    return int(resp[9:12])


def assert_no_trace(resp: bytes) -> None:
    for mark in TRACE_MARKS:
        assert mark not in resp, f"{mark!r} in the answer: {resp[:600]!r}"


def body_of(resp: bytes) -> bytes:
    return resp.partition(b"\r\n\r\n")[2]


def port_of(p: Portal) -> int:
    port = p.client.server.port
    assert port is not None
    return port


def headers_of(resp: bytes) -> dict[str, str]:
    head = resp.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head)}


@pytest.fixture
async def portal(tmp_path: Path) -> AsyncIterator[tuple[Portal, str]]:
    """A signed-in admin on an in-process portal (its CSRF token beside it)."""
    async with running_portal(write_config(tmp_path, None)) as p:
        csrf = await admin_session(p)
        p.csrf = csrf
        yield p, csrf


def api_headers(p: Portal, csrf: str, **extra: str) -> dict[str, str]:
    return {"Origin": p.origin, "X-CSRF-Token": csrf, "Content-Type": "application/json", **extra}


def cookie_header(p: Portal) -> str:
    return "; ".join(f"{c.key}={c.value}" for c in p.client.session.cookie_jar)


# ---------------------------------------------------------------- caps


def test_marks_and_defaults(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path, None, extra="phone: {photo_max_bytes: 65536}\nmax_body_bytes: 4096\n"))

    def handler() -> Any:
        async def h(request: web.Request) -> web.Response:
            return web.Response()

        return h

    h = handler()
    assert limits.limit_of(h, cfg) == 4096  # the config may only lower the default
    assert limits.limit_of(limits.body_limit(100)(handler()), cfg) == 100
    assert limits.limit_of(limits.body_limit(lambda c: c.phone.photo_max_bytes + 1)(handler()), cfg) == 65537
    with pytest.raises(ValueError):
        limits.body_limit(-1)
    cfg2 = load(write_config(tmp_path / "b", None))
    assert limits.limit_of(h, cfg2) == limits.DEFAULT_LIMIT == 8192


async def test_declared_length_over_the_cap_is_refused_before_the_body_is_read(portal: tuple[Portal, str]) -> None:
    p, csrf = portal
    port = port_of(p)
    # Headers only, a 10 MB body announced and never sent: the 413 must come without waiting for it.
    head = (
        f"POST /api/users HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {p.origin}\r\nX-CSRF-Token: {csrf}\r\n"
        f"Cookie: {cookie_header(p)}\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    )
    t0 = time.monotonic()
    resp = await raw(port, head.encode(), timeout=5.0)
    assert status_of(resp) == 413, resp[:300]
    assert time.monotonic() - t0 < 4.0
    h = headers_of(resp)
    assert h["content-type"].startswith("application/json") and h.get("connection", "").lower() == "close"
    assert json.loads(body_of(resp)) == {"error": "too-large", "max_bytes": 8192}

    # A page's form gets a short page, not JSON; the CSV import has its own larger cap (32 MiB).
    r = await p.client.post(
        "/users",
        data={"name": "x" * 9000, "role": "guard", "csrf": csrf},
        headers={"Origin": p.origin},
        allow_redirects=False,
    )
    assert r.status == 413 and r.content_type == "text/html" and "8192" in await r.text()
    head = (
        f"POST /api/registry/import HTTP/1.1\r\nHost: x\r\nOrigin: {p.origin}\r\nX-CSRF-Token: {csrf}\r\n"
        f"Cookie: {cookie_header(p)}\r\nContent-Type: text/csv\r\nContent-Length: {32 * 1024 * 1024 + 1}\r\n\r\n"
    )
    resp = await raw(port, head.encode(), timeout=5.0)
    assert status_of(resp) == 413
    assert json.loads(body_of(resp))["max_bytes"] == 32 * 1024 * 1024


async def test_bodies_under_the_cap_pass_and_the_import_takes_more_than_the_default(portal: tuple[Portal, str]) -> None:
    p, csrf = portal
    ok = {"name": "guard7", "role": "guard", "password": "guard-password-0007"}
    r = await p.client.post("/api/users", data=json.dumps(ok), headers=api_headers(p, csrf))
    assert r.status == 201, await r.text()
    # ~100 KB of CSV (well over 8 KiB): checked, not refused for its size.
    big = estate_csv("".join(f"s1,阳光花园,9,1,{1000 + i},,,,,,\n" for i in range(2500)))
    assert len(big.encode()) > 60_000
    status, body = await import_csv(p, csrf, big, dry_run=True)
    assert status == 200 and body["errors"] == [] and body["rows"] > 2500, body


async def chunks(data: bytes, size: int = 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_chunked_and_compressed_bodies_are_counted_as_they_are_read(portal: tuple[Portal, str]) -> None:
    p, csrf = portal
    big = json.dumps({"name": "guard8", "role": "guard", "password": "p" * 20_000}).encode()
    r = await p.client.post("/api/users", data=chunks(big), headers=api_headers(p, csrf))
    assert r.status == 413 and (await r.json())["error"] == "too-large"
    assert "content-length" not in {k.lower() for k in r.request_info.headers}  # really chunked

    # 200 kB of JSON in a 300-byte gzip: the decompressed size is what counts.
    bomb = gzip.compress(json.dumps({"name": "guard9", "role": "guard", "text": " " * 200_000}).encode())
    assert len(bomb) < 1000
    r = await p.client.post("/api/users", data=bomb, headers=api_headers(p, csrf, **{"Content-Encoding": "gzip"}))
    assert r.status == 413 and (await r.json())["error"] == "too-large"

    # A chunked form to a page: the same cap, a page back. The connection is not reused after a refusal.
    form = b"name=" + b"u" * 20_000 + b"&role=guard&csrf=" + csrf.encode()
    r = await p.client.post(
        "/users",
        data=chunks(form),
        allow_redirects=False,
        headers={"Origin": p.origin, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status == 413 and r.content_type == "text/html"
    assert (await p.health())["status"] in ("ok", "degraded")  # the portal still answers


async def test_a_streaming_handler_is_cut_off_at_its_mark() -> None:
    """``request.content`` read directly (as uploads do) is counted too, not only ``read()``/``post()``."""
    cfg = load(write_config(Path(os.environ.get("TMPDIR", "/tmp")) / f"limits-{os.getpid()}", None))
    seen: list[int] = []

    @public
    @limits.body_limit(10_000)
    async def upload(request: web.Request) -> web.Response:
        n = 0
        async for chunk in request.content.iter_chunked(1000):
            n += len(chunk)
            seen.append(n)
        return web.json_response({"n": n})

    app = web.Application(middlewares=[limits.middleware(cfg)])
    app.router.add_post("/api/upload", upload)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        r = await client.post("/api/upload", data=chunks(b"x" * 9_000))
        assert r.status == 200 and (await r.json())["n"] == 9_000
        seen.clear()
        r = await client.post("/api/upload", data=chunks(b"x" * 200_000, 4096))
        assert r.status == 413 and (await r.json()) == {"error": "too-large", "max_bytes": 10_000}
        assert max(seen, default=0) <= 10_000 + 4096  # stopped within one chunk of the cap


# ---------------------------------------------------------------- malformed requests


MALFORMED: list[tuple[str, bytes]] = [
    ("garbage request line", b"GARBAGE\r\n\r\n"),
    ("a TLS hello on the HTTP port", bytes.fromhex("16030100a5010000a10303") + os.urandom(40)),
    ("a space in the method", b"GE T / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("an unknown HTTP version", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n"),
    ("a request line too long", b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("a header too long", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n"),
    ("too many headers", b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(300)) + b"\r\n"),
    ("a header without a colon", b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n"),
    ("a control byte in a header", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
    ("a non-numeric Content-Length", b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
    ("two Content-Lengths", b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
    (
        "Content-Length and chunked",
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "a bad chunk size",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "a chunk longer than said",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n2\r\nabcdef\r\n0\r\n\r\n",
    ),
    ("an unknown transfer coding", b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: bogus\r\n\r\n"),
    ("a bare LF request", b"GET / HTTP/1.1\nHost: x\n\n"),
]


@pytest.mark.parametrize(("what", "data"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_http_gets_a_4xx_without_a_trace(tmp_path: Path, what: str, data: bytes) -> None:
    async with running_portal(write_config(tmp_path, None)) as p:
        resp = await raw(port_of(p), data)
        assert resp, f"{what}: no answer at all"
        assert 400 <= status_of(resp) < 500, resp[:300]
        assert_no_trace(resp)


async def test_malformed_requests_to_the_application_get_a_4xx(portal: tuple[Portal, str]) -> None:
    p, csrf = portal
    port = port_of(p)
    cookie = cookie_header(p)

    def req(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            f"Origin: {p.origin}",
            f"X-CSRF-Token: {csrf}",
            f"Cookie: {cookie}",
            "Connection: close",
            *headers,
        ]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    absurd = "&".join(f"type=t{i}" for i in range(700))  # within the request line's 8190 bytes
    cases: list[tuple[str, bytes, int]] = [
        ("bad percent-encoding in the path", req("GET", "/api/events%zz"), 404),
        ("invalid UTF-8 in the path", req("GET", "/api/%ff%fe"), 404),
        ("a path of dots", req("GET", "/api/../../etc/passwd"), 404),
        ("bad percent-encoding in a query", req("GET", "/api/events?limit=%zz"), 400),
        ("invalid UTF-8 in a query", req("GET", "/api/events?limit=%ff"), 400),
        ("an absurd number of query parameters", req("GET", f"/api/events?{absurd}"), 400),
        ("a huge integer", req("GET", "/api/events?limit=" + "9" * 4000), 400),
        ("an access-log time that is not one", req("GET", "/api/access-log?from=" + "%00" * 30), 400),
        ("bad JSON", req("POST", "/api/users", "Content-Type: application/json", body=b'{"name": '), 400),
        (
            "JSON in invalid UTF-8",
            req("POST", "/api/users", "Content-Type: application/json", body=b'{"name": "\xff\xfe"}'),
            400,
        ),
        (
            "JSON nested absurdly deep",
            req("POST", "/api/users", "Content-Type: application/json", body=b"[" * 4000 + b"]" * 4000),
            400,
        ),
        ("the wrong content type", req("POST", "/api/users", "Content-Type: text/plain", body=b"{}"), 400),
        (
            "invalid UTF-8 in a form",
            req(
                "POST",
                "/users",
                "Content-Type: application/x-www-form-urlencoded",
                body=b"name=\xff\xfe&role=guard&csrf=" + csrf.encode(),
            ),
            400,
        ),
        (
            "a form with a bad charset",
            req(
                "POST",
                "/users",
                "Content-Type: application/x-www-form-urlencoded; charset=no-such-codec",
                body=b"name=a&csrf=" + csrf.encode(),
            ),
            415,
        ),
        (
            "multipart without a boundary",
            req("POST", "/users", "Content-Type: multipart/form-data", body=b"--x\r\n\r\n"),
            400,
        ),
        (
            "multipart that ends early",
            req(
                "POST",
                "/users",
                "Content-Type: multipart/form-data; boundary=xx",
                body=b'--xx\r\nContent-Disposition: form-data; name="a"\r\n\r\nabc',
            ),
            400,
        ),
        (
            "a CSV import that is not UTF-8",
            req("POST", "/api/registry/import?dry_run=1", "Content-Type: text/csv", body=b"\xff\xfe\x00garbage"),
            422,
        ),
    ]
    for what, data, want in cases:
        resp = await raw(port, data)
        got = status_of(resp)
        assert got == want, f"{what}: {got} (wanted {want}): {resp[:400]!r}"
        assert_no_trace(resp)
        if b"/api/" in data.split(b"\r\n", 1)[0]:
            assert headers_of(resp)["content-type"].startswith("application/json"), what


async def test_an_unhandled_error_is_a_generic_500_and_the_trace_only_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    @public
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret detail /srv/portal/x.py")

    async def bad_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if request.path == "/late":
            raise RuntimeError("failed while preparing")

    app = create_app(load(write_config(tmp_path, None)))
    app.router.add_get("/api/boom", boom)
    app.router.add_get("/boom", boom)
    app.router.add_get("/late", public(_ok))
    app.router.add_get("/api/refused", public(_refused))
    app.on_response_prepare.append(bad_prepare)
    loop = asyncio.get_running_loop()
    debug = loop.get_debug()
    loop.set_debug(True)  # aiohttp puts a traceback into its own 500 page in asyncio debug mode
    try:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            with caplog.at_level(logging.ERROR):
                r = await client.get("/api/boom")
                assert r.status == 500 and await r.json() == {"error": "internal"}
                r = await client.get("/boom", headers={"Accept": "text/html"})
                text = await r.text()
                assert r.status == 500 and "secret" not in text and "Traceback" not in text
                port = client.server.port
                assert port is not None
                late = b"GET /late HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\nConnection: close\r\n\r\n"
                resp = await raw(port, late)
                assert resp == b"" or status_of(resp) == 500  # the server drops the connection
                assert_no_trace(resp)
                assert b"failed while preparing" not in resp
                # An error the middleware leaves to aiohttp (it looks like a client that went away).
                resp = await raw(port, b"GET /api/refused HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert status_of(resp) == 500
                assert_no_trace(resp)
            logged = "\n".join(r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in caplog.records)
            assert "secret detail" in logged and "failed while preparing" in logged
    finally:
        loop.set_debug(debug)
        await loop.shutdown_default_executor()


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _refused(request: web.Request) -> web.Response:
    raise ConnectionRefusedError("an internal peer refused")


# ---------------------------------------------------------------- the compiled parser


def test_the_compiled_http_parser_is_in_use() -> None:
    assert "AIOHTTP_NO_EXTENSIONS" not in os.environ
    assert not aiohttp.http_parser.NO_EXTENSIONS
    assert aiohttp.http_parser.HttpRequestParser is not aiohttp.http_parser.HttpRequestParserPy
    assert aiohttp.http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"
    assert limits.c_parser_in_use()


def test_the_portal_refuses_to_start_on_the_pure_python_parser(tmp_path: Path) -> None:
    config = write_config(tmp_path, None)
    env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "portal", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert b"pure-Python HTTP parser" in proc.stderr
    assert b'"ready"' not in proc.stdout and b"first_admin" not in proc.stdout
